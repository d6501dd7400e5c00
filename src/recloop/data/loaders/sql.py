"""The SQL behaviour log (written by ``recloop stream``) as a training source.

``recloop prepare --from-db DATABASE_URL`` reads the log back with :func:`load_from_db`, so
the events served and logged online become the next training set.  The table is read in one
query into a polars frame (no Python loop per row).
"""

from __future__ import annotations

import polars as pl
import sqlalchemy as sa

from recloop.data.loaders._validate import infer_int
from recloop.data.schema import BEHAVIOR, EVENT_ID, ITEM, RATING, TIMESTAMP, USER, RawData
from recloop.errors import ConfigError, DataError, Location

LOG_COLUMNS = ("event_id", "user_id", "item_id", "ts", "behavior", "rating", "reward")
"""Columns of the behaviour log table (see ``recloop.streaming.log``)."""


def load_from_db(url: str, *, table: str = "behavior_log") -> RawData:
    """Events of a behaviour-log table as :class:`RawData`.

    Columns: ``user``, ``item`` (Int64 when all ids are integers, else String),
    ``timestamp``, ``behavior`` / ``rating`` when any row has one, and the extras
    ``reward`` and ``event_id``; rows ordered by (timestamp, event_id).
    """
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    where = f"{engine.url.render_as_string(hide_password=True)} table {table}"
    try:
        meta = sa.MetaData()
        try:
            t = sa.Table(table, meta, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise DataError(
                "no such table (run `recloop stream` first, or pass the table name)",
                location=Location(file=where),
            ) from None
        missing = [c for c in LOG_COLUMNS if c not in t.c]
        if missing:
            raise DataError(
                f"not a behaviour log: missing columns {', '.join(missing)}",
                location=Location(file=where),
            )
        query = sa.select(*[t.c[c] for c in LOG_COLUMNS]).order_by(t.c.ts, t.c.event_id)
        with engine.connect() as conn:
            frame = pl.read_database(
                query,
                connection=conn,
                schema_overrides={
                    "event_id": pl.String,
                    "user_id": pl.String,
                    "item_id": pl.String,
                    "ts": pl.Int64,
                    "behavior": pl.String,
                    "rating": pl.Float64,
                    "reward": pl.Float64,
                },
            )
    except sa.exc.OperationalError as exc:
        raise DataError(
            f"cannot read the database ({str(exc.orig).strip().splitlines()[0]})",
            location=Location(file=where),
        ) from None
    finally:
        engine.dispose()
    cols = [
        infer_int(frame["user_id"]).alias(USER),
        infer_int(frame["item_id"]).alias(ITEM),
        frame["ts"].cast(pl.Int64).alias(TIMESTAMP),
    ]
    if frame["behavior"].null_count() < frame.height:
        cols.append(frame["behavior"].alias(BEHAVIOR))
    if frame["rating"].null_count() < frame.height:
        cols.append(frame["rating"].alias(RATING))
    cols += [frame["reward"].alias("reward"), frame["event_id"].alias(EVENT_ID)]
    return RawData(events=pl.DataFrame(cols), source=f"sql {where}")
