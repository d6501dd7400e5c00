"""Kafka (``kafka://host:port[,host:port...]/topic[?options]``) with confluent-kafka.

Mapping of the bus protocol onto Kafka:

- **Records** are keyed by the event's ``user_id`` (read from the JSON payload), so one
  user's events stay in order within one partition.  A record's bus id is
  ``<partition>-<offset>``.
- **Consumer groups** are Kafka's: each consumer of a group (one per worker) is assigned a
  share of the partitions by the group coordinator.  ``read`` returns as soon as one record
  is there (then takes whatever else is already fetched, up to ``count``).
- **Acknowledging** a batch records its offsets as done; per partition the committed offset
  is the first offset not yet acknowledged, so a commit never passes an event whose batch
  is not in every sink (at least once; the idempotent sinks make the effect exactly once).
  Commits are asynchronous after each acknowledgement and synchronous when partitions are
  revoked (a rebalance) and on close.
- **A dead consumer's batch** (killed, or stuck longer than ``max.poll.interval.ms``) needs
  no claiming: once the coordinator notices (``session.timeout.ms``) the group rebalances
  and the partition's new owner reads on from the last commit.  ``read_own_pending`` and
  ``claim_stale`` therefore return nothing and ``touch`` does nothing.
- **Dead letters** go to a topic of their own (default ``<topic>.dead``, one partition so
  that they read back in order) with the original payload as value and the reason, source
  id, topic and consumer as headers (the original record's headers under ``field:``).
- **Lag** (:meth:`KafkaBus.lag`): high watermark minus position over the consumer's
  partitions, from the watermarks of the fetch responses (no extra round trip).
- ``pending_count`` is the group's committed lag: records of the topic at or past the
  group's committed offsets (read, or not yet read, by any consumer of the group).

Options (the URL's query string): ``partitions`` (default 8) and ``replication_factor``
(default -1, the broker's default) are used when the bus creates a missing topic; any option
with a dot is passed to librdkafka (``session.timeout.ms``, ``security.protocol``,
``sasl.mechanism`` ...); consumer-only options go to the consumers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from recloop.errors import ConfigError
from recloop.streaming.buses.base import (
    DEFAULT_STREAM,
    ORIGINAL_FIELD_PREFIX,
    DeadLetterRecord,
)
from recloop.streaming.events import BusMessage, DeadLetter

logger = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 8
"""Partitions of a topic the bus creates (the most consumers that can share it)."""

_BAD_TOPIC_CHARS = re.compile(r"[^A-Za-z0-9._-]")

_CONSUMER_ONLY = (
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "auto.offset.reset",
    "partition.assignment.strategy",
    "group.instance.id",
    "group.protocol",
    "fetch.",
    "queued.",
    "isolation.level",
    "check.crcs",
    "enable.partition.eof",
)

_CONSUMER_DEFAULTS: dict[str, Any] = {
    # A worker that dies is noticed within this; Kafka's own default (45 s) would leave its
    # partitions unread for that long.
    "session.timeout.ms": 10_000,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    # A topic recreated after a broker lost it is found again soon.
    "topic.metadata.refresh.interval.ms": 5_000,
}

_PRODUCER_DEFAULTS: dict[str, Any] = {
    "linger.ms": 5,
    "compression.type": "lz4",
    "enable.idempotence": False,
}


def topic_name(name: str) -> str:
    """A Kafka-legal topic name: characters outside ``[A-Za-z0-9._-]`` become ``.``."""
    return _BAD_TOPIC_CHARS.sub(".", name)[:249]


@dataclass(frozen=True, kw_only=True)
class KafkaUrl:
    """A parsed ``kafka://`` URL."""

    bootstrap: str
    """``host:port[,host:port...]``."""
    topic: str | None
    """The URL's path (None: none given)."""
    partitions: int
    """Partitions of a topic the bus creates."""
    replication_factor: int
    """Replicas of a topic the bus creates (-1: the broker's default)."""
    client: dict[str, str]
    """librdkafka options for producers and consumers."""
    consumer: dict[str, str]
    """librdkafka options for consumers only."""

    @classmethod
    def parse(cls, url: str) -> KafkaUrl:
        parts = urlsplit(url)
        if parts.scheme.lower() != "kafka" or not parts.netloc:
            raise ConfigError(f"bus url {url!r}: expected kafka://host:port[,host:port]/topic")
        topic = unquote(parts.path.strip("/")) or None
        if topic is not None and (_BAD_TOPIC_CHARS.search(topic) or len(topic) > 249):
            raise ConfigError(
                f"bus url {url!r}: topic {topic!r} may only hold letters, digits, '.', '_' "
                "and '-' (at most 249)"
            )
        partitions, replication = DEFAULT_PARTITIONS, -1
        client: dict[str, str] = {}
        consumer: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in ("partitions", "replication_factor"):
                try:
                    n = int(value)
                except ValueError:
                    n = 0
                if n < (1 if key == "partitions" else -1) or n == 0:
                    raise ConfigError(f"bus url {url!r}: {key} must be a positive integer")
                if key == "partitions":
                    partitions = n
                else:
                    replication = n
            elif "." in key:
                (consumer if key.startswith(_CONSUMER_ONLY) else client)[key] = value
            else:
                raise ConfigError(
                    f"bus url {url!r}: unknown option {key!r} (expected partitions, "
                    "replication_factor or a librdkafka option such as session.timeout.ms)"
                )
        return cls(
            bootstrap=parts.netloc,
            topic=topic,
            partitions=partitions,
            replication_factor=replication,
            client=client,
            consumer=consumer,
        )


