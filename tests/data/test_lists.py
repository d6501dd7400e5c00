"""Served lists: their runs, returns counted in lists, and the sampler's list states."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import polars as pl
import pytest

from recloop.data.batch import PAD_ID
from recloop.data.dataset import NO_TARGET, TEST, TRAIN, VALID, PreparedDataset
from recloop.data.lists import list_first, list_returns, list_starts, list_states
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.sampler import TransitionSampler
from recloop.data.schema import RawData
from recloop.data.sessions import discounted_returns
from recloop.data.splits import SplitConfig
from recloop.errors import ConfigError, DataError
from recloop.loop.gate import rewarded_training
from recloop.training.fit import FitConfig, training_states


def test_two_lists_in_one_second_split_where_the_positions_start_again() -> None:
    # 0 1 2 | 1 2: the second list lost its first row
    starts = list_starts(np.ones(5), np.full(5, 7), np.array([0, 1, 2, 1, 2]))
    assert starts.tolist() == [True, False, False, True, False]


def test_lists_run_from_position_zero_or_a_change_of_user_or_time() -> None:
    user = np.array([1, 1, 1, 1, 1, 2, 2, 2])
    ts = np.array([5, 5, 5, 5, 9, 9, 9, 9])
    # user 1: a list of 2, a list of 2 in the same second, a list whose first row was
    # dropped (position 1 at a new time); user 2: a list that starts at position 1
    pos = np.array([0, 1, 0, 1, 1, 1, 2, 0])
    starts = list_starts(user, ts, pos)
    assert starts.tolist() == [True, False, True, False, True, True, False, True]
    first = list_first(starts, np.arange(8))
    assert first.tolist() == [0, 0, 2, 2, 4, 5, 5, 7]


def test_a_slots_return_skips_the_slots_beside_it_and_discounts_by_lists() -> None:
    reward = np.array([1, 0, 1, 0, 1, 1], np.float32)
    lists = np.array([1, 0, 0, 1, 0, 1], bool)  # lists of 3, 2, 1
    one_session = np.array([1, 0, 0, 0, 0, 0], bool)
    g = list_returns(reward, session_starts=one_session, starts=lists, gamma=0.5)
    # G(list 3) = 1, G(list 2) = 1 + 0.5, G(list 1) = 2 + 0.5 * 1.5
    np.testing.assert_allclose(g, [1.75, 0.75, 1.75, 0.5, 1.5, 1.0])
    broken = np.array([1, 0, 0, 0, 0, 1], bool)  # the last list opens a new session
    g = list_returns(reward, session_starts=broken, starts=lists, gamma=0.5)
    np.testing.assert_allclose(g, [1.5, 0.5, 1.5, 0.0, 1.0, 1.0])


def test_lists_of_one_give_the_rows_returns() -> None:
    rng = np.random.default_rng(0)
    reward = rng.random(300).astype(np.float32)
    sessions = rng.random(300) < 0.1
    sessions[0] = True
    g = list_returns(reward, session_starts=sessions, starts=np.ones(300, bool), gamma=0.9)
    np.testing.assert_allclose(g, discounted_returns(reward, sessions, 0.9), rtol=1e-5)


def test_prepare_counts_returns_in_lists_where_the_impressions_come_in_lists() -> None:
    events = pl.DataFrame(
        {
            "user": [1, 1, 1, 1, 1],
            "item": [5, 6, 7, 8, 9],
            "timestamp": [10, 10, 10, 20, 20],
            "behavior": ["buy", "pv", "buy", "pv", "buy"],
            "position": [0, 1, 2, 0, 1],
            "list_length": [3, 3, 3, 2, 2],
        }
    )
    cfg = PrepareConfig(gamma=0.5, split=SplitConfig(min_user_events=10))  # one split
    ds = prepare(RawData(events=events), cfg)
    assert ds.session.tolist() == [0] * 5
    r = ds.reward.astype(np.float64)
    second = r[3] + r[4]
    want = [r[0] + 0.5 * second, r[1] + 0.5 * second, r[2] + 0.5 * second, r[3], r[4]]
    np.testing.assert_allclose(ds.returns, want, rtol=1e-6)
    # without positions every row is a step
    rows = prepare(RawData(events=events.drop("position", "list_length")), cfg)
    np.testing.assert_allclose(
        rows.returns, discounted_returns(rows.reward, np.eye(1, 5, 0, bool)[0], 0.5)
    )


def ctx(recent: list[int], rewards: list[float]) -> str:
    return orjson.dumps(
        {"recent": [str(i) for i in recent], "rewards": rewards, "excluded": []}
    ).decode()


def list_dataset(seed: int, *, context_share: float = 0.5, n_users: int = 12) -> PreparedDataset:
    """Users with a few lists of 1-4 items each (positions 0..k-1, one time per list; some
    lists share the second of the list before them, some lost their first row), random
    sessions, time-ordered splits per user (the last list test, the one before valid, and
    some lists' last slot held out as a per-user split cuts them), some training rows no
    target, and a logged context on some lists' first rows (recent ids the dataset knows
    and one it does not, "999")."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, int, int, str, int]] = []
    t = 0
    for u in range(1, n_users + 1):
        m = int(rng.integers(0, 7))
        for n in range(m):
            if n == 0 or rng.random() > 0.2:
                t += 1  # else a second list in the same second
            k = int(rng.integers(1, 5))
            items = rng.choice(np.arange(1, 31), k, replace=False)
            text = ""
            if rng.random() < context_share:
                n_recent = int(rng.integers(0, 8))
                recent = [int(x) for x in rng.integers(1, 31, n_recent)]
                if n_recent:
                    recent.insert(int(rng.integers(0, n_recent)), 999)
                text = ctx(recent, [float(x) for x in rng.integers(0, 3, len(recent))])
            split = TEST if m >= 3 and n == m - 1 else VALID if m >= 3 and n == m - 2 else TRAIN
            straddle = k > 1 and split == TRAIN and rng.random() < 0.2
            dropped = k > 1 and rng.random() < 0.1  # prepare dropped its first row
            for j, it in enumerate(items):
                if j == 0 and dropped:
                    continue
                held = TEST if straddle and j == k - 1 else split
                rows.append((u, int(it), t, j, text if j == 0 else "", held))
    e = len(rows)
    user = np.array([r[0] for r in rows])
    ts = np.array([r[2] for r in rows])
    pos = np.array([r[3] for r in rows])
    split = np.array([r[5] for r in rows])
    # some train and valid rows are no target (train_targets: rewarded keeps them as history)
    split[(split != TEST) & (rng.random(e) < 0.25)] += NO_TARGET
    # sessions: breaks at some list starts
    new_session = (pos == 0) & (rng.random(e) < 0.3)
    session = np.cumsum(new_session | np.r_[True, user[1:] != user[:-1]]) - 1
    ds = PreparedDataset.from_arrays(
        user=user,
        item=np.array([r[1] for r in rows]),
        timestamp=ts,
        reward=rng.integers(0, 3, e).astype(np.float32),
        returns=np.arange(e, dtype=np.float32),  # each transition names its row
        session=session,
        split=split,
        n_users=n_users,
        n_items=30,
        item_ids=[str(i) for i in range(1, 31)],
    )
    return dataclasses.replace(
        ds,
        extra={
            "position": pos.astype(np.int32),
            "served_context": np.array([r[4] for r in rows], dtype=object),
        },
    )


