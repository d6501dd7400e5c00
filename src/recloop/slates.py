"""The probabilities of served lists, shared by the service that draws them
(:mod:`recloop.serving.exploration`) and the off-policy estimators that re-serve a model
offline (:mod:`recloop.evaluation.ope`, target ``served``).

ε-greedy over the greedy list g_1..g_k (k = min(n, M) of M unmasked items): each slot j
explores independently with probability ε; the exploring slots, in order, are filled by a
uniform sample without replacement from the pool (the unmasked items not shown at a greedy
slot).  :func:`epsilon_marginals` is the exact probability of the item shown at a slot.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=4096)
def inverse_pool_means(k: int, m: int, epsilon: float) -> tuple[float, float]:
    """(E[1 / (M - G)] with G ~ Bin(k - 1, 1 - ε), same with G ~ Bin(k - 2, 1 - ε)):
    the chance one given pool item lands on one given exploring slot, averaged over how
    many other slots are greedy (G of them take items out of the pool)."""

    def mean(trials: int) -> float:
        if trials < 0:
            return 0.0
        return sum(
            math.comb(trials, g) * (1 - epsilon) ** g * epsilon ** (trials - g) / (m - g)
            for g in range(trials + 1)
        )

    return mean(k - 1), mean(k - 2)


def epsilon_marginals(rank: np.ndarray, *, k: int, m: int, epsilon: float) -> np.ndarray:
    """P(the item at slot j is the one shown there), for slots j = 0..k-1 of a list of k
    among m unmasked items.  ``rank`` (k,) int64: the greedy rank (0-based) of the item
    shown at each slot, or -1 for an item outside the greedy list.

    Slot j explores with prob. ε, and an exploring slot shows each pool item with
    probability 1 / |pool|, |pool| = m - (greedy slots); so, with A = E[1/(m - G)] over the
    k - 1 other slots and B the same over the k - 2 slots other than j and r:

    * the greedy item of slot j (rank j):   1 - ε + ε·A
    * greedy item of another slot r ≠ j:    ε·ε·B   (it is in the pool only if r explores)
    * an item outside the greedy list:      ε·A
    """
    a, b = inverse_pool_means(k, m, epsilon)
    slot = np.arange(k)
    return np.where(
        rank == slot,
        1.0 - epsilon + epsilon * a,
        np.where(rank < 0, epsilon * a, epsilon * epsilon * b),
    )
