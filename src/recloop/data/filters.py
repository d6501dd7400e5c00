"""Event filters: exact duplicates, interaction-count filters and k-core, DBRL user sampling.

Every filter returns a keep mask over flat event arrays plus what it removed, so the prepare
pipeline can record each step's effect in the manifest — no data disappears silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from recloop.config import check

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """Which events and which users/items survive cleaning.

    The filters run before the split, on every event — as RecBole's do — because the split
    is defined on the events that survive.  So with ``min_*_events > 1`` or ``k_core > 0``,
    held-out events help decide which users and items (and so which training events) are
    kept: a held-out-blind pipeline keeps the defaults (1, 1, 0), which drop nothing.
    ``dedupe`` only drops exact copies, keeping the first in source order, so a held-out
    event can never remove a training one.
    """

    dedupe: bool = True
    """Drop exact duplicate events (every column equal), keeping the first in source order."""
    min_user_events: int = 1
    """Drop users with fewer events (counted after dedupe)."""
    min_item_events: int = 1
    """Drop items with fewer events (counted after dedupe)."""
    k_core: int = 0
    """k > 0 raises both minimums to at least k and repeats the two filters until every
    remaining user and item has that many events (the k-core); 0 applies them once."""
    max_rounds: int = 1000
    """Give up (with a warning) if the k-core has not settled after this many rounds."""

    def __post_init__(self) -> None:
        check(self.min_user_events >= 0, "filters.min_user_events must be >= 0")
        check(self.min_item_events >= 0, "filters.min_item_events must be >= 0")
        check(self.k_core >= 0, f"filters.k_core must be >= 0, got {self.k_core}")
        check(self.max_rounds >= 1, "filters.max_rounds must be >= 1")


@dataclass(frozen=True, kw_only=True)
class UserSampleConfig:
    """DBRL-style sampling of users with short and with long histories (off by default).

    DBRL (Tianchi ECommAI) keeps 60 000 random users with 6..50 events and 20 000 with 51..200:
    ``short_users=60000, long_users=20000`` with the default bands reproduces it.  Users outside
    both bands are dropped once sampling is on.
    """

    short_users: int = 0
    """How many users to draw from the short band; 0 with long_users 0 switches sampling off."""
    short_min_events: int = 6
    """Fewest events of a short-history user (inclusive)."""
    short_max_events: int = 50
    """Most events of a short-history user (inclusive)."""
    long_users: int = 0
    """How many users to draw from the long band."""
    long_min_events: int = 51
    """Fewest events of a long-history user (inclusive)."""
    long_max_events: int = 200
    """Most events of a long-history user (inclusive)."""
    seed: int = 0
    """Seed of the draw."""

    def __post_init__(self) -> None:
        check(self.short_users >= 0 and self.long_users >= 0, "sample counts must be >= 0")
        check(
            1 <= self.short_min_events <= self.short_max_events,
            "sample_users: need 1 <= short_min_events <= short_max_events",
        )
        check(
            1 <= self.long_min_events <= self.long_max_events,
            "sample_users: need 1 <= long_min_events <= long_max_events",
        )

    @property
    def enabled(self) -> bool:
        return self.short_users > 0 or self.long_users > 0


@dataclass(frozen=True)
class FilterResult:
    """Rows to keep and what the filter did."""

    keep: np.ndarray  # (E,) bool
    details: dict[str, Any] = field(default_factory=dict)


def duplicate_rows(
    events: pl.DataFrame,
    *,
    order: np.ndarray,
    user: np.ndarray,
    timestamp: np.ndarray,
    item: np.ndarray,
    source_keys: Mapping[str, np.ndarray] | None = None,
) -> FilterResult:
    """Keep mask (E,) in sorted order dropping exact duplicates of an earlier row.

    ``order`` (E,) maps sorted rows to rows of ``events``; ``user``, ``timestamp`` and ``item``
    (E,) are codes already in sorted order (by user, timestamp, source row).  ``source_keys``
    maps other columns of ``events`` to numeric arrays in source order (e.g. behaviour codes,
    ratings).  Duplicates share user and timestamp, so only runs of equal (user, timestamp) are
    looked at; inside them rows are grouped by item and the source keys.  When the keys cover
    every column that settles it; otherwise the grouped rows are compared on every column of
    ``events``.  The first row (in source order) of each duplicate group stays.
    """
    keys = dict(source_keys or {})
    e = user.shape[0]
    keep = np.ones(e, bool)
    if e < 2:
        return FilterResult(keep, {"duplicates": 0})
    same = (user[1:] == user[:-1]) & (timestamp[1:] == timestamp[:-1])
    in_run = np.zeros(e, bool)
    in_run[1:] |= same
    in_run[:-1] |= same
    cand = np.flatnonzero(in_run)
    if cand.shape[0] == 0:
        return FilterResult(keep, {"duplicates": 0})
    # Run number of each candidate: a new run wherever a candidate does not tie its predecessor.
    run = np.cumsum(~np.concatenate([[False], same])[cand])
    columns = [item[cand], *(k[order[cand]] for k in keys.values()), run]
    # Sorted by (run, item, keys…, position): equal neighbours are duplicates of the same
    # content, the first of each group being the earliest in source order.
    by = np.lexsort((cand, *columns[:-1][::-1], run))
    eq = np.ones(cand.shape[0] - 1, bool)
    for col in columns:
        c = col[by]
        eq &= c[1:] == c[:-1]
    exact = set(events.columns) <= {"user", "item", "timestamp", *keys}
    if exact:
        dup = cand[by[1:][eq]]
        keep[dup] = False
        return FilterResult(keep, {"duplicates": int(dup.shape[0])})
    paired = np.zeros(cand.shape[0], bool)
    paired[1:] |= eq
    paired[:-1] |= eq
    if not paired.any():
        return FilterResult(keep, {"duplicates": 0})
    sel = np.zeros(cand.shape[0], bool)
    sel[by[paired]] = True
    rows = cand[sel]
    sub = events[order[rows]].with_columns(pl.Series("__run", run[sel]))
    first = sub.select(pl.struct(pl.all()).is_first_distinct()).to_series().to_numpy()
    keep[rows[~first]] = False
    return FilterResult(keep, {"duplicates": int((~first).sum())})


def count_filter(
    user: np.ndarray,
    item: np.ndarray,
    *,
    n_users: int,
    n_items: int,
    cfg: FilterConfig,
    keep: np.ndarray | None = None,
) -> FilterResult:
    """Keep mask (E,) for the interaction-count filters (and k-core) over codes (E,).

    ``keep`` (E,) marks rows still in play (default all); the result never keeps a row it
    drops.  Without ``k_core`` both minimums are checked once against the same counts; with it
    the two filters repeat until nothing changes.  Each round is two bincounts and a mask.
    """
    min_u = max(cfg.min_user_events, cfg.k_core)
    min_i = max(cfg.min_item_events, cfg.k_core)
    keep = np.ones(user.shape[0], bool) if keep is None else keep.copy()
    if min_u <= 1 and min_i <= 1:
        return FilterResult(keep, {"rounds": 0})
    rounds = 0
    while True:
        rounds += 1
        w = keep.astype(np.int64)
        u_ok = np.bincount(user, weights=w, minlength=n_users) >= min_u
        i_ok = np.bincount(item, weights=w, minlength=n_items) >= min_i
        new = keep & u_ok[user] & i_ok[item]
        changed = bool((new != keep).any())
        keep = new
        if cfg.k_core == 0 or not changed:
            break
        if rounds >= cfg.max_rounds:
            logger.warning("k-core did not settle after %d rounds; stopping there", rounds)
            break
    return FilterResult(
        keep, {"rounds": rounds, "min_user_events": min_u, "min_item_events": min_i}
    )


def sample_users(
    user: np.ndarray,
    *,
    n_users: int,
    cfg: UserSampleConfig,
    keep: np.ndarray | None = None,
) -> FilterResult:
    """Keep mask (E,) of the events of users drawn from the short and long history bands.

    Only rows marked in ``keep`` (E,) count and can be kept (default all).
    """
    counts = np.bincount(user if keep is None else user[keep], minlength=n_users)
    rng = np.random.default_rng(cfg.seed)
    chosen = np.zeros(n_users, bool)
    details: dict[str, Any] = {}
    for band, want, lo, hi in (
        ("short", cfg.short_users, cfg.short_min_events, cfg.short_max_events),
        ("long", cfg.long_users, cfg.long_min_events, cfg.long_max_events),
    ):
        pool = np.flatnonzero((counts >= lo) & (counts <= hi) & ~chosen)
        take = min(want, pool.shape[0])
        if take < want:
            logger.warning(
                "sample_users: only %d users have %d..%d events, %d wanted; taking them all",
                pool.shape[0],
                lo,
                hi,
                want,
            )
        picked = rng.choice(pool, size=take, replace=False) if take else pool[:0]
        chosen[picked] = True
        details[band] = {"candidates": int(pool.shape[0]), "wanted": want, "chosen": int(take)}
    kept = chosen[user]
    return FilterResult(kept if keep is None else kept & keep, details)
