"""OPE's ``served`` target: a model scored as the service would serve it, with each
impression's own policy, settings, position and list length.

The logs here are drawn by the service's own samplers (:mod:`recloop.serving.exploration`)
from a table of scores per user, masking what each user was shown before, as the service
does with ``exclude_consumed``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from recloop.data.dataset import TEST, TRAIN, PreparedDataset
from recloop.errors import ConfigError, DataError
from recloop.evaluation.ope import (
    BaselineRewards,
    OPEConfig,
    importance_weights,
    logged_events,
    ope_report,
    policy_terms,
)
from recloop.evaluation.protocol import Scorer
from recloop.ranking import topk
from recloop.serving.exploration import (
    plackett_luce_propensities,
    sample_epsilon_greedy,
    sample_plackett_luce,
)

U, N = 5, 12
"""Users and items of the logs below."""
CFG = OPEConfig(target="served", weight_cap=None, n_boot=0)


def _table(seed: int) -> np.ndarray:
    """(U + 1, N + 1) scores, float32 values as a model's; row 0 and column 0 are never
    used."""
    t = np.random.default_rng(seed).normal(0, 2, (U + 1, N + 1))
    return t.astype(np.float32).astype(np.float64)


def _scorer(table: np.ndarray) -> Scorer:
    t = torch.from_numpy(table).float()

    def score(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return t[user]

    return score


def _masked(table: np.ndarray, user: int, shown: list[int]) -> np.ndarray:
    s = table[user].copy()
    s[0] = -np.inf
    s[shown] = -np.inf
    return s


def _log(
    table: np.ndarray,
    *,
    policy: str,
    lists: int = 4,
    k: int = 3,
    epsilon: float = 0.5,
    temperature: float = 0.7,
    seed: int = 0,
    context: Callable[[np.random.Generator, int], tuple[np.ndarray, dict[str, Any]]] | None = None,
) -> PreparedDataset:
    """``lists`` lists of ``k`` items per user, each from the user's state after the lists
    before it (their items masked), with the samplers' propensities; the first list of a user
    is TRAIN, the others TEST.  Rewards are Bernoulli(0.3).  ``policy="mixed"``: ε-greedy
    and softmax lists in turn.  ``context(rng, user)``: a list's (N + 1,) scores and the
    context it logs (``served_context``, on its first row), for lists drawn as a store-fed
    service draws them instead."""
    import orjson

    rng = np.random.default_rng(seed)
    keys = ("u", "i", "ts", "split", "p", "pos", "len", "policy", "ctx")
    cols: dict[str, list[object]] = {c: [] for c in keys}
    for u in range(1, U + 1):
        shown: list[int] = []
        for t in range(lists):
            ctx = None
            s = _masked(table, u, shown) if context is None else None
            if context is not None:
                s, ctx = context(rng, u)
            assert s is not None
            kind = policy if policy != "mixed" else ("epsilon", "softmax")[(u + t) % 2]
            if kind == "epsilon":
                greedy = topk(torch.from_numpy(s)[None], k, row_keys=torch.tensor([u])).indices[0]
                slate = sample_epsilon_greedy(s, greedy.numpy(), epsilon=epsilon, rng=rng)
            else:
                slate = sample_plackett_luce(s, k, temperature=temperature, rng=rng)
            for j, (item, p) in enumerate(zip(slate.items, slate.propensity, strict=True)):
                cols["u"].append(u)
                cols["i"].append(int(item))
                cols["ts"].append(1000 * u + t)
                cols["split"].append(TRAIN if t == 0 else TEST)
                cols["p"].append(float(p))
                cols["pos"].append(j)
                cols["len"].append(len(slate.items))
                cols["policy"].append(kind)
                cols["ctx"].append(orjson.dumps(ctx).decode() if ctx and j == 0 else "")
            shown += slate.items.tolist()
    e = len(cols["u"])
    ds = PreparedDataset.from_arrays(
        user=np.array(cols["u"]), item=np.array(cols["i"]), timestamp=np.array(cols["ts"]),
        reward=(rng.random(e) < 0.3).astype(np.float32), split=np.array(cols["split"]),
        n_users=U, n_items=N, item_ids=[f"i{j}" for j in range(1, N + 1)],
    )  # fmt: skip
    order = np.lexsort((np.arange(e), np.array(cols["ts"]), np.array(cols["u"])))
    kinds = np.array(cols["policy"])[order]
    extra = {
        "propensity": np.array(cols["p"])[order],
        "policy": kinds,
        "position": np.array(cols["pos"], np.int32)[order],
        "list_length": np.array(cols["len"], np.int32)[order],
        "epsilon": np.where(kinds == "epsilon", epsilon, np.nan),
        "temperature": np.where(kinds == "softmax", temperature, np.nan),
    }
    if context is not None:
        extra["served_context"] = np.array(cols["ctx"], dtype=object)[order]
    return replace(ds, extra=extra)


def test_the_logging_model_gets_its_logged_propensities_back() -> None:
    """Served as logged, the logging model's pi is the service's propensity at every slot:
    every weight is 1.  Fails if a slot's state included the items above it in its list,
    if earlier lists were not masked, or if the list length or pool size were wrong."""
    table = _table(0)
    ds = _log(table, policy="epsilon", lists=4, k=3, epsilon=0.5)
    events = logged_events(ds, cfg=CFG)
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=CFG)
    np.testing.assert_allclose(terms.p_target, np.exp(events.log_propensity), rtol=1e-12)
    w_raw, _, _ = importance_weights(events, terms, None)
    np.testing.assert_allclose(w_raw, 1.0, rtol=1e-12)
    # some slots explored and showed items of other slots' greedy lists or outside them
    assert len(np.unique(np.round(terms.p_target, 9))) >= 3


def test_softmax_first_positions_get_their_logged_propensities_back() -> None:
    table = _table(1)
    ds = _log(table, policy="softmax", lists=6, k=1, temperature=0.7)
    events = logged_events(ds, cfg=CFG)
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=CFG)
    np.testing.assert_allclose(terms.p_target, np.exp(events.log_propensity), rtol=1e-9)
    # and that is the service's Plackett-Luce choice probability of the first position
    row = int(events.rows[0])
    u, start = int(ds.user[row]), int(ds.user_offsets[ds.user[row]])
    s = _masked(table, u, ds.item[start:row].tolist())
    p, _ = plackett_luce_propensities(s, np.array([ds.item[row]]), temperature=0.7)
    assert terms.p_target[0] == pytest.approx(float(p[0]), rel=1e-9)


def _indicator_rewards(n_users: int, item: int) -> BaselineRewards:
    bias = np.zeros(N + 1, np.float32)
    bias[item] = 1.0
    return BaselineRewards(mu=0.0, user_bias=np.zeros(n_users + 1, np.float32), item_bias=bias)


@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0])
def test_pi_over_every_item_is_the_served_lists_frequency(epsilon: float) -> None:
    """V(s) with q = [a = x] is pi(x | s, slot): over every item x it must match how often
    the service's sampler, serving another model from the slot's state, puts x there."""
    logging_table, target_table = _table(2), _table(3)
    ds = _log(logging_table, policy="epsilon", lists=3, k=4, epsilon=0.5)
    ds = replace(ds, extra={**ds.extra, "epsilon": np.full(ds.n_events, epsilon)})
    events = logged_events(ds, cfg=CFG)
    pick = [int(np.flatnonzero(ds.split[events.rows] == TEST)[i]) for i in (0, 5, 11)]
    draws = 4000
    rng = np.random.default_rng(9)
    for e in pick:
        row = int(events.rows[e])
        slot = int(ds.extra["position"][row])
        u, start = int(ds.user[row]), int(ds.user_offsets[ds.user[row]])
        state = row - slot  # the list's first row: its items are not yet consumed there
        s = _masked(target_table, u, ds.item[start:state].tolist())
        greedy = topk(torch.from_numpy(s)[None], 4, row_keys=torch.tensor([u])).indices[0]
        at_slot = np.array(
            [
                sample_epsilon_greedy(s, greedy.numpy(), epsilon=epsilon, rng=rng).items[slot]
                for _ in range(draws)
            ]
        )
        freq = np.bincount(at_slot, minlength=N + 1) / draws
        pi = np.empty(N + 1)
        for x in range(N + 1):
            ev = replace(events, rewards=_indicator_rewards(U, x))
            pi[x] = policy_terms(_scorer(target_table), ds, ev, history=1, cfg=CFG).v_target[e]
        assert pi.sum() == pytest.approx(1.0, abs=1e-12)
        assert pi[0] == 0.0 and np.all(pi[ds.item[start:state]] == 0.0)  # masked
        se = np.sqrt(pi * (1 - pi) / draws)
        assert np.all(np.abs(freq - pi) <= 4 * se + 1e-12), (slot, freq, pi)


def test_ips_on_served_lists_is_unbiased_for_the_served_value() -> None:
    """Rewards depend on the item and its user only (the item-position model): the mean
    over logs of IPS and DR equals the value of serving the target model with the log's
    exploration, computed from pi and the true reward means."""
    logging_table, target_table = _table(4), _table(5)
    mu = np.random.default_rng(6).uniform(0, 1, (U + 1, N + 1))
    ips, dr, truth = [], [], []
    for seed in range(60):
        ds = _log(logging_table, policy="epsilon", lists=3, k=3, epsilon=0.6, seed=seed)
        r = (np.random.default_rng(100 + seed).random(ds.n_events) < mu[ds.user, ds.item]).astype(
            np.float32
        )
        ds = replace(ds, reward=r, returns=r)
        cfg = replace(CFG, mask_consumed=True)
        events = logged_events(ds, cfg=cfg)
        terms = policy_terms(_scorer(target_table), ds, events, history=1, cfg=cfg)
        rep = ope_report(events, terms, cfg)
        ips.append(rep.estimates["ips"].value)
        dr.append(rep.estimates["dr"].value)
        # the truth on these states: sum_a pi(a) mu(u, a)
        v = np.zeros(events.n_events)
        for x in range(1, N + 1):
            ev = replace(events, rewards=_indicator_rewards(U, x))
            pi_x = policy_terms(_scorer(target_table), ds, ev, history=1, cfg=cfg).v_target
            v += pi_x * mu[events.user, x]
        truth.append(v.mean())
    diff = np.array(ips) - np.array(truth)
    assert abs(diff.mean()) < 3 * diff.std() / np.sqrt(len(diff)) + 1e-3, diff.mean()
    diff = np.array(dr) - np.array(truth)
    assert abs(diff.mean()) < 3 * diff.std() / np.sqrt(len(diff)) + 1e-3, diff.mean()


def test_served_target_refuses_what_it_cannot_score() -> None:
    table = _table(7)
    ds = _log(table, policy="epsilon")
    events = logged_events(ds, cfg=CFG)
    plain = replace(ds, extra={"propensity": ds.extra["propensity"]})
    with pytest.raises(DataError, match=r"target=served needs .* missing policy, position"):
        policy_terms(_scorer(table), plain, events, history=1, cfg=CFG)
    bad = ds.extra["policy"].astype(object)
    row = int(events.rows[2])
    bad[row] = "boltzmann"
    with pytest.raises(DataError, match=rf"row {row}: field 'policy' 'boltzmann' is no serving"):
        policy_terms(
            _scorer(table), replace(ds, extra={**ds.extra, "policy": bad}), events, history=1,
            cfg=CFG,
        )  # fmt: skip
    eps = ds.extra["epsilon"].copy()
    eps[row] = np.nan
    with pytest.raises(DataError, match=rf"row {row}: field 'epsilon' nan of an epsilon list"):
        policy_terms(
            _scorer(table), replace(ds, extra={**ds.extra, "epsilon": eps}), events, history=1,
            cfg=CFG,
        )  # fmt: skip


def test_softmax_slots_below_the_first_refuse_lists_they_cannot_reconstruct() -> None:
    """A softmax slot j > 0 is scored with the items and propensities of the slots above it:
    a list with one of them missing or out of place, drawn with another policy or temperature
    above, of another length above, repeating an item, or whose propensities were not logged,
    is refused, naming the first such row and counting them.  The faulty list is the last
    one, so that the row named is not simply the first lower slot."""
    table = _table(7)
    soft = _log(table, policy="softmax", k=3)
    ev = logged_events(soft, cfg=CFG)
    pos = soft.extra["position"]
    last = int(ev.rows[-1])  # slot 2 of the last list
    assert pos[last] == 2 and pos[last - 1] == 1 and pos[last - 2] == 0

    def refused(match: str, **extra: np.ndarray) -> None:
        ds = replace(soft, extra={**soft.extra, **extra})
        with pytest.raises(DataError, match=match):
            policy_terms(_scorer(table), ds, ev, history=1, cfg=CFG)

    p = pos.copy()
    p[last] = 3  # its slot 2 is not in the data
    refused(rf"row {last}: field 'position' 3 of a softmax list lacks .* \(1 such", position=p)
    p = pos.copy()
    p[last - 2] = 1  # the list reads 1, 1, 2: this row is a slot 1 with nothing above it
    refused(rf"row {last - 2}: field 'position' 1 of a softmax list lacks .* \(3 such", position=p)
    # the same with that row out of the evaluated split: the rows below it are refused
    split = soft.split.copy()
    split[last - 2] = TRAIN
    cut = replace(soft, split=split, extra={**soft.extra, "position": p})
    with pytest.raises(
        DataError, match=rf"row {last - 1}: field 'position' 1 .* lacks .* \(2 such"
    ):
        policy_terms(_scorer(table), cut, logged_events(cut, cfg=CFG), history=1, cfg=CFG)
    n = soft.extra["list_length"].copy()
    n[last - 2] = 4  # the slot above belongs to a list of another length
    refused(rf"row {last - 1}: .* lacks .* \(2 such", list_length=n)
    temp = soft.extra["temperature"].copy()
    temp[last - 1] = 2.0  # slot 1 drawn with another temperature than slot 0 (and 2)
    refused(rf"row {last - 1}: .* 1 of .* another policy or temperature \(2 such", temperature=temp)
    policy = soft.extra["policy"].astype(object)
    policy[last - 2] = "topk"
    refused(
        rf"row {last - 1}: .* below a slot served with another policy .* \(2 such", policy=policy
    )
    item = soft.item.copy()
    item[last] = item[last - 2]
    with pytest.raises(DataError, match=rf"row {last}: .* repeats an item above it .* \(1 such"):
        policy_terms(_scorer(table), replace(soft, item=item), ev, history=1, cfg=CFG)
    # the logged propensities are what a lower slot is weighed with: fitted ones will not do
    two = _log(table, policy="softmax", k=2)
    fitted = logged_events(two, cfg=replace(CFG, behaviour="fitted"))
    with pytest.raises(ConfigError, match="softmax slots below the first with the logged"):
        policy_terms(_scorer(table), two, fitted, history=1, cfg=CFG)
    plain = {k: v for k, v in two.extra.items() if k != "propensity"}
    ev2 = logged_events(two, cfg=CFG)
    with pytest.raises(DataError, match="with the logged 'propensity' of the slots above"):
        policy_terms(_scorer(table), replace(two, extra=plain), ev2, history=1, cfg=CFG)


@pytest.mark.parametrize("temperature", [1e-4, 5e-4, 0.011])
def test_softmax_lists_at_low_temperatures_keep_their_weights(temperature: float) -> None:
    """At a low temperature the mass left below a list's first slots is far below what a
    float64 holds outside the log domain (the service allows T down to 1e-4): the logging
    model re-served must still get every weight 1."""
    table = _table(14) * 4
    ds = _log(table, policy="softmax", lists=3, k=4, temperature=temperature)
    events = logged_events(ds, cfg=CFG)
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=CFG)
    w_raw, _, _ = importance_weights(events, terms, None)
    np.testing.assert_allclose(w_raw, 1.0, rtol=1e-9)


def test_first_slots_of_softmax_lists_are_scored_as_before_bit_for_bit() -> None:
    """A softmax list's first slot is softmax(scores / T) over the unmasked items, exactly
    the same bits whether or not lower slots share its batch."""
    table = _table(15)
    ds = _log(table, policy="softmax", lists=3, k=3, temperature=0.7)
    events = logged_events(ds, cfg=CFG)
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=CFG)
    for e in np.flatnonzero(ds.extra["position"][events.rows] == 0):
        row = int(events.rows[e])
        u, start = int(ds.user[row]), int(ds.user_offsets[ds.user[row]])
        s = torch.from_numpy(_masked(table, u, ds.item[start:row].tolist())).float().double()
        t = torch.tensor([0.7], dtype=torch.float64)
        expected = torch.softmax(s[None] / t[:, None], 1)[0, int(ds.item[row])].item()
        assert terms.p_target[e] == expected


@pytest.mark.parametrize("policy", ["softmax", "mixed"])
def test_softmax_lists_get_their_logged_propensities_back_at_every_slot(policy: str) -> None:
    """Served as logged, the logging model's pi at a softmax slot given the items above it
    is the logged choice probability, and the items above weigh 1: every weight is 1; also
    when ε-greedy and softmax lists share a batch."""
    table = _table(12)
    ds = _log(table, policy=policy, lists=3, k=4, temperature=0.7)
    if policy == "mixed":
        assert set(ds.extra["policy"][ds.split == TEST]) == {"epsilon", "softmax"}
    events = logged_events(ds, cfg=CFG)
    assert (ds.extra["position"][events.rows] == 3).sum() > 0
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=CFG)
    np.testing.assert_allclose(terms.p_target, np.exp(events.log_propensity), rtol=1e-9)


def _slates(n: int, k: int) -> list[tuple[int, ...]]:
    from itertools import permutations

    return list(permutations(range(1, n + 1), k))


@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_softmax_lists_are_scored_without_bias_at_every_slot(temperature: float) -> None:
    """Every ordered list of 3 of 5 items, one per user (all in the same state), logged with
    its Plackett-Luce propensities: the expectation of IPS and of DR (with a wrong reward
    model) under the logging policy, summed over the lists weighted by their probability,
    is exactly the value of serving the target model with the same softmax, whose reward at
    a slot depends on its item and its position (cascade weights; Kiyohara et al. 2022).
    Fails without the weight of the items above a slot, or with them left in its pool."""
    n, k = 5, 3
    slates = _slates(n, k)
    u = len(slates)
    rng = np.random.default_rng(13)
    log_scores = np.r_[-np.inf, rng.normal(0, 1.5, n)]
    # float32 values, as the scorer's: the truth below uses the same numbers
    tgt_scores = np.r_[-np.inf, rng.normal(0, 1.5, n)].astype(np.float32).astype(np.float64)
    base = rng.uniform(0, 1, n + 1)
    decay = np.array([1.0, 0.6, 0.3])
    user = np.repeat(np.arange(1, u + 1), k)
    item = np.array(slates).reshape(-1)
    p_log = np.concatenate(
        [
            plackett_luce_propensities(log_scores, np.array(sl), temperature=temperature)[0]
            for sl in slates
        ]
    )
    reward = (base[item] * np.tile(decay, u)).astype(np.float32).astype(np.float64)
    ds = PreparedDataset.from_arrays(
        user=user, item=item, timestamp=np.repeat(np.arange(u), k) + 100, reward=reward,
        split=np.full(u * k, TEST), n_users=u, n_items=n,
    )  # fmt: skip
    ds = replace(
        ds,
        extra={
            "propensity": p_log,
            "policy": np.full(u * k, "softmax"),
            "position": np.tile(np.arange(k, dtype=np.int32), u),
            "list_length": np.full(u * k, k, np.int32),
            "epsilon": np.full(u * k, np.nan),
            "temperature": np.full(u * k, temperature),
        },
    )
    wrong_q = BaselineRewards(
        mu=0.4,
        user_bias=np.zeros(u + 1, np.float32),
        item_bias=rng.normal(0, 0.3, n + 1).astype(np.float32),
    )
    events = logged_events(ds, cfg=CFG, rewards=wrong_q)
    tgt = np.tile(tgt_scores, (u + 1, 1))
    terms = policy_terms(_scorer(tgt), ds, events, history=1, cfg=CFG)
    w, _, _ = importance_weights(events, terms, None)
    mu_slate = np.prod(p_log.reshape(u, k), 1)  # (u,) the logging policy's list probability
    assert mu_slate.sum() == pytest.approx(1.0, abs=1e-12)
    ips = (mu_slate * (w * events.reward).reshape(u, k).sum(1)).sum()
    dr_terms = terms.v_target + w * (events.reward - events.q_logged)
    dr = (mu_slate * dr_terms.reshape(u, k).sum(1)).sum()
    pi_slate = np.array(
        [
            plackett_luce_propensities(tgt_scores, np.array(sl), temperature=temperature)[1]
            for sl in slates
        ]
    )
    truth = (pi_slate * reward.reshape(u, k).sum(1)).sum()
    assert ips == pytest.approx(truth, rel=1e-9)
    assert dr == pytest.approx(truth, rel=1e-9)
    assert (mu_slate * w.reshape(u, k)[:, 2]).sum() == pytest.approx(1.0, rel=1e-9)


def _pairs_extra(
    propensity: list[float], position: list[int], order: np.ndarray
) -> dict[str, np.ndarray]:
    """Serving columns of ε-greedy (ε = 0.5) lists of two, rows put in dataset ``order``."""
    e = len(propensity)
    return {
        "propensity": np.array(propensity)[order],
        "policy": np.full(e, "epsilon"),
        "position": np.array(position, np.int32)[order],
        "list_length": np.full(e, 2, np.int32),
        "epsilon": np.full(e, 0.5),
        "temperature": np.full(e, np.nan),
    }


def test_a_model_with_its_own_id_maps_is_re_served_as_its_service_served_it() -> None:
    """The gate scores the current model through :class:`MappedScorer` (the dataset's ids
    translated into the model's).  Its service breaks score ties by keys of its own user and
    item indices (0 for an unknown user) and explores over its whole catalogue, items the
    dataset never saw included: the served target must do the same to give back the
    propensities the service logged.  Integer scores tie everywhere."""
    from types import SimpleNamespace

    from recloop.loop.gate import MappedScorer

    rng = np.random.default_rng(11)
    n_art = 14
    art_users = [f"u{i}" for i in range(1, U + 1)]
    art_items = [f"i{i}" for i in range(1, n_art + 1)]
    table = rng.integers(0, 3, (U + 1, n_art + 1)).astype(np.float64)
    t = torch.from_numpy(table).float()

    def art_policy(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return t[user]

    art = SimpleNamespace(user_ids=art_users, item_ids=art_items, policy=art_policy, history_len=1)
    served_users = ["u2", "u9", "u4", "u1"]  # u9: unknown to the model, its row 0
    rows: list[tuple[str, str, int, int, int, float]] = []
    for ts, raw in enumerate(served_users):
        key = art_users.index(raw) + 1 if raw in art_users else 0
        shown: list[int] = []
        for lst in range(3):
            s = table[key].copy()
            s[0] = -np.inf
            s[shown] = -np.inf
            greedy = topk(torch.from_numpy(s)[None], 2, row_keys=torch.tensor([key])).indices[0]
            slate = sample_epsilon_greedy(s, greedy.numpy(), epsilon=0.5, rng=rng)
            for j, (col, p) in enumerate(zip(slate.items, slate.propensity, strict=True)):
                rows.append((raw, art_items[col - 1], 100 * ts + lst, j, 2, float(p)))
            shown += slate.items.tolist()
    # the dataset's own maps: other users and items, in another order
    d_users = sorted({r[0] for r in rows}, reverse=True)
    d_items = sorted({r[1] for r in rows}, key=lambda x: (len(x), x), reverse=True)
    assert len(d_items) < n_art  # the model can show items the dataset never saw
    e = len(rows)
    ds = PreparedDataset.from_arrays(
        user=np.array([d_users.index(r[0]) + 1 for r in rows]),
        item=np.array([d_items.index(r[1]) + 1 for r in rows]),
        timestamp=np.array([r[2] for r in rows]), split=np.full(e, TEST),
        user_ids=d_users, item_ids=d_items, n_users=len(d_users), n_items=len(d_items),
    )  # fmt: skip
    ds = replace(ds, split=np.where(np.arange(e) % 3 == 0, TRAIN, TEST).astype(np.int8))
    order = np.lexsort(
        (np.arange(e), [r[2] for r in rows], [d_users.index(r[0]) + 1 for r in rows])
    )
    ds = replace(ds, extra=_pairs_extra([r[5] for r in rows], [r[3] for r in rows], order))
    events = logged_events(ds, cfg=CFG)
    scorer = MappedScorer(art, ds)  # type: ignore[arg-type]
    terms = policy_terms(scorer, ds, events, history=1, cfg=CFG)
    np.testing.assert_allclose(terms.p_target, np.exp(events.log_propensity), rtol=1e-12)
    # V over the whole catalogue: the unseen items' share of pi is there too
    one = BaselineRewards(
        mu=1.0, user_bias=np.zeros(len(d_users) + 1, np.float32),
        item_bias=np.zeros(len(d_items) + 1, np.float32),
    )  # fmt: skip
    v = policy_terms(scorer, ds, replace(events, rewards=one), history=1, cfg=CFG).v_target
    np.testing.assert_allclose(v, 1.0, rtol=1e-12)


def test_lists_served_in_one_second_each_start_from_their_own_state() -> None:
    """Two top-k lists of one item for one user in the same second: the second was served
    after the first, whose item it then excluded; it is the model's second best.  Served
    from its own state (the first list's item consumed), the logging model shows it with
    probability 1."""
    table = np.zeros((2, 4))
    table[1, 1:] = [3.0, 2.0, 1.0]
    ds = PreparedDataset.from_arrays(
        user=np.array([1, 1, 1]), item=np.array([3, 1, 2]), timestamp=np.array([5, 10, 10]),
        split=np.array([TRAIN, TEST, TEST]), n_users=1, n_items=3,
    )  # fmt: skip
    ds = replace(
        ds,
        extra={
            "propensity": np.ones(3),
            "policy": np.full(3, "topk"),
            "position": np.zeros(3, np.int32),
            "list_length": np.ones(3, np.int32),
            "epsilon": np.full(3, np.nan),
            "temperature": np.full(3, np.nan),
        },
    )
    events = logged_events(ds, cfg=CFG)
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=CFG)
    np.testing.assert_array_equal(terms.p_target, [1.0, 1.0])


def test_fallback_lists_are_left_out_of_the_served_target() -> None:
    """A popular fallback list was drawn by no model's policy: the served target compares
    the models on the other impressions, and says how many it left out."""
    table = _table(8)
    ds = _log(table, policy="epsilon")
    test_rows = np.flatnonzero(ds.split == TEST)
    source = np.full(ds.n_events, "policy", dtype=object)
    source[test_rows[:5]] = "popular"
    source[test_rows[5]] = ""  # a list whose source was not logged: kept
    ds = replace(ds, extra={**ds.extra, "list_source": source})
    events = logged_events(ds, cfg=CFG)
    assert events.left_out == 5 and events.n_events == test_rows.shape[0] - 5
    np.testing.assert_array_equal(events.rows, test_rows[5:])
    # other targets evaluate every event
    plain = logged_events(ds, cfg=replace(CFG, target="uniform_topk"))
    assert plain.left_out == 0 and plain.n_events == test_rows.shape[0]
    source[test_rows] = "popular"
    with pytest.raises(DataError, match="every impression of the test split is of a fallback"):
        logged_events(replace(ds, extra={**ds.extra, "list_source": source}), cfg=CFG)


def test_the_weight_cap_bounds_the_baseline_term_of_lower_softmax_slots() -> None:
    """With a weight cap the estimators clip W w; the DR baseline term W V of a lower slot is
    clipped the same way, min(W, cap) V.  With q = 1 everywhere V = 1, so the baseline term
    is W itself."""
    logging_table = _table(16)
    target_table = 2.0 * logging_table  # sharper: the logged items, mostly its top ones, gain
    ds = _log(logging_table, policy="softmax", lists=3, k=4, temperature=0.7)
    one = BaselineRewards(
        mu=1.0, user_bias=np.zeros(U + 1, np.float32), item_bias=np.zeros(N + 1, np.float32)
    )
    events = logged_events(ds, cfg=CFG, rewards=one)
    free = policy_terms(_scorer(target_table), ds, events, history=1, cfg=CFG)
    cap = 1.5
    capped = policy_terms(
        _scorer(target_table), ds, events, history=1, cfg=replace(CFG, weight_cap=cap)
    )
    assert free.v_target.max() > cap  # the cap binds somewhere
    np.testing.assert_allclose(capped.v_target, np.minimum(free.v_target, cap), rtol=1e-12)
    first = ds.extra["position"][events.rows] == 0
    np.testing.assert_allclose(free.v_target[first], 1.0, rtol=1e-12)


def test_the_slots_of_one_list_share_one_forward_pass() -> None:
    """served_scores scores equal neighbouring rows (a list's slots, all in its state) once
    and repeats the scores: the same bits as scoring each row alone, with one policy row
    per list."""
    from recloop.evaluation.ope import served_scores

    table = _table(18)
    ds = _log(table, policy="softmax", lists=3, k=4, temperature=0.7)
    rows = np.flatnonzero(ds.split == TEST)
    state = rows - ds.extra["position"][rows]  # each slot's list start
    seen: list[int] = []
    inner = _scorer(table)

    def counting(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        seen.append(int(user.shape[0]))
        return inner(user, history, history_reward)

    cfg = replace(CFG, batch_size=1024)
    batched = [(sl, u, s) for sl, u, s in served_scores(counting, ds, state, history=2, cfg=cfg)]
    assert sum(seen) == np.unique(state).shape[0] < state.shape[0]
    alone = list(served_scores(inner, ds, state, history=2, cfg=replace(cfg, batch_size=1)))
    got = torch.cat([s for _, _, s in batched])
    want = torch.cat([s for _, _, s in alone])
    assert torch.equal(got, want)
    assert torch.equal(torch.cat([u for _, u, _ in batched]), torch.from_numpy(ds.user[state]))


def test_a_score_that_is_not_finite_is_never_shown() -> None:
    """The service's softmax sampler never shows an item whose score is NaN or +inf: the
    served target scores the list as if that item were masked, whatever else shares the
    batch (a NaN used to spread to every row of its batch)."""
    table = _table(19)
    ds = _log(table, policy="softmax", lists=3, k=4, temperature=0.7)
    events = logged_events(ds, cfg=CFG)
    never = 11  # shown in some lists: under the target it has probability 0 there
    masked = table.copy()
    masked[:, never] = -np.inf
    want = policy_terms(_scorer(masked), ds, events, history=1, cfg=CFG)
    for bad in (np.nan, np.inf):
        odd = table.copy()
        odd[:, never] = bad
        for size in (1, 4, 1024):
            cfg = replace(CFG, batch_size=size)
            got = policy_terms(_scorer(odd), ds, events, history=1, cfg=cfg)
            np.testing.assert_allclose(got.p_target, want.p_target, rtol=1e-12)
            np.testing.assert_allclose(got.v_target, want.v_target, rtol=1e-12)


def test_positions_keeps_the_first_slots_of_each_list_and_counts_the_rest() -> None:
    """``ope.positions=2``: only the impressions at a list's first two slots are evaluated,
    with the same terms as when every slot is; the others are left out and counted."""
    table = _table(20)
    ds = _log(table, policy="softmax", lists=3, k=4, temperature=0.7)
    every = logged_events(ds, cfg=CFG)
    cfg = replace(CFG, positions=2)
    top = logged_events(ds, cfg=cfg)
    slot = ds.extra["position"][every.rows]
    np.testing.assert_array_equal(top.rows, every.rows[slot < 2])
    assert top.left_out == int((slot >= 2).sum()) > 0
    all_terms = policy_terms(_scorer(2 * table), ds, every, history=1, cfg=CFG)
    top_terms = policy_terms(_scorer(2 * table), ds, top, history=1, cfg=cfg)
    np.testing.assert_array_equal(top_terms.p_target, all_terms.p_target[slot < 2])
    # the report says how many impressions it left out, and so does `recloop evaluate --ope`
    from types import SimpleNamespace

    from recloop.cli.train import _ope_tables

    rep = ope_report(top, top_terms, cfg).to_dict()
    assert rep["left_out"] == top.left_out
    table_text = _ope_tables(
        [SimpleNamespace(run="r", algo="a")],
        [rep],
        [],
        split="test",  # type: ignore[list-item]
    )
    assert f"{top.left_out} impressions of the split left out" in table_text
    with pytest.raises(ConfigError, match=r"ope\.positions must be >= 1, got 0"):
        replace(CFG, positions=0)
    plain = replace(ds, extra={k: v for k, v in ds.extra.items() if k != "position"})
    with pytest.raises(DataError, match=r"ope\.positions needs each impression's 'position'"):
        logged_events(plain, cfg=cfg)


def test_the_report_gives_the_effective_sample_size_of_each_list_position() -> None:
    """On lists, the report gives each slot's ESS over its impressions (the weights of the
    lower softmax slots multiply those above them); the logging model's are all 1, and
    lists of one item get none."""
    from types import SimpleNamespace

    from recloop.cli.train import _ope_tables
    from recloop.evaluation.ope import effective_sample_size

    table = _table(21)
    ds = _log(table, policy="softmax", lists=3, k=4, temperature=0.7)
    events = logged_events(ds, cfg=CFG)
    same = ope_report(events, policy_terms(_scorer(table), ds, events, history=1, cfg=CFG), CFG)
    assert same.ess_by_position == pytest.approx({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    terms = policy_terms(_scorer(2 * table), ds, events, history=1, cfg=CFG)
    rep = ope_report(events, terms, CFG)
    _, w, _ = importance_weights(events, terms, CFG.weight_cap)
    at = ds.extra["position"][events.rows] == 2
    assert rep.ess_by_position[2] == pytest.approx(effective_sample_size(w[at]) / at.sum())
    assert rep.ess_by_position[3] < 1.0
    text = _ope_tables([SimpleNamespace(run="r", algo="a")], [rep.to_dict()], [], split="test")
    assert "r: ESS / impressions by list position: 0: " in text
    ones = _log(table, policy="softmax", lists=3, k=1)
    ev1 = logged_events(ones, cfg=CFG)
    rep1 = ope_report(ev1, policy_terms(_scorer(table), ones, ev1, history=1, cfg=CFG), CFG)
    assert rep1.ess_by_position == {}


def test_the_re_serve_check_finds_the_impressions_a_model_does_not_get_back() -> None:
    """The logging model re-served on its own context gets every propensity back; on
    another context (its service excluded what each user saw, the OPE does not) it does
    not, and the check names the first such impression.  Other versions' impressions are
    not compared."""
    from recloop.errors import ConfigError
    from recloop.evaluation.ope import reserve_check

    table = _table(0)
    ds = _log(table, policy="mixed", lists=4, k=3, epsilon=0.5)
    version = np.where(ds.user <= 3, "v1", "v2")
    ds = replace(ds, extra={**ds.extra, "policy_version": version})
    events = logged_events(ds, cfg=CFG)
    mine = int((ds.user[events.rows] <= 3).sum())
    # the logging table for users 1-3, another model's for users 4-5
    other = table.copy()
    other[4:] = _table(7)[4:]
    terms = policy_terms(_scorer(other), ds, events, history=1, cfg=CFG)
    ok = reserve_check(ds, events, terms, version="v1")
    assert (ok.impressions, ok.mismatched, ok.first_row) == (mine, 0, None)
    assert ok.worst < 1e-9 and ok.share == 0.0
    assert ok.words() == f"its {mine} own impressions re-served with their propensities"
    theirs = reserve_check(ds, events, terms, version="v2")
    assert theirs.impressions == events.n_events - mine and theirs.mismatched > 0
    row = theirs.first_row
    assert row is not None and ds.user[row] >= 4
    at = int(np.flatnonzero(events.rows == row)[0])
    assert theirs.logged == pytest.approx(np.exp(events.log_propensity[at]))
    assert theirs.reserved == pytest.approx(terms.p_target[at])
    assert "own impressions re-served with other propensities (row" in theirs.words()
    none = reserve_check(ds, events, terms, version="v9")
    assert (none.impressions, none.share) == (0, 0.0)
    assert none.words() == "not checked: no evaluated impression was served by v9"
    # the right model on the wrong context: earlier lists' items not excluded
    loose = replace(CFG, mask_consumed=False)
    terms = policy_terms(_scorer(table), ds, events, history=1, cfg=loose)
    bad = reserve_check(ds, events, terms, version="v1")
    assert 0 < bad.mismatched <= mine and bad.worst > 0.01
    # a NaN probability is a mismatch, not a pass
    nan = replace(terms, p_target=np.where(np.arange(events.n_events) == 0, np.nan, terms.p_target))
    assert reserve_check(ds, events, nan, version="v1", rtol=1.0).mismatched == 1
    bare = {k: v for k, v in ds.extra.items() if k != "policy_version"}
    with pytest.raises(DataError, match="'policy_version'"):
        reserve_check(replace(ds, extra=bare), events, terms, version="v1")
    with pytest.raises(ConfigError, match="logged propensities; these are fitted"):
        reserve_check(ds, replace(events, behaviour="fitted"), terms, version="v1")


H = 3
"""History length of the context-dependent scorer below."""


def _context_scorer(table: np.ndarray, mix: np.ndarray) -> Scorer:
    """Scores that depend on the state: table[user] + sum_h reward_h mix[item_h]."""
    t, m = torch.from_numpy(table).float(), torch.from_numpy(mix).float()

    def score(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return t[user] + (m[history] * history_reward[..., None]).sum(1)

    return score


def _context_log(table: np.ndarray, mix: np.ndarray, *, lists: int = 4) -> PreparedDataset:
    """Lists drawn, as a store-fed service draws them, from contexts that the log cannot
    rebuild: each list's recent items are a random handful (an unknown id among them),
    never the user's earlier impressions, and only some of them are excluded.  Softmax and
    ε-greedy lists of 3 in turn; each list's context is logged on its first row."""
    m = mix.astype(np.float32).astype(np.float64)

    def context(rng: np.random.Generator, u: int) -> tuple[np.ndarray, dict[str, Any]]:
        recent = [int(x) for x in rng.choice(np.arange(1, N + 1), 4, replace=False)]
        rewards = rng.random(5).round(2).tolist()
        raw = [f"i{x}" for x in recent[:3]] + ["unknown"] + [f"i{recent[3]}"]
        known = recent[1:]  # the unknown id is dropped, then the last H kept
        hist_reward = rewards[1:3] + rewards[4:]
        s = table[u] + (m[known] * np.asarray(hist_reward)[:, None]).sum(0)
        excluded = recent[1::2]
        s[0] = -np.inf
        s[excluded] = -np.inf
        return s, {"recent": raw, "rewards": rewards, "excluded": [f"i{x}" for x in excluded]}

    return _log(table, policy="mixed", lists=lists, k=3, epsilon=0.5, temperature=0.7,
                context=context)  # fmt: skip


def test_lists_are_re_served_on_the_context_their_service_logged() -> None:
    """A store-fed service's state is not the log's history: from the logged context (its
    recent items, unknown ids dropped before the last H are taken, and its excluded items)
    the logging model gets every propensity back, at every slot, whatever
    ``mask_consumed``; without it, the rebuilt history does not."""
    table = _table(3)
    mix = np.random.default_rng(4).normal(0, 1.5, (N + 1, N + 1))
    mix[0] = 0.0
    ds = _context_log(table, mix)
    scorer = _context_scorer(table, mix)
    for cfg in (CFG, replace(CFG, mask_consumed=False)):
        for split in ("train", "test"):
            events = logged_events(ds, split=split, cfg=cfg)
            terms = policy_terms(scorer, ds, events, history=H, cfg=cfg)
            np.testing.assert_allclose(terms.p_target, np.exp(events.log_propensity), rtol=1e-5)
    assert set(ds.extra["position"][events.rows].tolist()) == {0, 1, 2}
    bare = replace(ds, extra={k: v for k, v in ds.extra.items() if k != "served_context"})
    events = logged_events(bare, cfg=CFG)
    terms = policy_terms(scorer, bare, events, history=H, cfg=CFG)
    off = np.abs(terms.p_target / np.exp(events.log_propensity) - 1) > 1e-3
    assert off.mean() > 0.5


def test_a_context_that_is_not_the_services_json_names_its_row() -> None:
    table = _table(3)
    ds = _context_log(table, np.zeros((N + 1, N + 1)))
    ctx = ds.extra["served_context"].copy()
    first = np.flatnonzero(ctx != "")
    for bad in ('{"recent": ["i1"], "rewards": [], "excluded": []}', "[1, 2", '{"recent": 3}'):
        ctx[first[-1]] = bad
        broken = replace(ds, extra={**ds.extra, "served_context": ctx})
        events = logged_events(broken, cfg=CFG)
        with pytest.raises(DataError, match=f"row {first[-1]}: field 'served_context'"):
            policy_terms(_scorer(table), broken, events, history=H, cfg=CFG)


def test_a_logged_context_with_items_only_the_current_model_knows_is_re_served() -> None:
    """The gate's current model may know items the new dataset lacks (a sliding window left
    them out) and its store may hold them as recent items: its service built its state
    from them and masked them.  Re-served through :class:`MappedScorer` on the logged
    context, such items are read as the model's own (after the dataset's columns), so it
    still gets back every propensity."""
    import orjson

    from recloop.loop.gate import MAPPED_WINDOW, MappedScorer

    rng = np.random.default_rng(5)
    n_art, h = 30, 3
    art_users = [f"u{i}" for i in range(1, U + 1)]
    art_items = [f"i{i}" for i in range(1, n_art + 1)]
    table = rng.normal(0, 2, (U + 1, n_art + 1)).astype(np.float32).astype(np.float64)
    mix = rng.normal(0, 1.5, (n_art + 1, n_art + 1)).astype(np.float32).astype(np.float64)
    mix[0] = 0.0
    t, m = torch.from_numpy(table).float(), torch.from_numpy(mix).float()

    def art_policy(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return t[user] + (m[history] * history_reward[..., None]).sum(1)

    from types import SimpleNamespace

    art = SimpleNamespace(user_ids=art_users, item_ids=art_items, policy=art_policy, history_len=h)
    rows: list[tuple[str, str, int, int, float, str]] = []
    contexts_items: set[str] = set()
    for u in range(1, U + 1):
        for lst in range(3):
            recent = [int(x) for x in rng.choice(np.arange(1, n_art + 1), 4, replace=False)]
            rewards = rng.random(5).round(2).tolist()
            raw = (
                [art_items[x - 1] for x in recent[:2]]
                + ["zz"]
                + [art_items[x - 1] for x in recent[2:]]
            )
            known, hist_reward = recent[-h:], [rewards[i] for i in (1, 3, 4)][-h:]
            s = table[u] + (mix[known] * np.asarray(hist_reward)[:, None]).sum(0)
            excluded = [int(x) for x in rng.choice(np.arange(1, n_art + 1), 3, replace=False)]
            s[0] = -np.inf
            s[excluded] = -np.inf
            greedy = topk(torch.from_numpy(s)[None], 2, row_keys=torch.tensor([u])).indices[0]
            slate = sample_epsilon_greedy(s, greedy.numpy(), epsilon=0.5, rng=rng)
            ctx = orjson.dumps(
                {"recent": raw, "rewards": rewards,
                 "excluded": sorted([art_items[x - 1] for x in excluded] + ["zz2"])}
            ).decode()  # fmt: skip
            contexts_items |= {art_items[x - 1] for x in recent + excluded}
            for j, (col, p) in enumerate(zip(slate.items, slate.propensity, strict=True)):
                rows.append(
                    (f"u{u}", art_items[col - 1], 100 * u + lst, j, float(p), ctx * (j == 0))
                )
    d_users = sorted({r[0] for r in rows}, reverse=True)
    d_items = sorted({r[1] for r in rows}, reverse=True)
    assert contexts_items - set(d_items)  # contexts name items only the model knows
    e = len(rows)
    uidx = np.array([d_users.index(r[0]) + 1 for r in rows])
    ds = PreparedDataset.from_arrays(
        user=uidx, item=np.array([d_items.index(r[1]) + 1 for r in rows]),
        timestamp=np.array([r[2] for r in rows]),
        split=np.array([TRAIN if r[2] % 100 == 0 else TEST for r in rows]),
        user_ids=d_users, item_ids=d_items, n_users=len(d_users), n_items=len(d_items),
    )  # fmt: skip
    order = np.lexsort((np.arange(e), [r[2] for r in rows], uidx))
    extra = _pairs_extra([r[4] for r in rows], [r[3] for r in rows], order)
    extra["served_context"] = np.array([r[5] for r in rows], dtype=object)[order]
    ds = replace(ds, extra=extra)
    events = logged_events(ds, cfg=CFG)
    scorer = MappedScorer(art, ds)  # type: ignore[arg-type]
    assert scorer.unseen.shape[0] > 0
    terms = policy_terms(scorer, ds, events, history=MAPPED_WINDOW * h, cfg=CFG)
    np.testing.assert_allclose(terms.p_target, np.exp(events.log_propensity), rtol=1e-5)


def test_a_model_trained_on_the_log_is_scored_without_the_items_only_the_holdout_has() -> None:
    """A model trained on a dataset has an id for every item of every split; the items
    first logged in the holdout are in its catalogue only because they were logged there.
    Scored as trained (``TrainedCatalogue``), it never shows them and spreads its ε over
    the items it could have learnt, so pi over the TRAIN items sums to 1."""
    from recloop.data.dataset import split_period
    from recloop.evaluation.ope import TrainedCatalogue

    table = _table(7)
    ds = _log(table, policy="epsilon", lists=3, k=3, epsilon=0.6)
    train_items = set(ds.item[split_period(ds.split) == TRAIN].tolist())
    only_holdout = sorted(set(ds.item[ds.split == TEST].tolist()) - train_items)
    assert only_holdout  # explored at the holdout only
    cfg = replace(CFG, mask_consumed=True)
    events = logged_events(ds, cfg=cfg)
    scorer = TrainedCatalogue(_scorer(table), ds)
    mass = np.zeros(events.n_events)
    for x in range(1, N + 1):
        ev = replace(events, rewards=_indicator_rewards(U, x))
        pi_x = policy_terms(scorer, ds, ev, history=1, cfg=cfg).v_target
        plain = policy_terms(_scorer(table), ds, ev, history=1, cfg=cfg).v_target
        if x in only_holdout:
            assert np.all(pi_x == 0.0)
            assert plain.max() > 0.0  # as a plain table, it would explore them
        else:
            mass += pi_x
    np.testing.assert_allclose(mass, 1.0, atol=1e-9)


@pytest.mark.parametrize("n_above", [0, 1])
def test_a_softmax_slot_with_every_item_masked_shows_nothing(n_above: int) -> None:
    """A row whose every column is -inf (everything consumed, excluded or unknown) has no
    item to show: probability 0 everywhere, not a uniform spread over the masked columns
    (torch's nan_to_num turns -inf into a finite number unless told not to)."""
    from recloop.evaluation.ope import softmax_slot

    scores = torch.tensor([[float("-inf")] * 5, [float("-inf"), 1.0, 2.0, 0.5, -1.0]])
    out = softmax_slot(
        scores,
        temperature=torch.tensor([0.7, 0.7]),
        above=torch.tensor([[2], [2]]),
        n_above=torch.tensor([n_above, n_above]),
    )
    assert torch.all(out.probs[0] == 0.0)
    assert out.probs[1].sum().item() == pytest.approx(1.0)
