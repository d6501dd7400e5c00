"""``recloop evaluate --ab``: per-arm reward per served list and click rate from a hand-made
served log, with user-bootstrap intervals and the difference between arms."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recloop.cli import main
from recloop.errors import ConfigError, DataError
from recloop.evaluation.ab import ab_report, parse_since, served_lists
from recloop.streaming.log import BehaviorLog
from recloop.streaming.served import SERVED_SCHEMA

# (recommendation_id, user, arm, ts, settled, [(reward, event_id) per shown item])
LOG: list[tuple[str, str, str | None, int, bool, list[tuple[float | None, str | None]]]] = [
    ("r1", "a1", "A", 100, True, [(1.0, "e1"), (0.0, None)]),
    ("r2", "a1", "A", 110, True, [(0.0, None), (0.0, None)]),
    ("r3", "a2", "A", 120, True, [(2.0, "e2"), (1.0, "e3")]),
    ("r4", "b1", "B", 130, True, [(0.0, None), (0.0, None)]),
    ("r5", "b2", "B", 140, True, [(0.0, None), (1.0, "e4")]),
    ("r6", "b2", "B", 150, False, [(None, None), (1.0, "e5")]),  # still open
    ("r7", "c1", None, 160, True, [(1.0, "e6")]),  # served without A/B
]
# Hand-computed, settled lists only:
#   A: lists r1 (1), r2 (0), r3 (3): reward/list 4/3, clicked 2 of 3
#   B: lists r4 (0), r5 (1):         reward/list 1/2, clicked 1 of 2
#   B - A: -5/6 and -1/6


def served_frame(log: list[Any] = LOG) -> pl.DataFrame:
    rows = []
    for rid, user, arm, ts, settled, items in log:
        for pos, (reward, event) in enumerate(items):
            rows.append(
                {
                    "recommendation_id": rid,
                    "position": pos,
                    "user_id": user,
                    "item_id": f"i{pos}",
                    "ts": ts,
                    "model_version": f"m-{arm}",
                    "arm": arm,
                    "policy": "softmax" if arm == "B" else "topk",
                    "temperature": None,
                    "epsilon": None,
                    "seed": None,
                    "source": "policy",
                    "score": 0.0,
                    "propensity": 0.5,
                    "slate_propensity": 0.25,
                    "event_id": event,
                    "reward": reward,
                    "attributed_by": None if event is None else "id",
                    "settled": settled,
                }
            )
    schema = {
        **SERVED_SCHEMA,
        "event_id": pl.String(),
        "reward": pl.Float64(),
        "attributed_by": pl.String(),
        "settled": pl.Boolean(),
    }
    return pl.DataFrame(rows, schema=schema)


def test_served_lists_sum_rewards_and_mark_clicks_per_list() -> None:
    lists = served_lists(served_frame())
    assert lists["recommendation_id"].to_list() == ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]
    assert lists["reward"].to_list() == [1.0, 0.0, 3.0, 0.0, 1.0, 1.0, 1.0]
    assert lists["clicked"].to_list() == [True, False, True, False, True, True, True]
    assert lists["settled"].to_list() == [True] * 5 + [False, True]


def test_ab_report_gives_the_hand_computed_numbers() -> None:
    rep = ab_report(served_frame(), n_boot=500, seed=1)
    a, b = rep.arms
    assert (a.arm, a.users, a.lists, a.impressions) == ("A", 2, 3, 6)
    assert (b.arm, b.users, b.lists, b.impressions) == ("B", 2, 2, 4)
    assert a.reward_per_list.value == pytest.approx(4 / 3)
    assert a.click_rate.value == pytest.approx(2 / 3)
    assert b.reward_per_list.value == pytest.approx(1 / 2)
    assert b.click_rate.value == pytest.approx(1 / 2)
    assert b.policies == ["softmax"] and a.model_versions == ["m-A"]
    (d,) = rep.differences
    assert (d.arm, d.baseline) == ("B", "A")
    assert d.reward_per_list.value == pytest.approx(1 / 2 - 4 / 3)
    assert d.click_rate.value == pytest.approx(1 / 2 - 2 / 3)
    assert (rep.open_lists, rep.lists_without_arm, rep.users_in_several_arms) == (1, 1, 0)
    # resampling users of A: a1 alone gives 1/2 per list, a2 alone 3, so every replicate
    # lies in [1/2, 3], and both extremes are reachable
    assert 0.5 <= a.reward_per_list.low < a.reward_per_list.value < a.reward_per_list.high <= 3
    # B's users: b1 (0 per list) and b2 (1): the replicates lie in [0, 1]
    assert b.reward_per_list.low == 0.0 and b.reward_per_list.high == 1.0


def test_open_lists_count_when_asked_and_since_filters_by_time() -> None:
    rep = ab_report(served_frame(), settled_only=False, n_boot=200)
    b = rep.arms[1]
    assert (b.lists, b.reward_per_list.value, b.click_rate.value) == (3, 2 / 3, 2 / 3)
    later = ab_report(served_frame(), since=120, n_boot=200)
    assert [a.lists for a in later.arms] == [1, 2]
    assert later.arms[0].reward_per_list.value == 3.0
    flipped = ab_report(served_frame(), baseline="B", n_boot=200)
    assert flipped.differences[0].arm == "A"
    assert flipped.differences[0].reward_per_list.value == pytest.approx(4 / 3 - 1 / 2)


def test_identical_users_give_a_zero_width_interval() -> None:
    log = [
        (f"r{arm}{u}{k}", f"{arm}u{u}", arm, 0, True, [(1.0, f"e{arm}{u}{k}"), (0.0, None)])
        for arm in ("A", "B")
        for u in range(5)
        for k in range(2)
    ]
    rep = ab_report(served_frame(log), n_boot=200)
    for a in rep.arms:
        assert (a.reward_per_list.low, a.reward_per_list.high) == (1.0, 1.0)
    d = rep.differences[0].reward_per_list
    assert (d.value, d.low, d.high) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_matches_the_normal_approximation_on_a_large_arm() -> None:
    """400 users with one list each, Bernoulli(0.3) rewards: the 95 % interval's width is
    about 2 * 1.96 * sqrt(p (1 - p) / n); the difference of two such arms sqrt(2) wider."""
    rng = np.random.default_rng(0)
    n = 400
    log = []
    for arm in ("A", "B"):
        for u, r in enumerate(rng.random(n) < 0.3):
            log.append((f"{arm}{u}", f"{arm}u{u}", arm, 0, True, [(float(r), "e" if r else None)]))
    rep = ab_report(served_frame(log), n_boot=4000, seed=3)
    for a in rep.arms:
        p = a.reward_per_list.value
        want = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
        got = a.reward_per_list.high - a.reward_per_list.low
        assert got == pytest.approx(want, rel=0.12)
        assert a.click_rate.value == p
    pa, pb = (a.reward_per_list.value for a in rep.arms)
    want = 2 * 1.96 * math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
    d = rep.differences[0].reward_per_list
    assert d.high - d.low == pytest.approx(want, rel=0.12)


def test_a_user_in_two_arms_is_reported() -> None:
    log = [*LOG, ("r8", "a1", "B", 200, True, [(0.0, None)])]
    rep = ab_report(served_frame(log), n_boot=200)
    assert rep.users_in_several_arms == 1 and rep.notes


def test_fewer_than_two_arms_or_a_wrong_baseline_fail_clearly() -> None:
    only_a = [x for x in LOG if x[2] == "A"]
    with pytest.raises(DataError, match="1 A/B arm"):
        ab_report(served_frame(only_a))
    with pytest.raises(ConfigError, match="baseline 'C'"):
        ab_report(served_frame(), baseline="C")


def test_parse_since() -> None:
    assert parse_since("1733350000") == 1733350000
    assert parse_since("1970-01-02T00:00") == 86400
    assert parse_since("1970-01-02T01:00+01:00") == 86400
    assert parse_since("2h", now=10_000.0) == 10_000 - 7200
    with pytest.raises(ConfigError, match="--since 'yesterday'"):
        parse_since("yesterday")


def test_evaluate_ab_cli_reads_the_sql_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = BehaviorLog(url)
    frame = served_frame()
    log.append_served(frame.select(list(SERVED_SCHEMA)))
    # what attribution and settling would have written
    import sqlalchemy as sa

    sv = log.tables.served
    with log.engine.begin() as conn:
        for row in frame.iter_rows(named=True):
            conn.execute(
                sa.update(sv)
                .where(sv.c.recommendation_id == row["recommendation_id"])
                .where(sv.c.position == row["position"])
                .values(event_id=row["event_id"], reward=row["reward"], settled=row["settled"])
            )
    log.dispose()
    assert main(["evaluate", "--ab", "--database-url", url, "--json", "--n-boot", "300"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [a["arm"] for a in doc["arms"]] == ["A", "B"]
    assert doc["arms"][0]["reward_per_list"]["value"] == pytest.approx(4 / 3)
    assert doc["differences"][0]["click_rate"]["value"] == pytest.approx(-1 / 6)
    assert main(["evaluate", "--ab", "--database-url", url, "--n-boot", "300"]) == 0
    text = capsys.readouterr().out
    assert "reward/list - A" in text and "1 lists still open" in text
    assert main(["evaluate", "--ab"]) == 2
    assert "--database-url" in capsys.readouterr().err


def test_the_control_or_current_arm_is_the_default_baseline() -> None:
    """`serve --ab control=...:0.9 --ab candidate=...:0.1` (README): candidate - control, not
    the other way round because "candidate" sorts first; a registry canary's log: canary -
    current."""
    renamed = {"A": "control", "B": "candidate"}
    log = [(rid, u, renamed.get(arm, arm), ts, s, items) for rid, u, arm, ts, s, items in LOG]
    rep = ab_report(served_frame(log), n_boot=200)
    assert rep.baseline == "control"
    assert [(d.arm, d.baseline) for d in rep.differences] == [("candidate", "control")]
    assert rep.differences[0].reward_per_list.value == pytest.approx(1 / 2 - 4 / 3)
    canary = {"A": "current", "B": "canary"}
    log = [(rid, u, canary.get(arm, arm), ts, s, items) for rid, u, arm, ts, s, items in LOG]
    assert ab_report(served_frame(log), n_boot=200).baseline == "current"
    assert ab_report(served_frame(), n_boot=200).baseline == "A"  # no such name: the first


def test_arms_with_few_users_are_said_to_be_too_small_to_mark(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One user an arm: every resample is that user, so the interval has width 0 and the
    difference 'excludes 0' -- not evidence; the report says so and marks nothing."""
    from recloop.cli.train import format_ab

    log = [(f"r{arm}{k}", f"u{arm}", arm, k, True, [(r, f"e{arm}{k}" if r else None)])
           for arm, r in (("A", 1.0), ("B", 0.0)) for k in range(50)]  # fmt: skip
    rep = ab_report(served_frame(log), n_boot=200, min_users=30)
    (d,) = rep.differences
    assert (d.reward_per_list.low, d.reward_per_list.high) == (-1.0, -1.0)
    assert d.small_sample and rep.min_users == 30
    assert any("fewer than 30 users: A (1), B (1)" in n for n in rep.notes)
    text = format_ab(rep)
    assert "-1.0000] *" not in text and "note: arms with fewer than 30 users" in text
    big = ab_report(served_frame(log), n_boot=200, min_users=1)
    assert not big.differences[0].small_sample and "-1.0000] *" in format_ab(big)


