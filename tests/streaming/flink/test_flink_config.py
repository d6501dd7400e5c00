"""The Flink runner's settings, without a JVM: URLs, jars, restore points and the SQL."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from recloop.errors import ConfigError
from recloop.stores.redis import RECENT_PUSH_SCRIPT
from recloop.streaming.flink import job
from recloop.streaming.flink.runner import (
    CONNECTOR_JARS,
    MYSQL_JARS,
    UDF_JAR,
    FlinkJobConfig,
    connector_jars,
    jdbc_target,
    job_environment,
    job_settings,
    kafka_topic,
    latest_restore_point,
)

PG = "postgresql+psycopg://alice:s3cret@db.example:6543/shop"


def test_kafka_url_gives_bootstrap_servers_and_topic() -> None:
    assert kafka_topic("kafka://k1:9092,k2:9093/events") == ("k1:9092,k2:9093", "events")
    for bad in ("redis://h:6379/0", "kafka://h:9092", "kafka:///events", "kafka://h:1/a/b"):
        with pytest.raises(ConfigError, match="bus url"):
            kafka_topic(bad)


def test_postgres_url_becomes_jdbc_and_others_are_refused() -> None:
    # Batched upserts go to PostgreSQL as multi-row INSERTs (pgjdbc's reWriteBatchedInserts).
    assert jdbc_target(PG) == (
        "jdbc:postgresql://db.example:6543/shop?reWriteBatchedInserts=true",
        "alice",
        "s3cret",
    )
    assert jdbc_target("postgresql://h/db")[0] == (
        "jdbc:postgresql://h:5432/db?reWriteBatchedInserts=true"
    )
    assert jdbc_target("mysql+pymysql://root@h/db") == ("jdbc:mysql://h:3306/db", "root", None)
    assert jdbc_target("mariadb+pymysql://u:p@h:3307/db")[0] == "jdbc:mysql://h:3307/db"
    with pytest.raises(ConfigError, match="PostgreSQL or MySQL"):
        jdbc_target("sqlite:///x.db")


def test_window_and_stop_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="multiple of slide_s"):
        FlinkJobConfig(bus_url="kafka://h:1/t", database_url=PG, window_s=100, slide_s=30)
    with pytest.raises(ConfigError, match="stop_mode"):
        FlinkJobConfig(bus_url="kafka://h:1/t", database_url=PG, stop_mode="kill")
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        FlinkJobConfig(bus_url="kafka://h:1/t", database_url=PG, stop_mode="cancel")
    with pytest.raises(ConfigError, match="needs a checkpoint_dir"):  # the savepoint's
        FlinkJobConfig(bus_url="kafka://h:1/t", database_url=PG, exit_when_idle_s=5)
    with pytest.raises(ConfigError, match="idle"):
        FlinkJobConfig(
            bus_url="kafka://h:1/t",
            database_url=PG,
            exit_when_idle_s=5,
            source_idle_timeout_s=2,
        )


def test_missing_jars_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECLOOP_FLINK_JARS", raising=False)
    python = tmp_path / "env" / "bin" / "python"
    with pytest.raises(ConfigError, match=r"flink-connector-kafka\.jar"):
        connector_jars((), str(python))
    lib = tmp_path / "env" / "connectors" / "pyflink" / "lib"
    lib.mkdir(parents=True)
    for name in CONNECTOR_JARS:
        (lib / name).write_bytes(b"")
    # recloop's own functions (the popular items' Top-N), built by scripts/flink_env.sh.
    with pytest.raises(ConfigError, match=r"recloop-flink-udf\.jar.*flink_env\.sh"):
        connector_jars((), str(python))
    own = tmp_path / "env" / "recloop-jars"
    own.mkdir()
    (own / UDF_JAR).write_bytes(b"")
    assert [j.name for j in connector_jars((), str(python))] == [*CONNECTOR_JARS, UDF_JAR]
    with pytest.raises(ConfigError, match=r"recloop-flink-jdbc-mysql\.jar.*--mysql"):
        connector_jars((), str(python), mysql=True)
    for name in MYSQL_JARS:
        (own / name).write_bytes(b"")
    assert [j.name for j in connector_jars((), str(python), mysql=True)] == [
        "flink-connector-kafka.jar",
        "kafka-clients.jar",
        "flink-connector-jdbc-core.jar",
        *MYSQL_JARS,
        UDF_JAR,
    ]
    monkeypatch.setenv("RECLOOP_FLINK_JARS", os.pathsep.join([str(lib / "kafka-clients.jar")]))
    with pytest.raises(ConfigError, match=r"lack recloop-flink-udf\.jar.*java/build.sh flink-udf"):
        connector_jars((), str(python))
    monkeypatch.setenv(
        "RECLOOP_FLINK_JARS", os.pathsep.join([str(lib / "kafka-clients.jar"), str(own / UDF_JAR)])
    )
    assert [j.name for j in connector_jars((), str(python))] == ["kafka-clients.jar", UDF_JAR]


def test_restore_point_is_the_newest_complete_checkpoint_or_savepoint(tmp_path: Path) -> None:
    assert latest_restore_point(tmp_path / "none") is None
    (tmp_path / "job1" / "chk-3").mkdir(parents=True)
    (tmp_path / "job1" / "chk-3" / "_metadata").write_bytes(b"x")
    (tmp_path / "job1" / "chk-4").mkdir()  # in progress: no _metadata
    assert latest_restore_point(tmp_path) == tmp_path / "job1" / "chk-3"
    time.sleep(0.01)
    (tmp_path / "savepoints" / "savepoint-1").mkdir(parents=True)
    (tmp_path / "savepoints" / "savepoint-1" / "_metadata").write_bytes(b"x")
    assert latest_restore_point(tmp_path) == tmp_path / "savepoints" / "savepoint-1"
    config = FlinkJobConfig(
        bus_url="kafka://h:1/t",
        database_url=PG,
        store_url="redis://h:6379/2",
        checkpoint_dir=tmp_path,
    )
    settings = job_settings(config, python="py", jars=[])
    assert settings["restore_from"] == str(tmp_path / "savepoints" / "savepoint-1")
    assert settings["log_table"] == "behavior_log" and settings["topic"] == "t"
    fresh = dataclasses.replace(config, resume=False)
    assert job_settings(fresh, python="py", jars=[])["restore_from"] is None
    with pytest.raises(ConfigError, match="Redis"):
        job_settings(
            FlinkJobConfig(bus_url="kafka://h:1/t", database_url=PG, store_url="sqlite:///x.db"),
            python="py",
            jars=[],
        )


def test_sql_intervals_and_windows() -> None:
    assert job.interval(300) == "INTERVAL '0 00:05:00' DAY TO SECOND"
    assert job.interval(3600 * 25 + 61) == "INTERVAL '1 01:01:01' DAY TO SECOND"
    with pytest.raises(ValueError, match="interval"):
        job.interval(-1)
    events, slides = job.popular_views({"slide_s": 80, "window_s": 3600, "top": 7})
    # Each slide's events once per event id, aligned to the epoch (the Redis runner's
    # buckets); then one row per slide that holds an event.
    assert "TUMBLE(TABLE valid_events, DESCRIPTOR(ts_ltz), INTERVAL '0 00:01:20'" in events
    assert "GROUP BY window_start, window_end, window_time, event_id" in events
    assert "TUMBLE(TABLE slide_events, DESCRIPTOR(event_slide), INTERVAL '0 00:01:20'" in slides
    assert "COLLECT(item_id) AS counts" in slides
    # A slide's window is itself and the 44 slides before it (60 min / 80 s = 45).
    sql = job.popular_query({"slide_s": 80, "window_s": 3600, "top": 7})
    assert "recloop_top_counts(counts, 7)" in sql
    assert "RANGE BETWEEN INTERVAL '0 00:58:40' DAY TO SECOND PRECEDING AND CURRENT ROW" in sql
    assert "AS 'recloop.flink.udf.TopCounts' LANGUAGE JAVA" in job.TOP_COUNTS_FUNCTION
    # Windows are cut in UTC whatever the machine's zone (TIMESTAMP_LTZ windows follow the
    # session time zone): aligned to the epoch as the Redis runner's buckets.
    assert job.flink_configuration({})["table.local-time-zone"] == "UTC"
    ddl = job.source_ddl(
        {"topic": "t'x", "bootstrap_servers": "h:1", "group": "g", "lateness_s": 300}
    )
    assert "'topic' = 't''x'" in ddl  # quoted, not injected
    assert "WATERMARK FOR ts_ltz AS ts_ltz - INTERVAL '0 00:05:00' DAY TO SECOND" in ddl


def test_popular_list_and_window_end() -> None:
    # LISTAGG keeps no order: ranked by count desc, then item id, cut to top.
    got = job.popular_list('[["b",2],["a",3],["c",2],["d",1]]', 3)
    assert json.loads(got) == [["a", 3.0], ["b", 2.0], ["c", 2.0]]
    assert json.loads(job.popular_list('[["7",1]]', 3)) == [["7", 1.0]]
    # The window ending with the slide that holds the event (slides aligned to the epoch).
    assert job.window_end_ms(159, 80) == 160_000
    assert job.window_end_ms(160, 80) == 240_000
    assert job.window_end_ms(0, 80) == 80_000


def test_the_job_pushes_recent_items_with_the_stores_own_script() -> None:
    assert job.RECENT_PUSH_SCRIPT == RECENT_PUSH_SCRIPT


def test_refresh_and_dead_letter_settings(tmp_path: Path, make_artifact: Any) -> None:
    with pytest.raises(ConfigError, match="recent_len and store_url"):
        FlinkJobConfig(bus_url="kafka://h:1/t", database_url=PG, artifact=tmp_path)
    art = make_artifact(tmp_path / "run" / "artifact", user_ids=["u1"], item_ids=["i1", "i2"])
    config = FlinkJobConfig(
        bus_url="kafka://h:1/events",
        database_url=PG,
        store_url="redis://h:6379/2",
        store_prefix="p:",
        table_prefix="x_",
        recent_len=7,
        artifact=tmp_path / "run",  # a run directory: its artifact/ is found
        rec_n=4,
    )
    settings = job_settings(config, python="py", jars=[])
    assert settings["refresh"] == {
        "artifact": str(art.absolute()),
        "database_url": PG,
        "table_prefix": "x_",
        "store_url": "redis://h:6379/2",
        "store_prefix": "p:",
        "recent_len": 7,
        "rec_n": 4,
        "python_files": None,
    }
    assert settings["dead_letter_topic"] == "events.dead"  # the Kafka bus's default
    off = dataclasses.replace(config, dead_letters=False, artifact=None)
    assert job_settings(off, python="py", jars=[])["dead_letter_topic"] is None
    assert job_settings(off, python="py", jars=[])["refresh"] is None
    # The recent lists' SQL state expires, and mini-batches collapse a user's changes.
    conf = job.flink_configuration({**settings, "redis_url": "redis://h"})
    assert conf["table.exec.state.ttl"] == f"{30 * 86400} s"
    assert conf["table.exec.mini-batch.enabled"] == "true"


def test_every_record_is_an_event_or_a_dead_letter() -> None:
    # One read of the bytes, one parse (recloop_parse_event, tested by hand in
    # test_flink_functions.py): valid events are the rows without a reason, dead letters the
    # rows with one.
    src = job.source_ddl({"topic": "t", "bootstrap_servers": "h:1", "group": "g", "lateness_s": 5})
    assert "'format' = 'raw'" in src and "METADATA FROM 'offset'" in src
    assert "recloop_event_time(payload)" in src
    assert "recloop_parse_event(payload) AS ev" in job.PARSED_QUERY
    assert "WHERE ev.reason IS NULL" in job.VALID_VIEW
    assert "ev.reason AS reason" in job.CHECKED_VIEW
    insert = job.dead_letter_insert({"topic": "t", "group": "g"})
    assert "FROM checked_events WHERE reason IS NOT NULL" in insert
    assert "'consumer', CAST('flink:g' AS BYTES)" in insert
    ddl = job.dead_letter_ddl({"dead_letter_topic": "t.dead", "bootstrap_servers": "h:1"})
    assert "'topic' = 't.dead'" in ddl and "headers MAP<STRING, BYTES> METADATA" in ddl


def test_jvm_args_reach_pyflinks_jvm_args_after_the_environments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("JVM_ARGS", "-Xss2m")
    config = FlinkJobConfig(
        bus_url="kafka://h:1/t", database_url=PG, jvm_args=("-XX:TieredStopAtLevel=1",)
    )
    env = job_environment(config)
    assert env["JVM_ARGS"] == "-Xss2m -XX:TieredStopAtLevel=1"
    assert "PYTHONPATH" not in env
    monkeypatch.delenv("JVM_ARGS")
    assert job_environment(config)["JVM_ARGS"] == "-XX:TieredStopAtLevel=1"
    assert "JVM_ARGS" not in job_environment(dataclasses.replace(config, jvm_args=()))
    for bad in ("-Xmx1g -Xss2m", "Xmx1g", ""):
        with pytest.raises(ConfigError, match="not one JVM option"):
            dataclasses.replace(config, jvm_args=(bad,))
