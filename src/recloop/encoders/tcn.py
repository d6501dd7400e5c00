"""Temporal convolutional network: causal dilated convolutions over the history."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from recloop.config import check
from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder, compact_left, gather_last, require_layers


def levels_to_cover(history: int, kernel_size: int) -> int:
    """Fewest residual blocks whose receptive field spans ``history`` positions.

    A block holds two convolutions of dilation 2^l, so L blocks see
    1 + 2 (k - 1) (2^L - 1) positions (Bai, Kolter & Koltun 2018, section 3.2).
    """
    if kernel_size <= 1 or history <= 1:
        return 1
    return max(1, math.ceil(math.log2((history - 1) / (2 * (kernel_size - 1)) + 1)))


class CausalConv1d(nn.Module):
    """``Conv1d`` that pads (k - 1) * dilation zeros on the left only: output t sees inputs <= t."""

    def __init__(self, in_ch: int, out_ch: int, *, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.left = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H) -> (B, C', H)
        return self.conv(F.pad(x, (self.left, 0)))


class TemporalBlock(nn.Module):
    """Two causal convolutions with ReLU and dropout, plus a (1x1-projected) residual."""

    def __init__(
        self, in_ch: int, out_ch: int, *, kernel_size: int, dilation: int, dropout: float
    ) -> None:
        super().__init__()
        self.conv1 = CausalConv1d(in_ch, out_ch, kernel_size=kernel_size, dilation=dilation)
        self.conv2 = CausalConv1d(out_ch, out_ch, kernel_size=kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)
        self.residual: nn.Module = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H) -> (B, C', H)
        y = self.dropout(F.relu(self.conv1(x)))
        y = self.dropout(F.relu(self.conv2(y)))
        return F.relu(y + self.residual(x))


@ENCODERS.register("tcn")
class TCNEncoder(EmbeddingStateEncoder):
    """``[user, top-block output at the last real item]``: S = D + hidden.

    Residual blocks with dilation 1, 2, 4, ... (Bai, Kolter & Koltun 2018); the number of
    blocks is ``num_layers`` or, if more are needed, enough for the receptive field to span
    the whole history.  Real items are moved to the front first
    (:func:`~recloop.encoders.common.compact_left`): the causal convolutions' own zero
    padding then stands in for "nothing before the first item", so the state does not depend
    on how much left padding the history had.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__(cfg, item_embedding=item_embedding, user_embedding=user_embedding)
        require_layers(cfg)
        check(cfg.kernel_size >= 1, f"encoder.kernel_size must be >= 1, got {cfg.kernel_size}")
        n_blocks = max(cfg.num_layers, levels_to_cover(cfg.history, cfg.kernel_size))
        chans = [self.input_dim] + [cfg.hidden_dim] * n_blocks
        self.blocks = nn.Sequential(
            *(
                TemporalBlock(
                    chans[i],
                    chans[i + 1],
                    kernel_size=cfg.kernel_size,
                    dilation=2**i,
                    dropout=cfg.dropout,
                )
                for i in range(n_blocks)
            )
        )
        self.state_dim = self.user_dim + cfg.hidden_dim

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        x = self.inputs(history, history_reward)
        seq = compact_left(history, x)
        out = self.blocks(seq.x.transpose(1, 2)).transpose(1, 2)  # (B, H, hidden)
        last = gather_last(out, seq.length)
        return self.finish(last, user)
