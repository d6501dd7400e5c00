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
from typing import Any

import numpy as np
import torch

from recloop.algos import ALGOS
from recloop.algos.base import run_label
from recloop.artifacts import load_artifact
from recloop.data.dataset import PreparedDataset
from recloop.data.loaders import load_raw
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.splits import SplitConfig
from recloop.evaluation import EvalConfig, evaluate
from recloop.training.recommender import train_run

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("hr@10", "ndcg@10", "mrr@10")
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]  # fmt: skip
"""Two-sided 95 % Student-t quantiles for 1..30 degrees of freedom."""
BASELINES = ("popularity", "supervised", "gru4rec", "sasrec")
"""Supervised baselines; the best of them (by mean masked NDCG@10) is every row's reference
in the paired comparison."""


def t975(dof: int) -> float:
    """Two-sided 95 % Student-t quantile; past the table (30 degrees of freedom), the
    Cornish-Fisher expansion z + (z^3 + z) / (4 dof) + (5 z^5 + 16 z^3 + 3 z) / (96 dof^2),
    within 3e-4 there."""
    if dof <= len(T975):
        return T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


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
    return mean, t975(n - 1) * float(np.std(values, ddof=1)) / math.sqrt(n)


def paired_user_bootstrap(
    diff: np.ndarray, *, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-user differences (M,) and its 95 % percentile bootstrap interval over
    users: the test users are the sample, so this is the interval that says whether one
    method beats another on this kind of user, not merely on these seeds."""
    rng = np.random.default_rng(seed)
    m = diff.shape[0]
    boots = np.empty(n_boot)
    for lo in range(0, n_boot, 200):
        idx = rng.integers(0, m, size=(min(200, n_boot - lo), m))
        boots[lo : lo + idx.shape[0]] = diff[idx].mean(axis=1)
    low, high = np.quantile(boots, [0.025, 0.975])
    return float(diff.mean()), float(low), float(high)


def one_run(
    label: str, seed: int, data_dir: Path, workdir: Path, epochs: int | None, reuse: bool = False
) -> dict:
    """Train one (algorithm, seed) and evaluate it masked and unmasked; runs in a worker.

    The row and the per-user values are saved in the run directory; with ``reuse`` a run
    that has them is not trained again (add algorithms to a table without retraining)."""
    torch.set_num_threads(1)
    algo, _, sets = label.partition(":")
    overrides = [x for x in sets.split(",") if x]
    trainable = ALGOS.get(algo).trainable
    run = workdir / "runs" / f"{label.replace(':', '_').replace(',', '_')}_s{seed}"
    saved_row, saved_users = run / "bench_row.json", run / "bench_per_user.npz"
    if reuse and saved_row.is_file() and saved_users.is_file():
        row = json.loads(saved_row.read_text())
        with np.load(saved_users) as z:
            row["per_user"] = {k: z[k] for k in z.files}
        print(f"reused {run}", flush=True)
        return row
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
    art = load_artifact(run)
    ds = PreparedDataset.load(data_dir)
    reports = {
        name: evaluate(
            art.policy,
            ds,
            split="test",
            history=art.history_len,
            cfg=EvalConfig(ks=(10,), mask_consumed=name == "masked"),
        )
        for name in ("masked", "unmasked")
    }
    row: dict[str, Any] = {
        "algo": label,
        "name": run_label(art.algo, art.manifest.get("config")),  # e.g. "td3 (+BC-ce, α=2.5)"
        "seed": seed,
        "run": str(run),
        "epochs": fit.epochs,
        "train_s": train_s,
    }
    for name, report in reports.items():
        for m in METRICS:
            row[f"{name} {m}"] = report.metrics[m]
    print(json.dumps(row), flush=True)
    saved_row.write_text(json.dumps(row))
    per_user = {name: r.per_user["ndcg@10"] for name, r in reports.items()}
    np.savez(saved_users, **per_user)
    row["per_user"] = per_user
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
    p.add_argument(
        "--reuse", action="store_true", help="keep runs of the workdir that have their results"
    )
    p.add_argument(
        "--versus", nargs="*", default=[], help="more paired tables against these algorithms"
    )
    args = p.parse_args()
    print(f"machine: {machine()}; {args.jobs} job(s), 1 torch thread each")

    data_dir = args.workdir / "data"
    ds = prepare(load_raw("recbole", args.data), PrepareConfig(split=SplitConfig(mode="loo")))
    ds.save(data_dir)
    labels = args.algos or ALGOS.names()
    unknown = [ref for ref in args.versus if ref not in labels]
    if unknown:  # checked now, not after hours of training
        p.error(f"--versus {' '.join(unknown)}: not among --algos")
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
                pool.submit(one_run, label, seed, data_dir, args.workdir, args.epochs, args.reuse)
                for label, seed in jobs
            ]
            rows = [f.result() for f in futures]
    else:
        rows = [
            one_run(label, seed, data_dir, args.workdir, args.epochs, args.reuse)
            for label, seed in jobs
        ]
    print(f"\n{len(rows)} runs in {time.perf_counter() - t_all:.0f} s; machine: {machine()}")

    extra: dict[str, dict[str, str]] = {label: {} for label in labels}
    if args.ope or args.simulate:
        extra = first_seed_extras(rows, labels, data_dir, ope=args.ope, sim=args.simulate)

    seeds = ", ".join(str(s) for s in args.seeds)
    print(
        f"\nml-100k, temporal leave-one-out (RecBole's), test split, full ranking over all items, "
        f"each model's own history length H; mean ± 95 % t-interval over seeds {seeds} (the "
        "spread of training, on one fixed test set: see the paired table for claims; "
        "closed-form baselines: one run)"
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
    paired = {"best baseline": paired_table(rows, labels)}
    for ref in args.versus:
        paired[ref] = paired_table(rows, labels, ref)
    if args.json is not None:
        plain = [{k: v for k, v in r.items() if k != "per_user"} for r in rows]
        doc = {"machine": machine(), "rows": plain, "summary": summary, "paired": paired}
        args.json.write_text(json.dumps(doc, indent=2))


def paired_table(rows: list[dict], labels: list[str], ref: str | None = None) -> dict[str, Any]:
    """Each algorithm minus ``ref`` (default: the best supervised baseline), per test user
    (NDCG@10 averaged over the seeds first), with a 95 % bootstrap interval over users;
    printed and returned."""
    mean_ndcg: dict[str, dict[str, np.ndarray]] = {}
    for label in labels:
        mine = [r for r in rows if r["algo"] == label]
        mean_ndcg[label] = {
            p: np.mean([r["per_user"][p] for r in mine], axis=0) for p in ("masked", "unmasked")
        }
    bases = [x for x in labels if x.partition(":")[0] in BASELINES]
    if ref is None:
        if not bases:
            return {}
        ref = max(bases, key=lambda x: float(mean_ndcg[x]["masked"].mean()))
    print(
        f"\nPaired against {ref}: mean over the "
        f"{mean_ndcg[ref]['masked'].shape[0]} test users of (algorithm - {ref}) NDCG@10, each "
        "user's value averaged over the seeds first; 95 % bootstrap interval over users "
        "(2000 resamples). * = the interval excludes 0."
    )
    print(f"| algorithm | Δ masked NDCG@10 vs {ref} | Δ unmasked NDCG@10 vs {ref} |")
    print("|---|---|---|")
    out: dict[str, Any] = {"reference": ref, "rows": {}}
    for label in labels:
        if label == ref:
            continue
        cells = []
        for p in ("masked", "unmasked"):
            mean, low, high = paired_user_bootstrap(mean_ndcg[label][p] - mean_ndcg[ref][p])
            star = "*" if low > 0 or high < 0 else ""
            cells.append(f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]{star}")
            out["rows"].setdefault(label, {})[p] = {"mean": mean, "low": low, "high": high}
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    return out


def first_seed_extras(
    rows: list[dict], labels: list[str], data_dir: Path, *, ope: bool, sim: bool
) -> dict[str, dict[str, str]]:
    """DR value (one behaviour model for every run) and simulated return of the first seeds."""
    from recloop.evaluation.ope import OPEConfig, ope_for_runs
    from recloop.evaluation.simulator import SimulatorConfig, fit_simulator, simulate

    ds = PreparedDataset.load(data_dir)
    simulator = fit_simulator(ds, SimulatorConfig()) if sim else None
    firsts = [Path(next(r for r in rows if r["algo"] == label)["run"]) for label in labels]
    dr_of: dict[str, str] = {}
    if ope:  # one behaviour and one reward model for every run
        cmp = ope_for_runs(firsts, [ds] * len(firsts), cfg=OPEConfig(n_boot=200))
        for label, rep in zip(labels, cmp.reports, strict=True):
            dr = rep.estimates["dr"]
            dr_of[label] = f"{dr.value:.3f} [{dr.low:.3f}, {dr.high:.3f}]"
    out: dict[str, dict[str, str]] = {}
    for label, run in zip(labels, firsts, strict=True):
        cells: dict[str, str] = {}
        if ope:
            cells["DR value [95% CI]"] = dr_of[label]
        if simulator is not None:
            art = load_artifact(run)
            result = simulate(art.policy, simulator, ds, policy_history=art.history_len)
            quit_mode = next(m for m in result.modes if m.quit and not m.repeats)
            cells["sim. return"] = f"{quit_mode.cumulative_reward:.2f}"
        out[label] = cells
    return out


if __name__ == "__main__":
    main()
