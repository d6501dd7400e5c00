"""``recloop loop``: retrain on the behaviour log, gate, and publish to a registry by itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer

from recloop.cli.app import app, echo, echo_json

BUSY_EXIT = 75
"""Exit code of ``recloop loop --once`` while another controller runs a round in the same
workdir (EX_TEMPFAIL: try again later)."""


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the loop's own fields and those for the training run.

    A key whose first part names a :class:`~recloop.loop.config.LoopConfig` field sets that
    field (``--set margin=0.01``, ``--set prepare.gamma=0.95``); any other key goes to the
    run config of each round, as ``recloop train --set`` would (``--set lr=0.01``,
    ``--set fit.epochs=3``).
    """
    from recloop.loop.config import LoopConfig

    own = {f.name for f in dataclasses.fields(LoopConfig)}
    loop: list[str] = []
    train: list[str] = []
    for item in overrides:
        key = item.partition("=")[0].strip().split(".")[0]
        (loop if key in own else train).append(item)
    return loop, train


def load_loop_config(*, config: Path | None, values: dict[str, Any], overrides: list[str]) -> Any:
    """The validated :class:`LoopConfig` from the YAML file, the flags and ``--set``."""
    from recloop.config import load_config, merge, parse_overrides
    from recloop.loop.config import LoopConfig
    from recloop.training.runconfig import load_run_config

    loop_sets, train_sets = split_overrides(overrides)
    if train_sets:
        values = {**values, "train": merge(values.get("train", {}), parse_overrides(train_sets))}
    cfg = load_config(LoopConfig, path=config, values=values, overrides=loop_sets)
    cfg.require_paths()
    # The round's run config is checked now, before any data is read.
    load_run_config(cfg.algo, values=cfg.train)
    return cfg


@app.command("loop")
def loop_command(
    database_url: str | None = typer.Option(
        None, "--database-url", help="The behaviour log (SQLAlchemy URL) `recloop stream` writes."
    ),
    table: str | None = typer.Option(None, "--table", help="Log table (default behavior_log)."),
    registry: str | None = typer.Option(
        None, "--registry", help="Artifact registry: a directory, or s3://BUCKET/PREFIX."
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Controller directory: state.json and the rounds' data and runs."
    ),
    algo: str | None = typer.Option(None, "--algo", help="Algorithm trained each round."),
    config: Path | None = typer.Option(None, "--config", help="YAML LoopConfig."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        help="Override a loop field (margin=0.01, prepare.gamma=0.9) or, for any other key, "
        "the round's training config (lr=0.01, fit.epochs=3); repeatable.",
    ),
    every_events: int | None = typer.Option(
        None, "--every-events", help="Train once this many new events are logged."
    ),
    every_minutes: float | None = typer.Option(
        None, "--every-minutes", help="Train once this many minutes passed (and events arrived)."
    ),
    window: str | None = typer.Option(None, "--window", help="growing or sliding."),
    window_days: float | None = typer.Option(
        None, "--window-days", help="Days of the sliding window."
    ),
    margin: float | None = typer.Option(
        None, "--margin", help="How much worse than current a candidate may be and still win."
    ),
    metric: str | None = typer.Option(None, "--metric", help="Gate metric, e.g. ndcg@10."),
    once: bool = typer.Option(
        False, "--once", help="Run one round (if a trigger fired) and exit: for cron and tests."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print each round as JSON."),
) -> None:
    """Retrain on the behaviour log, gate against the current model, publish and promote.

    Each round reads the log (growing or sliding window), holds out its newest events,
    trains a candidate warm-started from the registry's current artifact, compares the two
    on the holdout (ranking metric and OPE) and publishes the candidate with its lineage,
    promoting it only when it is not worse by more than --margin.  A failed round leaves the
    current model in place: with --once it exits 2 with one line, otherwise it is logged and
    retried at the next check.  While another controller runs a round in the same workdir,
    --once prints "busy: ..." and exits 75 (EX_TEMPFAIL: try again later).
    """
    from recloop.loop.controller import LoopController

    values: dict[str, Any] = {
        "database_url": database_url,
        "table": table,
        "registry": registry,
        "workdir": str(workdir) if workdir is not None else None,
        "algo": algo,
        "every_events": every_events,
        "every_minutes": every_minutes,
        "window": window,
        "window_days": window_days,
        "margin": margin,
        "metric": metric,
    }
    cfg = load_loop_config(config=config, values=values, overrides=overrides)
    controller = LoopController(cfg)
    if not once:
        controller.run_forever()
        return
    # A LoopError is a RecloopError: `recloop` prints it as one line and exits 2.
    result = controller.run_once()
    if as_json:
        echo_json(result.to_dict())
    else:
        line = f"{result.status}: {result.reason}"
        if result.version:
            line += f"\n  version {result.version} (parent {result.parent or '-'})"
        line += f"\n  current {result.current or '-'}"
        echo(line)
    if result.status == "busy":
        raise SystemExit(BUSY_EXIT)  # click returns a typer.Exit's code without exiting
