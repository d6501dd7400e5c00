"""Off-policy estimators on synthetic bandits with a known value, and OPE of saved policies."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.artifacts.heads import LinearHead
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError, DataError
from recloop.evaluation.ope import (
    Interval,
    OPEConfig,
    bootstrap_intervals,
    bootstrap_means,
    clip_weights,
    doubly_robust,
    effective_sample_size,
    fit_baseline_rewards,
    fit_behaviour,
    importance_weights,
    ips,
    logged_events,
    off_policy_evaluate,
    ope_for_run,
    ope_for_runs,
    ope_report,
    paired_bootstrap,
    paired_report,
    policy_terms,
    range_flags,
    snips,
    target_probs,
)
from recloop.evaluation.protocol import Scorer

N_CTX, N_ACT = 5, 10


def _bandit(seed: int = 0) -> dict[str, np.ndarray]:
    """Reward means mu (C, A), logging policy beta (C, A), target policy pi (C, A)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0, 1, (N_CTX, N_ACT))
    beta = rng.dirichlet(np.ones(N_ACT), N_CTX) * 0.5 + 0.5 / N_ACT  # full support
    logits = 3 * mu
    pi = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"mu": mu, "beta": beta, "pi": pi}


def _log(b: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n logged rounds: uniform contexts, actions from beta, Bernoulli(mu) rewards."""
    c = rng.integers(0, N_CTX, n)
    cdf = b["beta"][c].cumsum(1)
    a = np.minimum((rng.uniform(size=(n, 1)) > cdf).sum(1), N_ACT - 1)
    r = (rng.uniform(size=n) < b["mu"][c, a]).astype(np.float64)
    return {"c": c, "a": a, "r": r, "w": b["pi"][c, a] / b["beta"][c, a]}


def _truth(b: dict[str, np.ndarray]) -> float:
    return float((b["pi"] * b["mu"]).sum(1).mean())


def test_estimators_hand_computed() -> None:
    w, r = np.array([1.0, 2.0]), np.array([1.0, 0.0])
    assert ips(w, r) == pytest.approx(0.5)
    assert snips(w, r) == pytest.approx(1 / 3)
    q, v = np.array([0.5, 0.5]), np.array([0.4, 0.6])
    assert doubly_robust(w, r, q, v) == pytest.approx((0.4 + 0.5 + 0.6 - 1.0) / 2)
    assert effective_sample_size(np.array([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)
    clipped, share = clip_weights(np.array([0.5, 3.0, 10.0, 1.0]), 2.0)
    np.testing.assert_allclose(clipped, [0.5, 2.0, 2.0, 1.0])
    assert share == pytest.approx(0.5)


def test_truth_inside_bootstrap_intervals() -> None:
    b = _bandit()
    d = _log(b, 20_000, np.random.default_rng(1))
    noisy_q = b["mu"] + 0.1  # a biased reward model: DR must still be consistent
    est = bootstrap_intervals(
        d["w"], d["r"], noisy_q[d["c"], d["a"]], (b["pi"] * noisy_q).sum(1)[d["c"]],
        n_boot=300, seed=0,
    )  # fmt: skip
    truth = _truth(b)
    for name in ("ips", "snips", "dr"):
        iv = est[name]
        assert iv.low <= truth <= iv.high, (name, iv, truth)
        assert iv.low < iv.value < iv.high
        assert iv.high - iv.low < 0.05
    assert not est["dm"].low <= truth <= est["dm"].high  # the biased model alone misses


def test_ips_unbiased_over_seeds() -> None:
    b = _bandit()
    values = [ips(**{k: v for k, v in _log(b, 200, np.random.default_rng(s)).items()
                     if k in ("w", "r")}) for s in range(400)]  # fmt: skip
    se = np.std(values) / math.sqrt(len(values))
    assert abs(np.mean(values) - _truth(b)) < 3 * se


def test_snips_bounded_by_max_reward() -> None:
    rng = np.random.default_rng(0)
    w = rng.pareto(1.0, 50) * 10  # heavy-tailed weights
    r = rng.uniform(0, 1, 50)
    assert ips(w, r) > r.max()  # IPS can leave the reward range …
    assert r.min() <= snips(w, r) <= r.max()  # … SNIPS is a weighted mean of rewards


def test_dr_exact_with_exact_reward_model() -> None:
    b = _bandit()
    d = _log(b, 300, np.random.default_rng(2))
    r = b["mu"][d["c"], d["a"]]  # deterministic rewards equal to the model's prediction
    v = (b["pi"] * b["mu"]).sum(1)[d["c"]]
    assert doubly_robust(d["w"], r, r, v) == pytest.approx(float(v.mean()), abs=1e-12)


def test_target_probs_top_k_softmax() -> None:
    scores = torch.tensor([[float("-inf"), 1.0, 3.0, 2.0]])
    items, probs = target_probs(scores, temperature=1.0, top_k=2, row_keys=torch.zeros(1))
    assert items.tolist() == [[2, 3]]
    e = math.exp(1.0)
    np.testing.assert_allclose(probs.numpy(), [[e / (e + 1), 1 / (e + 1)]], rtol=1e-6)


def _walk(n_users: int = 10, n_items: int = 8, length: int = 8) -> PreparedDataset:
    """User u walks items s_u, s_u + 1, ...; rewards 1 + (item % 2); last event test."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, n_items, n_users)
    t = np.arange(length)
    item = ((start[:, None] + t[None, :]) % n_items + 1).ravel()
    split = np.tile(
        np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
    )
    return PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, n_users + 1), length),
        item=item,
        timestamp=np.tile(t, n_users),
        reward=1.0 + item % 2,
        split=split,
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )


