"""Reading delimited text and Parquet files into raw tables, fast and without guessing.

Text files are read by polars with every column as a string plus one sentinel column that
catches surplus fields (:mod:`._validate` then parses and checks them).  Row ``r`` of a text
table is physical line ``first_line + r``: polars keeps blank lines as all-null rows, and the
formats read here never quote line breaks.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import polars as pl
from polars._typing import PolarsDataType

from recloop.errors import DataError, Location

EXTRA = "__extra_fields__"
"""Sentinel column: non-null where a line has more fields than expected."""
_SUBST = "\x1f"
"""Single-byte stand-in for the multi-character "::" delimiter of MovieLens-1M."""

_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "'|'", "::": "'::'"}


def delimiter_name(delimiter: str) -> str:
    return _DELIMITER_NAMES.get(delimiter, repr(delimiter))


@dataclass(frozen=True, kw_only=True)
class Table:
    """A raw table as read: string columns for text files, typed ones for Parquet."""

    frame: pl.DataFrame
    """The rows, one per physical data line (text) or per row (Parquet)."""
    file: str
    """The file as named in messages."""
    first_line: int | None = None
    """Physical line number of row 0; None for files without lines (Parquet)."""
    header_line: str | None = None
    """The header as read, for messages about missing columns."""
    delimiter: str = ","
    """The field delimiter as the user knows it."""
    data: Path | bytes | None = None
    """Where to re-read a physical line from when wording a message."""

    @property
    def n_fields(self) -> int:
        return len([c for c in self.frame.columns if c != EXTRA])

    def line_text(self, line: int) -> str | None:
        """Physical line ``line`` (1-based) without its line break, or None."""
        if self.data is None:
            return None
        with _open(self.data) as handle:
            raw = next(itertools.islice(handle, line - 1, None), None)
        if raw is None:
            return None
        return raw.decode("utf-8", errors="replace").rstrip("\r\n").replace(_SUBST, "::")

    def row_where(self, row: int) -> tuple[int | None, str]:
        """(physical line, "") for text files; (None, " in row N") for Parquet."""
        if self.first_line is None:
            return None, f" in row {row + 1}"
        return self.first_line + row, ""


def fields_in(line: str, delimiter: str) -> int:
    return len(line.split(delimiter))


def delimiter_hint(line: str, delimiter: str, expected: int) -> str:
    """Name the delimiter a line seems to use instead of ``delimiter``, if any."""
    candidates = [d for d in ("\t", ",", ";", "|", "::") if d != delimiter and d in line]
    if not candidates:
        return ""
    best = max(candidates, key=lambda d: (fields_in(line, d) == expected, line.count(d)))
    return (
        f"; the line looks {delimiter_name(best)}-separated but {delimiter_name(delimiter)} "
        "was expected (wrong delimiter?)"
    )


def field_count_message(line: str, delimiter: str, expected: int) -> str:
    found = fields_in(line, delimiter)
    shown = line if len(line) <= 80 else line[:77] + "..."
    return (
        f"expected {expected} fields separated by {delimiter_name(delimiter)}, found {found}"
        f"{delimiter_hint(line, delimiter, expected)}; the line reads {shown!r}"
    )


def _open_source(path: Path, *, delimiter: str, encoding: str) -> tuple[Path | bytes, str]:
    """The bytes polars should read (transcoded, "::" replaced) and its one-byte separator."""
    if not path.exists():
        raise DataError("file not found", location=Location(file=str(path)))
    if not path.is_file():
        raise DataError("not a regular file", location=Location(file=str(path)))
    if encoding == "utf-8" and len(delimiter) == 1:
        return path, delimiter
    # Only MovieLens needs this (latin-1 titles, ml-1m's "::"); its largest such file, ml-1m
    # ratings.dat, is 24 MB, so transcoding in memory is fine.
    data = path.read_bytes()
    if encoding != "utf-8":
        data = data.decode(encoding).encode("utf-8")
    if len(delimiter) > 1:
        data = data.replace(delimiter.encode(), _SUBST.encode())
        return data, _SUBST
    return data, delimiter


def _open(source: Path | bytes) -> BinaryIO:
    return io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")


def _first_line(source: Path | bytes) -> bytes | None:
    with _open(source) as handle:
        return handle.readline() or None


def read_text(
    path: Path,
    *,
    delimiter: str,
    names: Sequence[str] | None = None,
    has_header: bool = False,
    quote_char: str | None = None,
    encoding: str = "utf-8",
    fast_types: Mapping[str, PolarsDataType] | None = None,
) -> Table:
    """Read a delimited file, every column as a string unless ``fast_types`` says otherwise.

    ``names`` gives the columns of a headerless file; without it they are ``column_1``, ...
    sized by the first line.  With ``has_header`` the header names the columns.
    ``fast_types`` is a guess (e.g. integer ids) tried first because typed parsing is about
    twice as fast; if any value does not fit, the file is read again as strings.
    """
    file = str(path)
    source, sep = _open_source(path, delimiter=delimiter, encoding=encoding)
    first = _first_line(source)
    if first is None:
        raise DataError("empty file", location=Location(file=file))
    header_text = None
    if has_header:
        header_text = first.decode("utf-8", errors="replace").rstrip("\r\n").lstrip("\ufeff")
        header_text = header_text.replace(_SUBST, "::")
        cols = [c.strip() for c in header_text.split(delimiter)]
        if quote_char:
            cols = [c.strip(quote_char) for c in cols]
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise DataError(
                f'duplicate column "{dupes[0]}" in the header',
                location=Location(file=file, line=1, column=dupes[0]),
            )
    elif names is not None:
        cols = list(names)
    else:
        text = first.decode("utf-8", errors="replace").rstrip("\r\n")
        cols = [f"column_{i}" for i in range(1, fields_in(text, sep) + 1)]

    def read(types: Mapping[str, PolarsDataType]) -> pl.DataFrame:
        schema = {c: types.get(c, pl.String) for c in cols} | {EXTRA: pl.String}
        return pl.read_csv(
            source,
            has_header=False,
            separator=sep,
            quote_char=quote_char,
            skip_lines=1 if has_header else 0,
            schema=schema,
            truncate_ragged_lines=True,
            missing_columns="insert",
            raise_if_empty=False,
        )

    frame = None
    if fast_types:
        try:
            frame = read(fast_types)
        except pl.exceptions.PolarsError:
            frame = None  # some value is not of the guessed type: validation will say which
    if frame is None:
        try:
            frame = read({})
        except (pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read file: {exc}", location=Location(file=file)) from None
    if frame.height == 0 or frame.null_count().row(0) == (frame.height,) * frame.width:
        raise DataError("empty file (no data rows)", location=Location(file=file))
    return Table(
        frame=frame,
        file=file,
        first_line=2 if has_header else 1,
        header_line=header_text,
        delimiter=delimiter,
        data=source,
    )


def read_parquet(path: Path) -> Table:
    file = str(path)
    if not path.is_file():
        raise DataError("file not found", location=Location(file=file))
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(f"cannot read Parquet file: {exc}", location=Location(file=file)) from None
    if frame.height == 0:
        raise DataError("empty file (no data rows)", location=Location(file=file))
    return Table(frame=frame, file=file)
