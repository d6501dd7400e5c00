"""The event schema on the bus, batch validation, and batch encoding.

One event is one JSON object::

    {"event_id": "a1b2c3d4-17", "user_id": "196", "item_id": "242", "ts": 881250949,
     "behavior": "pv", "rating": 3.0, "reward": 1.0}

``event_id``, ``user_id`` and ``item_id`` are strings and ``ts`` is the event time in
whole seconds (an integer); what makes their values valid -- non-empty ids of at most
:data:`MAX_ID_LEN` characters without NUL, times in [0, 2**53) -- is
:mod:`recloop.data.validity`, the definition the data loaders and the replay share.
``behavior`` (one of pv, cart, fav, buy), ``rating`` and ``reward`` (finite numbers) are
optional, and ``null`` means absent.  So is ``recommendation_id`` (a string id, as the
service returned it): the served list the event answers, kept apart from the event columns
in :attr:`ParsedBatch.links` (see :mod:`recloop.streaming.served`).  Unknown fields are
ignored, so producers may add some.

Validation works on a whole batch: the payloads are decoded with one ``orjson`` call when
they all parse, each field's types are checked as a column (sets of type codes), and the
value rules run as polars expressions over the typed columns, so the Python work per event
is a few C-level ``map`` calls.  A bad event becomes a :class:`DeadLetter` carrying the
reason and its original bytes (and the bus entry's other fields); it never fails the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson
import polars as pl

from recloop.data import validity
from recloop.data.schema import BEHAVIORS
from recloop.data.validity import MAX_ID_LEN as MAX_ID_LEN  # re-exported: the log's width
from recloop.streaming.buses.base import PAYLOAD_FIELD

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
RULES: tuple[tuple[str, validity.Rule], ...] = (
    ("event_id", "id"),
    ("user_id", "id"),
    ("item_id", "id"),
    ("ts", "ts"),
)
"""The :mod:`recloop.data.validity` rule of each required field."""
_INT64 = (-(2**63), 2**63)
_BEHAVIOR_SET = frozenset(BEHAVIORS)
_BEHAVIOR_OR_NONE = frozenset((*BEHAVIORS, None))
_NUMBER_OR_NONE = frozenset((int, float, type(None)))
_STR_OR_NONE = frozenset((str, type(None)))


@dataclass(frozen=True)
class BusMessage:
    """One entry read from the bus: its bus id and the raw JSON payload."""

    id: str
    """Bus entry id (``<ms>-<seq>`` on Redis Streams)."""
    payload: bytes | None
    """The event as published (JSON bytes); None when the entry has no payload field."""
    fields: dict[bytes, bytes] | None = None
    """The entry's other fields, byte for byte; None when the payload is its only field (the
    usual case, so that reading costs no dict per entry)."""
    partition: int | None = None
    """Partition of the entry (Kafka); None on a bus that is one ordered stream."""


@dataclass(frozen=True)
class DeadLetter:
    """A message that cannot be processed, with why."""

    entry_id: str
    """Bus id of the original entry."""
    payload: bytes
    """The original payload, byte for byte (empty when the entry had none)."""
    reason: str
    """What is wrong, naming the field and the value."""
    fields: dict[bytes, bytes] | None = None
    """The original entry's other fields, byte for byte (None: it had none)."""

    @classmethod
    def of(cls, message: BusMessage, reason: str) -> DeadLetter:
        """The dead letter of a bus message: its id, payload and fields as they were."""
        return cls(message.id, message.payload or b"", reason, message.fields)


