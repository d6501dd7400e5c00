"""Nothing from valid/test reaches training or ranking: the checks every later change must pass.

Two families:

- **No information from the future.**  Changing any valid or test event (its item, reward or
  time) changes no training tensor — not the id maps, the sessions, the returns or the
  ``done`` flags — so training on the two datasets gives bit-identical weights.
- **No ranking by id order.**  A scorer that knows nothing (constant scores) scores the
  analytic random level of every metric, on MovieLens-100K and on a synthetic log whose test
  items never occur in training (where a lowest-index tie-break would find them all).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recloop.algos import ALGOS
from recloop.data.dataset import TRAIN, PreparedDataset
from recloop.data.loaders import load_raw
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.sampler import TransitionSampler
from recloop.data.schema import RawData
from recloop.data.splits import SplitConfig
from recloop.evaluation.protocol import EvalConfig, build_eval_users, evaluate_users
from recloop.training.fit import FitConfig

K = 10
BEHAVIORS = np.array(["pv", "cart", "fav", "buy"])


def _log(seed: int = 0, n_users: int = 40, per_user: int = 12) -> pl.DataFrame:
    """Behaviour log with pauses around the session gap; the last two events of each user
    are the held-out ones under leave-one-out."""
    rng = np.random.default_rng(seed)
    e = n_users * per_user
    gaps = rng.choice([30, 600, 3000, 5000, 20000], size=e)
    t = np.cumsum(gaps.reshape(n_users, per_user), axis=1).ravel()
    return pl.DataFrame(
        {
            "user": np.repeat(np.arange(n_users) * 7 + 3, per_user),
            "item": rng.integers(0, 50, e) * 10,
            "timestamp": t,
            "behavior": BEHAVIORS[rng.choice(4, e, p=[0.6, 0.15, 0.1, 0.15])],
        }
    )


def _change_held_out(log: pl.DataFrame, seed: int, per_user: int = 12) -> pl.DataFrame:
    """The same log with the last two events of every user (valid, test) changed: another
    item (one that occurs in training, so the catalogue stays), another behaviour, another
    time after the user's last training event."""
    rng = np.random.default_rng(seed)
    n = log.height
    pos = np.arange(n) % per_user
    held = pos >= per_user - 2
    train_items = np.unique(log["item"].to_numpy()[~held])
    item = log["item"].to_numpy().copy()
    item[held] = rng.choice(train_items, int(held.sum()))
    behavior = log["behavior"].to_numpy().copy()
    behavior[held] = BEHAVIORS[rng.integers(0, 4, int(held.sum()))]
    t = log["timestamp"].to_numpy().copy()
    last_train = t[pos == per_user - 3]
    t[pos == per_user - 2] = last_train + rng.integers(1, 8000, last_train.shape[0])
    t[pos == per_user - 1] = t[pos == per_user - 2] + rng.integers(1, 8000, last_train.shape[0])
    return log.with_columns(
        pl.Series("item", item), pl.Series("behavior", behavior), pl.Series("timestamp", t)
    )


def _prepare(log: pl.DataFrame) -> PreparedDataset:
    return prepare(RawData(events=log), PrepareConfig(split=SplitConfig(mode="loo")))


def _train_view(ds: PreparedDataset) -> dict[str, np.ndarray]:
    """Every per-event array of the training rows, and the sampler's done flags."""
    rows = np.flatnonzero(ds.split == TRAIN)
    sampler = TransitionSampler(ds, history=4, batch_size=64, shuffle=False)
    return {
        "rows": rows,
        "user": ds.user[rows],
        "item": ds.item[rows],
        "timestamp": ds.timestamp[rows],
        "reward": ds.reward[rows],
        "returns": ds.returns[rows],
        "done": sampler.done(rows),
    }


@pytest.fixture(scope="module")
def twin_datasets() -> tuple[PreparedDataset, PreparedDataset]:
    log = _log()
    return _prepare(log), _prepare(_change_held_out(log, seed=1))


