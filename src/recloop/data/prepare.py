"""The prepare pipeline: raw events → a :class:`~recloop.data.dataset.PreparedDataset`.

Steps, in order (each filter records what it removed in the manifest):

1. dense codes for raw user and item ids, and one chronological sort by
   (user, timestamp, source row) — ties in time keep source order;
2. ``filters.dedupe``: exact duplicate events;
3. interaction-count filters and k-core (``filters``);
4. DBRL sampling of short- and long-history users (``sample_users``, off by default);
5. the split (``split``), per user block in time order;
6. id maps ranked by TRAINING frequency (index 1 = most frequent in train; ids seen only in
   valid/test follow by raw id; 0 reserved for padding/unknown);
7. rewards from behaviours or ratings (``reward``);
8. sessions (``sessions``) and discounted returns per session (``gamma``); a session also
   ends where the user's events change split, so no return adds a held-out reward;
9. user and item feature tables as Int32 codes (``features``).

Nothing about valid/test events reaches a training row: not the id order, not a session, not
a return (``tests/test_leakage.py`` holds the pipeline to that).  Two things are decided on
all events, by design, and documented where they are configured: the catalogue (an item seen
only in valid/test still gets an index — the last ones, so N counts it, as a shop's catalogue
lists new items before anyone buys them) and the count filters (``filters``: off by
default).

Everything is flat numpy arrays and a few polars calls; nothing loops over users or rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl

from recloop.config import check, config_to_dict
from recloop.data.dataset import SPLIT_NAMES, TRAIN, PreparedDataset
from recloop.data.filters import (
    FilterConfig,
    UserSampleConfig,
    count_filter,
    duplicate_rows,
    sample_users,
)
from recloop.data.ids import (
    DenseCodes,
    FeatureConfig,
    IdMap,
    dense_codes,
    encode_features,
    frequency_ranked,
)
from recloop.data.lists import list_returns, list_starts
from recloop.data.loaders.base import LoadOptions
from recloop.data.rewards import BEHAVIOR_CODES, RewardConfig, behavior_codes, compute_rewards
from recloop.data.schema import (
    BEHAVIOR,
    EPSILON,
    ITEM,
    LIST_LENGTH,
    LIST_SOURCE,
    POLICY_VERSION,
    POSITION,
    PROPENSITY,
    RATING,
    SERVED_CONTEXT,
    SERVED_POLICY,
    SERVING_COLUMNS,
    TIMESTAMP,
    USER,
    RawData,
    SkipReport,
)
from recloop.data.sessions import (
    SessionConfig,
    chronological_order,
    discounted_returns,
    session_starts,
)
from recloop.data.splits import SplitConfig, assign_splits
from recloop.errors import ConfigError, DataError, PrepareError

logger = logging.getLogger(__name__)

KEPT_COLUMNS = (
    *(USER, ITEM, TIMESTAMP, BEHAVIOR, RATING, PROPENSITY, POLICY_VERSION),
    *SERVING_COLUMNS,
    SERVED_CONTEXT,
)
"""The input columns prepare keeps; the manifest lists the others as dropped."""


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """Everything ``recloop prepare`` does to raw events (YAML sections mirror these fields)."""

    filters: FilterConfig = field(default_factory=FilterConfig)
    """Duplicate removal, interaction-count filters and k-core."""
    sample_users: UserSampleConfig = field(default_factory=UserSampleConfig)
    """DBRL-style sampling of short- and long-history users (off by default)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Behaviour → reward and rating → reward."""
    sessions: SessionConfig = field(default_factory=SessionConfig)
    """How histories are cut into sessions."""
    gamma: float = 0.9
    """Discount of the per-session returns G_t = r_t + gamma * G_{t+1}."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Train / validation / test protocol."""
    features: FeatureConfig = field(default_factory=FeatureConfig)
    """Encoding of the user and item feature tables."""

    def __post_init__(self) -> None:
        check(0.0 <= self.gamma <= 1.0, f"gamma must lie in [0, 1], got {self.gamma}")


@dataclass(frozen=True, kw_only=True)
class PrepareJob(PrepareConfig):
    """A prepare config plus how to read the source: the YAML of ``recloop prepare --config``."""

    load: LoadOptions = field(default_factory=LoadOptions)
    """How to read the raw data: skip_bad_rows, and columns (the mapping for csv/parquet)."""


