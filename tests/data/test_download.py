"""Download, checksum, safe unpacking and the offline message, against a local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from recloop.cli import main
from recloop.data import download as dl
from recloop.data.download import DATASETS, DatasetInfo, download, extract_zip, fetch
from recloop.errors import DataError, RecloopError


class _Handler(http.server.SimpleHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, directory it serves, request paths seen)."""
    root = tmp_path / "www"
    root.mkdir()
    hits: list[str] = []
    handler = type("Handler", (_Handler,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root))
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _zip(path: Path, members: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _info(url: str, sha: str) -> DatasetInfo:
    return DatasetInfo(name="toy", url=url, sha256=sha, size=0, folder="ml-100k")


def test_registry_has_the_grouplens_archives() -> None:
    assert set(DATASETS) == {"movielens-100k", "movielens-1m", "movielens-20m"}
    for info in DATASETS.values():
        assert info.url.startswith("https://files.grouplens.org/datasets/movielens/ml-")
        assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
        assert info.url.endswith(f"/{info.folder}.zip")


def test_download_verifies_unpacks_and_caches(
    served: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base, www, hits = served
    sha = _zip(www / "toy.zip", {"ml-100k/u.data": "1\t2\t3\t4\n", "ml-100k/README": "hi"})
    cache = tmp_path / "cache"
    info = _info(f"{base}/toy.zip", sha)
    out = fetch(info, cache)
    assert out == cache / "toy" / "ml-100k"
    assert (out / "u.data").read_text() == "1\t2\t3\t4\n"
    assert sorted(p.name for p in cache.iterdir()) == ["toy"]  # no partial files left
    assert fetch(info, cache) == out
    assert hits == ["/toy.zip"]  # the second call used the cache
    assert fetch(info, cache, force=True) == out
    assert hits == ["/toy.zip", "/toy.zip"]


def test_checksum_mismatch_deletes_the_download(
    served: tuple[str, Path, list[str]], tmp_path: Path
) -> None:
    base, www, _ = served
    got = _zip(www / "ml-100k.zip", {"ml-100k/u.data": "x"})
    cache = tmp_path / "cache"
    with pytest.raises(RecloopError) as err:
        download("movielens-100k", cache, base_url=base)
    assert DATASETS["movielens-100k"].sha256 in str(err.value)
    assert got in str(err.value) and "checksum mismatch" in str(err.value)
    assert list(cache.iterdir()) == []


def test_unreachable_network_explains_local_copies(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RecloopError) as err:
        download("movielens-100k", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5)
    msg = str(err.value)
    assert "network looks unreachable" in msg
    assert "--input PATH/ml-100k" in msg and "RECLOOP_ML100K" in msg
    assert f"http://127.0.0.1:{port}/ml-100k.zip" in msg


def test_http_error_is_reported(served: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, _, _ = served
    with pytest.raises(RecloopError, match="HTTP 404"):
        download("movielens-1m", tmp_path, base_url=base)


def test_unsafe_archive_members_are_refused(tmp_path: Path) -> None:
    for name in ("../evil.txt", "/abs.txt", "ml-100k/../../evil.txt"):
        archive = tmp_path / "bad.zip"
        _zip(archive, {"ml-100k/ok.txt": "ok", name: "boom"})
        dest = tmp_path / "out"
        dest.mkdir(exist_ok=True)
        with pytest.raises(DataError, match="unsafe archive member"):
            extract_zip(archive, dest)
        assert not (tmp_path / "evil.txt").exists()
        assert list(dest.iterdir()) == []


def test_locate_prefers_env_then_shared_then_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recbole = tmp_path / "rb"
    recbole.mkdir()
    (recbole / "ml-100k.inter").write_text("user_id:token\n")
    monkeypatch.setenv("RECLOOP_ML100K", str(recbole))
    assert dl.locate_movielens_100k() == ("recbole", recbole)
    monkeypatch.setenv("RECLOOP_ML100K", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no MovieLens-100K in it"):
        dl.locate_movielens_100k()

    monkeypatch.delenv("RECLOOP_ML100K")
    monkeypatch.setattr(dl, "_repo_root", lambda: None)
    work = tmp_path / "proj" / "main"
    shared = tmp_path / "proj" / "shared" / "datasets" / "ml-100k"
    shared.mkdir(parents=True)
    work.mkdir()
    (shared / "u.data").write_text("1\t2\t3\t4\n")
    monkeypatch.chdir(work)
    assert dl.locate_movielens_100k() == ("movielens", shared)

    (shared / "u.data").unlink()
    info = DATASETS["movielens-100k"]
    done = tmp_path / "cache" / info.name
    (done / "ml-100k").mkdir(parents=True)
    (done / ".complete").write_text(info.sha256 + "\n")
    monkeypatch.setenv("RECLOOP_CACHE", str(tmp_path / "cache"))
    located = dl.locate_movielens_100k()
    assert located.format == "movielens" and located.path == done / "ml-100k"


def test_download_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    info = DATASETS["movielens-1m"]
    done = tmp_path / info.name
    (done / "ml-1m").mkdir(parents=True)
    (done / ".complete").write_text(info.sha256)
    assert main(["data", "download", "movielens-1m", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(done / "ml-1m")
    assert main(["data", "download", "movielens-7m", "--cache-dir", str(tmp_path)]) == 2
    assert "unknown dataset 'movielens-7m'" in capsys.readouterr().err
