"""Results table: every registered algorithm on MovieLens-100K, several seeds, with intervals.

For each algorithm and seed: train with the default config (``recloop train --set
seed=S``), then full-ranking HR@10 / NDCG@10 / MRR@10 on the test split of temporal
leave-one-out, both MASKED (consumed items removed, targets stay: RecBole's rule for general
models) and UNMASKED (nothing removed: RecBole's rule for sequential models such as GRU4Rec
and SASRec), and the training time.  Each cell is the mean over the seeds ± the half-width
of a 95 % Student-t interval (n - 1 degrees of freedom).  ``--ope`` adds the doubly-robust
value (one behaviour model shared by every run) and ``--simulate`` the return in the fitted
user simulator, each from the first seed's run.

    .venv/bin/python bench/bench_quality.py                          # every algorithm, 3 seeds
    .venv/bin/python bench/bench_quality.py --algos popularity gru4rec --seeds 0 1 2 3 4
    .venv/bin/python bench/bench_quality.py --algos td3 td3:bc.alpha=1 td3:bc=null --jobs 2

``NAME:KEY=VALUE,...`` trains with ``--set`` overrides.  ``--jobs 2`` trains two runs at a
time (one torch thread each).  Prints a Markdown table and the machine; ``--json FILE``
also writes every run's row.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from recloop.algos import ALGOS
from recloop.data.dataset import PreparedDataset
from recloop.data.loaders import load_raw
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.splits import SplitConfig
from recloop.training.compare import evaluate_runs
from recloop.training.recommender import train_run

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@10", "ndcg@10", "mrr@10")
T975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306}
"""Two-sided 95 % Student-t quantiles by number of seeds (n - 1 degrees of freedom)."""


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
        f", torch {torch.__version__}"
    )


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (0 for one value)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, 0.0
    t = T975.get(n, 1.96)
    return mean, t * float(np.std(values, ddof=1)) / math.sqrt(n)


def one_run(label: str, seed: int, data_dir: Path, workdir: Path, epochs: int | None) -> dict:
    """Train one (algorithm, seed) and evaluate it masked and unmasked; runs in a worker."""
    torch.set_num_threads(1)
    algo, _, sets = label.partition(":")
    overrides = [x for x in sets.split(",") if x]
    trainable = ALGOS.get(algo).trainable
    run = workdir / "runs" / f"{label.replace(':', '_').replace(',', '_')}_s{seed}"
    t0 = time.perf_counter()
    fit = train_run(
        algo,
        data_dir,
        run,
        overrides=[*overrides, f"seed={seed}"] if trainable else overrides,
        epochs=epochs,
        overwrite=True,
        progress=False,
    )
    train_s = time.perf_counter() - t0
    (masked,) = evaluate_runs([run], data=data_dir, split="test", mask_consumed=True)
    (unmasked,) = evaluate_runs([run], data=data_dir, split="test", mask_consumed=False)
    row = {
        "algo": label,
        "name": masked.algo,  # the variant's own label, e.g. "td3 (+BC-ce, α=2.5)"
        "seed": seed,
        "run": str(run),
        "epochs": fit.epochs,
        "train_s": train_s,
    }
    for m in METRICS:
        row[f"masked {m}"] = masked.metrics[m]
        row[f"unmasked {m}"] = unmasked.metrics[m]
    print(json.dumps(row), flush=True)
    return row


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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default: each config's own")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once (1 thread each)")
    p.add_argument("--ope", action="store_true", help="add the DR value (first seed)")
    p.add_argument("--simulate", action="store_true", help="add the simulated return (first seed)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    print(f"machine: {machine()}; {args.jobs} job(s), 1 torch thread each")

    data_dir = args.workdir / "data"
    ds = prepare(load_raw("recbole", args.data), PrepareConfig(split=SplitConfig(mode="loo")))
    ds.save(data_dir)
    labels = args.algos or ALGOS.names()
    # A closed-form algorithm gives the same model for every seed: one run is enough.
    jobs = [
        (label, seed)
        for label in labels
        for seed in (args.seeds if ALGOS.get(label.partition(":")[0]).trainable else [0])
    ]
    t_all = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = [
                pool.submit(one_run, label, seed, data_dir, args.workdir, args.epochs)
                for label, seed in jobs
            ]
            rows = [f.result() for f in futures]
    else:
        rows = [one_run(label, seed, data_dir, args.workdir, args.epochs) for label, seed in jobs]
    print(f"\n{len(rows)} runs in {time.perf_counter() - t_all:.0f} s; machine: {machine()}")

    extra: dict[str, dict[str, str]] = {label: {} for label in labels}
    if args.ope or args.simulate:
        extra = first_seed_extras(rows, labels, data_dir, ope=args.ope, sim=args.simulate)

    seeds = ", ".join(str(s) for s in args.seeds)
    print(
        f"\nml-100k, temporal leave-one-out, test split, full ranking; mean ± 95 % t-interval "
        f"over seeds {seeds} (closed-form baselines: one run)"
    )
    cols = [f"masked {m}" for m in METRICS] + [f"unmasked {m}" for m in METRICS]
    extra_cols = sorted({k for e in extra.values() for k in e})
    head = ["algorithm", "seeds", *cols, "epochs", "train s", *extra_cols]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    summary = []
    for label in labels:
        mine = [r for r in rows if r["algo"] == label]
        cells = []
        for c in cols:
            mean, half = interval([r[c] for r in mine])
            cells.append(f"{mean:.4f} ± {half:.4f}" if len(mine) > 1 else f"{mean:.4f}")
        epochs = "/".join(str(r["epochs"]) for r in mine)
        train_s = np.mean([r["train_s"] for r in mine])
        name = (
            mine[0]["name"]
            if label == label.partition(":")[0]
            else f"{mine[0]['name']} [{label.partition(':')[2]}]"
        )
        extras = [extra[label].get(k, "-") for k in extra_cols]
        print(
            "| "
            + " | ".join([name, str(len(mine)), *cells, epochs, f"{train_s:.0f}", *extras])
            + " |"
        )
        summary.append({"algo": label, "name": name, "cells": dict(zip(cols, cells, strict=True))})
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": machine(), "rows": rows, "summary": summary}, indent=2)
        )


def first_seed_extras(
    rows: list[dict], labels: list[str], data_dir: Path, *, ope: bool, sim: bool
) -> dict[str, dict[str, str]]:
    """DR value (one behaviour model for every run) and simulated return of the first seeds."""
    from recloop.artifacts import load_artifact
    from recloop.evaluation.ope import OPEConfig, ope_for_run
    from recloop.evaluation.simulator import SimulatorConfig, fit_simulator, simulate

    ds = PreparedDataset.load(data_dir)
    simulator = fit_simulator(ds, SimulatorConfig()) if sim else None
    out: dict[str, dict[str, str]] = {}
    for label in labels:
        first = next(r for r in rows if r["algo"] == label)
        run = Path(first["run"])
        cells: dict[str, str] = {}
        if ope:
            cfg = OPEConfig(n_boot=200, behaviour="fitted")
            dr = ope_for_run(run, ds, split="test", cfg=cfg).estimates["dr"]
            cells["DR value [95% CI]"] = f"{dr.value:.3f} [{dr.low:.3f}, {dr.high:.3f}]"
        if simulator is not None:
            art = load_artifact(run)
            result = simulate(art.policy, simulator, ds, policy_history=art.history_len)
            quit_mode = next(m for m in result.modes if m.quit and not m.repeats)
            cells["sim. return"] = f"{quit_mode.cumulative_reward:.2f}"
        out[label] = cells
    return out


if __name__ == "__main__":
    main()
