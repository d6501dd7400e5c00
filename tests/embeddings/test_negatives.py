from __future__ import annotations

import numpy as np
import pytest

from recloop.embeddings.negatives import ConsumedItems
from recloop.errors import DataError


def random_consumption(seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Users with very different densities: from nothing to all items but one."""
    rng = np.random.default_rng(seed)
    n_users, n_items = int(rng.integers(1, 30)), int(rng.integers(2, 60))
    users, items = [], []
    for u in range(1, n_users + 1):
        density = rng.choice([0.0, 0.05, 0.5, 0.95, 1.0])
        chosen = np.flatnonzero(rng.random(n_items) < density) + 1
        if chosen.shape[0] == n_items:
            chosen = chosen[1:]  # keep one free item
        reps = rng.integers(1, 3, chosen.shape[0])  # repeated consumption is fine
        users.append(np.repeat(np.full(chosen.shape[0], u), reps))
        items.append(np.repeat(chosen, reps))
    user, item = np.concatenate(users), np.concatenate(items)
    perm = rng.permutation(user.shape[0])
    return user[perm], item[perm], n_users, n_items


@pytest.mark.parametrize("seed", range(25))
def test_sampled_negatives_are_never_consumed(seed: int) -> None:
    user, item, n_users, n_items = random_consumption(seed)
    seen = ConsumedItems.from_pairs(user, item, n_users=n_users, n_items=n_items)
    rng = np.random.default_rng(seed)
    queries = np.repeat(np.arange(1, n_users + 1), 200)
    neg = seen.sample(queries, rng)
    assert neg.shape == queries.shape
    assert neg.min() >= 1 and neg.max() <= n_items
    consumed = set(zip(user.tolist(), item.tolist(), strict=True))
    assert not any((u, i) in consumed for u, i in zip(queries.tolist(), neg.tolist(), strict=True))
    assert not seen.contains(queries, neg).any()


@pytest.mark.parametrize("seed", range(10))
def test_contains_and_nth_free_against_python_sets(seed: int) -> None:
    user, item, n_users, n_items = random_consumption(seed)
    seen = ConsumedItems.from_pairs(user, item, n_users=n_users, n_items=n_items)
    for u in range(0, n_users + 1):
        mine = set(item[user == u].tolist())
        free = [i for i in range(1, n_items + 1) if i not in mine]
        assert seen.count(np.array([u]))[0] == len(mine)
        got = seen.nth_free(np.full(len(free), u), np.arange(len(free)))
        assert got.tolist() == free
        every = np.arange(1, n_items + 1)
        assert seen.contains(np.full(n_items, u), every).tolist() == [i in mine for i in every]


def test_sampling_is_uniform_over_the_free_items() -> None:
    seen = ConsumedItems.from_pairs(np.array([1, 1, 2]), np.array([2, 4, 1]), n_users=2, n_items=5)
    neg = seen.sample(np.ones(60_000, np.int64), np.random.default_rng(0))
    counts = np.bincount(neg, minlength=6)
    assert counts[[0, 2, 4]].sum() == 0
    np.testing.assert_allclose(counts[[1, 3, 5]] / neg.shape[0], 1 / 3, atol=0.01)


def test_hand_computed_free_items() -> None:
    # user 1 consumed 2 and 4 out of 1..5: its free items in order are 1, 3, 5
    seen = ConsumedItems.from_pairs(np.array([1, 1]), np.array([4, 2]), n_users=1, n_items=5)
    assert seen.nth_free(np.array([1, 1, 1]), np.array([0, 1, 2])).tolist() == [1, 3, 5]
    assert seen.nth_free(np.array([0, 0]), np.array([0, 4])).tolist() == [1, 5]  # unknown user


def test_user_who_consumed_everything_is_named() -> None:
    seen = ConsumedItems.from_pairs(np.array([2, 2, 1]), np.array([1, 2, 1]), n_users=2, n_items=2)
    with pytest.raises(DataError, match="user index 2 consumed all 2 items"):
        seen.sample(np.array([1, 2]), np.random.default_rng(0))


def test_out_of_range_pairs_are_rejected() -> None:
    with pytest.raises(DataError, match=r"item indices must lie in 1\.\.3"):
        ConsumedItems.from_pairs(np.array([1]), np.array([4]), n_users=1, n_items=3)
