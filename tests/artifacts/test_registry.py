"""The artifact registry: publish, promote, rollback, and crashes that leave it consistent."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from recloop.algos.popularity import PopularityConfig
from recloop.artifacts.registry import ArtifactRegistry
from recloop.cli import main
from recloop.data.dataset import PreparedDataset
from recloop.errors import ArtifactError


def _artifact(tmp: Path, seed: int) -> Path:
    """A popularity artifact; the seed changes the counts, and so the model version."""
    rng = np.random.default_rng(seed)
    ds = PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, 7), 5),
        item=rng.integers(1, 9, 30),
        timestamp=np.tile(np.arange(5), 6),
        n_items=8,
        user_ids=[f"u{i}" for i in range(1, 7)],
        item_ids=[f"i{i}" for i in range(1, 9)],
    )
    rec = PopularityConfig().create()
    rec.fit(ds)
    return rec.save(tmp / f"run{seed}")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("reg")
    return [_artifact(tmp, s) for s in (0, 1, 2)]


@pytest.fixture(params=["dir", "s3"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A registry in a directory, or in a bucket (tests/artifacts/test_registry_s3.py)."""
    return str(tmp_path / "reg") if request.param == "dir" else request.getfixturevalue("s3_url")


def test_publish_promote_rollback(where: str, tmp_path: Path, artifacts: list[Path]) -> None:
    reg = ArtifactRegistry(where)
    assert reg.current() is None and reg.entries() == [] and reg.history() == []
    a = reg.publish(artifacts[0], promote=True, lineage={"window": [0, 10]})
    b = reg.publish(artifacts[1], parent=a)
    assert a != b and reg.current() == a
    assert reg.publish(artifacts[1]) == b  # publishing again keeps the first copy
    reg.promote(b, reason="better")
    path = reg.current_path()  # on S3: downloaded into the cache
    local = tmp_path / ("reg/versions" if where.endswith("/reg") else "registry-cache")
    assert reg.current() == b and path.name == b and path.is_relative_to(local)
    assert (path / "manifest.json").read_bytes() == (artifacts[1] / "manifest.json").read_bytes()
    c = reg.publish(artifacts[2], promote=True)
    assert reg.rollback(reason="worse") == b
    assert reg.rollback() == a
    with pytest.raises(ArtifactError, match="no earlier version"):
        reg.rollback()
    entries = {e.version: e for e in reg.entries()}
    assert set(entries) == {a, b, c} and entries[a].current
    assert entries[a].lineage["window"] == [0, 10] and entries[b].lineage["parent"] == a
    assert entries[a].location == f"{where}/versions/{a}"
    actions = [h["action"] for h in reg.history()]
    assert actions == ["publish", "promote", "publish", "promote", "publish", "promote",
                       "rollback", "rollback"]  # fmt: skip


