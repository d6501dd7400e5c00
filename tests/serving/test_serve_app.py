"""The HTTP service: every route, every error path, API key, reload, store fallbacks."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from serve_helpers import (
    ITEM_IDS,
    N_ITEMS,
    ServeFactory,
    as_recent,
    build_artifact,
    running,
    settings_for,
)

from recloop.artifacts import load_artifact
from recloop.serving.app import create_app
from recloop.stores import RedisStore, open_store


async def test_recommend_round_trip(serve: ServeFactory, store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    async with serve(store_url=url, store_prefix=prefix) as (client, svc):
        await svc.store.push_recent(as_recent({"u1": [("i2", 1.0), ("i5", 0.5)]}), max_len=3)
        r = await client.post("/v1/recommend", json={"user_id": "u1", "n": 4})
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert set(body) == {
            "recommendation_id",
            "items",
            "slate_propensity",
            "policy",
            "model_version",
            "arm",
            "source",
            "warnings",
        }
        assert body["source"] == "policy" and body["warnings"] == []
        # today's behaviour is the default: deterministic, every propensity 1
        assert body["policy"] == {
            "name": "topk",
            "temperature": None,
            "epsilon": None,
            "seed": None,
        }
        assert body["slate_propensity"] == 1.0
        assert [x["propensity"] for x in body["items"]] == [1.0] * 4
        assert body["model_version"] == svc.model.model_version
        ids = [x["item_id"] for x in body["items"]]
        scores = [x["score"] for x in body["items"]]
        assert len(ids) == 4 and not {"i2", "i5"} & set(ids) and set(ids) <= set(ITEM_IDS)
        assert scores == sorted(scores, reverse=True)
        direct = await svc.recommend_many([_req("u1", n=4)])
        assert ids == direct[0].item_ids
        if isinstance(svc.store, RedisStore):
            await svc.store.delete_all()


async def test_gc_freeze_setting(tmp_path: Path) -> None:
    artifact = build_artifact(tmp_path / "a")
    gc.unfreeze()
    async with running(create_app(settings_for(artifact, gc_freeze=False))):
        assert gc.get_freeze_count() == 0
    try:
        async with running(create_app(settings_for(artifact, gc_freeze=True))) as client:
            assert gc.get_freeze_count() > 0
            assert (await client.get("/healthz")).status_code == 200
    finally:
        gc.unfreeze()


def _req(user: str, **kw: Any) -> Any:
    from recloop.serving.schemas import RecommendRequest

    return RecommendRequest(user_id=user, **kw)


async def test_batch_route_equals_single_routes(
    serve: ServeFactory, store_url: tuple[str, str]
) -> None:
    url, prefix = store_url
    async with serve(store_url=url, store_prefix=prefix) as (client, svc):
        await svc.store.push_recent(as_recent({"u3": [("i1", 1.0)]}), max_len=3)
        await svc.store.set_popular([("i7", 3.0), ("i8", 2.0)])
        reqs: list[dict[str, Any]] = [
            {"user_id": "u3", "n": 3},
            {"user_id": "u4", "recent_items": ["i2", "what"], "n": 2},
            {"user_id": "nobody", "n": 5},
            {"user_id": 2, "n": 3, "exclude_consumed": False},
        ]
        r = await client.post("/v1/recommend/batch", json={"requests": reqs})
        assert r.status_code == 200
        results = r.json()["results"]
        singles = [(await client.post("/v1/recommend", json=q)).json() for q in reqs]
        for b, s in zip(results, singles, strict=True):
            assert [x["item_id"] for x in b["items"]] == [x["item_id"] for x in s["items"]]
            assert [x["score"] for x in b["items"]] == pytest.approx(
                [x["score"] for x in s["items"]], rel=1e-5, abs=1e-6
            )  # batched matmuls may differ in the last bits
            # each served list has its own id
            assert b["recommendation_id"] != s["recommendation_id"]
            assert {k: v for k, v in b.items() if k not in ("items", "recommendation_id")} == {
                k: v for k, v in s.items() if k not in ("items", "recommendation_id")
            }
        assert [x["source"] for x in results] == ["policy", "policy", "popular", "popular"]
        assert [x["item_id"] for x in results[2]["items"]] == ["i7", "i8"]
        if isinstance(svc.store, RedisStore):
            await svc.store.delete_all()


async def test_popular_route(serve: ServeFactory) -> None:
    async with serve(default_n=3, max_n=20) as (client, svc):
        r = await client.get("/v1/popular")
        assert r.status_code == 200
        assert r.json()["source"] == "train"
        assert [x["item_id"] for x in r.json()["items"]] == ["i1", "i2", "i3"]
        await svc.store.set_popular([("a", 3.0), ("b", 2.0), ("c", 1.0)])
        svc._popular_cache = None  # the cache would otherwise hold the empty list for 1 s
        r = await client.get("/v1/popular", params={"n": 2})
        assert r.json() == {
            "items": [{"item_id": "a", "score": 3.0}, {"item_id": "b", "score": 2.0}],
            "source": "realtime",
            "model_version": svc.model.model_version,
        }
        for bad, field in [("0", "n"), ("-3", "n"), ("abc", "n"), ("21", "n"), ("1e9", "n")]:
            r = await client.get("/v1/popular", params={"n": bad})
            assert r.status_code == 422, bad
            assert r.json()["detail"][0]["loc"] == ["query", field]


async def test_health_ready_and_metrics(serve: ServeFactory) -> None:
    async with serve() as (client, svc):
        v = svc.model.model_version
        r = await client.get("/healthz")
        assert r.json() == {"status": "ok", "model_version": v, "canary": None}
        assert r.headers["x-model-version"] == v
        r = await client.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {
            "status": "ready",
            "model_version": svc.model.model_version,
            "reasons": [],
        }
        await client.post("/v1/recommend", json={"user_id": "u1"})
        await client.post("/v1/recommend", json={"user_id": "stranger"})
        await client.post("/v1/recommend", json={"user_id": ""})
        await client.get("/no/such/route")
        text = (await client.get("/metrics")).text
        v = svc.model.model_version
        assert 'recloop_http_requests_total{route="/v1/recommend",status="200"} 2.0' in text
        assert 'recloop_http_requests_total{route="/v1/recommend",status="422"} 1.0' in text
        assert 'recloop_http_requests_total{route="other",status="404"} 1.0' in text
        assert 'recloop_http_request_duration_seconds_count{route="/v1/recommend"} 3.0' in text
        assert 'recloop_fallbacks_total{reason="unknown_user"} 1.0' in text
        assert 'recloop_fallbacks_total{reason="train_popular"} 1.0' in text
        assert 'recloop_recommendations_total{source="policy"} 1.0' in text
        assert f'recloop_model_info{{model_version="{v}"}} 1.0' in text


# Every one of these must be answered with a 4xx, never a 500.
ODD_BODIES: list[tuple[str, Any, int, list[Any] | None]] = [
    ("empty object", {}, 422, ["body", "user_id"]),
    ("huge n", {"user_id": "u1", "n": 10**30}, 422, ["body", "n"]),
    ("n above max_n", {"user_id": "u1", "n": 101}, 422, ["body", "n"]),
    ("zero n", {"user_id": "u1", "n": 0}, 422, ["body", "n"]),
    ("negative n", {"user_id": "u1", "n": -5}, 422, ["body", "n"]),
    ("fractional n", {"user_id": "u1", "n": 2.5}, 422, ["body", "n"]),
    ("string n", {"user_id": "u1", "n": "ten"}, 422, ["body", "n"]),
    ("list user", {"user_id": ["u1"]}, 422, ["body", "user_id"]),
    ("dict user", {"user_id": {"a": 1}}, 422, ["body", "user_id"]),
    ("bool user", {"user_id": True}, 422, ["body", "user_id"]),
    ("null user", {"user_id": None}, 422, ["body", "user_id"]),
    ("empty user", {"user_id": ""}, 422, ["body", "user_id"]),
    ("very long user", {"user_id": "x" * 10_000}, 422, ["body", "user_id"]),
    ("items not a list", {"user_id": "u1", "recent_items": "i1"}, 422, ["body", "recent_items"]),
    (
        "null item",
        {"user_id": "u1", "recent_items": ["i1", None]},
        422,
        ["body", "recent_items", 1, "id"],
    ),
    (
        "nested item",
        {"user_id": "u1", "recent_items": [["i1"]]},
        422,
        ["body", "recent_items", 0, "id"],
    ),
    (
        "rewarded item without reward",
        {"user_id": "u1", "recent_items": [{"item": "i1"}]},
        422,
        ["body", "recent_items", 0, "rewarded", "reward"],
    ),
    (
        "very long list",
        {"user_id": "u1", "recent_items": [f"i{i}" for i in range(5000)]},
        422,
        ["body", "recent_items"],
    ),
    (
        "bad exclude flag",
        {"user_id": "u1", "exclude_consumed": "maybe"},
        422,
        ["body", "exclude_consumed"],
    ),
    ("unknown field", {"user_id": "u1", "limit": 3}, 422, ["body", "limit"]),
    # what the schema forbids is refused, not coerced
    ("numeric string n", {"user_id": "u1", "n": "3"}, 422, ["body", "n"]),
    ("bool n", {"user_id": "u1", "n": True}, 422, ["body", "n"]),
    (
        "int exclude flag",
        {"user_id": "u1", "exclude_consumed": 0},
        422,
        ["body", "exclude_consumed"],
    ),
    (
        "string exclude flag",
        {"user_id": "u1", "exclude_consumed": "true"},
        422,
        ["body", "exclude_consumed"],
    ),
    ("fractional user", {"user_id": 196.5}, 422, ["body", "user_id"]),
    ("huge integer user", {"user_id": 10**30}, 422, ["body", "user_id"]),
    (
        "fractional item",
        {"user_id": "u1", "recent_items": [2.5]},
        422,
        ["body", "recent_items", 0, "id"],
    ),
    (
        "bool item",
        {"user_id": "u1", "recent_items": [True]},
        422,
        ["body", "recent_items", 0, "id"],
    ),
    ("array body", [1, 2], 422, ["body"]),
    ("string body", "u1", 422, ["body"]),
    ("null body", None, 422, ["body"]),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "loc"), ODD_BODIES, ids=[b[0] for b in ODD_BODIES]
)
async def test_odd_json_bodies_are_422_naming_the_field(
    serve: ServeFactory, name: str, body: Any, status: int, loc: list[Any] | None
) -> None:
    async with serve() as (client, _):
        r = await client.post("/v1/recommend", json=body)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert detail[0]["loc"] == loc
        assert detail[0]["msg"]


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        (b"", {"content-type": "application/json"}, 422),
        (b"{not json", {"content-type": "application/json"}, 422),
        (b"\xff\xfe\x00garbage", {"content-type": "application/json"}, 422),
        (b'{"user_id": "u1"}', {"content-type": "text/plain"}, 415),
        (b"user_id=u1", {"content-type": "application/x-www-form-urlencoded"}, 415),
        (b'{"user_id": "u1"}', {"content-type": "application/json; charset=utf-8"}, 200),
        (b'{"user_id": "u1"}', {"content-type": "application/vnd.api+json"}, 200),
        (b'{"user_id": "u1"}', {}, 200),
        (b" " * (5 * 1024 * 1024), {"content-type": "application/json"}, 413),
    ],
)
async def test_raw_bodies(
    serve: ServeFactory, content: bytes, headers: dict[str, str], status: int
) -> None:
    async with serve() as (client, _):
        for path in ("/v1/recommend", "/v1/recommend/batch"):
            r = await client.post(path, content=content, headers=headers)
            expected = 422 if (status == 200 and path.endswith("batch")) else status
            assert r.status_code == expected, (path, r.text[:200])
            assert "detail" in r.json() or expected == 200


async def test_wrong_methods_and_paths(serve: ServeFactory) -> None:
    async with serve() as (client, _):
        assert (await client.get("/v1/recommend")).status_code == 405
        assert (await client.put("/v1/recommend/batch", json={})).status_code == 405
        assert (await client.post("/healthz")).status_code == 405
        r = await client.get("/nowhere")
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


async def test_unicode_and_numeric_ids(serve: ServeFactory) -> None:
    async with serve() as (client, _):
        r = await client.post(
            "/v1/recommend", json={"user_id": "ユーザー🎬", "recent_items": ["ü", "i3", "\u0000"]}
        )
        assert r.status_code == 200
        body = r.json()
        assert body["source"] == "policy"  # i3 is known: the unknown user is scored from it
        assert body["warnings"][0] == "unknown item ids ignored: 'ü', '\\x00'"
        r = await client.post("/v1/recommend", json={"user_id": 3, "recent_items": [1, 2]})
        assert r.status_code == 200
        assert r.json()["warnings"] == [
            "unknown item ids ignored: '1', '2'",
            "unknown user '3' without known recent items: popular items",
        ]


async def test_batch_validation(serve: ServeFactory) -> None:
    async with serve(max_batch=3) as (client, _):
        r = await client.post("/v1/recommend/batch", json={"requests": []})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "requests"]
        many = [{"user_id": "u1"}] * 4
        r = await client.post("/v1/recommend/batch", json={"requests": many})
        assert r.status_code == 422 and "at most 3" in r.json()["detail"][0]["msg"]
        r = await client.post(
            "/v1/recommend/batch",
            json={"requests": [{"user_id": "u1"}, {"user_id": "u1", "n": -1}]},
        )
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "requests", 1, "n"]
        r = await client.post("/v1/recommend/batch", json={"user_id": "u1"})
        assert r.status_code == 422


async def test_api_key(serve: ServeFactory) -> None:
    async with serve(api_key="s3cret") as (client, _):
        body = {"user_id": "u1"}
        for method, path, kw in [
            ("POST", "/v1/recommend", {"json": body}),
            ("POST", "/v1/recommend/batch", {"json": {"requests": [body]}}),
            ("GET", "/v1/popular", {}),
            ("GET", "/metrics", {}),
            ("POST", "/admin/reload", {}),
            ("GET", "/openapi.json", {}),
            ("GET", "/nowhere", {}),
        ]:
            r = await client.request(method, path, **kw)
            assert r.status_code == 401, path
            assert r.json() == {"detail": "missing or wrong X-API-Key header"}
            r = await client.request(method, path, headers={"X-API-Key": "wrong"}, **kw)
            assert r.status_code == 401, path
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 200
        ok = {"X-API-Key": "s3cret"}
        assert (await client.post("/v1/recommend", json=body, headers=ok)).status_code == 200
        assert (await client.get("/v1/popular", headers=ok)).status_code == 200
        assert (await client.get("/metrics", headers=ok)).status_code == 200


async def test_reload_route(serve: ServeFactory, artifact_dir_b: Path, tmp_path: Path) -> None:
    async with serve(admin_localhost=True, artifact_root=tmp_path) as (client, svc):
        v0 = svc.model.model_version
        r = await client.post("/admin/reload", json={"artifact": str(artifact_dir_b)})
        assert r.status_code == 200, r.text
        v1 = load_artifact(artifact_dir_b).model_version
        assert r.json() == {
            "model_version": v1,
            "previous_model_version": v0,
            "artifact": str(artifact_dir_b.resolve()),
        }
        assert r.headers["x-model-version"] == v1
        rec = (await client.post("/v1/recommend", json={"user_id": "u1"})).json()
        assert rec["model_version"] == v1
        # no body: the current artifact path, read again
        r = await client.post("/admin/reload")
        assert r.status_code == 200 and r.json()["model_version"] == v1
        # broken artifacts are refused, the served one stays
        broken = build_artifact(tmp_path / "broken", seed=5)
        (broken / "manifest.json").write_text("{not json")
        r = await client.post("/admin/reload", json={"artifact": str(broken)})
        assert r.status_code == 400
        assert "invalid JSON" in r.json()["detail"] and str(broken) in r.json()["detail"]
        r = await client.post("/admin/reload", json={"artifact": str(tmp_path / "missing")})
        assert r.status_code == 400 and "no such artifact" in r.json()["detail"]
        r = await client.post("/admin/reload", json={"artifact": 5, "extra": 1})
        assert r.status_code == 422
        assert svc.model.model_version == v1
        rec = (await client.post("/v1/recommend", json={"user_id": "u1"})).json()
        assert rec["model_version"] == v1
        text = (await client.get("/metrics")).text
        assert 'recloop_model_reloads_total{outcome="ok"} 2.0' in text
        assert 'recloop_model_reloads_total{outcome="refused"} 2.0' in text
        assert f'recloop_model_info{{model_version="{v0}"}} 0.0' in text
        assert f'recloop_model_info{{model_version="{v1}"}} 1.0' in text


async def test_reload_under_load_answers_every_request(
    serve: ServeFactory, artifact_dir_b: Path, tmp_path: Path
) -> None:
    async with serve(admin_localhost=True, artifact_root=tmp_path) as (client, svc):
        v0 = svc.model.model_version
        body = {"user_id": "u2", "recent_items": ["i1"]}
        tasks = [asyncio.ensure_future(client.post("/v1/recommend", json=body)) for _ in range(30)]
        r = await client.post("/admin/reload", json={"artifact": str(artifact_dir_b)})
        tasks += [asyncio.ensure_future(client.post("/v1/recommend", json=body)) for _ in range(30)]
        responses = await asyncio.gather(*tasks)
        assert r.status_code == 200
        v1 = r.json()["model_version"]
        assert all(x.status_code == 200 for x in responses)
        assert {x.json()["model_version"] for x in responses} <= {v0, v1}
        assert responses[-1].json()["model_version"] == v1
        # the header names the model that answered, as the body does
        assert all(x.headers["x-model-version"] == x.json()["model_version"] for x in responses)


async def test_sighup_reloads_the_artifact_path(tmp_path: Path) -> None:
    served = tmp_path / "served"
    shutil.copytree(build_artifact(tmp_path / "a", seed=0), served)
    app = create_app(settings_for(served))
    async with running(app) as client:
        svc = app.state.service
        v0 = svc.model.model_version
        shutil.rmtree(served)
        shutil.copytree(build_artifact(tmp_path / "b", seed=7), served)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            if svc.model.model_version != v0:
                break
            await asyncio.sleep(0.02)
        assert svc.model.model_version == load_artifact(served).model_version != v0
        rec = (await client.post("/v1/recommend", json={"user_id": "u1"})).json()
        assert rec["model_version"] == svc.model.model_version
        # a broken artifact at the path: SIGHUP logs and keeps the model
        (served / "weights.safetensors").write_bytes(b"x")
        v1 = svc.model.model_version
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert svc.model.model_version == v1


async def test_store_down(artifact_dir: Path) -> None:
    app = create_app(
        settings_for(artifact_dir, store_url="redis://127.0.0.1:1/0", store_timeout_s=0.2)
    )
    async with running(app) as client:
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "unready"
        assert r.json()["reasons"] == ["online store unreachable"]
        r = await client.post("/v1/recommend", json={"user_id": "stranger", "n": 3})
        assert r.status_code == 200
        body = r.json()
        assert body["source"] == "popular"
        assert [x["item_id"] for x in body["items"]] == ["i1", "i2", "i3"]
        assert any("online store unavailable" in w for w in body["warnings"])
        r = await client.post("/v1/recommend", json={"user_id": "u1", "n": N_ITEMS})
        assert r.status_code == 200 and r.json()["source"] == "policy"
        assert len(r.json()["items"]) == N_ITEMS
        r = await client.get("/v1/popular", params={"n": 2})
        assert r.status_code == 200 and r.json()["source"] == "train"
        text = (await client.get("/metrics")).text
        assert 'recloop_fallbacks_total{reason="store_unavailable"}' in text


@pytest.mark.integration
async def test_store_comes_back(artifact_dir: Path) -> None:
    """Readiness turns green again and the store is used once Redis answers."""
    from serve_helpers import REDIS_URL

    probe = open_store(REDIS_URL)
    if not await probe.ping():
        await probe.close()
        pytest.skip("no Redis")
    await probe.close()
    app = create_app(
        settings_for(
            artifact_dir, store_url=REDIS_URL, store_prefix="recloop-test-back:", store_retry_s=0.0
        )
    )
    async with running(app) as client:
        svc = app.state.service
        svc._store_down_until = 1e18  # as after a failure
        r = await client.post("/v1/recommend", json={"user_id": "u1"})
        assert any("unavailable" in w for w in r.json()["warnings"])
        assert (await client.get("/readyz")).status_code == 200  # a good ping un-benches
        r = await client.post("/v1/recommend", json={"user_id": "u1"})
        assert r.json()["warnings"] == []
        assert isinstance(svc.store, RedisStore)
        await svc.store.delete_all()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_openapi_documents_the_bodies(serve: ServeFactory) -> None:
    async with serve() as (client, _):
        spec = (await client.get("/openapi.json")).json()
        post = spec["paths"]["/v1/recommend"]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/RecommendRequest"
        assert "user_id" in spec["components"]["schemas"]["RecommendRequest"]["properties"]
        assert "/v1/recommend/batch" in spec["paths"]
        assert "/admin/reload" not in spec["paths"]  # off without an admin key


async def test_openapi_references_resolve_and_declare_the_limits(serve: ServeFactory) -> None:
    """A client generated from the schema finds every component and knows every limit."""
    limits = {"max_n": 7, "default_n": 5, "max_batch": 3, "max_recent_items": 5}
    async with serve(**limits, admin_key="a") as (client, _):
        spec = (await client.get("/openapi.json")).json()
    components = spec["components"]["schemas"]
    refs = _refs(spec)
    assert "#/components/schemas/RecommendBatchRequest" in refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in components, ref
    one = components["RecommendRequest"]
    assert one["additionalProperties"] is False
    n = next(s for s in one["properties"]["n"]["anyOf"] if s.get("type") == "integer")
    assert (n["minimum"], n["maximum"]) == (1, 7)
    recent = next(s for s in one["properties"]["recent_items"]["anyOf"] if s["type"] == "array")
    assert recent["maxItems"] == 5
    user = one["properties"]["user_id"]["anyOf"]
    assert {"type": "string", "minLength": 1, "maxLength": 512} in user
    batch = components["RecommendBatchRequest"]["properties"]["requests"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 3)
    assert batch["items"] == {"$ref": "#/components/schemas/RecommendRequest"}
    (param,) = spec["paths"]["/v1/popular"]["get"]["parameters"]
    popular_n = next(s for s in param["schema"]["anyOf"] if s.get("type") == "integer")
    assert popular_n["maximum"] == 7
    assert "/admin/reload" in spec["paths"]


async def test_lifespan_closes_the_store(artifact_dir: Path) -> None:
    app = create_app(settings_for(artifact_dir))
    async with running(app):
        assert app.state.service is not None
    assert not hasattr(app.state, "service")
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/readyz")
        assert r.status_code == 503 and r.json()["reasons"] == ["model not loaded"]


def test_whole_numbers_are_ids_and_counts_as_json_schema_reads_them() -> None:
    from recloop.serving.schemas import Limits, request_models

    model = request_models(Limits(max_n=10, max_batch=2, max_recent_items=4)).recommend
    req = model.model_validate_json(b'{"user_id": 196.0, "recent_items": [7, 8.0, "x"], "n": 3.0}')
    assert (req.user_id, req.recent_items, req.n) == ("196", ["7", "8", "x"], 3)
    assert type(req.n) is int


# ----------------------------------------------------------------------------- body limit

JSON = "application/json"


async def test_chunked_body_over_the_limit_is_refused_while_it_streams(
    serve: ServeFactory,
) -> None:
    """A body without Content-Length is counted as it arrives: 413 after about 4 MiB were
    read, not after the whole body sat in memory."""
    from recloop.serving.routes import MAX_BODY_BYTES

    piece = b" " * (1 << 20)
    read = 0

    async def body() -> Any:
        nonlocal read
        for _ in range(64):
            read += len(piece)
            yield piece

    async with serve() as (client, _):
        for path in ("/v1/recommend", "/v1/recommend/batch"):
            read = 0
            r = await client.post(
                path, content=body(), headers={"content-type": "application/json"}
            )
            assert r.status_code == 413, r.text
            assert r.json() == {"detail": f"body exceeds {MAX_BODY_BYTES} bytes"}
            assert r.headers["connection"] == "close"
            assert read <= MAX_BODY_BYTES + len(piece)

        # a chunked body under the limit is read as usual
        async def small() -> Any:
            yield b'{"user_id": '
            yield b'"u1"}'

        r = await client.post("/v1/recommend", content=small())
        assert r.status_code == 200 and r.json()["source"] == "policy"
        text = (await client.get("/metrics")).text
        assert 'recloop_http_requests_total{route="/v1/recommend",status="413"} 1.0' in text


async def test_declared_length_over_the_limit_is_refused_before_the_body(
    artifact_dir: Path,
) -> None:
    """Content-Length over the limit: 413 without a single receive() (the app never runs)."""
    from recloop.serving.routes import MAX_BODY_BYTES

    app = create_app(settings_for(artifact_dir))
    async with running(app):
        received = 0
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            received += 1
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/recommend",
            "raw_path": b"/v1/recommend",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-length", str(MAX_BODY_BYTES + 1).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
            "app": app,
        }
        await app(scope, receive, send)
    assert sent[0]["status"] == 413 and received == 0


# ----------------------------------------------------------------------------- admin routes


async def test_admin_routes_are_off_without_an_admin_key(
    serve: ServeFactory, artifact_dir_b: Path
) -> None:
    async with serve() as (client, svc):
        v0 = svc.model.model_version
        for body in ({"artifact": str(artifact_dir_b)}, None, {"artifact": "/etc"}):
            r = await client.post("/admin/reload", json=body)
            assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
        assert svc.model.model_version == v0


async def test_admin_key(serve: ServeFactory, artifact_dir_b: Path, tmp_path: Path) -> None:
    body = {"artifact": str(artifact_dir_b)}
    async with serve(admin_key="adm", api_key="api", artifact_root=tmp_path) as (client, svc):
        v0 = svc.model.model_version
        for headers in ({}, {"X-Admin-Key": "wrong"}, {"X-API-Key": "api"}):
            r = await client.post("/admin/reload", json=body, headers=headers)
            assert r.status_code == 401, headers
            assert r.json() == {"detail": "missing or wrong X-Admin-Key header"}
        assert svc.model.model_version == v0
        r = await client.post("/admin/reload", json=body, headers={"X-Admin-Key": "adm"})
        assert r.status_code == 200 and svc.model.model_version != v0
        # the admin key opens the admin routes only
        r = await client.get("/v1/popular", headers={"X-Admin-Key": "adm"})
        assert r.status_code == 401


async def test_admin_localhost_only(artifact_dir: Path, tmp_path: Path) -> None:
    app = create_app(settings_for(artifact_dir, admin_localhost=True, artifact_root=tmp_path))
    async with app.router.lifespan_context(app):
        for host, status in [("127.0.0.1", 200), ("::1", 200), ("10.1.2.3", 404)]:
            transport = httpx.ASGITransport(app=app, client=(host, 5000))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                r = await client.post("/admin/reload")
                assert r.status_code == status, host


async def test_reload_paths_stay_under_the_artifact_root(
    serve: ServeFactory, artifact_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    inside = build_artifact(root / "runs" / "b", seed=3)
    outside = build_artifact(tmp_path / "outside", seed=4)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    async with serve(admin_localhost=True, artifact_root=root) as (client, svc):
        v0 = svc.model.model_version
        refused = [
            str(outside),  # exists, outside
            str(tmp_path / "no-such-dir"),  # does not exist, outside
            "/etc",
            "../outside",
            "escape",  # a symlink under the root to a directory outside it
            str(root / "runs" / ".." / ".." / "outside"),
            "x\x00y",
        ]
        details = []
        for path in refused:
            r = await client.post("/admin/reload", json={"artifact": path})
            assert r.status_code == 403, (path, r.text)
            details.append(r.json()["detail"].replace(repr(path), "PATH"))
        # one message for all: nothing tells an existing path from a missing one
        assert len(set(details)) == 1 and "artifact root" in details[0]
        assert svc.model.model_version == v0
        r = await client.post("/admin/reload", json={"artifact": "runs/b"})  # relative: root
        assert r.status_code == 200, r.text
        assert r.json()["artifact"] == str(inside.resolve())
        assert svc.model.model_version == load_artifact(inside).model_version
        # a path under the root that does not exist is an ordinary refusal
        r = await client.post("/admin/reload", json={"artifact": "runs/none"})
        assert r.status_code == 400 and "no such artifact" in r.json()["detail"]


async def test_reload_default_root_is_the_served_artifact(
    serve: ServeFactory, artifact_dir_b: Path
) -> None:
    async with serve(admin_localhost=True) as (client, svc):
        r = await client.post("/admin/reload", json={"artifact": str(artifact_dir_b)})
        assert r.status_code == 403
        r = await client.post("/admin/reload", json={"artifact": str(svc.artifact_path)})
        assert r.status_code == 200


async def test_reload_logs_client_paths_on_one_line(
    serve: ServeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "x\n2026-01-01 INFO recloop.serving.service: now serving FAKE\r\x1b[2J"
    async with serve(admin_localhost=True, artifact_root=tmp_path) as (client, _):
        with caplog.at_level("INFO", logger="recloop"):
            r = await client.post("/admin/reload", json={"artifact": forged})
            assert r.status_code == 400
            r = await client.post("/admin/reload", json={"artifact": "/elsewhere\n" + forged})
            assert r.status_code == 403
    # Only the reload lines: start-up lines are captured too when an earlier test left the
    # recloop logger at INFO.
    lines = [rec.getMessage() for rec in caplog.records if "2026-01-01" in rec.getMessage()]
    assert len(lines) == 2
    for line in lines:
        assert not any(c in line for c in "\n\r\x1b"), line
        assert "\\n2026-01-01" in line or "\\\\n2026-01-01" in line


# ----------------------------------------------------------------------------- model version


async def test_every_answer_names_its_model_version(serve: ServeFactory) -> None:
    async with serve() as (client, svc):
        v = svc.model.model_version
        for r in [
            await client.post("/v1/recommend", json={"user_id": "u1"}),
            await client.post("/v1/recommend", json={"user_id": "stranger"}),
            await client.post("/v1/recommend/batch", json={"requests": [{"user_id": "u1"}]}),
            await client.get("/v1/popular"),
            await client.get("/healthz"),
            await client.get("/readyz"),
        ]:
            assert r.status_code == 200 and r.headers["x-model-version"] == v


async def test_workers_share_reloads_through_the_reload_state(
    artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path
) -> None:
    """Two apps (as two worker processes would) on one reload state file: a reload in one
    reaches the other within the poll interval; a worker that starts later serves it too."""
    state = tmp_path / "state" / "reload.json"
    kw = {"admin_localhost": True, "artifact_root": tmp_path, "reload_state": state}
    a = create_app(settings_for(artifact_dir, reload_poll_s=0.05, **kw))
    b = create_app(settings_for(artifact_dir, reload_poll_s=0.05, **kw))
    v1 = load_artifact(artifact_dir_b).model_version
    async with running(a) as ca, running(b) as cb:
        v0 = b.state.service.model.model_version
        assert v0 != v1
        r = await ca.post("/admin/reload", json={"artifact": str(artifact_dir_b)})
        assert r.status_code == 200 and r.json()["model_version"] == v1
        for _ in range(100):
            if b.state.service.model.model_version == v1:
                break
            await asyncio.sleep(0.05)
        r = await cb.post("/v1/recommend", json={"user_id": "u1"})
        assert r.json()["model_version"] == v1 and r.headers["x-model-version"] == v1
        assert (await cb.get("/healthz")).json()["model_version"] == v1
        # a reload of the same path is news too: b reads the artifact again
        loads = b.state.service.metrics.registry.get_sample_value
        before = loads("recloop_model_reloads_total", {"outcome": "ok"})
        assert (await ca.post("/admin/reload")).status_code == 200
        for _ in range(100):
            if loads("recloop_model_reloads_total", {"outcome": "ok"}) == before + 1:
                break
            await asyncio.sleep(0.05)
        assert loads("recloop_model_reloads_total", {"outcome": "ok"}) == before + 1
        assert (
            a.state.service.metrics.registry.get_sample_value(
                "recloop_model_reloads_total", {"outcome": "ok"}
            )
            == 2.0
        )  # its own publications do not make it reload again
    c = create_app(settings_for(artifact_dir, **kw))
    async with running(c) as cc:
        r = await cc.post("/v1/recommend", json={"user_id": "u1"})
        assert r.json()["model_version"] == v1


async def test_service_follows_the_registry(
    artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path
) -> None:
    """Served from a registry, every app follows promotions and rollbacks by itself; a
    broken current version is refused and the old model keeps answering."""
    from recloop.artifacts.registry import ArtifactRegistry

    reg = ArtifactRegistry(tmp_path / "registry")
    v0 = reg.publish(artifact_dir, promote=True)
    v1 = reg.publish(artifact_dir_b)
    settings = settings_for(reg.current_path(), registry=reg.root, reload_poll_s=0.05)
    apps = [create_app(settings), create_app(settings)]  # as two worker processes

    async def versions() -> list[str]:
        return [a.state.service.model.model_version for a in apps]

    async def wait_for(version: str) -> None:
        for _ in range(100):
            if await versions() == [version, version]:
                return
            await asyncio.sleep(0.05)
        reloads = [
            a.state.service.metrics.registry.get_sample_value(
                "recloop_model_reloads_total", {"outcome": o}
            )
            for a in apps
            for o in ("ok", "refused", "failed")
        ]
        raise AssertionError(f"still serving {await versions()}, not {version}; {reloads}")

    async with running(apps[0]) as c0, running(apps[1]):
        assert await versions() == [v0, v0]
        reg.promote(v1, reason="better")
        await wait_for(v1)
        r = await c0.post("/v1/recommend", json={"user_id": "u1"})
        assert r.headers["x-model-version"] == v1
        reg.rollback(reason="worse online")
        await wait_for(v0)
        # a damaged current version: refused, the old model goes on
        (reg.versions_dir / v1 / "weights.safetensors").write_bytes(b"garbage")
        (reg.root / "current.json").write_text(json.dumps({"version": v1}))
        await asyncio.sleep(0.3)
        assert await versions() == [v0, v0]
        assert (await c0.post("/v1/recommend", json={"user_id": "u1"})).status_code == 200


async def test_service_serves_the_registrys_canary_to_its_share_of_users(
    artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path
) -> None:
    """A canary in the registry answers the users its hash picks (arm ``canary``), the
    current model the rest (arm ``current``); /healthz names it; a stop or a promotion
    ends the split."""
    from recloop.artifacts.registry import ArtifactRegistry
    from recloop.serving.ab import AbSplit

    reg = ArtifactRegistry(tmp_path / "registry")
    v0 = reg.publish(artifact_dir, promote=True)
    v1 = reg.publish(artifact_dir_b)
    app = create_app(settings_for(reg.current_path(), registry=reg.root, reload_poll_s=0.05))

    async def wait_for(canary: str | None, current: str) -> None:
        for _ in range(100):
            svc = app.state.service
            c = svc.canary
            if (None if c is None else c[0]) == canary and svc.model.model_version == current:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"canary {app.state.service.canary}, not {canary}")

    users = [f"u{i}" for i in range(1, 41)]
    async with running(app) as c:
        reg.start_canary(v1, share=0.3, since_ts=0, reason="gate passed")
        await wait_for(v1, v0)
        health = (await c.get("/healthz")).json()
        assert health["canary"] == {"model_version": v1, "share": 0.3}
        live = reg.canary()
        assert live is not None
        split = AbSplit([0.7, 0.3], salt=live.salt)
        got = {}
        for u in users:
            body = (await c.post("/v1/recommend", json={"user_id": u})).json()
            got[u] = (body["model_version"], body["arm"])
        want = {u: (v1, "canary") if split.assign(u) == 1 else (v0, "current") for u in users}
        assert got == want and 0 < sum(v == v1 for v, _ in got.values()) < len(users)
        reg.stop_canary(reason="worse")
        await wait_for(None, v0)
        body = (await c.post("/v1/recommend", json={"user_id": users[0]})).json()
        assert body["model_version"] == v0 and body.get("arm") is None
        assert (await c.get("/healthz")).json()["canary"] is None
        reg.start_canary(v1, share=0.3, since_ts=0)
        await wait_for(v1, v0)
        reg.promote(v1, reason="canary better")
        await wait_for(None, v1)


async def test_a_canary_that_failed_to_load_is_tried_again(
    artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from recloop.artifacts.registry import ArtifactRegistry
    from recloop.serving import app as app_mod

    monkeypatch.setattr(app_mod, "CANARY_RETRY_S", 0.3)
    reg = ArtifactRegistry(tmp_path / "registry")
    reg.publish(artifact_dir, promote=True)
    v1 = reg.publish(artifact_dir_b)
    app = create_app(settings_for(reg.current_path(), registry=reg.root, reload_poll_s=0.05))
    async with running(app):
        svc = app.state.service
        real = svc.set_canary
        calls: list[float] = []

        async def flaky(path: Path | None, **kw: Any) -> None:
            calls.append(asyncio.get_running_loop().time())
            if len(calls) == 1:
                raise OSError("disk hiccup")
            await real(path, **kw)

        monkeypatch.setattr(svc, "set_canary", flaky)
        reg.start_canary(v1, share=0.5, since_ts=0)
        for _ in range(100):
            if svc.canary is not None:
                break
            await asyncio.sleep(0.05)
        assert svc.canary is not None and svc.canary[0] == v1
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.3  # not every poll


async def test_a_current_version_whose_load_failed_for_want_of_resources_is_loaded_again(
    artifact_dir: Path, artifact_dir_b: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too many open files, met deep in loading (and wrapped in an ArtifactError there),
    says nothing of the version: it is loaded again after CANARY_RETRY_S, while a damaged
    one is tried once."""
    import errno

    from recloop.artifacts.registry import ArtifactRegistry
    from recloop.serving import app as app_mod
    from recloop.serving import service as service_mod

    monkeypatch.setattr(app_mod, "CANARY_RETRY_S", 0.3)
    reg = ArtifactRegistry(tmp_path / "registry")
    v0 = reg.publish(artifact_dir, promote=True)
    v1 = reg.publish(artifact_dir_b)
    app = create_app(settings_for(reg.current_path(), registry=reg.root, reload_poll_s=0.05))
    async with running(app):
        svc = app.state.service
        real = service_mod.load_artifact
        calls: list[float] = []

        def flaky(path: Path) -> Any:
            import time

            calls.append(time.monotonic())  # called in a loading thread
            if len(calls) == 1:
                raise OSError(errno.EMFILE, "Too many open files")
            return real(path)

        monkeypatch.setattr(service_mod, "load_artifact", flaky)
        assert svc.model.model_version == v0
        reg.promote(v1, reason="better")
        for _ in range(100):
            if svc.model.model_version == v1:
                break
            await asyncio.sleep(0.05)
        assert svc.model.model_version == v1
        assert len(calls) == 2 and calls[1] - calls[0] >= 0.3  # not every poll


