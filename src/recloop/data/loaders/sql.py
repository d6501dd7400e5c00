"""The SQL behaviour log (written by ``recloop stream``) as a training source.

``recloop prepare --from-db DATABASE_URL`` reads the log back with :func:`load_from_db`, so
the events served and logged online become the next training set.  The table is read in one
query into a polars frame (no Python loop per row).
"""

from __future__ import annotations

import logging

import polars as pl
import sqlalchemy as sa

from recloop.data.loaders._validate import infer_int
from recloop.data.schema import (
    BEHAVIOR,
    EVENT_ID,
    ITEM,
    RATING,
    SERVED_CONTEXT,
    TIMESTAMP,
    USER,
    RawData,
    SkipReport,
)
from recloop.errors import ConfigError, DataError, Location

logger = logging.getLogger(__name__)

LOG_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Int64(),
    "behavior": pl.String(),
    "rating": pl.Float64(),
    "reward": pl.Float64(),
}
"""Columns of the behaviour log table (see ``recloop.streaming.log``) and their types."""


def _read_table(
    url: str,
    table: str,
    *,
    schema: dict[str, pl.DataType],
    order_by: tuple[str, ...],
    kind: str,
    missing_hint: str,
    where_true: str | None = None,
    optional: dict[str, pl.DataType] | None = None,
) -> tuple[pl.DataFrame, str]:
    """The ``schema`` columns of ``table`` (and those of ``optional`` it has) in one query,
    ordered, as (frame, where-string).

    A bad URL is a ConfigError; a missing table or column and an unreachable database are
    one-line DataErrors naming the database and table.
    """
    try:
        engine = sa.create_engine(url)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    where = f"{engine.url.render_as_string(hide_password=True)} table {table}"
    try:
        try:
            t = sa.Table(table, sa.MetaData(), autoload_with=engine)
        except sa.exc.NoSuchTableError:
            raise DataError(
                f"no such table ({missing_hint})", location=Location(file=where)
            ) from None
        missing = [c for c in schema if c not in t.c]
        if missing:
            raise DataError(
                f"not a {kind}: missing columns {', '.join(missing)}",
                location=Location(file=where),
            )
        schema = {**schema, **{c: d for c, d in (optional or {}).items() if c in t.c}}
        query = sa.select(*[t.c[c] for c in schema]).order_by(*[t.c[c] for c in order_by])
        if where_true is not None:
            query = query.where(t.c[where_true] == sa.true())
        with engine.connect() as conn:
            frame = pl.read_database(query, connection=conn, schema_overrides=schema)
    except sa.exc.OperationalError as exc:
        raise DataError(
            f"cannot read the database ({str(exc.orig).strip().splitlines()[0]})",
            location=Location(file=where),
        ) from None
    finally:
        engine.dispose()
    return frame, where


def load_from_db(
    url: str, *, table: str = "behavior_log", skip_without_behavior: bool = False
) -> RawData:
    """Events of a behaviour-log table as :class:`RawData`.

    Columns: ``user``, ``item`` (Int64 when all ids are integers, else String),
    ``timestamp``, ``behavior`` / ``rating`` when any row has one, and the extras
    ``reward`` and ``event_id``; rows ordered by (timestamp, event_id).

    The stream accepts events without a behaviour.  When some rows have one and others do
    not, rewards from behaviours cannot be computed for all of them: with
    ``skip_without_behavior`` (``prepare --from-db --skip-bad-rows``, where the rewards
    come from behaviours) those rows are left out and counted in ``RawData.skipped``, each
    example naming the table, the event id and the column.
    """
    frame, where = _read_table(
        url,
        table,
        schema=LOG_SCHEMA,
        order_by=("ts", "event_id"),
        kind="behaviour log",
        missing_hint="run `recloop stream` first, or pass the table name",
    )
    skipped = SkipReport()
    lacking = frame["behavior"].is_null()
    if skip_without_behavior and 0 < int(lacking.sum()) < frame.height:
        bad = frame.filter(lacking)["event_id"]
        skipped = SkipReport(
            bad.len(),
            tuple(f"{where}: event {e!r}: column behavior: no value" for e in bad.head(10)),
        )
        frame = frame.filter(~lacking)
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
    return RawData(events=pl.DataFrame(cols), source=f"sql {where}", skipped=skipped)