@dataclass
class _Ledger:
    """Counts after each step, for the manifest and the log."""

    n_user_codes: int
    n_item_codes: int
    steps: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self,
        step: str,
        user: np.ndarray,
        item: np.ndarray,
        keep: np.ndarray | None = None,
        *,
        n_users: int | None = None,
        n_items: int | None = None,
        **details: Any,
    ) -> None:
        """Count the rows of ``user`` / ``item`` (E,) marked in ``keep`` (default all)."""
        if keep is not None:
            user, item = user[keep], item[keep]
        events = int(user.shape[0])
        if n_users is None:
            n_users = int(np.count_nonzero(np.bincount(user, minlength=self.n_user_codes)))
        if n_items is None:
            n_items = int(np.count_nonzero(np.bincount(item, minlength=self.n_item_codes)))
        before = self.steps[-1]["events"] if self.steps else events
        entry: dict[str, Any] = {
            "step": step,
            "events": events,
            "users": n_users,
            "items": n_items,
            "removed_events": before - events,
            **details,
        }
        self.steps.append(entry)
        logger.info(
            "%s: %d events, %d users, %d items (%d events removed)",
            step,
            events,
            n_users,
            n_items,
            entry["removed_events"],
        )
        if events == 0:
            raise PrepareError(f"no events left after step {step!r}; loosen the config ({entry})")


