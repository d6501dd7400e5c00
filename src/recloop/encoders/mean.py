"""Mean pooling of the history's item embeddings."""

from __future__ import annotations

from torch import Tensor, nn

from recloop.data.batch import PAD_ID
from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder


@ENCODERS.register("mean")
class MeanEncoder(EmbeddingStateEncoder):
    """``[user, mean of the real items' vectors]``: S = D + D (+ 1 with ``use_rewards``).

    The mean runs over non-padding positions only, so padding changes nothing; an empty
    history gives a zero vector.  With ``use_rewards`` the last entry is the mean reward of
    the real items.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__(cfg, item_embedding=item_embedding, user_embedding=user_embedding)
        self.state_dim = self.user_dim + self.input_dim

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        x = self.inputs(history, history_reward)
        count = (history != PAD_ID).sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
        pooled = x.sum(dim=1) / count  # padding rows of x are zero
        return self.finish(pooled, user)
