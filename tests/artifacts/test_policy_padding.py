"""The padding column at -inf: written in place at serving time, the same scores as the
training-time sum, and never into a head's parameters."""

from __future__ import annotations

import pytest
import torch

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec
from recloop.encoders.base import EncoderConfig


@pytest.mark.parametrize("kind", ["linear", "dot", "popularity", "bcq_discrete"])
def test_inference_scores_equal_training_scores(kind: str) -> None:
    torch.manual_seed(0)
    policy = PolicyNet(
        PolicySpec(
            n_users=4,
            n_items=9,
            encoder=EncoderConfig(kind="concat", history=3, embedding_dim=8),
            head=HeadConfig(kind=kind),
        )
    ).eval()
    if kind == "popularity":
        with torch.no_grad():
            policy.head.scores.copy_(torch.arange(10.0))
    params = {k: v.clone() for k, v in policy.state_dict().items()}
    user, hist, rew = torch.tensor([1, 2]), torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.ones(2, 3)
    for batch in (slice(0, 2), slice(0, 1)):  # batch 1: an expanded row is contiguous
        with torch.no_grad():
            want = policy(user[batch], hist[batch], rew[batch])
        with torch.inference_mode():
            got = policy(user[batch], hist[batch], rew[batch])
        assert torch.equal(got, want)
        assert bool((got[:, 0] == float("-inf")).all())
    for k, v in policy.state_dict().items():
        assert torch.equal(v, params[k]), k
