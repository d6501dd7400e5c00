"""Continuous BCQ: generator, critics and perturbation learn; targets move by τ; the serving
head is the decoder at z = 0 plus a perturbation bounded by Φ."""

from __future__ import annotations

import pytest
import torch
from actor_critic_helpers import (
    N_ITEMS,
    B,
    D,
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

from recloop.algos.bcq import BCQ, BCQConfig
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.heads_bcq import BCQHead
from recloop.errors import ConfigError


def bcq(**over: object) -> BCQ:
    algo = make("bcq", **over)
    assert isinstance(algo, BCQ)
    return algo


def test_generator_and_critic_losses_fall_on_a_fixed_batch() -> None:
    stats = run(bcq(lr=1e-2), tiny_batch(), 40)
    for key in ("critic_loss", "generator_loss"):
        first, last = first_last(stats, key)
        assert last < 0.5 * first, key


def test_perturbation_ascends_a_fixed_critic() -> None:
    stats = run(bcq(lr=1e-2, critic={"lr": 1e-9}, phi=0.5), tiny_batch(), 20)
    first, last = first_last(stats, "actor_loss")
    assert last < first


def test_targets_move_by_tau_after_one_update() -> None:
    algo = bcq(critic={"tau": 0.2})
    before_p, before_c = snapshot(algo.target_policy), snapshot(algo.target_critic)
    run(algo, tiny_batch(), 1)
    assert_polyak(before_p, algo.target_policy, algo.policy, 0.2)
    assert_polyak(before_c, algo.target_critic, algo.critic, 0.2)


def test_gradient_clipping_keeps_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clipping_keeps_direction(monkeypatch, "bcq", steps=2)


def test_serving_action_is_the_decoder_at_zero_plus_a_bounded_perturbation() -> None:
    algo = bcq(phi=0.05)
    run(algo, tiny_batch(), 5)
    head = algo.head
    state = torch.randn(B, algo.policy.encoder.state_dim)
    decoded = head.decode(state, torch.zeros(B, head.latent_dim))
    served = head.action(state)
    assert served.shape == (B, D)
    gap = (served - decoded).abs()
    assert gap.max() <= 0.05 + 1e-6 and gap.max() > 0


def test_bounded_action_range() -> None:
    algo = bcq(head=HeadConfig(kind="bcq", hidden_dims=(16,), bound_action=True), phi=0.5)
    with torch.no_grad():
        a = algo.head.action(torch.randn(B, algo.policy.encoder.state_dim) * 10)
    assert a.abs().max() <= 1.0


def test_latent_samples_are_clipped() -> None:
    algo = bcq()
    z = algo._latent(1000, like=torch.zeros(1))
    assert z.shape == (1000, algo.head.latent_dim)
    assert z.abs().max() <= 0.5 and (z.abs() == 0.5).any()


def test_phi_is_a_saved_buffer_and_the_policy_reloads() -> None:
    algo = bcq(phi=0.2)
    batch = tiny_batch()
    run(algo, batch, 3)
    assert isinstance(algo.policy.head, BCQHead)
    assert algo.policy.state_dict()["head.phi"].item() == pytest.approx(0.2)
    assert_recommendations(algo, batch)
    assert_policy_reloads(algo, batch)


def test_state_is_encoded_once_for_n_samples() -> None:
    # the state-action MLPs broadcast one state over the n sampled actions
    algo = bcq()
    s = torch.randn(3, algo.policy.encoder.state_dim)
    a = torch.randn(3, 4, D)
    q_many = algo.critic.q1(s, a)
    q_each = torch.stack([algo.critic.q1(s, a[:, i]) for i in range(4)], dim=1)
    torch.testing.assert_close(q_many, q_each)
    assert N_ITEMS > 0


def test_bc_regulariser_trains_the_decoder_towards_the_logged_items() -> None:
    stats = run(bcq(lr=1e-2, bc={"alpha": 1.0}), tiny_batch(), 30)
    first, last = first_last(stats, "generator_loss")
    assert last < first


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match=r"head\.kind"):
        BCQConfig(head=HeadConfig(kind="dot"))
    with pytest.raises(ConfigError, match="lam"):
        BCQConfig(lam=1.5)
    with pytest.raises(ConfigError, match="n_samples"):
        BCQConfig(n_samples=0)
    with pytest.raises(ConfigError, match="phi"):
        BCQConfig(phi=-0.1)


def test_critics_are_trained_on_the_logged_action_embedding() -> None:
    algo = bcq()
    batch = tiny_batch()
    with torch.no_grad():
        s = algo.policy.state(batch.user, batch.history, batch.history_reward)
        expected = algo.critic.q1(s, algo.policy.item_embedding.weight[batch.action]).mean()
    # the generator step runs first and moves the encoder: compare with its lr at ~0
    algo.generator_opt.param_groups[0]["lr"] = 0.0
    stats = algo.update(batch)
    torch.testing.assert_close(torch.as_tensor(stats.q), expected)
