"""Batch-constrained deep Q-learning, continuous (Fujimoto, Meger & Precup, ICML 2019).

"Off-Policy Deep Reinforcement Learning without Exploration", Algorithm 1, with actions in
item-embedding space (DBRL's layout):

1. a conditional VAE G_ω(a | s) learns to reproduce the logged actions (their embeddings);
2. twin critics Q_θ1, Q_θ2 are trained on the logged actions towards the soft-clipped
   double-Q target over n actions sampled from G and perturbed by the target ξ_φ';
3. the perturbation model ξ_φ(s, a) ∈ [−Φ, Φ] ascends Q_θ1(s, a + ξ_φ(s, a)) for a ~ G;
4. every target network moves by Polyak averaging.

The VAE decoder and ξ live in the serving policy's ``bcq`` head
(:mod:`recloop.artifacts.heads_bcq`); serving takes the decoder at z = 0 plus the
perturbation and ranks items by similarity.  The state encoder is trained with the
generator (DBRL: the VAE owns the state); critics and ξ read the detached state.
"""

from __future__ import annotations

import itertools
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
from recloop.algos.critics import TwinCritic, adam, frozen, target_copy
from recloop.algos.ddpg import behaviour_cloning
from recloop.algos.targets import bcq_soft_clipped_target, td3_bc_actor_loss, vae_loss
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.heads_bcq import BCQHead, StateActionMLP
from recloop.config import check
from recloop.data.batch import TransitionBatch

LOG_STD_MIN, LOG_STD_MAX = -4.0, 15.0
"""Clamp of the VAE encoder's log σ (the reference implementation's bounds)."""


def _bcq_head() -> HeadConfig:
    return HeadConfig(kind="bcq", hidden_dims=(64, 64), bound_action=False)


