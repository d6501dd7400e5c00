"""The Flink job for real: a Tansu broker, PostgreSQL, Redis and a local Flink mini-cluster.

One scenario, two job runs (15-60 s of JVM start-up each, so they are shared by the tests):
the first half of the events is published and the job runs until idle, then is cancelled
after one more checkpoint (as a crash leaves it); the second half is published and a second
run resumes from that checkpoint and drains.  The same events also go through the Redis
Streams runner's code (in-process, memory bus), whose popular list, recent lists and
refreshed recommendations the job must reproduce.  The refresh runs when the Flink
environment has the scorer's packages (``scripts/flink_env.sh --scorer``); its tests skip
otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
import polars as pl
import pytest

from recloop.artifacts import load_artifact
from recloop.stores import MemoryStore, RedisStore
from recloop.streaming.bus import MemoryBus
from recloop.streaming.buses.base import DeadLetterRecord
from recloop.streaming.buses.kafka import KafkaBus
from recloop.streaming.events import EVENT_SCHEMA, encode_events
from recloop.streaming.flink.runner import FlinkJobConfig, FlinkRunReport, run_flink
from recloop.streaming.log import BehaviorLog
from recloop.streaming.operators import popular_reference
from recloop.streaming.runner import run_worker_async
from recloop.streaming.settings import StreamSettings

T = TypeVar("T")
pytestmark = [pytest.mark.flink, pytest.mark.slow, pytest.mark.integration]

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
WINDOW_S, SLIDE_S, TOP, LATENESS_S, RECENT, REC_N = 3600, 80, 10, 300, 5, 6
# The artifact knows most users and items, not all: unknown ones take the scorer's own
# paths (user 0, unknown items dropped from the history), as in the Redis runner.
ART_USERS = [f"u{u}" for u in range(50)]
ART_ITEMS = [f"i{i}" for i in range(35)]
BAD = [
    b"garbage",
    b'{"event_id": "x1", "item_id": "i1", "ts": 1000100}',
    b'{"event_id":"x2","user_id":"u1","item_id":"i1","ts":1000100,"behavior":"clik"}',
    # A field of the wrong type: the JSON format logged it with a NULL rating (no dead
    # letter); one parse with the Redis runner's rules now dead-letters it, as that runner.
    b'{"event_id":"x3","user_id":"u1","item_id":"i1","ts":1000100,"rating":"abc"}',
]


def make_events(n: int = 3000, *, seed: int = 0) -> pl.DataFrame:
    """Events over two hours of event time, shuffled within +-60 s (less than the allowed
    lateness: nothing is late for either runner); a few popular items, ties possible."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(1_000_000, 1_000_000 + 7200, n)) + rng.integers(-60, 60, n)
    return pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": [f"u{u}" for u in rng.integers(0, 60, n)],
            "item_id": [f"i{int(v) % 40}" for v in rng.zipf(1.6, n)],
            "ts": ts.astype(np.int64),
            "behavior": rng.choice(["pv", "buy"], n).tolist(),
            "rating": [None] * n,
            "reward": rng.integers(0, 3, n).astype(np.float64),
        },
        schema=EVENT_SCHEMA,
    )


def publish(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10})
    for key, value in payloads:
        producer.produce(topic, value, key=key)
    assert producer.flush(30) == 0


def keyed(events: pl.DataFrame) -> list[tuple[bytes, bytes]]:
    """(user id, JSON) per event: one user's events stay in order within a partition."""
    users = [u.encode() for u in events["user_id"].to_list()]
    return list(zip(users, encode_events(events), strict=True))


async def in_store(tag: str, fn: Callable[[RedisStore], Awaitable[T]]) -> T:
    """``fn`` on a Redis store under the test's prefix, opened and closed in this loop."""
    store = RedisStore(REDIS_URL, prefix=f"{tag}:")
    try:
        return await fn(store)
    finally:
        await store.close()


