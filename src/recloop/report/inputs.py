"""Find and read what the report is built from: the files recloop already writes.

Each path given to ``recloop report`` is one of

- a prepared dataset (``manifest.json`` + ``events.arrow``, or ``events.parquet`` for the
  first format, from ``recloop prepare``);
- a training run (``run.json``, ``metrics.jsonl``, ``results.json``, ``artifact/``);
- a JSON document printed by ``recloop evaluate --json``, ``recloop world evaluate --json``
  or ``recloop world ope --json`` (recognised by its keys, whatever the file is called);
- a closed-loop experiment table: CSV with columns round, arm, algo, reward, lo, hi (or the
  same records as a JSON list);
- any other directory (a demo's workdir): searched two levels deep for the above.

A path given explicitly that is none of these is an error naming it; a file met while
searching a directory that is none of these is skipped (a workdir holds other files too).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recloop.data.dataset import EVENTS_FILE, LEGACY_EVENTS_FILE
from recloop.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

EXPERIMENT_COLUMNS = ("round", "arm", "algo", "reward", "lo", "hi")
"""Columns of a closed-loop experiment table, one row per (round, arm)."""

_SKIP_DIRS = {"checkpoint", "artifact", "tensorboard", "versions", "__pycache__"}
"""Folders inside outputs that hold nothing the report reads (weights, event files)."""


@dataclass(frozen=True, kw_only=True)
class RunInput:
    """One training run directory."""

    path: Path
    run: dict[str, Any]
    """``run.json``: algorithm, full config, fit settings, data path, versions."""
    epochs: list[dict[str, Any]]
    """``metrics.jsonl``: one record per epoch (train losses, valid metrics, ``best``)."""
    results: dict[str, Any] | None
    """``results.json`` (final valid/test metrics, best epoch) once the run finished."""
    manifest: dict[str, Any] | None
    """``artifact/manifest.json``: model version, torch version, weights hash."""

    @property
    def algo(self) -> str:
        return str(self.run.get("algo", "?"))

    @property
    def seed(self) -> int | None:
        seed = (self.run.get("config") or {}).get("seed")
        return int(seed) if isinstance(seed, int) else None

    @property
    def data(self) -> Path | None:
        data = self.run.get("data")
        return Path(data) if data else None


@dataclass(frozen=True, kw_only=True)
class DatasetInput:
    path: Path
    manifest: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class JsonInput:
    """A JSON document printed by one of recloop's ``--json`` commands."""

    path: Path
    kind: str
    """``evaluate``, ``world_evaluate`` or ``world_ope``."""
    doc: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class ExperimentRow:
    round: int
    arm: str
    algo: str
    reward: float
    lo: float
    hi: float


@dataclass(frozen=True, kw_only=True)
class ExperimentInput:
    path: Path
    rows: list[ExperimentRow]


@dataclass(kw_only=True)
class ReportInputs:
    """Everything found, each kind in the order met, without duplicates."""

    datasets: list[DatasetInput] = field(default_factory=list)
    runs: list[RunInput] = field(default_factory=list)
    documents: list[JsonInput] = field(default_factory=list)
    experiments: list[ExperimentInput] = field(default_factory=list)

    def docs(self, kind: str) -> list[JsonInput]:
        return [d for d in self.documents if d.kind == kind]

    @property
    def empty(self) -> bool:
        return not (self.datasets or self.runs or self.documents or self.experiments)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line; a bad line is an error naming it."""
    out: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {lineno}: expected a JSON object, got {rec!r:.60}")
        out.append(rec)
    return out


def json_kind(doc: Any) -> str | None:
    """Which command printed ``doc``, from its keys; None when it is none of them."""
    if isinstance(doc, list):
        return (
            "experiment" if doc and all(isinstance(r, dict) and "arm" in r for r in doc) else None
        )
    if not isinstance(doc, dict):
        return None
    if {"split", "protocol", "runs"} <= doc.keys() and isinstance(doc["runs"], list):
        return "evaluate"
    if {"one_step_truth", "estimates", "runs"} <= doc.keys():
        return "world_ope"
    rows = doc.get("rows")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        if {"policy", "return"} <= rows[0].keys():
            return "world_evaluate"
        if "arm" in rows[0]:
            return "experiment"
    return None


def _number(path: Path, line: int, name: str, value: Any, cast: type = float) -> Any:
    try:
        out = cast(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: line {line}: field {name!r}: not a number: {value!r}") from None
    if cast is float and not math.isfinite(out):
        raise DataError(f"{path}: line {line}: field {name!r}: not finite: {value!r}")
    return out


def _experiment_rows(
    path: Path, records: list[dict[str, Any]], first_line: int
) -> list[ExperimentRow]:
    rows = []
    for i, rec in enumerate(records):
        line = first_line + i
        missing = [c for c in EXPERIMENT_COLUMNS if rec.get(c) in (None, "")]
        if missing:
            raise DataError(f"{path}: line {line}: missing field(s) {', '.join(missing)}")
        row = ExperimentRow(
            round=_number(path, line, "round", rec["round"], int),
            arm=str(rec["arm"]),
            algo=str(rec["algo"]),
            reward=_number(path, line, "reward", rec["reward"]),
            lo=_number(path, line, "lo", rec["lo"]),
            hi=_number(path, line, "hi", rec["hi"]),
        )
        if not row.lo <= row.reward <= row.hi:
            raise DataError(
                f"{path}: line {line}: reward {row.reward} lies outside its interval "
                f"[{row.lo}, {row.hi}]"
            )
        rows.append(row)
    return rows


def read_experiment_csv(path: Path) -> ExperimentInput:
    """A closed-loop experiment table (:data:`EXPERIMENT_COLUMNS`; other columns ignored)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in EXPERIMENT_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{path}: line 1: an experiment table needs columns "
                f"{', '.join(EXPERIMENT_COLUMNS)}; missing {', '.join(missing)}"
            )
        records = list(reader)
    return ExperimentInput(path=path, rows=_experiment_rows(path, records, first_line=2))


