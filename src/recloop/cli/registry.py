"""``recloop registry``: publish, list, promote and roll back versioned artifacts."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import PLAIN, app, echo, echo_json

registry_app = typer.Typer(
    help="A directory of versioned artifacts with an atomically switched current version.",
    no_args_is_help=True,
    rich_markup_mode=PLAIN,
)
app.add_typer(registry_app, name="registry")

_ROOT = typer.Argument(..., help="Registry directory (created on first publish).")


@registry_app.command("publish")
def publish_cmd(
    root: Path = _ROOT,
    artifact: Path = typer.Argument(..., help="Artifact or run directory to publish."),
    promote: bool = typer.Option(False, "--promote", help="Make it the current version."),
    reason: str = typer.Option("", "--reason", help="Recorded in the history."),
) -> None:
    """Copy a verified artifact into the registry (its model version names it)."""
    from recloop.artifacts.registry import ArtifactRegistry

    reg = ArtifactRegistry(root)
    version = reg.publish(artifact, parent=reg.current(), promote=promote, reason=reason)
    echo(f"{version}{' (current)' if reg.current() == version else ''}")


@registry_app.command("list")
def list_cmd(
    root: Path = _ROOT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Published versions, oldest first; * marks the current one."""
    from recloop.artifacts.registry import ArtifactRegistry

    entries = ArtifactRegistry(root).entries()
    if as_json:
        echo_json(
            [
                {"version": e.version, "algo": e.algo, "current": e.current, **e.lineage}
                for e in entries
            ]
        )
        return
    for e in entries:
        when = e.lineage.get("published_at", "")
        parent = e.lineage.get("parent") or "-"
        echo(f"{'*' if e.current else ' '} {e.version}  {e.algo}  {when}  parent {parent}")


@registry_app.command("promote")
def promote_cmd(
    root: Path = _ROOT,
    version: str = typer.Argument(..., help="A published version (see `registry list`)."),
    reason: str = typer.Option("by hand", "--reason", help="Recorded in the history."),
) -> None:
    """Make a published version current; services watching the registry swap to it."""
    from recloop.artifacts.registry import ArtifactRegistry

    ArtifactRegistry(root).promote(version, reason=reason)
    echo(version)


@registry_app.command("rollback")
def rollback_cmd(
    root: Path = _ROOT,
    reason: str = typer.Option("by hand", "--reason", help="Recorded in the history."),
) -> None:
    """Make the previously current version current again."""
    from recloop.artifacts.registry import ArtifactRegistry

    echo(ArtifactRegistry(root).rollback(reason=reason))
