"""Loaders: every supported raw format becomes one :class:`~recloop.data.schema.RawData`.

``load_raw(fmt, path, options)`` is the single entry point (``recloop prepare`` and
``recloop data inspect`` use it).  Formats: ``movielens`` (100K, 1M, 20M/25M/latest),
``recbole`` (atomic files), ``tianchi`` (ECommAI EUIR round 2 / ``recloop data synth``),
``csv`` and ``parquet`` (with a :class:`ColumnMapping`).

Bad input raises :class:`~recloop.errors.DataError` naming file, line, column and value;
with ``LoadOptions(skip_bad_rows=True)`` bad rows are skipped, counted in ``RawData.skipped``
and logged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from recloop.data.formats import FORMATS

# Each import registers its loader in LOADERS.
from recloop.data.loaders import movielens as _movielens  # noqa: F401
from recloop.data.loaders import recbole as _recbole  # noqa: F401
from recloop.data.loaders import tabular as _tabular  # noqa: F401
from recloop.data.loaders import tianchi as _tianchi  # noqa: F401
from recloop.data.loaders.base import LOADERS, ColumnMapping, Loader, LoadOptions
from recloop.data.schema import RawData

__all__ = ["FORMATS", "LOADERS", "ColumnMapping", "LoadOptions", "Loader", "load_raw"]

logger = logging.getLogger(__name__)


def load_raw(fmt: str, path: Path, options: LoadOptions = LoadOptions()) -> RawData:
    """Read raw data of format ``fmt`` from ``path`` (a directory, or a file of it).

    Raises ``ConfigError`` for an unknown format and ``DataError`` for bad input.
    """
    loader = LOADERS.get(fmt)
    start = time.perf_counter()
    raw = loader(Path(path), options)
    logger.info(
        "loaded %s: %d events in %.2f s%s",
        raw.source,
        raw.events.height,
        time.perf_counter() - start,
        f", {raw.skipped.count} bad rows skipped" if raw.skipped.count else "",
    )
    return raw
