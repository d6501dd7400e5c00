"""SASRec: causal self-attention over the item sequence, next-item softmax at every position.

Kang & McAuley, "Self-attentive sequential recommendation" (ICDM 2018), with RecBole's
defaults: two pre-norm transformer blocks of width 64 with two heads, learned positions
over the last 50 items, dropout 0.5, logits by dot product with the item table, and a full
softmax cross-entropy at every position (RecBole's ``loss_type: CE``) with Adam.  The
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
        n_heads=2,
        dropout=0.5,
        use_user=False,
    )


@dataclass(frozen=True, kw_only=True)
class SASRecConfig(SequenceConfig):
    """SASRec trained on every position of sampled windows (RecBole's defaults)."""

    algo: ClassVar[str] = "sasrec"
    encoder: EncoderConfig = field(default_factory=_default_encoder)
    """State encoder: 2 causal attention blocks (width 64, 2 heads, dropout 0.5) over the
    last 50 items (D = 64), no user vector."""


@ALGOS.register("sasrec")
class SASRec(SequenceAlgo):
    """Next-item cross-entropy at every position of a causal transformer over the items."""

    config_class = SASRecConfig
