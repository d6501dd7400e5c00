"""Fixtures of the streaming tests: tiny prepared datasets, random-weight artifacts and a
private redis-server (the real services' URLs and unique names are in tests/conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig


def tiny_dataset(
    n_events: int = 300,
    *,
    n_users: int = 12,
    n_items: int = 30,
    span_s: int = 20_000,
    seed: int = 0,
) -> PreparedDataset:
    """Random events with string ids u1.., i1.. and rewards in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    return PreparedDataset.from_arrays(
        user=rng.integers(1, n_users + 1, n_events),
        item=rng.integers(1, n_items + 1, n_events),
        timestamp=np.sort(rng.integers(1_000_000, 1_000_000 + span_s, n_events)),
        reward=rng.integers(0, 3, n_events).astype(np.float32),
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )


def build_artifact(
    directory: Path,
    *,
    user_ids: list[str],
    item_ids: list[str],
    history: int = 4,
    seed: int = 0,
) -> Path:
    """A random-weight mean-encoder policy saved as a real artifact."""
    torch.manual_seed(seed)
    spec = PolicySpec(
        n_users=len(user_ids),
        n_items=len(item_ids),
        encoder=EncoderConfig(kind="mean", history=history, embedding_dim=8),
        head=HeadConfig(kind="linear"),
    )
    return save_artifact(
        directory,
        algo="test",
        config={"seed": seed},
        policy=PolicyNet(spec),
        popularity=np.zeros(len(item_ids) + 1, np.float32),
        user_ids=user_ids,
        item_ids=item_ids,
    )


@pytest.fixture
def make_dataset() -> object:
    """Factory: :func:`tiny_dataset`."""
    return tiny_dataset


@pytest.fixture(scope="session")
def make_artifact() -> object:
    """Factory: :func:`build_artifact` (session-scoped: module-scoped scenarios use it)."""
    return build_artifact


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnRedis:
    """A redis-server of one test's own (on a free port, data in a tmp dir, no persistence),
    so that a test can kill it without touching the shared one.  Stopped by its PID."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def up(self) -> bool:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip() == "PONG"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "no", "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(200):
            if self.up():
                return
            time.sleep(0.025)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A started :class:`OwnRedis`; killed by PID at the end of the test."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = OwnRedis(directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()
