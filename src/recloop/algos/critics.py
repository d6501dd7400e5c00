"""Pieces the actor-critic and value-based algorithms share: critics, Adam, freezing, targets.

Critics read the serving policy's state (detached: the encoder belongs to the policy and is
trained by the policy's objective, DBRL's layout) and, for continuous actions, a point in
item-embedding space.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

from recloop.artifacts.heads import mlp
from recloop.artifacts.heads_bcq import StateActionMLP


class Critic(nn.Module):
    """Q(s, a) for a continuous action a in item-embedding space: (B, S), (B, [n,] D) → (B, [n])."""

    def __init__(
        self, state_dim: int, action_dim: int, hidden: tuple[int, ...], activation: str = "relu"
    ) -> None:
        super().__init__()
        self.net = StateActionMLP(state_dim, action_dim, hidden, 1, activation)

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        return self.net(state, action).squeeze(-1)


class TwinCritic(nn.Module):
    """Two independent critics Q1, Q2 (clipped double Q-learning, Fujimoto et al. 2018)."""

    def __init__(
        self, state_dim: int, action_dim: int, hidden: tuple[int, ...], activation: str = "relu"
    ) -> None:
        super().__init__()
        self.q1 = Critic(state_dim, action_dim, hidden, activation)
        self.q2 = Critic(state_dim, action_dim, hidden, activation)

    def forward(self, state: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        return self.q1(state, action), self.q2(state, action)


class TwinQHead(nn.Module):
    """Two independent Q-heads over the catalogue: (B, S) → two (B, N + 1)."""

    def __init__(
        self, state_dim: int, n_items: int, hidden: tuple[int, ...], activation: str = "relu"
    ) -> None:
        super().__init__()
        self.q1 = mlp(state_dim, hidden, n_items + 1, activation)
        self.q2 = mlp(state_dim, hidden, n_items + 1, activation)

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        return self.q1(state), self.q2(state)


def adam(
    params: Iterable[nn.Parameter], *, lr: float, weight_decay: float = 0.0
) -> torch.optim.Adam:
    """Adam with the multi-tensor (foreach) kernels: one launch per group, not per tensor."""
    return torch.optim.Adam(
        [p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, foreach=True
    )


M = TypeVar("M", bound=nn.Module)


def target_copy(net: M) -> M:
    """A frozen deep copy of ``net`` for TD targets, updated only by ``soft_update``."""
    target = copy.deepcopy(net)
    target.requires_grad_(False)
    return target


@contextmanager
def frozen(*nets: nn.Module) -> Iterator[None]:
    """Stop gradients into ``nets``' parameters (e.g. the critic inside the actor loss).

    Gradients still flow through the networks to their inputs; skipping the weight gradients
    saves their backward matmuls and leaves no stale ``.grad`` behind.
    """
    params = [p for n in nets for p in n.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
