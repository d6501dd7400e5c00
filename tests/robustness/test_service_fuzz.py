"""Schemathesis against the real service: what the OpenAPI schema promises is what it does.

The app runs under uvicorn in a thread (its lifespan loads a small random artifact); every
operation of the schema — /v1/recommend and /v1/recommend/batch included — gets schema-valid
and schema-invalid examples, and every built-in check runs: no 5xx, documented status codes,
content types and headers, responses that match their schema, valid data accepted (2xx) and
invalid data refused (4xx).
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.encoders.base import EncoderConfig
from recloop.serving.app import create_app
from recloop.serving.settings import ServeSettings
from recloop.stores import RecentItem, open_store

pytestmark = pytest.mark.slow

N_ITEMS = 12
USER_IDS = ["u1", "u2", "3", "4", "5"]
ITEM_IDS = [f"i{i}" for i in range(1, N_ITEMS)] + ["12"]


def _artifact(directory: Path) -> Path:
    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=len(USER_IDS),
        n_items=N_ITEMS,
        encoder=EncoderConfig(kind="concat", history=3, embedding_dim=8, use_rewards=True),
        head=HeadConfig(kind="linear"),
    )
    return save_artifact(
        directory,
        algo="test",
        config={"seed": 0},
        policy=PolicyNet(spec),
        popularity=np.array([0.0, *range(N_ITEMS, 0, -1)], dtype=np.float32),
        user_ids=USER_IDS,
        item_ids=ITEM_IDS,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, serve_in_thread: Any) -> Iterator[str]:
    """The service on a real socket, small limits so that examples reach them."""
    tmp = tmp_path_factory.mktemp("fuzz")
    artifact = _artifact(tmp / "artifact")
    store_url = f"sqlite:///{tmp}/store.db"
    asyncio.run(_fill(store_url))  # a file the server's own store then reads
    app = create_app(_settings(artifact, store_url=store_url))
    with serve_in_thread(app, lifespan="on") as running:
        yield running.url


async def _fill(url: str) -> None:
    """Some users have history in the store, some items are popular in real time."""
    store = open_store(url)
    await store.push_recent(
        {"u1": [RecentItem("i2", 1.0, 1, "e1"), RecentItem("12", 0.5, 2, "e2")]}, max_len=5
    )
    await store.set_popular([("i7", 3.0), ("i3", 2.0)])
    await store.close()


def _settings(artifact: Path, **kw: Any) -> ServeSettings:
    """Small limits, so that examples reach them."""
    return ServeSettings(
        artifact=artifact,
        gc_freeze=False,
        max_n=20,
        default_n=5,
        max_batch=8,
        max_recent_items=16,
        **kw,
    )


# The schema of an app with the same settings (it does not depend on the artifact, which the
# served app loads in its lifespan).  Loaded here rather than from a fixture: schemathesis'
# lazy fixture loader does not run under pytest 9.
API_SCHEMA = schemathesis.openapi.from_dict(create_app(_settings(Path("unused"))).openapi())


@API_SCHEMA.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_service_agrees_with_its_schema(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(base_url=base_url)


def test_every_operation_is_fuzzed(base_url: str) -> None:
    """The parametrised test above covers the recommend routes (a schema that lost them
    would pass it vacuously), and the served schema is the one fuzzed."""
    served = httpx.get(f"{base_url}/openapi.json", timeout=5).json()
    assert served == API_SCHEMA.raw_schema
    ops = {(op.ok().method.upper(), op.ok().path) for op in API_SCHEMA.get_all_operations()}
    assert {("POST", "/v1/recommend"), ("POST", "/v1/recommend/batch")} <= ops
    assert ("POST", "/admin/reload") not in ops  # admin routes are off by default


def test_chunked_body_over_the_limit_on_a_real_socket(base_url: str) -> None:
    """A chunked body is refused (413) after about 4 MiB were sent, not after all 64."""
    host, port = base_url.removeprefix("http://").split(":")
    piece = b" " * (1 << 20)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent = 0
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(64):
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:  # the server answered: stop sending
                    break
                sock.sendall(chunk)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while not answer.endswith(b"}"):
                got = sock.recv(65536)
                if not got:
                    break
                answer += got
        except ConnectionResetError:
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 16 << 20
    assert httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
