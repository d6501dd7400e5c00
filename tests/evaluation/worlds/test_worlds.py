"""Ground-truth worlds: exact propensities, mechanics, replay, OPE against the truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.errors import ConfigError
from recloop.evaluation.worlds import build_world
from recloop.evaluation.worlds.base import Mechanics, UserState, replay_states
from recloop.evaluation.worlds.rollout import (
    ConstantScorer,
    OracleScorer,
    Policy,
    PopularityScorer,
    Rollout,
    Selection,
    Shown,
    evaluation_users,
    kth_unshown,
    select,
    simulate,
)
from recloop.evaluation.worlds.shop import ShopWorld

SMALL = ["n_items=40", "n_clusters=4", "mechanics.horizon=6", "mechanics.sessions=2"]


def small_world(*extra: str) -> ShopWorld:
    world = build_world("shop", [*SMALL, *extra])
    assert isinstance(world, ShopWorld)
    return world


def test_deep_reward_hand_computed() -> None:
    m = Mechanics(buy_rate=0.35)
    # 1 * .9 * .95 + 2 * .9 * .05 + 2 * .1 * .65 + 3 * .1 * .35
    assert float(m.deep_reward(np.array(0.1), np.array(0.05))) == pytest.approx(1.18)


def test_simulation_is_determined_by_its_seed() -> None:
    world = small_world()
    pol = Policy(name="p", scorer=PopularityScorer(world), selection=Selection(epsilon=0.3))
    users = np.arange(300)
    a, b = simulate(world, pol, users, seed=1), simulate(world, pol, users, seed=1)
    c = simulate(world, pol, users, seed=2)
    assert np.array_equal(a.item, b.item) and np.array_equal(a.reward, b.reward)
    assert np.array_equal(a.propensity, b.propensity)
    assert not (a.item.shape == c.item.shape and np.array_equal(a.item, c.item))
    # the world's latent users depend on the world seed alone
    assert np.array_equal(world.initial_taste(users), small_world().initial_taste(users))
    assert not np.allclose(world.initial_taste(users), small_world("seed=1").initial_taste(users))


def test_kth_unshown() -> None:
    shown = np.array([[2, 3, 9, 9], [1, 9, 9, 9]])  # 9 = padding above every item
    assert kth_unshown(shown, np.array([1, 1])).tolist() == [1, 2]
    assert kth_unshown(shown, np.array([2, 3])).tolist() == [4, 4]


def test_logged_epsilon_greedy_propensities_are_exact() -> None:
    """Recompute each logged propensity from the user's earlier events: (1 - eps) [a is
    the most popular unshown item] + eps / (unshown items)."""
    world = small_world()
    eps = 0.3
    pol = Policy(name="p", scorer=PopularityScorer(world), selection=Selection(epsilon=eps))
    roll = simulate(world, pol, np.arange(200), seed=0)
    pop = world.params.popularity
    expected = np.empty(roll.item.shape[0])
    for e in range(roll.item.shape[0]):  # a slow reference, on purpose
        before = roll.item[:e][roll.user[:e] == roll.user[e]]
        cand = np.setdiff1d(np.arange(1, world.n_items + 1), before)
        top = cand[np.argmax(pop[cand])]
        expected[e] = (1 - eps) * (roll.item[e] == top) + eps / cand.shape[0]
    np.testing.assert_allclose(roll.propensity, expected, rtol=0, atol=1e-15)


def test_selection_probabilities_match_sampling_frequencies() -> None:
    """select() returns the analytic probability of the item it draws, and draws items
    with those probabilities (epsilon-greedy and softmax over candidates)."""
    n, reps = 6, 20000
    scores = torch.tensor([[-np.inf, 0.5, 2.0, 1.0, -1.0, 0.0, 1.5]]).repeat(reps, 1)
    shown = Shown.empty(reps, n, 4)
    shown.add(np.arange(reps), np.full(reps, 2))  # item 2 (the best) already shown
    rng = np.random.default_rng(0)
    rows = np.arange(reps)
    keys = np.zeros(reps, np.int64)
    for sel, analytic in [
        (Selection(epsilon=0.2), np.r_[0, 0.04, 0, 0.04, 0.04, 0.04, 0.84]),
        (
            Selection(kind="softmax", temperature=0.5),
            np.r_[0, np.exp(1.0), 0, np.exp(2.0), np.exp(-2.0), 1.0, np.exp(3.0)]
            / (np.exp(1.0) + np.exp(2.0) + np.exp(-2.0) + 1.0 + np.exp(3.0)),
        ),
    ]:
        item, prob = select(
            scores, shown, rows, sel, row_keys=keys,
            u_explore=rng.random(reps), u_pick=rng.random(reps),
        )  # fmt: skip
        np.testing.assert_allclose(prob, analytic[item], rtol=1e-6)
        freq = np.bincount(item, minlength=n + 1) / reps
        se = np.sqrt(analytic * (1 - analytic) / reps)
        assert np.all(np.abs(freq - analytic) <= 4 * se + 1e-12)


def test_funnel_and_quit_rates_match_the_config() -> None:
    world = small_world("mechanics.match_slope=0", "mechanics.quit_per_miss=0.2")
    m = world.mech
    rng = np.random.default_rng(0)
    b = 200_000
    state = world.initial_state(np.arange(b) % 5000)
    state.misses = rng.integers(0, 3, b)
    items = rng.integers(1, world.n_items + 1, b)
    out = world.step(state, items, rng.random((5, b)))
    clicked = out.response > 0
    cart = (out.response == 2) | (out.response == 4)
    fav = out.response == 3
    buy = out.response == 4

    def near(k: np.ndarray, n: np.ndarray, p: float) -> bool:
        rate, count = k.sum() / n.sum(), n.sum()
        return abs(rate - p) <= 4 * np.sqrt(p * (1 - p) / count)

    assert near(cart, clicked, m.cart_rate)
    assert near(fav, clicked & ~cart, m.fav_rate)
    assert near(buy, cart, m.buy_rate)
    # quit probability after the step from the misses after it
    for misses in (0, 1, 2, 3):
        at = state.misses == misses
        assert at.sum() > 1000
        assert near(out.quit & at, at, min(1.0, m.quit_base + m.quit_per_miss * misses))
    # the reward is the deepest behaviour's
    table = np.array([0.0, m.reward_pv, m.reward_cart, m.reward_fav, m.reward_buy])
    assert np.array_equal(out.reward, table[out.response])


def test_replayed_states_give_the_simulated_expected_rewards() -> None:
    world = small_world()
    pol = Policy(name="p", scorer=ConstantScorer(world), selection=Selection(epsilon=1.0))
    roll = simulate(world, pol, np.arange(100), seed=3)
    new_session = np.r_[
        True, (roll.user[1:] != roll.user[:-1]) | (roll.session[1:] != roll.session[:-1])
    ]
    states = replay_states(
        world, user=roll.user, item=roll.item, clicked=roll.reward > 0, new_session=new_session
    )
    from recloop.evaluation.worlds.base import UserState

    st = UserState(user=states.user, taste=states.taste, satiety=states.satiety,
                   misses=np.zeros_like(states.user))  # fmt: skip
    np.testing.assert_allclose(world.expected_reward(st, roll.item), roll.expected, rtol=1e-12)


def test_myopic_greedy_loses_to_an_engaging_policy_in_shop() -> None:
    """The long-term mechanism is real: the exact myopic optimum (max E[reward] now) earns
    less per session than the same oracle that also values satisfying the user."""
    world = build_world("shop")
    users = evaluation_users(1500)
    myopic = simulate(world, Policy(name="m", scorer=OracleScorer(world), selection=Selection()),
                      users, seed=0)  # fmt: skip
    engage = simulate(
        world, Policy(name="e", scorer=OracleScorer(world, engage=1.0), selection=Selection()),
        users, seed=0,
    )  # fmt: skip
    diff = engage.per_user()["return"] - myopic.per_user()["return"]  # paired by user
    half = 1.96 * diff.std(ddof=1) / np.sqrt(diff.shape[0])
    assert diff.mean() - half > 0, (diff.mean(), half)
    assert engage.per_user()["length"].mean() > myopic.per_user()["length"].mean()


def _sets(values: list[str]) -> list[str]:
    return [arg for v in values for arg in ("--set", v)]


def _main(args: list[str]) -> int:
    from recloop.cli import main

    return main(args)


def test_generate_prepare_train_evaluate_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    log, data, run = tmp_path / "log", tmp_path / "data", tmp_path / "pop"
    gen = ["-q", "world", "generate", "--policy", "popularity", "--epsilon", "0.5",
           "--users", "150", "--output", str(log), "--seed", "0"]  # fmt: skip
    assert _main([*gen, *_sets(SMALL)]) == 0
    meta = json.loads((log / "world.json").read_text())
    assert meta["version"] == "shop-1" and meta["policy"]["epsilon"] == 0.5
    assert _main(["-q", "prepare", "--format", "csv", "--input", str(log / "events.csv"),
                  "--split", "loo", "--output", str(data)]) == 0  # fmt: skip
    assert (
        _main(["-q", "train", "--algo", "popularity", "--data", str(data), "--out", str(run)]) == 0
    )
    capsys.readouterr()
    assert (
        _main(["-q", "world", "evaluate", str(run), "--data", str(log), "--users", "200", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    rows = {r["policy"]: r for r in out["rows"]}
    assert set(rows) == {str(run), "popularity", "random"}
    for r in rows.values():
        assert r["return"]["low"] <= r["return"]["value"] <= r["return"]["high"]
    # a popularity run learnt from the log ranks like the world's popularity: it beats random
    assert rows[str(run)]["return"]["value"] > rows["random"]["return"]["value"]


def test_ope_is_unbiased_on_a_bandit_like_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No satiety, drift or quit: logged by a uniform policy with exact propensities, IPS
    and DR of a target policy cover its exact one-step value."""
    import recloop.evaluation.worlds.ope_check as ope_check
    from recloop.data.dataset import PreparedDataset
    from recloop.evaluation.ope import OPEConfig, TrainedCatalogue
    from recloop.evaluation.worlds.ope_check import ope_against_truth

    # the run is scored, and its truth computed, without the items no TRAIN row has
    scored: list[object] = []
    for name in ("policy_terms", "one_step_truth"):
        real = getattr(ope_check, name)
        monkeypatch.setattr(
            ope_check, name,
            lambda p, *a, _real=real, **k: scored.append(p) or _real(p, *a, **k),
        )  # fmt: skip

    bandit = [*SMALL, "mechanics.boredom=0", "mechanics.drift=0", "mechanics.quit_base=0",
              "mechanics.quit_per_miss=0", "mechanics.sessions=1",
              "mechanics.horizon=4"]  # fmt: skip
    log, data, run = tmp_path / "log", tmp_path / "data", tmp_path / "pop"
    args = ["-q", "world", "generate", "--policy", "random", "--users", "3000",
            "--output", str(log), *_sets(bandit)]  # fmt: skip
    assert _main(args) == 0
    assert _main(["-q", "prepare", "--format", "csv", "--input", str(log / "events.csv"),
                  "--split", "loo", "--output", str(data)]) == 0  # fmt: skip
    assert (
        _main(["-q", "train", "--algo", "popularity", "--data", str(data), "--out", str(run)]) == 0
    )
    world = build_world("shop", bandit)
    report = ope_against_truth(
        [run], PreparedDataset.load(data), world,
        cfg=OPEConfig(temperature=1.0, top_k=5, n_boot=300), rollout_users=100,
    )  # fmt: skip
    truth = report.one_step_truth[0]
    for name in ("ips", "snips", "dr"):
        est = report.estimates[name][0]
        assert est["low"] <= truth <= est["high"], (name, est, truth)
    assert report.errors["ips"]["covered"] == 1.0
    assert len(scored) == 2 and all(isinstance(p, TrainedCatalogue) for p in scored)


