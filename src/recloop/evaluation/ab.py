"""A/B comparison of serving arms from the served log and the feedback attributed to it.

The unit is the *served list* (one ``recommendation_id``): its reward is the sum of the
rewards attributed to its items (:mod:`recloop.streaming.served`: an ignored item gets 0
once settled), and it is *clicked* when at least one feedback event with a positive reward
was attributed to it (an event with reward 0 or below -- a dislike, a view worth nothing
-- sets its impression's reward but is no click).
Per arm the report gives

* reward per served list = sum of list rewards / number of lists, and
* click rate = clicked lists / lists,

with percentile bootstrap intervals that resample **users** with replacement (all the lists
of a drawn user come along), because a user's lists are not independent of each other;
the statistic of each replicate is again the ratio of sums.  Users are assigned to arms
by a hash of their id, so the arms are independent samples: the difference of an arm
from the baseline is bootstrapped with independent resamples of the two arms (an interval
for ``arm - baseline``, not paired).  A user found in several arms (the weights or the
salt changed during the experiment) is counted in each and reported in
``users_in_several_arms``; the intervals then assume too much independence.

The baseline is the arm named ``control``, else ``current`` (a registry canary's log), else
``baseline``, else the first arm by name.  A percentile bootstrap over few users is too
narrow (one user gives a zero-width interval): differences involving an arm of fewer than
``min_users`` users are marked ``small_sample`` and the report says so.

By default only *settled* lists count (every item's attribution window closed); a list
still open would count its late clicks as zeros.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from recloop.errors import ConfigError, DataError

PREFERRED_BASELINES = ("control", "current", "baseline")
"""Arm names taken as the baseline when none is given, in this order."""

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, *, now: float | None = None) -> int:
    """Unix seconds from ``1733350000``, an ISO 8601 time (``2026-12-05T01:00``, UTC unless
    it says otherwise) or a duration back from now (``90m``, ``24h``, ``7d``)."""
    t = text.strip()
    if re.fullmatch(r"-?\d+", t):
        return int(t)
    m = _DURATION.match(t)
    if m:
        base = dt.datetime.now(dt.UTC).timestamp() if now is None else now
        return int(base - float(m.group(1)) * _SECONDS[m.group(2)])
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: expected unix seconds, an ISO time (2026-12-05T01:00) or a "
            "duration back from now (90m, 24h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


@dataclass(frozen=True, kw_only=True)
class Interval:
    value: float
    """Point estimate."""
    low: float
    high: float


@dataclass(frozen=True, kw_only=True)
class ArmResult:
    arm: str
    users: int
    lists: int
    """Served lists counted (settled, after ``since``)."""
    impressions: int
    """Items shown in them."""
    reward_per_list: Interval
    click_rate: Interval
    """Share of lists with at least one attributed feedback event."""
    model_versions: list[str]
    policies: list[str]


@dataclass(frozen=True, kw_only=True)
class ArmDifference:
    arm: str
    baseline: str
    reward_per_list: Interval
    """``arm - baseline``, independent bootstrap."""
    click_rate: Interval
    small_sample: bool = False
    """Either arm has fewer than the report's ``min_users`` users: the intervals are too
    narrow to read as evidence."""


@dataclass(frozen=True, kw_only=True)
class AbReport:
    arms: list[ArmResult]
    differences: list[ArmDifference]
    baseline: str
    confidence: float
    n_boot: int
    seed: int
    settled_only: bool
    since: int | None
    open_lists: int
    """Lists left out because their attribution is not settled yet."""
    lists_without_arm: int
    """Lists served without A/B serving (arm null), left out."""
    users_in_several_arms: int
    min_users: int = 30
    """Users an arm needs before its intervals are read as evidence."""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def served_lists(served: pl.DataFrame) -> pl.DataFrame:
    """One row per served list: recommendation_id, user_id, arm, ts, model_version, policy,
    reward (sum over its items, unattributed = 0), clicked (bool), impressions, settled."""
    need = {"recommendation_id", "user_id", "arm", "ts", "reward", "event_id", "settled"}
    missing = need - set(served.columns)
    if missing:
        raise DataError(f"served log: missing columns {sorted(missing)}")
    bad = served.filter(pl.col("reward").is_nan() | pl.col("reward").is_infinite())
    if bad.height:
        first = bad.row(0, named=True)
        raise DataError(
            f"served log: {bad.height} impressions with a non-finite reward (first: list "
            f"{first['recommendation_id']!r}, position {first.get('position')}, reward "
            f"{first['reward']})"
        )
    return (
        served.group_by("recommendation_id", maintain_order=True)
        .agg(
            pl.col("user_id").first(),
            pl.col("arm").first(),
            pl.col("ts").first(),
            pl.col("model_version").first(),
            pl.col("policy").first(),
            pl.col("reward").fill_null(0.0).sum().alias("reward"),
            (pl.col("event_id").is_not_null() & (pl.col("reward") > 0)).any().alias("clicked"),
            pl.len().alias("impressions"),
            pl.col("settled").all().alias("settled"),
        )
        .sort("ts", "recommendation_id")
    )


def _user_sums(lists: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user (U,): summed list reward, lists, clicked lists."""
    per = lists.group_by("user_id").agg(
        pl.col("reward").sum(), pl.len().alias("n"), pl.col("clicked").sum()
    )
    return (
        per["reward"].to_numpy().astype(np.float64),
        per["n"].to_numpy().astype(np.float64),
        per["clicked"].to_numpy().astype(np.float64),
    )


