"""``recloop loop --once`` from the command line, and kill -9 at a step, then restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from loop_helpers import append_events, tiny_config, walk_events

from recloop.artifacts.bundle import load_artifact
from recloop.artifacts.registry import ArtifactRegistry
from recloop.cli import main
from recloop.config import config_to_dict
from recloop.loop.controller import HOOK_ENV, LoopController

RECLOOP = [sys.executable, "-c", "import sys; from recloop.cli import main; sys.exit(main())"]
"""The ``recloop`` console script, run by this interpreter."""


def _setup(tmp_path: Path) -> Path:
    """The log with 10 steps and a YAML config of the tiny loop; returns the config path."""
    append_events(f"sqlite:///{tmp_path / 'log.db'}", walk_events(steps=range(0, 10)))
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(tiny_config(tmp_path))))
    return path


def test_once_json_then_nothing_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _setup(tmp_path)
    assert main(["loop", "--config", str(config), "--once", "--json", "--margin", "0.01"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "promoted" and doc["current"] == doc["version"]
    assert main(["loop", "--config", str(config), "--once", "--set", "fit.epochs=1"]) == 0
    assert capsys.readouterr().out.startswith("skipped: no new events")


def test_once_failure_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _setup(tmp_path)
    code = main(["loop", "--config", str(config), "--once", "--set", "table=no_such_table"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: round failed at check:")
    assert ArtifactRegistry(tmp_path / "registry").current() is None


def test_set_routes_loop_fields_and_training_fields(tmp_path: Path) -> None:
    from recloop.cli.loop import load_loop_config

    config = _setup(tmp_path)
    cfg = load_loop_config(
        config=config, values={}, overrides=["margin=0.2", "lr=0.5", "fit.epochs=2"]
    )
    assert cfg.margin == 0.2
    assert cfg.train["lr"] == 0.5 and cfg.train["fit"]["epochs"] == 2
    assert cfg.train["fit"]["device"] == "cpu"  # the file's other fit fields stay
    from recloop.errors import ConfigError

    with pytest.raises(ConfigError, match="no_such_field"):
        load_loop_config(config=config, values={}, overrides=["no_such_field=1"])


def _run_until_hook(tmp_path: Path, config: Path, step: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, HOOK_ENV: step, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [*RECLOOP, "-q", "loop", "--config", str(config), "--once"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = tmp_path / "work" / f".hook-{step}"
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        assert time.monotonic() < deadline, f"never reached {step}"
        time.sleep(0.05)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("step", ["train", "publish"])
def test_kill_9_at_a_step_then_restart(tmp_path: Path, step: str) -> None:
    config = _setup(tmp_path)
    cfg = tiny_config(tmp_path)
    first = LoopController(cfg).run_once()
    assert first.status == "promoted"
    append_events(cfg.database_url, walk_events(steps=range(10, 13)))

    proc = _run_until_hook(tmp_path, config, step)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()

    reg = ArtifactRegistry(tmp_path / "registry")
    assert reg.current() == first.version  # still serving the first model
    load_artifact(reg.current_path())
    assert not [p for p in reg.versions_dir.iterdir() if p.name.startswith(".tmp")]
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["watermark"]["events"] == 160  # the killed round's window is not finished
    assert (state["pending"] is not None) is (step == "publish")
    n_rounds = len(list((tmp_path / "work" / "rounds").iterdir()))

    again = LoopController(cfg).run_once()
    if step == "publish":
        assert again.status.startswith("resumed-")  # finished, not retrained
        assert len(list((tmp_path / "work" / "rounds").iterdir())) == n_rounds
    else:
        assert again.status in ("promoted", "published")
    assert again.parent == first.version and again.window["events"] == 208
    load_artifact(reg.current_path())
    assert LoopController(cfg).run_once().status == "skipped"  # the window is done


@pytest.mark.slow
@pytest.mark.parametrize("step", ["train", "publish", "promote"])
def test_a_second_controller_on_the_workdir_is_busy_while_a_round_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], step: str
) -> None:
    config = _setup(tmp_path)
    cfg = tiny_config(tmp_path)
    proc = _run_until_hook(tmp_path, config, step)  # holds the lock, asleep in its round
    try:
        state = tmp_path / "work" / "state.json"
        before = state.read_bytes() if state.exists() else None
        busy = LoopController(cfg).run_once()
        assert busy.status == "busy" and str(tmp_path / "work" / ".lock") in busy.reason
        assert main(["loop", "--config", str(config), "--once"]) == 75
        assert capsys.readouterr().out.startswith("busy: another controller is running")
        # nothing was trained or written beside the running round
        assert (state.read_bytes() if state.exists() else None) == before
        assert ArtifactRegistry(tmp_path / "registry").current() is None
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    # the kernel dropped the dead controller's lock: the next call runs (or finishes) the round
    assert LoopController(cfg).run_once().status in ("promoted", "resumed-promoted")


def test_a_lock_that_cannot_be_taken_fails_the_check_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import fcntl

    from recloop.loop.controller import LoopError

    _setup(tmp_path)

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LoopError, match=r"round failed at check: .*No locks available"):
        LoopController(tiny_config(tmp_path)).run_once()


def test_run_once_holds_the_workdir_lock_only_during_its_round(tmp_path: Path) -> None:
    import fcntl

    _setup(tmp_path)
    cfg = tiny_config(tmp_path)
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / ".lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert LoopController(cfg).run_once().status == "busy"
    first = LoopController(cfg).run_once()
    assert first.status == "promoted"
    # run_once released it: another open of the file gets it at once
    with open(tmp_path / "work" / ".lock", "a") as again:
        fcntl.flock(again.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
