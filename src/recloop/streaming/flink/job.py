"""recloop's online half as one Apache Flink job (PyFlink): Kafka events → behaviour log,
real-time popular items, recent items, the recommendation refresh and dead letters.

This file is self-contained on purpose: it imports only the standard library, PyFlink and
``redis`` (which PyFlink's own dependencies bring), never ``recloop`` (its one Java function
comes in ``recloop-flink-udf.jar``, with the connector jars) — except the refresh
step, which imports :mod:`recloop.streaming.flink.refresh` in the Python workers (shipped to
them as ``python.files``) when the config has a ``refresh`` block.  So it runs in an
interpreter that has ``apache-flink`` but not recloop's pinned stack (numpy, pyarrow and
pandas versions differ), and the same file is submitted unchanged to a real cluster with
``flink run -py job.py --config job.json``.  :mod:`recloop.streaming.flink.runner` writes the
config and launches it on a local mini-cluster.

The pipeline (Table API / SQL wherever the work is relational, so it runs in Flink's JVM
operators; Python only in the small operator that writes the online store):

``events``
    Kafka source, read once as bytes, with an event-time attribute ``ts_ltz`` (seconds) and
    a bounded-out-of-orderness watermark of ``lateness_s``; one parse per record
    (``recloop_parse_event``, recloop's Java function with the rules of
    :mod:`recloop.streaming.events`) gives the event or the reason it is not one, and one
    ``DataStream`` of the parsed records feeds every branch below.
dead letters
    The records with a reason go to the dead-letter topic in the Kafka bus's convention
    (value the bytes, reason/source id/stream/consumer headers); the others are the events.
``behavior_log``
    JDBC upsert (primary key ``event_id``) into the table ``recloop prepare --from-db`` reads;
    a record replayed after a restart writes the same row again, so the log holds every event
    exactly once.
popular items
    Per-slide item counts (a ``TUMBLE`` of ``slide_s``, aligned to the epoch exactly as the
    Redis runner's buckets) → for each slide that holds an event, the Top-N of the window
    it ends (``recloop_top_counts``, recloop's Java aggregate, ``OVER`` the slides of the
    last ``window_s``: each slide's counts added as it arrives, taken back as it leaves)
    → one row per such window, so that after a drain (or a quiet spell) the published list
    is the window ending with the newest event's slide, as the Redis runner publishes it.
    All of that runs in the JVM; the Python publisher writes the newest list to
    ``<prefix>popular`` (the Redis store's format) with one ``SET`` per ``flush_ms``.
recent items (and the refresh)
    Each user's last ``recent_len`` events in a per-user aggregate (recloop's Java function; JVM
    state with a TTL; mini-batches emit one row per changed user per batch); the Python step
    pushes the lists to the store in batches and, with ``refresh``, refreshes the
    recommendations of the users whose lists gained events.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger("recloop.flink.job")

RECENT_STEP = "recent items"
"""Name of the recent-items (and refresh) operator."""
ROWS_DONE = "recloop_rows_done"
"""Its counter of rows fully handled (pushed, refreshed): a bounded run stops only once
this has caught up with the rows it read — the first refresh loads torch and the artifact
in the Python worker, seconds in which no record count moves."""


# ----------------------------------------------------------------------------- SQL


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def interval(seconds: int) -> str:
    """A DAY TO SECOND literal (a plain ``INTERVAL 'n' SECOND`` takes two digits only)."""
    seconds = int(seconds)
    if not 0 <= seconds < 100 * 86400:
        raise ValueError(f"interval of {seconds} s: expected 0 <= seconds < 100 days")
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"INTERVAL '{days} {clock}' DAY TO SECOND"


def _with(options: dict[str, Any]) -> str:
    return ",\n  ".join(f"{_quote(k)} = {_quote(v)}" for k, v in options.items())


def _kafka_source_options(cfg: dict[str, Any], **fmt: str) -> dict[str, str]:
    options = {
        "connector": "kafka",
        "topic": cfg["topic"],
        "properties.bootstrap.servers": cfg["bootstrap_servers"],
        "properties.group.id": cfg["group"],
        "scan.startup.mode": cfg.get("startup_mode", "earliest-offset"),
        **fmt,
    }
    if cfg.get("partition_discovery_ms") is not None:
        options["scan.topic-partition-discovery.interval"] = f"{cfg['partition_discovery_ms']} ms"
    for key, value in (cfg.get("kafka_properties") or {}).items():
        options[f"properties.{key}"] = value
    return options


EVENT_FUNCTIONS = [
    f"""
CREATE TEMPORARY SYSTEM FUNCTION IF NOT EXISTS {name}
AS 'recloop.flink.udf.{cls}' LANGUAGE JAVA"""
    for name, cls in (("recloop_event_time", "EventTime"), ("recloop_parse_event", "ParseEvent"))
]
"""recloop's event rules on a record's bytes (``java/flink-udf``, ``recloop-flink-udf.jar``):
its event time, and its fields with the reason it is not a valid event."""


def source_ddl(cfg: dict[str, Any]) -> str:
    """The Kafka topic as bytes (``raw`` format) with each record's partition and offset, the
    event time of a valid event (``recloop_event_time``; 0 for a record that is not one, so
    it never moves the watermark) and a bounded-out-of-orderness watermark.  Read once: every
    branch takes its rows from :data:`PARSED_QUERY` through :func:`share_events`."""
    options = _kafka_source_options(cfg, format="raw")
    return f"""
