"""Hyper-parameter search for gru4rec and sasrec on the validation split of MovieLens-100K.

Temporal leave-one-out (RecBole's protocol); every configuration trains with one torch
thread and one seed, stops early on valid NDCG@10 and keeps its best epoch.  Valid metrics
are UNMASKED (consumed items stay rankable), as RecBole scores sequential models.  The
search runs in two stages per model:

1. learning rate x dropout around RecBole's defaults;
2. from the best of stage 1: wider or narrower layers, and a longer history (max length).

The test split is not looked at during the search; ``--test-seeds`` then trains the
algorithm's current default config with each seed and reports test HR@10 / NDCG@10,
unmasked and masked.  Results of the last run: docs/tuning_seqrec.md.

    recloop prepare --format recbole --input ../shared/datasets/ml-100k --split loo \\
        --output /tmp/seqrec/ml100k
    .venv/bin/python bench/tune_seqrec.py --data /tmp/seqrec/ml100k            # the search
    .venv/bin/python bench/tune_seqrec.py --models gru4rec --test-seeds 0 1 2  # defaults on test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from recloop.algos import ALGOS
from recloop.algos.base import AlgoConfig
from recloop.config import config_from_dict, merge, parse_overrides
from recloop.data.dataset import PreparedDataset
from recloop.training.fit import FitConfig
from recloop.training.recommender import Recommender

BASE: dict[str, list[str]] = {
    # RecBole's defaults (embedding 64, max length 50), written out so that the search does
    # not move when the algorithms' defaults do.
    "gru4rec": [
        "encoder.embedding_dim=64",
        "encoder.hidden_dim=128",
        "encoder.history=50",
        "embedding_dropout=0.3",
        "lr=0.001",
    ],
    "sasrec": [
        "encoder.embedding_dim=64",
        "encoder.hidden_dim=64",
        "encoder.n_heads=2",
        "encoder.history=50",
        "encoder.dropout=0.5",
        "lr=0.001",
    ],
}
DROPOUT = {"gru4rec": "embedding_dropout", "sasrec": "encoder.dropout"}
"""The dropout each model tunes: GRU4Rec's on the item vectors, SASRec's in its blocks."""


def stage1(model: str) -> list[list[str]]:
    """Learning rate x dropout."""
    return [[f"lr={lr}", f"{DROPOUT[model]}={p}"] for lr in (0.001, 0.003) for p in (0.2, 0.5)]


def stage2(model: str, best: list[str]) -> list[list[str]]:
    """From the best of stage 1: layer widths, then the history length."""
    if model == "gru4rec":
        sizes = [
            ["encoder.embedding_dim=128", "encoder.hidden_dim=128"],
            ["encoder.embedding_dim=64", "encoder.hidden_dim=64"],
        ]
    else:
        sizes = [["encoder.embedding_dim=128", "encoder.hidden_dim=128"], ["encoder.n_heads=1"]]
    return [best + s for s in sizes] + [[*best, "encoder.history=100"]]


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load}; python "
        f"{platform.python_version()}, torch {torch.__version__} (1 thread)"
    )


def make_config(model: str, overrides: Sequence[str], seed: int = 0) -> AlgoConfig:
    cls = ALGOS.get(model).config_class
    data = merge(parse_overrides(BASE[model]), parse_overrides(list(overrides)))
    return config_from_dict(cls, {**data, "seed": seed}, source=f"{model} {list(overrides)}")


def fit_config(epochs: int, patience: int, *, final_eval: bool) -> FitConfig:
    return FitConfig(
        epochs=epochs,
        patience=patience,
        metric="ndcg@10",
        eval_ks=(10,),
        mask_consumed=False,
        final_eval=final_eval,
        device="cpu",
        num_threads=1,
        progress=False,
        tensorboard=False,
    )


def run_search_config(
    model: str, overrides: list[str], ds: PreparedDataset, *, epochs: int, patience: int
) -> dict[str, Any]:
    rec = make_config(model, overrides).create()
    t0, c0 = time.perf_counter(), time.process_time()
    res = rec.fit(ds, fit=fit_config(epochs, patience, final_eval=False))
    best = next(r for r in res.history if r["epoch"] == res.best_epoch)
    row = {
        "model": model,
        "config": overrides,
        "valid_ndcg@10": best["valid"]["ndcg@10"],
        "valid_hr@10": best["valid"]["hr@10"],
        "best_epoch": res.best_epoch,
        "epochs": res.epochs,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
    print(
        f"  {model:8s} {' '.join(overrides):60s} ndcg@10 {row['valid_ndcg@10']:.4f} "
        f"hr@10 {row['valid_hr@10']:.4f} best epoch {res.best_epoch}/{res.epochs} "
        f"{row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s cpu)",
        flush=True,
    )
    return row


def search(model: str, ds: PreparedDataset, *, epochs: int, patience: int) -> list[dict[str, Any]]:
    rows = [
        run_search_config(model, o, ds, epochs=epochs, patience=patience) for o in stage1(model)
    ]
    best = max(rows, key=lambda r: r["valid_ndcg@10"])
    for o in stage2(model, best["config"]):
        rows.append(run_search_config(model, o, ds, epochs=epochs, patience=patience))
    return rows


def test_defaults(
    model: str, ds: PreparedDataset, seeds: Sequence[int], *, epochs: int, patience: int
) -> list[dict[str, Any]]:
    """The algorithm's own default config (not BASE), one fit per seed, on the test split."""
    rows = []
    cls = ALGOS.get(model).config_class
    for seed in seeds:
        rec = Recommender(cls(seed=seed))
        t0 = time.perf_counter()
        res = rec.fit(ds, fit=fit_config(epochs, patience, final_eval=True))
        masked = rec.evaluate(split="test", mask_consumed=True, ks=(10,)).metrics
        row = {
            "model": model,
            "seed": seed,
            "best_epoch": res.best_epoch,
            "valid_ndcg@10": res.valid["ndcg@10"],
            "test_hr@10": res.test["hr@10"],
            "test_ndcg@10": res.test["ndcg@10"],
            "test_hr@10_masked": float(masked["hr@10"]),
            "test_ndcg@10_masked": float(masked["ndcg@10"]),
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"  {model} seed {seed}: test unmasked hr@10 {row['test_hr@10']:.4f} ndcg@10 "
            f"{row['test_ndcg@10']:.4f} | masked hr@10 {row['test_hr@10_masked']:.4f} ndcg@10 "
            f"{row['test_ndcg@10_masked']:.4f} (best epoch {res.best_epoch}, "
            f"{row['seconds']:.0f} s)",
            flush=True,
        )
        rows.append(row)
    return rows


