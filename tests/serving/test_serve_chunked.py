"""Exact serving of a large catalogue in item chunks: the same lists as the whole score table,
masking and fallbacks as before (the chunk threshold is lowered to this test's catalogue)."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import assert_same_lists, build_artifact, settings_for

from recloop.artifacts import HeadConfig
from recloop.serving import service
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
    await assert_same_lists(chunked, whole)


def test_heads_that_do_not_factor_are_not_chunked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "CHUNKED_ITEMS", 4)
    art = build_artifact(tmp_path / "pop", head=HeadConfig(kind="popularity"))
    assert not LoadedModel.load(art).chunked