CREATE TEMPORARY TABLE events (
  payload BYTES,
  kafka_partition INT METADATA FROM 'partition' VIRTUAL,
  kafka_offset BIGINT METADATA FROM 'offset' VIRTUAL,
  ts_ltz AS TO_TIMESTAMP_LTZ(COALESCE(recloop_event_time(payload), 0), 0),
  WATERMARK FOR ts_ltz AS ts_ltz - {interval(cfg["lateness_s"])}
) WITH (
  {_with(options)}
)"""


PARSED_QUERY = """
SELECT payload, kafka_partition, kafka_offset, recloop_parse_event(payload) AS ev, ts_ltz
FROM events"""
"""Every record with its event fields and, when it is not a valid event, the reason
(``recloop_parse_event``: one JSON parse, the rules of ``recloop.streaming.events``): a
record is either an event (the log, popular and recent items) or a dead letter, never both
and never neither."""

VALID_VIEW = """
CREATE TEMPORARY VIEW valid_events AS
SELECT ev.event_id AS event_id, ev.user_id AS user_id, ev.item_id AS item_id, ev.ts AS ts,
  ev.behavior AS behavior, ev.rating AS rating, ev.reward AS reward, rowtime AS ts_ltz
FROM parsed_events WHERE ev.reason IS NULL"""
"""The events the log, popular items and recent items take."""

CHECKED_VIEW = """
CREATE TEMPORARY VIEW checked_events AS
SELECT payload, kafka_partition, kafka_offset, ev.reason AS reason FROM parsed_events"""
"""Every record with why it is not a valid event (NULL: it is one), for the dead letters."""


def dead_letter_ddl(cfg: dict[str, Any]) -> str:
    """The dead-letter topic as a Kafka sink, in the Kafka bus's convention: key the source
    record's id (``partition-offset``), value its bytes, the reason, source id, topic and
    consumer as headers.  At-least-once: a record read again after a restore from a
    checkpoint may be dead-lettered twice."""
    options = {
        "connector": "kafka",
        "topic": cfg["dead_letter_topic"],
        "properties.bootstrap.servers": cfg["bootstrap_servers"],
        "key.format": "raw",
        "key.fields": "k",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        "sink.delivery-guarantee": "at-least-once",
    }
    for key, value in (cfg.get("kafka_properties") or {}).items():
        options[f"properties.{key}"] = value
    return f"""
CREATE TEMPORARY TABLE dead_letters (
  k BYTES,
  v BYTES,
  headers MAP<STRING, BYTES> METADATA
) WITH (
  {_with(options)}
)"""


def dead_letter_insert(cfg: dict[str, Any]) -> str:
    source_id = "CONCAT(CAST(kafka_partition AS STRING), '-', CAST(kafka_offset AS STRING))"
    consumer = f"flink:{cfg['group']}"
    return f"""
INSERT INTO dead_letters
SELECT CAST({source_id} AS BYTES), COALESCE(payload, X''), MAP[
  'reason', CAST(reason AS BYTES),
  'source_id', CAST({source_id} AS BYTES),
  'stream', CAST({_quote(cfg["topic"])} AS BYTES),
  'consumer', CAST({_quote(consumer)} AS BYTES)]
FROM checked_events WHERE reason IS NOT NULL"""


def log_sink_ddl(cfg: dict[str, Any]) -> str:
    """The behaviour log as a JDBC upsert sink (primary key event_id)."""
    options = {
        "connector": "jdbc",
        "url": cfg["jdbc_url"],
        "table-name": cfg["log_table"],
        "sink.buffer-flush.max-rows": str(cfg.get("jdbc_batch_rows", 5000)),
        "sink.buffer-flush.interval": f"{cfg.get('jdbc_flush_ms', 1000)} ms",
        "sink.max-retries": "5",
    }
    # The connector wants a user and a password together or neither; a user without a
    # password (trust or peer authentication) travels in the URL instead.
    if cfg.get("jdbc_user") and cfg.get("jdbc_password"):
        options["username"] = cfg["jdbc_user"]
        options["password"] = cfg["jdbc_password"]
    elif cfg.get("jdbc_user"):
        sep = "&" if "?" in options["url"] else "?"
        options["url"] += f"{sep}user={cfg['jdbc_user']}"
    return f"""
CREATE TEMPORARY TABLE behavior_log (
  event_id STRING,
  user_id STRING,
  item_id STRING,
  ts BIGINT,
  behavior STRING,
  rating DOUBLE,
  reward DOUBLE,
  PRIMARY KEY (event_id) NOT ENFORCED
) WITH (
  {_with(options)}
)"""


LOG_INSERT = """
INSERT INTO behavior_log
SELECT event_id, user_id, item_id, ts, behavior, rating, reward FROM valid_events"""


TOP_COUNTS_FUNCTION = """
CREATE TEMPORARY SYSTEM FUNCTION IF NOT EXISTS recloop_top_counts
AS 'recloop.flink.udf.TopCounts' LANGUAGE JAVA"""
"""recloop's sliding-window Top-N (``java/flink-udf``, the jar ``recloop-flink-udf.jar``)."""


