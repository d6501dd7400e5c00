"""Full-ranking evaluation over the whole catalogue (no sampled negatives).

Protocol, for a target split S (``valid`` or ``test``), applied to every user with at least one
event in S:

- **state**: the user's last H events before their first event in S, whatever their split
  (left-padded with ``PAD_ID``) — what a deployed policy would have seen; on impressions of
  served lists (a ``position`` column), the state that event's list was served from: its
  logged context (``served_context``, read with the dataset's items) where it has one,
  else the H events before the list (so with a leave-one-out split whose valid and test
  events are the last slots of one list, both are scored on that list's state);
- **targets**: the distinct items of all the user's events in S — one for leave-one-out, the
  tail of the sequence for the per-user ratio split, every event after the cut for a global
  time cut;
- **consumed**: the items of all the user's events before their first event in S (before
  its list, on impressions).

With ``mask_consumed`` (the *masked* protocol) the consumed items are removed from the
ranking, **except the user's targets**: this is RecBole's full-sort protocol for *general*
(non-sequential) models, whose evaluation data loader masks ``history_item = used_item -
positive_item`` (so a re-consumed item stays rankable and findable).  RecBole scores its
*sequential* models (GRU4Rec, SASRec, ...) **unmasked** — nothing is removed — so compare
with those only through the unmasked numbers (``mask_consumed=False``).  The padding column
0 is never ranked.  Items are ranked by :func:`recloop.ranking.topk` on the (masked)
scores, ties broken by a per-user pseudo-random key, never by item index, so a constant
scorer scores the random level.  Metrics are RecBole's (see
:mod:`recloop.evaluation.metrics`), averaged over users, plus

- ``coverage@k``: distinct items recommended in any user's top k, over the N real items;
- ``hit_reward@k``: mean logged reward over all hits in the top k (pooled over users; the
  largest reward when a target item was logged several times; 0 when nothing was hit).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recloop.config import check
from recloop.data.dataset import SPLIT_NAMES, PreparedDataset
from recloop.data.lists import context_states, list_first, list_starts
from recloop.data.sampler import gather_windows
from recloop.data.schema import POSITION, SERVED_CONTEXT
from recloop.errors import ConfigError, DataError
from recloop.evaluation.metrics import METRICS
from recloop.ranking import InnerProduct, topk, topk_inner_product

logger = logging.getLogger(__name__)

Scorer = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(user (B,), history (B, H), history_reward (B, H)) -> scores (B, N + 1)``.

Column 0 is the padding item and is never ranked; higher scores rank first.  The scorer is
called under ``torch.no_grad()`` (put modules in eval mode first); its output is copied
before masking, so it may return a view of its own buffers.  A scorer may also have a method
``inner_product(user, history, history_reward) -> InnerProduct | None`` giving the same
scores factored (:class:`recloop.ranking.InnerProduct`); large catalogues are then ranked in
item chunks (``EvalConfig.item_chunk``).
"""


_NAN_SCORES = "scorer returned NaN scores; nothing can be ranked on them"


