"""Popularity baseline: train-split counts, closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recloop.algos.popularity import PopularityConfig
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.errors import ConfigError
from recloop.training.fit import FitConfig


def counts_dataset() -> PreparedDataset:
    # train: item 3 ×3, item 1 ×2, item 2 ×1; valid/test events of item 4 must not count.
    user = np.array([1, 1, 1, 2, 2, 2, 1, 2])
    item = np.array([3, 1, 2, 3, 1, 3, 4, 4])
    split = np.array([TRAIN] * 6 + [VALID, TEST])
    ts = np.arange(8)
    return PreparedDataset.from_arrays(user=user, item=item, timestamp=ts, split=split, n_items=4)


@pytest.mark.parametrize(("transform", "f"), [("log", math.log1p), ("count", float)])
def test_scores_are_train_counts(transform: str, f: object) -> None:
    ds = counts_dataset()
    rec = PopularityConfig(transform=transform).create()
    result = rec.fit(ds, fit=FitConfig(progress=False, tensorboard=False))
    assert result.steps == 0
    assert result.best_epoch is None
    scores = rec.policy(
        torch.tensor([1]), torch.zeros((1, 10), dtype=torch.long), torch.zeros(1, 10)
    )
    expected = [float("-inf")] + [f(c) for c in (2, 1, 3, 0)]  # type: ignore[operator]
    torch.testing.assert_close(scores[0], torch.tensor(expected))


def test_ranking_and_masking() -> None:
    ds = counts_dataset()
    rec = PopularityConfig().create()
    rec.fit(ds, fit=FitConfig(progress=False, tensorboard=False, eval_ks=(1, 2), metric="hr@1"))
    # User 2 consumed 3, 1 and 4 (valid and test events count too): only 2 is left.
    assert rec.recommend(["2"], n=3).items == [["2"]]
    assert rec.recommend(["1"], n=3).items == [[]]
    assert rec.recommend(["2"], n=3, exclude_consumed=False).items == [["3", "1", "2"]]


def test_bad_transform() -> None:
    with pytest.raises(ConfigError, match="transform must be one of"):
        PopularityConfig(transform="sqrt")
