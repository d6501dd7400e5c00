"""kill -9 of ``recloop loop`` while a service follows the registry: the service keeps
answering with the current model, the registry stays consistent, and the restarted
controller finishes the round without training the window twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from loop_helpers import append_events, tiny_config, walk_events

from recloop.artifacts.bundle import load_artifact
from recloop.artifacts.registry import ArtifactRegistry
from recloop.config import config_to_dict
from recloop.loop.controller import HOOK_ENV, LoopController

RECLOOP = [sys.executable, "-c", "import sys; from recloop.cli import main; sys.exit(main())"]


def _start_at(tmp_path: Path, config: Path, step: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, HOOK_ENV: step, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [*RECLOOP, "-q", "loop", "--config", str(config), "--once"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = tmp_path / "work" / f".hook-{step}"
    deadline = time.monotonic() + 90
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "exited")
        assert time.monotonic() < deadline, f"never reached {step}"
        time.sleep(0.05)
    return proc


async def _ask(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.post("/v1/recommend", json={"user_id": "u1", "n": 3})
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "where"), [("train", "dir"), ("gate", "dir"), ("promote", "dir"), ("promote", "s3")]
)
def test_a_service_keeps_serving_through_a_killed_controller(
    tmp_path: Path, step: str, where: str, request: pytest.FixtureRequest
) -> None:
    from recloop.serving.app import create_app
    from recloop.serving.settings import ServeSettings

    registry = str(tmp_path / "registry") if where == "dir" else request.getfixturevalue("s3_url")
    append_events(f"sqlite:///{tmp_path / 'log.db'}", walk_events(steps=range(0, 10)))
    cfg = tiny_config(tmp_path, registry=registry)
    config = tmp_path / "loop.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    first = LoopController(cfg).run_once()
    assert first.status == "promoted"
    append_events(cfg.database_url, walk_events(steps=range(10, 13)))
    reg = ArtifactRegistry(registry)
    settings = ServeSettings.model_validate(
        {
            "artifact": reg.current_path(),
            "registry": registry,
            "artifact_root": reg.current_path().parent,
            "reload_poll_s": 0.05,
            "microbatch": False,
            "gc_freeze": False,
        }
    )
    app = create_app(settings)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await _ask(client))["model_version"] == first.version
                proc = await asyncio.to_thread(_start_at, tmp_path, config, step)
                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)
                if proc.stderr:
                    proc.stderr.close()
                await asyncio.sleep(0.3)  # several registry polls
                # the dead controller left the current model serving and the registry whole
                reply = await _ask(client)
                assert reply["model_version"] == first.version and reply["items"]
                assert reg.current() == first.version
                load_artifact(reg.current_path())
                if where == "dir":
                    assert not [p for p in reg.versions_dir.iterdir() if p.name.startswith(".tmp")]
                state = json.loads((tmp_path / "work" / "state.json").read_text())
                assert state["watermark"]["events"] == 160
                assert (state["pending"] is not None) is (step == "promote")
                if step == "promote":  # published, not yet promoted
                    assert state["pending"]["version"] in {e.version for e in reg.entries()}
                rounds = len(list((tmp_path / "work" / "rounds").iterdir()))

                again = await asyncio.to_thread(LoopController(cfg).run_once)
                assert again.parent == first.version and again.window["events"] == 208
                if step == "promote":
                    assert again.status.startswith("resumed-")  # finished, not retrained
                    assert len(list((tmp_path / "work" / "rounds").iterdir())) == rounds
                    publishes = [h["action"] for h in reg.history()].count("publish")
                    assert publishes == 2  # the candidate is published once
                else:
                    assert again.status in ("promoted", "published")
                now = reg.current()
                assert now is not None
                deadline = time.monotonic() + 10
                while (await _ask(client))["model_version"] != now:
                    assert time.monotonic() < deadline, f"the service never swapped to {now}"
                    await asyncio.sleep(0.05)
                skipped = await asyncio.to_thread(LoopController(cfg).run_once)
                assert skipped.status == "skipped"  # the window is done: never trained twice

    asyncio.run(scenario())
