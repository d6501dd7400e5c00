"""Synthetic e-commerce logs in the Tianchi ECommAI EUIR round-2 format, at any size.

The generator writes three headerless CSV files, exactly what the ``tianchi`` loader reads::

    user.csv            user, sex, age, pur_power
    item.csv            item, category, shop, brand
    user_behavior.csv   user, item, behavior (pv/cart/fav/buy), time (seconds since the epoch)

What makes the logs look like real shopping sessions:

- item popularity follows a Zipf law (weight ∝ rank^-s over a random ranking of the items);
- every user belongs to a taste cluster, and each cluster prefers a handful of categories:
  a session mostly browses one focus category drawn from the user's cluster;
- events come in sessions: seconds to minutes apart inside a session, hours to days between
  sessions; events per user are heavy-tailed (log-normal);
- a pv → cart/fav → buy funnel with the behaviour shares of the real logs (about 89.5 % pv,
  5.5 % cart, 2.9 % fav, 2.1 % buy): carts, favourites and most buys act on an item viewed
  earlier in the same session, and some pv events are re-views.

Everything is vectorised numpy, generated in chunks of users (about ``chunk_events`` events
each) with one random stream per chunk, so memory stays bounded and the same arguments
always give byte-identical files.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from recloop.config import check
from recloop.progress import progress

logger = logging.getLogger(__name__)

BEHAVIOR_NAMES = ("pv", "cart", "fav", "buy")
PV, CART, FAV, BUY = 0, 1, 2, 3

USER_FILE = "user.csv"
ITEM_FILE = "item.csv"
BEHAVIOR_FILE = "user_behavior.csv"


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Size and shape of a synthetic Tianchi-style log."""

    events: int
    """Number of behaviour events (rows of ``user_behavior.csv``)."""
    seed: int = 0
    """Seed of every random draw; the same config gives byte-identical files."""
    users: int | None = None
    """Number of users in ``user.csv``; None means events // 100 (at least 1)."""
    items: int | None = None
    """Number of items in ``item.csv``; None means events // 20 (at least 1)."""
    categories: int | None = None
    """Number of item categories; None means items // 100, between 1 and 2000."""
    clusters: int = 20
    """Number of user taste clusters."""
    cluster_categories: int = 8
    """Categories each taste cluster prefers."""
    zipf_exponent: float = 1.0
    """Exponent s of the item popularity law weight ∝ rank^-s."""
    focus: float = 0.75
    """Share of a session's fresh views drawn from its focus category (the rest: anywhere)."""
    cluster_taste: float = 0.85
    """Probability that a session's focus category is one of the cluster's preferred ones."""
    user_activity_sigma: float = 1.2
    """Sigma of the log-normal spread of events per user."""
    mean_session_events: float = 8.0
    """Mean number of events in a session."""
    within_session_gap_s: float = 45.0
    """Mean gap in seconds between consecutive events of one session (exponential)."""
    between_session_gap_s: float = 8 * 3600.0
    """Median gap in seconds between sessions (log-normal, spreading from hours to days)."""
    behavior_shares: tuple[float, float, float, float] = (0.895, 0.055, 0.029, 0.021)
    """Shares of pv, cart, fav and buy among all events (a session's first event is a pv)."""
    review_rate: float = 0.1
    """Probability that a pv (other than a session's first) views an item seen earlier."""
    direct_buy_rate: float = 0.05
    """Share of buys of an item not seen in the session (e.g. bought from the cart page)."""
    start_time: int = 1_567_296_000
    """Earliest session start (seconds since the epoch; default 2019-09-01 UTC)."""
    start_spread_s: int = 14 * 86400
    """Users start their first session uniformly within this many seconds of ``start_time``."""
    chunk_events: int = 1_000_000
    """Approximate events generated and written per chunk (bounds memory)."""

    def __post_init__(self) -> None:
        check(self.events >= 0, f"events must be >= 0, got {self.events}")
        for name in ("users", "items", "categories"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{name} must be >= 1, got {value}")
        check(self.clusters >= 1, f"clusters must be >= 1, got {self.clusters}")
        check(self.cluster_categories >= 1, "cluster_categories must be >= 1")
        check(self.zipf_exponent >= 0, f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        for name in ("focus", "cluster_taste", "review_rate", "direct_buy_rate"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"{name} must lie in [0, 1], got {value}")
        check(self.mean_session_events >= 1, "mean_session_events must be >= 1")
        check(self.within_session_gap_s >= 0, "within_session_gap_s must be >= 0")
        check(self.between_session_gap_s > 0, "between_session_gap_s must be > 0")
        check(
            len(self.behavior_shares) == 4
            and min(self.behavior_shares) >= 0
            and abs(sum(self.behavior_shares) - 1.0) < 1e-6,
            f"behavior_shares must be 4 non-negative shares summing to 1, "
            f"got {self.behavior_shares}",
        )
        check(self.chunk_events >= 1, "chunk_events must be >= 1")

    @property
    def n_users(self) -> int:
        return self.users if self.users is not None else max(1, self.events // 100)

    @property
    def n_items(self) -> int:
        return self.items if self.items is not None else max(1, self.events // 20)

    @property
    def n_categories(self) -> int:
        if self.categories is not None:
            return min(self.categories, self.n_items)
        return int(min(max(1, self.n_items // 100), 2000))


@dataclass(frozen=True)
class SynthResult:
    """Where the files went and what they hold."""

    directory: Path
    n_users: int
    n_items: int
    n_events: int
    behavior_counts: dict[str, int]
    """Events per behaviour name."""


@dataclass(frozen=True)
class _Catalogue:
    """Items sorted by category, with cumulative popularity for inverse-CDF sampling."""

    sorted_items: np.ndarray  # (N,) int64 item index (0-based) in category order
    cum_weight: np.ndarray  # (N,) float64 cumulative popularity along sorted_items
    cat_lo: np.ndarray  # (C,) float64 cumulative weight before the category's first item
    cat_hi: np.ndarray  # (C,) float64 cumulative weight after its last item
    cat_weight: np.ndarray  # (C,) float64 share of popularity per category
    cat_last: np.ndarray  # (C,) int64 position in sorted_items of the category's last item
    cluster_cats: np.ndarray  # (K, M) int64 preferred categories per taste cluster


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream]))


def _items(cfg: SynthConfig) -> tuple[pl.DataFrame, _Catalogue, np.ndarray]:
    """Item table, the sampling catalogue, and the raw id of each item index (N,)."""
    rng = _rng(cfg.seed, 1)
    n, c = cfg.n_items, cfg.n_categories
    # Category sizes are skewed too; the first c items cover every category once so none is empty.
    cat_pop = 1.0 / np.arange(1, c + 1) ** 0.8
    category = np.concatenate(
        [np.arange(c), rng.choice(c, size=n - c, p=cat_pop / cat_pop.sum())]
    ).astype(np.int64)
    rank = rng.permutation(n) + 1
    weight = 1.0 / rank.astype(np.float64) ** cfg.zipf_exponent
    order = np.argsort(category, kind="stable")
    cum = np.cumsum(weight[order])
    counts = np.bincount(category, minlength=c)
    ends = np.cumsum(counts)
    cat_hi = cum[ends - 1]
    cat_lo = np.concatenate([[0.0], cat_hi[:-1]])
    cat_weight = (cat_hi - cat_lo) / cum[-1]
    # Clusters prefer categories in proportion to category popularity, without repeats.
    m = min(cfg.cluster_categories, c)
    keys = rng.random((cfg.clusters, c)) ** (1.0 / np.maximum(cat_weight, 1e-300))
    cluster_cats = np.argsort(-keys, axis=1)[:, :m]
    n_shops = max(1, n // 50)
    # A shop sells mostly one category: shop ids are grouped by category with noise.
    shop = (category * n_shops) // c + rng.integers(0, 3, size=n)
    shop = np.minimum(shop, n_shops - 1) + 1
    brand = rng.integers(1, max(2, n // 100) + 1, size=n)
    raw_item = rng.permutation(n).astype(np.int64) + 1
    table = pl.DataFrame(
        {
            "item": raw_item,
            "category": category + 1,
            "shop": shop.astype(np.int64),
            "brand": brand.astype(np.int64),
        }
    )
    cat = _Catalogue(order, cum, cat_lo, cat_hi, cat_weight, ends - 1, cluster_cats)
    return table, cat, raw_item


def _users(cfg: SynthConfig) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """User table, taste cluster (U,) and events per user (U,)."""
    rng = _rng(cfg.seed, 2)
    u = cfg.n_users
    table = pl.DataFrame(
        {
            "user": np.arange(1, u + 1, dtype=np.int64),
            "sex": rng.integers(0, 2, size=u).astype(np.int64),
            "age": np.clip(rng.normal(33, 9, size=u), 16, 70).astype(np.int64),
            "pur_power": rng.integers(1, 10, size=u).astype(np.int64),
        }
    )
    cluster = rng.integers(0, cfg.clusters, size=u)
    activity = rng.lognormal(0.0, cfg.user_activity_sigma, size=u)
    n_events = rng.multinomial(cfg.events, activity / activity.sum()).astype(np.int64)
    return table, cluster, n_events


def _sample_items(
    cat: _Catalogue, rng: np.random.Generator, category: np.ndarray | None, size: int
) -> np.ndarray:
    """Item indices (size,) by popularity, within ``category`` (size,) or the whole catalogue."""
    u = rng.random(size)
    if category is None:
        target = u * cat.cum_weight[-1]
    else:
        target = cat.cat_lo[category] + u * (cat.cat_hi[category] - cat.cat_lo[category])
    pos = np.searchsorted(cat.cum_weight, target, side="right")
    if category is not None:
        # Rounding can land one past the category's last item; pull it back inside.
        pos = np.minimum(pos, cat.cat_last[category])
    return np.asarray(cat.sorted_items[np.minimum(pos, len(cat.sorted_items) - 1)])


def _chunk(
    cfg: SynthConfig,
    cat: _Catalogue,
    *,
    users: np.ndarray,
    counts: np.ndarray,
    cluster: np.ndarray,
    stream: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Events of ``users`` (0-based) with ``counts`` events each: user, item, behaviour, time."""
    rng = _rng(cfg.seed, 1000 + stream)
    active = counts > 0
    users, counts = users[active], counts[active]
    m = int(counts.sum())
    user = np.repeat(users, counts)
    starts = np.cumsum(counts) - counts
    pos = np.arange(m) - np.repeat(starts, counts)
    new_session = (pos == 0) | (rng.random(m) < 1.0 / cfg.mean_session_events)
    session = np.cumsum(new_session) - 1
    session_start = np.flatnonzero(new_session)
    pos_in_session = np.arange(m) - session_start[session]

    # Time: per-user start, then seconds-apart steps inside sessions and hours-to-days between.
    gap = np.floor(rng.exponential(cfg.within_session_gap_s, size=m))
    between = rng.lognormal(np.log(cfg.between_session_gap_s), 1.0, size=m)
    gap = np.where(new_session, np.floor(between), gap).astype(np.int64)
    gap[pos == 0] = 0
    first = cfg.start_time + rng.integers(0, cfg.start_spread_s + 1, size=len(users))
    total = np.cumsum(gap)
    time = np.repeat(first - (total[starts] - gap[starts]), counts) + total

    # Each session browses a focus category, usually one the user's taste cluster prefers.
    n_sessions = session_start.shape[0]
    sess_user = user[session_start]
    preferred = cat.cluster_cats[
        cluster[sess_user], rng.integers(0, cat.cluster_cats.shape[1], n_sessions)
    ]
    anywhere = np.searchsorted(
        np.cumsum(cat.cat_weight), rng.random(n_sessions) * cat.cat_weight.sum(), side="right"
    )
    anywhere = np.minimum(anywhere, cat.cat_weight.shape[0] - 1)
    focus = np.where(rng.random(n_sessions) < cfg.cluster_taste, preferred, anywhere)
    in_focus = rng.random(m) < cfg.focus
    item = np.empty(m, np.int64)
    item[in_focus] = _sample_items(cat, rng, focus[session[in_focus]], int(in_focus.sum()))
    item[~in_focus] = _sample_items(cat, rng, None, int((~in_focus).sum()))

    # Funnel: cart/fav/buy (and re-views) act on an item seen earlier in the session.
    # Session openers are pv, so the rest draw pv less often to keep the overall shares.
    target = np.asarray(cfg.behavior_shares, np.float64)
    first_share = n_sessions / max(m, 1)
    rest = target.copy()
    rest[PV] = max(0.0, target[PV] - first_share)
    shares = np.cumsum(rest)
    behavior = np.searchsorted(shares, rng.random(m) * shares[-1], side="right").astype(np.int8)
    behavior = np.minimum(behavior, BUY)
    behavior[pos_in_session == 0] = PV
    refers = (behavior != PV) | (rng.random(m) < cfg.review_rate)
    refers &= pos_in_session > 0
    refers &= ~((behavior == BUY) & (rng.random(m) < cfg.direct_buy_rate))
    # Mostly the event just before, sometimes further back within the session.
    back = np.minimum(rng.geometric(0.6, size=m), np.maximum(pos_in_session, 1))
    ref = np.arange(m)
    ref[refers] -= back[refers]
    # Pointer jumping resolves chains (buy → cart → pv) in log(depth) vectorised steps.
    while True:
        nxt = ref[ref]
        if np.array_equal(nxt, ref):
            break
        ref = nxt
    item = item[ref]

    # Logs arrive in time order, interleaving users (ties keep generation order).
    order = np.argsort(time, kind="stable")
    return user[order], item[order], behavior[order], time[order]


def generate(cfg: SynthConfig, directory: Path) -> SynthResult:
    """Write ``user.csv``, ``item.csv`` and ``user_behavior.csv`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    item_table, cat, raw_item = _items(cfg)
    user_table, cluster, counts = _users(cfg)
    item_table.write_csv(directory / ITEM_FILE, include_header=False)
    user_table.write_csv(directory / USER_FILE, include_header=False)

    # Chunks hold whole users, about chunk_events events each.
    cum = np.cumsum(counts)
    n_chunks = max(1, -(-cfg.events // cfg.chunk_events))
    bounds = np.searchsorted(cum, np.arange(1, n_chunks) * cfg.chunk_events, side="left") + 1
    edges = np.unique(np.concatenate([[0], bounds, [cfg.n_users]]))
    behavior_counts = np.zeros(4, np.int64)
    dictionary = pa.array(BEHAVIOR_NAMES)
    with (
        open(directory / BEHAVIOR_FILE, "wb") as out,
        progress(total=cfg.events, desc="synth", unit="ev") as bar,
    ):
        for k, (lo, hi) in enumerate(itertools.pairwise(edges)):
            users = np.arange(lo, hi)
            user, item, behavior, time = _chunk(
                cfg, cat, users=users, counts=counts[lo:hi], cluster=cluster, stream=k
            )
            behavior_counts += np.bincount(behavior, minlength=4)
            frame = pl.DataFrame(
                {
                    "user": user + 1,
                    "item": raw_item[item],
                    "behavior": pl.from_arrow(
                        pa.DictionaryArray.from_arrays(pa.array(behavior), dictionary)
                    ),
                    "time": time,
                }
            )
            frame.write_csv(out, include_header=False)
            bar.update(len(user))
    logger.info("synthesised %d events for %d users into %s", cfg.events, cfg.n_users, directory)
    return SynthResult(
        directory=directory,
        n_users=cfg.n_users,
        n_items=cfg.n_items,
        n_events=cfg.events,
        behavior_counts={name: int(behavior_counts[i]) for i, name in enumerate(BEHAVIOR_NAMES)},
    )
