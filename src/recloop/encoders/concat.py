"""DBRL's state: the user embedding followed by the H item embeddings, flattened."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recloop.data.batch import PAD_ID
from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder, lookup_items


@ENCODERS.register("concat")
class ConcatEncoder(EmbeddingStateEncoder):
    """``[user, item_1, ..., item_H]`` flattened: S = D + H * D (352 for H=10, D=32).

    Positions are kept (the oldest item first, left padding included), and a padding
    position is a zero vector.  With ``use_rewards`` the H rewards are appended as one more
    block, ``[user, item_1..H, reward_1..H]``, so the first D * (H + 1) entries keep DBRL's
    layout.  No parameters of its own beyond the shared embeddings.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__(cfg, item_embedding=item_embedding, user_embedding=user_embedding)
        d = item_embedding.embedding_dim
        self.state_dim = self.user_dim + cfg.history * (d + int(cfg.use_rewards))

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        emb = lookup_items(self.item_embedding, history, freeze=self.cfg.freeze_item_embeddings)
        state = emb.flatten(1)  # (B, H * D)
        if self.cfg.use_rewards:
            valid = (history != PAD_ID).to(state.dtype)
            state = torch.cat([state, history_reward.to(state.dtype) * valid], dim=-1)
        return self.finish(state, user)
