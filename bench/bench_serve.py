"""Throughput and latency of ``recloop serve`` under wrk, on this machine.

Builds random-weight artifacts of MovieLens-100K size (943 users, 1,682 items, concat encoder
H=10, D=32, hidden 64, linear head: DBRL's REINFORCE policy) and of a synthetic 100k-item
catalogue, fills the online store with every user's last H items, starts the server with
2 workers on 127.0.0.1 and POSTs /v1/recommend for random known users with wrk at each
concurrency.  Every request does the full work: raw-id mapping, a store read, masking of the
user's consumed items, a forward pass, top-k and raw ids out.

In the same run, the same load hits a seeds-style service (``baseline``: FastAPI with
pydantic in and out, the history from Redis, one forward pass per request, no id mapping,
no masking) with the same number of uvicorn workers, so the ratio between the two is
measured on the same machine in the same state: other work on these 2 cores moves the
absolute figures a lot, the ratio much less.

    .venv/bin/python bench/bench_serve.py            # both catalogues, c = 1, 16, 64
    .venv/bin/python bench/bench_serve.py --catalogues ml100k \\
        --variants recloop,recloop-nobatch,baseline
    .venv/bin/python bench/bench_serve.py --artifact runs/reinforce   # a trained artifact
    .venv/bin/python bench/bench_serve.py --catalogues ml100k --concurrency 16 \
        --variants recloop,recloop-softmax,recloop-logged     # exploring / logging overhead
    .venv/bin/python bench/bench_serve.py --catalogues ml100k --concurrency 16 --rounds 3 \
        --variants recloop,recloop-dashboard                  # the dashboard's cost (< 2 %)
    .venv/bin/python bench/bench_serve.py --catalogues ml100k --concurrency 16,64 \
        --variants baseline,recloop,recloop-softmax,recloop-logged --rounds 3   # issue 12
    .venv/bin/python bench/bench_serve.py --catalogues ml100k --concurrency 16,64 \
        --variants baseline,recloop,recloop-softmax,recloop-logged --rounds 5 --duration 4 \
        --interleave                          # issue 12 on a quiet machine: req/s, p99, CPU
    mkdir /tmp/before && git archive REV src | tar -x -C /tmp/before   # before and after:
    .venv/bin/python bench/bench_serve.py --catalogues "" --app-cost --concurrency 16 \
        --rounds 5 --compare-src /tmp/before/src      # in-process CPU per request
    .venv/bin/python bench/bench_serve.py --catalogues ml100k --concurrency 16,64 \
        --variants baseline,recloop,recloop-softmax,recloop-logged --rounds 3 --duration 3 \
        --interleave --compare-src /tmp/before/src    # over HTTP, each variant twice

Every HTTP run also prints the servers' CPU per request: user + system time of the server's
processes (its uvicorn workers) around each wrk burst, divided by the requests served.  On a
shared machine it moves far less than req/s; the in-process ``--app-cost`` figure (the whole
ASGI app, no sockets, fresh processes, minimum over rounds) moves less still.
    .venv/bin/python bench/bench_serve.py --catalogues 1m --variants recloop-ann,recloop \
        --concurrency 16 --keep /tmp/recloop-1m     # issue 15: 1M items, index vs exact

The store is Redis when one answers at --redis-url (a unique key prefix, deleted afterwards),
else each worker's in-process memory store, empty (no history, nothing to mask: lighter
work).  wrk is the Debian package; without it a bounded Python load generator runs instead
(slower than wrk and on the same cores, so its figures are a lower bound).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recloop.artifacts import (
    HeadConfig,
    PolicyNet,
    PolicySpec,
    load_artifact,
    read_manifest,
    save_artifact,
)
from recloop.encoders.base import EncoderConfig
from recloop.errors import RecloopError
from recloop.stores import RecentItem, RedisStore, open_store

SEED_REFERENCE = {16: (3800, 10.0), 64: (3300, 34.0)}
"""The seeds' FastAPI service on these cores: c → (requests/s, p99 ms)."""
TARGET = {16: (5000, 10.0), 64: (5000, 30.0)}
"""Issue 5's target: c → (requests/s at least, p99 ms at most)."""

COMPARED = "@compared"
"""Suffix of the variants run from ``--compare-src``."""
CATALOGUES = {"ml100k": (943, 1682), "100k": (943, 100_000), "1m": (943, 1_000_000)}
CLUSTERED = {"1m"}
"""Catalogues built as a dot-head policy over clustered item embeddings (see
:func:`build_artifact`): the million-item case, served exact or from an approximate index."""
TARGET_1M = (1000, 30.0)
"""Issue 15's target at c=16, 2 workers, 1M items: (requests/s at least, p99 ms at most)."""
TRAINED = "trained"
"""Catalogue name of the artifact given with ``--artifact``."""

