"""Self-normalised DR, the cluster-robust standard error and SLOPE's clipped DR, checked by
hand and on synthetic bandits whose value is known analytically."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from recloop.evaluation.ope import (
    SLOPE_CAPS,
    doubly_robust,
    mean_se,
    self_normalised_dr,
    slope_clipped_dr,
)

N_CTX, N_ACT = 5, 10


def _bandit(rng: np.random.Generator, *, beta_floor: float) -> dict[str, np.ndarray]:
    """Reward means mu, logging beta (each action at least beta_floor / A), target pi."""
    mu = rng.uniform(0, 1, (N_CTX, N_ACT))
    beta = rng.dirichlet(np.ones(N_ACT), N_CTX) * (1 - beta_floor) + beta_floor / N_ACT
    pi = np.exp(4 * mu) / np.exp(4 * mu).sum(1, keepdims=True)
    return {"mu": mu, "beta": beta, "pi": pi}


def _log(b: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    c = rng.integers(0, N_CTX, n)
    a = np.minimum((rng.uniform(size=(n, 1)) > b["beta"][c].cumsum(1)).sum(1), N_ACT - 1)
    r = (rng.uniform(size=n) < b["mu"][c, a]).astype(np.float64)
    return {"c": c, "a": a, "r": r, "w": b["pi"][c, a] / b["beta"][c, a]}


def test_sndr_hand_computed() -> None:
    w, r = np.array([1.0, 3.0]), np.array([1.0, 0.0])
    q, v = np.array([0.5, 0.5]), np.array([0.4, 0.6])
    # mean(V) = 0.5; correction (1 * 0.5 + 3 * -0.5) / 4 = -0.25
    assert self_normalised_dr(w, r, q, v) == pytest.approx(0.25)
    # no weight at all: the direct method
    assert self_normalised_dr(np.zeros(2), r, q, v) == pytest.approx(0.5)


def test_sndr_exact_with_exact_reward_model_and_consistent_with_a_wrong_one() -> None:
    rng = np.random.default_rng(0)
    b = _bandit(rng, beta_floor=0.5)
    truth = float((b["pi"] * b["mu"]).sum(1).mean())
    d = _log(b, 200_000, rng)
    v_true = (b["pi"] * b["mu"]).sum(1)[d["c"]]
    r_mean = b["mu"][d["c"], d["a"]]  # rewards equal to the model: the correction is 0
    assert self_normalised_dr(d["w"], r_mean, r_mean, v_true) == pytest.approx(
        float(v_true.mean()), abs=1e-12
    )
    wrong = b["mu"] + 0.2  # a biased model: the correction must remove its bias
    est = self_normalised_dr(
        d["w"], d["r"], wrong[d["c"], d["a"]], (b["pi"] * wrong).sum(1)[d["c"]]
    )
    assert est == pytest.approx(truth, abs=0.01)
    assert float((b["pi"] * wrong).sum(1)[d["c"]].mean()) - truth > 0.15  # DM alone misses


def test_mean_se_plain_and_clustered() -> None:
    x = np.array([1.0, 2.0, 3.0, 6.0])
    assert mean_se(x) == pytest.approx(np.std(x, ddof=1) / 2)
    # one row per cluster: the cluster-robust SE is the plain one with the G/(G-1) factor
    # on the biased variance, i.e. the same number
    assert mean_se(x, clusters=np.arange(4)) == pytest.approx(mean_se(x))
    # two clusters of two: residual sums (1-3)+(2-3) = -3 and (3-3)+(6-3) = 3
    se = mean_se(x, clusters=np.array([7, 7, 9, 9]))
    assert se == pytest.approx(np.sqrt(2 / 1 * (9 + 9)) / 4)


def test_mean_se_matches_the_spread_of_repeated_means() -> None:
    rng = np.random.default_rng(3)
    means, ses = [], []
    for _ in range(300):
        g = rng.normal(size=50)  # cluster effects: events of one cluster are correlated
        x = np.repeat(g, 4) + rng.normal(size=200)
        means.append(x.mean())
        ses.append(mean_se(x, clusters=np.repeat(np.arange(50), 4)))
    assert np.mean(ses) == pytest.approx(np.std(means), rel=0.15)
    plain = mean_se(np.repeat(rng.normal(size=50), 4) + rng.normal(size=200))
    assert plain < 0.8 * np.std(means)  # ignoring the clusters understates it


def test_slope_lands_near_the_truth_and_rejects_biased_caps() -> None:
    rng = np.random.default_rng(1)
    b = _bandit(rng, beta_floor=0.3)
    d = _log(b, 100_000, rng)
    q = np.full_like(b["mu"], 0.5)  # a poor reward model: hard clipping is biased
    q_logged, v = q[d["c"], d["a"]], (b["pi"] * q).sum(1)[d["c"]]
    truth = float((b["pi"] * b["mu"]).sum(1).mean())
    pick = slope_clipped_dr(d["w"], d["r"], q_logged, v)
    unclipped = slope_clipped_dr(d["w"], d["r"], q_logged, v, caps=(float("inf"),))
    assert unclipped.value == pytest.approx(doubly_robust(d["w"], d["r"], q_logged, v))
    assert abs(pick.value - truth) < 4 * unclipped.se + 1e-9
    heavy = slope_clipped_dr(d["w"], d["r"], q_logged, v, caps=(1.0,))
    assert abs(heavy.value - truth) > 10 * heavy.se  # cap 1 is biased ...
    assert pick.cap > 1.0  # ... and SLOPE does not take it


def test_slope_clips_a_weight_whose_noise_swamps_the_estimate() -> None:
    # 1,000 events with weight 1 and reward 0.5 (q = 0), one with weight 10,000 and reward 1:
    # the unclipped DR is 10.5 with an SE of about 10; every clipped one is near 0.5
    w = np.r_[np.ones(1000), 10_000.0]
    r = np.r_[np.full(1000, 0.5), 1.0]
    zero = np.zeros_like(w)
    pick = slope_clipped_dr(w, r, zero, zero, caps=(1, 10, float("inf")))
    assert pick.cap < float("inf")
    assert pick.value == pytest.approx(0.5, abs=0.01)
    assert doubly_robust(w, r, zero, zero) > 10


def test_slope_caps_are_ascending_and_end_unclipped() -> None:
    assert list(SLOPE_CAPS) == sorted(SLOPE_CAPS)
    assert SLOPE_CAPS[-1] == float("inf")


def test_the_unweighed_mass_is_one_minus_the_mean_clipped_weight() -> None:
    from recloop.evaluation.ope import unweighed_mass

    assert unweighed_mass(np.array([1.0, 0.0, 0.5, 0.5])) == 0.5
    assert unweighed_mass(np.array([3.0, 1.0])) == 0.0  # noise above 1 is no negative mass
    assert unweighed_mass(np.array([0.0, 0.0])) == 1.0
    assert unweighed_mass(np.array([])) == 0.0


def _bandit_events(beta: np.ndarray, q: np.ndarray, n: int = 1000) -> Any:
    """``n`` events logged in ``beta``'s proportions, each with its action's outcome
    ``q``, one user each: their means are the exact expectations under beta."""
    from recloop.evaluation.ope import BaselineRewards, LoggedEvents

    action = np.repeat(np.arange(beta.shape[0]), (beta * n).round().astype(int))  # (E,)
    e = action.shape[0]
    return LoggedEvents(
        split=2, rows=np.arange(e), user=np.arange(e), action=action,
        reward=q[action].astype(np.float64), log_propensity=np.log(beta[action]),
        behaviour="logged", rewards=BaselineRewards(
            mu=0.0, user_bias=np.zeros(e + 1, np.float32),
            item_bias=np.zeros(beta.shape[0] + 1, np.float32)),
        q_logged=np.zeros(e),
    )  # fmt: skip


def test_the_outer_difference_brackets_both_values_whatever_the_log_cannot_show() -> None:
    """A bandit of 4 actions with exact expectations: beta shows action 3 once in 1,000, pi
    puts 0.6 on it; at cap 10 the clipped weights cannot weigh 0.59 of pi.  The outer
    difference values that mass at the worst outcome for the policy compared and at the
    best for the baseline: below the true difference, by (hi - lo) x the masses."""
    from recloop.evaluation.ope import OPEConfig, PolicyTerms, outer_difference

    beta = np.array([0.5, 0.3, 0.199, 0.001])
    q = np.array([0.2, 1.0, 0.4, 0.05])  # observed outcomes within [0.05, 1]: f = 0, g = 1
    events = _bandit_events(beta, q)
    cfg = OPEConfig(n_boot=0, weight_cap=10.0)

    def terms(pi: np.ndarray) -> PolicyTerms:
        return PolicyTerms(p_target=pi[events.action], v_target=np.full(events.n_events, 0.0))

    pi_b = np.array([0.1, 0.1, 0.2, 0.6])  # 0.59 of it unweighed
    pi_a = np.array([0.5, 0.3, 0.2, 0.0])  # all of it weighed
    nothing = PolicyTerms(p_target=np.zeros(events.n_events), v_target=np.zeros(events.n_events))
    v_b, v_a = float(pi_b @ q), float(pi_a @ q)
    # each side alone: against a baseline that shows nothing (w = 0, H = hi = 1)
    low_b = outer_difference(events, nothing, terms(pi_b), cfg=cfg).value + 1.0
    assert low_b == pytest.approx(v_b - 0.59 * q[3]) and low_b < v_b
    # the baseline fully weighed: its H is its value; the difference's outer value is below
    # the truth by what B's unweighed mass is worth (on action 3: 0.05 each)
    out = outer_difference(events, terms(pi_a), terms(pi_b), cfg=cfg)
    assert out.value == pytest.approx(low_b - v_a)
    assert out.value < v_b - v_a
    # swapped: B as the baseline is read at its best (its unweighed 0.59 worth 1 each)
    swapped = outer_difference(events, terms(pi_b), terms(pi_a), cfg=cfg)
    assert swapped.value == pytest.approx(v_a - (v_b + 0.59 * (1.0 - q[3])))
    assert swapped.value < v_a - v_b
    # equal, fully weighed policies: exactly 0, with or without intervals
    assert outer_difference(events, terms(pi_a), terms(pi_a), cfg=cfg).value == pytest.approx(0)
    boot = outer_difference(
        events, terms(pi_a), terms(pi_b), cfg=OPEConfig(n_boot=200, weight_cap=10.0)
    )
    assert boot.low <= boot.value <= boot.high and boot.value == pytest.approx(out.value)


def test_the_outer_difference_holds_where_the_target_shows_nothing_and_outcomes_are_positive() -> (
    None
):
    """Ratings in [1, 5]: a policy that shows nothing at an event is worth 0 there, below
    the lowest outcome, so the worst value of what cannot be weighed is min(lo, 0)."""
    from recloop.evaluation.ope import OPEConfig, PolicyTerms, outer_difference

    beta = np.array([0.5, 0.5])
    q = np.array([1.0, 5.0])
    events = _bandit_events(beta, q, n=10)
    shows_nothing = PolicyTerms(p_target=np.zeros(10), v_target=np.zeros(10))
    shows_a = PolicyTerms(p_target=np.ones(10) * (events.action == 0), v_target=np.zeros(10))
    cfg = OPEConfig(n_boot=0, weight_cap=None)
    # nothing vs always action 0 (value 1): the outer difference must not exceed -1
    out = outer_difference(events, shows_a, shows_nothing, cfg=cfg)
    assert out.value <= 0.0 - 1.0
    assert outer_difference(events, shows_nothing, shows_a, cfg=cfg).value <= 1.0 - 0.0


def test_the_outer_difference_reads_negative_outcomes_at_their_best_as_0() -> None:
    """Outcomes in [-2, -1]: a baseline that shows nothing is worth 0, above every outcome,
    so the best value of what cannot be weighed is max(hi, 0) = 0, not hi."""
    from recloop.evaluation.ope import OPEConfig, PolicyTerms, outer_difference

    beta = np.array([0.5, 0.5])
    events = _bandit_events(beta, np.array([-2.0, -1.0]), n=10)
    logger_like = PolicyTerms(p_target=np.full(10, 0.5), v_target=np.zeros(10))  # w = 1
    shows_nothing = PolicyTerms(p_target=np.zeros(10), v_target=np.zeros(10))
    out = outer_difference(events, shows_nothing, logger_like, cfg=OPEConfig(n_boot=0))
    assert out.value == pytest.approx(-1.5 - 0.0)  # the true difference: all of it weighed


def test_the_outer_difference_resamples_as_the_paired_report_does() -> None:
    """Against a baseline that shows nothing, with outcomes >= 0, the outer difference is
    the IPS difference minus hi, event by event: with the same resamples (users clustered,
    same seed) its interval is the paired report's IPS interval shifted by hi."""
    from recloop.evaluation.ope import OPEConfig, PolicyTerms, outer_difference, paired_report

    rng = np.random.default_rng(0)
    beta = np.array([0.4, 0.3, 0.2, 0.1])
    events = _bandit_events(beta, np.array([0.0, 1.0, 0.5, 2.0]), n=200)
    events = dataclasses.replace(events, user=rng.integers(0, 30, events.n_events))
    other = PolicyTerms(p_target=rng.uniform(0, 1, events.n_events), v_target=np.zeros(200))
    nothing = PolicyTerms(p_target=np.zeros(200), v_target=np.zeros(200))
    cfg = OPEConfig(n_boot=300, weight_cap=None, seed=7)
    out = outer_difference(events, nothing, other, cfg=cfg)
    ips = paired_report(events, nothing, other, cfg=cfg, run="b", baseline_run="a")
    iv = ips.differences["ips"]
    assert (out.value, out.low, out.high) == pytest.approx((iv.value - 2, iv.low - 2, iv.high - 2))


