"""RecommenderService against a slow reference: Artifact.recommend with a boolean mask."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import ITEM_IDS, N_ITEMS, REDIS_URL, as_recent, build_artifact, settings_for

from recloop.artifacts import Artifact, load_artifact
from recloop.errors import ArtifactError
from recloop.serving.schemas import RecommendRequest
from recloop.serving.service import LoadedModel, MicroBatcher, RecommenderService
from recloop.stores import MemoryStore, OnlineStore, RedisStore, SqliteStore, open_store


def reference(
    art: Artifact,
    *,
    user: str,
    history: list[tuple[str, float]],
    exclude: set[str],
    n: int,
) -> tuple[list[str], list[float]]:
    """Top-n raw ids and scores the slow way: padded tensors and a (1, N + 1) bool mask."""
    h = art.history_len
    known = [(art.item_index[i], r) for i, r in history if i in art.item_index][-h:]
    pad = h - len(known)
    hist = torch.tensor([[0] * pad + [i for i, _ in known]])
    rew = torch.tensor([[0.0] * pad + [r for _, r in known]])
    mask = torch.zeros(1, art.n_items + 1, dtype=torch.bool)
    for raw in exclude:
        if raw in art.item_index:
            mask[0, art.item_index[raw]] = True
    idx, val = art.recommend(
        torch.tensor([art.user_index.get(user, 0)]), hist, rew, n=n, exclude=mask
    )
    pairs = [(int(i), float(v)) for i, v in zip(idx[0], val[0], strict=True) if math.isfinite(v)]
    return [art.item_ids[i - 1] for i, _ in pairs], [v for _, v in pairs]


def make_service(
    artifact_dir: Path, store: OnlineStore | None = None, **kw: object
) -> RecommenderService:
    settings = settings_for(artifact_dir, **kw)
    return RecommenderService(
        settings=settings, store=store or MemoryStore(), model=LoadedModel.load(artifact_dir)
    )


def batch_stats(svc: RecommenderService) -> tuple[float | None, float | None]:
    """(inference calls, rows scored) from the service's metrics."""
    get = svc.metrics.registry.get_sample_value
    return get("recloop_inference_batch_size_count"), get("recloop_inference_batch_size_sum")


async def test_given_history_matches_reference(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir)
    art = svc.model.artifact
    rec = await svc.recommend(RecommendRequest(user_id="u2", recent_items=["i3", "i7"], n=5))
    ids, scores = reference(
        art, user="u2", history=[("i3", 1.0), ("i7", 1.0)], exclude={"i3", "i7"}, n=5
    )
    assert rec.source == "policy"
    assert rec.item_ids == ids
    np.testing.assert_allclose(rec.scores, scores, rtol=1e-6)
    assert rec.warnings == []
    assert rec.model_version == art.model_version


async def test_store_history_with_rewards_and_exclusion(artifact_dir: Path) -> None:
    store = MemoryStore()
    stored = [
        ("i1", 0.5),
        ("i2", 2.0),
        ("i4", 1.0),
        ("i9", 3.0),
    ]  # H = 3: i1 drops out of the state
    await store.push_recent(as_recent({"u1": stored}), max_len=10)
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(RecommendRequest(user_id="u1", n=N_ITEMS))
    ids, scores = reference(
        svc.model.artifact, user="u1", history=stored, exclude={i for i, _ in stored}, n=N_ITEMS
    )
    assert rec.item_ids == ids
    assert len(ids) == N_ITEMS - 4  # every consumed item, i1 included, is masked
    assert not {"i1", "i2", "i4", "i9"} & set(rec.item_ids)
    np.testing.assert_allclose(rec.scores, scores, rtol=1e-6)


async def test_rewards_reach_the_state(artifact_dir: Path) -> None:
    """With use_rewards the stored rewards change the scores (they are not replaced by 1)."""
    a, b = MemoryStore(), MemoryStore()
    await a.push_recent(as_recent({"u1": [("i1", 1.0), ("i2", 1.0)]}), max_len=5)
    await b.push_recent(as_recent({"u1": [("i1", 5.0), ("i2", -3.0)]}), max_len=5)
    ra = await make_service(artifact_dir, a).recommend(RecommendRequest(user_id="u1", n=3))
    rb = await make_service(artifact_dir, b).recommend(RecommendRequest(user_id="u1", n=3))
    assert not np.allclose(ra.scores, rb.scores)