def _replicates(
    sums: tuple[np.ndarray, np.ndarray, np.ndarray], *, n_boot: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap replicates (n_boot,) of reward per list and click rate, users resampled.

    Drawn in blocks of at most ~4M indices, so a large arm costs time, not memory."""
    reward, n, clicked = sums
    u = reward.size
    out_r = np.empty(n_boot)
    out_c = np.empty(n_boot)
    block = max(1, 4_000_000 // max(u, 1))
    for lo in range(0, n_boot, block):
        hi = min(n_boot, lo + block)
        idx = rng.integers(0, u, size=(hi - lo, u))  # (b, U)
        lists = n[idx].sum(1)
        out_r[lo:hi] = reward[idx].sum(1) / lists
        out_c[lo:hi] = clicked[idx].sum(1) / lists
    return out_r, out_c


def _interval(value: float, reps: np.ndarray, confidence: float) -> Interval:
    a = (1 - confidence) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return Interval(value=float(value), low=float(lo), high=float(hi))


def ab_report(
    served: pl.DataFrame,
    *,
    baseline: str | None = None,
    since: int | None = None,
    settled_only: bool = True,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    min_users: int = 30,
) -> AbReport:
    """Per-arm reward per list and click rate with user-bootstrap intervals, and each arm
    minus ``baseline`` (default: ``control``, ``current`` or ``baseline`` when an arm is so
    named, else the first arm by name) — see the module docstring.

    ``served``: the served-items table (:meth:`recloop.streaming.log.BehaviorLog.read_served`),
    one row per shown item."""
    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence}")
    if n_boot < 100:
        raise ConfigError(f"n_boot must be >= 100 for a {confidence:.0%} interval, got {n_boot}")
    lists = served_lists(served)
    if since is not None:
        lists = lists.filter(pl.col("ts") >= since)
    no_arm = int(lists["arm"].null_count())
    lists = lists.filter(pl.col("arm").is_not_null())
    open_lists = 0
    if settled_only:
        open_lists = int((~lists["settled"]).sum())
        lists = lists.filter(pl.col("settled"))
    names: Sequence[str] = sorted(lists["arm"].unique().to_list())
    if len(names) < 2:
        raise DataError(
            f"served log: {len(names)} A/B arm(s) with settled lists ({', '.join(names) or '-'}"
            f"; {open_lists} lists still open, {no_arm} without an arm): serve with --ab and "
            "let `recloop stream` settle the attribution first"
        )
    if baseline is None:
        base = next((n for n in PREFERRED_BASELINES if n in names), names[0])
    else:
        base = baseline
    if base not in names:
        raise ConfigError(f"--baseline {base!r} is not an arm of the log ({', '.join(names)})")
    rng = np.random.default_rng(seed)
    results: dict[str, ArmResult] = {}
    reps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in names:
        part = lists.filter(pl.col("arm") == name)
        sums = _user_sums(part)
        reward_pl = float(sums[0].sum() / sums[1].sum())
        click = float(sums[2].sum() / sums[1].sum())
        reps[name] = _replicates(sums, n_boot=n_boot, rng=rng)
        results[name] = ArmResult(
            arm=name,
            users=int(sums[0].size),
            lists=part.height,
            impressions=int(part["impressions"].sum()),
            reward_per_list=_interval(reward_pl, reps[name][0], confidence),
            click_rate=_interval(click, reps[name][1], confidence),
            model_versions=sorted(str(v) for v in part["model_version"].unique().to_list()),
            policies=sorted(str(v) for v in part["policy"].unique().to_list()),
        )
    diffs = [
        ArmDifference(
            arm=name,
            baseline=base,
            reward_per_list=_interval(
                results[name].reward_per_list.value - results[base].reward_per_list.value,
                reps[name][0] - reps[base][0],
                confidence,
            ),
            click_rate=_interval(
                results[name].click_rate.value - results[base].click_rate.value,
                reps[name][1] - reps[base][1],
                confidence,
            ),
            small_sample=min(results[name].users, results[base].users) < min_users,
        )
        for name in names
        if name != base
    ]
    several = int(
        lists.group_by("user_id")
        .agg(pl.col("arm").n_unique().alias("k"))
        .filter(pl.col("k") > 1)
        .height
    )
    notes = []
    small = [f"{r.arm} ({r.users})" for r in results.values() if r.users < min_users]
    if small:
        notes.append(
            f"arms with fewer than {min_users} users: {', '.join(small)}; a bootstrap over "
            "so few users is too narrow, so their differences are not marked as excluding 0"
        )
    if several:
        notes.append(
            f"{several} users were served by several arms (weights or salt changed?): they "
            "count in each, and the intervals assume more independence than there is"
        )
    return AbReport(
        arms=[results[n] for n in names],
        differences=diffs,
        baseline=base,
        confidence=confidence,
        n_boot=n_boot,
        seed=seed,
        settled_only=settled_only,
        since=since,
        open_lists=open_lists,
        lists_without_arm=no_arm,
        users_in_several_arms=several,
        min_users=min_users,
        notes=notes,
    )
