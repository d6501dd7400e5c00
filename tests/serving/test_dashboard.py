"""``GET /dashboard`` and ``GET /dashboard/data``: the figures after a bounded load, the page,
the API key, the stream panel and A/B arms read defensively."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from serve_helpers import ServeFactory, as_recent, running, settings_for

from recloop.serving.app import create_app
from recloop.serving.dashboard import histogram_quantile

KNOWN = ["u1", "u2", "u3", "u4", "u5"]


def test_histogram_quantile_interpolates_inside_buckets() -> None:
    inf = float("inf")
    buckets = [(0.001, 0.0), (0.002, 10.0), (0.005, 20.0), (inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.002)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.0035)  # 0.002 + 0.003 * 5/10
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.0015)
    # an answer in the +Inf bucket is the largest finite bound
    assert histogram_quantile(0.9, [(0.001, 5.0), (inf, 10.0)]) == pytest.approx(0.001)
    assert histogram_quantile(0.5, [(0.001, 0.0), (inf, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None


async def test_data_counts_a_bounded_load(serve: ServeFactory, store_url: tuple[str, str]) -> None:
    url, prefix = store_url
    async with serve(store_url=url, store_prefix=prefix) as (client, svc):
        await svc.store.set_popular([("i7", 9.0), ("i3", 4.0)])
        await svc.store.push_recent(as_recent({"u1": [("i2", 1.0)]}), max_len=5)
        for k in range(30):
            r = await client.post("/v1/recommend", json={"user_id": KNOWN[k % 5], "n": 3})
            assert r.status_code == 200
        for k in range(7):
            r = await client.post("/v1/recommend", json={"user_id": f"stranger-{k}", "n": 3})
            assert r.json()["source"] == "popular"
        assert (await client.get("/v1/popular")).status_code == 200
        assert (await client.get("/healthz")).status_code == 200  # not an API request

        r = await client.get("/dashboard/data", params={"window": 60})
        assert r.status_code == 200
        d = r.json()
    assert d["requests"]["count"] == 38
    assert d["requests"]["by_route"]["/v1/recommend"]["count"] == 37
    assert d["requests"]["by_route"]["/v1/popular"]["count"] == 1
    assert d["requests"]["by_route"]["/healthz"]["count"] == 1
    # both rounded to 3 decimals, over a window of a fraction of a second
    assert d["requests"]["per_s"] == pytest.approx(38 / d["covered_s"], rel=1e-2)
    assert d["requests"]["errors"] == 0 and d["requests"]["total_since_start"] == 38
    assert d["fallbacks"] == {
        "count": 7,
        "per_s": pytest.approx(7 / d["covered_s"], rel=1e-2),
        "by_reason": {"unknown_user": 7},
    }
    assert d["recommendations"] == {"policy": 30, "popular": 7}
    lat = d["latency_ms"]
    assert lat["route"] == "/v1/recommend"
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= 2500
    assert d["model"]["versions"] == [svc.model.model_version]
    assert d["popular"] == {
        "source": "realtime",
        "items": [{"item_id": "i7", "score": 9.0}, {"item_id": "i3", "score": 4.0}],
    }
    assert d["stream"]["workers"] == [] and d["arms"] is None
    assert d["series"] and d["series"][-1]["rps"] > 0


async def test_window_counts_only_what_came_after_its_start(artifact_dir: Path) -> None:
    app = create_app(settings_for(artifact_dir))
    async with running(app) as client:
        for _ in range(5):
            await client.post("/v1/recommend", json={"user_id": "u1"})
        app.state.dashboard_sampler.sample()  # a reading between the two bursts
        await asyncio.sleep(0.05)
        for _ in range(3):
            await client.post("/v1/recommend", json={"user_id": "u2"})
        short = (await client.get("/dashboard/data", params={"window": 0.04})).json()
        long = (await client.get("/dashboard/data", params={"window": 600})).json()
    assert short["requests"]["count"] == 3
    assert long["requests"]["count"] == 8


async def test_page_is_self_contained_and_served(serve: ServeFactory) -> None:
    async with serve() as (client, _):
        r = await client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    assert "dashboard/data" in html and "v1/recommend" in html
    # nothing loaded from elsewhere: no external script, style, image or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html and "url(" not in html


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/data"])
async def test_api_key_guards_the_dashboard(artifact_dir: Path, path: str) -> None:
    app = create_app(settings_for(artifact_dir, api_key="s3cret"))
    async with running(app) as client:
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers={"X-API-Key": "wrong"})).status_code == 401
        assert (await client.get(path, headers={"X-API-Key": "s3cret"})).status_code == 200


async def test_bad_window_is_refused(serve: ServeFactory) -> None:
    async with serve() as (client, _):
        assert (await client.get("/dashboard/data", params={"window": 0})).status_code == 422
        assert (await client.get("/dashboard/data", params={"window": 1e6})).status_code == 422


async def test_stream_panel_sums_live_workers(serve: ServeFactory) -> None:
    now = time.time()
    async with serve() as (client, svc):
        beat = {"state": "running", "pending": 4, "undelivered": 10, "messages": 100}
        await svc.store.put_heartbeat("w0", {**beat, "ts": now - 1, "events_per_s": 50.0,
                                             "lag_s": 0.2})  # fmt: skip
        await svc.store.put_heartbeat("w1", {**beat, "ts": now, "events_per_s": 25.5,
                                             "lag_s": 0.7, "pending": 3})  # fmt: skip
        await svc.store.put_heartbeat("w2", {**beat, "ts": now - 20, "events_per_s": 99.0})
        await svc.store.put_heartbeat("w3", {**beat, "ts": now - 1, "state": "stopped"})
        st = (await client.get("/dashboard/data")).json()["stream"]
    assert [w["name"] for w in st["workers"]] == ["w0", "w1", "w2", "w3"]
    assert [w["alive"] for w in st["workers"]] == [True, True, False, False]
    assert st["alive"] == 2 and st["events_per_s"] == 75.5  # silent and stopped ones left out
    assert st["pending"] == 3  # group-wide: the newest record's
    assert st["lag_s"] == 0.7 and st["messages"] == 400


async def test_arms_are_read_defensively(
    serve: ServeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve() as (client, svc):
        shown: Any = [
            {"name": "control", "model_version": "m-a", "share": 0.5, "nested": {"x": 1}},
            SimpleNamespace(
                name="treatment", weight=0.5, model=SimpleNamespace(model_version="m-b")
            ),
            SimpleNamespace(name=None),  # the service's one arm when there is no split
        ]
        # ``arms`` is a read-only property of the service: replace it on its class.
        monkeypatch.setattr(type(svc), "arms", property(lambda self: shown))
        arms = (await client.get("/dashboard/data")).json()["arms"]
        assert arms == [
            {"name": "control", "model_version": "m-a", "share": 0.5},
            {"name": "treatment", "weight": 0.5, "model_version": "m-b"},
        ]
        shown = 42  # a shape nobody expected
        r = await client.get("/dashboard/data")
        assert r.status_code == 200 and "error" in r.json()["arms"][0]
