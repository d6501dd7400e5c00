"""TD3: twin critics learn, the actor and the targets move only every policy_delay updates."""

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

from recloop.algos.td3 import TD3, TD3Config
from recloop.artifacts.heads import HeadConfig
from recloop.errors import ConfigError


def td3(**over: object) -> TD3:
    algo = make("td3", **over)
    assert isinstance(algo, TD3)
    return algo


def test_critic_loss_falls_on_a_fixed_batch() -> None:
    stats = run(td3(lr=1e-2), tiny_batch(), 30)
    first, last = first_last(stats, "critic_loss")
    assert last < 0.2 * first


def test_actor_ascends_a_fixed_critic() -> None:
    stats = run(td3(lr=1e-2, critic={"lr": 1e-9}, policy_delay=1), tiny_batch(), 20)
    first, last = first_last(stats, "actor_loss")
    assert last < first


def test_delayed_actor_and_target_updates_by_tau() -> None:
    algo = td3(critic={"tau": 0.1}, policy_delay=2)
    batch = tiny_batch()
    policy0, target_p0, target_c0 = (
        snapshot(algo.policy),
        snapshot(algo.target_policy),
        snapshot(algo.target_critic),
    )
    run(algo, batch, 1)  # critic only
    for a, b in zip(policy0, snapshot(algo.policy), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(target_c0, snapshot(algo.target_critic), strict=True):
        assert torch.equal(a, b)
    run(algo, batch, 1, seed=1)  # actor + targets
    assert any(not torch.equal(a, b) for a, b in zip(policy0, snapshot(algo.policy), strict=True))
    assert_polyak(target_p0, algo.target_policy, algo.policy, 0.1)
    assert_polyak(target_c0, algo.target_critic, algo.critic, 0.1)


def test_target_smoothing_keeps_the_target_action_in_range() -> None:
    # with bounded actions the smoothed target action never leaves [-1, 1]
    algo = td3(policy_noise=5.0, noise_clip=3.0)
    calls: list[torch.Tensor] = []
    real = algo.target_critic.forward

    def spy(state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(action)
        return real(state, action)

    algo.target_critic.forward = spy  # type: ignore[method-assign]
    run(algo, tiny_batch(), 1)
    assert calls and calls[0].abs().max() <= 1.0


def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clipping_keeps_direction(monkeypatch, "td3", steps=2, policy_delay=1)


def test_recommendations_and_reload() -> None:
    algo = td3()
    batch = tiny_batch()
    run(algo, batch, 4)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"head\.kind"):
        TD3Config(head=HeadConfig(kind="linear"))
    with pytest.raises(ConfigError, match="policy_delay"):
        TD3Config(policy_delay=0)
    with pytest.raises(ConfigError, match="noise_clip"):
        TD3Config(noise_clip=-1.0)
