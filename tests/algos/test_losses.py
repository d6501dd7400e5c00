"""The algorithms' math against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from recloop.algos.losses import (
    importance_weight,
    log_prob_of,
    rewarded_cross_entropy,
    sampled_log_prob,
    scale_returns,
    topk_multiplier,
    topk_off_policy_loss,
)


def test_log_prob_of_gathers_one_entry_per_row() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0]])
    action = torch.tensor([2, 0, 1])
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    lse2 = math.log(math.exp(5) + 2 * math.exp(1))
    expected = torch.tensor([3 - lse0, -math.log(3), 1 - lse2])
    torch.testing.assert_close(log_prob_of(logits, action), expected)
    # DBRL's all_logp[:, action] is (B, B): row b scored against every row's action.
    dbrl = torch.log_softmax(logits, dim=1)[:, action]
    assert dbrl.shape == (3, 3)
    torch.testing.assert_close(dbrl.diagonal(), expected)


def test_importance_weight_is_capped_ratio_and_switches_off() -> None:
    logp = torch.log(torch.tensor([0.2, 0.05]))
    beta = torch.log(torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(importance_weight(logp, beta, cap=10.0), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(importance_weight(logp, beta, cap=1.5), torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(importance_weight(logp, beta, cap=None), torch.ones(2))


def test_topk_multiplier() -> None:
    logp = torch.log(torch.tensor([0.2, 0.5]))
    torch.testing.assert_close(topk_multiplier(logp, top_k=3), torch.tensor([1.92, 0.75]))
    torch.testing.assert_close(topk_multiplier(logp, top_k=1), torch.ones(2))


# pi = (0.5, 0.1), beta = (0.25, 0.2), G = (1, 2): w = (2, 0.5), lambda_2 = 2 (1 - pi) = (1, 1.8)
PI = (0.5, 0.1)
BETA = (0.25, 0.2)
G = (1.0, 2.0)
L5, L1 = math.log(0.5), math.log(0.1)


@pytest.mark.parametrize(
    ("top_k", "cap", "expected", "grad"),
    [
        # -mean(w λ G log π) with both corrections
        (2, 3.0, -(2 * 1 * 1 * L5 + 0.5 * 1.8 * 2 * L1) / 2, (-1.0, -0.9)),
        # importance weight off: w = 1
        (2, None, -(1 * 1 * 1 * L5 + 1 * 1.8 * 2 * L1) / 2, (-0.5, -1.8)),
        # top-K off: λ = 1
        (1, 3.0, -(2 * 1 * L5 + 0.5 * 2 * L1) / 2, (-1.0, -0.5)),
        # both off: plain REINFORCE
        (1, None, -(L5 + 2 * L1) / 2, (-0.5, -1.0)),
        # a cap below the ratio clips w = 2 to 1.5
        (2, 1.5, -(1.5 * 1 * 1 * L5 + 0.5 * 1.8 * 2 * L1) / 2, (-0.75, -0.9)),
    ],
)
def test_topk_off_policy_loss_by_hand(
    top_k: int, cap: float | None, expected: float, grad: tuple[float, float]
) -> None:
    logp = torch.log(torch.tensor(PI)).requires_grad_(True)
    beta = torch.log(torch.tensor(BETA))
    terms = topk_off_policy_loss(
        logp=logp, beta_logp=beta, returns=torch.tensor(G), top_k=top_k, weight_cap=cap
    )
    assert terms.loss.item() == pytest.approx(expected, rel=1e-6)
    terms.loss.backward()
    # Only log π carries the gradient: d loss / d log π = -w λ G / B.
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor(grad))
    assert not terms.weight.requires_grad and not terms.lambda_k.requires_grad


def test_scale_returns() -> None:
    g = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(scale_returns(g, mode="none"), g)
    torch.testing.assert_close(scale_returns(g, mode="mean"), torch.tensor([0.5, 1.5]))
    s = math.sqrt(2.0)  # unbiased std of (1, 3)
    torch.testing.assert_close(scale_returns(g, mode="std"), torch.tensor([-1 / s, 1 / s]))
    with pytest.raises(ValueError, match="unknown returns scaling"):
        scale_returns(g, mode="max")


def test_sampled_log_prob_by_hand() -> None:
    # positive logit 1; negatives 0.5 (expected count 0.5), 2.0 (count 2) and 1.0 (an
    # accidental hit of the positive, dropped).
    log_q = torch.log(torch.tensor([0.5, 2.0, 1.0]))
    got = sampled_log_prob(
        pos_logit=torch.tensor([1.0]),
        neg_logits=torch.tensor([[0.5, 2.0, 1.0]]) - log_q,
        accidental=torch.tensor([[False, False, True]]),
    )
    expected = 1 - math.log(math.exp(1) + math.exp(0.5) / 0.5 + math.exp(2.0) / 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sampled_log_prob_approaches_full_softmax() -> None:
    torch.manual_seed(0)
    n, m = 50, 20000
    logits = torch.randn(4, n)
    action = torch.tensor([0, 7, 21, 49])
    full = log_prob_of(logits, action)
    neg = torch.randint(0, n, (m,))
    log_q = torch.full((n,), math.log(m / n))
    est = sampled_log_prob(
        pos_logit=logits.gather(1, action[:, None]).squeeze(1),
        neg_logits=logits[:, neg] - log_q[neg],
        accidental=action[:, None] == neg[None, :],
    )
    torch.testing.assert_close(est, full, atol=0.05, rtol=0)


def test_log_prob_of_matches_log_softmax_in_value_and_gradient() -> None:
    """The fused function against the slow reference log_softmax(...).gather(...)."""
    torch.manual_seed(0)
    logits = (torch.randn(6, 9) * 4).requires_grad_(True)
    ref_logits = logits.detach().clone().requires_grad_(True)
    action = torch.tensor([0, 3, 8, 8, 1, 5])
    weight = torch.randn(6)
    got = log_prob_of(logits, action)
    ref = torch.log_softmax(ref_logits, dim=1).gather(1, action[:, None]).squeeze(1)
    torch.testing.assert_close(got, ref)
    (weight * got).sum().backward()
    (weight * ref).sum().backward()
    assert logits.grad is not None and ref_logits.grad is not None
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_log_prob_of_is_floored_not_infinite() -> None:
    logits = torch.tensor([[0.0, 200.0]], requires_grad=True)
    got = log_prob_of(logits, torch.tensor([0]))
    assert torch.isfinite(got).all() and got.item() < -80
    got.sum().backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0]]))


def test_rewarded_cross_entropy_by_hand() -> None:
    """−mean log π over the rewarded rows only; its gradient reaches those rows alone."""
    logp = torch.log(torch.tensor([0.5, 0.25, 0.1, 0.8])).requires_grad_(True)
    reward = torch.tensor([1.0, 0.0, 3.0, -1.0])  # rows 0 and 2 rewarded
    loss = rewarded_cross_entropy(logp, reward)
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2, rel=1e-6)
    loss.backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, torch.tensor([-0.5, 0.0, -0.5, 0.0]))
    none = rewarded_cross_entropy(logp.detach(), torch.zeros(4))
    assert none.item() == 0.0
