"""Pure stream operators against hand-computed values and slow reference versions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recloop.streaming.events import EVENT_SCHEMA
from recloop.streaming.operators import (
    IdIndex,
    PartitionedWatermarks,
    Watermark,
    bucket_counts,
    history_batch,
    popular_reference,
    realised_rewards,
    recent_by_user,
    top_from_buckets,
)


def events(rows: list[tuple[str, str, int, float | None]]) -> pl.DataFrame:
    """(user, item, ts, reward) rows → an event frame."""
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": [r[2] for r in rows],
            "behavior": [None] * len(rows),
            "rating": [None] * len(rows),
            "reward": [r[3] for r in rows],
        },
        schema=EVENT_SCHEMA,
    )


def test_bucket_counts_by_hand() -> None:
    ev = events([("u", "a", 0, 1), ("u", "a", 79, 1), ("u", "a", 80, 1), ("v", "b", 81, 1)])
    assert bucket_counts(ev, slide_s=80).rows() == [(0, "a", 2), (1, "a", 1), (1, "b", 1)]


def test_top_from_buckets_by_hand() -> None:
    counts = pl.DataFrame(
        {"bucket": [0, 1, 2, 2, 3], "item_id": ["a", "b", "a", "c", "c"], "events": [5, 1, 1, 1, 2]}
    )
    # Window of 2 buckets ending at 3 covers buckets 2 and 3: a=1, c=3.
    assert top_from_buckets(counts, end_bucket=3, n_buckets=2, top=5) == [("c", 3.0), ("a", 1.0)]
    # Ending at 2 with 3 buckets: a=5+1, b=1, c=1; tie b/c broken by id.
    assert top_from_buckets(counts, end_bucket=2, n_buckets=3, top=2) == [("a", 6.0), ("b", 1.0)]


def test_each_event_counts_once_in_each_window_it_falls_in() -> None:
    # window 240 s, slide 80 s: an event at t=100 (bucket 1) is in the windows ending with
    # buckets 1, 2 and 3 and no other.
    counts = bucket_counts(events([("u", "a", 100, 1)]), slide_s=80)
    inside = [e for e in range(-2, 8) if top_from_buckets(counts, end_bucket=e, n_buckets=3, top=1)]
    assert inside == [1, 2, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketed_top_matches_direct_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    ts = rng.integers(0, 50_000, n)
    items = [f"i{k}" for k in rng.integers(0, 40, n)]
    ev = events([("u", i, int(t), 1.0) for i, t in zip(items, ts, strict=True)])
    counts = bucket_counts(ev, slide_s=80)
    end = int(ts.max()) // 80
    fast = top_from_buckets(counts, end_bucket=end, n_buckets=45, top=10)
    ref = popular_reference(items, ts, window_s=3600, slide_s=80, top=10)
    assert fast == ref
    # And the reference against a plain Python count.
    lo, hi = (end - 44) * 80, (end + 1) * 80
    plain: dict[str, int] = {}
    for i, t in zip(items, ts, strict=True):
        if lo <= t < hi:
            plain[i] = plain.get(i, 0) + 1
    expect = sorted(plain.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert ref == [(k, float(v)) for k, v in expect]


def test_watermark_marks_events_older_than_running_max_minus_lateness() -> None:
    wm = Watermark(allowed_lateness_s=10)
    # running max before each: -, 100, 100, 120, 120  → late if ts < max - 10
    late = wm.observe(np.array([100, 95, 120, 109, 110]))
    assert late.tolist() == [False, False, False, True, False]
    assert wm.max_ts == 120 and wm.watermark == 110
    # State carries to the next batch.
    assert wm.observe(np.array([111, 105])).tolist() == [False, True]


def test_partitioned_watermarks_judge_each_partition_alone() -> None:
    """A Kafka consumer may get partition 0's whole backlog before partition 1's: partition
    1's older events are late only against partition 1."""
    wm = PartitionedWatermarks(10)
    late = wm.observe(np.array([990, 1000, 100, 105, 94, 1001]), np.array([0, 0, 1, 1, 1, 0]))
    assert late.tolist() == [False, False, False, False, True, False]
    assert wm.max_ts == 105  # reached by every partition seen
    assert wm.observe(np.array([90, 96]), np.array([1, 1])).tolist() == [True, False]
    one = PartitionedWatermarks(10)  # no partitions: one stream, one watermark
    assert one.observe(np.array([1000, 100])).tolist() == [False, True]
    assert one.max_ts == 1000


