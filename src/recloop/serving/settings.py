"""Service settings: environment variables ``RECLOOP_*`` (or keyword arguments in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recloop.artifacts.manifest import MIN_TEMPERATURE
from recloop.errors import ConfigError
from recloop.serving.ab import ArmConfig, check_arms
from recloop.serving.schemas import Limits
from recloop.stores import check_store_url


class ServeSettings(BaseSettings):
    """Everything ``create_app`` needs; field ``x`` reads ``RECLOOP_X`` from the environment."""

    model_config = SettingsConfigDict(
        env_prefix="RECLOOP_", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    artifact: Path
    """Artifact (or run) directory to serve; with ``ab``, the first arm's (filled in from it)."""
    ab: tuple[ArmConfig, ...] = ()
    """A/B serving (:mod:`recloop.serving.ab`): two or more arms, each an artifact with a
    weight (and optionally its own serving policy); users are split by a stable hash of
    their id.  The first arm is the control, the one /admin/reload switches (not with
    ``registry``).
    From the environment: ``RECLOOP_AB`` as a JSON list of ``{"name", "artifact", "weight"}``
    objects.  Empty: one artifact, no arms (lists record arm null)."""
    ab_salt: str = Field("recloop-ab", min_length=1, max_length=200)
    """Salt of the user hash: a new salt per experiment reshuffles who sees which arm."""
    store_url: str | None = None
    """Online store URL (redis://, sqlite:///, memory://); overrides ``redis_url``."""
    redis_url: str | None = None
    """Redis URL shared with ``recloop stream``; used as the store when ``store_url`` is unset.
    Neither set: an in-process memory store."""
    store_prefix: str = "recloop:"
    """Key prefix of the online store in Redis (must match the stream processor's)."""
    store_timeout_s: float = Field(0.25, gt=0)
    """Connect and command timeout of the online store, in seconds."""
    store_retry_s: float = Field(1.0, ge=0)
    """After a store failure, answer without the store for this long before trying again."""
    api_key: SecretStr | None = None
    """When set, every route but /healthz, /readyz and the admin routes needs header
    ``X-API-Key`` equal to it."""
    admin_key: SecretStr | None = None
    """When set, the admin routes (/admin/reload) are on and need header ``X-Admin-Key`` equal
    to it (the API key is neither needed nor enough).  Unset: they answer 404, unless
    ``admin_localhost``."""
    admin_localhost: bool = False
    """Without ``admin_key``, turn the admin routes on for clients on 127.0.0.1/::1 only (no
    key; anyone else gets 404).  Not behind a proxy on the same host: every request would
    come from 127.0.0.1."""
    artifact_root: Path | None = None
    """Directory /admin/reload may load artifacts from (symlinks resolved, relative paths
    read from it); default: the served artifact's directory only (re-reading it)."""
    reload_state: Path | None = None
    """File through which the worker processes of one service share /admin/reload: the
    worker that reloads writes the new artifact path and version there, every worker checks
    it about every ``reload_poll_s`` seconds and loads that artifact, and a worker that
    starts (or restarts) serves the artifact it names.  ``recloop serve`` sets a fresh one
    per run; set it yourself (one file per service) when running ``app_from_env`` under
    uvicorn or gunicorn with several workers.  Unset: a reload reaches its own process only."""
    reload_poll_s: float = Field(1.0, gt=0)
    """How often each worker checks ``reload_state`` and ``registry`` (off the request path)."""
    registry: str | None = None
    """An artifact registry (``recloop registry``: a directory, or ``s3://BUCKET/PREFIX``) to
    follow: every worker checks its ``current.json`` about every ``reload_poll_s`` seconds
    and loads the current version when it changes (a promotion or rollback by ``recloop
    loop`` or by hand), so the service swaps by itself; versions on an object store are
    downloaded once into ``RECLOOP_REGISTRY_CACHE`` (default ``~/.cache/recloop/registry``).
    ``recloop serve REGISTRY`` sets it; the registry needs a current (promoted) version to
    start from."""
    default_n: int = Field(10, ge=1)
    """Items returned when a request does not say ``n``."""
    max_n: int = Field(100, ge=1)
    """Largest ``n`` a request may ask for (larger is a 422)."""
    max_batch: int = Field(256, ge=1)
    """Most users in one /v1/recommend/batch request."""
    max_recent_items: int = Field(1000, ge=1)
    """Longest ``recent_items`` list a request may send."""
    history_source: Literal["store", "request"] = "store"
    """Where a user's recent items come from when the request has none: the online store, or
    nowhere (``request``: only what the client sends; the store is then never read)."""
    cold_start: Literal["popular", "policy"] = "popular"
    """What a user the model does not know and who has no recent items gets: the popular
    items (deterministic whatever the policy, propensity 1), or ``policy``: the model's
    scores of the empty state (unknown user, all-padding history) drawn by the request's
    serving policy, with its propensities -- so an exploring policy explores from a user's
    first request on (ε = 1 is uniform), as a world roll-out does."""
    consumed_len: int = Field(100, ge=0)
    """Most recent items read from the store per user, for the history and for exclusion."""
    popular_cache_s: float = Field(1.0, ge=0)
    """Cache the store's popular list in the process for this long (it changes every slide)."""
    microbatch: bool = True
    """Score concurrent /v1/recommend requests of one worker in one inference call."""
    microbatch_max: int = Field(64, ge=1)
    """Most requests one micro-batch scores together."""
    gc_freeze: bool = True
    """After start-up, move everything loaded (torch, the app, the model) out of the cyclic
    garbage collector's reach (``gc.freeze``): full collections stop walking it, which took
    the service's p99 latency under load from about 100 ms to about 20 ms.  Turn off when the
    app is embedded in a process that keeps loading and dropping large object graphs."""
    inference: Literal["torch", "onnxruntime"] = "torch"
    """Engine of the policy's forward pass: ``torch``, or ``onnxruntime`` (the policy is
    exported to ONNX at load and checked against PyTorch; needs ``recloop[export]``).  On
    these CPUs onnxruntime ran recloop's default GRU policy about 5x faster at batch 1."""
    search: Literal["auto", "ann", "exact"] = "auto"
    """How top-k lists find their items: ``auto`` uses the artifact's approximate index
    when it has one (``recloop index build``; needs ``recloop[ann]``), ``ann`` requires one,
    ``exact`` scores every item.  Exploring policies (softmax, epsilon) always score every
    item."""
    ann_margin: int = Field(16, ge=0)
    """Candidates asked of the approximate index beyond k plus the items masked in the row;
    they are rescored exactly, so the margin only buys recall."""
    torch_threads: int = Field(1, ge=1)
    """Intra-op threads per worker process (1: workers, not threads, use the cores)."""
    otel: bool = False
    """Keep FastAPI's native OpenTelemetry instrumentation on (off: it costs more per request
    than scoring; ``/metrics`` is the service's own Prometheus endpoint)."""
    policy: Literal["topk", "softmax", "plackett_luce", "epsilon"] = "topk"
    """Default serving policy (a request may choose another): ``topk`` (deterministic),
    ``softmax`` (= ``plackett_luce``: a Plackett-Luce sample from softmax(scores / T)) or
    ``epsilon`` (epsilon-greedy over the top-n); see :mod:`recloop.serving.exploration`.
    An artifact's ``serving`` section in its manifest (and an A/B arm's own policy) takes
    precedence over this, and a request's ``policy`` over both; the same goes for
    ``temperature`` and ``epsilon``."""
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=1e6)
    """Default T of the softmax policy."""
    epsilon: float = Field(0.1, ge=0, le=1)
    """Default exploration probability per slot of the epsilon policy."""
    bus_url: str | None = None
    """Log every served list to this event bus (redis://host:port/db or
    kafka://host:port/topic; read by ``recloop stream``, which writes it to the SQL log).
    Takes precedence over ``database_url``."""
    database_url: str | None = None
    """Without ``bus_url``: log every served list straight into this SQL database (the
    stream processor's log tables).  Neither set: served lists are not logged."""
    stream: str = "recloop:events"
    """Event stream the served lists are published to (the stream processor's)."""
    table_prefix: str = Field("", pattern=r"^[A-Za-z0-9_]*$")
    """Prefix of the SQL log tables (as the stream processor's ``table_prefix``)."""
    served_queue: int = Field(10_000, ge=1)
    """Served lists waiting to be logged at most; beyond it they are dropped and counted in
    ``recloop_served_lists{outcome="dropped"}`` (the request is never held up)."""
    served_linger_s: float = Field(0.02, ge=0, le=5)
    """The served-list log waits this long after a list arrives for more to write with it
    (one bus or SQL round trip per batch instead of per micro-batch; off the request path)."""
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    """Log level of the ``recloop`` loggers and uvicorn (``recloop serve`` sets them up)."""

    @field_validator("store_url", "redis_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_store_url(v)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v

    @field_validator("registry", mode="before")
    @classmethod
    def _registry_name(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v  # a directory given as a Path

    @field_validator("policy", mode="after")
    @classmethod
    def _one_name(cls, v: str) -> str:
        return "softmax" if v == "plackett_luce" else v  # one policy, two names

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _artifact_from_arms(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("ab"):
            first = data["ab"][0]
            path = first.artifact if isinstance(first, ArmConfig) else first.get("artifact")
            given = data.get("artifact")
            if given is not None and path is not None and Path(given) != Path(path):
                raise ValueError(
                    f"with ab, artifact is the first arm's ({path}), got another ({given})"
                )
            data = {**data, "artifact": path}
        return data

    @model_validator(mode="after")
    def _check(self) -> ServeSettings:
        if self.ab:
            try:
                check_arms(self.ab)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        if self.registry is not None and self.ab:
            raise ValueError("ab and registry do not go together: serve fixed arms, or follow")
        if self.default_n > self.max_n:
            raise ValueError(f"default_n ({self.default_n}) must be <= max_n ({self.max_n})")
        return self

    @property
    def limits(self) -> Limits:
        """The request limits these settings allow."""
        return Limits(
            max_n=self.max_n, max_batch=self.max_batch, max_recent_items=self.max_recent_items
        )

    @property
    def admin_enabled(self) -> bool:
        return self.admin_key is not None or self.admin_localhost

    @property
    def resolved_artifact_root(self) -> Path:
        """Where reloads may read artifacts from, symlinks resolved."""
        return Path(self.artifact_root or self.artifact).resolve()

    @property
    def resolved_store_url(self) -> str | None:
        return self.store_url or self.redis_url
