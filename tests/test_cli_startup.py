"""The command line starts without the heavy libraries: ``recloop --help`` and the data
commands never import torch (each command imports what it uses when it runs).

Each check runs in a fresh interpreter, since this test process has long imported torch.
How fast that start is, is measured by ``bench/bench_cli.py``, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("torch", "fastapi", "uvicorn", "sqlalchemy", "redis")
"""Modules no part of ``recloop --help`` needs; torch above all (~2 s to import)."""


def _loaded_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of :data:`HEAVY` it left in sys.modules."""
    probe = (
        f"import json, sys\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    env = {**os.environ, "RECLOOP_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    loaded: dict[str, bool] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def _run_cli(argv: list[str]) -> str:
    # main() returns the exit code; --help prints the usage and returns 0
    return (
        "import contextlib, io\n"
        "from recloop.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    code = main({argv!r})\n"
        "assert code == 0, code\n"
        "assert out.getvalue().strip(), 'no output'\n"
    )


def test_probe_sees_an_import() -> None:
    # the probe itself can tell a loaded module from a missing one
    assert _loaded_after("import redis")["redis"]


def test_importing_the_cli_loads_no_heavy_library() -> None:
    loaded = _loaded_after("import recloop.cli")
    assert not any(loaded.values()), loaded


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["prepare", "--help"],
        ["train", "--help"],
        ["serve", "--help"],
        ["data", "synth", "--help"],
        ["version"],
    ],
)
def test_help_loads_no_heavy_library(argv: list[str]) -> None:
    loaded = _loaded_after(_run_cli(argv))
    assert not any(loaded.values()), loaded


@pytest.mark.slow
def test_data_commands_never_import_torch(tmp_path: Path) -> None:
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    code = "\n".join(
        [
            _run_cli(["data", "synth", "--events", "2000", "--output", str(raw)]),
            _run_cli(["data", "inspect", "--format", "tianchi", "--input", str(raw)]),
            _run_cli(["prepare", "--format", "tianchi", "--input", str(raw), "-o", str(prepared)]),
        ]
    )
    loaded = _loaded_after(code)
    assert (prepared / "manifest.json").is_file()
    assert not loaded["torch"], loaded