def test_refuses_unknown_versions_and_damaged_artifacts(
    tmp_path: Path, artifacts: list[Path]
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    with pytest.raises(ArtifactError, match="no published version"):
        reg.promote("nope")
    with pytest.raises(ArtifactError, match="no published version"):
        reg.promote("../versions")
    bad = tmp_path / "bad"
    shutil.copytree(artifacts[0], bad)
    (bad / "manifest.json").write_text("[]")
    with pytest.raises(ArtifactError):
        reg.publish(bad)
    assert not (tmp_path / "reg" / "versions").exists() or not any(
        p for p in (tmp_path / "reg" / "versions").iterdir() if not p.name.startswith(".")
    )


def test_crash_mid_publish_leaves_no_version(
    tmp_path: Path, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)

    def die(*args: object) -> None:
        raise KeyboardInterrupt  # the process dies between the copy and the rename

    monkeypatch.setattr(os, "rename", die)
    with pytest.raises(KeyboardInterrupt):
        reg.publish(artifacts[1], promote=True)
    monkeypatch.undo()
    assert reg.current() == a
    assert [e.version for e in reg.entries()] == [a]  # the half copy is not a version
    b = reg.publish(artifacts[1], promote=True)  # a restart publishes it again
    assert reg.current() == b


def test_crash_mid_promote_keeps_the_old_pointer(
    tmp_path: Path, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    real_replace = os.replace

    def die(src: object, dst: object) -> None:
        raise KeyboardInterrupt  # the temporary pointer is written, the switch never happens

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        reg.promote(b)
    monkeypatch.setattr(os, "replace", real_replace)
    assert reg.current() == a
    assert json.loads((tmp_path / "reg" / "current.json").read_text())["version"] == a


def test_cli(tmp_path: Path, artifacts: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "reg")

    def run(*args: str) -> str:
        code = main(["-q", "registry", *args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    a = run("publish", root, str(artifacts[0]), "--promote").split()[0]
    b = run("publish", root, str(artifacts[1])).strip()
    assert f"* {a}" in run("list", root)
    assert run("promote", root, b).strip() == b
    doc = json.loads(run("list", root, "--json"))
    assert [d["current"] for d in doc] == [False, True] and doc[1]["parent"] == a
    assert run("rollback", root).strip() == a


def test_rollback_after_a_repeated_promotion_never_goes_forward(
    tmp_path: Path, artifacts: list[Path]
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    x = reg.publish(artifacts[0], promote=True)
    a = reg.publish(artifacts[1], promote=True)
    reg.promote(a, reason="again")
    assert reg.rollback() == x
    with pytest.raises(ArtifactError, match="no earlier version"):
        reg.rollback()


def test_rollback_needs_only_the_pointer(tmp_path: Path, artifacts: list[Path]) -> None:
    """The history is an audit trail: losing it (or a line of it) changes no rollback."""
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1], promote=True)
    reg.publish(artifacts[2], promote=True)
    assert reg.rollback() == b
    (tmp_path / "reg" / "history.jsonl").unlink()
    assert reg.rollback() == a


def test_a_canary_starts_beside_current_and_ends_at_a_stop_promotion_or_rollback(
    tmp_path: Path, artifacts: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0])
    b = reg.publish(artifacts[1])
    with pytest.raises(ArtifactError, match="needs a current version"):
        reg.start_canary(b, share=0.2, since_ts=5)
    reg.promote(a)
    with pytest.raises(ArtifactError, match="already current"):
        reg.start_canary(a, share=0.2, since_ts=5)
    with pytest.raises(ArtifactError, match=r"share must lie in \(0, 1\), got 1"):
        reg.start_canary(b, share=1.0, since_ts=5)
    with pytest.raises(ArtifactError, match="no published version 'nope'"):
        reg.start_canary("nope", share=0.2, since_ts=5)
    assert reg.canary() is None
    c = reg.start_canary(b, share=0.2, since_ts=5, reason="gate passed")
    got = reg.canary()
    assert got == c and (got.version, got.parent, got.share, got.since_ts) == (b, a, 0.2, 5)
    assert got.salt.startswith(f"canary-{b}-") and reg.current() == a  # current unchanged
    pointer = json.loads((tmp_path / "reg" / "current.json").read_text())
    assert pointer["canary"]["version"] == b and pointer["stack"] == [a]
    assert main(["registry", "list", str(tmp_path / "reg")]) == 0
    assert f"~ {b}" in capsys.readouterr().out
    assert reg.stop_canary(reason="worse online") == c
    assert reg.canary() is None and reg.stop_canary() is None and reg.current() == a
    reg.start_canary(b, share=0.2, since_ts=5)
    reg.promote(b, reason="canary better")  # a promotion ends the canary
    assert reg.canary() is None and reg.current() == b
    reg.start_canary(a, share=0.5, since_ts=9)
    reg.rollback()  # so does a rollback
    assert reg.canary() is None and reg.current() == a
    actions = [h["action"] for h in reg.history()]
    assert actions[-6:] == ["canary-start", "canary-stop", "canary-start", "promote",
                            "canary-start", "rollback"]  # fmt: skip
    # the command line
    assert main(["registry", "canary", str(tmp_path / "reg"), b, "--share", "0.3"]) == 0
    assert reg.canary() is not None and reg.canary().share == 0.3  # type: ignore[union-attr]
    assert main(["registry", "canary", str(tmp_path / "reg"), "--stop"]) == 0
    assert reg.canary() is None


def test_an_unreadable_canary_field_is_named(tmp_path: Path, artifacts: list[Path]) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    (tmp_path / "reg" / "current.json").write_text(
        json.dumps({"version": a, "canary": {"version": "x"}})
    )
    with pytest.raises(ArtifactError, match=r"current\.json: unreadable field 'canary'"):
        reg.canary()


def test_a_verdict_acts_only_on_the_canary_it_judged(tmp_path: Path, artifacts: list[Path]) -> None:
    """A controller's verdict must not undo what an operator did meanwhile."""
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    c = reg.publish(artifacts[2])
    judged = reg.start_canary(b, share=0.5, since_ts=0)
    reg.stop_canary(reason="by hand")
    assert not reg.finish_canary(judged, promote=True)  # stopped meanwhile: no promotion
    assert reg.current() == a and reg.canary() is None
    again = reg.start_canary(b, share=0.5, since_ts=0)
    assert again is not None and again.salt == judged.salt  # the same log position
    assert not reg.finish_canary(judged, promote=True)  # the same version, another canary
    later = reg.start_canary(b, share=0.5, since_ts=5)
    assert later is not None and later.salt != judged.salt  # later in the log: new users
    reg.promote(c, reason="by hand")
    assert not reg.finish_canary(later, promote=False)  # current moved
    assert reg.current() == c
    last = reg.start_canary(b, share=0.5, since_ts=0)
    assert reg.finish_canary(last, promote=True, reason="better")
    assert reg.current() == b and reg.canary() is None
    assert [h["action"] for h in reg.history()][-2:] == ["canary-start", "promote"]


def test_the_loops_conditional_start_and_promote_leave_an_operators_change_alone(
    tmp_path: Path, artifacts: list[Path]
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    c = reg.publish(artifacts[2])
    mine = reg.start_canary(c, share=0.2, since_ts=7, reason="by hand")
    assert mine is not None and mine.salt == f"canary-{c}-7"
    # the loop's candidate: a canary runs, so it does not start
    assert reg.start_canary(b, share=0.5, since_ts=9, expect_current=a) is None
    assert reg.canary() == mine
    # by hand a new canary replaces the running one, and the history says so
    theirs = reg.start_canary(b, share=0.5, since_ts=9, tag="r1")
    assert theirs is not None and reg.canary() == theirs
    lines = reg.history()[-2:]
    assert [h["action"] for h in lines] == ["canary-stop", "canary-start"]
    assert lines[0]["version"] == c and "replaced by canary" in lines[0]["reason"]
    assert (lines[1]["salt"], lines[1]["since_ts"], lines[1]["tag"]) == (theirs.salt, 9, "r1")
    reg.stop_canary()
    assert reg.start_canary(b, share=0.5, since_ts=9, expect_current=c) is None  # c is not current
    assert not reg.promote(b, expect_current=c)  # the current version moved: nothing changes
    assert reg.current() == a
    assert reg.promote(b, expect_current=a) and reg.current() == b


def test_pointer_changes_wait_for_the_registry_lock(tmp_path: Path, artifacts: list[Path]) -> None:
    """A verdict in one process and a command in another never interleave their
    read-modify-write of current.json: each holds an exclusive lock on REGISTRY/.lock."""
    import threading

    reg = ArtifactRegistry(tmp_path / "reg")
    reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    reg.start_canary(b, share=0.5, since_ts=0)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with ArtifactRegistry(tmp_path / "reg").storage.lock():  # as another process would
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    stopper = threading.Thread(target=lambda: reg.stop_canary(reason="operator"))
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive() and reg.canary() is not None  # blocked behind the lock
    release.set()
    stopper.join(10)
    holder.join(10)
    assert not stopper.is_alive() and reg.canary() is None


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_one(
    tmp_path: Path, artifacts: list[Path]
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    with open(tmp_path / "reg" / "history.jsonl", "a") as f:
        f.write('{"at": "2026-12-07T00:00:00", "action": "prom')  # killed mid-write
    reg.promote(b, reason="after the crash")
    assert [h["action"] for h in reg.history()] == ["publish", "promote", "publish", "promote"]
    assert reg.history()[-1]["version"] == b and reg.current() == b != a


def test_a_change_made_whose_history_line_fails_is_reported_done(
    tmp_path: Path, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The pointer moved: the caller is told so (a retry would promote twice), and the lost
    history line is logged as an error."""
    reg = ArtifactRegistry(tmp_path / "reg")
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])

    def full(line: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reg.storage, "append_history", full)
    assert reg.promote(b, reason="better") is True
    assert reg.current() == b != a
    assert "promote is done, but its history line could not be written" in caplog.text


def test_a_promotion_tagged_with_its_round_says_so_in_the_history(
    tmp_path: Path, artifacts: list[Path]
) -> None:
    reg = ArtifactRegistry(tmp_path / "reg")
    reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    assert reg.promote(b, reason="r", tag="round-7")
    assert reg.history()[-1]["tag"] == "round-7"
    c = reg.publish(artifacts[2])
    assert reg.promote(c) and "tag" not in reg.history()[-1]


def test_a_published_version_is_on_disk_before_anything_can_name_it(
    tmp_path: Path, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file and directory of the version is fsynced before its rename, and the rename
    after it, so a power cut cannot leave the (synced) pointer naming empty files."""
    import os

    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    reg = ArtifactRegistry(tmp_path / "reg")
    version = reg.publish(artifacts[0])
    final = tmp_path / "reg" / "versions" / version
    tmp_dirs = {Path(p).parent for p in synced if "/.tmp-" in p and not p.endswith(".tmp")}
    (tmp,) = {d for d in tmp_dirs if d.name.startswith(".tmp-")}
    files = sorted(p.relative_to(final) for p in final.rglob("*") if p.is_file())
    assert files and all(str(tmp / f) in synced for f in files)
    assert str(tmp) in synced  # the directory's entries
    assert str(final.parent) in synced  # and the rename
