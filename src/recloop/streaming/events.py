"""The event schema on the bus, batch validation, and batch encoding.

One event is one JSON object::

    {"event_id": "a1b2c3d4-17", "user_id": "196", "item_id": "242", "ts": 881250949,
     "behavior": "pv", "rating": 3.0, "reward": 1.0}

``event_id``, ``user_id`` and ``item_id`` are non-empty strings of at most
:data:`MAX_ID_LEN` characters, ``ts`` is the event time in whole seconds (an integer in
[0, 2**53): the online stores order by it as a double);
``behavior`` (one of pv, cart, fav, buy), ``rating`` and ``reward`` (finite numbers) are
optional, and ``null`` means absent.  Unknown fields are ignored, so producers may add some.

Validation works on a whole batch: the payloads are decoded with one ``orjson`` call when
they all parse, and each field is checked as a column (type codes, lengths, ranges), so the
Python work per event is a few C-level ``map`` calls.  A bad event becomes a
:class:`DeadLetter` carrying the reason and its original bytes; it never fails the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import polars as pl

from recloop.data.schema import BEHAVIORS

MAX_ID_LEN = 128
"""Longest event, user or item id accepted; the SQL log's id columns hold this many."""

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Int64(),
    "behavior": pl.String(),
    "rating": pl.Float64(),
    "reward": pl.Float64(),
}
"""Columns (and dtypes) of a validated event frame; optional fields are null when absent."""

REQUIRED = ("event_id", "user_id", "item_id", "ts")
OPTIONAL = ("behavior", "rating", "reward")
_BEHAVIOR_SET = frozenset(BEHAVIORS)
_BEHAVIOR_OR_NONE = frozenset((*BEHAVIORS, None))
_NUMBER_OR_NONE = frozenset((int, float, type(None)))
_STR_OR_NONE = frozenset((str, type(None)))


@dataclass(frozen=True)
class BusMessage:
    """One entry read from the bus: its bus id and the raw JSON payload."""

    id: str
    """Bus entry id (``<ms>-<seq>`` on Redis Streams)."""
    payload: bytes
    """The event as published (JSON bytes)."""


@dataclass(frozen=True)
class DeadLetter:
    """A message that cannot be processed, with why."""

    entry_id: str
    """Bus id of the original entry."""
    payload: bytes
    """The original payload, byte for byte."""
    reason: str
    """What is wrong, naming the field and the value."""


@dataclass(frozen=True, eq=False)
class ParsedBatch:
    """A validated batch: good events as a frame, bad ones as dead letters."""

    entry_ids: list[str]
    """Bus ids of every message in the batch (good and bad), to acknowledge at the end."""
    events: pl.DataFrame
    """(E rows) :data:`EVENT_SCHEMA` columns, in bus order; E <= len(entry_ids)."""
    dead: list[DeadLetter]
    """Messages that failed validation."""


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENT_SCHEMA)


def _decode_all(payloads: Sequence[bytes]) -> list[Any]:
    """Decode every payload; an unparsable one becomes a ``_BadJson`` marker."""
    if not payloads:
        return []
    try:
        # One C call for the common case of a clean batch.  A payload like '{..},{..}' would
        # still parse as part of the array, so the count and the element types are checked.
        docs = orjson.loads(b"[" + b",".join(payloads) + b"]")
        if len(docs) == len(payloads):
            return list(docs)
    except orjson.JSONDecodeError:
        pass
    out: list[Any] = []
    for p in payloads:
        try:
            out.append(orjson.loads(p))
        except orjson.JSONDecodeError as exc:
            out.append(_BadJson(str(exc)))
    return out


