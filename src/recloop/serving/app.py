"""The FastAPI application: ``create_app(settings)``, and ``app_from_env`` for uvicorn workers.

Nothing is opened at import time: the artifact and the online store are loaded in the
lifespan and closed on shutdown.  A pure ASGI middleware (no per-request task or body copy,
unlike ``BaseHTTPMiddleware``) checks the API key and records metrics.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recloop import __version__
from recloop.progress import setup_logging
from recloop.serving.metrics import ServiceMetrics
from recloop.serving.routes import BodyError, fast_routes, json_response, router
from recloop.serving.service import LoadedModel, RecommenderService
from recloop.serving.settings import ServeSettings
from recloop.serving.stores import open_store

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
"""Routes that never need the API key (orchestrators probe them)."""
ROUTES = frozenset(
    {
        "/v1/recommend",
        "/v1/recommend/batch",
        "/v1/popular",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/reload",
        "/docs",
        "/openapi.json",
    }
)
"""Metric route labels; any other path is counted as ``other`` (bounded label values)."""

_UNAUTHORIZED = b'{"detail":"missing or wrong X-API-Key header"}'


class ServiceMiddleware:
    """API-key check and request metrics around every HTTP request."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics, api_key: str | None) -> None:
        self.app = app
        self.metrics = metrics
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = 500
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorised(scope):
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                        (b"www-authenticate", b"ApiKey"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": _UNAUTHORIZED})
            self.metrics.observe_request(route, 401, time.perf_counter() - t0)
            return

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - t0)

    def _authorised(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                return hmac.compare_digest(value, self.api_key)
        return False


def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return json_response({"detail": detail}, 422)


def _body_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyError)
    return json_response({"detail": exc.detail}, exc.status)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return Response(
        json_response({"detail": exc.detail}).body,
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


def create_app(settings: ServeSettings) -> FastAPI:
    """The service app; the artifact and store are opened when the app starts."""
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        model = await asyncio.to_thread(
            LoadedModel.load,
            settings.artifact,
            inference=settings.inference,
            threads=settings.torch_threads,
        )
        store = open_store(
            settings.resolved_store_url,
            prefix=settings.store_prefix,
            timeout_s=settings.store_timeout_s,
        )
        service = RecommenderService(settings=settings, store=store, model=model, metrics=metrics)
        app.state.service = service
        hup = _install_sighup(service)
        if settings.gc_freeze:
            # What is loaded now lives as long as the process; full collections that walk
            # it were the service's worst latencies (see ServeSettings.gc_freeze).
            gc.collect()
            gc.freeze()
        logger.info(
            "serving %s (%d items, H=%d) from %s, store %s, inference %s",
            model.model_version,
            model.n_items,
            model.history_len,
            settings.artifact,
            type(store).__name__,
            model.inference,
        )
        try:
            yield
        finally:
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await service.close()
            await store.close()
            del app.state.service

    kwargs: dict[str, Any] = {}
    if not settings.otel and "telemetry" in inspect.signature(FastAPI).parameters:
        # FastAPI's native OpenTelemetry wraps every request (spans, metrics, context
        # look-ups): tens of microseconds even with no exporter.  We export Prometheus.
        kwargs["telemetry"] = {
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
        }
    app = FastAPI(
        title="recloop",
        version=__version__,
        description="Real-time recommendations from an offline-RL policy artifact.",
        lifespan=lifespan,
        **kwargs,
    )
    app.state.settings = settings
    app.include_router(router)
    app.router.routes[0:0] = fast_routes()  # first match wins: see recloop.serving.routes
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(BodyError, _body_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    app.add_middleware(ServiceMiddleware, metrics=metrics, api_key=key)
    return app


def _install_sighup(service: RecommenderService) -> bool:
    """SIGHUP re-reads the artifact path (in this process); False where signals can't be
    handled (not the main thread, e.g. under a test client)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    async def reload() -> None:
        try:
            await service.reload()
        except Exception as exc:  # logged and kept: a bad artifact must not stop the server
            logger.error("SIGHUP reload failed, still serving the old model: %s", exc)

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` (each worker process calls it): settings from
    ``RECLOOP_*`` variables, and recloop's log handler, which a fresh worker lacks."""
    settings = ServeSettings()  # type: ignore[call-arg]  # fields come from the environment
    setup_logging(getattr(logging, settings.log_level.upper()))
    return create_app(settings)
