"""Generic event tables: a CSV or Parquet file whose columns a :class:`ColumnMapping` names.

Columns the mapping does not use pass through as extra event columns (strings for CSV, their
own type for Parquet).  Optional user/item feature files are keyed by the mapped user/item
column; their other columns are features.

Parquet columns carry types, checked before any value is: ids are integers or strings,
timestamps integer (or fractional) seconds, dates or datetimes (strings only with
``columns.timestamp_format``), ratings numbers and behaviours strings or categoricals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import polars as pl

from recloop.data.loaders._read import (
    EXTRA,
    Table,
    glob_files,
    is_glob,
    read_parquet,
    read_text,
    read_text_blocks,
)
from recloop.data.loaders._validate import (
    FieldSpec,
    Kind,
    Validated,
    assemble,
    check_columns,
    concat_validated,
    infer_int,
    validate,
)
from recloop.data.loaders.base import LOADERS, ColumnMapping, LoadOptions
from recloop.data.schema import BEHAVIOR, ITEM, RATING, TIMESTAMP, USER, RawData
from recloop.errors import DataError, Location

_SUFFIXES = {"csv": (".csv", ".tsv", ".txt", ".dat"), "parquet": (".parquet", ".pq")}
_OUTPUTS = (USER, ITEM, TIMESTAMP, BEHAVIOR, RATING)


_EXPECTED = {
    "id": "an integer or string column",
    "timestamp": "integer seconds, a date or a datetime",
    "float": "a numeric column",
    "enum": "a string or categorical column",
    "str": "a string or categorical column",
}
_INT64_MAX = 2**63 - 1


def _type_fits(dtype: pl.DataType, spec: FieldSpec) -> bool:
    if dtype == pl.Null:
        return True  # every value missing: reported row by row
    text = dtype == pl.String or isinstance(dtype, pl.Categorical | pl.Enum)
    if spec.kind == "id":
        return dtype.is_integer() or text
    if spec.kind == "timestamp":
        when = dtype == pl.Date or isinstance(dtype, pl.Datetime)
        # Strings hold times only in the format the mapping names.
        written = dtype == pl.String and spec.time_format is not None
        return dtype.is_integer() or dtype.is_float() or when or written
    if spec.kind == "float":
        return dtype.is_numeric()
    return text


def check_types(table: Table, fields: Sequence[FieldSpec]) -> Table:
    """Fail on a Parquet column whose type cannot hold its field (a list of ids, a boolean
    time), naming the column and the type found; UInt64 ids beyond Int64 become strings."""
    if table.first_line is not None:
        return table  # text: every column is a string, parsed value by value
    frame = table.frame
    for spec in fields:
        dtype = frame.schema[spec.source]
        if not _type_fits(dtype, spec):
            hint = ""
            if spec.kind == "timestamp" and dtype == pl.String:
                hint = "; set columns.timestamp_format to parse text times"
            raise DataError(
                f"type {dtype} cannot hold {spec.name} values (expected "
                f"{_EXPECTED[spec.kind]}){hint}",
                location=Location(file=table.file, column=spec.source),
            )
        too_big = dtype == pl.UInt64 and bool((frame[spec.source] > _INT64_MAX).any())
        if spec.kind == "id" and too_big:
            # Hashed 64-bit ids do not fit Int64; as text they stay distinct.
            frame = frame.with_columns(pl.col(spec.source).cast(pl.String))
    return table if frame is table.frame else replace(table, frame=frame)


def _files(path: Path, fmt: str, *, exclude: Sequence[Path | None] = ()) -> list[Path]:
    """The event files: ``path`` itself, the files a glob pattern matches, or every file of
    the format in a directory (real logs come in parts), sorted by name.  ``exclude`` are
    feature files that may sit beside the parts."""
    if is_glob(path):
        found = glob_files(path)
        if not found:
            raise DataError("no file matches this pattern", location=Location(file=str(path)))
        return found
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or directory", location=Location(file=str(path)))
    skip = {p.resolve() for p in exclude if p is not None}
    found = sorted(
        p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES[fmt] and p.resolve() not in skip
    )
    if not found:
        raise DataError(f"0 {fmt} files in this directory", location=Location(file=str(path)))
    return found


def _read(path: Path, mapping: ColumnMapping) -> Table:
    if path.suffix.lower() in _SUFFIXES["parquet"]:
        return read_parquet(path)
    return read_text(
        path,
        delimiter=mapping.delimiter,
        has_header=mapping.has_header,
        quote_char=mapping.quote_char,
    )


def _event_fields(table: Table, m: ColumnMapping) -> tuple[list[FieldSpec], list[str]]:
    columns = [c for c in table.frame.columns if c != EXTRA]
    fields = [
        FieldSpec(source=m.user, name=USER, kind="id"),
        FieldSpec(source=m.item, name=ITEM, kind="id"),
        FieldSpec(
            source=m.timestamp, name=TIMESTAMP, kind="timestamp", time_format=m.timestamp_format
        ),
    ]
    used = {m.user, m.item, m.timestamp}
    behavior = m.behavior or (BEHAVIOR if BEHAVIOR in columns and BEHAVIOR not in used else None)
    if behavior is not None:
        values = m.behavior_values or ()
        kind: Kind = "enum" if values else "str"
        fields.append(FieldSpec(source=behavior, name=BEHAVIOR, kind=kind, values=values))
        used.add(behavior)
    rating = m.rating or (RATING if RATING in columns and RATING not in used else None)
    if rating is not None:
        fields.append(FieldSpec(source=rating, name=RATING, kind="float"))
        used.add(rating)
    check_columns(table, fields)
    keep = [c for c in columns if c not in used]
    clash = [c for c in keep if c in _OUTPUTS]
    if clash:
        raise DataError(
            f'column "{clash[0]}" is not mapped but has the name of a schema column; map it '
            f"(columns.{clash[0]}) or rename it",
            location=Location(
                file=table.file, line=1 if table.first_line else None, column=clash[0]
            ),
        )
    return fields, keep


def _features(path: Path, key: str, out: str, m: ColumnMapping, options: LoadOptions) -> Validated:
    table = _read(path, m)
    fields = [FieldSpec(source=key, name=out, kind="id")]
    check_columns(table, fields)
    table = check_types(table, fields)
    keep = [c for c in table.frame.columns if c not in (key, EXTRA)]
    result = validate(
        table,
        fields,
        keep=keep,
        skip_bad_rows=options.skip_bad_rows,
        max_examples=options.max_examples,
    )
    frame = result.frame.with_columns(infer_int(result.frame[c]) for c in keep)
    return Validated(frame=frame, skipped=result.skipped)


def _events(path: Path, m: ColumnMapping, options: LoadOptions) -> Validated:
    """One events file, validated block by block when it is large (see read_text_blocks)."""
    if path.suffix.lower() in _SUFFIXES["parquet"]:
        tables: Iterable[Table] = [read_parquet(path)]
    else:
        tables = read_text_blocks(
            path, delimiter=m.delimiter, has_header=m.has_header, quote_char=m.quote_char
        )
    parts = []
    for table in tables:
        fields, keep = _event_fields(table, m)
        checked = check_types(table, fields)
        parts.append(
            validate(
                checked,
                fields,
                keep=keep,
                skip_bad_rows=options.skip_bad_rows,
                max_examples=options.max_examples,
            )
        )
    return concat_validated(parts, file=str(path))


def _load(fmt: str, path: Path, options: LoadOptions) -> RawData:
    m = options.columns or ColumnMapping()
    files = _files(path, fmt, exclude=(m.user_features, m.item_features))
    parts = [_events(f, m, options) for f in files]
    events = concat_validated(parts, file=f"{files[0]} ... {files[-1].name}")
    users = items = None
    if m.user_features is not None:
        users = _features(m.user_features, m.user, USER, m, options)
    if m.item_features is not None:
        items = _features(m.item_features, m.item, ITEM, m, options)
    return assemble(
        events=events,
        users=users,
        items=items,
        source=f"{fmt} {path}",
        files=(str(m.user_features), str(m.item_features)),
    )


@LOADERS.register("csv")
def load_csv(path: Path, options: LoadOptions) -> RawData:
    """Load a delimited events file, every such file in a directory, or a glob's matches."""
    return _load("csv", path, options)


@LOADERS.register("parquet")
def load_parquet(path: Path, options: LoadOptions) -> RawData:
    """Load a Parquet events file, every ``*.parquet`` part in a directory, or a glob's."""
    return _load("parquet", path, options)
