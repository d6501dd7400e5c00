"""Hostile conditions for the stream processes: a worker killed under `recloop stream
--workers 2`, and bus entries without a payload field."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from recloop.stores import MemoryStore
from recloop.streaming.bus import RedisStreamBus, _messages
from recloop.streaming.buses import open_bus
from recloop.streaming.log import BehaviorLog
from recloop.streaming.runner import WorkerExit, run_worker_async
from recloop.streaming.settings import StreamSettings


def test_worker_exit_names_the_signal_or_status() -> None:
    killed = WorkerExit(name="recloop-stream-1", pid=42, exitcode=-9, final_counts=False)
    assert killed.failed
    assert killed.describe() == (
        "worker recloop-stream-1 (pid 42) was killed by SIGKILL "
        "(counts up to its last report included)"
    )
    crashed = WorkerExit(name="recloop-stream-0", pid=7, exitcode=1, final_counts=False)
    assert "exited with status 1" in crashed.describe()
    assert not WorkerExit(name="w", pid=1, exitcode=0, final_counts=True).failed


def test_entries_without_a_payload_keep_their_fields() -> None:
    raw = [
        [b"1-0", [b"e", b'{"a":1}']],
        [b"2-0", [b"x", b"1", b"trace", b"t9"]],
        [b"3-0", [b"trace", b"t1", b"e", b"{}"]],
        [b"4-0", None],  # trimmed while pending
    ]
    got = _messages(raw)
    assert [(m.id, m.payload, m.fields) for m in got] == [
        ("1-0", b'{"a":1}', None),
        ("2-0", None, {b"x": b"1", b"trace": b"t9"}),
        ("3-0", b"{}", {b"trace": b"t1"}),
    ]


@pytest.mark.integration
async def test_entry_without_payload_is_dead_lettered_with_its_fields(
    names: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    bus = RedisStreamBus(redis_url, stream=names["stream"])
    good = orjson.dumps({"event_id": "e1", "user_id": "u", "item_id": "i", "ts": 5})
    try:
        await bus._client.xadd(names["stream"], {b"x": b"1", b"trace": b"\xff\x00raw"})
        await bus.publish([good])
        s = StreamSettings(
            stream=names["stream"],
            group=names["group"],
            block_ms=50,
            exit_when_idle_s=0.3,
            popular_refresh_s=0.0,
        )
        log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
        stats = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log)
        assert (stats.logged, stats.dead_letters) == (1, 1)
        (letter,) = await bus.read_dead_letters()
        assert letter.payload == b""
        assert letter.fields == {b"x": b"1", b"trace": b"\xff\x00raw"}
        assert letter.reason.startswith("bus entry without a payload (its fields: x, trace; ")
        assert "in field 'e' on Redis Streams" in letter.reason
        assert await bus.pending_count(names["group"]) == 0
    finally:
        await bus.delete()
        await bus.close()


async def _consumers(redis_url: str, names: dict[str, str]) -> list[str]:
    bus = RedisStreamBus(redis_url, stream=names["stream"])
    try:
        info = await bus._client.xinfo_consumers(names["stream"], names["group"])
        return [c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in info]
    except Exception:
        return []
    finally:
        await bus.close()


def _worker_children(pid: int) -> list[int]:
    """PIDs of the spawned worker processes of ``recloop stream`` (pid), oldest first (not
    the multiprocessing resource tracker)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in task.read_text().split()]
    workers = []
    for child in sorted(out):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    return workers


def _has_kafka_client(pid: int) -> bool:
    for comm in Path(f"/proc/{pid}/task").glob("*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().startswith("rdk:"):
                return True
    return False


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("kafka", marks=pytest.mark.kafka),
    ],
)
def test_killed_worker_fails_the_run_and_is_named(
    names: dict[str, str],
    redis_url: str,
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
) -> None:
    """`recloop stream --workers 2` used to run on (and exit 0 when stopped, its counts
    leaving the dead worker out) after a worker was killed."""
    kafka = kind == "kafka"
    bus_url = redis_url
    store = ["--store-url", redis_url]
    if kafka:
        bus_url = request.getfixturevalue("kafka_broker").url(names["stream"].replace(":", "."))
        store = ["--store-url", f"sqlite:///{tmp_path / 'store.db'}"]
    env = dict(os.environ, RECLOOP_NO_PROGRESS="1")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "recloop"), "stream", "--workers", "2",
            "--bus-url", bus_url, *store,
            "--stream", names["stream"], "--group", names["group"],
            "--database-url", f"sqlite:///{tmp_path / 'log.db'}", "--json",
        ],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    worker_pids: dict[int, int] = {}  # index -> pid, from the consumer names host-pid-index
    try:
        deadline = time.monotonic() + 120
        while len(worker_pids) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
            if kafka:  # the group's members are not listed by every broker: ask /proc
                # A worker is up once librdkafka's threads run in it (its signal handlers
                # are installed before it opens the bus).
                children = _worker_children(proc.pid)
                if len(children) == 2 and all(map(_has_kafka_client, children)):
                    worker_pids = dict(enumerate(children))
                continue
            for name in asyncio.run(_consumers(redis_url, names)):
                _, pid, index = name.rsplit("-", 2)
                worker_pids[int(index)] = int(pid)
        os.kill(worker_pids[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in worker_pids.values():  # only the workers this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

        async def cleanup() -> None:
            bus = open_bus(bus_url, stream=names["stream"])
            await bus.delete()
            await bus.close()

        asyncio.run(cleanup())
    assert proc.returncode == 1, err
    failed = json.loads(out)["failed_workers"]
    assert len(failed) == 1 and failed[0]["pid"] == worker_pids[1]
    assert failed[0]["exitcode"] == -9 and failed[0]["counts_final"] is False
    name = failed[0]["name"]
    if not kafka:
        assert name == "recloop-stream-1"
    assert f"error: worker {name} (pid {worker_pids[1]}) was killed by SIGKILL" in err
