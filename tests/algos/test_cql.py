"""Discrete CQL: the TD loss plus α · (logsumexp Q − Q(s, a_data))."""

from __future__ import annotations

import pytest
import torch
from actor_critic_helpers import (
    assert_clipping_keeps_direction,
    assert_policy_reloads,
    assert_polyak,
    assert_recommendations,
    first_last,
    make,
    run,
    snapshot,
    tiny_batch,
)

from recloop.algos.cql import CQL, CQLConfig
from recloop.algos.dqn import q_values
from recloop.artifacts.heads import HeadConfig
from recloop.errors import ConfigError


def cql(**over: object) -> CQL:
    algo = make("cql", **over)
    assert isinstance(algo, CQL)
    return algo


def test_loss_and_penalty_fall_on_a_fixed_batch() -> None:
    stats = run(cql(lr=1e-2), tiny_batch(), 30)
    for key in ("loss", "cql_penalty"):
        first, last = first_last(stats, key)
        assert last < 0.5 * first, key


def test_loss_is_td_plus_alpha_times_penalty() -> None:
    (s,) = run(cql(alpha=2.5), tiny_batch(), 1)
    assert s["loss"] == pytest.approx(s["td_loss"] + 2.5 * s["cql_penalty"], rel=1e-5)


def test_penalty_makes_the_logged_items_rank_higher_than_plain_dqn() -> None:
    batch = tiny_batch()

    def logged_rank_gap(alpha: float) -> float:
        algo = cql(lr=1e-2, alpha=alpha)
        run(algo, batch, 30)
        with torch.no_grad():
            q = q_values(
                algo.policy, algo.policy.state(batch.user, batch.history, batch.history_reward)
            )
        return float((q.gather(1, (batch.action - 1)[:, None]).squeeze(1) - q.mean(1)).mean())

    assert logged_rank_gap(5.0) > logged_rank_gap(0.0)


def test_target_moves_by_tau() -> None:
    algo = cql(critic={"tau": 0.5})
    before = snapshot(algo.target_policy)
    run(algo, tiny_batch(), 1)
    assert_polyak(before, algo.target_policy, algo.policy, 0.5)


def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clipping_keeps_direction(monkeypatch, "cql", steps=2)


def test_recommendations_and_reload() -> None:
    algo = cql()
    batch = tiny_batch()
    run(algo, batch, 3)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        CQLConfig(alpha=-1.0)
    with pytest.raises(ConfigError, match=r"head\.kind"):
        CQLConfig(head=HeadConfig(kind="dot"))
