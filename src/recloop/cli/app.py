"""The Typer application every command module adds itself to, and output helpers."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

app = typer.Typer(
    name="recloop",
    help="Offline RL recommenders: from logged events to real-time serving and back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Download, synthesise and inspect raw datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def echo_json(obj: Any) -> None:
    """Print one JSON document on stdout (the machine-readable output of ``--json``)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def echo(text: str = "") -> None:
    """Human-readable output on stdout."""
    typer.echo(text)


def warn(text: str) -> None:
    typer.echo(text, err=True)
