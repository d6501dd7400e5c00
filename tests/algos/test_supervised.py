"""Supervised next-item baseline: one update, learning a deterministic walk."""

from __future__ import annotations

import pytest
import torch

from recloop.algos.base import DatasetSpec
from recloop.algos.supervised import Supervised, SupervisedConfig
from recloop.data.dataset import PreparedDataset
from recloop.data.sampler import TransitionSampler
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError
from recloop.training.fit import FitConfig

ENC = EncoderConfig(kind="mean", history=2, embedding_dim=16, hidden_dim=16, use_user=False)


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="sampled_softmax must be >= 1"):
        SupervisedConfig(sampled_softmax=0)
    with pytest.raises(ConfigError, match="proposal must be one of"):
        SupervisedConfig(proposal="x")


@pytest.mark.parametrize("sampled", [None, 5])
def test_update_lowers_cross_entropy(tiny_dataset: PreparedDataset, sampled: int | None) -> None:
    torch.manual_seed(0)
    cfg = SupervisedConfig(encoder=ENC, lr=0.02, sampled_softmax=sampled)
    algo = Supervised(cfg, DatasetSpec.from_dataset(tiny_dataset), device=torch.device("cpu"))
    batch = next(iter(TransitionSampler(tiny_dataset, history=2, batch_size=64)))
    algo.train(True)
    first = float(algo.update(batch).loss)
    # Full softmax over 16 slots at initialisation: about log 16.
    if sampled is None:
        assert first == pytest.approx(torch.log(torch.tensor(16.0)).item(), abs=0.3)
    for _ in range(40):
        last = float(algo.update(batch).loss)
    assert last < first - 1.0


def test_learns_the_walk(tiny_dataset: PreparedDataset) -> None:
    """Next item = last item + 1: a fitted model ranks it first for every user."""
    cfg = SupervisedConfig(encoder=ENC, lr=0.05, batch_size=16)
    rec = cfg.create()
    result = rec.fit(
        tiny_dataset,
        fit=FitConfig(epochs=40, patience=None, progress=False, tensorboard=False),
    )
    assert result.valid["mrr@5"] > 0.9
    assert result.test["mrr@5"] > 0.9