@dataclass
class Scenario:
    events: pl.DataFrame
    runs: list[FlinkRunReport]
    logged: pl.DataFrame
    popular: list[tuple[str, float]]
    recent: dict[str, list[tuple[str, float]]]
    artifact: Path | None
    """The refresh's artifact; None when the Flink environment cannot score."""
    recs: dict[str, tuple[list[tuple[str, float]], str] | None]
    rec_log: pl.DataFrame | None
    dead: list[DeadLetterRecord]


def no_scorer() -> NoReturn:
    """Skip (fail in CI, whose Flink environment has the scorer) a refresh test."""
    reason = "the Flink environment has no scorer (scripts/flink_env.sh --scorer)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
    raise AssertionError("unreachable")


def can_score(flink_python: str) -> bool:
    """Whether the Flink environment has what the refresh step imports."""
    probe = "import torch, polars, sqlalchemy, psycopg, safetensors, pydantic_settings"
    return subprocess.run([flink_python, "-c", probe], capture_output=True).returncode == 0


def scoring_artifact(
    flink_python: str, tmp_path_factory: pytest.TempPathFactory, make_artifact: Any
) -> Path | None:
    """The refresh's artifact (users and items it knows, not all), or None when the Flink
    environment cannot score."""
    if not can_score(flink_python):
        return None
    return make_artifact(
        tmp_path_factory.mktemp("flink-artifact"), user_ids=ART_USERS, item_ids=ART_ITEMS
    )


def job_config(tag: str, broker: str, python: str, **fields: Any) -> FlinkJobConfig:
    """A run on the topic ``{tag}-events`` under the tag's table and store prefixes and
    group, with the windows and list sizes the Redis runner is compared at, stopping 4 s
    after the last record moved; ``fields`` give the rest."""
    return FlinkJobConfig(
        bus_url=f"kafka://{broker}/{tag}-events",
        table_prefix=f"{tag}_",
        store_prefix=f"{tag}:",
        group=f"{tag}-group",
        window_s=WINDOW_S,
        slide_s=SLIDE_S,
        top=TOP,
        allowed_lateness_s=LATENESS_S,
        rec_n=REC_N,
        exit_when_idle_s=4.0,
        python=python,
        **fields,
    )


@pytest.fixture(scope="module")
def scenario(
    flink_python: str,
    flink_kafka_broker: str,
    tmp_path_factory: pytest.TempPathFactory,
    make_artifact: Any,
) -> Iterator[Scenario]:
    from confluent_kafka.admin import AdminClient, NewTopic

    tag = f"rlf{uuid.uuid4().hex[:8]}"
    topic = f"{tag}-events"
    admin = AdminClient({"bootstrap.servers": flink_kafka_broker})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result()
    events = make_events()
    half = events.height // 2
    ck = tmp_path_factory.mktemp("flink-checkpoints")
    artifact = scoring_artifact(flink_python, tmp_path_factory, make_artifact)
    config = job_config(
        tag,
        flink_kafka_broker,
        flink_python,
        database_url=POSTGRES_URL,
        store_url=REDIS_URL,
        recent_len=RECENT,
        artifact=artifact,
        checkpoint_dir=ck,
        checkpoint_interval_s=2.0,
        stop_mode="cancel",
    )
    log = BehaviorLog(POSTGRES_URL, prefix=f"{tag}_")
    try:
        publish(flink_kafka_broker, topic, [*keyed(events[:half]), *((b"x", b) for b in BAD)])
        first = run_flink(config)
        publish(flink_kafka_broker, topic, keyed(events[half:]))
        second = run_flink(dataclasses.replace(config, stop_mode="drain"))
        logged = log.read_events()
        popular = asyncio.run(in_store(tag, lambda store: store.get_popular(TOP)))
        users = sorted(set(events["user_id"].to_list()))
        recent = asyncio.run(in_store(tag, lambda store: store.get_recent(users, n=RECENT + 3)))
        recs = asyncio.run(in_store(tag, lambda store: stored_recs(store, users)))
        dead = asyncio.run(KafkaBus(config.bus_url).read_dead_letters())
        yield Scenario(
            events=events,
            runs=[first, second],
            logged=logged,
            popular=popular,
            recent=recent,
            artifact=artifact,
            recs=recs,
            rec_log=log.read_recommendations() if artifact is not None else None,
            dead=dead,
        )
    finally:
        asyncio.run(in_store(tag, lambda store: store.delete_all()))
        log.drop_schema()
        log.dispose()


