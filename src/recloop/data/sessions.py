"""Chronological order, sessions and discounted returns over flat event arrays.

Events are held as flat arrays sorted by (user, timestamp, source row).  A session is a run of
one user's events without a pause longer than ``gap_seconds`` (or all of a user's events).
The return of an event is the discounted sum of the rewards from it to the end of its session,
``G_t = r_t + gamma * G_{t+1}`` (Sutton & Barto, eq. 3.9), which is what DBRL feeds its
REINFORCE and critic targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from recloop.config import check


@dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """How a user's events are cut into sessions."""

    mode: Literal["gap", "user"] = "gap"
    """"gap": a new session starts after a pause longer than gap_seconds; "user": one session
    per user."""
    gap_seconds: int = 3600
    """Longest pause (seconds) inside a session; a strictly longer one starts a new session."""

    def __post_init__(self) -> None:
        check(self.gap_seconds >= 0, f"sessions.gap_seconds must be >= 0, got {self.gap_seconds}")


@dataclass(frozen=True)
class Chronology:
    """Rows sorted by (user, timestamp, source row)."""

    order: np.ndarray  # (E,) int64 source row of each sorted row
    user: np.ndarray  # (E,) int64 user codes in sorted order
    timestamp: np.ndarray  # (E,) int64 timestamps in sorted order


def chronological_order(user: np.ndarray, timestamp: np.ndarray) -> Chronology:
    """Sort rows by (user, timestamp), ties in source order.

    ``user`` (E,) holds non-negative integer codes, ``timestamp`` (E,) int64.  Keys and the row
    number are packed into int64 so that plain ``np.sort`` (SIMD-accelerated, several times
    faster than ``argsort``) does the work, and the sorted keys are unpacked instead of
    gathered:

    - everything fits in 63 bits: one sort of (user, time, row);
    - else one stable argsort by user (rows of a user stay in source order) — and if every
      user's events are then already in time order, as in logs written in time order, that
      is the answer;
    - else a second pass: sort by (time, row), then stably by user;
    - keys too wide for any of that: a stable lexsort.
    """
    e = int(user.shape[0])
    if e == 0:
        empty = np.zeros(0, np.int64)
        return Chronology(empty, empty, empty)
    row_bits = max(1, (e - 1).bit_length())
    mask = np.int64((1 << row_bits) - 1)
    t0 = int(timestamp.min())
    span_bits = max(1, (int(timestamp.max()) - t0).bit_length())
    user_bits = max(1, int(user.max()).bit_length())
    # Keys are built in place and each temporary dropped as soon as it is folded in: at 100M
    # events every int64 array is 800 MB.
    if user_bits + span_bits + row_bits <= 63:
        key = user.astype(np.int64)
        key <<= span_bits + row_bits
        shifted = timestamp.astype(np.int64)
        shifted -= t0
        shifted <<= row_bits
        key |= shifted
        del shifted
        key |= np.arange(e, dtype=np.int64)
        key.sort()
        order = key & mask
        key >>= row_bits
        ts = key & np.int64((1 << span_bits) - 1)
        ts += t0
        key >>= span_bits
        return Chronology(order, key, ts)
    if span_bits + row_bits > 63 or user_bits + row_bits > 63:
        order = np.lexsort((timestamp, user)).astype(np.int64)
        return Chronology(order, user[order].astype(np.int64), timestamp[order])
    # The (user, row) order: one sort of packed (user, row) keys.  With numpy >= 2's SIMD
    # sorts this measured 0.21-0.39 s at 10M events against 0.54 s for a stable argsort of
    # the user codes (numpy 2.4, AVX2); the sorted users come out of the keys themselves.
    key = user.astype(np.int64)
    key <<= row_bits
    key |= np.arange(e, dtype=np.int64)
    key.sort()
    by_user = key & mask
    key >>= row_bits  # the sorted users
    ts = np.asarray(timestamp[by_user], np.int64)
    backwards = ts[1:] < ts[:-1]
    backwards &= key[1:] == key[:-1]
    if not backwards.any():
        return Chronology(by_user, key, ts)
    del key, backwards, by_user, ts
    rows = np.arange(e, dtype=np.int64)
    key = ((timestamp.astype(np.int64) - t0) << row_bits) | rows
    key.sort()
    by_time = key & mask
    key >>= row_bits
    key += t0  # timestamps in time order
    ukey = (user[by_time].astype(np.int64) << row_bits) | rows
    del rows
    ukey.sort()
    pos = ukey & mask
    ukey >>= row_bits
    return Chronology(by_time[pos], ukey, key[pos])


def session_starts(
    user: np.ndarray,
    timestamp: np.ndarray,
    *,
    gap_seconds: int | None,
    split: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean (E,): row starts a session.  Rows sorted by (user, timestamp).

    A session starts at each user's first event, unless ``gap_seconds`` is None after every
    pause strictly longer than ``gap_seconds``, and with ``split`` (E,) wherever the split
    changes: a session never spans two splits, so returns never mix their rewards.
    """
    starts = np.ones(user.shape[0], bool)
    if user.shape[0] > 1:
        starts[1:] = user[1:] != user[:-1]
        if gap_seconds is not None:
            starts[1:] |= np.diff(timestamp) > gap_seconds
        if split is not None:
            starts[1:] |= split[1:] != split[:-1]
    return starts


def discounted_returns(
    reward: np.ndarray, starts: np.ndarray, gamma: float, *, dtype: type = np.float32
) -> np.ndarray:
    """Per-row discounted return to the end of the session, (E,) of ``dtype``.

    ``G_t = r_t + gamma * G_{t+1}`` inside a session, ``G_t = r_t`` at its last row; ``starts``
    (E,) marks session starts.  A segmented Hillis–Steele scan: after the pass with stride d,
    ``G[i]`` sums the next 2d rewards and ``A[i]`` is the discount across them (0 once the
    window leaves the session), so ceil(log2(longest session)) vectorised passes suffice.
    Factors only ever shrink (gamma <= 1), so nothing overflows whatever the session length;
    scaled cumulative sums (gamma^-t) would overflow after a few thousand events.  The sums
    form a tree, like pairwise summation, so float32 loses little even over long sessions.
    """
    g: np.ndarray = reward.astype(dtype)
    e = g.shape[0]
    if e < 2 or gamma == 0.0:
        return g
    a: np.ndarray = np.full(e, gamma, dtype=dtype)
    # Row i carries no discount from row i + 1 when that row opens a new session.
    a[:-1][starts[1:]] = 0.0
    a[-1] = 0.0
    bounds = np.flatnonzero(np.append(starts, True))
    longest = int(np.diff(bounds).max())
    d = 1
    active: np.ndarray | None = None
    while d < longest:
        if active is None:
            g[:-d] += a[:-d] * g[d:]
            a[:-d] *= a[d:]
            # Once few windows still reach inside their session, update only those rows.
            if d >= 4:
                nz = np.flatnonzero(a)
                if nz.shape[0] * 8 < e:
                    active = nz
        else:
            # Rows with a == 0 are final; ``active + d`` stays in range because a is zero
            # wherever the window would leave the array.
            g[active] += a[active] * g[active + d]
            a[active] *= a[active + d]
            active = active[a[active] != 0.0]
        d *= 2
    return g