@dataclass(frozen=True, eq=False)
class ParsedBatch:
    """A validated batch: good events as a frame, bad ones as dead letters."""

    entry_ids: list[str]
    """Bus ids of every message in the batch (good and bad), to acknowledge at the end."""
    events: pl.DataFrame
    """(E rows) :data:`EVENT_SCHEMA` columns, in bus order; E <= len(entry_ids)."""
    dead: list[DeadLetter]
    """Messages that failed validation."""
    rows: np.ndarray | None = None
    """(E,) int64: the message (index into ``entry_ids``) of each event row; None means
    ``arange(E)`` (no message was dead-lettered)."""
    links: pl.DataFrame | None = None
    """(event_id, recommendation_id) of the good events that name the served list they
    answer (optional field ``recommendation_id``); None when no event does."""

    def message_index(self) -> np.ndarray:
        """(E,) int64 index of each event's message in the batch."""
        return self.rows if self.rows is not None else np.arange(self.events.height)


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
    payloads = [m.payload for m in messages]
    n = len(payloads)
    reason: list[str | None] = [None] * n
    raw = cast("list[bytes]", payloads)
    if None in payloads:  # rare: the bus entry had other fields but no payload
        for i, m in enumerate(messages):
            if m.payload is None:
                have = ", ".join(k.decode(errors="replace") for k in m.fields or {}) or "none"
                reason[i] = (
                    f"bus entry without a payload (its fields: {have}; the event's JSON goes "
                    f"in field {PAYLOAD_FIELD.decode()!r} on Redis Streams, in the record's "
                    "value on Kafka)"
                )
        raw = [b"{}" if p is None else p for p in payloads]
    docs = _decode_all(raw)
    if set(map(type, docs)) != {dict}:
        for i, d in enumerate(docs):
            if type(d) is not dict and reason[i] is None:
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

    # Types first.  The common clean column holds one type: each check is a set of types or
    # values for the whole column, and only a column that fails it is walked row by row.
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
    ts = cols["ts"]
    ints = ts if set(map(type, ts)) == {int} else [x for x in ts if type(x) is int]
    if ints and (min(ints) < _INT64[0] or max(ints) >= _INT64[1]):
        # Beyond Int64, so beyond the validity range too; the column could not hold it.
        flag(
            (i, f"ts: {validity.ts_out_of_range(x)}")
            for i, x in enumerate(ts)
            if type(x) is int and not _INT64[0] <= x < _INT64[1]
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
    rid = [d.get("recommendation_id") for d in docs]
    has_rid = set(map(type, rid)) != {type(None)}
    if has_rid:
        flag(
            (i, f"recommendation_id: expected a string, got {_type_name(x)} {_describe(x)}")
            for i, x in enumerate(rid)
            if x is not None and type(x) is not str
        )
        flag(
            (i, f"recommendation_id: must have 1 to {MAX_ID_LEN} characters, got {len(x)}")
            for i, x in enumerate(rid)
            if type(x) is str and not 0 < len(x) <= MAX_ID_LEN
        )
    keep = [i for i, r in enumerate(reason) if r is None]
    if len(keep) < n:
        cols = {k: [v[i] for i in keep] for k, v in cols.items()}
    data = {
        k: pl.Series(k, v, dtype=dtype, strict=k not in ("rating", "reward"))
        for (k, v), dtype in zip(cols.items(), EVENT_SCHEMA.values(), strict=True)
    }
    events = pl.DataFrame(data)
    # Then the values, by the shared rules, as column expressions (one cheap Boolean pass;
    # the reasons are worded only when some row broke a rule).
    if not validity.all_ok(events, RULES):
        ok = events.select(validity.rows_ok(RULES)).to_series()
        bad = (~ok).arg_true()
        why = events[bad].select(validity.first_problem(RULES)).to_series().to_list()
        flag(zip([keep[j] for j in bad.to_list()], why, strict=True))
        events = events.filter(ok)
        keep = [i for i, r in enumerate(reason) if r is None]
    dead = [DeadLetter.of(messages[i], r) for i, r in enumerate(reason) if r is not None]
    rows = np.asarray(keep, dtype=np.int64) if dead else None
    links = None
    if has_rid:
        links = pl.DataFrame(
            {
                "event_id": events["event_id"],
                "recommendation_id": pl.Series([rid[i] for i in keep], dtype=pl.String),
            }
        ).drop_nulls("recommendation_id")
    return ParsedBatch(entry_ids=ids, events=events, dead=dead, rows=rows, links=links)


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
