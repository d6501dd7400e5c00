"""Rewards from behaviours (pv, cart, fav, buy) or explicit ratings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from recloop.config import check
from recloop.data.schema import BEHAVIOR, BEHAVIORS, RATING
from recloop.errors import ConfigError, PrepareError

BEHAVIOR_CODES = {name: i + 1 for i, name in enumerate(BEHAVIORS)}
"""Behaviour name → the Int8 code stored in prepared datasets (0 = none)."""


@dataclass(frozen=True, kw_only=True)
class BehaviorRewards:
    """Reward of each e-commerce behaviour (DBRL's defaults)."""

    pv: float = 1.0
    """Reward of a page view."""
    cart: float = 2.0
    """Reward of an add-to-cart."""
    fav: float = 2.0
    """Reward of a favourite."""
    buy: float = 3.0
    """Reward of a purchase."""

    def table(self) -> np.ndarray:
        """(5,) float32 reward per behaviour code; code 0 (none) maps to NaN."""
        return np.array([np.nan, self.pv, self.cart, self.fav, self.buy], np.float32)


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Where rewards come from."""

    source: Literal["auto", "behavior", "rating", "constant"] = "auto"
    """"auto": behaviours if the data has them, else ratings, else the constant."""
    behavior: BehaviorRewards = field(default_factory=BehaviorRewards)
    """Reward per behaviour."""
    rating_threshold: float | None = None
    """None: reward = rating.  A number: reward = 1 if rating >= threshold else 0."""
    constant: float = 1.0
    """Reward of every event for source "constant" (or "auto" on data with neither column)."""

    def __post_init__(self) -> None:
        check(
            self.source in ("auto", "behavior", "rating", "constant"),
            f"reward.source must be auto, behavior, rating or constant, got {self.source!r}",
        )


@dataclass(frozen=True)
class Rewards:
    """Per-event rewards and what they were computed from."""

    reward: np.ndarray  # (E,) float32
    source: str
    """"behavior", "rating" or "constant"."""


def behavior_codes(behavior: pl.Series) -> np.ndarray:
    """(E,) int8 codes of the behaviour names (1 pv, 2 cart, 3 fav, 4 buy; 0 missing).

    Raises :class:`PrepareError` naming the first unknown value and how many rows have it.
    """
    if behavior.dtype == pl.Enum(list(BEHAVIORS)):
        return _enum_codes(behavior)
    frame = behavior.cast(pl.String).rename("b").to_frame()
    # Four string comparisons in one polars pass beat a hash-based cast several times over.
    v = pl.col("b")
    expr: Any = pl.when(v.is_null()).then(pl.lit(0, pl.Int8))
    for name, code in BEHAVIOR_CODES.items():
        expr = expr.when(v == name).then(pl.lit(code, pl.Int8))
    codes = frame.select(expr.otherwise(pl.lit(-1, pl.Int8))).to_series().to_numpy()
    bad = codes < 0
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        value = frame["b"][row]
        raise PrepareError(
            f'column "{BEHAVIOR}": unknown value "{value}" in event row {row + 1} '
            f"({int(bad.sum())} rows in all; expected one of {', '.join(BEHAVIORS)})"
        )
    return codes


def _enum_codes(s: pl.Series) -> np.ndarray:
    """Physical Enum index + 1 as int8 (nulls → 0)."""
    return (s.to_physical().cast(pl.Int16).fill_null(-1) + 1).cast(pl.Int8).to_numpy()


def compute_rewards(
    *,
    behavior: np.ndarray | None,
    rating: np.ndarray | None,
    n_events: int,
    cfg: RewardConfig,
    source_row: np.ndarray | None = None,
) -> Rewards:
    """Rewards (E,) from behaviour codes (E,) int8 or ratings (E,) float, as ``cfg`` says.

    ``source_row`` (E,) maps positions to the event rows named in error messages (default:
    the position itself).
    """

    def where(pos: int) -> int:
        return int(source_row[pos]) + 1 if source_row is not None else pos + 1

    source = cfg.source
    if source == "auto":
        source = (
            "behavior" if behavior is not None else "rating" if rating is not None else "constant"
        )
    if source == "behavior":
        if behavior is None:
            raise ConfigError(f'reward.source is "behavior" but the events have no "{BEHAVIOR}"')
        reward = cfg.behavior.table()[behavior]
        missing = np.isnan(reward)
        if missing.any():
            row = where(int(np.flatnonzero(missing)[0]))
            raise PrepareError(
                f'column "{BEHAVIOR}": {int(missing.sum())} events without a behaviour '
                f"(first: event row {row}); rewards need one per event: `recloop prepare "
                "--skip-bad-rows` leaves them out, or reward.source rating or constant takes "
                "rewards from elsewhere"
            )
        return Rewards(reward, "behavior")
    if source == "rating":
        if rating is None:
            raise ConfigError(f'reward.source is "rating" but the events have no "{RATING}"')
        r = np.asarray(rating, np.float64)
        if np.isnan(r).any():
            row = where(int(np.flatnonzero(np.isnan(r))[0]))
            raise PrepareError(
                f'column "{RATING}": {int(np.isnan(r).sum())} events without a rating '
                f"(first: event row {row})"
            )
        if cfg.rating_threshold is not None:
            r = (r >= cfg.rating_threshold).astype(np.float64)
        return Rewards(r.astype(np.float32), "rating")
    return Rewards(np.full(n_events, cfg.constant, np.float32), "constant")
