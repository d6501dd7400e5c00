"""``recloop serve``: argument errors in-process, a real multi-worker server in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

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
