"""A small, complete set of report inputs, built once: a prepared dataset, popularity and two
seeds of the supervised model (trained for 2 epochs), ``recloop evaluate --json``'s
document, a world OPE document and an experiment table."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.training.compare import evaluate_runs
from recloop.training.recommender import train_run


def drift_dataset(*, n_users: int = 40, n_items: int = 30, length: int = 12) -> PreparedDataset:
    """User u walks the catalogue from a random start, one item an hour, with ratings 1-5;
    a popular head (items 1-5) gets every third event, so popularity deciles differ."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, n_items, n_users)
    t = np.arange(length)
    item = (start[:, None] + t[None, :]) % n_items + 1
    item = np.where(t[None, :] % 3 == 0, rng.integers(1, 6, (n_users, length)), item)
    user = np.repeat(np.arange(1, n_users + 1), length)
    timestamp = np.tile(1_700_000_000 + 3600 * t, n_users) + user * 86_400
    return PreparedDataset.from_arrays(
        user=user,
        item=item.ravel(),
        timestamp=timestamp,
        reward=rng.integers(1, 6, n_users * length).astype(np.float32),
        returns=np.ones(n_users * length, dtype=np.float32),
        split=np.tile(
            np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
        ),
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )


@dataclass(frozen=True)
class ReportFiles:
    root: Path
    data: Path
    runs: list[Path]
    evaluate_json: Path
    world_ope_json: Path
    world_evaluate_json: Path
    experiment_csv: Path


def write_evaluate_doc(runs: list[Path], data: Path, path: Path) -> None:
    """What ``recloop evaluate RUNS --json`` prints (protocol both)."""
    masked = evaluate_runs(runs, data=data, split="test")
    unmasked = evaluate_runs(runs, data=data, split="test", mask_consumed=False)
    doc = {
        "split": "test",
        "protocol": "both",
        "mask_consumed": True,
        "runs": [
            {**m.to_dict(), "metrics_unmasked": u.metrics}
            for m, u in zip(masked, unmasked, strict=True)
        ],
    }
    path.write_text(json.dumps(doc, indent=2))


@pytest.fixture(scope="session")
def report_files(tmp_path_factory: pytest.TempPathFactory) -> ReportFiles:
    root = tmp_path_factory.mktemp("report-inputs")
    data = root / "data"
    drift_dataset().save(data)
    runs = [root / "runs" / "popularity"]
    train_run("popularity", data, runs[0])
    for seed in (0, 1):
        run = root / "runs" / f"supervised_s{seed}"
        train_run("supervised", data, run, epochs=2, overrides=[f"seed={seed}"])
        runs.append(run)
    evaluate_json = root / "evaluate.json"
    write_evaluate_doc(runs, data, evaluate_json)
    world = {
        "world": {"name": "shop"},
        "runs": [str(r) for r in runs[:2]],
        "n_events": 40,
        "one_step_truth": [0.21, 0.34],
        "logged_truth": 0.18,
        "rollout_return": [
            {"value": 1.5, "low": 1.3, "high": 1.7},
            {"value": 2.1, "low": 1.9, "high": 2.3},
        ],
        "estimates": {
            "ips": [
                {"value": 0.25, "low": 0.1, "high": 0.4},
                {"value": 0.31, "low": 0.2, "high": 0.45},
            ],
            "dr": [
                {"value": 0.22, "low": 0.15, "high": 0.3},
                {"value": 0.33, "low": 0.28, "high": 0.38},
            ],
        },
        "errors": {
            "ips": {"bias": 0.005, "rmse": 0.03, "spearman": 1.0, "covered": 1.0},
            "dr": {"bias": 0.0, "rmse": 0.01, "spearman": 1.0, "covered": 1.0},
        },
        "config": {},
    }
    world_ope_json = root / "world_ope.json"
    world_ope_json.write_text(json.dumps(world))
    world_evaluate_json = root / "world_evaluate.json"
    world_evaluate_json.write_text(
        json.dumps(
            {
                "name": "shop",
                "users": 200,
                "seed": 0,
                "rows": [
                    {
                        "policy": policy,
                        "selection": {"kind": "epsilon", "epsilon": 0.0},
                        **{
                            key: {"value": v, "low": v - 0.1, "high": v + 0.1}
                            for key, v in (("return", r), ("length", 5.0), ("coverage", 0.4),
                                           ("diversity", 0.7))
                        },
                    }
                    for policy, r in ((str(runs[1]), 2.4), ("popularity", 1.9), ("random", 0.8))
                ],
            }
        )
    )  # fmt: skip
    experiment_csv = root / "experiment.csv"
    with experiment_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["round", "arm", "algo", "reward", "lo", "hi"])
        for rnd in range(1, 5):
            w.writerow([rnd, "control", "popularity", 0.30, 0.25, 0.35])
            w.writerow([rnd, "treatment", "reinforce", 0.30 + 0.02 * rnd, 0.26, 0.42])
    return ReportFiles(
        root=root,
        data=data,
        runs=runs,
        evaluate_json=evaluate_json,
        world_ope_json=world_ope_json,
        world_evaluate_json=world_evaluate_json,
        experiment_csv=experiment_csv,
    )
