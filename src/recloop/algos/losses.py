"""The math of the algorithms as pure functions on tensors, each tested on hand-made values.

Shapes: B batch, M sampled negatives, N + 1 item slots (slot 0 is padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class _LogProbOf(torch.autograd.Function):
    """log softmax(l)[a] whose backward reuses the forward's softmax (δ_a − p) · g.

    ``log_softmax`` + ``nll_loss`` computes the exponentials twice (forward and backward)
    and zero-fills a one-hot gradient; with a catalogue-wide softmax that is a quarter of
    a REINFORCE step at DBRL's sizes.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, action: Tensor) -> Tensor:
        p = torch.softmax(logits, dim=1)  # (B, C)
        pa = p.gather(1, action.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(p, action)
        return pa.clamp_min(torch.finfo(p.dtype).tiny).log()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        p, action = ctx.saved_tensors
        # In place: p is needed by nothing else, and a (B, C) buffer less per head counts at
        # these sizes.  A second backward (retain_graph) fails loudly on the version check.
        out = p.mul_(grad.neg().unsqueeze(1))
        out.scatter_add_(1, action.unsqueeze(1), grad.unsqueeze(1))
        return out, None


def log_prob_of(logits: Tensor, action: Tensor) -> Tensor:
    """log softmax(logits)[b, action[b]] for each row: (B, C), (B,) → (B,).

    One entry per row.  DBRL's ``all_logp[:, action]`` indexes a (B, B) matrix instead, so
    row b is scored against every other row's action.  The value is floored at the log of
    the smallest normal float (about −87 in float32), where π has underflowed anyway; the
    gradient δ_a − softmax(logits) is exact.
    """
    out: Tensor = _LogProbOf.apply(logits, action)
    return out


def importance_weight(logp: Tensor, beta_logp: Tensor, *, cap: float | None) -> Tensor:
    """min(π(a|s) / β(a|s), cap), detached; ones when ``cap`` is None.  Shapes (B,).

    Chen et al. (WSDM 2019), section 4.2: the off-policy correction of REINFORCE with the
    capped ratio of the policy to the behaviour (logging) policy.
    """
    if cap is None:
        return torch.ones_like(logp).detach()
    return torch.exp(logp.detach() - beta_logp.detach()).clamp(max=cap)


def topk_multiplier(logp: Tensor, *, top_k: int) -> Tensor:
    """λ_K(s, a) = K (1 − π(a|s))^(K − 1), detached; ones when K = 1.  Shapes (B,).

    Chen et al. (WSDM 2019), eq. 8: the gradient of the probability that ``a`` appears in
    a top-K slate sampled with replacement, α = 1 − (1 − π)^K, is λ_K ∇ log π.
    """
    if top_k == 1:
        return torch.ones_like(logp).detach()
    p = logp.detach().exp()
    return top_k * (1.0 - p).pow(top_k - 1)


@dataclass(frozen=True)
class OffPolicyTerms:
    """The REINFORCE loss and the per-row factors that scaled it."""

    loss: Tensor  # () scalar, differentiable through logp
    weight: Tensor  # (B,) importance weight min(π/β, cap), detached
    lambda_k: Tensor  # (B,) top-K multiplier, detached


def topk_off_policy_loss(
    *,
    logp: Tensor,
    beta_logp: Tensor,
    returns: Tensor,
    top_k: int,
    weight_cap: float | None,
) -> OffPolicyTerms:
    """−mean(w · λ_K · G · log π(a|s)), shapes (B,).  Chen et al. (WSDM 2019), eq. 6 and 8.

    ``w = min(π/β, cap)`` (off when ``weight_cap`` is None) and ``λ_K`` (off when
    ``top_k`` is 1) are constants of the gradient: only ``log π`` carries it.
    """
    weight = importance_weight(logp, beta_logp, cap=weight_cap)
    lam = topk_multiplier(logp, top_k=top_k)
    loss = -(weight * lam * returns * logp).mean()
    return OffPolicyTerms(loss=loss, weight=weight, lambda_k=lam)


def rewarded_cross_entropy(logp: Tensor, reward: Tensor) -> Tensor:
    """−mean log π(a|s) over the rows whose logged action was rewarded (reward > 0), 0 in a
    batch without one; shapes (B,) → ().  The supervised next-item loss on the clicks, added
    to REINFORCE as its ``+CE`` variant (cf. the supervised head of SQN, Xin et al. 2020)."""
    rewarded = (reward > 0).to(logp.dtype)
    return -(logp * rewarded).sum() / rewarded.sum().clamp(min=1.0)


def scale_returns(returns: Tensor, *, mode: str, eps: float = 1e-8) -> Tensor:
    """Discounted returns (B,) rescaled within the batch.

    ``none`` keeps them (the paper); ``mean`` divides by the batch mean of |G|, which keeps
    the relative weights but makes the step size independent of the discount and session
    length; ``std`` standardises (G − mean) / std, a baseline that pushes below-average
    actions down.
    """
    if mode == "none":
        return returns
    if mode == "mean":
        return returns / returns.abs().mean().clamp(min=eps)
    if mode == "std":
        if returns.shape[0] < 2:
            return returns - returns.mean()
        return (returns - returns.mean()) / returns.std().clamp(min=eps)
    raise ValueError(f"unknown returns scaling {mode!r} (expected none, mean or std)")


def sampled_log_prob(*, pos_logit: Tensor, neg_logits: Tensor, accidental: Tensor) -> Tensor:
    """Sampled-softmax estimate of log π(a|s), (B,).

    ``pos_logit`` (B,) is the logged item's logit l_a.  ``neg_logits`` (B, M) are the logits
    of M negatives drawn from a proposal Q, already corrected by the log of their expected
    count, l_j − log M·Q(j), so that Σ_j exp(l_j − log M·Q(j)) estimates the partition
    function without bias (importance sampling, Bengio & Senécal 2008; the logQ correction
    of Yi et al., RecSys 2019).  Negatives equal to the row's positive (``accidental``
    (B, M) bool) are dropped because the positive enters exactly:

        log π̂(a|s) = l_a − log( exp(l_a) + Σ_j exp(l_j − log M·Q(j)) )

    It converges to the full log-softmax as M grows, so it can stand in for log π in the
    importance weight and the top-K multiplier, not only in the gradient.
    """
    neg = neg_logits.masked_fill(accidental, float("-inf"))
    return pos_logit - torch.logaddexp(pos_logit, torch.logsumexp(neg, dim=1))
