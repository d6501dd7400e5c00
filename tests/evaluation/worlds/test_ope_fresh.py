"""OPE on fresh world logs: the target policy is rebuilt on exactly the logged states, and
the estimators cover the exact one-step value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recloop.evaluation.worlds import build_world
from recloop.evaluation.worlds.ope_check import (
    ESTIMATORS,
    cross_fitted_rewards,
    estimator_table,
    fresh_log,
    fresh_terms,
    group_means,
)
from recloop.evaluation.worlds.rollout import (
    OracleScorer,
    Policy,
    PopularityScorer,
    Selection,
)

SMALL = ["n_items=40", "n_clusters=4", "mechanics.horizon=6", "mechanics.sessions=2"]


def test_the_behaviour_as_target_has_weight_one_everywhere() -> None:
    """Log with a state-dependent softmax policy, then rebuild that same policy as the
    target from the log alone: pi(a | s) must equal the logged propensity at every event —
    the histories, the shown-item masks and the replayed states are the simulation's."""
    world = build_world("shop", SMALL)
    scorer = OracleScorer(world, engage=0.5)
    sel = Selection(kind="softmax", temperature=0.3, top_k=5)
    log = fresh_log(world, Policy(name="oracle", scorer=scorer, selection=sel), 300, seed=1)
    rewards = cross_fitted_rewards(log, world.n_items, 5.0)
    t = fresh_terms(scorer, world, log, rewards, temperature=0.3, top_k=5)
    np.testing.assert_allclose(t.p_target, log.propensity, rtol=1e-5)
    # the exact value of the behaviour itself, state by state, is what it logged on average
    assert abs(t.truth.mean() - log.expected.mean()) < 0.02 * log.expected.mean() + 1e-3
    table = estimator_table(
        t.p_target / log.propensity, log.reward, t.q_logged, t.v_model, clip=10.0,
        clusters=log.user,
    )  # fmt: skip
    # with w = 1, IPS and SNIPS are the mean logged reward
    assert table["ips"]["value"] == table["snips"]["value"] == log.reward.mean()


def test_estimators_cover_the_exact_value_on_a_bandit_like_world() -> None:
    bandit = [*SMALL, "mechanics.boredom=0", "mechanics.drift=0", "mechanics.quit_base=0",
              "mechanics.quit_per_miss=0"]  # fmt: skip
    world = build_world("shop", bandit)
    log = fresh_log(
        world, Policy(name="pop", scorer=PopularityScorer(world),
                      selection=Selection(kind="softmax", temperature=1.0)), 3000, seed=2,
    )  # fmt: skip
    target = OracleScorer(world)
    rewards = cross_fitted_rewards(log, world.n_items, 5.0)
    t = fresh_terms(target, world, log, rewards, temperature=0.5, top_k=5)
    table = estimator_table(
        t.p_target / log.propensity, log.reward, t.q_logged, t.v_model, clip=10.0,
        clusters=log.user,
    )  # fmt: skip
    truth = float(t.truth.mean())
    for name in ("ips", "snips", "dr", "sndr", "dr_slope"):
        assert abs(table[name]["value"] - truth) < 3.5 * table[name]["se"], (name, table, truth)
    assert table["dm"]["value"] < truth - 0.1  # the item baseline misses the personal part


def test_group_means_keep_first_seen_order() -> None:
    names, means = group_means([1.0, 2.0, 4.0, 3.0], ["b", "a", "b", "a"])
    assert names == ["b", "a"]
    np.testing.assert_allclose(means, [2.5, 2.5])


