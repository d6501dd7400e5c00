"""Rounds of the controller on a SQLite behaviour log, in process."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from loop_helpers import append_events, tiny_config, walk_events

from recloop.artifacts.bundle import load_artifact
from recloop.artifacts.registry import ArtifactRegistry
from recloop.loop import controller as controller_mod
from recloop.loop.config import LoopConfig
from recloop.loop.controller import LoopController, LoopError


@pytest.fixture
def loop(tmp_path: Path) -> LoopController:
    append_events(f"sqlite:///{tmp_path / 'log.db'}", walk_events(steps=range(0, 10)))
    return LoopController(tiny_config(tmp_path))


def _rounds(c: LoopController) -> list[str]:
    return sorted(p.name for p in (c.workdir / "rounds").iterdir())


def test_rounds_promote_warm_start_and_never_retrain_a_window(
    loop: LoopController, tmp_path: Path
) -> None:
    first = loop.run_once()
    assert first.status == "promoted", first.reason
    assert "vs popularity" in first.reason
    reg = ArtifactRegistry(tmp_path / "registry")
    assert reg.current() == first.version
    lineage = reg.entries()[0].lineage
    assert lineage["parent"] is None and lineage["decision"] == "promote"
    w = lineage["window"]
    assert (w["first_event_ts"], w["last_event_ts"], w["events"]) == (1_000_000, 1_000_555, 160)
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["watermark"] == {"ts": 1_000_555, "events": 160} and state["pending"] is None

    again = loop.run_once()
    assert again.status == "skipped" and again.reason == "no new events since the last window"

    append_events(loop.cfg.database_url, walk_events(steps=range(10, 13)))
    second = loop.run_once()
    assert second.status in ("promoted", "published")
    assert second.parent == first.version
    assert second.warm_start["shared_items"] > 0 and second.warm_start["rows"]
    w2 = second.window
    assert w2["events"] == 208 and w2["holdout_floor"] == w["holdout_start"]
    # no event of the new holdout reached the current model's training
    assert w2["holdout_start"] >= w["holdout_start"]
    assert "vs current" in second.reason and "OPE dr difference" in second.reason
    assert second.gate["ope"]["behaviour"] == "fitted"
    entry = {e.version: e for e in reg.entries()}[second.version]
    assert entry.lineage["parent"] == first.version
    assert entry.lineage["gate"]["baseline_name"] == "current"


def test_a_failed_round_leaves_current_and_state_alone(
    loop: LoopController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = loop.run_once()
    state_before = (loop.workdir / "state.json").read_text()
    append_events(loop.cfg.database_url, walk_events(steps=range(10, 12)))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(controller_mod, "gate", broken)
    with pytest.raises(LoopError, match="round failed at gate: RuntimeError: disk on fire"):
        loop.run_once()
    reg = ArtifactRegistry(tmp_path / "registry")
    assert reg.current() == first.version
    load_artifact(reg.current_path())
    assert (loop.workdir / "state.json").read_text() == state_before
    monkeypatch.undo()
    assert loop.run_once().status in ("promoted", "published")  # retried next round


def test_a_crash_mid_publish_is_finished_without_training_again(
    loop: LoopController, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = loop.run_once()
    append_events(loop.cfg.database_url, walk_events(steps=range(10, 13)))
    reg = ArtifactRegistry(tmp_path / "registry")

    class Crash(BaseException):
        """Stands for kill -9: nothing after it runs, no handler catches it."""

    def crash(step: str, workdir: Path) -> None:
        if step == "promote":
            raise Crash

    monkeypatch.setattr(controller_mod, "hook", crash)
    with pytest.raises(Crash):
        loop.run_once()
    monkeypatch.undo()
    pending = json.loads((loop.workdir / "state.json").read_text())["pending"]
    assert pending is not None and pending["parent"] == first.version
    assert reg.current() == first.version  # published, not yet promoted
    n_rounds = len(_rounds(loop))

    restarted = LoopController(loop.cfg)
    done = restarted.run_once()
    assert done.status.startswith("resumed-")
    assert done.version == pending["version"]
    assert len(_rounds(restarted)) == n_rounds  # nothing was trained
    if pending["promote"]:
        assert reg.current() == pending["version"]
    state = json.loads((loop.workdir / "state.json").read_text())
    assert state["pending"] is None and state["watermark"]["events"] == 208
    assert restarted.run_once().status == "skipped"
    assert [h["action"] for h in reg.history()].count("publish") == 2


def test_sliding_window_trains_on_the_last_days_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    append_events(url, walk_events(steps=range(0, 10)))
    # 10 minutes = 0.00694 days: steps 0..9 are one minute apart, keep about the last 10 min
    c = LoopController(tiny_config(tmp_path, window="sliding", window_days=8 / 1440))
    r = c.run_once()
    assert r.window["kind"] == "sliding"
    assert r.window["first_event_ts"] > 1_000_000
    assert r.window["events"] < 160


def test_the_long_running_loop_logs_a_failure_and_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    append_events(f"sqlite:///{tmp_path / 'log.db'}", walk_events(steps=range(0, 10)))
    c = LoopController(tiny_config(tmp_path, poll_seconds=0.01))
    real_gate = controller_mod.gate
    calls: list[int] = []

    def flaky(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("registry disk unavailable")
        return real_gate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(controller_mod, "gate", flaky)
    c.run_forever(max_rounds=3)
    assert len(calls) == 2  # failed, retried and promoted, then nothing new to do
    assert "round failed at gate: OSError: registry disk unavailable" in caplog.text
    assert ArtifactRegistry(tmp_path / "registry").current() is not None


def _served(url: str, rows: list[tuple[str, int, str, float]]) -> None:
    """Settled impressions (user, ts, model version, reward) in the served-items table."""
    import sqlite3

    con = sqlite3.connect(url.removeprefix("sqlite:///"))
    con.execute(
        "CREATE TABLE IF NOT EXISTS served_items (recommendation_id TEXT, position INTEGER, "
        "user_id TEXT, item_id TEXT, ts INTEGER, model_version TEXT, policy TEXT, "
        "propensity REAL, reward REAL, settled BOOLEAN)"
    )
    con.executemany(
        "INSERT INTO served_items (recommendation_id, position, user_id, item_id, ts, "
        "model_version, policy, source, propensity, reward, settled) "
        "VALUES (?, 0, ?, 'i1', ?, ?, 'topk', 'policy', 1.0, ?, 1)",
        [(uuid.uuid4().hex, u, ts, v, r) for u, ts, v, r in rows],
    )
    con.commit()
    con.close()


def _canary_loop(tmp_path: Path) -> tuple[str, LoopController, Any, ArtifactRegistry]:
    """A loop with canaries (margin 10, and OPE warnings do not count with a canary: every
    candidate passes the gate) whose first model is current, and new events for a second
    round."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    append_events(url, walk_events(steps=range(0, 10)))
    loop = LoopController(tiny_config(tmp_path, canary_share=0.5, margin=10.0))
    first = loop.run_once()
    assert first.status == "promoted"  # the first model: nothing to compare a canary with
    append_events(url, walk_events(steps=range(10, 13)))
    return url, loop, first, ArtifactRegistry(tmp_path / "registry")