def popular_views(cfg: dict[str, Any]) -> list[str]:
    """The views :func:`popular_query` reads (an ``OVER`` and a windowing TVF take a table):

    ``slide_events``
        The events of each slide (a ``TUMBLE`` of one slide, aligned to the epoch exactly
        as the Redis runner's buckets), one row per event id: a record the producer sent
        twice counts once, as in the Redis runner (which counts the events its log
        inserted; a copy sent again carries the same time, so it falls in the same slide).
    ``popular_slides``
        One row per slide that holds an event, with its item counts (``COLLECT(item_id)``,
        a multiset: item → count) and its newest event time."""
    slide = interval(cfg["slide_s"])
    return [
        f"""
CREATE TEMPORARY VIEW slide_events AS
SELECT window_time AS event_slide, event_id, MIN(item_id) AS item_id, MAX(ts) AS ts
FROM TABLE(TUMBLE(TABLE valid_events, DESCRIPTOR(ts_ltz), {slide}))
GROUP BY window_start, window_end, window_time, event_id""",
        f"""
CREATE TEMPORARY VIEW popular_slides AS
SELECT window_time AS slide_time, COLLECT(item_id) AS counts, MAX(ts) AS last_ts
FROM TABLE(TUMBLE(TABLE slide_events, DESCRIPTOR(event_slide), {slide}))
GROUP BY window_start, window_end, window_time""",
    ]


def popular_query(cfg: dict[str, Any]) -> str:
    """One row per sliding window whose last slide holds an event: its Top-N as the store's
    JSON ``[[item_id, count], ...]`` and its newest event time (seconds) — the Redis runner's
    scheme (per-slide buckets, a window the sum of its slides) in the JVM.

    ``recloop_top_counts`` (:data:`TOP_COUNTS_FUNCTION`) runs ``OVER`` the slides of the
    last ``window_s`` (a range of ``window_s - slide_s`` before the slide's ``window_time``,
    its end - 1 ms: exactly the window's ``window_s / slide_s`` slides): each slide's counts
    are added as it arrives and taken back as it leaves, and each slide's Top-N is one pass
    over the window's distinct items in one operator, where a ``HOP`` and a window Top-N
    send a row per (window, item) through the network and rank every window that holds an
    event (each event is in ``window_s / slide_s`` of them).  Windows whose last slide holds
    no event (a quiet spell, the end of a drain) are never computed: the Redis runner
    publishes only the window ending with the newest event's slide too."""
    reach = interval(int(cfg["window_s"]) - int(cfg["slide_s"]))
    return f"""
SELECT
  recloop_top_counts(counts, {int(cfg["top"])}) OVER (
    ORDER BY slide_time RANGE BETWEEN {reach} PRECEDING AND CURRENT ROW) AS items,
  last_ts
FROM popular_slides"""


# ----------------------------------------------------------------------------- publisher


def popular_list(items: str, top: int) -> str:
    """The store's popular list (JSON ``[[item, count], ...]``, count desc, item id asc, the
    first ``top``) from :func:`popular_query`'s ``items`` (ranked so already by the Java
    function; checked here again, as the store's format depends on it)."""
    ranked = sorted(((str(i), int(n)) for i, n in json.loads(items)), key=lambda x: (-x[1], x[0]))
    return json.dumps([[i, float(n)] for i, n in ranked[:top]], separators=(",", ":"))