def test_held_out_changes_leave_every_training_array(
    twin_datasets: tuple[PreparedDataset, PreparedDataset],
) -> None:
    a, b = twin_datasets
    assert not np.array_equal(a.item[a.split != TRAIN], b.item[b.split != TRAIN])
    assert not np.array_equal(a.reward[a.split != TRAIN], b.reward[b.split != TRAIN])
    assert a.item_ids == b.item_ids and a.user_ids == b.user_ids
    va, vb = _train_view(a), _train_view(b)
    for name in va:
        np.testing.assert_array_equal(va[name], vb[name], err_msg=name)
    # the time changes did cross the session gap somewhere, so the check has teeth
    held = a.split != TRAIN
    assert not np.array_equal(a.timestamp[held], b.timestamp[held])


def test_returns_and_sessions_stop_at_the_split(
    twin_datasets: tuple[PreparedDataset, PreparedDataset],
) -> None:
    ds = twin_datasets[0]
    change = np.flatnonzero(ds.split[1:] != ds.split[:-1]) + 1
    same_user = ds.user[change] == ds.user[change - 1]
    at = change[same_user]
    assert at.shape[0] > 0
    assert (ds.session[at] != ds.session[at - 1]).all()
    # a training row's return is built from training rewards only; at the boundary it is
    # the row's own reward
    last_train = at - 1
    np.testing.assert_array_equal(ds.returns[last_train], ds.reward[last_train])
    # the boundary is a truncation, never a terminal
    sampler = TransitionSampler(ds, history=4, batch_size=64)
    assert not sampler.done(last_train).any()


def test_id_maps_rank_by_training_counts_only() -> None:
    # item 5 is the most frequent overall, but only through held-out events
    log = pl.DataFrame(
        {
            "user": [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3],
            "item": [7, 9, 5, 5, 7, 9, 5, 5, 7, 8, 5, 5],
            "timestamp": [1, 2, 3, 4] * 3,
        }
    )
    ds = _prepare(log)
    assert ds.item_ids == ["7", "9", "8", "5"]


@pytest.mark.parametrize("algo", ["reinforce", "dqn"])
def test_training_on_twin_datasets_gives_identical_weights(
    twin_datasets: tuple[PreparedDataset, PreparedDataset], algo: str
) -> None:
    fit = FitConfig(epochs=2, eval_every=0, patience=None, restore_best=False, final_eval=False)
    states = []
    for ds in twin_datasets:
        cfg = ALGOS.get(algo).config_class(batch_size=32, seed=3)
        rec = cfg.create()
        rec.fit(ds, fit=fit)
        assert rec.algo is not None
        states.append(
            {
                f"{net}.{k}": v.clone()
                for net, module in rec.algo.networks().items()
                for k, v in module.state_dict().items()
            }
        )
    assert states[0].keys() == states[1].keys()
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name


# --- a scorer that knows nothing scores the random level -------------------------------------


def _constant(user: torch.Tensor, history: torch.Tensor, reward: torch.Tensor, n: int):
    return torch.zeros(user.shape[0], n + 1)


def _random_level(ds: PreparedDataset, *, split: str, mask: bool) -> dict[str, np.ndarray]:
    """Per-user hit probability and expected NDCG of a uniformly random ranking of each
    user's candidates (all N items, or those left after masking; the targets always stay).

    Leave-one-out has one target per user, so with c candidates the target's rank is
    uniform on 1..c: P(hit@K) = K / c and E[NDCG@K] = (1 / c) * sum_{r <= K} 1 / log2(r + 1).
    """
    users = build_eval_users(ds, split=split, history=1)
    assert (users.n_targets == 1).all()
    n = ds.n_items
    if mask:
        consumed = np.zeros(len(users), np.int64)
        for i in range(len(users)):  # test helper: clarity over speed
            c = set(users.consumed_items[users.consumed_offsets[i] : users.consumed_offsets[i + 1]])
            t = set(users.target_items[users.target_offsets[i] : users.target_offsets[i + 1]])
            consumed[i] = len(c - t)
        cands = n - consumed
    else:
        cands = np.full(len(users), n)
    gain = sum(1 / math.log2(r + 1) for r in range(1, K + 1))
    return {"hr": np.minimum(K / cands, 1.0), "ndcg": gain / cands}


