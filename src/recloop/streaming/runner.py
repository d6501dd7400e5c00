"""The stream worker: read a batch, write it to every sink, acknowledge; and its processes.

For each batch (:meth:`StreamProcessor.process`):

1. validate; malformed events go to the dead-letter stream with their reason;
2. behaviour log: insert the events not logged yet and add them to the popular-items window
   counts, in one SQL transaction (exactly once under redelivery, see :mod:`.log`);
3. add the batch's events to their users' recent-item lists in the online store (ordered by
   event time and deduplicated by event id there, so a redelivered batch is harmless and a
   crash between steps 2 and 3 loses nothing);
4. with an artifact: refresh the recommendations of the batch's users with one batched
   inference call, log the lists with the realised reward of each user's previous list, and
   store them;
5. at most every ``popular_refresh_s`` (and when idle), publish the window's top items;
6. acknowledge the whole batch.

Served lists (published by the service onto the same stream, see
:mod:`recloop.streaming.served`) are split off before validation and written to the
``served_items`` table first; events naming their list are recorded in ``feedback_links``;
then the unsettled impressions of the batch's users are attributed again from the log (a
pure function of what is logged, so arrival order and redeliveries do not matter), and the
impressions older than the event-time watermark minus the attribution window and the allowed
lateness are settled (unanswered ones get reward 0).

A sink that cannot be reached (database down, Redis restarting) is retried with exponential
backoff; the batch stays pending (its idle time reset, so no other worker takes it over)
and is acknowledged only once every step succeeded.  Steps already done are not repeated.
Events the log refuses for their data are isolated by the log (it bisects the batch) and
dead-lettered alone, with the database's reason and their original bus entry; the rest of
the batch goes on.  A batch the log rejects for good as a whole (not a connection problem)
is dead-lettered with the reason, and a later cache step that fails for good is logged as an
error, so that one poison batch never stops the worker.

:func:`run_stream` starts ``workers`` processes in one consumer group; SIGTERM or SIGINT
makes each finish its batch and exit.  A worker process that dies stops the others and
fails the run (exit status 1), naming the worker and its exit status or signal.

Why the window counts live in SQL and not in per-worker memory or Redis: each worker sees
only its share of the stream, so counts must be shared; keeping them in the log's database,
updated in the transaction that inserts the events and only for the rows that transaction
really inserted, makes them exact under redelivery, reclaim and worker crashes, and lets
them survive a Redis restart.  The price is one upsert row per (bucket, item) per batch.

Ordering: the recent-item lists are in event-time order whatever order the workers finish
their batches in (the store sorts by event time).  The popular counts do not depend on
order; lateness is judged
per worker (as Flink judges it per partition), so a batch reclaimed long after it was read
may count as late.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import orjson
import polars as pl

from recloop.errors import ConfigError
from recloop.streaming.buses import EventBus, is_in_process, open_bus
from recloop.streaming.events import (
    BusMessage,
    DeadLetter,
    ParsedBatch,
    parse_batch,
)
from recloop.streaming.heartbeat import Heartbeat
from recloop.streaming.log import AppendResult, ArmTally, BehaviorLog, is_transient
from recloop.streaming.operators import (
    PartitionedWatermarks,
    Recommender,
    realised_rewards,
    recent_by_user,
    recommendation_rows,
)
from recloop.streaming.served import is_served, served_rows
from recloop.streaming.settings import StreamSettings

if TYPE_CHECKING:
    from recloop.artifacts import Artifact
    from recloop.stores import OnlineStore

logger = logging.getLogger(__name__)

T = TypeVar("T")


# ----------------------------------------------------------------------------- retries


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential backoff: initial_s, initial_s * factor, ... capped at max_s."""

    initial_s: float = 0.1
    """First wait."""
    max_s: float = 10.0
    """Longest wait."""
    factor: float = 2.0
    """Growth per attempt."""

    def delays(self) -> Iterator[float]:
        d = self.initial_s
        while True:
            yield min(d, self.max_s)
            d *= self.factor


class Stopped(Exception):  # noqa: N818  (not an error: a shutdown)
    """Shutdown was requested while a step was waiting to retry."""


