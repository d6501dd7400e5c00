"""``recloop demo``: the main job end to end on embedded defaults.

The demo is a list of steps run in order over one shared :class:`DemoState`; each step adds
its results under its name: locate (or download) MovieLens-100K, prepare it with temporal
leave-one-out, pretrain DSSM embeddings, train popularity, supervised and REINFORCE, compare
them with full ranking, then run the online loop in this process — replay the events through
the stream processor into a SQLite behaviour log and store, answer a request through the
HTTP app, and read the log back as the next training set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from recloop.cli.app import app, echo, echo_json
from recloop.cli.prepare import format_prepare_summary, summary_of

if TYPE_CHECKING:
    from recloop.data.dataset import PreparedDataset

logger = logging.getLogger(__name__)


@dataclass
class DemoState:
    """What the steps share: where to write, and what earlier steps produced."""

    workdir: Path
    as_json: bool = False
    results: dict[str, Any] = field(default_factory=dict)
    """Step name → its JSON-able results (the ``--json`` document)."""
    epochs: int = 4
    """Training epochs of each learned model."""
    raw_format: str | None = None
    raw_path: Path | None = None
    dataset: PreparedDataset | None = None
    runs: dict[str, Path] = field(default_factory=dict)
    """Algorithm → its run directory."""

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def say(self, text: str) -> None:
        if not self.as_json:
            echo(text)


DemoStep = Callable[[DemoState], None]


def locate_step(state: DemoState) -> None:
    """Find MovieLens-100K locally, else download it from GroupLens."""
    from recloop.data.download import locate_movielens_100k

    fmt, path = locate_movielens_100k()
    state.raw_format, state.raw_path = fmt, path
    state.results["locate"] = {"format": fmt, "path": str(path)}
    state.say(f"[locate] MovieLens-100K ({fmt}) at {path}")


def prepare_step(state: DemoState) -> None:
    """Prepare it with temporal leave-one-out into ``<workdir>/data``."""
    from recloop.data.loaders import LoadOptions, load_raw
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.splits import SplitConfig

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


def pretrain_step(state: DemoState) -> None:
    """DSSM two-tower embeddings with the user and item features, into ``<workdir>/dssm``."""
    from recloop.embeddings import DSSMConfig, pretrain_dssm, save_embeddings

    assert state.dataset is not None
    start = time.perf_counter()
    result = pretrain_dssm(state.dataset, DSSMConfig(epochs=3))
    save_embeddings(result, state.workdir / "dssm")
    last = result.history[-1]
    state.results["pretrain"] = {
        "dir": str(state.workdir / "dssm"),
        "valid_auc": last.valid_auc,
        "valid_loss": last.valid_loss,
        "seconds": round(time.perf_counter() - start, 2),
    }
    state.say(
        f"[pretrain] DSSM embeddings → {state.workdir / 'dssm'}  valid AUC {last.valid_auc:.3f}"
    )


DEMO_ALGOS = ("popularity", "supervised", "reinforce")
"""The baselines every RL result must beat, and REINFORCE with top-K off-policy correction."""


def train_step(state: DemoState) -> None:
    """Train each of :data:`DEMO_ALGOS` into ``<workdir>/runs/<algo>`` (overwriting)."""
    from recloop.training.recommender import train_run

    out: dict[str, Any] = {}
    for algo in DEMO_ALGOS:
        run_dir = state.workdir / "runs" / algo
        result = train_run(algo, state.data_dir, run_dir, epochs=state.epochs, overwrite=True)
        state.runs[algo] = run_dir
        out[algo] = {
            "run": str(run_dir),
            "epochs": result.epochs,
            "seconds": round(result.seconds, 2),
            "valid_ndcg@10": result.valid.get("ndcg@10"),
        }
        state.say(f"[train] {algo}: {result.epochs} epochs in {result.seconds:.1f} s → {run_dir}")
    state.results["train"] = out


def evaluate_step(state: DemoState) -> None:
    """Full-ranking comparison on the test split, masked and unmasked."""
    from recloop.training.compare import comparison_table, evaluate_runs

    runs = [state.runs[a] for a in DEMO_ALGOS]
    results = evaluate_runs(runs, data=state.data_dir, split="test")
    unmasked = evaluate_runs(runs, data=state.data_dir, split="test", mask_consumed=False)
    state.results["evaluate"] = {r.algo: r.metrics for r in results}
    state.results["evaluate_unmasked"] = {r.algo: r.metrics for r in unmasked}
    # The same document as `recloop evaluate RUNS --json`, kept for `recloop report`.
    doc = {
        "split": "test",
        "protocol": "both",
        "mask_consumed": True,
        "runs": [
            {**r.to_dict(), "metrics_unmasked": u.metrics}
            for r, u in zip(results, unmasked, strict=True)
        ],
    }
    (state.workdir / "evaluate.json").write_text(json.dumps(doc, indent=2) + "\n")
    state.say(
        "[evaluate]\n"
        + comparison_table(results, split="test", mask_consumed=True)
        + "\n\n"
        + comparison_table(unmasked, split="test", mask_consumed=False)
    )
    state.say(f"[artifact] REINFORCE artifact: {state.runs['reinforce'] / 'artifact'}")


def online_step(state: DemoState) -> None:
    """Replay → stream processor → SQLite log and store; one request; the log read back."""
    import asyncio

    import httpx

    from recloop.data.loaders.sql import load_from_db
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.splits import SplitConfig
    from recloop.serving.app import create_app
    from recloop.serving.settings import ServeSettings
    from recloop.streaming.replay import load_replay_events
    from recloop.streaming.runner import run_with_replay
    from recloop.streaming.settings import load_stream_settings

    online = state.workdir / "online"
    if online.exists():
        for f in online.iterdir():
            f.unlink()
    online.mkdir(parents=True, exist_ok=True)
    artifact = state.runs["reinforce"]
    database_url = f"sqlite:///{online / 'log.db'}"
    store_url = f"sqlite:///{online / 'store.db'}"
    events = load_replay_events(state.data_dir)
    settings = load_stream_settings(
        bus_url="memory://",
        database_url=database_url,
        store_url=store_url,
        artifact=artifact,
        batch_size=2000,
        exit_when_idle_s=1.0,
    )
    start = time.perf_counter()
    stats = run_with_replay(settings, events)
    seconds = time.perf_counter() - start
    state.say(
        f"[online] replayed {events.height:,} events in {seconds:.1f} s: logged {stats.logged:,}"
        f", refreshed {stats.recommendations:,} lists, dead letters {stats.dead_letters}"
    )
    user = str(events["user_id"][0])
    app = create_app(ServeSettings.model_validate({"artifact": artifact, "store_url": store_url}))

    async def ask() -> dict[str, Any]:
        # The real app and routes, in process: its lifespan opens the model and the store.
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
                resp = await client.post("/v1/recommend", json={"user_id": user, "n": 5})
                out: dict[str, Any] = resp.json()
                return out

    reply = asyncio.run(ask())
    state.say(
        f"[serve] POST /v1/recommend user {user} → {[i['item_id'] for i in reply['items']]}"
        f" ({reply['source']}, {reply['model_version']})"
    )
    raw = load_from_db(database_url)
    nxt = prepare(raw, PrepareConfig(split=SplitConfig(mode="loo")))
    nxt.save(state.workdir / "next")
    state.say(
        f"[loop] behaviour log read back: {nxt.n_events:,} events, {nxt.n_users} users, "
        f"{nxt.n_items} items → {state.workdir / 'next'} (the next training set)"
    )
    state.results["online"] = {
        "events_sent": events.height,
        "stream": stats.as_dict(),
        "seconds": round(seconds, 2),
        "request": {"user_id": user, "response": reply},
        "next_dataset": nxt.summary(),
    }


def loop_step(state: DemoState) -> None:
    """One round of ``recloop loop`` on the behaviour log the online step filled: window,
    time holdout, training, the gate against popularity (no current model yet), publish."""
    import shutil

    from recloop.loop.config import LoopConfig
    from recloop.loop.controller import LoopController

    for name in ("registry", "loop"):
        shutil.rmtree(state.workdir / name, ignore_errors=True)
    cfg = LoopConfig(
        database_url=f"sqlite:///{state.workdir / 'online' / 'log.db'}",
        registry=str(state.workdir / "registry"),
        workdir=str(state.workdir / "loop"),
        algo="reinforce",
        train={"fit": {"epochs": 1}},
        every_events=1,  # the log is new: one round now
        use_ope=False,
    )
    result = LoopController(cfg).run_once()
    serve = (
        f"; `recloop serve {state.workdir / 'registry'}` serves and follows it"
        if result.current is not None
        else " (not promoted, so nothing is current yet)"
    )
    state.say(
        f"[loop] one round of `recloop loop`: {result.status} {result.version} "
        f"({result.reason}) → {state.workdir / 'registry'}{serve}"
    )
    state.results["loop"] = {
        "status": result.status,
        "reason": result.reason,
        "version": result.version,
        "current": result.current,
        "seconds": round(result.seconds, 2),
    }


def report_step(state: DemoState) -> None:
    """``recloop report`` on everything the demo wrote: one HTML file, opens offline."""
    from recloop.report import write_report

    result = write_report([state.workdir], state.workdir / "report.html")
    state.results["report"] = {
        "path": str(result.path),
        "charts": result.charts,
        "bytes": result.bytes,
        "seconds": round(result.seconds, 2),
    }
    state.say(
        f"[report] {result.charts} charts, {result.bytes / 1e6:.2f} MB in {result.seconds:.1f} s"
        f" → {result.path}"
    )


DEMO_STEPS: list[tuple[str, DemoStep]] = [
    ("locate", locate_step),
    ("prepare", prepare_step),
    ("pretrain", pretrain_step),
    ("train", train_step),
    ("evaluate", evaluate_step),
    ("online", online_step),
    ("loop", loop_step),
    ("report", report_step),
]
"""The demo's steps in order; later features append theirs."""


