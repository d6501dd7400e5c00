"""Recall@10 of the approximate item index against exact scoring, at a million items.

Builds bench_serve's ``1m`` artifact (a dot-head policy over clustered item vectors whose
norms grow with popularity, see ``bench_serve.clustered_items``), draws query requests
(random known users, histories of H items drawn by popularity, those items masked as the
service masks consumed items), ranks them exactly (every item scored) and through each
index kind at several search settings, all through the service's own code
(``LoadedModel.score`` / ``score_ann``: index candidates, exact rescoring, the shared
tie-break).  Reports per kind the build time (wall and CPU), the index size, and per search
setting recall@10 and the latency of one request (batch 1, one thread: a worker's cost).

    .venv/bin/python bench/bench_ann.py                      # 1M items, hnsw and ivf
    .venv/bin/python bench/bench_ann.py --items 100000 --queries 300   # quicker
    .venv/bin/python bench/bench_ann.py --kinds hnsw --ef 32,64,128 --keep /tmp/ann-1m
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from bench_serve import build_artifact, machine
from recloop.artifacts import read_manifest
from recloop.artifacts.ann import INDEX_FILE, IndexConfig, build_index
from recloop.serving.service import LoadedModel

K = 10
N_USERS = 943
H = 10


def make_requests(model: LoadedModel, n: int, *, seed: int = 5) -> dict[str, np.ndarray]:
    """``n`` requests: known users, H-item histories drawn by train popularity (masked)."""
    rng = np.random.default_rng(seed)
    counts = model.train_counts[1:].astype(np.float64)
    history = rng.choice(model.n_items, (n, H), p=counts / counts.sum()).astype(np.int64) + 1
    return {
        "user": rng.integers(1, N_USERS + 1, n).astype(np.int64),
        "history": history,
        "history_reward": np.ones((n, H), np.float32),
        "exclude_rows": np.repeat(np.arange(n, dtype=np.int64), H),
        "exclude_cols": history.reshape(-1),
    }


def rows(req: dict[str, np.ndarray], sel: slice) -> dict[str, np.ndarray]:
    """Requests ``sel`` of ``req``, exclusions renumbered."""
    out = {k: req[k][sel] for k in ("user", "history", "history_reward")}
    b = len(out["user"])
    out["exclude_rows"] = np.repeat(np.arange(b, dtype=np.int64), H)
    out["exclude_cols"] = out["history"].reshape(-1)
    return out


def top_lists(score: Any, req: dict[str, np.ndarray], batch: int) -> np.ndarray:
    n = len(req["user"])
    out = [score(**rows(req, slice(i, i + batch)), k=K)[0] for i in range(0, n, batch)]
    return np.concatenate(out)


def latency(score: Any, req: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """Batch-1 wall latency (median, p99) and CPU per request over ``n`` requests."""
    walls = []
    cpu0 = time.process_time()
    for i in range(n):
        t0 = time.perf_counter()
        score(**rows(req, slice(i, i + 1)), k=K)
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) / n
    return {
        "p50_ms": float(np.median(walls)) * 1e3,
        "p99_ms": float(np.quantile(walls, 0.99)) * 1e3,
        "cpu_ms": cpu * 1e3,
    }


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / K for g, w in zip(got, want, strict=True)]))


def rss_mib() -> float:
    """This process's resident memory now."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000, help="requests for recall@10")
    ap.add_argument("--latency-queries", type=int, default=200, help="batch-1 requests timed")
    ap.add_argument("--kinds", default="ivf,hnsw", help="the last one stays in the artifact")
    ap.add_argument("--ef", default="32,64,128,256", help="hnsw ef_search values")
    ap.add_argument("--nprobe", default="8,16,32,64", help="ivf nprobe values")
    ap.add_argument("--margin", type=int, default=16, help="candidates beyond k + masked")
    ap.add_argument(
        "--keep",
        type=Path,
        help="build (or reuse) the artifact in this directory, as artifact-1m for 1M items "
        "(bench_serve.py --keep DIR then serves it, with the index built last)",
    )
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}")
    print(f"load average at start (1, 5, 15 min): {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="recloop-ann-") as d:
        name = "1m" if args.items == 1_000_000 else str(args.items)
        art = (args.keep or Path(d)) / f"artifact-{name}"
        if not (art / "manifest.json").exists():
            t0 = time.perf_counter()
            build_artifact(art, n_users=N_USERS, n_items=args.items, clustered=True)
            print(f"artifact of {args.items} items built in {time.perf_counter() - t0:.1f} s")
        exact = LoadedModel.load(art, search="exact")
        req = make_requests(exact, args.queries)
        t0 = time.perf_counter()
        want = top_lists(exact.score, req, 64)
        print(
            f"exact top-{K} of {args.queries} requests (batches of 64): "
            f"{time.perf_counter() - t0:.1f} s"
        )
        lat = latency(exact.score, req, min(args.latency_queries, 100))
        print(
            f"exact, batch 1: p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
            f"CPU {lat['cpu_ms']:.2f} ms/request; load {os.getloadavg()[0]:.1f}"
        )
        results: list[dict[str, Any]] = [{"kind": "exact", "recall_at_10": 1.0, **lat}]
        del exact
        for kind in args.kinds.split(","):
            cpu0 = time.process_time()
            built = build_index(art, IndexConfig(kind=kind))
            cpu_build = time.process_time() - cpu0
            size = (art / INDEX_FILE).stat().st_size / 2**20
            rss0 = rss_mib()
            model = LoadedModel.load(art, search="ann", ann_margin=args.margin)
            assert model.ann is not None
            print(
                f"\n{kind} {read_manifest(art)['index']['params']}: built in {built.build_s:.1f} s "
                f"wall, {cpu_build:.1f} s CPU (all threads); file {size:.0f} MiB; RSS "
                f"{rss0:.0f} -> {rss_mib():.0f} MiB loading the model with its index; "
                f"load {os.getloadavg()[0]:.1f}"
            )
            index = model.ann.index
            settings = (
                [("ef_search", int(v)) for v in args.ef.split(",")]
                if kind == "hnsw"
                else [("nprobe", int(v)) for v in args.nprobe.split(",")]
            )
            for name, value in settings:
                if kind == "hnsw":
                    faiss.downcast_index(index).hnsw.efSearch = value
                else:
                    faiss.extract_index_ivf(index).nprobe = value
                got = top_lists(model.score_ann, req, 64)
                rec = recall(got, want)
                lat = latency(model.score_ann, req, args.latency_queries)
                row = {
                    "kind": kind,
                    name: value,
                    "recall_at_10": rec,
                    **lat,
                    "build_s": built.build_s,
                    "build_cpu_s": cpu_build,
                    "file_mib": size,
                    "load_1m": os.getloadavg()[0],
                }
                results.append(row)
                print(
                    f"  {name}={value:<4} recall@10 {rec:.4f}  batch 1: p50 {lat['p50_ms']:.2f} ms"
                    f"  p99 {lat['p99_ms']:.2f} ms  CPU {lat['cpu_ms']:.2f} ms/request  "
                    f"load {row['load_1m']:.1f}",
                    flush=True,
                )
            del model
    print(f"load average at end (1, 5, 15 min): {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
