"""SA2C: supervised advantage actor-critic (Xin et al., "Supervised Advantage Actor-Critic for
Recommender Systems", WSDM 2022).

The two-headed, two-network layout of :mod:`recloop.algos.sqn` (a shared encoder, a
supervised head as the actor, a Q head as the critic, double Q-learning between two
networks), with two changes from the paper:

1. Sampled negative actions.  Each transition also gets M items drawn uniformly from the
   catalogue (not the logged one) with reward r⁻ (0); the user did not take them, so the
   state does not move and their TD target bootstraps from the *current* state:
   y⁻ = r⁻ + γ Q'(s, argmax_a Q(s, a)).  Their TD terms sit beside the positive's.
2. After ``warmup_steps`` steps of that loss with the plain cross-entropy (SNQN), the
   cross-entropy of the logged item is weighted by its advantage under the critic,
   A = Q(s, a) − mean(Q(s, a), Q(s, a_1⁻), ..., Q(s, a_M⁻)), detached and clipped to
   [``advantage_min``, ``advantage_max``], with a fresh Adam at ``actor_lr`` (the paper's
   code: ``lr_2``):

       L = w · (TD⁺ + Σ_j TD⁻_j) + A · CE(a | s).

The served policy is network 1's supervised head.  Rewards: see :mod:`recloop.algos.sqn`
(the paper's 0.2 a click / 1.0 a purchase are prepare's ``reward.behavior.*`` settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from recloop.algos.base import ALGOS, DatasetSpec, Scalar, UpdateStats, optimizer_step
from recloop.algos.sqn import SQNConfig, TwinNetworks
from recloop.algos.sqn_losses import (
    double_q_target,
    negative_td_loss,
    normalise_advantage,
    q_of,
    sample_negatives,
    sampled_advantage,
    td_loss,
)
from recloop.config import check
from recloop.data.batch import TransitionBatch

ADVANTAGE_NORMS = ("none", "mean")


@dataclass(frozen=True, kw_only=True)
class SA2CConfig(SQNConfig):
    """SQN with sampled negatives and an advantage-weighted actor (Xin et al., WSDM 2022)."""

    algo: ClassVar[str] = "sa2c"
    lr: float = 1e-2
    """Adam learning rate of each network during the warm-up (the paper's 0.01; also the
    best of 1e-3 / 3e-3 / 1e-2 on ml-100k, docs/tuning_sqn.md)."""
    td_weight: float = 1.0
    """Weight w of the TD losses (positive and negatives) beside the cross-entropy (the
    paper's 1; SA2C was tuned with it)."""
    num_negatives: int = 10
    """M: negative actions sampled uniformly per transition (the paper's 10)."""
    negative_reward: float = 0.0
    """Reward r⁻ of a sampled negative action (the paper's 0)."""
    warmup_steps: int = 400
    """Updates with the plain cross-entropy (SNQN) before the advantage weighting starts
    (the paper's 15000 on RC15 and RetailRocket, about 2 epochs there; 400 is about one
    epoch of ml-100k at batch 256)."""
    actor_lr: float | None = 1e-3
    """Learning rate of the fresh Adam used after the warm-up (the paper's ``lr_2`` =
    0.001); None = ``lr``."""
    advantage_min: float | None = 0.0
    """Lower clip of the advantage (the paper's 0: below-average logged items get no
    supervised gradient); None = no clipping."""
    advantage_max: float = 10.0
    """Upper clip of the advantage (the paper's 10), used with ``advantage_min``."""
    advantage_norm: str = "none"
    """``none`` (the paper) or ``mean``: divide the clipped advantages by their batch mean of
    |A|, which keeps the weighted cross-entropy on the scale of the warm-up's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.num_negatives >= 1, f"num_negatives must be >= 1, got {self.num_negatives}")
        check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        check(
            self.actor_lr is None or self.actor_lr > 0,
            f"actor_lr must be > 0 or null, got {self.actor_lr}",
        )
        check(
            self.advantage_min is None or self.advantage_min < self.advantage_max,
            f"advantage_min must be < advantage_max ({self.advantage_max}) or null, "
            f"got {self.advantage_min}",
        )
        check(
            self.advantage_norm in ADVANTAGE_NORMS,
            f"advantage_norm must be one of {list(ADVANTAGE_NORMS)}, got {self.advantage_norm!r}",
        )


@dataclass(frozen=True)
class SA2CStats(UpdateStats):
    """``loss`` is the objective of the network that learnt this step."""

    ce: Scalar
    """Cross-entropy of the supervised head (unweighted)."""
    td: Scalar
    """Mean TD loss of the logged item."""
    td_negative: Scalar
    """Mean over rows of the summed TD losses of the sampled negatives."""
    advantage: Scalar
    """Mean advantage weight of the cross-entropy (1 during the warm-up)."""
    q: Scalar
    """Mean Q(s, a) of the logged item."""


@ALGOS.register("sa2c")
class SA2C(TwinNetworks[SA2CConfig]):
    """Critic: double-Q with sampled negatives; actor: advantage-weighted cross-entropy."""

    config_class = SA2CConfig

    def __init__(self, cfg: SA2CConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        actor_lr = cfg.actor_lr if cfg.actor_lr is not None else cfg.lr
        # The paper's code builds two Adams per network (opt1 for the warm-up, opt2 after),
        # so the second phase starts with fresh moments at its own rate.
        self.warmup_opts = (self.adam(self.net1, cfg.lr), self.adam(self.net2, cfg.lr))
        self.actor_opts = (self.adam(self.net1, actor_lr), self.adam(self.net2, actor_lr))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "warmup1": self.warmup_opts[0],
            "warmup2": self.warmup_opts[1],
            "actor1": self.actor_opts[0],
            "actor2": self.actor_opts[1],
        }

    def update(self, batch: TransitionBatch) -> SA2CStats:
        cfg = self.cfg
        self.steps += 1
        which, main, target = self.pick()
        s = (batch.user, batch.history, batch.history_reward)
        s_next = (batch.user, batch.next_history, batch.next_history_reward)
        state = main.state(*s)  # (B, S)
        logits = main.logits(state)  # (B, N + 1), the actor
        q_all = main.q(state)  # (B, N), the critic
        negatives = sample_negatives(
            batch.action, n_items=self.spec.n_items, num=cfg.num_negatives
        )  # (B, M)
        q_pos = q_of(q_all, batch.action)  # (B,)
        q_neg = q_of(q_all, negatives)  # (B, M)
        with torch.no_grad():
            # Positive: y = r + γ (1 − d) Q_target(s', argmax Q_main(s', ·)).
            q_next_target, q_cur_target = target.q(
                target.state(
                    torch.cat([s_next[0], s[0]]),
                    torch.cat([s_next[1], s[1]]),
                    torch.cat([s_next[2], s[2]]),
                )
            ).chunk(2)
            y_pos = double_q_target(
                reward=batch.reward,
                done=batch.done,
                q_next_online=main.q(main.state(*s_next)),
                q_next_target=q_next_target,
                gamma=cfg.gamma,
            )
            # Negatives: the state stays s, which never ends a session.
            y_neg = double_q_target(
                reward=torch.full_like(batch.reward, cfg.negative_reward),
                done=torch.zeros_like(batch.done),
                q_next_online=q_all,
                q_next_target=q_cur_target,
                gamma=cfg.gamma,
            )
        td_pos = td_loss(q_pos, y_pos)  # (B,)
        td_neg = negative_td_loss(q_neg=q_neg, target=y_neg)  # (B,)
        ce = F.cross_entropy(logits, batch.action, reduction="none")  # (B,)
        if self.steps <= cfg.warmup_steps:
            # Warm-up (SNQN): plain cross-entropy beside the TD terms.
            adv = torch.ones_like(ce)
            opt = self.warmup_opts[which]
        else:
            adv = sampled_advantage(
                q_pos=q_pos,
                q_neg=q_neg,
                clip_min=cfg.advantage_min,
                clip_max=cfg.advantage_max,
            )
            adv = normalise_advantage(adv, mode=cfg.advantage_norm)
            opt = self.actor_opts[which]
        loss = (cfg.td_weight * (td_pos + td_neg) + adv * ce).mean()
        optimizer_step(opt, loss, grad_clip=cfg.grad_clip)
        return SA2CStats(
            loss=loss.detach(),
            ce=ce.detach().mean(),
            td=td_pos.detach().mean(),
            td_negative=td_neg.detach().mean(),
            advantage=adv.mean(),
            q=q_pos.detach().mean(),
        )