def _inner_product_of(
    scorer: Scorer, users: EvalUsers, cfg: EvalConfig, dev: torch.device
) -> Callable[[Tensor, Tensor, Tensor], InnerProduct | None] | None:
    """The scorer's ``inner_product`` when the catalogue is chunked and it factors, else None."""
    method = getattr(scorer, "inner_product", None)
    if not callable(method) or users.n_items + 1 <= cfg.item_chunk or len(users) == 0:
        return None
    with torch.no_grad():
        probe = method(
            torch.from_numpy(users.user[:1]).to(dev),
            torch.from_numpy(users.history[:1]).to(dev),
            torch.from_numpy(users.history_reward[:1]).to(dev),
        )
    return method if isinstance(probe, InnerProduct) else None


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """How full-ranking evaluation ranks and cuts."""

    ks: tuple[int, ...] = (5, 10, 20)
    """Cut-offs K at which every metric is reported."""
    mask_consumed: bool = True
    """Remove items the user consumed before the split point from the ranking (targets stay
    rankable, as in RecBole)."""
    batch_size: int = 1024
    """Users scored at most at once (fewer when ``max_batch_cells`` says so)."""
    max_batch_cells: int = 32_000_000
    """Bound on users x (N + 1) scores per batch, so memory stays bounded however large the
    catalogue: a batch holds a few float32 copies of its score table (about 4 x 4 bytes per
    cell: scores, the masked copy, comparisons inside top-k), ~0.5 GB at the default.  With a
    million items a batch is 31 users; with ml-100k's 1,682 the whole ``batch_size``."""
    tie_seed: int = 0
    """Seed of the pseudo-random tie-break between equal scores (:mod:`recloop.ranking`)."""
    item_chunk: int = 4_096
    """Catalogues larger than this are ranked in item chunks of this size when the scorer
    factors as an inner product (``scorer.inner_product``, linear and dot heads): each chunk's
    scores are computed into one buffer of users x ``item_chunk`` cells that stays in cache,
    keep their k + 1 best, and the full (users, N + 1) table never exists (the same ranking,
    see :func:`recloop.ranking.topk_inner_product`)."""

    def __post_init__(self) -> None:
        check(len(self.ks) > 0, "eval.ks must name at least one cut-off")
        check(all(k >= 1 for k in self.ks), f"eval.ks must all be >= 1, got {list(self.ks)}")
        check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        check(
            self.max_batch_cells >= 1,
            f"eval.max_batch_cells must be >= 1, got {self.max_batch_cells}",
        )
        check(self.item_chunk >= 1, f"eval.item_chunk must be >= 1, got {self.item_chunk}")

    def users_per_batch(self, n_items: int) -> int:
        """Users scored at once for a catalogue of ``n_items`` (N) items: ``batch_size``,
        lowered so that users x (N + 1) stays within ``max_batch_cells`` (at least 1)."""
        return max(1, min(self.batch_size, self.max_batch_cells // (n_items + 1)))

    def users_per_chunked_batch(self) -> int:
        """Users ranked at once in item chunks: ``batch_size`` within ``max_batch_cells``."""
        return max(1, min(self.batch_size, self.max_batch_cells // self.item_chunk))


@dataclass(frozen=True, kw_only=True, eq=False)
class EvalUsers:
    """States, targets and consumed items of the evaluated users of one split.

    M users; T target events; C consumed events.  Targets and consumed items are CSR: user
    ``i``'s targets are ``target_items[target_offsets[i]:target_offsets[i + 1]]``.
    """

    split: int
    """The target split code (see ``recloop.data.dataset.SPLIT_NAMES``)."""
    n_items: int
    """N, the catalogue size; scores have N + 1 columns."""
    user: np.ndarray  # (M,) int64, user index
    history: np.ndarray  # (M, H) int64, last H items before the first target event, PAD left
    history_reward: np.ndarray  # (M, H) float32, their rewards, 0 at padding
    target_offsets: np.ndarray  # (M + 1,) int64
    target_items: np.ndarray  # (T,) int32, items of the user's events in the split, in order
    target_rewards: np.ndarray  # (T,) float32, their logged rewards
    n_targets: np.ndarray  # (M,) int64, distinct target items per user
    consumed_offsets: np.ndarray  # (M + 1,) int64
    consumed_items: np.ndarray  # (C,) int32, items of every event before the first target

    def __len__(self) -> int:
        return int(self.user.shape[0])


def split_code(split: str | int) -> int:
    """``"valid"`` / ``"test"`` / ``"train"`` (or their codes) → the split code."""
    codes = {name: code for code, name in SPLIT_NAMES.items()}
    if isinstance(split, str) and split in codes:
        return codes[split]
    if not isinstance(split, str) and int(split) in SPLIT_NAMES:
        return int(split)
    raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(codes)}")


def csr_ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (M + 1,) and the concatenated rows of the ranges ``starts[i]:ends[i]``."""
    lengths = ends - starts
    offsets = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    rows = np.arange(offsets[-1], dtype=np.int64) + np.repeat(starts - offsets[:-1], lengths)
    return offsets, rows


def build_eval_users(dataset: PreparedDataset, *, split: str | int, history: int) -> EvalUsers:
    """The protocol's users for ``split`` (see the module docstring), without per-user loops."""
    check(history >= 1, f"eval history must be >= 1, got {history}")
    code = split_code(split)
    rows = np.flatnonzero(dataset.split == code)  # (T,) ascending, grouped by user
    users = dataset.user[rows]
    new_user = np.ones(rows.shape[0], dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    group = np.flatnonzero(new_user)  # (M,) first target position of each user
    user = users[group].astype(np.int64)
    first = rows[group]  # (M,) row of the first event in the split
    if POSITION in dataset.extra:
        # impressions: the state is the one the first target's list was served from,
        # before the list (the slots above the target were shown with it, not before it)
        starts = list_starts(dataset.user, dataset.timestamp, dataset.extra[POSITION])
        first = list_first(starts, first)
    start = dataset.user_offsets[user]
    win = gather_windows(dataset.item, dataset.reward, end=first, start=start, length=history)
    hist, hist_reward = win.item.astype(np.int64), win.reward
    if SERVED_CONTEXT in dataset.extra and POSITION in dataset.extra:
        # the list's logged context, where its service logged one, is the state it saw
        # (``first`` ascends: the users' blocks are in order)
        ctx = context_states(dataset, first, history=history)
        at = np.searchsorted(first, ctx.rows)
        hist[at] = ctx.item
        hist_reward[at] = ctx.reward  # the windows are fresh arrays, the dataset untouched
    target_offsets = np.append(group, rows.shape[0]).astype(np.int64)
    target_items = dataset.item[rows]
    # Distinct targets per user: count distinct (user position, item) pairs.
    pos = np.repeat(np.arange(group.shape[0], dtype=np.int64), np.diff(target_offsets))
    pairs = np.unique(pos * (dataset.n_items + 1) + target_items)
    n_targets = np.bincount(pairs // (dataset.n_items + 1), minlength=group.shape[0])
    consumed_offsets, consumed_rows = csr_ranges(start, first)
    return EvalUsers(
        split=code,
        n_items=dataset.n_items,
        user=user,
        history=hist,
        history_reward=hist_reward,
        target_offsets=target_offsets,
        target_items=target_items,
        target_rewards=dataset.reward[rows],
        n_targets=n_targets.astype(np.int64),
        consumed_offsets=consumed_offsets,
        consumed_items=dataset.item[consumed_rows],
    )


@dataclass(frozen=True)
class RankingReport:
    """Metrics of one full-ranking evaluation, averaged over ``n_users`` users."""

    metrics: dict[str, float]
    """``name@k`` → value, for hr, recall, precision, ndcg, mrr, map, coverage, hit_reward."""
    n_users: int
    """Users evaluated (those with at least one event in the split)."""
    split: str
    """The evaluated split: valid or test."""
    mask_consumed: bool
    """Whether items consumed before the split point were removed from the ranking."""
    seconds: dict[str, float] = field(default_factory=dict, compare=False)
    """Wall time per stage (build, score, rank, metrics); not part of :meth:`to_dict`."""
    per_user: dict[str, np.ndarray] = field(default_factory=dict, compare=False, repr=False)
    """``name@k`` → (M,) float64 value of each evaluated user (users in ``EvalUsers`` order),
    for paired comparisons across users; not part of :meth:`to_dict`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: split, n_users, mask_consumed and the metrics."""
        return {
            "split": self.split,
            "n_users": self.n_users,
            "mask_consumed": self.mask_consumed,
            "metrics": dict(self.metrics),
        }


def batch_rows(offsets: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, slice]:
    """Row-in-batch index (one per CSR entry of users lo..hi-1) and the entries' slice."""
    counts = np.diff(offsets[lo : hi + 1])
    return np.repeat(np.arange(hi - lo, dtype=np.int64), counts), slice(
        int(offsets[lo]), int(offsets[hi])
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_users(
    scorer: Scorer,
    users: EvalUsers,
    *,
    cfg: EvalConfig = EvalConfig(),
    device: str | torch.device = "cpu",
) -> RankingReport:
    """Rank the whole catalogue for prebuilt ``users`` (build them once, evaluate each epoch)."""
    m, n = len(users), users.n_items
    name = SPLIT_NAMES[users.split]
    if m == 0:
        raise DataError(f"no user has an event in the {name} split; nothing to evaluate")
    dev = torch.device(device)
    k_max = max(cfg.ks)
    k_top = min(k_max, n)
    seconds = {"score": 0.0, "rank": 0.0, "metrics": 0.0}
    hits_all = torch.zeros((m, k_max), dtype=torch.bool)
    hit_reward_sum = dict.fromkeys(cfg.ks, 0.0)
    recommended = {k: torch.zeros(n + 1, dtype=torch.bool, device=dev) for k in cfg.ks}
    pad = torch.zeros(1, dtype=torch.long, device=dev)
    factored = _inner_product_of(scorer, users, cfg, dev)
    per_batch = cfg.users_per_chunked_batch() if factored else cfg.users_per_batch(n)
    for lo in range(0, m, per_batch):
        hi = min(lo + per_batch, m)
        b = hi - lo
        width = n + 1
        # Entries are addressed as flat keys row * (N + 1) + item of this batch's score table;
        # 1-D index ops on them are far cheaper than 2-D advanced indexing.
        t_row_np, t_sl = batch_rows(users.target_offsets, lo, hi)
        t_key_np = t_row_np * width + users.target_items[t_sl]
        t_key = torch.from_numpy(t_key_np).to(dev)
        row_keys = torch.from_numpy(users.user[lo:hi])
        t0 = time.perf_counter()
        if factored is not None:
            with torch.no_grad():
                inner = factored(
                    torch.from_numpy(users.user[lo:hi]).to(dev),
                    torch.from_numpy(users.history[lo:hi]).to(dev),
                    torch.from_numpy(users.history_reward[lo:hi]).to(dev),
                )
            if not isinstance(inner, InnerProduct):
                raise ValueError(
                    "scorer.inner_product returned None for a batch after factoring the first user"
                )
            # The padding column, and consumed items that are not targets (targets stay
            # rankable, as in RecBole), rank last.
            excluded = [np.arange(b, dtype=np.int64) * width]
            if cfg.mask_consumed:
                c_row_np, c_sl = batch_rows(users.consumed_offsets, lo, hi)
                c_key_np = c_row_np * width + users.consumed_items[c_sl]
                excluded.append(c_key_np[~np.isin(c_key_np, t_key_np)])
            with torch.no_grad():
                ranked = topk_inner_product(
                    inner,
                    k_top,
                    row_keys=row_keys,
                    seed=cfg.tie_seed,
                    exclude=torch.from_numpy(np.concatenate(excluded)).to(dev),
                    chunk=cfg.item_chunk,
                    nan_error=_NAN_SCORES,
                )
            _sync(dev)
            t1 = time.perf_counter()
        else:
            with torch.no_grad():
                scores = scorer(
                    torch.from_numpy(users.user[lo:hi]).to(dev),
                    torch.from_numpy(users.history[lo:hi]).to(dev),
                    torch.from_numpy(users.history_reward[lo:hi]).to(dev),
                )
            if scores.shape != (b, n + 1):
                raise ValueError(
                    f"scorer returned shape {tuple(scores.shape)}, expected ({b}, {n + 1})"
                )
            _sync(dev)
            t1 = time.perf_counter()
            scores = scores.detach().to(dev)
            if scores.is_floating_point() and bool(torch.isnan(scores).any()):
                raise ValueError(_NAN_SCORES)
            # index_fill is out of place: the copy protects the scorer's own tensors from
            # masking.
            scores = scores.index_fill(1, pad, float("-inf"))
            flat = scores.view(-1)
            if cfg.mask_consumed:
                c_row_np, c_sl = batch_rows(users.consumed_offsets, lo, hi)
                c_key = torch.from_numpy(c_row_np * width + users.consumed_items[c_sl]).to(dev)
                keep = flat.index_select(0, t_key)
                flat.index_fill_(0, c_key, float("-inf"))
                flat.index_copy_(0, t_key, keep)  # targets stay rankable (RecBole)
            ranked = topk(scores, k_top, row_keys=row_keys, seed=cfg.tie_seed)
        values, top = ranked.values, ranked.indices  # (b, K)
        # fewer than K rankable items leaves -inf (masked) in the top; +inf is a real score
        finite = values > float("-inf")
        # Hits by binary search of the top-K keys among the sorted distinct target keys.
        u_key, inverse = torch.unique(t_key, return_inverse=True)
        u_reward = torch.full(u_key.shape, float("-inf"), device=dev).scatter_reduce_(
            0, inverse, torch.from_numpy(users.target_rewards[t_sl]).to(dev), reduce="amax"
        )  # the largest logged reward of each distinct target
        q_key = torch.arange(b, device=dev)[:, None] * width + top  # (b, K)
        at = torch.searchsorted(u_key, q_key).clamp_(max=u_key.shape[0] - 1)
        hits = (u_key[at] == q_key) & finite
        hits_all[lo:hi, :k_top] = hits.cpu()
        hit_rewards = torch.where(hits, u_reward[at], 0.0)
        shown = torch.where(finite, top, 0)  # column 0 is left out of the coverage count
        for k in cfg.ks:
            hit_reward_sum[k] += float(hit_rewards[:, :k].sum())
            recommended[k].index_fill_(0, shown[:, :k].reshape(-1), True)
        _sync(dev)
        t2 = time.perf_counter()
        seconds["score"] += t1 - t0
        seconds["rank"] += t2 - t1
    t3 = time.perf_counter()
    n_targets = torch.from_numpy(users.n_targets)
    metrics: dict[str, float] = {}
    per_user: dict[str, np.ndarray] = {}
    for k in sorted(cfg.ks):
        for metric, fn in METRICS.items():
            values = fn(hits_all, n_targets, k)
            per_user[f"{metric}@{k}"] = values.numpy()
            metrics[f"{metric}@{k}"] = float(values.mean())
        metrics[f"coverage@{k}"] = float(recommended[k][1:].sum()) / max(n, 1)
        n_hits = int(hits_all[:, :k].sum())
        metrics[f"hit_reward@{k}"] = hit_reward_sum[k] / n_hits if n_hits else 0.0
    seconds["metrics"] = time.perf_counter() - t3
    logger.debug("evaluated %d %s users in %s", m, name, seconds)
    return RankingReport(
        metrics=metrics,
        n_users=m,
        split=name,
        mask_consumed=cfg.mask_consumed,
        seconds=seconds,
        per_user=per_user,
    )


def evaluate(
    scorer: Scorer,
    dataset: PreparedDataset,
    *,
    split: str = "test",
    history: int,
    cfg: EvalConfig = EvalConfig(),
    device: str | torch.device = "cpu",
) -> RankingReport:
    """Full-ranking metrics of ``scorer`` on ``split`` of ``dataset`` (module docstring)."""
    t0 = time.perf_counter()
    users = build_eval_users(dataset, split=split, history=history)
    built = time.perf_counter() - t0
    report = evaluate_users(scorer, users, cfg=cfg, device=device)
    return dataclasses.replace(report, seconds={"build": built, **report.seconds})
