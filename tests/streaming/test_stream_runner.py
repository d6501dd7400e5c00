"""The worker in one process: every sink written, retries with backoff and no ack while a sink
is down, dead letters, late events, reclaimed redeliveries counted once, and the batched
recommendation refresh with its realised rewards."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl
import pytest
import sqlalchemy as sa
from redis.exceptions import ConnectionError as RedisConnectionError

from recloop.artifacts import load_artifact
from recloop.stores import MemoryStore
from recloop.streaming.bus import MemoryBus
from recloop.streaming.events import EVENT_SCHEMA, encode_events
from recloop.streaming.log import BehaviorLog
from recloop.streaming.operators import bucket_counts, popular_reference
from recloop.streaming.replay import replay, replay_events
from recloop.streaming.runner import Backoff, Stopped, retry, run_worker_async
from recloop.streaming.settings import StreamSettings


def settings(names: dict[str, str], **kw: Any) -> StreamSettings:
    base: dict[str, Any] = {
        "stream": names["stream"],
        "group": names["group"],
        "batch_size": 100,
        "block_ms": 50,
        "exit_when_idle_s": 0.3,
        "claim_interval_s": 0.05,
        "popular_refresh_s": 0.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.4,
        "window_s": 3600,
        "slide_s": 80,
        "top": 5,
    }
    base.update(kw)
    return StreamSettings(**base)


def rows(spec: list[tuple[str, str, str, int, float | None]]) -> pl.DataFrame:
    """(event_id, user, item, ts, reward) → event frame."""
    return pl.DataFrame(
        {
            "event_id": [r[0] for r in spec],
            "user_id": [r[1] for r in spec],
            "item_id": [r[2] for r in spec],
            "ts": [r[3] for r in spec],
            "behavior": [None] * len(spec),
            "rating": [None] * len(spec),
            "reward": [r[4] for r in spec],
        },
        schema=EVENT_SCHEMA,
    )


# ----------------------------------------------------------------------------- retry


def test_backoff_doubles_up_to_the_cap() -> None:
    d = Backoff(initial_s=0.1, max_s=1.0).delays()
    assert [round(next(d), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_retry_waits_between_transient_failures_then_succeeds() -> None:
    calls: list[int] = []
    waits: list[float] = []
    touched: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RedisConnectionError("down")
        return "ok"

    async def touch() -> None:
        touched.append(1)

    out = await retry(
        "x",
        flaky,
        backoff=Backoff(initial_s=0.01, max_s=1.0),
        stop=asyncio.Event(),
        on_wait=touch,
        attempts=waits,
    )
    assert out == "ok" and len(calls) == 3
    assert waits == [0.01, 0.02] and len(touched) == 2


async def test_retry_raises_permanent_errors_at_once() -> None:
    async def bad() -> None:
        raise ValueError("schema mismatch")

    with pytest.raises(ValueError, match="schema mismatch"):
        await retry("x", bad, backoff=Backoff(), stop=asyncio.Event())


async def test_retry_gives_up_when_stopping() -> None:
    stop = asyncio.Event()

    async def down() -> None:
        stop.set()
        raise OSError("connection refused")

    with pytest.raises(Stopped):
        await retry("x", down, backoff=Backoff(initial_s=10), stop=stop)


# ----------------------------------------------------------------------------- end to end


async def test_memory_end_to_end_all_sinks(
    names: dict[str, str], tmp_path: Path, make_dataset: Any
) -> None:
    ds = make_dataset(500, span_s=30_000)
    ev = replay_events(ds)
    bus = MemoryBus(stream=names["stream"])
    await replay(ev, bus)
    bad = [
        b'{"event_id": "x1"}',
        b"garbage",
        b'{"event_id":"x2","user_id":"u1","item_id":"i1","ts":1,"behavior":"clik"}',
    ]
    await bus.publish(bad)
    store = MemoryStore()
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    s = settings(names, recent_len=4)
    stats = await run_worker_async(s, bus=bus, store=store, log=log)

    assert log.count() == ev.height == stats.logged
    assert stats.dead_letters == 3 and stats.messages == ev.height + 3
    assert await bus.pending_count(s.group) == 0
    reasons = [d.reason for d in await bus.read_dead_letters()]
    assert reasons[0] == "user_id: missing"
    assert reasons[1].startswith("unparsable JSON")
    assert reasons[2].startswith("behavior: unknown value 'clik'")
    ref = popular_reference(ev["item_id"], ev["ts"].to_numpy(), window_s=3600, slide_s=80, top=5)
    assert await store.get_popular(5) == ref
    # Recent items: each user's last 4 events (time order), with their rewards.
    last = ev.group_by("user_id", maintain_order=True).agg(
        pl.col("item_id").tail(4), pl.col("reward").tail(4)
    )
    for user, items, rewards in last.iter_rows():
        got = (await store.get_recent([user], n=10))[user]
        assert got == list(zip(items, rewards, strict=True))


async def test_reclaimed_redelivery_is_logged_and_counted_once(
    names: dict[str, str], tmp_path: Path
) -> None:
    ev = rows([(f"e{i}", f"u{i % 4}", f"i{i % 6}", 1000 + 10 * i, 1.0) for i in range(60)])
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(encode_events(ev))
    await bus.ensure_group(names["group"])
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    # A worker read 40 events, committed the first 25 to the log, and died before its ack.
    doomed = await bus.read(names["group"], "doomed", count=40, block_ms=0)
    log.append(ev[:25], slide_s=80)
    # Idle long enough to be claimed (the live worker's own batch in the sinks is not
    # claimed, however long it takes: test_a_slow_batch_is_not_claimed_back_...).
    await asyncio.sleep(1.05)
    s = settings(names, claim_min_idle_ms=1000, allowed_lateness_s=None, recent_len=20)
    store = MemoryStore()
    stats = await run_worker_async(s, bus=bus, store=store, log=log)
    assert stats.claimed == len(doomed) == 40
    assert stats.duplicates == 25 and stats.logged == 35
    assert log.count() == 60
    assert log.read_events()["event_id"].n_unique() == 60
    assert log.bucket_table().sort("bucket", "item_id").equals(bucket_counts(ev, slide_s=80))
    assert await bus.pending_count(names["group"]) == 0
    # The 25 events the dead worker logged but never stored still reach the recent lists,
    # once each (15 events per user, all kept).
    for user, items in ev.group_by("user_id", maintain_order=True).agg("item_id").iter_rows():
        got = (await store.get_recent([user], n=50))[user]
        assert [i for i, _ in got] == items


class SlowLog(BehaviorLog):
    """A behaviour log whose appends take longer than the claim's idle threshold."""

    def append(self, *args: Any, **kw: Any) -> Any:
        time.sleep(0.3)
        return super().append(*args, **kw)


