"""``recloop data …``: download, synthesise and inspect raw datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from recloop.cli.app import data_app, echo, echo_json
from recloop.data.download import DATASETS
from recloop.data.formats import FORMATS


@data_app.command("download")
def download_command(
    name: str = typer.Argument(..., help=f"Dataset: {', '.join(DATASETS)}."),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help="Cache directory (default $RECLOOP_CACHE or ~/.cache/recloop)."
    ),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
) -> None:
    """Fetch a GroupLens MovieLens archive, verify its SHA-256, unpack it; print the folder."""
    from recloop.data.download import download

    echo(str(download(name, cache_dir, force=force)))


@data_app.command("inspect")
def inspect_command(
    fmt: str = typer.Option(..., "--format", "-f", help=f"One of {', '.join(FORMATS)}."),
    input_path: Path = typer.Option(..., "--input", "-i", help="Directory or file to read."),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="YAML of load options (skip_bad_rows, columns: {user: ...}), or a prepare "
        "config, whose load: section is used.",
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a load option, e.g. --set columns.user=uid (repeatable)."
    ),
    skip_bad_rows: bool = typer.Option(
        False, "--skip-bad-rows", help="Skip malformed rows (counted and reported)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Load raw data and print its counts, time range, columns and behaviours."""
    from recloop.config import config_from_dict, merge, parse_overrides, read_yaml
    from recloop.data.loaders import LoadOptions, load_raw
    from recloop.data.loaders.summary import format_summary, summarize

    data: dict[str, Any] = {}
    if config is not None:
        data = read_yaml(config)
        # A prepare config carries the load options in its load: section.
        if isinstance(data.get("load"), dict):
            data = data["load"]
    if skip_bad_rows:
        data["skip_bad_rows"] = True
    data = merge(data, parse_overrides(overrides))
    options = config_from_dict(LoadOptions, data, source=str(config or "--set"))
    summary = summarize(load_raw(fmt, input_path, options))
    if as_json:
        echo_json(summary.to_dict())
    else:
        echo(format_summary(summary))
