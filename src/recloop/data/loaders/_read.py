"""Reading delimited text and Parquet files into raw tables, fast and without guessing.

Text files are read by polars with every column as a string plus one sentinel column that
catches surplus fields (:mod:`._validate` then parses and checks them).  Row ``r`` of a text
table is physical line ``first_line + r``: polars keeps blank lines as all-null rows, and the
formats read here never quote line breaks.

Lines polars cannot read at all (invalid UTF-8, a quote that does not close on its line) are
found by a slower scan that runs only when the fast read fails or a value holds a line break:
each such line is blanked, marked in the sentinel column and described in
:attr:`Table.problems`, so it is reported with its line and column, or skipped, like any other
bad row.
"""

from __future__ import annotations

import glob as globlib
import io
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import polars as pl
from polars._typing import PolarsDataType

from recloop.errors import DataError, Location

EXTRA = "__extra_fields__"
"""Sentinel column: non-null where a line has more fields than expected, or is one of
:attr:`Table.problems`."""
_SUBST = "\x1f"
"""Single-byte stand-in for the multi-character "::" delimiter of MovieLens-1M."""

_DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "'|'", "::": "'::'"}


_BAD_BYTE = re.compile("[\udc80-\udcff]")
"""An undecodable byte, as ``bytes.decode("utf-8", "surrogateescape")`` represents it."""
_KEEP_CHARS = 1000
"""How much of an unreadable line is kept for its message."""


def delimiter_name(delimiter: str) -> str:
    return _DELIMITER_NAMES.get(delimiter, repr(delimiter))


def shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message: polars' can run over many lines (or quote
    the rest of the file)."""
    lines = str(exc).strip().splitlines()
    return shorten(lines[0] if lines else type(exc).__name__, limit)


@dataclass(frozen=True, kw_only=True)
class BadLine:
    """A physical line that cannot be read at all, found by :func:`scan_lines`."""

    reason: str
    """What is wrong, e.g. "invalid UTF-8 byte 0xFF"."""
    text: str
    """The line (at most ``_KEEP_CHARS`` characters), undecodable bytes as surrogates."""
    pos: int | None
    """Character offset of the problem in ``text``; None: the quote left open."""


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
    quote_char: str | None = None
    """The quote character the file was read with."""
    problems: Mapping[int, BadLine] = field(default_factory=dict)
    """Rows whose line could not be read (their fields are null and ``EXTRA`` is set)."""
    line_offset: int = 0
    """Physical lines of the file before ``data`` (a block of a large file, see
    :func:`read_text_blocks`), not counting a header that ``data`` repeats."""

    @property
    def n_fields(self) -> int:
        return len([c for c in self.frame.columns if c != EXTRA])

    def line_text(self, line: int) -> str | None:
        """Physical line ``line`` (1-based) without its line break, or None."""
        if self.data is None:
            return None
        with _open(self.data) as handle:
            raw = next(itertools.islice(handle, line - 1 - self.line_offset, None), None)
        if raw is None:
            return None
        return raw.decode("utf-8", errors="replace").rstrip("\r\n").replace(_SUBST, "::")

    def problem(self, row: int) -> DataError | None:
        """The error for row ``row`` if its line could not be read at all, else None."""
        bad = self.problems.get(row)
        if bad is None or self.first_line is None:
            return None
        return bad_line_error(
            bad,
            file=self.file,
            line=self.first_line + row,
            columns=[c for c in self.frame.columns if c != EXTRA],
            delimiter=self.delimiter,
            quote=self.quote_char,
        )

    def row_where(self, row: int) -> tuple[int | None, str]:
        """(physical line, "") for text files; (None, " in row N") for Parquet."""
        if self.first_line is None:
            return None, f" in row {row + 1}"
        return self.first_line + row, ""


def bad_line_error(
    bad: BadLine,
    *,
    file: str,
    line: int,
    columns: Sequence[str],
    delimiter: str,
    quote: str | None,
) -> DataError:
    """``FILE line N, column "X": reason; the line reads '...'``, the line cut to 80 chars."""
    pos = bad.pos if bad.pos is not None else open_quote(bad.text, quote or '"')
    index = field_index(bad.text[:pos], _source_delimiter(delimiter), quote)
    text = bad.text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    shown = shorten(text.rstrip("\r\n").replace(_SUBST, "::"))
    where = Location(
        file=file,
        line=line,
        column=columns[index] if index < len(columns) else None,
        value=shown,
    )
    return DataError(f"{bad.reason}; the line reads {shown!r}", location=where)


def _source_delimiter(delimiter: str) -> str:
    return _SUBST if len(delimiter) > 1 else delimiter


def field_index(prefix: str, delimiter: str, quote: str | None) -> int:
    """0-based index of the field that the end of ``prefix`` (the start of a line) lies in."""
    if quote is None:
        return prefix.count(delimiter)
    # A quote toggles quoting, as in RFC 4180 (a doubled quote toggles twice).
    return sum(part.count(delimiter) for part in prefix.split(quote)[::2])


def open_quote(line: str, quote: str) -> int:
    """Offset of the quote that is still open at the end of ``line`` (it has an odd count)."""
    return line.rfind(quote) if line.count(quote) % 2 else len(line)


def scan_lines(data: bytes, *, quote: str | None) -> dict[int, BadLine]:
    """0-based indexes of the lines polars cannot read: invalid UTF-8, or an odd number of
    quote characters (a quote that does not close on its line; quoted line breaks are not
    part of the formats read here).  Vectorised except for the bad lines themselves."""
    bad: dict[int, BadLine] = {}
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", "surrogateescape")
        line = start = cursor = 0
        for match in _BAD_BYTE.finditer(text):
            at = match.start()
            breaks = text.count("\n", cursor, at)
            if breaks:
                line += breaks
                start = text.rfind("\n", cursor, at) + 1
            cursor = at
            if line not in bad:
                end = text.find("\n", at)
                end = len(text) if end < 0 else end
                bad[line] = BadLine(
                    reason=f"invalid UTF-8 byte 0x{ord(match.group()) - 0xDC00:02X} (the file "
                    "must be UTF-8 text)",
                    text=text[start : min(end, start + _KEEP_CHARS)],
                    pos=at - start,
                )
    if quote is not None:
        buf = np.frombuffer(data, dtype=np.uint8)
        ends = np.flatnonzero(buf == ord("\n"))
        quotes_per_line = np.bincount(np.searchsorted(ends, np.flatnonzero(buf == ord(quote))))
        for i in np.flatnonzero(quotes_per_line % 2).tolist():
            if i in bad:
                continue
            start = int(ends[i - 1]) + 1 if i > 0 else 0
            end = int(ends[i]) if i < len(ends) else len(data)
            raw = data[start : min(end, start + 4 * _KEEP_CHARS)]
            bad[i] = BadLine(
                reason=f"unbalanced quote: a value opened with {quote!r} does not close on "
                "this line (quoted values cannot span lines)",
                text=raw.decode("utf-8", "surrogateescape")[:_KEEP_CHARS],
                pos=None,
            )
    return bad


def _unparsable_lines(
    data: bytes, *, skip: int, parse: Callable[[bytes], object]
) -> dict[int, BadLine]:
    """0-based lines past the first ``skip`` (the header) on which ``parse`` fails, found by
    bisection: O(bad lines * log lines) parses of ever smaller pieces, each with the header.
    """
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)  # line i starts at starts[i]
    n = int(starts.shape[0]) - (1 if int(starts[-1]) >= len(data) else 0)
    head = data[: int(starts[skip])] if skip else b""

    def piece(lo: int, hi: int) -> bytes:
        return head + data[int(starts[lo]) : int(starts[hi]) if hi < starts.shape[0] else len(data)]

    out: dict[int, BadLine] = {}
    todo = [(skip, n)]
    while todo:
        lo, hi = todo.pop()
        if lo >= hi:
            continue
        try:
            parse(piece(lo, hi))
            continue
        except (pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
            if hi - lo == 1:
                text = piece(lo, hi)[len(head) :].decode("utf-8", "surrogateescape")
                out[lo] = BadLine(
                    reason=f"not readable as CSV ({one_line(exc)})",
                    text=text.rstrip("\r\n")[:_KEEP_CHARS],
                    pos=0,  # which field is broken is polars' to say, in the reason
                )
                continue
        mid = (lo + hi) // 2
        todo += [(mid, hi), (lo, mid)]
    return out


def _blank_lines(data: bytes, lines: Sequence[int], filler: bytes) -> bytes:
    """``data`` with each of ``lines`` (0-based, sorted) replaced by ``filler``."""
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    pieces: list[bytes] = []
    done = 0
    for i in lines:
        start = int(ends[i - 1]) + 1 if i > 0 else 0
        pieces += [data[done:start], filler]
        done = int(ends[i]) if i < len(ends) else len(data)
    pieces.append(data[done:])
    return b"".join(pieces)


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


def is_glob(path: Path) -> bool:
    """Whether ``path`` is a glob pattern (``*``, ``?`` or ``[``) rather than a file name."""
    return any(ch in str(path) for ch in "*?[") and not path.exists()


def glob_files(path: Path) -> list[Path]:
    """The regular files a glob pattern matches (``**`` spans directories), sorted."""
    return sorted(Path(p) for p in globlib.glob(str(path), recursive=True) if Path(p).is_file())


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
    block: bytes | None = None,
    lines_before: int = 0,
) -> Table:
    """Read a delimited file, every column as a string unless ``fast_types`` says otherwise.

    ``names`` gives the columns of a headerless file; without it they are ``column_1``, ...
    sized by the first line.  With ``has_header`` the header names the columns.
    ``fast_types`` is a guess (e.g. integer ids) tried first because typed parsing is about
    twice as fast; if any value does not fit, the file is read again as strings.  Only if
    that fails too, or a quoted value spans lines, is the file scanned for unreadable lines
    (:func:`scan_lines`), which become :attr:`Table.problems`; a bad header is fatal.

    ``block`` reads these bytes (whole lines of ``path`` in UTF-8, after its header when it
    has one, which ``block`` then repeats) instead of the file; ``lines_before`` physical
    lines of the file precede them, so rows are still named by the file's line numbers.
    """
    file = str(path)
    try:
        if block is None:
            source, sep = _open_source(path, delimiter=delimiter, encoding=encoding)
        else:
            source, sep = block, delimiter
        first = _first_line(source)
    except OSError as exc:
        where = Location(file=file)
        raise DataError(f"cannot read file ({exc.strerror})", location=where) from None
    if first is None:
        raise DataError("empty file", location=Location(file=file))
    header_text = None
    if has_header:
        bad_header = scan_lines(first, quote=None).get(0)
        if bad_header is not None:
            # No rows can be named without a header: this line is not skippable.
            raise bad_line_error(
                bad_header, file=file, line=1, columns=(), delimiter=delimiter, quote=None
            )
        header_text = first.decode("utf-8").rstrip("\r\n").lstrip("\ufeff")
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

    def read(data: Path | bytes, types: Mapping[str, PolarsDataType]) -> pl.DataFrame:
        schema = {c: types.get(c, pl.String) for c in cols} | {EXTRA: pl.String}
        return pl.read_csv(
            data,
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
            frame = read(source, fast_types)
        except pl.exceptions.PolarsError:
            frame = None  # some value is not of the guessed type: validation will say which
    if frame is None:
        try:
            frame = read(source, {})
        except (pl.exceptions.PolarsError, UnicodeDecodeError):
            frame = None  # unreadable lines: the scan below finds them
    problems: dict[int, BadLine] = {}
    if frame is None or (
        quote_char is not None and _has_line_break(frame, source, has_header=has_header)
    ):
        # The slow path: find the lines polars cannot read, blank them and read again.
        data = source if isinstance(source, bytes) else path.read_bytes()
        first_line = 2 if has_header else 1
        bad = scan_lines(data, quote=quote_char)
        if has_header and 0 in bad:
            # No rows can be named without a header: this line is not skippable.
            raise bad_line_error(
                bad[0], file=file, line=1, columns=cols, delimiter=delimiter, quote=quote_char
            )
        filler = sep.encode() * len(cols)
        source = _blank_lines(data, sorted(bad), filler=filler)
        try:
            frame = read(source, {})
        except (pl.exceptions.PolarsError, UnicodeDecodeError):
            # Lines the byte scan passes but polars cannot parse (e.g. `""1`, text after a
            # closed quote): find them by bisection, so they are named and skippable too.
            bad |= _unparsable_lines(source, skip=first_line - 1, parse=lambda b: read(b, {}))
            source = _blank_lines(data, sorted(bad), filler=filler)
            try:
                frame = read(source, {})
            except (pl.exceptions.PolarsError, UnicodeDecodeError) as exc:
                raise DataError(
                    f"cannot read file: {one_line(exc)}", location=Location(file=file)
                ) from None
        lines = sorted(bad)
        problems = {i + 1 - first_line: bad[i] for i in lines}
        if problems:
            marked = pl.int_range(pl.len()).is_in(list(problems))
            flag = pl.when(marked).then(pl.lit("unreadable line")).otherwise(pl.col(EXTRA))
            frame = frame.with_columns(flag.alias(EXTRA))
    empty = frame.height == 0 or frame.null_count().row(0) == (frame.height,) * frame.width
    if empty and block is None:
        raise DataError("empty file (no data rows)", location=Location(file=file))
    return Table(
        frame=frame,
        file=file,
        first_line=(2 if has_header else 1) + lines_before,
        header_line=header_text,
        delimiter=delimiter,
        data=source,
        quote_char=quote_char,
        problems=problems,
        line_offset=lines_before,
    )


BLOCK_BYTES = 256 << 20
"""Text files larger than this are read in blocks of about this size (whole lines)."""


def read_text_blocks(
    path: Path,
    *,
    delimiter: str,
    has_header: bool = False,
    encoding: str = "utf-8",
    block_bytes: int | None = None,
    **kwargs: Any,
) -> Iterator[Table]:
    """:func:`read_text` of ``path`` in blocks of about ``block_bytes`` (default
    :data:`BLOCK_BYTES`) of whole lines, so that a loader can validate and compact each block
    before reading the next (a 100M-line log never sits in memory as strings).  Rows keep the
    file's line numbers.  Files that need transcoding or a multi-character delimiter
    (MovieLens, small) are read whole, as are files up to ``block_bytes``.  Blocks split at
    line breaks: the formats read here never quote line breaks (a quote left open is reported
    per line, as in :func:`scan_lines`).  A count of "more bad rows" in a message counts the
    block's.
    """
    kw = dict(kwargs, delimiter=delimiter, has_header=has_header, encoding=encoding)
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    try:
        size = path.stat().st_size if path.is_file() else 0
    except OSError:
        size = 0
    if size <= block_bytes or encoding != "utf-8" or len(delimiter) > 1:
        yield read_text(path, **kw)
        return
    lines_before = 0
    with path.open("rb") as handle:
        header = handle.readline() if has_header else b""
        if has_header:
            read_text(path, **kw, block=header)  # a bad header fails before any block
        while data := handle.read(block_bytes):
            if not data.endswith(b"\n"):
                data += handle.readline()
            yield read_text(path, **kw, block=header + data, lines_before=lines_before)
            lines_before += data.count(b"\n")


def _has_line_break(frame: pl.DataFrame, source: Path | bytes, *, has_header: bool) -> bool:
    """Whether a value holds a line break: a quote opened on one line and closed on a later
    one (or never), which shifts every later row off its line number.  Only text columns can
    hold one (a typed column would have failed to parse it)."""
    if all(t != pl.String for c, t in frame.schema.items() if c != EXTRA):
        return bool(frame[EXTRA].str.contains("\n", literal=True).any())
    # Counting lines in the raw bytes is ~4x cheaper than searching every text value.
    return frame.height != _count_lines(source) - int(has_header)


def _count_lines(source: Path | bytes) -> int:
    """Physical lines: polars keeps blank lines as rows, and a last line may lack its break."""
    breaks, last = 0, b"\n"
    with _open(source) as handle:
        while chunk := handle.read(1 << 24):
            breaks += chunk.count(b"\n")
            last = chunk[-1:]
    return breaks + (last != b"\n")


def read_parquet(path: Path) -> Table:
    file = str(path)
    if not path.is_file():
        raise DataError("file not found", location=Location(file=file))
    try:
        frame = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DataError(
            f"cannot read Parquet file: {one_line(exc)}", location=Location(file=file)
        ) from None
    if frame.height == 0:
        raise DataError("empty file (no data rows)", location=Location(file=file))
    return Table(frame=frame, file=file)
