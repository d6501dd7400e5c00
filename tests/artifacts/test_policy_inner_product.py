"""PolicyNet.inner_product: the same scores as forward, factored, for the heads that factor."""

from __future__ import annotations

import pytest
import torch

from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.encoders.base import EncoderConfig


@pytest.mark.parametrize(
    "head",
    [
        HeadConfig(kind="linear"),
        HeadConfig(kind="linear", hidden_dims=(16,)),
        HeadConfig(kind="dot", hidden_dims=(16,)),
        HeadConfig(kind="dot", similarity="cosine", bound_action=False),
        HeadConfig(kind="bcq", hidden_dims=(16,)),
    ],
)
def test_inner_product_equals_forward(head: HeadConfig) -> None:
    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=7,
        n_items=40,
        encoder=EncoderConfig(kind="mean", history=4, embedding_dim=8),
        head=head,
    )
    net = PolicyNet(spec).eval()
    user = torch.tensor([0, 3, 7])
    history = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 8], [0, 0, 0, 0]])
    reward = torch.ones(3, 4)
    with torch.no_grad():
        want = net(user, history, reward)
        inner = net.inner_product(user, history, reward)
    assert inner is not None and net.factors()
    got = inner.scores()
    assert got.shape == want.shape == (3, 41)
    # The padding column is the caller's to mask (forward sets it to -inf).
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-6)
    assert torch.isinf(want[:, 0]).all() and torch.isfinite(got[:, 0]).all()


def test_heads_that_do_not_factor_say_so() -> None:
    for kind in ("popularity", "bcq_discrete"):
        spec = PolicySpec(
            n_users=3,
            n_items=5,
            encoder=EncoderConfig(kind="mean", history=2, embedding_dim=4),
            head=HeadConfig(kind=kind),
        )
        net = PolicyNet(spec)
        assert not net.factors()
        assert (
            net.inner_product(torch.tensor([1]), torch.tensor([[1, 2]]), torch.ones(1, 2)) is None
        )