def window(ds: PreparedDataset, lo: int, end: int, history: int) -> tuple[list, list]:
    past = list(range(max(lo, end - history), end))
    pad = history - len(past)
    return (
        [PAD_ID] * pad + [int(ds.item[q]) for q in past],
        [0.0] * pad + [float(ds.reward[q]) for q in past],
    )


def context_state(text: str, history: int) -> tuple[list, list]:
    doc = orjson.loads(text)
    kept = [(int(i), r) for i, r in zip(doc["recent"], doc["rewards"], strict=True) if i != "999"]
    kept = kept[-history:] if history else []
    pad = history - len(kept)
    return [PAD_ID] * pad + [i for i, _ in kept], [0.0] * pad + [float(r) for _, r in kept]


def list_reference(ds: PreparedDataset, history: int, splits: tuple[int, ...]) -> dict[int, dict]:
    """Every transition of ``states="lists"``, one row at a time in plain Python."""
    ctx_col = ds.extra["served_context"]
    pos = ds.extra["position"]
    # a row that is no target (NO_TARGET + its split) belongs to its split's period
    period = [int(c) - NO_TARGET if int(c) >= NO_TARGET else int(c) for c in ds.split]

    def opens(q: int, lo: int) -> bool:  # row q opens a served list
        return (
            q == lo or pos[q] == 0 or ds.timestamp[q] != ds.timestamp[q - 1] or pos[q] <= pos[q - 1]
        )

    out: dict[int, dict] = {}
    for u in range(1, ds.n_users + 1):
        lo, hi = int(ds.user_offsets[u]), int(ds.user_offsets[u + 1])
        for p in range(lo, hi):
            if int(ds.split[p]) not in splits:
                continue
            first = p
            while not opens(first, lo):
                first -= 1
            # the list ends for this slot where the next list opens or the split changes
            end = p + 1
            while end < hi and not opens(end, lo) and period[end] == period[p]:
                end += 1
            if ctx_col[first]:
                hist, hist_r = context_state(ctx_col[first], history)
            else:
                hist, hist_r = window(ds, lo, first, history)
            uses_next = (
                end < hi and opens(end, lo) and period[end] == period[p] and bool(ctx_col[end])
            )
            if uses_next:
                nxt, nxt_r = context_state(ctx_col[end], history)
            else:
                nxt, nxt_r = window(ds, lo, end, history)
            done = (
                end < hi
                and period[end] == period[end - 1]
                and ds.session[end] != ds.session[end - 1]
            )
            out[p] = {
                "history": hist,
                "history_reward": hist_r,
                "action": int(ds.item[p]),
                "reward": float(ds.reward[p]),
                "next_history": nxt,
                "next_history_reward": nxt_r,
                "done": bool(done),
            }
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("history", [1, 3, 8])
@pytest.mark.parametrize("splits", [(TRAIN,), (TRAIN, VALID), (TEST,)])
def test_list_states_match_a_row_by_row_reference(
    seed: int, history: int, splits: tuple[int, ...]
) -> None:
    ds = list_dataset(seed)
    sampler = TransitionSampler(
        ds, history=history, batch_size=7, splits=splits, seed=seed, states="lists"
    )
    ref = list_reference(ds, history, splits)
    seen = 0
    for batch in sampler:
        fields = ("history", "history_reward", "action", "reward", "next_history")
        cols = {f: getattr(batch, f).tolist() for f in fields}
        cols["next_history_reward"] = batch.next_history_reward.tolist()
        cols["done"] = batch.done.tolist()
        for i, row in enumerate(batch.returns.tolist()):
            want = ref[int(row)]
            got = {f: cols[f][i] for f in want}
            assert got == want, f"row {int(row)}"
            seen += 1
    assert seen == len(ref) > 0