def test_only_running_out_of_memory_or_file_handles_is_worth_loading_again() -> None:
    import errno

    from recloop.errors import ArtifactError, ConfigError
    from recloop.serving.app import want_of_resources

    def wrapped(inner: BaseException) -> ArtifactError:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise ArtifactError("cannot load artifact") from exc
        except ArtifactError as outer:
            return outer

    assert want_of_resources(wrapped(OSError(errno.EMFILE, "Too many open files")))
    assert want_of_resources(wrapped(MemoryError()))
    assert not want_of_resources(wrapped(ValueError("bad header")))
    assert not want_of_resources(wrapped(OSError(errno.ENOENT, "No such file")))
    assert not want_of_resources(ConfigError("search=ann needs an index"))


async def _chunked(body: bytes) -> Any:
    # no Content-Length: the request takes the full Starlette stack, not the fast path
    yield body[:5]
    yield body[5:]


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"user_id": "u1", "policy": "softmax", "seed": 7, "n": 4}', {}),
        (b'{"user_id": "u2", "n": 3, "recent_items": ["i1", "nope"]}', {}),
        (b'{"user_id": "somebody new"}', {}),
        (b'{"user_id": "u1", "n": 0}', {"content-type": "application/json"}),
        (b'{"user_id": "u1", "extra": 1}', {}),
        (b"{not json", {}),
        (b'{"user_id": "u1"}', {"content-type": "text/plain"}),
    ],
)
async def test_recommend_fast_path_answers_as_the_full_stack(
    serve: ServeFactory,
    monkeypatch: pytest.MonkeyPatch,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """A declared Content-Length takes the bare ASGI path (routes.recommend_asgi), a
    chunked body the Starlette route: same status, headers and body (but the list's id)."""
    from recloop.serving import routes

    stack_parses = 0
    parse_body = routes.parse_body

    async def counted(*args: Any, **kw: Any) -> Any:
        nonlocal stack_parses
        stack_parses += 1
        return await parse_body(*args, **kw)

    monkeypatch.setattr(routes, "parse_body", counted)
    async with serve() as (client, _):
        fast = await client.post("/v1/recommend", content=body, headers=headers)
        assert stack_parses == 0
        full = await client.post("/v1/recommend", content=_chunked(body), headers=headers)
        assert stack_parses == 1
    assert fast.status_code == full.status_code
    assert fast.headers.get("content-type") == full.headers.get("content-type")
    assert fast.headers.get("x-model-version") == full.headers.get("x-model-version")
    got, want = fast.json(), full.json()
    if fast.status_code == 200:
        assert got.pop("recommendation_id") != want.pop("recommendation_id")
        assert fast.headers["content-length"] == full.headers["content-length"]
    assert got == want


async def test_recommend_fast_path_fails_as_the_full_stack(serve: ServeFactory) -> None:
    """An unhandled exception in the service: 500 from Starlette's error middleware on
    both paths, counted as 500 by the metrics."""
    async with serve() as (client, service):

        async def broken(req: Any) -> Any:
            raise RuntimeError("boom")

        service.recommend = broken  # type: ignore[method-assign]
        body = b'{"user_id": "u1"}'
        for content in (body, _chunked(body)):
            r = await client.post("/v1/recommend", content=content)
            assert r.status_code == 500
            assert r.text == "Internal Server Error"
        text = (await client.get("/metrics")).text
        assert 'recloop_http_requests_total{route="/v1/recommend",status="500"} 2.0' in text