IMPRESSION_SCHEMA: dict[str, pl.DataType] = {
    "recommendation_id": pl.String(),
    "position": pl.Int32(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Int64(),
    "model_version": pl.String(),
    "policy": pl.String(),
    "propensity": pl.Float64(),
    "temperature": pl.Float64(),
    "epsilon": pl.Float64(),
    "source": pl.String(),
    "reward": pl.Float64(),
    "settled": pl.Boolean(),
}
"""Columns of the served-items table read by :func:`load_impressions_from_db`."""
IMPRESSION_OPTIONAL: dict[str, pl.DataType] = {"context": pl.String()}
"""Columns read when the served-items table has them (added after its first release)."""


def load_impressions_from_db(
    url: str, *, table: str = "served_items", settled_only: bool = True, context: bool = True
) -> RawData:
    """Impression-level events: one row per item the service showed, from the served-items
    table that ``recloop stream`` fills and attributes (see ``recloop.streaming.served``).

    Columns: ``user``, ``item``, ``timestamp`` (when it was served), ``rating`` = the
    impression's reward (the attributed event's reward, 0 for a shown-but-ignored item), so
    that the default reward source reads it as the reward, and the extras ``propensity``
    (the logging policy's probability of showing it there), ``policy_version`` (the
    model version that served it), ``policy`` (topk, softmax, epsilon), its settings
    ``temperature`` and ``epsilon`` (null where the policy has none), ``list_source``
    (``policy``, or ``popular`` for the service's fallback list), ``position``,
    ``list_length`` (the items of its list: OPE's ``served`` target re-serves each slot of
    the list from one state) and ``event_id`` (``<recommendation_id>:<position>``).  A
    list's impressions are served together and settle together, so ``list_length`` counts
    the rows of its recommendation id.  ``served_context``: the JSON of what the list was
    drawn from (:mod:`recloop.streaming.served`), on its first row; when the table has the
    column, and ``context`` is true (a reader that does not need it is spared the text).
    ``settled_only``: leave out the
    impressions whose attribution window is still open (their reward is not known yet).
    """
    frame, where = _read_table(
        url,
        table,
        schema=IMPRESSION_SCHEMA,
        order_by=("ts", "recommendation_id", "position"),
        kind="served-items table",
        missing_hint="serve with --bus-url or --database-url and run `recloop stream` first, "
        "or pass the table name",
        optional=IMPRESSION_OPTIONAL if context else None,
    )
    if settled_only:
        # read, then left out with a count: open impressions are only the newest ones
        open_rows = int((~frame["settled"]).sum())
        if open_rows:
            frame = frame.filter(pl.col("settled"))
            logger.warning(
                "%s: %d impressions left out, their attribution window still open (reward "
                "not known yet; `recloop stream` settles them); %d settled ones read",
                where,
                open_rows,
                frame.height,
            )
            where += f" ({open_rows} open impressions left out)"
    # kept even where every value is null (a table from before contexts were logged), so
    # that OPE's served target can say how many lists it rebuilt from the log
    contexts = [frame["context"].alias(SERVED_CONTEXT)] if "context" in frame.columns else []
    events = pl.DataFrame(
        [
            infer_int(frame["user_id"]).alias(USER),
            infer_int(frame["item_id"]).alias(ITEM),
            frame["ts"].alias(TIMESTAMP),
            # unsettled rows (settled_only=False) have no reward yet: 0, as if ignored
            frame["reward"].fill_null(0.0).alias(RATING),
            frame["propensity"].alias("propensity"),
            frame["model_version"].alias("policy_version"),
            frame["policy"].alias("policy"),
            frame["temperature"].alias("temperature"),
            frame["epsilon"].alias("epsilon"),
            frame["source"].alias("list_source"),
            frame["position"].alias("position"),
            frame.select(pl.len().over("recommendation_id").cast(pl.Int32))
            .to_series()
            .alias("list_length"),
            (frame["recommendation_id"] + ":" + frame["position"].cast(pl.String)).alias(EVENT_ID),
            *contexts,
        ]
    )
    return RawData(events=events, source=f"sql impressions {where}")
