"""``recloop prepare``: raw logs → a prepared-dataset directory."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from recloop.cli.app import app, echo, echo_json, output_dir
from recloop.data.formats import FORMATS
from recloop.errors import ConfigError

if TYPE_CHECKING:
    from recloop.data.dataset import PreparedDataset
    from recloop.data.prepare import PrepareJob
    from recloop.data.schema import RawData


def run_prepare(
    *,
    fmt: str | None,
    input_path: Path | None,
    output: Path,
    job: PrepareJob,
    from_db: str | None = None,
    table: str = "behavior_log",
    impressions: bool = False,
) -> PreparedDataset:
    """Load (files, or the SQL behaviour log with ``from_db``), prepare and save."""
    from recloop.data.loaders import load_raw
    from recloop.data.prepare import prepare

    output_dir(output)
    if impressions and from_db is None:
        raise ConfigError("--impressions reads the served-items table: give --from-db too")

    def load() -> RawData:
        if from_db is not None:
            if fmt is not None or input_path is not None:
                raise ConfigError("give either --from-db or --format/--input, not both")
            # The online behaviour log becomes the next training set: the loop closes here.
            from recloop.data.loaders.sql import load_from_db, load_impressions_from_db

            if impressions:
                # One event per shown item, with its logged propensity: the off-policy view.
                served_table = "served_items" if table == "behavior_log" else table
                return load_impressions_from_db(from_db, table=served_table)
            # rows the behaviour rewards cannot use are the bad rows of a log
            by_behavior = job.reward.source in ("auto", "behavior")
            return load_from_db(
                from_db, table=table, skip_without_behavior=job.load.skip_bad_rows and by_behavior
            )
        if fmt is None or input_path is None:
            raise ConfigError("give --format and --input (or --from-db DATABASE_URL)")
        if fmt not in FORMATS:
            raise ConfigError(f"unknown --format {fmt!r} (known: {', '.join(FORMATS)})")
        return load_raw(fmt, input_path, job.load)

    # No reference kept here: prepare frees the raw table once it is codes (2.5 GB at 100M).
    dataset = prepare(load(), job)
    if input_path is not None:
        dataset.manifest["inputs"] = input_fingerprints(input_path)
    dataset.save(output)
    return dataset


def input_fingerprints(path: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the input file, of each file directly in the input directory, or
    of each file a glob pattern matches, so a prepared dataset says exactly which raw data it
    came from."""
    from recloop.data.dataset import sha256_file
    from recloop.data.loaders._read import glob_files, is_glob

    if is_glob(path):
        files = glob_files(path)
        root = Path(os.path.commonpath([f.parent for f in files])) if files else path.parent
        return {
            str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in files
        }
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files}


def summary_of(dataset: PreparedDataset, output: Path, seconds: float) -> dict[str, Any]:
    """The ``--json`` document: dataset counts, where it went, and what each step removed."""
    counts = dataset.manifest.get("counts", {})
    return {
        **dataset.summary(),
        "output": str(output),
        "source": dataset.manifest.get("source", ""),
        "split_mode": dataset.manifest.get("split", {}).get("mode"),
        "steps": counts.get("steps", []),
        "skipped_bad_rows": counts.get("skipped_bad_rows", 0),
        "skipped_examples": counts.get("skipped_examples", []),
        "seconds": round(seconds, 3),
    }


def format_prepare_summary(s: dict[str, Any]) -> str:
    """Readable version of :func:`summary_of`."""
    sp = s["splits"]
    lines = [
        f"prepared {s['source']} → {s['output']}",
        f"  users {s['n_users']:,}   items {s['n_items']:,}   events {s['n_events']:,}"
        f"   sessions {s['sessions']:,}   mean reward {s['mean_reward']:.3f}",
        f"  split ({s['split_mode']}): train {sp['train']:,}   valid {sp['valid']:,}"
        f"   test {sp['test']:,}",
    ]
    for step in s["steps"]:
        lines.append(
            f"  {step['step']:<13} {step['events']:>12,} events {step['users']:>10,} users"
            f" {step['items']:>10,} items   -{step['removed_events']:,}"
        )
    if s["skipped_bad_rows"]:
        lines.append(f"  skipped {s['skipped_bad_rows']:,} bad rows, e.g.:")
        lines.extend(f"    {ex}" for ex in s["skipped_examples"][:3])
    lines.append(f"  done in {s['seconds']:.2f} s")
    return "\n".join(lines)


@app.command("prepare")
def prepare_command(
    fmt: str | None = typer.Option(
        None, "--format", "-f", help=f"Input format: {', '.join(FORMATS)}."
    ),
    input_path: Path | None = typer.Option(
        None, "--input", "-i", help="Directory or file to read."
    ),
    from_db: str | None = typer.Option(
        None,
        "--from-db",
        help="Read the SQL behaviour log written by `recloop stream` (a SQLAlchemy URL) "
        "instead of files.",
    ),
    table: str = typer.Option(
        "behavior_log",
        "--table",
        help="Log table for --from-db (with --impressions: served_items by default).",
    ),
    impressions: bool = typer.Option(
        False,
        "--impressions",
        help="With --from-db: one event per item the service showed (reward 0 when ignored, "
        "else the attributed event's), with its logged propensity, for off-policy training "
        "and OPE.",
    ),
    split: str | None = typer.Option(
        None, "--split", help="Split protocol: ratio, loo or time (overrides the config)."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Prepared-dataset directory."),
    config: Path | None = typer.Option(
        None, "--config", help="YAML config (filters, reward, sessions, gamma, split, load…)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config field, e.g. --set gamma=0.95 (repeatable)."
    ),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip malformed rows (counted and reported)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Dedupe, filter, map ids, compute rewards, sessions, returns and splits; save the result."""
    from recloop.config import load_config
    from recloop.data.prepare import PrepareJob

    values: dict[str, Any] = {}
    if split is not None:
        values["split"] = {"mode": split}
    if skip_bad_rows:
        values["load"] = {"skip_bad_rows": True}
    # Config errors (unknown fields, bad values) surface here, before any data is read.
    job = load_config(PrepareJob, path=config, values=values, overrides=overrides)
    start = time.perf_counter()
    dataset = run_prepare(
        fmt=fmt,
        input_path=input_path,
        output=output,
        job=job,
        from_db=from_db,
        table=table,
        impressions=impressions,
    )
    summary = summary_of(dataset, output, time.perf_counter() - start)
    if as_json:
        echo_json(summary)
    else:
        echo(format_prepare_summary(summary))
