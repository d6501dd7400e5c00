"""Results table: every registered algorithm on MovieLens-100K, side by side.

For each algorithm: train with its default config (``recloop train``), then full-ranking
HR@10 / NDCG@10 / MRR@10 on the test split (temporal leave-one-out, consumed items masked),
the doubly-robust off-policy value with its bootstrap interval (``recloop evaluate --ope``),
the simulated return and session length with the quit rule (``recloop simulate``; one
simulator fitted once and shared), and the training time.

    .venv/bin/python bench/bench_quality.py                       # every algorithm
    .venv/bin/python bench/bench_quality.py --algos popularity reinforce --epochs 2
    .venv/bin/python bench/bench_quality.py --algos td3 td3:bc=null   # with --set overrides

Prints a Markdown table and the machine; ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from recloop.algos import ALGOS
from recloop.artifacts import load_artifact
from recloop.data.dataset import PreparedDataset
from recloop.data.loaders import load_raw
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.splits import SplitConfig
from recloop.evaluation.ope import OPEConfig, ope_for_run
from recloop.evaluation.simulator import SimulatorConfig, fit_simulator, simulate
from recloop.training.compare import evaluate_runs
from recloop.training.recommender import train_run

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, load avg {load:.2f}; python {platform.python_version()}"
        f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/ml-100k")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/recloop-quality"))
    p.add_argument(
        "--algos",
        nargs="*",
        default=None,
        help="default: every registered one; NAME:KEY=VALUE,... trains with --set overrides",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: each config's own")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")

    data_dir = args.workdir / "data"
    ds = prepare(load_raw("recbole", args.data), PrepareConfig(split=SplitConfig(mode="loo")))
    ds.save(data_dir)
    ds = PreparedDataset.load(data_dir)
    sim_cfg = SimulatorConfig()
    t0 = time.perf_counter()
    sim = fit_simulator(ds, sim_cfg)
    print(f"simulator fitted in {time.perf_counter() - t0:.1f} s")

    rows: list[dict[str, Any]] = []
    for label in args.algos or ALGOS.names():
        algo, _, sets = label.partition(":")
        overrides = [x for x in sets.split(",") if x]
        run = args.workdir / "runs" / label.replace(":", "_").replace(",", "_")
        t0 = time.perf_counter()
        fit = train_run(
            algo,
            data_dir,
            run,
            overrides=overrides,
            epochs=args.epochs,
            overwrite=True,
            progress=False,
        )
        train_s = time.perf_counter() - t0
        (ev,) = evaluate_runs([run], data=data_dir, split="test")
        ope = ope_for_run(run, ds, split="test", cfg=OPEConfig(n_boot=200))
        art = load_artifact(run)
        result = simulate(art.policy, sim, ds, policy_history=art.history_len)
        quit_mode = next(m for m in result.modes if m.quit and not m.repeats)
        dr = ope.estimates["dr"]
        row = {
            "algo": ev.algo if label == algo else f"{ev.algo} [{sets}]",
            "hr@10": ev.metrics["hr@10"],
            "ndcg@10": ev.metrics["ndcg@10"],
            "mrr@10": ev.metrics["mrr@10"],
            "dr": dr.value,
            "dr_low": dr.low,
            "dr_high": dr.high,
            "sim_return": quit_mode.cumulative_reward,
            "sim_length": quit_mode.session_length,
            "epochs": fit.epochs,
            "train_s": train_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nsimulator: AUC {result.accuracy.auc:.3f}, reward RMSE {result.accuracy.rmse:.3f}")
    print(
        "| algorithm | HR@10 | NDCG@10 | MRR@10 | DR value [95% CI] | sim. return | "
        "sim. length | epochs | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['algo']} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['mrr@10']:.4f} | "
            f"{r['dr']:.3f} [{r['dr_low']:.3f}, {r['dr_high']:.3f}] | {r['sim_return']:.2f} | "
            f"{r['sim_length']:.2f} | {r['epochs']} | {r['train_s']:.0f} |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
