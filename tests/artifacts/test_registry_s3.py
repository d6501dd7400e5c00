"""The artifact registry on S3 (moto's server, or RECLOOP_S3_ENDPOINT): the directory
registry's behaviour, races settled by conditional writes, crashes, and downloads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_registry import _artifact

from recloop.artifacts.registry import ArtifactRegistry
from recloop.artifacts.s3 import S3Storage, parse_s3_url
from recloop.cli import main
from recloop.errors import ArtifactError, ConfigError

pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("reg-s3")
    return [_artifact(tmp, s) for s in (0, 1, 2)]


def _storage(reg: ArtifactRegistry) -> S3Storage:
    assert isinstance(reg.storage, S3Storage)
    return reg.storage


def test_a_canary_and_a_second_reader_on_s3(
    s3_url: str, tmp_path: Path, artifacts: list[Path]
) -> None:
    """(Publish, promote and rollback: test_registry.py, on both storages.)"""
    reg = ArtifactRegistry(s3_url)
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    canary = reg.start_canary(b, share=0.25, since_ts=7, reason="gate passed")
    assert canary is not None and reg.state() == (a, canary)
    assert reg.finish_canary(canary, promote=False, reason="worse")
    assert not reg.finish_canary(canary, promote=True)  # already stopped: nothing changes
    assert [h["action"] for h in reg.history()][-2:] == ["canary-start", "canary-stop"]
    # a second registry object (another machine) sees the same state, in its own cache
    again = ArtifactRegistry(s3_url, cache_dir=tmp_path / "other-cache")
    storage = _storage(again)
    assert again.state() == (a, None)
    assert again.current_path() == tmp_path / "other-cache" / storage.bucket / storage.prefix / a


def test_a_lost_race_decides_again_on_the_winners_pointer(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers read the same pointer; the second write is refused (If-Match on the
    ETag read) and decides again on what the first wrote -- never a lost update."""
    reg = ArtifactRegistry(s3_url)
    other = ArtifactRegistry(s3_url)
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    c = reg.publish(artifacts[2])
    storage = _storage(reg)
    real_read = storage.read_pointer
    reads: list[str | None] = []

    def read_then_lose_the_race() -> tuple[bytes | None, str | None]:
        raw, tag = real_read()
        reads.append(tag)
        if len(reads) == 1:
            other.promote(c, reason="an operator, meanwhile")  # after our read
        return raw, tag

    monkeypatch.setattr(storage, "read_pointer", read_then_lose_the_race)
    # the loop's conditional promotion: a was current when it decided, c is now
    assert not reg.promote(b, expect_current=a)
    # read, write refused, read (not our write), decide again on c: nothing to do
    assert len(reads) == 3 and reads[0] != reads[1] == reads[2]
    assert reg.current() == c
    # an unconditional change is applied on top of the winner's pointer
    reads.clear()
    monkeypatch.setattr(
        storage,
        "read_pointer",
        lambda: (reads.append("x"), other.promote(b) if len(reads) == 1 else None, real_read())[2],
    )
    assert reg.rollback(reason="worse") == c  # b's predecessor in the winner's stack
    assert json.loads(real_read()[0] or b"{}")["stack"] == [a, c]
    monkeypatch.undo()
    # the very first pointer is conditional too (If-None-Match: *)
    first = ArtifactRegistry(s3_url + "-fresh")
    v = first.publish(artifacts[0])
    assert _storage(first).write_pointer(b'{"version": "x"}', tag=None)
    assert not _storage(first).write_pointer(b'{"version": "y"}', tag=None)
    assert first.promote(v) and first.current() == v


