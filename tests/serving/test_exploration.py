"""Exploring policies: sampled lists against their analytic probabilities."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from recloop.serving.exploration import (
    epsilon_marginals,
    plackett_luce_propensities,
    sample_epsilon_greedy,
    sample_plackett_luce,
    sample_plackett_luce_many,
    seeded_generator,
)

NEG = -np.inf
# column 0 is padding, column 3 masked: 4 unmasked items {1, 2, 4, 5}
SCORES = np.array([NEG, 1.0, 0.2, NEG, -0.5, 0.7])
VALID = [1, 2, 4, 5]


def pl_slate_probability(scores: np.ndarray, slate: tuple[int, ...], t: float) -> float:
    """Hand formula: prod_j exp(s_j/T) / sum over unmasked items not shown above j."""
    left = list(VALID)
    p = 1.0
    for i in slate:
        p *= math.exp(scores[i] / t) / sum(math.exp(scores[x] / t) for x in left)
        left.remove(i)
    return p


def test_plackett_luce_propensities_match_the_hand_formula_and_sum_to_one() -> None:
    t = 0.5
    total = 0.0
    for slate in itertools.permutations(VALID, 2):
        prop, slate_p = plackett_luce_propensities(SCORES, np.array(slate), temperature=t)
        assert slate_p == pytest.approx(pl_slate_probability(SCORES, slate, t), rel=1e-12)
        assert prop[0] == pytest.approx(
            math.exp(SCORES[slate[0]] / t) / sum(math.exp(SCORES[x] / t) for x in VALID)
        )
        total += slate_p
    assert total == pytest.approx(1.0, abs=1e-12)


def test_plackett_luce_sample_frequencies_match_reported_slate_probabilities() -> None:
    rng = np.random.default_rng(0)
    t, draws = 0.7, 40_000
    seen: Counter[tuple[int, ...]] = Counter()
    reported: dict[tuple[int, ...], float] = {}
    for _ in range(draws):
        s = sample_plackett_luce(SCORES, 2, temperature=t, rng=rng)
        key = tuple(s.items.tolist())
        seen[key] += 1
        reported[key] = float(s.slate_propensity or 0.0)
        assert np.prod(s.propensity) == pytest.approx(s.slate_propensity)
    assert set(seen) <= set(itertools.permutations(VALID, 2))  # never masked / padding
    for slate, count in seen.items():
        p = pl_slate_probability(SCORES, slate, t)
        assert reported[slate] == pytest.approx(p, rel=1e-9)
        sd = math.sqrt(p * (1 - p) / draws)
        assert abs(count / draws - p) < 5 * sd + 1e-4, slate


def test_plackett_luce_position_propensities_are_the_conditional_choice_frequencies() -> None:
    """The logged propensity at position j is P(item at j | the items above it): check the
    frequency of each second item among draws that start with the same first item."""
    rng = np.random.default_rng(7)
    t, draws = 1.3, 40_000
    firsts: Counter[int] = Counter()
    pairs: Counter[tuple[int, int]] = Counter()
    reported: dict[tuple[int, int], float] = {}
    for _ in range(draws):
        s = sample_plackett_luce(SCORES, 3, temperature=t, rng=rng)
        a, b = s.items[:2].tolist()
        firsts[a] += 1
        pairs[(a, b)] += 1
        reported[(a, b)] = float(s.propensity[1])
    for (a, b), c in pairs.items():
        rest = [x for x in VALID if x != a]
        exact = math.exp(SCORES[b] / t) / sum(math.exp(SCORES[x] / t) for x in rest)
        assert reported[(a, b)] == pytest.approx(exact, rel=1e-12)
        n = firsts[a]
        assert abs(c / n - exact) < 5 * math.sqrt(exact * (1 - exact) / n) + 1e-3, (a, b)


def test_plackett_luce_never_shows_masked_items_and_stops_at_the_unmasked_count() -> None:
    s = sample_plackett_luce(SCORES, 10, temperature=1.0, rng=np.random.default_rng(1))
    assert sorted(s.items.tolist()) == VALID
    assert s.propensity[-1] == pytest.approx(1.0)  # the last item left is certain


def test_plackett_luce_is_reproducible_from_its_seed() -> None:
    a = sample_plackett_luce(SCORES, 3, temperature=1.0, rng=np.random.default_rng(42))
    b = sample_plackett_luce(SCORES, 3, temperature=1.0, rng=np.random.default_rng(42))
    assert a.items.tolist() == b.items.tolist()


def exact_epsilon_marginals(greedy: list[int], valid: list[int], eps: float) -> np.ndarray:
    """Enumerate every set of exploring slots and every ordered fill from the pool."""
    k = len(greedy)
    out: dict[tuple[int, int], float] = {}
    for explore in itertools.product([False, True], repeat=k):
        p_mask = math.prod(eps if e else 1 - eps for e in explore)
        kept = [g for g, e in zip(greedy, explore, strict=True) if not e]
        pool = [x for x in valid if x not in kept]
        slots = [j for j in range(k) if explore[j]]
        fills = list(itertools.permutations(pool, len(slots)))
        for fill in fills:
            items = list(greedy)
            for j, x in zip(slots, fill, strict=True):
                items[j] = x
            for j, x in enumerate(items):
                out[(j, x)] = out.get((j, x), 0.0) + p_mask / len(fills)
    return np.array([[out.get((j, x), 0.0) for x in valid] for j in range(k)])


@pytest.mark.parametrize("eps", [0.0, 0.2, 0.5, 1.0])
def test_epsilon_marginals_match_exact_enumeration(eps: float) -> None:
    greedy = [1, 5, 2]  # the top-3 of SCORES
    exact = exact_epsilon_marginals(greedy, VALID, eps)
    np.testing.assert_allclose(exact.sum(1), 1.0)
    for j in range(3):
        for col, x in enumerate(VALID):
            rank = np.full(3, -1)
            rank[j] = greedy.index(x) if x in greedy else -1
            got = epsilon_marginals(rank, k=3, m=4, epsilon=eps)[j]
            assert got == pytest.approx(exact[j, col], abs=1e-12), (j, x)


def test_epsilon_greedy_frequencies_match_reported_propensities() -> None:
    rng = np.random.default_rng(3)
    greedy = np.array([1, 5, 2])
    eps, draws = 0.3, 30_000
    counts: Counter[tuple[int, int]] = Counter()
    reported: dict[tuple[int, int], float] = {}
    for _ in range(draws):
        s = sample_epsilon_greedy(SCORES, greedy, epsilon=eps, rng=rng)
        assert len(set(s.items.tolist())) == 3 and set(s.items.tolist()) <= set(VALID)
        for j, (x, p) in enumerate(zip(s.items.tolist(), s.propensity.tolist(), strict=True)):
            counts[(j, x)] += 1
            reported[(j, x)] = p
    for key, c in counts.items():
        p = reported[key]
        assert abs(c / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1e-4, key


def test_epsilon_greedy_on_a_large_catalogue_matches_its_propensities() -> None:
    """N = 200 unmasked items (the rejection path of the pool draw)."""
    scores = np.concatenate([[NEG], np.linspace(1.0, 0.0, 200)])
    greedy = np.arange(1, 4)
    rng = np.random.default_rng(5)
    eps, draws = 0.5, 20_000
    counts: Counter[tuple[int, int]] = Counter()
    reported: dict[tuple[int, int], float] = {}
    for _ in range(draws):
        s = sample_epsilon_greedy(scores, greedy, epsilon=eps, rng=rng)
        assert len(set(s.items.tolist())) == 3 and 0 not in s.items
        for j, (x, p) in enumerate(zip(s.items.tolist(), s.propensity.tolist(), strict=True)):
            counts[(j, x)] += 1
            reported[(j, x)] = p
    for key, c in counts.items():
        p = reported[key]
        assert abs(c / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1e-4, key
    # items outside the greedy list, pooled: frequency of any of them at slot 0
    outside = sum(c for (j, x), c in counts.items() if j == 0 and x > 3) / draws
    assert outside == pytest.approx(
        197 * reported[(0, next(x for j, x in counts if j == 0 and x > 3))], abs=0.02
    )


def test_plackett_luce_many_draws_each_row_as_its_own_seed_alone_would() -> None:
    """The batched sampler (the service's) gives every row the list and propensities its
    seed gives it alone, whatever else is in the batch; rows differ in n, T and mask."""
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(5, 40))
    scores[:, 0] = NEG
    scores[1, 5:30] = NEG  # 14 unmasked: n = 20 stops at 14
    scores[3, 1:] = NEG  # nothing to show
    n = np.array([3, 20, 1, 4, 40])
    temps = np.array([1.0, 0.3, 2.0, 1.0, 5.0])
    seeds = [7, 8, 9, 10, 2**63 - 1]
    batch = sample_plackett_luce_many(scores, n, temperature=temps, seeds=seeds)
    for i in range(5):
        alone = sample_plackett_luce(
            scores[i], int(n[i]), temperature=float(temps[i]), rng=seeded_generator(seeds[i])
        )
        assert batch[i].items.tolist() == alone.items.tolist()
        # bit for bit: an offline redraw reproduces the logged numbers exactly
        assert batch[i].propensity.tolist() == alone.propensity.tolist()
        assert batch[i].slate_propensity == alone.slate_propensity
        m = int(np.isfinite(scores[i]).sum())
        assert batch[i].items.size == min(int(n[i]), m)
        if batch[i].items.size:
            prop, slate = plackett_luce_propensities(
                scores[i], batch[i].items, temperature=float(temps[i])
            )
            np.testing.assert_allclose(batch[i].propensity, prop, rtol=1e-10)
            assert batch[i].slate_propensity == pytest.approx(slate, rel=1e-10)
            assert np.isfinite(scores[i, batch[i].items]).all()
    assert batch[3].items.size == 0 and batch[3].slate_propensity == 1.0
    assert batch[4].propensity[-1] == pytest.approx(1.0)  # the whole catalogue: last is certain


def test_the_exponential_race_orders_items_as_the_gumbel_keys_do() -> None:
    """The sampler's arrival times E / w order the items exactly as the Gumbel-top-k keys
    s / T - log E of the same draws (the textbook form): same slates, row by row."""
    rng = np.random.default_rng(5)
    scores = rng.normal(scale=3.0, size=(200, 30))
    scores[:, 0] = NEG
    scores[rng.random(scores.shape) < 0.2] = NEG
    temps = rng.uniform(0.2, 3.0, 200)
    seeds = rng.integers(0, 2**63, 200).tolist()
    got = sample_plackett_luce_many(scores, np.full(200, 8), temperature=temps, seeds=seeds)
    for i, slate in enumerate(got):
        noise = seeded_generator(seeds[i]).standard_exponential(30)
        with np.errstate(divide="ignore"):
            gumbel_keys = scores[i] / temps[i] - np.log(noise)
        ok = np.isfinite(scores[i])
        want = np.argsort(-np.where(ok, gumbel_keys, -np.inf), kind="stable")[: ok.sum()][:8]
        assert slate.items.tolist() == want.tolist()


def test_weights_that_underflow_are_still_drawn_in_order_and_never_masked_ones() -> None:
    """Scores ~1,000 T apart underflow exp(): those rows fall back to log-domain keys and
    propensities, so a list that must show every unmasked item shows them, best first, no
    masked one, each with its exact (finite) choice probability."""
    scores = np.array([NEG, 0.0, -1000.0, NEG, -2000.0, -1000.5])
    valid = [1, 2, 4, 5]
    seen: Counter[int] = Counter()
    for seed in range(400):
        (s,) = sample_plackett_luce_many(
            scores[None, :], np.array([4]), temperature=np.array([1.0]), seeds=[seed]
        )
        items = s.items.tolist()
        assert items[0] == 1 and items[3] == 4 and sorted(items) == valid
        seen[items[1]] += 1
        left = list(valid)
        for j, x in enumerate(items):  # the hand formula, shifted by the best score left
            exact = 1.0 / sum(math.exp(scores[y] - scores[x]) for y in left)
            assert s.propensity[j] == pytest.approx(exact, rel=1e-12), (items, j)
            left.remove(x)
        assert s.slate_propensity == pytest.approx(float(np.prod(s.propensity)))
    p2 = 1.0 / (1.0 + math.exp(-0.5))  # item 2 before item 5
    assert abs(seen[2] / 400 - p2) < 5 * math.sqrt(p2 * (1 - p2) / 400)


def test_seeded_generators_repeat_for_one_seed_and_differ_between_seeds() -> None:
    draws = {s: seeded_generator(s).random(4).tolist() for s in (0, 1, 2, 2**63 - 1)}
    assert seeded_generator(1).random(4).tolist() == draws[1]
    assert len({tuple(d) for d in draws.values()}) == 4


def test_a_row_draws_the_same_list_and_numbers_in_any_batch() -> None:
    """Items and propensities (bit for bit) of a row do not depend on the rows beside it,
    whatever their n: 200 random batches of 1-6 rows, each row also drawn alone."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        b = int(rng.integers(1, 7))
        scores = rng.normal(scale=2.0, size=(b, 25))
        scores[:, 0] = NEG
        scores[rng.random(scores.shape) < 0.3] = NEG
        n = rng.integers(1, 30, b)
        temps = rng.choice([1.0, 0.5, 3.0], b)
        seeds = rng.integers(0, 2**63, b).tolist()
        batch = sample_plackett_luce_many(scores, n, temperature=temps, seeds=seeds)
        for i in range(b):
            (alone,) = sample_plackett_luce_many(
                scores[i : i + 1],
                n[i : i + 1],
                temperature=temps[i : i + 1],
                seeds=seeds[i : i + 1],
            )
            assert batch[i].items.tolist() == alone.items.tolist()
            assert batch[i].propensity.tolist() == alone.propensity.tolist()


def test_weights_near_underflow_raise_no_warning() -> None:
    """An item ~720 T below the best has a subnormal weight: its arrival time overflows to
    inf (the row then takes log-domain keys) without a RuntimeWarning."""
    import warnings

    scores = np.array([[NEG, 0.0, -720.0, -1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(50):
            (s,) = sample_plackett_luce_many(
                scores, np.array([3]), temperature=np.array([1.0]), seeds=[seed]
            )
            assert sorted(s.items.tolist()) == [1, 2, 3] and s.items[-1] == 2
            assert np.isfinite(s.propensity).all() and s.propensity[-1] == 1.0
