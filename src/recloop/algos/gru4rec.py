"""GRU4Rec: a GRU over the item sequence, next-item softmax at every position.

Hidasi et al., "Session-based recommendations with recurrent neural networks" (ICLR 2016),
in RecBole's form: item embeddings (D = 64) with dropout (0.5), one GRU layer (128 units),
a linear map back to D, and logits by dot product with the item table, trained by full
softmax cross-entropy with Adam (lr 3e-3).  The training is
:mod:`recloop.algos.sequential`'s (every position of sampled windows of the last H items);
the state at serving is the GRU encoder over the last H items, as for every recurrent
policy in recloop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from recloop.algos.base import ALGOS
from recloop.algos.sequential import SequenceAlgo, SequenceConfig
from recloop.encoders.base import EncoderConfig


def _default_encoder() -> EncoderConfig:
    return EncoderConfig(
        kind="gru", history=50, embedding_dim=64, hidden_dim=128, num_layers=1, use_user=False
    )


@dataclass(frozen=True, kw_only=True)
class GRU4RecConfig(SequenceConfig):
    """GRU4Rec trained on every position of sampled windows (RecBole's sizes, tuned lr and
    dropout)."""

    algo: ClassVar[str] = "gru4rec"
    encoder: EncoderConfig = field(default_factory=_default_encoder)
    """State encoder: a GRU (hidden 128) over the last 50 items (D = 64), no user vector."""
    lr: float = 3e-3
    """Adam learning rate (RecBole: 1e-3; 3e-3 was best on ml-100k, docs/tuning_seqrec.md)."""
    embedding_dropout: float = 0.5
    """Dropout on the item vectors the GRU reads, in training (RecBole's dropout_prob, 0.3
    there; 0.5 here, from the search in docs/tuning_seqrec.md)."""


@ALGOS.register("gru4rec")
class GRU4Rec(SequenceAlgo):
    """Next-item cross-entropy at every position of a GRU over the item sequence."""

    config_class = GRU4RecConfig