def test_ml100k_world_is_calibrated_and_cached(
    ml100k_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECLOOP_CACHE", str(tmp_path))
    sets = [f"data_dir={ml100k_dir}", "epochs=2"]
    world = build_world("ml100k", sets)
    rate = world.fit_report["consumption_rate"]  # type: ignore[attr-defined]
    # the Platt-scaled model implies the real per-step consumption rate of the later half
    assert abs(rate["implied"] - rate["data"]) < 0.2 * rate["data"]
    assert len(list((tmp_path / "worlds").glob("ml100k-*.npz"))) == 1
    again = build_world("ml100k", sets)  # from the cache: the same world
    np.testing.assert_array_equal(again.params.item_emb, world.params.item_emb)
    roll = simulate(
        world, Policy(name="p", scorer=PopularityScorer(world), selection=Selection(epsilon=0.3)),
        np.arange(100), seed=0,
    )  # fmt: skip
    assert set(np.unique(roll.response)) <= {0, 1}  # no funnel in MovieLens: pv or nothing


def test_served_ope_is_unbiased_on_a_bandit_like_world(tmp_path: Path) -> None:
    """A log of ε-greedy lists of one item carries how each step was served, and a run
    scored as served (the log's ε around its own top item) has IPS and DR covering its
    exact one-step value: (1 - ε) R(its top item) + ε mean R(unmasked items)."""
    import polars as pl

    from recloop.data.dataset import PreparedDataset
    from recloop.evaluation.ope import OPEConfig, served_scores
    from recloop.evaluation.worlds.ope_check import (
        WorldIndex,
        dataset_states,
        ope_against_truth,
    )
    from recloop.ranking import topk

    bandit = [*SMALL, "mechanics.boredom=0", "mechanics.drift=0", "mechanics.quit_base=0",
              "mechanics.quit_per_miss=0", "mechanics.sessions=1",
              "mechanics.horizon=4"]  # fmt: skip
    log, data, run = tmp_path / "log", tmp_path / "data", tmp_path / "pop"
    args = ["-q", "world", "generate", "--policy", "popularity", "--epsilon", "0.5",
            "--users", "3000", "--output", str(log), *_sets(bandit)]  # fmt: skip
    assert _main(args) == 0
    head = pl.read_csv(log / "events.csv", n_rows=3)
    assert head["policy"].to_list() == ["epsilon"] * 3
    assert head["epsilon"].to_list() == [0.5] * 3 and head["list_length"].to_list() == [1] * 3
    assert _main(["-q", "prepare", "--format", "csv", "--input", str(log / "events.csv"),
                  "--split", "loo", "--output", str(data)]) == 0  # fmt: skip
    assert (
        _main(["-q", "train", "--algo", "popularity", "--data", str(data), "--out", str(run)]) == 0
    )
    world = build_world("shop", bandit)
    ds = PreparedDataset.load(data)
    cfg = OPEConfig(target="served", n_boot=300)
    report = ope_against_truth([run], ds, world, cfg=cfg, rollout_users=100)
    truth = report.one_step_truth[0]
    for name in ("ips", "snips", "dr"):
        est = report.estimates[name][0]
        assert est["low"] <= truth <= est["high"], (name, est, truth)
    # the one-step truth, computed here from its definition
    from recloop.artifacts import load_artifact

    art = load_artifact(run)
    index = WorldIndex.of(ds, world)
    states = dataset_states(ds, world, index)
    rows = np.flatnonzero(ds.split == 2)
    values = []
    for sl, users, scores in served_scores(art.policy, ds, rows, history=art.history_len, cfg=cfg):
        at = rows[sl]
        r = world.expected_reward_all(states.taste[at], states.satiety[at])[:, index.item]
        r[:, 0] = 0.0
        top = topk(scores, 1, row_keys=users).indices[:, 0].numpy()
        ok = np.isfinite(scores.numpy())
        mean_ok = (r * ok).sum(1) / ok.sum(1)
        values.append(0.5 * r[np.arange(len(at)), top] + 0.5 * mean_ok)
    assert truth == pytest.approx(float(np.concatenate(values).mean()), rel=1e-9)
    # a softmax slot below the first has no one-step truth here: its pi is given the items
    # logged above it.  The first test event becomes slot 1 of a softmax list of 2.
    from dataclasses import replace

    from recloop.errors import DataError
    from recloop.evaluation.worlds.ope_check import one_step_truth

    r = int(rows[0])
    assert ds.user[r - 1] == ds.user[r] and ds.item[r - 1] != ds.item[r]
    ts = ds.timestamp.copy()
    ts[r] = ts[r - 1]
    extra = {
        **ds.extra,
        "policy": np.full(ds.n_events, "softmax"),
        "temperature": np.ones(ds.n_events),
        "position": np.where(np.arange(ds.n_events) == r, 1, 0).astype(np.int32),
        "list_length": np.where(np.isin(np.arange(ds.n_events), [r - 1, r]), 2, 1),
    }
    soft = replace(ds, timestamp=ts, extra=extra)
    with pytest.raises(DataError, match=rf"row {r}: the one-step truth of a softmax slot below"):
        one_step_truth(
            art.policy, soft, world, states, index, np.array([r]), history=art.history_len,
            cfg=cfg,
        )  # fmt: skip


class _Recording(PopularityScorer):
    """The world's popularity, scored per step (not static), recording each state it sees."""

    history = 4
    static = False

    def __init__(self, world: ShopWorld) -> None:
        super().__init__(world)
        self.seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def __call__(self, user, hist_item, hist_reward, state):  # type: ignore[no-untyped-def]
        self.seen.append((user.copy(), hist_item.copy(), hist_reward.copy()))
        return super().__call__(user, hist_item, hist_reward, state)


@pytest.mark.parametrize("feedback", ["shown", "clicks"])
def test_a_roll_out_feeds_its_policy_every_shown_item_or_the_clicks_only(feedback: str) -> None:
    """``shown``: the state holds every item shown, none is shown twice.  ``clicks`` (a
    store-fed service's view): the state holds the items responded to, with their rewards,
    and an ignored item may come back (the top item until it is clicked)."""
    world = small_world()
    scorer = _Recording(world)
    pol = Policy(name="p", scorer=scorer, selection=Selection(epsilon=0.0))
    users = np.arange(50)
    roll = simulate(world, pol, users, seed=3, feedback=feedback)
    want, repeats = _fed_states(roll, feedback, history=4)
    assert _seen_states(scorer) == want  # the states the policy saw, step by step
    if feedback == "shown":
        assert repeats == 0
    else:
        assert repeats > 0  # ignored items came back


_States = dict[int, list[tuple[list[int], list[float]]]]


def _fed_states(roll: Rollout, feedback: str, *, history: int) -> tuple[_States, int]:
    """The state (last ``history`` fed items and rewards) before each step of each user,
    from the roll-out's events; and how many shown items had been shown before."""
    fed: dict[int, list[tuple[int, float]]] = {int(u): [] for u in roll.users}
    shows: dict[int, list[int]] = {int(u): [] for u in roll.users}  # every item shown
    want: _States = {int(u): [] for u in roll.users}
    repeats = 0
    for u, item, reward, response in zip(
        roll.user.tolist(),
        roll.item.tolist(),
        roll.reward.tolist(),
        roll.response.tolist(),
        strict=True,
    ):
        last = ([(0, 0.0)] * history + fed[u])[-history:]
        want[u].append(([i for i, _ in last], [r for _, r in last]))
        assert item not in [i for i, _ in fed[u]]  # nothing in the state is shown again
        repeats += item in shows[u]
        shows[u].append(item)
        if feedback == "shown" or response != 0:
            fed[u].append((item, reward))
    return want, repeats


def _seen_states(scorer: _Recording) -> _States:
    got: _States = {}
    for user, hist, hist_r in scorer.seen:
        for u, h, r in zip(user.tolist(), hist.tolist(), hist_r.tolist(), strict=True):
            got.setdefault(u, []).append((h, r))
    return got


@pytest.mark.parametrize("feedback", ["shown", "clicks"])
def test_a_shadow_sees_the_policys_states_and_chooses_with_its_random_numbers(
    feedback: str,
) -> None:
    """A shadow does not act; it sees the states the policy's own roll-out visits, with its
    own (longer) history, and chooses with the policy's selection and random numbers, so a
    shadow that scores as the policy does chooses its items, and the myopic oracle's items
    are never worse in expectation."""
    world = small_world()
    driver = Policy(name="p", scorer=PopularityScorer(world), selection=Selection(epsilon=0.3))
    users = np.arange(60)
    shadow = _Recording(world)  # the world's popularity too, scored per step, history 4
    roll = simulate(world, driver, users, seed=3, feedback=feedback, shadow=shadow)
    plain = simulate(world, driver, users, seed=3, feedback=feedback)
    assert np.array_equal(roll.item, plain.item) and np.array_equal(roll.reward, plain.reward)
    assert plain.shadow_expected is None and "advantage" not in plain.per_user()
    want, _ = _fed_states(roll, feedback, history=4)
    assert _seen_states(shadow) == want
    assert roll.shadow_expected is not None
    np.testing.assert_array_equal(roll.shadow_expected, roll.expected)
    assert np.array_equal(roll.per_user()["advantage"], np.zeros(users.shape[0]))
    greedy = Policy(name="g", scorer=PopularityScorer(world), selection=Selection(epsilon=0.0))
    vs_oracle = simulate(world, greedy, users, seed=3, feedback=feedback,
                         shadow=OracleScorer(world))  # fmt: skip
    assert vs_oracle.shadow_expected is not None
    assert (vs_oracle.shadow_expected >= vs_oracle.expected - 1e-12).all()
    assert (vs_oracle.per_user()["advantage"] < 0).mean() > 0.5


def test_shown_counts_an_item_once() -> None:
    """Adding an item a user may already not be shown (shown before, or out of the
    catalogue) changes nothing: the uniform draws count the items left."""
    shown = Shown.empty(2, 6, 4, blocked=np.array([2, 4]))
    shown.add(np.array([0, 1]), np.array([4, 5]))  # 4 is blocked for both
    shown.add(np.array([1]), np.array([5]))  # 5 again
    assert shown.count.tolist() == [2, 3]
    assert shown.sorted.tolist() == [[2, 4, 7, 7, 7, 7], [2, 4, 5, 7, 7, 7]]
    assert kth_unshown(shown.sorted, np.array([3, 3])).tolist() == [5, 6]


class _LongBlocked(_Recording):
    """A recording shadow with a longer history than its driver's and half the catalogue
    out of reach (as a saved model's catalogue is)."""

    history = 6

    def __init__(self, world: ShopWorld) -> None:
        super().__init__(world)
        self.blocked = np.arange(2, world.n_items + 1, 2)


@pytest.mark.parametrize("feedback", ["shown", "clicks"])
def test_a_shadow_with_its_own_history_and_catalogue(feedback: str) -> None:
    """A driver scored per step keeps its own history width when its shadow's is longer;
    the shadow sees its own, never chooses an item out of its catalogue or one it may not
    show (with exploration: uniform over what is left to it), and its choice's value is
    the world's exact value of that item in the driver's state."""
    world = small_world()
    driver_scorer = _Recording(world)  # history 4, not static
    driver = Policy(name="p", scorer=driver_scorer, selection=Selection(epsilon=0.5))
    shadow = _LongBlocked(world)
    users = np.arange(60)
    roll = simulate(world, driver, users, seed=5, feedback=feedback, shadow=shadow)
    assert _seen_states(driver_scorer) == _fed_states(roll, feedback, history=4)[0]
    assert _seen_states(shadow) == _fed_states(roll, feedback, history=6)[0]
    assert roll.shadow_item is not None and roll.shadow_expected is not None
    assert not np.isin(roll.shadow_item, shadow.blocked).any()
    # never an item the driver's feedback put in the state before (the shadow's exclusions)
    seen: dict[int, set[int]] = {}
    for u, item, shadow_item, response in zip(
        roll.user.tolist(), roll.item.tolist(), roll.shadow_item.tolist(),
        roll.response.tolist(), strict=True,
    ):  # fmt: skip
        assert shadow_item not in seen.setdefault(u, set())
        if feedback == "shown" or response != 0:
            seen[u].add(item)
    replayed = replay_states(
        world, user=roll.user, item=roll.item, clicked=roll.response > 0,
        new_session=np.r_[True, (roll.user[1:] != roll.user[:-1])
                          | (roll.session[1:] != roll.session[:-1])],
    )  # fmt: skip
    state = UserState(user=replayed.user, taste=replayed.taste, satiety=replayed.satiety,
                      misses=np.zeros(roll.user.shape[0], np.int64))  # fmt: skip
    np.testing.assert_allclose(
        roll.shadow_expected, world.expected_reward(state, roll.shadow_item), atol=1e-12
    )


def test_a_roll_outs_feedback_is_checked() -> None:
    world = small_world()
    pol = Policy(name="p", scorer=PopularityScorer(world), selection=Selection(epsilon=0.3))
    with pytest.raises(ConfigError, match="feedback"):
        simulate(world, pol, np.arange(3), seed=0, feedback="views")


def test_the_one_step_truth_of_a_model_with_other_id_maps_covers_its_own_catalogue(
    tmp_path: Path,
) -> None:
    """The gate's current model has its own id maps and may know items the holdout never
    showed; served, its policy can pick them, and the one-step truth must value them as
    the world's items they are.  Here the current model's most popular item is absent from
    the dataset, so, served greedily (the log's ε 0), it shows that item at every step."""
    import polars as pl

    from recloop.artifacts import load_artifact
    from recloop.data.dataset import PreparedDataset
    from recloop.evaluation.ope import OPEConfig
    from recloop.evaluation.worlds.base import UserState
    from recloop.evaluation.worlds.ope_check import WorldIndex, dataset_states, one_step_truth
    from recloop.loop.gate import MAPPED_WINDOW, mapped_scorer

    log, data, other, run = (tmp_path / n for n in ("log", "data", "other", "cur"))
    args = ["-q", "world", "generate", "--policy", "popularity", "--epsilon", "0",
            "--users", "60", "--output", str(log), *_sets(SMALL)]  # fmt: skip
    assert _main(args) == 0
    events = pl.read_csv(log / "events.csv")
    shown = set(events["item"].to_list())
    absent, second = [f"i{j}" for j in range(1, 41) if f"i{j}" not in shown][:2]
    # the current model learnt from a log where `absent` is clicked more than any item, and
    # `second` (also absent) less
    extra = [
        events.slice(at, n).with_columns(
            pl.lit(item).alias("item"), pl.lit(1.0).alias("rating"), pl.lit("pv").alias("response")
        )
        for item, at, n in ((second, 0, 20), (absent, 20, 80))
    ]
    pl.concat([events, *extra]).sort("user", "timestamp").write_csv(tmp_path / "other.csv")
    for src, out in ((log / "events.csv", data), (tmp_path / "other.csv", other)):
        assert _main(["-q", "prepare", "--format", "csv", "--input", str(src),
                      "--split", "loo", "--output", str(out)]) == 0  # fmt: skip
    assert (
        _main(["-q", "train", "--algo", "popularity", "--data", str(other), "--out", str(run)]) == 0
    )
    ds, cur = PreparedDataset.load(data), load_artifact(run)
    assert {absent, second}.isdisjoint(ds.item_ids) and {absent, second} <= set(cur.item_ids)
    world = build_world("shop", SMALL)
    index = WorldIndex.of(ds, world)
    states = dataset_states(ds, world, index)
    rows = np.flatnonzero(ds.split == 2)
    v = one_step_truth(
        mapped_scorer(cur, ds), ds, world, states, index, rows,
        history=MAPPED_WINDOW * cur.history_len, cfg=OPEConfig(target="served"),
    )  # fmt: skip
    state = UserState(
        user=states.user[rows], taste=states.taste[rows], satiety=states.satiety[rows],
        misses=np.zeros(rows.shape[0], np.int64),
    )  # fmt: skip
    expected = world.expected_reward(state, np.full(rows.shape[0], int(absent[1:])))
    np.testing.assert_allclose(v, expected, rtol=1e-9)
