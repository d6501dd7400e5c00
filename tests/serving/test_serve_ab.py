"""A/B serving: the hash split (weights, stability), the arm recorded in the answer, the
metrics and the served log, and the settings and CLI that configure it."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ServeFactory

from recloop.cli import main
from recloop.errors import ConfigError
from recloop.serving.ab import AbSplit, ArmConfig, parse_arm, user_unit
from recloop.serving.settings import ServeSettings
from recloop.streaming.log import BehaviorLog

USERS = [f"user-{i}" for i in range(20_000)]


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 3.0], [0.2, 0.3, 0.5], [5, 1, 1, 1]])
def test_the_split_gives_each_arm_its_weights_share(weights: list[float]) -> None:
    split = AbSplit(weights, salt="exp-1")
    counts = [0] * len(weights)
    for u in USERS:
        counts[split.assign(u)] += 1
    n, total = len(USERS), sum(weights)
    for c, w in zip(counts, weights, strict=True):
        p = w / total
        assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n), (counts, weights)


def test_the_split_is_stable_per_user_and_a_new_salt_reshuffles() -> None:
    a = AbSplit([1, 1], salt="exp-1")
    again = AbSplit([1, 1], salt="exp-1")  # another worker, another process: same answer
    other = AbSplit([1, 1], salt="exp-2")
    first = [a.assign(u) for u in USERS]
    assert first == [a.assign(u) for u in USERS] == [again.assign(u) for u in USERS]
    # independent of the last experiment: about half the users keep their arm
    same = sum(x == y for x, y in zip(first, (other.assign(u) for u in USERS), strict=True))
    assert abs(same / len(USERS) - 0.5) < 5 * math.sqrt(0.25 / len(USERS))
    # the hash is specified (blake2b-64 of salt NUL id), so any implementation can agree
    digest = hashlib.blake2b(b"exp-1\x00196", digest_size=8).digest()
    assert user_unit("196", "exp-1") == int.from_bytes(digest, "big") / 2**64


def test_moving_a_weight_moves_only_the_users_between_the_boundaries() -> None:
    before = AbSplit([0.5, 0.5], salt="s")
    after = AbSplit([0.6, 0.4], salt="s")
    moved = [u for u in USERS if before.assign(u) != after.assign(u)]
    assert all(before.assign(u) == 1 and after.assign(u) == 0 for u in moved)
    assert abs(len(moved) / len(USERS) - 0.1) < 0.01


def test_parse_arm_and_its_errors() -> None:
    arm = parse_arm("ctl=runs/a:b/artifact:0.25")
    assert (arm.name, arm.artifact, arm.weight) == ("ctl", Path("runs/a:b/artifact"), 0.25)
    for bad, msg in [
        ("runs/a:0.5", "NAME=PATH:WEIGHT"),
        ("a=runs/a", "NAME=PATH:WEIGHT"),
        ("a=runs/a:half", "weight 'half'"),
        ("a=runs/a:0", "weight"),
        ("a b=runs/a:1", "name"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            parse_arm(bad)


def test_settings_check_the_arms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    arms = [ArmConfig(name="A", artifact=a, weight=1), ArmConfig(name="B", artifact=b, weight=2)]
    s = ServeSettings(ab=arms)
    assert s.artifact == a  # the control arm's
    with pytest.raises(ValueError, match="at least two arms"):
        ServeSettings(ab=arms[:1])
    with pytest.raises(ValueError, match="used twice"):
        ServeSettings(ab=[arms[0], arms[0]])
    with pytest.raises(ValueError, match="first arm's"):
        ServeSettings(ab=arms, artifact=b)
    with pytest.raises(ValueError, match="registry"):
        ServeSettings(ab=arms, registry=tmp_path)
    # workers read the arms from the environment, as recloop serve writes them
    doc = [
        {"name": "A", "artifact": str(a), "weight": 1},
        {"name": "B", "artifact": str(b), "weight": 2, "policy": "softmax", "temperature": 0.5},
    ]
    monkeypatch.setenv("RECLOOP_AB", json.dumps(doc))
    monkeypatch.delenv("RECLOOP_ARTIFACT", raising=False)
    env = ServeSettings()  # type: ignore[call-arg]
    assert env.artifact == a and env.ab[1].policy == "softmax" and env.ab[1].weight == 2


def arm_settings(a: Path, b: Path, **arm_b: Any) -> dict[str, Any]:
    return {
        "ab": [
            ArmConfig(name="control", artifact=a, weight=1),
            ArmConfig(name="explore", artifact=b, weight=1, **arm_b),
        ],
        "ab_salt": "test",
    }


async def served_by_arm(
    serve: ServeFactory, a: Path, b: Path, users: list[str], **kw: Any
) -> tuple[list[dict[str, Any]], Any]:
    out = []
    async with serve(**arm_settings(a, b, policy="softmax", temperature=0.5), **kw) as (
        client,
        svc,
    ):
        for u in users:
            r = await client.post("/v1/recommend", json={"user_id": u, "n": 3})
            assert r.status_code == 200, r.text
            out.append(r.json())
        batch = await client.post(
            "/v1/recommend/batch", json={"requests": [{"user_id": u, "n": 2} for u in users]}
        )
        assert batch.status_code == 200
        out += batch.json()["results"]
        metrics = (await client.get("/metrics")).text
        arms = svc.arms
    return out, (arms, metrics)


async def test_each_user_gets_its_arms_model_and_policy_and_the_arm_is_logged(
    serve: ServeFactory, artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    users = ["u1", "u2", "u3", "u4", "u5", "stranger-1", "stranger-2", "stranger-3"]
    answers, (arms, metrics) = await served_by_arm(
        serve, artifact_dir, artifact_dir_b, users, database_url=url
    )
    split = AbSplit([1, 1], salt="test")
    expect = {u: ["control", "explore"][split.assign(u)] for u in users}
    assert {"control", "explore"} == set(expect.values())  # both arms are exercised
    version = {a.name: a.model.model_version for a in arms}
    assert version["control"] != version["explore"]
    for u, body in zip(users * 2, answers, strict=True):
        assert body["arm"] == expect[u]
        assert body["model_version"] == version[body["arm"]]
        if body["source"] == "policy":
            # the explore arm's own policy; the control keeps the service's (topk)
            want = "softmax" if body["arm"] == "explore" else "topk"
            assert body["policy"]["name"] == want
            if want == "softmax":
                assert body["policy"]["temperature"] == 0.5
    n_explore = sum(v == "explore" for v in expect.values()) * 2
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('recloop_ab_lists_total{arm="explore"')
    )
    assert total == n_explore
    log = BehaviorLog(url)
    rows = log.read_served()
    log.dispose()
    logged = dict(zip(rows["recommendation_id"], rows["arm"], strict=True))
    assert {b["recommendation_id"]: b["arm"] for b in answers} == logged


async def test_reload_switches_the_control_arm_only(
    serve: ServeFactory, artifact_dir: Path, artifact_dir_b: Path
) -> None:
    async with serve(**arm_settings(artifact_dir, artifact_dir_b)) as (_, svc):
        before = [a.model.model_version for a in svc.arms]
        await svc.reload(artifact_dir_b)
        after = [a.model.model_version for a in svc.arms]
        assert after == [before[1], before[1]]
        assert [a.name for a in svc.arms] == ["control", "explore"]


@pytest.mark.integration
async def test_the_arm_reaches_postgresql(
    serve: ServeFactory, artifact_dir: Path, artifact_dir_b: Path, postgres_url: str
) -> None:
    prefix = f"rlt{uuid.uuid4().hex[:10]}_"
    users = ["u1", "u2", "u3", "stranger-9"]
    answers, _ = await served_by_arm(
        serve, artifact_dir, artifact_dir_b, users, database_url=postgres_url, table_prefix=prefix
    )
    log = BehaviorLog(postgres_url, prefix=prefix)
    try:
        rows = log.read_served()
        logged = dict(zip(rows["recommendation_id"], rows["arm"], strict=True))
        assert {b["recommendation_id"]: b["arm"] for b in answers} == logged
    finally:
        log.drop_schema()
        log.dispose()


@pytest.fixture
def keep_log_level() -> Iterator[None]:
    """main() sets the recloop logger's level; later tests count the records they catch."""
    logger = logging.getLogger("recloop")
    level = logger.level
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("keep_log_level")
def test_serve_cli_refuses_bad_arms_before_serving(
    artifact_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--ab", f"a={artifact_dir}:1"]) == 2
    assert "at least two arms" in capsys.readouterr().err
    assert main(["serve", str(artifact_dir), "--ab", f"a={artifact_dir}:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve", "--ab", f"a={artifact_dir}:1", "--ab", "b=/nonexistent:1"]) == 2
    assert "nonexistent" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "--ab" in capsys.readouterr().err
