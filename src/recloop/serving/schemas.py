"""Request and response bodies of the recommendation service.

Requests are validated straight from the raw JSON bytes (pydantic-core parses and checks in
one pass), in strict mode: what the OpenAPI schema forbids is refused (``"n": "3"``,
``"exclude_consumed": 0``, ``"user_id": 196.5``), and what it allows is accepted — JSON
Schema's integers include ``196.0``, which is read as the id ``"196"`` (not ``"196.0"``, an
id nobody has) — so clients generated from the schema and the service agree.  The limits
that depend on the settings (largest ``n``, batch size, list length) are declared on per-app
subclasses built by :func:`request_models`, so they appear in the schema as
``maximum``/``maxItems`` and their errors name the field.  Responses are documented with
models here but written with orjson from plain dicts, so the hot path never validates its
own output twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    create_model,
)

from recloop.artifacts.manifest import MIN_TEMPERATURE
from recloop.data.validity import NUL_MESSAGE

MAX_ID_LEN = 512
"""Longest raw id accepted, in characters."""
INT_ID_MIN, INT_ID_MAX = -(2**63), 2**63 - 1
"""Range of the JSON integers accepted as ids (int64, as ids in the wild)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Settings-dependent bounds of the request bodies."""

    max_n: int
    """Largest ``n``."""
    max_batch: int
    """Most requests in one batch."""
    max_recent_items: int
    """Longest ``recent_items``."""


def _whole(value: object) -> int | None:
    """A JSON number without a fraction as an int (JSON and JSON Schema do not tell 196
    from 196.0: both are the integer 196); None for anything else, booleans included."""
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    return None


def _number_id_to_str(value: object) -> object:
    # Raw ids are strings, but MovieLens-style numeric ids are often sent as JSON integers:
    # those are read as their decimal digits (196 and 196.0 both as "196").  Fractions,
    # booleans and anything else are left to fail the strict str check.
    whole = _whole(value)
    if whole is None:
        return value
    if not INT_ID_MIN <= whole <= INT_ID_MAX:
        raise ValueError(f"integer ids must lie in [{INT_ID_MIN}, {INT_ID_MAX}]")
    return str(whole)


def _whole_number(value: object) -> object:
    # "n": 3.0 is the integer 3 to JSON Schema; "3" and true are not integers and stay as
    # they are, for the strict int check to refuse
    whole = _whole(value)
    return value if whole is None else whole


def _id_schema(min_length: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": min_length, "maxLength": MAX_ID_LEN},
                {"type": "integer", "minimum": INT_ID_MIN, "maximum": INT_ID_MAX},
            ]
        }
    )


def _no_nul(value: str) -> str:
    # the SQL log cannot store it in served_items.user_id (PostgreSQL refuses the row):
    # refused here, as the stream refuses such events, rather than served and then never
    # logged.  Item ids may hold one: an unknown item is ignored, and the logged context
    # is JSON text, where it is escaped
    if "\x00" in value:
        raise ValueError(NUL_MESSAGE)
    return value


UserId = Annotated[
    str,
    Field(min_length=1, max_length=MAX_ID_LEN),
    BeforeValidator(_number_id_to_str),
    AfterValidator(_no_nul),
    _id_schema(1),
]
"""A raw user id: a non-empty string, or a whole number read as its decimal digits."""
ItemId = Annotated[
    str, Field(max_length=MAX_ID_LEN), BeforeValidator(_number_id_to_str), _id_schema(0)
]
"""A raw item id: a string, or a whole number read as its decimal digits."""


def _count(*, ge: int, le: int | None = None) -> Any:
    """A JSON integer in [ge, le] (``3`` or ``3.0``; not ``"3"``, not ``true``).  The bounds
    come before the validator: the other way round pydantic writes them into the JSON
    schema as ``ge``/``le`` instead of ``minimum``/``maximum``."""
    return Annotated[int, Field(ge=ge, le=le), BeforeValidator(_whole_number)]


_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)

_N_DOC = "How many items to return (default: the service's default_n)."
_RECENT_DOC = (
    "The user's latest items, oldest first: raw ids (reward 1 each), or objects "
    '{"item": id, "reward": r} with the reward the log records (0 for an item shown and '
    "ignored); omitted: read from the online store."
)
_REQUESTS_DOC = "One entry per user, each like a /v1/recommend body."

PolicyName = Literal["topk", "softmax", "plackett_luce", "epsilon"]
"""Serving policies (``plackett_luce`` is another name of ``softmax``), see
:mod:`recloop.serving.exploration`."""
SEED_MAX = 2**63 - 1
Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=1e6, allow_inf_nan=False)]
RewardValue = Annotated[float, Field(ge=-1e6, le=1e6, allow_inf_nan=False)]
Epsilon = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class RewardedItem(BaseModel):
    """A recent item with the reward it earned (the state's history reward)."""

    model_config = _STRICT

    item: ItemId = Field(description="Raw item id.")
    reward: RewardValue = Field(description="Its reward, as the behaviour log records it.")


def _recent_kind(value: Any) -> str:
    return "rewarded" if isinstance(value, dict | RewardedItem) else "id"


RecentEntry = Annotated[
    Annotated[ItemId, Tag("id")] | Annotated[RewardedItem, Tag("rewarded")],
    Discriminator(_recent_kind),
]
"""A recent item: its raw id (reward 1), or ``{"item", "reward"}``; an error names the form
it was read as (``id`` or ``rewarded``) after its position."""


class RecommendRequest(BaseModel):
    """Ranked items for one user; ids are raw (whole numbers are read as their digits)."""

    model_config = _STRICT

    user_id: UserId = Field(
        description="Raw user id, as in the training data; unknown users are answered too."
    )
    recent_items: list[RecentEntry] | None = Field(None, description=_RECENT_DOC)
    n: _count(ge=1) | None = Field(None, description=_N_DOC)  # type: ignore[valid-type]
    exclude_consumed: bool = Field(
        True, description="Leave out the given recent items and the user's known history."
    )
    policy: PolicyName | None = Field(
        None,
        description="How the list is drawn from the scores (default: the service's policy): "
        "topk (deterministic), softmax = plackett_luce (sampled from softmax(scores / T) "
        "without replacement) or epsilon (epsilon-greedy over the top-n).",
    )
    temperature: Temperature | None = Field(
        None, description="T of the softmax policy (default: the service's temperature)."
    )
    epsilon: Epsilon | None = Field(
        None, description="Exploration probability per slot of the epsilon policy."
    )
    seed: _count(ge=0, le=SEED_MAX) | None = Field(  # type: ignore[valid-type]
        None,
        description="Seed of the random draws; omitted: one is drawn and returned, so any "
        "answer can be reproduced.",
    )


class RecommendBatchRequest(BaseModel):
    """Many users at once, scored as one batch."""

    model_config = _STRICT

    requests: list[RecommendRequest] = Field(min_length=1, description=_REQUESTS_DOC)


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestModels:
    """The request bodies of one app, with its settings' limits declared on the fields."""

    recommend: type[RecommendRequest]
    """Body of /v1/recommend."""
    batch: type[RecommendBatchRequest]
    """Body of /v1/recommend/batch."""


def request_models(limits: Limits) -> RequestModels:
    """Subclasses of the request models whose fields carry ``limits`` (``le``,
    ``max_length``): one declaration for the validation and the OpenAPI schema."""
    one = create_model(
        "RecommendRequest",
        __base__=RecommendRequest,
        __doc__=RecommendRequest.__doc__,
        __module__=__name__,
        recent_items=(
            list[RecentEntry] | None,
            Field(None, max_length=limits.max_recent_items, description=_RECENT_DOC),
        ),
        n=(_count(ge=1, le=limits.max_n) | None, Field(None, description=_N_DOC)),
    )
    many = create_model(
        "RecommendBatchRequest",
        __base__=RecommendBatchRequest,
        __doc__=RecommendBatchRequest.__doc__,
        __module__=__name__,
        requests=(
            list[one],  # type: ignore[valid-type]  # a class built at run time
            Field(min_length=1, max_length=limits.max_batch, description=_REQUESTS_DOC),
        ),
    )
    return RequestModels(recommend=one, batch=many)


class ReloadRequest(BaseModel):
    """Which artifact /admin/reload loads; omitted: the one served now, read again."""

    model_config = _STRICT

    artifact: str | None = Field(None, min_length=1, max_length=4096)
    """Artifact or run directory under the service's artifact root (relative paths are
    read from the root)."""


class ScoredItem(BaseModel):
    item_id: str
    """Raw item id."""
    score: float
    """Policy score (or popularity count for ``source = popular``); higher ranks first."""


class ServedItem(ScoredItem):
    propensity: float
    """Probability that this item was shown at this position: for topk 1, for softmax its
    Plackett-Luce choice probability given the items above it, for epsilon its marginal
    probability at this position."""


class ServingPolicy(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    name: Literal["topk", "softmax", "epsilon"]
    """The policy that drew the list (popular fallbacks: topk)."""
    temperature: float | None
    """T (softmax only)."""
    epsilon: float | None
    """Exploration probability (epsilon only)."""
    seed: int | None
    """Seed of the draws (null for topk without a given seed): pass it back to reproduce."""


class RecommendResponse(BaseModel):
    """Ranked items, best first."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    recommendation_id: str
    """Id of this served list: send it back with feedback events to attribute them."""
    items: list[ServedItem]
    """At most ``n`` items in display order; fewer when exclusions leave fewer."""
    slate_propensity: float | None
    """Probability of the whole ordered list (topk: 1, softmax: the product of the
    propensities, epsilon: null)."""
    policy: ServingPolicy
    """How the list was drawn."""
    model_version: str
    """Version of the artifact that answered."""
    arm: str | None
    """A/B arm that answered (the service splits users by a hash of their id); null without
    A/B serving."""
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


class CanaryInfo(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    model_version: str
    """Version of the registry canary this process serves beside the current model."""
    share: float
    """Share of the users it answers."""


class HealthResponse(BaseModel):
    model_config = ConfigDict(use_attribute_docstrings=True)

    status: Literal["ok"]
    """Always ``ok``: the process answers."""
    model_version: str | None
    """Version of the model this process serves (null before the model is loaded)."""
    canary: CanaryInfo | None = None
    """The registry canary this process serves to a share of the users, if any."""


class ReloadResponse(BaseModel):
    model_version: str
    previous_model_version: str
    artifact: str


class ErrorResponse(BaseModel):
    detail: Any
    """A message, or for validation errors a list of ``{loc, msg, type}``."""
