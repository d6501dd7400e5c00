"""``recloop data synth``: synthetic e-commerce logs in the Tianchi format."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from recloop.cli.app import data_app, echo, echo_json, output_dir


@data_app.command("synth")
def synth_command(
    events: int = typer.Option(..., "--events", "-n", help="Number of behaviour events."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the three CSV files."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same arguments, same bytes."),
    users: int | None = typer.Option(None, "--users", help="Users (default events // 100)."),
    items: int | None = typer.Option(None, "--items", help="Items (default events // 20)."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override another generator field, e.g. --set zipf_exponent=1.2."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Write user.csv, item.csv and user_behavior.csv (Tianchi ECommAI round-2 layout)."""
    from recloop.config import load_config
    from recloop.data.synth import SynthConfig, generate

    output_dir(output)
    cfg = load_config(
        SynthConfig,
        values={"events": events, "seed": seed, "users": users, "items": items},
        overrides=overrides,
    )
    start = time.perf_counter()
    result = generate(cfg, output)
    seconds = time.perf_counter() - start
    doc = {
        "output": str(result.directory),
        "n_users": result.n_users,
        "n_items": result.n_items,
        "n_events": result.n_events,
        "behaviors": result.behavior_counts,
        "seed": cfg.seed,
        "seconds": round(seconds, 3),
    }
    if as_json:
        echo_json(doc)
        return
    shares = ", ".join(
        f"{k} {v / max(result.n_events, 1):.1%}" for k, v in result.behavior_counts.items()
    )
    echo(
        f"wrote {result.n_events:,} events of {result.n_users:,} users and {result.n_items:,} "
        f"items to {result.directory} in {seconds:.2f} s ({shares})\n"
        f"prepare it with: recloop prepare --format tianchi --input {result.directory} "
        f"--split ratio --output DIR"
    )