def _check_random_level(ds: PreparedDataset, *, mask: bool) -> None:
    n = ds.n_items
    users = build_eval_users(ds, split="test", history=4)
    report = evaluate_users(
        lambda u, h, r: _constant(u, h, r, n), users, cfg=EvalConfig(ks=(K,), mask_consumed=mask)
    )
    level = _random_level(ds, split="test", mask=mask)
    p = level["hr"]
    se = math.sqrt(float((p * (1 - p)).sum())) / p.shape[0]
    assert abs(report.metrics[f"hr@{K}"] - p.mean()) < 4 * se, (report.metrics, p.mean(), se)
    # NDCG of one hit is at most 1, so its standard error is at most the hit's
    assert abs(report.metrics[f"ndcg@{K}"] - level["ndcg"].mean()) < 4 * se


@pytest.mark.parametrize("mask", [True, False])
def test_constant_scorer_is_random_on_movielens(ml100k_dir: Path, mask: bool) -> None:
    ds = prepare(load_raw("recbole", ml100k_dir), PrepareConfig(split=SplitConfig(mode="loo")))
    _check_random_level(ds, mask=mask)


@pytest.mark.parametrize("mask", [True, False])
def test_constant_scorer_is_random_when_test_items_are_new(mask: bool) -> None:
    """Test and valid items never occur in training, and they are the most frequent items
    overall.  Ranked by all events they would get the first indices and a tie-break by
    index would find every one (HR@10 = 1.0 for a scorer that knows nothing); ranked by
    training events they get the last, and an index tie-break would never find them."""
    rng = np.random.default_rng(5)
    n_users, per_user = 400, 8
    item = rng.integers(0, 100, (n_users, per_user))
    item[:, -2:] = rng.integers(1000, 1005, (n_users, 2))  # held-out only
    log = pl.DataFrame(
        {
            "user": np.repeat(np.arange(n_users), per_user),
            "item": item.ravel(),
            "timestamp": np.tile(np.arange(per_user), n_users),
        }
    )
    ds = _prepare(log)
    assert set(ds.item_ids[-5:]) == {str(i) for i in range(1000, 1005)}
    _check_random_level(ds, mask=mask)


def test_dssm_pretraining_ignores_held_out_events() -> None:
    """Validation events are drawn from their own random stream: the trained embeddings of
    the twins agree bit for bit (the validation scores may differ, as they should)."""
    from recloop.embeddings.dssm import DSSMConfig, pretrain_dssm

    cfg = DSSMConfig(embedding_dim=8, id_dim=8, epochs=2, batch_size=64)
    # A global time cut at fixed times, and the second log lacks one validation event: a
    # shared random stream would shift every training draw after the validation negatives.
    log = _log()
    t = log["timestamp"].to_numpy()
    valid_start, test_start = int(np.quantile(t, 0.8)), int(np.quantile(t, 0.9))
    in_valid = np.flatnonzero((t >= valid_start) & (t < test_start))
    fewer = log.filter(pl.int_range(pl.len()) != int(in_valid[0]))
    split = SplitConfig(mode="time", valid_start=valid_start, test_start=test_start)
    twins = [prepare(RawData(events=x), PrepareConfig(split=split)) for x in (log, fewer)]
    assert twins[0].split_counts()["valid"] == twins[1].split_counts()["valid"] + 1
    assert twins[0].item_ids == twins[1].item_ids
    # bit for bit needs one torch thread, which the test suite's conftest sets
    a, b = (pretrain_dssm(ds, cfg, progress=False) for ds in twins)
    np.testing.assert_array_equal(a.item_embeddings, b.item_embeddings)
    np.testing.assert_array_equal(a.user_embeddings, b.user_embeddings)