@pytest.mark.parametrize(("canary_reward", "verdict"), [(2.0, "promote"), (0.2, "stop")])
def test_a_candidate_that_passes_the_gate_serves_as_a_canary_first(
    tmp_path: Path, canary_reward: float, verdict: str
) -> None:
    from recloop.serving.ab import AbSplit

    url, loop, first, reg = _canary_loop(tmp_path)
    _served(url, [("w0", 1_000_999, first.version, 5.0)])  # served, not yet settled in a round
    second = loop.run_once()
    assert second.status == "canary", second.reason
    assert reg.current() == first.version
    canary = reg.canary()
    assert canary is not None and canary.version == second.version
    assert (canary.parent, canary.share) == (first.version, 0.5)
    # the newest served list when it started (after the round's watermark, 1_000_735): what
    # was served before the canary never counts
    assert canary.since_ts == 1_000_999 and canary.salt == f"canary-{canary.version}-1000999"

    # no new events: no round is due, and the canary is not even judged
    idle = loop.run_once()
    assert idle.status == "skipped" and loop.canary_verdict == {} and reg.canary() == canary

    # nobody served yet: the next run waits and trains nothing
    append_events(url, walk_events(steps=range(13, 15)))
    waiting = loop.run_once()
    assert waiting.status == "canary-waiting" and waiting.version is None
    assert reg.canary() == canary

    split = AbSplit([0.5, 0.5], salt=canary.salt)
    rows = []
    for i in range(120):
        u = f"v{i}"
        mine = split.assign(u) == 1
        rows.append(
            (u, canary.since_ts + 1 + i, canary.version if mine else canary.parent,
             canary_reward if mine else 1.0)
        )  # fmt: skip
    _served(url, [(u, canary.since_ts - 5, canary.parent, 9.0) for u, *_ in rows[:5]] + rows)
    judged = loop.run_once()
    assert judged.canary["decision"] == verdict, judged.canary
    assert judged.canary["users_canary"] + judged.canary["users_current"] == 120
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["last_canary"]["decision"] == verdict
    assert state["last_canary"]["impressions_by_other_version"] == 0
    assert reg.current() == (canary.version if verdict == "promote" else first.version)
    # the run went on to train the new events' window, gated against the new current, and
    # its candidate (margin 10: it passes) is the next canary
    assert judged.status == "canary" and judged.parent == reg.current()
    now = reg.canary()
    assert now is not None and now.version == judged.version != canary.version
    actions = [h["action"] for h in reg.history()]
    assert "canary-start" in actions
    assert ("canary-stop" in actions) == (verdict == "stop")


