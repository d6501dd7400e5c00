"""The numbers behind each figure, computed from the inputs (no HTML here).

Every function returns plain JSON-able dicts: the page draws them and also embeds them as
``<script type="application/json" id="report-data">``, so what a chart shows can be checked
against what it was drawn from.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recloop.data.dataset import SPLIT_NAMES, PreparedDataset
from recloop.report.inputs import RunInput

METRICS = ("hr", "ndcg", "mrr")
"""The ranking metrics compared (at the report's K)."""

T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
"""Two-sided 95 % Student-t quantiles for 1..30 degrees of freedom (the normal 1.96 would be
far too narrow with 2 or 3 seeds)."""


def seed_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean over seeds with a 95 % Student-t interval; no interval from one seed."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.shape[0] < 2:
        return {"value": mean, "low": None, "high": None, "n": int(x.shape[0])}
    dof = x.shape[0] - 1
    t = T975[dof - 1] if dof <= len(T975) else 1.96
    half = t * float(x.std(ddof=1)) / math.sqrt(x.shape[0])
    return {"value": mean, "low": mean - half, "high": mean + half, "n": int(x.shape[0])}


def _log_bins(counts: np.ndarray, n_bins: int = 24) -> dict[str, list[float]]:
    """Histogram of positive ``counts`` on log-spaced bins: bin centres and frequencies."""
    counts = counts[counts > 0]
    if counts.size == 0:
        return {"x": [], "y": []}
    edges = np.unique(np.round(np.geomspace(counts.min(), counts.max() + 1, n_bins + 1)))
    if edges.size < 2:
        edges = np.array([counts.min(), counts.min() + 1])
    freq, edges = np.histogram(counts, bins=edges)
    keep = freq > 0
    centres = np.sqrt(edges[:-1] * np.maximum(edges[1:] - 1, edges[:-1]))
    return {"x": centres[keep].round(2).tolist(), "y": freq[keep].astype(int).tolist()}


def dataset_figures(ds: PreparedDataset) -> dict[str, Any]:
    """Events over time, user activity, item popularity, session lengths, reward mix, splits."""
    ts = ds.timestamp
    span = int(ts.max() - ts.min()) if ds.n_events else 0
    # Days when the log spans under a year, else weeks: ~100-400 points either way.
    width = 86_400 if span <= 400 * 86_400 else 7 * 86_400
    start = int(ts.min()) // width * width if ds.n_events else 0
    bucket = (ts - start) // width
    per_split = {}
    n_buckets = int(bucket.max()) + 1 if ds.n_events else 0
    for code, name in SPLIT_NAMES.items():
        per_split[name] = np.bincount(bucket[ds.split == code], minlength=n_buckets).tolist()
    user_counts = np.bincount(ds.user, minlength=ds.n_users + 1)[1:]
    item_counts = np.bincount(ds.item, minlength=ds.n_items + 1)[1:]
    ranked = np.sort(item_counts)[::-1]
    # Rank-frequency on ~200 log-spaced ranks keeps the file small and the shape exact.
    ranks = np.unique(np.geomspace(1, max(ranked.size, 1), 200).astype(np.int64))
    _, session_len = np.unique(ds.session, return_counts=True)
    values, value_counts = np.unique(ds.reward, return_counts=True)
    if values.size > 20:
        value_counts, edges = np.histogram(ds.reward, bins=20)
        labels = [f"{(a + b) / 2:.3g}" for a, b in itertools.pairwise(edges)]
    else:
        labels = [f"{v:g}" for v in values]
    return {
        "summary": ds.summary(),
        "bucket_seconds": width,
        "time": {
            "x": [start + width * i for i in range(n_buckets)],
            "splits": per_split,
        },
        "user_activity": _log_bins(user_counts),
        "item_popularity": {
            "x": ranks.tolist(),
            "y": ranked[ranks - 1].astype(int).tolist() if ranked.size else [],
        },
        "session_lengths": _log_bins(session_len),
        "reward_mix": {"labels": labels, "counts": value_counts.astype(int).tolist()},
        "splits": ds.split_counts(),
    }


def training_curves(run: RunInput) -> dict[str, Any]:
    """Per-epoch train losses and valid metrics of one run, and its best epoch."""
    epochs = [int(r["epoch"]) for r in run.epochs if "epoch" in r]
    losses: dict[str, list[float | None]] = {}
    valid: dict[str, list[float | None]] = {}
    for rec in run.epochs:
        for name in rec.get("train") or {}:
            losses.setdefault(name, [])
        for name in rec.get("valid") or {}:
            valid.setdefault(name, [])
    for rec in run.epochs:
        for name, col in losses.items():
            col.append((rec.get("train") or {}).get(name))
        for name, col in valid.items():
            col.append((rec.get("valid") or {}).get(name))
    results = run.results or {}
    best = results.get("best_epoch")
    if best is None:
        flagged = [int(r["epoch"]) for r in run.epochs if r.get("best")]
        best = flagged[-1] if flagged else None
    return {
        "run": str(run.path),
        "algo": run.algo,
        "seed": run.seed,
        "epochs": epochs,
        "train": losses,
        "valid": valid,
        "metric": results.get("metric") or run.run.get("fit", {}).get("metric", "ndcg@10"),
        "best_epoch": best,
    }


def popularity_deciles(popularity: np.ndarray) -> np.ndarray:
    """(N + 1,) int: each item's popularity decile 1..10 (10 = the most popular tenth of the
    catalogue by TRAIN events; ties broken by index), 0 at padding."""
    n = popularity.shape[0] - 1
    order = np.lexsort((np.arange(n), popularity[1:]))  # ascending popularity
    decile = np.empty(n, dtype=np.int64)
    decile[order] = np.arange(n) * 10 // max(n, 1) + 1
    return np.concatenate([[0], decile])


def _rank_deciles(
    art: Any, users: Any, decile: np.ndarray, *, k: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """(11,) recommendations per decile and (N + 1,) whether each item was recommended."""
    import torch

    from recloop.ranking import topk

    counts = np.zeros(11, dtype=np.int64)
    seen = np.zeros(decile.shape[0], dtype=bool)
    m = len(users.user)
    with torch.inference_mode():
        for lo in range(0, m, batch):
            hi = min(lo + batch, m)
            u = torch.from_numpy(users.user[lo:hi])
            scores = art.policy(
                u,
                torch.from_numpy(users.history[lo:hi]),
                torch.from_numpy(users.history_reward[lo:hi]),
            ).clone()  # (b, N + 1)
            scores[:, 0] = float("-inf")
            # Consumed items are masked, as the service does: what a user would be shown.
            c_lo, c_hi = users.consumed_offsets[lo], users.consumed_offsets[hi]
            rows = np.repeat(np.arange(hi - lo), np.diff(users.consumed_offsets[lo : hi + 1]))
            cols = users.consumed_items[c_lo:c_hi].astype(np.int64)
            scores[torch.from_numpy(rows), torch.from_numpy(cols)] = float("-inf")
            ranked = topk(scores, k, row_keys=u)
            top = ranked.indices.numpy()[np.isfinite(ranked.values.numpy())]  # (<= b * k,)
            counts += np.bincount(decile[top], minlength=11)
            seen[top] = True
    return counts, seen


def recommendation_mix(
    run: Path, ds: PreparedDataset, *, k: int = 10, split: str = "test"
) -> dict[str, Any]:
    """Coverage and the share of the top-``k`` lists (consumed items masked, as served) that
    falls in each popularity decile, for every user with an event in ``split``."""
    import torch

    from recloop.artifacts import load_artifact
    from recloop.evaluation.protocol import build_eval_users

    art = load_artifact(run)
    users = build_eval_users(ds, split=split, history=art.history_len)
    train_pop = np.bincount(ds.item[ds.split == 0], minlength=ds.n_items + 1)
    decile = popularity_deciles(train_pop)
    # One thread: these forward passes are small, and on a busy machine torch's default
    # thread pool made them 4x slower (1.5 s vs 6 s for the demo's three runs, load 12).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        counts, seen = _rank_deciles(art, users, decile, k=k, batch=1024)
    finally:
        torch.set_num_threads(threads)
    target = np.bincount(decile[users.target_items], minlength=11)[1:]
    share = counts[1:] / max(int(counts[1:].sum()), 1)
    return {
        "run": str(run),
        "algo": art.algo,
        "model_version": art.model_version,
        "k": k,
        "users": len(users.user),
        "coverage": float(seen[1:].sum() / ds.n_items),
        "share": share.tolist(),
        "target_share": (target / max(int(target.sum()), 1)).tolist(),
    }