class _Clock:
    """Debug-level timing of the pipeline's phases."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.last_cpu = time.process_time()

    def lap(self, phase: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        logger.debug(
            "prepare phase %s: %.3f s (%.3f s CPU)", phase, now - self.last, cpu - self.last_cpu
        )
        self.last, self.last_cpu = now, cpu


@dataclass
class _Source:
    """Per-event columns of the raw events, in source order.

    Mutable on purpose: the pipeline drops each array (``release``) as soon as it has been
    used, since at 100M events every int64 column is 800 MB.
    """

    users: DenseCodes
    items: DenseCodes
    timestamp: np.ndarray  # (E,) int64
    behavior: np.ndarray | None  # (E,) int8 behaviour codes
    rating: np.ndarray | None  # (E,) float64
    propensity: np.ndarray | None  # (E,) float64 in (0, 1], the logging policy's
    policy_version: np.ndarray | None  # (E,) str, the model version that served the item
    serving: dict[str, np.ndarray]  # SERVING_COLUMNS present, each (E,): how it was served
    context: np.ndarray | None  # (E,) object: JSON text of what the list was drawn from, ""

    def dedupe_keys(self) -> dict[str, np.ndarray]:
        keys = {BEHAVIOR: self.behavior, RATING: self.rating}
        return {k: v for k, v in keys.items() if v is not None}

    def release_sort_keys(self) -> None:
        """Drop the user codes and timestamps once the chronological order holds them."""
        self.users = DenseCodes(_EMPTY_CODES, self.users.values)
        self.timestamp = _EMPTY_CODES


_EMPTY_CODES = np.zeros(0, np.int32)
_EMPTY_ROWS = np.zeros(0, np.int64)


def _timestamps(events: pl.DataFrame) -> np.ndarray:
    s = events[TIMESTAMP]
    if s.null_count():
        raise DataError(f'column "{TIMESTAMP}": {s.null_count()} missing timestamps')
    if isinstance(s.dtype, pl.Datetime):
        s = s.dt.epoch("s")
    elif not s.dtype.is_integer():
        raise DataError(f'column "{TIMESTAMP}" must hold integer seconds, got {s.dtype}')
    return s.cast(pl.Int64).to_numpy()


def _propensities(events: pl.DataFrame) -> np.ndarray:
    """The logged ``propensity`` column as float64, every value in (0, 1]."""
    s = events[PROPENSITY]
    try:
        # text that is no number becomes null, and so NaN: reported below with its row
        p = s.cast(pl.Float64, strict=False).to_numpy()
    except pl.exceptions.PolarsError:
        raise DataError(f'column "{PROPENSITY}" must hold numbers, got {s.dtype}') from None
    bad = np.flatnonzero(~((p > 0) & (p <= 1)))  # NaN and null fail too
    if bad.shape[0]:
        row = int(bad[0])
        raise DataError(
            f'column "{PROPENSITY}", row {row + 1}: {s[row]!r} is not a probability in (0, 1] '
            f"({bad.shape[0]} such rows)"
        )
    return p


def _serving_columns(events: pl.DataFrame) -> dict[str, np.ndarray]:
    """The :data:`SERVING_COLUMNS` the events have, checked: ``policy`` and ``list_source``
    as text (null ""),
    ``position`` >= 0 and ``list_length`` >= 1 as int32 (no null), ``position`` below
    ``list_length``, ``epsilon`` in [0, 1] and ``temperature`` > 0 as float64 (null NaN)."""
    out: dict[str, np.ndarray] = {}

    def fail(col: str, rows: np.ndarray, what: str) -> DataError:
        row = int(rows[0])
        return DataError(
            f'column "{col}", row {row + 1}: {events[col][row]!r} {what} '
            f"({rows.shape[0]} such rows)"
        )

    for col in SERVING_COLUMNS:
        if col not in events.columns:
            continue
        s = events[col]
        if col in (SERVED_POLICY, LIST_SOURCE):
            out[col] = s.cast(pl.String).fill_null("").to_numpy().astype(str)
            continue
        integer = col in (POSITION, LIST_LENGTH)
        try:
            x = s.cast(pl.Float64, strict=False).to_numpy()
        except pl.exceptions.PolarsError:
            raise DataError(f'column "{col}" must hold numbers, got {s.dtype}') from None
        if integer:
            lowest = 0 if col == POSITION else 1
            bad = np.flatnonzero(~((x >= lowest) & (x == np.round(x)) & (x < 2**31)))
            if bad.shape[0]:
                raise fail(col, bad, f"is not an integer >= {lowest}")
            out[col] = x.astype(np.int32)
        else:
            ok = (x >= 0) & (x <= 1) if col == EPSILON else x > 0
            bad = np.flatnonzero(~(ok | np.isnan(x)))
            if bad.shape[0]:
                want = "in [0, 1]" if col == EPSILON else "> 0"
                raise fail(col, bad, f"is not {want}")
            out[col] = x
    if POSITION in out and LIST_LENGTH in out:
        bad = np.flatnonzero(out[POSITION] >= out[LIST_LENGTH])
        if bad.shape[0]:
            raise fail(POSITION, bad, f"is not below its list_length {out[LIST_LENGTH][bad[0]]}")
    return out


def _ratings(events: pl.DataFrame) -> np.ndarray:
    """The ``rating`` column as float64; each value must stay finite as a float32 reward
    (1e308 would become inf, and every return after it NaN)."""
    r = events[RATING].cast(pl.Float64).to_numpy()
    limit = float(np.finfo(np.float32).max)
    bad = np.flatnonzero(~(np.abs(r) <= limit) & ~np.isnan(r))
    if bad.shape[0]:
        row = int(bad[0])
        raise DataError(
            f'column "{RATING}", row {row + 1}: {float(r[row])!r} does not fit a float32 reward '
            f"(|rating| <= {limit:.3g}; {bad.shape[0]} such rows)"
        )
    return r


def _read_source(raw: RawData) -> _Source:
    ev = raw.events
    missing = [c for c in (USER, ITEM, TIMESTAMP) if c not in ev.columns]
    if missing:
        raise DataError(f"events table lacks column(s) {', '.join(missing)}")
    if ev.height == 0:
        raise PrepareError(f"{raw.source or 'input'}: no events to prepare")
    behavior = behavior_codes(ev[BEHAVIOR]) if BEHAVIOR in ev.columns else None
    rating = _ratings(ev) if RATING in ev.columns else None
    return _Source(
        propensity=_propensities(ev) if PROPENSITY in ev.columns else None,
        policy_version=(
            ev[POLICY_VERSION].cast(pl.String).fill_null("").to_numpy().astype(str)
            if POLICY_VERSION in ev.columns
            else None
        ),
        serving=_serving_columns(ev),
        # object, not numpy's fixed-width str: one long context would widen every row
        context=(
            np.asarray(ev[SERVED_CONTEXT].cast(pl.String).fill_null("").to_numpy(), dtype=object)
            if SERVED_CONTEXT in ev.columns
            else None
        ),
        users=dense_codes(ev[USER], name=USER),
        items=dense_codes(ev[ITEM], name=ITEM),
        timestamp=_timestamps(ev),
        behavior=behavior,
        rating=rating,
    )


@dataclass
class _Cleaned:
    """The rows that survived the filters, sorted by (user code, timestamp, source row).

    Mutable: :func:`_reindex` replaces each array by its reordered copy, one at a time, so
    that no more than one extra column is alive at once.
    """

    row: np.ndarray  # (E,) int64 source row
    user: np.ndarray  # (E,) int32 user code
    item: np.ndarray  # (E,) int32 item code
    timestamp: np.ndarray  # (E,) int64


@dataclass(frozen=True)
class _Rest:
    """What the pipeline still needs of the raw data once the event columns are codes."""

    dedupe_events: pl.DataFrame
    """The raw events when duplicates must be compared on columns beyond the codes, else an
    empty frame with their column names (so the raw table can be freed)."""
    columns: list[str]
    users: pl.DataFrame | None
    items: pl.DataFrame | None
    source: str
    skipped: SkipReport

    @staticmethod
    def of(raw: RawData, src: _Source) -> _Rest:
        ev = raw.events
        exact = set(ev.columns) <= {USER, ITEM, TIMESTAMP, *src.dedupe_keys()}
        return _Rest(
            dedupe_events=ev.clear() if exact else ev,
            columns=ev.columns,
            users=raw.users,
            items=raw.items,
            source=raw.source,
            skipped=raw.skipped,
        )


def _clean(
    src: _Source, rest: _Rest, cfg: PrepareConfig, ledger: _Ledger, clock: _Clock
) -> _Cleaned:
    """Sort once, then dedupe, count-filter and sample, narrowing one keep mask."""
    # Later steps only drop rows (or move whole user blocks), so this is the only sort.  Rows
    # are dropped once, at the end, and columns the filters do not need are gathered then.
    chrono = chronological_order(src.users.codes, src.timestamp)
    src.release_sort_keys()
    row, ts = chrono.order, chrono.timestamp
    user = chrono.user.astype(np.int32)
    del chrono
    item = src.items.codes[row]
    clock.lap("sort")
    ledger.record(
        "load",
        user,
        item,
        n_users=src.users.n_codes,
        n_items=src.items.n_codes,
        skipped_bad_rows=rest.skipped.count,
    )
    keep: np.ndarray | None = None
    if cfg.filters.dedupe:
        dup = duplicate_rows(
            rest.dedupe_events,
            order=row,
            user=user,
            timestamp=ts,
            item=item,
            source_keys=src.dedupe_keys(),
        )
        keep = dup.keep
        ledger.record("dedupe", user, item, keep, **dup.details)
        clock.lap("dedupe")
    counted = count_filter(
        user, item, n_users=src.users.n_codes, n_items=src.items.n_codes, cfg=cfg.filters, keep=keep
    )
    if counted.details["rounds"]:
        keep = counted.keep
        name = "k_core" if cfg.filters.k_core else "min_events"
        ledger.record(name, user, item, keep, **counted.details)
    if cfg.sample_users.enabled:
        sampled = sample_users(user, n_users=src.users.n_codes, cfg=cfg.sample_users, keep=keep)
        keep = sampled.keep
        ledger.record("sample_users", user, item, keep, **sampled.details)
    clock.lap("filters")
    if keep is not None and not keep.all():
        # Rows are dropped once, here, one column at a time (each old column freed at once).
        kept = np.flatnonzero(keep)
        del keep
        row = row[kept]
        user = user[kept]
        item = item[kept]
        ts = ts[kept]
    return _Cleaned(row=row, user=user, item=item, timestamp=ts)


@dataclass(frozen=True)
class _Indexed:
    """Kept events under the final id maps, sorted by (user index, timestamp, source row)."""

    user_map: IdMap
    item_map: IdMap
    offsets: np.ndarray  # (U + 2,) int64
    row: np.ndarray  # (E,) int64 source row
    user: np.ndarray  # (E,) int32
    item: np.ndarray  # (E,) int32
    timestamp: np.ndarray  # (E,) int64
    split: np.ndarray  # (E,) int8 TRAIN / VALID / TEST
    split_info: dict[str, Any]


def _reindex(
    cleaned: _Cleaned, n_user_codes: int, n_item_codes: int, split_cfg: SplitConfig
) -> _Indexed:
    """Split each user's block, rank ids by training frequency, move the blocks into place.

    Consumes ``cleaned``: its columns are replaced by their reordered copies one by one.
    """
    user, item = cleaned.user, cleaned.item
    # The split needs only each user's block in time order, which the code order has too;
    # it comes first so that the id maps can count training events alone.
    code_counts = np.bincount(user, minlength=n_user_codes).astype(np.int64)
    code_offsets = np.zeros(n_user_codes + 1, np.int64)
    np.cumsum(code_counts, out=code_offsets[1:])
    splits = assign_splits(code_offsets, cleaned.timestamp, split_cfg)
    train = splits.split == TRAIN
    user_map = frequency_ranked(user, n_user_codes, rank_by=train)
    item_map = frequency_ranked(item, n_item_codes, rank_by=train)
    del train
    n_users, e = user_map.size, int(user.shape[0])
    offsets = np.zeros(n_users + 2, np.int64)
    np.cumsum(user_map.counts[1:], out=offsets[2:])
    # Kept rows are grouped by user code in code order; a block move is index arithmetic.
    old_start = code_offsets[user_map.code_of_index[1:]]
    perm = _block_permutation(old_start, offsets[1:-1], user_map.counts[1:], e)
    del user
    cleaned.user = _EMPTY_CODES
    # One column at a time: gather, then let the old one go.
    cleaned.row = cleaned.row[perm]
    cleaned.timestamp = cleaned.timestamp[perm]
    split = splits.split[perm]
    moved = item[perm]
    del item, perm
    cleaned.item = _EMPTY_CODES
    item_index = item_map.index_of_code[moved]
    del moved
    return _Indexed(
        user_map=user_map,
        item_map=item_map,
        offsets=offsets,
        row=cleaned.row,
        user=np.repeat(np.arange(1, n_users + 1, dtype=np.int32), user_map.counts[1:]),
        item=item_index,
        timestamp=cleaned.timestamp,
        split=split,
        split_info=splits.info,
    )


_PERM_CHUNK = 1 << 24
"""Rows per step when adding the row numbers to a block permutation (bounds the scratch)."""


def _block_permutation(
    old_start: np.ndarray, new_start: np.ndarray, counts: np.ndarray, e: int
) -> np.ndarray:
    """(E,) gather index that moves block k (``counts[k]`` rows) from ``old_start[k]`` to
    ``new_start[k]``: position p of the new order takes row ``p - new_start[k] + old_start[k]``.

    int32 while the rows number under 2**31 (half the memory and bandwidth of int64); the
    row numbers are added in chunks, never as one (E,) arange.
    """
    dtype = np.int32 if e < 2**31 else np.int64
    perm = np.repeat((old_start - new_start).astype(dtype), counts)
    for lo in range(0, e, _PERM_CHUNK):
        hi = min(e, lo + _PERM_CHUNK)
        perm[lo:hi] += np.arange(lo, hi, dtype=dtype)
    return perm


def prepare(raw: RawData, cfg: PrepareConfig) -> PreparedDataset:
    """Run the whole pipeline on ``raw`` and return the dataset (not yet saved).

    Memory: the raw events table is read once, at the start, into compact codes; a caller
    that hands over its only reference (``prepare(load_raw(...), cfg)``) lets it be freed
    then, which at 100M events is some 2.5 GB of the peak.  Every later array is dropped as
    soon as it has been used.
    """
    clock = _Clock()
    src = _read_source(raw)
    if cfg.reward.source == "behavior" and src.behavior is None:
        raise ConfigError(f'reward.source is "behavior" but the events have no "{BEHAVIOR}"')
    if cfg.reward.source == "rating" and src.rating is None:
        raise ConfigError(f'reward.source is "rating" but the events have no "{RATING}"')
    rest = _Rest.of(raw, src)
    del raw
    clock.lap("codes")
    ledger = _Ledger(src.users.n_codes, src.items.n_codes)
    cleaned = _clean(src, rest, cfg, ledger, clock)
    n_user_codes, n_item_codes = src.users.n_codes, src.items.n_codes
    idx = _reindex(cleaned, n_user_codes, n_item_codes, cfg.split)
    del cleaned
    clock.lap("split and id maps")
    # Per-event columns in final order: one gather each, then rewards from them.
    extra: dict[str, np.ndarray] = {}
    if src.behavior is not None:
        extra[BEHAVIOR] = src.behavior[idx.row]
    if src.rating is not None:
        extra[RATING] = src.rating[idx.row].astype(np.float32)
    if src.propensity is not None:
        extra[PROPENSITY] = src.propensity[idx.row]
    if src.policy_version is not None:
        extra[POLICY_VERSION] = src.policy_version[idx.row]
    for col, values in src.serving.items():
        extra[col] = values[idx.row]
    if src.context is not None:
        extra[SERVED_CONTEXT] = src.context[idx.row]
    src.behavior = src.rating = src.propensity = src.policy_version = src.context = None
    src.serving = {}
    rewards = compute_rewards(
        behavior=extra.get(BEHAVIOR),
        rating=extra.get(RATING),
        n_events=idx.row.shape[0],
        cfg=cfg.reward,
        source_row=idx.row,
    )
    reward = rewards.reward
    idx = replace(idx, row=_EMPTY_ROWS)  # the source rows are not part of the dataset

    gap = cfg.sessions.gap_seconds if cfg.sessions.mode == "gap" else None
    starts = session_starts(idx.user, idx.timestamp, gap_seconds=gap, split=idx.split)
    session = np.cumsum(starts, dtype=np.int32)
    session -= 1
    lists = (
        None
        if POSITION not in extra
        else list_starts(idx.user, idx.timestamp, extra[POSITION]) | starts
    )
    if lists is not None and int(lists.sum()) < lists.shape[0]:
        # impressions of lists longer than one: a step is a list (its slots were drawn
        # together from one state), so a slot's return skips the slots beside it
        returns = list_returns(reward, session_starts=starts, starts=lists, gamma=cfg.gamma)
    else:
        returns = discounted_returns(reward, starts, cfg.gamma)
    del starts, lists
    clock.lap("sessions and returns")

    user_feats = encode_features(
        rest.users, key=USER, values=src.users.values, id_map=idx.user_map, cfg=cfg.features
    )
    item_feats = encode_features(
        rest.items, key=ITEM, values=src.items.values, id_map=idx.item_map, cfg=cfg.features
    )
    clock.lap("features")
    split_counts = np.bincount(idx.split, minlength=3)
    manifest: dict[str, Any] = {
        "source": rest.source,
        "config": config_to_dict(cfg),
        "counts": {
            "steps": ledger.steps,
            "sessions": int(session[-1]) + 1,
            "splits": {SPLIT_NAMES[k]: int(split_counts[k]) for k in SPLIT_NAMES},
            "skipped_bad_rows": rest.skipped.count,
            "skipped_examples": list(rest.skipped.examples),
        },
        "reward_source": rewards.source,
        "split": {"mode": cfg.split.mode, **idx.split_info},
        "id_maps": {
            "order": "descending count of TRAIN events, ties and held-out-only ids by "
            "ascending raw id",
            "padding_index": 0,
            "user_id_dtype": str(src.users.values.dtype),
            "item_id_dtype": str(src.items.values.dtype),
        },
        "columns": {
            **({BEHAVIOR: {"codes": BEHAVIOR_CODES, "missing": 0}} if BEHAVIOR in extra else {}),
            **({RATING: {"dtype": "float32"}} if RATING in extra else {}),
            **({PROPENSITY: {"dtype": "float64"}} if PROPENSITY in extra else {}),
            **({POLICY_VERSION: {"dtype": "string"}} if POLICY_VERSION in extra else {}),
            **{c: {"dtype": str(extra[c].dtype)} for c in SERVING_COLUMNS if c in extra},
            **({SERVED_CONTEXT: {"dtype": "string"}} if SERVED_CONTEXT in extra else {}),
        },
        "dropped_columns": [c for c in rest.columns if c not in KEPT_COLUMNS],
        "features": {
            "user": user_feats.columns,
            "item": item_feats.columns,
            "skipped": {"user": user_feats.skipped, "item": item_feats.skipped},
        },
    }
    dataset = PreparedDataset(
        n_users=idx.user_map.size,
        n_items=idx.item_map.size,
        user=idx.user,
        item=idx.item,
        timestamp=idx.timestamp,
        reward=reward,
        returns=returns,
        session=session,
        split=idx.split,
        user_offsets=idx.offsets,
        user_ids=idx.user_map.raw_ids(src.users.values),
        item_ids=idx.item_map.raw_ids(src.items.values),
        user_features=user_feats.table,
        item_features=item_feats.table,
        extra=extra,
        manifest=manifest,
    )
    logger.info(
        "prepared %d events, %d users, %d items in %.2f s",
        dataset.n_events,
        dataset.n_users,
        dataset.n_items,
        time.perf_counter() - clock.start,
    )
    return dataset