def test_every_slot_of_a_list_gets_the_state_before_the_list_not_the_slots_above() -> None:
    ds = PreparedDataset.from_arrays(
        user=np.ones(5, np.int32),
        item=np.array([1, 2, 3, 4, 5]),
        timestamp=np.array([1, 1, 2, 2, 2]),
        reward=np.array([1, 0, 0, 1, 0], np.float32),
        n_items=5,
        item_ids=[str(i) for i in range(1, 6)],
    )
    ds = dataclasses.replace(ds, extra={"position": np.array([0, 1, 0, 1, 2], np.int32)})
    rows = TransitionSampler(ds, history=3, batch_size=5, shuffle=False, states="rows")
    lists = TransitionSampler(ds, history=3, batch_size=5, shuffle=False, states="lists")
    b_rows, b_lists = next(iter(rows)), next(iter(lists))
    assert b_rows.history[4].tolist() == [2, 3, 4]  # the row view: slots above in the state
    assert b_lists.history.tolist() == [[0, 0, 0]] * 2 + [[0, 1, 2]] * 3
    assert b_lists.history_reward[2:].tolist() == [[0.0, 1.0, 0.0]] * 3
    assert b_lists.next_history.tolist() == [[0, 1, 2]] * 2 + [[3, 4, 5]] * 3


