"""Experiment tracking: a training run also logged to TensorBoard or an MLflow run.

``recloop train --track tensorboard|mlflow`` (:func:`recloop.training.recommender.train_run`
with ``track=``) opens one :class:`Tracker` per name before the data is read.  Each one logs
the run's hyper-parameters (the algorithm's config and the fit loop's, flattened to dotted
names), the metrics of every epoch as the fit loop records them (train means, validation
metrics, throughput; step = epoch), and at the end the final valid and test metrics, the
evaluation table and the artifact:

- ``tensorboard``: event files in ``RUN_DIR/tensorboard`` (the fit loop's sink writes the
  per-epoch scalars there, and must be able to: a missing TensorBoard is an error here, not a
  silent skip); the hyper-parameters with the final metrics in the HPARAMS plugin, and the
  evaluation table, the artifact's path and manifest as text;
- ``mlflow``: one MLflow run (in ``tracking_uri``, default ``$MLFLOW_TRACKING_URI`` else
  ``./mlruns``, a file store; experiment ``recloop`` unless told) with params, per-epoch
  metrics, the artifact directory under ``artifact/``, ``run.json``, ``results.json`` and
  ``evaluation.md``.  MLflow metric names cannot hold ``@``: ``valid/ndcg@10`` is logged as
  ``valid/ndcg_at_10``.

Both libraries are optional extras (``recloop[tensorboard]``, ``recloop[mlflow]``), imported
only when asked for.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recloop.errors import ConfigError
from recloop.training.callbacks import Callback, FitState
from recloop.training.sinks import TENSORBOARD_DIR, flatten

if TYPE_CHECKING:
    from recloop.training.fit import FitResult

logger = logging.getLogger(__name__)

TRACKERS = ("tensorboard", "mlflow")
"""Names ``--track`` accepts."""
DEFAULT_EXPERIMENT = "recloop"
EVALUATION_FILE = "evaluation.md"


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested config dicts as dotted names; lists and None become their text."""
    out: dict[str, str | int | float | bool] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flat_params(v, prefix=f"{key}."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


def evaluation_table(result: FitResult) -> str:
    """The final valid and test metrics as a Markdown table (one row per split)."""
    splits = [(name, m) for name, m in (("valid", result.valid), ("test", result.test)) if m]
    if not splits:
        return "no final evaluation (fit.final_eval is off, or no valid/test split)\n"
    keys = sorted({k for _, m in splits for k in m}, key=_metric_order)
    lines = [
        "| split | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
        *(f"| {name} | " + " | ".join(_cell(m.get(k)) for k in keys) + " |" for name, m in splits),
        "",
        f"full ranking, consumed items {'masked' if result.mask_consumed else 'kept'}; "
        f"best epoch {result.best_epoch} of {result.epochs} ({result.metric})",
    ]
    return "\n".join(lines) + "\n"


def _metric_order(key: str) -> tuple[str, int]:
    name, _, k = key.partition("@")
    return (name, int(k) if k.isdigit() else 0)


def _cell(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)


class Tracker(Callback):
    """A run's sink in a tracking system; the fit loop calls it as a callback."""

    name: str = ""

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        """Before training: the run's hyper-parameters and what it is."""

    def finish(self, result: FitResult, *, run_dir: Path) -> None:
        """After the artifact and results are written: final metrics, table, artifact."""

    def abort(self, error: BaseException) -> None:
        """Training failed: mark the run so and let go of it."""

    def describe(self) -> str:
        """One line saying where the run went."""
        return self.name


def open_trackers(
    names: Sequence[str],
    *,
    run_dir: Path,
    tracking_uri: str | None = None,
    experiment: str | None = None,
) -> list[Tracker]:
    """One tracker per name; raises :class:`ConfigError` for an unknown name or a library
    that is not installed (before any data is read)."""
    out: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            out.append(TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR))
        elif name == "mlflow":
            out.append(
                MlflowTracker(
                    tracking_uri=tracking_uri, experiment=experiment or DEFAULT_EXPERIMENT
                )
            )
        else:
            raise ConfigError(f"--track {name!r}: unknown (known: {', '.join(TRACKERS)})")
    return out


# ----------------------------------------------------------------------------- tensorboard


