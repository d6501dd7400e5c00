"""The transition sampler against a slow per-row reference on random sequences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from recloop.data.batch import PAD_ID, TransitionBatch
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.data.sampler import TransitionSampler, gather_windows
from recloop.errors import ConfigError


def random_dataset(
    seed: int, *, n_users: int = 40, shared_sessions: bool = False
) -> PreparedDataset:
    """Users with 0..14 events, random session breaks and splits in any order.

    ``returns`` holds the row number, so every transition names its own row.  With
    ``shared_sessions`` all users share session 0, so only the user boundary ends a sequence.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 15, n_users)
    lengths[0] = 0  # an empty user at the front
    user = np.repeat(np.arange(1, n_users + 1), lengths)
    e = user.shape[0]
    new_session = rng.random(e) < 0.3
    new_session[np.r_[0, np.cumsum(lengths)[:-1]][lengths > 0]] = True
    session = np.zeros(e, np.int32) if shared_sessions else np.cumsum(new_session) - 1
    return PreparedDataset.from_arrays(
        user=user,
        item=rng.integers(1, 30, e),
        timestamp=np.arange(e),
        reward=rng.integers(1, 4, e).astype(np.float32),
        returns=np.arange(e, dtype=np.float32),
        session=session,
        split=rng.choice([TRAIN, TRAIN, TRAIN, VALID, TEST], e),
        n_users=n_users,
        n_items=30,
    )


def reference(ds: PreparedDataset, history: int, splits: tuple[int, ...]) -> dict[int, dict]:
    """Transitions by event row, built one row at a time with plain Python."""
    out: dict[int, dict] = {}
    for u in range(1, ds.n_users + 1):
        lo, hi = int(ds.user_offsets[u]), int(ds.user_offsets[u + 1])
        for p in range(lo, hi):
            if int(ds.split[p]) not in splits:
                continue
            past = list(range(max(lo, p - history), p))
            pad = history - len(past)
            hist = [PAD_ID] * pad + [int(ds.item[q]) for q in past]
            hist_r = [0.0] * pad + [float(ds.reward[q]) for q in past]
            # Terminal only inside one user's split; the end of the user's events or of
            # the split is a truncation.
            done = (
                p + 1 < hi and ds.split[p + 1] == ds.split[p] and ds.session[p + 1] != ds.session[p]
            )
            out[p] = {
                "user": u,
                "history": hist,
                "history_reward": hist_r,
                "action": int(ds.item[p]),
                "reward": float(ds.reward[p]),
                "returns": float(ds.returns[p]),
                "next_history": [*hist[1:], int(ds.item[p])],
                "next_history_reward": [*hist_r[1:], float(ds.reward[p])],
                "done": bool(done),
            }
    return out


def rows_of(batch: TransitionBatch) -> list[int]:
    return [int(r) for r in batch.returns.tolist()]


def as_dicts(batch: TransitionBatch) -> list[dict]:
    fields = (
        "user",
        "history",
        "history_reward",
        "action",
        "reward",
        "returns",
        "next_history",
        "next_history_reward",
        "done",
    )
    cols = {f: getattr(batch, f).tolist() for f in fields}
    return [{f: cols[f][i] for f in fields} for i in range(len(batch))]


SPLITS = [(TRAIN,), (TRAIN, VALID), (VALID, TEST), (TEST,), (TRAIN, VALID, TEST)]


@pytest.mark.parametrize("history", [1, 3, 10, 40])
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("shared_sessions", [False, True])
def test_epoch_matches_reference(
    history: int, splits: tuple[int, ...], shared_sessions: bool
) -> None:
    ds = random_dataset(history * 7 + len(splits), shared_sessions=shared_sessions)
    ref = reference(ds, history, splits)
    sampler = TransitionSampler(ds, history=history, batch_size=16, splits=splits, seed=3)
    assert sampler.n_transitions == len(ref)
    got: dict[int, dict] = {}
    for batch in sampler:
        for row, d in zip(rows_of(batch), as_dicts(batch), strict=True):
            assert row not in got
            got[row] = d
    assert got.keys() == ref.keys()
    for row, want in ref.items():
        assert got[row] == want, f"row {row}"


def test_batch_of_explicit_rows_in_order() -> None:
    ds = random_dataset(11)
    ref = reference(ds, 4, (TRAIN, VALID, TEST))
    sampler = TransitionSampler(ds, history=4, batch_size=8, splits=(TRAIN, VALID, TEST))
    rows = np.array([5, 0, ds.n_events - 1, 17, 5])
    batch = sampler.batch(rows)
    assert as_dicts(batch) == [ref[int(r)] for r in rows]


