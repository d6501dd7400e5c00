"""GRU4Rec: RecBole's architecture, trained on every position; learns a deterministic walk."""

from __future__ import annotations

import torch

from recloop.algos.base import ALGOS
from recloop.algos.gru4rec import GRU4Rec, GRU4RecConfig
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.encoders.gru import GRUEncoder
from recloop.training.fit import FitConfig


def test_registered_with_a_gru_policy(tiny_dataset: PreparedDataset) -> None:
    assert ALGOS.get("gru4rec") is GRU4Rec
    cfg = GRU4RecConfig()
    algo = cfg.create().build(tiny_dataset, device="cpu")
    assert isinstance(algo.policy.encoder, GRUEncoder)
    assert algo.policy.user_embedding is None
    # tied output: the head maps the 128-unit GRU state to D = 64 and scores by dot product
    assert algo.policy.head(torch.zeros(1, 128), algo.policy.item_embedding.weight).shape == (
        1,
        tiny_dataset.n_items + 1,
    )
    # the item table starts small (N(0, 0.02)), its padding row zero
    w = algo.policy.item_embedding.weight
    assert float(w[1:].std()) < 0.05 and not w[0].any()


def test_learns_the_walk(tiny_dataset: PreparedDataset) -> None:
    """Next item = last item + 1: a fitted GRU4Rec ranks it first for every user."""
    enc = EncoderConfig(kind="gru", history=4, embedding_dim=16, hidden_dim=16, use_user=False)
    cfg = GRU4RecConfig(encoder=enc, lr=0.02, batch_size=16, embedding_dropout=0.0, window_stride=1)
    rec = cfg.create()
    result = rec.fit(
        tiny_dataset, fit=FitConfig(epochs=40, patience=None, progress=False, tensorboard=False)
    )
    assert result.valid["mrr@5"] > 0.9
    assert result.test["mrr@5"] > 0.9
