"""``recloop demo``: the main job end to end on embedded defaults.

The demo is a list of steps run in order over one shared :class:`DemoState`; each step adds
its results under its name.  This first version locates (or downloads) MovieLens-100K and
prepares it with temporal leave-one-out; later steps (train, evaluate, serve) append
themselves to :data:`DEMO_STEPS`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from recloop.cli.app import app, echo, echo_json
from recloop.cli.prepare import format_prepare_summary, summary_of
from recloop.data.dataset import PreparedDataset
from recloop.data.download import locate_movielens_100k
from recloop.data.loaders import LoadOptions, load_raw
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.splits import SplitConfig

logger = logging.getLogger(__name__)


@dataclass
class DemoState:
    """What the steps share: where to write, and what earlier steps produced."""

    workdir: Path
    as_json: bool = False
    results: dict[str, Any] = field(default_factory=dict)
    """Step name → its JSON-able results (the ``--json`` document)."""
    raw_format: str | None = None
    raw_path: Path | None = None
    dataset: PreparedDataset | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def say(self, text: str) -> None:
        if not self.as_json:
            echo(text)


DemoStep = Callable[[DemoState], None]


def locate_step(state: DemoState) -> None:
    """Find MovieLens-100K locally, else download it from GroupLens."""
    fmt, path = locate_movielens_100k()
    state.raw_format, state.raw_path = fmt, path
    state.results["locate"] = {"format": fmt, "path": str(path)}
    state.say(f"[locate] MovieLens-100K ({fmt}) at {path}")


def prepare_step(state: DemoState) -> None:
    """Prepare it with temporal leave-one-out into ``<workdir>/data``."""
    assert state.raw_format is not None and state.raw_path is not None
    cfg = PrepareConfig(split=SplitConfig(mode="loo"))
    start = time.perf_counter()
    raw = load_raw(state.raw_format, state.raw_path, LoadOptions())
    dataset = prepare(raw, cfg)
    dataset.save(state.data_dir)
    state.dataset = dataset
    summary = summary_of(dataset, state.data_dir, time.perf_counter() - start)
    state.results["prepare"] = summary
    state.say("[prepare] " + format_prepare_summary(summary))


DEMO_STEPS: list[tuple[str, DemoStep]] = [
    ("locate", locate_step),
    ("prepare", prepare_step),
]
"""The demo's steps in order; later features append theirs."""


def run_demo(state: DemoState, steps: list[tuple[str, DemoStep]] | None = None) -> DemoState:
    """Run ``steps`` (default :data:`DEMO_STEPS`) in order on ``state``."""
    state.workdir.mkdir(parents=True, exist_ok=True)
    for name, step in steps if steps is not None else DEMO_STEPS:
        logger.debug("demo step %s", name)
        step(state)
    return state


@app.command("demo")
def demo_command(
    workdir: Path = typer.Option(
        Path("runs/demo"), "--workdir", help="Where the demo writes everything."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document at the end."),
) -> None:
    """Run the main job end to end on MovieLens-100K with embedded defaults."""
    state = run_demo(DemoState(workdir=workdir, as_json=as_json))
    if as_json:
        echo_json({"workdir": str(workdir), **state.results})
