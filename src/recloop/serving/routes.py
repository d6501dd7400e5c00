"""HTTP routes: parse, call :class:`RecommenderService`, write JSON.  Nothing else.

The recommend routes read the body bytes and validate them with pydantic-core directly
(``model_validate_json``) and return orjson bytes: FastAPI's generic body handling (stdlib
``json``, a second validation pass, ``jsonable_encoder``) costs more than the model's
forward pass at ml-100k size.  They are also served by plain Starlette routes placed in
front of FastAPI's (:func:`fast_routes`): FastAPI's per-request dependency machinery cost
about 100 µs a request on the 2-core benchmark machine, Starlette's routing about 25.  The
FastAPI declarations below stay for the OpenAPI schema and run the same functions.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.routing import BaseRoute, Route

from recloop.errors import RecloopError
from recloop.serving.schemas import (
    ErrorResponse,
    PopularResponse,
    RecommendBatchRequest,
    RecommendBatchResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
)
from recloop.serving.service import RecommenderService

M = TypeVar("M", bound=BaseModel)

JSON = "application/json"
MAX_BODY_BYTES = 4 * 1024 * 1024
"""Larger bodies are refused (413) before they are parsed."""

router = APIRouter()


class BodyError(Exception):
    """A request body the service will not parse (wrong type, too large)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type=JSON)


def _service(request: Request) -> RecommenderService:
    svc: RecommenderService = request.app.state.service
    return svc


def _body_schema(model: type[BaseModel], *, required: bool = True) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {
                JSON: {
                    "schema": model.model_json_schema(ref_template="#/components/schemas/{model}")
                }
            },
        }
    }


async def parse_body(
    request: Request, model: type[M], *, context: Any = None, allow_empty: bool = False
) -> M | None:
    """The body validated as ``model``; 415/413 via :class:`BodyError`, 422 via
    :class:`RequestValidationError` with locations starting at ``body``."""
    ctype = request.headers.get("content-type")
    if ctype is not None:
        media = ctype.split(";", 1)[0].strip().lower()
        if media != JSON and not media.endswith("+json"):
            raise BodyError(415, f"content-type must be {JSON}, got {media or 'nothing'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BodyError(413, f"body of {declared} bytes exceeds {MAX_BODY_BYTES}")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise BodyError(413, f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    if allow_empty and not body.strip():
        return None
    try:
        return model.model_validate_json(body, context=context)
    except ValidationError as exc:
        raise RequestValidationError(
            [
                {**e, "loc": ("body", *e["loc"])}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        ) from None


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong X-API-Key"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    415: {"model": ErrorResponse, "description": "Body is not JSON"},
    422: {"model": ErrorResponse, "description": "Validation error naming the field"},
}


@router.post(
    "/v1/recommend",
    response_model=RecommendResponse,
    responses=_ERRORS,
    openapi_extra=_body_schema(RecommendRequest),
    tags=["recommend"],
)
async def recommend(request: Request) -> Response:
    """Ranked items for one user, best first."""
    svc = _service(request)
    req = await parse_body(request, RecommendRequest, context=svc.limits)
    assert req is not None
    rec = await svc.recommend(req)
    return json_response(rec.to_json())


@router.post(
    "/v1/recommend/batch",
    response_model=RecommendBatchResponse,
    responses=_ERRORS,
    openapi_extra=_body_schema(RecommendBatchRequest),
    tags=["recommend"],
)
async def recommend_batch(request: Request) -> Response:
    """Ranked items for many users, scored as one batch."""
    svc = _service(request)
    req = await parse_body(request, RecommendBatchRequest, context=svc.limits)
    assert req is not None
    recs = await svc.recommend_many(req.requests)
    return json_response({"results": [r.to_json() for r in recs]})


@router.get("/v1/popular", response_model=PopularResponse, responses=_ERRORS, tags=["recommend"])
async def popular(
    request: Request,
    n: int | None = Query(None, ge=1, description="How many items (default: default_n)."),
) -> Response:
    """Real-time popular items (the stream's window), else the training set's."""
    svc = _service(request)
    if n is not None and n > svc.limits.max_n:
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("query", "n"),
                    "msg": f"Input should be less than or equal to {svc.limits.max_n}",
                }
            ]
        )
    return json_response((await svc.popular(n)).to_json())


@router.get("/healthz", tags=["health"])
async def healthz() -> Response:
    """The process is alive."""
    return json_response({"status": "ok"})


@router.get("/readyz", tags=["health"], responses={503: {"description": "Not ready, with reasons"}})
async def readyz(request: Request) -> Response:
    """The model is loaded and the online store answers."""
    svc: RecommenderService | None = getattr(request.app.state, "service", None)
    if svc is None:
        return json_response({"status": "unready", "reasons": ["model not loaded"]}, 503)
    reasons = await svc.readiness()
    body = {
        "status": "unready" if reasons else "ready",
        "model_version": svc.model.model_version,
        "reasons": reasons,
    }
    return json_response(body, 503 if reasons else 200)


@router.get("/metrics", tags=["health"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    svc = _service(request)
    return Response(svc.metrics.render(), media_type=svc.metrics.content_type)


@router.post(
    "/admin/reload",
    response_model=ReloadResponse,
    responses={**_ERRORS, 400: {"model": ErrorResponse, "description": "Artifact refused"}},
    openapi_extra=_body_schema(ReloadRequest, required=False),
    tags=["admin"],
)
async def reload(request: Request) -> Response:
    """Load an artifact and switch to it atomically; a broken one is refused (400)."""
    svc = _service(request)
    req = await parse_body(request, ReloadRequest, allow_empty=True)
    try:
        res = await svc.reload(req.artifact if req is not None else None)
    except RecloopError as exc:
        return json_response({"detail": str(exc)}, 400)
    return json_response(
        {
            "model_version": res.model_version,
            "previous_model_version": res.previous_model_version,
            "artifact": res.artifact,
        }
    )


def fast_routes() -> list[BaseRoute]:
    """Starlette routes for the hot paths, to be placed before the FastAPI ones."""
    return [
        Route("/v1/recommend", recommend, methods=["POST"], include_in_schema=False),
        Route("/v1/recommend/batch", recommend_batch, methods=["POST"], include_in_schema=False),
    ]
