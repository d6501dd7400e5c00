"""Pieces the actor-critic and value-based algorithms share: critic configs and networks, Adam,
freezing, target networks, the TD regression and the action range of a bounded actor.

Critics read the serving policy's state (detached: the encoder belongs to the policy and is
trained by the policy's objective, DBRL's layout) and, for continuous actions, a point in
item-embedding space.  Composed, not inherited: an algorithm's config holds a ``critic:``
section (:class:`CriticConfig` for the actor-critics, :class:`QLearningConfig` for the
Q-networks over items) and its ``update`` calls these functions, so it still reads like its
paper from top to bottom.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recloop.algos.base import Scalar, UpdateStats, soft_update
from recloop.artifacts.heads import DotHead, mlp
from recloop.artifacts.heads_bcq import StateActionMLP
from recloop.artifacts.policy import PolicyNet
from recloop.config import check


def check_td(gamma: float, tau: float) -> None:
    """Range checks of a discount and a Polyak rate (``critic.gamma``, ``critic.tau``)."""
    check(0.0 <= gamma <= 1.0, f"critic.gamma must be in [0, 1], got {gamma}")
    check(0.0 < tau <= 1.0, f"critic.tau must be in (0, 1], got {tau}")


@dataclass(frozen=True, kw_only=True)
class CriticConfig:
    """The critics Q(s, a) of an actor-critic and their TD learning (``critic.*`` keys)."""

    hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of each critic MLP: on [state, action], or, for discrete SAC, on the state
    with one output per item."""
    lr: float | None = None
    """Adam learning rate of the critics; None = the algorithm's ``lr``."""
    gamma: float = 0.99
    """Discount γ of the one-step TD target y = r + γ (1 − done) V(s')."""
    tau: float = 0.005
    """Polyak rate of the target networks, θ' ← τθ + (1 − τ)θ', at each target update."""

    def __post_init__(self) -> None:
        check(all(h > 0 for h in self.hidden), f"critic.hidden must be positive: {self.hidden}")
        check(self.lr is None or self.lr > 0, f"critic.lr must be > 0 or null, got {self.lr}")
        check_td(self.gamma, self.tau)


@dataclass(frozen=True, kw_only=True)
class QLearningConfig:
    """TD learning of a Q-network over items that is the serving policy (``critic.*`` keys)."""

    gamma: float = 0.99
    """Discount γ of the one-step TD target y = r + γ (1 − done) V(s')."""
    tau: float = 0.005
    """Polyak rate of the target network at each target update; 1 = hard copy."""
    target_update_interval: int = 1
    """Updates between target-network updates (the DQN paper's C, with tau = 1)."""
    huber_delta: float = 1.0
    """δ of the Huber loss on the TD error."""

    def __post_init__(self) -> None:
        check_td(self.gamma, self.tau)
        check(
            self.target_update_interval >= 1,
            f"critic.target_update_interval must be >= 1, got {self.target_update_interval}",
        )
        check(self.huber_delta > 0.0, f"critic.huber_delta must be > 0, got {self.huber_delta}")


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


@dataclass(frozen=True)
class TDStats(UpdateStats):
    """Stats of an update that trains a critic by TD; subclasses add their own fields."""

    q: Scalar
    """Mean Q(s, a_logged) (Q1's, where there are twin critics)."""
    target: Scalar
    """Mean TD target."""


def bounded_dot_actor(policy: PolicyNet) -> tuple[DotHead, Tensor]:
    """The policy's ``dot`` head (the actor μ) and its item table (the logged actions), the
    table rescaled into the actor's range when the actor is tanh-bounded
    (:func:`keep_items_in_action_range`)."""
    actor = dot_actor(policy)
    items = policy.item_embedding.weight  # (N + 1, D)
    if actor.bound_action:
        keep_items_in_action_range(items, rescale=True)
    return actor, items


def critic_adam(
    critic: nn.Module, cfg: CriticConfig, *, lr: float, weight_decay: float
) -> torch.optim.Adam:
    """Adam over the critic's parameters at ``cfg.lr``, or at the algorithm's ``lr``."""
    return adam(critic.parameters(), lr=cfg.lr or lr, weight_decay=weight_decay)


def twin_td_loss(q1: Tensor, q2: Tensor, y: Tensor) -> Tensor:
    """MSE(Q1, y) + MSE(Q2, y): both critics regress on one target; (B,) each → ()."""
    return F.mse_loss(q1, y) + F.mse_loss(q2, y)


def update_targets(*pairs: tuple[nn.Module, nn.Module], tau: float) -> None:
    """Polyak-average each ``(target, online)`` pair by ``tau``."""
    for target, online in pairs:
        soft_update(target, online, tau=tau)


def q_target_due(step: int, cfg: QLearningConfig) -> bool:
    """Whether update number ``step`` (from 1) moves the target network."""
    return step % cfg.target_update_interval == 0


def dot_actor(policy: PolicyNet) -> DotHead:
    """The policy's ``dot`` head, the actor μ(s) of DDPG, TD3 and continuous SAC."""
    head = policy.head
    assert isinstance(head, DotHead), f"expected a dot head, got {type(head).__name__}"
    return head


@torch.no_grad()
def keep_items_in_action_range(table: Tensor, *, rescale: bool = False) -> None:
    """Keep the item embeddings inside [−1, 1]^D, the range of a tanh-bounded actor, in place.

    The critics are trained on the logged item's embedding and asked about the actor's
    action; with a tanh actor and an unconstrained table every logged action outside
    [−1, 1] would train the critic where the actor can never go, and Q(s, μ(s)) would always
    be an extrapolation.  The table itself is the map between the two (it is what the actor's
    point is scored against at serving time and in ONNX), so keeping it inside the range makes
    one action space for training, scoring and serving.  ``rescale`` (at construction) first
    divides the whole table by its largest |entry| when that is above 1 — one factor, which
    keeps the rankings of pretrained embeddings under dot and cosine similarity; after each
    step that moves the table, entries are clamped (a projected gradient step).
    """
    if rescale:
        table.div_(table.abs().max().clamp(min=1.0))
    table.clamp_(-1.0, 1.0)


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
