"""Supervised next-item prediction: behaviour cloning, the reference every RL result must beat.

The policy (same encoders and linear head as REINFORCE) is trained by cross-entropy to
predict the logged next item from the state, with a full softmax over the catalogue or a
sampled softmax for large catalogues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from recloop.algos.base import (
    ALGOS,
    Algo,
    AlgoConfig,
    DatasetSpec,
    ParamGroup,
    Scalar,
    UpdateStats,
    build_adam,
    optimizer_step,
)
from recloop.algos.softmax import PROPOSALS, ItemSoftmax, use_sparse_tables
from recloop.artifacts.heads import LinearHead
from recloop.config import check
from recloop.data.batch import TransitionBatch
from recloop.encoders.base import EncoderConfig


def _default_encoder() -> EncoderConfig:
    return EncoderConfig(kind="gru", history=20, embedding_dim=64, hidden_dim=64, dropout=0.2)


@dataclass(frozen=True, kw_only=True)
class SupervisedConfig(AlgoConfig):
    """Next-item cross-entropy over the catalogue (behaviour cloning)."""

    algo: ClassVar[str] = "supervised"
    encoder: EncoderConfig = field(default_factory=_default_encoder)
    """State encoder (kind, H, D, sizes); a GRU over the last 20 items by default."""
    sampled_softmax: int | None = None
    """Negatives per batch for a sampled softmax (catalogues of 100k+ items); None = full."""
    proposal: str = "popularity"
    """Distribution of sampled negatives: ``uniform`` or ``popularity`` (train count + 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.head.kind == "linear", f"head.kind must be linear, got {self.head.kind!r}")
        check(
            self.sampled_softmax is None or self.sampled_softmax >= 1,
            f"sampled_softmax must be >= 1 or null, got {self.sampled_softmax}",
        )
        check(self.proposal in PROPOSALS, f"proposal must be one of {list(PROPOSALS)}")


@dataclass(frozen=True)
class SupervisedStats(UpdateStats):
    """Cross-entropy of the logged next item."""


@ALGOS.register("supervised")
class Supervised(Algo[SupervisedConfig]):
    """Maximum likelihood of the logged item: minimise −log π(a|s)."""

    config_class = SupervisedConfig

    def __init__(self, cfg: SupervisedConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        head = self.policy.head
        assert isinstance(head, LinearHead)
        self.head = head
        self.softmax = ItemSoftmax(
            n_items=spec.n_items,
            num_sampled=cfg.sampled_softmax,
            proposal=cfg.proposal,
            popularity=spec.popularity,
            device=device,
        )
        sparse = []
        if self.softmax.sampled:
            sparse = [*use_sparse_tables(self.policy), head.output.weight]
        self.opt = build_adam(
            [
                ParamGroup(
                    params=list(self.policy.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay
                )
            ],
            sparse=sparse,
        )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.opt

    def update(self, batch: TransitionBatch) -> SupervisedStats:
        state = self.policy.state(batch.user, batch.history, batch.history_reward)  # (B, S)
        cand = self.softmax.draw(batch.action)
        logp = self.softmax.log_prob(
            self.head.features(state), self.head.output, batch.action, cand
        )
        loss = -logp.mean()
        optimizer_step(self.opt.values(), loss, grad_clip=self.cfg.grad_clip)
        nll: Scalar = loss.detach()
        return SupervisedStats(loss=nll)
