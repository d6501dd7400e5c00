"""``recloop experiment``: arms, the result's shapes, and a tiny run end to end."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.artifacts.bundle import load_artifact
from recloop.cli import main
from recloop.errors import ConfigError
from recloop.evaluation.worlds.rollout import Estimate
from recloop.loop.experiment import (
    CSV_FIELDS,
    ArmRound,
    ArmSpec,
    ArmStack,
    ExperimentConfig,
    ExperimentResult,
    GateCheck,
    Served,
    SimClock,
    bootstrap_model,
    compare_last_round,
    paired,
    parse_arms,
    run_experiment,
    serve_round,
    write_csv,
)


def test_arms_are_parsed_with_their_training_fields() -> None:
    arms = parse_arms(
        "reinforce:behaviour=logged:top_k=5,cql,sasrec,popularity,random", epsilon=0.2
    )
    assert [a.name for a in arms] == [
        "rl-reinforce(behaviour=logged,top_k=5)",
        "rl-cql",
        "supervised-sasrec",
        "popularity",
        "random",
    ]
    assert arms[0].train == {"behaviour": "logged", "top_k": 5} and arms[0].epsilon == 0.2
    assert arms[-1].algo is None and arms[-1].epsilon == 1.0  # uniform, no loop
    # RL arms learn from every impression (logged propensities), the others from clicks
    assert [a.train_targets for a in arms[:4]] == ["all", "all", "rewarded", "rewarded"]
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'"):
        parse_arms("nope", epsilon=0.1)
    with pytest.raises(ConfigError, match="distinct"):
        parse_arms("cql,cql", epsilon=0.1)
    with pytest.raises(ConfigError, match="not field=value"):
        parse_arms("cql:lr", epsilon=0.1)


def test_an_arms_dotted_fields_set_nested_training_settings() -> None:
    (arm,) = parse_arms(
        "reinforce:encoder.use_user=false:encoder.kind=attention:fit.epochs=4:lr=0.003",
        epsilon=0.1,
    )
    assert arm.train == {
        "encoder": {"use_user": False, "kind": "attention"},
        "fit": {"epochs": 4},
        "lr": 0.003,
    }
    with pytest.raises(ConfigError, match=r"--arms .*'lr' is set both as a value and a group"):
        parse_arms("reinforce:lr=0.1:lr.x=1", epsilon=0.1)
    with pytest.raises(ConfigError, match=r"--arms .*'encoder' is set both as a group and a"):
        parse_arms("reinforce:encoder.kind=gru:encoder=1", epsilon=0.1)
    for bad in ("encoder..kind=gru", ".x=1", "x.=1", "=1"):
        with pytest.raises(ConfigError, match="empty field name"):
            parse_arms(f"reinforce:{bad}", epsilon=0.1)
    with pytest.raises(ConfigError, match="'lr' is set twice"):
        parse_arms("reinforce:lr=0.1:lr=0.2", epsilon=0.1)


def test_arm_directories_stay_short_and_distinct() -> None:
    from recloop.loop.experiment import SLUG_MAX, _slug

    assert _slug("rl-reinforce(behaviour=logged)") == "rl-reinforce_behaviour_logged_"
    long = "rl-reinforce(" + ",".join(f"encoder.field{i}=value{i}" for i in range(13)) + ")"
    other = long.replace("value12", "value13")
    assert len(_slug(long)) == SLUG_MAX and _slug(long) != _slug(other)
    assert _slug(long)[:40] == _slug(other)[:40]


def test_an_arm_may_not_set_its_own_seed() -> None:
    with pytest.raises(ConfigError, match="every arm trains with the experiment's --seed"):
        parse_arms("reinforce:seed=3", epsilon=0.1)


def test_an_arms_training_fields_are_checked_before_any_round() -> None:
    """A typo would otherwise fail each round's training and leave the arm serving the
    bootstrap model for the whole experiment."""
    with pytest.raises(ConfigError, match=r"'reinforce:encoder.use_usr=false'.*did you mean"):
        parse_arms("reinforce:encoder.use_usr=false,random", epsilon=0.1)
    with pytest.raises(ConfigError, match="ce_epochs must be >= 0"):
        parse_arms("reinforce:ce_epochs=-1", epsilon=0.1)
    with pytest.raises(ConfigError, match=r"fit\.epoch.*did you mean epochs"):
        parse_arms("sasrec:fit.epoch=3", epsilon=0.1)


def test_an_arm_may_set_its_own_serving_exploration() -> None:
    """``serve.epsilon`` (policy, temperature) is the arm's serving, not a training field."""
    arms = parse_arms("reinforce:behaviour=logged:serve.epsilon=0.3,sasrec", epsilon=0.1)
    assert arms[0].epsilon == 0.3 and arms[0].train == {"behaviour": "logged"}
    assert arms[0].name == "rl-reinforce(behaviour=logged,serve.epsilon=0.3)"
    assert arms[1].epsilon == 0.1
    soft = parse_arms("sasrec:serve.policy=softmax:serve.temperature=0.5", epsilon=0.1)[0]
    assert (soft.policy, soft.temperature, soft.train) == ("softmax", 0.5, {})
    for bad, match in [
        ("cql:serve.eps=0.3", "serving fields are serve.policy"),
        ("cql:serve.epsilon=1.5", r"serve\.epsilon must be in \[0, 1\]"),
        ("cql:serve.epsilon=abc", r"serve\.epsilon must be in \[0, 1\], got 'abc'"),
        ("cql:serve.policy=topk", "serve.policy must be epsilon or softmax"),
        ("cql:serve.temperature=0", r"serve\.temperature must be in \[0\.0001, 1e6\]"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_arms(bad, epsilon=0.1)


NO_ONE_STEP = dict.fromkeys(
    ("one_step_checked", "ope_misses_one_step", "one_step_contradicts_truth", "one_step_flips",
     "one_step_misses_ips", "one_step_misses_snips", "one_step_misses_dr",
     "outer_would_keep_out"),
    0,
)  # fmt: skip
"""The summary's OPE counts of a run whose gates had no OPE."""


def _row(r: int, arm: str, value: float, half: float, gate: GateCheck | None = None) -> ArmRound:
    return ArmRound(
        round=r,
        arm=arm,
        algo=arm.split("-")[-1],
        reward=Estimate(value, value - half, value + half),
        sessions=30,
        steps=100,
        clicks=40,
        model_version="v0",
        promoted=gate is not None and gate.decision == "promote",
        gate=gate,
    )


def test_the_rl_and_supervised_arms_compared_are_declared_not_the_best() -> None:
    """The first RL arm of --arms against the baseline (or first supervised) arm: picking
    the best of several arms on the same users would favour the side with more arms."""
    from recloop.loop.experiment import ArmSpec

    cfg = ExperimentConfig(rounds=1, users=10)
    rows = [
        _row(1, "rl-reinforce", 1.0, 0.05),
        _row(1, "rl-cql", 1.5, 0.05),  # the luckier RL arm
        _row(1, "supervised-gru4rec", 1.2, 0.05),
        _row(1, "supervised-sasrec", 0.9, 0.05),
    ]
    arms = [
        ArmSpec(name="rl-reinforce", algo="reinforce"),
        ArmSpec(name="rl-cql", algo="cql"),
        ArmSpec(name="supervised-gru4rec", algo="gru4rec"),
        ArmSpec(name="supervised-sasrec", algo="sasrec"),
    ]
    result = ExperimentResult(config=cfg, arms=arms, rows=rows, world={}, bootstrap_version="v0")
    cmp_ = compare_last_round(result)
    assert cmp_ is not None
    assert (cmp_["rl_arm"], cmp_["supervised_arm"]) == ("rl-reinforce", "supervised-gru4rec")
    assert cmp_["ratio"] == pytest.approx(1.0 / 1.2) and not cmp_["target_met"]
    assert [(c["rl_arm"], round(c["ratio"], 3)) for c in cmp_["all_rl_arms"]] == [
        ("rl-reinforce", 0.833),
        ("rl-cql", 1.25),
    ]
    as_baseline = dataclasses.replace(cfg, baseline="supervised-sasrec")
    result = ExperimentResult(
        config=as_baseline, arms=arms, rows=rows, world={}, bootstrap_version="v0"
    )
    cmp_ = compare_last_round(result)
    assert cmp_ is not None and cmp_["supervised_arm"] == "supervised-sasrec"


def test_last_round_comparison_and_csv(tmp_path: Path) -> None:
    worse = GateCheck(
        decision="promote",
        reason="promote: ...",
        candidate="v1",
        current="v0",
        true_candidate=Estimate(1.0, 0.9, 1.1),
        true_current=Estimate(1.5, 1.4, 1.6),
        true_diff=Estimate(-0.5, -0.6, -0.4),
        violation=True,
        worse_point=True,
    )
    cfg = ExperimentConfig(rounds=2, users=10)
    rows = [
        _row(1, "rl-reinforce", 1.0, 0.1),
        _row(1, "supervised-sasrec", 1.0, 0.1),
        _row(2, "rl-reinforce", 1.3, 0.05, worse),
        _row(2, "supervised-sasrec", 1.0, 0.05),
    ]
    from recloop.loop.experiment import ArmSpec

    arms = [
        ArmSpec(name="rl-reinforce", algo="reinforce"),
        ArmSpec(name="supervised-sasrec", algo="sasrec"),
    ]
    result = ExperimentResult(config=cfg, arms=arms, rows=rows, world={}, bootstrap_version="v0")
    cmp_ = compare_last_round(result)
    assert cmp_ is not None
    assert cmp_["ratio"] == pytest.approx(1.3) and cmp_["disjoint"] and cmp_["target_met"]
    doc = result.to_dict()
    assert doc["gate_violations"] == 1
    assert doc["gate_summary"] == {
        "decisions": 1,
        "promoted": 1,
        "violations": 1,
        "truly_better_rejected": 0,
        "truly_worse_rejected": 0,
        "rejected_untrusted": 0,
        **NO_ONE_STEP,
    }
    assert doc["arms"][0]["reward_per_round"] == [1.0, 1.3]
    assert doc["arms"][0]["interval_per_round"][1] == pytest.approx([1.25, 1.35])
    write_csv(result, tmp_path / "e.csv")
    with open(tmp_path / "e.csv", encoding="utf-8") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == CSV_FIELDS and len(read) == 4
    last = next(r for r in read if r["round"] == "2" and r["arm"] == "rl-reinforce")
    assert last["promoted"] == "1" and last["violation"] == "1" and last["true_diff"] == "-0.500000"


@pytest.mark.slow
def test_a_tiny_experiment_runs_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "exp"
    code = main(
        [
            "-q", "experiment", "--world", "shop", "--rounds", "2", "--users", "12",
            "--arms", "reinforce:behaviour=logged,popularity,random", "--epochs", "1",
            "--truth-users", "30", "--bootstrap-users", "60", "--workdir", str(work),
            "--json",
        ]
    )  # fmt: skip
    assert code in (0, None)
    doc = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in doc["arms"]] == [
        "rl-reinforce(behaviour=logged)",
        "popularity",
        "random",
    ]
    for arm in doc["arms"]:
        assert set(arm) >= {"name", "algo", "reward_per_round", "interval_per_round"}
        assert len(arm["reward_per_round"]) == 2 and len(arm["interval_per_round"]) == 2
        for value, (lo, hi) in zip(arm["reward_per_round"], arm["interval_per_round"], strict=True):
            assert lo <= value <= hi and value >= 0
    # round 1 is served by the shared bootstrap model with the same users and luck
    rl, pop, rnd = doc["arms"]
    assert rl["reward_per_round"][0] == pop["reward_per_round"][0]
    assert rl["model_version_per_round"][0] == doc["bootstrap_version"]
    assert rnd["algo"] == "random" and rnd["promoted_per_round"] == [False, False]
    # every loop round of a learning arm was gated and checked against the truth
    checks = doc["gate_checks"]
    assert len(checks) == 4
    for c in checks:
        assert c["decision"] in ("promote", "reject"), c["reason"]
        assert c["true_diff"] is not None
        want = c["decision"] == "promote" and c["true_diff"]["high"] < -doc["config"]["margin"]
        assert c["violation"] is want
    assert doc["gate_violations"] == sum(c["violation"] for c in checks)
    # the loops trained on their own served-items tables, impressions with propensities
    for name in ("rl-reinforce_behaviour_logged_", "popularity"):
        reg = work / "arms" / name / "registry"
        lineage = [json.loads(p.read_text()) for p in reg.glob("versions/*/registry.json")]
        assert any(lin.get("loop", {}).get("source") == "impressions" for lin in lineage)
    with open(work / "experiment.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and tuple(rows[0]) == CSV_FIELDS


def test_paired_difference_and_ratio_by_hand() -> None:
    arm = np.array([1.0, 2.0, 3.0, 4.0])
    base = np.array([1.0, 1.0, 2.0, 2.0])
    p = paired(arm, base, baseline="b", n_boot=4000, seed=0)
    d = arm - base  # 0, 1, 1, 2: mean 1, sd sqrt(2/3)
    assert p.diff.value == pytest.approx(1.0)
    half = 1.959964 * np.sqrt(2 / 3) / 2
    assert (p.diff.low, p.diff.high) == pytest.approx((1 - half, 1 + half))
    assert p.ratio == pytest.approx(10 / 6)
    assert p.ratio_low < p.ratio < p.ratio_high
    assert p.ratio_low >= 1.0  # every resample has arm >= base user by user
    assert d.mean() == pytest.approx(p.diff.value)
    with pytest.raises(ValueError, match="differ in users"):
        paired(arm, base[:3], baseline="b")


def test_arms_are_compared_user_by_user_with_the_baseline(tmp_path: Path) -> None:
    cfg = ExperimentConfig(rounds=1, users=4)
    rows = [
        _row(1, "rl-reinforce", 2.5, 0.5),
        _row(1, "supervised-sasrec", 1.5, 0.5),
        _row(1, "random", 1.0, 0.5),
    ]
    rows[0].per_user = np.array([2.0, 3.0, 2.0, 3.0])
    rows[1].per_user = np.array([1.0, 2.0, 1.0, 2.0])
    rows[2].per_user = np.array([1.0, 1.0, 1.0, 1.0])
    arms = [
        ArmSpec(name="rl-reinforce", algo="reinforce"),
        ArmSpec(name="supervised-sasrec", algo="sasrec"),
        ArmSpec(name="random", algo=None),
    ]
    result = ExperimentResult(config=cfg, arms=arms, rows=rows, world={}, bootstrap_version="v0")
    assert result.baseline() == "supervised-sasrec"
    doc = result.to_dict()
    rl = doc["arms"][0]["paired_vs_baseline_per_round"][0]
    # per user the RL arm earns exactly 1 more: a zero-width interval, unpaired ones overlap
    assert rl["diff"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert rl["ratio"] == pytest.approx(2.5 / 1.5)
    assert doc["arms"][1]["paired_vs_baseline_per_round"] == [None]  # the baseline itself
    cmp_ = compare_last_round(result)
    assert cmp_ is not None and cmp_["paired"]["diff"]["low"] == 1.0
    write_csv(result, tmp_path / "e.csv")
    with open(tmp_path / "e.csv", encoding="utf-8") as f:
        read = {r["arm"]: r for r in csv.DictReader(f)}
    assert read["rl-reinforce"]["baseline"] == "supervised-sasrec"
    assert read["rl-reinforce"]["diff_lo"] == "1.000000"
    assert read["random"]["diff_vs_baseline"] == "-0.500000"
    bad = ExperimentResult(
        config=ExperimentConfig(rounds=1, users=4, baseline="nope"),
        arms=arms,
        rows=rows,
        world={},
        bootstrap_version="v0",
    )
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        bad.baseline()
    # ... and before any round runs: nothing is written.
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        run_experiment(bad.config, arms, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_bootstrap_counts_clicks_not_impressions(tmp_path: Path) -> None:
    from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
    from recloop.evaluation.worlds.base import build_world

    world = build_world("shop", [])
    cfg = ExperimentConfig(bootstrap_users=40, users=4)
    art = bootstrap_model(world, cfg, tmp_path)
    root = art.parent.parent
    events = pl.read_csv(root / "log" / "events.csv")
    ds = PreparedDataset.load(root / "data")
    assert ds.n_events == events.height  # every impression is in the data (the catalogue)
    fit = (ds.split == TRAIN) | (ds.split == VALID)
    assert fit.any() and (ds.reward[fit] > 0).all()  # but only clicks are counted
    held_out = ds.split == TEST
    assert fit.sum() == (ds.reward[~held_out] > 0).sum()  # every click outside the holdout


def _served_items(stack: ArmStack, columns: str) -> list:
    """``columns`` of the arm's served-items table, by user and time."""
    import sqlalchemy as sa

    eng = sa.create_engine(stack.database_url)
    with eng.connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT {columns} FROM served_items ORDER BY user_id, ts")
        ).all()
    eng.dispose()
    return list(rows)


async def _one_round(tmp_path: Path, spec: ArmSpec, users: int = 10) -> tuple[Served, ArmStack]:
    from recloop.evaluation.worlds.base import build_world

    world = build_world("shop", [])
    cfg = ExperimentConfig(bootstrap_users=60, users=users, truth_users=0)
    boot = bootstrap_model(world, cfg, tmp_path)
    stack = ArmStack(spec, root=tmp_path / "arm", cfg=cfg, bootstrap=boot, clock=SimClock(world))
    who = 500_000_000 + np.arange(users, dtype=np.int64)
    async with stack.serving() as client:
        served = await serve_round(stack, client, world, users=who, seed=(0, 1), round_no=1)
    await stack.drain()
    return served, stack


@pytest.mark.slow
async def test_a_round_keeps_order_sessions_and_rewards_through_prepare(tmp_path: Path) -> None:
    # what the loop trains on (prepare --from-db --impressions with the loop's default
    # sessions) is each user's sessions in the order they happened, one prepared session per
    # world session, with the rewards the requests sent as history
    from recloop.data.dataset import TRAIN
    from recloop.data.loaders.sql import load_impressions_from_db
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.schema import RawData
    from recloop.data.splits import SplitConfig

    spec = ArmSpec(name="popularity", algo="popularity", epsilon=0.5, train_targets="rewarded")
    served, stack = await _one_round(tmp_path, spec)
    raw = load_impressions_from_db(stack.database_url, table="served_items")
    assert raw.events.height == served.steps
    ds = prepare(
        RawData(events=raw.events, source=raw.source), PrepareConfig(split=SplitConfig(mode="loo"))
    )
    checked = many = 0
    for u in range(1, ds.n_users + 1):
        i = int(ds.user_ids[u - 1][1:]) - 500_000_000
        lo, hi = int(ds.user_offsets[u]), int(ds.user_offsets[u + 1])
        items = [ds.item_ids[j - 1] for j in ds.item[lo:hi].tolist()]
        assert items == served.shown[i]  # the order of the session survives
        assert ds.reward[lo:hi].tolist() == pytest.approx(served.earned[i])
        assert (np.diff(ds.timestamp[lo:hi]) > 0).all()  # strictly increasing event time
        # world sessions stay apart, and only they start one (in the train rows: prepare
        # also starts a session where the split changes, loo's last rows)
        train = ds.split[lo:hi] == TRAIN
        k = int(train.sum())
        assert train[:k].all()
        sessions = np.unique(ds.session[lo:hi][:k]).shape[0]
        assert sessions == len(set(served.session_of[i][:k]))
        many += len(set(served.session_of[i][:k])) > 1
        checked += 1
    assert checked >= 5 and many >= 3


@pytest.mark.slow
async def test_the_random_arm_is_uniform_from_a_users_first_step(tmp_path: Path) -> None:
    _, stack = await _one_round(tmp_path, ArmSpec(name="random", algo=None, epsilon=1.0))
    n_items = len(load_artifact(stack.registry.current_path()).item_ids)
    rows = _served_items(stack, "user_id, ts, source, propensity")
    first = {}
    for user, _ts, source, prop in rows:
        first.setdefault(user, (source, prop))
        assert source == "policy"  # never the deterministic popular fallback
    assert len(first) == 10
    for _source, prop in first.values():
        assert prop == pytest.approx(1 / n_items)  # uniform over the catalogue at step 1


def test_a_canarys_verdict_is_a_decision_checked_with_its_gate_time_truth() -> None:
    truth = (Estimate(1.0, 0.9, 1.1), Estimate(1.5, 1.4, 1.6), Estimate(-0.5, -0.6, -0.4))
    started = GateCheck(
        decision="canary",
        reason="promote: ...",
        candidate="v1",
        current="v0",
        true_candidate=truth[0],
        true_current=truth[1],
        true_diff=truth[2],
        violation=False,
        worse_point=False,
    )
    stopped = dataclasses.replace(started, decision="reject", reason="canary: stop canary: ...")
    row1 = _row(1, "rl-reinforce", 1.0, 0.1, started)
    row2 = _row(2, "rl-reinforce", 1.0, 0.1)
    row2.canary = stopped
    result = ExperimentResult(
        config=ExperimentConfig(rounds=2, users=10, canary=0.5),
        arms=[ArmSpec(name="rl-reinforce", algo="reinforce")],
        rows=[row1, row2],
        world={},
        bootstrap_version="v0",
    )
    doc = result.to_dict()
    assert [(c["round"], c["stage"], c["decision"]) for c in doc["gate_checks"]] == [
        (1, "gate", "canary"),
        (2, "canary", "reject"),
    ]
    # starting a canary is not a final decision; the stop is, and it was right
    assert doc["gate_summary"] == {
        "decisions": 1,
        "promoted": 0,
        "violations": 0,
        "truly_better_rejected": 0,
        "truly_worse_rejected": 1,
        "rejected_untrusted": 0,
        **NO_ONE_STEP,
    }


def test_rejections_on_untrusted_ope_are_counted() -> None:
    from recloop.loop.experiment import GateCheck, _ope_untrusted, gate_summary

    warned = {"candidate": [], "current": ["mean weight 9.68"]}
    assert _ope_untrusted({"ope": {"require_trusted": True, "warnings": warned}})
    assert not _ope_untrusted({"ope": {"require_trusted": False, "warnings": warned}})
    clean = {"candidate": [], "current": []}
    assert not _ope_untrusted({"ope": {"require_trusted": True, "warnings": clean}})
    assert not _ope_untrusted({})  # the first model: no OPE
    base = GateCheck(
        decision="reject", reason="keep current: ...", candidate="v1", current="v0",
        true_candidate=None, true_current=None, true_diff=None, violation=False,
        worse_point=False,
    )  # fmt: skip
    rows = [
        _row(1, "a", 1.0, 0.1, dataclasses.replace(base, ope_untrusted=True)),
        _row(1, "b", 1.0, 0.1, base),
        _row(2, "a", 1.0, 0.1, dataclasses.replace(base, decision="promote")),
        _row(2, "b", 1.0, 0.1, dataclasses.replace(base, decision="canary", ope_untrusted=True)),
    ]
    summary = gate_summary(rows)
    assert (summary["decisions"], summary["rejected_untrusted"]) == (3, 1)


def test_the_summary_tells_an_ope_error_from_a_one_step_value_that_misleads() -> None:
    """A gate's OPE interval is checked against the exact one-step difference it estimates,
    and that difference against the session truth."""
    from recloop.evaluation.worlds.rollout import Estimate
    from recloop.loop.experiment import GateCheck, gate_summary

    trio = tuple[float, float, float]

    def check(
        ope: trio | None,
        one: float | None,
        true: trio | None,
        shadowed: tuple[trio, trio] | None = None,
    ) -> GateCheck:
        return GateCheck(
            decision="promote", reason="", candidate="v1", current="v0",
            true_candidate=None, true_current=None,
            true_diff=None if true is None else Estimate(*true), violation=False,
            worse_point=False, ope_diff=None if ope is None else Estimate(*ope),
            one_step_diff=one,
            on_current_states=None if shadowed is None else Estimate(*shadowed[0]),
            on_candidate_states=None if shadowed is None else Estimate(*shadowed[1]),
        )  # fmt: skip

    rows = [
        # right about the one-step value, which is not the session's: the store-fed case
        _row(
            1,
            "a",
            1.0,
            0.1,
            check(
                (0.03, 0.01, 0.05),
                0.034,
                (-0.2, -0.26, -0.17),
                ((0.08, 0.05, 0.1), (-0.3, -0.4, -0.2)),
            ),
        ),
        # the one-step value is just outside the interval (an estimation error), and the
        # session truth is not resolved
        _row(
            1,
            "b",
            1.0,
            0.1,
            check(
                (0.03, 0.01, 0.05), 0.0, (0.1, -0.1, 0.3), ((0.08, 0.05, 0.1), (-0.3, -0.4, 0.2))
            ),
        ),
        # both agree, and the truth too
        _row(2, "a", 1.0, 0.1, check((-0.1, -0.2, -0.05), -0.1, (-0.3, -0.4, -0.2))),
        # truly better, one-step worse, OPE interval holding it: misleads, no miss
        _row(2, "b", 1.0, 0.1, check((-0.1, -0.2, 0.05), -0.02, (0.3, 0.2, 0.4))),
        # no OPE (the first model, or --gate metric): not checked
        _row(3, "a", 1.0, 0.1, check(None, None, (-0.3, -0.4, -0.2))),
        _row(3, "b", 1.0, 0.1, check((0.0, -0.1, 0.1), None, None)),
    ]
    summary = gate_summary(rows)
    assert summary["one_step_checked"] == 4
    assert summary["ope_misses_one_step"] == 1
    assert summary["one_step_contradicts_truth"] == 2
    assert summary["one_step_flips"] == 1  # the second's own-state interval covers 0
    # each estimator of the report is checked too
    first = rows[0].gate
    assert first is not None
    rows[0].gate = dataclasses.replace(
        first, ope_diffs={"ips": Estimate(-0.02, -0.03, -0.01), "dr": Estimate(0.03, 0.01, 0.05)}
    )
    summary = gate_summary(rows)
    assert (summary["one_step_misses_ips"], summary["one_step_misses_dr"]) == (1, 0)
    assert summary["one_step_misses_snips"] == 0  # not in the report
    # with session returns as the outcome, the interval does not estimate the one-step value
    assert gate_summary(rows, ope_outcome="return")["ope_misses_one_step"] == 0
    # promotions whose outer interval reaches below -margin: the bias bound would stop them
    assert summary["outer_would_keep_out"] == 0  # no outer low recorded
    rows[0].gate = dataclasses.replace(rows[0].gate, outer_low=-0.05)
    rows[2].gate = dataclasses.replace(rows[2].gate, outer_low=0.01)
    assert gate_summary(rows)["outer_would_keep_out"] == 1
    assert gate_summary(rows, margin=0.1)["outer_would_keep_out"] == 0
    rows[1].gate = dataclasses.replace(rows[1].gate, decision="reject", outer_low=-0.5)
    assert gate_summary(rows)["outer_would_keep_out"] == 1  # a rejection is not counted


@pytest.mark.slow
def test_a_tiny_experiment_with_canaries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a margin no candidate can miss (and OPE warnings not gating), every candidate
    becomes the canary, serves part of the next round's users and is promoted there."""
    work = tmp_path / "exp"
    code = main(
        [
            "-q", "experiment", "--world", "shop", "--rounds", "3", "--users", "40",
            "--arms", "popularity", "--epochs", "1", "--canary", "0.5", "--margin", "100",
            "--gate-untrusted", "--gate-min-ess", "7.5", "--canary-min-users", "5",
            "--gate-target", "served", "--gate-mean-weight", "0.1,5",
            "--truth-users", "30", "--bootstrap-users", "60", "--workdir", str(work), "--json",
        ]
    )  # fmt: skip
    assert code in (0, None)
    doc = json.loads(capsys.readouterr().out)
    checks = [(c["round"], c["stage"], c["decision"]) for c in doc["gate_checks"]]
    assert checks == [
        (1, "gate", "canary"),
        (2, "canary", "promote"),
        (2, "gate", "canary"),
        (3, "canary", "promote"),
        (3, "gate", "canary"),
    ], [c["reason"] for c in doc["gate_checks"]]
    first = doc["gate_checks"][0]["candidate"]
    assert doc["gate_checks"][1]["candidate"] == first
    assert "users" in doc["gate_checks"][1]["reason"]
    (arm,) = doc["arms"]
    # round 2's users were served by the bootstrap model and the canary, split by user
    assert sorted(arm["model_version_per_round"][1].split("+")) == sorted(
        [doc["bootstrap_version"], first]
    )
    assert arm["promoted_per_round"] == [False, True, True]
    reg = work / "arms" / "popularity" / "registry"
    actions = [json.loads(x)["action"] for x in (reg / "history.jsonl").read_text().splitlines()]
    assert actions.count("canary-start") == 3 and actions.count("promote") == 3  # + bootstrap
    # the gate flags reach each loop's gate
    ope = json.loads((reg / "versions" / first / "registry.json").read_text())
    ope = ope["gate"]["ope"]
    assert (ope["require_trusted"], ope["min_ess"]) == (False, 7.5)
    assert (doc["config"]["gate_trusted"], doc["config"]["gate_min_ess"]) == (False, 7.5)
    assert ope["target"] == doc["config"]["gate_target"] == "served"
    bounds = [0.1, 5.0]
    assert ope["candidate"]["config"]["mean_weight_bounds"] == doc["config"]["gate_mean_weight"]
    assert doc["config"]["gate_mean_weight"] == bounds
    # scored as served, the model that served the holdout through the real service, bus,
    # SQL log and prepare gets its logged propensities back: every weight is 1
    assert ope["current"]["ess"] == pytest.approx(ope["n_events"], rel=1e-9)
    assert ope["current"]["mean_weight"] == pytest.approx(1.0, rel=1e-9)


def test_a_canary_promotion_before_a_failed_round_is_still_counted() -> None:
    from types import SimpleNamespace

    from recloop.loop.controller import LoopError
    from recloop.loop.experiment import TruthCheck, run_loop_round

    class FailingLoop:
        def __init__(self) -> None:
            self.canary_verdict: dict[str, object] = {}

        def run_once(self) -> None:
            self.canary_verdict = {
                "version": "v1", "parent": "v0", "decision": "promote", "reason": "better",
            }  # fmt: skip
            raise LoopError("train", RuntimeError("out of memory"))

    diff = Estimate(-0.5, -0.6, -0.4)
    stack = SimpleNamespace(
        loop=FailingLoop(),
        cfg=ExperimentConfig(rounds=1, users=4),
        registry=SimpleNamespace(current=lambda: "v1"),
        spec=ArmSpec(name="rl", algo="reinforce"),
        truth={
            "v1": TruthCheck(
                candidate=Estimate(1.0, 0.9, 1.1),
                current=Estimate(1.5, 1.4, 1.6),
                diff=diff,
                on_candidate_states=Estimate(-0.3, -0.4, -0.2),
                on_current_states=Estimate(0.1, 0.05, 0.15),
            )
        },
    )
    done = run_loop_round(stack, world=None, round_no=2)  # type: ignore[arg-type]
    assert done.gate is not None and done.gate.decision == "failed at train"
    assert done.promoted and done.canary is not None
    assert done.canary.decision == "promote" and done.canary.violation  # truly worse
    assert done.canary.on_candidate_states == Estimate(-0.3, -0.4, -0.2)


def test_a_second_experiment_in_the_same_workdir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import fcntl

    work = tmp_path / "exp"
    work.mkdir()
    (work / "arms" / "keep").mkdir(parents=True)  # a running experiment's arms
    with open(work / ".lock", "a") as running:
        fcntl.flock(running.fileno(), fcntl.LOCK_EX)
        code = main(["-q", "experiment", "--rounds", "1", "--users", "5", "--workdir", str(work)])
    assert code == 2
    err = capsys.readouterr().err
    assert "another recloop experiment is running in this directory" in err, err
    assert (work / "arms" / "keep").is_dir()  # nothing of the running one was deleted


def test_the_gate_mean_weight_bounds_are_checked() -> None:
    assert ExperimentConfig().gate_mean_weight == (0.5, 2.0)  # OPEConfig's default
    with pytest.raises(ConfigError, match=r"0 <= low <= 1 <= high, got 1\.2, 2\.0"):
        ExperimentConfig(gate_mean_weight=(1.2, 2.0))


def test_the_gate_target_is_checked() -> None:
    assert ExperimentConfig().gate_target == "served"  # the default since 2026-12-06
    assert ExperimentConfig(gate_target="uniform_topk").gate_target == "uniform_topk"
    with pytest.raises(ConfigError, match="gate_target: uniform_topk or served, got 'slate'"):
        ExperimentConfig(gate_target="slate")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["softmax", "epsilon"])
async def test_lists_served_by_the_real_stack_are_re_served_exactly(
    tmp_path: Path, policy: str
) -> None:
    """Lists of 3 served by the real service (softmax at T = 0.5, or ε-greedy at 0.5), logged
    through the bus into SQL and read back by ``prepare --from-db --impressions``: the gate's
    scorer of the serving model, on the served target, gets back the logged propensity of
    every slot (a lower softmax slot's given the items above it, which the re-served model
    draws with their logged probabilities: W = 1), so every weight is 1 and the ESS is the
    number of impressions."""
    from recloop.data.loaders.sql import load_impressions_from_db
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.schema import RawData
    from recloop.data.splits import SplitConfig
    from recloop.evaluation.ope import (
        OPEConfig,
        importance_weights,
        logged_events,
        ope_report,
        policy_terms,
        reserve_check,
    )
    from recloop.evaluation.worlds.base import USER_PREFIX, build_world
    from recloop.loop.gate import MAPPED_WINDOW, MappedScorer

    world = build_world("shop", [])
    cfg = ExperimentConfig(bootstrap_users=60, users=8, truth_users=0)
    boot = bootstrap_model(world, cfg, tmp_path)
    spec = ArmSpec(
        name="popularity", algo="popularity", policy=policy, epsilon=0.5, temperature=0.5,
        train_targets="rewarded",
    )  # fmt: skip
    stack = ArmStack(spec, root=tmp_path / "arm", cfg=cfg, bootstrap=boot, clock=SimClock(world))
    users = [f"{USER_PREFIX}{500_000_000 + i}" for i in range(8)]
    shown: dict[str, list[str]] = {u: [] for u in users}
    async with stack.serving() as client:
        for step in range(3):
            stack.clock.at(1, 0, step)
            body = {
                "requests": [
                    {
                        "user_id": u,
                        "recent_items": [{"item": x, "reward": 0.0} for x in shown[u]],
                        "exclude_consumed": True,
                        "n": 3,
                        "seed": 1000 * step + i,
                    }
                    for i, u in enumerate(users)
                ]
            }
            resp = await client.post("/v1/recommend/batch", json=body)
            assert resp.status_code == 200, resp.text
            for u, r in zip(users, resp.json()["results"], strict=True):
                assert r["policy"]["name"] == policy and len(r["items"]) == 3
                shown[u] += [x["item_id"] for x in r["items"]]
            stack.expected += len(users)
    await stack.drain()
    raw = load_impressions_from_db(stack.database_url, table="served_items")
    assert raw.events.height == 8 * 3 * 3
    ds = prepare(
        RawData(events=raw.events, source=raw.source), PrepareConfig(split=SplitConfig(mode="loo"))
    )
    scorer = MappedScorer(load_artifact(stack.registry.current_path()), ds)
    ope = OPEConfig(target="served", n_boot=0)
    for split in ("train", "test"):
        events = logged_events(ds, split=split, cfg=ope)
        h = MAPPED_WINDOW * scorer.history_len  # as the gate scores its current model
        terms = policy_terms(scorer, ds, events, history=h, cfg=ope)
        w_raw, _, _ = importance_weights(events, terms, None)
        np.testing.assert_allclose(w_raw, 1.0, rtol=1e-5)
        # ... which is what the gate's re-serve check of the current model sees
        rs = reserve_check(ds, events, terms, version=str(stack.registry.current()))
        assert (rs.impressions, rs.mismatched) == (events.n_events, 0) and rs.worst < 1e-5
        rep = ope_report(events, terms, ope)
        assert rep.ess == pytest.approx(events.n_events, rel=1e-5)
    assert set(ds.extra["position"].tolist()) == {0, 1, 2}
    assert set(ds.extra["position"][events.rows].tolist()) == {2}  # loo: the last slot


REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.mark.slow
@pytest.mark.integration
async def test_a_store_fed_services_lists_are_re_served_on_their_logged_context(
    tmp_path: Path,
) -> None:
    """Requests without recent items: the service reads each user's state from the online
    store (Redis), which the stream processor fills with the clicks only, while the
    prepared impressions carry every shown item as history.  A history-dependent model
    (SASRec) re-served on each list's logged context gets back every propensity (lists of
    3, softmax at T = 0.5); rebuilt from the log instead, most of them are off, and the
    gate's re-serve check says so."""
    import uuid

    from recloop.data.dataset import TRAIN
    from recloop.data.loaders.sql import load_impressions_from_db
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.sampler import TransitionSampler
    from recloop.data.schema import RawData
    from recloop.data.splits import SplitConfig
    from recloop.evaluation.ope import OPEConfig, logged_events, policy_terms, reserve_check
    from recloop.evaluation.worlds.base import USER_PREFIX, build_world
    from recloop.loop.experiment import _publish_events
    from recloop.loop.gate import MAPPED_WINDOW, MappedScorer
    from recloop.stores import open_store
    from recloop.training.recommender import train_run

    world = build_world("shop", [])
    cfg = ExperimentConfig(bootstrap_users=60, users=8, truth_users=0)
    boot = bootstrap_model(world, cfg, tmp_path)
    train_run(
        "sasrec", boot.parent.parent / "data", tmp_path / "sasrec", overwrite=True,
        progress=False, epochs=1,
    )  # fmt: skip
    spec = ArmSpec(
        name="sasrec", algo="sasrec", policy="softmax", epsilon=0.1, temperature=0.5,
        train_targets="rewarded",
    )  # fmt: skip
    prefix = f"rl-ctx-{uuid.uuid4().hex[:8]}:"
    stack = ArmStack(
        spec, root=tmp_path / "arm", cfg=cfg, bootstrap=tmp_path / "sasrec" / "artifact",
        clock=SimClock(world), store_url=REDIS_URL, store_prefix=prefix,
    )  # fmt: skip
    users = [f"{USER_PREFIX}{500_000_000 + i}" for i in range(12)]
    rng = np.random.default_rng(0)
    clicked: dict[str, list[str]] = {u: [] for u in users}
    before: dict[tuple[str, int], list[str]] = {}  # (user, step): what the store held
    try:
        async with stack.serving() as client:
            for step in range(5):
                now = stack.clock.at(1, 0, step)
                body = {
                    "requests": [
                        {"user_id": u, "n": 3, "seed": 1000 * step + i} for i, u in enumerate(users)
                    ]
                }
                resp = await client.post("/v1/recommend/batch", json=body)
                assert resp.status_code == 200, resp.text
                events = []
                for u, r in zip(users, resp.json()["results"], strict=True):
                    assert r["source"] == "policy" and len(r["items"]) == 3
                    before[u, step] = list(clicked[u])
                    if rng.random() < 0.6:  # a click on the first item
                        clicked[u].append(r["items"][0]["item_id"])
                        rid = r["recommendation_id"]
                        events.append(
                            {"event_id": f"{rid}:0", "user_id": u, "ts": now, "behavior": "pv",
                             "item_id": r["items"][0]["item_id"], "reward": 1.0,
                             "recommendation_id": rid}
                        )  # fmt: skip
                await _publish_events(stack.bus_url, events)
                stack.expected += len(users) + len(events)
                await stack.drain()  # the processor stores the clicks before the next step
    finally:
        await open_store(stack.store_url, prefix=prefix).delete_all()  # type: ignore[attr-defined]
    raw = load_impressions_from_db(stack.database_url, table="served_items")
    ds = prepare(
        RawData(events=raw.events, source=raw.source), PrepareConfig(split=SplitConfig(mode="loo"))
    )
    assert (ds.extra["served_context"][ds.extra["position"] == 0] != "").all()
    version = str(stack.registry.current())
    scorer = MappedScorer(load_artifact(stack.registry.current_path()), ds)
    ope = OPEConfig(target="served", n_boot=0)
    h = MAPPED_WINDOW * scorer.history_len
    events = logged_events(ds, split="train", cfg=ope)
    terms = policy_terms(scorer, ds, events, history=h, cfg=ope)
    rs = reserve_check(ds, events, terms, version=version)
    assert (rs.impressions, rs.mismatched) == (events.n_events, 0) and rs.worst < 1e-4
    bare = dataclasses.replace(
        ds, extra={k: v for k, v in ds.extra.items() if k != "served_context"}
    )
    terms = policy_terms(scorer, bare, events, history=h, cfg=ope)
    assert reserve_check(bare, events, terms, version=version).share > 0.5

    # Training on the same log: with states="lists" every slot's state is its list's
    # context, the user's clicks before the list (what the store held), not the shown
    # items above it or before it, as the service served; "rows" rebuilds it from the log.
    hist = 4
    index = {str(raw): i + 1 for i, raw in enumerate(ds.item_ids)}
    want = []
    for p in range(ds.n_events):
        u = str(ds.user_ids[int(ds.user[p]) - 1])
        step = (p - int(ds.user_offsets[int(ds.user[p])])) // 3
        items = [index[i] for i in before[u, step]][-hist:]
        want.append([0] * (hist - len(items)) + items)
    assert all(int(n) == 15 for n in np.diff(ds.user_offsets)[1:])  # 5 lists of 3 each
    train = np.flatnonzero(ds.split == TRAIN)
    lists = TransitionSampler(ds, history=hist, batch_size=10_000, states="lists").batch(train)
    rows = TransitionSampler(ds, history=hist, batch_size=10_000, states="rows").batch(train)
    assert lists.history.tolist() == [want[p] for p in train]
    assert ((lists.history > 0) == (lists.history_reward == 1.0)).all()
    same = [r == want[p] for r, p in zip(rows.history.tolist(), train, strict=True)]
    assert sum(same) < 0.5 * train.shape[0]


@pytest.mark.slow
async def test_with_history_source_store_the_service_serves_from_the_clicks(
    tmp_path: Path,
) -> None:
    """``--history-source store``: the users send no recent items, the stream processor
    stores each step's clicks before the next step, and the service's state and
    exclusions are the clicks: a list's logged context holds the user's clicked items
    (with their rewards) before it, an ignored item may be shown again, a clicked one not."""
    from recloop.evaluation.worlds.base import build_world

    world = build_world("shop", [])
    cfg = ExperimentConfig(bootstrap_users=60, users=10, truth_users=0, history_source="store")
    boot = bootstrap_model(world, cfg, tmp_path)
    spec = ArmSpec(name="popularity", algo="popularity", epsilon=0.1, train_targets="rewarded")
    stack = ArmStack(
        spec, root=tmp_path / "arm", cfg=cfg, bootstrap=boot, clock=SimClock(world),
        store_url=f"sqlite:///{tmp_path / 'arm' / 'store.db'}",
    )  # fmt: skip
    who = 500_000_000 + np.arange(10, dtype=np.int64)
    async with stack.serving() as client:
        served = await serve_round(stack, client, world, users=who, seed=(0, 1), round_no=1)
    await stack.drain()
    rows = _served_items(stack, "user_id, item_id, context")
    by_user: dict[str, list[tuple[str, dict]]] = {}
    for user, item, context in rows:
        by_user.setdefault(user, []).append((item, json.loads(context)))
    repeats = 0
    for i, u in enumerate(who.tolist()):
        lists = by_user[f"u{u}"]
        assert [item for item, _ in lists] == served.shown[i]
        clicked: list[tuple[str, float]] = []
        for t, ((item, ctx), reward) in enumerate(zip(lists, served.earned[i], strict=True)):
            assert ctx["recent"] == [c for c, _ in clicked]  # the store's: the clicks
            assert ctx["rewards"] == pytest.approx([r for _, r in clicked])
            assert item not in [c for c, _ in clicked]  # a clicked item is excluded
            repeats += item in [x for x, _ in lists[:t]]  # an ignored one may come back
            if reward:
                clicked.append((item, reward))
    assert repeats > 0


@pytest.mark.slow
def test_a_tiny_store_fed_experiment_checks_its_gates_with_click_fed_roll_outs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import recloop.loop.experiment as experiment

    feedback: list[str] = []
    real = experiment.simulate

    def spy(*args: object, **kwargs: object) -> object:
        feedback.append(str(kwargs.get("feedback", "shown")))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "simulate", spy)
    work = tmp_path / "exp"
    code = main(
        [
            "-q", "experiment", "--world", "shop", "--rounds", "2", "--users", "8",
            "--arms", "popularity,random", "--truth-users", "20", "--bootstrap-users", "60",
            "--history-source", "store", "--workdir", str(work), "--json",
        ]
    )  # fmt: skip
    assert code in (0, None)
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["history_source"] == "store"
    assert (work / "arms" / "popularity" / "store.db").is_file()
    assert len(doc["gate_checks"]) == 2
    # the bootstrap log is the world's own policy (every shown item); the truth roll-outs of
    # the gates feed the models the clicks, as the arms' services are fed
    assert feedback[0] == "shown" and feedback[1:] == ["clicks"] * 4
    # each gate's OPE difference comes with the exact one-step difference it estimates
    with_ope = [c for c in doc["gate_checks"] if c["ope_diff"] is not None]
    assert with_ope and all(isinstance(c["one_step_diff"], float) for c in with_ope)
    assert all(set(c["ope_diffs"]) == {"ips", "snips", "dr"} for c in with_ope)
    assert all(c["ope_diffs"]["dr"] == c["ope_diff"] for c in with_ope)  # the gating one
    # and each gate's truth with the one-step advantage in either model's roll-out states
    for c in doc["gate_checks"]:
        for key in ("on_candidate_states", "on_current_states"):
            assert c[key]["low"] <= c[key]["value"] <= c[key]["high"]
    assert doc["gate_summary"]["one_step_checked"] == len(with_ope)
    # the outer difference's low end and the candidate's unweighed mass, from the report
    for c in with_ope:
        assert 0.0 <= c["unweighed_mass"] <= 1.0
        assert isinstance(c["outer_low"], float)
    # the candidate scored directly and through the gate's id translation is one policy
    import numpy as np

    from recloop.artifacts import load_artifact
    from recloop.data.dataset import TEST, PreparedDataset
    from recloop.evaluation.ope import OPEConfig, TrainedCatalogue
    from recloop.evaluation.worlds.base import build_world
    from recloop.evaluation.worlds.ope_check import WorldIndex, dataset_states, one_step_truth
    from recloop.loop.experiment import one_step_difference
    from recloop.loop.gate import MAPPED_WINDOW, mapped_scorer

    arm = work / "arms" / "popularity"
    last = sorted((arm / "loop" / "rounds").iterdir())[-1]
    version = arm / "registry" / "versions" / with_ope[-1]["candidate"]
    world, ds, art = (
        build_world("shop"),
        PreparedDataset.load(last / "data"),
        load_artifact(version),
    )
    cfg = OPEConfig(target="served")
    index = WorldIndex.of(ds, world)
    states = dataset_states(ds, world, index)
    rows = np.flatnonzero(ds.split == TEST)
    direct = one_step_truth(art.policy, ds, world, states, index, rows,
                            history=art.history_len, cfg=cfg)  # fmt: skip
    mapped = one_step_truth(mapped_scorer(art, ds), ds, world, states, index, rows,
                            history=MAPPED_WINDOW * art.history_len, cfg=cfg)  # fmt: skip
    np.testing.assert_allclose(direct, mapped, rtol=1e-6, atol=1e-9)
    # and the gate's difference of a model against itself is what leaving out the items
    # it could not have learnt changes
    trained = one_step_truth(TrainedCatalogue(art.policy, ds), ds, world, states, index, rows,
                             history=art.history_len, cfg=cfg)  # fmt: skip
    same = one_step_difference(world, version, version, last / "data", ope_cfg=cfg)
    assert same == pytest.approx(float((trained - mapped).mean()), abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("history_source", ["request", "store"])
async def test_the_truth_roll_out_chooses_what_the_arms_service_serves(
    tmp_path: Path, history_source: str
) -> None:
    """The gates' truth rolls a model out as its service serves it: from the same state
    (every shown item, or the clicks only) and the same exclusions, the roll-out's greedy
    choice is the service's item at every step, ties included (the bootstrap's popularity
    counts tie a lot: its service breaks them by its own indices, the same order for every
    fresh user) and only within the model's catalogue."""
    import torch

    from recloop.evaluation.worlds.base import ITEM_PREFIX, build_world
    from recloop.evaluation.worlds.rollout import Selection, Shown, make_policy, top1

    world = build_world("shop", [])
    cfg = ExperimentConfig(
        bootstrap_users=60, users=10, truth_users=0, history_source=history_source
    )
    boot = bootstrap_model(world, cfg, tmp_path)
    store = "memory://" if history_source == "request" else f"sqlite:///{tmp_path / 'store.db'}"
    stack = ArmStack(
        ArmSpec(name="greedy", algo=None, epsilon=0.0), root=tmp_path / "arm", cfg=cfg,
        bootstrap=boot, clock=SimClock(world), store_url=store,
    )  # fmt: skip
    who = 500_000_000 + np.arange(10, dtype=np.int64)
    async with stack.serving() as client:
        served = await serve_round(stack, client, world, users=who, seed=(0, 1), round_no=1)
    scorer = make_policy(world, str(boot), Selection(kind="epsilon", epsilon=0.0)).scorer
    h, n = scorer.history, world.n_items
    users, hist, hist_r, masks, got = [], [], [], [], []
    for i, u in enumerate(who.tolist()):
        fed: list[tuple[int, float]] = []
        for raw, reward in zip(served.shown[i], served.earned[i], strict=True):
            last = ([(0, 0.0)] * h + fed)[-h:]
            users.append(u)
            hist.append([x for x, _ in last])
            hist_r.append([r for _, r in last])
            masks.append([x for x, _ in fed])
            item = int(raw[len(ITEM_PREFIX) :])
            got.append(item)
            if history_source == "request" or reward:
                fed.append((item, reward))
    b = len(users)
    shown = Shown.empty(b, n, world.mech.sessions * world.mech.horizon, scorer.blocked)
    for j, mask in enumerate(masks):
        for item in mask:
            shown.add(np.array([j]), np.array([item]))
    ids = np.array(users, np.int64)
    scores = scorer(ids, np.array(hist), np.array(hist_r, np.float32), None)
    ties = int((torch.sort(scores[0], descending=True).values[:50].diff() == 0).sum())
    chosen = top1(scores, shown, np.arange(b), scorer.tie_keys(ids), scorer.tie_items)
    assert ties > 10  # the bootstrap's scores tie: the tie-break decides
    assert chosen.tolist() == got
    # the world's own numbers as tie-break keys (the roll-out before 2026-12-07) disagree
    assert top1(scores, shown, np.arange(b), ids).tolist() != got


@pytest.mark.slow
def test_a_models_roll_out_keeps_its_services_order_and_catalogue(tmp_path: Path) -> None:
    """simulate() of a saved model: greedy, every fresh user meets the model's own order
    of its tied items (one order, as its service shows them); exploring, only the
    model's catalogue is drawn from, with the propensity its service logs."""
    from recloop.evaluation.worlds.base import build_world
    from recloop.evaluation.worlds.rollout import Selection, make_policy, simulate

    world = build_world("shop", [])
    boot = bootstrap_model(world, ExperimentConfig(bootstrap_users=60), tmp_path)
    n_known = len(load_artifact(boot).item_ids)
    assert n_known < world.n_items  # a catalogue smaller than the world's
    users = 900_000_000 + np.arange(40, dtype=np.int64)
    greedy = make_policy(world, str(boot), Selection(kind="epsilon", epsilon=0.0))
    roll = simulate(world, greedy, users, seed=0)  # every shown item masked: a fixed order
    orders = [roll.item[roll.user == u].tolist() for u in users.tolist()]
    longest = max(orders, key=len)
    assert all(o == longest[: len(o)] for o in orders)
    # ... the order its service ranks for a user it never saw (index 0, no history)
    import torch

    from recloop.ranking import topk

    art = load_artifact(boot)
    h = art.history_len
    zero = torch.zeros(1, dtype=torch.int64)
    scores = art.policy(zero, torch.zeros(1, h, dtype=torch.int64), torch.zeros(1, h))
    scores[:, 0] = float("-inf")
    ranked = topk(scores, len(longest), row_keys=zero).indices[0].tolist()
    assert [int(art.item_ids[c - 1][1:]) for c in ranked] == longest
    uniform = make_policy(world, str(boot), Selection(kind="epsilon", epsilon=1.0))
    roll = simulate(world, uniform, users, seed=0)
    known = {int(i[1:]) for i in load_artifact(boot).item_ids}
    assert set(roll.item.tolist()) <= known
    first = np.r_[True, roll.user[1:] != roll.user[:-1]]
    np.testing.assert_allclose(roll.propensity[first], 1.0 / n_known)


def test_the_truth_gives_the_candidates_one_step_advantage_in_both_models_states(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The myopic oracle as the candidate against a constant scorer: in either model's
    roll-out, with the same exploration, the candidate's items are worth at least the
    current model's at every step, so both advantages are positive (the current model's
    roll-out gives the current's advantage over its shadow; its sign is turned)."""
    import recloop.loop.experiment as experiment
    from recloop.evaluation.worlds.base import build_world
    from recloop.evaluation.worlds.rollout import ConstantScorer, OracleScorer, Policy, Selection

    world = build_world("shop", ["n_items=60", "mechanics.horizon=5", "mechanics.sessions=2"])
    sel = Selection(kind="epsilon", epsilon=0.2)
    scorers = {"oracle": OracleScorer(world), "constant": ConstantScorer(world)}

    def make(world_: object, spec: str, selection: Selection) -> Policy:
        return Policy(name=spec, scorer=scorers[spec], selection=selection)  # type: ignore[arg-type]

    monkeypatch.setattr(experiment, "make_policy", make)
    truth = experiment.true_values(
        world, Path("oracle"), Path("constant"), users=80, sel=sel, seed=3, feedback="clicks"
    )
    assert truth.on_candidate_states.low > 0 and truth.on_current_states.low > 0
    assert truth.diff.value > 0