def test_an_overflowing_weight_gives_the_worst_outer_difference() -> None:
    from recloop.evaluation.ope import OUTER_NOT_FINITE, OPEConfig, PolicyTerms, outer_difference

    events = _bandit_events(np.array([0.5, 0.5]), np.array([0.0, 1.0]), n=10)
    events = dataclasses.replace(events, log_propensity=np.full(10, -800.0))  # 1 / beta = inf
    some = PolicyTerms(p_target=np.full(10, 0.5), v_target=np.zeros(10))
    out = outer_difference(events, some, some, cfg=OPEConfig(n_boot=50, weight_cap=None))
    assert (out.value, out.low, out.high) == (-1.0, -1.0, -1.0)
    assert out.flags == (OUTER_NOT_FINITE,)


@pytest.mark.parametrize("n_boot", [0, 50])
def test_the_outer_difference_on_fitted_propensities_is_flagged_as_no_bound(n_boot: int) -> None:
    """The bracket needs E[w] <= 1, which only the logging policy's own probabilities
    give: on fitted ones the interval is reported, flagged."""
    from recloop.evaluation.ope import OUTER_NOT_LOGGED, OPEConfig, PolicyTerms, outer_difference

    logged = _bandit_events(np.array([0.5, 0.5]), np.array([0.0, 1.0]), n=10)
    some = PolicyTerms(p_target=np.full(10, 0.5), v_target=np.zeros(10))
    cfg = OPEConfig(n_boot=n_boot, weight_cap=10.0)
    assert OUTER_NOT_LOGGED not in outer_difference(logged, some, some, cfg=cfg).flags
    for behaviour in ("fitted", "beta_head"):
        fitted = dataclasses.replace(logged, behaviour=behaviour)
        out = outer_difference(fitted, some, some, cfg=cfg)
        assert out.flags == (OUTER_NOT_LOGGED,)
        assert out.value == outer_difference(logged, some, some, cfg=cfg).value
