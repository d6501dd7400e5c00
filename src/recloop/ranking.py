"""Top-k with a tie-break that favours no item: the one ranking rule of the whole project.

``torch.topk`` breaks ties by the lowest column.  Item indices are ranked by (training)
frequency, so the lowest index is the most popular item, and every tie — a constant scorer,
a popularity baseline whose counts tie, a model that saturates, masked items — silently
turns into a popularity ranking.  Worse, when held-out items never occur in training they
get indices of their own, and a tie-break by index can find them without any model.

Here ties are broken by a pseudo-random key per (row key, item): a 32-bit integer hash of
the row's key (the user index in evaluation and serving) and the item index, mixed with a
seed.  Keys differ between rows, so a constant scorer shows every user an independent
uniform sample of the tied items (the analytic random level of every ranking metric), and
they are reproducible: the same user, item set and seed always give the same list, on CPU
and CUDA alike, in evaluation, OPE, the simulator and the service.

Ordering: descending score, then ascending key.  NaN scores rank last (as ``-inf``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_MIX = 0x45D9F3B
"""Multiplier of a well-mixing 32-bit integer hash; below 2**27, so products fit in int64."""
_SEED_MIX = 0x7FEB352D
"""Odd multiplier below 2**31 that spreads the seed over the row keys."""
_ITEM_MIX = 0x27D4EB2F
"""Odd multiplier below 2**30 that spreads the item index before it meets the row's hash."""


def _mix32(x: Tensor) -> Tensor:
    """An avalanching 32-bit integer hash of int64 ``x`` in [0, 2**32), elementwise."""
    x = ((x >> 16) ^ x) * _MIX & _MASK
    x = ((x >> 16) ^ x) * _MIX & _MASK
    return (x >> 16) ^ x


def tie_keys(row_keys: Tensor, items: Tensor, *, seed: int = 0) -> Tensor:
    """Pseudo-random int64 keys in [0, 2**32) for (row, item) pairs.

    ``row_keys`` (B, 1) or (B,) int64 — one key per row, e.g. the user index — and ``items``
    (B, K) or (K,) int64 item indices broadcast against it; returns their broadcast shape.
    """
    if row_keys.dim() == 1 and items.dim() == 2:
        row_keys = row_keys[:, None]
    row = _mix32((row_keys.to(torch.int64) + (seed & _MASK) * _SEED_MIX) & _MASK)
    # Add, then mix: mixing the row and the item alike and XOR-ing them would cancel for
    # item == row (key 0, the first place) whenever the seed is 0.
    return _mix32((row + (items.to(torch.int64) & _MASK) * _ITEM_MIX) & _MASK)


@dataclass(frozen=True)
class TopK:
    """The k best columns of each row, best first."""

    values: Tensor  # (B, K) scores
    indices: Tensor  # (B, K) int64 columns


def topk(
    scores: Tensor, k: int, *, row_keys: Tensor, seed: int = 0, items: Tensor | None = None
) -> TopK:
    """Top ``k`` columns of ``scores`` (B, N) per row, ties broken by :func:`tie_keys`.

    ``row_keys`` (B,) int64 seeds each row's tie-break (users: the user index).  The columns
    chosen are exactly those of a sort by (score descending, key ascending); the cost is one
    ``torch.topk`` of k + 1 columns and a sort of k entries per row, plus a second ``topk``
    over the rows whose k-th score ties with a column left out.

    ``items`` (B, N) int64: the item index each column stands for, when the columns are a
    per-row candidate list (approximate retrieval) rather than the catalogue itself; the
    tie-break keys then come from the items, so a candidate ranks among its tied peers as
    it would in the full catalogue.  Default: column c is item c.
    """
    b, n = scores.shape
    k = min(k, n)
    if k == 0 or b == 0:
        empty = torch.zeros((b, k), dtype=torch.int64, device=scores.device)
        return TopK(values=scores[:, :k], indices=empty)
    row_keys = row_keys.to(device=scores.device, dtype=torch.int64)
    # One column more than asked: a tie at the boundary that leaves a column out shows as a
    # (k+1)-th score equal to the k-th (no full comparison pass over the scores needed).
    values, indices = torch.topk(scores, min(k + 1, n), dim=1)
    # torch.topk ranks NaN above everything, so a row holds a NaN iff its first value is
    # one: the common all-finite case costs no extra pass (and no (B, N) boolean) over the
    # scores, which at a million items was a full copy per request.
    if scores.is_floating_point() and bool(torch.isnan(values[:, 0]).any()):
        scores = scores.masked_fill(torch.isnan(scores), float("-inf"))
        values, indices = torch.topk(scores, min(k + 1, n), dim=1)
    tied_out = (
        values[:, k] == values[:, k - 1]
        if k < n
        else torch.zeros(b, dtype=torch.bool, device=scores.device)
    )  # (B,) boundary ties
    values, indices = values[:, :k], indices[:, :k]
    kth = values[:, -1:]  # (B, 1)
    if bool(tied_out.any()):
        rows = tied_out.nonzero().squeeze(1)
        sub, sub_kth = scores[rows], kth[rows]
        cols = torch.arange(n, device=scores.device)
        col_items = cols[None, :] if items is None else items[rows]
        keys = tie_keys(row_keys[rows], col_items, seed=seed).to(torch.float64)
        # Every column above the k-th score (priority 2) goes in; the tied ones fill the
        # remaining places in key order (priorities in (0.5, 1], distinct per key).
        priority = torch.where(
            sub > sub_kth,
            torch.full_like(keys, 2.0),
            torch.where(sub == sub_kth, 1.0 - keys / 2.0**33, torch.full_like(keys, -1.0)),
        )
        chosen = torch.topk(priority, k, dim=1).indices
        indices = indices.index_copy(0, rows, chosen)
        values = values.index_copy(0, rows, sub.gather(1, chosen))
    # Within the k: by key, then stably by descending score.
    chosen_items = indices if items is None else items.gather(1, indices)
    order = torch.argsort(tie_keys(row_keys, chosen_items, seed=seed), dim=1)
    indices, values = indices.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return TopK(values=values.gather(1, order), indices=indices.gather(1, order))
