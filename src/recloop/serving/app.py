"""The FastAPI application: ``create_app(settings)``, and ``app_from_env`` for uvicorn workers.

Nothing is opened at import time: the artifact and the online store are loaded in the
lifespan and closed on shutdown.  Two pure ASGI middlewares (no per-request task or body
copy, unlike ``BaseHTTPMiddleware``; about a microsecond each) check the API and admin keys
and record metrics, and refuse bodies over the size limit while they stream in.  A
background task per worker follows the shared reload state (``recloop.serving.admin``).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import hmac
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recloop import __version__
from recloop.artifacts.registry import ArtifactRegistry
from recloop.errors import RecloopError, RegistryUnreachableError
from recloop.progress import setup_logging
from recloop.serving.admin import ReloadBroadcast, log_safe
from recloop.serving.dashboard import dashboard_router
from recloop.serving.metrics import ServiceMetrics
from recloop.serving.routes import (
    MAX_BODY_BYTES,
    BodyError,
    body_error_response,
    install_routes,
    json_response,
    validation_error_response,
)
from recloop.serving.schemas import request_models
from recloop.serving.served_log import BusSink, ServedLog, ServedSink, SqlSink
from recloop.serving.service import LoadedModel, RecommenderService
from recloop.serving.settings import ServeSettings
from recloop.stores import open_store

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

ADMIN_PREFIX = "/admin/"
LOOPBACK = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
"""Client addresses ``admin_localhost`` lets in."""

_UNAUTHORIZED = b'{"detail":"missing or wrong X-API-Key header"}'
_ADMIN_UNAUTHORIZED = b'{"detail":"missing or wrong X-Admin-Key header"}'
_NOT_FOUND = b'{"detail":"Not Found"}'

Denial = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]
"""(status, JSON body, extra headers) of a request a middleware answers itself."""


async def _answer(
    send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    """A whole JSON response from a middleware."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class ServiceMiddleware:
    """API-key and admin checks, and request metrics, around every HTTP request.

    Admin routes (``/admin/…``) exist only when the settings turn them on (else the router
    answers 404); then they need ``X-Admin-Key`` when an admin key is set (the API key is
    not asked for), else a loopback client (anyone else gets 404, as if they did not exist).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: ServiceMetrics,
        api_key: str | None,
        admin_key: str | None = None,
        admin_localhost: bool = False,
        fast_routes: Mapping[str, ASGIApp] | None = None,
        max_body_bytes: int = 0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.fast_routes = dict(fast_routes or {})
        """POST paths answered by a bare ASGI app, past the stack (see recloop.serving.routes)."""
        self.max_body_bytes = max_body_bytes
        """Bodies declared longer (or not declared) take the stack, and its body limit."""
        self.api_key = api_key.encode() if api_key else None
        self.admin_key = admin_key.encode() if admin_key else None
        self.admin = self.admin_key is not None or admin_localhost

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        path = scope["path"]
        route = path if path in ROUTES else "other"
        status = 500
        denied: Denial | None = None
        if self.admin and path.startswith(ADMIN_PREFIX):
            denied = self._admin_denied(scope)
        elif self.api_key is not None and path not in OPEN_PATHS and not self._authorised(scope):
            denied = (401, _UNAUTHORIZED, ((b"www-authenticate", b"ApiKey"),))
        if denied is not None:
            await _answer(send, *denied)
            self.metrics.observe_request(route, denied[0], time.perf_counter() - t0)
            return

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        target = self.app
        fast = self.fast_routes.get(path)
        if fast is not None and scope["method"] == "POST":
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) <= self.max_body_bytes:
                target = fast
        try:
            await target(scope, receive, send_status)
        finally:
            self.metrics.observe_request(route, status, time.perf_counter() - t0)

    def _authorised(self, scope: Scope) -> bool:
        assert self.api_key is not None
        value = _header(scope, b"x-api-key")
        return value is not None and hmac.compare_digest(value, self.api_key)

    def _admin_denied(self, scope: Scope) -> Denial | None:
        if self.admin_key is not None:
            value = _header(scope, b"x-admin-key")
            if value is None or not hmac.compare_digest(value, self.admin_key):
                return 401, _ADMIN_UNAUTHORIZED, ((b"www-authenticate", b"AdminKey"),)
            return None
        client = scope.get("client")
        if client is None or client[0] not in LOOPBACK:
            return 404, _NOT_FOUND, ()
        return None


class BodyTooLargeError(Exception):
    """Raised from the receive channel of a request whose body passed the limit."""


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` (413) without reading them whole.

    A declared ``Content-Length`` over the limit is answered before the app runs; one within
    it is passed straight through (HTTP framing: the server delivers exactly that many bytes,
    so the common case costs one header scan).  Otherwise — chunked, or no length declared —
    the bytes of the ``http.request`` messages are counted as the app receives them, and the
    body is refused as soon as it passes the limit: ``receive`` raises
    :class:`BodyTooLargeError` inside the route, this middleware answers 413 and closes the
    connection, and the server never buffers the rest.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self._detail = f'{{"detail":"body exceeds {max_bytes} bytes"}}'.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                await _answer(send, 413, self._detail, ((b"connection", b"close"),))
            else:
                await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError
            return message

        async def send_started(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, send_started)
        except BodyTooLargeError:
            if started:  # the app answered before reading it all; nothing left to say
                return
            await _answer(send, 413, self._detail, ((b"connection", b"close"),))


def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_error_response(exc)


def _body_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyError)
    return body_error_response(exc)


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return Response(
        json_response({"detail": exc.detail}).body,
        status_code=exc.status_code,
        media_type="application/json",
        headers=exc.headers,
    )


def create_app(settings: ServeSettings, *, clock: Callable[[], float] = time.time) -> FastAPI:
    """The service app; the artifact and store are opened when the app starts.  ``clock``
    stamps the served lists (a simulation, ``recloop experiment``, passes its event time)."""
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(settings.torch_threads)
        broadcast = ReloadBroadcast(settings.reload_state) if settings.reload_state else None
        path, model = await _load_first(settings, broadcast)
        arm_models = [
            await asyncio.to_thread(
                LoadedModel.load,
                arm.artifact,
                inference=settings.inference,
                threads=settings.torch_threads,
                search=settings.search,
                ann_margin=settings.ann_margin,
            )
            for arm in settings.ab[1:]
        ]
        store = open_store(
            settings.resolved_store_url,
            prefix=settings.store_prefix,
            timeout_s=settings.store_timeout_s,
        )
        served_log = open_served_log(settings, metrics)
        service = RecommenderService(
            settings=settings,
            store=store,
            model=model,
            metrics=metrics,
            artifact_path=path,
            served_log=served_log,
            arm_models=arm_models,
            clock=clock,
        )
        if served_log is not None:
            served_log.start()
        app.state.service = service
        app.state.reload_broadcast = broadcast
        hup = _install_sighup(service)
        follower = (
            asyncio.get_running_loop().create_task(
                _follow_reloads(service, broadcast, settings.reload_poll_s)
            )
            if broadcast is not None
            else None
        )
        registry_follower = None
        if settings.registry is not None:
            registry = ArtifactRegistry(settings.registry)
            # what this worker loaded (a registry names versions by model version): a
            # promotion since the launch, or a worker restarted later, is caught up at once
            registry_follower = asyncio.get_running_loop().create_task(
                _follow_registry(
                    service, registry, model.model_version, every_s=settings.reload_poll_s
                )
            )
        if settings.gc_freeze:
            # What is loaded now lives as long as the process; full collections that walk
            # it were the service's worst latencies (see ServeSettings.gc_freeze).
            gc.collect()
            gc.freeze()
        logger.info(
            "serving %s (%d items, H=%d) from %s, store %s, inference %s, top-k %s",
            model.model_version,
            model.n_items,
            model.history_len,
            path,
            type(store).__name__,
            model.inference,
            f"from its {model.ann.kind} index" if model.ann is not None else "exact",
        )
        for arm in service.arms:
            if arm.name is not None:
                logger.info(
                    "A/B arm %s (weight %g): %s from %s, policy %s",
                    arm.name,
                    next(a.weight for a in settings.ab if a.name == arm.name),
                    arm.model.model_version,
                    arm.path,
                    arm.defaults.policy,
                )
        try:
            yield
        finally:
            tasks = [t for t in (follower, registry_follower) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
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
    fast_routes = install_routes(
        app,
        models=request_models(settings.limits),
        max_n=settings.max_n,
        admin=settings.admin_enabled,
    )
    app.include_router(dashboard_router())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(BodyError, _body_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
    # added last = outermost: keys are checked before any body byte is read
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        api_key=_secret(settings.api_key),
        admin_key=_secret(settings.admin_key),
        admin_localhost=settings.admin_localhost,
        fast_routes=fast_routes,
        max_body_bytes=MAX_BODY_BYTES,
    )
    return app


def open_served_log(settings: ServeSettings, metrics: ServiceMetrics) -> ServedLog | None:
    """The served-list log the settings name: the bus, else the SQL log, else none."""
    sink: ServedSink
    if settings.bus_url:
        sink = BusSink(settings.bus_url, stream=settings.stream)
    elif settings.database_url:
        sink = SqlSink(settings.database_url, prefix=settings.table_prefix)
    else:
        logger.info("served lists are not logged (no bus_url or database_url)")
        return None
    return ServedLog(
        sink,
        metrics=metrics,
        max_queue=settings.served_queue,
        linger_s=settings.served_linger_s,
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


async def _load_first(
    settings: ServeSettings, broadcast: ReloadBroadcast | None
) -> tuple[Path, LoadedModel]:
    """The artifact a starting worker serves: the one its siblings were last switched to
    (the shared reload state), else ``settings.artifact``."""

    def load(path: Path) -> LoadedModel:
        return LoadedModel.load(
            path,
            inference=settings.inference,
            threads=settings.torch_threads,
            search=settings.search,
            ann_margin=settings.ann_margin,
        )

    notice = broadcast.current() if broadcast is not None else None
    if notice is not None:
        try:
            model = await asyncio.to_thread(load, notice.artifact)
        except RecloopError as exc:
            logger.error(
                "reload state names %r, which does not load (%s); serving %r",
                str(notice.artifact),
                log_safe(exc),
                str(settings.artifact),
            )
        else:
            return notice.artifact, model
    return Path(settings.artifact), await asyncio.to_thread(load, Path(settings.artifact))


CANARY_RETRY_S = 30.0
"""Seconds between two tries of a registry canary that failed to load, or of a registry
version that could not be fetched (an object store's download)."""


_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN})


