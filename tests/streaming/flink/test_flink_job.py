"""The Flink job for real: a Tansu broker, PostgreSQL, Redis and a local Flink mini-cluster.

One scenario, two job runs (15-60 s of JVM start-up each, so they are shared by the tests):
the first half of the events is published and the job runs until idle, then is cancelled
after one more checkpoint (as a crash leaves it); the second half is published and a second
run resumes from that checkpoint and drains.  The same events also go through the Redis
Streams runner's code (in-process, memory bus), whose popular list the job must reproduce.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import pytest

from recloop.stores import MemoryStore, RedisStore
from recloop.streaming.bus import MemoryBus
from recloop.streaming.events import EVENT_SCHEMA, encode_events
from recloop.streaming.flink.runner import FlinkJobConfig, FlinkRunReport, run_flink
from recloop.streaming.log import BehaviorLog
from recloop.streaming.operators import popular_reference
from recloop.streaming.runner import run_worker_async
from recloop.streaming.settings import StreamSettings

T = TypeVar("T")
pytestmark = [pytest.mark.flink, pytest.mark.slow, pytest.mark.integration]

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW_S, SLIDE_S, TOP, LATENESS_S, RECENT = 3600, 80, 10, 300, 5
BAD = [
    b"garbage",
    b'{"event_id": "x1", "item_id": "i1", "ts": 1000100}',
    b'{"event_id":"x2","user_id":"u1","item_id":"i1","ts":1000100,"behavior":"clik"}',
]


def make_events(n: int = 3000, *, seed: int = 0) -> pl.DataFrame:
    """Events over two hours of event time, shuffled within +-60 s (less than the allowed
    lateness: nothing is late for either runner); a few popular items, ties possible."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(1_000_000, 1_000_000 + 7200, n)) + rng.integers(-60, 60, n)
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": [f"u{u}" for u in rng.integers(0, 60, n)],
            "item_id": [f"i{int(v) % 40}" for v in rng.zipf(1.6, n)],
            "ts": ts.astype(np.int64),
            "behavior": rng.choice(["pv", "buy"], n).tolist(),
            "rating": [None] * n,
            "reward": rng.integers(0, 3, n).astype(np.float64),
        },
        schema=EVENT_SCHEMA,
    )


