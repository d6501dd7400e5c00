"""Evaluate saved runs (or artifacts) side by side: what ``recloop evaluate`` prints.

Each run is loaded as a serving artifact and ranked over the whole catalogue on the
prepared dataset it was trained on (or the one given), after checking that the id maps
are the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recloop.algos.base import run_label
from recloop.artifacts import load_artifact
from recloop.data.dataset import PreparedDataset
from recloop.errors import ArtifactError, ConfigError, DataError
from recloop.training.recommender import RUN_FILE


@dataclass(frozen=True, kw_only=True)
class RunEvaluation:
    """Full-ranking metrics of one run on one split."""

    run: str
    """The run or artifact directory as given."""
    algo: str
    """Algorithm name and variant from the artifact's config (``td3 (+BC, α=2.5)``)."""
    model_version: str
    """Algorithm plus weights hash, as serving reports it."""
    data: str
    """Prepared dataset evaluated on."""
    n_users: int
    """Users with an event in the split."""
    metrics: dict[str, float]
    """``name@k`` → value."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "algo": self.algo,
            "model_version": self.model_version,
            "data": self.data,
            "n_users": self.n_users,
            "metrics": dict(self.metrics),
        }


def recorded_data_path(run: Path, manifest: dict[str, Any]) -> Path:
    """The prepared dataset an artifact (or its run's ``run.json``) recorded."""
    recorded = manifest.get("dataset", {}).get("path")
    run_file = Path(run) / RUN_FILE
    if not recorded and run_file.is_file():
        recorded = json.loads(run_file.read_text()).get("data")
    if not recorded:
        raise ConfigError(f"{run}: the artifact records no dataset path; pass --data")
    path = Path(recorded)
    if not path.is_dir():
        raise DataError(f"{run}: its dataset {path} is gone; pass --data")
    return path


def check_same_ids(manifest: dict[str, Any], dataset: PreparedDataset, where: Path) -> None:
    """Refuse to score a dataset whose id maps are not the ones the artifact was built on."""
    files = dataset.manifest.get("files", {})
    for name in ("user_ids.txt", "item_ids.txt"):
        ours = manifest.get("id_maps", {}).get(name)
        theirs = files.get(name)
        if ours and theirs and ours != theirs:
            raise ArtifactError(
                f"{where}: {name} sha256 {ours[:12]}… differs from the dataset's "
                f"{theirs[:12]}… ({dataset.path}); the artifact was trained on other data"
            )


def evaluate_runs(
    runs: Sequence[Path],
    *,
    data: Path | None = None,
    split: str = "test",
    mask_consumed: bool = True,
    ks: tuple[int, ...] = (5, 10, 20),
    batch_size: int = 1024,
) -> list[RunEvaluation]:
    """Full-ranking metrics of each run on ``split`` (datasets loaded once each)."""
    from recloop.evaluation import EvalConfig, evaluate

    if split not in ("valid", "test"):
        raise ConfigError(f"split must be valid or test, got {split!r}")
    loaded: dict[Path, PreparedDataset] = {}
    out: list[RunEvaluation] = []
    for run in runs:
        art = load_artifact(Path(run))
        path = data if data is not None else recorded_data_path(Path(run), art.manifest)
        if path not in loaded:
            loaded[path] = PreparedDataset.load(path)
        ds = loaded[path]
        check_same_ids(art.manifest, ds, Path(run))
        report = evaluate(
            art.policy,
            ds,
            split=split,
            history=art.history_len,
            cfg=EvalConfig(ks=ks, mask_consumed=mask_consumed, batch_size=batch_size),
            device="cpu",
        )
        out.append(
            RunEvaluation(
                run=str(run),
                algo=run_label(art.algo, art.manifest.get("config")),
                model_version=art.model_version,
                data=str(path),
                n_users=report.n_users,
                metrics={k: float(v) for k, v in report.metrics.items()},
            )
        )
    return out


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned plain-text table with a rule under the header."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def comparison_table(
    results: Sequence[RunEvaluation], *, split: str, mask_consumed: bool, k: int = 10
) -> str:
    """The runs' HR, NDCG, MRR, recall, MAP and coverage at ``k``, with a protocol line."""
    keys = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr", "recall", "map", "coverage")]
    keys = [key for key in keys if any(key in r.metrics for r in results)]
    rows = [
        [r.run, r.algo, *(f"{r.metrics[key]:.4f}" if key in r.metrics else "-" for key in keys)]
        for r in results
    ]
    n_users = results[0].n_users if results else 0
    return (
        format_table(["run", "algo", *keys], rows)
        + f"\nsplit {split}, {n_users} users, full ranking over the catalogue, "
        + protocol_line(mask_consumed)
    )


def protocol_line(mask_consumed: bool) -> str:
    """What a masked or unmasked number is, and which RecBole numbers it compares with."""
    if mask_consumed:
        return (
            "MASKED: consumed items masked (targets stay rankable) — RecBole's rule for "
            "general models"
        )
    return (
        "UNMASKED: nothing removed — RecBole's rule for sequential models (GRU4Rec, "
        "SASRec): compare with those on these numbers"
    )