@dataclass(frozen=True)
class _BadJson:
    error: str


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_batch(messages: Sequence[BusMessage]) -> ParsedBatch:
    """Validate a batch of bus messages; see the module docstring for the rules."""
    ids = [m.id for m in messages]
    docs = _decode_all([m.payload for m in messages])
    n = len(docs)
    reason: list[str | None] = [None] * n
    if set(map(type, docs)) != {dict}:
        for i, d in enumerate(docs):
            if type(d) is not dict:
                reason[i] = (
                    f"unparsable JSON ({d.error})"
                    if isinstance(d, _BadJson)
                    else f"not a JSON object (got {_type_name(d)})"
                )
        docs = [d if type(d) is dict else {} for d in docs]
    cols = {k: [d.get(k) for d in docs] for k in EVENT_SCHEMA}

    def flag(problems: Iterable[tuple[int, str]]) -> None:
        """Record (row, message) problems; a row keeps its first one."""
        for i, message in problems:
            if reason[i] is None:
                reason[i] = message

    # The common clean column holds one type: each check is a set of types or values for
    # the whole column, and only a column that fails it is walked row by row.
    for k in REQUIRED:
        v = cols[k]
        want: type = int if k == "ts" else str
        expected = "integer seconds" if k == "ts" else "a string"
        if set(map(type, v)) != {want}:
            flag((i, f"{k}: missing") for i, x in enumerate(v) if x is None)
            flag(
                (i, f"{k}: expected {expected}, got {_type_name(x)} {_describe(x)}")
                for i, x in enumerate(v)
                if x is not None and type(x) is not want
            )
        if k == "ts":
            ints = [x for x in v if type(x) is int]
            if ints and (min(ints) < 0 or max(ints) >= 2**53):
                flag(
                    (i, f"ts: out of range (0 .. 2**53), got {x!r}")
                    for i, x in enumerate(v)
                    if type(x) is int and not 0 <= x < 2**53
                )
            continue
        lengths = np.fromiter((len(x) if type(x) is str else 1 for x in v), np.int64, n)
        if n and (lengths.min() == 0 or lengths.max() > MAX_ID_LEN):
            flag((i, f"{k}: empty string") for i in np.flatnonzero(lengths == 0).tolist())
            flag(
                (i, f"{k}: longer than {MAX_ID_LEN} characters ({lengths[i]})")
                for i in np.flatnonzero(lengths > MAX_ID_LEN).tolist()
            )
    v = cols["behavior"]
    if not (set(map(type, v)) <= _STR_OR_NONE and set(v) <= _BEHAVIOR_OR_NONE):
        flag(
            (i, f"behavior: expected a string, got {_type_name(x)} {_describe(x)}")
            for i, x in enumerate(v)
            if x is not None and type(x) is not str
        )
        flag(
            (i, f"behavior: unknown value {x!r} (expected one of {', '.join(BEHAVIORS)})")
            for i, x in enumerate(v)
            if type(x) is str and x not in _BEHAVIOR_SET
        )
    for k in OPTIONAL[1:]:
        v = cols[k]
        if not set(map(type, v)) <= _NUMBER_OR_NONE:
            flag(
                (i, f"{k}: expected a number, got {_type_name(x)} {_describe(x)}")
                for i, x in enumerate(v)
                if type(x) not in _NUMBER_OR_NONE
            )
    bad_rows = [i for i, r in enumerate(reason) if r is not None]
    dead = [DeadLetter(ids[i], messages[i].payload, reason[i] or "") for i in bad_rows]
    if bad_rows:
        bad = set(bad_rows)
        keep = [i for i in range(n) if i not in bad]
        cols = {k: [v[i] for i in keep] for k, v in cols.items()}
    data = {
        k: pl.Series(k, v, dtype=dtype, strict=k not in ("rating", "reward"))
        for (k, v), dtype in zip(cols.items(), EVENT_SCHEMA.values(), strict=True)
    }
    return ParsedBatch(entry_ids=ids, events=pl.DataFrame(data), dead=dead)


def encode_events(events: pl.DataFrame) -> list[bytes]:
    """One JSON payload per row of an event frame; null optional fields are left out.

    Vectorised: polars writes the whole frame as NDJSON at once and the lines are split.
    """
    cols = [c for c in EVENT_SCHEMA if c in events.columns]
    frame = events.select(cols)
    present = [c for c in OPTIONAL if c in frame.columns]
    # Rows are grouped by which optional fields they carry (usually a single group), so that
    # no payload holds "rating": null.
    if present:
        nulls = np.stack([frame[c].is_null().to_numpy() for c in present], axis=1)
        code = nulls.astype(np.int64) @ (1 << np.arange(len(present)))
    else:
        code = np.zeros(frame.height, np.int64)
    codes = np.unique(code)
    if codes.size <= 1:
        keep = (
            [k for j, k in enumerate(present) if not (int(codes[0]) >> j) & 1] if codes.size else []
        )
        part = frame.select([k for k in cols if k in REQUIRED] + keep)
        return part.write_ndjson().encode().split(b"\n")[: frame.height]
    payload: list[bytes] = [b""] * frame.height
    for c in codes.tolist():
        rows = np.flatnonzero(code == c)
        keep = [k for j, k in enumerate(present) if not (c >> j) & 1]
        part = frame[rows].select([k for k in cols if k in REQUIRED] + keep)
        lines = part.write_ndjson().encode().split(b"\n")
        for r, line in zip(rows.tolist(), lines, strict=False):
            payload[r] = line
    return payload
