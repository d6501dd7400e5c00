"""Request and response bodies of the recommendation service.

Requests are validated straight from the raw JSON bytes (pydantic-core parses and checks in
one pass); limits that depend on the settings (largest ``n``, batch size, list length) come
in through the validation context, so one model serves every configuration and its errors
name the field.  Responses are documented with models here but written with orjson from
plain dicts, so the hot path never validates its own output twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_ID_LEN = 512
"""Longest raw id accepted, in characters."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Settings-dependent bounds passed to validation as its context."""

    max_n: int
    """Largest ``n``."""
    max_batch: int
    """Most requests in one batch."""
    max_recent_items: int
    """Longest ``recent_items``."""


def _limits(info: ValidationInfo) -> Limits | None:
    ctx = info.context
    return ctx if isinstance(ctx, Limits) else None


class RecommendRequest(BaseModel):
    """Ranked items for one user; ids are raw (numbers are accepted and read as strings)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, coerce_numbers_to_str=True, use_attribute_docstrings=True
    )

    user_id: str = Field(min_length=1, max_length=MAX_ID_LEN)
    """Raw user id, as in the training data; unknown users are answered too."""
    recent_items: list[str] | None = None
    """Raw ids of the user's latest items, oldest first; omitted: read from the online store."""
    n: int | None = None
    """How many items to return (default: the service's ``default_n``)."""
    exclude_consumed: bool = True
    """Leave out the given recent items and the user's known history."""

    @field_validator("n")
    @classmethod
    def _check_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is None:
            return v
        if v < 1:
            raise ValueError("n must be >= 1")
        lim = _limits(info)
        if lim is not None and v > lim.max_n:
            raise ValueError(f"n must be <= {lim.max_n}")
        return v

    @field_validator("recent_items")
    @classmethod
    def _check_recent(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        lim = _limits(info)
        if v is not None and lim is not None and len(v) > lim.max_recent_items:
            raise ValueError(f"at most {lim.max_recent_items} recent items, got {len(v)}")
        return v


class RecommendBatchRequest(BaseModel):
    """Many users at once, scored as one batch."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    requests: list[RecommendRequest] = Field(min_length=1)
    """One entry per user, each like a /v1/recommend body."""

    @field_validator("requests")
    @classmethod
    def _check_len(cls, v: list[RecommendRequest], info: ValidationInfo) -> list[RecommendRequest]:
        lim = _limits(info)
        if lim is not None and len(v) > lim.max_batch:
            raise ValueError(f"at most {lim.max_batch} requests per batch, got {len(v)}")
        return v


class ReloadRequest(BaseModel):
    """Which artifact /admin/reload loads; omitted: the one served now, read again."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    artifact: Path | None = None
    """Artifact or run directory on the server's file system."""


class ScoredItem(BaseModel):
    item_id: str
    """Raw item id."""
    score: float
    """Policy score (or popularity count for ``source = popular``); higher ranks first."""


class RecommendResponse(BaseModel):
    """Ranked items, best first."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    items: list[ScoredItem]
    """At most ``n`` items, best first; fewer when exclusions leave fewer."""
    model_version: str
    """Version of the artifact that answered."""
    source: Literal["policy", "popular"]
    """``policy`` (scored by the model) or ``popular`` (fallback)."""
    warnings: list[str]
    """What the service ignored or could not use (unknown ids, store down)."""


class RecommendBatchResponse(BaseModel):
    results: list[RecommendResponse]
    """One result per request, in request order."""


class PopularResponse(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    items: list[ScoredItem]
    """Most popular items, best first."""
    source: Literal["realtime", "train"]
    """``realtime`` (the stream's sliding window, from the store) or ``train`` (the artifact's
    train-set counts, when the store has none or is down)."""
    model_version: str


class ReloadResponse(BaseModel):
    model_version: str
    previous_model_version: str
    artifact: str


class ErrorResponse(BaseModel):
    detail: Any
    """A message, or for validation errors a list of ``{loc, msg, type}``."""
