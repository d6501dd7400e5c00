"""SQN: self-supervised Q-learning (Xin et al., "Self-Supervised Reinforcement Learning for
Recommender Systems", SIGIR 2020).

A sequential recommender's state encoder (any ``encoder.kind``: gru, attention, tcn, ...)
feeds two heads on the same state s: the supervised head (logits over the catalogue, trained
by cross-entropy on the logged next item) and a Q head (Q(s, ·) over the items, trained by
one-step TD).  Both losses reach the shared encoder, so the TD signal shapes the state while
the supervised head stays a well-calibrated ranker:

    L = CE(a | s) + w · ½ (y − Q(s, a))²,  y = r + γ (1 − d) Q'(s', argmax_a Q(s', a)).

Double Q-learning as in the paper's code: two complete networks (encoder + both heads),
and at every step a coin picks which one learns; the other gives the target value Q'.
``done`` (d) is True only at a real session end; the end of a user's data is a truncation
and bootstraps.  The served policy is network 1's encoder and supervised head (the papers
evaluate the supervised head), so the artifact is the usual ``linear``-head
:class:`~recloop.artifacts.PolicyNet`.

Rewards come from ``recloop prepare``'s reward config.  The paper's behaviour-data rewards
(0.2 a click, 1.0 a purchase) are::

    recloop prepare ... --set reward.behavior.pv=0.2 --set reward.behavior.cart=0.2 \\
        --set reward.behavior.fav=0.2 --set reward.behavior.buy=1.0

On rating data such as ml-100k the reward is the rating (``reward.source=rating``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recloop.algos.base import (
    ALGOS,
    Algo,
    AlgoConfig,
    DatasetSpec,
    Scalar,
    UpdateStats,
    optimizer_step,
)
from recloop.algos.sqn_losses import double_q_target, q_of, td_loss
from recloop.artifacts.heads import mlp
from recloop.artifacts.policy import PolicyNet
from recloop.config import check
from recloop.data.batch import TransitionBatch
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError

logger = logging.getLogger(__name__)


def _default_encoder() -> EncoderConfig:
    # The supervised baseline's encoder, so that the comparison changes only the loss.
    return EncoderConfig(kind="gru", history=20, embedding_dim=64, hidden_dim=64, dropout=0.2)


@dataclass(frozen=True, kw_only=True)
class SQNConfig(AlgoConfig):
    """Supervised head + double-Q head on one encoder (Xin et al., SIGIR 2020)."""

    algo: ClassVar[str] = "sqn"
    encoder: EncoderConfig = field(default_factory=_default_encoder)
    """State encoder (kind, H, D, sizes) shared by both heads; a GRU over 20 items by default."""
    batch_size: int = 256
    """Transitions per update (the paper's 256)."""
    lr: float = 3e-3
    """Adam learning rate of each network (the paper: 0.01 on RC15 / RetailRocket; 3e-3 is
    the best on ml-100k, docs/tuning_sqn.md)."""
    gamma: float = 0.5
    """Discount γ of the TD target (the paper's 0.5)."""
    td_weight: float = 0.1
    """Weight w of the TD loss beside the cross-entropy.  The paper's 1 goes with rewards
    of 0.2 / 1.0; with ml-100k's ratings (1-5) as rewards the TD loss is about 25 times
    larger and swamps the cross-entropy in the shared encoder: 0.1 doubled validation
    NDCG@10 there (docs/tuning_sqn.md)."""
    q_hidden_dims: tuple[int, ...] = ()
    """Hidden layers of the Q head before its N outputs; () = one linear layer (the paper)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.head.kind == "linear",
            f"head.kind must be 'linear' for {self.algo} (the supervised head), "
            f"got {self.head.kind!r}",
        )
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(self.td_weight >= 0.0, f"td_weight must be >= 0, got {self.td_weight}")
        check(all(h > 0 for h in self.q_hidden_dims), "q_hidden_dims must be positive")


@dataclass(frozen=True)
class SQNStats(UpdateStats):
    """``loss`` is CE + w · TD of the network that learnt this step."""

    ce: Scalar
    """Cross-entropy of the supervised head on the logged item."""
    td: Scalar
    """Mean TD loss ½ (y − Q(s, a))² of the logged item."""
    q: Scalar
    """Mean Q(s, a) of the logged item."""
    target: Scalar
    """Mean TD target y."""


@dataclass(frozen=True)
class TwoHeadNet:
    """One of the two networks: encoder + supervised head (a PolicyNet) and a Q head."""

    policy: PolicyNet
    q_head: nn.Module  # (B, S) -> (B, N), column j = item j + 1

    def state(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return self.policy.state(user, history, history_reward)  # (B, S)

    def logits(self, state: Tensor) -> Tensor:  # (B, S) -> (B, N + 1) supervised logits
        return self.policy.head(state, self.policy.item_embedding.weight)

    def q(self, state: Tensor) -> Tensor:  # (B, S) -> (B, N)
        out: Tensor = self.q_head(state)
        return out


C = TypeVar("C", bound=SQNConfig)


class TwinNetworks(Algo[C], Generic[C]):
    """Two :class:`TwoHeadNet` (network 1 owns the served policy) and the coin between them."""

    def __init__(self, cfg: C, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        if spec.n_items < 2:
            raise ConfigError(f"{cfg.algo} needs at least 2 items, the data has {spec.n_items}")
        # Network 2 is initialised on its own (two estimators for double Q-learning), with
        # the same pretrained tables when there are any.
        policy2 = PolicyNet(self.policy.spec)
        pairs = (
            (policy2.item_embedding, self.policy.item_embedding, spec.item_embeddings),
            (policy2.user_embedding, self.policy.user_embedding, spec.user_embeddings),
        )
        for table, loaded, pre in pairs:
            if pre is not None and table is not None and loaded is not None:
                with torch.no_grad():
                    table.weight.copy_(loaded.weight)
        policy2.to(device)
        state_dim = self.policy.encoder.state_dim
        act = cfg.head.activation
        self.net1 = TwoHeadNet(
            self.policy, mlp(state_dim, cfg.q_hidden_dims, spec.n_items, act).to(device)
        )
        self.net2 = TwoHeadNet(
            policy2, mlp(state_dim, cfg.q_hidden_dims, spec.n_items, act).to(device)
        )

    def params(self, net: TwoHeadNet) -> list[nn.Parameter]:
        return [*net.policy.parameters(), *net.q_head.parameters()]

    def adam(self, net: TwoHeadNet, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.params(net), lr=lr, weight_decay=self.cfg.weight_decay)

    def pick(self) -> tuple[int, TwoHeadNet, TwoHeadNet]:
        """(index, main, target): a fair coin (torch's global generator, which checkpoints
        save) chooses the network that learns this step; the other one is its target."""
        if int(torch.randint(2, ())) == 0:
            return 0, self.net1, self.net2
        return 1, self.net2, self.net1

    def networks(self) -> dict[str, nn.Module]:
        return {
            "policy": self.policy,
            "q1": self.net1.q_head,
            "policy2": self.net2.policy,
            "q2": self.net2.q_head,
        }


@ALGOS.register("sqn")
class SQN(TwinNetworks[SQNConfig]):
    """CE + double-Q TD on a shared encoder; serves the supervised head of network 1."""

    config_class = SQNConfig

    def __init__(self, cfg: SQNConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        self.opts = (self.adam(self.net1, cfg.lr), self.adam(self.net2, cfg.lr))

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adam1": self.opts[0], "adam2": self.opts[1]}

    def update(self, batch: TransitionBatch) -> SQNStats:
        cfg = self.cfg
        self.steps += 1
        which, main, target = self.pick()
        s = (batch.user, batch.history, batch.history_reward)
        s_next = (batch.user, batch.next_history, batch.next_history_reward)
        # Both heads read one state, so both losses train the encoder.
        state = main.state(*s)  # (B, S)
        logits = main.logits(state)  # (B, N + 1)
        q = q_of(main.q(state), batch.action)  # (B,) Q(s, a)
        with torch.no_grad():
            # y = r + γ (1 − d) Q_target(s', argmax_a Q_main(s', a))
            y = double_q_target(
                reward=batch.reward,
                done=batch.done,
                q_next_online=main.q(main.state(*s_next)),
                q_next_target=target.q(target.state(*s_next)),
                gamma=cfg.gamma,
            )
        td = td_loss(q, y)  # (B,)
        ce = F.cross_entropy(logits, batch.action, reduction="none")  # (B,)
        loss = (ce + cfg.td_weight * td).mean()
        optimizer_step(self.opts[which], loss, grad_clip=cfg.grad_clip)
        return SQNStats(
            loss=loss.detach(),
            ce=ce.detach().mean(),
            td=td.detach().mean(),
            q=q.detach().mean(),
            target=y.mean(),
        )
