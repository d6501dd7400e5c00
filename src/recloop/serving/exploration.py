"""Exploring serving policies and the exact probability of what they show.

Three policies rank the items of one request (``scores`` (N,) float, masked items and the
padding column at ``-inf``; M = the number of finite scores; the list has
``k = min(n, M)`` items):

``topk``
    the deterministic top-k of :func:`recloop.ranking.topk`; every propensity is 1.
``softmax`` (= Plackett–Luce; ``plackett_luce`` is the same policy under its other name)
    k draws without replacement, each from softmax(scores / T) over the unmasked items not
    drawn yet.  Sampled with the Gumbel-top-k trick (the top k of ``scores / T + Gumbel``
    is exactly a Plackett–Luce sample).  The propensity of the item at position j is its
    sequential choice probability ``w_j / (w_j + ... + w_k + rest)`` (``w = exp(s / T)``,
    ``rest`` the weight of every unmasked item not shown), and the slate's probability is
    their product.  So the logged per-item number is the *conditional* probability of the
    item at j given the items above it (at position 0 it is also the marginal); the marginal
    P(item at position j) would need a sum over every ordered prefix and is not logged —
    an estimator that needs it can take the slate probability, which is exact.
``epsilon``
    ε-greedy over the greedy list g_1..g_k (the top-k).  Each slot j independently explores
    with probability ε; a slot that does not explore shows g_j.  The exploring slots, in
    order, are filled by a uniform sample without replacement from the *pool*: the unmasked
    items not shown at a greedy slot (so g_j itself may come back at its exploring slot j).
    The propensity of the item at position j is its exact marginal probability of being
    there, :func:`epsilon_marginals`; no slate probability is reported (one slate can arise
    from several sets of exploring slots).

Everything here is pure and takes an explicit ``numpy.random.Generator``: a request's seed
reproduces its list exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

POLICIES = ("topk", "softmax", "epsilon")
"""Serving policies; ``plackett_luce`` is accepted as a name of ``softmax``."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Slate:
    """One served list."""

    items: np.ndarray  # (k,) int64 column indices, position order
    propensity: np.ndarray  # (k,) float64, see the module docstring per policy
    slate_propensity: float | None
    """Probability of the whole ordered list (None for ε-greedy)."""


def unmasked(scores: np.ndarray) -> np.ndarray:
    """(N,) bool: the items a policy may show (finite score; NaN and -inf never)."""
    return np.isfinite(scores)


def _sequential(w_shown: np.ndarray, total: float) -> tuple[np.ndarray, float]:
    """PL choice probabilities (k,) of items with weights ``w_shown`` in display order,
    among unmasked items of total weight ``total``, and their product.  The weight left
    before position j is summed from positive terms only (``rest + w_j + ... + w_k``), so a
    long tail costs no precision."""
    rest = max(total - float(w_shown.sum()), 0.0)
    remaining = rest + np.cumsum(w_shown[::-1])[::-1]  # (k,)
    prop = w_shown / remaining
    return prop, float(np.prod(prop))


def plackett_luce_propensities(
    scores: np.ndarray, items: np.ndarray, *, temperature: float
) -> tuple[np.ndarray, float]:
    """Sequential choice probabilities (k,) of ``items`` under softmax(scores / T) without
    replacement, and their product."""
    logits = scores[unmasked(scores)] / temperature
    top = logits.max() if logits.size else 0.0
    total = float(np.exp(logits - top).sum())
    return _sequential(np.exp(scores[items] / temperature - top), total)


def sample_plackett_luce(
    scores: np.ndarray, n: int, *, temperature: float, rng: np.random.Generator
) -> Slate:
    """A Plackett–Luce slate of ``min(n, M)`` unmasked items (Gumbel-top-k); the one-row
    case of :func:`sample_plackett_luce_many`, which draws the same list from the same
    ``rng`` state."""
    (slate,) = sample_plackett_luce_many(
        scores[None, :],
        np.array([n]),
        temperature=np.array([temperature], np.float64),
        rngs=[rng],
    )
    return slate


