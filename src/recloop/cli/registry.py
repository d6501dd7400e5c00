"""``recloop registry``: publish, list, promote, canary and roll back versioned artifacts."""

from __future__ import annotations

from pathlib import Path

import typer

from recloop.cli.app import PLAIN, app, echo, echo_json

registry_app = typer.Typer(
    help="Versioned artifacts with an atomically switched current version, in a directory "
    "or an S3 bucket (s3://BUCKET/PREFIX).",
    no_args_is_help=True,
    rich_markup_mode=PLAIN,
)
app.add_typer(registry_app, name="registry")

_ROOT = typer.Argument(
    ...,
    help="Registry: a directory (created on first publish) or s3://BUCKET/PREFIX "
    "(pip install 'recloop[s3]'; credentials and AWS_ENDPOINT_URL_S3 as for boto3).",
)


@registry_app.command("publish")
def publish_cmd(
    root: str = _ROOT,
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
    root: str = _ROOT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Published versions, oldest first; * marks the current one, ~ a running canary."""
    from recloop.artifacts.registry import ArtifactRegistry

    reg = ArtifactRegistry(root)
    entries = reg.entries()
    canary = reg.canary()
    if as_json:
        echo_json(
            [
                {
                    "version": e.version,
                    "algo": e.algo,
                    "current": e.current,
                    "canary": None
                    if canary is None or canary.version != e.version
                    else canary.to_dict(),
                    **e.lineage,
                }
                for e in entries
            ]
        )
        return
    for e in entries:
        when = e.lineage.get("published_at", "")
        parent = e.lineage.get("parent") or "-"
        mark = "*" if e.current else "~" if canary and canary.version == e.version else " "
        line = f"{mark} {e.version}  {e.algo}  {when}  parent {parent}"
        if canary is not None and canary.version == e.version:
            line += f"  canary on {100 * canary.share:g} % of users"
        echo(line)


@registry_app.command("promote")
def promote_cmd(
    root: str = _ROOT,
    version: str = typer.Argument(..., help="A published version (see `registry list`)."),
    reason: str = typer.Option("by hand", "--reason", help="Recorded in the history."),
) -> None:
    """Make a published version current; services watching the registry swap to it."""
    from recloop.artifacts.registry import ArtifactRegistry

    ArtifactRegistry(root).promote(version, reason=reason)
    echo(version)


@registry_app.command("rollback")
def rollback_cmd(
    root: str = _ROOT,
    reason: str = typer.Option("by hand", "--reason", help="Recorded in the history."),
) -> None:
    """Make the previously current version current again."""
    from recloop.artifacts.registry import ArtifactRegistry

    echo(ArtifactRegistry(root).rollback(reason=reason))


@registry_app.command("canary")
def canary_cmd(
    root: str = _ROOT,
    version: str = typer.Argument(None, help="A published version; omit with --stop."),
    share: float = typer.Option(
        0.1, "--share", min=0.0, max=1.0, help="Share of users the canary serves, in (0, 1)."
    ),
    since_ts: int | None = typer.Option(
        None,
        "--since-ts",
        help="Event time (unix s) from which `recloop loop` compares the two (default: now).",
    ),
    stop: bool = typer.Option(False, "--stop", help="End the running canary, promoting nothing."),
    reason: str = typer.Option("by hand", "--reason", help="Recorded in the history."),
) -> None:
    """Serve a published version to a share of the users beside the current one; services
    following the registry split their traffic, and `recloop loop` promotes or stops it on
    what those users did."""
    import time

    from recloop.artifacts.registry import ArtifactRegistry
    from recloop.errors import ConfigError

    reg = ArtifactRegistry(root)
    if stop:
        ended = reg.stop_canary(reason=reason)
        echo(f"stopped {ended.version}" if ended else "no canary was running")
        return
    if not version:
        raise ConfigError("registry canary: give a VERSION, or --stop")
    ts = int(time.time()) if since_ts is None else since_ts
    c = reg.start_canary(version, share=share, since_ts=ts, reason=reason)
    assert c is not None  # by hand it replaces any canary
    echo(f"{c.version} on {100 * c.share:g} % of users beside {c.parent}")
