"""Helpers for the serving tests: small real artifacts, settings, an app with its lifespan."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.encoders.base import EncoderConfig
from recloop.serving.schemas import RecommendRequest
from recloop.serving.service import Recommendation, RecommenderService
from recloop.serving.settings import ServeSettings
from recloop.stores import RecentItem

REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

N_USERS = 5
N_ITEMS = 12
H = 3
USER_IDS = [f"u{i}" for i in range(1, N_USERS + 1)]
ITEM_IDS = [f"i{i}" for i in range(1, N_ITEMS + 1)]
_CLOCK = itertools.count(1_000_000)


def as_recent(events: Mapping[str, Sequence[tuple[str, float]]]) -> dict[str, list[RecentItem]]:
    """(item, reward) pairs as events that happen now, in the order given, each its own id."""
    out: dict[str, list[RecentItem]] = {}
    for user, pairs in events.items():
        out[user] = []
        for item, reward in pairs:
            t = next(_CLOCK)
            out[user].append(RecentItem(item, reward, t, f"e{t}"))
    return out


# Train counts fall with the index, so the train-popular order is i1, i2, ..., i12.
POPULARITY = np.array([0.0, *range(N_ITEMS, 0, -1)], dtype=np.float32)


def build_artifact(
    directory: Path,
    *,
    seed: int = 0,
    kind: str = "concat",
    use_rewards: bool = True,
    history: int = H,
    dim: int = 8,
    head: HeadConfig | None = None,
) -> Path:
    """A random-weight policy over USER_IDS × ITEM_IDS saved as a real artifact (a linear
    head unless ``head`` says otherwise)."""
    torch.manual_seed(seed)
    spec = PolicySpec(
        n_users=N_USERS,
        n_items=N_ITEMS,
        encoder=EncoderConfig(
            kind=kind, history=history, embedding_dim=dim, use_rewards=use_rewards
        ),
        head=head or HeadConfig(kind="linear"),
    )
    return save_artifact(
        directory,
        algo="test",
        config={"seed": seed},
        policy=PolicyNet(spec),
        popularity=POPULARITY,
        user_ids=USER_IDS,
        item_ids=ITEM_IDS,
    )


def settings_for(artifact: Path, **kw: Any) -> ServeSettings:
    """Settings for tests: memory store unless told otherwise, whatever RECLOOP_* says."""
    kw.setdefault("store_url", "memory://")
    # freezing would keep every earlier test's garbage for the rest of the session
    kw.setdefault("gc_freeze", False)
    return ServeSettings(artifact=artifact, **kw)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan entered, behind an in-process httpx client."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


Served = tuple[httpx.AsyncClient, RecommenderService]
ServeFactory = Callable[..., AbstractAsyncContextManager[Served]]


CONSUMED = [("i2", 1.0), ("i5", 0.5), ("i9", 2.0), ("i11", 1.0)]
"""u1's stored history in :func:`assert_same_lists`."""


async def assert_same_lists(
    candidate: RecommenderService, reference: RecommenderService
) -> list[Recommendation]:
    """Both services (sharing one store, in which u1 has consumed ``CONSUMED``) answer the same
    lists for requests that mask stored and sent history, run out of items, skip masking and
    fall back to popular items; returns the candidate's answers."""
    await candidate.store.push_recent(as_recent({"u1": CONSUMED}), max_len=10)
    reqs = [
        RecommendRequest(user_id="u1", n=N_ITEMS),  # store history, all consumed masked
        RecommendRequest(user_id="u2", recent_items=["i1", "i3"], n=5),
        RecommendRequest(user_id="u3", recent_items=ITEM_IDS[:10], n=5),  # 2 left
        RecommendRequest(user_id="u1", n=3, exclude_consumed=False),
        RecommendRequest(user_id="stranger", n=4),  # popular fallback
    ]
    got = await candidate.recommend_many(reqs)
    want = await reference.recommend_many(reqs)
    for g, w in zip(got, want, strict=True):
        assert g.item_ids == w.item_ids and g.source == w.source
        assert g.scores == pytest.approx(w.scores, rel=1e-5, abs=1e-6)
    assert len(got[0].item_ids) == N_ITEMS - len(CONSUMED)
    assert not {i for i, _ in CONSUMED} & set(got[0].item_ids)
    return got
