"""Top-K ranking metrics over a hit matrix, with RecBole's definitions.

Every metric is a pure function ``(hits, n_targets, k) -> (M,)`` per-user values:

- ``hits`` (M, K) bool: ``hits[i, j]`` is True when the item ranked ``j + 1`` for user ``i``
  is one of the user's targets; only the first ``k`` columns are read (``K >= k``);
- ``n_targets`` (M,) int: how many distinct target items user ``i`` has (>= 1).

The definitions follow RecBole's ``recbole.evaluator.metrics`` (Zhao et al., "RecBole: Towards
a Unified, Comprehensive and Efficient Framework for Recommendation Algorithms", CIKM 2021):
HR@K, Recall@K, Precision@K, NDCG@K with binary relevance and an ideal DCG of
``min(n_targets, K)`` hits, MRR@K of the first hit, and MAP@K normalised by
``min(n_targets, K)``.  Reports average them over users.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Metric = Callable[[Tensor, Tensor, int], Tensor]
"""``(hits (M, K) bool, n_targets (M,), k) -> (M,) float64`` per-user values at cut-off k."""


def _top(hits: Tensor, k: int) -> Tensor:
    if hits.dim() != 2 or hits.shape[1] < k:
        raise ValueError(f"hits must be (M, K) with K >= k={k}, got shape {tuple(hits.shape)}")
    return hits[:, :k].to(torch.float64)


def _positions(k: int, device: torch.device) -> Tensor:
    return torch.arange(1, k + 1, dtype=torch.float64, device=device)


def hit_rate(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """HR@k: 1 when any target is among the top k, else 0."""
    return (_top(hits, k).sum(1) > 0).to(torch.float64)


def recall(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """Recall@k: hits in the top k over the number of targets."""
    return _top(hits, k).sum(1) / n_targets.to(torch.float64)


def precision(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """Precision@k: hits in the top k over k."""
    return _top(hits, k).sum(1) / k


def ndcg(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """NDCG@k: sum of 1/log2(rank + 1) over hits, over the same sum for ranks 1..min(|T|, k)."""
    h = _top(hits, k)
    discount = 1.0 / torch.log2(_positions(k, h.device) + 1.0)  # (k,)
    dcg = (h * discount).sum(1)
    ideal = torch.cumsum(discount, 0)[n_targets.clamp(1, k).long() - 1]
    return dcg / ideal


def mrr(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """MRR@k: 1 / rank of the first hit within the top k, 0 without a hit."""
    h = _top(hits, k)
    first = h.argmax(1).to(torch.float64)  # index of the first maximum, i.e. the first hit
    return torch.where(h.sum(1) > 0, 1.0 / (first + 1.0), torch.zeros_like(first))


def average_precision(hits: Tensor, n_targets: Tensor, k: int) -> Tensor:
    """MAP@k (per user): sum over hit ranks i <= k of precision@i, over min(|T|, k)."""
    h = _top(hits, k)
    prec = torch.cumsum(h, 1) / _positions(k, h.device)
    return (prec * h).sum(1) / n_targets.clamp(max=k).to(torch.float64)


METRICS: dict[str, Metric] = {
    "hr": hit_rate,
    "recall": recall,
    "precision": precision,
    "ndcg": ndcg,
    "mrr": mrr,
    "map": average_precision,
}
"""Metric name (as in report keys ``name@k``) → function."""
