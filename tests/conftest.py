"""Shared fixtures: the MovieLens-100K atomic files beside the project, small random data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _ml100k_dir() -> Path:
    env = os.environ.get("RECLOOP_ML100K")
    return Path(env) if env else ROOT.parent / "shared" / "datasets" / "ml-100k"


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """RecBole atomic files of MovieLens-100K (never committed; read from ../shared)."""
    path = _ml100k_dir()
    if not (path / "ml-100k.inter").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"MovieLens-100K not found at {path} (set RECLOOP_ML100K)")
        pytest.skip(f"MovieLens-100K not found at {path} (set RECLOOP_ML100K)")
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    """The models under test are tiny: one thread avoids oversubscribing the 2 CI cores."""
    torch.set_num_threads(1)