async def test_given_items_and_store_history_are_both_excluded(artifact_dir: Path) -> None:
    store = MemoryStore()
    await store.push_recent(as_recent({"u3": [("i5", 1.0), ("i6", 1.0)]}), max_len=10)
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(RecommendRequest(user_id="u3", recent_items=["i1"], n=N_ITEMS))
    # the state is the given history only; the mask is given ∪ stored
    ids, scores = reference(
        svc.model.artifact, user="u3", history=[("i1", 1.0)], exclude={"i1", "i5", "i6"}, n=N_ITEMS
    )
    assert rec.item_ids == ids
    assert set(ITEM_IDS) - set(rec.item_ids) == {"i1", "i5", "i6"}
    np.testing.assert_allclose(rec.scores, scores, rtol=1e-6)


async def test_exclude_consumed_false_keeps_everything(artifact_dir: Path) -> None:
    store = MemoryStore()
    await store.push_recent(as_recent({"u3": [("i5", 1.0)]}), max_len=10)
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(
        RecommendRequest(user_id="u3", recent_items=["i1"], n=N_ITEMS, exclude_consumed=False)
    )
    ids, _ = reference(
        svc.model.artifact, user="u3", history=[("i1", 1.0)], exclude=set(), n=N_ITEMS
    )
    assert rec.item_ids == ids and sorted(ids) == sorted(ITEM_IDS)


async def test_unknown_items_ignored_and_named(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir)
    rec = await svc.recommend(
        RecommendRequest(user_id="u1", recent_items=["nope", "i2", "zz"], n=4)
    )
    ids, _ = reference(svc.model.artifact, user="u1", history=[("i2", 1.0)], exclude={"i2"}, n=4)
    assert rec.item_ids == ids
    assert rec.warnings == ["unknown item ids ignored: 'nope', 'zz'"]


async def test_many_unknown_items_are_counted_not_all_listed(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir)
    rec = await svc.recommend(
        RecommendRequest(user_id="u1", recent_items=[f"x{i}" for i in range(25)], n=2)
    )
    assert rec.warnings[0].endswith("'x9' and 15 more")
    assert rec.source == "policy"  # known user: the policy answers even without history


async def test_unknown_user_with_history_uses_the_policy_with_user_zero(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir)
    rec = await svc.recommend(RecommendRequest(user_id="new-user", recent_items=["i4"], n=3))
    ids, scores = reference(
        svc.model.artifact, user="new-user", history=[("i4", 1.0)], exclude={"i4"}, n=3
    )
    assert rec.source == "policy"
    assert rec.item_ids == ids
    np.testing.assert_allclose(rec.scores, scores, rtol=1e-6)
    assert rec.warnings == ["unknown user 'new-user': scored from its recent items"]


async def test_unknown_user_with_store_history_uses_the_policy(artifact_dir: Path) -> None:
    store = MemoryStore()
    await store.push_recent(as_recent({"fresh": [("i8", 1.0)]}), max_len=5)
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(RecommendRequest(user_id="fresh", n=3))
    ids, _ = reference(svc.model.artifact, user="fresh", history=[("i8", 1.0)], exclude={"i8"}, n=3)
    assert rec.source == "policy" and rec.item_ids == ids


async def test_unknown_user_without_history_gets_realtime_popular(artifact_dir: Path) -> None:
    store = MemoryStore()
    await store.set_popular([("i9", 50.0), ("i3", 40.0), ("new-item", 30.0), ("i1", 20.0)])
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(RecommendRequest(user_id="stranger", n=3))
    assert rec.source == "popular"
    assert rec.item_ids == ["i9", "i3", "new-item"]  # real-time ids need not be in the artifact
    assert rec.scores == [50.0, 40.0, 30.0]
    # consumed items are skipped in the popular list too
    rec = await svc.recommend(
        RecommendRequest(user_id="stranger", recent_items=["unknown-x", "i3"], n=3)
    )
    # i3 is known, so this user has history: the policy answers
    assert rec.source == "policy"
    rec = await svc.recommend(RecommendRequest(user_id="stranger", recent_items=["zz"], n=3))
    assert rec.source == "popular" and rec.item_ids == ["i9", "i3", "new-item"]
    assert rec.warnings[0] == "unknown item ids ignored: 'zz'"
    # asked to explore, it still answers the deterministic popular list: no drawn seed
    rec = await svc.recommend(RecommendRequest(user_id="stranger", n=3, policy="softmax"))
    assert rec.source == "popular" and rec.seed is None