def test_recent_by_user_dedupes_events_and_breaks_ties_by_event_id() -> None:
    ev = events([("u", "a", 5, 1.0), ("u", "b", 5, 1.0), ("u", "c", 5, 1.0), ("u", "d", 5, 1.0)])
    ev = ev.with_columns(pl.Series("event_id", ["x-9", "x-10", "x-11", "x-11"]))
    got = recent_by_user(ev, max_len=2)["u"]
    # x-11 twice is one event (its first version, c); ties sort "x-10" < "x-11" < "x-9"
    assert [(r.event_id, r.item) for r in got] == [("x-11", "c"), ("x-9", "a")]


def test_watermark_without_limit_never_marks_late() -> None:
    wm = Watermark(allowed_lateness_s=None)
    assert not wm.observe(np.array([100, 0, 5])).any()
    assert wm.max_ts == 100 and wm.watermark is None


def test_recent_by_user_orders_by_time_keeps_last_and_defaults_reward() -> None:
    ev = events([("u", "a", 5, 2.0), ("v", "x", 1, None), ("u", "b", 3, 1.0), ("u", "c", 9, 0.5)])
    got = recent_by_user(ev, max_len=2)
    assert {u: [(r.item, r.reward) for r in x] for u, x in got.items()} == {
        "u": [("a", 2.0), ("c", 0.5)],
        "v": [("x", 1.0)],
    }
    # each entry carries its event time and id, which the stores order and dedupe by
    assert [(r.ts, r.event_id) for r in got["u"]] == [(5, "e0"), (9, "e3")]


def test_realised_reward_sums_rewards_of_consumed_list_items() -> None:
    previous = pl.DataFrame(
        {"user_id": ["u", "u", "u", "v", "v"], "item_id": ["a", "b", "c", "x", "y"]}
    )
    ev = events(
        [
            ("u", "a", 1, 2.0),  # on u's list
            ("u", "z", 2, 5.0),  # not on it
            ("u", "c", 3, None),  # on it, no reward → 1.0
            ("v", "q", 4, 3.0),  # v consumed nothing from its list
            ("w", "a", 5, 1.0),  # w had no previous list
        ]
    )
    got = realised_rewards(previous, ev).sort("user_id")
    assert got.rows() == [("u", 3.0, 2), ("v", 0.0, 0)]


def test_id_index_lookup_and_raw() -> None:
    idx = IdIndex(["a", "b", "c"])
    assert idx.lookup(["c", "zz", "a", "a"]).tolist() == [3, 0, 1, 1]
    assert idx.raw(np.array([[1, 3], [0, 2]])).tolist() == [["a", "c"], ["", "b"]]


def test_history_batch_left_pads_last_h_known_items() -> None:
    items = IdIndex(["a", "b", "c", "d"])
    users = IdIndex(["u", "v"])
    recent = {
        "u": [("a", 1.0), ("b", 2.0), ("zz", 9.0), ("c", 3.0), ("d", 4.0)],
        "v": [("b", 0.5)],
        "new": [],
    }
    hb = history_batch(recent, user_index=users, item_index=items, history_len=3, n_items=4)
    assert hb.users == ["u", "v", "new"]
    assert hb.user.tolist() == [1, 2, 0]
    assert hb.history.tolist() == [[2, 3, 4], [0, 0, 2], [0, 0, 0]]
    assert hb.history_reward.tolist() == [[2.0, 3.0, 4.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]]
    expect = torch.zeros(3, 5, dtype=torch.bool)
    expect[0, [1, 2, 3, 4]] = True
    expect[1, 2] = True
    assert torch.equal(hb.consumed, expect)


def test_history_batch_matches_slow_reference() -> None:
    rng = np.random.default_rng(3)
    ids = [f"i{k}" for k in range(1, 21)]
    items = IdIndex(ids)
    recent = {
        f"u{u}": [(f"i{k}", float(k)) for k in rng.integers(1, 25, rng.integers(0, 9))]
        for u in range(30)
    }
    hb = history_batch(recent, user_index=IdIndex([]), item_index=items, history_len=5, n_items=20)
    for row, pairs in enumerate(recent.values()):
        known = [(int(i[1:]), r) for i, r in pairs if int(i[1:]) <= 20][-5:]
        pad = 5 - len(known)
        assert hb.history[row].tolist() == [0] * pad + [k for k, _ in known]
        assert hb.history_reward[row].tolist() == [0.0] * pad + [r for _, r in known]
