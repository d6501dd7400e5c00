"""What a loaded :class:`RawData` holds: counts, time range, columns, behaviours."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from recloop.data.schema import BEHAVIOR, ITEM, RATING, TIMESTAMP, USER, RawData


@dataclass(frozen=True, kw_only=True)
class TableSummary:
    rows: int
    """Rows of the feature table."""
    columns: dict[str, str]
    """Column name → dtype, key column included."""


@dataclass(frozen=True, kw_only=True)
class RawSummary:
    """Counts and ranges of raw data, as ``recloop data inspect`` prints them."""

    source: str
    events: int
    users: int
    """Distinct users in the events."""
    items: int
    """Distinct items in the events."""
    time_min: int | None
    time_max: int | None
    columns: dict[str, str]
    """Event column → dtype."""
    behaviors: dict[str, int] | None
    """Events per behaviour, most frequent first; None without a behaviour column."""
    rating: dict[str, float] | None
    """min, max and mean rating; None without a rating column."""
    user_features: TableSummary | None
    item_features: TableSummary | None
    skipped: int
    skipped_examples: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _table(frame: pl.DataFrame | None) -> TableSummary | None:
    if frame is None:
        return None
    return TableSummary(rows=frame.height, columns={c: str(t) for c, t in frame.schema.items()})


def summarize(raw: RawData) -> RawSummary:
    ev = raw.events
    stats = ev.select(
        users=pl.col(USER).n_unique(),
        items=pl.col(ITEM).n_unique(),
        tmin=pl.col(TIMESTAMP).min(),
        tmax=pl.col(TIMESTAMP).max(),
    ).row(0, named=True)
    behaviors = None
    if BEHAVIOR in ev.columns:
        counts = ev[BEHAVIOR].value_counts(sort=True)
        behaviors = {str(k): int(v) for k, v in counts.iter_rows()}
    rating = None
    if RATING in ev.columns and ev.height:
        r = ev.select(
            min=pl.col(RATING).min(), max=pl.col(RATING).max(), mean=pl.col(RATING).mean()
        )
        rating = {k: float(v) for k, v in r.row(0, named=True).items()}
    return RawSummary(
        source=raw.source,
        events=ev.height,
        users=int(stats["users"]),
        items=int(stats["items"]),
        time_min=stats["tmin"],
        time_max=stats["tmax"],
        columns={c: str(t) for c, t in ev.schema.items()},
        behaviors=behaviors,
        rating=rating,
        user_features=_table(raw.users),
        item_features=_table(raw.items),
        skipped=raw.skipped.count,
        skipped_examples=raw.skipped.examples,
    )


def _utc(seconds: int) -> str:
    try:
        return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return "?"


def format_summary(s: RawSummary) -> str:
    """Aligned human-readable lines."""
    rows = [
        ("source", s.source),
        ("events", f"{s.events:,}"),
        ("users", f"{s.users:,}"),
        ("items", f"{s.items:,}"),
    ]
    if s.time_min is not None and s.time_max is not None:
        span = f"{s.time_min} .. {s.time_max}"
        rows.append(("time", f"{span} (UTC {_utc(s.time_min)} .. {_utc(s.time_max)})"))
    rows.append(("columns", ", ".join(f"{c}:{t}" for c, t in s.columns.items())))
    if s.behaviors is not None:
        rows.append(("behaviors", ", ".join(f"{k} {v:,}" for k, v in s.behaviors.items())))
    if s.rating is not None:
        r = s.rating
        rows.append(("ratings", f"{r['min']:g} .. {r['max']:g}, mean {r['mean']:.3f}"))
    for label, table in (("user features", s.user_features), ("item features", s.item_features)):
        if table is not None:
            rows.append((label, f"{table.rows:,} rows: {', '.join(list(table.columns)[1:])}"))
    rows.append(("skipped rows", f"{s.skipped:,}"))
    rows += [("", f"  {e}") for e in s.skipped_examples]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
