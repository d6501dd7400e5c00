"""Time of the ``served`` OPE target on logs of lists: what the gate pays per round.

Builds a log of softmax lists (bench_ope_slates.py's world: U users, one list of K items
each from N items) and times ``policy_terms`` with target ``served`` for a scorer with the
cost of a policy network's forward pass: the user's embedding through a hidden layer of
width D, then a dot product with every item's embedding, (b, N + 1) scores per batch.  A
list's K slots share the list's state; ``served_scores`` scores each state once.  With
``--compare-src`` the same is timed with another source tree (e.g. the commit before), in
alternating rounds, and the ratio is printed.

    PYTHONPATH=src python bench/bench_ope_served.py
    mkdir /tmp/before && git archive REV src | tar -x -C /tmp/before
    PYTHONPATH=src python bench/bench_ope_served.py --compare-src /tmp/before/src
    PYTHONPATH=src python bench/bench_ope_served.py --contexts 50   # lists with contexts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench_eval import machine  # the same machine line

ROOT = Path(__file__).resolve().parents[1]


def _one(args: argparse.Namespace) -> float:
    """Seconds of one served-target OPE pass (runs in the process of the tree timed)."""
    import time
    from dataclasses import replace

    import torch

    from bench_ope_slates import softmax_log
    from recloop.evaluation.ope import OPEConfig, logged_events, policy_terms

    torch.set_num_threads(1)
    u, n, k, d = args.users, args.items, args.k, args.dim
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.7, (u + 1, 16))
    y = rng.normal(0, 0.7, (n + 1, 16))
    table = (x @ y.T).astype(np.float32).astype(np.float64)
    table[:, 0] = -np.inf
    ds = softmax_log(table, x, y, k=k, temperature=1.0, seed=1)
    if args.policy == "epsilon":
        # the same lists relabelled as ε-greedy ones: their items are not an ε-greedy draw,
        # but the pass costs the same whatever items the lists hold (timing only)
        e = ds.n_events
        extra = {**ds.extra, "policy": np.full(e, "epsilon"), "epsilon": np.full(e, 0.1)}
        ds = replace(ds, extra={**extra, "temperature": np.full(e, np.nan)})
    if args.contexts:
        # each list's context on its first row, as the service logs it: recent items with
        # their rewards, the same items excluded (the served target then scores its state
        # and masks from the context instead of the user's earlier rows)
        import orjson

        first = np.flatnonzero(ds.extra["position"] == 0)
        picks = rng.integers(1, n + 1, (first.shape[0], args.contexts))
        ctx = np.full(ds.n_events, "", dtype=object)
        for row, items in zip(first.tolist(), picks.tolist(), strict=True):
            ids = [str(ds.item_ids[i - 1]) for i in items]
            ctx[row] = orjson.dumps(
                {"recent": ids, "rewards": [1.0] * len(ids), "excluded": ids}
            ).decode()
        ds = replace(ds, extra={**ds.extra, "served_context": ctx})
    cfg = OPEConfig(target="served", n_boot=0)
    events = logged_events(ds, cfg=cfg)
    g = torch.Generator().manual_seed(0)
    user_emb = torch.randn(u + 1, d, generator=g)
    hidden = torch.nn.Linear(d, d)
    item_emb = torch.randn(n + 1, d, generator=g)

    @torch.no_grad()
    def score(user: torch.Tensor, history: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
        return torch.relu(hidden(user_emb[user])) @ item_emb.T

    t0 = time.perf_counter()
    policy_terms(score, ds, events, history=10, cfg=cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--k", type=int, default=10, help="List length.")
    ap.add_argument("--dim", type=int, default=128, help="Embedding and hidden width.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--policy",
        choices=("softmax", "epsilon"),
        default="softmax",
        help="How the log's lists were served (epsilon: the softmax lists relabelled).",
    )
    ap.add_argument(
        "--contexts",
        type=int,
        default=0,
        help="Log each list's context with this many recent (and excluded) items (0: none).",
    )
    ap.add_argument("--compare-src", default=None, help="Another tree's src/ to time too.")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"seconds": _one(args)}))
        return
    print(f"machine: {machine()}")
    trees = {"this": str(ROOT / "src")}
    if args.compare_src:
        trees["compare"] = args.compare_src
    times: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name, src in trees.items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT / "bench")])}
            cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            sec = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
            times[name].append(sec)
            print(f"round {r}: {name:8s} {sec:.2f} s")
    e = args.users // 2 * args.k
    for name, ts in times.items():
        print(f"{name}: min {min(ts):.2f} s, median {np.median(ts):.2f} s ({e} impressions)")
    if args.compare_src:
        print(f"this / compare (min): {min(times['this']) / min(times['compare']):.2f}x")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
