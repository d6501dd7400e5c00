"""What a valid event is: the one definition the loaders, the replay and the stream share.

An event's ids (event, user and item ids) are non-empty strings of at most
:data:`MAX_ID_LEN` characters without a NUL character; its time is whole seconds in
``[TS_MIN, TS_END)``.  Why these rules:

- the behaviour log's id columns hold :data:`MAX_ID_LEN` characters;
- PostgreSQL text cannot hold U+0000 (one such id used to fail a whole batch insert);
  MariaDB's utf8mb4 holds every other Unicode scalar value;
- the online stores order events by time as a double, exact only below 2**53; negative
  times are not event times (and sort before every real one).

Lone surrogates (U+D800..U+DFFF) are not valid Unicode text: polars and ``orjson`` refuse them
before these rules run (the stream dead-letters such a payload as unparsable JSON), so no
rule here needs to look for them.

The rules are polars expressions, so every caller checks whole columns at once:
``*_ok`` (Boolean, cheap: the happy path) and ``*_problem`` (String, why; null when valid),
built from the same predicates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import polars as pl

MAX_ID_LEN = 128
"""Longest event, user or item id accepted (characters); the SQL log's id columns hold this many."""
TS_MIN = 0
"""Earliest event time (seconds since the epoch)."""
TS_END = 2**53
"""Event times are below this (the online stores order by time as a double)."""
TS_RANGE = "0 .. 2**53"
"""The time range as messages word it."""
NUL_MESSAGE = "contains a NUL character (U+0000), which the SQL log cannot store"

Rule = Literal["id", "ts"]


def _empty(c: pl.Expr) -> pl.Expr:
    return c.str.len_bytes() == 0


def _too_long(c: pl.Expr) -> pl.Expr:
    return c.str.len_chars() > MAX_ID_LEN


def _nul(c: pl.Expr) -> pl.Expr:
    return c.str.contains("\x00", literal=True)


def _ts_out(c: pl.Expr) -> pl.Expr:
    return (c < TS_MIN) | (c >= TS_END)


def id_ok(c: pl.Expr) -> pl.Expr:
    """Boolean: the id (String) is valid; null stays null."""
    return ~(_empty(c) | _too_long(c) | _nul(c))


def id_problem(c: pl.Expr) -> pl.Expr:
    """String: why the id (String) is not valid, the first broken rule; null when valid."""
    return (
        pl.when(_empty(c))
        .then(pl.lit("empty string"))
        .when(_too_long(c))
        .then(pl.format(f"longer than {MAX_ID_LEN} characters ({{}})", c.str.len_chars()))
        .when(_nul(c))
        .then(pl.lit(NUL_MESSAGE))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def ts_ok(c: pl.Expr) -> pl.Expr:
    """Boolean: the time (integer seconds) is in range; null stays null."""
    return ~_ts_out(c)


def ts_problem(c: pl.Expr) -> pl.Expr:
    """String: why the time is not valid; null when valid."""
    return (
        pl.when(_ts_out(c))
        .then(pl.format(f"out of range ({TS_RANGE}), got {{}}", c))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def ts_out_of_range(value: int) -> str:
    """The :func:`ts_problem` message for one integer (also those polars cannot hold)."""
    return f"out of range ({TS_RANGE}), got {value}"


_OK = {"id": id_ok, "ts": ts_ok}
PROBLEM = {"id": id_problem, "ts": ts_problem}
"""Rule -> the expression saying why a value breaks it (null when it does not)."""


def all_ok(frame: pl.DataFrame, fields: Sequence[tuple[str, Rule]]) -> bool:
    """Whether every row of ``frame`` keeps its rules, by one select of column aggregates:
    the cheap check of a clean batch.  Conservative: an id of more than MAX_ID_LEN bytes
    (perhaps fewer characters) answers False, and :func:`rows_ok` then decides."""
    ids = [name for name, rule in fields if rule == "id"]
    times = [name for name, rule in fields if rule == "ts"]
    if frame.height == 0:
        return True
    checks: list[pl.Expr] = []
    if ids:
        size = pl.col(ids).str.len_bytes()
        checks += [
            pl.min_horizontal(size.min()).alias("min_bytes"),
            pl.max_horizontal(size.max()).alias("max_bytes"),
            pl.concat_str(pl.col(ids), ignore_nulls=True)
            .str.contains("\x00", literal=True)
            .any()
            .alias("nul"),
        ]
    if times:
        checks += [
            pl.min_horizontal(pl.col(times).min()).alias("min_ts"),
            pl.max_horizontal(pl.col(times).max()).alias("max_ts"),
        ]
    got = frame.select(checks).row(0, named=True)
    bad_ids = (
        bool(ids)
        and got["min_bytes"] is not None
        and (got["min_bytes"] == 0 or got["max_bytes"] > MAX_ID_LEN or bool(got["nul"]))
    )
    bad_times = (
        bool(times)
        and got["min_ts"] is not None
        and (got["min_ts"] < TS_MIN or got["max_ts"] >= TS_END)
    )
    return not (bad_ids or bad_times)


def rows_ok(fields: Sequence[tuple[str, Rule]]) -> pl.Expr:
    """Boolean per row: every named column keeps its rule (a null value passes: missing
    values are each caller's own check)."""
    return pl.all_horizontal([_OK[rule](pl.col(name)).fill_null(True) for name, rule in fields])


def first_problem(fields: Sequence[tuple[str, Rule]]) -> pl.Expr:
    """String per row: ``"<column>: <why>"`` for its first broken rule, null for a valid row."""
    return pl.coalesce(
        [pl.concat_str(pl.lit(f"{name}: "), PROBLEM[rule](pl.col(name))) for name, rule in fields]
    )
