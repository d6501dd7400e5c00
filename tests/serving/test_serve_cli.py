"""``recloop serve``: argument errors in-process, a real multi-worker server in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from recloop.artifacts import load_artifact
from recloop.cli import main


def test_serve_refuses_a_missing_artifact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "no such artifact or run directory" in capsys.readouterr().err


def test_serve_refuses_a_broken_artifact(
    artifact_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact_dir / "item_ids.txt").write_text("tampered\n")
    assert main(["serve", str(artifact_dir)]) == 2
    assert "item_ids.txt: sha256" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_serve_two_workers_end_to_end(artifact_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    code = "import sys; from recloop.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "PROMETHEUS_"))}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-q", "serve", str(artifact_dir), "--port", str(port),
         "--workers", "2", "--store-url", "memory://", "--api-key", "k", "--log-level", "warning"],
        env=env,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "server exited"
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.3)
        key = {"X-API-Key": "k"}
        with httpx.Client(base_url=base, headers=key) as client:
            for _ in range(20):
                r = client.post("/v1/recommend", json={"user_id": "u1", "recent_items": ["i2"]})
                assert r.status_code == 200 and r.json()["source"] == "policy"
            assert (
                client.post(
                    "/v1/recommend", json={"user_id": "u1"}, headers={"X-API-Key": "x"}
                ).status_code
                == 401
            )
            text = client.get("/metrics").text
        # both workers' counts are summed, whichever of them answers the scrape
        line = next(
            x
            for x in text.splitlines()
            if x.startswith('recloop_http_requests_total{route="/v1/recommend",status="200"}')
        )
        assert float(line.rsplit(" ", 1)[1]) == 20.0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_serve_refuses_bad_settings_and_leaves_the_environment(
    artifact_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RECLOOP_ARTIFACT", raising=False)
    monkeypatch.setenv("RECLOOP_MAX_N", "0")
    assert main(["serve", str(artifact_dir), "--log-level", "info"]) == 2
    assert "RECLOOP_MAX_N" in capsys.readouterr().err
    assert "RECLOOP_ARTIFACT" not in os.environ and "RECLOOP_LOG_LEVEL" not in os.environ
    assert os.environ["RECLOOP_MAX_N"] == "0"


def test_serving_never_imports_training_code() -> None:
    code = (
        "import sys, recloop.serving, recloop.serving.app; "
        "bad = [m for m in sys.modules if m.startswith(('recloop.training', 'recloop.algos', "
        "'recloop.embeddings'))]; print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """uvicorn.run replaced: what it was called with, and the RECLOOP_* environment then."""
    calls: list[dict[str, Any]] = []

    def fake_run(app: str, **kw: Any) -> None:
        env = {k: v for k, v in os.environ.items() if k.startswith(("RECLOOP_", "PROMETHEUS_"))}
        calls.append({"app": app, "env": env, **kw})

    monkeypatch.setattr(uvicorn, "run", fake_run)
    for k in list(os.environ):
        if k.startswith("RECLOOP_"):
            monkeypatch.delenv(k)
    return calls


@pytest.mark.parametrize("port", ["99999", "0", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range(
    artifact_dir: Path,
    port: str,
    uvicorn_calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", str(artifact_dir), "--port", port]) == 2
    assert f"--port must be in 1..65535, got {port}" in capsys.readouterr().err
    assert uvicorn_calls == []


def test_serve_refuses_stores_that_cannot_work(
    artifact_dir: Path,
    tmp_path: Path,
    uvicorn_calls: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    for url, why in [
        ("foo://bar", "--store-url (RECLOOP_STORE_URL): store url 'foo://bar': unsupported scheme"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        (f"sqlite:///{tmp_path}/no/such/dir/store.db", f"{tmp_path}/no/such/dir does not exist"),
        (
            "redis://127.0.0.1:1/0",
            "online store: redis store redis://127.0.0.1:1/0: connect failed",
        ),
    ]:
        assert main(["serve", str(artifact_dir), "--store-url", url]) == 2, url
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "no").exists()
    assert uvicorn_calls == []


@pytest.mark.integration
def test_serve_refuses_a_redis_database_out_of_range(
    artifact_dir: Path, uvicorn_calls: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_helpers import REDIS_URL

    base = REDIS_URL.rsplit("/", 1)[0]
    if main(["serve", str(artifact_dir), "--store-url", f"{base}/0"]) != 0:
        pytest.skip(f"no Redis at {base}")
    assert main(["serve", str(artifact_dir), "--store-url", f"{base}/99"]) == 2
    assert "DB index is out of range" in capsys.readouterr().err
    assert len(uvicorn_calls) == 1


def test_serve_passes_checked_settings_to_the_workers(
    artifact_dir: Path, tmp_path: Path, uvicorn_calls: list[dict[str, Any]]
) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    args = ["serve", str(artifact_dir), "--port", "8123", "--workers", "2", "--store-url", url]
    args += ["--admin-key", "adm", "--artifact-root", str(tmp_path)]
    assert main(args) == 0
    (call,) = uvicorn_calls
    env = call["env"]
    assert call["port"] == 8123 and call["workers"] == 2
    assert env["RECLOOP_STORE_URL"] == url and env["RECLOOP_ADMIN_KEY"] == "adm"
    assert env["RECLOOP_ARTIFACT_ROOT"] == str(tmp_path.resolve())
    # one reload state file per run, shared by its workers, removed afterwards
    state = Path(env["RECLOOP_RELOAD_STATE"])
    assert state.name == "reload.json" and not state.parent.exists()
    assert "RECLOOP_RELOAD_STATE" not in os.environ


def _metric_by_pid(text: str, version: str) -> dict[str, float]:
    """``recloop_model_info`` of one version per worker pid (multiprocess 'liveall')."""
    out = {}
    for line in text.splitlines():
        if line.startswith("recloop_model_info{") and f'model_version="{version}"' in line:
            pid = line.split('pid="', 1)[1].split('"', 1)[0]
            out[pid] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.slow
def test_reload_reaches_every_worker(
    artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path
) -> None:
    """/admin/reload answered by one of 2 worker processes switches both: every later answer
    (and each worker's model gauge) names the new version within a couple of seconds."""
    port = _free_port()
    code = "import sys; from recloop.cli import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECLOOP_", "PROMETHEUS_"))}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "-q", "serve", str(artifact_dir), "--port", str(port),
         "--workers", "2", "--store-url", "memory://", "--admin-key", "adm",
         "--artifact-root", str(tmp_path), "--log-level", "warning"],
        env=env,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    v0 = load_artifact(artifact_dir).model_version
    v1 = load_artifact(artifact_dir_b).model_version
    body = {"user_id": "u1", "recent_items": ["i2"]}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "server exited"
            try:
                text = httpx.get(f"{base}/metrics", timeout=1).text
                if len(_metric_by_pid(text, v0)) == 2:  # both workers up
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.3)
        r = httpx.post(
            f"{base}/admin/reload",
            json={"artifact": str(artifact_dir_b)},
            headers={"X-Admin-Key": "adm"},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["model_version"] == v1
        deadline = time.monotonic() + 15
        while True:
            text = httpx.get(f"{base}/metrics", timeout=5).text
            now, old = _metric_by_pid(text, v1), _metric_by_pid(text, v0)
            if len(now) == 2 and set(now.values()) == {1.0} and set(old.values()) <= {0.0}:
                break
            assert time.monotonic() < deadline, f"not every worker switched: {now} {old}"
            time.sleep(0.2)
        for _ in range(24):  # a new connection each: the kernel spreads them over the workers
            r = httpx.post(f"{base}/v1/recommend", json=body, timeout=5)
            assert r.json()["model_version"] == v1 and r.headers["x-model-version"] == v1
            h = httpx.get(f"{base}/healthz", timeout=5)
            assert h.json()["model_version"] == v1 == h.headers["x-model-version"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_recommend_cli_answers_an_unknown_user_as_the_service_does(
    artifact_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No id and no history: popular items, as ``recloop serve`` answers (not a policy
    score of an empty state)."""
    args = ["-q", "recommend", str(artifact_dir), "--user", "nobody", "--json"]
    assert main([*args, "-n", "4"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert "no --history: popular items" in out.err
    service_items = ["i1", "i2", "i3", "i4"]  # train-popular order of the test artifact
    assert doc["source"] == "popular" and doc["items"] == service_items
    assert doc["scores"] == [12.0, 11.0, 10.0, 9.0] and doc["known_user"] is False
    # with a history, an unknown user is scored by the policy, as in the service
    assert main([*args, "--history", "i3"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "policy"


async def test_recommend_cli_and_service_agree_on_unknown_users(
    artifact_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from serve_helpers import running, settings_for

    from recloop.serving.app import create_app

    async with running(create_app(settings_for(artifact_dir))) as client:
        served = (await client.post("/v1/recommend", json={"user_id": "nobody", "n": 5})).json()
    args = ["-q", "recommend", str(artifact_dir), "--user", "nobody", "-n", "5", "--json"]
    assert main(args) == 0
    cli = json.loads(capsys.readouterr().out)
    assert served["source"] == cli["source"] == "popular"
    assert [x["item_id"] for x in served["items"]] == cli["items"]
    assert [x["score"] for x in served["items"]] == cli["scores"]


def test_serve_passes_the_serving_policy_and_the_served_list_log(
    artifact_dir: Path, tmp_path: Path, uvicorn_calls: list[dict[str, Any]]
) -> None:
    url = f"sqlite:///{tmp_path}/log.db"
    args = ["serve", str(artifact_dir), "--policy", "softmax", "--temperature", "0.5"]
    args += ["--epsilon", "0.2", "--database-url", url]
    assert main(args) == 0
    (call,) = uvicorn_calls
    env = call["env"]
    assert env["RECLOOP_POLICY"] == "softmax" and env["RECLOOP_TEMPERATURE"] == "0.5"
    assert env["RECLOOP_EPSILON"] == "0.2" and env["RECLOOP_DATABASE_URL"] == url


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [("--policy", "greedy", "--policy"), ("--temperature", "0", "--temperature")],
)
def test_serve_refuses_a_bad_policy_naming_the_option(
    artifact_dir: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, named: str
) -> None:
    assert main(["serve", str(artifact_dir), flag, value]) == 2
    assert named in capsys.readouterr().err


def test_serve_follows_a_registry_in_a_directory_or_a_bucket(
    artifact_dir: Path, tmp_path: Path, uvicorn_calls: list[dict[str, Any]], s3_url: str
) -> None:
    """``recloop serve REGISTRY`` serves the current version and tells the workers to follow
    the registry; an ``s3://`` URL (which a Path would collapse to ``s3:/``) stays whole."""
    from recloop.artifacts.registry import ArtifactRegistry

    for where in (str(tmp_path / "reg"), s3_url):
        reg = ArtifactRegistry(where)
        reg.publish(artifact_dir, promote=True)
        assert main(["serve", where]) == 0
        env = uvicorn_calls[-1]["env"]
        current = reg.current_path().resolve()
        assert env["RECLOOP_REGISTRY"] == where and env["RECLOOP_ARTIFACT"] == str(current)
        assert env["RECLOOP_ARTIFACT_ROOT"] == str(current.parent)
