"""HTTP routes: parse, call :class:`RecommenderService`, write JSON.  Nothing else.

The recommend routes read the body bytes and validate them with pydantic-core directly
(``model_validate_json``) and return orjson bytes: FastAPI's generic body handling (stdlib
``json``, a second validation pass, ``jsonable_encoder``) costs more than the model's
forward pass at ml-100k size.  They are also served by plain Starlette routes placed in
front of FastAPI's: FastAPI's per-request dependency machinery cost about 100 µs a request
on the 2-core benchmark machine, Starlette's routing about 25.  ``POST /v1/recommend``, the
hot path, goes one step further: :func:`recommend_asgi` is a bare ASGI app that the
outermost middleware calls directly (``recloop.serving.app.ServiceMiddleware``), past
Starlette's middleware stack, router, ``Request`` and ``Response`` objects — the same
validation, answer and errors, for tens of microseconds less a request.  The FastAPI
declarations stay for the OpenAPI schema and run the same functions.

Routes are built per app (:func:`install_routes`): the request models carry the settings'
limits (see :func:`recloop.serving.schemas.request_models`), and the admin routes exist only
when the settings turn them on.  The 4 MiB body limit is enforced while the body streams in,
by ``recloop.serving.app.BodyLimitMiddleware``, before any route reads it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from recloop.errors import RecloopError
from recloop.serving.admin import ArtifactRootError, ReloadBroadcast, log_safe, reload_target
from recloop.serving.metrics import arm_feedback
from recloop.serving.schemas import (
    ErrorResponse,
    HealthResponse,
    PopularResponse,
    RecommendBatchResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
    RequestModels,
)
from recloop.serving.service import RecommenderService

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

JSON = "application/json"
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Larger bodies are refused (413) as soon as the limit is passed (see module doc)."""
VERSION_HEADER = "x-model-version"
"""Response header naming the model version that answered."""
_REF = "#/components/schemas/{model}"


class BodyError(Exception):
    """A request body the service will not parse (wrong type, too large)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def json_response(payload: Any, status: int = 200, *, version: str | None = None) -> Response:
    headers = {VERSION_HEADER: version} if version is not None else None
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON, headers=headers)


def _service(request: Request) -> RecommenderService:
    svc: RecommenderService = request.app.state.service
    return svc


async def parse_body(request: Request, model: type[M], *, allow_empty: bool = False) -> M | None:
    """The body validated as ``model``; 415 via :class:`BodyError`, 422 via
    :class:`RequestValidationError` with locations starting at ``body``."""
    check_content_type(request.headers.get("content-type"))
    return validate_body(await request.body(), model, allow_empty=allow_empty)


def check_content_type(ctype: str | None) -> None:
    """:class:`BodyError` 415 unless ``ctype`` (the header, None: absent) is JSON."""
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != JSON and not media.endswith("+json"):
            raise BodyError(415, f"content-type must be {JSON}, got {media or 'nothing'!r}")


def validate_body(body: bytes, model: type[M], *, allow_empty: bool = False) -> M | None:
    """``body`` validated as ``model`` (see :func:`parse_body`)."""
    if allow_empty and not body.strip():
        return None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**e, "loc": ("body", *e["loc"])}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        ) from None


def validation_error_response(exc: RequestValidationError) -> Response:
    """422 naming each failing field: ``{"detail": [{loc, msg, type}, ...]}``."""
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return json_response({"detail": detail}, 422)


def body_error_response(exc: BodyError) -> Response:
    return json_response({"detail": exc.detail}, exc.status)


def recommend_asgi(app: FastAPI, model: type[RecommendRequest]) -> ASGIApp:
    """``POST /v1/recommend`` as a bare ASGI app, for a body whose declared length is within
    the limit (the caller checks; anything else takes the full stack): the body validated
    as ``model``, the answer of ``app.state.service``, the same responses as the Starlette
    route and the exception handlers behind it (415, 422).  An unhandled exception
    propagates to Starlette's ``ServerErrorMiddleware``, outside the caller, as the
    route's does (500)."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nobody to answer
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            check_content_type(_content_type(scope))
            req = validate_body(chunks[0] if len(chunks) == 1 else b"".join(chunks), model)
        except BodyError as exc:
            response = body_error_response(exc)
        except RequestValidationError as exc:
            response = validation_error_response(exc)
        else:
            assert req is not None
            rec = await _service_of(app).recommend(req)
            response = json_response(rec.to_json(), version=rec.model_version)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    return asgi