async def test_a_slow_batch_is_not_claimed_back_by_its_own_worker(
    names: dict[str, str], tmp_path: Path
) -> None:
    """The next batch is fetched (with a claim when due) while this one is in the sinks:
    this batch is pending and idle past ``claim_min_idle_ms`` then, but it is not stale."""
    ev = rows([(f"e{i}", f"u{i % 4}", f"i{i % 6}", 1000 + 10 * i, 1.0) for i in range(300)])
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(encode_events(ev))
    log = SlowLog(f"sqlite:///{tmp_path / 'log.db'}")
    s = settings(names, claim_min_idle_ms=100, allowed_lateness_s=None)
    stats = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log)
    assert stats.claimed == 0 and stats.duplicates == 0
    assert stats.logged == 300 and stats.messages == 300
    assert log.count() == 300
    assert await bus.pending_count(names["group"]) == 0


async def test_recent_lists_only_get_events_as_the_log_holds_them(
    names: dict[str, str], tmp_path: Path
) -> None:
    """A logged id reused by another event (other user, item or time) stays out of the
    recent lists, as it stays out of the log; an exact redelivery goes in (once)."""
    bus = MemoryBus(stream=names["stream"])
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    store = MemoryStore()
    s = settings(names, allowed_lateness_s=None, recent_len=5)
    await bus.publish(encode_events(rows([("e1", "u1", "a", 10, 1.0)])))
    await run_worker_async(s, bus=bus, store=store, log=log)
    second = rows(
        [("e1", "u2", "b", 20, 1.0), ("e1", "u1", "a", 10, 1.0), ("e2", "u2", "c", 30, 1.0)]
    )
    await bus.publish(encode_events(second))
    stats = await run_worker_async(s, bus=bus, store=store, log=log)
    assert stats.duplicates == 2 and log.count() == 2
    got = await store.get_recent(["u1", "u2"], n=5)
    assert got == {"u1": [("a", 1.0)], "u2": [("c", 1.0)]}


