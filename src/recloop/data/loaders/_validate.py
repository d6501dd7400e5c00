"""Parse and check raw columns, vectorised; word the first few bad rows for people.

Each field is parsed as a whole column with ``strict=False`` casts; a row is bad where a
required value is missing, a present value does not parse, its line had too many fields, or
a parsed id or time breaks the event rules of :mod:`recloop.data.validity` (the ones the
stream processor applies: no empty, over-long or NUL-holding ids, times in [0, 2**53)).
The cheap path comes first (one cast); slower fallbacks (stripping blanks, fractional
seconds) run only when the cheap path left values unparsed.  Only the first few bad rows are
ever looked at one by one, to write their messages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import polars as pl
from polars._typing import PolarsDataType

from recloop.data import validity
from recloop.data.loaders._read import (
    EXTRA,
    Table,
    delimiter_hint,
    field_count_message,
    fields_in,
    one_line,
)
from recloop.data.schema import ITEM, USER, RawData, SkipReport
from recloop.errors import DataError, Location

logger = logging.getLogger(__name__)

Kind = Literal["id", "str", "int", "float", "timestamp", "enum"]
_RULES: dict[str, validity.Rule] = {"id": "id", "timestamp": "ts"}
"""The :mod:`recloop.data.validity` rule each kind of parsed column keeps."""
_KIND_WORDS = {"int": "an integer", "float": "a number", "timestamp": "a timestamp"}


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """One column to take from a raw table: where it is, what it becomes, how it parses."""

    source: str
    """Column name in the raw table."""
    name: str
    """Column name in the output."""
    kind: Kind = "str"
    """id (Int64 when every value is an integer, else String), str, int, float, timestamp
    (Int64 seconds) or enum (one of ``values``)."""
    required: bool = True
    """Whether an empty value makes the row bad."""
    values: tuple[str, ...] = ()
    """Allowed values of an enum field."""
    time_format: str | None = None
    """Timestamps only: None (seconds), "ms", or a strftime format."""


@dataclass(frozen=True, kw_only=True)
class Validated:
    frame: pl.DataFrame
    """Good rows: the specified fields parsed, then the passed-through columns."""
    skipped: SkipReport
    """Bad rows left out (only with ``skip_bad_rows``)."""


def _where(mask: pl.Series, values: pl.Series) -> pl.Series:
    """``values`` where ``mask``, else null."""
    return pl.select(pl.when(mask).then(values)).to_series().alias(values.name)


def _number(s: pl.Series, dtype: PolarsDataType) -> pl.Series:
    out = s.cast(dtype, strict=False)
    if out.null_count() > s.null_count():
        out = out.fill_null(s.str.strip_chars().cast(dtype, strict=False))
    return out


def _finite(s: pl.Series) -> pl.Series:
    bad = ~s.is_finite()
    return _where(~bad, s) if bad.any() else s


def infer_int(s: pl.Series) -> pl.Series:
    """Int64 when every non-null string is an integer written the canonical way (it reads
    back the same), else the strings unchanged: "007" and "7" (or "+7", "-0") stay two
    different ids instead of merging into 7."""
    if s.dtype != pl.String:
        return s
    as_int = s.cast(pl.Int64, strict=False)
    if as_int.null_count() == s.null_count() and (as_int.cast(pl.String) == s).all():
        return as_int
    return s


def _time(s: pl.Series, fmt: str | None) -> pl.Series:
    dtype = s.dtype
    if dtype == pl.Date:
        return s.cast(pl.Datetime("us")).dt.epoch("s")
    if isinstance(dtype, pl.Datetime):
        return s.dt.epoch("s")
    if dtype == pl.String and fmt not in (None, "ms"):
        stamp = s.str.strip_chars().str.strptime(pl.Datetime("us"), fmt, strict=False)
        return stamp.dt.epoch("s")
    whole = _number(s, pl.Int64) if dtype == pl.String else s.cast(pl.Int64, strict=False)
    scale = 1000 if fmt == "ms" else 1
    if dtype.is_float() or (dtype == pl.String and whole.null_count() > s.null_count()):
        # Fractional seconds (RecBole writes timestamp:float) round down.
        frac = _finite(_number(s, pl.Float64) if dtype == pl.String else s)
        return (frac / scale).floor().cast(pl.Int64, strict=False).alias(s.name)
    return whole // scale if scale != 1 else whole


def parse(s: pl.Series, spec: FieldSpec) -> pl.Series:
    """The parsed column, null where a value does not parse."""
    text = s.dtype == pl.String
    if spec.kind == "id":
        if not text:
            return s.cast(pl.Int64) if s.dtype.is_integer() else s.cast(pl.String)
        return infer_int(s)
    if spec.kind == "str":
        return s if text else s.cast(pl.String)
    if spec.kind == "enum":
        value = s if text else s.cast(pl.String)
        ok = value.is_in(spec.values)
        if (~ok & value.is_not_null()).any():
            value = value.str.strip_chars()
            ok = value.is_in(spec.values)
        return _where(ok, value)
    if spec.kind == "int":
        return _number(s, pl.Int64) if text else s.cast(pl.Int64, strict=False)
    if spec.kind == "float":
        return _finite(_number(s, pl.Float64) if text else s.cast(pl.Float64, strict=False))
    return _time(s, spec.time_format)


def _rule_of(spec: FieldSpec, column: pl.Series) -> validity.Rule | None:
    """The validity rule of a parsed column (integer ids cannot break the id rule)."""
    rule = _RULES.get(spec.kind)
    if rule == "id" and column.dtype != pl.String:
        return None
    return rule


def _rule_ok(rule: validity.Rule, column: pl.Series) -> pl.Series:
    """Boolean per row: the parsed value keeps ``rule`` (null values pass)."""
    expr = validity.id_ok if rule == "id" else validity.ts_ok
    return pl.select(expr(pl.lit(column)).fill_null(True)).to_series()


def check_columns(table: Table, fields: Sequence[FieldSpec]) -> None:
    for spec in fields:
        if spec.source in table.frame.columns:
            continue
        if table.first_line is None:
            have = ", ".join(c for c in table.frame.columns)
            raise DataError(
                f'missing column "{spec.source}" (the file has: {have})',
                location=Location(file=table.file, column=spec.source),
            )
        line = table.header_line or table.line_text(1) or ""
        hint = ""
        if fields_in(line, table.delimiter) == 1:
            hint = delimiter_hint(line, table.delimiter, len(fields))
        shown = line if len(line) <= 80 else line[:77] + "..."
        raise DataError(
            f'missing column "{spec.source}" (line 1 reads {shown!r}){hint}',
            location=Location(file=table.file, line=1, column=spec.source),
        )


def _show(raw: object) -> str:
    text = "" if raw is None else str(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _row_problem(
    table: Table, fields: Sequence[FieldSpec], row: int, parsed: Sequence[pl.Series]
) -> DataError:
    """The error for one bad row: the checks of :func:`validate`, in order, on that row."""
    unreadable = table.problem(row)
    if unreadable is not None:
        return unreadable
    line, suffix = table.row_where(row)
    text = table.line_text(line) if line is not None else None
    expected = table.n_fields
    values = table.frame.row(row, named=True)
    if values.get(EXTRA) is not None and text is not None:
        msg = field_count_message(text, table.delimiter, expected)
        return DataError(msg, location=Location(file=table.file, line=line, value=_show(text)))
    for spec, column in zip(fields, parsed, strict=True):
        raw, value = values[spec.source], column[row]
        where = Location(file=table.file, line=line, column=spec.source, value=_show(raw))
        if raw is None and spec.required:
            if text is not None and fields_in(text, table.delimiter) != expected:
                msg = field_count_message(text, table.delimiter, expected)
                where = Location(file=table.file, line=line, value=_show(text))
                return DataError(msg, location=where)
            return DataError(f"missing value{suffix}", location=where)
        if raw is not None and value is None:
            if spec.kind == "enum":
                msg = f'unknown value "{_show(raw)}" (expected one of {", ".join(spec.values)})'
            elif spec.kind == "timestamp" and spec.time_format not in (None, "ms"):
                msg = f'cannot parse "{_show(raw)}" as a time with format {spec.time_format!r}'
            else:
                msg = f'cannot parse "{_show(raw)}" as {_KIND_WORDS[spec.kind]}'
            return DataError(f"{msg}{suffix}", location=where)
        rule = _rule_of(spec, column)
        if rule is not None and value is not None:
            problem = validity.id_problem if rule == "id" else validity.ts_problem
            why = pl.select(problem(pl.lit(column[row : row + 1]))).item()
            if why is not None:
                return DataError(f"{why}{suffix}", location=where)
    return DataError(f"bad row{suffix}", location=Location(file=table.file, line=line))


def validate(
    table: Table,
    fields: Sequence[FieldSpec],
    *,
    keep: Sequence[str] = (),
    skip_bad_rows: bool = False,
    max_examples: int = 5,
) -> Validated:
    """Parse ``fields`` (and pass ``keep`` columns through); fail on or skip bad rows.

    Raises :class:`DataError` naming the first bad row's line, column and value unless
    ``skip_bad_rows``; then the bad rows are dropped and counted.  Blank lines are ignored.
    """
    check_columns(table, fields)
    frame = table.frame
    parsed = [parse(frame[spec.source], spec).alias(spec.name) for spec in fields]
    flags: list[pl.Series] = []
    if EXTRA in frame.columns and frame[EXTRA].null_count() < frame.height:
        flags.append(frame[EXTRA].is_not_null())
    for spec, column in zip(fields, parsed, strict=True):
        raw = frame[spec.source]
        if spec.required and column.null_count() > 0:
            flags.append(column.is_null())
        elif not spec.required and column.null_count() > raw.null_count():
            flags.append(column.is_null() & raw.is_not_null())
        rule = _rule_of(spec, column)
        if rule is not None:
            ok = _rule_ok(rule, column)
            if not ok.all():
                flags.append(~ok)
    drop: pl.Series | None = None
    skipped = SkipReport()
    if flags:
        bad = pl.select(pl.any_horizontal(flags)).to_series()
        if table.first_line is not None:
            blank = frame.select(pl.all_horizontal(pl.all().is_null())).to_series()
            bad = bad & ~blank
            drop = bad | blank
        else:
            drop = bad
        n_bad = int(bad.sum())
        if n_bad:
            rows = bad.arg_true().head(max(1, max_examples) if skip_bad_rows else 1).to_list()
            errors = [_row_problem(table, fields, r, parsed) for r in rows]
            if not skip_bad_rows:
                more = (
                    f" ({n_bad - 1} more bad rows; --skip-bad-rows skips them)" if n_bad > 1 else ""
                )
                raise DataError(errors[0].reason + more, location=errors[0].location)
            skipped = SkipReport(n_bad, tuple(str(e) for e in errors[:max_examples]))
            logger.warning("%s: skipped %d bad rows; first: %s", table.file, n_bad, errors[0])
    result = pl.DataFrame([*parsed, *(frame[c] for c in keep)])
    if drop is not None and drop.any():
        result = result.filter(~drop)
        # A bad row (now gone) may have been the only non-integer id.
        result = result.with_columns(infer_int(result[s.name]) for s in fields if s.kind == "id")
    return Validated(frame=result, skipped=skipped)


def _align_ids(
    events: pl.DataFrame, table: pl.DataFrame | None, key: str
) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Give ``events[key]`` and ``table[key]`` one dtype (String when they disagree)."""
    if table is None or events.schema[key] == table.schema[key]:
        return events, table
    return (
        events.with_columns(pl.col(key).cast(pl.String)),
        table.with_columns(pl.col(key).cast(pl.String)),
    )


