"""The SQL behaviour log on SQLite, PostgreSQL and MariaDB: idempotent appends, exact window
counts under redelivery, popular items, recommendation history."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa

from recloop.streaming.events import EVENT_SCHEMA
from recloop.streaming.log import BehaviorLog, is_transient
from recloop.streaming.operators import bucket_counts, popular_reference, top_from_buckets


def frame(
    n: int, *, start: int = 0, ts0: int = 1000, step: int = 7, items: int = 5
) -> pl.DataFrame:
    rows = range(start, start + n)
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in rows],
            "user_id": [f"u{i % 3}" for i in rows],
            "item_id": [f"i{i % items}" for i in rows],
            "ts": [ts0 + step * i for i in rows],
            "behavior": ["pv" if i % 2 else None for i in rows],
            "rating": [float(i % 5) if i % 3 == 0 else None for i in rows],
            "reward": [1.0 + i % 2 for i in rows],
        },
        schema=EVENT_SCHEMA,
    )


def test_append_is_idempotent_by_event_id(log: BehaviorLog) -> None:
    first = log.append(frame(10), slide_s=80)
    assert first.new.height == 10 and first.duplicates == 0 and first.counted == 10
    # Redelivery of 5 old events plus 5 new ones.
    again = log.append(frame(10, start=5), slide_s=80)
    assert again.new["event_id"].to_list() == [f"e{i}" for i in range(10, 15)]
    assert again.duplicates == 5 and again.counted == 5
    assert log.count() == 15
    # Same id twice within one batch: logged once, the first wins.
    dup = pl.concat(
        [frame(1, start=20), frame(1, start=20).with_columns(pl.lit("zz").alias("item_id"))]
    )
    res = log.append(dup, slide_s=80)
    assert res.new.height == 1 and res.duplicates == 1
    assert log.count() == 16
    stored = log.read_events()
    assert stored.filter(pl.col("event_id") == "e20")["item_id"].to_list() == ["i0"]


def test_log_keeps_every_field(log: BehaviorLog) -> None:
    ev = frame(6)
    log.append(ev, slide_s=80)
    assert log.read_events().sort("event_id").equals(ev.sort("event_id"))


def test_window_counts_are_exact_under_redelivery(log: BehaviorLog) -> None:
    ev = frame(40, step=13)
    log.append(ev[:25], slide_s=80)
    log.append(ev[10:], slide_s=80)  # 15 redelivered
    log.append(ev, slide_s=80)  # all redelivered
    got = log.bucket_table().sort("bucket", "item_id")
    assert got.equals(bucket_counts(ev, slide_s=80))


def test_late_events_are_logged_but_not_counted(log: BehaviorLog) -> None:
    ev = frame(4)
    countable = np.array([True, False, True, False])
    res = log.append(ev, slide_s=80, countable=countable)
    assert res.counted == 2 and res.late == 2
    assert log.count() == 4
    assert log.bucket_table()["events"].sum() == 2


def test_popular_matches_reference(log: BehaviorLog) -> None:
    rng = np.random.default_rng(0)
    n = 600
    ts = np.sort(rng.integers(0, 20_000, n))
    items = rng.integers(0, 25, n)
    ev = pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": ["u"] * n,
            "item_id": [f"i{k}" for k in items],
            "ts": ts,
            "behavior": [None] * n,
            "rating": [None] * n,
            "reward": [None] * n,
        },
        schema=EVENT_SCHEMA,
    )
    for lo in range(0, n, 150):
        log.append(ev[lo : lo + 150], slide_s=80)
    window = log.popular(n_buckets=45, top=8)
    ref = popular_reference(ev["item_id"], ts, window_s=3600, slide_s=80, top=8)
    assert window.end_bucket == int(ts.max()) // 80
    assert window.items == ref


def test_popular_of_an_empty_log(log: BehaviorLog) -> None:
    w = log.popular(n_buckets=45, top=5)
    assert w.end_bucket is None and w.items == []


def test_drop_old_buckets(log: BehaviorLog) -> None:
    ev = frame(30, step=40)  # buckets 12 .. 26
    log.append(ev, slide_s=80)
    before = log.bucket_table()
    removed = log.drop_buckets_before(20)
    after = log.bucket_table()
    assert removed == before.filter(pl.col("bucket") < 20).height > 0
    assert after["bucket"].min() == 20
    # The current window's top is unchanged when it only covers kept buckets.
    end = int(before["bucket"].max())
    assert log.popular(n_buckets=5, top=3).items == top_from_buckets(
        before, end_bucket=end, n_buckets=5, top=3
    )


def test_recommendation_history_and_previous_lists(log: BehaviorLog) -> None:
    assert log.previous_lists(["u1"]).height == 0
    rows = pl.DataFrame(
        {
            "user_id": ["u1", "u2", "u1"],
            "ts": [10, 11, 12],
            "model_version": ["m-1", "m-1", "m-2"],
            "items": ['["a","b"]', '["c"]', '["d","e","f"]'],
            "scores": ["[0.5,0.25]", "[1.0]", "[3.0,2.0,1.0]"],
            "realised_reward": [None, 0.0, 2.5],
            "hits": [None, 0, 2],
        }
    )
    log.append_recommendations(rows)
    prev = log.previous_lists(["u1", "u2", "u9"]).sort("user_id", "item_id")
    assert prev.rows() == [("u1", "d"), ("u1", "e"), ("u1", "f"), ("u2", "c")]
    hist = log.read_recommendations()
    assert hist["user_id"].to_list() == ["u1", "u2", "u1"]
    assert hist["realised_reward"].to_list() == [None, 0.0, 2.5]
    assert hist["hits"].to_list() == [None, 0, 2]
    assert hist["model_version"].to_list() == ["m-1", "m-1", "m-2"]


@pytest.mark.integration
def test_mysql_path_without_returning_is_idempotent(mariadb_url: str) -> None:
    """MySQL proper has no INSERT ... RETURNING; the pre-select fallback must give the same."""
    blog = BehaviorLog(
        mariadb_url, prefix="rltnoret_" + np.random.default_rng().bytes(4).hex() + "_"
    )
    blog.engine.dialect.insert_executemany_returning = False
    try:
        assert blog.append(frame(8), slide_s=80).new.height == 8
        res = blog.append(frame(8, start=4), slide_s=80)
        assert res.new["event_id"].to_list() == ["e8", "e9", "e10", "e11"]
        assert res.duplicates == 4 and blog.count() == 12
        assert blog.bucket_table()["events"].sum() == 12
    finally:
        blog.drop_schema()
        blog.dispose()


def test_unreachable_database_is_a_transient_error(tmp_path: object) -> None:
    blog = BehaviorLog("sqlite:////nonexistent-dir/x/log.db")
    with pytest.raises(sa.exc.OperationalError) as info:
        blog.append(frame(1), slide_s=80)
    assert is_transient(info.value)
    assert not is_transient(ValueError("x"))
