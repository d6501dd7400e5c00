"""The critics of tanh-bounded actors learn on logged actions inside the actor's range.

A critic trained on item embeddings outside [−1, 1]^D and asked about a tanh actor's action
would always extrapolate; the item table is therefore kept inside the range (rescaled once
at construction, clamped after each step that moves it).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from actor_critic_helpers import make, tiny_batch
from torch import Tensor, nn

from recloop.algos.critics import keep_items_in_action_range
from recloop.artifacts.heads import HeadConfig

BOUNDED: dict[str, dict[str, Any]] = {
    "td3": {"policy_delay": 1},
    "sac_continuous": {},
    "ddpg": {"head": HeadConfig(kind="dot", hidden_dims=(16,), bound_action=True)},
    "bcq": {"head": HeadConfig(kind="bcq", hidden_dims=(16,), bound_action=True)},
}


@pytest.mark.parametrize("name", list(BOUNDED))
def test_every_action_the_critic_sees_lies_in_the_actor_range(name: str) -> None:
    # a large learning rate pushes the item table well past 1 within a few steps if nothing
    # holds it; the default N(0, 1) initialisation is already past it at the first step
    algo: Any = make(name, lr=0.5, **BOUNDED[name])
    seen: list[Tensor] = []

    def spy(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.append(args[1].detach().clone())

    for net in (algo.critic, algo.target_critic):
        for q in (net.q1, net.q2) if hasattr(net, "q1") else (net,):
            q.register_forward_pre_hook(spy)
    batch = tiny_batch()
    for step in range(5):
        logged = algo.policy.item_embedding.weight[batch.action]
        assert logged.abs().max() <= 1.0, f"logged actions outside [-1, 1] at step {step}"
        algo.update(tiny_batch(step))
    assert seen and max(float(a.abs().max()) for a in seen) <= 1.0
    # the table did move: the clamp is what holds it, not a frozen table
    assert (algo.policy.item_embedding.weight.abs() == 1.0).any()


def test_unbounded_actors_keep_their_table() -> None:
    # DDPG's default actor is unbounded, like the item-embedding space: nothing is rescaled
    torch.manual_seed(0)
    algo: Any = make("ddpg")
    assert algo.policy.item_embedding.weight.abs().max() > 1.0


def test_rescale_divides_by_the_largest_entry_then_clamp_holds_the_range() -> None:
    table = torch.tensor([[0.0, 0.0], [2.0, -4.0], [1.0, 0.5]])
    keep_items_in_action_range(table, rescale=True)
    torch.testing.assert_close(table, torch.tensor([[0.0, 0.0], [0.5, -1.0], [0.25, 0.125]]))
    inside = torch.tensor([[0.0, 0.0], [0.5, -0.25]])
    keep_items_in_action_range(inside, rescale=True)  # already inside: not enlarged
    torch.testing.assert_close(inside, torch.tensor([[0.0, 0.0], [0.5, -0.25]]))
    moved = torch.tensor([[0.0, 0.0], [1.5, -0.2], [-3.0, 0.9]])
    keep_items_in_action_range(moved)
    torch.testing.assert_close(moved, torch.tensor([[0.0, 0.0], [1.0, -0.2], [-1.0, 0.9]]))
