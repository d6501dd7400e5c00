"""Checkpoints of a run: algorithm weights and optimisers, the fit loop's progress, RNG states.

::

    RUN_DIR/checkpoint/
      last.pt   everything needed to resume after the last finished epoch
      best.pt   the networks' weights at the best validation epoch (early stopping)

Files hold only tensors, numbers, strings, lists and dicts: they are written with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which refuses any
pickled object.  Writes go to a temporary file first and are renamed into place, so an
interrupted save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recloop.errors import ArtifactError

CHECKPOINT_DIR = "checkpoint"
LAST = "last.pt"
BEST = "best.pt"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FitProgress:
    """Where the fit loop stands after a finished epoch."""

    epoch: int
    """Epochs completed."""
    step: int
    """Updates done."""
    transitions: int
    """Transitions trained on."""
    best_metric: float | None = None
    """Best validation value of the early-stopping metric so far."""
    best_epoch: int | None = None
    """Epoch (1-based) that reached it."""
    bad_epochs: int = 0
    """Evaluations since the last improvement."""


def rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device) and numpy global generator states, as tensors."""
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(
    run_dir: Path,
    *,
    algo_state: dict[str, Any],
    progress: FitProgress,
    config: dict[str, Any],
) -> Path:
    """Write ``RUN_DIR/checkpoint/last.pt``; ``config`` is the algorithm config as a dict."""
    path = Path(run_dir) / CHECKPOINT_DIR / LAST
    _atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "algo": _to_cpu(algo_state),
            "progress": dataclasses.asdict(progress),
            "rng": rng_state(),
            "config": config,
        },
        path,
    )
    return path


def save_best(run_dir: Path, networks: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/checkpoint/best.pt``: the networks' state dicts at the best epoch."""
    path = Path(run_dir) / CHECKPOINT_DIR / BEST
    _atomic_save({"format_version": FORMAT_VERSION, "networks": _to_cpu(networks)}, path)
    return path


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """A loaded ``last.pt`` (and ``best.pt`` when there is one)."""

    algo_state: dict[str, Any]
    """What :meth:`~recloop.algos.base.Algo.state_dict` returned."""
    progress: FitProgress
    """The fit loop's counters."""
    rng: dict[str, Any]
    """RNG states, for :func:`set_rng_state`."""
    config: dict[str, Any]
    """The algorithm config the run was started with."""
    best_networks: dict[str, Any] | None
    """Networks' state dicts at the best epoch."""


def _load(path: Path, map_location: torch.device | str) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise ArtifactError(f"{path}: unreadable checkpoint ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: not a recloop checkpoint of format {FORMAT_VERSION}")
    return obj


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / LAST).is_file()


def load_checkpoint(run_dir: Path, *, map_location: torch.device | str = "cpu") -> Checkpoint:
    """Read ``RUN_DIR/checkpoint/{last,best}.pt``; raises :class:`ArtifactError` if missing."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    last = directory / LAST
    if not last.is_file():
        raise ArtifactError(f"{run_dir}: no checkpoint to resume from ({last} is missing)")
    obj = _load(last, map_location)
    best = directory / BEST
    best_networks = _load(best, map_location)["networks"] if best.is_file() else None
    return Checkpoint(
        algo_state=obj["algo"],
        progress=FitProgress(**obj["progress"]),
        rng=obj["rng"],
        config=obj["config"],
        best_networks=best_networks,
    )