async def test_popular_excludes_consumed_raw_ids(artifact_dir: Path) -> None:
    store = MemoryStore()
    await store.set_popular([("new-a", 5.0), ("new-b", 4.0), ("i2", 3.0)])
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(RecommendRequest(user_id="stranger", recent_items=["new-a"], n=5))
    assert rec.source == "popular" and rec.item_ids == ["new-b", "i2"]


async def test_empty_store_falls_back_to_train_popularity(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir)
    rec = await svc.recommend(RecommendRequest(user_id="stranger", n=4))
    assert rec.source == "popular"
    assert rec.item_ids == ["i1", "i2", "i3", "i4"]
    assert rec.scores == [12.0, 11.0, 10.0, 9.0]


async def test_store_down_answers_from_memory(artifact_dir: Path) -> None:
    store = open_store("redis://127.0.0.1:1/0", timeout_s=0.2)
    svc = make_service(artifact_dir, store)
    rec = await svc.recommend(RecommendRequest(user_id="stranger", n=3))
    assert rec.source == "popular" and rec.item_ids == ["i1", "i2", "i3"]
    assert any("online store unavailable" in w for w in rec.warnings)
    rec = await svc.recommend(RecommendRequest(user_id="u1", n=3))
    ids, _ = reference(svc.model.artifact, user="u1", history=[], exclude=set(), n=3)
    assert rec.source == "policy" and rec.item_ids == ids
    assert await svc.readiness() == ["online store unreachable"]
    assert (await svc.popular(2)).source == "train"
    await store.close()


async def test_store_is_benched_after_a_failure(artifact_dir: Path) -> None:
    class CountingDown(MemoryStore):
        calls = 0

        async def get_recent(self, users, *, n):  # type: ignore[no-untyped-def]
            CountingDown.calls += 1
            raise ConnectionError("down")

    svc = make_service(artifact_dir, CountingDown(), store_retry_s=60.0)
    for _ in range(5):
        await svc.recommend(RecommendRequest(user_id="u1", n=2))
    assert CountingDown.calls == 1  # not hammered while down


async def test_n_larger_than_catalogue_and_all_excluded(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir, max_n=100)
    rec = await svc.recommend(RecommendRequest(user_id="u1", n=100))
    assert len(rec.item_ids) == N_ITEMS and sorted(rec.item_ids) == sorted(ITEM_IDS)
    rec = await svc.recommend(RecommendRequest(user_id="u1", recent_items=ITEM_IDS, n=5))
    assert rec.item_ids == [] and rec.scores == []


async def test_batch_equals_one_by_one(artifact_dir: Path) -> None:
    store = MemoryStore()
    await store.push_recent(
        as_recent({"u1": [("i2", 1.0), ("i3", 0.5)], "u4": [("i7", 2.0)]}), max_len=5
    )
    await store.set_popular([("i12", 9.0), ("i11", 8.0)])
    svc = make_service(artifact_dir, store, microbatch=False)
    reqs = [
        RecommendRequest(user_id="u1", n=4),
        RecommendRequest(user_id="u4", n=2, exclude_consumed=False),
        RecommendRequest(user_id="u2", recent_items=["i1", "bogus"], n=6),
        RecommendRequest(user_id="stranger", n=2),
        RecommendRequest(user_id="stranger2", recent_items=["i5"], n=3),
        RecommendRequest(user_id="u1", n=1),
    ]
    batch = await svc.recommend_many(reqs)
    single = [(await svc.recommend_many([r]))[0] for r in reqs]
    assert [b.source for b in batch] == [
        "policy",
        "policy",
        "policy",
        "popular",
        "policy",
        "policy",
    ]
    for b, s in zip(batch, single, strict=True):
        assert b.item_ids == s.item_ids
        np.testing.assert_allclose(b.scores, s.scores, rtol=1e-5, atol=1e-6)
        assert b.warnings == s.warnings
    assert batch_stats(svc) == (6, 10)  # one call of 5 policy rows, then 5 of one


async def test_microbatcher_gathers_concurrent_requests(artifact_dir: Path) -> None:
    svc = make_service(artifact_dir, microbatch=True)
    reqs = [
        RecommendRequest(user_id=f"u{1 + i % 5}", recent_items=[f"i{1 + i % 12}"], n=3)
        for i in range(20)
    ]
    together = await asyncio.gather(*[svc.recommend(r) for r in reqs])
    alone = [(await svc.recommend_many([r]))[0] for r in reqs]
    for a, b in zip(together, alone, strict=True):
        assert a.item_ids == b.item_ids
    # 20 concurrent submissions → one forward pass of 20 rows, then 20 of one row
    assert batch_stats(svc) == (21, 40)