def publish(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for key, value in payloads:
        producer.produce(topic, value, key=key)
    assert producer.flush(30) == 0


def keyed(events: pl.DataFrame) -> list[tuple[bytes, bytes]]:
    """(user id, JSON) per event: one user's events stay in order within a partition."""
    users = [u.encode() for u in events["user_id"].to_list()]
    return list(zip(users, encode_events(events), strict=True))


async def in_store(tag: str, fn: Callable[[RedisStore], Awaitable[T]]) -> T:
    """``fn`` on a Redis store under the test's prefix, opened and closed in this loop."""
    store = RedisStore(REDIS_URL, prefix=f"{tag}:")
    try:
        return await fn(store)
    finally:
        await store.close()


@dataclass
class Scenario:
    events: pl.DataFrame
    runs: list[FlinkRunReport]
    logged: pl.DataFrame
    popular: list[tuple[str, float]]
    recent: dict[str, list[tuple[str, float]]]


@pytest.fixture(scope="module")
def scenario(
    flink_python: str, flink_kafka_broker: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    from confluent_kafka.admin import AdminClient, NewTopic

    tag = f"rlf{uuid.uuid4().hex[:8]}"
    topic = f"{tag}-events"
    admin = AdminClient({"bootstrap.servers": flink_kafka_broker})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result()
    events = make_events()
    half = events.height // 2
    ck = tmp_path_factory.mktemp("flink-checkpoints")
    config = FlinkJobConfig(
        bus_url=f"kafka://{flink_kafka_broker}/{topic}",
        database_url=POSTGRES_URL,
        store_url=REDIS_URL,
        table_prefix=f"{tag}_",
        store_prefix=f"{tag}:",
        group=f"{tag}-group",
        window_s=WINDOW_S,
        slide_s=SLIDE_S,
        top=TOP,
        allowed_lateness_s=LATENESS_S,
        recent_len=RECENT,
        checkpoint_dir=ck,
        checkpoint_interval_s=2.0,
        exit_when_idle_s=4.0,
        stop_mode="cancel",
        python=flink_python,
    )
    log = BehaviorLog(POSTGRES_URL, prefix=f"{tag}_")
    try:
        publish(flink_kafka_broker, topic, [*keyed(events[:half]), *((b"x", b) for b in BAD)])
        first = run_flink(config)
        publish(flink_kafka_broker, topic, keyed(events[half:]))
        second = run_flink(dataclasses.replace(config, stop_mode="drain"))
        logged = log.read_events()
        popular = asyncio.run(in_store(tag, lambda store: store.get_popular(TOP)))
        users = sorted(set(events["user_id"].to_list()))
        recent = asyncio.run(in_store(tag, lambda store: store.get_recent(users, n=RECENT + 3)))
        yield Scenario(
            events=events, runs=[first, second], logged=logged, popular=popular, recent=recent
        )
    finally:
        asyncio.run(in_store(tag, lambda store: store.delete_all()))
        log.drop_schema()
        log.dispose()


@dataclass
class RunnerResult:
    popular: list[tuple[str, float]]
    recent: dict[str, list[tuple[str, float]]]


def redis_runner(events: pl.DataFrame, tmp_path: Path) -> RunnerResult:
    """The Redis Streams runner's popular and recent lists for the same events (its worker
    code on a memory bus and store)."""

    async def go() -> RunnerResult:
        bus = MemoryBus(stream="flink-equivalence")
        await bus.publish([*encode_events(events), *BAD])
        store = MemoryStore()
        log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
        settings = StreamSettings(
            stream="flink-equivalence",
            batch_size=500,
            block_ms=50,
            exit_when_idle_s=0.3,
            popular_refresh_s=0.0,
            window_s=WINDOW_S,
            slide_s=SLIDE_S,
            top=TOP,
            allowed_lateness_s=LATENESS_S,
            recent_len=RECENT,
        )
        stats = await run_worker_async(settings, bus=bus, store=store, log=log)
        assert stats.late_events == 0
        users = sorted(set(events["user_id"].to_list()))
        return RunnerResult(
            popular=await store.get_popular(TOP),
            recent=await store.get_recent(users, n=RECENT + 3),
        )

    return asyncio.run(go())


def test_the_log_holds_every_valid_event_exactly_once(scenario: Scenario) -> None:
    cols = list(EVENT_SCHEMA)
    got = scenario.logged.select(cols).sort("event_id")
    want = scenario.events.select(cols).sort("event_id")
    assert got.height == want.height  # malformed records dropped, nothing twice
    assert got.equals(want)


def test_the_second_run_resumes_from_the_first_runs_checkpoint(scenario: Scenario) -> None:
    first, second = scenario.runs
    assert first.restored_from is None and first.savepoint is None
    assert second.restored_from is not None
    assert Path(second.restored_from).name.startswith("chk-")
    assert first.job_id in second.restored_from
    assert second.savepoint is not None
    # That the restored run neither re-read the first half nor lost its window state is
    # what test_popular_items_equal_the_redis_runners checks: either would change counts.


def test_popular_items_equal_the_redis_runners(scenario: Scenario, tmp_path: Path) -> None:
    events = scenario.events
    reference = popular_reference(
        events["item_id"], events["ts"].to_numpy(), window_s=WINDOW_S, slide_s=SLIDE_S, top=TOP
    )
    assert len(reference) == TOP
    assert scenario.popular == reference
    assert redis_runner(events, tmp_path).popular == reference


def test_recent_items_equal_the_redis_runners(scenario: Scenario, tmp_path: Path) -> None:
    want = redis_runner(scenario.events, tmp_path).recent
    assert all(len(v) == RECENT for v in want.values())  # every user has more events
    assert scenario.recent == want
