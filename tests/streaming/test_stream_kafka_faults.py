"""The stream worker on Kafka under faults: a rebalance while batches are in the sinks (two
consumers, one joins late and leaves early), the broker restarting without its data, and
malformed records.  The behaviour log must end up with every event exactly once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from recloop.stores import MemoryStore
from recloop.streaming.buses import open_bus
from recloop.streaming.buses.kafka import KafkaBus
from recloop.streaming.log import BehaviorLog
from recloop.streaming.operators import popular_reference
from recloop.streaming.replay import replay, replay_events
from recloop.streaming.runner import WorkerStats, run_worker_async
from recloop.streaming.settings import StreamSettings

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


class SlowLog(BehaviorLog):
    """A behaviour log whose batches take a while, so that rebalances and restarts land
    while a batch is in the sinks."""

    delay_s = 0.15
    batches = 0

    def append(self, events: pl.DataFrame, **kw: Any) -> Any:
        time.sleep(self.delay_s)
        out = super().append(events, **kw)
        self.batches += 1
        return out


def settings(names: dict[str, str], **kw: Any) -> StreamSettings:
    base: dict[str, Any] = {
        "stream": names["stream"],
        "group": names["group"],
        "batch_size": 100,
        "block_ms": 100,
        "popular_refresh_s": 0.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "window_s": 10**7,
        "slide_s": 100,
        "top": 10,
        "allowed_lateness_s": None,
    }
    base.update(kw)
    return StreamSettings(**base)


async def wait_for(what: str, check: Any, timeout_s: float = 90.0, state: Any = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            now = await state() if state is not None else ""
            raise AssertionError(f"timed out waiting for {what} {now}")
        await asyncio.sleep(0.1)


async def test_rebalance_while_processing_logs_every_event_once(
    kafka_broker: Any, kafka_topic: str, names: dict[str, str], tmp_path: Path, make_dataset: Any
) -> None:
    events = replay_events(make_dataset(4000, n_users=60, n_items=80, span_s=50_000))
    url = kafka_broker.url(kafka_topic)
    producer = open_bus(url)
    await replay(events, producer, batch_size=500)
    await producer.close()
    db = f"sqlite:///{tmp_path / 'log.db'}"
    logs = [SlowLog(db), SlowLog(db)]  # one per worker, to see whose batches went in
    logs[0].create_schema()
    log = logs[0]
    store = MemoryStore()
    s = settings(names, bus_url=url)
    buses = [open_bus(url), open_bus(url)]
    stops = [asyncio.Event(), asyncio.Event()]

    def worker(i: int) -> asyncio.Task[WorkerStats]:
        return asyncio.create_task(
            run_worker_async(
                s, bus=buses[i], store=store, log=logs[i], stop=stops[i], consumer=f"w{i}"
            )
        )

    async def batches_of(i: int, n: int) -> bool:
        return logs[i].batches >= n

    try:
        first = worker(0)
        await wait_for("the first worker's batches", lambda: batches_of(0, 2))
        second = worker(1)  # joins: the first one's partitions are revoked mid-batch
        c1 = buses[1]

        async def second_has_partitions() -> bool:
            cons = list(c1._consumers.values())  # type: ignore[attr-defined]
            return bool(cons and cons[0].partitions)

        await wait_for("the second worker's partitions", second_has_partitions)
        await wait_for("the second worker's batches", lambda: batches_of(1, 2))
        assert log.count() < events.height  # it leaves mid-stream
        stops[1].set()  # leaves (commits, then leaves the group): another rebalance
        stats_1 = await asyncio.wait_for(second, 60)
        await buses[1].close()  # as run_worker_async does with a bus of its own
        assert stats_1.batches > 0

        async def all_done() -> bool:
            return (
                await asyncio.to_thread(log.count) == events.height
                and await buses[0].pending_count(s.group) == 0
            )

        async def state() -> str:
            cons = list(buses[0]._consumers.values())  # type: ignore[attr-defined]
            parts = [
                (p, len(st.outstanding), st.next_offset, st.committed)
                for c in cons
                for p, st in c.partitions.items()
            ]
            pending = await buses[0].pending_count(s.group)
            return f"(logged {log.count()}, pending {pending}, partitions {parts})"

        await wait_for("every event logged and committed", all_done, state=state)
        stops[0].set()
        stats_0 = await asyncio.wait_for(first, 60)
        revocations = [c.revocations for c in buses[0]._consumers.values()]  # type: ignore[attr-defined]
        assert revocations and revocations[0] >= 2  # the join and the leave
        assert log.count() == events.height
        stored = log.read_events()
        assert stored["event_id"].n_unique() == events.height
        assert stats_0.logged + stats_1.logged == events.height
        # Counted once each in the popular items, whichever worker logged it.
        ref = popular_reference(
            events["item_id"], events["ts"].to_numpy(), window_s=10**7, slide_s=100, top=10
        )
        assert [c for _, c in await store.get_popular(10)] == [c for _, c in ref]
    finally:
        for st in stops:
            st.set()
        for b in buses:
            await b.close()
        await buses[0].delete()
        for lg in logs:
            lg.dispose()


async def test_broker_restart_without_data_then_republish_logs_every_event_once(
    own_kafka: Any, kafka_topic: str, names: dict[str, str], tmp_path: Path, make_dataset: Any
) -> None:
    """A memory broker restarted loses topics, offsets and the group; the producer publishes
    everything again and the worker, which carried on through the outage, logs each event
    once."""
    events = replay_events(make_dataset(1500, n_users=40, n_items=60, span_s=40_000))
    url = f"kafka://{own_kafka.bootstrap}/{kafka_topic}?session.timeout.ms=2000&partitions=4"
    producer = open_bus(url)
    await replay(events, producer, batch_size=500)
    await producer.close()
    log = SlowLog(f"sqlite:///{tmp_path / 'log.db'}")
    log.create_schema()
    s = settings(names, bus_url=url)
    bus = open_bus(url)
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker_async(s, bus=bus, store=MemoryStore(), log=log, stop=stop, consumer="w")
    )

    async def count() -> int:
        return await asyncio.to_thread(log.count)

    try:
        await wait_for("some batches", lambda: _at_least(count, 300))
        assert await count() < events.height  # the restart lands mid-stream
        own_kafka.kill()
        await asyncio.sleep(0.5)
        own_kafka.start()  # same port, nothing in it
        again = open_bus(url)
        await replay(events, again, batch_size=500)
        await again.close()

        async def all_done() -> bool:
            return await count() == events.height and await bus.pending_count(s.group) == 0

        await wait_for("every event logged and committed", all_done, timeout_s=120)
        stop.set()
        stats = await asyncio.wait_for(task, 60)
        assert log.count() == events.height
        assert log.read_events()["event_id"].n_unique() == events.height
        assert stats.logged == events.height
        assert stats.duplicates > 0  # the republished copies, dropped by the log
    finally:
        stop.set()
        await bus.close()
        log.dispose()


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)


async def test_malformed_records_are_dead_lettered_with_their_reason(
    kafka_broker: Any, kafka_topic: str, names: dict[str, str], tmp_path: Path
) -> None:
    from confluent_kafka import Producer

    url = kafka_broker.url(kafka_topic)
    bus = open_bus(url)
    assert isinstance(bus, KafkaBus)
    good = orjson.dumps({"event_id": "e1", "user_id": "u", "item_id": "i", "ts": 5})
    try:
        await bus.publish(
            [
                b'{"event_id": "x1"}',
                b"garbage",
                b'{"event_id":"x2","user_id":"u1","item_id":"i1","ts":1,"behavior":"clik"}',
                good,
            ]
        )
        # A record without a value (a tombstone) that carries headers.
        raw = Producer({"bootstrap.servers": kafka_broker.bootstrap})
        raw.produce(bus.stream, value=None, key=b"u", headers=[("trace", b"\xff\x00raw")])
        raw.flush(10)
        s = settings(names, bus_url=url, exit_when_idle_s=1.0)
        log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
        stats = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log)
        assert (stats.logged, stats.dead_letters) == (1, 4)
        letters = await bus.read_dead_letters()
        by_reason = sorted(d.reason for d in letters)
        assert by_reason[0].startswith("behavior: unknown value 'clik'")
        assert by_reason[1] == (
            "bus entry without a payload (its fields: trace; the event's JSON goes in field "
            "'e' on Redis Streams, in the record's value on Kafka)"
        )
        assert by_reason[2].startswith("unparsable JSON")
        assert by_reason[3] == "user_id: missing"
        tomb = next(d for d in letters if d.reason.startswith("bus entry"))
        assert tomb.payload == b"" and tomb.fields == {b"trace": b"\xff\x00raw"}
        assert all(d.source_id.count("-") == 1 and d.consumer for d in letters)
        assert log.read_events()["event_id"].to_list() == ["e1"]
        log.dispose()
    finally:
        await bus.delete()