def test_the_logged_context_is_the_state_and_an_unknown_id_is_dropped_first() -> None:
    ds = PreparedDataset.from_arrays(
        user=np.ones(3, np.int32),
        item=np.array([1, 2, 3]),
        timestamp=np.array([1, 2, 2]),
        n_items=5,
        item_ids=[str(i) for i in range(1, 6)],
    )
    texts = np.array(["", ctx([5, 4, 999], [1.0, 0.5, 1.0]), ""], dtype=object)
    ds = dataclasses.replace(
        ds, extra={"position": np.array([0, 0, 1], np.int32), "served_context": texts}
    )
    states = list_states(ds, history=2)
    assert states.segment.tolist() == [0, 1, 1] and states.first.tolist() == [0, 1]
    assert states.end.tolist() == [1, 3] and states.context.tolist() == [-1, 0]
    assert states.item.tolist() == [[5, 4]]  # not [4, pad]: 999 goes before the last 2
    b = next(iter(TransitionSampler(ds, history=2, batch_size=3, shuffle=False, states="lists")))
    assert b.history.tolist() == [[0, 0], [5, 4], [5, 4]]
    assert b.history_reward.tolist() == [[0.0, 0.0], [1.0, 0.5], [1.0, 0.5]]
    assert b.next_history.tolist()[0] == [5, 4]  # the next list's context


def test_held_out_slots_and_contexts_never_reach_a_training_state() -> None:
    """A list whose last slots a per-user split holds out ends, for its training slots,
    where they end: neither the held-out items nor their session break reach them; and a
    next list's context counts only in the same split."""
    ds = PreparedDataset.from_arrays(
        user=np.ones(6, np.int32),
        item=np.array([1, 2, 3, 4, 5, 6]),
        timestamp=np.array([1, 1, 1, 1, 9000, 9000]),
        reward=np.array([1, 0, 3, 3, 1, 1], np.float32),
        session=np.array([0, 0, 0, 1, 2, 2]),  # a break inside the held-out slots
        split=np.array([TRAIN, TRAIN, VALID, TEST, TEST, TEST]),
        n_items=6,
        item_ids=[str(i) for i in range(1, 7)],
    )
    texts = np.array(["", "", "", "", ctx([6], [1.0]), ""], dtype=object)
    ds = dataclasses.replace(
        ds,
        extra={"position": np.array([0, 1, 2, 3, 0, 1], np.int32), "served_context": texts},
    )
    b = TransitionSampler(ds, history=4, batch_size=6, states="lists").batch(np.array([0, 1]))
    assert b.next_history.tolist() == [[0, 0, 1, 2]] * 2  # not [1, 2, 3, 4]
    assert b.next_history_reward.tolist() == [[0.0, 0.0, 1.0, 0.0]] * 2
    assert b.done.tolist() == [False, False]  # the end of the split is a truncation
    # the test slots of the served list keep its state (before the list), not the slots
    # above them; their next state is the next list's context (same split)
    t = TransitionSampler(ds, history=4, batch_size=6, splits=(TEST,), states="lists")
    bt = t.batch(np.array([3]))
    assert bt.history.tolist() == [[0, 0, 0, 0]] and bt.next_history.tolist() == [[0, 0, 0, 6]]
    # a next list that is no target (train_targets: rewarded) lends its context if it
    # belongs to the same split's period, and not if it is a valid row's
    cases = ((NO_TARGET + TRAIN, [[6]]), (NO_TARGET + VALID, [[4]]), (TRAIN, [[6]]))
    for next_code, want in cases:
        codes = np.array([TRAIN] * 4 + [next_code] * 2, np.int8)
        other = dataclasses.replace(ds, split=codes)
        b = TransitionSampler(other, history=1, batch_size=6, states="lists").batch(np.array([0]))
        assert b.next_history.tolist() == want, next_code


