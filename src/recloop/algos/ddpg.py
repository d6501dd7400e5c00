"""DDPG in item-embedding space (Lillicrap et al. 2016), DBRL's recommendation layout.

The actor is the serving policy's ``dot`` head: state → a point in item-embedding space,
items ranked by similarity with it.  The critic Q(s, a) is trained on the *logged* action's
embedding; the actor ascends Q(s, μ(s)).  The state encoder (and the item table it reads)
belongs to the actor and is trained by the actor's objective; the critic reads the detached
state.  Optionally the actor is regularised towards the logged item (TD3+BC, Fujimoto & Gu
2021), which keeps an offline actor on the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from recloop.algos.base import (
    ALGOS,
    Algo,
    AlgoConfig,
    DatasetSpec,
    Scalar,
    UpdateStats,
    optimizer_step,
    soft_update,
)
from recloop.algos.critics import Critic, adam, frozen, target_copy
from recloop.algos.targets import td3_bc_actor_loss, td_target
from recloop.artifacts.heads import DotHead, HeadConfig, score_items
from recloop.config import check
from recloop.data.batch import TransitionBatch


def _actor_head() -> HeadConfig:
    return HeadConfig(kind="dot", hidden_dims=(64, 64), bound_action=False)


@dataclass(frozen=True, kw_only=True)
class DDPGConfig(AlgoConfig):
    """Deep deterministic policy gradient over item embeddings (Lillicrap et al. 2016)."""

    algo: ClassVar[str] = "ddpg"
    head: HeadConfig = field(default_factory=_actor_head)
    """The actor: must be a ``dot`` head (DBRL: two hidden layers of 64, unbounded action)."""
    batch_size: int = 256
    """Transitions per update (DBRL uses 2048; 256 gives more updates per epoch offline)."""
    critic_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the critic MLP on [state, action]."""
    critic_lr: float | None = None
    """Adam learning rate of the critic; None = ``lr``."""
    gamma: float = 0.99
    """Discount γ of the one-step TD target r + γ (1 − done) Q'(s', μ'(s'))."""
    tau: float = 0.001
    """Polyak rate of the target networks, θ' ← τθ + (1 − τ)θ' after every update."""
    bc_weight: float = 10.0
    """Weight of the behaviour-cloning term in the actor loss, the Q term then normalised by
    mean|Q| (TD3+BC, Fujimoto & Gu 2021, where bc_weight = 1/α); 0 = plain DDPG, which
    offline drifts to actions the critic overrates and ranks below popularity on ml-100k."""
    bc_loss: Literal["ce", "mse"] = "ce"
    """Behaviour-cloning term: ``ce`` = cross-entropy of the logged item under the actor's
    item scores (Xin et al. 2020's supervised head); ``mse`` = ‖μ(s) − e_a‖² (TD3+BC)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.head.kind == "dot",
            f"head.kind must be 'dot' for {self.algo}, got {self.head.kind!r}",
        )
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(0.0 < self.tau <= 1.0, f"tau must be in (0, 1], got {self.tau}")
        check(self.bc_weight >= 0.0, f"bc_weight must be >= 0, got {self.bc_weight}")
        check(
            self.critic_lr is None or self.critic_lr > 0,
            f"critic_lr must be > 0 or null, got {self.critic_lr}",
        )
        check(all(h > 0 for h in self.critic_hidden), "critic_hidden must be positive")


@dataclass(frozen=True)
class DDPGStats(UpdateStats):
    """``loss`` is the critic's TD loss."""

    critic_loss: Scalar
    """MSE between Q(s, a_logged) and the TD target."""
    actor_loss: Scalar
    """The actor's objective (−Q, normalised with behaviour cloning)."""
    bc_loss: Scalar
    """The behaviour-cloning term (0 when ``bc_weight`` is 0: not computed)."""
    q: Scalar
    """Mean Q(s, a_logged)."""
    target: Scalar
    """Mean TD target."""


