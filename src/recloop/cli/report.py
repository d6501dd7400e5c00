"""``recloop report``: one self-contained HTML page from runs, datasets and --json outputs."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import app, echo
from recloop.errors import ConfigError


@app.command("report")
def report_cmd(
    paths: list[Path] = typer.Argument(
        ...,
        help="Run or prepared-dataset directories, JSON from `recloop evaluate --json`, "
        "`recloop world evaluate|ope --json`, experiment CSV (round, arm, algo, reward, lo, "
        "hi), or a folder of them (e.g. a demo workdir).",
    ),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    k: int = typer.Option(10, "--k", min=1, help="K of HR/NDCG/MRR@K and of the top-K mix."),
    no_mix: bool = typer.Option(
        False, "--no-mix", help="Skip the popularity-decile chart (it loads each artifact)."
    ),
) -> None:
    """Write one HTML file (inline SVG charts, opens offline) describing the inputs."""
    from recloop.report import ReportConfig, write_report

    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name such as report.html")
    result = write_report(list(paths), out, ReportConfig(k=k, recommendation_mix=not no_mix))
    echo(
        f"report: {result.charts} charts ({', '.join(result.sections)}), "
        f"{result.bytes / 1e6:.2f} MB in {result.seconds:.1f} s → {result.path}"
    )
