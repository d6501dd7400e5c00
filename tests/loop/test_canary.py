"""The canary's verdict: users split by the service's hash, reward per user, an interval."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recloop.artifacts.registry import Canary
from recloop.loop.canary import judge_canary, user_rewards
from recloop.serving.ab import AbSplit

CANARY = Canary(
    version="cand", parent="cur", share=0.5, salt="canary-cand", since_ts=100, started_at=""
)


def _impressions(per_user: dict[str, list[tuple[int, float, str]]]) -> pl.DataFrame:
    rows = [(u, t, r, v) for u, evs in per_user.items() for t, r, v in evs]
    return pl.DataFrame(
        rows, schema=["user", "timestamp", "rating", "policy_version"], orient="row"
    )


def _arm(user: str) -> int:
    return AbSplit([0.5, 0.5], salt=CANARY.salt).assign(user)


def test_users_are_split_by_the_services_hash_and_summed_since_the_start() -> None:
    users = [f"u{i}" for i in range(40)]
    log = {}
    for u in users:
        own = "cand" if _arm(u) == 1 else "cur"
        # one impression before the start (not counted), two after
        log[u] = [(90, 5.0, "cur"), (101, 1.0, own), (150, 2.0, own)]
    log["u0"].append((160, 1.0, "cur" if _arm("u0") == 1 else "cand"))  # the other version
    t = user_rewards(_impressions(log), CANARY)
    n_c = sum(_arm(u) == 1 for u in users)
    assert 0 < n_c < 40 and t.canary.size == n_c and t.current.size == 40 - n_c
    assert t.by_other_version == 1  # counted in its hashed arm (intention to treat)
    assert sorted(np.r_[t.canary, t.current].tolist()) == [3.0] * 39 + [4.0]
    assert t.canary_arm_impressions == 2 * n_c + (_arm("u0") == 1)
    assert t.canary_arm_other == (_arm("u0") == 1) and t.newest_ts == 160


@pytest.mark.parametrize(
    ("canary_reward", "margin", "decision"),
    [(2.0, 0.0, "promote"), (0.5, 0.0, "stop"), (0.97, 0.5, "promote"), (0.97, 0.0, "stop")],
)
def test_the_decision_is_the_low_end_of_the_interval_against_the_margin(
    canary_reward: float, margin: float, decision: str
) -> None:
    rng = np.random.default_rng(0)
    log = {}
    for i in range(400):
        u = f"u{i}"
        mean = canary_reward if _arm(u) == 1 else 1.0
        log[u] = [(200, float(rng.normal(mean, 0.3)), "cand" if _arm(u) == 1 else "cur")]
    v = judge_canary(_impressions(log), CANARY, min_users=30, margin=margin, n_boot=500)
    assert v.decision == decision, v.reason
    assert v.low < v.diff < v.high
    assert v.diff == pytest.approx(canary_reward - 1.0, abs=0.08)
    # the interval's half width is about 2 * 0.3 * sqrt(2 / 200)
    assert v.high - v.low == pytest.approx(2 * 1.96 * 0.3 * np.sqrt(2 / 200), rel=0.25)
    assert v.to_dict()["interval"] == [v.low, v.high]


def test_too_few_users_in_an_arm_waits() -> None:
    log = {f"u{i}": [(200, 1.0, "cur")] for i in range(20)}
    v = judge_canary(_impressions(log), CANARY, min_users=30, margin=0.0)
    assert v.decision == "wait" and "fewer than 30 in an arm" in v.reason
    empty = judge_canary(_impressions({}).head(0), CANARY, min_users=2, margin=0.0)
    assert empty.decision == "wait" and empty.users_canary == 0


def _even_log(n: int = 200, *, canary_serves: bool = True) -> pl.DataFrame:
    rng = np.random.default_rng(3)
    log = {}
    for i in range(n):
        u = f"u{i}"
        mine = _arm(u) == 1
        version = "cand" if mine and canary_serves else "cur"
        log[u] = [(200 + i, float(rng.poisson(2.0)), version)]
    return _impressions(log)


def test_a_verdict_is_reproducible() -> None:
    events = _even_log()
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=1)
    a = judge_canary(events, CANARY, min_users=30, margin=0.0)
    b = judge_canary(events, CANARY, min_users=30, margin=0.0)
    assert (a.low, a.high) == (b.low, b.high)
    # the same events in another order: the same users, the same totals, the same mean
    c = judge_canary(shuffled, CANARY, min_users=30, margin=0.0)
    assert c.diff == pytest.approx(a.diff)


def test_a_canary_its_services_do_not_serve_waits_then_expires() -> None:
    """Lists the current model served to canary users would pull the difference to 0."""
    events = _even_log(canary_serves=False)
    v = judge_canary(events, CANARY, min_users=30, margin=0.0, max_age_s=1000)
    assert v.decision == "wait" and "served 0 % of its users' impressions" in v.reason
    v = judge_canary(events, CANARY, min_users=30, margin=0.0, max_age_s=100)
    assert v.decision == "stop" and v.reason.startswith("stop canary: expired after")
    v = judge_canary(events, CANARY, min_users=30, margin=0.0, min_served=0.0)
    assert v.decision in ("promote", "stop") and v.low < v.high