@dataclass(frozen=True, kw_only=True)
class BCQConfig(AlgoConfig):
    """Continuous BCQ over item embeddings (Fujimoto et al. 2019)."""

    algo: ClassVar[str] = "bcq"
    head: HeadConfig = field(default_factory=_bcq_head)
    """Serving head: must be ``bcq`` (VAE decoder + perturbation; hidden_dims sizes both)."""
    batch_size: int = 256
    """Transitions per update (DBRL uses 2048; 256 gives more updates per epoch offline)."""
    critic_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of each critic MLP on [state, action]."""
    vae_hidden: tuple[int, ...] = (64, 64)
    """Hidden widths of the VAE encoder on [state, action]."""
    critic_lr: float | None = None
    """Adam learning rate of the critics; None = ``lr``."""
    gamma: float = 0.99
    """Discount γ of the TD target."""
    tau: float = 0.005
    """Polyak rate of the target networks (the paper's 0.005)."""
    lam: float = 0.75
    """λ of the soft clipped double-Q target λ min(Q1', Q2') + (1 − λ) max(Q1', Q2')."""
    phi: float = 0.05
    """Φ, the largest perturbation ξ per action coordinate."""
    n_samples: int = 10
    """Actions sampled from the generator per next state in the target (the paper's 10)."""
    kl_weight: float = 0.5
    """Weight of the KL term in the VAE loss (the reference implementation's 0.5)."""
    bc_weight: float = 10.0
    """Behaviour cloning on the served action (TD3+BC form, Fujimoto & Gu 2021): the
    perturbation's loss becomes −Q/mean|Q| + bc_weight·BC and the generator's gains
    bc_weight·BC of its z = 0 decoding.  0 = the paper's BCQ, whose MSE generator does not
    rank items (below popularity on ml-100k unless the embeddings are pretrained)."""
    bc_loss: Literal["ce", "mse"] = "ce"
    """Behaviour-cloning term: ``ce`` (cross-entropy over item scores) or ``mse``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.head.kind == "bcq", f"head.kind must be 'bcq' for bcq, got {self.head.kind!r}")
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(0.0 < self.tau <= 1.0, f"tau must be in (0, 1], got {self.tau}")
        check(0.0 <= self.lam <= 1.0, f"lam must be in [0, 1], got {self.lam}")
        check(self.phi >= 0.0, f"phi must be >= 0, got {self.phi}")
        check(self.n_samples >= 1, f"n_samples must be >= 1, got {self.n_samples}")
        check(self.kl_weight >= 0.0, f"kl_weight must be >= 0, got {self.kl_weight}")
        check(self.bc_weight >= 0.0, f"bc_weight must be >= 0, got {self.bc_weight}")
        check(self.bc_loss in ("ce", "mse"), f"bc_loss must be ce or mse, got {self.bc_loss!r}")
        check(
            self.critic_lr is None or self.critic_lr > 0,
            f"critic_lr must be > 0 or null, got {self.critic_lr}",
        )
        check(all(h > 0 for h in self.critic_hidden), "critic_hidden must be positive")
        check(all(h > 0 for h in self.vae_hidden), "vae_hidden must be positive")


@dataclass(frozen=True)
class BCQStats(UpdateStats):
    """``loss`` is the critics' TD loss."""

    critic_loss: Scalar
    """MSE of Q1 and Q2 on the logged actions against the soft-clipped target (summed)."""
    generator_loss: Scalar
    """VAE reconstruction + weighted KL (+ behaviour cloning)."""
    actor_loss: Scalar
    """The perturbation model's objective, −Q1(s, a + ξ) (normalised with behaviour cloning)."""
    q: Scalar
    """Mean Q1(s, a_logged)."""
    target: Scalar
    """Mean TD target."""


@ALGOS.register("bcq")
class BCQ(Algo[BCQConfig]):
    """Generator (VAE), perturbation model, twin critics and their targets."""

    config_class = BCQConfig

    def __init__(self, cfg: BCQConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        head = self.policy.head
        assert isinstance(head, BCQHead)
        self.head: BCQHead = head
        head.phi.fill_(cfg.phi)
        s, d = self.policy.encoder.state_dim, cfg.encoder.embedding_dim
        # The VAE encoder q(z | s, a): mean and log σ of the 2·D latent, side by side.
        self.vae_encoder = StateActionMLP(s, d, cfg.vae_hidden, 2 * head.latent_dim).to(device)
        self.critic = TwinCritic(s, d, cfg.critic_hidden).to(device)
        self.target_policy = target_copy(self.policy)
        self.target_critic = target_copy(self.critic)
        target_head = self.target_policy.head
        assert isinstance(target_head, BCQHead)
        self.target_head: BCQHead = target_head

        perturbation = set(head.perturbation.parameters())
        generator = [p for p in self.policy.parameters() if p not in perturbation]
        self.generator_opt = adam(
            itertools.chain(generator, self.vae_encoder.parameters()),
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
        )
        self.actor_opt = adam(perturbation, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.critic_opt = adam(
            self.critic.parameters(), lr=cfg.critic_lr or cfg.lr, weight_decay=cfg.weight_decay
        )

    def _latent(self, *shape: int, like: Tensor) -> Tensor:
        """z ~ N(0, 1) clipped to [−0.5, 0.5], the paper's sampling of the decoder."""
        return torch.randn(*shape, self.head.latent_dim, device=like.device).clamp(-0.5, 0.5)

    def update(self, batch: TransitionBatch) -> BCQStats:
        cfg = self.cfg
        state = self.policy.state(batch.user, batch.history, batch.history_reward)  # (B, S)
        s = state.detach()
        item_weight = self.policy.item_embedding.weight
        logged = item_weight[batch.action].detach()  # (B, D)

        # 1. Generator: a conditional VAE reconstructs the logged action (eq. 28).
        stats = self.vae_encoder(state, logged)
        mean, log_std = stats.chunk(2, dim=-1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        z = mean + log_std.exp() * torch.randn_like(mean)
        recon = self.head.decode(state, z)
        generator_loss = vae_loss(
            recon=recon, target=logged, mean=mean, log_std=log_std, kl_weight=cfg.kl_weight
        )
        if cfg.bc_weight > 0:
            served = self.head.decode(state, torch.zeros_like(z))
            generator_loss = generator_loss + cfg.bc_weight * behaviour_cloning(
                served,
                batch.action,
                item_weight=item_weight,
                kind=cfg.bc_loss,
                cosine=self.head.cosine,
            )
        optimizer_step(self.generator_opt, generator_loss, grad_clip=cfg.grad_clip)

        # 2. Critics on the logged action; target over n sampled, perturbed next actions (eq. 13).
        with torch.no_grad():
            next_state = self.target_policy.state(
                batch.user, batch.next_history, batch.next_history_reward
            )
            n = cfg.n_samples
            sampled = self.head.decode(next_state, self._latent(len(batch), n, like=next_state))
            next_action = self.target_head.perturb(next_state, sampled)  # (B, n, D)
            q1_next, q2_next = self.target_critic(next_state, next_action)  # (B, n) each
            y = bcq_soft_clipped_target(
                reward=batch.reward,
                done=batch.done,
                q1_next=q1_next,
                q2_next=q2_next,
                lam=cfg.lam,
                gamma=cfg.gamma,
            )
        q1, q2 = self.critic(s, logged)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        optimizer_step(self.critic_opt, critic_loss, grad_clip=cfg.grad_clip)

        # 3. Perturbation: maximise Q1(s, a + ξ_φ(s, a)) for a ~ G(s) (eq. 16).
        with torch.no_grad():
            sampled = self.head.decode(s, self._latent(len(batch), like=s))
        action = self.head.perturb(s, sampled)
        with frozen(self.critic):
            q_pi = self.critic.q1(s, action)
        bc = behaviour_cloning(
            action,
            batch.action,
            item_weight=item_weight.detach(),
            kind=cfg.bc_loss,
            cosine=self.head.cosine,
            enabled=cfg.bc_weight > 0,
        )
        actor_loss = td3_bc_actor_loss(q_pi=q_pi, bc=bc, bc_weight=cfg.bc_weight)
        optimizer_step(self.actor_opt, actor_loss, grad_clip=cfg.grad_clip)

        # 4. Targets.
        soft_update(self.target_policy, self.policy, tau=cfg.tau)
        soft_update(self.target_critic, self.critic, tau=cfg.tau)

        return BCQStats(
            loss=critic_loss.detach(),
            critic_loss=critic_loss.detach(),
            generator_loss=generator_loss.detach(),
            actor_loss=actor_loss.detach(),
            q=q1.detach().mean(),
            target=y.mean(),
        )

    def networks(self) -> dict[str, torch.nn.Module]:
        return {
            "policy": self.policy,
            "vae_encoder": self.vae_encoder,
            "critic": self.critic,
            "target_policy": self.target_policy,
            "target_critic": self.target_critic,
        }

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "generator": self.generator_opt,
            "actor": self.actor_opt,
            "critic": self.critic_opt,
        }