def _service_of(app: FastAPI) -> RecommenderService:
    svc: RecommenderService = app.state.service
    return svc


def _content_type(scope: Scope) -> str | None:
    # as Starlette's Headers.get: the first one, header names are lower case in ASGI
    for key, value in scope["headers"]:
        if key == b"content-type":
            return bytes(value).decode("latin-1")
    return None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong X-API-Key"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    415: {"model": ErrorResponse, "description": "Body is not JSON"},
    422: {"model": ErrorResponse, "description": "Validation error naming the field"},
}
_VERSIONED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Successful Response",
        "headers": {
            "X-Model-Version": {
                "description": "Version of the model that answered.",
                "required": True,
                "schema": {"type": "string"},
            }
        },
    }
}


def _body(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a body read by :func:`parse_body`: a reference to the model's
    schema, which :func:`install_routes` adds to the components."""
    return {
        "requestBody": {
            "required": required,
            "content": {JSON: {"schema": {"$ref": _REF.format(model=model.__name__)}}},
        }
    }


def install_routes(
    app: FastAPI, *, models: RequestModels, max_n: int, admin: bool
) -> dict[str, ASGIApp]:
    """Every route of the service on ``app``: the Starlette hot paths first (first match
    wins), the FastAPI declarations behind them, and the request models in the schema's
    components.  Returns the bare ASGI apps of the POST paths the outermost middleware may
    answer itself (:func:`recommend_asgi`)."""

    async def recommend(request: Request) -> Response:
        """Ranked items for one user, best first."""
        svc = _service(request)
        req = await parse_body(request, models.recommend)
        assert req is not None
        rec = await svc.recommend(req)
        return json_response(rec.to_json(), version=rec.model_version)

    async def recommend_batch(request: Request) -> Response:
        """Ranked items for many users, scored as one batch."""
        svc = _service(request)
        req = await parse_body(request, models.batch)
        assert req is not None
        recs = await svc.recommend_many(req.requests)
        # the first result's model (each result names its own: A/B arms may differ)
        version = recs[0].model_version
        return json_response({"results": [r.to_json() for r in recs]}, version=version)

    async def popular(
        request: Request,
        n: int | None = Query(
            None, ge=1, le=max_n, description="How many items (default: default_n)."
        ),
    ) -> Response:
        """Real-time popular items (the stream's window), else the training set's."""
        got = await _service(request).popular(n)
        return json_response(got.to_json(), version=got.model_version)

    router = APIRouter()
    router.add_api_route(
        "/v1/recommend",
        recommend,
        methods=["POST"],
        response_model=RecommendResponse,
        responses={**_ERRORS, **_VERSIONED},
        openapi_extra=_body(models.recommend),
        tags=["recommend"],
    )
    router.add_api_route(
        "/v1/recommend/batch",
        recommend_batch,
        methods=["POST"],
        response_model=RecommendBatchResponse,
        responses={**_ERRORS, **_VERSIONED},
        openapi_extra=_body(models.batch),
        tags=["recommend"],
    )
    router.add_api_route(
        "/v1/popular",
        popular,
        methods=["GET"],
        response_model=PopularResponse,
        responses={**_ERRORS, **_VERSIONED},
        tags=["recommend"],
    )
    router.add_api_route(
        "/healthz", healthz, methods=["GET"], response_model=HealthResponse, tags=["health"]
    )
    router.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        tags=["health"],
        responses={503: {"description": "Not ready, with reasons"}},
    )
    router.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=Response,
        tags=["health"],
        responses={401: _ERRORS[401], 200: {"content": {"text/plain": {}}}},
    )
    bodies: list[type[BaseModel]] = [models.recommend, models.batch]
    if admin:
        router.add_api_route(
            "/admin/reload",
            reload,
            methods=["POST"],
            response_model=ReloadResponse,
            responses={
                **_ERRORS,
                401: {"model": ErrorResponse, "description": "Missing or wrong X-Admin-Key"},
                400: {"model": ErrorResponse, "description": "Artifact refused"},
                403: {"model": ErrorResponse, "description": "Outside the artifact root"},
            },
            openapi_extra=_body(ReloadRequest, required=False),
            tags=["admin"],
        )
        bodies.append(ReloadRequest)
    app.include_router(router)
    app.router.routes[0:0] = [
        Route("/v1/recommend", recommend, methods=["POST"], include_in_schema=False),
        Route("/v1/recommend/batch", recommend_batch, methods=["POST"], include_in_schema=False),
    ]
    _, defs = models_json_schema([(m, "validation") for m in bodies], ref_template=_REF)
    components = defs.get("$defs", {})
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI lists the models it validates; these bodies are validated by parse_body,
        # so their schemas are added here for the references in _body to resolve.
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented extension
    return {"/v1/recommend": recommend_asgi(app, models.recommend)}


async def healthz(request: Request) -> Response:
    """The process is alive; which model it serves."""
    svc: RecommenderService | None = getattr(request.app.state, "service", None)
    version = svc.model.model_version if svc is not None else None
    c = svc.canary if svc is not None else None
    canary = None if c is None else {"model_version": c[0], "share": c[1]}
    return json_response(
        {"status": "ok", "model_version": version, "canary": canary}, version=version
    )


async def readyz(request: Request) -> Response:
    """The model is loaded and the online store answers."""
    svc: RecommenderService | None = getattr(request.app.state, "service", None)
    if svc is None:
        return json_response({"status": "unready", "reasons": ["model not loaded"]}, 503)
    reasons = await svc.readiness()
    version = svc.model.model_version
    body = {
        "status": "unready" if reasons else "ready",
        "model_version": version,
        "reasons": reasons,
    }
    return json_response(body, 503 if reasons else 200, version=version)


async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    svc = _service(request)
    body = svc.metrics.render()
    # per-arm clicks and rewards are counted where they are attributed, by the stream
    # workers; their heartbeats in the shared store carry them here
    get = getattr(svc.store, "get_heartbeats", None)
    if get is not None:
        from recloop.streaming.heartbeat import HEARTBEAT_MAX_AGE_S

        try:
            beats = await asyncio.wait_for(
                get(max_age_s=HEARTBEAT_MAX_AGE_S), timeout=svc.settings.store_timeout_s * 4
            )
        except Exception as exc:  # the service's own metrics come first
            logger.debug("/metrics: stream workers' heartbeats unreadable: %s", exc)
        else:
            if any(b.get("arms") for b in beats.values()):
                body += arm_feedback(beats)
    return Response(body, media_type=svc.metrics.content_type)


async def reload(request: Request) -> Response:
    """Load an artifact under the artifact root and switch every worker to it; a broken
    one is refused (400) and the served model stays."""
    svc = _service(request)
    req = await parse_body(request, ReloadRequest, allow_empty=True)
    try:
        target = None
        if req is not None and req.artifact is not None:
            target = reload_target(req.artifact, svc.settings.resolved_artifact_root)
        res = await svc.reload(target)
    except ArtifactRootError as exc:
        logger.warning("reload refused: %s", log_safe(exc))
        return json_response({"detail": str(exc)}, 403)
    except RecloopError as exc:
        return json_response({"detail": str(exc)}, 400)
    broadcast: ReloadBroadcast | None = getattr(request.app.state, "reload_broadcast", None)
    if broadcast is None:
        logger.warning("reload reached this process only: RECLOOP_RELOAD_STATE is not set")
    else:
        try:
            broadcast.publish(svc.artifact_path, res.model_version)
        except OSError as exc:  # this worker did switch: say so, and why the others did not
            logger.error(
                "reload reached this process only: cannot write %s (%s)",
                broadcast.path,
                log_safe(exc),
            )
    return json_response(
        {
            "model_version": res.model_version,
            "previous_model_version": res.previous_model_version,
            "artifact": res.artifact,
        },
        version=res.model_version,
    )
