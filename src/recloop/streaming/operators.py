"""Per-batch stream operators: window buckets, watermarks, recent items, realised reward,
and the tensors of a batched recommendation refresh.

Everything here is pure and works on a whole batch at once (polars / numpy / torch); the
runner feeds it and writes the results to the sinks.

Sliding windows (popular items).  Time is cut into buckets of ``slide_s`` seconds; bucket
``b = ts // slide_s``.  The window ending with bucket ``e`` covers buckets ``e - k + 1 .. e``
with ``k = window_s / slide_s``, i.e. event times ``[(e - k + 1) * slide_s, (e + 1) *
slide_s)``.  Counting each event once in its bucket and summing the last ``k`` buckets counts
it exactly once in each of the ``k`` windows it falls in.  The published popular list is the
window ending with the newest bucket.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import orjson
import polars as pl

from recloop.stores import RecentItem

if TYPE_CHECKING:
    from torch import Tensor

    from recloop.artifacts import Artifact

PAD_ID = 0
"""Item index 0 is padding (as ``recloop.data.batch.PAD_ID``; not imported so that workers
without an artifact never load torch)."""

DEFAULT_REWARD = 1.0
"""Reward of an event that carries none: one interaction is worth one."""


def event_rewards(events: pl.DataFrame) -> pl.Series:
    """(E,) Float64: each event's ``reward``, or :data:`DEFAULT_REWARD` when absent."""
    return events["reward"].fill_null(DEFAULT_REWARD)


# ----------------------------------------------------------------------------- windows


