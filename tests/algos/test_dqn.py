"""DQN / Double DQN over items."""

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

from recloop.algos.critics import QLearningConfig
from recloop.algos.dqn import DQN, DQNConfig, q_learning_target, q_values
from recloop.algos.targets import double_dqn_target, dqn_target
from recloop.artifacts.heads import HeadConfig
from recloop.errors import ConfigError


def dqn(**over: object) -> DQN:
    algo = make("dqn", **over)
    assert isinstance(algo, DQN)
    return algo


@pytest.mark.parametrize("double", [False, True])
def test_td_loss_falls_on_a_fixed_batch(double: bool) -> None:
    stats = run(dqn(lr=1e-2, double=double), tiny_batch(), 30)
    first, last = first_last(stats, "loss")
    assert last < 0.2 * first


def test_double_target_values_the_online_argmax_with_the_target_net() -> None:
    algo = dqn()
    batch = tiny_batch()
    run(algo, batch, 3)  # online and target differ now
    nxt = (batch.user, batch.next_history, batch.next_history_reward)
    with torch.no_grad():
        q_on = q_values(algo.policy, algo.policy.state(*nxt))
        q_tg = q_values(algo.target_policy, algo.target_policy.state(*nxt))
        kw = {"reward": batch.reward, "done": batch.done, "gamma": 0.99}
        torch.testing.assert_close(
            q_learning_target(algo.policy, algo.target_policy, batch, gamma=0.99, double=True),
            double_dqn_target(q_next_online=q_on, q_next_target=q_tg, **kw),
        )
        torch.testing.assert_close(
            q_learning_target(algo.policy, algo.target_policy, batch, gamma=0.99, double=False),
            dqn_target(q_next_target=q_tg, **kw),
        )


def test_q_values_skip_the_padding_slot() -> None:
    algo = dqn()
    s = torch.randn(3, algo.policy.encoder.state_dim)
    full = algo.policy.head(s, algo.policy.item_embedding.weight)
    torch.testing.assert_close(q_values(algo.policy, s), full[:, 1:])


def test_soft_target_update_by_tau() -> None:
    algo = dqn(critic={"tau": 0.25})
    before = snapshot(algo.target_policy)
    run(algo, tiny_batch(), 1)
    assert_polyak(before, algo.target_policy, algo.policy, 0.25)


def test_hard_target_update_every_interval() -> None:
    algo = dqn(critic={"tau": 1.0, "target_update_interval": 3})
    before = snapshot(algo.target_policy)
    run(algo, tiny_batch(), 2)
    for a, b in zip(before, snapshot(algo.target_policy), strict=True):
        assert torch.equal(a, b)
    run(algo, tiny_batch(), 1)
    for t, o in zip(algo.target_policy.parameters(), algo.policy.parameters(), strict=True):
        assert torch.equal(t, o)


def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clipping_keeps_direction(monkeypatch, "dqn", steps=2)


def test_recommendations_and_reload() -> None:
    algo = dqn()
    batch = tiny_batch()
    run(algo, batch, 3)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"head\.kind"):
        DQNConfig(head=HeadConfig(kind="dot"))
    with pytest.raises(ConfigError, match=r"critic\.target_update_interval"):
        QLearningConfig(target_update_interval=0)
    with pytest.raises(ConfigError, match=r"critic\.huber_delta"):
        QLearningConfig(huber_delta=0.0)
    with pytest.raises(ConfigError, match=r"critic\.tau"):
        QLearningConfig(tau=1.5)
