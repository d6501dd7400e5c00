"""The serving-time policy: embeddings + state encoder + score head → ranked items.

Every algorithm, whatever it trains (critics, behaviour heads, generators), hands serving a
:class:`PolicyNet`; the artifact stores its configs and weights, so serving rebuilds it
from the registries without importing training code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import recloop.artifacts.heads_bcq  # registers the bcq and bcq_discrete heads
import recloop.encoders  # noqa: F401  (fills the encoder registry)
from recloop.artifacts.heads import HEADS, HeadConfig, ScoreHead
from recloop.data.batch import PAD_ID
from recloop.encoders.base import ENCODERS, EncoderConfig, StateEncoder
from recloop.ranking import InnerProduct


@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """Everything needed to rebuild a :class:`PolicyNet` before loading its weights."""

    n_users: int
    """Real users; the user table has n_users + 1 rows (row 0 = unknown user)."""
    n_items: int
    """Real items; the item table has n_items + 1 rows (row 0 = padding)."""
    encoder: EncoderConfig
    """State encoder config (its ``embedding_dim`` is D)."""
    head: HeadConfig
    """Score head config."""


class PolicyNet(nn.Module):
    """scores(user, history, history_reward) → (B, N + 1) with the padding column at -inf."""

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.encoder.embedding_dim
        self.item_embedding = nn.Embedding(spec.n_items + 1, d, padding_idx=PAD_ID)
        self.user_embedding = nn.Embedding(spec.n_users + 1, d) if spec.encoder.use_user else None
        self.encoder: StateEncoder = ENCODERS.get(spec.encoder.kind)(
            spec.encoder, item_embedding=self.item_embedding, user_embedding=self.user_embedding
        )
        self.head: ScoreHead = HEADS.get(spec.head.kind)(
            spec.head, state_dim=self.encoder.state_dim, n_items=spec.n_items, embedding_dim=d
        )

    def state(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        """(B,), (B, H), (B, H) → (B, S)."""
        return self.encoder(user, history, history_reward)

    def scores_from_state(self, state: Tensor) -> Tensor:
        """(B, S) → (B, N + 1), padding column at -inf so it is never ranked."""
        scores = self.head(state, self.item_embedding.weight)
        if torch.is_inference_mode_enabled() and scores._base is None:
            # Serving: the head's own fresh tensor takes the -inf in place; the sum below
            # would write a second (B, N + 1) tensor, a full copy per batch at 1M items.
            # (A view, such as the popularity head's expanded row, is never written.)
            scores[:, PAD_ID] = float("-inf")
            return scores
        pad = torch.zeros_like(scores[:1])
        pad[:, PAD_ID] = float("-inf")
        return scores + pad

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return self.scores_from_state(self.state(user, history, history_reward))

    def factors(self) -> bool:
        """Whether the head scores as an inner product (``inner_product`` is not None)."""
        with torch.no_grad():
            return self.head.query(torch.zeros(1, self.encoder.state_dim)) is not None

    def inner_product(
        self, user: Tensor, history: Tensor, history_reward: Tensor
    ) -> InnerProduct | None:
        """The scores of :meth:`forward` as queries @ items.T + bias, or None when the head
        does not factor so; the padding column is NOT set to -inf here (the caller masks it).
        """
        state = self.state(user, history, history_reward)
        return self.head.inner_product(state, self.item_embedding.weight)
