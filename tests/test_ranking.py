"""The shared top-k: exact (score, key) order, no index bias, reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recloop.ranking import InnerProduct, tie_keys, topk, topk_inner_product


def _reference(scores: torch.Tensor, k: int, row_keys: torch.Tensor, seed: int) -> list[list[int]]:
    """Slow reference: sort every row by (score descending, key ascending)."""
    n = scores.shape[1]
    out = []
    for r in range(scores.shape[0]):
        keys = tie_keys(row_keys[r : r + 1], torch.arange(n)[None, :], seed=seed)[0].tolist()
        s = scores[r].masked_fill(scores[r].isnan(), float("-inf")).tolist()
        out.append(sorted(range(n), key=lambda j: (-s[j], keys[j]))[:k])
    return out


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("k", [1, 3, 8, 12])
def test_matches_reference_sort_with_many_ties(seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (30, 12), generator=g).float()  # heavy ties everywhere
    scores[0] = float("-inf")
    scores[1, 3] = float("nan")
    rows = torch.arange(30) * 11 + 5
    got = topk(scores, k, row_keys=rows, seed=seed)
    assert got.indices.tolist() == _reference(scores, k, rows, seed)
    expected_values = scores.masked_fill(scores.isnan(), float("-inf")).gather(1, got.indices)
    assert torch.equal(got.values, expected_values)


def test_distinct_scores_are_plain_topk() -> None:
    scores = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    got = topk(scores, 10, row_keys=torch.arange(50))
    want = torch.topk(scores, 10, dim=1)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.values, want.values)


def test_constant_scores_pick_each_item_equally_often() -> None:
    """A constant scorer's top-1 is uniform over the items (chi-square, 5000 rows)."""
    n, m = 10, 5000
    got = topk(torch.zeros(m, n), 1, row_keys=torch.arange(m)).indices[:, 0]
    counts = np.bincount(got.numpy(), minlength=n)
    expected = m / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # 99.9 % quantile of chi-square with 9 degrees of freedom
    # the lowest index, which torch.topk would always pick, is not favoured
    assert counts[0] < expected * 1.15


def test_reproducible_and_seeded() -> None:
    scores = torch.zeros(4, 100)
    rows = torch.tensor([1, 2, 3, 4])
    a = topk(scores, 5, row_keys=rows, seed=0).indices
    assert torch.equal(a, topk(scores, 5, row_keys=rows, seed=0).indices)
    assert not torch.equal(a, topk(scores, 5, row_keys=rows, seed=1).indices)
    assert len({tuple(r) for r in a.tolist()}) == 4  # every user gets its own draw