@pytest.mark.parametrize("stopped_by_hand", [False, True])
def test_a_crash_after_the_canary_started_neither_starts_it_twice_nor_revives_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped_by_hand: bool
) -> None:
    _, loop, first, reg = _canary_loop(tmp_path)

    class Crash(BaseException):
        """Stands for kill -9 right after the pointer was written."""

    real = ArtifactRegistry.start_canary

    def start_then_crash(self: ArtifactRegistry, *a: object, **kw: object) -> object:
        real(self, *a, **kw)  # type: ignore[arg-type]
        raise Crash

    monkeypatch.setattr(ArtifactRegistry, "start_canary", start_then_crash)
    with pytest.raises(Crash):
        loop.run_once()
    monkeypatch.undo()
    started = reg.canary()
    assert started is not None and reg.current() == first.version
    if stopped_by_hand:
        reg.stop_canary(reason="by hand, while the controller was down")
    done = LoopController(loop.cfg).run_once()
    assert done.status == "resumed-canary" and done.version == started.version
    assert reg.current() == first.version
    assert reg.canary() == (None if stopped_by_hand else started)
    assert [h["action"] for h in reg.history()].count("canary-start") == 1


def test_a_canary_needs_the_served_items_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    append_events(url, walk_events(steps=range(0, 10)))
    loop = LoopController(tiny_config(tmp_path, canary_share=0.1, served_table="nope"))
    with pytest.raises(LoopError, match=r"canary_share 0\.1 needs the served-items table 'nope'"):
        loop.run_once()
    assert ArtifactRegistry(tmp_path / "registry").current() is None  # nothing trained


def test_an_operators_canary_started_during_training_stands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from recloop.algos.popularity import PopularityConfig
    from recloop.data.dataset import PreparedDataset

    _, loop, first, reg = _canary_loop(tmp_path)
    rec = PopularityConfig().create()
    rec.fit(
        PreparedDataset.from_arrays(
            user=np.array([1, 1, 2]), item=np.array([1, 2, 2]), timestamp=np.array([0, 1, 0])
        )
    )
    theirs = reg.publish(rec.save(tmp_path / "operator"))
    started: list[object] = []

    def meanwhile(step: str, workdir: Path) -> None:
        # after the gate, before the loop touches the registry: the operator starts a canary
        if step == "publish" and not started:
            started.append(reg.start_canary(theirs, share=0.3, since_ts=1, reason="by hand"))

    monkeypatch.setattr(controller_mod, "hook", meanwhile)
    done = loop.run_once()
    assert done.status == "published" and "not started as a canary" in done.reason
    assert reg.canary() == started[0] and reg.current() == first.version


