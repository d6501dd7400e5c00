"""A tiny sequential dataset: each user walks the catalogue one item at a time."""

from __future__ import annotations

import numpy as np
import pytest

from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset


def walk_dataset(
    *, n_users: int = 12, n_items: int = 15, length: int = 10, gamma: float = 0.9, seed: int = 0
) -> PreparedDataset:
    """User u's items are s_u, s_u + 1, ... (mod N); last event test, one before valid."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, n_items, n_users)
    t = np.arange(length)
    user = np.repeat(np.arange(1, n_users + 1), length)
    item = ((start[:, None] + t[None, :]) % n_items + 1).ravel()
    timestamp = np.tile(1000 + 60 * t, n_users)
    returns = np.tile((1 - gamma ** (length - t)) / (1 - gamma), n_users)
    split = np.tile(
        np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
    )
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=timestamp,
        returns=returns,
        split=split,
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )


@pytest.fixture
def tiny_dataset() -> PreparedDataset:
    return walk_dataset()
