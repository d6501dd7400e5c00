"""SASRec: recloop's attention encoder trained on every position; learns a deterministic walk."""

from __future__ import annotations

from recloop.algos.base import ALGOS
from recloop.algos.sasrec import SASRec, SASRecConfig
from recloop.data.dataset import PreparedDataset
from recloop.encoders.attention import AttentionEncoder
from recloop.encoders.base import EncoderConfig
from recloop.training.fit import FitConfig


def test_registered_with_an_attention_policy(tiny_dataset: PreparedDataset) -> None:
    assert ALGOS.get("sasrec") is SASRec
    algo = SASRecConfig().create().build(tiny_dataset, device="cpu")
    enc = algo.policy.encoder
    assert isinstance(enc, AttentionEncoder)
    assert len(enc.blocks) == 2 and enc.position.num_embeddings == 50
    assert enc.blocks[0].attn.n_heads == 1
    assert algo.policy.user_embedding is None


def test_learns_the_walk(tiny_dataset: PreparedDataset) -> None:
    """Next item = last item + 1: a fitted SASRec ranks it first for every user."""
    enc = EncoderConfig(
        kind="attention", history=4, embedding_dim=16, hidden_dim=16, num_layers=1, use_user=False
    )
    cfg = SASRecConfig(encoder=enc, lr=0.02, batch_size=16, window_stride=1)
    rec = cfg.create()
    result = rec.fit(
        tiny_dataset, fit=FitConfig(epochs=40, patience=None, progress=False, tensorboard=False)
    )
    assert result.valid["mrr@5"] > 0.9
    assert result.test["mrr@5"] > 0.9