def sample_plackett_luce_many(
    scores: np.ndarray,
    n: np.ndarray,
    *,
    temperature: np.ndarray,
    rngs: Sequence[np.random.Generator],
) -> list[Slate]:
    """One Plackett–Luce slate per row of ``scores`` (B, N) float64, masked at ``-inf``:
    ``min(n[b], M_b)`` items drawn from softmax(scores[b] / temperature[b]) with ``rngs[b]``.

    Only the random draws are per row (each row's own generator, so a row's list depends
    on its seed alone, not on the batch it was scored in); keys, the top-k and the
    propensities are computed for the whole batch at once.  Each row draws N exponentials
    (one per column, masked ones too, so the draw count does not depend on the mask);
    ``-log(Exp(1))`` is Gumbel(0, 1) and the exponential sampler is about 3x faster.
    """
    b, width = scores.shape
    ok = np.isfinite(scores)  # (B, N)
    m = np.count_nonzero(ok, axis=1)  # (B,)
    k = np.minimum(np.asarray(n, np.int64), m)  # (B,)
    kmax = int(k.max()) if b else 0
    if kmax == 0:
        return [
            Slate(items=np.zeros(0, np.int64), propensity=np.zeros(0), slate_propensity=1.0)
            for _ in range(b)
        ]
    # Each (B, N) pass below is done once, in place where the array is ours: at serving
    # batch sizes these passes, not the arithmetic, are the sampler's cost.
    logits = np.where(ok, scores, -np.inf)  # (B, N), a new array
    if not np.all(temperature == 1.0):  # x / 1.0 is x: skipping it changes no bit
        logits /= temperature[:, None]
    top = logits.max(1)
    logits -= np.where(m > 0, top, 0.0)[:, None]
    keys = np.empty((b, width))  # (B, N): each row's exponentials, then its negated keys
    for row, rng in zip(keys, rngs, strict=True):
        rng.standard_exponential(out=row)  # the same draws as size=width
    np.log(keys, out=keys)
    np.subtract(keys, logits, out=keys)  # -(logits - log(noise)): masked stay +inf
    if kmax < width:
        part = np.argpartition(keys, kmax - 1, axis=1)[:, :kmax]  # (B, kmax)
    else:
        part = np.broadcast_to(np.arange(width), (b, width))
    order = np.argsort(np.take_along_axis(keys, part, 1), axis=1, kind="stable")
    chosen = np.take_along_axis(part, order, 1)  # (B, kmax) best key first
    w = np.exp(logits, out=logits)  # (B, N), masked 0
    shown = np.arange(kmax)[None, :] < k[:, None]  # (B, kmax)
    w_shown = np.where(shown, np.take_along_axis(w, chosen, 1), 0.0)
    # the weight left before position j, summed from positive terms only (rest + w_j + ...
    # + w_k; rest = the unshown items' weight, not total minus shown), so neither a long
    # tail nor a fully shown catalogue costs precision
    rows = np.broadcast_to(np.arange(b)[:, None], chosen.shape)
    w[rows[shown], chosen[shown]] = 0.0
    rest = w.sum(1)  # (B,)
    remaining = rest[:, None] + np.cumsum(w_shown[:, ::-1], axis=1)[:, ::-1]
    prop = w_shown / np.where(shown, remaining, 1.0)  # (B, kmax)
    return [
        Slate(
            items=chosen[i, :ki].astype(np.int64),
            propensity=prop[i, :ki],
            slate_propensity=float(np.prod(prop[i, :ki])),
        )
        for i, ki in enumerate(k.tolist())
    ]


@lru_cache(maxsize=4096)
def _inverse_pool_means(k: int, m: int, epsilon: float) -> tuple[float, float]:
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
    a, b = _inverse_pool_means(k, m, epsilon)
    slot = np.arange(k)
    return np.where(
        rank == slot,
        1.0 - epsilon + epsilon * a,
        np.where(rank < 0, epsilon * a, epsilon * epsilon * b),
    )


def _draw_pool(
    ok: np.ndarray, taken: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``size`` distinct items drawn uniformly from ``ok`` minus ``taken``, in draw order.

    The pool is nearly the whole catalogue, so rejection (draw from ``ok``, redraw what is
    taken or drawn already) costs a few draws instead of building the pool (a sort of N);
    small catalogues build it.  Rejection keeps every ordered draw equally likely."""
    if ok.size < 4 * (taken.size + size):
        pool = np.setdiff1d(ok, taken, assume_unique=True)
        return rng.choice(pool, size=size, replace=False)
    skip = set(taken.tolist())
    out: list[int] = []
    while len(out) < size:
        x = int(ok[rng.integers(ok.size)])
        if x not in skip:
            skip.add(x)
            out.append(x)
    return np.asarray(out, np.int64)


def sample_epsilon_greedy(
    scores: np.ndarray, greedy: np.ndarray, *, epsilon: float, rng: np.random.Generator
) -> Slate:
    """The ε-greedy list of the module docstring.  ``greedy`` (k,) int64: the top-k of
    ``scores`` best first (k = min(n, M)), from :func:`recloop.ranking.topk`."""
    k = greedy.size
    if k == 0:
        return Slate(items=np.zeros(0, np.int64), propensity=np.zeros(0), slate_propensity=None)
    ok = np.flatnonzero(unmasked(scores))
    explore = rng.random(k) < epsilon  # (k,)
    items = greedy.astype(np.int64).copy()
    n_explore = int(explore.sum())
    if n_explore:
        items[explore] = _draw_pool(ok, greedy[~explore], n_explore, rng)
    pos_in_greedy = {int(g): r for r, g in enumerate(greedy.tolist())}
    rank = np.fromiter((pos_in_greedy.get(int(i), -1) for i in items), np.int64, k)
    prop = epsilon_marginals(rank, k=k, m=ok.size, epsilon=epsilon)
    return Slate(items=items, propensity=prop, slate_propensity=None)


def deterministic(greedy: np.ndarray) -> Slate:
    """The top-k list itself: probability 1 everywhere."""
    return Slate(
        items=greedy.astype(np.int64),
        propensity=np.ones(greedy.size),
        slate_propensity=1.0,
    )
