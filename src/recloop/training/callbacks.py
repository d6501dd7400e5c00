"""Hooks the fit loop calls after each epoch: early stopping, checkpoints, metric sinks, logs.

A callback sees the live :class:`FitState` and the epoch's record (a JSON-able dict with
``epoch``, ``step``, ``train`` means, ``valid`` metrics, timings); it may set
``state.stop``.  They run in list order, so early stopping (which marks the record
``best``) comes before the checkpointer (which then saves ``best.pt``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from recloop.algos.base import Algo
from recloop.config import config_to_dict
from recloop.training.checkpoint import FitProgress, save_best, save_checkpoint
from recloop.training.sinks import MetricsSink

logger = logging.getLogger(__name__)


@dataclass
class FitState:
    """What the fit loop and its callbacks share while training."""

    algo: Algo[Any]
    """The algorithm being trained."""
    progress: FitProgress
    """Counters after the last finished epoch (replaced, never mutated)."""
    epochs: int
    """Epochs asked for in total."""
    best_networks: dict[str, Any] | None = None
    """CPU copies of the networks' state dicts at the best validation epoch."""
    stop: bool = False
    """Set by a callback to end training after this epoch."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every epoch's record so far."""


def networks_snapshot(algo: Algo[Any]) -> dict[str, Any]:
    """CPU copies of every network's state dict (cheap next to an epoch at these sizes)."""
    return {
        name: {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
        for name, net in algo.networks().items()
    }


def load_networks(algo: Algo[Any], snapshot: dict[str, Any]) -> None:
    for name, net in algo.networks().items():
        state: dict[str, Tensor] = snapshot[name]
        net.load_state_dict(state)


class Callback:
    """No-op hooks; override the ones you need."""

    def on_fit_start(self, state: FitState) -> None:
        """Before the first epoch (after a resume has restored the state)."""

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        """After each epoch's training and validation; ``record`` may be annotated."""

    def on_fit_end(self, state: FitState) -> None:
        """After the last epoch, before the final evaluation."""


class EarlyStopping(Callback):
    """Stop when ``valid[metric]`` has not improved by ``min_delta`` for ``patience`` evals.

    Remembers the networks at the best epoch and, with ``restore_best``, puts them back at
    the end.  ``patience`` None keeps training to the last epoch but still restores the
    best weights.  Every metric here is higher-is-better.
    """

    def __init__(
        self,
        *,
        metric: str,
        patience: int | None,
        min_delta: float = 0.0,
        restore_best: bool = True,
    ) -> None:
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.restore_best = restore_best

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        value = record.get("valid", {}).get(self.metric)
        if value is None:
            return
        p = state.progress
        if p.best_metric is None or value > p.best_metric + self.min_delta:
            state.progress = dataclasses.replace(
                p, best_metric=float(value), best_epoch=int(record["epoch"]), bad_epochs=0
            )
            state.best_networks = networks_snapshot(state.algo)
            record["best"] = True
            return
        state.progress = dataclasses.replace(p, bad_epochs=p.bad_epochs + 1)
        record["best"] = False
        if self.patience is not None and state.progress.bad_epochs >= self.patience:
            logger.info(
                "early stopping after epoch %d: valid %s has not improved on %.5f (epoch %s) "
                "for %d evaluations",
                record["epoch"],
                self.metric,
                p.best_metric,
                p.best_epoch,
                state.progress.bad_epochs,
            )
            state.stop = True

    def on_fit_end(self, state: FitState) -> None:
        if self.restore_best and state.best_networks is not None:
            load_networks(state.algo, state.best_networks)
            logger.info(
                "restored the weights of epoch %s (valid %s = %.5f)",
                state.progress.best_epoch,
                self.metric,
                state.progress.best_metric,
            )


class Checkpointer(Callback):
    """Writes ``RUN_DIR/checkpoint/last.pt`` every epoch and ``best.pt`` on improvement."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        save_checkpoint(
            self.run_dir,
            algo_state=state.algo.state_dict(),
            progress=state.progress,
            config=config_to_dict(state.algo.cfg),
        )
        if record.get("best") and state.best_networks is not None:
            save_best(self.run_dir, state.best_networks)


class SinkWriter(Callback):
    """Hands each epoch's record to the metric sinks; closes them at the end."""

    def __init__(self, sinks: Sequence[MetricsSink]) -> None:
        self.sinks = list(sinks)

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def on_fit_end(self, state: FitState) -> None:
        for sink in self.sinks:
            sink.close()


class LogProgress(Callback):
    """One log line per epoch: train loss, the validation metric, throughput."""

    def __init__(self, *, metric: str) -> None:
        self.metric = metric

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        valid = record.get("valid", {})
        shown = f", valid {self.metric} {valid[self.metric]:.4f}" if self.metric in valid else ""
        logger.info(
            "epoch %d/%d: loss %.4f%s, %.0f transitions/s%s",
            record["epoch"],
            state.epochs,
            record.get("train", {}).get("loss", float("nan")),
            shown,
            record.get("transitions_per_s", 0.0),
            " (best)" if record.get("best") else "",
        )
