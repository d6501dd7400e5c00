"""The replay producer: event-time order, deterministic ids, throttling, and republishing after
the bus lost entries (simulated, and a real Redis restart)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from recloop.data.dataset import PreparedDataset
from recloop.errors import ConfigError
from recloop.streaming.bus import MemoryBus, RedisStreamBus
from recloop.streaming.buses import open_bus
from recloop.streaming.replay import (
    dataset_tag,
    load_replay_events,
    replay,
    replay_events,
    schedule,
)
from recloop.streaming.runner import Backoff


def small() -> PreparedDataset:
    # Rows are stored sorted by (user, time); replay must re-sort by time only.
    return PreparedDataset.from_arrays(
        user=np.array([1, 1, 2, 2, 3]),
        item=np.array([1, 2, 3, 1, 2]),
        timestamp=np.array([30, 10, 20, 10, 5]),
        reward=np.array([1.0, 0.0, 2.0, 1.0, 0.5]),
        user_ids=["alice", "bob", "carol"],
        item_ids=["x", "y", "z"],
    )


def test_replay_events_are_in_time_order_with_raw_ids() -> None:
    ds = small()
    # Stored order (user, ts): (1,10,y) (1,30,x) (2,10,x) (2,20,z) (3,5,y) → rows 0..4.
    ev = replay_events(ds)
    tag = dataset_tag(ds)
    assert ev["event_id"].to_list() == [f"{tag}-{r}" for r in (4, 0, 2, 3, 1)]
    assert ev["user_id"].to_list() == ["carol", "alice", "bob", "bob", "alice"]
    assert ev["item_id"].to_list() == ["y", "y", "x", "z", "x"]
    assert ev["ts"].to_list() == [5, 10, 10, 20, 30]
    assert ev["reward"].to_list() == [0.5, 0.0, 1.0, 2.0, 1.0]
    assert ev["behavior"].null_count() == 5 and ev["rating"].null_count() == 5
    assert replay_events(ds, limit=2)["event_id"].to_list() == [f"{tag}-4", f"{tag}-0"]


def test_extra_behavior_and_rating_are_replayed() -> None:
    ds = dataclasses.replace(
        small(),
        extra={
            "behavior": np.array(["pv", "buy", "pv", "cart", "fav"], dtype=object),
            "rating": np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
        },
    )
    ev = replay_events(ds)
    assert ev["behavior"].to_list() == ["fav", "pv", "pv", "cart", "buy"]
    assert ev["rating"].to_list() == [5.0, 1.0, 3.0, 4.0, 2.0]


def test_event_ids_are_stable_across_loads(tmp_path: Path, make_dataset: Any) -> None:
    make_dataset(50).save(tmp_path / "ds")
    a = load_replay_events(tmp_path / "ds")
    b = load_replay_events(tmp_path / "ds")
    assert a["event_id"].to_list() == b["event_id"].to_list()
    assert a["event_id"].n_unique() == 50
    manifest = orjson.loads((tmp_path / "ds" / "manifest.json").read_bytes())
    assert a["event_id"][0].startswith(manifest["files"]["events.arrow"][:8] + "-")


def test_schedule() -> None:
    ev = replay_events(small())
    assert schedule(ev, rate=None, speed=None).tolist() == [0.0] * 5
    assert schedule(ev, rate=2.0, speed=None).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert schedule(ev, rate=None, speed=5.0).tolist() == [0.0, 1.0, 1.0, 3.0, 5.0]
    with pytest.raises(ConfigError, match="not both"):
        schedule(ev, rate=1.0, speed=1.0)
    with pytest.raises(ConfigError, match="--rate must be > 0"):
        schedule(ev, rate=0.0, speed=None)


async def test_replay_publishes_everything_in_order(
    names: dict[str, str], make_dataset: Any
) -> None:
    ev = replay_events(make_dataset(120))
    bus = MemoryBus(stream=names["stream"])
    stats = await replay(ev, bus, batch_size=50)
    assert (stats.events, stats.published, stats.restarts) == (120, 120, 0)
    got = [orjson.loads(m.payload)["event_id"] for m in await bus.read_all()]
    assert got == ev["event_id"].to_list()


async def test_rate_throttles(names: dict[str, str], make_dataset: Any) -> None:
    ev = replay_events(make_dataset(21))
    bus = MemoryBus(stream=names["stream"])
    start = time.monotonic()
    await replay(ev, bus, rate=100.0, batch_size=5)
    # The last event is due 20 / 100 s after the first.
    assert time.monotonic() - start >= 0.2
    assert await bus.length() == 21


class ForgetfulBus(MemoryBus):
    """Loses everything once, after ``forget_after`` appends, like Redis restarting empty."""

    def __init__(self, *, stream: str, forget_after: int, fail_once: bool) -> None:
        super().__init__(stream=stream)
        self.forget_after = forget_after
        self.fail_once = fail_once
        self.calls = 0

    async def publish_counted(self, payloads: Sequence[bytes], *, counter: str) -> int:
        self.calls += 1
        if self.calls == self.forget_after:
            self._entries.clear()
            self._counters.clear()
            if self.fail_once:
                raise ConnectionError("connection reset by peer")
        return await super().publish_counted(payloads, counter=counter)


@pytest.mark.parametrize("fail_once", [True, False])
async def test_replay_starts_over_when_the_bus_lost_entries(
    names: dict[str, str], make_dataset: Any, fail_once: bool
) -> None:
    ev = replay_events(make_dataset(100))
    bus = ForgetfulBus(stream=names["stream"], forget_after=3, fail_once=fail_once)
    stats = await replay(ev, bus, batch_size=20, backoff=Backoff(initial_s=0.01, max_s=0.02))
    assert stats.restarts == 1
    got = {orjson.loads(m.payload)["event_id"] for m in await bus.read_all()}
    assert got == set(ev["event_id"].to_list())


@pytest.mark.integration
@pytest.mark.slow
async def test_redis_restart_during_replay_loses_nothing(
    names: dict[str, str], own_redis: Any, make_dataset: Any
) -> None:
    """A Redis of the test's own is killed (without persistence) and started again in the
    middle of a replay; the shared Redis is never touched."""
    ev = replay_events(make_dataset(3000))
    bus = RedisStreamBus(own_redis.url, stream=names["stream"])
    try:
        task = asyncio.create_task(
            replay(ev, bus, rate=4000.0, batch_size=100, backoff=Backoff(initial_s=0.05, max_s=0.3))
        )
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_redis.kill)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(own_redis.start)
        stats = await asyncio.wait_for(task, 60)
        got = {orjson.loads(m.payload)["event_id"] for m in await bus.read_all()}
        assert got == set(ev["event_id"].to_list())
        assert stats.restarts >= 1
    finally:
        await bus.close()


@pytest.mark.kafka
@pytest.mark.slow
async def test_kafka_broker_restart_during_replay_loses_nothing(
    names: dict[str, str], own_kafka: Any, kafka_topic: str, make_dataset: Any
) -> None:
    """A memory broker of the test's own is killed and started again in the middle of a
    replay: the offsets starting over tell the replay that the topic lost its records."""
    ev = replay_events(make_dataset(3000))
    url = f"kafka://{own_kafka.bootstrap}/{kafka_topic}?partitions=2&message.timeout.ms=3000"
    bus = open_bus(url, timeout_s=1.0)
    try:
        task = asyncio.create_task(
            replay(ev, bus, rate=4000.0, batch_size=100, backoff=Backoff(initial_s=0.05, max_s=0.3))
        )
        await asyncio.sleep(0.3)
        await asyncio.to_thread(own_kafka.kill)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(own_kafka.start)
        stats = await asyncio.wait_for(task, 90)
        got = {orjson.loads(m.payload)["event_id"] for m in await bus.read_all()}
        assert got == set(ev["event_id"].to_list())
        assert stats.restarts >= 1
    finally:
        await bus.close()
