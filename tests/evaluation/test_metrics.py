"""Ranking metrics against values worked out by hand, rank by rank."""

from __future__ import annotations

import math

import pytest
import torch

from recloop.evaluation.metrics import (
    METRICS,
    average_precision,
    hit_rate,
    mrr,
    ndcg,
    precision,
    recall,
)

# Four users, top 5.  Row i: which of ranks 1..5 hold a target; N_TARGETS: distinct targets.
HITS = torch.tensor(
    [
        [1, 0, 1, 0, 0],  # hits at ranks 1 and 3, 2 targets
        [0, 0, 0, 0, 0],  # no hit, 1 target
        [0, 1, 0, 0, 1],  # hits at ranks 2 and 5, 3 targets
        [0, 0, 0, 1, 0],  # hit at rank 4, 1 target
    ],
    dtype=torch.bool,
)
N_TARGETS = torch.tensor([2, 1, 3, 1])

L2, L3, L4, L5, L6 = (math.log2(x) for x in (2, 3, 4, 5, 6))


def close(got: torch.Tensor, want: list[float]) -> None:
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_hit_rate() -> None:
    close(hit_rate(HITS, N_TARGETS, 5), [1, 0, 1, 1])
    close(hit_rate(HITS, N_TARGETS, 3), [1, 0, 1, 0])
    close(hit_rate(HITS, N_TARGETS, 1), [1, 0, 0, 0])


def test_recall() -> None:
    close(recall(HITS, N_TARGETS, 5), [2 / 2, 0, 2 / 3, 1 / 1])
    close(recall(HITS, N_TARGETS, 3), [2 / 2, 0, 1 / 3, 0])


def test_recall_with_more_targets_than_k() -> None:
    """RecBole divides by every target, not by min(targets, k): 3 hits of 8 targets at k=3."""
    hits = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    close(recall(hits, torch.tensor([8]), 3), [3 / 8])
    close(recall(hits, torch.tensor([8]), 4), [3 / 8])


def test_precision() -> None:
    close(precision(HITS, N_TARGETS, 5), [2 / 5, 0, 2 / 5, 1 / 5])
    close(precision(HITS, N_TARGETS, 3), [2 / 3, 0, 1 / 3, 0])


def test_ndcg() -> None:
    # DCG sums 1/log2(rank + 1) over hit ranks; the ideal puts min(|T|, k) hits first.
    close(
        ndcg(HITS, N_TARGETS, 5),
        [
            (1 / L2 + 1 / L4) / (1 / L2 + 1 / L3),
            0,
            (1 / L3 + 1 / L6) / (1 / L2 + 1 / L3 + 1 / L4),
            (1 / L5) / (1 / L2),
        ],
    )
    close(
        ndcg(HITS, N_TARGETS, 3),
        [(1 / L2 + 1 / L4) / (1 / L2 + 1 / L3), 0, (1 / L3) / (1 / L2 + 1 / L3 + 1 / L4), 0],
    )
    # k = 1: the ideal has one hit even for users with more targets.
    close(ndcg(HITS, N_TARGETS, 1), [1, 0, 0, 0])
    # Numbers, for the record: (1 + 0.5) / (1 + 0.63093) and 0.43068.
    got = ndcg(HITS, N_TARGETS, 5).tolist()
    assert got[0] == pytest.approx(0.919721, abs=1e-6)
    assert got[3] == pytest.approx(0.430677, abs=1e-6)


def test_mrr() -> None:
    close(mrr(HITS, N_TARGETS, 5), [1, 0, 1 / 2, 1 / 4])
    close(mrr(HITS, N_TARGETS, 3), [1, 0, 1 / 2, 0])
    close(mrr(HITS, N_TARGETS, 1), [1, 0, 0, 0])


def test_average_precision() -> None:
    # Sum of precision@i at hit ranks i, over min(|T|, k).
    close(
        average_precision(HITS, N_TARGETS, 5),
        [(1 / 1 + 2 / 3) / 2, 0, (1 / 2 + 2 / 5) / 3, (1 / 4) / 1],
    )
    close(average_precision(HITS, N_TARGETS, 3), [(1 / 1 + 2 / 3) / 2, 0, (1 / 2) / 3, 0])
    # k = 1 < |T| = 2: one hit at rank 1 is a perfect score.
    close(average_precision(HITS, N_TARGETS, 1), [1, 0, 0, 0])


def test_perfect_ranking_scores_one() -> None:
    hits = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    n = torch.tensor([2, 1])
    for name in ("hr", "recall", "ndcg", "mrr", "map"):
        close(METRICS[name](hits, n, 3), [1, 1])


def test_cut_off_beyond_the_matrix_is_an_error() -> None:
    with pytest.raises(ValueError, match="K >= k=6"):
        ndcg(HITS, N_TARGETS, 6)