async def test_late_events_are_logged_counted_and_left_out_of_popular(
    names: dict[str, str], tmp_path: Path
) -> None:
    ev = rows(
        [
            ("e1", "u", "a", 10_000, 1.0),
            ("e2", "u", "b", 10_100, 1.0),
            ("e3", "u", "c", 10_050, 1.0),  # 50 s behind, lateness 60: counted
            ("e4", "u", "d", 9_000, 1.0),  # 1100 s behind: late
        ]
    )
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(encode_events(ev))
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    store = MemoryStore()
    s = settings(names, allowed_lateness_s=60, window_s=4000, slide_s=80, top=10)
    stats = await run_worker_async(s, bus=bus, store=store, log=log)
    assert stats.late_events == 1 and stats.logged == 4
    assert log.count() == 4
    assert sorted(i for i, _ in await store.get_popular(10)) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- faults


async def test_database_down_retries_without_ack_then_recovers(
    names: dict[str, str], tmp_path: Path
) -> None:
    """SQLite in a directory that does not exist yet: unreachable until it is created."""
    ev = rows([(f"e{i}", "u", f"i{i}", 1000 + i, 1.0) for i in range(30)])
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(encode_events(ev))
    db_dir = tmp_path / "later"
    log = BehaviorLog(f"sqlite:///{db_dir / 'log.db'}")
    stop = asyncio.Event()
    s = settings(names, exit_when_idle_s=None)
    task = asyncio.create_task(
        run_worker_async(s, bus=bus, store=MemoryStore(), log=log, stop=stop, consumer="w")
    )
    await asyncio.sleep(0.8)
    # Still retrying: nothing acknowledged, everything pending at this worker.
    assert not task.done()
    assert await bus.pending_count(s.group) == 30
    db_dir.mkdir()
    for _ in range(100):
        if await bus.pending_count(s.group) == 0:
            break
        await asyncio.sleep(0.05)
    stop.set()
    stats = await task
    assert await bus.pending_count(s.group) == 0
    assert log.count() == 30
    assert stats.retries >= 3


@pytest.mark.integration
async def test_postgres_unreachable_backs_off_and_keeps_batch_pending(
    names: dict[str, str],
) -> None:
    ev = rows([(f"e{i}", "u", f"i{i}", 1000 + i, 1.0) for i in range(20)])
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(encode_events(ev))
    log = BehaviorLog("postgresql+psycopg://postgres@127.0.0.1:1/test")
    stop = asyncio.Event()
    s = settings(names, exit_when_idle_s=None, backoff_initial_s=0.05, backoff_max_s=10.0)
    task = asyncio.create_task(
        run_worker_async(s, bus=bus, store=MemoryStore(), log=log, stop=stop, consumer="w")
    )
    await asyncio.sleep(1.0)
    assert await bus.pending_count(s.group) == 20
    # Stop while waiting to retry: the worker exits, the batch stays pending for others.
    stop.set()
    stats = await asyncio.wait_for(task, 5)
    assert stats.logged == 0 and stats.retries >= 3
    assert await bus.pending_count(s.group) == 20
    assert len(await bus.read_own_pending(s.group, "w", count=100)) == 20


async def test_batch_the_log_rejects_for_good_is_dead_lettered_and_worker_goes_on(
    names: dict[str, str], tmp_path: Path
) -> None:
    class Picky(BehaviorLog):
        def append(self, events: pl.DataFrame, **kw: Any) -> Any:
            if "poison" in events["item_id"].to_list():
                raise sa.exc.DataError("INSERT", {}, Exception("value too long"))
            return super().append(events, **kw)

    first = rows([("p1", "u", "poison", 1, 1.0), ("p2", "u", "x", 2, 1.0)])
    second = rows([("g1", "u", "y", 3, 1.0)])
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(encode_events(first))
    log = Picky(f"sqlite:///{tmp_path / 'log.db'}")
    s = settings(names, batch_size=2)
    task = asyncio.create_task(run_worker_async(s, bus=bus, store=MemoryStore(), log=log))
    await asyncio.sleep(0.1)
    await bus.publish(encode_events(second))
    stats = await task
    letters = await bus.read_dead_letters()
    assert [orjson.loads(d.payload)["event_id"] for d in letters] == ["p1", "p2"]
    assert all(d.reason.startswith("behaviour log rejected the batch: DataError") for d in letters)
    assert log.read_events()["event_id"].to_list() == ["g1"]
    assert stats.dead_letters == 2
    assert await bus.pending_count(s.group) == 0


