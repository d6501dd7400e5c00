"""Train / validation / test splits over events sorted by (user, timestamp).

Three protocols:

- ``ratio``: each user's history is cut chronologically, the first ``train`` share for
  training, then ``valid``, then ``test`` (DBRL uses 80/20: ``valid=0``, ``test=0.2``);
- ``loo``: temporal leave-one-out as in RecBole — a user's last event is test, the one before
  validation, the rest training;
- ``time``: one global cut — events at or after the cut time are test (and similarly for
  validation), so no test event precedes a training event of any user.

Users with fewer than ``min_user_events`` events keep everything in training under ``ratio``
and ``loo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from recloop.config import check
from recloop.data.dataset import TEST, TRAIN, VALID

_EPS = 1e-9
"""Guards round-half-up against shares like 0.1 * 15 = 1.5000000000000002."""


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """Which events are for training, validation and test."""

    mode: Literal["ratio", "loo", "time"] = "ratio"
    """"ratio": per-user chronological shares; "loo": temporal leave-one-out (last event test,
    second-to-last validation); "time": one global time cut."""
    train: float = 0.8
    """Share of each user's events (ratio) or of all events (time) used for training."""
    valid: float = 0.1
    """Share for validation; 0 means no validation split (also under loo)."""
    test: float = 0.1
    """Share for test (ratio and time)."""
    min_user_events: int = 3
    """Users with fewer events keep them all in training (ratio and loo)."""
    valid_start: int | None = None
    """time mode: events at or after this timestamp (and before the test cut) are validation;
    None places the cut at the ``valid`` share."""
    test_start: int | None = None
    """time mode: events at or after this timestamp are test; None places the cut so the last
    ``test`` share of events (in time order) are test."""

    def __post_init__(self) -> None:
        check(
            self.mode in ("ratio", "loo", "time"),
            f"split.mode must be ratio, loo or time, got {self.mode!r}",
        )
        for name in ("train", "valid", "test"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"split.{name} must lie in [0, 1], got {value}")
        check(self.train > 0, "split.train must be > 0")
        check(
            abs(self.train + self.valid + self.test - 1.0) < 1e-6,
            f"split.train + split.valid + split.test must be 1, got "
            f"{self.train} + {self.valid} + {self.test}",
        )
        check(self.min_user_events >= 1, "split.min_user_events must be >= 1")
        if self.valid_start is not None and self.test_start is not None:
            check(self.valid_start <= self.test_start, "split.valid_start must be <= test_start")


@dataclass(frozen=True)
class SplitResult:
    """Split per event and how the cut was made."""

    split: np.ndarray  # (E,) int8, TRAIN / VALID / TEST
    info: dict[str, Any] = field(default_factory=dict)


def _round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5 + _EPS).astype(np.int64)


def _from_cuts(offsets: np.ndarray, n_valid: np.ndarray, n_test: np.ndarray) -> np.ndarray:
    """Split (E,) giving each user's last ``n_test`` rows to test and the ``n_valid`` before to
    validation.  ``offsets`` (U+1,), ``n_valid`` and ``n_test`` (U,).

    A difference array: +1 where validation starts, +1 where test starts, -2 at the user's
    end; its running sum is 0 (train), 1 (valid) or 2 (test).  O(U) scatters and one O(E) scan.
    """
    ends = offsets[1:]
    marks = np.zeros(int(offsets[-1]) + 1, np.int8)
    np.add.at(marks, ends - n_test - n_valid, 1)
    np.add.at(marks, ends - n_test, 1)
    np.add.at(marks, ends, -2)
    return np.cumsum(marks[:-1], dtype=np.int8)


def ratio_split(offsets: np.ndarray, cfg: SplitConfig) -> SplitResult:
    """Per-user chronological shares.  ``offsets`` (U+1,): user u's rows are offsets[u]:[u+1].

    A user with n events gets round(n * test) test events (rounding half up), then
    round(n * valid) validation events before them, and the rest for training (never fewer
    than one: validation, then test, give way).
    """
    lengths = np.diff(offsets)
    n_test = _round_half_up(lengths * cfg.test)
    n_valid = _round_half_up(lengths * cfg.valid)
    over = np.maximum(n_test + n_valid - (lengths - 1), 0)
    cut = np.minimum(over, n_valid)
    n_valid -= cut
    n_test -= over - cut
    small = lengths < cfg.min_user_events
    n_test[small] = 0
    n_valid[small] = 0
    return SplitResult(_from_cuts(offsets, n_valid, n_test), {"users_all_train": int(small.sum())})


def loo_split(offsets: np.ndarray, cfg: SplitConfig) -> SplitResult:
    """Temporal leave-one-out (RecBole): last event test, second-to-last validation."""
    lengths = np.diff(offsets)
    eligible = lengths >= max(cfg.min_user_events, 2 if cfg.valid > 0 else 1)
    n_test = eligible.astype(np.int64)
    n_valid = (eligible & (cfg.valid > 0)).astype(np.int64)
    return SplitResult(
        _from_cuts(offsets, n_valid, n_test), {"users_all_train": int((~eligible).sum())}
    )


def time_split(timestamp: np.ndarray, cfg: SplitConfig) -> SplitResult:
    """Global time cut: test = timestamp >= test cut, validation = [valid cut, test cut).

    Without explicit ``test_start`` the test cut is the timestamp of the event at position
    E - round(E * test) in time order, so about the last ``test`` share of events is test (more
    if events tie at the cut); likewise the validation cut with ``test + valid``.
    """
    e = timestamp.shape[0]

    def cut(share: float, given: int | None) -> int | None:
        if given is not None:
            return given
        k = e - int(_round_half_up(np.array([e * share]))[0])
        if share <= 0 or k >= e:
            return None
        return int(np.partition(timestamp, k)[k])

    test_cut = cut(cfg.test, cfg.test_start)
    valid_cut = (
        cut(cfg.test + cfg.valid, cfg.valid_start)
        if cfg.valid > 0 or cfg.valid_start is not None
        else None
    )
    split = np.full(e, TRAIN, np.int8)
    if valid_cut is not None:
        split[timestamp >= valid_cut] = VALID
    if test_cut is not None:
        split[timestamp >= test_cut] = TEST
    return SplitResult(split, {"valid_start": valid_cut, "test_start": test_cut})


def assign_splits(offsets: np.ndarray, timestamp: np.ndarray, cfg: SplitConfig) -> SplitResult:
    """Split (E,) for events sorted by (user, timestamp); ``offsets`` (U+1,) per-user starts."""
    if cfg.mode == "ratio":
        return ratio_split(offsets, cfg)
    if cfg.mode == "loo":
        return loo_split(offsets, cfg)
    return time_split(timestamp, cfg)
