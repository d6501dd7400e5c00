"""DDPG: losses fall on a fixed batch, targets move by τ, clipping keeps the direction."""

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

from recloop.algos.ddpg import DDPG, DDPGConfig
from recloop.artifacts.heads import HeadConfig
from recloop.errors import ConfigError


def test_critic_loss_falls_on_a_fixed_batch() -> None:
    stats = run(make("ddpg", lr=1e-2), tiny_batch(), 30)
    first, last = first_last(stats, "critic_loss")
    assert last < 0.2 * first


@pytest.mark.parametrize("bc_weight", [0.0, 0.4])
def test_actor_ascends_a_fixed_critic(bc_weight: float) -> None:
    # critic_lr tiny: the critic barely moves, so the actor loss must fall by itself
    stats = run(make("ddpg", lr=1e-2, critic_lr=1e-9, bc_weight=bc_weight), tiny_batch(), 20)
    first, last = first_last(stats, "actor_loss")
    assert last < first


def test_bc_term_is_reported_and_learns_the_logged_items() -> None:
    stats = run(make("ddpg", lr=1e-2, bc_weight=1.0), tiny_batch(), 40)
    first, last = first_last(stats, "bc_loss")
    assert first > 0 and last < 0.7 * first


def test_targets_move_by_tau_after_one_update() -> None:
    algo = make("ddpg", tau=0.1)
    assert isinstance(algo, DDPG)
    before_p, before_c = snapshot(algo.target_policy), snapshot(algo.target_critic)
    run(algo, tiny_batch(), 1)
    assert_polyak(before_p, algo.target_policy, algo.policy, 0.1)
    assert_polyak(before_c, algo.target_critic, algo.critic, 0.1)


def test_targets_are_copies_not_aliases() -> None:
    algo = make("ddpg")
    assert isinstance(algo, DDPG)
    for t, s in zip(algo.target_policy.parameters(), algo.policy.parameters(), strict=True):
        assert t.data_ptr() != s.data_ptr() and not t.requires_grad


def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clipping_keeps_direction(monkeypatch, "ddpg", steps=2)


def test_critic_reads_the_logged_action_embedding() -> None:
    algo = make("ddpg")
    assert isinstance(algo, DDPG)
    batch = tiny_batch()
    with torch.no_grad():
        s = algo.policy.state(batch.user, batch.history, batch.history_reward)
        expected = algo.critic(s, algo.policy.item_embedding.weight[batch.action]).mean()
    stats = algo.update(batch)
    torch.testing.assert_close(torch.as_tensor(stats.q), expected)


def test_recommendations_and_reload() -> None:
    algo = make("ddpg")
    batch = tiny_batch()
    run(algo, batch, 3)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)
    assert isinstance(algo.networks()["target_critic"], torch.nn.Module)
    assert set(algo.optimizers()) == {"actor", "critic"}


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"head\.kind"):
        DDPGConfig(head=HeadConfig(kind="linear"))
    with pytest.raises(ConfigError, match="tau"):
        DDPGConfig(tau=0.0)
    with pytest.raises(ConfigError, match="gamma"):
        DDPGConfig(gamma=1.5)
    with pytest.raises(ConfigError, match="bc_weight"):
        DDPGConfig(bc_weight=-1.0)