def is_transient_error(exc: BaseException) -> bool:
    """Connection-type failures of any sink: worth waiting for, never a reason to drop data."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from recloop.stores import StoreError

    return is_transient(exc) or isinstance(
        exc, RedisConnectionError | RedisTimeoutError | StoreError | OSError
    )


async def retry(
    what: str,
    fn: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    stop: asyncio.Event,
    on_wait: Callable[[], Awaitable[None]] | None = None,
    attempts: list[float] | None = None,
) -> T:
    """Await ``fn()`` until it succeeds, waiting ``backoff`` between transient failures.

    Non-transient errors propagate.  ``on_wait`` runs before each wait (e.g. to keep pending
    entries claimed); ``attempts`` (if given) collects the waits, for tests and stats.
    Raises :class:`Stopped` when ``stop`` is set while waiting.
    """
    delays = backoff.delays()
    n = 0
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not is_transient_error(exc):
                raise
            n += 1
            delay = next(delays)
            if attempts is not None:
                attempts.append(delay)
            log = logger.warning if n == 1 or n % 10 == 0 else logger.debug
            log("%s failed (attempt %d): %s; retrying in %.2fs", what, n, _short(exc), delay)
        if on_wait is not None:
            with contextlib.suppress(Exception):
                await on_wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)
        if stop.is_set():
            raise Stopped(what)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


# ----------------------------------------------------------------------------- stats


@dataclass
class WorkerStats:
    """Counters of one worker (or, summed, of all)."""

    batches: int = 0
    messages: int = 0
    logged: int = 0
    """Events newly written to the behaviour log."""
    duplicates: int = 0
    """Redelivered events already in the log."""
    dead_letters: int = 0
    late_events: int = 0
    """New events beyond the allowed lateness: logged, not counted in popular items."""
    claimed: int = 0
    """Entries taken over from other consumers."""
    recommendations: int = 0
    """Recommendation lists refreshed."""
    served_lists: int = 0
    """Served lists (from the service) written to the served-items table."""
    settled: int = 0
    """Impressions whose reward was settled."""
    feedback_after_settlement: int = 0
    """New events naming a list whose impression of their item was settled before they
    could be its reward (settled is final: they are logged and attributed to nothing)."""
    popular_refreshes: int = 0
    retries: int = 0
    failed_steps: int = 0
    """Cache steps skipped after a permanent error (logged as errors)."""
    busy_cpu_s: float = 0.0
    """CPU seconds of the worker process from its first batch on (start-up excluded)."""
    lag: int = 0
    """Consumer lag at the last report: records of the worker's partitions not read yet
    (Kafka: high watermark minus position; summed over workers, the group's); 0 on buses
    without per-consumer backlog (Redis Streams, memory)."""

    def add(self, other: WorkerStats) -> WorkerStats:
        return WorkerStats(
            **{
                f.name: getattr(self, f.name) + getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- processor


def split_served(messages: Sequence[BusMessage]) -> tuple[list[BusMessage], list[BusMessage]]:
    """(behaviour events, served lists) of a batch, in bus order; a prefix test per message."""
    served = [m for m in messages if is_served(m.payload)]
    if not served:
        return list(messages), []
    return [m for m in messages if not is_served(m.payload)], served


class StreamProcessor:
    """Runs the steps of the module docstring for one batch at a time."""

    def __init__(
        self,
        settings: StreamSettings,
        *,
        bus: EventBus,
        store: OnlineStore,
        log: BehaviorLog,
        consumer: str,
        stop: asyncio.Event,
        recommender: Recommender | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.store = store
        self.log = log
        self.consumer = consumer
        self.stop = stop
        self.recommender = recommender
        self.backoff = Backoff(initial_s=settings.backoff_initial_s, max_s=settings.backoff_max_s)
        self.watermark = PartitionedWatermarks(settings.allowed_lateness_s)
        self.stats = WorkerStats()
        self.retry_waits: list[float] = []
        self._popular_dirty = False
        self._popular_at = -math.inf
        self._gc_at = -math.inf
        self._cpu_start: float | None = None
        self._settled_before: int | None = None
        self.arm_totals: dict[str, ArmTally] = {}
        """Impressions this worker settled per A/B arm, with their attributed clicks and
        rewards (final: counted once, when settled); its heartbeat carries them to the
        service's /metrics."""
        self.last_entry_id: str | None = None
        """The newest bus entry processed (its heartbeat's lag, see :mod:`.heartbeat`)."""

    def finish(self) -> WorkerStats:
        """The counters, with the CPU time since the first batch."""
        if self._cpu_start is not None:
            self.stats.busy_cpu_s = round(time.process_time() - self._cpu_start, 3)
        return self.stats

    async def _retry(self, what: str, fn: Callable[[], Awaitable[T]], ids: Sequence[str] = ()) -> T:
        async def keep_claimed() -> None:
            await self.bus.touch(self.settings.group, self.consumer, ids)

        before = len(self.retry_waits)
        try:
            return await retry(
                what,
                fn,
                backoff=self.backoff,
                stop=self.stop,
                on_wait=keep_claimed if ids else None,
                attempts=self.retry_waits,
            )
        finally:
            self.stats.retries += len(self.retry_waits) - before

    async def process(
        self, messages: Sequence[BusMessage], parsed: ParsedBatch | None = None
    ) -> None:
        """Run one batch through every sink and acknowledge it (see the module docstring).

        ``parsed`` is ``parse_batch(messages)`` when the caller validated them already.
        """
        ids = [m.id for m in messages]
        event_msgs, served_msgs = split_served(messages)
        if parsed is None:
            parsed = parse_batch(event_msgs)
        if self.stats.batches == 0:
            self._cpu_start = time.process_time()
        self.stats.batches += 1
        self.stats.messages += len(messages)
        users: list[str] = []
        new_ids: list[str] = []
        if served_msgs:
            users += await self._served(served_msgs, ids)
        if parsed.dead:
            await self._dead_letter(parsed.dead, ids)
        events = parsed.events
        if events.height:
            # Observed once per batch, before any retry, so a retry cannot move the watermark.
            index = parsed.message_index()
            parts = None
            if event_msgs[0].partition is not None:
                parts = np.fromiter((m.partition for m in event_msgs), np.int64, len(event_msgs))[
                    index
                ]
            late = self.watermark.observe(events["ts"].to_numpy(), parts)
            origin = [event_msgs[i] for i in index.tolist()]
            new_ids = await self._sinks(events, late, ids, origin)
            if parsed.links is not None and parsed.links.height:
                links = parsed.links
                await self._cache_step(
                    "feedback links", lambda: asyncio.to_thread(self.log.append_links, links), ids
                )
            users += events["user_id"].unique().to_list()
        if self.settings.attribution and (users or self.watermark.max_ts is not None):
            await self._cache_step("attribution", lambda: self._attribute(users), ids)
            if parsed.links is not None and parsed.links.height and new_ids:
                named = parsed.links.filter(pl.col("event_id").is_in(new_ids))
                await self._cache_step(
                    "feedback after settlement", lambda: self._after_settlement(named), ids
                )
        await self._retry("ack", lambda: self.bus.ack(self.settings.group, ids), ids)
        if ids:
            self.last_entry_id = ids[-1]
        await self.refresh_popular()

    async def _served(self, messages: Sequence[BusMessage], ids: Sequence[str]) -> list[str]:
        """Write served lists to the served-items table; a malformed one is dead-lettered.
        Returns their users."""
        parsed: list[tuple[BusMessage, Any]] = []
        bad: list[DeadLetter] = []
        for m in messages:
            try:
                parsed.append((m, orjson.loads(m.payload or b"")))
            except Exception as exc:
                bad.append(DeadLetter.of(m, f"served list: {_short(exc)}"))
        docs = [doc for _, doc in parsed]
        try:
            rows = served_rows(docs)  # the batch at once: the usual case
        except Exception:
            # some list is malformed: each is checked alone, and the bad ones kept with
            # their reasons (any error of the conversion names a bad list)
            docs = []
            for m, doc in parsed:
                try:
                    served_rows([doc])
                    docs.append(doc)
                except Exception as exc:
                    bad.append(DeadLetter.of(m, f"served list: {_short(exc)}"))
            rows = served_rows(docs)
        if bad:
            await self._dead_letter(bad, ids)
        if not docs:
            return []
        await self._retry(
            "served lists", lambda: asyncio.to_thread(self.log.append_served, rows), ids
        )
        self.stats.served_lists += len(docs)
        return rows["user_id"].unique().to_list()

    async def _attribute(self, users: list[str]) -> None:
        """Attribute the users' feedback to their impressions, then settle the impressions
        the event-time watermark has left behind (see the module docstring)."""
        s = self.settings
        if users:
            await asyncio.to_thread(
                self.log.attribute_users, users, window_s=s.attribution_window_s
            )
        if self.watermark.max_ts is None:
            return
        horizon = self.watermark.max_ts - s.attribution_window_s - (s.allowed_lateness_s or 0)
        if self._settled_before is None or horizon > self._settled_before:
            tally = await asyncio.to_thread(self.log.settle_by_arm, horizon)
            for arm, t in tally.items():
                self.stats.settled += t.impressions
                if arm is not None:
                    old = self.arm_totals.get(arm) or ArmTally()
                    self.arm_totals[arm] = ArmTally(
                        impressions=old.impressions + t.impressions,
                        clicks=old.clicks + t.clicks,
                        reward=old.reward + t.reward,
                    )
            self._settled_before = horizon

    async def _after_settlement(self, named: pl.DataFrame) -> None:
        """Count the batch's new events that named a list settled without them (after
        attribution: what it could still place, it has placed)."""
        if named.height == 0:
            return
        n = await asyncio.to_thread(self.log.feedback_after_settlement, named["event_id"].to_list())
        if n:
            self.stats.feedback_after_settlement += n
            logger.warning(
                "%d events named a list settled before they arrived: logged, attributed to "
                "nothing (raise allowed_lateness_s if this is frequent)",
                n,
            )

    async def _dead_letter(self, letters: Sequence[DeadLetter], ids: Sequence[str]) -> None:
        await self._retry(
            "dead-letter", lambda: self.bus.dead_letter(letters, consumer=self.consumer), ids
        )
        self.stats.dead_letters += len(letters)
        for d in letters[:3]:
            logger.warning("dead letter %s: %s", d.entry_id, d.reason)

    async def _sinks(
        self,
        events: pl.DataFrame,
        late: np.ndarray,
        ids: list[str],
        origin: Sequence[BusMessage],
    ) -> list[str]:
        """``origin[r]``: the bus message of event row r (dead letters keep its bytes).
        Returns the ids of the events newly logged."""
        s = self.settings
        try:
            result = await self._retry(
                "behaviour log",
                lambda: asyncio.to_thread(
                    self.log.append, events, slide_s=s.slide_s, countable=~late
                ),
                ids,
            )
        except Stopped:
            raise
        except Exception as exc:
            # Not a data problem the log could isolate (it bisects those): nothing of the
            # batch is logged, all of it is kept as dead letters.
            logger.exception("behaviour log rejected a batch of %d events", events.height)
            reason = f"behaviour log rejected the batch: {_short(exc)}"
            await self._dead_letter([DeadLetter.of(m, reason) for m in origin], ids)
            return []
        if result.rejected:
            await self._dead_letter(
                [
                    DeadLetter.of(origin[row], f"behaviour log refused the event: {why}")
                    for row, why in result.rejected
                ],
                ids,
            )
            keep = np.ones(events.height, bool)
            keep[[row for row, _ in result.rejected]] = False
            events = events.filter(pl.Series(keep))
        self.stats.logged += result.new.height
        self.stats.duplicates += result.duplicates
        if result.late:
            self.stats.late_events += result.late
            logger.warning(
                "%d late events (older than %s minus %ss): logged, not counted in popular items",
                result.late,
                self.watermark.max_ts,
                s.allowed_lateness_s,
            )
        if result.counted:
            self._popular_dirty = True
        await self._cache_step("recent items", lambda: self._push_recent(events, result), ids)
        new = result.new
        if new.height == 0:
            return []
        if self.recommender is not None:
            await self._cache_step("recommendations", lambda: self._refresh(new, ids), ids)
        return new["event_id"].to_list()

    async def _push_recent(self, events: pl.DataFrame, result: AppendResult) -> None:
        """The batch's events as the log holds them onto the recent lists: the new ones, and
        the duplicates the log holds exactly so (a batch redelivered after a crash between
        the log and the store still reaches the lists; the store dedupes by event id),
        never an event whose id the log gave to another one."""
        logged = result.new
        if result.duplicates:
            seen = events.join(logged.select("event_id"), on="event_id", how="anti")
            again = await asyncio.to_thread(self.log.as_logged, seen)
            logged = pl.concat([logged, again])
        n = self.settings.recent_len
        await self.store.push_recent(recent_by_user(logged, max_len=n), max_len=n)

    async def _cache_step(
        self, what: str, fn: Callable[[], Awaitable[Any]], ids: Sequence[str]
    ) -> None:
        try:
            await self._retry(what, fn, ids)
        except Stopped:
            raise
        except Exception:
            self.stats.failed_steps += 1
            logger.exception("%s: step failed for good; skipped for this batch", what)

    async def _refresh(self, new: pl.DataFrame, ids: Sequence[str]) -> None:
        assert self.recommender is not None
        s = self.settings
        users = new["user_id"].unique(maintain_order=True).to_list()
        # Reading is retried as a unit; writing the log and the store are separate steps so
        # that a retry after a store failure does not log the lists twice.
        recent = await self.store.get_recent(users, n=s.recent_len)
        recs = self.recommender.recommend(recent)
        previous = await asyncio.to_thread(self.log.previous_lists, users)
        realised = realised_rewards(previous, new)
        rows = recommendation_rows(recs, new, realised)
        await self._retry(
            "recommendation log",
            lambda: asyncio.to_thread(self.log.append_recommendations, rows),
            ids,
        )
        lists = {
            u: list(zip(i, sc, strict=True))
            for u, i, sc in zip(recs.users, recs.items, recs.scores, strict=True)
        }
        await self._retry(
            "store recommendations",
            lambda: self.store.set_recommendations(lists, model_version=recs.model_version),
            ids,
        )
        self.stats.recommendations += len(users)

    async def refresh_popular(self, *, force: bool = False) -> None:
        """Publish the current window's top items if counts changed (or ``force``)."""
        s = self.settings
        now = time.monotonic()
        if not force and (not self._popular_dirty or now - self._popular_at < s.popular_refresh_s):
            return
        self._popular_dirty = False
        self._popular_at = now
        window = await self._retry(
            "popular items",
            lambda: asyncio.to_thread(self.log.popular, n_buckets=s.n_buckets, top=s.top),
        )
        await self._cache_step(
            "store popular items", lambda: self.store.set_popular(window.items), ()
        )
        self.stats.popular_refreshes += 1
        if window.end_bucket is not None and now - self._gc_at > 60:
            self._gc_at = now
            lateness = s.allowed_lateness_s if s.allowed_lateness_s is not None else None
            if lateness is not None:
                keep_from = window.end_bucket - s.n_buckets - math.ceil(lateness / s.slide_s) - 1
                await self._cache_step(
                    "drop old window buckets",
                    lambda: asyncio.to_thread(self.log.drop_buckets_before, keep_from),
                    (),
                )


# ----------------------------------------------------------------------------- worker


def consumer_name(index: int = 0) -> str:
    """Unique per process: host, pid and worker index."""
    return f"{socket.gethostname()}-{os.getpid()}-{index}"


REPORT_INTERVAL_S = 1.0
"""How often a worker process hands its counters to the parent (see :func:`run_stream`)."""


class Worker:
    """Reads batches for one consumer of the group until stopped (or idle, if asked).

    ``report`` (if given) gets the counters at most every :data:`REPORT_INTERVAL_S`.
    """

    def __init__(
        self, processor: StreamProcessor, *, report: Callable[[WorkerStats], None] | None = None
    ) -> None:
        self.p = processor
        self.s = processor.settings
        self.report = report

    async def run(self) -> WorkerStats:
        p, s = self.p, self.s
        bus, stop = p.bus, p.stop
        group, me = s.group, p.consumer
        await p._retry("create consumer group", lambda: bus.ensure_group(group))
        # Entries this consumer name read before a restart come first.
        own = await p._retry(
            "read own pending", lambda: bus.read_own_pending(group, me, count=s.batch_size)
        )
        if own:
            await p.process(own)
        next_claim = time.monotonic()
        last_event = time.monotonic()
        last_stats = last_report = time.monotonic()
        idle_refreshed = True
        heartbeat = Heartbeat(p)
        # Ids of the batch in the sinks now.  The next batch is fetched meanwhile, and a
        # claim then sees this batch as pending and idle since it was read: on a slow sink
        # it could take its own entries over and process them a second time.
        in_flight: set[str] = set()

        async def fetch() -> tuple[list[BusMessage], ParsedBatch | None]:
            nonlocal next_claim
            msgs: list[BusMessage] = []
            if time.monotonic() >= next_claim:
                next_claim = time.monotonic() + s.claim_interval_s
                busy = frozenset(in_flight)  # as the claim is sent: the batch may end meanwhile
                msgs = await p._retry(
                    "claim stale entries",
                    lambda: bus.claim_stale(
                        group, me, min_idle_ms=s.claim_min_idle_ms, count=s.batch_size
                    ),
                )
                # Still this consumer's (a claim by itself moves nothing): its batch acks them.
                msgs = [m for m in msgs if m.id not in busy]
                if msgs:
                    p.stats.claimed += len(msgs)
                    logger.info("%s took over %d stale entries", me, len(msgs))
            if not msgs:
                msgs = await p._retry(
                    "read", lambda: bus.read(group, me, count=s.batch_size, block_ms=s.block_ms)
                )
            return msgs, (parse_batch(split_served(msgs)[0]) if msgs else None)

        # The next batch is read and validated while the current one is in the sinks (whose
        # database calls run in a thread), so the bus round trip and the JSON work overlap
        # with the database's.
        ahead: asyncio.Task[tuple[list[BusMessage], ParsedBatch | None]] | None = None
        try:
            while not stop.is_set():
                msgs, parsed = await (ahead if ahead is not None else fetch())
                ahead = None
                now = time.monotonic()
                due_stats = now - last_stats >= s.stats_interval_s
                due_report = self.report is not None and now - last_report >= REPORT_INTERVAL_S
                if due_stats or due_report:
                    p.stats.lag = await self._lag()
                if due_stats:
                    last_stats = now
                    logger.info("%s: %s", me, p.stats.as_dict())
                if self.report is not None and due_report:
                    last_report = now
                    self.report(p.stats)
                await heartbeat.maybe_beat()
                if msgs:
                    last_event = now
                    idle_refreshed = False
                    in_flight.update(m.id for m in msgs)
                    ahead = asyncio.create_task(fetch())
                    try:
                        await p.process(msgs, parsed)
                    finally:
                        in_flight.clear()
                    continue
                # Idle: publish the final window once (other workers' batches included).
                if not idle_refreshed:
                    idle_refreshed = True
                    await p.refresh_popular(force=True)
                if (
                    s.exit_when_idle_s is not None
                    and now - last_event >= s.exit_when_idle_s
                    and await p._retry("pending count", lambda: bus.pending_count(group)) == 0
                ):
                    break
                if s.block_ms == 0:
                    await asyncio.sleep(0.05)
            if ahead is not None:
                # Stopping: a batch already read is finished rather than left to time out.
                msgs, parsed = await ahead
                ahead = None
                if msgs:
                    await p.process(msgs, parsed)
            p.stats.lag = await self._lag()
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
        await heartbeat.beat(state="stopped")
        return p.stats

    async def _lag(self) -> int:
        """The bus's consumer lag for this worker (0 when it keeps none or cannot tell)."""
        try:
            return (await self.p.bus.lag(self.s.group)) or 0
        except Exception as exc:  # a metric: never a reason to stop
            logger.debug("lag: %s", _short(exc))
            return 0


async def run_worker_async(
    settings: StreamSettings,
    *,
    consumer: str | None = None,
    stop: asyncio.Event | None = None,
    bus: EventBus | None = None,
    store: OnlineStore | None = None,
    log: BehaviorLog | None = None,
    artifact: Artifact | None = None,
    report: Callable[[WorkerStats], None] | None = None,
) -> WorkerStats:
    """Open the bus, store, log (and artifact) the settings name and run one worker.

    Objects passed in are used instead (and not closed).  Without ``stop`` the worker
    installs SIGTERM/SIGINT handlers that stop it after the current batch.  ``report``: see
    :class:`Worker`.
    """
    from recloop.stores import open_store

    own_stop = stop is None
    stop = stop or asyncio.Event()
    if own_stop:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
    opened: list[Any] = []
    if bus is None:
        bus = open_bus(
            settings.bus_url, stream=settings.stream, dead_letter_stream=settings.dead_letters
        )
        opened.append(bus)
    if store is None:
        store = open_store(settings.resolved_store_url, prefix=settings.store_prefix, timeout_s=5.0)
        opened.append(store)
    own_log = log is None
    if log is None:
        log = BehaviorLog(settings.database_url, prefix=settings.table_prefix)
    if artifact is None and settings.artifact is not None:
        from recloop.artifacts import load_artifact

        artifact = load_artifact(settings.artifact)
    recommender = Recommender(artifact, n=settings.rec_n) if artifact is not None else None
    processor = StreamProcessor(
        settings,
        bus=bus,
        store=store,
        log=log,
        consumer=consumer or consumer_name(),
        stop=stop,
        recommender=recommender,
    )
    try:
        await Worker(processor, report=report).run()
    except Stopped:
        logger.info(
            "%s stopped while retrying; its pending entries stay for others", processor.consumer
        )
    finally:
        for obj in opened:
            with contextlib.suppress(Exception):
                await obj.close()
        if own_log:
            log.dispose()
    stats = processor.finish()
    logger.info("%s finished: %s", processor.consumer, stats.as_dict())
    return stats


@dataclass(frozen=True, kw_only=True)
class WorkerExit:
    """How one worker process of :func:`run_stream` ended."""

    name: str
    """Process name, ``recloop-stream-<index>``."""
    pid: int | None
    """Its process id."""
    exitcode: int | None
    """0: stopped cleanly; > 0: failed with that status; < 0: killed by signal -exitcode."""
    final_counts: bool
    """Whether its counters are final (False: the last it reported before it died, at most
    :data:`REPORT_INTERVAL_S` old, or none)."""

    @property
    def failed(self) -> bool:
        return self.exitcode != 0

    def describe(self) -> str:
        code = self.exitcode
        if code is None:
            how = "did not exit"
        elif code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with status {code}"
        counts = "final counts" if self.final_counts else "counts up to its last report"
        return f"worker {self.name} (pid {self.pid}) {how} ({counts} included)"


class WorkersFailed(RuntimeError):  # noqa: N818  (reads as what happened)
    """A worker process of :func:`run_stream` died; the others were stopped."""

    def __init__(self, stats: WorkerStats, exits: list[WorkerExit]) -> None:
        self.stats = stats
        """Counters of every worker (a dead one's up to its last report)."""
        self.exits = exits
        """How each worker process ended."""
        failed = [e for e in exits if e.failed]
        super().__init__("; ".join(e.describe() for e in failed))


def _write_report(path: Path, stats: WorkerStats, *, final: bool) -> None:
    """Atomically replace a worker's report file (a kill mid-write leaves the last one)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps({"final": final, "stats": stats.as_dict()}))
    os.replace(tmp, path)


def _read_report(path: Path) -> tuple[WorkerStats | None, bool]:
    try:
        doc = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None, False
    return WorkerStats(**doc["stats"]), bool(doc["final"])


def _worker_process(settings: dict[str, Any], index: int, level: int, report_file: str) -> None:
    """Entry point of a spawned worker process."""
    from recloop.progress import setup_logging

    setup_logging(level)
    s = StreamSettings(**settings)
    if s.artifact is not None:
        import torch

        torch.set_num_threads(1)  # one core per worker; the workers are the parallelism
    path = Path(report_file)
    stats = asyncio.run(
        run_worker_async(
            s,
            consumer=consumer_name(index),
            report=lambda st: _write_report(path, st, final=False),
        )
    )
    _write_report(path, stats, final=True)


def run_stream(settings: StreamSettings) -> WorkerStats:
    """Run ``settings.workers`` workers (in this process when there is one) until stopped.

    Several workers run as processes.  When one dies (killed, or exits with an error) the
    others are stopped after their current batch and :class:`WorkersFailed` is raised,
    naming the worker and its exit status or signal, with every worker's counters (the
    dead one's up to its last report): the processor fails as a whole, for its supervisor
    to restart, rather than run on with fewer workers unnoticed.  The dead worker's pending
    entries are taken over by the next workers (Redis Streams: ``claim_min_idle_ms``; Kafka:
    its partitions' next owners read on from the last committed offset).
    """
    if settings.workers > 1 and is_in_process(settings.bus_url):
        raise ConfigError(
            f"--workers {settings.workers} needs a shared bus; memory:// lives in one process "
            "(use redis://... or --workers 1)"
        )
    store_url = settings.resolved_store_url
    if settings.workers > 1 and (store_url.startswith("memory") or store_url == ""):
        raise ConfigError(
            f"--workers {settings.workers} needs a shared store; memory:// lives in one "
            "process (use redis://... or sqlite:///path)"
        )
    if settings.artifact is not None:
        import torch

        # Inference batches are small; a thread pool per worker only fights the other
        # workers (and the databases) for the cores.
        torch.set_num_threads(1)
    if settings.workers == 1:
        return asyncio.run(run_worker_async(settings))
    try:
        BehaviorLog(settings.database_url, prefix=settings.table_prefix).create_schema()
    except Exception as exc:
        # The workers retry with backoff; creating the tables up front only avoids a race.
        logger.warning("could not create the log tables yet: %s", _short(exc))
    with tempfile.TemporaryDirectory(prefix="recloop-stream-") as tmp:
        return _run_processes(settings, Path(tmp))


def _run_processes(settings: StreamSettings, reports: Path) -> WorkerStats:
    ctx = mp.get_context("spawn")
    level = logging.getLogger("recloop").getEffectiveLevel()
    files = [reports / f"worker-{i}.json" for i in range(settings.workers)]
    procs = [
        ctx.Process(
            target=_worker_process,
            args=(settings.model_dump(), i, level, str(files[i])),
            name=f"recloop-stream-{i}",
        )
        for i in range(settings.workers)
    ]
    for proc in procs:
        proc.start()

    def stop_all() -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    def forward(signum: int, _frame: Any) -> None:
        stop_all()

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        running = {proc.sentinel: proc for proc in procs}
        while running:
            for sentinel in mp_connection.wait(list(running)):
                proc = running.pop(cast(int, sentinel))
                proc.join()
                if proc.exitcode != 0 and running:
                    logger.error(
                        "worker %s (pid %s) died (exit code %s); stopping the others",
                        proc.name,
                        proc.pid,
                        proc.exitcode,
                    )
                    stop_all()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    total = WorkerStats()
    exits = []
    for proc, path in zip(procs, files, strict=True):
        stats, final = _read_report(path)
        if stats is not None:
            total = total.add(stats)
        exits.append(
            WorkerExit(name=proc.name, pid=proc.pid, exitcode=proc.exitcode, final_counts=final)
        )
    if any(e.failed for e in exits):
        for e in exits:
            if e.failed:
                logger.error("%s", e.describe())
        raise WorkersFailed(total, exits)
    return total


def run_with_replay(settings: StreamSettings, events: pl.DataFrame) -> WorkerStats:
    """Replay ``events`` onto the bus and process them with one worker, in this process.

    The laptop mode of ``recloop stream --replay`` (works with ``memory://``): the producer
    and the worker share one event loop; the worker stops once the bus has been idle for
    ``settings.exit_when_idle_s``.
    """
    from recloop.streaming.replay import replay

    if settings.workers != 1:
        raise ConfigError(
            "--replay runs the producer and one worker in this process; "
            "use `recloop replay` beside `recloop stream --workers N`"
        )
    if settings.exit_when_idle_s is None:
        raise ConfigError("an in-process replay needs exit_when_idle_s to know when to stop")

    async def both() -> WorkerStats:
        bus = open_bus(
            settings.bus_url, stream=settings.stream, dead_letter_stream=settings.dead_letters
        )
        try:
            producer = asyncio.create_task(replay(events, bus))
            stats = await run_worker_async(settings, bus=bus)
            await producer
            return stats
        finally:
            await bus.close()

    return asyncio.run(both())