async def test_microbatcher_splits_and_propagates_errors() -> None:
    sizes: list[int] = []

    async def run(batch: list[int]) -> list[int]:
        sizes.append(len(batch))
        if -1 in batch:
            raise RuntimeError("boom")
        return [x * 2 for x in batch]

    mb: MicroBatcher[int, int] = MicroBatcher(run, max_size=4)
    assert await asyncio.gather(*[mb.submit(i) for i in range(10)]) == [2 * i for i in range(10)]
    assert sizes == [4, 4, 2]
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.gather(mb.submit(1), mb.submit(-1))
    await mb.drain()


async def test_reload_swaps_and_in_flight_requests_keep_their_model(
    artifact_dir: Path, artifact_dir_b: Path
) -> None:
    gate = asyncio.Event()

    class SlowStore(MemoryStore):
        async def get_recent(self, users, *, n):  # type: ignore[no-untyped-def]
            await gate.wait()
            return await super().get_recent(users, n=n)

    svc = make_service(artifact_dir, SlowStore(), microbatch=False)
    old = svc.model.model_version
    in_flight = asyncio.ensure_future(svc.recommend(RecommendRequest(user_id="u1", n=3)))
    await asyncio.sleep(0.01)
    res = await svc.reload(artifact_dir_b)
    gate.set()
    rec = await in_flight
    assert res.previous_model_version == old
    assert res.model_version == svc.model.model_version != old
    assert rec.model_version == old
    ids, _ = reference(load_artifact(artifact_dir), user="u1", history=[], exclude=set(), n=3)
    assert rec.item_ids == ids
    after = await svc.recommend(RecommendRequest(user_id="u1", n=3))
    assert after.model_version == res.model_version


async def test_reload_refuses_a_broken_artifact(artifact_dir: Path, tmp_path: Path) -> None:
    svc = make_service(artifact_dir)
    old = svc.model
    broken = build_artifact(tmp_path / "broken", seed=3)
    (broken / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="sha256"):
        await svc.reload(broken)
    with pytest.raises(ArtifactError, match="no such artifact"):
        await svc.reload(tmp_path / "missing")
    assert svc.model is old and svc.artifact_path == artifact_dir


def test_loaded_model_precomputes_raw_ids_and_popularity(artifact_dir: Path) -> None:
    m = LoadedModel.load(artifact_dir)
    assert m.item_ids[0] == "" and m.item_ids[1:].tolist() == ITEM_IDS
    assert m.train_popular.tolist() == list(range(1, N_ITEMS + 1))
    assert m.history_len == 3 and m.n_items == N_ITEMS


async def test_history_source_request_never_reads_recent_items(artifact_dir: Path) -> None:
    class NoRecent(MemoryStore):
        async def get_recent(self, users, *, n):  # type: ignore[no-untyped-def]
            raise AssertionError("the store's recent items must not be read")

    svc = make_service(artifact_dir, NoRecent(), history_source="request")
    rec = await svc.recommend(RecommendRequest(user_id="u1", n=3))
    ids, _ = reference(svc.model.artifact, user="u1", history=[], exclude=set(), n=3)
    assert rec.source == "policy" and rec.item_ids == ids and rec.warnings == []


@pytest.mark.parametrize("kind", ["concat", "gru"])
async def test_onnxruntime_inference_answers_as_torch(tmp_path: Path, kind: str) -> None:
    art = build_artifact(tmp_path / kind, kind=kind)
    store = MemoryStore()
    await store.push_recent(as_recent({"u1": [("i2", 1.0), ("i5", 0.5)]}), max_len=5)
    reqs = [
        RecommendRequest(user_id="u1", n=5),
        RecommendRequest(user_id="u2", recent_items=["i3", "i4", "i9"], n=N_ITEMS),
        RecommendRequest(user_id="stranger", recent_items=["i1"], n=4),
    ]
    answers = {}
    for inference in ("torch", "onnxruntime"):
        model = LoadedModel.load(art, inference=inference)
        assert model.inference == inference
        svc = RecommenderService(
            settings=settings_for(art, inference=inference), store=store, model=model
        )
        answers[inference] = await svc.recommend_many(reqs)
    for t, o in zip(answers["torch"], answers["onnxruntime"], strict=True):
        assert o.item_ids == t.item_ids and o.source == t.source
        np.testing.assert_allclose(o.scores, t.scores, rtol=1e-4, atol=1e-5)


