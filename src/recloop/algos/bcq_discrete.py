"""Discrete batch-constrained deep Q-learning (Fujimoto, Conti, Ghavamzadeh & Pineau 2019).

"Benchmarking Batch Deep Reinforcement Learning Algorithms", Algorithm 1, over the catalogue:
a behaviour model G(a | s) trained by cross-entropy on the logged items, and a Q-network
whose argmax — in the double-DQN target and in the policy — only considers actions with
G(a | s) / max_a G(a | s) > τ (strict, as in the authors' code).  Both heads sit on one state
encoder and are trained on one loss (Huber TD + cross-entropy + a small penalty on G's
logits, as in the reference code).

Serving uses the ``bcq_discrete`` head (:mod:`recloop.artifacts.heads_bcq`), which holds Q,
G and τ and ranks the ineligible items after the eligible ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from recloop.algos.base import (
    ALGOS,
    Algo,
    AlgoConfig,
    DatasetSpec,
    Scalar,
    optimizer_step,
    soft_update,
)
from recloop.algos.critics import QLearningConfig, TDStats, adam, q_target_due, target_copy
from recloop.algos.targets import bcq_discrete_target
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.heads_bcq import BCQDiscreteHead
from recloop.config import check
from recloop.data.batch import TransitionBatch


def _head() -> HeadConfig:
    return HeadConfig(kind="bcq_discrete", hidden_dims=(64,))


@dataclass(frozen=True, kw_only=True)
class BCQDiscreteConfig(AlgoConfig):
    """Discrete BCQ over items (Fujimoto et al. 2019, batch deep RL benchmark)."""

    algo: ClassVar[str] = "bcq_discrete"
    head: HeadConfig = field(default_factory=_head)
    """Serving head: must be ``bcq_discrete`` (Q-head and behaviour head over items)."""
    threshold: float = 0.6
    """τ in [0, 1): actions with G(a|s) / max_a G(a|s) > τ are eligible (strict, as the
    authors' ``imt / imt.max(1)[0] > threshold``; 0 admits every item).  The paper's 0.3
    (Atari, 18 actions) admits too many of 1,682 items on ml-100k (HR@10 0.089 / NDCG@10
    0.041, below popularity's NDCG); 0.6 gives 0.107 / 0.056."""
    logit_penalty: float = 0.01
    """Weight of the mean squared behaviour logits in the loss (the reference code's 1e-2)."""
    critic: QLearningConfig = field(default_factory=QLearningConfig)
    """TD learning of the Q-head: γ, target-network updates, Huber δ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.head.kind == "bcq_discrete",
            f"head.kind must be 'bcq_discrete' for bcq_discrete, got {self.head.kind!r}",
        )
        # τ = 1 would leave no action eligible: the ratio of the most likely one is exactly 1.
        check(0.0 <= self.threshold < 1.0, f"threshold must be in [0, 1), got {self.threshold}")
        check(self.logit_penalty >= 0.0, f"logit_penalty must be >= 0, got {self.logit_penalty}")


@dataclass(frozen=True)
class BCQDiscreteStats(TDStats):
    """``loss`` is the full objective, TD + cross-entropy + logit penalty."""

    td_loss: Scalar
    """Huber TD loss."""
    behaviour_nll: Scalar
    """Cross-entropy of the logged items under G."""
    eligible: Scalar
    """Mean number of eligible actions per next state."""


@ALGOS.register("bcq_discrete")
class BCQDiscrete(Algo[BCQDiscreteConfig]):
    """Q and G heads on the policy's encoder (= the serving policy), and a target copy."""

    config_class = BCQDiscreteConfig

    def __init__(self, cfg: BCQDiscreteConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        head = self.policy.head
        assert isinstance(head, BCQDiscreteHead)
        self.head: BCQDiscreteHead = head
        head.threshold.fill_(cfg.threshold)
        self.target_policy = target_copy(self.policy)
        target_head = self.target_policy.head
        assert isinstance(target_head, BCQDiscreteHead)
        self.target_head: BCQDiscreteHead = target_head
        self.opt = adam(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def update(self, batch: TransitionBatch) -> BCQDiscreteStats:
        cfg = self.cfg
        self.steps += 1
        a = (batch.action - 1).unsqueeze(1)  # index among the real items
        state = self.policy.state(batch.user, batch.history, batch.history_reward)  # (B, S)
        q = self.head.q(state)[:, 1:].gather(1, a).squeeze(1)
        logits = self.head.behaviour(state)[:, 1:]  # (B, N)

        # Target: double-DQN restricted to eligible actions (eq. 5).
        with torch.no_grad():
            nxt = (batch.user, batch.next_history, batch.next_history_reward)
            next_state = self.policy.state(*nxt)
            eligible = self.head.eligible(self.head.behaviour_log_prob(next_state))[:, 1:]
            y = bcq_discrete_target(
                reward=batch.reward,
                done=batch.done,
                q_next_online=self.head.q(next_state)[:, 1:],
                q_next_target=self.target_head.q(self.target_policy.state(*nxt))[:, 1:],
                eligible_next=eligible,
                gamma=cfg.critic.gamma,
            )

        td = F.huber_loss(q, y, delta=cfg.critic.huber_delta)
        nll = F.cross_entropy(logits, a.squeeze(1))
        loss = td + nll + cfg.logit_penalty * logits.pow(2).mean()
        optimizer_step(self.opt, loss, grad_clip=cfg.grad_clip)
        if q_target_due(self.steps, cfg.critic):
            soft_update(self.target_policy, self.policy, tau=cfg.critic.tau)
        return BCQDiscreteStats(
            loss=loss.detach(),
            td_loss=td.detach(),
            behaviour_nll=nll.detach(),
            eligible=eligible.sum(dim=1).float().mean(),
            q=q.detach().mean(),
            target=y.mean(),
        )

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy, "target_policy": self.target_policy}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"q": self.opt}
