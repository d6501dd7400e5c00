"""Serving top-k lists from the artifact's approximate index: the same lists as exact
serving when the index finds every item, masking and fallbacks as before."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import ITEM_IDS, assert_same_lists, build_artifact, settings_for

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
    ann, exact = await _services(indexed, MemoryStore())
    assert ann.model.ann is not None and exact.model.ann is None
    got = await assert_same_lists(ann, exact)
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