def user_key(payload: bytes | None) -> bytes | None:
    """The record key of a payload: its ``user_id`` (None: not a JSON object with one; such a
    record goes to any partition and becomes a dead letter there)."""
    if not payload:
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    user = doc.get("user_id") if isinstance(doc, dict) else None
    if isinstance(user, str):
        return user.encode()
    if isinstance(user, int | float) and not isinstance(user, bool):
        return str(user).encode()
    return None


class KafkaBusError(RuntimeError):
    """The broker refused a request (not a connection problem)."""


_TRANSIENT_CODES = (
    "_TRANSPORT",
    "_TIMED_OUT",
    "_ALL_BROKERS_DOWN",
    "_MSG_TIMED_OUT",
    "_WAIT_COORD",
    "REQUEST_TIMED_OUT",
    "NOT_COORDINATOR",
    "COORDINATOR_NOT_AVAILABLE",
    "COORDINATOR_LOAD_IN_PROGRESS",
    "UNKNOWN_TOPIC_OR_PART",
    "LEADER_NOT_AVAILABLE",
    "NOT_LEADER_FOR_PARTITION",
)


@contextlib.contextmanager
def _broker_call(what: str, bootstrap: str) -> Iterator[None]:
    """Turn the client's errors into ``ConnectionError`` (the caller backs off and retries)
    when the broker is unreachable or busy, else into :class:`KafkaBusError`."""
    from confluent_kafka import KafkaError, KafkaException

    try:
        yield
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        text = err.str() if err is not None else str(exc)
        transient = (
            err is None
            or err.retriable()
            or any(err.code() == getattr(KafkaError, name, None) for name in _TRANSIENT_CODES)
        )
        if transient:
            raise ConnectionError(f"kafka {bootstrap}: {what}: {text}") from None
        raise KafkaBusError(f"kafka {bootstrap}: {what}: {text}") from None


@dataclass
class _Partition:
    """Delivery state of one assigned partition."""

    outstanding: set[int] = field(default_factory=set)
    """Offsets delivered and not yet acknowledged."""
    next_offset: int | None = None
    """One past the highest offset delivered (None: nothing delivered yet)."""
    committed: int | None = None
    """The offset last committed for it by this consumer."""

    def commit_point(self) -> int | None:
        """The offset to commit: the first one not acknowledged."""
        if self.outstanding:
            return min(self.outstanding)
        return self.next_offset


