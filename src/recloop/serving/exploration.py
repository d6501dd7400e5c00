"""Exploring serving policies and the exact probability of what they show.

Three policies rank the items of one request (``scores`` (N,) float, masked items and the
padding column at ``-inf``; M = the number of finite scores; the list has
``k = min(n, M)`` items):

``topk``
    the deterministic top-k of :func:`recloop.ranking.topk`; every propensity is 1.
``softmax`` (= Plackett–Luce; ``plackett_luce`` is the same policy under its other name)
    k draws without replacement, each from softmax(scores / T) over the unmasked items not
    drawn yet.  Sampled as an exponential race (item i arrives at E_i / exp(s_i / T),
    E_i ~ Exp(1); the first k arrivals in order are exactly a Plackett–Luce sample, the
    Gumbel-top-k trick without its logs).  The propensity of the item at position j is its
    sequential choice probability ``w_j / (w_j + ... + w_k + rest)`` (``w = exp(s / T)``,
    ``rest`` the weight of every unmasked item not shown), and the slate's probability is
    their product.  So the logged per-item number is the *conditional* probability of the
    item at j given the items above it (at position 0 it is also the marginal); the marginal
    P(item at position j) would need a sum over every ordered prefix and is not logged —
    an estimator that needs it can take the slate probability, which is exact up to
    float64: a long list from a large catalogue can be less likely than 1e-308 (100 items
    of 100,000 at T = 1: about e^-1119) and is then logged as 0.0; the sum of the logs of
    the per-position propensities, each exact, is its log-probability.
``epsilon``
    ε-greedy over the greedy list g_1..g_k (the top-k).  Each slot j independently explores
    with probability ε; a slot that does not explore shows g_j.  The exploring slots, in
    order, are filled by a uniform sample without replacement from the *pool*: the unmasked
    items not shown at a greedy slot (so g_j itself may come back at its exploring slot j).
    The propensity of the item at position j is its exact marginal probability of being
    there, :func:`epsilon_marginals`; no slate probability is reported (one slate can arise
    from several sets of exploring slots).

Everything here is pure and draws from an explicit ``numpy.random.Generator`` or a seed
(:func:`seeded_generator` maps a request's seed to its generator): a request's seed
reproduces its list exactly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from recloop.slates import epsilon_marginals

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


_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that spreads every input bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _pcg_state(seed: int) -> Any:  # numpy's PCG64 state dict
    """PCG64's state for a request's seed: 128-bit state and (odd) increment from four
    splitmix64 outputs of the seed.  Setting a state costs ~1 µs where building a
    generator from a seed (``default_rng``: SeedSequence hashing) costs ~20 µs, once per
    served list."""
    x = seed & _M64
    a = _mix64((x + 0x9E3779B97F4A7C15) & _M64)
    b = _mix64((x + 0x3C6EF372FE94F82A) & _M64)
    c = _mix64((x + 0xDAA66D2C7DDF743F) & _M64)
    d = _mix64((x + 0x78DDE6E5FD29F054) & _M64)
    return {
        "bit_generator": "PCG64",
        "state": {"state": (a << 64) | b, "inc": (c << 64) | d | 1},
        "has_uint32": 0,
        "uinteger": 0,
    }


_LOCAL = threading.local()


def _thread_generator() -> np.random.Generator:
    """This thread's PCG64 generator, whose state callers set before every use (building
    one costs ~50 µs: the seed-sequence hashing its constructor always does)."""
    gen: np.random.Generator | None = getattr(_LOCAL, "gen", None)
    if gen is None:
        gen = _LOCAL.gen = np.random.Generator(np.random.PCG64(0))
    return gen


def thread_generator(seed: int) -> np.random.Generator:
    """:func:`seeded_generator`'s generator without building one: this thread's own, its
    state set from ``seed``; valid until the next call in the same thread (the service
    draws each list synchronously, so one list's draws are never interleaved)."""
    gen = _thread_generator()
    gen.bit_generator.state = _pcg_state(seed)
    return gen


def seeded_generator(seed: int) -> np.random.Generator:
    """The generator a request's ``seed`` (0 ≤ seed < 2**64) draws its list with: the
    service's, and the one to use to redraw a served list offline."""
    bg = np.random.PCG64()
    bg.state = _pcg_state(seed)
    return np.random.Generator(bg)


def sample_plackett_luce(
    scores: np.ndarray, n: int, *, temperature: float, rng: np.random.Generator
) -> Slate:
    """A Plackett–Luce slate of ``min(n, M)`` unmasked items (exponential race, see
    :func:`sample_plackett_luce_many`), with the N exponentials drawn from ``rng``;
    ``rng=seeded_generator(seed)`` gives the list ``sample_plackett_luce_many`` gives that
    seed."""
    noise = rng.standard_exponential(size=(1, scores.shape[0]))
    (slate,) = _plackett_luce(
        scores[None, :], np.array([n]), np.array([temperature], np.float64), noise
    )
    return slate


def sample_plackett_luce_many(
    scores: np.ndarray,
    n: np.ndarray,
    *,
    temperature: np.ndarray,
    seeds: Sequence[int],
) -> list[Slate]:
    """One Plackett–Luce slate per row of ``scores`` (B, N) float64, masked at ``-inf``:
    ``min(n[b], M_b)`` items drawn from softmax(scores[b] / temperature[b]) with the
    generator of ``seeds[b]`` (:func:`seeded_generator`).

    Only the random draws are per row (each row's own seed, so a row's list depends on its
    seed alone, not on the batch it was scored in); keys, the top-k and the propensities are
    computed for the whole batch at once.  Each row draws N exponentials, one per column
    (masked ones too, so the draw count does not depend on the mask).
    """
    noise = np.empty(scores.shape)  # (B, N)
    gen = _thread_generator()
    bg = gen.bit_generator
    for row, seed in zip(noise, seeds, strict=True):
        bg.state = _pcg_state(int(seed))
        gen.standard_exponential(out=row)  # the same draws as size=N
    return _plackett_luce(scores, np.asarray(n, np.int64), np.asarray(temperature), noise)


def _log_domain_propensities(logits: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Sequential choice probabilities (k,) of ``items`` among ``logits`` (N,) (masked
    -inf), each ``exp(l_j - log(sum of the weights left))`` with the sums taken in the log
    domain: exact where ``exp(logits)`` underflows."""
    rest = np.delete(logits, items)
    log_rest = np.logaddexp.reduce(rest) if rest.size else -np.inf
    shown = logits[items]
    log_left = np.logaddexp(log_rest, np.logaddexp.accumulate(shown[::-1])[::-1])
    out: np.ndarray = np.exp(shown - log_left)
    return out


def _plackett_luce(
    scores: np.ndarray, n: np.ndarray, temperature: np.ndarray, noise: np.ndarray
) -> list[Slate]:
    """The slates of ``scores`` (B, N) given each row's Exp(1) draws ``noise`` (B, N).

    Exponential race: item i "arrives" at E_i / w_i (E_i ~ Exp(1), w_i = exp(s_i / T)),
    an exponential time of rate w_i, and the first k arrivals in order are exactly a
    Plackett–Luce draw without replacement (the next arrival among those left is item i
    with probability w_i / (their total)).  The same order as the Gumbel-top-k keys
    ``s_i / T - log E_i``, without a log over every column.  A row where some unmasked
    weight underflows (scores more than ~700 T apart), so fewer than k arrival times are
    finite, takes its keys in the log domain instead.
    """
    b = scores.shape[0]
    ok = np.isfinite(scores)  # (B, N)
    m = ok.sum(1)  # (B,)
    kk = np.minimum(np.asarray(n, np.int64), m).tolist()  # (B,) list length per row
    kmax = max(kk, default=0)
    if kmax == 0:
        return [
            Slate(items=np.zeros(0, np.int64), propensity=np.zeros(0), slate_propensity=1.0)
            for _ in range(b)
        ]
    # The (B, N) passes are done once each, in place where the array is ours; the exp and
    # the top-k are torch's (vectorised, ~3x faster than numpy's here).  What is (B, k) or
    # smaller is plain Python: at serving batch sizes (1-16 rows) the fixed cost of a numpy
    # or torch call, not the arithmetic, was most of the sampler's time.
    logits = np.where(ok, scores, -np.inf)  # (B, N), a new array
    temps = temperature.tolist()
    if any(t != 1.0 for t in temps):  # x / 1.0 is x: skipping it changes no bit
        logits /= temperature[:, None]
    logits -= np.where(m > 0, logits.max(1), 0.0)[:, None]
    w = torch.exp(torch.from_numpy(logits)).numpy()  # (B, N), masked 0, the largest 1
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        keys = noise / w  # (B, N) arrival times, masked +inf (and overflowed ones)
    first = torch.topk(torch.from_numpy(keys), kmax, dim=1, largest=False, sorted=True)
    chosen = first.indices.numpy()  # (B, kmax), first arrival first
    # a row whose k-th arrival is not finite has unmasked weights that underflowed: it
    # takes the same order from log-domain keys
    kth = first.values.numpy().tolist()
    short = [i for i, ki in enumerate(kk) if ki and not kth[i][ki - 1] < math.inf]
    if short:
        log_keys = torch.from_numpy(np.log(noise[short]) - logits[short])
        chosen[short] = torch.topk(log_keys, kmax, dim=1, largest=False, sorted=True).indices
    rows = np.arange(b)[:, None]
    at_chosen = w[rows, chosen].tolist()  # (B, kmax)
    if kk.count(kmax) == b:
        w[rows, chosen] = 0.0
    else:  # zero only what each row shows: its propensities must not depend on the batch
        shown = np.arange(kmax)[None, :] < np.array(kk)[:, None]
        w[np.broadcast_to(rows, chosen.shape)[shown], chosen[shown]] = 0.0
    rest = w.sum(1).tolist()  # (B,) the weight of every unmasked item a row does not show
    out = []
    for i, ki in enumerate(kk):
        wi = at_chosen[i]
        if i in short:
            prop = _log_domain_propensities(logits[i], chosen[i, :ki])
            out.append(Slate(items=chosen[i, :ki], propensity=prop, slate_propensity=_prod(prop)))
            continue
        # the weight left before position j, summed from positive terms only (rest +
        # w_k + ... + w_j; rest = the unshown items' weight, not total minus shown), so
        # neither a long tail nor a fully shown catalogue costs precision
        left = rest[i]
        props = [0.0] * ki
        for j in range(ki - 1, -1, -1):
            left += wi[j]
            props[j] = wi[j] / left
        prop = np.array(props)
        out.append(Slate(items=chosen[i, :ki], propensity=prop, slate_propensity=_prod(props)))
    return out


def _prod(xs: Sequence[float] | np.ndarray) -> float:
    out = 1.0
    for x in xs:
        out *= float(x)
    return out


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