async def stored_recs(
    store: RedisStore | MemoryStore, users: list[str]
) -> dict[str, tuple[list[tuple[str, float]], str] | None]:
    return {u: await store.get_recommendations(u) for u in users}


@dataclass
class RunnerResult:
    popular: list[tuple[str, float]]
    recent: dict[str, list[tuple[str, float]]]
    recs: dict[str, tuple[list[tuple[str, float]], str] | None]
    rec_log: pl.DataFrame


def redis_runner(
    events: pl.DataFrame, tmp_path: Path, artifact: Path | None = None
) -> RunnerResult:
    """The Redis Streams runner's popular and recent lists (and with an artifact, refreshed
    recommendations) for the same events (its worker code on a memory bus and store)."""

    async def go() -> RunnerResult:
        bus = MemoryBus(stream="flink-equivalence")
        await bus.publish([*encode_events(events), *BAD])
        store = MemoryStore()
        log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
        settings = StreamSettings(
            stream="flink-equivalence",
            batch_size=500,
            block_ms=50,
            exit_when_idle_s=0.3,
            popular_refresh_s=0.0,
            window_s=WINDOW_S,
            slide_s=SLIDE_S,
            top=TOP,
            allowed_lateness_s=LATENESS_S,
            recent_len=RECENT,
            rec_n=REC_N,
        )
        stats = await run_worker_async(
            settings,
            bus=bus,
            store=store,
            log=log,
            artifact=None if artifact is None else load_artifact(artifact),
        )
        assert stats.late_events == 0
        users = sorted(set(events["user_id"].to_list()))
        return RunnerResult(
            popular=await store.get_popular(TOP),
            recent=await store.get_recent(users, n=RECENT + 3),
            recs=await stored_recs(store, users),
            rec_log=log.read_recommendations(),
        )

    return asyncio.run(go())


def test_the_log_holds_every_valid_event_exactly_once(scenario: Scenario) -> None:
    cols = list(EVENT_SCHEMA)
    got = scenario.logged.select(cols).sort("event_id")
    want = scenario.events.select(cols).sort("event_id")
    assert got.height == want.height  # malformed records dropped, nothing twice
    assert got.equals(want)


def test_malformed_records_go_to_the_dead_letter_topic(scenario: Scenario) -> None:
    # Read back in the Kafka bus's own convention: payload byte for byte, reason and the
    # source record's partition-offset as headers; each once (they were all checkpointed
    # before the first run stopped, so the second run does not read them again).
    assert sorted(d.payload for d in scenario.dead) == sorted(BAD)
    assert len({d.source_id for d in scenario.dead}) == len(BAD)
    assert all(d.consumer.startswith("flink:") for d in scenario.dead)
    reason = {d.payload: d.reason for d in scenario.dead}
    assert reason[BAD[0]] == "not a JSON object"
    assert reason[BAD[1]].startswith("user_id: missing")
    assert reason[BAD[2]].startswith("behavior: not one of")
    assert reason[BAD[3]] == "rating: not a number"


def test_the_second_run_resumes_from_the_first_runs_checkpoint(scenario: Scenario) -> None:
    first, second = scenario.runs
    assert first.restored_from is None and first.savepoint is None
    assert second.restored_from is not None
    assert Path(second.restored_from).name.startswith("chk-")
    assert first.job_id in second.restored_from
    assert second.savepoint is not None
    # That the restored run neither re-read the first half nor lost its window state is
    # what test_popular_items_equal_the_redis_runners checks: either would change counts.