WRK_LUA = r"""
local bodies = {}
local f = io.open(os.getenv("RECLOOP_BENCH_BODIES"), "r")
for line in f:lines() do bodies[#bodies + 1] = line end
f:close()
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

setup = function(thread)
  thread:set("offset", math.random(1, #bodies))
end

request = function()
  i = i + 1
  return wrk.format(nil, "/v1/recommend", nil, bodies[(i + (offset or 0)) % #bodies + 1])
end

done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p95_us": %d, '
    .. '"p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors, latency:percentile(50),
    latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk = shutil.which("wrk")
    wrk_v = "none"
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
        wrk_v = (out.stdout or out.stderr).split("\n")[0].strip()
    return (
        f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"torch {torch.__version__}; load generator: {wrk_v}"
    )


def clustered_items(
    n_items: int, dim: int, *, clusters: int = 1000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors (N, D) float32 with a realistic structure, and popularity counts (N,).

    Items fall into ``clusters`` topics of Zipf-distributed sizes; a vector is its topic's
    centre plus noise of 0.4 times the centre's scale, and its norm grows with the item's
    popularity (log-normal counts), as trained item vectors' norms do: inner products then
    favour popular items and the neighbours of an item are mostly its topic's, so both the
    direction and the norm matter to a maximum-inner-product search."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (clusters, dim)) / np.sqrt(dim)
    sizes = 1.0 / np.arange(1, clusters + 1) ** 0.8
    topic = rng.choice(clusters, n_items, p=sizes / sizes.sum())
    vectors = centres[topic] + rng.normal(0.0, 0.4 / np.sqrt(dim), (n_items, dim))
    counts = np.maximum(1.0, np.round(rng.lognormal(2.0, 1.5, n_items)))
    scale = 0.5 + np.log1p(counts) / np.log1p(counts).max()
    return (vectors * scale[:, None]).astype(np.float32), counts.astype(np.float32)


def build_artifact(
    directory: Path, *, n_users: int, n_items: int, seed: int = 0, clustered: bool = False
) -> Path:
    """A random-weight artifact; ``clustered``: a dot head (actor MLP to a point in the item
    space, scores = inner products, so an approximate index applies) over
    :func:`clustered_items`, else DBRL's REINFORCE policy (a linear head)."""
    torch.manual_seed(seed)
    spec = PolicySpec(
        n_users=n_users,
        n_items=n_items,
        encoder=EncoderConfig(kind="concat", history=10, embedding_dim=32),
        # DBRL's REINFORCE policy: the 352-d state through one hidden layer of 64, then
        # logits over items (recloop's default GRU policy also feeds 64-d into that layer).
        head=(
            HeadConfig(kind="dot", hidden_dims=(64,), bound_action=False)
            if clustered
            else HeadConfig(kind="linear", hidden_dims=(64,))
        ),
    )
    rng = np.random.default_rng(seed)
    pop = np.concatenate([[0.0], rng.integers(1, 500, n_items)]).astype(np.float32)
    policy = PolicyNet(spec)
    if clustered:
        vectors, counts = clustered_items(n_items, 32, seed=seed)
        with torch.no_grad():
            policy.item_embedding.weight[1:] = torch.from_numpy(vectors)
        pop = np.concatenate([[0.0], counts]).astype(np.float32)
    return save_artifact(
        directory,
        algo="reinforce",
        config={"bench": True},
        policy=policy,
        popularity=pop,
        user_ids=[str(u) for u in range(1, n_users + 1)],
        item_ids=[str(i) for i in range(1, n_items + 1)],
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_bodies(path: Path, *, user_ids: list[str], count: int = 2000, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, len(user_ids), count)
    path.write_text("".join(json.dumps({"user_id": user_ids[u], "n": 10}) + "\n" for u in users))


async def fill_store(
    url: str, prefix: str, *, user_ids: list[str], item_ids: list[str], h: int
) -> None:
    """Every user's last H items (random) and a popular list, as the stream would write."""
    store = open_store(url, prefix=prefix, timeout_s=5.0)
    rng = np.random.default_rng(2)
    items = rng.integers(0, len(item_ids), (len(user_ids), h))
    events = {
        user: [RecentItem(item_ids[i], 1.0, k, f"{u}-{k}") for k, i in enumerate(items[u].tolist())]
        for u, user in enumerate(user_ids)
    }
    await store.push_recent(events, max_len=h)
    await store.set_popular([(item_ids[i], float(100 - i)) for i in range(20)])
    await store.close()


def filled_prefix(url: str, *, user_ids: list[str], item_ids: list[str], h: int) -> str:
    """A fresh key prefix for one run; on a Redis store, :func:`fill_store` under it."""
    prefix = f"recloop-bench:{uuid.uuid4().hex}:"
    if url.startswith("redis"):
        asyncio.run(fill_store(url, prefix, user_ids=user_ids, item_ids=item_ids, h=h))
    return prefix


async def drop_store(url: str, prefix: str) -> None:
    store = open_store(url, prefix=prefix)
    if isinstance(store, RedisStore):
        await store.delete_all()
    await store.close()


async def redis_up(url: str) -> bool:
    store = open_store(url, timeout_s=0.5)
    ok = await store.ping()
    await store.close()
    return ok


BASELINE_APP = r'''
"""A seeds-style service: FastAPI parses and validates, the user's last H item indices come
from Redis, one forward pass per request, pydantic serialises; no raw-id mapping, no masking."""
import os

import redis.asyncio as aioredis
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from recloop.artifacts import load_artifact
from recloop.stores import RECENT_EVENTS_KEY, RECENT_KEY, RECENT_READ_SCRIPT

torch.set_num_threads(1)
art = load_artifact(os.environ["BASELINE_ARTIFACT"])
policy, H = art.policy, art.history_len
url, prefix = os.environ.get("BASELINE_REDIS"), os.environ.get("BASELINE_PREFIX", "")
r = aioredis.from_url(url) if url else None
read_recent = r.register_script(RECENT_READ_SCRIPT) if r is not None else None  # EVALSHA


class Req(BaseModel):
    user_id: int
    n: int = 10


class Item(BaseModel):
    item_id: int
    score: float


class Resp(BaseModel):
    items: list[Item]


# The seeds ran a FastAPI without native OpenTelemetry; switch it off for a fair comparison.
app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False,
                         "operation_spans": False})


@app.get("/readyz")
async def ready() -> dict:
    return {"status": "ready"}


@app.post("/v1/recommend", response_model=Resp)
async def recommend(req: Req) -> dict:
    hist = []
    if r is not None:
        # the store's layout, read in one round trip as recloop does; "reward item" payloads,
        # bench ids are their own indices
        u = "{" + str(req.user_id) + "}"
        keys = [f"{prefix}{RECENT_KEY}:{u}", f"{prefix}{RECENT_EVENTS_KEY}:{u}"]
        (raw,) = await read_recent(keys=keys, args=[H])  # one user's list
        hist = [int(x.split(b" ", 1)[1]) for x in raw if x is not None]
    h = torch.tensor([[0] * (H - len(hist)) + hist])
    with torch.inference_mode():
        s = policy(torch.tensor([req.user_id]), h, (h != 0).float())
        v, i = torch.topk(s, req.n)
    return {"items": [{"item_id": a, "score": b} for a, b in zip(i[0].tolist(), v[0].tolist())]}
'''

VARIANTS = {
    "recloop": "recloop serve, micro-batching on (the default)",
    "recloop-nobatch": "recloop serve, micro-batching off",
    "recloop-onnx": "recloop serve, micro-batching on, forward pass on onnxruntime",
    "recloop-softmax": "recloop serve, softmax (Plackett-Luce) sampling, T = 1",
    "recloop-epsilon": "recloop serve, epsilon-greedy, epsilon = 0.1",
    "recloop-logged-onnx": "recloop-logged with the forward pass on onnxruntime (--inference "
    "onnxruntime; the recloop[export] extra)",
    "recloop-logged": "recloop serve, softmax sampling, every served list logged (Redis "
    "stream, else SQLite)",
    "recloop-dashboard": "recloop serve while one dashboard client polls GET /dashboard/data "
    "every second (as the page does)",
    "recloop-ann": "recloop serve, top-k from the artifact's approximate index (built first "
    "with --index-kind unless the artifact has one of that kind)",
    "baseline": "seeds-style FastAPI app (pydantic in/out, no id mapping, no masking)",
}
POLICY_OF = {
    "recloop-softmax": "softmax",
    "recloop-epsilon": "epsilon",
    "recloop-logged": "softmax",
    "recloop-logged-onnx": "softmax",
}
"""Serving policy of the exploring variants (``recloop`` itself runs ``--policy``)."""
ONNX_VARIANTS = frozenset({"recloop-onnx", "recloop-logged-onnx"})
"""Variants whose forward pass runs on onnxruntime."""
LOGGED_VARIANTS = frozenset({"recloop-logged", "recloop-logged-onnx"})
"""Variants that log every served list."""


class DashboardPoller:
    """One dashboard client: GET /dashboard/data every ``every_s`` in a thread, as the page
    does while it is open; counts its polls and their latency."""

    def __init__(self, port: int, *, every_s: float = 1.0) -> None:
        import threading

        self.url = f"http://127.0.0.1:{port}/dashboard/data?window=60"
        self.every_s = every_s
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=5.0) as client:
            while not self._stop.wait(self.every_s):
                t0 = time.perf_counter()
                try:
                    ok = client.get(self.url).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok

    def __enter__(self) -> DashboardPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of process group
    ``pgid``: a server's supervisor and its uvicorn workers.  Sampled around a burst, the
    difference divided by the requests served is the service's CPU cost per request, which
    other work on a shared machine hardly moves (unlike requests/s)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        # the command name (field 2) may hold spaces: split after its closing parenthesis
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:  # fields[0] is field 3 (state); pgrp is field 5
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


