"""Serving top-k lists from the artifact's approximate index: the same lists as exact
serving when the index finds every item, masking and fallbacks as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import ITEM_IDS, N_ITEMS, as_recent, build_artifact, settings_for

from recloop.artifacts import HeadConfig
from recloop.artifacts.ann import IndexConfig, build_index
from recloop.cli import main
from recloop.serving.schemas import RecommendRequest
from recloop.serving.service import LoadedModel, RecommenderService
from recloop.stores import MemoryStore

pytest.importorskip("faiss")


@pytest.fixture
def indexed(tmp_path: Path) -> Path:
    art = build_artifact(tmp_path / "dot", head=HeadConfig(kind="dot", hidden_dims=(16,)))
    # every list probed: the search is exhaustive, so only the code path differs
    build_index(art, IndexConfig(kind="ivf", nlist=3, nprobe=3))
    return art


async def _services(art: Path, store: MemoryStore) -> tuple[RecommenderService, RecommenderService]:
    def make(search: str) -> RecommenderService:
        settings = settings_for(art, search=search, microbatch=False)
        model = LoadedModel.load(art, search=search, ann_margin=settings.ann_margin)
        return RecommenderService(settings=settings, store=store, model=model)

    return make("ann"), make("exact")


async def test_ann_serving_masks_and_matches_exact(indexed: Path) -> None:
    store = MemoryStore()
    consumed = [("i2", 1.0), ("i5", 0.5), ("i9", 2.0), ("i11", 1.0)]
    await store.push_recent(as_recent({"u1": consumed}), max_len=10)
    ann, exact = await _services(indexed, store)
    assert ann.model.ann is not None and exact.model.ann is None
    reqs = [
        RecommendRequest(user_id="u1", n=N_ITEMS),  # store history, all consumed masked
        RecommendRequest(user_id="u2", recent_items=["i1", "i3"], n=5),
        RecommendRequest(user_id="u3", recent_items=ITEM_IDS[:10], n=5),  # 2 left
        RecommendRequest(user_id="u1", n=3, exclude_consumed=False),
        RecommendRequest(user_id="stranger", n=4),  # popular fallback
    ]
    got = await ann.recommend_many(reqs)
    want = await exact.recommend_many(reqs)
    for g, w in zip(got, want, strict=True):
        assert g.item_ids == w.item_ids and g.source == w.source
        assert g.scores == pytest.approx(w.scores, rel=1e-5, abs=1e-6)
    assert len(got[0].item_ids) == N_ITEMS - 4
    assert not {i for i, _ in consumed} & set(got[0].item_ids)
    assert sorted(got[2].item_ids) == sorted(ITEM_IDS[10:])
    assert got[4].source == "popular"


async def test_exploring_policies_still_score_every_item(indexed: Path) -> None:
    ann, exact = await _services(indexed, MemoryStore())
    req = RecommendRequest(user_id="u2", recent_items=["i1"], n=4, policy="softmax", seed=7)
    (g,) = await ann.recommend_many([req])
    (w,) = await exact.recommend_many([req])
    assert g.item_ids == w.item_ids and g.propensities == w.propensities


def test_serve_ann_without_an_index_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    art = build_artifact(tmp_path / "plain", head=HeadConfig(kind="dot"))
    assert main(["serve", str(art), "--ann", "--store-url", "memory://"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no index" in err and "recloop index build" in err and "\n" not in err
