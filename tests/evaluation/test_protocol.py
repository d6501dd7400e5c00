"""The full-ranking protocol: users, masking and metrics on a tiny log, and against a slow
per-user reference on random data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.errors import ConfigError, DataError
from recloop.evaluation import (
    EvalConfig,
    build_eval_users,
    evaluate,
    evaluate_users,
    split_code,
)
from recloop.ranking import InnerProduct


def tiny() -> PreparedDataset:
    """Four users over items 1..6.

    user 1: items 1 2 3 | 4      splits train train valid | test
    user 2: items 2 5 | 2        test item 2 was consumed before
    user 3: item 6               train only: not evaluated
    user 4: items 3 4            both test, no history
    """
    rows = [
        (1, 1, 0, 1.0, TRAIN),
        (1, 2, 1, 2.0, TRAIN),
        (1, 3, 2, 3.0, VALID),
        (1, 4, 3, 4.0, TEST),
        (2, 2, 0, 1.0, TRAIN),
        (2, 5, 1, 1.0, TRAIN),
        (2, 2, 2, 3.0, TEST),
        (3, 6, 0, 1.0, TRAIN),
        (4, 3, 0, 2.0, TEST),
        (4, 4, 1, 5.0, TEST),
    ]
    u, i, t, r, s = map(np.array, zip(*rows, strict=True))
    return PreparedDataset.from_arrays(
        user=u, item=i, timestamp=t, reward=r, split=s, n_users=4, n_items=6
    )


# The same scores for every user: item 1 best ... item 6 worst; padding would win if ranked.
FIXED = torch.tensor([100.0, 6, 5, 4, 3, 2, 1])


def fixed_scorer(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
    return FIXED.expand(user.shape[0], -1)  # a view: evaluation must not write into it


def test_build_eval_users_by_hand() -> None:
    eu = build_eval_users(tiny(), split="test", history=3)
    assert eu.user.tolist() == [1, 2, 4]
    assert eu.history.tolist() == [[1, 2, 3], [0, 2, 5], [0, 0, 0]]
    assert eu.history_reward.tolist() == [[1, 2, 3], [0, 1, 1], [0, 0, 0]]
    assert eu.target_offsets.tolist() == [0, 1, 2, 4]
    assert eu.target_items.tolist() == [4, 2, 3, 4]
    assert eu.target_rewards.tolist() == [4, 3, 2, 5]
    assert eu.n_targets.tolist() == [1, 1, 2]
    assert eu.consumed_offsets.tolist() == [0, 3, 5, 5]
    assert eu.consumed_items.tolist() == [1, 2, 3, 2, 5]

    ev = build_eval_users(tiny(), split=VALID, history=2)
    assert ev.user.tolist() == [1]
    assert ev.history.tolist() == [[1, 2]]
    assert ev.target_items.tolist() == [3]
    assert ev.consumed_items.tolist() == [1, 2]


def test_on_impressions_the_state_is_the_one_the_targets_list_was_served_from() -> None:
    """A list of 3 served at t=2 whose third slot is the first rewarded holdout row (the
    slots above it are no target): the state and the consumed items end before the list,
    not at the slots shown beside the target."""
    from recloop.loop.gate import NOT_A_TARGET

    ds = PreparedDataset.from_arrays(
        user=np.ones(5, np.int32),
        item=np.array([1, 2, 3, 4, 5]),
        timestamp=np.array([1, 2, 2, 2, 3]),
        split=np.array([TRAIN, NOT_A_TARGET, NOT_A_TARGET, TEST, TEST]),
        n_items=6,
        item_ids=[str(i) for i in range(1, 7)],
    )
    listed = dataclasses.replace(ds, extra={"position": np.array([0, 0, 1, 2, 0], np.int32)})
    assert build_eval_users(ds, split="test", history=3).history.tolist() == [[1, 2, 3]]
    eu = build_eval_users(listed, split="test", history=3)
    assert eu.history.tolist() == [[0, 0, 1]]
    assert eu.consumed_items.tolist() == [1]
    assert eu.target_items.tolist() == [4, 5]
    # where the list logged its context (a store-fed service's: the clicks), that is the state
    ctx = '{"recent": ["6", "999", "5"], "rewards": [2.0, 1.0, 1.0], "excluded": []}'
    texts = np.array(["", ctx, "", "", ""], dtype=object)
    logged = dataclasses.replace(listed, extra={**listed.extra, "served_context": texts})
    eu = build_eval_users(logged, split="test", history=3)
    assert eu.history.tolist() == [[0, 6, 5]]
    assert eu.history_reward.tolist() == [[0.0, 2.0, 1.0]]
    assert eu.consumed_items.tolist() == [1]


def test_evaluate_by_hand_with_masking() -> None:
    """Masked rankings: user 1 → 4 5 6; user 2 → 1 2 3 4 6 (5 masked, target 2 kept);
    user 4 → 1 2 3 4 5 6."""
    report = evaluate(
        fixed_scorer,
        tiny(),
        split="test",
        history=3,
        cfg=EvalConfig(ks=(1, 2), mask_consumed=True),
    )
    m = report.metrics
    assert report.n_users == 3 and report.split == "test" and report.mask_consumed
    assert m["hr@1"] == pytest.approx(1 / 3)  # only user 1 (item 4 first)
    assert m["hr@2"] == pytest.approx(2 / 3)  # user 2 finds item 2 at rank 2
    assert m["recall@2"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["precision@2"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert m["mrr@2"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
    assert m["map@2"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    assert m["coverage@1"] == pytest.approx(2 / 6)  # {4, 1}
    assert m["coverage@2"] == pytest.approx(4 / 6)  # {4, 5, 1, 2}
    assert m["hit_reward@1"] == pytest.approx(4.0)  # user 1's item 4
    assert m["hit_reward@2"] == pytest.approx((4.0 + 3.0) / 2)
    assert torch.equal(FIXED, torch.tensor([100.0, 6, 5, 4, 3, 2, 1]))
    assert set(report.seconds) == {"build", "score", "rank", "metrics"}


def test_evaluate_by_hand_without_masking() -> None:
    """Unmasked, everyone's top 2 is items 1 2: only user 2 (target 2) hits, at rank 2."""
    report = evaluate(fixed_scorer, tiny(), history=3, cfg=EvalConfig(ks=(2,), mask_consumed=False))
    assert not report.mask_consumed
    assert report.metrics["hr@2"] == pytest.approx(1 / 3)
    assert report.metrics["mrr@2"] == pytest.approx((1 / 2) / 3)
    assert report.metrics["coverage@2"] == pytest.approx(2 / 6)
    assert report.to_dict() == {
        "split": "test",
        "n_users": 3,
        "mask_consumed": False,
        "metrics": report.metrics,
    }