# ----------------------------------------------------------------------------- recommendations


async def test_refresh_is_one_inference_per_batch_and_logs_realised_reward(
    names: dict[str, str], tmp_path: Path, make_artifact: Any
) -> None:
    users = ["u1", "u2", "u3"]
    items = [f"i{k}" for k in range(1, 21)]
    art = load_artifact(make_artifact(tmp_path / "art", user_ids=users, item_ids=items))
    calls: list[int] = []
    original = art.recommend

    def spy(*a: Any, **kw: Any) -> Any:
        calls.append(int(a[0].shape[0]))
        return original(*a, **kw)

    object.__setattr__(art, "recommend", spy)
    bus = MemoryBus(stream=names["stream"])
    store = MemoryStore()
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    s = settings(names, rec_n=5, recent_len=10, batch_size=100)
    batch1 = rows(
        [("a1", "u1", "i1", 100, 1.0), ("a2", "u2", "i2", 101, 1.0), ("a3", "u1", "i3", 102, 1.0)]
    )
    await bus.publish(encode_events(batch1))
    await run_worker_async(s, bus=bus, store=store, log=log, artifact=art)
    assert calls == [2]  # one call, both users of the batch
    hist = log.read_recommendations()
    assert hist["user_id"].to_list() == ["u1", "u2"]
    assert hist["realised_reward"].to_list() == [None, None]
    assert hist["ts"].to_list() == [102, 101]
    assert hist["model_version"].to_list() == [art.model_version] * 2
    lists = {u: orjson.loads(x) for u, x in zip(hist["user_id"], hist["items"], strict=True)}
    # Consumed items are never recommended; the store holds the same list as the log.
    assert not {"i1", "i3"} & set(lists["u1"]) and "i2" not in lists["u2"]
    assert len(lists["u1"]) == 5
    got = await store.get_recommendations("u1")
    assert got is not None and [i for i, _ in got[0]] == lists["u1"] and got[1] == art.model_version

    # u1 consumes two items of its list (rewards 2 and 0.5) and one other; u2 nothing of its.
    other = next(i for i in items if i not in lists["u1"] and i not in {"i1", "i3"})
    miss = next(i for i in items if i not in lists["u2"] and i != "i2")
    batch2 = rows(
        [
            ("b1", "u1", lists["u1"][0], 200, 2.0),
            ("b2", "u1", other, 201, 7.0),
            ("b3", "u1", lists["u1"][3], 202, 0.5),
            ("b4", "u2", miss, 203, 4.0),
            ("b5", "u3", "i9", 204, 1.0),
        ]
    )
    await bus.publish(encode_events(batch2))
    await run_worker_async(s, bus=bus, store=store, log=log, artifact=art)
    assert calls == [2, 3]
    hist = log.read_recommendations()
    new = {r["user_id"]: r for r in hist[2:].iter_rows(named=True)}
    assert (new["u1"]["realised_reward"], new["u1"]["hits"]) == (2.5, 2)
    assert (new["u2"]["realised_reward"], new["u2"]["hits"]) == (0.0, 0)
    assert (new["u3"]["realised_reward"], new["u3"]["hits"]) == (None, None)
    consumed_u1 = {"i1", "i3", lists["u1"][0], other, lists["u1"][3]}
    assert not consumed_u1 & set(orjson.loads(new["u1"]["items"]))


async def test_unknown_users_and_items_still_get_lists(
    names: dict[str, str], tmp_path: Path, make_artifact: Any
) -> None:
    art = load_artifact(
        make_artifact(tmp_path / "art", user_ids=["u1"], item_ids=[f"i{k}" for k in range(1, 9)])
    )
    bus = MemoryBus(stream=names["stream"])
    store = MemoryStore()
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    await bus.publish(
        encode_events(
            rows([("a", "stranger", "new-item", 5, 1.0), ("b", "stranger", "i2", 6, 1.0)])
        )
    )
    await run_worker_async(settings(names, rec_n=3), bus=bus, store=store, log=log, artifact=art)
    got = await store.get_recommendations("stranger")
    assert got is not None
    ranked = [i for i, _ in got[0]]
    assert len(ranked) == 3 and "i2" not in ranked and set(ranked) <= {f"i{k}" for k in range(1, 9)}
    scores = [sc for _, sc in got[0]]
    assert scores == sorted(scores, reverse=True) and np.isfinite(scores).all()
