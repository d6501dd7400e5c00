"""Stream workers leave a heartbeat (throughput and lag) in the online store they share with
the service, for its dashboard."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from recloop.stores import MemoryStore
from recloop.streaming.bus import MemoryBus, open_bus
from recloop.streaming.heartbeat import publish_lag_s
from recloop.streaming.log import BehaviorLog
from recloop.streaming.replay import replay, replay_events
from recloop.streaming.runner import run_worker_async
from recloop.streaming.settings import StreamSettings


def test_publish_lag_reads_redis_entry_ids_only() -> None:
    # Redis ids begin with the append time in ms; the in-process bus counts from 1
    assert publish_lag_s("1700000000000-3", now=1_700_000_005.5) == 5.5
    assert publish_lag_s("1700000009000-0", now=1_700_000_005.0) == 0.0  # clocks disagree
    assert publish_lag_s("12-0", now=1_700_000_005.0) is None
    assert publish_lag_s(None, now=1_700_000_005.0) is None


async def test_a_worker_reports_its_counters_and_backlog(
    names: dict[str, str], tmp_path: Path, make_dataset: Any
) -> None:
    ev = replay_events(make_dataset(300, span_s=30_000))
    bus = MemoryBus(stream=names["stream"])
    await replay(ev, bus)
    store = MemoryStore()
    s = StreamSettings(
        stream=names["stream"], group=names["group"], batch_size=50, block_ms=20,
        exit_when_idle_s=0.2, popular_refresh_s=0.0,
    )  # fmt: skip
    assert await bus.undelivered(s.group) == ev.height  # nothing read yet
    stats = await run_worker_async(
        s, bus=bus, store=store, log=BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}"), consumer="w0"
    )
    beats = await store.get_heartbeats(max_age_s=60)
    assert list(beats) == ["w0"]
    doc = beats["w0"]
    assert doc["state"] == "stopped"  # the last record a worker writes
    assert doc["messages"] == stats.messages == ev.height
    assert doc["logged"] == ev.height
    assert doc["pending"] == 0 and doc["undelivered"] == 0
    assert doc["lag_s"] is None  # the in-process bus's ids carry no time
    assert doc["group"] == s.group and doc["watermark_ts"] == int(ev["ts"].max())


@pytest.mark.integration
async def test_redis_bus_counts_what_the_group_has_not_read(
    names: dict[str, str], redis_url: str
) -> None:
    bus = open_bus(redis_url, stream=names["stream"])
    try:
        await bus.publish([b"{}"] * 5)
        await bus.ensure_group(names["group"])
        assert await bus.undelivered(names["group"]) == 5  # type: ignore[attr-defined]
        got = await bus.read(names["group"], "c", count=2, block_ms=10)
        assert len(got) == 2
        assert await bus.undelivered(names["group"]) == 3  # type: ignore[attr-defined]
        assert await bus.undelivered("no-such-group") is None  # type: ignore[attr-defined]
        # its entry ids carry the append time: the heartbeat's lag
        lag = publish_lag_s(got[-1].id, time.time())
        assert lag is not None and 0 <= lag < 60
    finally:
        await bus.delete()
        await bus.close()
