"""Names of the raw formats :func:`recloop.data.loaders.load_raw` reads.

Kept apart from the loaders so that the command line can list them in its help without
importing polars (``recloop --help`` stays fast); a test checks they match the registry.
"""

from __future__ import annotations

FORMATS = ("movielens", "recbole", "tianchi", "csv", "parquet")
"""Names accepted by :func:`~recloop.data.loaders.load_raw` (and ``--format``)."""