def test_cut_off_beyond_the_rankable_items() -> None:
    """k = 5 while user 1 has only items 4 5 6 left: masked items never count."""
    report = evaluate(fixed_scorer, tiny(), history=3, cfg=EvalConfig(ks=(5, 8)))
    # User 1 hits at 1, user 2 at 2 (ranking 1 2 3 4 6), user 4 at 3 and 4 (1 2 3 4 5).
    assert report.metrics["hr@5"] == pytest.approx(1.0)
    assert report.metrics["precision@5"] == pytest.approx((1 / 5 + 1 / 5 + 2 / 5) / 3)
    assert report.metrics["coverage@5"] == pytest.approx(6 / 6)
    assert report.metrics["precision@8"] == pytest.approx((1 / 8 + 1 / 8 + 2 / 8) / 3)
    assert report.metrics["mrr@8"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


# ---- random data against a slow per-user reference ---------------------------------------


def random_log(seed: int) -> PreparedDataset:
    """Users with a train prefix, a few valid and test events (ratio-like), repeats allowed."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 25
    lengths = rng.integers(1, 20, n_users)
    user = np.repeat(np.arange(1, n_users + 1), lengths)
    pos = np.concatenate([np.arange(n) / n for n in lengths])
    split = np.where(pos < 0.6, TRAIN, np.where(pos < 0.8, VALID, TEST))
    return PreparedDataset.from_arrays(
        user=user,
        item=rng.integers(1, n_items + 1, user.shape[0]),
        timestamp=np.arange(user.shape[0]),
        reward=rng.integers(0, 4, user.shape[0]).astype(np.float32),
        split=split,
        n_users=n_users,
        n_items=n_items,
    )


def reference(
    ds: PreparedDataset, table: np.ndarray, *, split: int, history: int, k: int, mask: bool
) -> dict[str, float]:
    """Per-user loop: state, targets and ranking by the definitions, one user at a time."""
    sums: dict[str, float] = dict.fromkeys(("hr", "recall", "precision", "ndcg", "mrr", "map"), 0)
    n_users, hit_rewards, recommended = 0, [], set()
    for u in range(1, ds.n_users + 1):
        lo, hi = int(ds.user_offsets[u]), int(ds.user_offsets[u + 1])
        in_split = [p for p in range(lo, hi) if ds.split[p] == split]
        if not in_split:
            continue
        n_users += 1
        first = in_split[0]
        hist = [int(ds.item[p]) for p in range(max(lo, first - history), first)]
        hist = [0] * (history - len(hist)) + hist
        targets: dict[int, float] = {}
        for p in in_split:
            it = int(ds.item[p])
            targets[it] = max(targets.get(it, -math.inf), float(ds.reward[p]))
        consumed = {int(ds.item[p]) for p in range(lo, first)}
        scores = table[u] + 0.1 * np.bincount(hist, minlength=table.shape[1])
        ranked = [
            i
            for i in np.argsort(-scores, kind="stable").tolist()
            if i != 0 and not (mask and i in consumed and i not in targets)
        ][:k]
        recommended.update(ranked)
        rel = [1 if i in targets else 0 for i in ranked] + [0] * (k - len(ranked))
        nt = len(targets)
        hits = sum(rel)
        sums["hr"] += hits > 0
        sums["recall"] += hits / nt
        sums["precision"] += hits / k
        dcg = sum(r / math.log2(j + 2) for j, r in enumerate(rel))
        sums["ndcg"] += dcg / sum(1 / math.log2(j + 2) for j in range(min(nt, k)))
        sums["mrr"] += next((1 / (j + 1) for j, r in enumerate(rel) if r), 0.0)
        ap = sum(sum(rel[: j + 1]) / (j + 1) for j, r in enumerate(rel) if r)
        sums["map"] += ap / min(nt, k)
        hit_rewards += [targets[i] for i in ranked if i in targets]
    out = {f"{name}@{k}": v / n_users for name, v in sums.items()}
    out[f"coverage@{k}"] = len(recommended) / ds.n_items
    out[f"hit_reward@{k}"] = sum(hit_rewards) / len(hit_rewards) if hit_rewards else 0.0
    return out


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("split", ["valid", "test"])
@pytest.mark.parametrize("history", [1, 4])
def test_matches_per_user_reference(mask: bool, split: str, history: int) -> None:
    ds = random_log(history + 3 * mask)
    rng = np.random.default_rng(1)
    # Distinct random scores per (user, item); the history adds a tie-free nudge so that the
    # scorer's use of its inputs is checked too.
    table = rng.permutation((ds.n_users + 1) * (ds.n_items + 1)).reshape(ds.n_users + 1, -1)
    table = table.astype(np.float64) / table.size

    def scorer(user: Tensor, hist: Tensor, hist_r: Tensor) -> Tensor:
        counts = torch.zeros(user.shape[0], ds.n_items + 1, dtype=torch.float64)
        counts.scatter_add_(1, hist, torch.ones_like(hist, dtype=torch.float64))
        return torch.from_numpy(table)[user] + 0.1 * counts

    cfg = EvalConfig(ks=(3, 10), mask_consumed=mask, batch_size=7)
    got = evaluate(scorer, ds, split=split, history=history, cfg=cfg).metrics
    for k in (3, 10):
        want = reference(ds, table, split=split_code(split), history=history, k=k, mask=mask)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key


def test_batch_size_does_not_change_the_result() -> None:
    ds = random_log(5)
    users = build_eval_users(ds, split="test", history=3)
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(ds.n_users + 1, ds.n_items + 1, generator=gen)

    def scorer(user: Tensor, hist: Tensor, hist_r: Tensor) -> Tensor:
        return table[user]

    a = evaluate_users(scorer, users, cfg=EvalConfig(batch_size=1))
    b = evaluate_users(scorer, users, cfg=EvalConfig(batch_size=1000))
    assert a.metrics == b.metrics
    # A cell budget below two users' score tables scores one user at a time, same result.
    small = EvalConfig(batch_size=1000, max_batch_cells=2 * (ds.n_items + 1) - 1)
    assert small.users_per_batch(ds.n_items) == 1
    assert evaluate_users(scorer, users, cfg=small).metrics == b.metrics
    assert EvalConfig(max_batch_cells=10).users_per_batch(1_000_000) == 1
    assert EvalConfig(max_batch_cells=32_000_000).users_per_batch(999_999) == 32
    assert EvalConfig(batch_size=7).users_per_batch(10) == 7
    assert list(a.metrics)[:8] == [
        "hr@5",
        "recall@5",
        "precision@5",
        "ndcg@5",
        "mrr@5",
        "map@5",
        "coverage@5",
        "hit_reward@5",
    ]


def test_errors() -> None:
    with pytest.raises(ConfigError, match="unknown split 'tset'"):
        split_code("tset")
    with pytest.raises(ConfigError, match=r"eval\.ks"):
        EvalConfig(ks=(0, 5))
    with pytest.raises(ConfigError, match=r"eval\.batch_size"):
        EvalConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"eval\.max_batch_cells"):
        EvalConfig(max_batch_cells=0)
    no_valid = PreparedDataset.from_arrays(
        user=np.array([1, 1]), item=np.array([1, 2]), timestamp=np.array([0, 1])
    )
    with pytest.raises(DataError, match="no user has an event in the valid split"):
        evaluate(fixed_scorer, no_valid, split="valid", history=2)
    with pytest.raises(ValueError, match=r"scorer returned shape \(3, 3\), expected \(3, 7\)"):
        evaluate(lambda u, h, r: torch.zeros(u.shape[0], 3), tiny(), history=2)


def test_infinite_target_scores_are_hits_and_nan_is_refused() -> None:
    """+inf is a real (best) score — only -inf means masked — and NaN cannot be ranked."""
    ds = random_log(3)
    users = build_eval_users(ds, split="test", history=2)
    targets = torch.from_numpy(users.target_items[users.target_offsets[:-1]].astype(np.int64))

    def oracle(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        scores = torch.zeros(user.shape[0], ds.n_items + 1)
        rows = torch.searchsorted(torch.from_numpy(users.user), user)
        scores[torch.arange(user.shape[0]), targets[rows]] = float("inf")
        return scores

    report = evaluate_users(oracle, users, cfg=EvalConfig(ks=(1,), mask_consumed=False))
    assert report.metrics["hr@1"] == 1.0

    def nan(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return torch.full((user.shape[0], ds.n_items + 1), float("nan"))

    with pytest.raises(ValueError, match="NaN"):
        evaluate_users(nan, users, cfg=EvalConfig(ks=(1,)))


class FactoredScorer:
    """Integer user and item vectors (exact arithmetic, many ties), scored whole or factored."""

    def __init__(self, n_users: int, n_items: int, *, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.users = torch.randint(-2, 3, (n_users + 1, 3), generator=gen).float()
        self.items = torch.randint(-2, 3, (n_items + 1, 3), generator=gen).float()
        self.bias = torch.randint(0, 2, (n_items + 1,), generator=gen).float()
        self.poison = False

    def queries(self, user: Tensor, history: Tensor) -> Tensor:
        q = self.users[user] + self.items[history].sum(1)
        return q * float("nan") if self.poison else q

    def __call__(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return self.queries(user, history) @ self.items.T + self.bias

    def inner_product(self, user: Tensor, history: Tensor, history_reward: Tensor) -> InnerProduct:
        return InnerProduct(queries=self.queries(user, history), items=self.items, bias=self.bias)


@pytest.mark.parametrize("mask", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_item_chunks_give_the_same_metrics(mask: bool, seed: int) -> None:
    """A scorer with ``inner_product`` is ranked in item chunks: the same metrics, per user,
    as the full table (targets stay rankable under masking; ties go to the same items)."""
    ds = random_log(seed)
    users = build_eval_users(ds, split="test", history=3)
    scorer = FactoredScorer(ds.n_users, ds.n_items, seed=seed)
    whole = evaluate_users(
        scorer.__call__, users, cfg=EvalConfig(ks=(1, 5, 10), mask_consumed=mask)
    )
    cfg = EvalConfig(ks=(1, 5, 10), mask_consumed=mask, item_chunk=8, batch_size=16)
    assert cfg.users_per_chunked_batch() == 16
    chunked = evaluate_users(scorer, users, cfg=cfg)
    assert chunked.metrics == whole.metrics
    for key, values in whole.per_user.items():
        assert np.array_equal(chunked.per_user[key], values), key
    scorer.poison = True
    with pytest.raises(ValueError, match="NaN"):
        evaluate_users(scorer, users, cfg=cfg)