class _Consumer:
    """One member of a consumer group, with its delivered offsets."""

    def __init__(self, bus: KafkaBus, group: str, name: str) -> None:
        from confluent_kafka import Consumer

        self.bus = bus
        self.group = group
        self.name = name
        self.lock = threading.Lock()  # partitions: the poll thread's callbacks and the loop
        self.poll_lock = threading.Lock()  # one poll at a time; close waits for it
        self.partitions: dict[int, _Partition] = {}
        self.revocations = 0
        conf = {
            **bus._client_conf(),
            **_CONSUMER_DEFAULTS,
            **bus.url.consumer,
            "group.id": group,
            "client.id": name,
            "on_commit": self._on_commit,
        }
        if "heartbeat.interval.ms" not in conf:
            conf["heartbeat.interval.ms"] = max(100, int(conf["session.timeout.ms"]) // 4)
        self.consumer = Consumer(conf, logger=logger)
        self.consumer.subscribe(
            [bus.stream], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._lost
        )
        self.closed = False

    # -- callbacks (run in the thread that polls) --

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        with self.lock:
            for tp in partitions:
                self.partitions.setdefault(tp.partition, _Partition())
        logger.info(
            "%s: assigned partitions %s of %s",
            self.name,
            sorted(tp.partition for tp in partitions),
            self.bus.stream,
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        """Commit what was acknowledged of the partitions before another consumer gets
        them; what is still being processed is left to their next owner (redelivered)."""
        self.revocations += 1
        offsets = self._commit_offsets({tp.partition for tp in partitions})
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except Exception as exc:  # the new owner redelivers from the last commit
                logger.warning("%s: commit on revocation failed: %s", self.name, exc)
        with self.lock:
            for tp in partitions:
                self.partitions.pop(tp.partition, None)
        logger.info(
            "%s: partitions %s of %s revoked",
            self.name,
            sorted(tp.partition for tp in partitions),
            self.bus.stream,
        )

    def _lost(self, consumer: Any, partitions: list[Any]) -> None:
        """Lost (the group moved on without us): nothing may be committed for them."""
        self.revocations += 1
        with self.lock:
            for tp in partitions:
                self.partitions.pop(tp.partition, None)
        logger.warning(
            "%s: partitions %s of %s lost; their unacknowledged records go to their new owner",
            self.name,
            sorted(tp.partition for tp in partitions),
            self.bus.stream,
        )

    def _on_commit(self, err: Any, partitions: list[Any]) -> None:
        if err is not None:
            logger.warning("%s: offset commit failed: %s", self.name, err)

    # -- bookkeeping --

    def _commit_offsets(self, which: set[int] | None = None) -> list[Any]:
        """TopicPartitions to commit: partitions whose first unacknowledged offset moved."""
        from confluent_kafka import TopicPartition

        out = []
        with self.lock:
            for p, state in self.partitions.items():
                if which is not None and p not in which:
                    continue
                point = state.commit_point()
                if point is not None and point != state.committed:
                    state.committed = point
                    out.append(TopicPartition(self.bus.stream, p, point))
        return out

    def poll(self, count: int, timeout_s: float) -> list[BusMessage]:
        """Up to ``count`` records: wait up to ``timeout_s`` for the first, then take what
        is already fetched (``consume`` alone would wait to fill the batch)."""
        with self.poll_lock:
            if self.closed:
                return []
            first = self.consumer.poll(timeout_s)
            if first is None:
                return []
            records = [first]
            if count > 1:
                records += self.consumer.consume(count - 1, 0)
        return self._messages(records)

    def _messages(self, records: list[Any]) -> list[BusMessage]:
        out: list[BusMessage] = []
        delivered: dict[int, list[int]] = {}
        for r in records:
            err = r.error()
            if err is not None:
                self._record_error(err)
                continue
            p, o = r.partition(), r.offset()
            headers = r.headers()
            fields = {k.encode(): v or b"" for k, v in headers} if headers else None
            out.append(BusMessage(f"{p}-{o}", r.value(), fields, p))
            delivered.setdefault(p, []).append(o)
        with self.lock:
            for p, offsets in delivered.items():
                state = self.partitions.get(p)
                if state is None:  # revoked while these were in flight: not ours to commit
                    continue
                state.outstanding.update(offsets)
                top = max(offsets) + 1
                if state.next_offset is None or top > state.next_offset:
                    state.next_offset = top
        return out

    def _record_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaBusError(f"kafka consumer {self.name}: {err.str()}")
        # Transient (broker down, topic missing for a moment): librdkafka retries by itself.
        logger.warning("kafka consumer %s: %s", self.name, err.str())

    def ack(self, ids: Sequence[str]) -> tuple[int, list[Any]]:
        """Mark offsets acknowledged; returns (how many were outstanding, offsets to commit)."""
        n = 0
        with self.lock:
            for entry_id in ids:
                p, _, o = entry_id.partition("-")
                state = self.partitions.get(int(p))
                if state is None:
                    continue
                offset = int(o)
                if offset in state.outstanding:
                    state.outstanding.discard(offset)
                    n += 1
        return n, self._commit_offsets()

    def outstanding(self) -> int:
        with self.lock:
            return sum(len(s.outstanding) for s in self.partitions.values())

    def lag(self) -> int:
        """High watermark (as the last fetch response gave it) minus position."""
        from confluent_kafka import TopicPartition

        with self.lock:
            parts = list(self.partitions)
        total = 0
        for p in parts:
            tp = TopicPartition(self.bus.stream, p)
            with contextlib.suppress(Exception):
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                (pos,) = self.consumer.position([tp])
                if high >= 0 and pos.offset >= 0:
                    total += max(0, high - pos.offset)
        return total

    def close(self) -> None:
        """Commit what was acknowledged, leave the group (its partitions move at once)."""
        with self.poll_lock:
            if self.closed:
                return
            self.closed = True
            offsets = self._commit_offsets()
            if offsets:
                try:
                    self.consumer.commit(offsets=offsets, asynchronous=False)
                except Exception as exc:
                    logger.warning("%s: final commit failed: %s", self.name, exc)
            self.consumer.close()


class KafkaBus:
    """A Kafka topic behind the bus protocol; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        dead_letter_stream: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"bus url {url!r}: the Kafka bus needs confluent-kafka "
                "(pip install 'recloop[kafka]')"
            ) from None
        self.url = KafkaUrl.parse(url)
        self.stream = self.url.topic or topic_name(stream)
        self.dead_letter_stream = (
            topic_name(dead_letter_stream) if dead_letter_stream else f"{self.stream}.dead"
        )
        self._timeout_s = timeout_s
        self._producer: Any = None
        self._publish_lock = asyncio.Lock()
        self._consumers: dict[tuple[str, str], _Consumer] = {}
        self._queries: dict[str, Any] = {}  # group -> consumer that never joins (offsets)
        self._topics_ready = False
        self._counters: dict[str, int] = {}
        self._produced_top: dict[tuple[str, int], int] = {}

    def _client_conf(self) -> dict[str, Any]:
        return {
            "bootstrap.servers": self.url.bootstrap,
            "socket.connection.setup.timeout.ms": max(1000, int(self._timeout_s * 1000)),
            **self.url.client,
        }

    # -- topics --

    def _admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        conf: dict[str, Any] = {**self._client_conf(), "logger": logger}
        return AdminClient(conf)

    def _create_topics(self) -> None:
        """Create the topic and the dead-letter topic unless they exist (blocking)."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import NewTopic

        admin = self._admin()
        wanted = [
            NewTopic(self.stream, self.url.partitions, self.url.replication_factor),
            NewTopic(self.dead_letter_stream, 1, self.url.replication_factor),
        ]
        with _broker_call("list topics", self.url.bootstrap):
            existing = admin.list_topics(timeout=self._timeout_s).topics
        missing = [t for t in wanted if t.topic not in existing]
        if not missing:
            return
        for topic, fut in admin.create_topics(missing, request_timeout=self._timeout_s).items():
            try:
                fut.result(timeout=self._timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                with _broker_call(f"creating topic {topic!r}", self.url.bootstrap):
                    raise
            else:
                logger.info("created topic %s", topic)

    def create_topics(self) -> None:
        """Create the topic and the dead-letter topic unless they exist (blocking; for
        another writer of the same topics, such as the Flink job)."""
        self._create_topics()

    async def _ensure_topics(self) -> None:
        if not self._topics_ready:
            await asyncio.to_thread(self._create_topics)
            self._topics_ready = True

    # -- producing --

    def _producer_now(self) -> Any:
        if self._producer is None:
            from confluent_kafka import Producer

            self._producer = Producer({**self._client_conf(), **_PRODUCER_DEFAULTS}, logger=logger)
        return self._producer

    async def _produce(
        self, topic: str, records: Sequence[tuple[bytes | None, bytes, list[Any] | None]]
    ) -> list[tuple[int, int]]:
        """Produce (key, value, headers) records and wait for every delivery report; returns
        (partition, offset) of each, in order.  Raises ``ConnectionError`` when the broker
        cannot be reached in time (the caller backs off) and :class:`KafkaBusError` when it
        refuses a record."""
        from confluent_kafka import KafkaError

        if not records:
            return []
        await self._ensure_topics()
        producer = self._producer_now()
        out: list[Any] = [None] * len(records)

        def delivered(i: int) -> Any:
            def report(err: Any, msg: Any) -> None:
                out[i] = err if err is not None else (msg.partition(), msg.offset())

            return report

        def run() -> None:
            for i, (key, value, headers) in enumerate(records):
                while True:
                    try:
                        producer.produce(
                            topic, value=value, key=key, headers=headers, on_delivery=delivered(i)
                        )
                        break
                    except BufferError:  # the local queue is full: let it drain
                        producer.poll(0.05)
            left = producer.flush(self._timeout_s * 4)
            if left:
                raise ConnectionError(
                    f"kafka {self.url.bootstrap}: {left} records not delivered to {topic!r} "
                    f"within {self._timeout_s * 4:.0f}s"
                )

        async with self._publish_lock:
            await asyncio.to_thread(run)
        failed = [x for x in out if not isinstance(x, tuple)]
        if failed:
            err = failed[0]
            if err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                self._topics_ready = False  # the broker lost it: create it again next time
            if err is not None and err.retriable():
                raise ConnectionError(f"kafka {self.url.bootstrap}: {err.str()}")
            raise KafkaBusError(f"producing to {topic!r}: {err.str() if err else 'no report'}")
        return out

    async def publish(self, payloads: Sequence[bytes]) -> list[str]:
        offsets = await self._produce(self.stream, [(user_key(p), p, None) for p in payloads])
        self._note_offsets(self.stream, offsets)
        return [f"{p}-{o}" for p, o in offsets]

    def _note_offsets(self, topic: str, offsets: Sequence[tuple[int, int]]) -> bool:
        """Remember the highest offset produced per partition; True when one went backwards
        (the broker lost the topic: a restart without persistence)."""
        lost = False
        for p, o in offsets:
            top = self._produced_top.get((topic, p))
            if top is not None and o <= top:
                lost = True
        for p, o in offsets:
            if lost or o > self._produced_top.get((topic, p), -1):
                self._produced_top[(topic, p)] = o
        return lost

    async def publish_counted(self, payloads: Sequence[bytes], *, counter: str) -> int:
        """Publish and count in this process; when the offsets show the broker lost what was
        produced before, the counter starts again from this batch (the caller republishes)."""
        offsets = await self._produce(self.stream, [(user_key(p), p, None) for p in payloads])
        if self._note_offsets(self.stream, offsets):
            logger.warning("topic %s lost records (broker restarted without them?)", self.stream)
            self._counters[counter] = 0
        self._counters[counter] = self._counters.get(counter, 0) + len(payloads)
        return self._counters[counter]

    async def dead_letter(self, letters: Sequence[DeadLetter], *, consumer: str) -> None:
        if not letters:
            return
        records = []
        for d in letters:
            headers = [
                ("reason", d.reason.encode()),
                ("source_id", d.entry_id.encode()),
                ("stream", self.stream.encode()),
                ("consumer", consumer.encode()),
            ]
            for k, v in (d.fields or {}).items():
                headers.append(((ORIGINAL_FIELD_PREFIX + k).decode("utf-8", "replace"), v))
            records.append((d.entry_id.encode(), d.payload, headers))
        await self._produce(self.dead_letter_stream, records)

    # -- consuming --

    def _consumer(self, group: str, consumer: str) -> _Consumer:
        key = (group, consumer)
        if key not in self._consumers:
            self._consumers[key] = _Consumer(self, group, consumer)
        return self._consumers[key]

    async def ensure_group(self, group: str) -> None:
        """Create the topics if missing.  Kafka creates the group when a consumer joins;
        a group without committed offsets starts at the topic's beginning."""
        await self._ensure_topics()

    async def read(
        self, group: str, consumer: str, *, count: int, block_ms: int
    ) -> list[BusMessage]:
        await self._ensure_topics()
        c = self._consumer(group, consumer)
        return await asyncio.to_thread(c.poll, count, block_ms / 1000)

    async def read_own_pending(self, group: str, consumer: str, *, count: int) -> list[BusMessage]:
        return []  # a restarted consumer gets its partitions' unacknowledged records anew

    async def claim_stale(
        self, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[BusMessage]:
        return []  # the group coordinator reassigns a dead consumer's partitions

    async def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        return None

    async def ack(self, group: str, ids: Sequence[str]) -> int:
        n = 0
        for (g, _), c in list(self._consumers.items()):
            if g != group or c.closed:
                continue
            done, offsets = c.ack(ids)
            n += done
            if offsets:
                try:
                    c.consumer.commit(offsets=offsets, asynchronous=True)
                except Exception as exc:  # the next commit (or the next owner) covers it
                    logger.warning("%s: commit failed: %s", c.name, exc)
        return n

    def _query_consumer(self, group: str) -> Any:
        from confluent_kafka import Consumer

        if group not in self._queries:
            self._queries[group] = Consumer(
                {**self._client_conf(), "group.id": group, "enable.auto.commit": False},
                logger=logger,
            )
        return self._queries[group]

    def _committed_lag(self, group: str) -> int:
        """Records at or past the group's committed offsets, over every partition.

        The high watermark is the larger of the broker's answer and the last fetch
        response's (some brokers answer the former with the first offset of the last
        batch + 1, which is too low)."""
        from confluent_kafka import OFFSET_INVALID, TopicPartition

        q = self._query_consumer(group)
        meta = q.list_topics(self.stream, timeout=self._timeout_s).topics.get(self.stream)
        if meta is None or meta.error is not None:
            return 0
        tps = [TopicPartition(self.stream, p) for p in sorted(meta.partitions)]
        committed = q.committed(tps, timeout=self._timeout_s)
        mine = [c for (g, _), c in self._consumers.items() if g == group and not c.closed]
        total = 0
        for tp, done in zip(tps, committed, strict=True):
            low, high = q.get_watermark_offsets(tp, timeout=self._timeout_s)
            for c in mine:
                with contextlib.suppress(Exception):
                    high = max(high, c.consumer.get_watermark_offsets(tp, cached=True)[1])
            start = low if done.offset == OFFSET_INVALID or done.offset < 0 else done.offset
            total += max(0, high - start)
        return total

    async def pending_count(self, group: str) -> int:
        """The group's committed lag (records not acknowledged by any consumer of the group,
        read or not); the consumers' commits are asynchronous, so it may lag a batch behind."""

        def run() -> int:
            with _broker_call("committed offsets", self.url.bootstrap):
                return self._committed_lag(group)

        return await asyncio.to_thread(run)

    async def lag(self, group: str) -> int | None:
        mine = [c for (g, _), c in self._consumers.items() if g == group and not c.closed]
        return sum(c.lag() for c in mine)

    # -- inspection --

    def _read_topic(self, topic: str, count: int | None) -> list[Any]:
        """Records of ``topic`` from its beginning, every partition, up to ``count`` (blocking).

        Stops when every partition is read up to the watermark its fetch responses give, or
        when nothing arrives for a second (it never trusts the broker's "latest" answer)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer(
            {
                **self._client_conf(),
                "group.id": f"recloop-inspect-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            },
            logger=logger,
        )
        try:
            meta = c.list_topics(topic, timeout=self._timeout_s).topics.get(topic)
            if meta is None or meta.error is not None:
                return []
            parts = sorted(meta.partitions)
            c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
            out: list[Any] = []
            at_end: set[int] = set()
            quiet_since = time.monotonic()
            while len(at_end) < len(parts) and (count is None or len(out) < count):
                batch = c.consume(1000, 0.2)
                if not batch:
                    if time.monotonic() - quiet_since > 1.0:
                        break
                    continue
                quiet_since = time.monotonic()
                for r in batch:
                    p = r.partition()
                    if p is None:
                        continue
                    if r.error() is not None:  # end of the partition (or an error): stop there
                        at_end.add(p)
                        continue
                    at_end.discard(p)
                    out.append(r)
            return out if count is None else out[:count]
        finally:
            c.close()

    async def read_dead_letters(self, count: int = 1000) -> list[DeadLetterRecord]:
        records = await asyncio.to_thread(self._read_topic, self.dead_letter_stream, count)
        out = []
        for r in records:
            h = {k: v or b"" for k, v in (r.headers() or [])}
            prefix = ORIGINAL_FIELD_PREFIX.decode()
            fields = {k[len(prefix) :].encode(): v for k, v in h.items() if k.startswith(prefix)}
            out.append(
                DeadLetterRecord(
                    id=f"{r.partition()}-{r.offset()}",
                    source_id=h.get("source_id", b"").decode(),
                    payload=r.value() or b"",
                    reason=h.get("reason", b"").decode(),
                    consumer=h.get("consumer", b"").decode(),
                    fields=fields or None,
                )
            )
        return out

    async def read_all(self, count: int | None = None) -> list[BusMessage]:
        """Every record of the topic (partition by partition, each in offset order)."""
        records = await asyncio.to_thread(self._read_topic, self.stream, count)
        records.sort(key=lambda r: (r.partition(), r.offset()))
        return [BusMessage(f"{r.partition()}-{r.offset()}", r.value()) for r in records]

    async def length(self) -> int:
        return len(await self.read_all())

    async def delete(self) -> None:
        """Delete the topic and the dead-letter topic (tests, resets)."""

        def run() -> None:
            admin = self._admin()
            futures = admin.delete_topics(
                [self.stream, self.dead_letter_stream], request_timeout=self._timeout_s
            )
            for fut in futures.values():
                with contextlib.suppress(Exception):
                    fut.result(timeout=self._timeout_s)

        await self.close()
        await asyncio.to_thread(run)
        self._topics_ready = False
        self._produced_top.clear()

    async def close(self) -> None:
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for c in consumers:
            await asyncio.to_thread(c.close)
        for q in self._queries.values():
            with contextlib.suppress(Exception):
                q.close()
        self._queries.clear()
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await asyncio.to_thread(producer.flush, self._timeout_s)
