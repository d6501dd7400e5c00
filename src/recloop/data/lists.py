"""Served lists in a prepared dataset of impressions: where each list starts, the state its
service drew it from, and returns counted in lists.

A dataset read from the served-items table (``recloop prepare --from-db --impressions``)
holds one row per shown item, with its ``position`` in its list.  A list's items are
logged with one time and sorted by position, so a list runs from a position 0 (or, where
prepare dropped that row, a change of user or time, or a position that does not grow) to
the next.  The service drew every slot of a list from one state: the user's recent items
*before* the list (its logged ``served_context`` where the service logged one), never the
items above the slot.  So a model trained or evaluated on such data takes each slot's
state at its list's start (:func:`list_states`), and a step of the user's trajectory is a
list, not a row (:func:`list_returns`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import polars as pl

from recloop.data.dataset import PreparedDataset, split_period
from recloop.data.schema import POSITION, SERVED_CONTEXT, served_context_problem
from recloop.data.sessions import discounted_returns
from recloop.errors import DataError


def list_starts(user: np.ndarray, timestamp: np.ndarray, position: np.ndarray) -> np.ndarray:
    """(E,) bool: the rows that open a served list, of events sorted by (user, time).

    A row opens a list at position 0, at a change of user or of time (a list's rows share
    its time; where prepare dropped a list's first row the next row still starts a run),
    and where its position does not follow the row before it (two lists served to one user
    in the same second, the second without its first row).  A list's rows come in position
    order, as the served-items table is read (time, recommendation id, position)."""
    position = np.asarray(position)
    starts = position == 0
    if starts.shape[0]:
        starts[0] = True
        starts[1:] |= (
            (user[1:] != user[:-1])
            | (timestamp[1:] != timestamp[:-1])
            | (position[1:] <= position[:-1])
        )
    return starts


def list_first(starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(B,) int64 first row of the list of each of ``rows`` (B,), given the list starts
    (E,) bool of :func:`list_starts` (the first row must start one)."""
    heads = np.flatnonzero(starts)
    out: np.ndarray = heads[np.searchsorted(heads, rows, side="right") - 1]
    return out


def list_returns(
    reward: np.ndarray,
    *,
    session_starts: np.ndarray,
    starts: np.ndarray,
    gamma: float,
    dtype: type = np.float32,
) -> np.ndarray:
    """Per-row discounted return (E,) where a step is a served list, not a row.

    A list's reward is the sum of its slots' rewards, ``G_L = R_L + gamma * G_{L+1}`` inside
    a session, and a slot's return is its own reward plus the discounted return of the
    lists after its own: ``G_p = r_p + gamma * G_{L+1}``.  The slots of one list are drawn
    together from one state, so no slot's return counts the slots beside it, and the
    next list is one step away whatever the list's length.  With lists of one item this
    is :func:`recloop.data.sessions.discounted_returns`.

    ``session_starts`` (E,) bool marks session starts, ``starts`` (E,) bool list starts
    (every session start opens a list)."""
    starts = starts | session_starts
    lid = np.cumsum(starts) - 1  # (E,) list of each row
    n_lists = int(lid[-1]) + 1 if lid.shape[0] else 0
    r_list = np.bincount(lid, weights=reward.astype(np.float64), minlength=n_lists)  # (L,)
    first = np.flatnonzero(starts)
    g_list = discounted_returns(r_list, session_starts[first], gamma, dtype=np.float64)  # (L,)
    g_next = np.zeros(n_lists)
    # the next list's return where it belongs to the same session
    same = ~session_starts[first[1:]]
    g_next[:-1] = np.where(same, g_list[1:], 0.0)
    out: np.ndarray = (reward.astype(np.float64) + gamma * g_next[lid]).astype(dtype)
    return out


# --- logged contexts ----------------------------------------------------------------------

_CONTEXT_TYPE = pl.Struct(
    {"recent": pl.List(pl.String), "rewards": pl.List(pl.Float64), "excluded": pl.List(pl.String)}
)
_STATE_TYPE = pl.Struct({"recent": pl.List(pl.String), "rewards": pl.List(pl.Float64)})


def events_file(dataset: PreparedDataset) -> str:
    """The dataset's events file, for an error message."""
    return str(dataset.events_file) if dataset.events_file else "events"


@dataclass(frozen=True, kw_only=True, eq=False)
class ContextWindows:
    """The logged contexts (:data:`recloop.data.schema.SERVED_CONTEXT`) of some rows, in
    a scorer's item columns (the dataset's indices, then the items only its service has):
    the state the service built for the rows' lists."""

    has: np.ndarray  # (u,) bool, the row carries a logged context
    item: np.ndarray  # (u, W) int64 its recent items the scorer knows, the last W,
    # right-aligned, 0 = padding
    reward: np.ndarray  # (u, W) float32 their logged rewards (0 at padding)
    excluded_row: np.ndarray  # (X,) int64 row (0..u-1) of each excluded item
    excluded_item: np.ndarray  # (X,) int64 its column


def context_windows(
    dataset: PreparedDataset,
    rows: np.ndarray,
    *,
    history: int,
    ids: pl.DataFrame,
    excluded: bool = True,
) -> ContextWindows:
    """The logged contexts of ``rows`` (u,) as windows of ``history`` items.

    As the service builds a state (:mod:`recloop.serving.service`): ids the scorer does not
    know are dropped first, then the last ``history`` are kept.  ``ids``: the raw item ids
    the scorer knows with their indices (:func:`item_id_frame`: the dataset's, then any
    items only the scorer's service has).  ``excluded`` False leaves the excluded items out
    (not even parsed).  A context that is not the service's JSON is a DataError naming the
    row."""
    u = rows.shape[0]
    texts = pl.Series("ctx", dataset.extra[SERVED_CONTEXT][rows], dtype=pl.String)
    has = (texts.fill_null("").str.len_bytes() > 0).to_numpy()
    item = np.zeros((u, history), np.int64)
    reward = np.zeros((u, history), np.float32)
    frame = pl.DataFrame({"r": np.arange(u), "ctx": texts}).filter(pl.Series(has))
    empty = np.zeros(0, np.int64)
    if frame.height == 0:
        return ContextWindows(
            has=has, item=item, reward=reward, excluded_row=empty, excluded_item=empty
        )
    try:
        kind = _CONTEXT_TYPE if excluded else _STATE_TYPE
        dec = frame.with_columns(pl.col("ctx").str.json_decode(kind)).unnest("ctx")
        recent = dec.select("r", "recent", "rewards").explode("recent", "rewards")
    except pl.exceptions.PolarsError as exc:
        raise _context_error(dataset, rows, frame, exc) from None
    recent = (
        recent.join(ids, left_on="recent", right_on="id", how="inner", maintain_order="left")
        .with_columns(back=pl.len().over("r") - pl.int_range(pl.len()).over("r"))
        .filter(pl.col("back") <= history)
    )
    r = recent["r"].to_numpy()
    col = history - recent["back"].to_numpy()
    item[r, col] = recent["idx"].to_numpy()
    reward[r, col] = recent["rewards"].fill_null(0.0).to_numpy()
    if not excluded:
        return ContextWindows(
            has=has, item=item, reward=reward, excluded_row=empty, excluded_item=empty
        )
    ex = (
        dec.select("r", "excluded")
        .explode("excluded")
        .join(ids, left_on="excluded", right_on="id", how="inner")
    )
    return ContextWindows(
        has=has,
        item=item,
        reward=reward,
        excluded_row=ex["r"].to_numpy().astype(np.int64),
        excluded_item=ex["idx"].to_numpy().astype(np.int64),
    )


def item_id_frame(dataset: PreparedDataset, extra: Sequence[str] = ()) -> pl.DataFrame:
    """(id, idx): each raw item id of ``dataset`` (as text) and its index, then the ``extra``
    ids (a service's items the dataset lacks) at N + 1, N + 2, ..."""
    known = [str(i) for i in dataset.item_ids]
    return pl.DataFrame(
        {
            "id": pl.Series([*known, *extra], dtype=pl.String),
            "idx": np.arange(1, len(known) + len(extra) + 1, dtype=np.int64),
        }
    )


def _context_error(
    dataset: PreparedDataset, rows: np.ndarray, frame: pl.DataFrame, exc: Exception
) -> DataError:
    """The DataError of the first context of ``frame`` that is not the service's JSON."""
    for r, text in zip(frame["r"].to_list(), frame["ctx"].to_list(), strict=True):
        try:
            problem = served_context_problem(orjson.loads(text))
        except orjson.JSONDecodeError:
            problem = "is not JSON"
        if problem is not None:
            return DataError(
                f"{events_file(dataset)}, row {int(rows[r])}: field {SERVED_CONTEXT!r} "
                f"{text[:80]!r} {problem} (a served list's context)"
            )
    return DataError(f"{events_file(dataset)}: field {SERVED_CONTEXT!r} unreadable ({exc})")


# --- the state of every slot ----------------------------------------------------------------


_CONTEXT_ROWS = 1 << 16
"""Rows whose context texts are looked at together (to find the written ones)."""
_CONTEXT_BYTES = 8 << 20
"""JSON bytes of logged contexts parsed at a time: the parser's scratch is about 20 times
the text (some 260 bytes a recent id), so about 160 MiB."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ContextStates:
    """The logged contexts of some rows as states (:func:`context_states`)."""

    rows: np.ndarray  # (C,) int64 the rows that carry a context, ascending as given
    item: np.ndarray  # (C, H) int32 their states: recent items the dataset knows, the last H
    reward: np.ndarray  # (C, H) float32 their rewards


def context_states(dataset: PreparedDataset, rows: np.ndarray, *, history: int) -> ContextStates:
    """The states the logged contexts of ``rows`` (u,) give, with the dataset's items
    (:func:`context_windows` without the excluded items), parsed a bounded chunk of text
    at a time: the memory is the result's, 8 H bytes a context, whatever their length."""
    ids = item_id_frame(dataset)
    texts = dataset.extra[SERVED_CONTEXT]
    kept, items, rewards = [], [], []
    for lo in range(0, rows.shape[0], _CONTEXT_ROWS):
        part = rows[lo : lo + _CONTEXT_ROWS]
        size = pl.Series(texts[part], dtype=pl.String).fill_null("").str.len_bytes().to_numpy()
        written = np.flatnonzero(size > 0)
        # cut where the running text passes each multiple of the budget
        bound = np.cumsum(size[written], dtype=np.int64) // _CONTEXT_BYTES
        for piece in np.split(written, np.flatnonzero(np.diff(bound)) + 1):
            if piece.shape[0] == 0:
                continue
            at = part[piece]
            win = context_windows(dataset, at, history=history, ids=ids, excluded=False)
            kept.append(at[win.has])
            items.append(win.item[win.has].astype(np.int32))
            rewards.append(win.reward[win.has])
    if not kept:
        return ContextStates(
            rows=np.zeros(0, np.int64),
            item=np.zeros((0, history), np.int32),
            reward=np.zeros((0, history), np.float32),
        )
    return ContextStates(
        rows=np.concatenate(kept).astype(np.int64),
        item=np.concatenate(items),
        reward=np.concatenate(rewards),
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class ListStates:
    """Where the state of each row's list comes from (:func:`list_states`).

    Rows are grouped in *segments*: a served list, cut where the split's period changes
    (:func:`recloop.data.dataset.split_period`: a row that is no target cuts nothing; a list
    whose last slots are held out, as a per-user split may cut it, ends for its training
    slots where they end).  Per row one segment index; the rest is per segment or per
    logged context: a dataset of E impressions in K segments, C of them with a logged
    context, costs 4 E (8 E past 2**31 rows) + 24 K + 8 H C bytes."""

    segment: np.ndarray  # (E,) int32 (int64 past 2**31 rows) the row's segment
    first: np.ndarray  # (K,) int64 first row of the segment's served list: its state ends there
    end: np.ndarray  # (K,) int64 the row after the segment's last
    context: np.ndarray  # (K,) int64 its served list's logged context (row of item), -1: none
    item: np.ndarray  # (C, H) int32 the logged contexts as windows (dataset indices, 0 pad)
    reward: np.ndarray  # (C, H) float32 their rewards

    @property
    def n_contexts(self) -> int:
        return int(self.item.shape[0])


def list_states(dataset: PreparedDataset, *, history: int) -> ListStates:
    """Each row's served list (:func:`list_starts`) and the state its service drew it from.

    The state of every slot of a list is the user's ``history`` items before the list: its
    logged context (:data:`SERVED_CONTEXT`, read as the service read it with the dataset's
    items: what a model trained on ``dataset`` will see when it serves) where the list
    carries one, else the log's rows before the list's first row.  Needs the ``position``
    column (a DataError otherwise)."""
    if POSITION not in dataset.extra:
        raise DataError(
            f"{events_file(dataset)}: states of served lists need the column {POSITION!r} "
            "(impressions read with `recloop prepare --from-db --impressions`)"
        )
    n = dataset.n_events
    served = list_starts(dataset.user, dataset.timestamp, dataset.extra[POSITION])
    cut = served.copy()
    period = split_period(dataset.split)  # a no-target row cuts no list
    cut[1:] |= period[1:] != period[:-1]
    del period
    segment: np.ndarray = np.cumsum(cut, dtype=np.int32 if n < 2**31 else np.int64)
    segment -= 1
    heads = np.flatnonzero(cut)  # (K,) first row of each segment
    end = np.append(heads[1:], n).astype(np.int64)
    served_heads = np.flatnonzero(served)
    first = served_heads[np.searchsorted(served_heads, heads, side="right") - 1]
    context = np.full(heads.shape[0], -1, np.int64)
    item = np.zeros((0, history), np.int32)
    reward = np.zeros((0, history), np.float32)
    if SERVED_CONTEXT in dataset.extra:
        states = context_states(dataset, served_heads, history=history)
        item, reward = states.item, states.reward
        if states.rows.shape[0]:
            at = np.minimum(np.searchsorted(states.rows, first), states.rows.shape[0] - 1)
            context = np.where(states.rows[at] == first, at, -1)
    return ListStates(
        segment=segment, first=first, end=end, context=context, item=item, reward=reward
    )
