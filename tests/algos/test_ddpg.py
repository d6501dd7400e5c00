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

from recloop.algos.bc import BCConfig
from recloop.algos.critics import CriticConfig
from recloop.algos.ddpg import DDPG, DDPGConfig
from recloop.artifacts.heads import HeadConfig
from recloop.errors import ConfigError


def test_critic_loss_falls_on_a_fixed_batch() -> None:
    stats = run(make("ddpg", lr=1e-2), tiny_batch(), 30)
    first, last = first_last(stats, "critic_loss")
    assert last < 0.2 * first


def test_actor_ascends_a_fixed_critic() -> None:
    # critic.lr tiny: the critic barely moves, so the actor loss must fall by itself
    stats = run(make("ddpg", lr=1e-2, critic={"lr": 1e-9}, bc=None), tiny_batch(), 20)
    first, last = first_last(stats, "actor_loss")
    assert last < first


def test_with_bc_the_actor_still_ascends_a_fixed_critic() -> None:
    # −λQ is bounded by α, so the loss need not fall; Q(s, μ(s)) must rise when α weighs the
    # critic far above the BC term
    algo = make("ddpg", lr=1e-2, critic={"lr": 1e-9}, bc={"alpha": 100.0})
    assert isinstance(algo, DDPG)
    batch = tiny_batch()

    def q_of_actor() -> float:
        with torch.no_grad():
            s = algo.policy.state(batch.user, batch.history, batch.history_reward)
            return float(algo.critic(s, algo.actor.action(s)).mean())

    before = q_of_actor()
    run(algo, batch, 20)
    assert q_of_actor() > before


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_bc_term_is_reported_and_learns_the_logged_items(loss: str) -> None:
    # α = 0: pure behaviour cloning, so the BC term alone drives the actor
    stats = run(make("ddpg", lr=1e-2, bc=BCConfig(alpha=0.0, loss=loss)), tiny_batch(), 40)
    first, last = first_last(stats, "bc_loss")
    assert first > 0 and last < 0.7 * first


def test_targets_move_by_tau_after_one_update() -> None:
    algo = make("ddpg", critic={"tau": 0.1})
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
    with pytest.raises(ConfigError, match=r"critic\.tau"):
        CriticConfig(tau=0.0)
    with pytest.raises(ConfigError, match=r"critic\.gamma"):
        CriticConfig(gamma=1.5)
    with pytest.raises(ConfigError, match=r"critic\.hidden"):
        CriticConfig(hidden=(0,))
    with pytest.raises(ConfigError, match=r"critic\.lr"):
        CriticConfig(lr=0.0)
    assert DDPGConfig().critic.tau == 0.001  # the paper's τ, not the shared default
