"""A live dashboard in the service: ``GET /dashboard`` (a self-contained page) and
``GET /dashboard/data`` (the JSON it polls).

What it shows, over a window of the last minutes (``?window=`` seconds, default 60):
requests per second by route, latency percentiles, fallbacks by reason and errors, from
the service's own Prometheus metrics; the model version(s) served and, when the service has
them, its A/B arms; the real-time popular items the stream processor publishes in the
online store; the stream workers' throughput and lag from their heartbeats in the same
store (:mod:`recloop.streaming.heartbeat`); and a box that asks ``POST /v1/recommend`` for
one user's list.

How the numbers are made: the metrics are cumulative counters and histograms, so a
:class:`MetricsSampler` reads them once a second into a ring of the last
:data:`HISTORY_S` seconds (a few hundred samples, no work on the request path: the
middleware already counts every request); a window's figures are the difference between a
fresh reading and the reading from the window's start.  Percentiles are interpolated
inside the histogram's buckets, as Prometheus' ``histogram_quantile`` does, so they are as
coarse as :data:`~recloop.serving.metrics.LATENCY_BUCKETS`.  With several workers the
readings add up every worker's metrics files (``PROMETHEUS_MULTIPROC_DIR``), as ``/metrics``
does.  The dashboard's own requests are counted under the route ``other`` and left out of
the request rate.

The routes sit behind the same API-key middleware as every other route: with an API key
set, the browser must send ``X-API-Key`` (a header extension, or a proxy that adds it).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CollectorRegistry

from recloop.serving.metrics import ServiceMetrics, multiprocess_enabled
from recloop.serving.routes import json_response
from recloop.serving.service import RecommenderService

logger = logging.getLogger(__name__)

SAMPLE_EVERY_S = 1.0
"""How often the sampler reads the metrics."""
HISTORY_S = 900.0
"""How far back the ring of readings goes (the longest window)."""
SERIES_POINTS = 60
"""Points of each chart's series, whatever the window."""
API_ROUTES = ("/v1/recommend", "/v1/recommend/batch", "/v1/popular")
"""The routes whose requests the request rate counts (not health checks, scrapes or this)."""
LATENCY_ROUTE = "/v1/recommend"
STORE_TIMEOUT_S = 0.5
"""A slow store delays the dashboard's popular items and stream panel by at most this."""
POPULAR_N = 10

