"""One contract suite for both buses: the in-process bus and (integration) Redis Streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from recloop.errors import ConfigError
from recloop.streaming.bus import EventBus, MemoryBus, RedisStreamBus, is_in_process, open_bus
from recloop.streaming.events import DeadLetter


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
async def bus(
    request: pytest.FixtureRequest, names: dict[str, str], redis_url: str
) -> AsyncIterator[EventBus]:
    b: EventBus
    if request.param == "memory":
        b = MemoryBus(stream=names["stream"])
    else:
        b = RedisStreamBus(redis_url, stream=names["stream"])
    try:
        yield b
    finally:
        await b.delete()
        await b.close()


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [f'{{"n": {i}}}'.encode() for i in range(start, start + n)]


async def test_publish_read_ack(bus: EventBus) -> None:
    ids = await bus.publish(payloads(5))
    assert len(ids) == 5 and len(set(ids)) == 5
    assert await bus.length() == 5
    await bus.ensure_group("g")
    first = await bus.read("g", "c1", count=3, block_ms=0)
    assert [m.payload for m in first] == payloads(3)
    assert [m.id for m in first] == ids[:3]
    second = await bus.read("g", "c2", count=10, block_ms=0)
    assert [m.payload for m in second] == payloads(2, 3)
    assert await bus.read("g", "c1", count=10, block_ms=0) == []
    assert await bus.pending_count("g") == 5
    assert await bus.ack("g", [m.id for m in first]) == 3
    assert await bus.ack("g", [m.id for m in first]) == 0  # already acknowledged
    assert await bus.pending_count("g") == 2


async def test_group_created_later_still_reads_from_the_start(bus: EventBus) -> None:
    await bus.publish(payloads(2))
    await bus.ensure_group("late")
    await bus.ensure_group("late")  # idempotent
    assert len(await bus.read("late", "c", count=10, block_ms=0)) == 2


async def test_groups_are_independent(bus: EventBus) -> None:
    await bus.publish(payloads(3))
    for g in ("a", "b"):
        await bus.ensure_group(g)
        assert len(await bus.read(g, "c", count=10, block_ms=0)) == 3


async def test_blocking_read_wakes_on_publish(bus: EventBus) -> None:
    await bus.ensure_group("g")

    async def later() -> None:
        await asyncio.sleep(0.1)
        await bus.publish(payloads(1))

    task = asyncio.create_task(later())
    got = await bus.read("g", "c", count=10, block_ms=3000)
    await task
    assert [m.payload for m in got] == payloads(1)


async def test_blocking_read_times_out_empty(bus: EventBus) -> None:
    await bus.ensure_group("g")
    assert await bus.read("g", "c", count=10, block_ms=50) == []


async def test_own_pending_is_redelivered_to_the_same_consumer(bus: EventBus) -> None:
    await bus.publish(payloads(4))
    await bus.ensure_group("g")
    got = await bus.read("g", "c1", count=3, block_ms=0)
    await bus.ack("g", [got[0].id])
    again = await bus.read_own_pending("g", "c1", count=10)
    assert [m.id for m in again] == [m.id for m in got[1:]]
    assert await bus.read_own_pending("g", "other", count=10) == []


async def test_stale_entries_of_a_dead_consumer_are_claimed(bus: EventBus) -> None:
    await bus.publish(payloads(3))
    await bus.ensure_group("g")
    dead = await bus.read("g", "dead", count=3, block_ms=0)
    # Not idle long enough yet.
    assert await bus.claim_stale("g", "alive", min_idle_ms=60_000, count=10) == []
    await asyncio.sleep(0.12)
    claimed = await bus.claim_stale("g", "alive", min_idle_ms=100, count=10)
    assert [m.id for m in claimed] == [m.id for m in dead]
    assert [m.payload for m in claimed] == payloads(3)
    # Now they are the claimer's: its own-pending list has them, the dead one's is empty.
    assert len(await bus.read_own_pending("g", "alive", count=10)) == 3
    assert await bus.read_own_pending("g", "dead", count=10) == []
    assert await bus.ack("g", [m.id for m in claimed]) == 3
    assert await bus.pending_count("g") == 0


async def test_touch_keeps_entries_from_being_claimed(bus: EventBus) -> None:
    await bus.publish(payloads(2))
    await bus.ensure_group("g")
    mine = await bus.read("g", "busy", count=2, block_ms=0)
    await asyncio.sleep(0.12)
    await bus.touch("g", "busy", [m.id for m in mine])
    assert await bus.claim_stale("g", "other", min_idle_ms=100, count=10) == []


async def test_dead_letters_keep_payload_and_reason(bus: EventBus) -> None:
    await bus.dead_letter(
        [DeadLetter("1-0", b"{bad", "unparsable JSON"), DeadLetter("2-0", b"[]", "not an object")],
        consumer="w1",
    )
    got = await bus.read_dead_letters()
    assert [(d.source_id, d.payload, d.reason, d.consumer) for d in got] == [
        ("1-0", b"{bad", "unparsable JSON", "w1"),
        ("2-0", b"[]", "not an object", "w1"),
    ]
    assert await bus.length() == 0  # the event stream is untouched


async def test_publish_counted_adds_to_the_counter(bus: EventBus) -> None:
    key = f"{bus.stream}:counter"
    assert await bus.publish_counted(payloads(3), counter=key) == 3
    assert await bus.publish_counted(payloads(2), counter=key) == 5
    assert await bus.length() == 5
    if isinstance(bus, RedisStreamBus):
        await bus._client.delete(key)


@pytest.mark.integration
async def test_redis_group_is_recreated_when_redis_lost_it(
    names: dict[str, str], redis_url: str
) -> None:
    bus = RedisStreamBus(redis_url, stream=names["stream"])
    try:
        await bus.publish(payloads(2))
        await bus.ensure_group("g")
        got = await bus.read("g", "c", count=10, block_ms=0)
        # What a restart without persistence does: stream and group are gone.
        await bus.delete()
        assert await bus.ack("g", [m.id for m in got]) == 0
        await bus.publish(payloads(1, 7))
        again = await bus.read("g", "c", count=10, block_ms=0)
        assert [m.payload for m in again] == payloads(1, 7)
    finally:
        await bus.delete()
        await bus.close()


@pytest.mark.integration
async def test_redis_publish_loads_its_script_again_when_redis_lost_it(
    names: dict[str, str], redis_url: str
) -> None:
    """publish is one script call: a server that no longer knows the script (restart,
    SCRIPT FLUSH; here a sha it never saw) gets it loaded again, and the entries are the
    same as XADD's, one field each, in order."""
    import redis.asyncio as aioredis

    bus = RedisStreamBus(redis_url, stream=names["stream"])
    raw = aioredis.from_url(redis_url)
    try:
        bus._publish_script.sha = "0" * 40  # what the server has never seen
        ids = await bus.publish(payloads(3))
        ids += await bus.publish(payloads(1, 3))
        entries = await raw.xrange(names["stream"])
        assert [e[0].decode() for e in entries] == ids
        assert [e[1] for e in entries] == [{b"e": p} for p in payloads(4)]
    finally:
        await raw.aclose()
        await bus.delete()
        await bus.close()


def test_open_bus_by_url() -> None:
    assert isinstance(open_bus("memory://"), MemoryBus)
    assert open_bus("memory://x", stream="s1") is open_bus("memory://x", stream="s1")
    assert open_bus("memory://x", stream="s1") is not open_bus("memory://y", stream="s1")
    assert isinstance(open_bus("redis://127.0.0.1:6379/0"), RedisStreamBus)
    assert open_bus("memory://", stream="s").dead_letter_stream == "s:dead"
    with pytest.raises(ConfigError, match="unsupported scheme 'amqp'"):
        open_bus("amqp://broker:5672")
    assert is_in_process("memory://") and is_in_process(None)
    assert not is_in_process("redis://localhost")
