"""Settings of the stream processor: environment (``RECLOOP_*``), then flags.

Services read their settings with pydantic-settings (as the recommendation service does), so
that a container is configured by environment alone; every field can also be given on the
command line.  ``RECLOOP_REDIS_URL`` names the bus and the online store when their own
variables are unset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic
from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recloop.errors import ConfigError


class StreamSettings(BaseSettings):
    """Where the stream processor reads, what it writes, and its windows and batch sizes."""

    model_config = SettingsConfigDict(
        env_prefix="RECLOOP_",
        frozen=True,
        extra="ignore",
        use_attribute_docstrings=True,
        populate_by_name=True,
    )

    bus_url: str = Field(
        "memory://",
        validation_alias=AliasChoices("bus_url", "RECLOOP_BUS_URL", "RECLOOP_REDIS_URL"),
    )
    """Event bus: redis://host:port/db (Redis Streams), kafka://host:port/topic (Kafka; see
    recloop.streaming.buses.kafka for its options) or memory:// (one process only)."""
    store_url: str | None = Field(
        None,
        validation_alias=AliasChoices("store_url", "RECLOOP_STORE_URL", "RECLOOP_REDIS_URL"),
    )
    """Online store (recent items, popular items, recommendations): redis://, sqlite:///path
    or memory://; None uses the bus URL when it is Redis, else memory://."""
    database_url: str = "sqlite:///./recloop-log.db"
    """SQLAlchemy URL of the behaviour log: postgresql+psycopg://, mysql+pymysql://, sqlite:///."""
    table_prefix: str = Field("", pattern=r"^[A-Za-z0-9_]*$")
    """Prefix of the SQL table names (behavior_log, recommendation_log, popular_buckets)."""
    store_prefix: str = "recloop:"
    """Namespace of the online store's Redis keys."""
    stream: str = "recloop:events"
    """Name of the event stream (Kafka: the topic when the bus URL names none, with ':'
    written '.')."""
    dead_letter_stream: str | None = None
    """Name of the dead-letter stream; None appends ":dead" to the event stream's name."""
    group: str = "recloop-stream"
    """Consumer group the workers share."""
    workers: int = Field(1, ge=1, le=64)
    """Worker processes; each reads its share of the stream under its own consumer name."""
    batch_size: int = Field(1000, ge=1, le=100_000)
    """Events read (and written to every sink) per batch."""
    block_ms: int = Field(1000, ge=0)
    """How long one read waits for new events."""
    claim_min_idle_ms: int = Field(30_000, ge=0)
    """Entries pending this long at another consumer are taken over (XAUTOCLAIM).  Redis
    Streams only: on Kafka the group coordinator hands a dead worker's partitions to the
    others after the bus URL's session.timeout.ms (default 10 s)."""
    claim_interval_s: float = Field(5.0, gt=0)
    """How often a worker looks for stale pending entries."""
    window_s: int = Field(3600, ge=1)
    """Length of the popular-items sliding window, in event-time seconds."""
    slide_s: int = Field(80, ge=1)
    """Slide of the window (and size of its count buckets); must divide window_s."""
    top: int = Field(20, ge=1)
    """How many popular items are published."""
    allowed_lateness_s: int | None = 300
    """Events older than the newest event time seen minus this are late: logged but not
    counted in the popular items (and counted in late_events); None or a negative value
    accepts any lateness."""
    popular_refresh_s: float = Field(1.0, ge=0)
    """At most this often the popular list is recomputed and published (and when idle)."""
    recent_len: int = Field(50, ge=1)
    """Recent items kept per user in the online store."""
    artifact: Path | None = None
    """Policy artifact: refresh the recommendations of each batch's users with it."""
    rec_n: int = Field(10, ge=1)
    """Items per refreshed recommendation list."""
    attribution: bool = True
    """Attribute feedback events to the served lists they answer (see
    :mod:`recloop.streaming.served`); one query per batch for the batch's users."""
    attribution_window_s: int = Field(1800, ge=0)
    """An event without a recommendation_id goes to the latest list that showed its user the
    item at most this many seconds before it; impressions are settled (reward 0 when
    unanswered) once the event-time watermark is this much plus the allowed lateness past
    them (no lateness when ``allowed_lateness_s`` is None).  Settled is final: feedback
    arriving later is logged and counted (``feedback_after_settlement``), not attributed.
    Each worker settles by its own watermark, so with several workers the allowed lateness
    should also cover how far one worker's batches can trail another's (a batch reclaimed
    from a stalled worker)."""
    backoff_initial_s: float = Field(0.1, gt=0)
    """First wait after a failed sink write; it doubles up to backoff_max_s."""
    backoff_max_s: float = Field(10.0, gt=0)
    """Longest wait between retries."""
    exit_when_idle_s: float | None = Field(None, gt=0)
    """Stop once no event arrived for this long (batch runs, tests); None runs until stopped."""
    stats_interval_s: float = Field(10.0, gt=0)
    """How often a worker logs its counters."""

    @field_validator("allowed_lateness_s", mode="after")
    @classmethod
    def _no_limit(cls, value: int | None) -> int | None:
        return None if value is not None and value < 0 else value

    @model_validator(mode="after")
    def _check(self) -> StreamSettings:
        if self.window_s % self.slide_s:
            raise ValueError(
                f"window_s ({self.window_s}) must be a multiple of slide_s ({self.slide_s})"
            )
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("backoff_max_s must be >= backoff_initial_s")
        return self

    @property
    def dead_letters(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        scheme = self.bus_url.split(":", 1)[0].lower()
        return self.bus_url if scheme in ("redis", "rediss", "unix") else "memory://"

    @property
    def n_buckets(self) -> int:
        """Buckets per window (window_s / slide_s)."""
        return self.window_s // self.slide_s


def load_stream_settings(**values: Any) -> StreamSettings:
    """Settings from the environment with ``values`` (None = not given) on top.

    Raises :class:`ConfigError` naming the field on a bad value.
    """
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return StreamSettings(**given)
    except pydantic.ValidationError as exc:
        msgs = []
        for e in exc.errors():
            if e["loc"]:
                where = ".".join(str(x) for x in e["loc"])
                msgs.append(f"{where}: {e['msg']} (got {e.get('input')!r})")
            else:
                msgs.append(str(e["msg"]).removeprefix("Value error, "))
        raise ConfigError("stream settings: " + "; ".join(msgs)) from None