class Server:
    """A service in a subprocess (its own session, so stop() reaches every worker)."""

    def __init__(self, cmd: list[str], *, port: int, env: dict[str, str]) -> None:
        self.port = port
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True)

    @classmethod
    def recloop(cls, artifact: Path, *, port: int, workers: int, env: dict[str, str]) -> Server:
        code = "import sys; from recloop.cli import main; sys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, "-q", "serve", str(artifact), "--port", str(port)]
        cmd += ["--workers", str(workers), "--log-level", "warning"]
        return cls(cmd, port=port, env=env)

    @classmethod
    def baseline(cls, app_dir: Path, *, port: int, workers: int, env: dict[str, str]) -> Server:
        (app_dir / "seed_style_app.py").write_text(BASELINE_APP)
        cmd = [sys.executable, "-m", "uvicorn", "seed_style_app:app", "--app-dir", str(app_dir)]
        cmd += ["--port", str(port), "--workers", str(workers), "--log-level", "warning"]
        cmd += ["--no-access-log", "--timeout-worker-healthcheck", "120"]
        return cls(cmd, port=port, env=env)

    def cpu_s(self) -> float:
        """CPU seconds its processes have used so far (see :func:`group_cpu_s`)."""
        return group_cpu_s(self.proc.pid)

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until /readyz answers 200 (a worker loading a million items takes a while)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1.0)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_wrk(
    port: int,
    *,
    concurrency: int,
    duration: float,
    bodies: Path,
    lua: Path,
    threads: int = 2,
) -> dict[str, Any]:
    threads = min(threads, concurrency)
    cmd = [
        "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s",
        "--timeout", "5s",
        "-s", str(lua), f"http://127.0.0.1:{port}",
    ]  # fmt: skip
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "RECLOOP_BENCH_BODIES": str(bodies)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line.removeprefix("RESULT "))
    # wrk counts non-2xx responses in summary.errors.status as well
    return {
        "requests": r["requests"],
        "rps": r["requests"] / (r["duration_us"] / 1e6),
        "p50_ms": r["p50_us"] / 1e3,
        "p95_ms": r["p95_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "errors": r["errors"],
    }


def wrk_burst(
    server: Server, *, concurrency: int, args: argparse.Namespace, bodies: Path, lua: Path
) -> dict[str, Any]:
    """One wrk run of ``args.duration`` s against ``server``, with the server's CPU per
    request (``cpu_us``, see :func:`group_cpu_s`)."""
    cpu0 = server.cpu_s()
    r = run_wrk(
        server.port,
        concurrency=concurrency,
        duration=args.duration,
        bodies=bodies,
        lua=lua,
        threads=args.wrk_threads,
    )
    r["cpu_us"] = (server.cpu_s() - cpu0) / max(r["requests"], 1) * 1e6
    return r


async def _python_load(
    port: int, *, concurrency: int, duration: float, bodies: list[bytes]
) -> dict[str, Any]:
    """A keep-alive HTTP/1.1 client per connection, bounded by ``duration``."""
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def conn(k: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k * 7919
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += 1
            req = (
                b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body
            )  # fmt: skip
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*[conn(k) for k in range(concurrency)])
    elapsed = time.perf_counter() - t0
    q = np.percentile(np.asarray(lat), [50, 95, 99]) * 1e3 if lat else [float("nan")] * 3
    return {
        "requests": len(lat),
        "rps": len(lat) / elapsed,
        "p50_ms": float(q[0]),
        "p95_ms": float(q[1]),
        "p99_ms": float(q[2]),
        "errors": errors,
    }


def ensure_index(name: str, art: Path, *, kind: str) -> None:
    """Build a ``kind`` index (recloop index build's defaults) unless ``art`` has one."""
    if (read_manifest(art).get("index") or {}).get("kind") == kind:
        return
    from recloop.artifacts.ann import IndexConfig, build_index

    cpu0 = time.process_time()
    built = build_index(art, IndexConfig(kind=kind))
    print(
        f"{name:>7} {kind} index {built.section['params']} built in {built.build_s:.1f} s wall, "
        f"{time.process_time() - cpu0:.1f} s CPU (all threads); "
        f"{built.path.stat().st_size / 2**20:.0f} MiB",
        flush=True,
    )


def bench_catalogue(
    name: str,
    *,
    args: argparse.Namespace,
    tmp: Path,
    store_url: str,
    variant: str,
) -> list[dict[str, Any]]:
    if name == TRAINED:
        art = args.artifact
        loaded = load_artifact(art)
        user_ids, item_ids, h = loaded.user_ids, loaded.item_ids, loaded.history_len
    else:
        n_users, n_items = CATALOGUES[name]
        art = (args.keep or tmp) / f"artifact-{name}"
        if not art.exists():
            t0 = time.perf_counter()
            build_artifact(art, n_users=n_users, n_items=n_items, clustered=name in CLUSTERED)
            print(f"{name:>7} artifact built in {time.perf_counter() - t0:.1f} s", flush=True)
        user_ids = [str(u) for u in range(1, n_users + 1)]
        item_ids = [str(i) for i in range(1, n_items + 1)]
        h = 10
    if variant == "recloop-ann":
        ensure_index(name, art, kind=args.index_kind)
    prefix = filled_prefix(store_url, user_ids=user_ids, item_ids=item_ids, h=h)
    bodies = tmp / "bodies.jsonl"
    write_bodies(bodies, user_ids=user_ids)
    lua = tmp / "recommend.lua"
    lua.write_text(WRK_LUA)
    port = free_port()
    if variant == "baseline":
        env = {"BASELINE_ARTIFACT": str(art), "BASELINE_PREFIX": prefix}
        if store_url.startswith("redis"):
            env["BASELINE_REDIS"] = store_url
        server = Server.baseline(tmp, port=port, workers=args.workers, env=env)
    else:
        env = {
            "RECLOOP_STORE_URL": store_url,
            "RECLOOP_STORE_PREFIX": prefix,
            "RECLOOP_MICROBATCH": "false" if variant == "recloop-nobatch" else "true",
            "RECLOOP_INFERENCE": "onnxruntime" if variant in ONNX_VARIANTS else "torch",
            "RECLOOP_POLICY": POLICY_OF.get(variant, args.policy),
            # the plain variants score every item even when the artifact has an index
            "RECLOOP_SEARCH": "ann" if variant == "recloop-ann" else "exact",
        }
        if variant in LOGGED_VARIANTS:
            if store_url.startswith("redis"):
                env["RECLOOP_BUS_URL"] = store_url
                env["RECLOOP_STREAM"] = served_stream = f"{prefix}served"
            else:
                env["RECLOOP_DATABASE_URL"] = f"sqlite:///{tmp / f'served-{uuid.uuid4().hex}.db'}"
        server = Server.recloop(art, port=port, workers=args.workers, env=env)
    rows = []
    try:
        server.wait_ready(timeout=600.0 if name in CLUSTERED else 90.0)
        use_wrk = shutil.which("wrk") is not None and not args.python_load
        body_list = [b.encode() for b in bodies.read_text().splitlines()]
        # Warm-up: first requests pay for lazy imports and connection set-up.
        if use_wrk:
            run_wrk(
                port, concurrency=4, duration=2, bodies=bodies, lua=lua, threads=args.wrk_threads
            )
        else:
            asyncio.run(_python_load(port, concurrency=4, duration=2, bodies=body_list))
        for c in args.concurrency:
            poller = DashboardPoller(port) if variant == "recloop-dashboard" else None
            with poller or contextlib.nullcontext():
                if use_wrk:
                    r = wrk_burst(server, concurrency=c, args=args, bodies=bodies, lua=lua)
                else:
                    cpu0 = server.cpu_s()
                    r = asyncio.run(
                        _python_load(port, concurrency=c, duration=args.duration, bodies=body_list)
                    )
                    r["cpu_us"] = (server.cpu_s() - cpu0) / max(r["requests"], 1) * 1e6
            if poller is not None:
                r["dashboard_polls"] = len(poller.latencies)
                r["dashboard_poll_failures"] = poller.failures
                r["dashboard_poll_median_ms"] = (
                    float(np.median(poller.latencies)) * 1e3 if poller.latencies else None
                )
            r.update(
                catalogue=name,
                concurrency=c,
                variant=variant,
                policy=env.get("RECLOOP_POLICY", "baseline"),
                load_1m=os.getloadavg()[0],
            )
            rows.append(r)
            print(
                f"{name:>7} {variant:<15} c={c:<3} "
                f"{r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.2f} ms  p95 {r['p95_ms']:6.2f} ms  "
                f"p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}  "
                f"cpu {r['cpu_us']:6.1f} us/req  load {r['load_1m']:.1f}",
                flush=True,
            )
    finally:
        server.stop()
        if variant in LOGGED_VARIANTS and store_url.startswith("redis"):
            logged = asyncio.run(_stream_length_and_drop(store_url, served_stream))
            total = sum(round(r["rps"] * args.duration) for r in rows)
            print(
                f"{name:>7} {variant:<15} lists logged on the stream: {logged} "
                f"(about {total} measured requests plus the warm-up)",
                flush=True,
            )
            for r in rows:
                r["lists_logged"] = logged
        if store_url.startswith("redis"):
            asyncio.run(drop_store(store_url, prefix))
    return rows


def bench_interleaved(
    name: str, *, args: argparse.Namespace, tmp: Path, store_url: str, variants: list[str]
) -> list[dict[str, Any]]:
    """Every variant's server up at once; short wrk bursts alternate between them, in a new
    random order each round, so a change of load on a busy machine hits all of them alike.

    Returns one row per (variant, concurrency, round); :func:`report_interleaved` compares
    variants by the median over rounds of their per-round ratio."""
    n_users, n_items = CATALOGUES[name]
    art = (args.keep or tmp) / f"artifact-{name}"
    if not art.exists():
        build_artifact(art, n_users=n_users, n_items=n_items, clustered=name in CLUSTERED)
    if "recloop-ann" in variants:
        ensure_index(name, art, kind=args.index_kind)
    user_ids = [str(u) for u in range(1, n_users + 1)]
    item_ids = [str(i) for i in range(1, n_items + 1)]
    prefix = filled_prefix(store_url, user_ids=user_ids, item_ids=item_ids, h=10)
    redis = store_url.startswith("redis")
    bodies = tmp / "bodies.jsonl"
    write_bodies(bodies, user_ids=user_ids)
    lua = tmp / "recommend.lua"
    lua.write_text(WRK_LUA)
    servers: dict[str, Server] = {}
    streams: list[str] = []
    rows: list[dict[str, Any]] = []
    if args.compare_src is not None:
        # each recloop variant once more, from the other source tree, in the same rounds
        variants = variants + [f"{v}{COMPARED}" for v in variants if v != "baseline"]
    try:
        for label in variants:
            port = free_port()
            v = label.removesuffix(COMPARED)
            if v == "baseline":
                env = {"BASELINE_ARTIFACT": str(art), "BASELINE_PREFIX": prefix}
                if redis:
                    env["BASELINE_REDIS"] = store_url
                servers[v] = Server.baseline(tmp, port=port, workers=args.workers, env=env)
                continue
            env = {
                "RECLOOP_STORE_URL": store_url,
                "RECLOOP_STORE_PREFIX": prefix,
                "RECLOOP_MICROBATCH": "false" if v == "recloop-nobatch" else "true",
                "RECLOOP_INFERENCE": "onnxruntime" if v in ONNX_VARIANTS else "torch",
                "RECLOOP_POLICY": POLICY_OF.get(v, args.policy),
                "RECLOOP_SEARCH": "ann" if v == "recloop-ann" else "exact",
            }
            if v in LOGGED_VARIANTS:
                if redis:
                    env["RECLOOP_BUS_URL"] = store_url
                    env["RECLOOP_STREAM"] = f"{prefix}served:{label}"
                    streams.append(env["RECLOOP_STREAM"])
                else:
                    env["RECLOOP_DATABASE_URL"] = (
                        f"sqlite:///{tmp / f'served-{uuid.uuid4().hex}.db'}"
                    )
            if v != label:  # the compared source tree's recloop comes first on the path
                src = str(args.compare_src.resolve())
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (src, os.environ.get("PYTHONPATH")) if p
                )
            servers[label] = Server.recloop(art, port=port, workers=args.workers, env=env)
        for server in servers.values():
            server.wait_ready(timeout=600.0 if name in CLUSTERED else 90.0)
        for server in servers.values():  # warm-up
            run_wrk(
                server.port,
                concurrency=4,
                duration=2,
                bodies=bodies,
                lua=lua,
                threads=args.wrk_threads,
            )
        order = np.random.default_rng(0)
        for c in args.concurrency:
            for k in range(args.rounds):
                for v in order.permutation(variants).tolist():
                    r = wrk_burst(servers[v], concurrency=c, args=args, bodies=bodies, lua=lua)
                    r.update(
                        catalogue=name,
                        concurrency=c,
                        variant=v,
                        round=k,
                        policy=POLICY_OF.get(v.removesuffix(COMPARED), args.policy),
                        load_1m=os.getloadavg()[0],
                    )
                    rows.append(r)
                    print(
                        f"{name:>7} {v:<24} c={c:<3} round {k:<2} {r['rps']:8.0f} req/s  "
                        f"p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}  "
                        f"cpu {r['cpu_us']:6.1f} us/req  load {r['load_1m']:.1f}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
        for stream in streams:
            logged = asyncio.run(_stream_length_and_drop(store_url, stream))
            which = stream.rpartition(":")[2]
            print(f"{name:>7} {which} lists logged on the stream: {logged}", flush=True)
        if redis:
            asyncio.run(drop_store(store_url, prefix))
    return rows


def report_interleaved(rows: list[dict[str, Any]]) -> None:
    """Per variant and concurrency: median req/s and p99 over rounds, and the median over
    rounds of the ratio to the baseline and to topk measured in the same round."""
    by: dict[tuple[str, int, int], dict[str, Any]] = {
        (r["variant"], r["concurrency"], r["round"]): r for r in rows
    }
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    concurrencies = sorted({r["concurrency"] for r in rows})
    rounds = sorted({r["round"] for r in rows})
    print("\ninterleaved rounds: medians over rounds; ratios are per round, then the median")
    for c in concurrencies:
        for v in variants:
            got = [by[(v, c, k)] for k in rounds if (v, c, k) in by]
            rps = float(np.median([g["rps"] for g in got]))
            p99 = float(np.median([g["p99_ms"] for g in got]))
            cpu = float(np.median([g["cpu_us"] for g in got]))
            line = f"  c={c:<3} {v:<25} {rps:7.0f} req/s  p99 {p99:7.1f} ms  cpu {cpu:6.1f} us/req"
            # topk of the same source tree; and a variant's run from --compare-src
            refs = ["baseline", "recloop" + (COMPARED if v.endswith(COMPARED) else "")]
            refs += [] if v.endswith(COMPARED) else [v + COMPARED]
            for ref in refs:
                if ref == v or not all((ref, c, k) in by for k in rounds):
                    continue
                ratios = [by[(v, c, k)]["rps"] / by[(ref, c, k)]["rps"] for k in rounds]
                lo, hi = min(ratios), max(ratios)
                cpu_ratio = np.median(
                    [by[(v, c, k)]["cpu_us"] / by[(ref, c, k)]["cpu_us"] for k in rounds]
                )
                line += (
                    f"  / {ref}: {np.median(ratios):.2f}x (range {lo:.2f}-{hi:.2f}), "
                    f"cpu {cpu_ratio:.2f}x"
                )
            print(line)


async def _stream_length_and_drop(url: str, stream: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    try:
        n = int(await client.xlen(stream))
        await client.delete(stream)
        return n
    finally:
        await client.aclose()


def dashboard_cost(tmp: Path, store_url: str, *, requests: int = 3000, polls: int = 300) -> None:
    """CPU cost of the dashboard next to the requests it watches, in one process.

    The whole app (middleware, routes, the ml100k artifact, the store as for the HTTP runs)
    behind an in-process ASGI client: CPU seconds (``process_time``) per ``POST
    /v1/recommend``, per ``GET /dashboard/data`` and per sampler reading.  One open page
    costs one poll and (per worker) one reading a second, so its share of a saturated
    service is (poll + workers x reading) / (workers x 1 s); unlike the HTTP ratio, this
    does not drown in the noise of a busy machine.
    """
    import httpx

    from recloop.serving.app import create_app
    from recloop.serving.settings import ServeSettings

    n_users, n_items = CATALOGUES["ml100k"]
    art = tmp / "artifact-ml100k"
    if not art.exists():
        build_artifact(art, n_users=n_users, n_items=n_items)
    prefix = f"recloop-bench:{uuid.uuid4().hex}:"
    redis = store_url.startswith("redis")
    app = create_app(
        ServeSettings(artifact=art, store_url=store_url, store_prefix=prefix, gc_freeze=False)
    )
    rng = np.random.default_rng(0)
    bodies = [{"user_id": str(u)} for u in rng.integers(1, n_users + 1, requests)]

    async def run() -> dict[str, float]:
        if redis:
            ids = [str(i) for i in range(1, n_items + 1)]
            user_ids = [str(u) for u in range(1, n_users + 1)]
            await fill_store(store_url, prefix, user_ids=user_ids, item_ids=ids, h=10)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:
                for body in bodies[:200]:  # warm-up
                    await c.post("/v1/recommend", json=body)
                t0 = time.process_time()
                for body in bodies:
                    await c.post("/v1/recommend", json=body)
                per_request = (time.process_time() - t0) / len(bodies)
                t0 = time.process_time()
                for _ in range(polls):
                    r = await c.get("/dashboard/data?window=60")
                    assert r.status_code == 200
                per_poll = (time.process_time() - t0) / polls
                sampler = app.state.dashboard_sampler
                t0 = time.process_time()
                for _ in range(polls):
                    sampler.sample()
                per_sample = (time.process_time() - t0) / polls
        if redis:
            await drop_store(store_url, prefix)
        return {"request": per_request, "poll": per_poll, "sample": per_sample}

    got = asyncio.run(run())
    print("\ndashboard cost in-process (CPU time, one process):")
    for k in ("request", "poll", "sample"):
        print(f"  {k:<8} {got[k] * 1e6:9.1f} us")
    for workers in (1, 2):
        share = (got["poll"] + workers * got["sample"]) / workers
        print(
            f"  one page polling each second, {workers} worker(s): {share:.3%} of the service's "
            f"CPU (= {share / got['request']:.2f} requests' worth per worker-second; target < 2 %)"
        )


def in_process_cost(args: argparse.Namespace, tmp: Path, store_url: str) -> None:
    """CPU cost per request of each serving policy, without HTTP or a load generator.

    The service itself (one process, the ml100k artifact, the store as for the HTTP runs)
    answers micro-batches of 16 requests with ``recommend_many``; rounds interleave
    topk, softmax, epsilon and softmax with served-list logging (Redis stream, else
    SQLite), and each one's median round is reported, with its ratio to topk.  On a loaded
    machine these ratios are far steadier than the HTTP ones.
    """
    from recloop.serving.metrics import ServiceMetrics
    from recloop.serving.schemas import RecommendRequest
    from recloop.serving.served_log import BusSink, ServedLog, SqlSink
    from recloop.serving.service import LoadedModel, RecommenderService
    from recloop.serving.settings import ServeSettings

    n_users, n_items = CATALOGUES["ml100k"]
    art = tmp / "artifact-ml100k"
    if not art.exists():
        build_artifact(art, n_users=n_users, n_items=n_items)
    user_ids = [str(u) for u in range(1, n_users + 1)]
    prefix = f"recloop-bench:{uuid.uuid4().hex}:"
    redis = store_url.startswith("redis")
    cases = {"topk": "topk", "softmax": "softmax", "epsilon": "epsilon", "softmax+log": "softmax"}

    async def run() -> dict[str, list[float]]:
        if redis:
            await fill_store(
                store_url,
                prefix,
                user_ids=user_ids,
                item_ids=[str(i) for i in range(1, n_items + 1)],
                h=10,
            )
        model = LoadedModel.load(art)
        store = open_store(store_url, prefix=prefix, timeout_s=1.0)
        rng = np.random.default_rng(0)
        batches = [
            [RecommendRequest(user_id=str(u)) for u in rng.integers(1, n_users + 1, 16)]
            for _ in range(50)
        ]
        times: dict[str, list[float]] = {c: [] for c in cases}
        try:
            for _ in range(args.rounds * 3):
                for case, policy in cases.items():
                    settings = ServeSettings(artifact=art, policy=policy, microbatch=False)
                    metrics = ServiceMetrics()
                    log = None
                    if case.endswith("+log"):
                        sink = (
                            BusSink(store_url, stream=f"{prefix}served")
                            if redis
                            else SqlSink(f"sqlite:///{tmp / 'served-inproc.db'}")
                        )
                        log = ServedLog(sink, metrics=metrics)
                        log.start()
                    svc = RecommenderService(
                        settings=settings, store=store, model=model, metrics=metrics,
                        served_log=log,
                    )  # fmt: skip
                    t0 = time.process_time()
                    for b in batches:
                        await svc.recommend_many(b)
                    if log is not None:
                        await log.close()  # the drain's work is part of the cost
                    times[case].append((time.process_time() - t0) / (16 * len(batches)) * 1e6)
        finally:
            await store.close()
            if redis:
                await drop_store(store_url, prefix)
        return times

    times = asyncio.run(run())
    print("\nin-process CPU cost per request (micro-batches of 16, median of the rounds):")
    base = float(np.median(times["topk"]))
    for case, ts in times.items():
        med = float(np.median(ts))
        print(f"  {case:<12} {med:7.1f} us/request  topk / this: {base / med:.2f}x")


def median_rounds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (catalogue, variant, concurrency): the round with the median req/s."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["catalogue"], r["variant"], r["concurrency"]), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r["rps"])
        out.append({**ranked[(len(ranked) - 1) // 2], "rounds": len(ranked)})
    return out


def report(rows: list[dict[str, Any]]) -> None:
    """Ratios measured in this run, and the issue's absolute targets."""
    by = {(r["catalogue"], r["variant"], r["concurrency"]): r for r in rows}
    print("\nratios in this run (requests/s; p99):")
    for (cat, v, c), r in by.items():
        if v == "baseline":
            continue
        base = by.get((cat, "baseline", c))
        if base is not None:
            print(
                f"  {cat:>7} c={c:<3} {v} / baseline: {r['rps'] / base['rps']:.2f}x req/s, "
                f"p99 {r['p99_ms']:.1f} vs {base['p99_ms']:.1f} ms"
            )
        top = by.get((cat, "recloop", c))
        if v in POLICY_OF and top is not None:
            print(
                f"  {cat:>7} c={c:<3} {v} / recloop ({top.get('policy', 'topk')}): "
                f"{r['rps'] / top['rps']:.2f}x req/s, p99 {r['p99_ms']:.1f} vs "
                f"{top['p99_ms']:.1f} ms (target: >= 0.80x)"
            )
        if v == "recloop-dashboard" and top is not None:
            print(
                f"  {cat:>7} c={c:<3} dashboard polled / not: {r['rps'] / top['rps']:.3f}x "
                f"req/s ({r['dashboard_polls']} polls, {r['dashboard_poll_failures']} failed, "
                f"median {r['dashboard_poll_median_ms'] or float('nan'):.1f} ms; target: the "
                "dashboard costs < 2 %, >= 0.98x)"
            )
        nob = by.get((cat, "recloop-nobatch", c))
        if v == "recloop" and nob is not None:
            print(f"  {cat:>7} c={c:<3} micro-batching on / off: {r['rps'] / nob['rps']:.2f}x")
    issue12 = [(v, c, by.get(("ml100k", v, c)), by.get(("ml100k", "baseline", c)))
               for v in sorted(LOGGED_VARIANTS) for c in (16, 64)]  # fmt: skip
    if any(r is not None and b is not None for _, _, r, b in issue12):
        print("\nissue 12 (ml-100k, softmax sampling + every served list logged, same run):")
        for v, c, r, b in issue12:
            if r is None or b is None:
                continue
            ratio = r["rps"] / b["rps"]
            p99_ok = c != 16 or r["p99_ms"] <= 5.0
            print(
                f"  c={c}: {v} / baseline {ratio:.2f}x (target >= 1.5x), p99 "
                f"{r['p99_ms']:.1f} ms{' (target <= 5 ms)' if c == 16 else ''}: "
                f"{'met' if ratio >= 1.5 and p99_ok else 'NOT met'}"
            )
    one_m = [(v, by.get(("1m", v, 16))) for v in ("recloop", "recloop-ann")]
    if any(r is not None for _, r in one_m):
        tgt_rps, tgt_p99 = TARGET_1M
        print("\nissue 15 (1M items, c=16; the target assumes 2 workers on a quiet machine):")
        for v, r in one_m:
            if r is None:
                continue
            ok = r["rps"] >= tgt_rps and r["p99_ms"] <= tgt_p99
            print(
                f"  {v}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.1f} ms, server CPU "
                f"{r['cpu_us'] / 1e3:.2f} ms/request; target >= "
                f"{tgt_rps} req/s with p99 <= {tgt_p99:g} ms: {'met' if ok else 'NOT met'}"
            )
    print(
        "\nissue 5 (ml-100k, recloop): the seeds reached 3,800 req/s (p99 10 ms) at c=16 and "
        "3,300 (p99 34 ms) at c=64 on these cores; the target ratio over the seeds is "
        f"{TARGET[16][0] / SEED_REFERENCE[16][0]:.2f}x at c=16, "
        f"{TARGET[64][0] / SEED_REFERENCE[64][0]:.2f}x at c=64"
    )
    for c, (tgt_rps, tgt_p99) in TARGET.items():
        r = by.get(("ml100k", "recloop", c))
        if r is None:
            continue
        ok = r["rps"] >= tgt_rps and r["p99_ms"] <= tgt_p99
        print(
            f"  c={c}: {r['rps']:.0f} req/s, p99 {r['p99_ms']:.1f} ms; target >= {tgt_rps} req/s "
            f"with p99 <= {tgt_p99:g} ms: {'met' if ok else 'NOT met'}"
        )


APP_COST_VARIANTS = (
    "baseline",
    "recloop",
    "recloop-softmax",
    "recloop-logged",
    "recloop-logged-onnx",
)
"""Variants :func:`app_cost` measures (each in a fresh process)."""


def app_cost_child(variant: str, *, store_url: str, requests: int, concurrency: int) -> None:
    """One variant's app in this process, behind no server: ``concurrency`` tasks send
    ``requests`` POST /v1/recommend through the ASGI app (so micro-batches form as under
    a server), and the CPU seconds of the process per request are printed as a JSON line.
    Everything the app does is counted; the HTTP parsing and socket writes of uvicorn are
    not."""
    import gc
    import importlib.util

    n_users, n_items = CATALOGUES["ml100k"]
    tmp = Path(tempfile.mkdtemp(prefix="recloop-appcost-"))
    art = build_artifact(tmp / "artifact", n_users=n_users, n_items=n_items)
    user_ids = [str(u) for u in range(1, n_users + 1)]
    item_ids = [str(i) for i in range(1, n_items + 1)]
    prefix = filled_prefix(store_url, user_ids=user_ids, item_ids=item_ids, h=10)
    redis = store_url.startswith("redis")
    rng = np.random.default_rng(1)
    bodies = [
        json.dumps({"user_id": user_ids[u], "n": 10}).encode()
        for u in rng.integers(0, n_users, 2000)
    ]
    if variant == "baseline":
        os.environ.update(BASELINE_ARTIFACT=str(art), BASELINE_PREFIX=prefix)
        if redis:
            os.environ["BASELINE_REDIS"] = store_url
        (tmp / "seed_style_app.py").write_text(BASELINE_APP)
        spec = importlib.util.spec_from_file_location("seed_style_app", tmp / "seed_style_app.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        app = module.app
    else:
        from recloop.serving.app import create_app
        from recloop.serving.settings import ServeSettings

        extra: dict[str, Any] = {}
        if variant in LOGGED_VARIANTS:
            if redis:
                extra = {"bus_url": store_url, "stream": f"{prefix}served"}
            else:
                extra = {"database_url": f"sqlite:///{tmp / 'served.db'}"}
        settings = ServeSettings(
            artifact=art,
            store_url=store_url,
            store_prefix=prefix,
            policy=POLICY_OF.get(variant, "topk"),
            inference="onnxruntime" if variant in ONNX_VARIANTS else "torch",
            **extra,
        )
        app = create_app(settings)

    async def one(body: bytes) -> int:
        status = 0
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": "/v1/recommend",
            "raw_path": b"/v1/recommend", "query_string": b"", "root_path": "",
            "headers": [
                (b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {},
        }  # fmt: skip
        await app(scope, receive, send)
        return status

    async def load(n: int) -> None:
        async def client(k: int) -> None:
            for i in range(k, n, concurrency):
                status = await one(bodies[i % len(bodies)])
                if status != 200:
                    raise RuntimeError(f"{variant}: status {status}")

        await asyncio.gather(*(client(k) for k in range(concurrency)))

    async def run() -> float:
        async with app.router.lifespan_context(app):
            await load(400)  # warm-up
            gc.collect()
            t0 = time.process_time()
            await load(requests)
            return (time.process_time() - t0) / requests

    try:
        per_request = asyncio.run(run())
    finally:
        if redis:
            asyncio.run(drop_store(store_url, prefix))
    print("APPCOST " + json.dumps({"variant": variant, "cpu_us": per_request * 1e6}), flush=True)


def app_cost(args: argparse.Namespace, store_url: str) -> None:
    """CPU per request of each variant's app in-process (:func:`app_cost_child`), each run
    in a fresh process, rounds interleaved in a new random order; with ``--compare-src``
    the recloop variants also run from that source tree.  Unlike the HTTP runs, a busy
    machine hardly moves the minimum over rounds, which is reported beside the median."""
    labels = [(v, None) for v in APP_COST_VARIANTS]
    if args.compare_src is not None:
        labels += [(v, args.compare_src.resolve()) for v in APP_COST_VARIANTS if v != "baseline"]
    got: dict[str, list[float]] = {}
    order = np.random.default_rng(0)
    concurrency = args.concurrency[0]
    for _ in range(args.rounds):
        for i in order.permutation(len(labels)).tolist():
            variant, src = labels[i]
            env = dict(os.environ)
            if src is not None:
                env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(src), env.get("PYTHONPATH")) if p
                )
            cmd = [sys.executable, __file__, "--app-cost-child", variant]
            cmd += ["--redis-url", store_url, "--concurrency", str(concurrency)]
            if store_url == "memory://":
                cmd.append("--memory-store")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = next((x for x in out.stdout.splitlines() if x.startswith("APPCOST ")), None)
            if line is None:
                raise RuntimeError(f"{variant}: {out.stderr.strip()[-2000:]}")
            label = variant + (COMPARED if src is not None else "")
            got.setdefault(label, []).append(json.loads(line.removeprefix("APPCOST "))["cpu_us"])
            print(f"  {label:<25} {got[label][-1]:7.1f} us/request", flush=True)
    print(
        f"\nin-process app CPU per request ({concurrency} concurrent clients, the whole ASGI "
        f"app, {args.rounds} rounds; min and median over rounds):"
    )
    base = float(np.min(got["baseline"]))
    for label, ts in got.items():
        lo, med = float(np.min(ts)), float(np.median(ts))
        line = f"  {label:<25} min {lo:7.1f}  median {med:7.1f} us/request"
        line += f"  / baseline {lo / base:.2f}x"
        top_label = "recloop" + (COMPARED if label.endswith(COMPARED) else "")
        topk = got.get(top_label)
        if topk is not None and label not in ("baseline", top_label):
            line += f"  / recloop {lo / float(np.min(topk)):.2f}x"
        if label + COMPARED in got:
            line += f"  / {label + COMPARED} {lo / float(np.min(got[label + COMPARED])):.2f}x"
        print(line)


EMPTY_APP = r"""
BODY = b'{"items":["1","2","3","4","5","6","7","8","9","10"]}'


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
"""
"""An ASGI app that answers every request with a fixed body and does nothing else."""

PROTOCOLS = {
    "httptools": "httptools",
    "corked": "recloop.serving.http_protocol:CorkedHttpToolsProtocol",
}
"""``--protocol-cost``'s HTTP protocols: uvicorn's own, and recloop serve's."""


def protocol_cost(args: argparse.Namespace) -> None:
    """req/s and p99 of :data:`EMPTY_APP` under uvicorn with each of :data:`PROTOCOLS`,
    ``--workers`` workers, wrk at each ``--concurrency``; the protocols alternate in each of
    ``--rounds`` rounds and the medians are reported.  What the server alone costs, and what
    sending a response's head and body in one write saves of it."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="recloop-bench-") as d:
        tmp = Path(d)
        (tmp / "emptyapp.py").write_text(EMPTY_APP)
        bodies = tmp / "bodies.jsonl"
        bodies.write_text('{"user_id": "1"}\n')
        lua = tmp / "empty.lua"
        lua.write_text(WRK_LUA)
        for k in range(args.rounds):
            for name, http in PROTOCOLS.items():
                port = free_port()
                cmd = [sys.executable, "-m", "uvicorn", "emptyapp:app", "--app-dir", str(tmp)]
                cmd += ["--port", str(port), "--workers", str(args.workers)]
                cmd += ["--log-level", "warning", "--no-access-log", "--http", http]
                server = Server(cmd, port=port, env={})
                try:
                    server.wait_ready()
                    run_wrk(
                        port,
                        concurrency=4,
                        duration=1,
                        bodies=bodies,
                        lua=lua,
                        threads=args.wrk_threads,
                    )
                    for c in args.concurrency:
                        r = wrk_burst(server, concurrency=c, args=args, bodies=bodies, lua=lua)
                        r.update(protocol=name, concurrency=c, round=k)
                        rows.append(r)
                        print(
                            f"  {name:10s} c={c:<3d} round {k}  {r['rps']:8.0f} req/s  "
                            f"p50 {r['p50_ms']:5.2f}  p99 {r['p99_ms']:6.2f} ms  "
                            f"cpu {r['cpu_us']:5.1f} us/req",
                            flush=True,
                        )
                finally:
                    server.stop()
    print("empty ASGI app, medians over rounds:")
    for c in args.concurrency:
        med = {}
        for name in PROTOCOLS:
            rs = [r for r in rows if r["protocol"] == name and r["concurrency"] == c]
            med[name] = {
                key: float(np.median([r[key] for r in rs])) for key in ("rps", "p99_ms", "cpu_us")
            }
            print(
                f"  c={c:<3d} {name:10s} {med[name]['rps']:8.0f} req/s  "
                f"p99 {med[name]['p99_ms']:6.2f} ms  cpu {med[name]['cpu_us']:5.1f} us/req"
            )
        ratio = med["corked"]["rps"] / med["httptools"]["rps"]
        print(f"  c={c:<3d} corked / httptools: {ratio:.2f}x req/s")


def sampler_cost() -> None:
    """µs per served list of the softmax (Plackett–Luce) sampler alone, at the batch sizes
    a worker sees: ml-100k's catalogue (N = 1,683 columns, padding and 10 consumed items
    masked), n = 10, T = 1, each row's seeded draws included; the minimum over 7 repeats."""
    import timeit

    from recloop.serving.exploration import sample_plackett_luce_many

    rng = np.random.default_rng(0)
    n_cols = CATALOGUES["ml100k"][1] + 1
    print(f"softmax sampler, N = {n_cols}, n = 10 ({machine()}):")
    for b in (1, 2, 4, 8, 16, 32):
        scores = rng.normal(size=(b, n_cols))
        scores[:, :11] = -np.inf
        seeds = rng.integers(0, 2**63, b).tolist()
        draw = functools.partial(
            sample_plackett_luce_many,
            scores,
            np.full(b, 10),
            temperature=np.ones(b),
            seeds=seeds,
        )
        per_call = min(timeit.repeat(draw, number=300, repeat=7)) / 300
        print(f"  batch {b:2d}: {per_call / b * 1e6:6.1f} us per list", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--catalogues",
        default=None,
        help="ml100k, 100k and/or 1m (default: ml100k,100k, or none with --artifact)",
    )
    ap.add_argument(
        "--artifact",
        type=Path,
        help="also bench this trained artifact (a run directory or its artifact/), "
        f"reported as catalogue {TRAINED!r}; the baseline then reads raw ids as indices",
    )
    ap.add_argument("--concurrency", default="1,16,64", help="comma-separated connection counts")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--redis-url", default=os.environ.get("RECLOOP_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    ap.add_argument("--memory-store", action="store_true", help="skip Redis even when it answers")
    ap.add_argument(
        "--variants",
        default="recloop,baseline",
        help=f"comma-separated, run in this order: {', '.join(VARIANTS)}",
    )
    ap.add_argument(
        "--policy",
        choices=["topk", "softmax", "epsilon"],
        default="topk",
        help="serving policy of the plain recloop variants (the exploring variants "
        "recloop-softmax, recloop-epsilon and recloop-logged set their own)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the variants this many times, interleaved; report each one's median",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="also measure each policy's CPU cost per request in-process (no HTTP)",
    )
    ap.add_argument(
        "--dashboard-cost",
        action="store_true",
        help="also measure the dashboard's CPU cost per poll in-process, beside a request's",
    )
    ap.add_argument("--python-load", action="store_true", help="use the Python load generator")
    ap.add_argument(
        "--wrk-threads",
        type=int,
        default=2,
        help="wrk's threads (at most one per connection); each is one more busy thread on "
        "the cores the services use",
    )
    ap.add_argument(
        "--index-kind",
        choices=["ivf", "hnsw"],
        default="ivf",
        help="index the recloop-ann variant builds (recloop index build defaults otherwise)",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="start every variant's server at once and alternate short wrk bursts between "
        "them each round (steadier ratios on a busy machine; needs wrk)",
    )
    ap.add_argument(
        "--compare-src",
        type=Path,
        help="with --interleave: also run every recloop variant from this source directory "
        "(e.g. `git archive REV src | tar -x -C DIR`, then DIR/src), named VARIANT"
        f"{COMPARED}, in the same rounds: a change's before and after on the same load",
    )
    ap.add_argument(
        "--app-cost",
        action="store_true",
        help="measure each variant's app CPU per request in-process, in fresh processes "
        "(baseline, recloop, recloop-softmax, recloop-logged; with --compare-src also "
        "from that tree); the first --concurrency is the number of concurrent clients",
    )
    ap.add_argument("--app-cost-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--sampler-cost",
        action="store_true",
        help="only time the softmax sampler per served list at batch sizes 1-32, and exit",
    )
    ap.add_argument(
        "--protocol-cost",
        action="store_true",
        help="only serve an ASGI app that does nothing, under uvicorn's httptools protocol "
        "and recloop serve's (one write per response), alternated --rounds times, and exit",
    )
    ap.add_argument(
        "--keep",
        type=Path,
        help="build the synthetic catalogues' artifacts (and indexes) in this directory and "
        "reuse them in later runs (the 1M one takes minutes; bench_ann.py --keep shares it)",
    )
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.sampler_cost:
        sampler_cost()
        return
    if args.protocol_cost:
        if shutil.which("wrk") is None:
            ap.error("--protocol-cost needs wrk (apt-get install -y wrk)")
        print(f"machine: {machine()}")
        print(f"load average at start (1, 5, 15 min): {os.getloadavg()}")
        print(f"wrk with {args.wrk_threads} thread(s), {args.workers} uvicorn workers")
        protocol_cost(args)
        print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
        return
    if args.app_cost_child:  # one measurement of --app-cost, in its own process
        store_url = "memory://" if args.memory_store else args.redis_url
        app_cost_child(
            args.app_cost_child, store_url=store_url, requests=3000, concurrency=args.concurrency[0]
        )
        return
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.catalogues is None:
        args.catalogues = "" if args.artifact else "ml100k,100k"
    catalogues = [c for c in args.catalogues.split(",") if c]
    unknown = set(catalogues) - set(CATALOGUES)
    if unknown:
        ap.error(f"unknown catalogues {sorted(unknown)}; known: {', '.join(CATALOGUES)}")
    if args.artifact is not None:
        try:
            load_artifact(args.artifact)
        except RecloopError as exc:
            ap.error(f"--artifact: {exc}")
        catalogues.append(TRAINED)
    if not catalogues and not args.in_process and not args.dashboard_cost and not args.app_cost:
        ap.error("nothing to bench: give --catalogues or --artifact")

    print(f"machine: {machine()}")
    print(f"load average at start (1, 5, 15 min): {os.getloadavg()}")
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install -y wrk); using the Python load generator")
    elif not args.python_load:
        print(f"load: wrk with {args.wrk_threads} thread(s) on the same cores")
    use_redis = not args.memory_store and asyncio.run(redis_up(args.redis_url))
    store_url = args.redis_url if use_redis else "memory://"
    print(f"store: {'redis ' + args.redis_url if use_redis else 'in-process memory (per worker)'}")
    print(f"servers: {args.workers} uvicorn workers on 127.0.0.1, {args.duration:g} s per run:")
    for v in variants:
        print(f"  {v}: {VARIANTS[v]}")
    rows: list[dict[str, Any]] = []
    if args.app_cost:
        app_cost(args, store_url)
        if not catalogues:
            print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
            return
    if args.compare_src is not None and not (args.interleave or args.app_cost):
        ap.error("--compare-src needs --interleave or --app-cost")
    if args.interleave:
        if shutil.which("wrk") is None:
            ap.error("--interleave needs wrk (apt-get install -y wrk)")
        with tempfile.TemporaryDirectory(prefix="recloop-bench-") as d:
            for name in catalogues:
                rows += bench_interleaved(
                    name, args=args, tmp=Path(d), store_url=store_url, variants=variants
                )
        report_interleaved(rows)
        print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    with tempfile.TemporaryDirectory(prefix="recloop-bench-") as d:
        tmp = Path(d)
        for name in catalogues:
            # Rounds interleave the variants, so that a change of load on the machine during
            # the run hits every variant alike; the report takes each one's median round.
            for _ in range(args.rounds):
                for v in variants:
                    rows += bench_catalogue(
                        name, args=args, tmp=tmp, store_url=store_url, variant=v
                    )
        if args.in_process:
            in_process_cost(args, tmp, store_url)
        if args.dashboard_cost:
            dashboard_cost(tmp, store_url)
    rows = median_rounds(rows)

    report(rows)
    print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
