"""SASRec-style self-attention over the history (Kang & McAuley, ICDM 2018)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from recloop.config import check
from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder, compact_left, gather_last, require_layers


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t sees real positions <= t.

    Written out (not ``nn.MultiheadAttention``) so that a fully masked row gets a uniform
    softmax over ``finfo.min`` scores instead of NaN, and the graph exports to ONNX as is.
    """

    def __init__(self, dim: int, *, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:  # (B, H, d), (B, 1, H, H) bool
        b, h, d = x.shape
        q, k, v = self.qkv(x).view(b, h, 3, self.n_heads, self.head_dim).unbind(dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, H, d_head)
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        attn = self.dropout(scores.softmax(dim=-1))
        return self.out((attn @ v).transpose(1, 2).reshape(b, h, d))


class SASRecBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, *, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads=n_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), allowed))
        return x + self.dropout(self.ffn(self.ln2(x)))


@ENCODERS.register("attention")
class AttentionEncoder(EmbeddingStateEncoder):
    """``[user, transformer output at the last real item]``: S = D + hidden.

    Items (plus reward, with ``use_rewards``) are projected to ``hidden_dim``, given a
    learned positional embedding counted back from the most recent item (0 = most recent),
    and passed through ``num_layers`` causal blocks with a key padding mask; a final layer
    norm as in SASRec.  Real items are moved to the front first
    (:func:`~recloop.encoders.common.compact_left`) and positions count from the end, so the
    state does not depend on how much left padding there is.  An empty history gives a zero
    vector, never NaN.
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
        check(
            cfg.hidden_dim % cfg.n_heads == 0,
            f"encoder.hidden_dim ({cfg.hidden_dim}) must be divisible by "
            f"encoder.n_heads ({cfg.n_heads}) for the attention encoder",
        )
        self.proj = nn.Linear(self.input_dim, cfg.hidden_dim)
        self.position = nn.Embedding(cfg.history, cfg.hidden_dim)
        self.blocks = nn.ModuleList(
            SASRecBlock(cfg.hidden_dim, n_heads=cfg.n_heads, dropout=cfg.dropout)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(cfg.hidden_dim)
        self.state_dim = self.user_dim + cfg.hidden_dim

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        x = self.inputs(history, history_reward)
        seq = compact_left(history, x)
        h = x.shape[1]
        t = torch.arange(h, device=x.device)
        real = t.unsqueeze(0) < seq.length.unsqueeze(1)  # (B, H)
        back = (seq.length.unsqueeze(1) - 1 - t.unsqueeze(0)).clamp(min=0)  # 0 = most recent
        z = (self.proj(seq.x) + self.position(back)) * real.unsqueeze(-1).to(x.dtype)
        z = self.dropout(z)
        causal = t.unsqueeze(1) >= t.unsqueeze(0)  # (H, H) query row sees key column
        allowed = (causal.unsqueeze(0) & real.unsqueeze(1)).unsqueeze(1)  # (B, 1, H, H)
        for block in self.blocks:
            z = block(z, allowed)
        last = gather_last(self.norm(z), seq.length)
        return self.finish(last, user)
