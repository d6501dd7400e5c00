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
    # Within the k: by key, then stably by descending score.  Where every row's k values
    # already fall strictly (real-valued scores, no tie among the chosen) that order is the
    # one they are in, and the keys are not needed: one comparison instead of ten calls.
    if bool((values[:, 1:] < values[:, :-1]).all()):
        return TopK(values=values, indices=indices)
    chosen_items = indices if items is None else items.gather(1, indices)
    order = torch.argsort(tie_keys(row_keys, chosen_items, seed=seed), dim=1)
    indices, values = indices.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return TopK(values=values.gather(1, order), indices=indices.gather(1, order))


@dataclass(frozen=True)
class InnerProduct:
    """Scores that factor as ``queries @ items.T + bias``: (B, F) x (N + 1, F) → (B, N + 1).

    Linear and dot heads score this way; knowing it lets a caller score the catalogue in
    item chunks that stay in cache instead of materialising the (B, N + 1) table
    (:func:`topk_inner_product`).
    """

    queries: Tensor  # (B, F)
    items: Tensor  # (N + 1, F)
    bias: Tensor | None = None  # (N + 1,) added to every row, or None

    def scores(self, lo: int = 0, hi: int | None = None, *, out: Tensor | None = None) -> Tensor:
        """Scores of items ``lo:hi`` for every query, (B, hi - lo), into ``out`` if given."""
        hi = self.items.shape[0] if hi is None else hi
        block = self.items[lo:hi].T
        if self.bias is None:
            return torch.matmul(self.queries, block, out=out)
        # addmm, as nn.Linear computes it (a chunk's product may still round differently from
        # the whole table's in the last bit: BLAS blocks each shape its own way).
        return torch.addmm(self.bias[lo:hi], self.queries, block, out=out)


def topk_inner_product(
    scores: InnerProduct,
    k: int,
    *,
    row_keys: Tensor,
    seed: int = 0,
    exclude: Tensor | None = None,
    chunk: int = 4_096,
    group: int = 64,
    nan_error: str | None = None,
) -> TopK:
    """:func:`topk` of ``scores.scores()`` with ``exclude``d entries at ``-inf``, never
    holding more than (B, ``chunk``) scores.

    ``exclude`` (E,) int64 flat keys ``row * (N + 1) + item`` of entries ranked last (masked
    items; the padding column is the caller's to list).  The result equals :func:`topk` on the
    full masked table.  Each item chunk is scored into one reused buffer; a row whose best
    score in the chunk reaches its (k + 1)-th best so far merges the chunk's k + 1 best into
    its own, other rows skip the chunk; within a chunk only the k + 1 groups of ``group``
    consecutive items with the best maxima are searched.  So each row ends with exactly the
    k + 1 best values of its table, and the boundary-tie test of :func:`topk` is exact on them.
    Rows with a boundary tie or a NaN among them are ranked again from their full score rows
    by :func:`topk` itself (a constant scorer takes that path for every row, at the cost of
    the unchunked ranking).  With ``nan_error``
    a NaN score raises ``ValueError(nan_error)`` instead of ranking last.
    """
    b, width = scores.queries.shape[0], scores.items.shape[0]
    k = min(k, width)
    if k == 0 or b == 0 or width <= max(chunk, k):
        full = scores.scores()
        if nan_error is not None and bool(torch.isnan(full).any()):
            raise ValueError(nan_error)
        if exclude is not None and exclude.numel():
            full.view(-1).index_fill_(0, exclude, float("-inf"))
        return topk(full, k, row_keys=row_keys, seed=seed)
    dev = scores.queries.device
    chunk = max(chunk, k + 1)
    kk = k + 1
    if exclude is not None and exclude.numel():
        ex_row, ex_col = exclude // width, exclude % width
        order = torch.argsort(ex_col)
        ex_row, ex_col = ex_row[order], ex_col[order]
    else:
        ex_row = ex_col = torch.zeros(0, dtype=torch.int64, device=dev)
    buf = torch.empty(b * chunk, dtype=scores.queries.dtype, device=dev)
    # The k + 1 best (value, item) seen so far per row; their last value is the bar a chunk's
    # best score must reach to change them, so most rows skip most chunks' top-k.
    values = torch.full((b, kk), float("-inf"), dtype=buf.dtype, device=dev)
    indices = torch.zeros((b, kk), dtype=torch.int64, device=dev)
    for lo in range(0, width, chunk):
        hi = min(lo + chunk, width)
        w = hi - lo
        block = scores.scores(lo, hi, out=buf[: b * w].view(b, w))
        a, z = (int(x) for x in torch.searchsorted(ex_col, torch.tensor([lo, hi], device=dev)))
        if z > a:
            block.view(-1).index_fill_(0, ex_row[a:z] * w + (ex_col[a:z] - lo), float("-inf"))
        n_groups = w // group if w % group == 0 else 0
        if n_groups > kk:
            groups = block.view(b, n_groups, group).amax(2)  # (B, G) best score per group
            best = groups.amax(1)
        else:
            best = block.amax(1)
        # NaN propagates through amax; such rows are kept (NaN >= x is False) so that the
        # NaN reaches the candidates and is seen there.
        rows = ((best >= values[:, -1]) | torch.isnan(best)).nonzero().squeeze(1)
        if rows.shape[0] == 0:
            continue
        if n_groups > kk:
            # The k + 1 best values lie in the k + 1 groups with the best maxima (a group left
            # out has k + 1 groups above it, each holding a larger or equal value), so the
            # top-k runs over k + 1 groups instead of the whole chunk.
            gid = torch.topk(groups[rows], kk, dim=1).indices  # (R, k + 1)
            picked = block.view(b, n_groups, group)[rows[:, None], gid]  # (R, k + 1, group)
            v, i = torch.topk(picked.view(-1, kk * group), kk, dim=1)
            i = gid.gather(1, i // group) * group + i % group
        else:
            v, i = torch.topk(block[rows], min(kk, w), dim=1)
        merged_v = torch.cat((values[rows], v), 1)
        merged_i = torch.cat((indices[rows], i + lo), 1)
        v, at = torch.topk(merged_v, kk, dim=1)
        values[rows] = v
        indices[rows] = merged_i.gather(1, at)
    nan = torch.isnan(values).any(1)  # (B,)
    if nan_error is not None and bool(nan.any()):
        raise ValueError(nan_error)
    redo = (values[:, k] == values[:, k - 1]) | nan  # (B,)
    values, indices = values[:, :k], indices[:, :k]
    # Within the k: by key, then stably by descending score (as topk does).
    keys = row_keys.to(device=dev, dtype=torch.int64)
    order = torch.argsort(tie_keys(keys, indices, seed=seed), dim=1)
    indices, values = indices.gather(1, order), values.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    values, indices = values.gather(1, order), indices.gather(1, order)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        per = max(1, (b * chunk) // width)  # full rows redone at once, within the buffer's size
        for s in range(0, rows.shape[0], per):
            sub = rows[s : s + per]
            part = InnerProduct(
                queries=scores.queries[sub], items=scores.items, bias=scores.bias
            ).scores()
            in_rows = torch.isin(ex_row, sub)
            if bool(in_rows.any()):
                local = torch.searchsorted(sub, ex_row[in_rows])  # sub is ascending
                part.view(-1).index_fill_(0, local * width + ex_col[in_rows], float("-inf"))
            top = topk(part, k, row_keys=keys[sub], seed=seed)
            values = values.index_copy(0, sub, top.values)
            indices = indices.index_copy(0, sub, top.indices)
    return TopK(values=values, indices=indices)
