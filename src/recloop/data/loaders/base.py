"""Options shared by every loader, and the registry that maps a format name to its loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from recloop.config import check
from recloop.data.schema import RawData
from recloop.registry import Registry


@dataclass(frozen=True, kw_only=True)
class ColumnMapping:
    """Which source columns of a generic CSV or Parquet file hold the event fields."""

    user: str = "user"
    """Source column with the user id."""
    item: str = "item"
    """Source column with the item id."""
    timestamp: str = "timestamp"
    """Source column with the event time."""
    behavior: str | None = None
    """Source column with the behaviour (pv, cart, ...); None uses a column named ``behavior``
    when there is one."""
    rating: str | None = None
    """Source column with an explicit rating; None uses a column named ``rating`` when there
    is one."""
    timestamp_format: str | None = None
    """None: integer (or fractional) seconds since the epoch; "ms": milliseconds; anything else
    is a strftime format such as "%Y-%m-%d %H:%M:%S"."""
    behavior_values: tuple[str, ...] | None = None
    """Allowed behaviour values; None accepts any non-empty value."""
    delimiter: str = ","
    """Field delimiter of CSV files (one character, or "::")."""
    has_header: bool = True
    """Whether CSV files start with a header line; without one, columns are named column_1,
    column_2, ... in file order."""
    quote_char: str | None = '"'
    """Quote character of CSV files; None reads quotes as ordinary characters."""
    user_features: Path | None = None
    """Optional CSV/Parquet file of user features, keyed by the ``user`` column."""
    item_features: Path | None = None
    """Optional CSV/Parquet file of item features, keyed by the ``item`` column."""

    def __post_init__(self) -> None:
        # The CSV reader takes one-byte separators and quotes (and "::" is replaced by one).
        check(
            _one_byte(self.delimiter) or self.delimiter == "::",
            f"columns.delimiter must be one character or '::' (ASCII), got {self.delimiter!r}",
        )
        check(
            self.quote_char is None or _one_byte(self.quote_char),
            f"columns.quote_char must be one character (ASCII) or null, got {self.quote_char!r}",
        )
        check(
            self.quote_char not in (self.delimiter, "\n", "\r"),
            f"columns.quote_char {self.quote_char!r} cannot be the delimiter or a line break",
        )
        check(
            self.delimiter not in ("\n", "\r"),
            f"columns.delimiter cannot be a line break, got {self.delimiter!r}",
        )
        names = [self.user, self.item, self.timestamp, self.behavior, self.rating]
        given = [n for n in names if n is not None]
        check(
            len(set(given)) == len(given),
            f"columns: one source column is mapped to two fields ({', '.join(given)})",
        )


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How to read raw data, whatever the format."""

    skip_bad_rows: bool = False
    """Skip malformed rows (counted, reported and logged) instead of failing on the first."""
    columns: ColumnMapping | None = None
    """Column mapping for the csv and parquet formats; None means ColumnMapping() defaults.
    Ignored by formats with a fixed layout."""
    max_examples: int = 5
    """How many skipped rows are described in the skip report."""

    def __post_init__(self) -> None:
        check(self.max_examples >= 0, f"max_examples must be >= 0, got {self.max_examples}")


def _one_byte(char: str) -> bool:
    return len(char) == 1 and char.isascii()


class Loader(Protocol):
    def __call__(self, path: Path, options: LoadOptions) -> RawData: ...


LOADERS: Registry[Loader] = Registry("data format")
"""Format name → loader function; filled by the format modules at import time."""