def want_of_resources(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from: loading wraps every failure in an
    ArtifactError) is the process running out of memory or file handles, not a fault of
    what it was loading."""
    seen: BaseException | None = exc
    for _ in range(16):  # a cause chain is short; a cycle must not hang the follower
        if seen is None:
            return False
        if isinstance(seen, MemoryError) or type(seen).__name__ == "OutOfMemoryError":
            return True
        if isinstance(seen, OSError) and seen.errno in _RESOURCE_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _follow_registry(
    service: RecommenderService,
    registry: ArtifactRegistry,
    following: str | None,
    *,
    every_s: float,
) -> None:
    """Serve the registry's current version: when ``current.json`` names another version
    than ``following`` (a promotion or a rollback), load it; a bad version is logged once
    and the old model keeps serving until the pointer moves again (one that could not be
    fetched because the store did not answer or the local cache failed, or whose load failed
    for another reason than the artifact -- memory, file handles -- is tried again every
    ``CANARY_RETRY_S``).  A
    canary named there is served to its share of the users
    (:meth:`RecommenderService.set_canary`) and dropped when the pointer no longer names
    it; one that fails to load is tried again every ``CANARY_RETRY_S`` (until it serves,
    its users get the current model, and the loop's verdict waits for it)."""
    root = registry.location
    canary_following: tuple[str, float, str] | None = None
    # (the canary whose setting failed, when to try it again); None: no failure pending
    retry: tuple[tuple[str, float, str] | None, float] | None = None
    # (the current version whose fetch failed, when to try it again)
    fetch_retry: tuple[str, float] | None = None
    failing: str | None = None  # the last failure logged
    warned = False
    while True:
        await asyncio.sleep(every_s)
        try:
            # off the event loop: on an object store these are network calls, and a new
            # version is a download
            version, c = await asyncio.to_thread(registry.state)
            now = asyncio.get_running_loop().time()
            if (
                version is not None
                and version != following
                and (fetch_retry is None or fetch_retry[0] != version or now >= fetch_retry[1])
            ):
                logger.info("registry %s: current is now %s, loading it", root, version)
                fetch_retry = (version, now + CANARY_RETRY_S)
                try:
                    path = await asyncio.to_thread(registry.version_path, version)
                except (RegistryUnreachableError, OSError):
                    # the store did not answer, or the local cache failed (a full disk):
                    # nothing known wrong with the version, tried again after CANARY_RETRY_S
                    raise
                except Exception:
                    following = version  # missing or damaged: tried once, like a bad load
                    raise
                try:
                    await service.reload(path)
                except Exception as exc:
                    # out of memory or file handles says nothing of the version: fetch_retry
                    # stands, and it is loaded again after CANARY_RETRY_S; anything else
                    # (broken, misconfigured) is tried once, not reloaded each second
                    if not want_of_resources(exc):
                        following = version
                        fetch_retry = None
                    raise
                fetch_retry = None
                following = version
            if service.settings.ab:  # A/B arms from the settings: a canary is not followed
                if c is not None and not warned:
                    warned = True
                    logger.warning(
                        "registry %s names canary %s, but this service runs A/B arms from "
                        "its settings: every user is served by its own arms",
                        root,
                        c.version,
                    )
                failing = None
                continue
            want = None if c is None else (c.version, c.share, c.salt)
            if want == canary_following or (
                retry is not None and retry[0] == want and now < retry[1]
            ):
                failing = None
                continue
            retry = (want, now + CANARY_RETRY_S)  # cleared once it serves
            if c is None:
                await service.set_canary(None)
            else:
                logger.info(
                    "registry %s: canary %s on %.0f %% of users", root, c.version, 100 * c.share
                )
                await service.set_canary(
                    await asyncio.to_thread(registry.version_path, c.version),
                    share=c.share,
                    salt=c.salt,
                )
            canary_following, retry = want, None
            failing = None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad version or pointer must not stop the follower
            # a failure repeated at every poll (a store down for an hour) is one line, not
            # 3,600; one retried every CANARY_RETRY_S is one line per try
            if log_safe(exc) != failing:
                failing = log_safe(exc)
                logger.error("following registry %s failed, still serving: %s", root, failing)


async def _follow_reloads(
    service: RecommenderService, broadcast: ReloadBroadcast, every_s: float
) -> None:
    """Load what another worker's /admin/reload published; one ``stat`` per ``every_s``."""
    while True:
        await asyncio.sleep(every_s)
        try:
            notice = broadcast.poll()
            if notice is not None:  # every publication, even of the same path: read it again
                logger.info("another worker reloaded: loading %r", str(notice.artifact))
                await service.reload(notice.artifact)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad artifact or state file must not stop the follower
            logger.error("following the reload state failed, still serving: %s", log_safe(exc))


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
