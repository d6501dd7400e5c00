"""Which device training runs on: CUDA when available (``auto``), or as asked."""

from __future__ import annotations

import torch

from recloop.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``; ``cuda:1`` etc. pass through.

    Raises :class:`ConfigError` when CUDA is asked for and not available.
    """
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
        return torch.device(name)
    raise ConfigError(f"unknown device {name!r} (expected auto, cpu, cuda or cuda:N)")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) and numpy's global generator."""
    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