def test_tensor_types_and_shapes() -> None:
    ds = random_dataset(1)
    batch = next(iter(TransitionSampler(ds, history=6, batch_size=32)))
    assert len(batch) == 32
    for name in ("user", "action", "history", "next_history"):
        assert getattr(batch, name).dtype == torch.int64
    for name in ("reward", "returns", "history_reward", "next_history_reward"):
        assert getattr(batch, name).dtype == torch.float32
    assert batch.done.dtype == torch.bool
    assert batch.history.shape == batch.next_history.shape == (32, 6)
    assert batch.history_reward.shape == batch.next_history_reward.shape == (32, 6)
    assert batch.history.is_contiguous() and batch.next_history.is_contiguous()


def test_each_epoch_covers_every_transition_once_in_a_new_order() -> None:
    ds = random_dataset(2, n_users=80)
    sampler = TransitionSampler(ds, history=5, batch_size=10, splits=(TRAIN,), seed=7)
    want = np.flatnonzero(ds.split == TRAIN).tolist()
    orders = []
    for _ in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler) == -(-len(want) // 10)
        order = [r for b in batches for r in rows_of(b)]
        assert sorted(order) == want
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]


def test_no_shuffle_visits_rows_in_order() -> None:
    ds = random_dataset(3)
    sampler = TransitionSampler(ds, history=2, batch_size=7, splits=(VALID, TEST), shuffle=False)
    order = [r for b in sampler for r in rows_of(b)]
    assert order == np.flatnonzero(ds.split != TRAIN).tolist()