def _dedupe_keys(table: pl.DataFrame, key: str, file: str) -> pl.DataFrame:
    """First row per key of a feature table; later duplicates are dropped with a warning."""
    unique = table.unique(subset=[key], keep="first", maintain_order=True)
    if unique.height != table.height:
        logger.warning(
            "%s: %d rows repeat an earlier %s and were ignored (the first row per %s is kept)",
            file,
            table.height - unique.height,
            key,
            key,
        )
    return unique


def concat_validated(parts: Sequence[Validated], *, file: str) -> Validated:
    """One table from parts validated one by one (blocks of a file, or files of a log), so
    each message names its part's file and line.  An id column that is an integer in one part
    and text in another becomes text everywhere; columns only some parts have are null in the
    others.  The parts' chunks are kept (no copy into one buffer)."""
    if len(parts) == 1:
        return parts[0]
    frames = [v.frame for v in parts]
    for col in (USER, ITEM):
        if len({f.schema[col] for f in frames if col in f.columns}) > 1:
            frames = [f.with_columns(pl.col(col).cast(pl.String)) for f in frames]
    try:
        frame = pl.concat(frames, how="diagonal_relaxed", rechunk=False)
    except pl.exceptions.PolarsError as exc:
        raise DataError(
            f"the parts do not share a schema: {one_line(exc)}", location=Location(file=file)
        ) from None
    skipped = parts[0].skipped
    for v in parts[1:]:
        skipped = skipped.merge(v.skipped)
    return Validated(frame=frame, skipped=skipped)


def assemble(
    *,
    events: Validated,
    users: Validated | None = None,
    items: Validated | None = None,
    source: str,
    files: tuple[str, str] = ("users", "items"),
) -> RawData:
    """RawData from validated tables: one id dtype per key, one row per feature key."""
    skipped = events.skipped
    user_frame = item_frame = None
    if users is not None:
        skipped = skipped.merge(users.skipped)
        user_frame = _dedupe_keys(users.frame, USER, files[0])
    if items is not None:
        skipped = skipped.merge(items.skipped)
        item_frame = _dedupe_keys(items.frame, ITEM, files[1])
    frame, user_frame = _align_ids(events.frame, user_frame, USER)
    frame, item_frame = _align_ids(frame, item_frame, ITEM)
    logger.debug(
        "%s: %d events, %s user rows, %s item rows",
        source,
        frame.height,
        "no" if user_frame is None else user_frame.height,
        "no" if item_frame is None else item_frame.height,
    )
    return RawData(events=frame, users=user_frame, items=item_frame, source=source, skipped=skipped)
