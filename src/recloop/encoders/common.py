"""Pieces every state encoder shares: item lookups, the reward feature, the user embedding,
and moving padding out of the way of sequence models.

All of it is plain tensor arithmetic (gather, scatter, cumsum) so that every encoder exports
to ONNX without data-dependent control flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recloop.config import check
from recloop.data.batch import PAD_ID
from recloop.encoders.base import EncoderConfig, StateEncoder


def lookup_items(
    item_embedding: nn.Embedding, history: Tensor, *, freeze: bool
) -> Tensor:  # (B, H) int64 -> (B, H, D)
    """Item vectors of a history, padding forced to zero.

    With ``freeze`` the lookup is detached rather than the table's ``requires_grad`` switched
    off, because the table is shared with heads (e.g. DDPG's ranking by similarity) that may
    still train it.  The padding row is masked explicitly: a pretrained table copied into the
    embedding may have overwritten row 0.
    """
    emb = item_embedding(history)
    if freeze:
        emb = emb.detach()
    return emb * (history != PAD_ID).unsqueeze(-1).to(emb.dtype)


def item_inputs(
    item_embedding: nn.Embedding, history: Tensor, history_reward: Tensor, *, cfg: EncoderConfig
) -> Tensor:  # (B, H), (B, H) -> (B, H, D) or (B, H, D + 1) with use_rewards
    """Per-position inputs: the item vector, plus its logged reward as one more feature.

    The reward is appended (not multiplied in) so a zero reward still leaves the item
    visible; padding positions get reward 0 as well as a zero vector.
    """
    emb = lookup_items(item_embedding, history, freeze=cfg.freeze_item_embeddings)
    if not cfg.use_rewards:
        return emb
    valid = (history != PAD_ID).to(emb.dtype)
    return torch.cat([emb, (history_reward.to(emb.dtype) * valid).unsqueeze(-1)], dim=-1)


def input_dim(cfg: EncoderConfig) -> int:
    """Width of :func:`item_inputs`: D, plus one with ``use_rewards``."""
    return cfg.embedding_dim + int(cfg.use_rewards)


def user_dim(cfg: EncoderConfig, user_embedding: nn.Embedding | None) -> int:
    """Width the user embedding adds to the state: D when used and given, else 0."""
    return user_embedding.embedding_dim if cfg.use_user and user_embedding is not None else 0


def with_user(
    state: Tensor, user: Tensor, *, user_embedding: nn.Embedding | None, cfg: EncoderConfig
) -> Tensor:  # (B, S'), (B,) -> (B, D + S') or (B, S')
    """Prepend the user embedding to the state (DBRL's layout: user first)."""
    if not cfg.use_user or user_embedding is None:
        return state
    return torch.cat([user_embedding(user), state], dim=-1)


@dataclass(frozen=True)
class Compacted:
    """A batch of sequences with the real items first and the padding after them."""

    x: Tensor  # (B, H, F), positions length..H-1 are zero
    length: Tensor  # (B,) int64, number of real items per row


def compact_left(history: Tensor, x: Tensor) -> Compacted:
    """Move the non-padding positions to the front, in order, and padding to the back.

    ``history`` (B, H) int64 and ``x`` (B, H, F) → compacted ``x`` and the lengths.
    A causal sequence model run over the compacted rows reads real items only up to
    position ``length - 1``, so its output there does not depend on how much padding there
    was, nor where it sat.  Done with a scatter instead of ``pack_padded_sequence`` so the
    encoders export to ONNX.
    """
    valid = history != PAD_ID
    vi = valid.long()
    length = vi.sum(dim=1)
    dest = torch.where(
        valid, vi.cumsum(dim=1) - 1, length.unsqueeze(1) + (1 - vi).cumsum(dim=1) - 1
    )  # (B, H) a permutation of 0..H-1 per row
    out = torch.zeros_like(x).scatter(1, dest.unsqueeze(-1).expand_as(x), x)
    return Compacted(x=out, length=length)


def gather_last(seq: Tensor, length: Tensor) -> Tensor:
    """``seq[b, length[b] - 1]`` for each row, zero where ``length`` is 0.  (B, H, F) → (B, F)."""
    idx = (length - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, seq.shape[-1])
    last = seq.gather(1, idx).squeeze(1)
    return last * (length > 0).unsqueeze(-1).to(last.dtype)


def require_layers(cfg: EncoderConfig) -> None:
    """Range check for the encoders that stack ``num_layers`` layers."""
    check(
        cfg.num_layers >= 1,
        f"encoder.num_layers must be >= 1 for the {cfg.kind} encoder, got {cfg.num_layers}",
    )


@dataclass(frozen=True, eq=False)
class SharedTables:
    """The owner's embedding tables, held by reference (see :class:`EmbeddingStateEncoder`)."""

    item: nn.Embedding  # (N + 1, D), row 0 = padding
    user: nn.Embedding | None  # (U + 1, D), row 0 = unknown user


class EmbeddingStateEncoder(StateEncoder):
    """Base of the registered encoders: holds the config and the shared embeddings.

    ``inputs`` gives the per-position item inputs (frozen or not, reward appended or not),
    ``finish`` prepends the user embedding and applies the state dropout.  Subclasses set
    ``state_dim = self.user_dim + <their own width>``.

    The item and user tables belong to the module that passed them in (the policy), which
    registers them; the encoder only refers to them.  Registered in both places they would
    appear twice in ``state_dict()`` under two names, which safetensors refuses to save and
    strict loading then trips over.  So the owner's ``parameters()``, ``to()`` and
    ``state_dict()`` cover the tables, the encoder's cover only its own layers; an encoder
    used on its own needs its tables registered (or optimised) by whoever uses it.
    ``copy.deepcopy`` of the owner keeps the sharing (one memo for both references).
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__()
        check(
            item_embedding.embedding_dim == cfg.embedding_dim,
            f"encoder.embedding_dim is {cfg.embedding_dim} but the item embedding table "
            f"has dimension {item_embedding.embedding_dim}",
        )
        self.cfg = cfg
        self.shared = SharedTables(item=item_embedding, user=user_embedding)
        self.dropout = nn.Dropout(cfg.dropout)
        self.user_dim = user_dim(cfg, user_embedding)
        self.input_dim = input_dim(cfg)

    @property
    def item_embedding(self) -> nn.Embedding:
        return self.shared.item

    @property
    def user_embedding(self) -> nn.Embedding | None:
        return self.shared.user

    def inputs(self, history: Tensor, history_reward: Tensor) -> Tensor:  # -> (B, H, F)
        return item_inputs(self.item_embedding, history, history_reward, cfg=self.cfg)

    def finish(self, state: Tensor, user: Tensor) -> Tensor:  # (B, S'), (B,) -> (B, S)
        state = with_user(state, user, user_embedding=self.user_embedding, cfg=self.cfg)
        return self.dropout(state)
