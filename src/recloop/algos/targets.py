"""TD targets and losses of the actor-critic and value-based algorithms, as pure functions.

Shapes: B batch, N actions (real items only, the padding slot already removed), n sampled
actions per state, D action dimension.  ``done`` is a (B,) bool tensor; every target is the
one-step y = r + γ (1 − done) V(s').
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def td_target(*, reward: Tensor, done: Tensor, next_value: Tensor, gamma: float) -> Tensor:
    """y = r + γ (1 − d) V(s'); all (B,)."""
    return reward + gamma * (~done).to(reward.dtype) * next_value


def clipped_double_q_target(
    *, reward: Tensor, done: Tensor, q1_next: Tensor, q2_next: Tensor, gamma: float
) -> Tensor:
    """y = r + γ (1 − d) min(Q1'(s', a'), Q2'(s', a')); (B,) each.  Fujimoto et al. 2018, eq. 10."""
    return td_target(
        reward=reward, done=done, next_value=torch.minimum(q1_next, q2_next), gamma=gamma
    )


def smooth_target_action(
    action: Tensor, noise: Tensor, *, noise_clip: float, bound: float | None
) -> Tensor:
    """TD3's target policy smoothing: a' = clip(π'(s') + clip(ε, −c, c), −bound, bound).

    ``action`` and ``noise`` (B, D), ε already scaled by its standard deviation; ``bound``
    None leaves the action unbounded.  Fujimoto et al. 2018, eq. 14.
    """
    out = action + noise.clamp(-noise_clip, noise_clip)
    return out.clamp(-bound, bound) if bound is not None else out


def bcq_soft_clipped_target(
    *, reward: Tensor, done: Tensor, q1_next: Tensor, q2_next: Tensor, lam: float, gamma: float
) -> Tensor:
    """y = r + γ (1 − d) max_i [λ min(Q1', Q2') + (1 − λ) max(Q1', Q2')](s', a_i).

    ``q1_next``, ``q2_next`` (B, n): target critics at the n perturbed sampled actions.
    Fujimoto, Meger & Precup 2019, eq. 13.
    """
    soft = lam * torch.minimum(q1_next, q2_next) + (1.0 - lam) * torch.maximum(q1_next, q2_next)
    return td_target(reward=reward, done=done, next_value=soft.amax(dim=1), gamma=gamma)


def vae_loss(
    *, recon: Tensor, target: Tensor, mean: Tensor, log_std: Tensor, kl_weight: float
) -> Tensor:
    """MSE(recon, target) + kl_weight · KL(N(μ, σ²) ‖ N(0, 1)), both averaged over elements.

    ``recon``/``target`` (B, D), ``mean``/``log_std`` (B, L).  BCQ's generator loss
    (Fujimoto et al. 2019, eq. 28, with the reference code's weight 0.5 on the KL term).
    """
    kl = -0.5 * (1.0 + 2.0 * log_std - mean.pow(2) - (2.0 * log_std).exp()).mean()
    return F.mse_loss(recon, target) + kl_weight * kl


def td3_bc_lambda(q: Tensor, *, alpha: float) -> Tensor:
    """λ = α / mean|Q| over the batch, a constant of the gradient; ``q`` (B,) → ().

    TD3+BC (Fujimoto & Gu 2021, eq. 4) with Q = Q(s, π(s)), the critic at the actor's
    actions, as in the authors' code.  Floored at 1e-6 so that an all-zero critic does not
    divide by zero.
    """
    return alpha / q.detach().abs().mean().clamp(min=1e-6)


def td3_bc_actor_loss(*, q_pi: Tensor, bc: Tensor, alpha: float) -> Tensor:
    """−λ · mean Q(s, π(s)) + BC with λ = α / mean|Q(s, π(s))|; ``q_pi`` (B,), ``bc`` ().

    TD3+BC (Fujimoto & Gu 2021, eq. 3-4): π = argmax E[λ Q(s, π(s)) − (π(s) − a)²].
    """
    return bc_regularised(-q_pi.mean(), q=q_pi, bc=bc, alpha=alpha)


def bc_regularised(objective: Tensor, *, q: Tensor, bc: Tensor, alpha: float) -> Tensor:
    """λ · objective + bc, λ = α / mean|q| (detached): TD3+BC's weighting for any actor
    objective whose scale is that of the Q-values ``q`` (B,) (SAC's E[α log π − Q])."""
    return td3_bc_lambda(q, alpha=alpha) * objective + bc


def dqn_target(*, reward: Tensor, done: Tensor, q_next_target: Tensor, gamma: float) -> Tensor:
    """y = r + γ (1 − d) max_a Q'(s', a); ``q_next_target`` (B, N).  Mnih et al. 2015."""
    return td_target(reward=reward, done=done, next_value=q_next_target.amax(dim=1), gamma=gamma)


def double_dqn_target(
    *, reward: Tensor, done: Tensor, q_next_online: Tensor, q_next_target: Tensor, gamma: float
) -> Tensor:
    """y = r + γ (1 − d) Q'(s', argmax_a Q(s', a)); (B, N) each.  van Hasselt et al. 2016."""
    best = q_next_online.argmax(dim=1, keepdim=True)
    return td_target(
        reward=reward,
        done=done,
        next_value=q_next_target.gather(1, best).squeeze(1),
        gamma=gamma,
    )


def cql_penalty(q: Tensor, action: Tensor) -> Tensor:
    """mean(logsumexp_a Q(s, a) − Q(s, a_data)); ``q`` (B, N), ``action`` (B,) in 0..N-1.

    The CQL(H) regulariser of Kumar et al. 2020, eq. 4, for discrete actions.
    """
    return (torch.logsumexp(q, dim=1) - q.gather(1, action.unsqueeze(1)).squeeze(1)).mean()


def bcq_eligible(log_prob: Tensor, threshold: float | Tensor) -> Tensor:
    """G(a|s) / max_a G(a|s) > τ, in log space; (B, N) log-probabilities → (B, N) bool.

    Strict, as in the authors' discrete BCQ (``imt / imt.max(1)[0] > threshold``): an action
    exactly at the threshold is not eligible.  The serving head applies the same rule
    (:meth:`recloop.artifacts.heads_bcq.BCQDiscreteHead.eligible`).
    """
    thr = torch.as_tensor(threshold, dtype=log_prob.dtype, device=log_prob.device)
    return log_prob - log_prob.amax(dim=1, keepdim=True) > torch.log(thr)


def bcq_discrete_target(
    *,
    reward: Tensor,
    done: Tensor,
    q_next_online: Tensor,
    q_next_target: Tensor,
    eligible_next: Tensor,
    gamma: float,
) -> Tensor:
    """y = r + γ (1 − d) Q'(s', argmax_{a eligible} Q(s', a)); (B, N) each, ``eligible`` bool.

    Fujimoto et al. 2019, "Benchmarking Batch Deep RL Algorithms", eq. 5 (a double-DQN
    target restricted to actions the behaviour model deems likely).
    """
    masked = q_next_online.masked_fill(~eligible_next, float("-inf"))
    return double_dqn_target(
        reward=reward, done=done, q_next_online=masked, q_next_target=q_next_target, gamma=gamma
    )


def sac_discrete_target(
    *,
    reward: Tensor,
    done: Tensor,
    log_prob_next: Tensor,
    q1_next: Tensor,
    q2_next: Tensor,
    alpha: Tensor | float,
    gamma: float,
) -> Tensor:
    """y = r + γ (1 − d) Σ_a π(a|s') [min(Q1', Q2')(s', a) − α log π(a|s')].

    The expectation over actions replaces SAC's sampled next action; (B, N) each.
    Christodoulou 2019, eq. 10.
    """
    probs = log_prob_next.exp()
    v = (probs * (torch.minimum(q1_next, q2_next) - alpha * log_prob_next)).sum(dim=1)
    return td_target(reward=reward, done=done, next_value=v, gamma=gamma)


def sac_discrete_policy_loss(*, log_prob: Tensor, q: Tensor, alpha: Tensor | float) -> Tensor:
    """mean_s Σ_a π(a|s) [α log π(a|s) − Q(s, a)]; (B, N) each.  Christodoulou 2019, eq. 12."""
    return (log_prob.exp() * (alpha * log_prob - q)).sum(dim=1).mean()


def alpha_loss(*, log_alpha: Tensor, entropy: Tensor, target_entropy: float) -> Tensor:
    """J(α) = mean[α (H(π(·|s)) − H̄)], minimised over log α.

    Lowers α when the policy's entropy ``entropy`` (B,) is above the target H̄, raises it when
    below.  Haarnoja et al. 2018b, eq. 18 (continuous, with H = −log π(a|s) of a sampled
    action); Christodoulou 2019, eq. 11 (discrete, with the exact entropy).  α itself (not
    log α) multiplies, as in the papers.
    """
    return (log_alpha.exp() * (entropy.detach() - target_entropy)).mean()


def discrete_target_entropy(n_actions: int, *, scale: float) -> float:
    """H̄ = −scale · log(1 / |A|) = scale · log |A| (Christodoulou 2019 uses scale 0.98)."""
    return -scale * math.log(1.0 / n_actions)


def tanh_gaussian_log_prob(pre_tanh: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log π(a|s) of a = tanh(u), u ~ N(μ, σ²), summed over D: (B, D) each → (B,).

    log N(u; μ, σ) − Σ log(1 − tanh(u)²), with the stable form
    log(1 − tanh(u)²) = 2 (log 2 − u − softplus(−2u)).  Haarnoja et al. 2018, appendix C.
    """
    normal = (
        -0.5 * ((pre_tanh - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    )
    squash = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (normal - squash).sum(dim=-1)
