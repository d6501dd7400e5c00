"""The algorithm contract shared by every policy learner.

An algorithm is a config dataclass (hyper-parameters, registered by name in :data:`ALGOS`)
and an :class:`Algo` that owns a serving :class:`~recloop.artifacts.PolicyNet` plus whatever
else it trains (critics, behaviour heads, generators, targets) and its optimisers.
``update(batch)`` performs one gradient step on a :class:`~recloop.data.batch.TransitionBatch`
and returns typed stats; the fit loop in :mod:`recloop.training` does everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.config import check
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import TRAIN, PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError
from recloop.registry import Registry

if TYPE_CHECKING:
    from recloop.training.recommender import Recommender


@dataclass(frozen=True, kw_only=True)
class AlgoConfig:
    """Hyper-parameters every algorithm has; subclasses add their own."""

    algo: ClassVar[str] = ""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """State encoder (kind, H, D, sizes)."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """Score head of the serving policy."""
    batch_size: int = 128
    """Transitions per update."""
    lr: float = 1e-3
    """Adam learning rate of the policy."""
    weight_decay: float = 0.0
    """L2 penalty (Adam weight decay)."""
    grad_clip: float | None = None
    """Max global gradient norm per optimiser step; None = no clipping."""
    seed: int = 0
    """Seed for initialisation, sampling and shuffling."""
    pretrained: str | None = None
    """Directory of DSSM embeddings (``recloop pretrain``) to initialise the tables from."""

    def __post_init__(self) -> None:
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or null, got {self.grad_clip}",
        )

    def create(self) -> Recommender:
        """An untrained recommender for this config; call ``.fit(dataset)`` on it."""
        from recloop.training.recommender import Recommender

        return Recommender(self)


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """What an algorithm needs to know about the data before it builds its networks."""

    n_users: int
    """Real users (tables have n_users + 1 rows)."""
    n_items: int
    """Real items (tables have n_items + 1 rows)."""
    popularity: np.ndarray  # (N + 1,) float32, train-split interaction counts, 0 at padding
    item_embeddings: Tensor | None = None  # (N + 1, D) pretrained, row 0 zeros
    user_embeddings: Tensor | None = None  # (U + 1, D) pretrained, row 0 zeros

    @staticmethod
    def from_dataset(
        dataset: PreparedDataset,
        *,
        item_embeddings: Tensor | None = None,
        user_embeddings: Tensor | None = None,
    ) -> DatasetSpec:
        train = dataset.item[dataset.split == TRAIN]
        pop = np.bincount(train, minlength=dataset.n_items + 1).astype(np.float32)
        pop[0] = 0.0
        return DatasetSpec(
            n_users=dataset.n_users,
            n_items=dataset.n_items,
            popularity=pop,
            item_embeddings=item_embeddings,
            user_embeddings=user_embeddings,
        )


@dataclass(frozen=True)
class UpdateStats:
    """Scalars of one update; subclasses add fields (all floats)."""

    loss: float
    """The main objective minimised by this step."""

    def to_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}


C = TypeVar("C", bound=AlgoConfig)


class Algo(Generic[C]):
    """Base of every algorithm: builds the serving policy and checkpoints what it trains.

    Subclasses build extra networks and optimisers in ``__init__`` (after ``super().__init__``),
    list them in ``networks()`` / ``optimizers()``, and implement ``update``.
    """

    config_class: ClassVar[type[AlgoConfig]]
    trainable: ClassVar[bool] = True
    """False for algorithms fitted in closed form (popularity): the fit loop skips updates."""

    def __init__(self, cfg: C, spec: DatasetSpec, *, device: torch.device) -> None:
        self.cfg = cfg
        self.spec = spec
        self.device = device
        self.policy = PolicyNet(
            PolicySpec(
                n_users=spec.n_users,
                n_items=spec.n_items,
                encoder=cfg.encoder,
                head=self.head_config(),
            )
        )
        self._load_pretrained()
        self.policy.to(device)

    def head_config(self) -> HeadConfig:
        """The serving head; algorithms whose actor must be a given head override this."""
        return self.cfg.head

    def _load_pretrained(self) -> None:
        for table, pre, name in (
            (self.policy.item_embedding, self.spec.item_embeddings, "item"),
            (self.policy.user_embedding, self.spec.user_embeddings, "user"),
        ):
            if pre is None or table is None:
                continue
            if tuple(pre.shape) != tuple(table.weight.shape):
                raise ConfigError(
                    f"pretrained {name} embeddings have shape {tuple(pre.shape)}, the policy "
                    f"needs {tuple(table.weight.shape)} (check encoder.embedding_dim and the data)"
                )
            with torch.no_grad():
                table.weight.copy_(pre)

    def update(self, batch: TransitionBatch) -> UpdateStats:
        """One gradient step on ``batch`` (already on ``self.device``)."""
        raise NotImplementedError

    def networks(self) -> dict[str, nn.Module]:
        """Every module whose weights a checkpoint must hold (the policy included)."""
        return {"policy": self.policy}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Every optimiser whose state a checkpoint must hold."""
        return {}

    def fit_closed_form(self, dataset: PreparedDataset) -> None:
        """Closed-form fit for algorithms with ``trainable = False``."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        for net in self.networks().values():
            net.train(mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "networks": {k: v.state_dict() for k, v in self.networks().items()},
            "optimizers": {k: v.state_dict() for k, v in self.optimizers().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, net in self.networks().items():
            net.load_state_dict(state["networks"][k])
        for k, opt in self.optimizers().items():
            opt.load_state_dict(state["optimizers"][k])


ALGOS: Registry[type[Algo[Any]]] = Registry("algorithm")
"""Algorithm name → class; each class's ``config_class`` gives its config dataclass."""


def optimizer_step(
    opt: torch.optim.Optimizer,
    loss: Tensor,
    *,
    params: Iterable[Tensor] | None = None,
    grad_clip: float | None = None,
) -> None:
    """zero_grad → backward → clip the global gradient norm to ``grad_clip`` → step.

    Clipping uses ``clip_grad_norm_(params, max_norm)``; RecNN's ``clip_grad_norm_(p, -1, 1)``
    passes max_norm=-1, which multiplies gradients by a negative factor and flips their sign.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        if params is None:
            params = [p for g in opt.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(list(params), max_norm=grad_clip)
    opt.step()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, *, tau: float) -> None:
    """Polyak averaging θ' ← τθ + (1 − τ)θ' (Lillicrap et al. 2016)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)
