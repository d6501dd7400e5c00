"""The Typer application every command module adds itself to, and output helpers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from recloop.errors import ConfigError

# Plain help text, not rich's panels: rendering help with rich imports ~250 ms of modules,
# most of the budget of `recloop --help` (< 0.4 s).  Sub-apps pass the same value.
PLAIN: None = None

app = typer.Typer(
    name="recloop",
    help="Offline RL recommenders: from logged events to real-time serving and back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=PLAIN,
)
data_app = typer.Typer(
    help="Download, synthesise and inspect raw datasets.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN,
)
app.add_typer(data_app, name="data")


def echo_json(obj: Any) -> None:
    """Print one JSON document on stdout (the machine-readable output of ``--json``)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def echo(text: str = "") -> None:
    """Human-readable output on stdout."""
    typer.echo(text)


def warn(text: str) -> None:
    typer.echo(text, err=True)


def output_dir(path: Path, option: str = "--output") -> Path:
    """``path`` if a directory can be made there: fails, before any work is done, when it or
    a folder above it is an existing file, or the nearest existing folder is not writable."""
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            what = "is a file" if existing == path else f"is inside {existing}, which is a file"
            raise ConfigError(f"{option} {path} {what}; give a directory path")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {path}: cannot write to {existing} (permission denied)")
        break
    return path


ROOT_OPTIONS: list[str] = []
"""The global options (``--threads``, ``--no-progress``, ``-v``, ``-q``) this invocation was
given, as arguments; set by the root callback."""