def test_popular_items_equal_the_redis_runners(scenario: Scenario, tmp_path: Path) -> None:
    events = scenario.events
    reference = popular_reference(
        events["item_id"], events["ts"].to_numpy(), window_s=WINDOW_S, slide_s=SLIDE_S, top=TOP
    )
    assert len(reference) == TOP
    assert scenario.popular == reference
    assert redis_runner(events, tmp_path).popular == reference


def test_recent_items_equal_the_redis_runners(scenario: Scenario, tmp_path: Path) -> None:
    want = redis_runner(scenario.events, tmp_path).recent
    assert all(len(v) == RECENT for v in want.values())  # every user has more events
    assert scenario.recent == want


def test_refreshed_recommendations_equal_the_redis_runners(
    scenario: Scenario, tmp_path: Path
) -> None:
    if scenario.artifact is None:
        no_scorer()
    want = redis_runner(scenario.events, tmp_path, scenario.artifact).recs
    assert set(scenario.recs) == set(want)
    assert all(v is not None for v in want.values())  # every user was refreshed
    for user, got in scenario.recs.items():
        assert got is not None, user
        (items, version), (want_items, want_version) = got, want[user]
        assert version == want_version
        # Same recent list, same scorer: the same list (scores up to float noise of a
        # differently sized batch).
        assert [i for i, _ in items] == [i for i, _ in want_items], user
        assert [s for _, s in items] == pytest.approx([s for _, s in want_items], abs=1e-5)
        assert len(items) == REC_N


def test_every_refresh_is_logged_with_the_previous_lists_realised_reward(
    scenario: Scenario,
) -> None:
    if scenario.rec_log is None:
        no_scorer()
    log = scenario.rec_log.sort("id")
    events = scenario.events
    assert set(log["user_id"].to_list()) == set(events["user_id"].to_list())
    # The latest logged list of each user is the one in the store.
    latest = log.group_by("user_id").agg(pl.col("items").last())
    for user, items in latest.iter_rows():
        stored = scenario.recs[user]
        assert stored is not None and json.loads(items) == [i for i, _ in stored[0]]
    # A user's first list has no previous one; every later one has a realised reward, the
    # sum of rewards of events on the previous list (so at most the user's total reward).
    first = log.group_by("user_id").agg(pl.col("realised_reward").first(), pl.col("hits").first())
    assert first["realised_reward"].is_null().all() and first["hits"].is_null().all()
    later = log.filter(pl.col("user_id").is_first_distinct().not_())
    assert later.height > 0 and later["realised_reward"].is_not_null().all()
    assert (later["hits"] > 0).any()
    totals = events.group_by("user_id").agg(pl.col("reward").sum(), pl.len().alias("n"))
    per_user = later.group_by("user_id").agg(pl.col("realised_reward").sum(), pl.col("hits").sum())
    check = per_user.join(totals, on="user_id")
    assert (check["realised_reward"] <= check["reward"]).all()
    assert (check["hits"] <= check["n"]).all()


# ----------------------------------------------------------------------------- MySQL

MARIADB_URL = os.environ.get("RECLOOP_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test")


@dataclass
class MariaDBRun:
    events: pl.DataFrame
    logged: pl.DataFrame
    rec_log: pl.DataFrame | None
    """The recommendation log (None: the Flink environment cannot score)."""
    artifact: Path | None
    popular: list[tuple[str, float]]
    recent: dict[str, list[tuple[str, float]]]
    recs: dict[str, tuple[list[tuple[str, float]], str] | None]


