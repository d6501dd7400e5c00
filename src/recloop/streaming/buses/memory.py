"""The in-process bus (``memory://`` or ``memory://name``): the same semantics as Redis
Streams (pending list, acknowledgements, idle-time reclaim, dead letters) inside one process,
for laptop runs and tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from recloop.streaming.buses.base import DEFAULT_STREAM, DeadLetterRecord
from recloop.streaming.events import BusMessage, DeadLetter


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

    async def lag(self, group: str) -> int | None:
        return None  # one shared stream: no per-consumer backlog

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
