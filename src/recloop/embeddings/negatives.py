"""Negative items for a user: drawn uniformly from the items that user has not consumed.

The consumed (user, item) pairs are kept once as a sorted array of keys ``user * (N + 1) +
item``; membership is one ``searchsorted``.  Sampling does not draw-and-reject: it draws
the rank k of the negative among the user's free items and maps k to an item id with a
second ``searchsorted`` over the "free items below each consumed item" counts.  That is
exact and uniform, one pass for any batch, and does not slow down for users who consumed
most of the catalogue (where rejection would need many rounds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from recloop.errors import DataError


@dataclass(frozen=True, kw_only=True, eq=False)
class ConsumedItems:
    """The set of items each user consumed, for membership tests and negative sampling.

    P is the number of distinct consumed (user, item) pairs.
    """

    n_users: int
    """Users are 1..n_users (0 = unknown, consumed nothing)."""
    n_items: int
    """Items are 1..n_items; negatives are drawn from this range."""
    keys: np.ndarray  # (P,) int64, sorted unique user * (n_items + 1) + item
    free_below: np.ndarray  # (P,) int64, user * (n_items + 1) + free items below this item
    offsets: np.ndarray  # (n_users + 2,) int64, user u's pairs are keys[offsets[u]:offsets[u+1]]

    @staticmethod
    def from_pairs(
        user: np.ndarray, item: np.ndarray, *, n_users: int, n_items: int
    ) -> ConsumedItems:
        """From event arrays (E,) of 1-based user and item indices; repeats are fine."""
        user = np.asarray(user, dtype=np.int64)
        item = np.asarray(item, dtype=np.int64)
        if user.shape != item.shape:
            raise DataError(f"user and item arrays differ in shape: {user.shape} vs {item.shape}")
        if user.size and (user.min() < 0 or user.max() > n_users):
            raise DataError(f"user indices must lie in 0..{n_users}")
        if item.size and (item.min() < 1 or item.max() > n_items):
            raise DataError(f"item indices must lie in 1..{n_items}")
        stride = n_items + 1
        keys = np.unique(user * stride + item)  # sorted: user-major, then item
        users = keys // stride
        offsets = np.zeros(n_users + 2, np.int64)
        np.cumsum(np.bincount(users, minlength=n_users + 1), out=offsets[1:])
        rank = np.arange(keys.shape[0], dtype=np.int64) - offsets[users]  # 0-based within user
        # consumed item c with rank j has c - 1 - j free items below it: non-decreasing per user
        free_below = users * stride + (keys % stride) - 1 - rank
        return ConsumedItems(
            n_users=n_users, n_items=n_items, keys=keys, free_below=free_below, offsets=offsets
        )

    def count(self, user: np.ndarray) -> np.ndarray:  # (M,) -> (M,) int64
        """Number of distinct items each user consumed."""
        user = np.asarray(user, dtype=np.int64)
        return self.offsets[user + 1] - self.offsets[user]

    def contains(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:  # (M,), (M,) -> bool
        """Whether each (user, item) pair was consumed."""
        q = np.asarray(user, dtype=np.int64) * (self.n_items + 1) + np.asarray(item, np.int64)
        pos = np.searchsorted(self.keys, q)
        hit = pos < self.keys.shape[0]
        hit[hit] = self.keys[pos[hit]] == q[hit]
        return hit

    def sample(self, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniform negative per entry of ``user`` (M,) → items (M,) int64.

        Repeat a user in ``user`` to draw several negatives for it (they are independent,
        so the same item may come twice).  Raises :class:`DataError` if a user consumed
        every item and so has no negative.
        """
        user = np.asarray(user, dtype=np.int64)
        if user.size == 0:
            return np.zeros(0, np.int64)
        free = self.n_items - self.count(user)
        if (free <= 0).any():
            bad = int(user[np.argmax(free <= 0)])
            raise DataError(
                f"user index {bad} consumed all {self.n_items} items: no negative to sample"
            )
        return self.nth_free(user, rng.integers(0, free))

    def nth_free(self, user: np.ndarray, k: np.ndarray) -> np.ndarray:  # (M,), (M,) -> (M,)
        """The ``k``-th (0-based) item, in id order, that ``user`` did not consume.

        With consumed items c_0 < c_1 < ... (0-based rank j), c_j - 1 - j free items lie
        below c_j, so the answer is k + 1 + #{j : c_j - 1 - j <= k}: one ``searchsorted``.
        ``k`` must lie in 0..n_items - count(user) - 1.
        """
        user = np.asarray(user, dtype=np.int64)
        k = np.asarray(k, dtype=np.int64)
        query = user * (self.n_items + 1) + k
        below = np.searchsorted(self.free_below, query, side="right") - self.offsets[user]
        return k + 1 + below
