"""Ratio, temporal leave-one-out and global time splits."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.data.dataset import TEST, TRAIN, VALID
from recloop.data.splits import SplitConfig, assign_splits, loo_split, ratio_split, time_split
from recloop.errors import ConfigError

T, V, X = TRAIN, VALID, TEST


def test_ratio_split_per_user_by_hand() -> None:
    # Users with 10, 5 and 2 events.
    offsets = np.array([0, 10, 15, 17])
    got = ratio_split(offsets, SplitConfig(mode="ratio", train=0.8, valid=0.1, test=0.1))
    assert got.split.tolist() == (
        [T] * 8
        + [V, X]  # 10 events: 1 valid, 1 test
        + [T] * 3
        + [V, X]  # 5 events: round(0.5) = 1 each
        + [T, T]  # 2 events < min_user_events 3: all train
    )
    assert got.info["users_all_train"] == 1


def test_ratio_split_dbrl_80_20() -> None:
    offsets = np.array([0, 7, 19])
    got = ratio_split(offsets, SplitConfig(train=0.8, valid=0.0, test=0.2))
    # round(1.4) = 1 and round(2.4) = 2 test events, no validation.
    assert got.split.tolist() == [T] * 6 + [X] + [T] * 10 + [X] * 2


def test_ratio_split_keeps_one_training_event() -> None:
    got = ratio_split(np.array([0, 3]), SplitConfig(train=0.2, valid=0.4, test=0.4))
    assert got.split.tolist() == [T, V, X]
    # 4 events at 0.1 / 0.45 / 0.45 round to 2 valid + 2 test, leaving no training event:
    # validation gives one back.
    got = ratio_split(np.array([0, 4]), SplitConfig(train=0.1, valid=0.45, test=0.45))
    assert got.split.tolist() == [T, V, X, X]
    # 4 events at 0.05 / 0.15 / 0.8: 1 valid + 3 test; validation gives its only event back.
    got = ratio_split(np.array([0, 4]), SplitConfig(train=0.05, valid=0.15, test=0.8))
    assert got.split.tolist() == [T, X, X, X]
    # 4 events at 0.02 / 0.08 / 0.9: no validation and 4 test; then test gives way.
    got = ratio_split(np.array([0, 4]), SplitConfig(train=0.02, valid=0.08, test=0.9))
    assert got.split.tolist() == [T, X, X, X]


def test_loo_split_by_hand() -> None:
    offsets = np.array([0, 4, 6, 9])
    got = loo_split(offsets, SplitConfig(mode="loo"))
    assert got.split.tolist() == [T, T, V, X, T, T, T, V, X]
    no_valid = loo_split(offsets, SplitConfig(mode="loo", train=0.9, valid=0.0, test=0.1))
    assert no_valid.split.tolist() == [T, T, T, X, T, T, T, T, X]


def test_time_split_quantile_and_absolute() -> None:
    ts = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])
    got = time_split(ts, SplitConfig(mode="time", train=0.8, valid=0.1, test=0.1))
    assert got.info == {"valid_start": 9, "test_start": 10}
    np.testing.assert_array_equal(got.split, np.where(ts >= 10, X, np.where(ts >= 9, V, T)))
    fixed = time_split(ts, SplitConfig(mode="time", valid_start=4, test_start=7))
    np.testing.assert_array_equal(fixed.split, np.where(ts >= 7, X, np.where(ts >= 4, V, T)))


def test_time_split_ties_at_the_cut_all_go_to_test() -> None:
    ts = np.array([1, 2, 3, 3, 3])
    got = time_split(ts, SplitConfig(mode="time", train=0.8, valid=0.0, test=0.2))
    assert got.split.tolist() == [T, T, X, X, X]


def test_assign_splits_dispatches() -> None:
    offsets = np.array([0, 3])
    ts = np.array([1, 2, 3])
    assert assign_splits(offsets, ts, SplitConfig(mode="loo")).split.tolist() == [T, V, X]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"train": 0.5, "valid": 0.1, "test": 0.1}, "must be 1"),
        ({"test": 1.5}, "split.test"),
        ({"valid_start": 9, "test_start": 3}, "valid_start"),
    ],
)
def test_split_config_checks(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        SplitConfig(**kwargs)  # type: ignore[arg-type]