@pytest.mark.slow
def test_world_ope_fresh_users_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recloop.cli import main

    sets = [arg for v in SMALL for arg in ("--set", v)]
    log, data, run = tmp_path / "log", tmp_path / "data", tmp_path / "pop"
    assert main(["-q", "world", "generate", "--policy", "random", "--users", "300",
                 "--output", str(log), *sets]) == 0  # fmt: skip
    assert main(["-q", "prepare", "--format", "csv", "--input", str(log / "events.csv"),
                 "--split", "loo", "--output", str(data)]) == 0  # fmt: skip
    assert main(["-q", "train", "--algo", "popularity", "--data", str(data), "--out",
                 str(run), "--epochs", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["world", "ope", str(run), "--fresh-users", "1000", "--top-k", "5",
                 "--json"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["n_users"] == 1000 and out["behaviour"].startswith("random")
    assert set(out["estimates"]) == set(ESTIMATORS)
    truth = out["truth"][0]
    for name in ("ips", "snips", "dr", "sndr"):
        est = out["estimates"][name][0]
        assert abs(est["value"] - truth) < 4 * est["se"], (name, est, truth)
    # the fresh log's estimators have no served target: refused, not silently softmax
    assert main(["world", "ope", str(run), "--fresh-users", "1000", "--target", "served"]) == 2
    assert "--fresh-users evaluates the softmax target" in capsys.readouterr().err


def test_spearman_by_hand_with_ties() -> None:
    from recloop.evaluation.worlds.ope_check import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks with ties averaged: x → 0, 1.5, 1.5, 3; y → 0, 1, 2, 3; Pearson of those.
    rx, ry = np.array([0, 1.5, 1.5, 3]), np.array([0, 1, 2, 3.0])
    want = float(np.corrcoef(rx, ry)[0, 1])
    assert spearman([5, 7, 7, 9], [1, 2, 3, 4]) == pytest.approx(want)
    assert want == pytest.approx(0.9486833, abs=1e-6)
    assert spearman([1, 2], [1, 2]) is None  # fewer than 3 points
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # a constant side


def test_cross_fitted_reward_models_never_see_their_own_users() -> None:
    from types import SimpleNamespace

    from recloop.evaluation.worlds.ope_check import ItemRewards, cross_fitted_rewards

    rng = np.random.default_rng(0)
    user = rng.integers(0, 40, 600)
    item = rng.integers(1, 11, 600)
    reward = rng.random(600)
    models = cross_fitted_rewards(
        SimpleNamespace(user=user, item=item, reward=reward), n_items=10, shrinkage=2.0
    )
    for k in (0, 1):
        other = user % 2 != k
        want = ItemRewards.fit(item[other], reward[other], 10, 2.0)
        np.testing.assert_allclose(models[k](np.arange(11)), want(np.arange(11)))
    # Changing the rewards of fold-0 users moves model 1 only: model 0 serves them unseen.
    moved = np.where(user % 2 == 0, 1.0 - reward, reward)
    again = cross_fitted_rewards(
        SimpleNamespace(user=user, item=item, reward=moved), n_items=10, shrinkage=2.0
    )
    items = np.arange(11)
    np.testing.assert_allclose(again[0](items), models[0](items))
    assert not np.allclose(again[1](items), models[1](items))


class _HistoryScorer:
    """Scores that depend on the history's items, rewards and positions (H = 3)."""

    history = 3
    static = False

    def __init__(self, n_items: int) -> None:
        import torch

        gen = np.random.default_rng(5)
        self.table = torch.from_numpy(gen.normal(size=(n_items + 1, n_items + 1))).float()
        self.pos = torch.tensor([1.0, 2.0, 3.0])

    def __call__(self, user: object, hist_item: np.ndarray, hist_reward: np.ndarray, state: object):
        import torch

        items = torch.from_numpy(hist_item.astype(np.int64))
        rewards = torch.from_numpy(hist_reward.astype(np.float32))
        weight = (rewards + 0.5)[..., None] * self.pos[None, :, None]
        return (self.table[items] * weight).sum(1)


@pytest.mark.parametrize("reward_pv", ["1.0", "0"])
def test_a_history_dependent_behaviour_as_target_has_weight_one(reward_pv: str) -> None:
    """The replayed histories carry the simulation's items and rewards, also when a click
    earns nothing (mechanics.reward_pv = 0: clicks come from the response, not the reward)."""
    world = build_world("shop", [*SMALL, f"mechanics.reward_pv={reward_pv}"])
    scorer = _HistoryScorer(world.n_items)
    sel = Selection(kind="softmax", temperature=0.7, top_k=5)
    log = fresh_log(world, Policy(name="hist", scorer=scorer, selection=sel), 300, seed=1)
    t = fresh_terms(
        scorer, world, log, cross_fitted_rewards(log, world.n_items, 5.0), temperature=0.7, top_k=5
    )
    np.testing.assert_allclose(t.p_target, log.propensity, rtol=1e-5)
    # the replayed states give the simulation's exact expected reward of every logged item
    from recloop.evaluation.worlds.base import UserState

    state = UserState(
        user=log.user,
        taste=log.states.taste,
        satiety=log.states.satiety,
        misses=np.zeros(log.n_events, np.int64),
    )
    np.testing.assert_allclose(world.expected_reward(state, log.item), log.expected, atol=1e-9)
