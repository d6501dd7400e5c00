"""Logging every served list without holding up the request that served it.

The request path only appends the (immutable) answer to a bounded in-process queue
(:meth:`ServedLog.submit`, a deque append); a background task drains it in batches and
writes them to a sink: the event bus (``recloop stream`` then writes them to SQL, see
:mod:`recloop.streaming.served`) or, without a bus, the SQL log directly.  A sink that
fails (or takes longer than ``write_timeout_s``) keeps its batch at the head of the queue
and is retried with backoff; when the queue is full, new lists are dropped.  Nothing is
lost silently: every list ends in ``recloop_served_lists{outcome=...}`` as ``logged``,
``dropped`` (the queue was full), ``rejected`` (the sink refused it alone twice while
taking other lists, or its document could not be built) or ``lost`` (still queued when the
service stopped), and each of the last three is logged as an error.

One list the sink refuses for good (a row the database cannot store) must not stop the
others: after ``isolate_after`` failed writes of one batch its lists are written one at a
time; a list refused there is tried alone once more after the pass, and rejected only if
refused again while other lists went through (a sink coming back mid-pass costs nothing),
and when none goes through (the sink is down) all stay queued.  A pass gives up after
``max_probe_failures`` failures in a row without a success, so a sink that is down costs
a few writes per pass, not one per queued list.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
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
        write_timeout_s: float = 10.0,
        isolate_after: int = 3,
        max_probe_failures: int = 8,
    ) -> None:
        self.sink = sink
        self.max_queue = max_queue
        self.batch = batch
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.linger_s = linger_s
        """After the first list arrives, wait this long for more before writing: under load
        one write (one bus round trip) carries many lists instead of a micro-batch's few."""
        self.write_timeout_s = write_timeout_s
        """A write that has not returned by then counts as failed (a hung connection)."""
        self.isolate_after = isolate_after
        """Failed writes of one batch before its lists are written one at a time."""
        self.max_probe_failures = max_probe_failures
        """Failures in a row, without a success, that end a one-at-a-time pass."""
        self._queue: collections.deque[Served] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._logged = metrics.served_lists.labels(outcome="logged")
        self._dropped = metrics.served_lists.labels(outcome="dropped")
        self._rejected = metrics.served_lists.labels(outcome="rejected")
        self._lost = metrics.served_lists.labels(outcome="lost")
        self._depth = metrics.served_queue
        self.dropped = 0
        self.rejected = 0
        self.lost = 0

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
        self._depth.set(len(self._queue))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _write(self, docs: Sequence[dict[str, Any]]) -> None:
        await asyncio.wait_for(self.sink.write(docs), self.write_timeout_s)

    def _reject(self, served: Served, why: str) -> None:
        self._queue.remove(served)
        self.rejected += 1
        self._rejected.inc()
        logger.error("served-list log: a list was rejected and is not logged: %s", why)

    def _docs(self, n: int) -> list[tuple[Served, dict[str, Any]]]:
        """The first ``n`` queued lists with their documents; a list whose document cannot
        be built is rejected (and leaves the queue)."""
        out = []
        for served in list(itertools.islice(self._queue, n)):
            try:
                out.append((served, served.log_doc()))
            except Exception as exc:
                self._reject(served, f"its document could not be built ({_short(exc)})")
        return out

    async def _drain(self) -> None:
        delay = self.retry_s
        failures = 0  # failed writes of the batch at the head of the queue
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.linger_s > 0 and len(self._queue) < self.batch:
                await asyncio.sleep(self.linger_s)
            pairs = self._docs(min(self.batch, len(self._queue)))
            if not pairs:
                continue
            if failures >= self.isolate_after and len(pairs) > 1:
                if not await self._one_at_a_time(pairs):
                    logger.warning(
                        "served-list log: no list went through one at a time (the sink is "
                        "down?); %d queued, retrying in %.1fs",
                        len(self._queue),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                failures, delay = 0, self.retry_s
                continue
            try:
                await self._write([d for _, d in pairs])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the batch stays queued; the queue bounds the memory
                # (a lone list refused again and again is kept: with nothing else queued,
                # a list the sink refuses cannot be told from a sink that is down)
                failures += 1
                logger.warning(
                    "served-list log: writing %d lists failed (%s); retrying in %.1fs",
                    len(pairs),
                    _short(exc),
                    delay,
                )
                self._depth.set(len(self._queue))
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            failures, delay = 0, self.retry_s
            for _ in pairs:
                self._queue.popleft()
            self._logged.inc(len(pairs))
            self._depth.set(len(self._queue))

    async def _one_at_a_time(self, pairs: list[tuple[Served, dict[str, Any]]]) -> bool:
        """Write ``pairs`` one list at a time.  True when something went through (the sink
        is up).  A list refused in the pass is written alone once more after that; refused
        again, with the sink seen working, it is rejected.  A write that timed out is never
        a refusal (a slow sink), nor is one refused before the sink came back in the same
        pass (it gets its second try after)."""
        refused: list[tuple[Served, dict[str, Any]]] = []
        went = 0
        for served, doc in pairs:
            if await self._alone(served, doc) is None:
                went += 1
                continue
            refused.append((served, doc))
            if not went and len(refused) >= self.max_probe_failures:
                break  # nothing goes through: the sink is down, keep everything
        if went:
            for served, doc in refused:
                exc = await self._alone(served, doc)
                if exc is not None and not isinstance(exc, TimeoutError):  # slow: kept
                    self._reject(served, f"the sink refused it alone, twice ({_short(exc)})")
        self._depth.set(len(self._queue))
        return went > 0

    async def _alone(self, served: Served, doc: dict[str, Any]) -> Exception | None:
        """Write one list: None when it went through (and left the queue), else why not."""
        try:
            await self._write([doc])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return exc
        self._queue.remove(served)
        self._logged.inc()
        return None

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for at most ``timeout_s``), then stop and close the sink;
        what is still queued is counted as lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._queue and loop.time() < deadline and self._task and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue:
            self.lost += len(self._queue)
            self._lost.inc(len(self._queue))
            logger.error("served-list log: %d lists not written at shutdown", len(self._queue))
            self._queue.clear()
            self._depth.set(0)
        await self.sink.close()


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
