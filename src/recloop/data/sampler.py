"""Transitions (s, a, r, s') drawn straight from the per-user event sequences.

The events of a :class:`~recloop.data.dataset.PreparedDataset` are held once, as flat arrays
sorted by (user, timestamp) with per-user offsets.  A transition is one event row ``p``; its
state is the window of the user's previous H rows, so a batch of transitions is index
arithmetic on the row numbers plus one gather per array — no window is ever materialised per
transition, and an epoch costs the events, one permutation of the transition rows and
O(batch) scratch.

The sampler is itself a :class:`torch.utils.data.IterableDataset` of whole batches, so it plugs
into a ``DataLoader`` with ``batch_size=None``::

    sampler = TransitionSampler(ds, history=10, batch_size=2048, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)             # needed with num_workers > 0, harmless otherwise
        for batch in DataLoader(sampler, batch_size=None, num_workers=2):
            ...

With ``num_workers = W`` worker ``w`` builds batches ``w, w + W, ...`` of the same seeded
permutation, and the loader's round-robin hands them back in the single-process order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from recloop.config import check
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import SPLIT_NAMES, TRAIN, PreparedDataset, split_period
from recloop.data.lists import ListStates, list_states
from recloop.data.schema import PROPENSITY

STATES = ("rows", "lists")
"""What a step is: an event row, or a served list (:class:`TransitionSampler`)."""

_CHUNK = 1 << 20
"""Rows scanned at a time when listing the transition rows, to keep the scratch small."""


@dataclass(frozen=True)
class Windows:
    """The last L events before some end rows, gathered from the flat event arrays."""

    item: np.ndarray  # (B, L) int32, PAD_ID where the window reaches before the user's start
    reward: np.ndarray  # (B, L) float32, 0 at padding


def gather_windows(
    item: np.ndarray,
    reward: np.ndarray,
    *,
    end: np.ndarray,
    start: np.ndarray,
    length: int,
) -> Windows:
    """Rows ``end - length .. end - 1`` of ``item``/``reward``, never before ``start``.

    ``end`` and ``start`` are (B,) row numbers (``start <= end``); rows before ``start`` (the
    user's first event) come back as ``PAD_ID`` and reward 0, on the left.

    A window is L consecutive rows, so each array is read through a zero-copy view whose
    element i is the raw bytes of rows i .. i + L - 1: one 1-D gather of B such elements
    copies whole windows, which is about twice as fast as a (B, L) element gather (it keeps
    many cache misses in flight instead of a few).  Positions before ``start`` are zeroed
    afterwards.  Windows that would start before row 0, and arrays that are not contiguous,
    take the element-gather path.
    """
    b = end.shape[0]
    e = item.shape[0]
    contiguous = item.flags.c_contiguous and reward.flags.c_contiguous
    if e < length or not contiguous:
        return _gather_rows(item, reward, end=end, start=start, length=length)
    first = end - length  # (B,) first row of each window
    early = np.flatnonzero(first < 0)
    if early.shape[0]:
        first = np.maximum(first, 0)
    # Touching both ends of every window with plain 1-D gathers first lets the misses overlap
    # even better; the window copies then read from cache.
    last = first + (length - 1)
    for arr in (item, reward):
        arr.take(first)
        arr.take(last)
    items = _window_view(item, length)[first].view(item.dtype).reshape(b, length)
    rewards = _window_view(reward, length)[first].view(reward.dtype).reshape(b, length)
    pad = start - first  # positions j < pad lie before the user's first event
    short = np.flatnonzero(pad > 0)
    if short.shape[0]:
        # PAD_ID is 0, so zeroing the padded positions is a multiply, not a masked write.
        keep = np.arange(length) >= pad[short, None]
        items[short] *= keep
        rewards[short] *= keep
    if early.shape[0]:
        w = _gather_rows(item, reward, end=end[early], start=start[early], length=length)
        items[early] = w.item
        rewards[early] = w.reward
    return Windows(item=items, reward=rewards)


def _window_view(a: np.ndarray, length: int) -> np.ndarray:
    """(E - L + 1,) read-only view of a contiguous 1-D array: element i = rows i .. i + L - 1."""
    view = np.ndarray(
        shape=(a.shape[0] - length + 1,),
        dtype=np.dtype((np.void, a.itemsize * length)),
        buffer=a,
        strides=(a.itemsize,),
    )
    view.flags.writeable = False
    return view


def _gather_rows(
    item: np.ndarray, reward: np.ndarray, *, end: np.ndarray, start: np.ndarray, length: int
) -> Windows:
    """:func:`gather_windows` by a (B, L) element gather, for any array and window."""
    b = end.shape[0]
    if item.shape[0] == 0:
        return Windows(
            item=np.zeros((b, length), item.dtype), reward=np.zeros((b, length), reward.dtype)
        )
    rows = end[:, None] + np.arange(-length, 0, dtype=np.int64)  # (B, L)
    # Only windows that reach before the user's start need clamping and zeroing afterwards;
    # an empty window (start == end, possibly past the last row) is clamped into the array.
    short = np.flatnonzero(end - start < length)
    if short.shape[0]:
        lo = start[short, None]
        valid = rows[short] >= lo
        rows[short] = np.minimum(np.maximum(rows[short], lo), item.shape[0] - 1)
    items = item[rows]
    rewards = reward[rows]
    if short.shape[0]:
        items[short] *= valid
        rewards[short] *= valid
    return Windows(item=items, reward=rewards)


@dataclass(frozen=True)
class TransitionRows:
    """Event rows of some transitions and whether each ends its usable sequence."""

    rows: np.ndarray  # (B,) int64
    done: np.ndarray  # (B,) bool


class TransitionSampler(IterableDataset[TransitionBatch]):
    """Shuffled batches of transitions from the events whose split is in ``splits``.

    For the event at row ``p`` of user ``u``:

    - ``history`` holds the items of rows ``p - H .. p - 1`` that belong to ``u`` (every
      earlier event of the user counts, whatever its split), left-padded with ``PAD_ID``;
      ``history_reward`` their rewards (0 at padding);
    - ``action``, ``reward``, ``returns`` are row ``p``'s item, reward and discounted return;
    - ``next_history`` / ``next_history_reward`` are the history shifted left by one with the
      action (its reward) appended;
    - ``propensity`` is row ``p``'s logged β(a|s) when the dataset has a ``propensity`` event
      column (``dataset.extra``), else None;
    - ``done`` is True only where the user's session really ends: row ``p + 1`` belongs to the
      same user and the same split (its period, :func:`~recloop.data.dataset.split_period`:
      a row that is no target counts as its split's) but starts a new session (a pause
      longer than the session gap).  The end of the data — the user's last event, or the
      last before the split changes — is a time-limit *truncation*, not a terminal state:
      the user's sequence goes on (in the held-out splits, or after the log was cut), so
      ``done`` is False there and value-based methods bootstrap from ``next_history``
      (Pardo et al., "Time Limits in Reinforcement Learning", ICML 2018).  That also
      keeps ``done`` independent of every held-out event: whether one comes soon or late
      changes no training transition.

    Epoch ``e`` visits every transition exactly once in the order of a permutation drawn
    with seed ``seed + e`` (row order when ``shuffle`` is off).  Iterating starts the current
    epoch and advances the counter, so successive ``for`` loops see successive epochs;
    :meth:`set_epoch` sets it explicitly (do that with DataLoader workers, which iterate
    copies of the sampler).

    ``states="lists"`` (impressions of served lists, which have the ``position`` column:
    :mod:`recloop.data.lists`) takes a step to be a list, as the service drew it: every slot
    of a list gets the state before the list (its logged context where the service logged
    one, else the H rows before the list's first row), never the slots above it.  For the
    next state and ``done`` a list ends where it ends or where the split's period changes
    (the held-out slots of a list a per-user split cuts are not part of the training
    slots' step): the next state is the next list's logged context where that list follows
    in the same period and has one, else the H rows up to the list's end; ``done`` is as
    above, read after the list's last row in the period, so it too depends on no held-out
    event.  ``"rows"`` (the default) is the above: a step is an event row.

    Memory: the dataset's arrays (not copied: a dataset opened with
    :meth:`PreparedDataset.load` is memory-mapped, so its pages are shared page cache, not
    heap, and DataLoader workers or a second trainer read the same pages), one permutation
    of the transition rows per epoch (4 bytes a transition while the events number under
    2**31) and O(batch) scratch; with ``states="lists"`` also
    :class:`~recloop.data.lists.ListStates` on the heap (4 bytes an event, 32 a list, and
    the logged contexts' windows, 8 H bytes each).
    The ``done`` flag of each transition rides in the top bit of its permutation entry, so a
    batch needs no gather from the session and split arrays.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        *,
        history: int,
        batch_size: int,
        splits: tuple[int, ...] = (TRAIN,),
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        states: str = "rows",
    ) -> None:
        super().__init__()
        check(history >= 1, f"sampler history must be >= 1, got {history}")
        check(states in STATES, f"sampler states must be one of {STATES}, got {states!r}")
        check(batch_size >= 1, f"sampler batch_size must be >= 1, got {batch_size}")
        splits = tuple(int(s) for s in splits)
        check(
            len(splits) > 0 and all(s in SPLIT_NAMES for s in splits),
            f"sampler splits must be a non-empty subset of {sorted(SPLIT_NAMES)}, got {splits}",
        )
        self.history = history
        self.batch_size = batch_size
        self.splits = splits
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._epoch = 0

        self._item = dataset.item
        self._reward = dataset.reward
        self._returns = dataset.returns
        # Cast to float32 (like every other batch field) per batch, not here: a copy of the
        # column would put a memory-mapped dataset's propensities on the heap.  prepare
        # checked each value lies in (0, 1].
        self._propensity = dataset.extra.get(PROPENSITY)
        self._session = dataset.session
        self._split = np.asarray(dataset.split, dtype=np.int8)
        self._user = dataset.user
        self._offsets = dataset.user_offsets
        self._n_events = dataset.n_events
        self.states = states
        self._lists = list_states(dataset, history=history) if states == "lists" else None
        # Split codes are int8; a 256-entry table answers "in splits?" with one gather.
        self._in_splits = np.zeros(256, dtype=bool)
        self._in_splits[list(splits)] = True
        if self._n_events < 2**31:
            self._row_dtype: type[np.integer] = np.uint32
            self._done_bit = 31
        else:
            self._row_dtype = np.uint64
            self._done_bit = 63
        self.n_transitions = 0
        for lo in range(0, self._n_events, _CHUNK):
            self.n_transitions += int(self._in(self._split[lo : lo + _CHUNK]).sum())
        if self._lists is not None:
            self._segment_done, self._segment_next = self._segment_steps(self._lists)

    def _in(self, split: np.ndarray) -> np.ndarray:
        return self._in_splits[split.view(np.uint8)]

    def done(self, rows: np.ndarray) -> np.ndarray:
        """(B,) bool: does the user's session end (terminally) after each event row?

        Only a session boundary inside one user's events of one split is terminal; the end
        of the user's events or of the split is a truncation (see the class docstring).
        With ``states="lists"``, whether the session ends after the row's list.
        """
        p = np.asarray(rows, dtype=np.int64)
        if self._lists is not None:
            return self._segment_done[self._lists.segment[p]]
        return self._row_done(p)

    def _row_done(self, p: np.ndarray) -> np.ndarray:
        nxt = p + 1
        last = nxt >= self._n_events
        nxt[last] = p[last]
        return (
            ~last
            & (self._user[nxt] == self._user[p])
            & (split_period(self._split[nxt]) == split_period(self._split[p]))
            & (self._session[nxt] != self._session[p])
        )

    def packed_rows(self) -> np.ndarray:
        """(n_transitions,) ascending event rows of the transitions, ``done`` in the top bit.

        Unsigned 32-bit while the events number under 2**31, else 64-bit.  Built in chunks
        so that the scratch stays O(chunk), not O(events).
        """
        out = np.empty(self.n_transitions, dtype=self._row_dtype)
        at = 0
        for lo in range(0, self._n_events, _CHUNK):
            rows = np.flatnonzero(self._in(self._split[lo : lo + _CHUNK])) + lo
            packed = rows.astype(self._row_dtype)
            packed |= self.done(rows).astype(self._row_dtype) << self._row_dtype(self._done_bit)
            out[at : at + rows.shape[0]] = packed
            at += rows.shape[0]
        return out

    def unpack(self, packed: np.ndarray) -> TransitionRows:
        """Split packed entries (from :meth:`packed_rows`) into rows and done flags."""
        bit = self._row_dtype(self._done_bit)
        rows = (packed & ~(self._row_dtype(1) << bit)).astype(np.int64)
        return TransitionRows(rows=rows, done=(packed >> bit).astype(bool))

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The packed transition rows in the order epoch ``epoch`` visits them."""
        rows = self.packed_rows()
        if self.shuffle:
            np.random.default_rng(self.seed + epoch).shuffle(rows)
        return rows

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.n_transitions // self.batch_size
        return -(-self.n_transitions // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (its permutation uses ``seed + epoch``)."""
        self._epoch = epoch

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will run."""
        return self._epoch

    def __iter__(self) -> Iterator[TransitionBatch]:
        epoch = self._epoch
        self._epoch += 1
        return self._iter_epoch(epoch)

    def _iter_epoch(self, epoch: int) -> Iterator[TransitionBatch]:
        packed = self.epoch_rows(epoch)
        n_batches = len(self)
        worker = get_worker_info()
        first, step = (0, 1) if worker is None else (worker.id, worker.num_workers)
        bs = self.batch_size
        for b in range(first, n_batches, step):
            part = self.unpack(packed[b * bs : (b + 1) * bs])
            yield self._batch(part.rows, part.done)

    def batch(self, rows: np.ndarray) -> TransitionBatch:
        """The transitions at event rows ``rows`` (B,), in that order."""
        p = np.asarray(rows, dtype=np.int64)
        return self._batch(p, self.done(p))

    def _batch(self, p: np.ndarray, done: np.ndarray) -> TransitionBatch:
        if self._lists is not None:
            return self._list_batch(p, done)
        h = self.history
        user = self._user[p]
        start = self._offsets[user]
        # One window of H + 1 rows ending at p gives history, action and next history at once.
        win = gather_windows(self._item, self._reward, end=p + 1, start=start, length=h + 1)
        # Casting while slicing copies each output once; torch.from_numpy then shares it.
        return TransitionBatch(
            user=torch.from_numpy(user.astype(np.int64)),
            history=torch.from_numpy(win.item[:, :h].astype(np.int64)),
            history_reward=torch.from_numpy(win.reward[:, :h].copy()),
            action=torch.from_numpy(win.item[:, h].astype(np.int64)),
            reward=torch.from_numpy(win.reward[:, h].copy()),
            returns=torch.from_numpy(self._returns[p]),
            next_history=torch.from_numpy(win.item[:, 1:].astype(np.int64)),
            next_history_reward=torch.from_numpy(win.reward[:, 1:].copy()),
            done=torch.from_numpy(done),
            propensity=(
                None
                if self._propensity is None
                else torch.from_numpy(self._propensity[p].astype(np.float32, copy=False))
            ),
        )

    def _segment_steps(self, lists: ListStates) -> tuple[np.ndarray, np.ndarray]:
        """Per segment (K,): whether the session ends after it (:meth:`done` of its last
        row), and the row of ``lists.item`` of its next state's logged context, -1 where
        the next state is the log's: the next row must open the same user's next served
        list, in the same split (another split's context would carry what the user did
        after the cut), and carry a context."""
        last = lists.end - 1
        done = self._row_done(last)
        nxt = np.minimum(lists.end, self._n_events - 1)
        follows = (lists.end < self._n_events) & (self._user[nxt] == self._user[last])
        follows &= split_period(self._split[nxt]) == split_period(self._split[last])
        # in the same split, the next segment opens a served list (a segment that does
        # not is cut from its list by a change of split)
        return done, np.where(follows, lists.context[lists.segment[nxt]], -1)

    def _list_batch(self, p: np.ndarray, done: np.ndarray) -> TransitionBatch:
        """:meth:`_batch` with a list's state for each slot (``states="lists"``)."""
        lists = self._lists
        assert lists is not None
        user = self._user[p]
        start = self._offsets[user]
        k = lists.segment[p]
        state = self._state(lists.first[k], lists.context[k], start)
        next_state = self._state(lists.end[k], self._segment_next[k], start)
        return TransitionBatch(
            user=torch.from_numpy(user.astype(np.int64)),
            history=torch.from_numpy(state.item),
            history_reward=torch.from_numpy(state.reward),
            action=torch.from_numpy(self._item[p].astype(np.int64)),
            reward=torch.from_numpy(self._reward[p]),
            returns=torch.from_numpy(self._returns[p]),
            next_history=torch.from_numpy(next_state.item),
            next_history_reward=torch.from_numpy(next_state.reward),
            done=torch.from_numpy(done),
            propensity=(
                None
                if self._propensity is None
                else torch.from_numpy(self._propensity[p].astype(np.float32, copy=False))
            ),
        )

    def _state(self, end: np.ndarray, context: np.ndarray, start: np.ndarray) -> Windows:
        """(B, H) int64 / float32 states: the logged context ``context`` (B,) where it is
        >= 0, else the H rows before ``end`` (B,) of users starting at ``start``."""
        lists = self._lists
        assert lists is not None
        b, h = end.shape[0], self.history
        logged = context >= 0
        if not logged.any():
            win = gather_windows(self._item, self._reward, end=end, start=start, length=h)
            return Windows(item=win.item.astype(np.int64), reward=win.reward)
        item = np.empty((b, h), np.int64)
        reward = np.empty((b, h), np.float32)
        has = np.flatnonzero(logged)
        item[has] = lists.item.take(context[has], axis=0)
        reward[has] = lists.reward.take(context[has], axis=0)
        bare = np.flatnonzero(~logged)
        if bare.shape[0]:  # the log's rows only where no context stands in for them
            win = gather_windows(
                self._item, self._reward, end=end[bare], start=start[bare], length=h
            )
            item[bare] = win.item
            reward[bare] = win.reward
        return Windows(item=item, reward=reward)