@pytest.fixture(scope="module")
def mariadb_run(
    flink_python: str,
    flink_kafka_broker: str,
    tmp_path_factory: pytest.TempPathFactory,
    make_artifact: Any,
) -> Iterator[MariaDBRun]:
    """One run of the job on a small topic with a MariaDB log (recloop's MySQL dialect and
    MariaDB Connector/J, ``scripts/flink_env.sh --mysql``), refreshing recommendations when
    the environment can score (the refresh writes the log through SQLAlchemy/PyMySQL) — at
    parallelism 2 on a topic of two partitions, where the scenario above runs at 1."""
    from confluent_kafka.admin import AdminClient, NewTopic

    jars = Path(flink_python).absolute().parent.parent / "recloop-jars"
    if not (jars / "recloop-flink-jdbc-mysql.jar").is_file():
        reason = f"no MySQL dialect in {jars} (scripts/flink_env.sh --mysql)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    tag = f"rlm{uuid.uuid4().hex[:8]}"
    topic = f"{tag}-events"
    admin = AdminClient({"bootstrap.servers": flink_kafka_broker})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result()
    events = make_events(400, seed=1)
    # Records sent twice (the newest ones, inside the last popular window): the upsert keeps
    # one row, and neither the popular counts nor the recent lists count them twice.
    publish(flink_kafka_broker, topic, [*keyed(events), *keyed(events.sort("ts")[-5:])])
    artifact = scoring_artifact(flink_python, tmp_path_factory, make_artifact)
    log = BehaviorLog(MARIADB_URL, prefix=f"{tag}_")
    try:
        run_flink(
            job_config(
                tag,
                flink_kafka_broker,
                flink_python,
                database_url=MARIADB_URL,
                store_url=REDIS_URL if artifact is not None else None,
                recent_len=RECENT if artifact is not None else None,
                artifact=artifact,
                dead_letters=False,
                parallelism=2,
                checkpoint_dir=tmp_path_factory.mktemp("flink-mysql"),
            )
        )
        users = sorted(set(events["user_id"].to_list()))
        yield MariaDBRun(
            events=events,
            logged=log.read_events(),
            rec_log=log.read_recommendations() if artifact is not None else None,
            artifact=artifact,
            popular=asyncio.run(in_store(tag, lambda store: store.get_popular(TOP))),
            recent=asyncio.run(in_store(tag, lambda store: store.get_recent(users, n=RECENT + 3))),
            recs=asyncio.run(in_store(tag, lambda store: stored_recs(store, users))),
        )
    finally:
        asyncio.run(in_store(tag, lambda store: store.delete_all()))
        log.drop_schema()
        log.dispose()


def test_a_mariadb_log_holds_every_event_exactly_once(mariadb_run: MariaDBRun) -> None:
    cols = list(EVENT_SCHEMA)
    got = mariadb_run.logged.select(cols).sort("event_id")
    assert got.equals(mariadb_run.events.select(cols).sort("event_id"))


def test_the_refresh_logs_lists_to_mariadb(mariadb_run: MariaDBRun) -> None:
    if mariadb_run.rec_log is None:
        no_scorer()
    log = mariadb_run.rec_log
    assert set(log["user_id"].to_list()) == set(mariadb_run.events["user_id"].to_list())
    assert log.filter(pl.col("user_id").is_first_distinct())["realised_reward"].is_null().all()
    assert all(len(json.loads(x)) == REC_N for x in log["items"].to_list())


def test_at_parallelism_2_the_lists_equal_the_redis_runners(
    mariadb_run: MariaDBRun, tmp_path: Path
) -> None:
    # Two source tasks, a keyed recent-items step and a refresh (a scorer per Python worker)
    # in two tasks each; the popular items' Top-N in one.  A record sent twice changes none.
    if mariadb_run.artifact is None:
        no_scorer()
    want = redis_runner(mariadb_run.events, tmp_path, mariadb_run.artifact)
    assert len(want.popular) == TOP and mariadb_run.popular == want.popular
    assert mariadb_run.recent == want.recent
    assert set(mariadb_run.recs) == set(want.recs)
    for user, got in mariadb_run.recs.items():
        expected = want.recs[user]
        assert got is not None and expected is not None, user
        assert [i for i, _ in got[0]] == [i for i, _ in expected[0]], user
        assert got[1] == expected[1]
