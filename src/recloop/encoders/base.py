"""The state-encoder contract: (user, last H items, their rewards) → state vector (B, S).

Every encoder is one module in this package, registered by name in :data:`ENCODERS`, built
from the one flat :class:`EncoderConfig` (each encoder reads the fields it needs).  Item
embeddings are owned by the algorithm and passed in, so that actor-critic heads can rank
items by similarity with the same table; padding items (index 0) contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from recloop.config import check
from recloop.registry import Registry


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Which state encoder to use and its sizes."""

    kind: str = "concat"
    """Registered encoder name: concat, mean, gru (and the others in ``recloop.encoders``)."""
    history: int = 10
    """H, the number of most recent items the state sees."""
    embedding_dim: int = 32
    """D, the item (and user) embedding size."""
    hidden_dim: int = 64
    """Width of recurrent / convolutional / attention layers, where the encoder has them."""
    num_layers: int = 1
    """Stacked layers, where the encoder has them."""
    dropout: float = 0.0
    """Dropout on the state, where the encoder applies it."""
    use_user: bool = True
    """Concatenate the user embedding to the state (DBRL's layout)."""
    use_rewards: bool = False
    """Feed each history item's logged reward to the encoder as an extra input."""
    freeze_item_embeddings: bool = False
    """Keep (pretrained) item embeddings fixed instead of fine-tuning them."""
    n_heads: int = 2
    """Attention heads (attention encoder)."""
    kernel_size: int = 3
    """Convolution width (TCN encoder)."""
    reservoir_size: int = 256
    """Reservoir units (echo-state encoder)."""
    spectral_radius: float = 0.9
    """Spectral radius of the fixed reservoir (echo-state encoder)."""

    def __post_init__(self) -> None:
        check(self.history >= 1, f"encoder.history must be >= 1, got {self.history}")
        check(
            self.embedding_dim >= 1,
            f"encoder.embedding_dim must be >= 1, got {self.embedding_dim}",
        )
        check(self.hidden_dim >= 1, f"encoder.hidden_dim must be >= 1, got {self.hidden_dim}")
        check(0.0 <= self.dropout < 1.0, f"encoder.dropout must be in [0, 1), got {self.dropout}")


class StateEncoder(nn.Module):
    """Maps a user and their last H items to a state vector.

    Subclasses set ``state_dim`` (S) and implement ``forward``.
    """

    state_dim: int

    def forward(
        self, user: Tensor, history: Tensor, history_reward: Tensor
    ) -> Tensor:  # (B,) int64, (B, H) int64, (B, H) float32 -> (B, S) float32
        raise NotImplementedError


class EncoderBuilder(Protocol):
    """Constructs an encoder; registered classes satisfy this with their ``__init__``."""

    def __call__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> StateEncoder: ...


ENCODERS: Registry[EncoderBuilder] = Registry("encoder")
