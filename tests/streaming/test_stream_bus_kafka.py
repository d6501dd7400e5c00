"""The Kafka bus against a real Kafka-protocol broker: keyed records, consumer groups,
commits only past acknowledged offsets, commit on revocation, dead letters, lag."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from recloop.errors import ConfigError
from recloop.streaming.buses import open_bus
from recloop.streaming.buses.kafka import KafkaBus, KafkaUrl, topic_name, user_key
from recloop.streaming.events import DeadLetter

pytestmark = pytest.mark.kafka


def events(n: int, start: int = 0, users: int = 5) -> list[bytes]:
    return [
        orjson.dumps({"event_id": f"e{i}", "user_id": f"u{i % users}", "item_id": "i", "ts": i})
        for i in range(start, start + n)
    ]


@pytest.fixture
async def kbus(kafka_broker, kafka_topic: str) -> AsyncIterator[KafkaBus]:  # type: ignore[no-untyped-def]
    bus = open_bus(kafka_broker.url(kafka_topic))
    assert isinstance(bus, KafkaBus)
    try:
        yield bus
    finally:
        await bus.delete()


async def read_until(bus: KafkaBus, group: str, consumer: str, n: int) -> list:  # type: ignore[type-arg]
    got: list = []  # type: ignore[type-arg]
    for _ in range(100):
        got += await bus.read(group, consumer, count=n - len(got), block_ms=200)
        if len(got) >= n:
            break
    return got


def test_url_parsing_and_topic_names() -> None:
    u = KafkaUrl.parse("kafka://a:1,b:2/ev?partitions=3&session.timeout.ms=7000&client.id=x")
    assert (u.bootstrap, u.topic, u.partitions) == ("a:1,b:2", "ev", 3)
    assert u.consumer == {"session.timeout.ms": "7000"} and u.client == {"client.id": "x"}
    assert KafkaUrl.parse("kafka://h:9092").topic is None
    with pytest.raises(ConfigError, match="unknown option 'foo'"):
        KafkaUrl.parse("kafka://h:9092/t?foo=1")
    with pytest.raises(ConfigError, match="partitions must be a positive integer"):
        KafkaUrl.parse("kafka://h:9092/t?partitions=0")
    with pytest.raises(ConfigError, match="topic 'a:b'"):
        KafkaUrl.parse("kafka://h:9092/a:b")
    assert topic_name("recloop:events:dead") == "recloop.events.dead"
    bus = open_bus("kafka://h:9092", stream="recloop:events")
    assert (bus.stream, bus.dead_letter_stream) == ("recloop.events", "recloop.events.dead")
    bus = open_bus("kafka://h:9092/t", stream="s", dead_letter_stream="s:dead")
    assert (bus.stream, bus.dead_letter_stream) == ("t", "t.dead")
    bus = open_bus("kafka://h:9092/t", dead_letter_stream="mine")
    assert bus.dead_letter_stream == "mine"


async def test_an_unreachable_broker_is_a_connection_error_to_back_off_from() -> None:
    """The worker retries ConnectionError (an OSError) with backoff; it must not crash."""
    pytest.importorskip("confluent_kafka")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bus = open_bus(f"kafka://127.0.0.1:{port}/t", timeout_s=1.0)
    with pytest.raises(ConnectionError, match="list topics"):
        await bus.ensure_group("g")
    await bus.close()


def test_records_are_keyed_by_user() -> None:
    assert user_key(b'{"event_id":"e","user_id":"196"}') == b"196"
    assert user_key(b'{"type":"served","user_id":7}') == b"7"
    assert user_key(b"garbage") is None and user_key(b"[]") is None and user_key(None) is None


async def test_publish_read_ack_commit(kbus: KafkaBus) -> None:
    ids = await kbus.publish(events(40))
    assert len(set(ids)) == 40
    # One user's records share a partition, in publish order.
    part_of: dict[str, set[str]] = {}
    for i, entry in zip(range(40), ids, strict=True):
        part_of.setdefault(f"u{i % 5}", set()).add(entry.split("-")[0])
    assert all(len(p) == 1 for p in part_of.values())
    await kbus.ensure_group("g")
    got = await read_until(kbus, "g", "c1", 40)
    assert sorted(m.payload for m in got) == sorted(events(40))
    assert {m.id for m in got} == set(ids)
    by_user: dict[str, list[int]] = {}
    for m in got:
        doc = orjson.loads(m.payload)
        by_user.setdefault(doc["user_id"], []).append(doc["ts"])
    assert all(ts == sorted(ts) for ts in by_user.values())
    assert await kbus.pending_count("g") == 40  # read, nothing acknowledged
    assert await kbus.ack("g", [m.id for m in got[:10]]) == 10
    assert await kbus.ack("g", [m.id for m in got[:10]]) == 0
    assert await kbus.ack("g", [m.id for m in got[10:]]) == 30
    for _ in range(50):  # commits are asynchronous
        if await kbus.pending_count("g") == 0:
            break
        await asyncio.sleep(0.1)
    assert await kbus.pending_count("g") == 0
    assert await kbus.lag("g") == 0


async def test_commit_stops_at_the_first_unacknowledged_offset(
    kafka_broker,
    kafka_topic: str,  # type: ignore[no-untyped-def]
) -> None:
    """A consumer that acknowledged records 0..9 and 20..29 of a partition but not 10..19
    commits 10: its successor gets 10..29 again (at least once), never loses 10..19."""
    url = kafka_broker.url(kafka_topic).replace("partitions=4", "partitions=1")
    first = open_bus(url)
    second = open_bus(url)
    try:
        await first.publish(events(30))
        got = await read_until(first, "g", "a", 30)
        by_offset = {int(m.id.split("-")[1]): m.id for m in got}
        await first.ack("g", [by_offset[o] for o in [*range(10), *range(20, 30)]])
        await first.close()  # commits synchronously, leaves the group
        again = await read_until(second, "g", "b", 20)
        assert sorted(int(m.id.split("-")[1]) for m in again) == list(range(10, 30))
    finally:
        await second.delete()
        await first.close()


async def test_lag_is_what_the_consumer_has_not_read(
    kafka_broker,
    kafka_topic: str,  # type: ignore[no-untyped-def]
) -> None:
    bus = open_bus(kafka_broker.url(kafka_topic).replace("partitions=4", "partitions=1"))
    try:
        await bus.publish(events(40))
        await bus.publish(events(10, 40))  # a second batch: the broker's "latest" may be 41
        got = await read_until(bus, "g", "c", 15)
        assert len(got) == 15
        assert await bus.lag("g") == 35
        assert await bus.pending_count("g") == 50  # nothing acknowledged
        rest = await read_until(bus, "g", "c", 35)
        await bus.ack("g", [m.id for m in got + rest])
        assert await bus.lag("g") == 0
    finally:
        await bus.delete()


async def test_groups_are_independent_and_start_at_the_beginning(kbus: KafkaBus) -> None:
    await kbus.publish(events(6))
    for g in ("a", "b"):
        await kbus.ensure_group(g)
        assert len(await read_until(kbus, g, "c", 6)) == 6


async def test_blocking_read_returns_on_first_record(kbus: KafkaBus) -> None:
    await kbus.ensure_group("g")
    assert await read_until(kbus, "g", "c", 0) == []  # joins the group

    async def later() -> None:
        await asyncio.sleep(0.3)
        await kbus.publish(events(1))

    task = asyncio.create_task(later())
    got: list = []  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not got and loop.time() - t0 < 10:
        got = await kbus.read("g", "c", count=100, block_ms=3000)
    await task
    assert [m.payload for m in got] == events(1)
    # count=100 must not make it wait out block_ms for 99 more
    assert loop.time() - t0 < 3.0


async def test_dead_letters_keep_payload_reason_and_headers(kbus: KafkaBus) -> None:
    await kbus.dead_letter(
        [
            DeadLetter("1-5", b"{bad", "unparsable JSON"),
            DeadLetter("0-2", b"[]", "not an object", {b"trace": b"\xff\x00"}),
        ],
        consumer="w1",
    )
    got = await kbus.read_dead_letters()
    assert [(d.source_id, d.payload, d.reason, d.consumer, d.fields) for d in got] == [
        ("1-5", b"{bad", "unparsable JSON", "w1", None),
        ("0-2", b"[]", "not an object", "w1", {b"trace": b"\xff\x00"}),
    ]


async def test_publish_counted_counts_and_notices_a_lost_topic(kbus: KafkaBus) -> None:
    assert await kbus.publish_counted(events(3), counter="c") == 3
    assert await kbus.publish_counted(events(2), counter="c") == 5
    # What a memory broker's restart does: the topic is gone, offsets start over.
    await kbus.delete()
    kbus._produced_top.update({(kbus.stream, p): 10**6 for p in range(4)})
    assert await kbus.publish_counted(events(2), counter="c") == 2


async def test_without_redelivery_claims_and_touch_are_no_ops(kbus: KafkaBus) -> None:
    await kbus.publish(events(3))
    got = await read_until(kbus, "g", "c", 3)
    assert await kbus.read_own_pending("g", "c", count=10) == []
    assert await kbus.claim_stale("g", "other", min_idle_ms=0, count=10) == []
    await kbus.touch("g", "c", [m.id for m in got])
