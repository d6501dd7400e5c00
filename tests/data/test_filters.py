"""Duplicate removal, count filters / k-core and DBRL user sampling."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recloop.data.filters import (
    FilterConfig,
    UserSampleConfig,
    count_filter,
    duplicate_rows,
    sample_users,
)
from recloop.data.sessions import chronological_order
from recloop.errors import ConfigError


def _k_core_reference(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    keep = np.ones(user.shape[0], bool)
    while True:
        uc: dict[int, int] = {}
        ic: dict[int, int] = {}
        for u, i, kept in zip(user, item, keep, strict=True):
            if kept:
                uc[u] = uc.get(u, 0) + 1
                ic[i] = ic.get(i, 0) + 1
        new = np.array(
            [
                bool(kept and uc[u] >= k and ic[i] >= k)
                for u, i, kept in zip(user, item, keep, strict=True)
            ]
        )
        if (new == keep).all():
            return keep
        keep = new


def test_k_core_by_hand() -> None:
    # Users 0, 1 rate items 0, 1; user 2 rates item 0 and item 2 (item 2 has one event).
    # 2-core: item 2 goes (1 event) → user 2 has one event left → goes → item 0 keeps 2.
    user = np.array([0, 0, 1, 1, 2, 2])
    item = np.array([0, 1, 0, 1, 0, 2])
    res = count_filter(user, item, n_users=3, n_items=3, cfg=FilterConfig(k_core=2))
    np.testing.assert_array_equal(res.keep, [1, 1, 1, 1, 0, 0])
    assert res.details["rounds"] == 3  # drop item 2, then user 2, then nothing changes
    # A single pass only drops item 2's event and keeps user 2's other event.
    once = count_filter(
        user, item, n_users=3, n_items=3, cfg=FilterConfig(min_user_events=2, min_item_events=2)
    )
    np.testing.assert_array_equal(once.keep, [1, 1, 1, 1, 1, 0])


def test_k_core_matches_reference_on_random_data() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        e = 400
        user = rng.integers(0, 60, e)
        item = rng.integers(0, 80, e)
        res = count_filter(user, item, n_users=60, n_items=80, cfg=FilterConfig(k_core=3))
        np.testing.assert_array_equal(res.keep, _k_core_reference(user, item, 3))


def test_count_filter_off_by_default() -> None:
    res = count_filter(np.array([0]), np.array([0]), n_users=1, n_items=1, cfg=FilterConfig())
    assert res.keep.all() and res.details["rounds"] == 0


def test_duplicates_only_exact_and_keep_the_first() -> None:
    events = pl.DataFrame(
        {
            "user": [1, 1, 1, 1, 2, 1],
            "item": [5, 6, 5, 5, 5, 5],
            "timestamp": [10, 10, 10, 10, 10, 11],
            "behavior": ["pv", "pv", "pv", "buy", "pv", "pv"],
            "extra": ["a", "a", "a", "a", "a", "a"],
        }
    )
    user = events["user"].to_numpy()
    ts = events["timestamp"].to_numpy()
    order = chronological_order(user, ts).order
    res = duplicate_rows(
        events,
        order=order,
        user=user[order],
        timestamp=ts[order],
        item=events["item"].to_numpy()[order],
        source_keys={"behavior": np.array([1, 1, 1, 4, 1, 1], np.int8)},
    )
    # Only source row 2 repeats row 0 exactly (row 3 differs in behaviour, 4 in user, 5 in time).
    assert res.details["duplicates"] == 1
    assert order[~res.keep].tolist() == [2]
    # Without the extra column the numeric keys settle it alone, with the same answer.
    exact = duplicate_rows(
        events.drop("extra"),
        order=order,
        user=user[order],
        timestamp=ts[order],
        item=events["item"].to_numpy()[order],
        source_keys={"behavior": np.array([1, 1, 1, 4, 1, 1], np.int8)},
    )
    np.testing.assert_array_equal(exact.keep, res.keep)


def test_duplicates_compare_every_column() -> None:
    events = pl.DataFrame(
        {"user": [1, 1, 1], "item": [5, 5, 5], "timestamp": [10, 10, 10], "note": ["x", "y", "x"]}
    )
    args = {
        "order": np.arange(3),
        "user": np.array([1, 1, 1]),
        "timestamp": np.array([10, 10, 10]),
        "item": np.array([5, 5, 5]),
    }
    assert duplicate_rows(events, **args).keep.tolist() == [True, True, False]
    rated = events.drop("note").with_columns(rating=pl.Series([3.0, 4.0, 3.0]))
    keys = {"rating": rated["rating"].to_numpy()}
    assert duplicate_rows(rated, **args, source_keys=keys).keep.tolist() == [True, True, False]


def test_duplicates_match_a_reference_on_random_data() -> None:
    rng = np.random.default_rng(5)
    e = 2000
    events = pl.DataFrame(
        {
            "user": rng.integers(0, 20, e),
            "item": rng.integers(0, 5, e),
            "timestamp": rng.integers(0, 30, e),
            "behavior": rng.integers(1, 3, e).astype(np.int8),
        }
    )
    user, ts = events["user"].to_numpy(), events["timestamp"].to_numpy()
    order = chronological_order(user, ts).order
    res = duplicate_rows(
        events,
        order=order,
        user=user[order],
        timestamp=ts[order],
        item=events["item"].to_numpy()[order],
        source_keys={"behavior": events["behavior"].to_numpy()},
    )
    seen: set[tuple[object, ...]] = set()
    want = []
    for row in events.rows():
        want.append(row not in seen)
        seen.add(row)
    np.testing.assert_array_equal(res.keep, np.array(want)[order])


def test_sample_users_bands_counts_and_seed() -> None:
    # Users 0..9 with 1..10 events each.
    counts = np.arange(1, 11)
    user = np.repeat(np.arange(10), counts)
    cfg = UserSampleConfig(
        short_users=2,
        short_min_events=2,
        short_max_events=4,
        long_users=5,
        long_min_events=8,
        long_max_events=10,
        seed=1,
    )
    res = sample_users(user, n_users=10, cfg=cfg)
    kept = np.unique(user[res.keep])
    short = [u for u in kept if 2 <= counts[u] <= 4]
    long_ = [u for u in kept if 8 <= counts[u] <= 10]
    assert len(short) == 2 and len(long_) == 3 and len(kept) == 5
    assert res.details["long"] == {"candidates": 3, "wanted": 5, "chosen": 3}
    again = sample_users(user, n_users=10, cfg=cfg)
    np.testing.assert_array_equal(res.keep, again.keep)


def test_sample_config_is_off_by_default_and_checks_bands() -> None:
    assert not UserSampleConfig().enabled
    with pytest.raises(ConfigError, match="short_min_events"):
        UserSampleConfig(short_min_events=10, short_max_events=5)
