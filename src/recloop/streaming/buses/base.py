"""The event bus protocol: a stream of JSON events read by consumer groups.

Delivery is at least once.  A consumer reads a batch, processes it, and acknowledges it only
after every sink succeeded; the sinks are idempotent (the behaviour log by event id, the
recent lists by event id), so a redelivered batch changes nothing: the effect is exactly
once.  Messages that cannot be processed go to a dead-letter stream with the reason and the
original payload.

- :class:`~recloop.streaming.buses.redis.RedisStreamBus` (``redis://host:port/db``): Redis
  Streams; entries a dead consumer left pending are taken over by another with
  :meth:`EventBus.claim_stale` (``XAUTOCLAIM``) once they have been idle long enough.
- :class:`~recloop.streaming.buses.kafka.KafkaBus` (``kafka://host:port/topic``): a Kafka
  topic keyed by user id; the group's broker hands a dead or departed consumer's partitions
  to the others, which read on from the last committed offset (offsets are committed only
  for acknowledged batches).
- :class:`~recloop.streaming.buses.memory.MemoryBus` (``memory://`` or ``memory://name``):
  Redis Streams' semantics inside one process, for laptop runs and tests.  Buses of the
  same name and stream in one process are the same object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from recloop.errors import ConfigError

if TYPE_CHECKING:
    from recloop.streaming.events import BusMessage, DeadLetter

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
        """Take over up to ``count`` entries pending for at least ``min_idle_ms``.

        As Redis's XAUTOCLAIM, the caller's own pending entries are among them: a worker
        leaves out the batch it is processing.
        """
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

    async def read_all(self, count: int | None = None) -> list[BusMessage]:
        """Every entry of the stream (inspection, tests), oldest first (Kafka: partition by
        partition)."""
        ...

    async def lag(self, group: str) -> int | None:
        """Entries this process's consumers of ``group`` have not read yet, as far as the
        bus tells a consumer (Kafka: high watermark minus position over its partitions);
        None where the bus keeps no per-consumer backlog (Redis Streams, memory)."""
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
    """The bus a URL names: ``redis://``/``rediss://``/``unix://``, ``kafka://`` or
    ``memory://[name]``.

    Kafka: ``kafka://host:port[,host:port...]/topic[?options]``; without a topic the
    stream name is used with the characters Kafka does not allow replaced by ``.``
    (``recloop:events`` → ``recloop.events``).  See :mod:`recloop.streaming.buses.kafka`.
    """
    dlq = dead_letter_stream or f"{stream}:dead"
    if url is None or url in ("", "memory:", "memory://"):
        from recloop.streaming.buses.memory import MemoryBus

        return MemoryBus.named("default", stream=stream, dead_letter_stream=dlq)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from recloop.streaming.buses.memory import MemoryBus

        name = url.split("://", 1)[-1] or "default"
        return MemoryBus.named(name, stream=stream, dead_letter_stream=dlq)
    if scheme in ("redis", "rediss", "unix"):
        from recloop.streaming.buses.redis import RedisStreamBus

        return RedisStreamBus(url, stream=stream, dead_letter_stream=dlq, timeout_s=timeout_s)
    if scheme == "kafka":
        from recloop.streaming.buses.kafka import KafkaBus

        # The default dead-letter name follows the topic, not the (Redis-style) stream name.
        explicit = dead_letter_stream if dead_letter_stream != f"{stream}:dead" else None
        return KafkaBus(url, stream=stream, dead_letter_stream=explicit, timeout_s=timeout_s)
    raise ConfigError(
        f"bus url {url!r}: unsupported scheme {scheme!r} "
        "(expected redis://, rediss://, unix://, kafka:// or memory://)"
    )


def is_in_process(url: str | None) -> bool:
    """Whether the bus URL names the in-process bus (usable by one process only)."""
    return url is None or url in ("", "memory:") or url.split(":", 1)[0].lower() == "memory"
