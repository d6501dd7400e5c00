"""SASRec: causal self-attention over the item sequence, next-item softmax at every position.

Kang & McAuley, "Self-attentive sequential recommendation" (ICDM 2018), with RecBole's
sizes: two pre-norm transformer blocks of width 64, learned positions over the last 50
items, logits by dot product with the item table, and a full softmax cross-entropy at every
position (RecBole's ``loss_type: CE``) with Adam; one head, dropout 0.2 and lr 3e-3 were
best on MovieLens-100K (docs/tuning_seqrec.md; RecBole: two heads, 0.5, 1e-3).  The
blocks are recloop's attention encoder (:mod:`recloop.encoders.attention`), whose output at
every position :func:`recloop.algos.sequential.position_states` reads; the training is
:mod:`recloop.algos.sequential`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from recloop.algos.base import ALGOS
from recloop.algos.sequential import SequenceAlgo, SequenceConfig
from recloop.encoders.base import EncoderConfig


def _default_encoder() -> EncoderConfig:
    return EncoderConfig(
        kind="attention",
        history=50,
        embedding_dim=64,
        hidden_dim=64,
        num_layers=2,
        n_heads=1,
        dropout=0.2,
        use_user=False,
    )


@dataclass(frozen=True, kw_only=True)
class SASRecConfig(SequenceConfig):
    """SASRec trained on every position of sampled windows (RecBole's sizes, tuned lr,
    dropout and heads)."""

    algo: ClassVar[str] = "sasrec"
    encoder: EncoderConfig = field(default_factory=_default_encoder)
    """State encoder: 2 causal attention blocks (width 64, 1 head, dropout 0.2) over the
    last 50 items (D = 64), no user vector; RecBole has 2 heads and dropout 0.5."""
    lr: float = 3e-3
    """Adam learning rate (RecBole: 1e-3; 3e-3 was best on ml-100k, docs/tuning_seqrec.md)."""


@ALGOS.register("sasrec")
class SASRec(SequenceAlgo):
    """Next-item cross-entropy at every position of a causal transformer over the items."""

    config_class = SASRecConfig