def window_end_ms(last_ts: int, slide_s: int) -> int:
    """End (epoch ms) of the sliding window whose last slide holds an event at ``last_ts``
    (seconds): windows are aligned to the epoch, as the Redis runner's buckets."""
    return (int(last_ts) // slide_s + 1) * slide_s * 1000


def flush_or_arm(step: Any, ctx: Any, *, due: bool, first: bool) -> None:
    """A batching step's flush rule (the popular publisher's, the recent items'): flush now
    when ``due``; else, for the first row of a batch, arm a processing-time timer
    ``step.flush_ms`` ahead that flushes the tail of a burst if no later row does.  One
    timer per batch, not per row: each timer is a round trip to the JVM."""
    if due:
        step.flush()
    elif first:
        service = ctx.timer_service()
        service.register_processing_time_timer(service.current_processing_time() + step.flush_ms)


def _publisher_class() -> Any:
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction, RuntimeContext
    from pyflink.datastream.state import ValueStateDescriptor

    class PopularPublisher(KeyedProcessFunction):
        """Writes the windows' lists (:func:`popular_query`: one row per window, only the
        windows whose last slide holds an event) to the online store with one ``SET``,
        never a window older than the one already published (kept in keyed state).

        Rows arrive in window order; in a burst (a backlog, a replay) only the newest
        window of each ``flush_ms`` is written — the store holds one list, and every
        older one would be overwritten within that time anyway.  A processing-time timer
        writes the tail of a burst; closing (a drain) writes what is pending.  The waiting
        list is kept in keyed state as well, so a checkpoint taken while it waits (after
        the window's row has left the SQL operators' state) does not lose it."""

        def __init__(
            self, *, redis_url: str, key: str, slide_s: int, top: int, flush_ms: int
        ) -> None:
            self.redis_url = redis_url
            self.key = key
            self.slide_s = slide_s
            self.top = top
            self.flush_ms = flush_ms

        def open(self, runtime_context: RuntimeContext) -> None:
            import redis

            self.client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            self.published = runtime_context.get_state(
                ValueStateDescriptor("published_end", Types.LONG())
            )
            # The list waiting for its SET, in state too: a checkpoint taken while it waits
            # holds it (the window's row will not come again after a restore), and the
            # restored timer writes it.
            self.waiting = runtime_context.get_state(
                ValueStateDescriptor("pending", Types.TUPLE([Types.LONG(), Types.STRING()]))
            )
            self.pending: tuple[int, str] | None = None
            self.flushed_at = time.monotonic()

        def process_element(self, value: Any, ctx: Any) -> Any:
            end_ms = window_end_ms(value[1], self.slide_s)
            newest = self.published.value() if self.pending is None else self.pending[0]
            if newest is not None and end_ms <= newest:
                return iter(())
            first = self.pending is None
            self.pending = (end_ms, value[0])
            self.waiting.update(self.pending)
            due = (time.monotonic() - self.flushed_at) * 1000 >= self.flush_ms
            flush_or_arm(self, ctx, due=due, first=first)
            return iter(())

        def on_timer(self, timestamp: int, ctx: Any) -> Any:
            if self.pending is None:  # restored: the list waiting at the checkpoint
                waiting = self.waiting.value()
                self.pending = None if waiting is None else (int(waiting[0]), str(waiting[1]))
            self.flush()
            return iter(())

        def flush(self, *, keyed: bool = True) -> None:
            self.flushed_at = time.monotonic()
            if self.pending is None:
                return
            end_ms, items = self.pending
            self.client.set(self.key, popular_list(items, self.top))
            if keyed:  # keyed state only where a key is current (not in close)
                self.published.update(end_ms)
                self.waiting.clear()
            self.pending = None

        def close(self) -> None:
            client = getattr(self, "client", None)
            if client is not None:
                self.flush(keyed=False)
                client.close()

    return PopularPublisher


# ----------------------------------------------------------------------------- recent items

RECENT_PUSH_SCRIPT = """
local n = tonumber(ARGV[1])
local added = {}
for _, e in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('HSETNX', KEYS[2], e[2], e[3]) == 1 then
    redis.call('ZADD', KEYS[1], e[1], e[2])
    added[#added + 1] = e[2]
  end
end
local extra = redis.call('ZCARD', KEYS[1]) - n
if extra > 0 then
  local gone = redis.call('ZRANGE', KEYS[1], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  for j = 1, #gone, 1000 do
    redis.call('HDEL', KEYS[2], unpack(gone, j, math.min(j + 999, #gone)))
  end
end
return added
"""
"""``recloop.stores.redis.RECENT_PUSH_SCRIPT``, verbatim (a test keeps them equal): the
Redis store's idempotent, capped push of a user's recent events."""


RECENT_EVENTS_FUNCTION = """
CREATE TEMPORARY SYSTEM FUNCTION IF NOT EXISTS recloop_recent_events
AS 'recloop.flink.udf.RecentEvents' LANGUAGE JAVA"""
"""recloop's per-user recent events (``java/flink-udf``, in ``recloop-flink-udf.jar``)."""


def recent_query(cfg: dict[str, Any]) -> str:
    """Each user's last ``recent_len`` events (by ts, then event id, as the stores order
    them) as one JSON array of ``[ts, event_id, item_id, reward]``, updated as they change.

    ``recloop_recent_events`` (:data:`RECENT_EVENTS_FUNCTION`) keeps the list in the
    aggregate's JVM state, one insertion per event (a SQL Top-N per user and a ``LISTAGG``
    of it would retract a row and rebuild the list for every event past the last
    ``recent_len``); the state expires ``recent_ttl_s`` after a user's last change
    (``table.exec.state.ttl``).  With mini-batches on, the aggregate emits one row per
    changed user per mini-batch, so the Python step sees a user's list once per batch
    instead of once per event.  The default reward of an interaction is one (as the Redis
    runner)."""
    return f"""
SELECT user_id,
  recloop_recent_events(ts, event_id, item_id, COALESCE(reward, 1.0),
    {int(cfg["recent_len"])}) AS events
FROM valid_events
GROUP BY user_id"""


def kept_events(blob: str, max_len: int) -> list[list[Any]]:
    """A user's events from :func:`recent_query`'s JSON: one entry per event id (the first),
    ordered by (ts, event id), the last ``max_len`` (the list is kept so already; checked
    here again because the store's push relies on it)."""
    seen: set[str] = set()
    kept = []
    for ts, event_id, item, reward in json.loads(blob):
        if event_id not in seen:
            seen.add(event_id)
            kept.append([int(ts), event_id, item, float(reward)])
    kept.sort(key=lambda e: (e[0], e[1]))
    return kept[-max_len:]


def push_lists(
    client: Any, sha: str, prefix: str, max_len: int, lists: dict[str, str]
) -> list[tuple[str, str, float, int, str]]:
    """Push users' lists (user → :func:`recent_query`'s JSON) to the store's recent lists in
    one pipeline, with the store's idempotent script (loaded as ``sha``).  Returns the events
    the pushes added, (user, item, reward, ts, event id): the new events of a refresh — an
    event already pushed (a replay, an unchanged list) is not among them."""
    pipe = client.pipeline(transaction=False)
    kept_of: dict[str, list[list[Any]]] = {}
    for user, blob in lists.items():
        kept = kept_of[user] = kept_events(blob, max_len)
        entries = [
            [ts, event_id, f"{float(reward)!r} {item}"] for ts, event_id, item, reward in kept
        ]
        keys = [f"{prefix}recent_ts:{{{user}}}", f"{prefix}recent_ev:{{{user}}}"]
        pipe.evalsha(sha, 2, *keys, max_len, json.dumps(entries, ensure_ascii=False))
    new = []
    for (user, kept), ids in zip(kept_of.items(), pipe.execute(), strict=True):
        added = {i.decode() if isinstance(i, bytes) else i for i in ids}
        new += [(user, e[2], e[3], e[0], e[1]) for e in kept if e[1] in added]
    return new


def _recent_class() -> Any:
    from pyflink.common import RowKind
    from pyflink.datastream import KeyedProcessFunction, RuntimeContext

    class RecentItems(KeyedProcessFunction):
        """Pushes the users' lists (from :func:`recent_query`) to the Redis store in
        pipelined batches (``batch_users`` users, or ``flush_ms`` after the first of a
        batch) with the store's own idempotent script; with ``refresh`` settings, then
        refreshes the recommendations of the users whose push added events
        (:mod:`recloop.streaming.flink.refresh`, one scorer call per batch).

        A user's whole kept list is pushed each time, so a push lost in a crash (batches
        live in memory until flushed) is repaired by that user's next change."""

        def __init__(
            self,
            *,
            redis_url: str,
            prefix: str,
            max_len: int,
            flush_ms: int,
            batch_users: int,
            refresh: dict[str, Any] | None,
        ) -> None:
            self.redis_url = redis_url
            self.prefix = prefix
            self.max_len = max_len
            self.flush_ms = flush_ms
            self.batch_users = batch_users
            self.refresh_settings = refresh

        def open(self, runtime_context: RuntimeContext) -> None:
            import redis

            self.client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            self.sha = self.client.script_load(RECENT_PUSH_SCRIPT)
            self.pending: dict[str, str] = {}
            self.rows_pending = 0
            self.rows_done = runtime_context.get_metrics_group().counter(ROWS_DONE)
            self.flushed_at = time.monotonic()
            self.refresher = None
            if self.refresh_settings:
                # Imported here: only a job that refreshes needs recloop (shipped to the
                # workers as python.files) and torch in its environment.
                from recloop.streaming.flink.refresh import FlinkRefresh

                self.refresher = FlinkRefresh(**self.refresh_settings)

        def process_element(self, value: Any, ctx: Any) -> Any:
            self.rows_pending += 1
            if value.get_row_kind() in (RowKind.UPDATE_BEFORE, RowKind.DELETE):
                if not self.pending:  # nothing to flush: done with it now
                    self.rows_done.inc(self.rows_pending)
                    self.rows_pending = 0
                return iter(())  # the list a newer row replaces
            first = not self.pending
            self.pending[value[0]] = value[1]
            due = (
                len(self.pending) >= self.batch_users
                or (time.monotonic() - self.flushed_at) * 1000 >= self.flush_ms
            )
            flush_or_arm(self, ctx, due=due, first=first)
            return iter(())

        def on_timer(self, timestamp: int, ctx: Any) -> Any:
            self.flush()
            return iter(())

        def flush(self) -> None:
            self.flushed_at = time.monotonic()
            if not self.pending:
                return
            new = push_lists(self.client, self.sha, self.prefix, self.max_len, self.pending)
            self.pending = {}
            if self.refresher is not None:
                self.refresher.refresh(new)
            self.rows_done.inc(self.rows_pending)
            self.rows_pending = 0

        def close(self) -> None:
            client = getattr(self, "client", None)
            if client is not None:
                self.flush()
                client.close()
            refresher = getattr(self, "refresher", None)
            if refresher is not None:
                refresher.close()

    return RecentItems


# ----------------------------------------------------------------------------- job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _uri(path: str) -> str:
    """A local path as a file:// URI; URIs (s3://, hdfs://, file://) as they are."""
    return path if "://" in path else Path(path).resolve().as_uri()


def flink_configuration(cfg: dict[str, Any]) -> dict[str, str]:
    """Flink options of the job: checkpointing, parallelism, jars, Python and restore."""
    conf = {
        "parallelism.default": str(cfg.get("parallelism", 1)),
        "pipeline.name": cfg.get("job_name", "recloop-online"),
    }
    # Windows over TIMESTAMP_LTZ are cut in the session time zone: UTC keeps them aligned
    # to the epoch as the Redis runner's buckets, whatever the machine's zone (+05:30 would
    # shift every 80 s slide).
    conf["table.local-time-zone"] = "UTC"
    # Chained operators hand a record on without a deep copy (it was a quarter of the source
    # task's time: every string of every row copied once per chained operator).  Safe for
    # this graph: the chained operators that get a reused record (the conversions, the
    # Calcs, the Kafka sink, the Python steps) serialise or convert it at once, the JDBC
    # sink copies what it buffers when reuse is on, and every operator that keeps rows in
    # state (the windows, the OVER, the aggregates) starts its own task behind an exchange,
    # which hands it fresh objects.  A new stateful operator chained to the source would
    # need checking.
    conf["pipeline.object-reuse"] = "true"
    if int(cfg.get("parallelism", 1)) == 1:
        # One task per operator: a local pre-aggregation before each keyed aggregation only
        # adds an operator (there is no shuffle to save).
        conf["table.optimizer.agg-phase-strategy"] = "ONE_PHASE"
    if cfg.get("python_executable"):
        # Local runs: the workers use the job's own interpreter.  On a cluster leave it out
        # and pass -pyexec to `flink run`.
        conf["python.executable"] = cfg["python_executable"]
        conf["python.client.executable"] = cfg["python_executable"]
    if cfg.get("source_idle_timeout_ms"):
        # Off by default: Flink 2.0 drops the end-of-time watermark of a drain once the
        # source has gone idle, so a drained stop would fire no window.
        conf["table.exec.source.idle-timeout"] = f"{cfg['source_idle_timeout_ms']} ms"
    if cfg.get("exit_when_idle_s"):
        # The idle check reads record counts from the REST API: refresh them often.
        conf["metrics.fetcher.update-interval"] = "500 ms"
    if cfg.get("recent_len") and cfg.get("redis_url"):
        # The recent lists' aggregate is the job's only unbounded SQL state: it
        # expires this long after a user's last change.  Mini-batches make the aggregate emit
        # one list per changed user per batch (the windows and the log are not affected).
        conf["table.exec.state.ttl"] = f"{int(cfg.get('recent_ttl_s', 30 * 86400))} s"
        conf["table.exec.mini-batch.enabled"] = "true"
        conf["table.exec.mini-batch.allow-latency"] = f"{int(cfg.get('recent_flush_ms', 200))} ms"
        conf["table.exec.mini-batch.size"] = str(int(cfg.get("recent_batch_rows", 5000)))
    if cfg.get("jars"):
        conf["pipeline.jars"] = ";".join(_uri(j) for j in cfg["jars"])
    if cfg.get("checkpoint_dir"):
        ck = _uri(cfg["checkpoint_dir"]).rstrip("/")
        conf.update(
            {
                "execution.checkpointing.interval": f"{cfg.get('checkpoint_interval_ms', 5000)} ms",
                "execution.checkpointing.mode": "EXACTLY_ONCE",
                "execution.checkpointing.dir": ck,
                "execution.checkpointing.savepoint-dir": f"{ck}/savepoints",
                "execution.checkpointing.externalized-checkpoint-retention": (
                    "RETAIN_ON_CANCELLATION"
                ),
                "execution.checkpointing.num-retained": "2",
            }
        )
    if cfg.get("restore_from"):
        conf["execution.state-recovery.path"] = _uri(cfg["restore_from"])
    if cfg.get("rest_port"):
        conf["rest.port"] = str(cfg["rest_port"])
        conf["rest.address"] = "127.0.0.1"
        conf["rest.bind-address"] = "127.0.0.1"
    conf.update({str(k): str(v) for k, v in (cfg.get("flink_conf") or {}).items()})
    return conf


def share_events(t_env: Any) -> None:
    """``parsed_events``: :data:`PARSED_QUERY` read once for every branch, and the views on
    it (:data:`VALID_VIEW`, :data:`CHECKED_VIEW`).

    Each branch below is planned on its own (the log's and the dead letters' ``INSERT`` in a
    statement set, the popular and recent queries as streams for Python), so a plain view
    would give each its own Kafka source and parse of every record.  Through one
    ``DataStream`` they share one; its watermark goes along (``SOURCE_WATERMARK()``), the
    event time as ``rowtime``."""
    from pyflink.table import Schema

    # Planned without mini-batches: a mini-batch assigner here would replace the source's
    # watermark by its own processing-time markers, and no event-time window would fire.
    config = t_env.get_config()
    mini_batch = config.get("table.exec.mini-batch.enabled", "false")
    config.set("table.exec.mini-batch.enabled", "false")
    shared = t_env.to_data_stream(t_env.sql_query(PARSED_QUERY))
    config.set("table.exec.mini-batch.enabled", mini_batch)
    schema = (
        Schema.new_builder()
        .column_by_metadata("rowtime", "TIMESTAMP_LTZ(3)")
        .watermark("rowtime", "SOURCE_WATERMARK()")
        .build()
    )
    t_env.create_temporary_view("parsed_events", t_env.from_data_stream(shared, schema))
    t_env.execute_sql(VALID_VIEW)
    t_env.execute_sql(CHECKED_VIEW)


def build(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The execution environment with both pipelines attached (not yet executed)."""
    from pyflink.common import Configuration, Types
    from pyflink.datastream import StreamExecutionEnvironment
    from pyflink.table import StreamTableEnvironment

    conf = Configuration()
    for key, value in flink_configuration(cfg).items():
        conf.set_string(key, value)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    t_env = StreamTableEnvironment.create(env)
    for function in EVENT_FUNCTIONS:
        t_env.execute_sql(function)
    t_env.execute_sql(source_ddl(cfg))
    share_events(t_env)
    statements = t_env.create_statement_set()
    if cfg.get("dead_letter_topic"):
        t_env.execute_sql(dead_letter_ddl(cfg))
        statements.add_insert_sql(dead_letter_insert(cfg))
    if cfg.get("jdbc_url"):
        t_env.execute_sql(log_sink_ddl(cfg))
        statements.add_insert_sql(LOG_INSERT)
    if cfg.get("jdbc_url") or cfg.get("dead_letter_topic"):
        statements.attach_as_datastream()
    if cfg.get("redis_url"):
        t_env.execute_sql(TOP_COUNTS_FUNCTION)
        for view in popular_views(cfg):
            t_env.execute_sql(view)
        rows = t_env.to_data_stream(t_env.sql_query(popular_query(cfg)))
        publisher = _publisher_class()(
            redis_url=cfg["redis_url"],
            key=f"{cfg.get('store_prefix', 'recloop:')}popular",
            slide_s=int(cfg["slide_s"]),
            top=int(cfg["top"]),
            flush_ms=int(cfg.get("popular_flush_ms", 200)),
        )
        # One key: the published list is global, and each window's rows must meet in one
        # task.  The publisher emits nothing; the print sink only makes the branch a job.
        rows.key_by(lambda _row: 0, key_type=Types.INT()).process(
            publisher, output_type=Types.STRING()
        ).name("publish popular items").print()
    if cfg.get("redis_url") and cfg.get("recent_len"):
        t_env.execute_sql(RECENT_EVENTS_FUNCTION)
        lists = t_env.to_changelog_stream(t_env.sql_query(recent_query(cfg)))
        refresh = cfg.get("refresh")
        if refresh:
            # The refresh step imports recloop: ship its package (a zip holding recloop/)
            # to the Python workers, unless their environment has it (a cluster's venv).
            if refresh.get("python_files"):
                env.add_python_file(refresh["python_files"])
            refresh = {k: v for k, v in refresh.items() if k != "python_files"}
        recent = _recent_class()(
            redis_url=cfg["redis_url"],
            prefix=cfg.get("store_prefix", "recloop:"),
            max_len=int(cfg["recent_len"]),
            flush_ms=int(cfg.get("recent_flush_ms", 200)),
            batch_users=int(cfg.get("recent_batch_users", 500)),
            refresh=refresh,
        )
        # Keyed by user: one user's lists reach one task in order.
        lists.key_by(lambda row: row[0], key_type=Types.STRING()).process(
            recent, output_type=Types.STRING()
        ).name(f"{RECENT_STEP} and refresh" if refresh else RECENT_STEP).print()
    return env, t_env


class Progress:
    """Records read and written by the job's operators, from the mini-cluster's REST API."""

    def __init__(self, port: int, job_id: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.job_id = job_id

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=5) as r:
            return json.loads(r.read())

    def records(self) -> dict[str, int]:
        """Sum of every vertex's read and written records, the source's output, and how
        many rows the recent-items step has read but not finished (``behind``)."""
        try:
            doc = self._get(f"/jobs/{self.job_id}")
        except OSError:
            return {}
        total, source, behind = 0, 0, 0
        for v in doc.get("vertices", []):
            m = v.get("metrics", {})
            total += int(m.get("read-records", 0)) + int(m.get("write-records", 0))
            if "Source" in v.get("name", ""):
                source += int(m.get("write-records", 0))
            if RECENT_STEP in v.get("name", ""):
                behind += int(m.get("read-records", 0)) - self._rows_done(v["id"])
        return {"total": total, "source_out": source, "behind": behind}

    def _rows_done(self, vertex: str) -> int:
        """The vertex's :data:`ROWS_DONE` counter, summed over its subtasks."""
        base = f"/jobs/{self.job_id}/vertices/{vertex}/subtasks/metrics"
        try:
            ids = [m["id"] for m in self._get(base) if m["id"].endswith(ROWS_DONE)]
            if not ids:
                return 0
            got = self._get(f"{base}?get={urllib.parse.quote(ids[0])}&agg=sum")
        except OSError:
            return 0
        return int(float(got[0].get("sum", 0))) if got else 0

    def vertices(self) -> list[dict[str, Any]]:
        """Each vertex's name, status and record counts (for the report)."""
        try:
            doc = self._get(f"/jobs/{self.job_id}")
        except OSError:
            return []
        return [
            {
                "name": v.get("name", ""),
                "status": v.get("status"),
                "read": int(v.get("metrics", {}).get("read-records", 0)),
                "written": int(v.get("metrics", {}).get("write-records", 0)),
                # ms the vertex's tasks were busy (not idle, not back-pressured): where the
                # job's time goes.
                "busy_ms": float(v.get("metrics", {}).get("accumulated-busy-time", 0.0)),
            }
            for v in doc.get("vertices", [])
        ]

    def running(self) -> bool:
        """True once every task of the job runs (Python workers take seconds to start)."""
        try:
            doc = self._get(f"/jobs/{self.job_id}")
        except OSError:
            return False
        vertices = doc.get("vertices", [])
        return bool(vertices) and all(v.get("status") == "RUNNING" for v in vertices)

    def completed_checkpoints(self) -> int:
        try:
            doc = self._get(f"/jobs/{self.job_id}/checkpoints")
        except OSError:
            return 0
        return int(doc.get("counts", {}).get("completed", 0))


def ended(client: Any) -> None:
    """Raise if the job ended by itself (a failed task ends a job without restarts, and the
    local mini-cluster with it): with the job's own exception when it has one."""
    result = client.get_job_execution_result()
    if result.done():
        result.result()  # raises the job's failure
        raise RuntimeError("the Flink job finished before it was stopped")


def stop_with_savepoint(client: Any, *, drain: bool) -> str:
    """Stop the job with a savepoint in the configured directory; ``drain`` first advances
    event time to the end (every window fires).  Calls Java directly: PyFlink 2.0's wrapper
    still passes the pre-2.0 argument list."""
    from pyflink.java_gateway import get_gateway

    fmt = get_gateway().jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL
    return str(client._j_job_client.stopWithSavepoint(drain, None, fmt).get())


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the job; with ``exit_when_idle_s`` stop it once no record moved for that long,
    as ``stop_mode`` says: ``drain`` (fire every window, take a savepoint), ``savepoint``
    (keep open windows in the savepoint) or ``cancel`` (after one more checkpoint, like a
    crash: the retained checkpoint is what a restart resumes from).  Returns a report."""
    idle_s = cfg.get("exit_when_idle_s")
    if idle_s and not cfg.get("rest_port"):
        cfg = {**cfg, "rest_port": _free_port()}
    t0 = time.monotonic()
    env, _ = build(cfg)
    client = env.execute_async(cfg.get("job_name", "recloop-online"))
    job_id = str(client.get_job_id())
    report: dict[str, Any] = {"job_id": job_id, "submit_s": time.monotonic() - t0}
    logger.info("job %s submitted after %.1f s", job_id, report["submit_s"])
    if not idle_s:
        client.get_job_execution_result().result()
        return report
    progress = Progress(int(cfg["rest_port"]), job_id)
    poll = float(cfg.get("poll_s", 0.5))
    # Idle time counts from when every task runs: the sources may read everything while the
    # Python operator is still starting, and a savepoint needs every task running.
    while not progress.running():
        ended(client)
        time.sleep(poll)
    report["running_s"] = time.monotonic() - t0
    logger.info("all tasks running after %.1f s", report["running_s"])
    last: dict[str, int] = {}
    moved_at = time.monotonic()
    first_move = last_move = None
    # Not idle while the recent-items step is behind, but never wait on it for longer than
    # catch_up_s without any record moving (a counter that never reports would hang the run).
    catch_up_s = float(cfg.get("catch_up_s", 300))
    while time.monotonic() - moved_at < idle_s or (
        last.get("behind", 0) > 0 and time.monotonic() - moved_at < catch_up_s
    ):
        ended(client)
        time.sleep(poll)
        now = progress.records()
        if now and now != last:
            if now.get("total", 0) > last.get("total", 0):
                first_move = first_move or time.monotonic()
                last_move = time.monotonic()
            last = now
            moved_at = time.monotonic()
    report["records"] = last
    if last.get("behind", 0) > 0:
        logger.warning("stopping with %d rows of the recent-items step unfinished", last["behind"])
    report["vertices"] = progress.vertices()
    report["first_progress_s"] = None if first_move is None else first_move - t0
    report["last_progress_s"] = None if last_move is None else last_move - t0
    mode = cfg.get("stop_mode", "drain")
    if mode == "cancel":
        done = progress.completed_checkpoints()
        deadline = time.monotonic() + 60
        while progress.completed_checkpoints() <= done and time.monotonic() < deadline:
            time.sleep(poll)
        report["checkpoints"] = progress.completed_checkpoints()
        client.cancel().result()
    else:
        report["savepoint"] = stop_with_savepoint(client, drain=mode == "drain")
    report["stopped_s"] = time.monotonic() - t0
    report["vertices_at_stop"] = progress.vertices()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--config", required=True, help="JSON file of the job's settings")
    parser.add_argument("--report", help="write the run's report (JSON) here")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("RECLOOP_FLINK_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cfg = json.loads(Path(args.config).read_text())
    report = run(cfg)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    logger.info("report: %s", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
