"""SAC, discrete (Christodoulou 2019) and continuous (Haarnoja et al. 2018)."""

from __future__ import annotations

import math

import pytest
import torch
from actor_critic_helpers import (
    N_ITEMS,
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

from recloop.algos.sac import SACConfig, SACContinuous, SACContinuousConfig, SACDiscrete
from recloop.artifacts.heads import HeadConfig
from recloop.data.batch import TransitionBatch
from recloop.errors import ConfigError


@pytest.mark.parametrize("name", ["sac", "sac_continuous"])
def test_critic_loss_falls_on_a_fixed_batch(name: str) -> None:
    stats = run(make(name, lr=1e-2, autotune_alpha=False, init_alpha=0.01), tiny_batch(), 30)
    first, last = first_last(stats, "critic_loss")
    assert last < 0.3 * first


@pytest.mark.parametrize("name", ["sac", "sac_continuous"])
def test_policy_loss_falls_against_a_fixed_critic(name: str) -> None:
    # a small fixed α: the policy loss is then mostly −Q of a (barely moving) critic
    algo = make(name, lr=1e-2, critic={"lr": 1e-9}, autotune_alpha=False, init_alpha=1e-3, bc=None)
    stats = run(algo, tiny_batch(), 20)
    first, last = first_last(stats, "policy_loss")
    assert last < first


def policy_q(algo: SACDiscrete | SACContinuous, batch: TransitionBatch) -> float:
    """Mean min-Q of the policy's action: E_π min Q (discrete), min Q(s, tanh μ(s))."""
    with torch.no_grad():
        s = algo.policy.state(batch.user, batch.history, batch.history_reward)
        if isinstance(algo, SACDiscrete):
            q1, q2 = algo.critic(s)
            pi = torch.softmax(algo._log_policy(s), dim=1)
            return float((pi * torch.minimum(q1, q2)[:, 1:]).sum(1).mean())
        return float(torch.minimum(*algo.critic(s, algo.actor.action(s))).mean())


@pytest.mark.parametrize("name", ["sac", "sac_continuous"])
def test_with_bc_the_policy_still_ascends_a_fixed_critic(name: str) -> None:
    # −λQ is bounded by α, so the loss need not fall; the critic's value of the policy must
    # rise when α weighs the critic far above the BC term
    algo = make(
        name,
        lr=1e-2,
        critic={"lr": 1e-9},
        autotune_alpha=False,
        init_alpha=1e-3,
        bc={"alpha": 100.0},
    )
    assert isinstance(algo, SACDiscrete | SACContinuous)
    batch = tiny_batch()
    before = policy_q(algo, batch)
    run(algo, batch, 20)
    assert policy_q(algo, batch) > before


def test_discrete_alpha_falls_while_the_entropy_is_above_target() -> None:
    algo = make("sac", alpha_lr=1e-2, target_entropy_scale=0.5)
    assert isinstance(algo, SACDiscrete)
    assert algo.temperature.target_entropy == pytest.approx(0.5 * math.log(N_ITEMS))
    stats = run(algo, tiny_batch(), 5)
    assert all(s["entropy"] > algo.temperature.target_entropy for s in stats)
    assert stats[-1]["alpha"] < stats[0]["alpha"] == pytest.approx(1.0)


def test_continuous_alpha_rises_while_the_entropy_is_below_target() -> None:
    algo = make("sac_continuous", alpha_lr=1e-2)
    assert isinstance(algo, SACContinuous)
    algo.temperature.target_entropy = 1e3  # far above any entropy of a D-dim tanh-Gaussian
    stats = run(algo, tiny_batch(), 5)
    assert stats[-1]["alpha"] > stats[0]["alpha"]


def test_fixed_alpha_stays() -> None:
    stats = run(make("sac", autotune_alpha=False, init_alpha=0.3), tiny_batch(), 3)
    assert all(s["alpha"] == pytest.approx(0.3) for s in stats)


@pytest.mark.parametrize("name", ["sac", "sac_continuous"])
def test_target_critics_move_by_tau(name: str) -> None:
    algo = make(name, critic={"tau": 0.3})
    assert isinstance(algo, SACDiscrete | SACContinuous)
    before = snapshot(algo.target_critic)
    run(algo, tiny_batch(), 1)
    assert_polyak(before, algo.target_critic, algo.critic, 0.3)


@pytest.mark.parametrize("name", ["sac", "sac_continuous"])
def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    assert_clipping_keeps_direction(monkeypatch, name, steps=2)


def test_continuous_serving_is_the_tanh_of_the_mean() -> None:
    algo = make("sac_continuous")
    assert isinstance(algo, SACContinuous)
    s = torch.randn(4, algo.policy.encoder.state_dim)
    torch.testing.assert_close(algo.actor.action(s), torch.tanh(algo.actor.net(s)))


@pytest.mark.parametrize("name", ["sac", "sac_continuous"])
def test_recommendations_and_reload(name: str) -> None:
    algo = make(name)
    batch = tiny_batch()
    run(algo, batch, 3)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)
    assert "temperature" in algo.networks() and "alpha" in algo.optimizers()


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"head\.kind"):
        SACConfig(head=HeadConfig(kind="dot"))
    with pytest.raises(ConfigError, match="target_entropy_scale"):
        SACConfig(target_entropy_scale=0.0)
    with pytest.raises(ConfigError, match="bound_action"):
        SACContinuousConfig(head=HeadConfig(kind="dot", bound_action=False))
    with pytest.raises(ConfigError, match="init_alpha"):
        SACContinuousConfig(init_alpha=0.0)