def run_demo(state: DemoState, steps: list[tuple[str, DemoStep]] | None = None) -> DemoState:
    """Run ``steps`` (default :data:`DEMO_STEPS`) in order on ``state``."""
    state.workdir.mkdir(parents=True, exist_ok=True)
    for name, step in steps if steps is not None else DEMO_STEPS:
        logger.debug("demo step %s", name)
        step(state)
    return state


@contextmanager
def step_lines_only() -> Iterator[None]:
    """Each step says what it did once, in its tagged line: the library's INFO lines (the
    same counts, timestamped) are held back while the demo runs.  Warnings still show, and
    ``recloop -v demo`` shows everything."""
    root = logging.getLogger("recloop")
    before = root.level
    if before == logging.INFO:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(before)


@app.command("demo")
def demo_command(
    workdir: Path = typer.Option(
        Path("runs/demo"), "--workdir", help="Where the demo writes everything."
    ),
    epochs: int = typer.Option(4, "--epochs", min=1, help="Training epochs per learned model."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document at the end."),
) -> None:
    """Run the main job end to end on MovieLens-100K with embedded defaults."""
    with step_lines_only():
        state = run_demo(DemoState(workdir=workdir, as_json=as_json, epochs=epochs))
    if as_json:
        echo_json({"workdir": str(workdir), **state.results})
