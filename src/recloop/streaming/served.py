"""Served lists on the bus, as log rows, and the attribution of feedback to them.

The service publishes every list it serves onto the event stream as one JSON object that
starts with ``{"type":"served"`` (orjson writes the keys in insertion order, no spaces), so
the stream processor tells them from behaviour events by a prefix test, without parsing::

    {"type": "served", "recommendation_id": "3f2a…", "user_id": "196", "ts": 1733350000,
     "model_version": "…", "arm": null, "policy": "softmax", "temperature": 1.0, "epsilon": null,
     "seed": 123, "source": "policy", "slate_propensity": 0.0123,
     "items": ["242", "302"], "scores": [3.1, 2.7], "propensities": [0.21, 0.06],
     "context": {"recent": ["50", "181"], "rewards": [1.0, 0.0], "excluded": ["50", "181"]}}

``context`` (null for the popular fallback, absent from older services) is what the model
drew the list from: the recent items its state was built from (the request's, else the
online store's, oldest first, with their rewards) and every consumed item it excluded from
the ranking (ids the model does not know included: a model that knows them would exclude
them).
OPE's ``served`` target re-serves a model on it (the store's list cannot be rebuilt from
the log afterwards).

In the SQL log a list is one row per shown item (``served_items``, key (recommendation_id,
position)), its ``context`` as JSON text on the row of position 0 (null on the others); see
:mod:`recloop.streaming.log`.

Attribution (:func:`attribute`) is a pure function of the impressions and the events, so
the order in which they arrive (and redeliveries) cannot change its answer:

1. an event carrying ``recommendation_id`` goes to that list's impression of the same user
   and item (its first position, should the list show the item twice), whenever it
   happened;
2. failing that, to the latest impression of the same user and item served at most
   ``window_s`` seconds before the event (``imp.ts <= event.ts <= imp.ts + window_s``);
3. an impression that several events claim takes the explicit one first, then the
   earliest (event time, then event id).

The impression's reward is the event's ``reward`` (1 when the event has none); an
impression nobody claimed gets 0 once settled, i.e. when the event-time watermark has
passed its ``ts + window_s + allowed lateness`` (the processor settles them).

Settled is final.  The processor attributes again only the impressions not settled yet
(:meth:`recloop.streaming.log.BehaviorLog.attribute_users`), and it leaves out the events a
settled impression holds and the events naming a list whose impression of their item is
settled: one event is never the reward of two impressions, and a click on one list is
never moved to another.  So what arrives after the impressions it concerns were settled
(a served list published late, feedback beyond the allowed lateness, a batch reclaimed
from a stalled worker) can change nothing settled; the processor counts the events naming
a settled list without being its reward (``WorkerStats.feedback_after_settlement``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
import polars as pl

from recloop.data import validity
from recloop.data.schema import served_context_problem

logger = logging.getLogger(__name__)

SERVED_PREFIX = b'{"type":"served"'
"""How a served-list payload starts (see the module docstring)."""

SERVED_SCHEMA: dict[str, pl.DataType] = {
    "recommendation_id": pl.String(),
    "position": pl.Int32(),
    "user_id": pl.String(),
    "item_id": pl.String(),
    "ts": pl.Int64(),
    "model_version": pl.String(),
    "arm": pl.String(),
    "policy": pl.String(),
    "temperature": pl.Float64(),
    "epsilon": pl.Float64(),
    "seed": pl.Int64(),
    "source": pl.String(),
    "score": pl.Float64(),
    "propensity": pl.Float64(),
    "slate_propensity": pl.Float64(),
    "context": pl.String(),
}
"""Columns of a served-items frame: one row per shown item (``context``: JSON text at
position 0, null elsewhere)."""

_LIST_FIELDS = (
    "recommendation_id",
    "user_id",
    "ts",
    "model_version",
    "arm",
    "policy",
    "temperature",
    "epsilon",
    "seed",
    "source",
    "slate_propensity",
)


def is_served(payload: bytes | None) -> bool:
    return payload is not None and payload.startswith(SERVED_PREFIX)


def encode_served(doc: dict[str, Any]) -> bytes:
    """The bus payload of one served list (``doc`` without ``type``)."""
    return orjson.dumps({"type": "served", **doc})


def _context_text(doc: dict[str, Any]) -> str | None:
    """A served list's ``context`` as JSON text (None stays None).  One that is not the
    service's shape is dropped with a warning naming the list: the list and its impressions
    are kept (OPE then rebuilds its state from the log, and says how many such lists)."""
    context = doc.get("context")
    if context is None:
        return None
    problem = served_context_problem(context)
    if problem is not None:
        logger.warning(
            "served list %r: field 'context' %s; context dropped, the list kept",
            doc.get("recommendation_id"),
            problem,
        )
        return None
    return orjson.dumps(context).decode()


def served_rows(docs: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """One :data:`SERVED_SCHEMA` row per shown item of the served-list documents.

    Raises ``ValueError``/``TypeError``/polars errors on a malformed document (the caller
    isolates it)."""
    if not docs:
        return pl.DataFrame(schema=SERVED_SCHEMA)
    for d in docs:
        n = len(d["items"])
        if len(d["scores"]) != n or len(d["propensities"]) != n:
            raise ValueError(
                f"served list {d.get('recommendation_id')!r}: items, scores and propensities "
                f"differ in length ({n}, {len(d['scores'])}, {len(d['propensities'])})"
            )
    lists = pl.DataFrame(
        {
            **{k: [d.get(k) for d in docs] for k in _LIST_FIELDS},
            "item_id": [d["items"] for d in docs],
            "score": [d["scores"] for d in docs],
            "propensity": [d["propensities"] for d in docs],
            "context": [_context_text(d) for d in docs],
        },
        schema_overrides={
            "item_id": pl.List(pl.String),
            "score": pl.List(pl.Float64),
            "propensity": pl.List(pl.Float64),
            "context": pl.String(),
            **{k: SERVED_SCHEMA[k] for k in _LIST_FIELDS},
        },
        strict=False,
    )
    rows = lists.with_columns(
        pl.int_ranges(0, pl.col("item_id").list.len(), dtype=pl.Int32).alias("position")
    ).explode("item_id", "score", "propensity", "position")
    rows = rows.drop_nulls("position")  # an empty list shows nothing
    # the list's context once, on its first row
    rows = rows.with_columns(
        pl.when(pl.col("position") == 0).then(pl.col("context")).alias("context")
    )
    if rows["recommendation_id"].null_count() or rows["user_id"].null_count():
        raise ValueError("served list without recommendation_id or user_id")
    out = rows.select([pl.col(c).cast(t) for c, t in SERVED_SCHEMA.items()])
    # the ids, times and texts the log can store (the stream's rules for events, and the
    # table's widths: PostgreSQL refuses a longer value, MariaDB may cut it short): a list
    # that breaks them is refused here, alone, rather than failing every write of its batch
    longest = out.select(pl.col(list(SERVED_WIDTHS)).str.len_chars().max()).row(0, named=True)
    for name, width in SERVED_WIDTHS.items():
        if (longest[name] or 0) > width:
            first = out.filter(pl.col(name).str.len_chars() > width).row(0, named=True)
            raise ValueError(
                f"served list {first['recommendation_id'][:80]!r}: field {name!r} longer than "
                f"{width} characters ({len(first[name])})"
            )
    if not validity.all_ok(out, _ROW_RULES):
        for name, rule in _ROW_RULES:
            bad = out.filter(~validity.rows_ok([(name, rule)]))
            if bad.height:
                first = bad.row(0, named=True)
                why = bad.select(validity.PROBLEM[rule](pl.col(name))).item(0, 0)
                raise ValueError(
                    f"served list {first['recommendation_id']!r}: field {name!r} {why}"
                )
    return out


SERVED_WIDTHS: dict[str, int] = {
    "recommendation_id": 64,
    "model_version": 128,
    "arm": 64,
    "policy": 16,
    "source": 16,
}
"""Widths (characters) of the served-items table's narrower text columns; ids and item ids
take ``MAX_ID_LEN`` (:mod:`recloop.data.validity`)."""

_ROW_RULES: tuple[tuple[str, validity.Rule], ...] = (
    ("recommendation_id", "id"),
    ("user_id", "id"),
    ("item_id", "id"),
    ("ts", "ts"),
)


ATTRIBUTION_SCHEMA: dict[str, pl.DataType] = {
    "recommendation_id": pl.String(),
    "position": pl.Int32(),
    "event_id": pl.String(),
    "reward": pl.Float64(),
    "attributed_by": pl.String(),
}


def attribute(impressions: pl.DataFrame, events: pl.DataFrame, *, window_s: int) -> pl.DataFrame:
    """Which event (if any) each impression gets, by the rules of the module docstring.

    ``impressions``: recommendation_id, position, user_id, item_id, ts; ``events``:
    event_id, user_id, item_id, ts, reward, recommendation_id (null: none).  Returns one
    :data:`ATTRIBUTION_SCHEMA` row per impression (event_id, reward, attributed_by null when
    no event is attributed); attributed_by is ``id`` or ``window``.
    """
    imp = impressions.select(
        "recommendation_id",
        pl.col("position").cast(pl.Int32),
        "user_id",
        "item_id",
        pl.col("ts").alias("imp_ts"),
    )
    ev = events.unique("event_id", keep="first").select(
        "event_id",
        "user_id",
        "item_id",
        pl.col("ts").alias("ev_ts"),
        pl.col("reward").cast(pl.Float64).fill_null(1.0),
        pl.col("recommendation_id").alias("link"),
    )
    explicit = (
        ev.filter(pl.col("link").is_not_null())
        .join(
            imp,
            left_on=["link", "user_id", "item_id"],
            right_on=["recommendation_id", "user_id", "item_id"],
        )
        # an item shown at two positions of the named list: the event goes to the first
        .sort(["event_id", "position"])
        .unique("event_id", keep="first")
        .select(
            pl.col("link").alias("recommendation_id"),
            "position",
            "event_id",
            "ev_ts",
            "reward",
            pl.lit(0).alias("prio"),
        )
    )
    rest = ev.join(explicit.select("event_id"), on="event_id", how="anti")
    window = (
        rest.join(imp, on=["user_id", "item_id"])
        .filter(
            (pl.col("imp_ts") <= pl.col("ev_ts")) & (pl.col("ev_ts") <= pl.col("imp_ts") + window_s)
        )
        # the latest impression before the event claims it
        .sort(
            ["event_id", "imp_ts", "recommendation_id", "position"],
            descending=[False, True, True, False],
        )
        .unique("event_id", keep="first")
        .select(
            "recommendation_id", "position", "event_id", "ev_ts", "reward", pl.lit(1).alias("prio")
        )
    )
    best = (
        pl.concat([explicit, window])
        .sort(["recommendation_id", "position", "prio", "ev_ts", "event_id"])
        .unique(["recommendation_id", "position"], keep="first")
        .select(
            "recommendation_id",
            "position",
            "event_id",
            "reward",
            pl.when(pl.col("prio") == 0)
            .then(pl.lit("id"))
            .otherwise(pl.lit("window"))
            .alias("attributed_by"),
        )
    )
    out = imp.select("recommendation_id", "position").join(
        best, on=["recommendation_id", "position"], how="left", maintain_order="left"
    )
    return out.select([pl.col(c).cast(t) for c, t in ATTRIBUTION_SCHEMA.items()])