def test_a_non_finite_reward_is_refused_with_the_list_that_has_it() -> None:
    frame = served_frame().with_columns(
        pl.when(pl.col("recommendation_id") == "r3")
        .then(float("nan"))
        .otherwise(pl.col("reward"))
        .alias("reward")
    )
    with pytest.raises(
        DataError, match=r"2 impressions with a non-finite reward \(first: list 'r3'"
    ):
        ab_report(frame, n_boot=200)


def test_feedback_worth_nothing_is_attributed_but_is_no_click() -> None:
    """An event with reward 0 (or a dislike below 0) is its impression's reward, not a click."""
    log = [
        ("r1", "a1", "A", 0, True, [(0.0, "e1"), (0.0, None)]),  # a view worth 0
        ("r2", "a2", "A", 1, True, [(-1.0, "e2")]),  # a dislike
        ("r3", "b1", "B", 2, True, [(1.0, "e3")]),
        ("r4", "b2", "B", 3, True, [(0.0, None)]),
    ]
    lists = served_lists(served_frame(log))
    assert lists["clicked"].to_list() == [False, False, True, False]
    rep = ab_report(served_frame(log), n_boot=200)
    assert rep.arms[0].click_rate.value == 0.0
    assert rep.arms[0].reward_per_list.value == pytest.approx(-0.5)
    assert rep.arms[1].click_rate.value == pytest.approx(0.5)