def print_search_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| model | config (over RecBole's defaults) | valid NDCG@10 | valid HR@10 | best "
        "epoch / epochs | seconds (cpu) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {' '.join(r['config'])} | {r['valid_ndcg@10']:.4f} | "
            f"{r['valid_hr@10']:.4f} | {r['best_epoch']} / {r['epochs']} | "
            f"{r['seconds']:.0f} ({r['cpu_seconds']:.0f}) |"
        )


def print_test_table(rows: list[dict[str, Any]]) -> None:
    keys = ("test_hr@10", "test_ndcg@10", "test_hr@10_masked", "test_ndcg@10_masked")
    print("\n| model | test HR@10 | test NDCG@10 | masked HR@10 | masked NDCG@10 |")
    print("|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        cells = [
            f"{statistics.mean(r[k] for r in mine):.4f} ("
            + ", ".join(f"{r[k]:.4f}" for r in mine)
            + ")"
            for k in keys
        ]
        print(f"| {model} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/tmp/seqrec/ml100k"))
    p.add_argument("--models", nargs="*", default=["gru4rec", "sasrec"])
    p.add_argument("--epochs", type=int, default=40, help="most epochs per configuration")
    # 3 stopped lr=1e-3 runs in the popularity-like plateau of their first epochs
    p.add_argument("--patience", type=int, default=5, help="evaluations without improvement")
    p.add_argument(
        "--test-seeds",
        type=int,
        nargs="*",
        default=None,
        help="skip the search; train the default config per seed and report the test split",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {machine()}", flush=True)
    ds = PreparedDataset.load(args.data)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        if args.test_seeds is not None:
            rows += test_defaults(
                model, ds, args.test_seeds, epochs=args.epochs, patience=args.patience
            )
        else:
            rows += search(model, ds, epochs=args.epochs, patience=args.patience)
    if args.test_seeds is not None:
        print_test_table(rows)
    else:
        print_search_table(rows)
    print(f"\nmachine at the end: {machine()}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
