"""Where per-epoch metrics go: JSON lines in the run directory, and TensorBoard if installed."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsSink(Protocol):
    """Receives one record per epoch (nested dicts of numbers)."""

    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per line and flushes it, so a crashed run keeps its history."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(record, default=float) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"valid": {"hr@10": 0.1}}`` → ``{"valid/hr@10": 0.1}``; non-numbers are dropped."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix=f"{key}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class TensorBoardSink:
    """Scalars per epoch through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(logdir))

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record.get("epoch", 0))
        for tag, value in flatten(record).items():
            if tag != "epoch":
                self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def open_sinks(run_dir: Path, *, tensorboard: bool = True) -> list[MetricsSink]:
    """The JSON-lines sink, plus TensorBoard when asked for and installed."""
    sinks: list[MetricsSink] = [JsonlSink(Path(run_dir) / METRICS_FILE)]
    if tensorboard:
        if tensorboard_available():
            sinks.append(TensorBoardSink(Path(run_dir) / TENSORBOARD_DIR))
        else:
            logger.debug("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
    return sinks
