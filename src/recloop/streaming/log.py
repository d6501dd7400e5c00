"""The SQL behaviour log: events, recommendation history and popular-item window counts.

SQLAlchemy 2 Core on PostgreSQL, MySQL/MariaDB or SQLite, three tables (names take a
configurable prefix):

``behavior_log``
    one row per event, primary key ``event_id``; what ``recloop prepare --from-db`` reads.
``recommendation_log``
    each refreshed list (``items``/``scores`` as JSON arrays) with the model version and the
    realised reward of the user's previous list.
``popular_buckets``
    event counts per (slide bucket, item): the state of the sliding-window popular items.

Idempotence: a batch is inserted with one bulk statement that skips existing event ids
(``ON CONFLICT DO NOTHING`` on PostgreSQL and SQLite, ``INSERT IGNORE`` on MySQL) and returns
the ids it did insert.  Only those new events are added to the window counts, in the same
transaction, so a redelivered event is neither logged nor counted twice -- the window counts
are exact under at-least-once delivery, and shared by every worker.  On PostgreSQL a batch
travels as one JSON document that the server unpacks, inserts and counts in one statement
(several times faster than a multi-row VALUES list, whose parameters psycopg adapts one by
one); MySQL and SQLite get SQLAlchemy's batched VALUES and a second upsert statement.

A bad event never takes good ones with it: when the database refuses a batch for a reason
other than a connection problem (a value it cannot store), the batch is split in halves,
each inserted in its own transaction, recursively, until the rows it refuses are alone; they
come back in :attr:`AppendResult.rejected` with the database's reason and everything else is
logged.  A clean batch is still one statement; a batch with one bad row costs about
``2 * log2(rows)`` more.  Connection errors are raised as before (the caller retries).

Column types hold what the stream accepts, byte for byte: on MySQL/MariaDB the string
columns are utf8mb4 with a binary no-pad collation (the default collation takes ``Order-1``,
``order-1``, ``ordér-1`` and ``order-1 `` for one id and would drop three as duplicates), and
ratings and rewards are DOUBLE everywhere (MySQL's FLOAT is single precision).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import polars as pl
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite

from recloop.errors import ConfigError
from recloop.streaming.events import MAX_ID_LEN
from recloop.streaming.operators import bucket_counts
from recloop.streaming.served import SERVED_WIDTHS as W

logger = logging.getLogger(__name__)


def binary_collation(dialect: sa.Dialect) -> str:
    """The utf8mb4 collation of MySQL/MariaDB that compares strings byte for byte, trailing
    spaces included (``utf8mb4_bin`` is PAD SPACE: 'a' = 'a ')."""
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin"
    version = dialect.server_version_info or (8,)
    # MySQL 5.7 has no no-pad utf8mb4 collation; its _bin still tells case and accents apart.
    return "utf8mb4_0900_bin" if version >= (8,) else "utf8mb4_bin"


class BinaryString(sa.types.TypeDecorator[str]):
    """VARCHAR(n) whose equality is byte equality on every backend: utf8mb4 with
    :func:`binary_collation` on MySQL/MariaDB; a plain VARCHAR elsewhere (PostgreSQL's and
    SQLite's default comparisons are already exact)."""

    impl = sa.String
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        length = getattr(self.impl, "length", None)
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(
                mysql.VARCHAR(length, charset="utf8mb4", collation=binary_collation(dialect))
            )
        return dialect.type_descriptor(sa.String(length))


_ID = BinaryString(MAX_ID_LEN)
_BIGINT_PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER


@dataclass(frozen=True)
class LogTables:
    """The three tables of one log, in their own ``MetaData``."""

    metadata: sa.MetaData
    behavior: sa.Table
    recommendations: sa.Table
    popular: sa.Table
    served: sa.Table
    """One row per item of every list the service served, with its propensity and the
    feedback attributed to it (see :mod:`recloop.streaming.served`)."""
    links: sa.Table
    """event_id -> recommendation_id of the events that named the list they answer."""


def log_tables(prefix: str = "") -> LogTables:
    """Table definitions with names ``{prefix}behavior_log`` etc."""
    md = sa.MetaData()
    behavior = sa.Table(
        f"{prefix}behavior_log",
        md,
        sa.Column("event_id", _ID, primary_key=True),
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("item_id", _ID, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("behavior", BinaryString(8)),
        sa.Column("rating", sa.Double),
        sa.Column("reward", sa.Double),
        sa.Column(
            "ingested_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        mysql_charset="utf8mb4",
    )
    recommendations = sa.Table(
        f"{prefix}recommendation_log",
        md,
        sa.Column("id", _BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("model_version", BinaryString(128), nullable=False),
        sa.Column("items", sa.Text, nullable=False),
        sa.Column("scores", sa.Text, nullable=False),
        sa.Column("realised_reward", sa.Double),
        sa.Column("hits", sa.Integer),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.current_timestamp(),
        ),
        sa.Index(f"{prefix}ix_recommendation_log_user", "user_id", "id"),
        mysql_charset="utf8mb4",
    )
    popular = sa.Table(
        f"{prefix}popular_buckets",
        md,
        sa.Column("bucket", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("item_id", _ID, primary_key=True),
        sa.Column("events", sa.BigInteger, nullable=False),
        mysql_charset="utf8mb4",
    )
    served = sa.Table(
        f"{prefix}served_items",
        md,
        sa.Column("recommendation_id", BinaryString(W["recommendation_id"]), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("item_id", _ID, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("model_version", BinaryString(W["model_version"]), nullable=False),
        # added after the first release: _add_missing_columns adds it to older tables
        sa.Column("arm", BinaryString(W["arm"])),
        sa.Column("policy", BinaryString(W["policy"]), nullable=False),
        sa.Column("temperature", sa.Double),
        sa.Column("epsilon", sa.Double),
        sa.Column("seed", sa.BigInteger),
        sa.Column("source", BinaryString(W["source"]), nullable=False),
        sa.Column("score", sa.Double),
        sa.Column("propensity", sa.Double, nullable=False),
        sa.Column("slate_propensity", sa.Double),
        # added after the first release, as arm: JSON of what the list was drawn from, on
        # the row of position 0 (MEDIUMTEXT on MySQL: a long recent list passes TEXT's 64 KB)
        sa.Column("context", sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")),
        sa.Column("event_id", _ID),
        sa.Column("reward", sa.Double),
        sa.Column("attributed_by", BinaryString(8)),
        sa.Column("settled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Index(f"{prefix}ix_served_items_user", "user_id", "ts"),
        sa.Index(f"{prefix}ix_served_items_open", "settled", "ts"),
        mysql_charset="utf8mb4",
    )
    links = sa.Table(
        f"{prefix}feedback_links",
        md,
        sa.Column("event_id", _ID, primary_key=True),
        sa.Column("recommendation_id", _ID, nullable=False),
        mysql_charset="utf8mb4",
    )
    return LogTables(md, behavior, recommendations, popular, served, links)


@dataclass(frozen=True, kw_only=True, eq=False)
class AppendResult:
    """What one :meth:`BehaviorLog.append` did."""

    new: pl.DataFrame
    """The events that were not in the log before (input order)."""
    duplicates: int
    """Events skipped because their id was already logged."""
    counted: int
    """New events added to the window counts."""
    late: int
    """New events not counted because they were late."""
    rejected: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    """(row of the input frame, the database's reason) of each event the database refused
    for its data; neither logged nor counted, every other event was."""


@dataclass(frozen=True, kw_only=True)
class PopularWindow:
    """The current popular items and where the window ends."""

    end_bucket: int | None
    """Newest bucket with counts (None when there are none)."""
    items: list[tuple[str, float]]
    """(item, events in the window), most first; ties by item id."""


@dataclass(frozen=True, kw_only=True)
class ArmTally:
    """Settled impressions of one A/B arm: their final attribution."""

    impressions: int = 0
    clicks: int = 0
    """Impressions an event with a positive reward was attributed to."""
    reward: float = 0.0
    """Sum of their rewards (0 for the ignored ones)."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: connection loss, timeouts, lock waits, deadlocks."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError)


def create_log_engine(url: str) -> sa.Engine:
    """An engine with the connect timeouts and pragmas the log needs."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = 5
    elif backend == "sqlite":
        connect_args["timeout"] = 30
    try:
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (ImportError, sa.exc.ArgumentError) as exc:
        raise ConfigError(f"database url {url!r}: {exc}") from None
    if backend == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets several worker processes (and readers) share the file.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def _reason(exc: BaseException) -> str:
    """The database's words for a refused statement: the driver's message (and detail), not
    the SQL and parameters SQLAlchemy appends."""
    inner = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    lines = [x.strip() for x in str(inner).strip().splitlines() if x.strip()]
    text = "; ".join(x for x in lines[:3] if not x.startswith(("CONTEXT:", "[SQL:")))
    return f"{type(inner).__name__}: {text[:300]}"


def _records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return frame.to_dicts()


class BehaviorLog:
    """The log in one database; blocking calls (run them in a thread from async code)."""

    def __init__(self, url: str, *, prefix: str = "", engine: sa.Engine | None = None) -> None:
        self.url = url
        self.tables = log_tables(prefix)
        self.engine = engine if engine is not None else create_log_engine(url)
        self._ready = False

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def create_schema(self) -> None:
        """Create missing tables; safe to call from several processes at once."""
        if self._ready:
            return
        try:
            self.tables.metadata.create_all(self.engine, checkfirst=True)
        except (sa.exc.ProgrammingError, sa.exc.IntegrityError):
            # Another worker created a table between our check and our CREATE.
            self.tables.metadata.create_all(self.engine, checkfirst=True)
        self._add_missing_columns()
        if self.backend in ("mysql", "mariadb"):
            self._check_mysql_columns()
        self._ready = True

    ADDED_COLUMNS: tuple[tuple[str, str], ...] = (("served", "arm"), ("served", "context"))
    """(table attribute, column) added to the schema after tables were first created in the
    wild; ``create_all`` leaves an existing table as it is, so these are added by ALTER."""

    def _add_missing_columns(self) -> None:
        """``ALTER TABLE ... ADD COLUMN`` for each of :attr:`ADDED_COLUMNS` an existing table
        lacks (nullable, so old rows read as null).  Safe when several processes race: a
        column another process added first is taken as done."""
        inspector = sa.inspect(self.engine)
        for attr, name in self.ADDED_COLUMNS:
            table: sa.Table = getattr(self.tables, attr)
            have = {c["name"] for c in inspector.get_columns(table.name)}
            if name in have:
                continue
            column = table.c[name]
            prep = self.engine.dialect.identifier_preparer
            ddl = (
                f"ALTER TABLE {prep.format_table(table)} ADD COLUMN "
                f"{prep.format_column(column)} "
                f"{column.type.compile(dialect=self.engine.dialect)}"
            )
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.text(ddl))
            except sa.exc.DBAPIError:
                fresh = sa.inspect(self.engine).get_columns(table.name)
                if name not in {c["name"] for c in fresh}:
                    raise
            logger.info("added column %s to table %s (schema migration)", name, table.name)

    def _check_mysql_columns(self) -> None:
        """Warn when the log's tables predate binary ids and DOUBLE rewards (create_all
        leaves existing tables as they are)."""
        t = self.tables.behavior
        with self.engine.connect() as conn:
            want = binary_collation(conn.dialect)
            rows = conn.execute(
                sa.text(
                    "SELECT column_name, collation_name, data_type FROM information_schema.columns"
                    " WHERE table_schema = DATABASE() AND table_name = :t"
                    " AND column_name IN ('event_id', 'reward')"
                ),
                {"t": t.name},
            ).all()
        found = {str(r[0]).lower(): (r[1], str(r[2]).lower()) for r in rows}
        collation = found.get("event_id", (want, ""))[0]
        reward_type = found.get("reward", (None, "double"))[1]
        if collation != want or reward_type != "double":
            logger.warning(
                "table %s was created by an older recloop: its ids compare without case, "
                "accents or trailing spaces (collation %s) or its rewards are single precision; "
                "ids that differ only so are dropped as duplicates.  Fix it with: ALTER TABLE %s "
                "CONVERT TO CHARACTER SET utf8mb4 COLLATE %s, MODIFY rating DOUBLE, "
                "MODIFY reward DOUBLE",
                t.name,
                collation,
                t.name,
                want,
            )

    def drop_schema(self) -> None:
        self.tables.metadata.drop_all(self.engine, checkfirst=True)
        self._ready = False

    def dispose(self) -> None:
        self.engine.dispose()

    # -- behaviour log ---------------------------------------------------------------

    def append(
        self, events: pl.DataFrame, *, slide_s: int, countable: np.ndarray | None = None
    ) -> AppendResult:
        """Insert the events not logged yet and add them to the window counts, atomically.

        ``events`` has the :data:`recloop.streaming.events.EVENT_SCHEMA` columns;
        ``countable`` (E,) bool marks events that are not late (None: all).  Events the
        database refuses for their data are isolated and returned in ``rejected`` (see the
        module docstring); connection errors propagate.
        """
        self.create_schema()
        if countable is None:
            countable = np.ones(events.height, bool)
        frame = events.with_columns(
            pl.Series("_countable", countable, dtype=pl.Boolean),
            pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"),
        )
        # A producer may send an id twice in one batch; the first one wins, as in the table.
        frame = frame.unique(subset="event_id", keep="first", maintain_order=True)
        rejected: list[tuple[int, str]] = []
        try:
            inserted = self._append_once(frame, slide_s=slide_s)
        except Exception as exc:
            if is_transient(exc) or frame.height == 0:
                raise
            inserted, rejected = self._isolate(frame, exc, slide_s=slide_s)
        new = frame.filter(pl.col("event_id").is_in(inserted))
        counted = int(new["_countable"].sum()) if new.height else 0
        return AppendResult(
            new=new.drop("_countable", "_row"),
            duplicates=events.height - new.height - len(rejected),
            counted=counted,
            late=new.height - counted,
            rejected=sorted(rejected),
        )

    def _append_once(self, frame: pl.DataFrame, *, slide_s: int) -> list[str]:
        """Insert and count ``frame`` (deduplicated, with ``_countable`` and ``_row``) in one
        transaction; the ids inserted."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                return self._append_postgres(conn, frame.drop("_row"), slide_s=slide_s)
            inserted = self._insert_new(conn, frame.drop("_countable", "_row"))
            new = frame.filter(pl.col("event_id").is_in(inserted))
            counts = bucket_counts(new.filter(pl.col("_countable")), slide_s=slide_s)
            if counts.height:
                self._add_counts(conn, counts)
            return inserted

    def _isolate(
        self, frame: pl.DataFrame, error: Exception, *, slide_s: int
    ) -> tuple[list[str], list[tuple[int, str]]]:
        """Log what the database accepts of a batch it refused: bisect, each part in its own
        transaction, down to the single rows it refuses.  Returns (ids inserted, [(row,
        reason)]); a connection error on the way propagates (a retry redoes the batch, and
        the parts already logged count as duplicates then)."""
        logger.warning(
            "behaviour log refused a batch of %d events (%s); isolating the bad ones",
            frame.height,
            _reason(error),
        )
        inserted: list[str] = []
        rejected: list[tuple[int, str]] = []
        failing = [(frame, error)]  # parts known to fail
        while failing:
            part, exc = failing.pop()
            if part.height == 1:
                rejected.append((int(part["_row"][0]), _reason(exc)))
                continue
            half = part.height // 2
            for sub in (part[:half], part[half:]):
                try:
                    inserted += self._append_once(sub, slide_s=slide_s)
                except Exception as sub_exc:
                    if is_transient(sub_exc):
                        raise
                    failing.append((sub, sub_exc))
        return inserted, rejected

    def _append_postgres(
        self, conn: sa.Connection, frame: pl.DataFrame, *, slide_s: int
    ) -> list[str]:
        """Insert and count in one statement: the batch travels as one JSON document, the
        server inserts the new rows, adds them to the buckets and returns their ids as one
        JSON array (no Python work per row or value on either side of the wire)."""
        q = self.engine.dialect.identifier_preparer
        log, buckets = q.format_table(self.tables.behavior), q.format_table(self.tables.popular)
        sql = sa.text(
            f"""
            WITH src AS (
                SELECT * FROM json_to_recordset(CAST(:rows AS json)) AS x(
                    event_id text, user_id text, item_id text, ts bigint, behavior text,
                    rating float8, reward float8, _countable boolean)
            ), ins AS (
                INSERT INTO {log} (event_id, user_id, item_id, ts, behavior, rating, reward)
                SELECT event_id, user_id, item_id, ts, behavior, rating, reward FROM src
                ON CONFLICT (event_id) DO NOTHING
                RETURNING event_id, item_id, ts
            ), counted AS (
                INSERT INTO {buckets} (bucket, item_id, events)
                SELECT ins.ts / :slide, ins.item_id, count(*)
                FROM ins JOIN src USING (event_id)
                WHERE src._countable
                GROUP BY 1, 2
                ORDER BY 1, 2
                ON CONFLICT (bucket, item_id)
                DO UPDATE SET events = {buckets}.events + EXCLUDED.events
            )
            SELECT coalesce(json_agg(event_id), '[]') FROM ins
            """
        )
        out = conn.execute(sql, {"rows": frame.write_json(), "slide": slide_s}).scalar_one()
        return list(orjson.loads(out) if isinstance(out, str | bytes) else out)

    def _insert_new(self, conn: sa.Connection, frame: pl.DataFrame) -> list[str]:
        if frame.height == 0:
            return []
        t = self.tables.behavior
        cols = ["event_id", "user_id", "item_id", "ts", "behavior", "rating", "reward"]
        d = conn.dialect
        rows = _records(frame.select(cols))
        if d.name == "sqlite":
            lite = sqlite.insert(t).on_conflict_do_nothing(index_elements=["event_id"])
            return list(conn.execute(lite.returning(t.c.event_id), rows).scalars())
        if d.name in ("mysql", "mariadb"):
            ins = mysql.insert(t).prefix_with("IGNORE")
            if d.insert_executemany_returning:  # MariaDB >= 10.5
                return list(conn.execute(ins.returning(t.c.event_id), rows).scalars())
            # MySQL has no RETURNING: ids present before the insert are the duplicates.
            # Exact unless two workers log the same event at the same moment.
            ids = frame["event_id"].to_list()
            seen = set(conn.execute(sa.select(t.c.event_id).where(t.c.event_id.in_(ids))).scalars())
            conn.execute(ins, rows)
            return [i for i in ids if i not in seen]
        raise ConfigError(f"database {self.url!r}: unsupported backend {d.name!r}")

    def _add_counts(self, conn: sa.Connection, counts: pl.DataFrame) -> None:
        t = self.tables.popular
        d = conn.dialect
        # Rows sorted by key so concurrent workers lock them in one order (no deadlocks).
        counts = counts.sort("bucket", "item_id")
        rows = _records(counts)
        if d.name == "sqlite":
            lite = sqlite.insert(t)
            conn.execute(
                lite.on_conflict_do_update(
                    index_elements=["bucket", "item_id"],
                    set_={"events": t.c.events + lite.excluded.events},
                ),
                rows,
            )
            return
        my = mysql.insert(t)
        conn.execute(my.on_duplicate_key_update(events=t.c.events + my.inserted.events), rows)

    def count(self) -> int:
        """Rows in the behaviour log."""
        self.create_schema()
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).select_from(self.tables.behavior)
                ).scalar_one()
            )

    def read_events(self) -> pl.DataFrame:
        """The whole behaviour log, ordered by (ts, event_id)."""
        t = self.tables.behavior
        q = sa.select(
            *[
                t.c[c]
                for c in ("event_id", "user_id", "item_id", "ts", "behavior", "rating", "reward")
            ]
        ).order_by(t.c.ts, t.c.event_id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        from recloop.streaming.events import EVENT_SCHEMA

        return pl.DataFrame([tuple(r) for r in rows], schema=EVENT_SCHEMA, orient="row")

    # -- served lists and attribution -------------------------------------------------

    def _insert_ignore(
        self, conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]
    ) -> None:
        """Insert rows whose key is new; existing keys are left as they are (idempotent)."""
        if not rows:
            return
        d = conn.dialect
        if d.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            conn.execute(postgresql.insert(table).on_conflict_do_nothing(), rows)
        elif d.name == "sqlite":
            conn.execute(sqlite.insert(table).on_conflict_do_nothing(), rows)
        else:
            conn.execute(mysql.insert(table).prefix_with("IGNORE"), rows)

    def append_served(self, rows: pl.DataFrame) -> None:
        """Insert served-item rows (:data:`recloop.streaming.served.SERVED_SCHEMA`); a list
        logged before (same recommendation_id and position) is left as it is."""
        self.create_schema()
        if rows.height == 0:
            return
        with self.engine.begin() as conn:
            self._insert_ignore(conn, self.tables.served, _records(rows))

    def append_links(self, links: pl.DataFrame) -> None:
        """Insert (event_id, recommendation_id) rows of events that named their list."""
        self.create_schema()
        if links.height == 0:
            return
        with self.engine.begin() as conn:
            self._insert_ignore(conn, self.tables.links, _records(links))

    def attribute_users(self, users: Sequence[str], *, window_s: int) -> int:
        """Recompute the attribution of the unsettled impressions of ``users`` from the
        events logged so far (:func:`recloop.streaming.served.attribute`); returns how many
        impressions have an event now.  Settled impressions keep theirs: the events they
        hold, and the events naming a list whose impression of their item is settled, are
        left out (settled is final; :mod:`recloop.streaming.served`)."""
        from recloop.streaming.served import attribute

        self.create_schema()
        sv, b, ln = self.tables.served, self.tables.behavior, self.tables.links
        users = list(dict.fromkeys(users))
        attributed = 0
        for i in range(0, len(users), 500):
            part = users[i : i + 500]
            with self.engine.begin() as conn:
                q = sa.select(
                    sv.c.recommendation_id, sv.c.position, sv.c.user_id, sv.c.item_id, sv.c.ts
                ).where(sv.c.user_id.in_(part), sv.c.settled == sa.false())
                imps = pl.DataFrame(
                    [tuple(r) for r in conn.execute(q).all()],
                    schema={
                        "recommendation_id": pl.String,
                        "position": pl.Int32,
                        "user_id": pl.String,
                        "item_id": pl.String,
                        "ts": pl.Int64,
                    },
                    orient="row",
                )
                if imps.height == 0:
                    continue
                lo, hi = int(imps["ts"].min()), int(imps["ts"].max()) + window_s  # type: ignore[arg-type]
                q = (
                    sa.select(
                        b.c.event_id,
                        b.c.user_id,
                        b.c.item_id,
                        b.c.ts,
                        b.c.reward,
                        ln.c.recommendation_id,
                    )
                    .select_from(b.outerjoin(ln, ln.c.event_id == b.c.event_id))
                    .where(b.c.user_id.in_(part))
                    # an event naming its list counts whenever it happened; others in the window
                    .where(sa.or_(ln.c.recommendation_id.is_not(None), b.c.ts.between(lo, hi)))
                )
                events = pl.DataFrame(
                    [tuple(r) for r in conn.execute(q).all()],
                    schema={
                        "event_id": pl.String,
                        "user_id": pl.String,
                        "item_id": pl.String,
                        "ts": pl.Int64,
                        "reward": pl.Float64,
                        "recommendation_id": pl.String,
                    },
                    orient="row",
                )
                events = self._unclaimed(conn, part, events)
                got = attribute(imps, events, window_s=window_s)
                attributed += got.height - got["event_id"].null_count()
                upd = (
                    sa.update(sv)
                    .where(
                        sv.c.recommendation_id == sa.bindparam("rid"),
                        sv.c.position == sa.bindparam("pos"),
                        sv.c.settled == sa.false(),
                    )
                    .values(
                        event_id=sa.bindparam("eid"),
                        reward=sa.bindparam("rw"),
                        attributed_by=sa.bindparam("how"),
                    )
                )
                conn.execute(
                    upd,
                    got.select(
                        pl.col("recommendation_id").alias("rid"),
                        pl.col("position").alias("pos"),
                        pl.col("event_id").alias("eid"),
                        pl.col("reward").alias("rw"),
                        pl.col("attributed_by").alias("how"),
                    ).to_dicts(),
                )
        return attributed

    def _unclaimed(
        self, conn: sa.Connection, users: Sequence[str], events: pl.DataFrame
    ) -> pl.DataFrame:
        """``events`` of ``users`` (event_id, user_id, item_id, recommendation_id, ...)
        without those a settled impression holds and those naming a list whose impression
        of their item is settled.  Two indexed reads (the users' rows, the named lists' keys)
        and anti-joins here: correlated subqueries scanned the settled rows per event on
        SQLite."""
        sv = self.tables.served
        if events.height == 0:
            return events
        ids = events["event_id"].unique().to_list()
        held: list[str] = []
        for i in range(0, len(ids), 1000):
            q = sa.select(sv.c.event_id).where(
                sv.c.user_id.in_(list(users)),
                sv.c.settled == sa.true(),
                sv.c.event_id.in_(ids[i : i + 1000]),
            )
            held += [str(r[0]) for r in conn.execute(q)]
        links = events["recommendation_id"].drop_nulls().unique().to_list()
        named: list[tuple[str, str, str]] = []
        for i in range(0, len(links), 1000):
            q = sa.select(sv.c.recommendation_id, sv.c.user_id, sv.c.item_id).where(
                sv.c.recommendation_id.in_(links[i : i + 1000]), sv.c.settled == sa.true()
            )
            named += [(str(r[0]), str(r[1]), str(r[2])) for r in conn.execute(q)]
        out = events.filter(~pl.col("event_id").is_in(held))
        if named:
            settled = pl.DataFrame(
                named,
                schema={"recommendation_id": pl.String, "user_id": pl.String, "item_id": pl.String},
                orient="row",
            ).unique()
            out = out.join(settled, on=["recommendation_id", "user_id", "item_id"], how="anti")
        return out

    def feedback_after_settlement(self, event_ids: Sequence[str]) -> int:
        """How many of the logged events ``event_ids`` name a list (``feedback_links``)
        whose impression of their user and item is settled, and are the reward of no
        impression at all: feedback that came after its list was settled, which attribution
        leaves out.  (An event that one position of a list holds while another position of
        the same item settled empty is not counted.)"""
        self.create_schema()
        sv, b, ln = self.tables.served, self.tables.behavior, self.tables.links
        out = 0
        ids = list(dict.fromkeys(event_ids))
        for i in range(0, len(ids), 500):
            q = (
                sa.select(b.c.event_id, b.c.user_id)
                .distinct()
                .select_from(
                    b.join(ln, ln.c.event_id == b.c.event_id).join(
                        sv,
                        sa.and_(
                            sv.c.recommendation_id == ln.c.recommendation_id,
                            sv.c.user_id == b.c.user_id,
                            sv.c.item_id == b.c.item_id,
                        ),
                    )
                )
                .where(b.c.event_id.in_(ids[i : i + 500]), sv.c.settled == sa.true())
            )
            with self.engine.connect() as conn:
                named = {str(e): str(u) for e, u in conn.execute(q)}
                if not named:
                    continue
                held = sa.select(sv.c.event_id).where(
                    sv.c.user_id.in_(sorted(set(named.values()))),
                    sv.c.event_id.in_(sorted(named)),
                )
                out += len(named.keys() - {str(r[0]) for r in conn.execute(held)})
        return out

    def settle(self, before_ts: int) -> int:
        """Close the impressions served before ``before_ts``: their attribution is final and
        the ones nobody answered get reward 0.  Returns how many were settled."""
        return sum(t.impressions for t in self.settle_by_arm(before_ts).values())

    def settle_by_arm(self, before_ts: int) -> dict[str | None, ArmTally]:
        """:meth:`settle`, returning what it settled per A/B arm (None: lists served without
        a split): impressions, clicks (an event with a positive reward was attributed) and their
        summed reward.

        Only the rows this call settled are counted, so concurrent workers and repeated
        calls never count an impression twice: ``UPDATE … RETURNING`` where the database
        has it (PostgreSQL, SQLite, MariaDB 10.5+ has it only for DELETE), else the rows are
        locked (``SELECT … FOR UPDATE``) and updated in the same transaction."""
        self.create_schema()
        sv = self.tables.served
        where = (sv.c.settled == sa.false(), sv.c.ts < before_ts)
        final = sa.func.coalesce(sv.c.reward, 0.0)
        upd = sa.update(sv).where(*where).values(settled=True, reward=final)
        with self.engine.begin() as conn:
            if self.engine.dialect.update_returning:
                rows = conn.execute(upd.returning(sv.c.arm, sv.c.event_id, sv.c.reward)).all()
            else:
                q = sa.select(sv.c.arm, sv.c.event_id, final).where(*where).with_for_update()
                rows = conn.execute(q).all()
                conn.execute(upd)
        out: dict[str | None, ArmTally] = {}
        for arm, event_id, reward in rows:
            t = out.get(arm) or ArmTally()
            out[arm] = ArmTally(
                impressions=t.impressions + 1,
                clicks=t.clicks + (event_id is not None and float(reward or 0.0) > 0),
                reward=t.reward + float(reward or 0.0),
            )
        return out

    def read_served(self, *, since: int | None = None) -> pl.DataFrame:
        """Every served item with its attribution, by (ts, recommendation_id, position);
        ``since``: only lists served at that unix time or later."""
        self.create_schema()
        sv = self.tables.served
        q = sa.select(sv).order_by(sv.c.ts, sv.c.recommendation_id, sv.c.position)
        if since is not None:
            q = q.where(sv.c.ts >= since)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        from recloop.streaming.served import SERVED_SCHEMA

        schema: dict[str, pl.DataType] = {
            **SERVED_SCHEMA,
            "event_id": pl.String(),
            "reward": pl.Float64(),
            "attributed_by": pl.String(),
            "settled": pl.Boolean(),
        }
        # every row read for the types: a long run of lists nobody clicked starts the table
        # with nulls in the attribution columns (polars would guess from the first 100)
        frame = pl.DataFrame(
            [tuple(r) for r in rows],
            schema=[c.name for c in sv.columns],
            orient="row",
            infer_schema_length=None,
        )
        return frame.select([pl.col(c).cast(t) for c, t in schema.items()])

    # -- popular items ---------------------------------------------------------------

    def popular(self, *, n_buckets: int, top: int) -> PopularWindow:
        """Top items of the window of ``n_buckets`` buckets ending at the newest bucket."""
        self.create_schema()
        t = self.tables.popular
        with self.engine.connect() as conn:
            end = conn.execute(sa.select(sa.func.max(t.c.bucket))).scalar()
            if end is None:
                return PopularWindow(end_bucket=None, items=[])
            total = sa.func.sum(t.c.events).label("n")
            q = (
                sa.select(t.c.item_id, total)
                .where(t.c.bucket > end - n_buckets, t.c.bucket <= end)
                .group_by(t.c.item_id)
                .order_by(total.desc(), t.c.item_id)
                .limit(top)
            )
            items = [(str(i), float(n)) for i, n in conn.execute(q)]
        return PopularWindow(end_bucket=int(end), items=items)

    def drop_buckets_before(self, bucket: int) -> int:
        """Delete counts of buckets older than ``bucket`` (no window can reach them)."""
        t = self.tables.popular
        with self.engine.begin() as conn:
            return int(conn.execute(sa.delete(t).where(t.c.bucket < bucket)).rowcount or 0)

    def bucket_table(self) -> pl.DataFrame:
        """All window counts (bucket, item_id, events); for tests and inspection."""
        t = self.tables.popular
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.bucket, t.c.item_id, t.c.events)).all()
        return pl.DataFrame(
            [tuple(r) for r in rows],
            schema={"bucket": pl.Int64, "item_id": pl.String, "events": pl.Int64},
            orient="row",
        )

    # -- recommendation history ------------------------------------------------------

    def as_logged(self, events: pl.DataFrame) -> pl.DataFrame:
        """The rows of ``events`` the log holds exactly so (same id, user, item and time):
        a redelivered event passes, another event reusing a logged id does not."""
        self.create_schema()
        key = ["event_id", "user_id", "item_id", "ts"]
        if events.height == 0:
            return events
        t = self.tables.behavior
        ids = events["event_id"].unique().to_list()
        rows: list[tuple[Any, ...]] = []
        with self.engine.connect() as conn:
            for i in range(0, len(ids), 1000):
                q = sa.select(*[t.c[c] for c in key]).where(t.c.event_id.in_(ids[i : i + 1000]))
                rows += [tuple(r) for r in conn.execute(q).all()]
        logged = pl.DataFrame(rows, schema={k: events.schema[k] for k in key}, orient="row")
        return events.join(logged, on=key, how="semi", maintain_order="left")

    def previous_lists(self, users: Sequence[str]) -> pl.DataFrame:
        """Each user's latest logged list as (user_id, item_id) rows (users without one are
        absent)."""
        self.create_schema()
        r = self.tables.recommendations
        if not users:
            return pl.DataFrame(schema={"user_id": pl.String, "item_id": pl.String})
        latest = (
            sa.select(r.c.user_id, sa.func.max(r.c.id).label("id"))
            .where(r.c.user_id.in_(list(users)))
            .group_by(r.c.user_id)
            .subquery()
        )
        q = sa.select(r.c.user_id, r.c["items"]).join(latest, r.c.id == latest.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        frame = pl.DataFrame(
            [tuple(x) for x in rows],
            schema={"user_id": pl.String, "items": pl.String},
            orient="row",
        )
        return (
            frame.select(
                "user_id", pl.col("items").str.json_decode(pl.List(pl.String)).alias("item_id")
            )
            .explode("item_id")
            .drop_nulls("item_id")
        )

    def append_recommendations(self, rows: pl.DataFrame) -> None:
        """Insert list rows: user_id, ts, model_version, items, scores (JSON), realised_reward,
        hits."""
        self.create_schema()
        if rows.height == 0:
            return
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.tables.recommendations), _records(rows))

    def read_recommendations(self) -> pl.DataFrame:
        """The recommendation history in insertion order (tests, analysis)."""
        r = self.tables.recommendations
        cols = (
            "id",
            "user_id",
            "ts",
            "model_version",
            "items",
            "scores",
            "realised_reward",
            "hits",
        )
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*[r.c[c] for c in cols]).order_by(r.c.id)).all()
        return pl.DataFrame(
            [tuple(x) for x in rows],
            schema={
                "id": pl.Int64,
                "user_id": pl.String,
                "ts": pl.Int64,
                "model_version": pl.String,
                "items": pl.String,
                "scores": pl.String,
                "realised_reward": pl.Float64,
                "hits": pl.Int64,
            },
            orient="row",
        )