def test_drop_last() -> None:
    ds = random_dataset(4)
    n = int((ds.split == TRAIN).sum())
    sampler = TransitionSampler(ds, history=3, batch_size=6, drop_last=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == n // 6
    assert all(len(b) == 6 for b in batches)
    rows = [r for b in batches for r in rows_of(b)]
    assert len(set(rows)) == len(rows) == (n // 6) * 6


def test_deterministic_by_seed_and_epoch() -> None:
    ds = random_dataset(5)

    def epoch_rows(seed: int, epoch: int) -> list[int]:
        s = TransitionSampler(ds, history=3, batch_size=9, seed=seed)
        s.set_epoch(epoch)
        return [r for b in s for r in rows_of(b)]

    assert epoch_rows(0, 0) == epoch_rows(0, 0)
    assert epoch_rows(0, 1) == epoch_rows(1, 0)  # epoch e uses seed + e
    assert epoch_rows(0, 0) != epoch_rows(0, 1)
    # Iterating advances the epoch; set_epoch replays one.
    s = TransitionSampler(ds, history=3, batch_size=9, seed=0)
    first = [r for b in s for r in rows_of(b)]
    second = [r for b in s for r in rows_of(b)]
    assert s.epoch == 2
    assert (first, second) == (epoch_rows(0, 0), epoch_rows(0, 1))


def test_dataloader_single_process() -> None:
    """The sampler is an IterableDataset of whole batches: DataLoader(batch_size=None)."""
    ds = random_dataset(6)
    want = [rows_of(b) for b in TransitionSampler(ds, history=4, batch_size=8, seed=2)]
    loader = DataLoader(TransitionSampler(ds, history=4, batch_size=8, seed=2), batch_size=None)
    got = [rows_of(b) for b in loader]
    assert got == want
    assert len(loader) == len(want)


def test_dataloader_workers_split_batches_in_order() -> None:
    ds = random_dataset(7, n_users=60)
    direct = TransitionSampler(ds, history=4, batch_size=8, seed=2)
    want = [[rows_of(b) for b in direct] for _ in range(2)]
    sampler = TransitionSampler(ds, history=4, batch_size=8, seed=2)
    loader = DataLoader(sampler, batch_size=None, num_workers=2)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        got = [rows_of(b) for b in loader]
        assert got == want[epoch]


def test_gather_windows_pads_before_user_start() -> None:
    item = np.array([7, 8, 9, 4, 5], np.int32)
    reward = np.array([1, 2, 3, 4, 5], np.float32)
    w = gather_windows(
        item, reward, end=np.array([3, 5, 0, 4]), start=np.array([0, 3, 0, 3]), length=3
    )
    assert w.item.tolist() == [[7, 8, 9], [0, 4, 5], [0, 0, 0], [0, 0, 4]]
    assert w.reward.tolist() == [[1, 2, 3], [0, 4, 5], [0, 0, 0], [0, 0, 4]]
    # An empty window at the very end (a user without events last in the offsets).
    w = gather_windows(item, reward, end=np.array([5]), start=np.array([5]), length=2)
    assert w.item.tolist() == [[0, 0]] and w.reward.tolist() == [[0, 0]]
    w = gather_windows(item[:0], reward[:0], end=np.array([0]), start=np.array([0]), length=2)
    assert w.item.tolist() == [[0, 0]] and w.item.dtype == np.int32


@pytest.mark.parametrize("layout", ["contiguous", "read-only", "strided"])
def test_gather_windows_matches_a_loop(layout: str) -> None:
    """Random windows, including empty ones, ones past row 0 and ones longer than the data."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        e, length = int(rng.integers(0, 40)), int(rng.integers(1, 12))
        item = rng.integers(1, 9, 2 * e).astype(np.int32)
        reward = rng.random(2 * e).astype(np.float32)
        item, reward = (item[::2], reward[::2]) if layout == "strided" else (item[:e], reward[:e])
        if layout == "read-only":
            item.flags.writeable = reward.flags.writeable = False
        end = rng.integers(0, e + 1, 20)
        start = (rng.random(20) * (end + 1)).astype(np.int64)
        w = gather_windows(item, reward, end=end, start=start, length=length)
        assert w.item.dtype == np.int32 and w.reward.dtype == np.float32
        for i in range(20):
            rows = range(int(end[i]) - length, int(end[i]))
            assert w.item[i].tolist() == [int(item[r]) if r >= start[i] else 0 for r in rows]
            assert w.reward[i].tolist() == [float(reward[r]) if r >= start[i] else 0 for r in rows]


def test_done_bit_survives_packing() -> None:
    ds = random_dataset(8)
    s = TransitionSampler(ds, history=2, batch_size=4, splits=(TRAIN, TEST))
    part = s.unpack(s.packed_rows())
    assert part.rows.tolist() == np.flatnonzero(ds.split != VALID).tolist()
    assert part.done.tolist() == s.done(part.rows).tolist()
    assert part.done.any() and not part.done.all()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"history": 0}, "history"), ({"batch_size": 0}, "batch_size"), ({"splits": (3,)}, "splits")],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    args = {"history": 2, "batch_size": 4, **kwargs}
    with pytest.raises(ConfigError, match=field):
        TransitionSampler(random_dataset(0), **args)


def test_empty_selection_yields_nothing() -> None:
    ds = random_dataset(9)
    ds = PreparedDataset.from_arrays(
        user=ds.user, item=ds.item, timestamp=ds.timestamp, n_users=ds.n_users, n_items=30
    )
    s = TransitionSampler(ds, history=2, batch_size=4, splits=(TEST,))
    assert s.n_transitions == 0 and len(s) == 0
    assert list(s) == []


def with_propensity(ds: PreparedDataset, seed: int) -> tuple[PreparedDataset, np.ndarray]:
    """``ds`` with a logged ``propensity`` column (float64 in (0, 1], as prepare keeps it)."""
    prop = np.random.default_rng(seed).uniform(0.01, 1.0, ds.n_events)
    return dataclasses.replace(ds, extra={**ds.extra, "propensity": prop}), prop


@pytest.mark.parametrize("splits", [(TRAIN,), (VALID, TEST)])
def test_propensity_is_the_logged_value_of_each_transitions_row(splits: tuple[int, ...]) -> None:
    ds, prop = with_propensity(random_dataset(5), seed=1)
    sampler = TransitionSampler(ds, history=3, batch_size=8, splits=splits, seed=2)
    seen = 0
    for batch in sampler:
        assert batch.propensity is not None
        assert batch.propensity.dtype == torch.float32 and batch.propensity.shape == (len(batch),)
        rows = np.array(rows_of(batch))  # ``returns`` holds the row number
        np.testing.assert_array_equal(batch.propensity.numpy(), prop[rows].astype(np.float32))
        seen += len(batch)
    assert seen == sampler.n_transitions
    explicit = sampler.batch(np.array([7, 2, 7]))
    assert explicit.propensity is not None
    np.testing.assert_array_equal(explicit.propensity.numpy(), prop[[7, 2, 7]].astype(np.float32))


def test_no_propensity_column_gives_none_and_to_keeps_it() -> None:
    batch = next(iter(TransitionSampler(random_dataset(5), history=3, batch_size=8)))
    assert batch.propensity is None
    moved = batch.to("cpu")
    assert moved.propensity is None
    torch.testing.assert_close(moved.action, batch.action)
    ds, _ = with_propensity(random_dataset(5), seed=1)
    batch = next(iter(TransitionSampler(ds, history=3, batch_size=8)))
    moved = batch.to("cpu")
    assert moved.propensity is not None and batch.propensity is not None
    torch.testing.assert_close(moved.propensity, batch.propensity)
