"""Reward mapping from behaviours and ratings."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recloop.data.rewards import (
    BehaviorRewards,
    RewardConfig,
    behavior_codes,
    compute_rewards,
)
from recloop.errors import ConfigError, PrepareError


def test_behavior_codes_from_text_and_enum() -> None:
    s = pl.Series("behavior", ["pv", "buy", "cart", "fav", None])
    np.testing.assert_array_equal(behavior_codes(s), [1, 4, 2, 3, 0])
    enum = s.cast(pl.Enum(["pv", "cart", "fav", "buy"]))
    np.testing.assert_array_equal(behavior_codes(enum), [1, 4, 2, 3, 0])


def test_unknown_behavior_is_named() -> None:
    with pytest.raises(PrepareError, match=r'unknown value "clik" in event row 2 \(1 rows'):
        behavior_codes(pl.Series("behavior", ["pv", "clik"]))


def test_default_behavior_rewards() -> None:
    codes = np.array([1, 2, 3, 4, 1], np.int8)
    got = compute_rewards(behavior=codes, rating=None, n_events=5, cfg=RewardConfig())
    assert got.source == "behavior"
    np.testing.assert_array_equal(got.reward, [1, 2, 2, 3, 1])
    assert got.reward.dtype == np.float32


def test_custom_behavior_rewards() -> None:
    cfg = RewardConfig(behavior=BehaviorRewards(pv=0.0, buy=10.0))
    got = compute_rewards(behavior=np.array([1, 4, 2], np.int8), rating=None, n_events=3, cfg=cfg)
    np.testing.assert_array_equal(got.reward, [0, 10, 2])


def test_missing_behavior_is_an_error() -> None:
    with pytest.raises(PrepareError, match="without a behaviour"):
        compute_rewards(
            behavior=np.array([1, 0], np.int8), rating=None, n_events=2, cfg=RewardConfig()
        )


def test_rating_rewards_and_binarised() -> None:
    rating = np.array([1.0, 3.5, 4.0, 5.0])
    got = compute_rewards(behavior=None, rating=rating, n_events=4, cfg=RewardConfig())
    assert got.source == "rating"
    np.testing.assert_array_equal(got.reward, rating)
    binary = compute_rewards(
        behavior=None, rating=rating, n_events=4, cfg=RewardConfig(rating_threshold=4.0)
    )
    np.testing.assert_array_equal(binary.reward, [0, 0, 1, 1])


def test_source_selection() -> None:
    codes = np.array([4], np.int8)
    both = compute_rewards(behavior=codes, rating=np.array([1.0]), n_events=1, cfg=RewardConfig())
    assert both.source == "behavior" and both.reward[0] == 3
    by_rating = compute_rewards(
        behavior=codes, rating=np.array([1.0]), n_events=1, cfg=RewardConfig(source="rating")
    )
    assert by_rating.reward[0] == 1
    const = compute_rewards(behavior=None, rating=None, n_events=2, cfg=RewardConfig(constant=0.5))
    assert const.source == "constant"
    np.testing.assert_array_equal(const.reward, [0.5, 0.5])
    with pytest.raises(ConfigError, match='no "rating"'):
        compute_rewards(behavior=codes, rating=None, n_events=1, cfg=RewardConfig(source="rating"))
