"""Which logged events a round trains on, which it holds out, and when a round is due.

Holdout protocol: **a global time cut** (not leave-one-out).  The newest ``holdout`` share
of the window's events, by event time, is the holdout (prepare's TEST split); the
``valid`` share before it is for early stopping; the rest trains.  A global cut is what
deployment looks like -- the model is trained on the past and serves the future -- and it
keeps every holdout event out of training for *every* user, which leave-one-out does not
(another user's later event trains while this user's earlier one is held out).

The cut also never lies before the current model's own holdout cut (``floor``): the current
model was trained on events before that cut only, and the candidate is warm-started from
it, so no holdout event has reached either model, directly or through the warm start.  When
few events arrived since the last round, the floor makes the holdout larger than
``holdout`` (all events since the current model's cut); it is never empty when a new event
is newer than the floor.

Watermark: the newest event time and the row count of the log when a round read it.  The
trigger counts the rows newer than the watermark's event time; an event that arrives late
(event time at or before the watermark) is trained on in the next window but does not by
itself start one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import sqlalchemy as sa

from recloop.data.schema import TIMESTAMP
from recloop.errors import ConfigError, DataError, Location

DAY_S = 86_400


@dataclass(frozen=True, kw_only=True)
class Watermark:
    """How far the log had been read when a window was trained on."""

    ts: int
    """Newest event time in the log (seconds)."""
    events: int
    """Rows the log held."""

    def to_dict(self) -> dict[str, int]:
        return {"ts": self.ts, "events": self.events}

    @staticmethod
    def from_dict(doc: Any) -> Watermark | None:
        if doc is None:
            return None
        return Watermark(ts=int(doc["ts"]), events=int(doc["events"]))


@dataclass(frozen=True, kw_only=True)
class Cuts:
    """Where the validation and holdout splits start (event time, inclusive)."""

    valid_start: int | None
    """None: no validation split."""
    test_start: int
    """Events at or after this time are the holdout."""


def quantile_cut(ts: np.ndarray, share: float) -> int | None:
    """The time at which the last ``share`` of events (in time order) starts: the time of the
    event at position E - round(E * share) once sorted, as prepare's time split cuts; None
    when that leaves nothing (share 0 or too few events)."""
    e = int(ts.shape[0])
    k = e - int(np.floor(e * share + 0.5))
    if share <= 0 or k >= e:
        return None
    return int(np.partition(ts, k)[k])


def holdout_cuts(ts: np.ndarray, *, holdout: float, valid: float, floor: int | None) -> Cuts:
    """The round's cuts over the window's event times ``ts`` (E,): holdout at the
    ``holdout`` share but never before ``floor``; validation at the ``holdout + valid``
    share, never after the holdout cut."""
    if ts.shape[0] == 0:
        raise DataError("the window holds no events")
    test = quantile_cut(ts, holdout)
    if test is None:
        test = int(ts.max())
    if floor is not None:
        test = max(test, int(floor))
    valid_start = quantile_cut(ts, holdout + valid) if valid > 0 else None
    if valid_start is not None:
        valid_start = min(valid_start, test)
    return Cuts(valid_start=valid_start, test_start=test)


def window_events(events: pl.DataFrame, *, window: str, days: float | None) -> pl.DataFrame:
    """The window's rows of ``events`` (a frame with the ``timestamp`` column): all of them
    (growing) or those within ``days`` of the newest event (sliding)."""
    if window == "growing" or events.height == 0:
        return events
    if days is None:
        raise ConfigError("window: sliding needs window_days")
    newest = int(events[TIMESTAMP].max())  # type: ignore[arg-type]
    start = newest - int(days * DAY_S)
    return events.filter(pl.col(TIMESTAMP) > start)


def _scalar(url: str, *, table: str, what: str, query: Any) -> Any:
    """One scalar from ``query(t)`` over ``table``'s ``ts`` and ``settled`` columns (``t``:
    the table; ``settled`` only where the query reads it: a served-items table)."""
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    where = f"{engine.url.render_as_string(hide_password=True)} table {table}"
    try:
        with engine.connect() as conn:
            t = sa.table(table, sa.column("ts"), sa.column("settled", sa.Boolean))
            return conn.execute(query(t)).scalar_one()
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        raise DataError(f"cannot {what} ({reason})", location=Location(file=where)) from None
    finally:
        engine.dispose()


def count_newer(url: str, *, table: str, ts: int | None, settled_only: bool = False) -> int:
    """Rows of the behaviour log with event time after ``ts`` (all rows when None); with
    ``settled_only`` (a served-items table) the settled ones only, the rows a round reads:
    open impressions newer than the last window are always there while a service serves,
    and counting them made every poll train the same window again."""

    def query(t: Any) -> Any:
        q = sa.select(sa.func.count()).select_from(t)
        if settled_only:
            q = q.where(t.c.settled == sa.true())
        return q if ts is None else q.where(t.c.ts > ts)

    return int(_scalar(url, table=table, what="count the log's new events", query=query))


def newest_ts(url: str, *, table: str) -> int | None:
    """The newest event time in ``table`` (settled or not), or None when it is empty."""
    got = _scalar(
        url,
        table=table,
        what="read the newest event time",
        query=lambda t: sa.select(sa.func.max(t.c.ts)),
    )
    return None if got is None else int(got)


def round_due(
    *,
    new_events: int,
    every_events: int | None,
    every_minutes: float | None,
    seconds_since_last: float | None,
) -> tuple[bool, str]:
    """Whether a round is due, and why (or why not).

    The first round (no watermark: ``seconds_since_last`` None) is due when the log holds
    any event.  Later: ``new_events >= every_events``, or the clock ran out with at least one
    new event (a window with no new event was trained on already).
    """
    if new_events == 0:
        return False, "no new events since the last window"
    if seconds_since_last is None:
        return True, f"first round ({new_events} events logged)"
    if every_events is not None and new_events >= every_events:
        return True, f"{new_events} new events (>= {every_events})"
    if every_minutes is not None and seconds_since_last >= every_minutes * 60:
        return True, f"{seconds_since_last / 60:.1f} minutes since the last round"
    parts = []
    if every_events is not None:
        parts.append(f"{new_events} new events (< {every_events})")
    if every_minutes is not None:
        parts.append(f"{seconds_since_last / 60:.1f} of {every_minutes} minutes")
    return False, ", ".join(parts)
