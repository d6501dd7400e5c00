"""Fixtures for the embedding tests: one torch thread, a tiny dataset with two user groups."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import polars as pl
import pytest
import torch

from recloop.data.dataset import TRAIN, VALID, PreparedDataset


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models run 10x faster on one thread when the 2 shared cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_two_groups(
    *,
    n_users: int = 60,
    items_per_group: int = 10,
    per_user: int = 8,
    n_valid: int = 2,
    features: bool = True,
    seed: int = 0,
) -> PreparedDataset:
    """User u (1-based) is in group u % 2 and consumes ``per_user`` random items of that
    group's ``items_per_group`` (group 0: items 1..10, group 1: 11..20); the last
    ``n_valid`` of each user's items are VALID, the rest TRAIN."""
    rng = np.random.default_rng(seed)
    users = np.arange(1, n_users + 1)
    group = users % 2
    picks = np.argsort(rng.random((n_users, items_per_group)), axis=1)[:, :per_user]
    item = (picks + 1 + group[:, None] * items_per_group).reshape(-1)
    user = np.repeat(users, per_user)
    ts = np.tile(np.arange(per_user), n_users) + 1000
    split = np.tile(np.where(np.arange(per_user) < per_user - n_valid, TRAIN, VALID), n_users)
    n_items = 2 * items_per_group
    uf = itf = None
    if features:
        uf = pl.DataFrame({"user": users, "group": (group + 1).astype(np.int32)})
        all_items = np.arange(1, n_items + 1)
        itf = pl.DataFrame(
            {
                "item": all_items,
                "category": ((all_items - 1) // items_per_group + 1).astype(np.int32),
            }
        )
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=ts,
        split=split,
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in users],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
        user_features=uf,
        item_features=itf,
    )


@pytest.fixture
def two_groups() -> Callable[..., PreparedDataset]:
    """Builds the two-group dataset; keyword arguments as :func:`make_two_groups`."""
    return make_two_groups
