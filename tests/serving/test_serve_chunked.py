"""Exact serving of a large catalogue in item chunks: the same lists as the whole score table,
masking and fallbacks as before (the chunk threshold is lowered to this test's catalogue)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import ITEM_IDS, N_ITEMS, as_recent, build_artifact, settings_for

from recloop.artifacts import HeadConfig
from recloop.serving import service
from recloop.serving.schemas import RecommendRequest
from recloop.serving.service import LoadedModel, RecommenderService
from recloop.stores import MemoryStore


@pytest.mark.parametrize(
    "head",
    [
        HeadConfig(kind="dot", hidden_dims=(16,)),
        HeadConfig(kind="dot", similarity="cosine"),
        HeadConfig(kind="linear"),
    ],
)
async def test_chunked_lists_equal_the_whole_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, head: HeadConfig
) -> None:
    art = build_artifact(tmp_path / head.kind, head=head)
    store = MemoryStore()
    consumed = [("i2", 1.0), ("i5", 0.5), ("i9", 2.0), ("i11", 1.0)]
    await store.push_recent(as_recent({"u1": consumed}), max_len=10)
    whole = RecommenderService(
        settings=settings_for(art, microbatch=False), store=store, model=LoadedModel.load(art)
    )
    monkeypatch.setattr(service, "CHUNKED_ITEMS", 4)
    monkeypatch.setattr(service, "CHUNK_CELLS", 8)
    monkeypatch.setattr(service, "MIN_CHUNK", 3)  # 13 columns in chunks of 3 or more
    chunked_model = LoadedModel.load(art)
    assert chunked_model.chunked and not whole.model.chunked
    chunked = RecommenderService(
        settings=settings_for(art, microbatch=False), store=store, model=chunked_model
    )
    reqs = [
        RecommendRequest(user_id="u1", n=N_ITEMS),  # store history, all consumed masked
        RecommendRequest(user_id="u2", recent_items=["i1", "i3"], n=5),
        RecommendRequest(user_id="u3", recent_items=ITEM_IDS[:10], n=5),  # 2 left
        RecommendRequest(user_id="u1", n=3, exclude_consumed=False),
        RecommendRequest(user_id="stranger", n=4),  # popular fallback
    ]
    got = await chunked.recommend_many(reqs)
    want = await whole.recommend_many(reqs)
    for g, w in zip(got, want, strict=True):
        assert g.item_ids == w.item_ids and g.source == w.source
        assert g.scores == pytest.approx(w.scores, rel=1e-5, abs=1e-6)
    assert len(got[0].item_ids) == N_ITEMS - 4
    assert not {i for i, _ in consumed} & set(got[0].item_ids)


def test_heads_that_do_not_factor_are_not_chunked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CHUNKED_ITEMS", 4)
    art = build_artifact(tmp_path / "pop", head=HeadConfig(kind="popularity"))
    assert not LoadedModel.load(art).chunked
