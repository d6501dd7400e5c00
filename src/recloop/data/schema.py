"""The one internal schema every loader produces.

A loader returns :class:`RawData`: an events table plus optional user and item feature
tables, all polars frames with fixed column names.  Raw ids are kept as they were read
(``Int64`` when every id in the file is an integer, else ``String``); preparation maps them
to dense indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

USER = "user"
"""Raw user id column (Int64 or String)."""
ITEM = "item"
"""Raw item id column (Int64 or String)."""
TIMESTAMP = "timestamp"
"""Event time in whole seconds since the epoch (Int64)."""
BEHAVIOR = "behavior"
"""Kind of interaction (String), e.g. pv, cart, fav, buy; absent for rating data."""
RATING = "rating"
"""Explicit rating (Float64); absent for implicit-feedback data."""
POLICY_VERSION = "policy_version"
"""Optional: the model version that served the item (impressions read back with
``prepare --from-db --impressions``); kept by ``prepare`` beside ``propensity``, so a log
served by a mixture of versions says which version each propensity belongs to."""
PROPENSITY = "propensity"
"""Optional: the probability with which the logging policy showed the item (0, 1]; kept by
``prepare`` for off-policy corrections and estimators."""
SERVED_POLICY = "policy"
"""Optional: the serving policy that drew the item's list (topk, softmax, epsilon)."""
POSITION = "position"
"""Optional: the item's 0-based position in its served list."""
LIST_LENGTH = "list_length"
"""Optional: the number of items of its served list."""
EPSILON = "epsilon"
"""Optional: the exploration share of an ε-greedy list (null for other policies)."""
TEMPERATURE = "temperature"
"""Optional: the temperature of a softmax list (null for other policies)."""
LIST_SOURCE = "list_source"
"""Optional: what drew the item's list: ``policy`` (the model's serving policy) or
``popular`` (the service's fallback for a user it knows nothing about)."""
SERVING_COLUMNS = (SERVED_POLICY, POSITION, LIST_LENGTH, EPSILON, TEMPERATURE, LIST_SOURCE)
"""How each impression was served (``prepare --from-db --impressions`` reads them from the
served-items table): kept by ``prepare`` beside ``propensity``, so that OPE can score a
model as the service would serve it with the same exploration (``ope.target: served``)."""
SERVED_CONTEXT = "served_context"
"""Optional: what the impression's list was drawn from, as the service logged it (JSON text
``{"recent": [item ids], "rewards": [...], "excluded": [item ids]}``, on the row of a list's
first position, "" elsewhere): OPE's ``served`` target re-serves each model on it."""


def served_context_problem(context: object) -> str | None:
    """What is wrong with a served list's context (the parsed JSON of
    :data:`SERVED_CONTEXT`), or None: an object whose ``recent`` and ``rewards`` are lists
    of one length and whose ``excluded`` is a list."""
    if not isinstance(context, dict):
        return f"must be an object, got {type(context).__name__}"
    recent, rewards = context.get("recent"), context.get("rewards")
    if not isinstance(recent, list) or not isinstance(rewards, list):
        return "needs the lists recent and rewards"
    if len(recent) != len(rewards):
        return f"recent and rewards differ in length ({len(recent)}, {len(rewards)})"
    if not isinstance(context.get("excluded"), list):
        return "needs the list excluded"
    return None


EVENT_ID = "event_id"
"""Optional unique event id (String); used for idempotent logging."""

REQUIRED_EVENT_COLUMNS = (USER, ITEM, TIMESTAMP)
BEHAVIORS = ("pv", "cart", "fav", "buy")
"""Behaviour vocabulary of e-commerce logs (Tianchi ECommAI)."""


@dataclass(frozen=True)
class SkipReport:
    """Rows dropped by ``--skip-bad-rows``: how many and the first few reasons."""

    count: int = 0
    """Number of rows skipped."""
    examples: tuple[str, ...] = ()
    """Up to ten messages, each naming file, line, column and value."""

    def merge(self, other: SkipReport) -> SkipReport:
        return SkipReport(self.count + other.count, (self.examples + other.examples)[:10])


@dataclass(frozen=True, kw_only=True)
class RawData:
    """Events and optional side tables, as loaded.

    ``events`` has at least ``user``, ``item``, ``timestamp`` and at most one of ``behavior``
    and ``rating`` (both are allowed); extra columns pass through.  ``users`` has ``user`` plus
    feature columns, ``items`` has ``item`` plus feature columns.
    """

    events: pl.DataFrame
    """(E rows) user, item, timestamp[, behavior][, rating][, extras]."""
    users: pl.DataFrame | None = None
    """User feature table keyed by ``user``."""
    items: pl.DataFrame | None = None
    """Item feature table keyed by ``item``."""
    source: str = ""
    """Human-readable description of where the data came from (format and path)."""
    skipped: SkipReport = field(default_factory=SkipReport)
    """Bad rows skipped while loading (only with ``skip_bad_rows``)."""