def test_a_write_that_landed_but_was_reported_refused_is_applied_once(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client retry of a conditional put that had landed (timeout or 5xx after the
    write) gets 412: the registry sees its own write id in the pointer and stops there,
    instead of deciding again on its own change (a rollback two steps back, a promotion
    reported as superseded)."""
    reg = ArtifactRegistry(s3_url)
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1], promote=True)
    c = reg.publish(artifacts[2], promote=True)
    storage = _storage(reg)
    real_write = storage.write_pointer

    def landed_but_refused(data: bytes, *, tag: str | None) -> bool:
        assert real_write(data, tag=tag)
        return False  # what the retried request reports

    monkeypatch.setattr(storage, "write_pointer", landed_but_refused)
    assert reg.rollback(reason="worse") == b
    assert reg.current() == b and json.loads(storage.read_pointer()[0] or b"")["stack"] == [a, b]
    assert reg.promote(c, expect_current=b) and reg.current() == c
    canary = reg.start_canary(b, share=0.5, since_ts=1)
    assert canary is not None and reg.canary() == canary
    assert reg.finish_canary(canary, promote=False) and reg.canary() is None
    actions = [h["action"] for h in reg.history()]
    assert actions[-4:] == ["rollback", "promote", "canary-start", "canary-stop"]


def test_a_write_that_landed_is_recognised_after_other_writes_and_after_an_error(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retried put's 412 (or its final error) can come after another writer moved the
    pointer on: the pointer's recent write ids still name ours, so the change is neither
    applied again nor reported as failed, and the other writer's change stands."""
    from recloop.errors import RegistryUnreachableError

    reg, other = ArtifactRegistry(s3_url), ArtifactRegistry(s3_url)
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1], promote=True)
    c = reg.publish(artifacts[2], promote=True)
    storage = _storage(reg)
    real_write = storage.write_pointer
    outcome: list[str] = ["refused"]

    def landed_then_another_writer(data: bytes, *, tag: str | None) -> bool:
        assert real_write(data, tag=tag)
        other.start_canary(c, share=0.5, since_ts=3, reason="an operator, meanwhile")
        if outcome[0] == "error":
            raise RegistryUnreachableError("read timeout, retries exhausted")
        return False

    monkeypatch.setattr(storage, "write_pointer", landed_then_another_writer)
    assert reg.rollback(reason="worse") == b  # one step, not two
    running = reg.canary()
    assert reg.current() == b and running is not None and running.version == c
    assert json.loads(storage.read_pointer()[0] or b"")["stack"] == [a, b]
    outcome[0] = "error"
    assert reg.promote(a, expect_current=b) and reg.current() == a
    assert [h["action"] for h in reg.history()].count("promote") == 4


