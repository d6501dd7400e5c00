"""A SQLite behaviour log written with ``recloop.streaming.log``, and a tiny loop config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recloop.loop.config import LoopConfig
from recloop.streaming.events import EVENT_SCHEMA
from recloop.streaming.log import BehaviorLog

N_ITEMS = 40
N_USERS = 16


def walk_events(
    *, steps: range, n_users: int = N_USERS, n_items: int = N_ITEMS, seed: int = 0
) -> pl.DataFrame:
    """User u visits items s_u, s_u + 1, ... (mod N), one per minute; step t of every user
    at time 1_000_000 + 60 t + u, so the users interleave in time.  Ids are strings: items
    ``i1..iN``, users ``u1..uU``."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, n_items, n_users)
    t = np.asarray(steps, np.int64)
    u = np.arange(n_users)
    item = (start[:, None] + t[None, :]) % n_items + 1  # (U, T)
    ts = 1_000_000 + 60 * t[None, :] + u[:, None]
    uu = np.repeat(u + 1, t.shape[0])
    return pl.DataFrame(
        {
            "event_id": [f"e{a}-{b}" for a, b in zip(uu, t.tolist() * n_users, strict=True)],
            "user_id": [f"u{a}" for a in uu],
            "item_id": [f"i{a}" for a in item.ravel()],
            "ts": ts.ravel(),
            "behavior": ["pv"] * uu.shape[0],
            "rating": [None] * uu.shape[0],
            "reward": [1.0] * uu.shape[0],
        },
        schema=EVENT_SCHEMA,
    )


def append_events(url: str, events: pl.DataFrame) -> None:
    """Write ``events`` into the log the way the stream processor does."""
    log = BehaviorLog(url)
    try:
        log.append(events, slide_s=3600)
    finally:
        log.dispose()


def tiny_config(tmp_path: Path, **over: Any) -> LoopConfig:
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'log.db'}",
        "registry": str(tmp_path / "registry"),
        "workdir": str(tmp_path / "work"),
        "algo": "supervised",
        "train": {
            "encoder": {"kind": "mean", "history": 3, "embedding_dim": 8},
            "seed": 0,
            "batch_size": 16,
            "lr": 0.05,
            "fit": {
                "epochs": 8,
                "device": "cpu",
                "progress": False,
                "patience": None,
                "tensorboard": False,
            },
        },
        "every_events": 1,
        "holdout": 0.15,
        "valid": 0.1,
        "ope": {"n_boot": 50, "behaviour_epochs": 1},
    }
    from recloop.config import config_from_dict, merge

    return config_from_dict(LoopConfig, merge(values, over), source="test")
