"""``recloop experiment``: arms, the result's shapes, and a tiny run end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from recloop.cli import main
from recloop.errors import ConfigError
from recloop.evaluation.worlds.rollout import Estimate
from recloop.loop.experiment import (
    CSV_FIELDS,
    ArmRound,
    ExperimentConfig,
    ExperimentResult,
    GateCheck,
    compare_last_round,
    parse_arms,
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
    with pytest.raises(ConfigError, match="unknown algorithm 'nope'"):
        parse_arms("nope", epsilon=0.1)
    with pytest.raises(ConfigError, match="distinct"):
        parse_arms("cql,cql", epsilon=0.1)
    with pytest.raises(ConfigError, match="not field=value"):
        parse_arms("cql:lr", epsilon=0.1)


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
            "--session-pause", "1", "--json",
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
