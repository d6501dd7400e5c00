"""Score heads: state (B, S) → scores over the catalogue (B, N + 1).

A policy at serving time is an encoder plus one of these heads (see :mod:`.policy`).  Heads
are registered by name so that an artifact's manifest names the head and its config, and
loading rebuilds it without any training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from recloop.config import check
from recloop.ranking import InnerProduct
from recloop.registry import Registry


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Which score head turns a state into item scores."""

    kind: str = "linear"
    """Registered head: linear (logits over items), dot (actor → embedding point, scored by
    similarity with item embeddings), popularity (constant scores)."""
    hidden_dims: tuple[int, ...] = ()
    """Hidden layer widths of the head's MLP before its output layer."""
    activation: str = "relu"
    """Activation between hidden layers: relu, tanh or elu."""
    bound_action: bool = True
    """dot head: squash the actor output with tanh (DDPG-style bounded action)."""
    similarity: str = "dot"
    """dot head: how an action point scores items, ``dot`` or ``cosine``."""

    def __post_init__(self) -> None:
        check(
            self.activation in _ACTIVATIONS, f"head.activation must be one of {list(_ACTIVATIONS)}"
        )
        check(self.similarity in ("dot", "cosine"), "head.similarity must be dot or cosine")
        check(all(h > 0 for h in self.hidden_dims), "head.hidden_dims must be positive")


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}


def mlp(
    in_dim: int, hidden: tuple[int, ...], out_dim: int, activation: str = "relu"
) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), _ACTIVATIONS[activation]()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class ScoreHead(nn.Module):
    """Maps states to item scores; ``item_weight`` is the shared (N + 1, D) item table."""

    def forward(self, state: Tensor, item_weight: Tensor) -> Tensor:  # (B, S), (N+1, D) -> (B, N+1)
        raise NotImplementedError

    normalize_items: bool = False
    """Inner-product heads: the item side is the item vectors normalised (cosine)."""

    def query(self, state: Tensor) -> Tensor | None:  # (B, S) -> (B, F)
        """The state side of an inner-product head (scores = query · item vector + bias), or
        None when the head does not score that way."""
        return None

    def item_vectors(self, item_weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """The item side, unnormalised: vectors (N + 1, F) and the bias (N + 1,) or None.
        ``item_weight`` is the shared item table; views of parameters, no copies."""
        return item_weight, None

    def inner_product(self, state: Tensor, item_weight: Tensor) -> InnerProduct | None:
        """The same scores as ``forward``, factored as queries @ items.T + bias, or None when
        the head does not score that way."""
        query = self.query(state)
        if query is None:
            return None
        items, bias = self.item_vectors(item_weight)
        if self.normalize_items:
            items = nn.functional.normalize(items, dim=-1)
        return InnerProduct(queries=query, items=items, bias=bias)


class HeadBuilder(Protocol):
    def __call__(
        self, cfg: HeadConfig, *, state_dim: int, n_items: int, embedding_dim: int
    ) -> ScoreHead: ...


HEADS: Registry[HeadBuilder] = Registry("head")


@HEADS.register("linear")
class LinearHead(ScoreHead):
    """Logits over the N + 1 item slots (softmax policy, Q-values, next-item classifier)."""

    def __init__(
        self, cfg: HeadConfig, *, state_dim: int, n_items: int, embedding_dim: int
    ) -> None:
        super().__init__()
        self.net = mlp(state_dim, cfg.hidden_dims, n_items + 1, cfg.activation)

    def features(self, state: Tensor) -> Tensor:  # (B, S) -> (B, F), the output layer's input
        """The hidden layers' output: what the output layer turns into logits."""
        # A loop rather than ``self.net[:-1]``, which builds a new Sequential on every call.
        last = len(self.net) - 1
        for i, layer in enumerate(self.net):
            if i == last:
                break
            state = layer(state)
        return state

    @property
    def output(self) -> nn.Linear:
        """The last layer, (N + 1) × F: row i is item i's output vector (sampled softmax)."""
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        return last

    def forward(self, state: Tensor, item_weight: Tensor) -> Tensor:
        return self.net(state)

    def query(self, state: Tensor) -> Tensor:
        return self.features(state)

    def item_vectors(self, item_weight: Tensor) -> tuple[Tensor, Tensor | None]:
        out = self.output  # [W_i, b_i]: the logits are features · W_i + b_i
        return out.weight, out.bias


@HEADS.register("dot")
class DotHead(ScoreHead):
    """Actor MLP to a point a in item-embedding space; scores = sim(a, e_i) (DDPG-style)."""

    def __init__(
        self, cfg: HeadConfig, *, state_dim: int, n_items: int, embedding_dim: int
    ) -> None:
        super().__init__()
        self.net = mlp(state_dim, cfg.hidden_dims, embedding_dim, cfg.activation)
        self.bound_action = cfg.bound_action
        self.cosine = cfg.similarity == "cosine"
        self.normalize_items = self.cosine

    def action(self, state: Tensor) -> Tensor:  # (B, S) -> (B, D)
        a = self.net(state)
        return torch.tanh(a) if self.bound_action else a

    def forward(self, state: Tensor, item_weight: Tensor) -> Tensor:
        return score_items(self.action(state), item_weight, cosine=self.cosine)

    def query(self, state: Tensor) -> Tensor:
        a = self.action(state)
        return nn.functional.normalize(a, dim=-1) if self.cosine else a


@HEADS.register("popularity")
class PopularityHead(ScoreHead):
    """Constant scores (e.g. log train-set counts), the same for every state."""

    def __init__(
        self, cfg: HeadConfig, *, state_dim: int, n_items: int, embedding_dim: int
    ) -> None:
        super().__init__()
        self.scores = nn.Parameter(torch.zeros(n_items + 1), requires_grad=False)

    def forward(self, state: Tensor, item_weight: Tensor) -> Tensor:
        return self.scores.unsqueeze(0).expand(state.shape[0], -1)


def score_items(action: Tensor, item_weight: Tensor, *, cosine: bool = False) -> Tensor:
    """Similarity of action points (B, D) with every item embedding (N + 1, D) → (B, N + 1)."""
    if cosine:
        action = nn.functional.normalize(action, dim=-1)
        item_weight = nn.functional.normalize(item_weight, dim=-1)
    return action @ item_weight.T
