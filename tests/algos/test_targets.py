"""TD targets and losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from recloop.algos.targets import (
    alpha_loss,
    bc_regularised,
    bcq_discrete_target,
    bcq_eligible,
    bcq_soft_clipped_target,
    clipped_double_q_target,
    cql_penalty,
    discrete_target_entropy,
    double_dqn_target,
    dqn_target,
    sac_discrete_policy_loss,
    sac_discrete_target,
    smooth_target_action,
    tanh_gaussian_log_prob,
    td3_bc_actor_loss,
    td3_bc_lambda,
    td_target,
    vae_loss,
)

R = torch.tensor([1.0, 0.5])
DONE = torch.tensor([False, True])


def close(a: torch.Tensor, b: list[float] | float) -> None:
    torch.testing.assert_close(a, torch.tensor(b, dtype=a.dtype), rtol=1e-5, atol=1e-6)


def test_td_target_masks_the_next_value_at_session_end() -> None:
    close(
        td_target(reward=R, done=DONE, next_value=torch.tensor([2.0, 7.0]), gamma=0.9), [2.8, 0.5]
    )


def test_clipped_double_q_target_takes_the_smaller_critic() -> None:
    y = clipped_double_q_target(
        reward=R,
        done=DONE,
        q1_next=torch.tensor([3.0, 1.0]),
        q2_next=torch.tensor([2.0, 9.0]),
        gamma=0.5,
    )
    close(y, [1.0 + 0.5 * 2.0, 0.5])


def test_bcq_soft_clipped_target_over_samples() -> None:
    q1 = torch.tensor([[1.0, 4.0, 2.0], [0.0, 0.0, 0.0]])
    q2 = torch.tensor([[3.0, 2.0, 2.0], [5.0, 5.0, 5.0]])
    # row 0: λ min + (1 − λ) max per sample with λ = 0.75: [1.5, 2.5, 2.0] → max 2.5
    y = bcq_soft_clipped_target(
        reward=R, done=torch.tensor([False, False]), q1_next=q1, q2_next=q2, lam=0.75, gamma=0.9
    )
    close(y, [1.0 + 0.9 * 2.5, 0.5 + 0.9 * (0.75 * 0.0 + 0.25 * 5.0)])


def test_bcq_soft_clipped_target_lambda_one_is_clipped_double_q() -> None:
    q1 = torch.tensor([[1.0, 4.0]])
    q2 = torch.tensor([[3.0, 2.0]])
    y = bcq_soft_clipped_target(
        reward=torch.zeros(1),
        done=torch.tensor([False]),
        q1_next=q1,
        q2_next=q2,
        lam=1.0,
        gamma=1.0,
    )
    close(y, [2.0])


def test_td3_smoothing_noise_is_clipped_then_the_action() -> None:
    a = torch.tensor([[0.9, 0.0, -0.2]])
    noise = torch.tensor([[0.3, -0.8, 0.1]])
    close(smooth_target_action(a, noise, noise_clip=0.5, bound=1.0), [[1.0, -0.5, -0.1]])
    close(smooth_target_action(a, noise, noise_clip=0.5, bound=None), [[1.2, -0.5, -0.1]])


def test_vae_loss_is_mse_plus_weighted_kl() -> None:
    recon, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])
    mean, log_std = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    # KL per element: ½(μ² + σ² − 1 − log σ²): [0.5, ½(4 − 1 − 2 log 2)]
    kl = (0.5 + 0.5 * (3.0 - 2 * math.log(2.0))) / 2
    close(
        vae_loss(recon=recon, target=target, mean=mean, log_std=log_std, kl_weight=0.5),
        0.5 + 0.5 * kl,
    )


def test_td3_bc_lambda_is_alpha_over_the_mean_absolute_q_and_a_constant() -> None:
    q = torch.tensor([2.0, -4.0], requires_grad=True)  # mean|q| = 3
    lam = td3_bc_lambda(q, alpha=2.5)
    close(lam, 2.5 / 3.0)
    assert not lam.requires_grad
    close(td3_bc_lambda(torch.zeros(3), alpha=2.5), 2.5e6)  # floored mean|Q|, no division by 0


def test_td3_bc_actor_loss_is_minus_lambda_q_plus_bc_with_lambda_detached() -> None:
    q = torch.tensor([2.0, -4.0], requires_grad=True)  # mean q = −1, λ = 2.5 / 3
    loss = td3_bc_actor_loss(q_pi=q, bc=torch.tensor(0.5), alpha=2.5)
    close(loss, 2.5 / 3.0 + 0.5)
    loss.backward()
    # λ is a constant of the gradient: d/dq_i (−λ mean q) = −λ / B for every i
    assert q.grad is not None
    close(q.grad, [-2.5 / 3.0 / 2.0, -2.5 / 3.0 / 2.0])


def test_bc_regularised_scales_by_q_and_adds_bc() -> None:
    q = torch.tensor([1.0, -3.0])  # mean|q| = 2
    objective, bc = torch.tensor(5.0), torch.tensor(0.5)
    close(bc_regularised(objective, q=q, bc=bc, alpha=4.0), 4.0 / 2.0 * 5.0 + 0.5)
    close(bc_regularised(objective, q=q, bc=bc, alpha=0.0), 0.5)  # α = 0: pure cloning


def test_dqn_and_double_dqn_targets() -> None:
    online = torch.tensor([[1.0, 5.0, 2.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([[4.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    close(dqn_target(reward=R, done=DONE, q_next_target=target, gamma=0.5), [1.0 + 0.5 * 4.0, 0.5])
    # double: argmax of the online net (item 1 in row 0), valued by the target (2.0)
    y = double_dqn_target(
        reward=R, done=DONE, q_next_online=online, q_next_target=target, gamma=0.5
    )
    close(y, [1.0 + 0.5 * 2.0, 0.5])


def test_cql_penalty_is_logsumexp_minus_the_data_action() -> None:
    q = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    a = torch.tensor([1, 0])
    # row 0: log(1 + 3) − log 3; row 1: 1 + log 2 − 1
    close(cql_penalty(q, a), ((math.log(4.0) - math.log(3.0)) + math.log(2.0)) / 2)


def test_bcq_eligibility_and_target() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.1, 0.4], [0.2, 0.2, 0.6]]))
    eligible = bcq_eligible(logp, 0.3)  # ratios to the max: [1, .2, .8] and [1/3, 1/3, 1]
    assert eligible.tolist() == [[True, False, True], [True, True, True]]
    online = torch.tensor([[1.0, 9.0, 2.0], [3.0, 0.0, 1.0]])
    target = torch.tensor([[10.0, 20.0, 30.0], [4.0, 5.0, 6.0]])
    y = bcq_discrete_target(
        reward=R,
        done=torch.tensor([False, False]),
        q_next_online=online,
        q_next_target=target,
        eligible_next=eligible,
        gamma=1.0,
    )
    # row 0: item 1 (Q 9) is not eligible → argmax among {0, 2} is 2 → Q' 30
    close(y, [31.0, 4.5])


def test_sac_discrete_target_is_the_soft_value_expectation() -> None:
    log_pi = torch.log(torch.tensor([[0.25, 0.75]]))
    q1, q2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 3.0]])
    alpha = 0.5
    v = 0.25 * (0.0 - alpha * math.log(0.25)) + 0.75 * (2.0 - alpha * math.log(0.75))
    y = sac_discrete_target(
        reward=torch.ones(1),
        done=torch.tensor([False]),
        log_prob_next=log_pi,
        q1_next=q1,
        q2_next=q2,
        alpha=alpha,
        gamma=0.9,
    )
    close(y, [1.0 + 0.9 * v])


def test_sac_discrete_policy_loss() -> None:
    log_pi = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.tensor([[1.0, 3.0]])
    close(sac_discrete_policy_loss(log_prob=log_pi, q=q, alpha=2.0), 2.0 * math.log(0.5) - 2.0)


def test_alpha_loss_gradient_lowers_alpha_above_the_target_entropy() -> None:
    log_alpha = torch.zeros((), requires_grad=True)
    loss = alpha_loss(log_alpha=log_alpha, entropy=torch.tensor([2.0, 4.0]), target_entropy=1.0)
    close(loss.detach(), 2.0)
    loss.backward()
    assert log_alpha.grad is not None and log_alpha.grad > 0  # gradient descent lowers α


def test_discrete_target_entropy() -> None:
    assert discrete_target_entropy(100, scale=0.98) == pytest.approx(0.98 * math.log(100))


def test_tanh_gaussian_log_prob_matches_the_change_of_variables() -> None:
    torch.manual_seed(0)
    mean, log_std = torch.randn(3, 2), torch.randn(3, 2) * 0.3
    u = mean + log_std.exp() * torch.randn(3, 2)
    normal = torch.distributions.Normal(mean, log_std.exp())
    expected = (normal.log_prob(u) - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
    torch.testing.assert_close(
        tanh_gaussian_log_prob(u, mean, log_std), expected, rtol=1e-4, atol=1e-4
    )


def test_bcq_eligibility_is_strict_at_the_threshold() -> None:
    # ratios to the max exactly 1, 0.5 and 0.25 (powers of two: exact in float32 log space);
    # the authors' discrete BCQ keeps imt / imt.max(1)[0] > τ, so a ratio of exactly τ is out
    logp = torch.log(torch.tensor([[1.0, 0.5, 0.25]]))
    assert bcq_eligible(logp, 0.5).tolist() == [[True, False, False]]
    assert bcq_eligible(logp, 0.25).tolist() == [[True, True, False]]
    assert bcq_eligible(logp, 0.0).tolist() == [[True, True, True]]  # τ = 0: every action
