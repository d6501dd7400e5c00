"""The losses of SQN and SA2C as pure functions on tensors, each tested on hand-made values.

Xin et al., "Self-Supervised Reinforcement Learning for Recommender Systems" (SIGIR 2020)
and "Supervised Advantage Actor-Critic for Recommender Systems" (WSDM 2022).  The TD terms
follow TRFL's ``double_qlearning`` that the papers' code calls: 0.5 (y − Q(s, a))² per row.

Shapes: B batch, M sampled negative actions, N real items.  Q-value tensors here have one
column per real item (column j is item j + 1); actions are item indices 1..N.
"""

from __future__ import annotations

import torch
from torch import Tensor


def double_q_target(
    *, reward: Tensor, done: Tensor, q_next_online: Tensor, q_next_target: Tensor, gamma: float
) -> Tensor:
    """(B,) y = r + γ (1 − d) Q'(s', argmax_a Q(s', a)) (van Hasselt et al. 2016).

    ``q_next_online`` (B, N) chooses the next action, ``q_next_target`` (B, N) values it;
    ``done`` (B,) bool is True only at a real session end (a truncation bootstraps).
    Detached: the target is a constant of the gradient.
    """
    best = q_next_online.detach().argmax(dim=1, keepdim=True)  # (B, 1)
    value = q_next_target.detach().gather(1, best).squeeze(1)  # (B,)
    return reward + gamma * (~done).to(value.dtype) * value


def td_loss(q: Tensor, target: Tensor) -> Tensor:
    """0.5 (y − q)² elementwise (TRFL's ``double_qlearning`` loss); same shape as ``q``."""
    return 0.5 * (target.detach() - q).pow(2)


def q_of(q_values: Tensor, actions: Tensor) -> Tensor:
    """Q(s, a) of item indices ``actions`` (B,) or (B, M) from (B, N) → same shape as actions."""
    index = actions.unsqueeze(1) if actions.dim() == 1 else actions
    out = q_values.gather(1, index - 1)
    return out.squeeze(1) if actions.dim() == 1 else out


def negative_td_loss(*, q_neg: Tensor, target: Tensor) -> Tensor:
    """(B,) Σ_j 0.5 (y_neg − Q(s, a_j⁻))² over the M sampled negatives of each row.

    ``q_neg`` (B, M); ``target`` (B,) is the negatives' shared TD target: a negative item
    was not interacted with, so the state does not move, y_neg = r⁻ + γ Q'(s, argmax Q(s, ·))
    with the *current* state s (:func:`double_q_target` on Q(s, ·), ``done`` False).  The
    papers' code sums, not averages, the M terms.
    """
    return td_loss(q_neg, target.unsqueeze(1)).sum(dim=1)


def sampled_advantage(
    *, q_pos: Tensor, q_neg: Tensor, clip_min: float | None, clip_max: float
) -> Tensor:
    """(B,) A(s, a) = Q(s, a) − mean(Q(s, a), Q(s, a_1⁻), ..., Q(s, a_M⁻)), detached.

    The mean over the positive and its M sampled negatives estimates the state value
    (SA2C, section 4.2).  With ``clip_min`` not None, A is clipped to [clip_min, clip_max]
    (the papers' code: ``clip_by_value(A, clip, 10)`` with clip = 0, so a logged item the
    critic values below average gets no supervised push at all).
    """
    q_pos = q_pos.detach()
    mean = (q_pos + q_neg.detach().sum(dim=1)) / (1 + q_neg.shape[1])
    adv = q_pos - mean
    if clip_min is not None:
        adv = adv.clamp(min=clip_min, max=clip_max)
    return adv


def normalise_advantage(adv: Tensor, *, mode: str, eps: float = 1e-8) -> Tensor:
    """``none``: A as it is (the papers); ``mean``: A / mean(|A|) over the batch, so the
    weighted cross-entropy keeps the scale of the warm-up's plain one whatever the scale of
    the Q-values (rewards, γ)."""
    if mode == "none":
        return adv
    if mode == "mean":
        return adv / adv.abs().mean().clamp(min=eps)
    raise ValueError(f"unknown advantage normalisation {mode!r} (expected none or mean)")


def sample_negatives(
    action: Tensor, *, n_items: int, num: int, generator: torch.Generator | None = None
) -> Tensor:
    """(B, M) item indices drawn uniformly from 1..N without the row's own ``action`` (B,).

    Draw from the N − 1 other items and shift those at or above the action up by one: the
    papers' rejection loop (``while neg == action: redraw``) in one vectorised step.
    """
    b = action.shape[0]
    draw = torch.randint(1, n_items, (b, num), device=action.device, generator=generator)  # 1..N-1
    return draw + (draw >= action.unsqueeze(1)).to(draw.dtype)