Key = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted labels) of one metric sample."""
Reading = dict[Key, float]

_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    # Self-contained by construction: the page can load nothing from anywhere else.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


# ----------------------------------------------------------------------------- readings


def read_metrics(metrics: ServiceMetrics) -> Reading:
    """Every sample of the service's metrics (all workers' with multiprocess metrics)."""
    registry: Any = metrics.registry
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    out: Reading = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            key = (s.name, labels)
            # multiprocess gauges come once per worker (label pid): add them up
            out[key] = out.get(key, 0.0) + float(s.value)
    return out


def _delta(new: Reading, old: Reading) -> Reading:
    # a counter only grows; one that shrank was reset (a worker restarted): count it whole
    return {k: (v - old.get(k, 0.0)) if v >= old.get(k, 0.0) else v for k, v in new.items()}


def _label(labels: tuple[tuple[str, str], ...], name: str) -> str | None:
    for k, v in labels:
        if k == name:
            return v
    return None


def _sum(reading: Reading, name: str, **where: str) -> float:
    return sum(
        v
        for (n, labels), v in reading.items()
        if n == name and all(_label(labels, k) == want for k, want in where.items())
    )


def _by(reading: Reading, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in reading.items():
        if n == name:
            key = _label(labels, label)
            if key is not None:
                out[key] = out.get(key, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs, with
    linear interpolation inside the bucket (Prometheus' ``histogram_quantile``); None when
    empty.  An answer in the +Inf bucket is the largest finite bound."""
    pairs = sorted(buckets)
    if not pairs or pairs[-1][1] <= 0:
        return None
    total = pairs[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, cum in pairs:
        if cum >= rank and cum > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (cum - below)
        if not math.isinf(upper):
            lower = upper
        below = cum
    return lower


def latency_buckets(reading: Reading, routes: Iterable[str]) -> list[tuple[float, float]]:
    """The (le, cumulative count) pairs of the latency histogram, summed over ``routes``."""
    wanted = set(routes)
    by_le: dict[float, float] = {}
    for (n, labels), v in reading.items():
        if (
            n == "recloop_http_request_duration_seconds_bucket"
            and _label(labels, "route") in wanted
        ):
            le = float(_label(labels, "le") or "inf")
            by_le[le] = by_le.get(le, 0.0) + v
    return sorted(by_le.items())


def latency_ms(reading: Reading, routes: Iterable[str]) -> dict[str, float | None]:
    buckets = latency_buckets(reading, routes)
    out: dict[str, float | None] = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        v = histogram_quantile(q, buckets)
        out[name] = None if v is None else round(v * 1000.0, 3)
    return out


# ----------------------------------------------------------------------------- sampler


class MetricsSampler:
    """A ring of (monotonic time, reading) pairs, one per :data:`SAMPLE_EVERY_S`."""

    def __init__(self, metrics: ServiceMetrics, *, history_s: float = HISTORY_S) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.samples: deque[tuple[float, Reading]] = deque(
            maxlen=int(history_s / SAMPLE_EVERY_S) + 2
        )
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> tuple[float, Reading]:
        got = (time.monotonic(), read_metrics(self.metrics))
        self.samples.append(got)
        return got

    def start(self) -> None:
        if self._task is None:
            self.sample()  # the baseline: the first window starts here
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            try:
                self.sample()
            except Exception as exc:  # a broken metrics file must not end the sampling
                logger.warning("dashboard: reading the metrics failed: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def since(self, t: float) -> tuple[float, Reading]:
        """The newest reading taken at or before ``t``, else the oldest one."""
        times = [s[0] for s in self.samples]
        i = bisect.bisect_right(times, t) - 1
        return self.samples[max(i, 0)]

    def window(self, window_s: float) -> tuple[float, float, Reading, list[tuple[float, Reading]]]:
        """(now, seconds covered, the window's reading difference, the readings within it
        with a fresh one last)."""
        now, fresh = time.monotonic(), read_metrics(self.metrics)
        t0, base = self.since(now - window_s)
        inside = [s for s in self.samples if s[0] >= t0] + [(now, fresh)]
        return now, max(now - t0, 1e-9), _delta(fresh, base), inside


@dataclass(frozen=True)
class _Point:
    ago_s: float
    rps: float
    p95_ms: float | None
    fallbacks_per_s: float
    errors_per_s: float


def _series(readings: list[tuple[float, Reading]], now: float) -> list[_Point]:
    """At most :data:`SERIES_POINTS` points, each the rates between two readings."""
    if len(readings) < 2:
        return []
    step = max(1, math.ceil((len(readings) - 1) / SERIES_POINTS))
    picked = readings[::step]
    if picked[-1] is not readings[-1]:
        picked.append(readings[-1])
    out: list[_Point] = []
    for (t0, r0), (t1, r1) in itertools.pairwise(picked):
        dt = max(t1 - t0, 1e-9)
        d = _delta(r1, r0)
        p95 = histogram_quantile(0.95, latency_buckets(d, [LATENCY_ROUTE]))
        out.append(
            _Point(
                ago_s=round(now - t1, 2),
                rps=round(_api_requests(d) / dt, 3),
                p95_ms=None if p95 is None else round(p95 * 1000.0, 3),
                fallbacks_per_s=round(_sum(d, "recloop_fallbacks_total") / dt, 3),
                errors_per_s=round(_errors(d) / dt, 3),
            )
        )
    return out


def _api_requests(d: Reading) -> float:
    return sum(_sum(d, "recloop_http_requests_total", route=r) for r in API_ROUTES)


def _errors(d: Reading) -> float:
    return sum(
        v
        for (n, labels), v in d.items()
        if n == "recloop_http_requests_total"
        and (_label(labels, "status") or "").startswith("5")
        and _label(labels, "route") in API_ROUTES
    )


# ----------------------------------------------------------------------------- the rest


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def describe_arms(service: RecommenderService, window: Reading) -> list[dict[str, Any]] | None:
    """The service's A/B arms, read defensively (None when it has none): each arm's name,
    model version, traffic share and, from any metric labelled ``arm``, its requests in the
    window.  Accepts ``service.arms`` as a mapping or a sequence of objects or dicts."""
    arms: Any = getattr(service, "arms", None)
    if callable(arms):
        arms = arms()
    if isinstance(arms, list | tuple):
        # The service answers through arms even without a split: one arm named None.
        arms = [a for a in arms if getattr(a, "name", "") is not None]
    counted: dict[str, float] = {}
    for (name, labels), v in window.items():
        arm = _label(labels, "arm")
        if arm is not None and name.endswith("_total"):
            counted[arm] = max(counted.get(arm, 0.0), v)
    if not arms and not counted:
        return None
    out: list[dict[str, Any]] = []
    pairs = arms.items() if isinstance(arms, Mapping) else enumerate(arms or [])
    for key, arm in pairs:
        doc: dict[str, Any]
        if hasattr(arm, "to_dict"):
            doc = dict(arm.to_dict())
        elif isinstance(arm, Mapping):
            doc = dict(arm)
        else:
            doc = {
                f: getattr(arm, f)
                for f in ("name", "model_version", "weight", "share", "traffic", "artifact")
                if hasattr(arm, f)
            }
            version = getattr(getattr(arm, "model", None), "model_version", None)
            if "model_version" not in doc and version is not None:
                doc["model_version"] = version
        doc.setdefault("name", str(key))
        doc = {k: v for k, v in doc.items() if not isinstance(v, Mapping | list | tuple)}
        out.append(_jsonable(doc))
    named = {str(d.get("name")) for d in out}
    out += [{"name": a} for a in sorted(counted) if a not in named]
    for d in out:
        if str(d["name"]) in counted:
            d["requests"] = int(counted[str(d["name"])])
    return out


def _arms_or_error(service: RecommenderService, window: Reading) -> list[dict[str, Any]] | None:
    try:
        return describe_arms(service, window)
    except Exception as exc:  # arms of a shape this reader does not know: say so, go on
        return [{"name": "?", "error": f"{type(exc).__name__}: {exc}"}]


async def _with_timeout(coro: Any) -> Any:
    return await asyncio.wait_for(coro, timeout=STORE_TIMEOUT_S)


async def popular_items(service: RecommenderService) -> dict[str, Any]:
    """The store's real-time popular items, as the stream processor published them (read
    directly: the service's own path would count the dashboard's reads as fallbacks)."""
    try:
        items = await _with_timeout(service.store.get_popular(POPULAR_N))
    except Exception as exc:  # unreachable, slow or corrupt: say so, keep the page alive
        return {"source": "unavailable", "items": [], "error": f"{type(exc).__name__}: {exc}"}
    return {
        "source": "realtime" if items else "none",
        "items": [{"item_id": i, "score": s} for i, s in items],
    }


async def stream_status(service: RecommenderService) -> dict[str, Any]:
    """The stream workers that report to this store (their heartbeats), summed up."""
    from recloop.streaming.heartbeat import HEARTBEAT_INTERVAL_S, HEARTBEAT_MAX_AGE_S

    get = getattr(service.store, "get_heartbeats", None)
    if get is None:
        return {"workers": [], "error": "this store keeps no heartbeats"}
    try:
        beats: dict[str, dict[str, Any]] = await _with_timeout(get(max_age_s=HEARTBEAT_MAX_AGE_S))
    except Exception as exc:
        return {"workers": [], "error": f"{type(exc).__name__}: {exc}"}
    now = time.time()
    workers = []
    for name, doc in sorted(beats.items()):
        age = now - float(doc["ts"])
        alive = doc.get("state") == "running" and age <= 3 * HEARTBEAT_INTERVAL_S
        workers.append({**_jsonable(doc), "name": name, "age_s": round(age, 2), "alive": alive})
    live = [w for w in workers if w["alive"]]
    newest = max(workers, key=lambda w: w["ts"]) if workers else None

    def newest_of(field: str) -> Any:
        return None if newest is None else newest.get(field)

    lags = [w["lag_s"] for w in live if isinstance(w.get("lag_s"), int | float)]
    return {
        "workers": workers,
        "alive": len(live),
        "events_per_s": round(sum(float(w.get("events_per_s") or 0.0) for w in live), 2),
        "messages": int(sum(int(w.get("messages") or 0) for w in workers)),
        # group-wide figures: every worker of a group reports the same, the newest wins
        "pending": newest_of("pending"),
        "undelivered": newest_of("undelivered"),
        "lag_s": round(max(lags), 3) if lags else None,
    }


def model_versions(service: RecommenderService, reading: Reading) -> list[str]:
    """Versions served now: this worker's, and every worker's with multiprocess metrics."""
    versions = {service.model.model_version}
    versions |= {
        v for v, on in _by(reading, "recloop_model_info", "model_version").items() if on > 0
    }
    return sorted(versions)


async def dashboard_data(
    service: RecommenderService, sampler: MetricsSampler, window_s: float
) -> dict[str, Any]:
    now, covered, d, inside = sampler.window(window_s)
    latest = inside[-1][1]
    api = _api_requests(d)
    routes = _by(d, "recloop_http_requests_total", "route")
    fallbacks = _by(d, "recloop_fallbacks_total", "reason")
    popular, stream = await asyncio.gather(popular_items(service), stream_status(service))
    model = service.model
    return {
        "ts": time.time(),
        "window_s": window_s,
        "covered_s": round(covered, 6),
        "uptime_s": round(now - sampler.started, 1),
        "requests": {
            "count": int(api),
            "per_s": round(api / covered, 3),
            "errors": int(_errors(d)),
            "by_route": {
                r: {"count": int(c), "per_s": round(c / covered, 3)}
                for r, c in sorted(routes.items())
                if c > 0
            },
            "total_since_start": int(_api_requests(latest)),
        },
        "latency_ms": {"route": LATENCY_ROUTE, **latency_ms(d, [LATENCY_ROUTE])},
        "latency_ms_by_route": {
            r: latency_ms(d, [r]) for r in API_ROUTES if routes.get(r, 0.0) > 0
        },
        "fallbacks": {
            "count": int(sum(fallbacks.values())),
            "per_s": round(sum(fallbacks.values()) / covered, 3),
            "by_reason": {k: int(v) for k, v in sorted(fallbacks.items()) if v > 0},
        },
        "recommendations": {
            k: int(v) for k, v in _by(d, "recloop_recommendations_total", "source").items()
        },
        "model": {
            "versions": model_versions(service, latest),
            "model_version": model.model_version,
            "inference": model.inference,
            "artifact": str(service.artifact_path),
            "n_items": model.n_items,
            "history_len": model.history_len,
            "reloads": {
                k: int(v) for k, v in _by(latest, "recloop_model_reloads_total", "outcome").items()
            },
        },
        "arms": _arms_or_error(service, d),
        "popular": popular,
        "stream": stream,
        "series": [p.__dict__ for p in _series(inside, now)],
    }


# ----------------------------------------------------------------------------- routes


def _sampler(app: FastAPI) -> MetricsSampler:
    """The app's sampler; started here when the router's lifespan did not run (a FastAPI
    too old to merge router lifespans): the first window then starts at the first poll."""
    sampler: MetricsSampler | None = getattr(app.state, "dashboard_sampler", None)
    if sampler is None:
        sampler = app.state.dashboard_sampler = MetricsSampler(app.state.service.metrics)
        sampler.start()
    return sampler


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # runs inside the app's lifespan (FastAPI nests an included router's): the service
    # exists, and the sampler stops before it closes
    sampler = _sampler(app)
    try:
        yield
    finally:
        await sampler.stop()
        app.state.dashboard_sampler = None


def page() -> str:
    """The dashboard's HTML (one file, its script and style inline)."""
    return (resources.files("recloop.serving") / "static" / "dashboard.html").read_text("utf-8")


def dashboard_router() -> APIRouter:
    """``GET /dashboard`` and ``GET /dashboard/data``; include it in the service's app."""
    router = APIRouter(lifespan=_lifespan, tags=["dashboard"])
    html = page()

    async def dashboard(request: Request) -> HTMLResponse:
        """The live dashboard page (polls /dashboard/data)."""
        return HTMLResponse(html, headers=_PAGE_HEADERS)

    async def data(
        request: Request,
        window: float = Query(60.0, gt=0, le=HISTORY_S, description="Seconds to look back."),
    ) -> Response:
        """The dashboard's figures over the last ``window`` seconds."""
        service: RecommenderService = request.app.state.service
        doc = await dashboard_data(service, _sampler(request.app), window)
        return json_response(doc, version=service.model.model_version)

    router.add_api_route("/dashboard", dashboard, methods=["GET"], response_class=HTMLResponse)
    router.add_api_route("/dashboard/data", data, methods=["GET"])
    return router