def test_a_lineage_put_that_landed_before_a_retry_still_publishes(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = ArtifactRegistry(s3_url)
    storage = _storage(reg)
    real_put = storage._put

    def landed_then_412(key: str, data: bytes, **condition: str) -> bool:
        done = real_put(key, data, **condition)
        return done and not key.endswith("/registry.json")

    monkeypatch.setattr(storage, "_put", landed_then_412)
    v = reg.publish(artifacts[0], promote=True)
    assert reg.current() == v and [h["action"] for h in reg.history()] == ["publish", "promote"]


def test_two_publishers_of_one_version_keep_the_first_lineage(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = ArtifactRegistry(s3_url), ArtifactRegistry(s3_url)
    v = first.publish(artifacts[0], lineage={"who": "loop"})
    # the second checked before the first had finished: it uploads everything again
    storage = _storage(second)
    real, checks = storage.has_version, []

    def not_yet_before_uploading(version: str) -> bool:
        checks.append(version)
        return len(checks) > 2 and real(version)  # the registry's and the storage's checks

    monkeypatch.setattr(storage, "has_version", not_yet_before_uploading)
    assert second.publish(artifacts[0], lineage={"who": "operator"}) == v
    assert len(checks) == 2
    monkeypatch.undo()
    assert [e.lineage["who"] for e in first.entries()] == ["loop"]
    assert [h["action"] for h in first.history()] == ["publish"]


def test_a_publish_that_died_is_no_version_and_completes_when_repeated(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = ArtifactRegistry(s3_url)
    a = reg.publish(artifacts[0], promote=True)
    storage = _storage(reg)
    real_put = storage._put

    uploaded: list[str] = []

    def die_before_the_lineage(key: str, data: bytes, **condition: str) -> bool:
        if key.endswith("/registry.json") and "/versions/" in key:
            # the process dies with every file of the artifact uploaded
            uploaded.extend(storage._keys(key.rsplit("/", 1)[0] + "/"))
            raise KeyboardInterrupt
        return real_put(key, data, **condition)

    monkeypatch.setattr(storage, "_put", die_before_the_lineage)
    with pytest.raises(KeyboardInterrupt):
        reg.publish(artifacts[1], promote=True)
    monkeypatch.undo()
    files = {p.relative_to(artifacts[1]).as_posix() for p in artifacts[1].rglob("*") if p.is_file()}
    assert {k.rsplit("/versions/", 1)[1].split("/", 1)[1] for k in uploaded} == files
    assert reg.current() == a and [e.version for e in reg.entries()] == [a]
    assert [h["action"] for h in reg.history()] == ["publish", "promote"]
    b = reg.publish(artifacts[1], promote=True)  # a restart publishes it again
    assert reg.current() == b and {e.version for e in reg.entries()} == {a, b}


def test_a_damaged_download_is_refused_and_a_version_is_downloaded_once(
    s3_url: str, artifacts: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = ArtifactRegistry(s3_url)
    a = reg.publish(artifacts[0], promote=True)
    b = reg.publish(artifacts[1])
    storage = _storage(reg)
    storage.client.put_object(
        Bucket=storage.bucket, Key=f"{storage.prefix}/versions/{b}/weights.safetensors",
        Body=b"garbage",
    )  # fmt: skip
    with pytest.raises(ArtifactError, match="sha256"):
        reg.promote(b)
    assert reg.current() == a and not (storage.cache / b).exists()  # nothing cached
    # repaired on the store: the next read downloads it again and it serves
    storage.client.upload_file(
        str(artifacts[1] / "weights.safetensors"), storage.bucket,
        f"{storage.prefix}/versions/{b}/weights.safetensors",
    )  # fmt: skip
    assert reg.promote(b) and reg.current_path() == storage.cache / b
    reg.rollback()
    with pytest.raises(ArtifactError, match="no published version"):
        reg.version_path("nope")
    downloads: list[str] = []
    real = storage.client.download_file
    monkeypatch.setattr(
        storage.client,
        "download_file",
        lambda bucket, key, dest: (downloads.append(key), real(bucket, key, dest))[1],
    )
    fresh = ArtifactRegistry(s3_url, cache_dir=storage.cache.parent.parent / "fresh")
    monkeypatch.setattr(_storage(fresh), "client", storage.client)
    first = fresh.version_path(a)
    n = len(downloads)
    assert n > 0 and fresh.version_path(a) == first and len(downloads) == n
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".tmp-")]


def test_s3_urls_are_checked() -> None:
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ConfigError, match="no bucket"):
        parse_s3_url("s3:///prefix")


def test_cli_on_s3(s3_url: str, artifacts: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["registry", "publish", s3_url, str(artifacts[0]), "--promote"]) == 0
    a = capsys.readouterr().out.split()[0]
    assert main(["registry", "publish", s3_url, str(artifacts[1])]) == 0
    b = capsys.readouterr().out.split()[0]
    assert main(["registry", "canary", s3_url, b, "--share", "0.5"]) == 0
    capsys.readouterr()
    assert main(["registry", "list", s3_url, "--json"]) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[a]["current"] and rows[b]["canary"]["share"] == 0.5
    assert main(["registry", "promote", s3_url, b]) == 0
    assert main(["registry", "rollback", s3_url]) == 0
    assert capsys.readouterr().out.split()[-1] == a