def test_a_click_inside_a_list_of_no_target_slots_steps_to_the_next_list() -> None:
    """``train_targets: rewarded``: the ignored slots around a click are no target, and
    still part of its list: its next state is the next list's context, and its session
    ends after the list."""
    ds = PreparedDataset.from_arrays(
        user=np.ones(6, np.int32),
        item=np.array([1, 2, 3, 4, 5, 6]),
        timestamp=np.array([1, 1, 1, 1, 5000, 5000]),
        reward=np.array([0, 1, 0, 0, 0, 1], np.float32),
        session=np.array([0, 0, 0, 0, 1, 1]),
        n_items=6,
        item_ids=[str(i) for i in range(1, 7)],
    )
    texts = np.array(["", "", "", "", ctx([2, 5], [1.0, 0.0]), ""], dtype=object)
    ds = dataclasses.replace(
        ds,
        extra={"position": np.array([0, 1, 2, 3, 0, 1], np.int32), "served_context": texts},
    )
    rewarded = rewarded_training(ds)
    assert rewarded.split.tolist() == [NO_TARGET, TRAIN, NO_TARGET, NO_TARGET, NO_TARGET, TRAIN]
    sampler = TransitionSampler(rewarded, history=2, batch_size=6, states="lists")
    assert sampler.n_transitions == 2
    b = sampler.batch(np.array([1]))
    assert b.history.tolist() == [[0, 0]] and b.next_history.tolist() == [[2, 5]]
    assert b.done.tolist() == [True]
    rows = TransitionSampler(rewarded, history=2, batch_size=6, states="rows").batch(np.array([1]))
    assert rows.done.tolist() == [False]  # the row view: the next slot is no session end


def test_states_lists_need_positions_and_auto_picks_them() -> None:
    ds = PreparedDataset.from_arrays(
        user=np.ones(2, np.int32), item=np.array([1, 2]), timestamp=np.array([1, 2])
    )
    with pytest.raises(DataError, match="position"):
        TransitionSampler(ds, history=2, batch_size=2, states="lists")
    with pytest.raises(ConfigError, match="states"):
        TransitionSampler(ds, history=2, batch_size=2, states="slots")
    assert training_states(FitConfig(), ds) == "rows"
    with pytest.raises(ConfigError, match="position"):
        training_states(FitConfig(states="lists"), ds)
    listed = dataclasses.replace(ds, extra={"position": np.zeros(2, np.int32)})
    assert training_states(FitConfig(), listed) == "lists"
    assert training_states(FitConfig(states="rows"), listed) == "rows"
    with pytest.raises(ConfigError, match=r"fit\.states"):
        FitConfig(states="slots")  # type: ignore[arg-type]


def test_contexts_are_parsed_in_bounded_chunks_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import recloop.data.lists as lists_module
    from recloop.evaluation.protocol import build_eval_users

    ds = list_dataset(4, context_share=0.8, n_users=30)
    whole = list_states(ds, history=5)
    users = build_eval_users(ds, split="test", history=5)
    monkeypatch.setattr(lists_module, "_CONTEXT_ROWS", 3)
    monkeypatch.setattr(lists_module, "_CONTEXT_BYTES", 60)  # about one context a chunk
    parts = list_states(ds, history=5)
    assert parts.n_contexts == whole.n_contexts > 10
    for field in ("segment", "first", "end", "context", "item", "reward"):
        assert np.array_equal(getattr(parts, field), getattr(whole, field)), field
    chunked = build_eval_users(ds, split="test", history=5)
    assert np.array_equal(chunked.history, users.history)
    assert np.array_equal(chunked.history_reward, users.history_reward)
    assert (users.history != 0).any()