def read_run(path: Path) -> RunInput:
    run = _read_json(path / "run.json")
    metrics = path / "metrics.jsonl"
    results = path / "results.json"
    manifest = path / "artifact" / "manifest.json"
    return RunInput(
        path=path,
        run=run,
        epochs=read_jsonl(metrics) if metrics.is_file() else [],
        results=_read_json(results) if results.is_file() else None,
        manifest=_read_json(manifest) if manifest.is_file() else None,
    )


def _is_dataset(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (
        (path / EVENTS_FILE).is_file() or (path / LEGACY_EVENTS_FILE).is_file()
    )


class _Collector:
    def __init__(self) -> None:
        self.inputs = ReportInputs()
        self.seen: set[Path] = set()

    def add(self, path: Path, *, explicit: bool, depth: int = 0) -> None:
        key = path.resolve()
        if key in self.seen:
            return
        self.seen.add(key)
        if path.is_dir():
            self._add_dir(path, explicit=explicit, depth=depth)
        elif path.is_file():
            self._add_file(path, explicit=explicit)
        elif explicit:
            raise ConfigError(f"{path}: no such file or directory")

    def _add_dir(self, path: Path, *, explicit: bool, depth: int) -> None:
        if (path / "run.json").is_file():
            self.inputs.runs.append(read_run(path))
        elif _is_dataset(path):
            self.inputs.datasets.append(
                DatasetInput(path=path, manifest=_read_json(path / "manifest.json"))
            )
        elif depth < 2:
            before = len(self.seen)
            for child in sorted(path.iterdir()):
                if child.name.startswith(".") or child.name in _SKIP_DIRS:
                    continue
                if child.is_dir() or child.suffix in (".json", ".csv"):
                    self.add(child, explicit=False, depth=depth + 1)
            if explicit and len(self.seen) == before:
                raise ConfigError(f"{path}: an empty directory; nothing to report on")
        elif explicit:
            raise ConfigError(f"{path}: not a run, dataset or folder of them")

    def _add_file(self, path: Path, *, explicit: bool) -> None:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                header = next(csv.reader(f), [])
            if set(EXPERIMENT_COLUMNS) <= set(header) or explicit:
                self.inputs.experiments.append(read_experiment_csv(path))
            return
        if path.suffix != ".json":
            if explicit:
                raise ConfigError(
                    f"{path}: the report reads run or dataset directories, JSON documents "
                    "from --json commands and experiment CSV files; this is none of them"
                )
            return
        doc = _read_json(path)
        kind = json_kind(doc)
        if kind == "experiment":
            records = doc if isinstance(doc, list) else doc["rows"]
            self.inputs.experiments.append(
                ExperimentInput(path=path, rows=_experiment_rows(path, records, first_line=1))
            )
        elif kind is not None:
            self.inputs.documents.append(JsonInput(path=path, kind=kind, doc=doc))
        elif explicit:
            raise ConfigError(
                f"{path}: not a JSON document the report knows (from `recloop evaluate "
                "--json`, `recloop world evaluate --json`, `recloop world ope --json` or an "
                "experiment's rows)"
            )
        else:
            logger.debug("report: skipping %s (not a known recloop document)", path)


def collect_inputs(paths: list[Path], *, follow_data: bool = True) -> ReportInputs:
    """Read every path (module docstring); with ``follow_data`` also the prepared datasets
    the runs were trained on, when they still exist."""
    if not paths:
        raise ConfigError("give at least one run, dataset, JSON document or directory")
    collector = _Collector()
    for path in paths:
        collector.add(Path(path), explicit=True)
    if follow_data:
        for run in list(collector.inputs.runs):
            if run.data is not None and _is_dataset(run.data):
                collector.add(run.data, explicit=False)
    if collector.inputs.empty:
        raise ConfigError(
            f"found nothing to report on in {', '.join(str(p) for p in paths)} (no run, "
            "prepared dataset, --json document or experiment table)"
        )
    return collector.inputs
