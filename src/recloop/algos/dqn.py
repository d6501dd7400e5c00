"""DQN (Mnih et al. 2015) and Double DQN (van Hasselt et al. 2016) over the catalogue.

The Q-network is the serving policy itself: the state encoder plus the ``linear`` head, whose
N + 1 outputs are Q(s, ·) (the padding slot is never an action).  A target copy of the whole
policy (encoder and embeddings included) gives the TD target and is moved towards the online
network by Polyak averaging every ``critic.target_update_interval`` updates (τ = 1 with an
interval of C is the paper's periodic hard copy).  Huber loss on Q(s, a_logged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from recloop.algos.base import (
    ALGOS,
    Algo,
    AlgoConfig,
    DatasetSpec,
    optimizer_step,
    soft_update,
)
from recloop.algos.critics import QLearningConfig, TDStats, adam, q_target_due, target_copy
from recloop.algos.targets import double_dqn_target, dqn_target
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet
from recloop.config import check
from recloop.data.batch import TransitionBatch


def _q_head() -> HeadConfig:
    return HeadConfig(kind="linear", hidden_dims=(64,))


def q_values(policy: PolicyNet, state: Tensor) -> Tensor:  # (B, S) -> (B, N) real items only
    """Q(s, a) for a = 1..N (column j is item j + 1)."""
    return policy.head(state, policy.item_embedding.weight)[:, 1:]


@torch.no_grad()
def q_learning_target(
    online: PolicyNet, target: PolicyNet, batch: TransitionBatch, *, gamma: float, double: bool
) -> Tensor:
    """(B,) y = r + γ (1 − d) max_a Q'(s', a), or Q'(s', argmax_a Q(s', a)) with ``double``.

    s' is encoded by each network's own encoder (the target's for Q', the online one's for
    the double-DQN argmax).
    """
    nxt = (batch.user, batch.next_history, batch.next_history_reward)
    q_next_target = q_values(target, target.state(*nxt))
    if not double:
        return dqn_target(
            reward=batch.reward, done=batch.done, q_next_target=q_next_target, gamma=gamma
        )
    return double_dqn_target(
        reward=batch.reward,
        done=batch.done,
        q_next_online=q_values(online, online.state(*nxt)),
        q_next_target=q_next_target,
        gamma=gamma,
    )


@dataclass(frozen=True, kw_only=True)
class DQNConfig(AlgoConfig):
    """Deep Q-learning over items, optionally double (van Hasselt et al. 2016)."""

    algo: ClassVar[str] = "dqn"
    head: HeadConfig = field(default_factory=_q_head)
    """The Q-head: must be ``linear`` (one output per item)."""
    double: bool = True
    """Double DQN: choose the next action with the online network, value it with the target."""
    critic: QLearningConfig = field(default_factory=QLearningConfig)
    """TD learning of the Q-network: γ, target-network updates, Huber δ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.head.kind == "linear",
            f"head.kind must be 'linear' for {self.algo}, got {self.head.kind!r}",
        )


@dataclass(frozen=True)
class DQNStats(TDStats):
    """``loss`` is the Huber TD loss."""


@ALGOS.register("dqn")
class DQN(Algo[DQNConfig]):
    """Online Q-network (= the serving policy) and its target copy."""

    config_class = DQNConfig

    def __init__(self, cfg: DQNConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        self.target_policy = target_copy(self.policy)
        self.opt = adam(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def update(self, batch: TransitionBatch) -> DQNStats:
        cfg = self.cfg
        self.steps += 1
        state = self.policy.state(batch.user, batch.history, batch.history_reward)  # (B, S)
        q = q_values(self.policy, state).gather(1, (batch.action - 1).unsqueeze(1)).squeeze(1)
        y = q_learning_target(
            self.policy, self.target_policy, batch, gamma=cfg.critic.gamma, double=cfg.double
        )
        loss = F.huber_loss(q, y, delta=cfg.critic.huber_delta)
        optimizer_step(self.opt, loss, grad_clip=cfg.grad_clip)
        if q_target_due(self.steps, cfg.critic):
            soft_update(self.target_policy, self.policy, tau=cfg.critic.tau)
        return DQNStats(loss=loss.detach(), q=q.detach().mean(), target=y.mean())

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy, "target_policy": self.target_policy}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"q": self.opt}