def test_unknown_inference_engine_is_a_settings_error(artifact_dir: Path) -> None:
    with pytest.raises(ValueError, match="inference"):
        settings_for(artifact_dir, inference="tensorrt")


async def _corrupt_popular_then_recommend(
    store: OnlineStore, corrupt: Callable[[], Awaitable[None]], artifact_dir: Path,
    caplog: pytest.LogCaptureFixture, key: str,
) -> None:  # fmt: skip
    """Garbage under the popular key: that read falls back to the train counts, with a
    warning naming the key; the store stays in use for everything else."""
    await store.push_recent(as_recent({"u1": [("i2", 1.0), ("i5", 1.0)]}), max_len=5)
    await corrupt()
    svc = make_service(artifact_dir, store, store_retry_s=60.0, popular_cache_s=0.0)
    with caplog.at_level("WARNING", logger="recloop"):
        rec = await svc.recommend(RecommendRequest(user_id="stranger", n=3))
    assert rec.source == "popular" and rec.item_ids == ["i1", "i2", "i3"]
    assert rec.warnings[0] == "online store's popular items unreadable: popular items from training"
    assert any(key in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    assert svc.store_available()
    # the store is still read: u1's stored items are its history and are excluded
    rec = await svc.recommend(RecommendRequest(user_id="u1", n=N_ITEMS))
    assert rec.source == "policy" and rec.warnings == []
    assert not {"i2", "i5"} & set(rec.item_ids)
    assert (await svc.popular(2)).source == "train"
    get = svc.metrics.registry.get_sample_value
    assert get("recloop_fallbacks_total", {"reason": "store_corrupt"}) == 2.0
    assert get("recloop_fallbacks_total", {"reason": "store_unavailable"}) == 0.0


async def test_corrupt_popular_in_sqlite_is_not_an_outage(
    artifact_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "store.db"
    store = SqliteStore(path)

    async def corrupt() -> None:
        await store.set_popular([("i9", 1.0)])
        conn = sqlite3.connect(path)
        conn.execute("UPDATE recloop_popular SET items = 'garbage' WHERE id = 0")
        conn.commit()
        conn.close()

    await _corrupt_popular_then_recommend(store, corrupt, artifact_dir, caplog, "recloop_popular")
    await store.close()


@pytest.mark.integration
async def test_corrupt_popular_in_redis_is_not_an_outage(
    artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(REDIS_URL, prefix=f"recloop-test:{uuid.uuid4().hex}:")
    if not await store.ping():
        await store.close()
        pytest.skip(f"no Redis at {REDIS_URL}")

    async def corrupt() -> None:
        await store._client.set(f"{store.prefix}popular", b"\x00not json")

    try:
        await _corrupt_popular_then_recommend(
            store, corrupt, artifact_dir, caplog, f"{store.prefix}popular"
        )
    finally:
        await store.delete_all()
        await store.close()


async def test_recent_rewards_reach_the_state(artifact_dir: Path) -> None:
    # the artifact's encoder reads rewards: a history of ignored items (reward 0) is another
    # state than the same items clicked, and the answer is the reference's for those rewards
    svc = make_service(artifact_dir)
    hist = [("i2", 0.0), ("i5", 3.0)]
    rec = await svc.recommend(
        RecommendRequest.model_validate(
            {
                "user_id": "u1",
                "recent_items": [{"item": "i2", "reward": 0.0}, {"item": "i5", "reward": 3.0}],
                "n": 4,
            }
        )
    )
    ids, scores = reference(svc.model.artifact, user="u1", history=hist, exclude={"i2", "i5"}, n=4)
    assert rec.item_ids == ids
    np.testing.assert_allclose(rec.scores, scores, rtol=1e-6)
    ones, _ = reference(
        svc.model.artifact, user="u1", history=[("i2", 1.0), ("i5", 1.0)], exclude=set(), n=11
    )
    default = await svc.recommend(
        RecommendRequest(user_id="u1", recent_items=["i2", "i5"], exclude_consumed=False, n=11)
    )
    assert default.item_ids == ones  # bare ids: every recent item has reward 1, as before
    mixed = await svc.recommend(
        RecommendRequest.model_validate(
            {"user_id": "u1", "recent_items": [{"item": "i2", "reward": 0.0}, "i5"], "n": 4}
        )
    )
    ids, _ = reference(
        svc.model.artifact, user="u1", history=[("i2", 0.0), ("i5", 1.0)], exclude={"i2", "i5"}, n=4
    )
    assert mixed.item_ids == ids


def test_rewarded_recent_items_are_strict() -> None:
    for bad in (
        [{"item": "i2"}],  # no reward
        [{"item": "i2", "reward": 1.0, "extra": 1}],
        [{"item": "i2", "reward": float("nan")}],
        [{"item": "i2", "reward": "1"}],
    ):
        with pytest.raises(ValueError):
            RecommendRequest.model_validate({"user_id": "u1", "recent_items": bad})


async def test_cold_start_policy_explores_from_the_first_request(artifact_dir: Path) -> None:
    # a user nobody knows, without history: with cold_start "policy" the list is drawn by the
    # request's policy from the empty state -- epsilon 1 is uniform over the catalogue, with
    # that propensity -- instead of the deterministic popular fallback (propensity 1)
    svc = make_service(artifact_dir, cold_start="policy")
    seen = set()
    for seed in range(60):
        rec = await svc.recommend(
            RecommendRequest(user_id="nobody", n=1, policy="epsilon", epsilon=1.0, seed=seed)
        )
        assert rec.source == "policy"
        assert rec.propensities == [pytest.approx(1 / N_ITEMS)]
        seen.add(rec.item_ids[0])
    assert len(seen) > N_ITEMS // 2  # not one fixed item
    popular = make_service(artifact_dir)  # the default keeps the popular fallback
    rec = await popular.recommend(
        RecommendRequest(user_id="nobody", n=1, policy="epsilon", epsilon=1.0, seed=1)
    )
    assert rec.source == "popular" and rec.item_ids == ["i1"]


async def test_metrics_show_the_stream_workers_per_arm_feedback(artifact_dir: Path) -> None:
    import time

    from serve_helpers import running

    from recloop.serving.app import create_app

    app = create_app(settings_for(artifact_dir))
    async with running(app) as client:
        plain = (await client.get("/metrics")).text
        assert "recloop_ab_attributed_clicks" not in plain  # no worker reported arms
        store = app.state.service.store
        arms = {"ctl": {"impressions": 10, "clicks": 3, "reward": 4.5}}
        await store.put_heartbeat("w1", {"ts": time.time(), "arms": arms})
        text = (await client.get("/metrics")).text
    assert 'recloop_ab_settled_impressions_total{arm="ctl",worker="w1"} 10.0' in text
    assert 'recloop_ab_attributed_clicks_total{arm="ctl",worker="w1"} 3.0' in text
    assert 'recloop_ab_attributed_reward_total{arm="ctl",worker="w1"} 4.5' in text
    assert "recloop_http_requests_total" in text  # the service's own metrics stay


async def test_nan_and_inf_scores_are_never_shown_and_lists_stay_full(
    artifact_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A model that gives NaN or +inf for some items (a numerical fault): every policy fills
    its list from the finite scores; top-k used to rank +inf first, then drop it."""
    import dataclasses

    row = np.array(
        [-np.inf, 5, np.inf, np.nan, 1, 1, 1, 0.5, np.inf, -1, 2, 3, 0], np.float32
    )  # padding, then i1..i12: i2, i3, i8 are not finite

    def faulty(user: np.ndarray, hist: np.ndarray, rew: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.repeat(row[None, :], len(user), 0))

    model = dataclasses.replace(LoadedModel.load(artifact_dir), scorer=faulty)
    svc = RecommenderService(settings=settings_for(artifact_dir), store=MemoryStore(), model=model)
    shown: dict[str, list[str]] = {}
    for policy, extra in (("topk", {}), ("epsilon", {"epsilon": 0.5}), ("softmax", {})):
        req = RecommendRequest(
            user_id="u1", policy=policy, n=5, recent_items=["i9"], seed=3, **extra
        )
        rec = await svc.recommend(req)
        shown[policy] = rec.item_ids
        assert len(rec.item_ids) == 5, (policy, rec.item_ids)
        assert not {"i2", "i3", "i8", "i9"} & set(rec.item_ids)
        assert all(math.isfinite(v) for v in rec.scores)
    # 5, 3, 2, then two of the three tied at 1
    assert shown["topk"][:3] == ["i1", "i11", "i10"]
    assert set(shown["topk"][3:]) < {"i4", "i5", "i6"}
    assert "gave 3 NaN or +inf scores in a batch" in caplog.text
