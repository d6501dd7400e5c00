"""The SQN / SA2C losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from recloop.algos.sqn_losses import (
    double_q_target,
    negative_td_loss,
    normalise_advantage,
    q_of,
    sample_negatives,
    sampled_advantage,
    td_loss,
)

# Two rows, three items (column j = item j + 1).
Q_ONLINE = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 0.5]])
Q_TARGET = torch.tensor([[5.0, 7.0, 1.0], [4.0, 8.0, 6.0]])


def test_double_q_target_values_the_online_argmax_with_the_target() -> None:
    y = double_q_target(
        reward=torch.tensor([1.0, 0.2]),
        done=torch.tensor([False, False]),
        q_next_online=Q_ONLINE,
        q_next_target=Q_TARGET,
        gamma=0.5,
    )
    # row 0: online argmax = item 2 → target 7.0: 1 + 0.5·7 = 4.5
    # row 1: online argmax = item 1 → target 4.0 (not the target's max 8.0): 0.2 + 0.5·4 = 2.2
    torch.testing.assert_close(y, torch.tensor([4.5, 2.2]))


def test_double_q_target_stops_only_at_a_real_session_end() -> None:
    y = double_q_target(
        reward=torch.tensor([1.0, 0.2]),
        done=torch.tensor([True, False]),
        q_next_online=Q_ONLINE,
        q_next_target=Q_TARGET,
        gamma=0.5,
    )
    torch.testing.assert_close(y, torch.tensor([1.0, 2.2]))


def test_double_q_target_is_detached() -> None:
    q_t = Q_TARGET.clone().requires_grad_(True)
    y = double_q_target(
        reward=torch.zeros(2),
        done=torch.zeros(2, dtype=torch.bool),
        q_next_online=Q_ONLINE,
        q_next_target=q_t,
        gamma=0.5,
    )
    assert not y.requires_grad


def test_td_loss_is_half_the_squared_error_with_a_constant_target() -> None:
    q = torch.tensor([1.0, 3.0], requires_grad=True)
    target = torch.tensor([2.0, 0.0], requires_grad=True)
    loss = td_loss(q, target)
    torch.testing.assert_close(loss, torch.tensor([0.5, 4.5]))
    loss.sum().backward()
    assert q.grad is not None
    torch.testing.assert_close(q.grad, torch.tensor([-1.0, 3.0]))  # q − y
    assert target.grad is None


def test_q_of_indexes_items_from_one() -> None:
    torch.testing.assert_close(q_of(Q_ONLINE, torch.tensor([1, 3])), torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(
        q_of(Q_ONLINE, torch.tensor([[2, 3], [1, 1]])),
        torch.tensor([[0.9, 0.3], [2.0, 2.0]]),
    )


def test_negative_td_loss_sums_the_negatives_of_a_row() -> None:
    q_neg = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]])
    target = torch.tensor([1.0, 0.0])
    # row 0: ½(0² + 1² + 1²) = 1.0; row 1: 3 · ½ · 0.25 = 0.375
    torch.testing.assert_close(
        negative_td_loss(q_neg=q_neg, target=target), torch.tensor([1.0, 0.375])
    )


def test_sampled_advantage_subtracts_the_mean_over_positive_and_negatives() -> None:
    q_pos = torch.tensor([4.0, 1.0])
    q_neg = torch.tensor([[1.0, 1.0, 2.0], [3.0, 2.0, 2.0]])
    # row 0: mean(4, 1, 1, 2) = 2 → A = 2; row 1: mean(1, 3, 2, 2) = 2 → A = −1
    raw = sampled_advantage(q_pos=q_pos, q_neg=q_neg, clip_min=None, clip_max=10.0)
    torch.testing.assert_close(raw, torch.tensor([2.0, -1.0]))
    clipped = sampled_advantage(q_pos=q_pos, q_neg=q_neg, clip_min=0.0, clip_max=1.5)
    torch.testing.assert_close(clipped, torch.tensor([1.5, 0.0]))


def test_sampled_advantage_is_detached() -> None:
    q_pos = torch.tensor([4.0], requires_grad=True)
    q_neg = torch.tensor([[1.0]], requires_grad=True)
    assert not sampled_advantage(
        q_pos=q_pos, q_neg=q_neg, clip_min=None, clip_max=10.0
    ).requires_grad


def test_normalise_advantage() -> None:
    adv = torch.tensor([1.0, 3.0, 0.0, 0.0])
    torch.testing.assert_close(normalise_advantage(adv, mode="none"), adv)
    torch.testing.assert_close(
        normalise_advantage(adv, mode="mean"), torch.tensor([1.0, 3.0, 0.0, 0.0]) / 1.0
    )
    torch.testing.assert_close(
        normalise_advantage(torch.tensor([2.0, 6.0]), mode="mean"), torch.tensor([0.5, 1.5])
    )
    with pytest.raises(ValueError, match="advantage normalisation"):
        normalise_advantage(adv, mode="std")


def test_sample_negatives_are_uniform_over_the_other_items() -> None:
    g = torch.Generator().manual_seed(0)
    action = torch.tensor([1, 3, 5, 5])
    neg = sample_negatives(action, n_items=5, num=4000, generator=g)
    assert neg.shape == (4, 4000)
    assert int(neg.min()) >= 1 and int(neg.max()) <= 5
    assert not (neg == action.unsqueeze(1)).any()
    for row, a in enumerate(action.tolist()):
        counts = torch.bincount(neg[row], minlength=6)[1:].float()
        others = [i for i in range(5) if i != a - 1]
        # each of the 4 other items about 1000 times (binomial sd ≈ 27)
        assert torch.all((counts[others] - 1000).abs() < 150), counts