def bucket_counts(events: pl.DataFrame, *, slide_s: int) -> pl.DataFrame:
    """Events per (bucket, item_id): columns bucket Int64, item_id String, events Int64."""
    if events.height == 0:
        return pl.DataFrame(schema={"bucket": pl.Int64, "item_id": pl.String, "events": pl.Int64})
    return (
        events.lazy()
        .group_by((pl.col("ts") // slide_s).alias("bucket"), "item_id")
        .agg(pl.len().cast(pl.Int64).alias("events"))
        .sort("bucket", "item_id")
        .collect()
    )


def top_from_buckets(
    counts: pl.DataFrame, *, end_bucket: int, n_buckets: int, top: int
) -> list[tuple[str, float]]:
    """Top ``top`` items of the window ending with ``end_bucket``: most events first, ties by
    item id.  ``counts`` has bucket, item_id, events (as :func:`bucket_counts` makes)."""
    window = counts.filter(
        (pl.col("bucket") > end_bucket - n_buckets) & (pl.col("bucket") <= end_bucket)
    )
    ranked = (
        window.group_by("item_id")
        .agg(pl.col("events").sum())
        .sort(["events", "item_id"], descending=[True, False])
        .head(top)
    )
    return [(str(i), float(n)) for i, n in ranked.iter_rows()]


def popular_reference(
    item_id: Sequence[str] | pl.Series, ts: np.ndarray, *, window_s: int, slide_s: int, top: int
) -> list[tuple[str, float]]:
    """The popular list computed directly from raw events: count the events whose time lies
    in the window ending with the newest event's bucket.  The check for the streaming path."""
    ts = np.asarray(ts, np.int64)
    if ts.size == 0:
        return []
    end = int(ts.max()) // slide_s
    lo, hi = (end - window_s // slide_s + 1) * slide_s, (end + 1) * slide_s
    frame = pl.DataFrame({"item_id": pl.Series(item_id, dtype=pl.String), "ts": ts})
    ranked = (
        frame.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi))
        .group_by("item_id")
        .agg(pl.len().alias("events"))
        .sort(["events", "item_id"], descending=[True, False])
        .head(top)
    )
    return [(str(i), float(n)) for i, n in ranked.iter_rows()]


@dataclass
class Watermark:
    """Event-time progress of one consumer: the newest event time it has seen.

    An event is late when it is older than the newest event time seen *before it* minus
    ``allowed_lateness_s`` (None: nothing is late).  Within a batch the events count in bus
    order, as if processed one by one.
    """

    allowed_lateness_s: int | None
    """Seconds an event may lag the newest event time and still be counted."""
    max_ts: int | None = None
    """Newest event time seen so far."""

    def observe(self, ts: np.ndarray) -> np.ndarray:
        """(E,) int64 event times in bus order → (E,) bool, True where late; advances."""
        ts = np.asarray(ts, np.int64)
        if ts.size == 0:
            return np.zeros(0, bool)
        start = np.iinfo(np.int64).min if self.max_ts is None else self.max_ts
        before = np.maximum.accumulate(np.concatenate([[start], ts[:-1]]))
        self.max_ts = int(max(start, int(ts.max())))
        if self.allowed_lateness_s is None:
            return np.zeros(ts.size, bool)
        seen = before != np.iinfo(np.int64).min
        return seen & (ts < before - self.allowed_lateness_s)

    @property
    def watermark(self) -> int | None:
        """Event time below which new events are late."""
        if self.max_ts is None or self.allowed_lateness_s is None:
            return None
        return self.max_ts - self.allowed_lateness_s


class PartitionedWatermarks:
    """A :class:`Watermark` per bus partition (Kafka), or one for a bus without partitions.

    A consumer of several Kafka partitions gets each partition in order but the partitions
    interleaved in any way (a whole fetched run of one, then of another), so lateness is
    judged per partition, as Flink's Kafka source judges it; Redis Streams is one ordered
    stream and keeps one watermark per consumer, as before.
    """

    def __init__(self, allowed_lateness_s: int | None) -> None:
        self.allowed_lateness_s = allowed_lateness_s
        self.parts: dict[int, Watermark] = {}

    def _part(self, p: int) -> Watermark:
        if p not in self.parts:
            self.parts[p] = Watermark(self.allowed_lateness_s)
        return self.parts[p]

    def observe(self, ts: np.ndarray, partitions: np.ndarray | None = None) -> np.ndarray:
        """(E,) event times in bus order and (E,) partitions (None: one) → (E,) bool late."""
        ts = np.asarray(ts, np.int64)
        if partitions is None:
            return self._part(-1).observe(ts)
        late = np.zeros(ts.size, bool)
        for p in np.unique(partitions).tolist():
            sel = partitions == p
            late[sel] = self._part(int(p)).observe(ts[sel])
        return late

    @property
    def max_ts(self) -> int | None:
        """The event time every partition seen has reached (the smallest of their newest)."""
        seen = [w.max_ts for w in self.parts.values() if w.max_ts is not None]
        return min(seen) if seen else None


# ----------------------------------------------------------------------------- recent items


def recent_by_user(events: pl.DataFrame, *, max_len: int) -> dict[str, list[RecentItem]]:
    """Each user's events of this batch as :class:`RecentItem` (item, reward, ts, event id),
    one per event id (its first occurrence), ordered by (ts, event id) as the stores order
    them, the last ``max_len`` only — the argument of ``OnlineStore.push_recent``."""
    if events.height == 0:
        return {}
    grouped = (
        events.with_columns(event_rewards(events).alias("_reward"))
        .unique("event_id", keep="first", maintain_order=True)
        .sort("ts", "event_id")
        .group_by("user_id", maintain_order=True)
        .agg(
            pl.col("item_id").tail(max_len),
            pl.col("_reward").tail(max_len),
            pl.col("ts").tail(max_len),
            pl.col("event_id").tail(max_len),
        )
    )
    return {
        u: [RecentItem(*x) for x in zip(i, r, t, e, strict=True)]
        for u, i, r, t, e in zip(
            grouped["user_id"].to_list(),
            grouped["item_id"].to_list(),
            grouped["_reward"].to_list(),
            grouped["ts"].to_list(),
            grouped["event_id"].to_list(),
            strict=True,
        )
    }


# ----------------------------------------------------------------------------- rewards


def realised_rewards(previous: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """Realised reward of each user's previous recommendation list.

    ``previous``: (user_id, item_id) rows, one per item of the user's previous list;
    ``events``: the user's events logged since that list (user_id, item_id, reward).  The
    realised reward is the sum of the rewards (:func:`event_rewards`) of the events whose item
    was on the list, and ``hits`` their number.  Every user of ``previous`` gets a row (0.0 and
    0 without hits); users without a previous list get none.
    """
    lists = previous.select("user_id", "item_id").unique()
    hits = (
        events.select("user_id", "item_id", event_rewards(events).alias("reward"))
        .join(lists, on=["user_id", "item_id"], how="semi")
        .group_by("user_id")
        .agg(pl.col("reward").sum().alias("realised_reward"), pl.len().alias("hits"))
    )
    return (
        lists.select("user_id")
        .unique(maintain_order=True)
        .join(hits, on="user_id", how="left")
        .with_columns(
            pl.col("realised_reward").fill_null(0.0).cast(pl.Float64),
            pl.col("hits").fill_null(0).cast(pl.Int64),
        )
    )


# ----------------------------------------------------------------------------- inference


class IdIndex:
    """Raw id → 1-based index for a whole column at once (0 for unknown ids)."""

    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = pl.Series("id", list(ids), dtype=pl.String)
        self._frame = pl.DataFrame(
            {"id": self.ids, "index": np.arange(1, len(ids) + 1, dtype=np.int64)}
        )
        self._raw = np.asarray(["", *ids], dtype=object)

    def lookup(self, values: Sequence[str] | pl.Series) -> np.ndarray:
        """(M,) raw ids → (M,) int64 indices, 0 where unknown."""
        col = pl.DataFrame({"id": pl.Series("id", values, dtype=pl.String)})
        out = col.join(self._frame, on="id", how="left", maintain_order="left")["index"]
        return np.array(out.fill_null(0).to_numpy(), dtype=np.int64)  # writable, for torch

    def raw(self, index: np.ndarray) -> np.ndarray:
        """Indices (any shape) → raw ids (object array, "" for 0)."""
        return self._raw[index]


@dataclass(frozen=True)
class HistoryBatch:
    """The policy inputs for a batch of users, from their recent items."""

    users: list[str]
    """Raw user ids, row order."""
    user: Tensor  # (B,) int64, 0 = unknown user
    history: Tensor  # (B, H) int64, last H known items, PAD_ID on the left
    history_reward: Tensor  # (B, H) float32, their rewards, 0 at padding
    consumed: Tensor  # (B, N + 1) bool, every recent item (to exclude from the ranking)


def history_batch(
    recent: Mapping[str, Sequence[tuple[str, float]]],
    *,
    user_index: IdIndex,
    item_index: IdIndex,
    history_len: int,
    n_items: int,
) -> HistoryBatch:
    """Each user's recent (item, reward) pairs (oldest first) → left-padded (B, H) inputs.

    Items the artifact does not know are dropped (they have no embedding, and cannot be
    ranked anyway); every known recent item is marked consumed.  Vectorised: the pairs are
    flattened once and each row's last H are gathered by offset arithmetic.
    """
    import torch

    users = list(recent)
    lengths = np.fromiter((len(recent[u]) for u in users), np.int64, len(users))
    pairs = list(itertools.chain.from_iterable(recent[u] for u in users))
    flat_item = item_index.lookup([p[0] for p in pairs])  # (M,)
    flat_reward = np.fromiter((p[1] for p in pairs), np.float32, len(pairs))
    row = np.repeat(np.arange(len(users)), lengths)
    known = flat_item != PAD_ID
    # Keep known items only, then take each row's last H by offset arithmetic.
    k_item, k_reward, k_row = flat_item[known], flat_reward[known], row[known]
    k_len = np.bincount(k_row, minlength=len(users)).astype(np.int64)
    ends = np.cumsum(k_len)
    starts = ends - k_len
    pos = ends[:, None] - np.arange(history_len, 0, -1)[None, :]  # (B, H)
    valid = pos >= starts[:, None]
    safe = np.clip(pos, 0, max(k_item.size - 1, 0))
    history = np.where(valid, k_item[safe] if k_item.size else 0, PAD_ID)
    history_reward = np.where(valid, k_reward[safe] if k_reward.size else 0.0, 0.0)
    consumed = torch.zeros(len(users), n_items + 1, dtype=torch.bool)
    consumed[torch.from_numpy(k_row), torch.from_numpy(k_item)] = True
    return HistoryBatch(
        users=users,
        user=torch.from_numpy(user_index.lookup(users)),
        history=torch.from_numpy(history.astype(np.int64)),
        history_reward=torch.from_numpy(history_reward.astype(np.float32)),
        consumed=consumed,
    )


@dataclass(frozen=True, eq=False)
class RecommendationRefresh:
    """Lists refreshed for one batch's users."""

    users: list[str]
    items: list[list[str]]
    scores: list[list[float]]
    model_version: str


class Recommender:
    """Batched refresh: users' recent items → one ``artifact.recommend`` call → raw ids.

    Shared by the Redis Streams workers and the Flink job's refresh step, so both score the
    same recent lists the same way."""

    def __init__(self, artifact: Artifact, *, n: int) -> None:
        self.artifact = artifact
        self.n = n
        self.user_index = IdIndex(artifact.user_ids)
        self.item_index = IdIndex(artifact.item_ids)

    def recommend(self, recent: Mapping[str, Sequence[tuple[str, float]]]) -> RecommendationRefresh:
        batch = history_batch(
            recent,
            user_index=self.user_index,
            item_index=self.item_index,
            history_len=self.artifact.history_len,
            n_items=self.artifact.n_items,
        )
        idx, scores = self.artifact.recommend(
            batch.user, batch.history, batch.history_reward, n=self.n, exclude=batch.consumed
        )
        raw = self.item_index.raw(idx.numpy())
        sc = scores.numpy().astype(np.float64)
        ok = np.isfinite(sc)  # -inf: fewer unconsumed items than n
        items = [r[m].tolist() for r, m in zip(raw, ok, strict=True)]
        values = [s[m].tolist() for s, m in zip(sc, ok, strict=True)]
        return RecommendationRefresh(batch.users, items, values, self.artifact.model_version)


def recommendation_rows(
    recs: RecommendationRefresh, new: pl.DataFrame, realised: pl.DataFrame
) -> pl.DataFrame:
    """The recommendation log's rows of a refresh: one per user of ``recs``, stamped with the
    newest event time of the user's ``new`` events, with the realised reward (and hits) of
    the user's previous list (:func:`realised_rewards`; null without a previous list)."""
    return (
        pl.DataFrame(
            {
                "user_id": pl.Series(recs.users, dtype=pl.String),
                "items": [orjson.dumps(x).decode() for x in recs.items],
                "scores": [orjson.dumps(x).decode() for x in recs.scores],
            }
        )
        .join(
            new.group_by("user_id").agg(pl.col("ts").max()),
            on="user_id",
            how="left",
            maintain_order="left",
        )
        .join(realised, on="user_id", how="left", maintain_order="left")
        .with_columns(pl.lit(recs.model_version).alias("model_version"))
        .select("user_id", "ts", "model_version", "items", "scores", "realised_reward", "hits")
    )