def behaviour_cloning(
    action: Tensor,
    logged: Tensor,
    *,
    item_weight: Tensor,
    kind: str,
    cosine: bool,
    enabled: bool = True,
) -> Tensor:
    """BC loss of actor points ``action`` (B, D) against logged item indices ``logged`` (B,).

    ``ce``: cross-entropy over the real items (padding column dropped) of the item scores
    sim(action, e_i); ``mse``: squared distance to the logged item's (detached) embedding.
    Not ``enabled`` (a zero ``bc_weight``): a zero, without scoring the catalogue.
    """
    if not enabled:
        return action.new_zeros(())
    if kind == "mse":
        return F.mse_loss(action, item_weight[logged].detach())
    scores = score_items(action, item_weight[1:], cosine=cosine)  # (B, N)
    return F.cross_entropy(scores, logged - 1)


@ALGOS.register("ddpg")
class DDPG(Algo[DDPGConfig]):
    """Actor μ = the policy's dot head, critic Q(s, a), target copies of both."""

    config_class = DDPGConfig

    def __init__(self, cfg: DDPGConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        head = self.policy.head
        assert isinstance(head, DotHead)
        self.actor: DotHead = head
        self.critic = Critic(
            self.policy.encoder.state_dim, cfg.encoder.embedding_dim, cfg.critic_hidden
        ).to(device)
        self.target_policy = target_copy(self.policy)
        self.target_critic = target_copy(self.critic)
        target_head = self.target_policy.head
        assert isinstance(target_head, DotHead)
        self.target_actor: DotHead = target_head
        self.actor_opt = adam(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.critic_opt = adam(
            self.critic.parameters(), lr=cfg.critic_lr or cfg.lr, weight_decay=cfg.weight_decay
        )

    def update(self, batch: TransitionBatch) -> DDPGStats:
        cfg = self.cfg
        state = self.policy.state(batch.user, batch.history, batch.history_reward)  # (B, S)
        item_weight = self.policy.item_embedding.weight

        # Critic: regress Q(s, a_logged) on y = r + γ (1 − d) Q'(s', μ'(s')) (Algorithm 1).
        with torch.no_grad():
            next_state = self.target_policy.state(
                batch.user, batch.next_history, batch.next_history_reward
            )
            next_action = self.target_actor.action(next_state)
            y = td_target(
                reward=batch.reward,
                done=batch.done,
                next_value=self.target_critic(next_state, next_action),
                gamma=cfg.gamma,
            )
        q = self.critic(state.detach(), item_weight[batch.action].detach())
        critic_loss = F.mse_loss(q, y)
        optimizer_step(self.critic_opt, critic_loss, grad_clip=cfg.grad_clip)

        # Actor: deterministic policy gradient, ∇_θ Q(s, μ_θ(s)) through the frozen critic.
        action = self.actor.action(state)  # (B, D)
        with frozen(self.critic):
            q_pi = self.critic(state.detach(), action)
        bc = behaviour_cloning(
            action,
            batch.action,
            item_weight=item_weight,
            kind=cfg.bc_loss,
            cosine=self.actor.cosine,
            enabled=cfg.bc_weight > 0,
        )
        actor_loss = td3_bc_actor_loss(q_pi=q_pi, bc=bc, bc_weight=cfg.bc_weight)
        optimizer_step(self.actor_opt, actor_loss, grad_clip=cfg.grad_clip)

        soft_update(self.target_policy, self.policy, tau=cfg.tau)
        soft_update(self.target_critic, self.critic, tau=cfg.tau)

        return DDPGStats(
            loss=critic_loss.detach(),
            critic_loss=critic_loss.detach(),
            actor_loss=actor_loss.detach(),
            bc_loss=bc.detach(),
            q=q.detach().mean(),
            target=y.mean(),
        )

    def networks(self) -> dict[str, torch.nn.Module]:
        return {
            "policy": self.policy,
            "critic": self.critic,
            "target_policy": self.target_policy,
            "target_critic": self.target_critic,
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"actor": self.actor_opt, "critic": self.critic_opt}
