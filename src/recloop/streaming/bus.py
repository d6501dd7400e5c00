"""The event bus: Redis Streams with consumer groups, and an in-process bus with the same rules.

Delivery is at least once.  A consumer reads a batch into its group's pending list, processes
it, and acknowledges it only after every sink succeeded; entries a dead consumer left pending
are taken over by another with :meth:`EventBus.claim_stale` (``XAUTOCLAIM``) once they have
been idle long enough.  Messages that cannot be processed go to a dead-letter stream with the
reason and the original payload.

- :class:`RedisStreamBus` (``redis://host:port/db``): one stream entry per event with the JSON
  payload in field ``e``; publishing and acknowledging go through pipelines.
- :class:`MemoryBus` (``memory://`` or ``memory://name``): the same semantics (pending list,
  acknowledgements, idle-time reclaim, dead letters) inside one process, for laptop runs and
  tests.  Buses of the same name and stream in one process are the same object.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from recloop.errors import ConfigError
from recloop.streaming.events import BusMessage, DeadLetter

logger = logging.getLogger(__name__)

PAYLOAD_FIELD = b"e"
"""Stream entry field holding the event JSON."""
ORIGINAL_FIELD_PREFIX = b"field:"
"""A dead letter keeps each other field of the original entry under this prefix."""

DEFAULT_STREAM = "recloop:events"
DEFAULT_DEAD_LETTER_STREAM = "recloop:events:dead"


@dataclass(frozen=True)
class DeadLetterRecord:
    """One entry of the dead-letter stream."""

    id: str
    """Id in the dead-letter stream."""
    source_id: str
    """Id of the original entry in the event stream."""
    payload: bytes
    """The original payload, byte for byte."""
    reason: str
    """Why it was rejected."""
    consumer: str
    """Consumer that rejected it."""
    fields: dict[bytes, bytes] | None = None
    """The original entry's other fields, byte for byte (None: the payload was its only
    field)."""


class EventBus(Protocol):
    """A stream of JSON events read by consumer groups; see the module docstring."""

    stream: str
    dead_letter_stream: str

    async def publish(self, payloads: Sequence[bytes]) -> list[str]:
        """Append payloads in order in one round trip; returns their entry ids."""
        ...

    async def publish_counted(self, payloads: Sequence[bytes], *, counter: str) -> int:
        """Append payloads and add their number to ``counter``, atomically; returns the
        counter's new value.  A value below what the producer has sent tells it the bus lost
        entries (a Redis restart without persistence)."""
        ...

    async def ensure_group(self, group: str) -> None:
        """Create the consumer group (reading from the stream's start) unless it exists."""
        ...

    async def read(
        self, group: str, consumer: str, *, count: int, block_ms: int
    ) -> list[BusMessage]:
        """Up to ``count`` never-delivered entries, waiting up to ``block_ms`` for the first."""
        ...

    async def read_own_pending(self, group: str, consumer: str, *, count: int) -> list[BusMessage]:
        """Entries delivered to this consumer name and not yet acknowledged (after a restart)."""
        ...

    async def claim_stale(
        self, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[BusMessage]:
        """Take over up to ``count`` entries pending for at least ``min_idle_ms`` elsewhere."""
        ...

    async def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        """Reset the idle time of this consumer's pending entries (it is still working)."""
        ...

    async def ack(self, group: str, ids: Sequence[str]) -> int:
        """Acknowledge entries; returns how many were pending."""
        ...

    async def dead_letter(self, letters: Sequence[DeadLetter], *, consumer: str) -> None:
        """Append rejected messages, with their reasons, to the dead-letter stream."""
        ...

    async def read_dead_letters(self, count: int = 1000) -> list[DeadLetterRecord]:
        """The first ``count`` dead letters, oldest first."""
        ...

    async def pending_count(self, group: str) -> int:
        """Entries delivered to the group and not yet acknowledged."""
        ...

    async def length(self) -> int:
        """Entries in the stream."""
        ...

    async def delete(self) -> None:
        """Remove the stream, its groups and its dead letters (tests, resets)."""
        ...

    async def close(self) -> None: ...


def open_bus(
    url: str | None,
    *,
    stream: str = DEFAULT_STREAM,
    dead_letter_stream: str | None = None,
    timeout_s: float = 5.0,
) -> EventBus:
    """The bus a URL names: ``redis://``/``rediss://``/``unix://`` or ``memory://[name]``."""
    dlq = dead_letter_stream or f"{stream}:dead"
    if url is None or url in ("", "memory:", "memory://"):
        return MemoryBus.named("default", stream=stream, dead_letter_stream=dlq)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        name = url.split("://", 1)[-1] or "default"
        return MemoryBus.named(name, stream=stream, dead_letter_stream=dlq)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStreamBus(url, stream=stream, dead_letter_stream=dlq, timeout_s=timeout_s)
    raise ConfigError(
        f"bus url {url!r}: unsupported scheme {scheme!r} "
        "(expected redis://, rediss://, unix:// or memory://)"
    )


def is_in_process(url: str | None) -> bool:
    """Whether the bus URL names the in-process bus (usable by one process only)."""
    return url is None or url in ("", "memory:") or url.split(":", 1)[0].lower() == "memory"


# ----------------------------------------------------------------------------- redis


def _s(x: bytes | str) -> str:
    return x.decode() if isinstance(x, bytes) else x


def _messages(entries: Any) -> list[BusMessage]:
    """Raw stream entries ``[[id, [field, value, ...]], ...]`` → messages.

    The bus reads with redis-py's reply callbacks switched off for XREADGROUP and XAUTOCLAIM:
    its generic conversion (a dict per entry) cost more than the rest of a batch's parsing.
    """
    out = []
    for entry in entries:
        if entry is None:
            continue
        entry_id, fields = entry
        if fields is None:  # deleted (trimmed) while pending
            continue
        if not isinstance(fields, dict) and len(fields) == 2 and fields[0] == PAYLOAD_FIELD:
            out.append(BusMessage(_s(entry_id), fields[1]))  # the usual entry
            continue
        # Other fields beside (or instead of) the payload: kept for a dead letter.
        named = (
            dict(fields)
            if isinstance(fields, dict)
            else dict(zip(fields[::2], fields[1::2], strict=False))
        )
        payload = named.pop(PAYLOAD_FIELD, None)
        out.append(BusMessage(_s(entry_id), payload, named or None))
    return out


def _stream_entries(reply: Any) -> Any:
    """Entries of the one stream in a raw XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def _raw(response: Any, **_options: Any) -> Any:
    return response


class RedisStreamBus:
    """Redis Streams; see the module docstring.  Entries are never trimmed here."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = DEFAULT_STREAM,
        dead_letter_stream: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.url = url
        self.stream = stream
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self._timeout_s = timeout_s
        self._claim_cursor: dict[str, str] = {}
        try:
            # One quick transparent retry covers a dropped idle connection; longer outages
            # are the caller's to back off from.
            self._client: Any = aioredis.from_url(
                url,
                socket_connect_timeout=timeout_s,
                socket_timeout=None,
                retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
                decode_responses=False,
            )
        except ValueError as exc:
            raise ConfigError(f"bus url {url!r}: {exc}") from None
        for command in ("XREADGROUP", "XAUTOCLAIM"):
            self._client.set_response_callback(command, _raw)

    async def publish(self, payloads: Sequence[bytes]) -> list[str]:
        if not payloads:
            return []
        pipe = self._client.pipeline(transaction=False)
        for p in payloads:
            pipe.xadd(self.stream, {PAYLOAD_FIELD: p})
        return [_s(x) for x in await pipe.execute()]

    async def publish_counted(self, payloads: Sequence[bytes], *, counter: str) -> int:
        pipe = self._client.pipeline(transaction=True)
        for p in payloads:
            pipe.xadd(self.stream, {PAYLOAD_FIELD: p})
        pipe.incrby(counter, len(payloads))
        pipe.expire(counter, 7 * 24 * 3600)
        out = await pipe.execute()
        return int(out[-2])

    async def ensure_group(self, group: str) -> None:
        from redis.exceptions import ResponseError

        try:
            await self._client.xgroup_create(self.stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _with_group(self, group: str, fn: Any) -> Any:
        """Run ``fn``; if Redis lost the group (restart, reset), recreate it and run again."""
        from redis.exceptions import ResponseError

        try:
            return await fn()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            logger.warning("consumer group %s of %s is gone; recreating it", group, self.stream)
            self._claim_cursor.pop(group, None)
            await self.ensure_group(group)
            return await fn()

    async def read(
        self, group: str, consumer: str, *, count: int, block_ms: int
    ) -> list[BusMessage]:
        async def go() -> Any:
            return await self._client.xreadgroup(
                group, consumer, {self.stream: ">"}, count=count, block=block_ms or None
            )

        return _messages(_stream_entries(await self._with_group(group, go)))

    async def read_own_pending(self, group: str, consumer: str, *, count: int) -> list[BusMessage]:
        async def go() -> Any:
            return await self._client.xreadgroup(group, consumer, {self.stream: "0"}, count=count)

        return _messages(_stream_entries(await self._with_group(group, go)))

    async def claim_stale(
        self, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[BusMessage]:
        start = self._claim_cursor.get(group, "0-0")

        async def go() -> Any:
            return await self._client.xautoclaim(
                self.stream, group, consumer, min_idle_ms, start_id=start, count=count
            )

        reply = await self._with_group(group, go)
        nxt, entries = _s(reply[0]), reply[1]
        # "0-0" means the scan of the pending list wrapped around; start over next time.
        self._claim_cursor[group] = nxt
        return _messages(entries)

    async def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        if ids:
            await self._client.xclaim(self.stream, group, consumer, 0, list(ids), justid=True)

    async def ack(self, group: str, ids: Sequence[str]) -> int:
        from redis.exceptions import ResponseError

        if not ids:
            return 0
        try:
            return int(await self._client.xack(self.stream, group, *ids))
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The group (and the entries) vanished, e.g. Redis restarted without persistence:
            # there is nothing left to acknowledge.
            logger.warning("ack: consumer group %s of %s is gone", group, self.stream)
            await self.ensure_group(group)
            return 0

    async def dead_letter(self, letters: Sequence[DeadLetter], *, consumer: str) -> None:
        if not letters:
            return
        pipe = self._client.pipeline(transaction=False)
        for d in letters:
            entry = {
                b"payload": d.payload,
                b"reason": d.reason.encode(),
                b"source_id": d.entry_id.encode(),
                b"stream": self.stream.encode(),
                b"consumer": consumer.encode(),
            }
            for k, v in (d.fields or {}).items():
                entry[ORIGINAL_FIELD_PREFIX + k] = v
            pipe.xadd(self.dead_letter_stream, entry)
        await pipe.execute()

    async def read_dead_letters(self, count: int = 1000) -> list[DeadLetterRecord]:
        entries = await self._client.xrange(self.dead_letter_stream, count=count)
        return [
            DeadLetterRecord(
                id=_s(i),
                source_id=_s(f[b"source_id"]),
                payload=f[b"payload"],
                reason=_s(f[b"reason"]),
                consumer=_s(f[b"consumer"]),
                fields={
                    k[len(ORIGINAL_FIELD_PREFIX) :]: v
                    for k, v in f.items()
                    if k.startswith(ORIGINAL_FIELD_PREFIX)
                }
                or None,
            )
            for i, f in entries
        ]

    async def pending_count(self, group: str) -> int:
        from redis.exceptions import ResponseError

        try:
            info = await self._client.xpending(self.stream, group)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(info["pending"])

    async def undelivered(self, group: str) -> int | None:
        """Entries the group has not read yet (Redis 7's ``XINFO GROUPS`` lag; None when the
        server cannot say).  Not in :class:`EventBus`: the dashboard's heartbeat asks for
        it where a bus has it."""
        for info in await self._client.xinfo_groups(self.stream):
            name = info.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == group:
                lag = info.get("lag")
                return None if lag is None else int(lag)
        return None

    async def length(self) -> int:
        return int(await self._client.xlen(self.stream))

    async def read_all(self, count: int | None = None) -> list[BusMessage]:
        """Every entry of the stream, oldest first (inspection, tests)."""
        return _messages(await self._client.xrange(self.stream, count=count))

    async def delete(self) -> None:
        await self._client.delete(self.stream, self.dead_letter_stream)

    async def close(self) -> None:
        await self._client.aclose()


# ----------------------------------------------------------------------------- memory


@dataclass
class _Pending:
    consumer: str
    delivered_at: float
    deliveries: int = 1


@dataclass
class _Group:
    next_index: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)


class MemoryBus:
    """An in-process stream with consumer groups; behaves as :class:`RedisStreamBus`.

    Entry ids are ``<n>-0`` with n counting from 1.  Not shared between processes.
    """

    _registry: ClassVar[dict[tuple[str, str], MemoryBus]] = {}

    def __init__(
        self, *, stream: str = DEFAULT_STREAM, dead_letter_stream: str | None = None
    ) -> None:
        self.stream = stream
        self.dead_letter_stream = dead_letter_stream or f"{stream}:dead"
        self._entries: list[bytes] = []
        self._groups: dict[str, _Group] = {}
        self._dead: list[DeadLetterRecord] = []
        self._counters: dict[str, int] = {}
        self._waiters: list[asyncio.Event] = []

    @classmethod
    def named(
        cls, name: str, *, stream: str = DEFAULT_STREAM, dead_letter_stream: str | None = None
    ) -> MemoryBus:
        """The process-wide bus of this name and stream (created on first use)."""
        key = (name, stream)
        if key not in cls._registry:
            cls._registry[key] = cls(stream=stream, dead_letter_stream=dead_letter_stream)
        return cls._registry[key]

    @staticmethod
    def _id(index: int) -> str:
        return f"{index + 1}-0"

    @staticmethod
    def _index(entry_id: str) -> int:
        return int(entry_id.split("-", 1)[0]) - 1

    def _group(self, group: str) -> _Group:
        if group not in self._groups:
            self._groups[group] = _Group()
        return self._groups[group]

    async def publish(self, payloads: Sequence[bytes]) -> list[str]:
        start = len(self._entries)
        self._entries.extend(bytes(p) for p in payloads)
        for ev in self._waiters:
            ev.set()
        return [self._id(i) for i in range(start, len(self._entries))]

    async def publish_counted(self, payloads: Sequence[bytes], *, counter: str) -> int:
        await self.publish(payloads)
        self._counters[counter] = self._counters.get(counter, 0) + len(payloads)
        return self._counters[counter]

    async def ensure_group(self, group: str) -> None:
        self._group(group)

    def _deliver(self, g: _Group, consumer: str, count: int) -> list[BusMessage]:
        stop = min(len(self._entries), g.next_index + count)
        now = time.monotonic()
        out = []
        for i in range(g.next_index, stop):
            g.pending[i] = _Pending(consumer, now)
            out.append(BusMessage(self._id(i), self._entries[i]))
        g.next_index = stop
        return out

    async def read(
        self, group: str, consumer: str, *, count: int, block_ms: int
    ) -> list[BusMessage]:
        g = self._group(group)
        out = self._deliver(g, consumer, count)
        if out or block_ms <= 0:
            return out
        # One event per wait: the bus may outlive an event loop (tests run one per test).
        ev = asyncio.Event()
        self._waiters.append(ev)
        try:
            await asyncio.wait_for(ev.wait(), timeout=block_ms / 1000)
        except TimeoutError:
            return []
        finally:
            self._waiters.remove(ev)
        return self._deliver(g, consumer, count)

    async def read_own_pending(self, group: str, consumer: str, *, count: int) -> list[BusMessage]:
        g = self._group(group)
        mine = sorted(i for i, p in g.pending.items() if p.consumer == consumer)[:count]
        return [BusMessage(self._id(i), self._entries[i]) for i in mine]

    async def claim_stale(
        self, group: str, consumer: str, *, min_idle_ms: int, count: int
    ) -> list[BusMessage]:
        g = self._group(group)
        now = time.monotonic()
        stale = sorted(
            i for i, p in g.pending.items() if (now - p.delivered_at) * 1000 >= min_idle_ms
        )[:count]
        for i in stale:
            p = g.pending[i]
            g.pending[i] = _Pending(consumer, now, p.deliveries + 1)
        return [BusMessage(self._id(i), self._entries[i]) for i in stale]

    async def touch(self, group: str, consumer: str, ids: Sequence[str]) -> None:
        g = self._group(group)
        now = time.monotonic()
        for entry_id in ids:
            i = self._index(entry_id)
            if i in g.pending:
                g.pending[i] = _Pending(consumer, now, g.pending[i].deliveries)

    async def ack(self, group: str, ids: Sequence[str]) -> int:
        g = self._group(group)
        return sum(g.pending.pop(self._index(i), None) is not None for i in ids)

    async def dead_letter(self, letters: Sequence[DeadLetter], *, consumer: str) -> None:
        for d in letters:
            self._dead.append(
                DeadLetterRecord(
                    id=self._id(len(self._dead)),
                    source_id=d.entry_id,
                    payload=d.payload,
                    reason=d.reason,
                    consumer=consumer,
                    fields=d.fields,
                )
            )

    async def read_dead_letters(self, count: int = 1000) -> list[DeadLetterRecord]:
        return list(self._dead[:count])

    async def pending_count(self, group: str) -> int:
        return len(self._group(group).pending)

    async def undelivered(self, group: str) -> int | None:
        """Entries the group has not read yet (as :meth:`RedisStreamBus.undelivered`)."""
        return len(self._entries) - self._group(group).next_index

    async def length(self) -> int:
        return len(self._entries)

    async def read_all(self, count: int | None = None) -> list[BusMessage]:
        entries = self._entries if count is None else self._entries[:count]
        return [BusMessage(self._id(i), p) for i, p in enumerate(entries)]

    async def delete(self) -> None:
        self._entries.clear()
        self._groups.clear()
        self._dead.clear()
        self._counters.clear()

    async def close(self) -> None:
        return None