class TensorBoardTracker(Tracker):
    """Hyper-parameters, final metrics and the evaluation table in ``RUN_DIR/tensorboard``;
    the per-epoch scalars come from the fit loop's TensorBoard sink in the same folder."""

    name = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        try:
            import tensorboard  # noqa: F401
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--track tensorboard needs TensorBoard: pip install 'recloop[tensorboard]'"
            ) from None
        self.logdir = Path(logdir)
        self._writer_class = SummaryWriter
        self._params: dict[str, str | int | float | bool] = {}

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        self._params = flat_params(params)
        self._tags = dict(tags)

    def finish(self, result: FitResult, *, run_dir: Path) -> None:
        writer = self._writer_class(log_dir=str(self.logdir))
        try:
            final = {f"final/{k}": v for k, v in flatten({"valid": result.valid}).items()}
            final |= {f"final/{k}": v for k, v in flatten({"test": result.test}).items()}
            if result.best_metric is not None:
                final["final/best_metric"] = float(result.best_metric)
            # run_name "." keeps the hparams beside the scalars, in one run of the UI
            writer.add_hparams(self._params, final or {"final/epochs": result.epochs}, run_name=".")
            writer.add_text("evaluation", evaluation_table(result), result.epochs)
            if result.artifact is not None:
                manifest = Path(result.artifact) / "manifest.json"
                text = f"`{result.artifact}`\n\n"
                if manifest.is_file():
                    text += "```json\n" + manifest.read_text() + "\n```\n"
                writer.add_text("artifact", text, result.epochs)
            writer.add_text("run", "\n".join(f"- {k}: {v}" for k, v in self._tags.items()))
        finally:
            writer.close()

    def describe(self) -> str:
        return f"tensorboard --logdir {self.logdir}"


# ----------------------------------------------------------------------------- mlflow

_MLFLOW_BAD = re.compile(r"[^\w./\- :]")
_MLFLOW_PARAM_LEN = 6000


def mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts: ``@`` → ``_at_``, other odd characters → ``_``."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


class MlflowTracker(Tracker):
    """One MLflow run, through ``MlflowClient`` (no global active run to leak)."""

    name = "mlflow"

    def __init__(self, *, tracking_uri: str | None, experiment: str) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(
                "--track mlflow needs MLflow: pip install 'recloop[mlflow]'"
            ) from None
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or _file_uri(Path("mlruns"))
        if "://" not in uri and not uri.startswith("file:"):
            uri = _file_uri(Path(uri))  # a plain folder
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store behind this switch; a folder given here (or the
            # default ./mlruns) is the user asking for one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.experiment = experiment
        self.run_id: str | None = None

    def start(self, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else None
        if exp_id is None:
            exp_id = self.client.create_experiment(self.experiment)
        run = self.client.create_run(exp_id, tags=dict(tags), run_name=tags.get("run_name"))
        self.run_id = run.info.run_id
        flat = [
            Param(mlflow_key(k), str(v)[:_MLFLOW_PARAM_LEN]) for k, v in flat_params(params).items()
        ]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
        epoch = int(record.get("epoch", 0))
        values = {k: v for k, v in flatten(record).items() if k not in ("epoch", "step")}
        self._log_metrics(values, step=epoch)

    def _log_metrics(self, values: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def finish(self, result: FitResult, *, run_dir: Path) -> None:
        assert self.run_id is not None
        final = flatten({"final": {"valid": result.valid, "test": result.test}})
        if result.best_epoch is not None:
            final["final/best_epoch"] = float(result.best_epoch)
        self._log_metrics(final, step=result.epochs)
        self.client.log_text(self.run_id, evaluation_table(result), EVALUATION_FILE)
        self.client.log_dict(self.run_id, result.to_dict(), "results.json")
        run_json = Path(run_dir) / "run.json"
        if run_json.is_file():
            self.client.log_artifact(self.run_id, str(run_json))
        if result.artifact is not None:
            self.client.log_artifacts(self.run_id, str(result.artifact), "artifact")
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self, error: BaseException) -> None:
        if self.run_id is not None:
            try:
                self.client.set_tag(self.run_id, "error", f"{type(error).__name__}: {error}"[:500])
                self.client.set_terminated(self.run_id, "FAILED")
            except Exception as exc:  # the training error matters more than this one
                logger.warning("could not mark MLflow run %s as failed: %s", self.run_id, exc)

    def describe(self) -> str:
        return f"mlflow run {self.run_id} (experiment {self.experiment!r}, {self.uri})"


def _file_uri(path: Path) -> str:
    return path.resolve().as_uri()
