"""The user simulator: exit rule, AUC, rollouts (determinism, no repeats, oracle > random)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import Tensor

from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.evaluation.protocol import build_eval_users
from recloop.evaluation.simulator import (
    SimulatorConfig,
    UserSimulator,
    auc,
    boredom_factor,
    fit_simulator,
    intra_list_diversity,
    rollout,
    session_lengths,
    simulate,
)

N_ITEMS = 20
GOOD = 4
"""Items 1..GOOD are consumed often and rewarded 1; the others rarely, with reward 0.1."""


@pytest.fixture(scope="module")
def synthetic() -> PreparedDataset:
    """Users pick good items 70% of the time; the last event is test, the one before valid."""
    rng = np.random.default_rng(0)
    n_users, length = 40, 25
    good = rng.integers(1, GOOD + 1, (n_users, length))
    bad = rng.integers(GOOD + 1, N_ITEMS + 1, (n_users, length))
    item = np.where(rng.uniform(size=(n_users, length)) < 0.7, good, bad).ravel()
    t = np.arange(length)
    split = np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN))
    return PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, n_users + 1), length),
        item=item,
        timestamp=np.tile(t, n_users),
        reward=np.where(item <= GOOD, 1.0, 0.1),
        split=np.tile(split, n_users),
        n_users=n_users,
        n_items=N_ITEMS,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, N_ITEMS + 1)],
    )


@pytest.fixture(scope="module")
def sim(synthetic: PreparedDataset) -> UserSimulator:
    return fit_simulator(synthetic, SimulatorConfig(history=3, embedding_dim=8, epochs=15, lr=0.05))


def _random_policy(seed: int) -> object:
    gen = torch.Generator().manual_seed(seed)

    def scores(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return torch.rand((user.shape[0], N_ITEMS + 1), generator=gen)

    return scores


def _fixed_policy(order: list[int]) -> object:
    """Ranks items by ``order`` (best first), the same for everyone."""
    table = torch.zeros(N_ITEMS + 1)
    table[torch.tensor(order)] = torch.arange(len(order), 0, -1).float()

    def scores(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return table.expand(user.shape[0], -1).clone()

    return scores


def test_session_lengths_hand_made() -> None:
    rewards = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0],
         [0.0, 1.0, 0.0, 1.0, 0.0]]
    )  # fmt: skip
    # Leaves on the step that completes 2 low rewards in a row: steps 3 and 2; never: 5.
    assert session_lengths(rewards, threshold=0.5, patience=2).tolist() == [3, 2, 5, 5]
    assert session_lengths(rewards, threshold=0.5, patience=1).tolist() == [2, 1, 5, 1]


def test_auc_hand_computed() -> None:
    # Pairs (3,1) (3,2) (2,1) win, (2,2) ties: 3.5 / 4.
    assert auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert auc(np.array([1.0]), np.array([2.0])) == 0.0


def test_simulator_accuracy(synthetic: PreparedDataset, sim: UserSimulator) -> None:
    acc = sim.accuracy(synthetic)
    assert acc.n_events == 40
    assert acc.auc > 0.7  # good items are consumed far more often than uniform samples
    assert acc.rmse < 0.4  # rewards are 1 or 0.1; predicting the mean would give ~0.41


def test_intra_list_diversity_against_pairwise_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn((4, 5, 3), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0]]).bool()
    got = intra_list_diversity(emb, mask)
    for m in range(4):
        idx = mask[m].nonzero()[:, 0].tolist()
        cos = [
            float(torch.nn.functional.cosine_similarity(emb[m, i], emb[m, j], dim=0))
            for i in idx
            for j in idx
            if i != j
        ]
        want = 1 - float(np.mean(cos)) if cos else 1.0
        assert float(got[m]) == pytest.approx(want, abs=1e-6)


def _users(ds: PreparedDataset, h: int = 3) -> dict[str, Tensor]:
    from recloop.evaluation.protocol import build_eval_users

    u = build_eval_users(ds, split="test", history=h)
    return {
        "user": torch.from_numpy(u.user),
        "history": torch.from_numpy(u.history),
        "history_reward": torch.from_numpy(u.history_reward),
    }


def test_rollouts_deterministic_by_seed(synthetic: PreparedDataset) -> None:
    cfg = SimulatorConfig(history=3, embedding_dim=8, epochs=2, reward_mode="sample")
    sim = fit_simulator(synthetic, cfg)
    kw = {"policy_history": 3, "horizon": 8, "repeats": True, "quit": True}
    runs = [
        rollout(_random_policy(1), sim, **_users(synthetic), **kw, seed=s).to_dict()  # type: ignore[arg-type]
        for s in (5, 5, 6)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    again = fit_simulator(synthetic, cfg)
    assert torch.equal(again.model.out.weight, sim.model.out.weight)


def test_no_repeat_mode_never_repeats(synthetic: PreparedDataset, sim: UserSimulator) -> None:
    fixed = _fixed_policy(list(range(1, 11)))  # a strict order: no ties to break
    kw = {"policy_history": 3, "horizon": 10, "quit": False}
    no_rep = rollout(fixed, sim, **_users(synthetic), repeats=False, **kw)  # type: ignore[arg-type]
    rep = rollout(fixed, sim, **_users(synthetic), repeats=True, **kw)  # type: ignore[arg-type]
    assert no_rep.distinct_ratio == 1.0  # 10 distinct items in 10 steps, for every user
    assert no_rep.coverage == pytest.approx(10 / N_ITEMS)
    assert rep.distinct_ratio == pytest.approx(0.1)  # item 1, ten times
    assert rep.diversity == pytest.approx(0.0, abs=1e-6)  # cosine of an item with itself is 1
    assert rep.coverage == pytest.approx(1 / N_ITEMS)
    assert no_rep.session_length == rep.session_length == 10


def test_quit_rule_in_rollout(synthetic: PreparedDataset, sim: UserSimulator) -> None:
    always_low = UserSimulator(sim.model, sim.cfg, threshold=1e9)  # every step disappoints
    rep = rollout(
        _fixed_policy([1]), always_low, **_users(synthetic),  # type: ignore[arg-type]
        policy_history=3, horizon=10, repeats=True, quit=True,
    )  # fmt: skip
    assert rep.session_length == sim.cfg.patience


def test_best_item_policy_beats_random(synthetic: PreparedDataset, sim: UserSimulator) -> None:
    # A horizon under N, so that the no-repeat modes cannot both exhaust the catalogue; no
    # boredom, which would rightly punish the fixed policy's repeats.
    # Consumed items stay rankable here: the fixed policy's items are ones users consumed.
    cfg = dataclasses.replace(sim.cfg, horizon=8, boredom=0.0, mask_consumed=False)
    sim = UserSimulator(sim.model, cfg, threshold=sim.threshold)
    result = simulate(_random_policy(0), sim, synthetic, policy_history=3)  # type: ignore[arg-type]
    best = simulate(_fixed_policy([1, 2, 3, 4]), sim, synthetic, policy_history=3)  # type: ignore[arg-type]
    assert [(m.repeats, m.quit) for m in best.modes] == [
        (True, False), (True, True), (False, False), (False, True)
    ]  # fmt: skip
    for good, rand in zip(best.modes, result.modes, strict=True):
        assert good.cumulative_reward > 1.5 * rand.cumulative_reward
        assert good.session_length >= rand.session_length
    assert best.modes[0].session_length == 8
    assert best.accuracy.auc > 0.7


def test_boredom_factor_hand_computed() -> None:
    unit = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
    item = torch.tensor([1, 1, 3, 1])
    recent = torch.tensor([[0, 0], [2, 1], [1, 2], [4, 0]])
    # nothing before; a repeat (cos 1); cos 0.6 and 0.8 → 0.8; opposite item (cos −1 → 0)
    got = boredom_factor(unit, item, recent, boredom=0.5)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.5, 0.6, 1.0]))


def test_boredom_makes_repeating_one_item_pay_less(
    synthetic: PreparedDataset, sim: UserSimulator
) -> None:
    kw = {"policy_history": 3, "horizon": 10, "repeats": True, "quit": False}
    returns = {}
    for b in (0.0, 0.5, 1.0):
        bored = UserSimulator(
            sim.model, dataclasses.replace(sim.cfg, boredom=b), threshold=sim.threshold
        )
        rep = rollout(_fixed_policy([1]), bored, **_users(synthetic), **kw)  # type: ignore[arg-type]
        returns[b] = rep.cumulative_reward
    one = rollout(_fixed_policy([1]), sim, **_users(synthetic), **{**kw, "horizon": 1})  # type: ignore[arg-type]
    # b = 1: every repeat earns 0, only the first step counts; b = 0.5 halves steps 2..10
    # (neither the fixed policy nor the response model reads the history's rewards)
    assert returns[1.0] == pytest.approx(one.cumulative_reward, rel=1e-5)
    assert returns[0.5] == pytest.approx((returns[0.0] + returns[1.0]) / 2, rel=1e-5)
    assert returns[0.0] > 3 * returns[1.0]


def test_boredom_leaves_negative_rewards_alone(synthetic: PreparedDataset) -> None:
    model = fit_simulator(synthetic, SimulatorConfig(history=3, embedding_dim=8, epochs=2)).model
    model.mu = -5.0  # every predicted reward negative
    kw = {"policy_history": 3, "horizon": 6, "repeats": True, "quit": False}
    returns = []
    for b in (0.0, 1.0):
        s = UserSimulator(model, SimulatorConfig(history=3, boredom=b), threshold=0.0)
        returns.append(rollout(_fixed_policy([1]), s, **_users(synthetic), **kw).cumulative_reward)  # type: ignore[arg-type]
    assert returns[0] < 0 and returns[1] == pytest.approx(returns[0])


def test_consumed_items_are_masked_and_intervals_reported(
    synthetic: PreparedDataset, sim: UserSimulator
) -> None:
    """As served: a policy that prefers what the user already consumed never shows it."""
    users = build_eval_users(synthetic, split="test", history=3)
    consumed = {
        int(u): set(users.consumed_items[users.consumed_offsets[i] : users.consumed_offsets[i + 1]])
        for i, u in enumerate(users.user)
    }

    def likes_the_past(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        scores = torch.zeros(user.shape[0], N_ITEMS + 1)
        for row, u in enumerate(user.tolist()):  # test policy: clarity over speed
            for item in consumed[u]:
                scores[row, item] = 10.0
        return scores

    result = simulate(likes_the_past, sim, synthetic, policy_history=3)
    for mode in result.modes:
        lo, hi = mode.cumulative_reward_interval
        assert lo <= mode.cumulative_reward <= hi and lo < hi
        lo, hi = mode.session_length_interval
        assert lo <= mode.session_length <= hi
    assert result.fit["negatives"] == sim.cfg.negatives and "negatives" in result.fit["scale"]
    # no recommended item was consumed before: check through a rollout that records items
    cfg = dataclasses.replace(sim.cfg, horizon=5)
    s2 = UserSimulator(sim.model, cfg, threshold=sim.threshold)
    mask = torch.zeros(len(users), N_ITEMS + 1, dtype=torch.bool)
    for i, u in enumerate(users.user):
        mask[i, list(consumed[int(u)])] = True
    calls: list[Tensor] = []

    def recording(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        calls.append(history[:, -1].clone())  # the previous step's item
        return likes_the_past(user, history, history_reward)

    rollout(
        recording, s2, user=torch.from_numpy(users.user), history=torch.from_numpy(users.history),
        history_reward=torch.from_numpy(users.history_reward), policy_history=3, horizon=5,
        repeats=False, quit=False, consumed=mask,
    )  # fmt: skip
    picked = torch.stack(calls[1:], 1)  # (M, 4) items recommended at steps 0..3
    assert not mask.gather(1, picked).any()