def test_baseline_rewards_hand_computed() -> None:
    ds = PreparedDataset.from_arrays(
        user=np.array([1, 1, 2]), item=np.array([1, 2, 1]), timestamp=np.array([0, 1, 0]),
        reward=np.array([3.0, 1.0, 2.0]), n_users=2, n_items=2,
        user_ids=["a", "b"], item_ids=["x", "y"],
    )  # fmt: skip
    q = fit_baseline_rewards(ds, shrinkage=0.0)
    assert q.mu == pytest.approx(2.0)
    # item biases: item 1 (3 - 2 + 2 - 2) / 2 = 0.5, item 2 (1 - 2) / 1 = -1
    np.testing.assert_allclose(q.item_bias[1:], [0.5, -1.0], rtol=1e-6)
    # user 1 residuals 3 - 2.5 and 1 - 1 → 0.25; user 2: 2 - 2.5 → -0.5
    np.testing.assert_allclose(q.user_bias[1:], [0.25, -0.5], rtol=1e-6)
    assert q(np.array([2]), np.array([2]))[0] == pytest.approx(2.0 - 0.5 - 1.0)


def test_off_policy_evaluate_weights() -> None:
    """A policy sure of the next walk item against a uniform beta: every weight is N."""
    ds = _walk()
    n = ds.n_items

    def oracle(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        nxt = history[:, -1] % n + 1
        return torch.nn.functional.one_hot(nxt, n + 1).float() * 100

    def uniform(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        out = torch.zeros(user.shape[0], n + 1)
        out[:, 0] = float("-inf")
        return out

    q = fit_baseline_rewards(ds, shrinkage=0.0)
    cfg = OPEConfig(top_k=1, weight_cap=5.0, n_boot=50)
    events = logged_events(
        ds, cfg=cfg, behaviour=uniform, behaviour_name="uniform", history=2, rewards=q
    )
    rep = off_policy_evaluate(oracle, ds, history=2, events=events, cfg=cfg)
    r = ds.reward[ds.split == TEST]
    assert rep.n_events == 10
    assert rep.support == 1.0 and rep.mean_weight == pytest.approx(n)
    assert rep.clipped_share == 1.0
    assert rep.estimates["ips"].value == pytest.approx(5.0 * r.mean(), rel=1e-6)
    assert rep.estimates["snips"].value == pytest.approx(r.mean(), rel=1e-6)
    assert rep.behaviour_nll == pytest.approx(math.log(n), rel=1e-6)
    assert rep.to_dict()["ess_ratio"] == pytest.approx(1.0)


def test_off_policy_evaluate_masks_consumed_items() -> None:
    """A policy that prefers the item just consumed is evaluated as served: that item is
    masked, its second choice (the next walk item) is what pi shows."""
    ds = _walk()
    n = ds.n_items

    def repeater(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        last = torch.nn.functional.one_hot(history[:, -1], n + 1).float() * 100
        nxt = torch.nn.functional.one_hot(history[:, -1] % n + 1, n + 1).float() * 50
        return last + nxt

    def uniform(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return torch.zeros(user.shape[0], n + 1)

    q = fit_baseline_rewards(ds, shrinkage=0.0)
    events = logged_events(ds, behaviour=uniform, behaviour_name="u", history=2, rewards=q)
    kw: dict[str, Any] = {"history": 2, "events": events}
    masked = off_policy_evaluate(repeater, ds, cfg=OPEConfig(top_k=1, n_boot=0), **kw)
    raw = off_policy_evaluate(
        repeater, ds, cfg=OPEConfig(top_k=1, n_boot=0, mask_consumed=False), **kw
    )
    assert masked.support == 1.0 and raw.support == 0.0
    assert raw.estimates["ips"].value == 0.0


def _save_policy(
    run: Path, ds: PreparedDataset, *, algo: str, config: dict[str, object], seed: int = 0
) -> PolicyNet:
    torch.manual_seed(seed)
    spec = PolicySpec(
        n_users=ds.n_users,
        n_items=ds.n_items,
        encoder=EncoderConfig(kind="mean", history=3, embedding_dim=8),
        head=HeadConfig(),
    )
    policy = PolicyNet(spec).eval()
    save_artifact(
        run / "artifact", algo=algo, config=config, policy=policy,
        popularity=np.zeros(ds.n_items + 1, np.float32), user_ids=ds.user_ids, item_ids=ds.item_ids,
    )  # fmt: skip
    return policy


def test_ope_for_run_fits_behaviour(tmp_path: Path) -> None:
    ds = _walk()
    _save_policy(tmp_path, ds, algo="supervised", config={})
    cfg = OPEConfig(behaviour_epochs=30, behaviour_lr=0.05, n_boot=20)
    rep = ope_for_run(tmp_path, ds, cfg=cfg)
    assert rep.behaviour == "fitted" and rep.split == "test" and rep.n_events == 10
    # The walk is deterministic: the fitted beta must beat the uniform NLL log N by far.
    assert rep.behaviour_nll < 0.5 * math.log(ds.n_items)
    iv = rep.estimates["dr"]
    assert iv.low <= iv.value <= iv.high


def test_ope_for_run_uses_reinforce_beta_head(tmp_path: Path) -> None:
    from recloop.training.checkpoint import FitProgress, save_best, save_checkpoint

    ds = _walk()
    policy = _save_policy(tmp_path, ds, algo="reinforce", config={"beta_hidden_dims": []})
    beta = LinearHead(
        HeadConfig(), state_dim=policy.encoder.state_dim, n_items=ds.n_items, embedding_dim=8
    )
    save_checkpoint(
        tmp_path, algo_state={"networks": {"beta": beta.state_dict()}},
        progress=FitProgress(epoch=1, step=1, transitions=1),
        config={},
    )  # fmt: skip
    save_best(tmp_path, {"policy": policy.state_dict(), "beta": beta.state_dict()})
    # By default every run is scored against the same fitted beta, the head is not used.
    assert ope_for_run(tmp_path, ds, cfg=OPEConfig(n_boot=0)).behaviour == "fitted"
    head = OPEConfig(n_boot=0, behaviour="beta_head")
    rep = ope_for_run(tmp_path, ds, cfg=head)
    assert rep.behaviour == "beta_head"
    rows = np.flatnonzero(ds.split == TEST)
    hist = torch.from_numpy(ds.item[rows[:, None] - np.arange(3, 0, -1)].astype(np.int64))
    user = torch.from_numpy(ds.user[rows].astype(np.int64))
    with torch.no_grad():
        logits = beta(
            policy.state(user, hist, torch.ones(hist.shape)), policy.item_embedding.weight
        )
        logits[:, 0] = float("-inf")
        nll = -torch.log_softmax(logits, 1).gather(
            1, torch.from_numpy(ds.item[rows].astype(np.int64))[:, None]
        )
    assert rep.behaviour_nll == pytest.approx(float(nll.mean()), rel=1e-5)
    # Two runs' heads are two betas: comparing runs with beta_head is refused.
    with pytest.raises(ConfigError, match="not be comparable"):
        ope_for_runs([tmp_path, tmp_path], [ds, ds], cfg=head)
    # A beta saved with other policy weights than the artifact's is not used.
    other = {k: v + 1 for k, v in policy.state_dict().items()}
    save_best(tmp_path, {"policy": other, "beta": beta.state_dict()})
    with pytest.raises(DataError, match="no saved REINFORCE beta head"):
        ope_for_run(tmp_path, ds, cfg=head)


def test_every_item_masked_gives_no_weight_not_nan() -> None:
    """A user who consumed the whole catalogue: pi shows nothing, the estimates stay finite."""
    ds = _walk(n_users=3, n_items=4, length=6)  # every user has seen all 4 items before the test

    def flat(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return torch.zeros(user.shape[0], ds.n_items + 1)

    q = fit_baseline_rewards(ds, shrinkage=0.0)
    events = logged_events(ds, behaviour=flat, behaviour_name="u", history=2, rewards=q)
    rep = off_policy_evaluate(flat, ds, history=2, events=events, cfg=OPEConfig(top_k=2, n_boot=10))
    assert rep.support == 0.0
    assert all(math.isfinite(iv.value) for iv in rep.estimates.values())


# --- one beta for every policy, paired differences, flags -------------------------------


def test_range_flags_hand_computed() -> None:
    assert range_flags("ips", Interval(0.5, 0.2, 0.9), 0.0, 1.0) == ()
    assert range_flags("ips", Interval(0.9, 0.7, 1.1), 0.0, 1.0) == ("ips_out_of_range",)
    assert range_flags("dr", Interval(1.5, 1.5, 1.5), 1.0, 5.0) == ()
    assert range_flags("dr", Interval(1.2, 0.8, 1.5), 1.0, 5.0) == ("dr_out_of_range",)
    assert range_flags("snips", Interval(1.0 + 1e-12, 0.5, 1.0), 0.0, 1.0) == ()  # round-off


def test_paired_bootstrap_of_a_policy_with_itself_is_exactly_zero() -> None:
    """Only the same resampled events for both columns make every replicate's difference 0."""
    rng = np.random.default_rng(0)
    w, v = rng.pareto(1.5, 300), rng.uniform(size=300)
    r, q = rng.uniform(size=300), rng.uniform(size=300)
    same = paired_bootstrap(r, q, w, v, w, v, n_boot=200, seed=3)
    for iv in same.values():
        assert iv.value == iv.low == iv.high == 0.0
    unpaired = paired_bootstrap(r, q, w, v, w, v, n_boot=200, seed=3, paired=False)
    assert unpaired["ips"].high - unpaired["ips"].low > 0.1


def test_bootstrap_means_matches_a_loop_over_replicates() -> None:
    cols = np.random.default_rng(1).normal(size=(7, 3))
    fast = bootstrap_means(cols, n_boot=10, rng=np.random.default_rng(5), chunk_elems=20)
    rng = np.random.default_rng(5)
    slow = []
    for chunk in (2, 2, 2, 2, 2):  # 20 // 7 = 2 replicates a chunk
        idx = rng.integers(0, 7, size=(chunk, 7))
        slow += [cols[row].mean(0) for row in idx]
    np.testing.assert_allclose(fast, np.array(slow), rtol=1e-12)


N_CB, A_CB = 6, 8
"""Contexts (users) and actions (items) of the synthetic contextual bandit below."""


def _cb_truth(seed: int = 0) -> dict[str, np.ndarray]:
    """Reward means mu, logging policy beta, and two correlated target policies A and B."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0, 1, (N_CB, A_CB))
    beta = rng.dirichlet(np.ones(A_CB), N_CB) * 0.6 + 0.4 / A_CB  # full support
    a = 3 * mu
    b = a + rng.normal(0, 0.7, a.shape)  # B is A with some noise: the two are correlated
    pi = {k: np.exp(x) / np.exp(x).sum(1, keepdims=True) for k, x in (("A", a), ("B", b))}
    return {"mu": mu, "beta": beta, "A": pi["A"], "B": pi["B"]}


def _cb_value(t: dict[str, np.ndarray], policy: str) -> float:
    """True per-event value: contexts are uniform."""
    return float((t[policy] * t["mu"]).sum(1).mean())


def _cb_dataset(
    t: dict[str, np.ndarray], n: int, rng: np.random.Generator, *, understate: float = 1.0
) -> PreparedDataset:
    """n logged rounds (user = context), half TRAIN and half TEST, with a ``propensity``
    column (the true beta divided by ``understate``)."""
    c = rng.integers(0, N_CB, n)
    a = (rng.uniform(size=(n, 1)) > t["beta"][c].cumsum(1)).sum(1).clip(max=A_CB - 1)
    r = (rng.uniform(size=n) < t["mu"][c, a]).astype(np.float32)
    ds = PreparedDataset.from_arrays(
        user=c + 1, item=a + 1, timestamp=np.arange(n), reward=r,
        split=np.where(np.arange(n) % 2 == 0, TRAIN, TEST), n_users=N_CB, n_items=A_CB,
    )  # fmt: skip
    # from_arrays sorts the rows by (user, timestamp); find each row's round again
    order = np.lexsort((np.arange(n), c))
    return replace(ds, extra={"propensity": t["beta"][c, a][order] / understate})


def _table_policy(pi: np.ndarray) -> Scorer:
    """Scores log pi[user]: with T = 1, no top-K and no masking, the target policy is pi."""
    logp = torch.from_numpy(np.log(np.concatenate([np.full((N_CB, 1), 1e-30), pi], 1)))
    logp = torch.cat([torch.zeros(1, A_CB + 1, dtype=logp.dtype), logp]).float()

    def score(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return logp[user]

    return score


# The bandit's "users" are its 6 contexts, drawn afresh each round: rounds, not users, are
# the independent units here, so the bootstrap resamples events.
CB_CFG = OPEConfig(
    target="softmax",
    top_k=None,
    mask_consumed=False,
    weight_cap=None,
    n_boot=0,
    cluster_by_user=False,
)


def _cb_run(
    t: dict[str, np.ndarray], seed: int, cfg: OPEConfig = CB_CFG, n: int = 1200
) -> tuple[Any, Any, Any]:
    ds = _cb_dataset(t, n, np.random.default_rng(seed))
    events = logged_events(ds, cfg=cfg)
    assert events.behaviour == "logged"
    a = policy_terms(_table_policy(t["A"]), ds, events, history=1, cfg=cfg)
    b = policy_terms(_table_policy(t["B"]), ds, events, history=1, cfg=cfg)
    return events, a, b


def test_logged_propensities_make_every_estimator_unbiased() -> None:
    t = _cb_truth()
    est: dict[tuple[str, str], list[float]] = {}
    for seed in range(150):
        events, *terms = _cb_run(t, seed)
        for name, tm in zip("AB", terms, strict=True):
            rep = ope_report(events, tm, CB_CFG)
            assert rep.behaviour == "logged"
            for k in ("ips", "snips", "dr"):
                est.setdefault((name, k), []).append(rep.estimates[k].value)
            est.setdefault((name, "mean_weight"), []).append(rep.mean_weight)
    for (name, k), values in est.items():
        truth = 1.0 if k == "mean_weight" else _cb_value(t, name)
        se = np.std(values) / math.sqrt(len(values))
        # 3 standard errors, plus SNIPS's O(1/n) bias
        assert abs(np.mean(values) - truth) < 3 * se + 2e-3, (name, k, np.mean(values), truth)


def test_paired_interval_covers_the_true_difference_and_is_narrower() -> None:
    t = _cb_truth()
    truth = _cb_value(t, "B") - _cb_value(t, "A")
    cfg = replace(CB_CFG, n_boot=300)
    covered = {k: 0 for k in ("ips", "snips", "dr")}
    ratios = []
    reps = 50
    for seed in range(reps):
        events, a, b = _cb_run(t, 1000 + seed, cfg)
        diff = paired_report(events, a, b, cfg=cfg, run="B", baseline_run="A")
        for k in covered:
            covered[k] += diff.differences[k].low <= truth <= diff.differences[k].high
        _, w_a, _ = importance_weights(events, a, None)
        _, w_b, _ = importance_weights(events, b, None)
        unpaired = paired_bootstrap(
            events.reward, events.q_logged, w_a, a.v_target, w_b, b.v_target,
            n_boot=300, seed=0, paired=False,
        )  # fmt: skip
        ratios.append(
            (diff.differences["dr"].high - diff.differences["dr"].low)
            / (unpaired["dr"].high - unpaired["dr"].low)
        )
    # Nominal 95 %: over 50 repetitions a count of 42 or less has probability ~3e-3 per
    # estimator, so the floor is 86 % each and 90 % over the three together.
    assert min(covered.values()) >= 0.86 * reps, covered
    assert sum(covered.values()) >= 0.9 * 3 * reps, covered
    # The events' own noise cancels in the paired difference of two correlated policies.
    assert np.mean(ratios) < 0.6 and max(ratios) < 1.0, ratios


def test_flags_fire_for_understated_propensities_only() -> None:
    t = _cb_truth()
    rng_seed = 7
    ds = _cb_dataset(t, 2000, np.random.default_rng(rng_seed), understate=5.0)
    cfg = replace(CB_CFG, n_boot=100)
    events = logged_events(ds, cfg=cfg)
    bad = ope_report(
        events, policy_terms(_table_policy(t["A"]), ds, events, history=1, cfg=cfg), cfg
    )
    assert bad.mean_weight == pytest.approx(5.0, rel=0.15)
    assert "ips_out_of_range" in bad.estimates["ips"].flags
    assert {"ips_out_of_range", "mean_weight_far_from_1"} <= set(bad.flags)
    assert bad.estimates["snips"].flags == ()  # SNIPS cancels a constant factor in beta
    assert bad.to_dict()["estimates"]["ips"]["flags"] == ["ips_out_of_range"]
    ds = _cb_dataset(t, 2000, np.random.default_rng(rng_seed))
    events = logged_events(ds, cfg=cfg)
    good = ope_report(
        events, policy_terms(_table_policy(t["A"]), ds, events, history=1, cfg=cfg), cfg
    )
    assert good.flags == () and good.reward_range == (0.0, 1.0)
    assert all(iv.flags == () for iv in good.estimates.values())


def test_logged_propensities_are_checked_and_preferred() -> None:
    t = _cb_truth()
    ds = _cb_dataset(t, 200, np.random.default_rng(0))
    assert logged_events(ds, cfg=OPEConfig(behaviour="fitted")).behaviour == "fitted"
    p = ds.extra["propensity"].copy()
    row = int(np.flatnonzero(ds.split == TEST)[3])
    p[row] = 1.5
    with pytest.raises(DataError, match=rf"events, row {row}: field 'propensity' .* got 1\.5 "):
        logged_events(replace(ds, extra={"propensity": p}))
    with pytest.raises(DataError, match="no 'propensity' column"):
        logged_events(replace(ds, extra={}), cfg=OPEConfig(behaviour="logged"))


def test_behaviour_model_sees_train_events_only() -> None:
    """Changing the valid/test events, even ones that precede training events, changes
    nothing in the fitted behaviour model."""
    ds = _walk()
    split = ds.split.copy()
    split[ds.user_offsets[1:-1]] = TEST  # each user's FIRST event is a test event
    ds = replace(ds, split=split)
    held_out = ds.split != TRAIN
    item = ds.item.copy()
    item[held_out] = item[held_out] % ds.n_items + 1
    other = replace(ds, item=item, reward=np.where(held_out, 9.0, ds.reward).astype(np.float32))
    cfg = OPEConfig(behaviour_history=3, behaviour_epochs=2)
    a, b = fit_behaviour(ds, cfg=cfg), fit_behaviour(other, cfg=cfg)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_ope_for_runs_shares_one_beta_and_pairs_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import recloop.evaluation.ope as ope_mod

    ds = _walk()
    _save_policy(tmp_path / "a", ds, algo="supervised", config={})
    _save_policy(tmp_path / "b", ds, algo="supervised", config={}, seed=1)
    fits = []
    real_fit = ope_mod.fit_behaviour
    monkeypatch.setattr(
        ope_mod, "fit_behaviour", lambda *a, **k: fits.append(1) or real_fit(*a, **k)
    )
    scored: list[object] = []
    real_terms = ope_mod.policy_terms
    monkeypatch.setattr(
        ope_mod, "policy_terms", lambda p, *a, **k: scored.append(p) or real_terms(p, *a, **k)
    )
    cfg = OPEConfig(n_boot=50)
    out = ope_for_runs([tmp_path / "a", tmp_path / "b"], [ds, ds], cfg=cfg)
    assert len(fits) == 1  # one behaviour model for both runs
    # each run is trained on its dataset: scored without the items no TRAIN row has
    assert len(scored) == 2 and all(isinstance(p, ope_mod.TrainedCatalogue) for p in scored)
    a, b = out.reports
    assert a.behaviour == b.behaviour == "fitted"
    assert a.behaviour_nll == b.behaviour_nll  # the same beta on the same events
    (diff,) = out.paired
    assert (diff.run, diff.baseline) == (str(tmp_path / "b"), str(tmp_path / "a"))
    for k in ("ips", "snips", "dr"):
        iv = diff.differences[k]
        expected = b.estimates[k].value - a.estimates[k].value
        assert iv.value == pytest.approx(expected, abs=1e-12)
        assert iv.low <= iv.value <= iv.high
        assert diff.excludes_zero(k) == (iv.low > 0 or iv.high < 0)
    assert set(diff.to_dict()["differences"]["dr"]) >= {"value", "low", "high", "excludes_zero"}


def test_cluster_bootstrap_resamples_whole_users() -> None:
    """Users with many perfectly correlated events: resampling events pretends they are
    independent and gives a far narrower interval than resampling users."""
    rng = np.random.default_rng(0)
    n_users, per_user = 40, 25
    user = np.repeat(np.arange(n_users), per_user)
    value = np.repeat(rng.normal(size=n_users), per_user)  # all of a user's events agree
    cols = value[:, None]
    by_event = bootstrap_means(cols, n_boot=400, rng=np.random.default_rng(1))
    by_user = bootstrap_means(cols, n_boot=400, rng=np.random.default_rng(1), clusters=user)
    assert np.std(by_user) > 3 * np.std(by_event)
    # its spread is that of a mean of 40 independent users
    assert np.std(by_user) == pytest.approx(np.std(value[::per_user]) / math.sqrt(n_users), rel=0.2)
    # one event per user: the same as the plain bootstrap
    one = bootstrap_means(cols[::per_user], n_boot=50, rng=np.random.default_rng(2))
    same = bootstrap_means(
        cols[::per_user], n_boot=50, rng=np.random.default_rng(2), clusters=np.arange(n_users)
    )
    np.testing.assert_array_equal(one, same)


def test_uniform_topk_target_ignores_the_score_scale() -> None:
    scores = torch.tensor([[float("-inf"), 1.0, 3.0, 2.0, 0.5]])
    for scale in (1.0, 0.01, 100.0):
        items, probs = target_probs(
            scores * scale, temperature=1.0, top_k=2, row_keys=torch.zeros(1), target="uniform_topk"
        )
        assert items.tolist() == [[2, 3]]
        assert probs.tolist() == [[0.5, 0.5]]
    # fewer unmasked items than K: uniform over those left, masked ones get 0
    masked = torch.tensor([[float("-inf"), float("-inf"), 3.0, float("-inf"), float("-inf")]])
    items, probs = target_probs(
        masked, temperature=1.0, top_k=3, row_keys=torch.zeros(1), target="uniform_topk"
    )
    assert probs[0, 0].item() == 1.0 and probs[0, 1:].sum().item() == 0.0


def _clickbait_log() -> PreparedDataset:
    """Each of 40 users' one logged step: item 1 (bait: reward 1, then the user leaves) or
    item 2 (a match: reward 0.5, then one more step worth 1, so a return of 0.5 + 0.9 * 1),
    alternately, each logged with propensity 0.5; users 1-20 TRAIN, 21-40 TEST."""
    n = 40
    item = np.where(np.arange(n) % 2 == 0, 1, 2)
    ds = PreparedDataset.from_arrays(
        user=np.arange(1, n + 1), item=item, timestamp=np.zeros(n, np.int64),
        reward=np.where(item == 1, 1.0, 0.5), returns=np.where(item == 1, 1.0, 1.4),
        split=np.where(np.arange(n) < 20, TRAIN, TEST), n_users=n, n_items=2,
    )  # fmt: skip
    return replace(ds, extra={"propensity": np.full(n, 0.5)})


def _always(item: int) -> Scorer:
    def score(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        out = torch.zeros(user.shape[0], 3)
        out[:, 0] = float("-inf")
        out[:, item] = 1.0
        return out

    return score


@pytest.mark.parametrize(("outcome", "bait", "match"), [("reward", 1.0, 0.5), ("return", 1.0, 1.4)])
def test_the_outcome_may_be_the_session_return(outcome: str, bait: float, match: float) -> None:
    """The immediate reward prefers the bait; the return to the session's end, the match."""
    ds = _clickbait_log()
    cfg = OPEConfig(top_k=1, n_boot=50, outcome=outcome, reward_shrinkage=0.0)
    events = logged_events(ds, cfg=cfg)
    assert events.behaviour == "logged"
    np.testing.assert_allclose(events.reward, np.where(ds.item == 1, bait, match)[20:])
    # the reward model is fitted on the same outcome (TRAIN users): exact item means
    assert events.rewards.mu == pytest.approx((bait + match) / 2)
    np.testing.assert_allclose(events.rewards(np.array([1, 1]), np.array([1, 2])), [bait, match])
    t_bait = policy_terms(_always(1), ds, events, history=1, cfg=cfg)
    t_match = policy_terms(_always(2), ds, events, history=1, cfg=cfg)
    # deterministic targets against beta = 1/2: weight 2 on half the events
    assert ope_report(events, t_bait, cfg).estimates["ips"].value == pytest.approx(bait)
    assert ope_report(events, t_match, cfg).estimates["ips"].value == pytest.approx(match)
    diff = paired_report(events, t_bait, t_match, cfg=cfg, run="match", baseline_run="bait")
    assert diff.differences["dr"].value == pytest.approx(match - bait)
    assert ope_report(events, t_match, cfg).config["outcome"] == outcome


def test_an_unknown_outcome_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=r"ope\.outcome must be one of reward, return, got .gain."
    ):
        OPEConfig(outcome="gain")


def test_a_report_whose_dr_rests_on_the_reward_model_alone_is_flagged() -> None:
    """The target always shows an item the log never showed (beta 0.001): every weight is
    0, so IPS is 0 and DR is the reward model's 0.9 -- disjoint intervals."""
    from recloop.evaluation.ope import (
        DR_IPS_DISAGREE,
        BaselineRewards,
        LoggedEvents,
        PolicyTerms,
    )

    n = 200
    rng = np.random.default_rng(0)
    r = (rng.random(n) < 0.3).astype(np.float64)
    events = LoggedEvents(
        split=TEST, rows=np.arange(n), user=np.arange(n) % 20 + 1, action=np.full(n, 2),
        reward=r, log_propensity=np.full(n, np.log(0.999)), behaviour="logged",
        rewards=BaselineRewards(mu=0.9, user_bias=np.zeros(21, np.float32),
                                item_bias=np.zeros(4, np.float32)),
        q_logged=np.full(n, 0.9),
    )  # fmt: skip
    terms = PolicyTerms(p_target=np.zeros(n), v_target=np.full(n, 0.9))
    rep = ope_report(events, terms, OPEConfig(n_boot=200))
    assert rep.estimates["ips"].value == 0.0 and rep.estimates["dr"].value == pytest.approx(0.9)
    assert DR_IPS_DISAGREE in rep.flags
    # the policy the log followed: DR and IPS agree
    same = PolicyTerms(p_target=np.full(n, 0.999), v_target=np.full(n, 0.9))
    assert DR_IPS_DISAGREE not in ope_report(events, same, OPEConfig(n_boot=200)).flags
    # no intervals, no comparison
    assert DR_IPS_DISAGREE not in ope_report(events, terms, OPEConfig(n_boot=0)).flags
    # half the events carry the target's weight: IPS is halved, SNIPS and DR (with an exact
    # reward model) are not; it is IPS that DR is checked against
    ones = np.ones(n)
    half = dataclasses.replace(events, reward=ones, q_logged=ones, rewards=dataclasses.replace(
        events.rewards, mu=1.0))  # fmt: skip
    halved = PolicyTerms(p_target=np.where(np.arange(n) % 2 == 0, 0.999, 0.0), v_target=ones)
    rep = ope_report(half, halved, OPEConfig(n_boot=200))
    assert rep.estimates["snips"].value == pytest.approx(1.0)
    assert rep.estimates["ips"].value == pytest.approx(0.5)
    assert DR_IPS_DISAGREE in rep.flags
