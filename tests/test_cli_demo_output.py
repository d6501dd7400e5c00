"""``recloop demo`` shows each step once: its tagged line, not also the library's INFO lines."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from recloop.cli.demo import DemoState, run_demo, step_lines_only
from recloop.progress import setup_logging


def _step(state: DemoState) -> None:
    logging.getLogger("recloop.data.prepare").info("prepared 10 events")
    logging.getLogger("recloop.data.ids").warning("feature left out")
    state.say("[fake] prepared 10 events")


@pytest.fixture
def info_level() -> object:
    root = logging.getLogger("recloop")
    before = root.level
    setup_logging(logging.INFO)  # as `recloop demo` without -v or -q
    yield
    root.setLevel(before)


def test_a_step_prints_its_line_once_and_keeps_warnings(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    info_level: object,
) -> None:
    with step_lines_only():
        run_demo(DemoState(workdir=tmp_path), steps=[("fake", _step)])
    assert capsys.readouterr().out.splitlines() == ["[fake] prepared 10 events"]
    assert [r.getMessage() for r in caplog.records] == ["feature left out"]
    # the caller's level comes back afterwards
    assert logging.getLogger("recloop").level == logging.INFO


def test_verbose_keeps_every_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, info_level: object
) -> None:
    logging.getLogger("recloop").setLevel(logging.DEBUG)
    with step_lines_only():
        run_demo(DemoState(workdir=tmp_path), steps=[("fake", _step)])
    messages = [r.getMessage() for r in caplog.records]
    assert "prepared 10 events" in messages and "feature left out" in messages
