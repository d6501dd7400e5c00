"""Fixtures of the serving tests (helpers live in serve_helpers.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import REDIS_URL, Served, ServeFactory, build_artifact, running, settings_for

from recloop.serving.app import create_app


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return build_artifact(tmp_path / "art0", seed=0)


@pytest.fixture
def artifact_dir_b(tmp_path: Path) -> Path:
    return build_artifact(tmp_path / "art1", seed=1)


@pytest.fixture
def serve(artifact_dir: Path) -> ServeFactory:
    """``async with serve(**settings) as (client, service)``: the app on the test artifact."""

    @asynccontextmanager
    async def start(**kw: Any) -> AsyncIterator[Served]:
        kw.setdefault("artifact", artifact_dir)
        app = create_app(settings_for(**kw))
        async with running(app) as client:
            yield client, app.state.service

    return start


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(store url, key prefix): the in-process store, and the real Redis."""
    if request.param == "memory":
        return "memory://", "recloop:"
    return REDIS_URL, f"recloop-test:{uuid.uuid4().hex}:"
