"""A service following an artifact registry on S3 (moto's server, or RECLOOP_S3_ENDPOINT)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import running, settings_for

from recloop.artifacts.registry import ArtifactRegistry
from recloop.serving.app import create_app

pytest.importorskip("boto3")


async def test_a_service_follows_an_s3_registry(
    s3_url: str, artifact_dir: Path, artifact_dir_b: Path
) -> None:
    """Workers serving s3://... load promotions, rollbacks and canaries by themselves."""
    reg = ArtifactRegistry(s3_url)
    v0 = reg.publish(artifact_dir, promote=True)
    v1 = reg.publish(artifact_dir_b)
    app = create_app(settings_for(reg.current_path(), registry=s3_url, reload_poll_s=0.05))

    async def wait_for(current: str, canary: str | None) -> None:
        for _ in range(200):
            svc: Any = app.state.service
            c = svc.canary
            if svc.model.model_version == current and (None if c is None else c[0]) == canary:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"serving {app.state.service.model.model_version}, not {current}")

    async with running(app) as client:
        await asyncio.to_thread(reg.promote, v1, reason="better")
        await wait_for(v1, None)
        r = await client.post("/v1/recommend", json={"user_id": "u1"})
        assert r.status_code == 200 and r.headers["x-model-version"] == v1
        await asyncio.to_thread(reg.rollback, reason="worse")
        await wait_for(v0, None)
        await asyncio.to_thread(reg.start_canary, v1, share=0.5, since_ts=0)
        await wait_for(v0, v1)


@pytest.mark.parametrize("failure", ["unreachable", "disk", "damaged"])
async def test_a_version_the_store_could_not_give_is_fetched_again_a_damaged_one_not(
    s3_url: str,
    artifact_dir: Path,
    artifact_dir_b: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    """A store that did not answer for a moment (or a full cache disk) is no broken version:
    the worker tries again every CANARY_RETRY_S (not every poll), and serves it once it
    comes.  A damaged one is tried once, like a bad load, until the pointer moves."""
    from recloop.artifacts.s3 import S3Storage
    from recloop.errors import ArtifactError, RegistryUnreachableError
    from recloop.serving import app as app_mod

    monkeypatch.setattr(app_mod, "CANARY_RETRY_S", 0.4)
    reg = ArtifactRegistry(s3_url)
    reg.publish(artifact_dir, promote=True)
    v1 = reg.publish(artifact_dir_b)
    app = create_app(settings_for(reg.current_path(), registry=s3_url, reload_poll_s=0.05))
    real = S3Storage.local_version
    tries: list[float] = []

    def flaky(self: S3Storage, version: str) -> Path:
        if version == v1:
            tries.append(time.monotonic())
            if len(tries) < 3:
                if failure == "unreachable":
                    raise RegistryUnreachableError("connection reset")
                if failure == "disk":
                    raise OSError(28, "No space left on device")
                raise ArtifactError("weights file: sha256 does not match")
        return real(self, version)

    reg.promote(v1)  # before the worker starts: its first poll finds v1 to fetch
    monkeypatch.setattr(S3Storage, "local_version", flaky)
    async with running(app):
        for _ in range(60):
            if app.state.service.model.model_version == v1:
                break
            await asyncio.sleep(0.05)
        if failure != "damaged":
            assert app.state.service.model.model_version == v1 and len(tries) == 3
            assert min(b - a for a, b in itertools.pairwise(tries)) >= 0.35
        else:
            assert app.state.service.model.model_version != v1 and len(tries) == 1