def test_rounds_on_an_s3_registry_publish_promote_and_warm_start(
    tmp_path: Path, s3_url: str
) -> None:
    """The controller on ``registry: s3://...``: the same rounds, the current version read
    back (downloaded) for the second round's warm start and gate."""
    append_events(f"sqlite:///{tmp_path / 'log.db'}", walk_events(steps=range(0, 10)))
    loop = LoopController(tiny_config(tmp_path, registry=s3_url))
    first = loop.run_once()
    assert first.status == "promoted", first.reason
    reg = ArtifactRegistry(s3_url)
    assert reg.current() == first.version and not (tmp_path / "registry").exists()
    append_events(loop.cfg.database_url, walk_events(steps=range(10, 13)))
    second = loop.run_once()
    assert second.status in ("promoted", "published") and second.parent == first.version
    assert second.warm_start["shared_items"] > 0 and "vs current" in second.reason
    entry = {e.version: e for e in reg.entries()}[second.version]
    assert entry.lineage["parent"] == first.version and entry.location.startswith(s3_url)
    assert [h["action"] for h in reg.history()][:2] == ["publish", "promote"]


@pytest.mark.parametrize(
    ("trusted", "canary", "bound"),
    [(None, 0.0, None), (False, 0.0, None), (False, 0.0, False), (None, 0.5, None)],
)
def test_the_gate_acts_only_on_trusted_ope_unless_told_otherwise_or_a_canary_judges(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trusted: bool | None,
    canary: float,
    bound: bool | None,
) -> None:
    """The behaviour log (``source: events``) has no logged propensities: its OPE is on
    fitted ones, where the outer check bounds nothing; by default it is off there, its
    flagged interval reported, not gating."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    append_events(url, walk_events(steps=range(0, 10)))
    over: dict[str, Any] = {} if trusted is None else {"ope_require_trusted": trusted}
    over["ope_min_ess"] = 12.5
    over["canary_share"] = canary
    if bound is not None:
        over["ope_bound_bias"] = bound
    loop = LoopController(tiny_config(tmp_path, **over))
    assert loop.run_once().status == "promoted"
    append_events(url, walk_events(steps=range(10, 13)))
    real_gate = controller_mod.gate
    seen: list[object] = []

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((kwargs["require_trusted"], kwargs["min_ess"], kwargs["bound_bias"]))
        return real_gate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(controller_mod, "gate", spy)
    second = loop.run_once()
    required = trusted is None and not canary  # the default, unless a canary judges
    # the outer check is off by default on fitted propensities (and with a canary)
    bounded = False
    assert seen == [(required, 12.5, bounded)]
    # this tiny log's estimates carry warnings: they keep the candidate out only when required
    assert "OPE untrusted" in second.reason if required else "OPE warnings" in second.reason
    assert "outer check needs logged propensities" in second.reason
    assert ("logged propensities (source: impressions) (not gating)" in second.reason) is (
        not bounded
    )
    assert second.status == ("published" if required else "canary" if canary else "promoted")
    gate_doc = ArtifactRegistry(tmp_path / "registry").entries()[-1].lineage["gate"]
    assert gate_doc["ope"]["require_trusted"] is required, second.reason
    assert gate_doc["ope"]["min_ess"] == 12.5
    assert gate_doc["ope"]["bound_bias"] is bounded
    assert "outer_propensities_not_logged" in gate_doc["ope"]["outer"]["flags"]
    defaults = {f.name: f.default for f in dataclasses.fields(LoopConfig)}
    assert defaults["ope_require_trusted"] is True and defaults["ope_min_ess"] == 30.0
    assert defaults["ope_bound_bias"] is None  # on with logged propensities (below)


def test_open_impressions_do_not_make_the_same_settled_window_due_again(tmp_path: Path) -> None:
    """``source: impressions`` reads settled impressions only, and its watermark is the
    newest settled one; a live service always has newer open ones.  They must not count as
    new: the second poll, with nothing newly settled, trains nothing."""
    import sqlite3

    import numpy as np

    url = f"sqlite:///{tmp_path / 'log.db'}"
    rng = np.random.default_rng(0)
    rows = [
        (
            f"u{u}",
            f"i{int(rng.integers(1, 20))}",
            1_000_000 + 10 * t + u,
            float(rng.integers(0, 2)),
            1,
        )
        for t in range(20)
        for u in range(12)
    ]
    rows.append(("u1", "i3", 2_000_000, None, 0))  # a list still open: no reward yet
    con = sqlite3.connect(tmp_path / "log.db")
    con.execute(
        "CREATE TABLE served_items (recommendation_id TEXT, position INTEGER, user_id TEXT, "
        "item_id TEXT, ts INTEGER, model_version TEXT, policy TEXT, source TEXT, "
        "propensity REAL, reward REAL, settled BOOLEAN, temperature REAL, epsilon REAL)"
    )
    con.executemany(
        "INSERT INTO served_items VALUES (?, 0, ?, ?, ?, 'v0', 'topk', 'policy', 1.0, ?, ?, "
        "NULL, NULL)",
        [(uuid.uuid4().hex, *r) for r in rows],
    )
    con.commit()
    con.close()
    loop = LoopController(tiny_config(tmp_path, source="impressions"))
    assert loop.cfg.database_url == url
    first = loop.run_once()
    assert first.status in ("promoted", "published"), first.reason
    again = loop.run_once()
    assert again.status == "skipped" and "no new events" in again.reason
    assert len(list((loop.workdir / "rounds").iterdir())) == 1


class _Crash(BaseException):
    """A kill -9: nothing after it runs."""


def test_a_restarted_controller_leaves_an_operators_rollback_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its promotion moved the pointer, before state.json says so; the operator
    rolls back while it is down.  On restart the history shows the round's promotion was
    done: the rollback stands."""
    url = f"sqlite:///{tmp_path / 'log.db'}"
    append_events(url, walk_events(steps=range(0, 10)))
    loop = LoopController(tiny_config(tmp_path))
    first = loop.run_once()
    assert first.status == "promoted"
    append_events(url, walk_events(steps=range(10, 13)))
    real_gate = controller_mod.gate
    monkeypatch.setattr(
        controller_mod,
        "gate",
        lambda *a, **k: dataclasses.replace(real_gate(*a, **k), promote=True),
    )
    real_promote = ArtifactRegistry.promote

    def promote_then_die(self: ArtifactRegistry, *a: Any, **k: Any) -> bool:
        real_promote(self, *a, **k)
        raise _Crash

    monkeypatch.setattr(ArtifactRegistry, "promote", promote_then_die)
    with pytest.raises(_Crash):
        loop.run_once()
    monkeypatch.undo()
    reg = ArtifactRegistry(tmp_path / "registry")
    bad = reg.current()
    assert bad != first.version
    assert reg.rollback(reason="operator: the new model is bad") == first.version
    done = LoopController(loop.cfg).run_once()
    assert done.status == "resumed-published" and "rolled back since: left" in done.reason
    assert reg.current() == first.version
    assert [h["action"] for h in reg.history()][-2:] == ["promote", "rollback"]
    # and a resumed promotion that had not happened still happens
    assert LoopController(loop.cfg).read_state()["pending"] is None


def test_the_outer_check_is_refused_where_it_could_never_pass() -> None:
    """On by default with the served-items table's logged propensities, off with the
    behaviour log's fitted ones, and refused there when asked for."""
    from recloop.errors import ConfigError

    base = {
        "database_url": "sqlite://", "registry": "r", "workdir": "w", "algo": "popularity",
        "every_events": 1,
    }  # fmt: skip
    assert LoopConfig(**base, source="impressions").bound_bias
    assert not LoopConfig(**base).bound_bias
    assert not LoopConfig(**base, source="impressions", ope_bound_bias=False).bound_bias
    with pytest.raises(ConfigError, match="ope_bound_bias: true needs source: impressions"):
        LoopConfig(**base, ope_bound_bias=True)
    assert LoopConfig(**base, ope_bound_bias=True, use_ope=False).bound_bias  # no OPE: moot
