"""The ``recloop`` command.

The Typer app lives in :mod:`recloop.cli.app`; each module here adds its commands to it.
It is a package rather than one ``cli.py`` so that each command group (data, prepare,
training, online) stays a readable module of its own.

A command module imports typer and light modules at its top and everything else inside
its commands, so that `recloop --help` and the data commands start in a fraction of a
second without torch (tests/test_cli_startup.py checks; bench/bench_cli.py times it).
To add commands: a module that decorates them with ``@app.command`` (or a sub-app), and
one import line below.
"""

from __future__ import annotations

import logging
import sys

import typer
from typer.exceptions import TyperException

from recloop import __version__

# Each import registers its commands on the app.
from recloop.cli import data as _data  # noqa: F401
from recloop.cli import demo as _demo  # noqa: F401
from recloop.cli import experiment as _experiment  # noqa: F401
from recloop.cli import flink as _flink  # noqa: F401
from recloop.cli import index as _index  # noqa: F401
from recloop.cli import loop as _loop  # noqa: F401
from recloop.cli import online as _online  # noqa: F401
from recloop.cli import prepare as _prepare  # noqa: F401
from recloop.cli import pretrain as _pretrain  # noqa: F401
from recloop.cli import registry as _registry  # noqa: F401
from recloop.cli import report as _report  # noqa: F401
from recloop.cli import simulate as _simulate  # noqa: F401
from recloop.cli import synth as _synth  # noqa: F401
from recloop.cli import train as _train  # noqa: F401
from recloop.cli import world as _world  # noqa: F401
from recloop.cli.app import ROOT_OPTIONS, app
from recloop.errors import RecloopError
from recloop.progress import disable_progress, setup_logging


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    threads: int | None = typer.Option(
        None,
        "--threads",
        envvar="RECLOOP_THREADS",
        min=1,
        help="PyTorch CPU threads (default: torch's choice). The models here are small, so "
        "1 thread is often fastest on a busy machine.",
    ),
) -> None:
    """Offline RL recommenders: from logged events to real-time serving and back."""
    # Kept for commands that start more recloop processes (recloop train --nproc).
    ROOT_OPTIONS[:] = [
        *(["--verbose"] if verbose else []),
        *(["--quiet"] if quiet else []),
        *(["--no-progress"] if no_progress else []),
        *(["--threads", str(threads)] if threads is not None else []),
    ]
    setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if no_progress:
        disable_progress()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@app.command("version")
def version() -> None:
    """Print the recloop version."""
    typer.echo(__version__)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one clear line and exit code 2."""
    try:
        app(args=argv, standalone_mode=False)
    except RecloopError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None)
        if code is None:
            code = getattr(exc, "code", 0)
        return int(code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except TyperException as exc:
        # Usage errors (unknown option, bad value).  typer vendors click, so these are not
        # click.ClickException; they still carry click's show() and exit_code.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc}", err=True)
        return int(getattr(exc, "exit_code", 2))
    except Exception as exc:  # the standalone click's usage errors, should one reach here
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
