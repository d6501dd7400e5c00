"""The schema of an artifact's ``manifest.json`` and the model version derived from it.

The manifest is validated against :class:`Manifest` (strict types, every required key, no
unknown keys in the sections that change behaviour) before anything else is read, so a
damaged manifest fails with one line naming the file and the field instead of a
``KeyError`` deep inside loading.

Model version
-------------
``model_version`` is ``"{algo}-{h[:12]}"`` where ``h`` is the sha256 of the canonical JSON
(keys sorted, no whitespace, UTF-8, no NaN/inf) of::

    {"algo": ..., "config": ..., "policy": {...}, "weights_sha256": ..., "id_maps": {...}}

i.e. everything that changes what the artifact recommends: the weights (through their
sha256), the id maps (through theirs), the algorithm's config and the policy spec (sizes,
encoder and head configs).  The dataset summary, metrics, timestamps, versions of the
tools and the ``serving`` and ``index`` sections are left out: editing them changes no
score (an approximate index changes which items are scored; it is checked on its own).  (The
serving section picks how a list is drawn from the scores; every served list logs its
policy and propensities beside the model version, so a version still names one model.)
The version is written into the manifest at save time and derived again at load time;
a manifest whose recorded version differs from the derived one (say, an edited encoder
config that kept the old version) is refused.  Editing any of those inputs therefore
either changes the version or fails the load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from recloop.errors import ArtifactError

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A lower-case hex sha256 digest."""

USER_IDS = "user_ids.txt"
ITEM_IDS = "item_ids.txt"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class PolicySection(_Strict):
    """``manifest["policy"]``: what rebuilds the :class:`~recloop.artifacts.PolicySpec`."""

    n_users: int = Field(ge=0)
    n_items: int = Field(ge=1)
    encoder: dict[str, Any]
    head: dict[str, Any]


class IdMaps(_Strict):
    """``manifest["id_maps"]``: sha256 of each id-map file."""

    user_ids: Sha256 = Field(alias="user_ids.txt")
    item_ids: Sha256 = Field(alias="item_ids.txt")


class DatasetSection(BaseModel):
    """``manifest["dataset"]``: a summary of the training data; free-form but for these."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    path: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


MIN_TEMPERATURE = 1e-4
"""Smallest softmax temperature served: below it scores / T can overflow float64 (and the
policy is top-K in all but name).  Every place that takes a serving T checks it."""


class ServingSection(_Strict):
    """``manifest["serving"]`` (optional): how ``recloop serve`` draws this artifact's lists
    unless a request says otherwise (see :mod:`recloop.serving.exploration`).  Not part of
    the model version: it can be edited in place (say, in a registry's version directory)
    without retraining; the service reads it when it loads the artifact."""

    policy: Literal["topk", "softmax", "plackett_luce", "epsilon"] | None = None
    """Default serving policy of this artifact (None: the service's)."""
    temperature: float | None = Field(default=None, ge=MIN_TEMPERATURE, le=1e6, allow_inf_nan=False)
    """Default T of the softmax policy (None: the service's)."""
    epsilon: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    """Default exploration probability of the epsilon policy (None: the service's)."""


class IndexSection(_Strict):
    """``manifest["index"]`` (optional): an approximate item index beside the weights, written
    by ``recloop index build`` (see :mod:`recloop.artifacts.ann`).  Not part of the model
    version (it changes which candidates are scored, never a score); loading checks the
    file's sha256 and that ``weights_sha256`` is the artifact's own."""

    file: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The index file, in the artifact directory."""
    sha256: Sha256
    kind: Literal["hnsw", "ivf"]
    metric: Literal["inner_product"]
    params: dict[str, int]
    """Build and search parameters of the kind (m, ef_construction, ef_search; nlist,
    nprobe, seed)."""
    dim: int = Field(ge=1)
    n_items: int = Field(ge=1)
    weights_sha256: Sha256
    """The artifact weights it was built from."""
    faiss_version: str
    built_at: str


class Manifest(_Strict):
    """The whole ``manifest.json`` (see :mod:`recloop.artifacts.bundle`)."""

    format_version: int
    recloop_version: str
    torch_version: str
    created_at: str
    algo: str = Field(min_length=1)
    config: dict[str, Any]
    policy: PolicySection
    shapes: dict[str, list[Annotated[int, Field(ge=0)]]]
    dataset: DatasetSection
    metrics: dict[str, Any]
    id_maps: IdMaps
    weights_sha256: Sha256
    model_version: str
    serving: ServingSection | None = None
    index: IndexSection | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} (not valid JSON)")


def parse_manifest_text(text: str, *, path: Path) -> dict[str, Any]:
    """The JSON object in ``text``; NaN/Infinity literals and non-objects are refused."""
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    except ValueError as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(
            f"{path}: expected a JSON object at the top level, got {type(data).__name__}"
        )
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def validate_manifest(data: dict[str, Any], *, path: Path) -> Manifest:
    """``data`` checked against :class:`Manifest`; the first problem names its field."""
    try:
        return Manifest.model_validate(data)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "top level"
        if err["type"] == "missing":
            raise ArtifactError(f"{path}: field '{field}' is missing") from None
        if err["type"] == "extra_forbidden":
            raise ArtifactError(f"{path}: unknown field '{field}'") from None
        msg = err["msg"][:1].lower() + err["msg"][1:]
        raise ArtifactError(
            f"{path}: field '{field}': {msg}, got {_short(err.get('input'))}"
        ) from None


def canonical_json(value: Any) -> str:
    """Keys sorted, no whitespace, non-ASCII kept, NaN/inf refused: a stable byte form."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def derive_model_version(
    *,
    algo: str,
    config: dict[str, Any],
    policy: dict[str, Any],
    weights_sha256: str,
    id_maps: dict[str, str],
) -> str:
    """``"{algo}-{12 hex digits}"`` over everything that changes behaviour (module docstring)."""
    payload = {
        "algo": algo,
        "config": config,
        "policy": policy,
        "weights_sha256": weights_sha256,
        "id_maps": id_maps,
    }
    try:
        text = canonical_json(payload)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest's config is not plain finite JSON ({exc})") from None
    return f"{algo}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def model_version_of(data: dict[str, Any]) -> str:
    """:func:`derive_model_version` of a (validated) manifest mapping."""
    return derive_model_version(
        algo=data["algo"],
        config=data["config"],
        policy=data["policy"],
        weights_sha256=data["weights_sha256"],
        id_maps=data["id_maps"],
    )
