"""Replay a prepared dataset onto the bus in event-time order.

Raw ids come from the dataset's id maps, and every event gets a deterministic id
``<first 8 hex digits of the events file's sha256>-<row>``, so replaying twice (or republishing
after a failure) never creates a second copy in the behaviour log.

Throttling: as fast as possible, ``rate`` events per second, or ``speed`` times real time
(``speed=3600``: an hour of the log per second).  Publishing is retried with backoff while
the bus is down; each batch is appended together with a counter (atomically), and when the
counter comes back lower than what was sent, the bus lost entries -- Redis restarted without
persistence -- and the replay starts over from the first event (the log drops the copies).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recloop.data import validity
from recloop.data.dataset import PreparedDataset
from recloop.errors import ConfigError, DataError
from recloop.progress import progress
from recloop.streaming.buses import EventBus
from recloop.streaming.events import EVENT_SCHEMA, RULES, encode_events
from recloop.streaming.runner import Backoff, retry

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReplayStats:
    """What a replay did."""

    events: int
    """Distinct events replayed."""
    published: int
    """Entries appended, republished ones included."""
    restarts: int
    """Times the bus lost entries and the replay started over."""
    seconds: float
    """Wall time."""

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def dataset_tag(ds: PreparedDataset) -> str:
    """First 8 hex digits of the dataset's events file sha256 (or of its arrays)."""
    digest = ds.events_sha256
    if not digest:
        h = hashlib.sha256()
        for a in (ds.user, ds.item, ds.timestamp, ds.reward):
            h.update(np.ascontiguousarray(a).tobytes())
        digest = h.hexdigest()
    return str(digest)[:8]


def replay_events(ds: PreparedDataset, *, limit: int | None = None) -> pl.DataFrame:
    """The dataset's events as bus events (:data:`EVENT_SCHEMA`), oldest first.

    Ties in time keep the dataset's row order; ``event_id`` is ``<tag>-<row>`` with the row in
    the events file, zero-padded so that the ids of events at the same time sort in row order
    (the online stores break event-time ties by event id).  ``behavior`` and ``rating`` come
    from the dataset's extra columns when it has them.
    """
    order = np.argsort(ds.timestamp, kind="stable")
    if limit is not None:
        order = order[:limit]
    users = np.asarray(ds.user_ids, dtype=object)
    items = np.asarray(ds.item_ids, dtype=object)
    n = order.size
    cols: dict[str, pl.Series] = {
        "event_id": pl.Series("event_id", order, dtype=pl.Int64).cast(pl.String),
        "user_id": pl.Series("user_id", users[ds.user[order] - 1], dtype=pl.String),
        "item_id": pl.Series("item_id", items[ds.item[order] - 1], dtype=pl.String),
        "ts": pl.Series("ts", ds.timestamp[order], dtype=pl.Int64),
        "behavior": pl.Series("behavior", [None] * n, dtype=pl.String),
        "rating": pl.Series("rating", [None] * n, dtype=pl.Float64),
        "reward": pl.Series("reward", ds.reward[order], dtype=pl.Float64),
    }
    if "behavior" in ds.extra:
        cols["behavior"] = pl.Series("behavior", ds.extra["behavior"][order]).cast(pl.String)
    if "rating" in ds.extra:
        cols["rating"] = pl.Series("rating", ds.extra["rating"][order]).cast(pl.Float64)
    tag = dataset_tag(ds)
    width = len(str(max(ds.n_events - 1, 0)))
    frame = pl.DataFrame(cols).with_columns(
        pl.concat_str(pl.lit(f"{tag}-"), pl.col("event_id").str.zfill(width)).alias("event_id")
    )
    frame = frame.select(list(EVENT_SCHEMA))
    check_events(frame)
    return frame


def check_events(events: pl.DataFrame) -> None:
    """Raise :class:`DataError` unless every event keeps the rules of
    :mod:`recloop.data.validity` (which the stream processor applies): a dataset prepared
    before those rules (or built by hand) could otherwise publish events that would only
    become dead letters."""
    if validity.all_ok(events, RULES):
        return
    ok = events.select(validity.rows_ok(RULES)).to_series()
    bad = (~ok).arg_true()
    if bad.len() == 0:
        return
    first = int(bad[0])
    why = events[first].select(validity.first_problem(RULES)).item()
    raise DataError(
        f"{bad.len()} of {events.height} events break the event rules, first event "
        f"{events['event_id'][first]!r}: {why} (prepare the dataset again to drop them)"
    )


def schedule(events: pl.DataFrame, *, rate: float | None, speed: float | None) -> np.ndarray:
    """(E,) float64 seconds after the start at which each event is due."""
    n = events.height
    if rate is not None and speed is not None:
        raise ConfigError("replay: give --rate or --speed, not both")
    if rate is not None:
        if rate <= 0:
            raise ConfigError(f"replay: --rate must be > 0, got {rate}")
        return np.arange(n, dtype=np.float64) / rate
    if speed is not None:
        if speed <= 0:
            raise ConfigError(f"replay: --speed must be > 0, got {speed}")
        ts = events["ts"].to_numpy().astype(np.float64)
        return (ts - ts[0]) / speed if n else ts
    return np.zeros(n, np.float64)


async def replay(
    events: pl.DataFrame,
    bus: EventBus,
    *,
    rate: float | None = None,
    speed: float | None = None,
    batch_size: int = 500,
    backoff: Backoff | None = None,
    stop: asyncio.Event | None = None,
    show_progress: bool | None = None,
) -> ReplayStats:
    """Publish ``events`` (as :func:`replay_events` makes them) in order; see the module doc."""
    payloads = encode_events(events)
    due = schedule(events, rate=rate, speed=speed)
    n = len(payloads)
    backoff = backoff or Backoff(initial_s=0.1, max_s=5.0)
    stop = stop or asyncio.Event()
    counter = f"{bus.stream}:replay:{uuid.uuid4().hex[:12]}"
    sent = 0  # what the counter should read
    published = restarts = 0
    cursor = 0
    t0 = time.monotonic()
    bar = progress(total=n, desc="replay", unit="ev", enabled=show_progress)
    try:
        while cursor < n:
            elapsed = time.monotonic() - t0
            ready = int(np.searchsorted(due, elapsed, side="right"))
            if ready <= cursor:
                await asyncio.sleep(min(float(due[cursor]) - elapsed, 1.0))
                continue
            chunk = payloads[cursor : min(ready, cursor + batch_size)]

            async def publish(chunk: list[bytes] = chunk) -> int:
                return await bus.publish_counted(chunk, counter=counter)

            total = await retry("publish", publish, backoff=backoff, stop=stop)
            published += len(chunk)
            if total < sent + len(chunk):
                restarts += 1
                logger.warning(
                    "the bus lost %d published events (restart without persistence?); "
                    "replaying from the first event again",
                    sent + len(chunk) - total,
                )
                sent = total
                cursor = 0
                bar.reset(total=n)
                continue
            sent = total
            cursor += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
    return ReplayStats(
        events=n, published=published, restarts=restarts, seconds=time.monotonic() - t0
    )


def load_replay_events(directory: Path, *, limit: int | None = None) -> pl.DataFrame:
    """:func:`replay_events` of the prepared dataset in ``directory``."""
    return replay_events(PreparedDataset.load(directory), limit=limit)