def test_k_larger_than_catalogue_and_empty() -> None:
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    got = topk(scores, 10, row_keys=torch.zeros(1, dtype=torch.long))
    assert sorted(got.indices[0, :2].tolist()) == [0, 1]
    assert got.indices[0, 2].item() == 2
    assert topk(torch.zeros(0, 3), 2, row_keys=torch.zeros(0)).indices.shape == (0, 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_no_item_is_tied_to_its_row(seed: int) -> None:
    """The first tied item of row u is not item u (nor any fixed offset of it), and the rank
    of a fixed item among ties is uniform over rows: a constant scorer's top-1 must be item
    u for about 1/N of the users, not for all of them."""
    n = 400
    rows = torch.arange(n)  # every row has "its own" item
    first = topk(torch.zeros(n, n), 1, row_keys=rows, seed=seed).indices[:, 0]
    for offset in (0, 1, -1):
        own = int((first == (rows + offset) % n).sum())
        assert own < 10, (offset, own)  # about 1 expected
    n, m = 50, 4000
    rows = torch.arange(m)
    # where does item 0 land among 50 tied items? uniform ranks: mean (n - 1) / 2
    order = topk(torch.zeros(m, n), n, row_keys=rows, seed=seed).indices
    rank0 = (order == 0).nonzero()[:, 1].double()
    assert abs(float(rank0.mean()) - (n - 1) / 2) < 4 * (n / math.sqrt(12 * m))
    # and the mean item index in a top 10 shows no pull towards low (popular) indices
    top10 = order[:, :10].double()
    assert abs(float(top10.mean()) - (n - 1) / 2) < 4 * (n / math.sqrt(12 * m * 10))


@pytest.mark.parametrize("seed", range(6))
def test_chunked_inner_product_equals_topk_on_the_full_table(seed: int) -> None:
    """Item chunks, skipped chunks and group pruning give exactly topk's ranking (integer
    scores: heavy ties, exact arithmetic), with exclusions, a NaN, fewer rankable than k."""
    g = torch.Generator().manual_seed(seed)
    b, n, f = 9, 157, 3
    queries = torch.randint(-2, 3, (b, f), generator=g).float()
    items = torch.randint(-3, 4, (n, f), generator=g).float()
    bias = torch.randint(-1, 2, (n,), generator=g).float() if seed % 2 else None
    items[5, 0] = float("nan") if seed % 3 == 0 else items[5, 0]
    scores = InnerProduct(queries=queries, items=items, bias=bias)
    exclude = torch.unique(torch.randint(0, b * n, (300,), generator=g))
    exclude = torch.cat([exclude, torch.arange(n) + 2 * n])  # row 2: nothing rankable
    rows = torch.arange(b) * 13 + 1
    full = scores.scores().clone()
    full.view(-1)[exclude] = float("-inf")
    for k in (1, 4, 10):
        want = topk(full, k, row_keys=rows, seed=seed)
        for chunk, group in ((16, 2), (40, 3), (64, 1), (1000, 64)):
            got = topk_inner_product(
                scores, k, row_keys=rows, seed=seed, exclude=exclude, chunk=chunk, group=group
            )
            assert torch.equal(got.indices, want.indices), (k, chunk, group)
            assert torch.equal(got.values, want.values), (k, chunk, group)
    if seed % 3 == 0:
        with pytest.raises(ValueError, match="bad scores"):
            topk_inner_product(scores, 3, row_keys=rows, chunk=16, group=2, nan_error="bad scores")


def test_chunked_inner_product_with_distinct_scores() -> None:
    """Float scores: the chunks' matmuls may round differently from one big one (an ulp), so
    the ranking is compared where no two scores are that close."""
    g = torch.Generator().manual_seed(3)
    scores = InnerProduct(
        queries=torch.randn(64, 8, generator=g), items=torch.randn(5000, 8, generator=g)
    )
    want = topk(scores.scores(), 20, row_keys=torch.arange(64))
    got = topk_inner_product(scores, 20, row_keys=torch.arange(64), chunk=512, group=16)
    assert torch.equal(got.indices, want.indices)
    assert torch.allclose(got.values, want.values, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4, 9])
def test_candidate_columns_rank_as_their_items_in_the_catalogue(k: int) -> None:
    """A per-row candidate list (shuffled, holding the catalogue's top k and then some) with
    ``items`` gives the catalogue's own top-k, ties included: the keys follow the items."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 3, (40, 30), generator=g).float()  # heavy ties
    scores[5, 7] = float("nan")
    rows = torch.arange(40) * 7 + 1
    full = topk(scores, k, row_keys=rows)
    # candidates: the top k + 6 of the catalogue's order, in a random order per row
    order = torch.tensor(_reference(scores, k + 6, rows, 0))
    perm = torch.argsort(torch.rand(order.shape, generator=g), dim=1)
    cand = order.gather(1, perm)
    got = topk(scores.gather(1, cand), k, row_keys=rows, items=cand)
    assert torch.equal(cand.gather(1, got.indices), full.indices)
    assert torch.equal(got.values, full.values)
    # without the items, the keys of the candidate positions decide: other lists
    plain = topk(scores.gather(1, cand), k, row_keys=rows)
    assert not torch.equal(cand.gather(1, plain.indices), full.indices)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_with_and_without_ties_in_one_batch_match_the_reference(seed: int) -> None:
    """Distinct rows (whose order needs no keys) beside rows with ties among the chosen,
    at the boundary, or above it: every row in (score, key) order."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(24, 15, generator=g)
    scores[3, :6] = 2.0  # ties among the top
    scores[7, [1, 4, 9]] = scores[7].max() - 0.5  # ties across the k-th place
    scores[11] = torch.randint(0, 3, (15,), generator=g).float()
    scores[15, 2] = float("nan")
    rows = torch.arange(24) * 5 + 1
    for k in (1, 2, 4, 7):
        got = topk(scores, k, row_keys=rows, seed=seed)
        assert got.indices.tolist() == _reference(scores, k, rows, seed), k
        filled = scores.masked_fill(scores.isnan(), float("-inf"))
        assert torch.equal(got.values, filled.gather(1, got.indices))
