"""Logging every served list without holding up the request that served it.

The request path only appends the (immutable) answer to a bounded in-process queue
(:meth:`ServedLog.submit`, a deque append); a background task drains it in batches and
writes them to a sink: the event bus (``recloop stream`` then writes them to SQL, see
:mod:`recloop.streaming.served`) or, without a bus, the SQL log directly.  A sink that
fails keeps its batch at the head of the queue and is retried with backoff; when the queue
is full, new lists are dropped and counted in ``recloop_served_lists{outcome="dropped"}``
(and logged), never silently.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from recloop.serving.metrics import ServiceMetrics

logger = logging.getLogger(__name__)


class Served(Protocol):
    """What the request path queues: an answer that can describe itself for the log."""

    def log_doc(self) -> dict[str, Any]: ...


class ServedSink(Protocol):
    async def write(self, docs: Sequence[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


class BusSink:
    """Publishes served lists onto the event stream (one entry per list)."""

    def __init__(self, url: str, *, stream: str) -> None:
        from recloop.streaming.buses import open_bus

        self.bus = open_bus(url, stream=stream, dead_letter_stream=f"{stream}:dead")

    async def write(self, docs: Sequence[dict[str, Any]]) -> None:
        from recloop.streaming.served import encode_served

        await self.bus.publish([encode_served(d) for d in docs])

    async def close(self) -> None:
        await self.bus.close()


class SqlSink:
    """Inserts served lists into the SQL log's ``served_items`` table (in a thread)."""

    def __init__(self, url: str, *, prefix: str = "") -> None:
        from recloop.streaming.log import BehaviorLog

        self.log = BehaviorLog(url, prefix=prefix)

    async def write(self, docs: Sequence[dict[str, Any]]) -> None:
        from recloop.streaming.served import served_rows

        rows = served_rows(docs)
        await asyncio.to_thread(self.log.append_served, rows)

    async def close(self) -> None:
        self.log.dispose()


class ServedLog:
    """The bounded queue and its drain task (start with :meth:`start`, stop with
    :meth:`close`)."""

    def __init__(
        self,
        sink: ServedSink,
        *,
        metrics: ServiceMetrics,
        max_queue: int = 10_000,
        batch: int = 500,
        retry_s: float = 0.2,
        retry_max_s: float = 5.0,
        linger_s: float = 0.0,
    ) -> None:
        self.sink = sink
        self.max_queue = max_queue
        self.batch = batch
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.linger_s = linger_s
        """After the first list arrives, wait this long for more before writing: under load
        one write (one bus round trip) carries many lists instead of a micro-batch's few."""
        self._queue: collections.deque[Served] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._logged = metrics.served_lists.labels(outcome="logged")
        self._dropped = metrics.served_lists.labels(outcome="dropped")
        self._depth = metrics.served_queue
        self.dropped = 0

    def submit(self, served: Served) -> None:
        """Queue one served list; never waits.  A full queue drops it and counts it.  Its
        document is built by the drain task, off the request path."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            self._dropped.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error(
                    "served-list log queue full (%d): %d lists dropped so far",
                    self.max_queue,
                    self.dropped,
                )
            return
        self._queue.append(served)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        delay = self.retry_s
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.linger_s > 0 and len(self._queue) < self.batch:
                await asyncio.sleep(self.linger_s)
            n = min(self.batch, len(self._queue))
            docs = [self._queue[i].log_doc() for i in range(n)]
            try:
                await self.sink.write(docs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the batch stays queued; the queue bounds the memory
                logger.warning(
                    "served-list log: writing %d lists failed (%s: %s); retrying in %.1fs",
                    n,
                    type(exc).__name__,
                    str(exc).splitlines()[0][:200] if str(exc) else "",
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            delay = self.retry_s
            for _ in range(n):
                self._queue.popleft()
            self._logged.inc(n)
            self._depth.set(len(self._queue))

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop and close the sink."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._queue and loop.time() < deadline and self._task and not self._task.done():
            await asyncio.sleep(0.01)
        if self._queue:
            logger.error("served-list log: %d lists not written at shutdown", len(self._queue))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.sink.close()
