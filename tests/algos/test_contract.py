"""Every registered algorithm × a few encoders: fit, recommend, save/load, ONNX export.

A new algorithm is covered by registering it in ``ALGOS``; nothing here names one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import recloop.algos  # noqa: F401  (fills the registry)
from recloop.algos.base import ALGOS, AlgoConfig, UpdateStats
from recloop.artifacts import load_artifact
from recloop.artifacts.export import check_onnx, example_inputs, export_onnx
from recloop.data.dataset import PreparedDataset
from recloop.data.sampler import TransitionSampler
from recloop.encoders.base import EncoderConfig
from recloop.training.fit import FitConfig

ENCODERS = ("mean", "gru", "concat")


def small_config(name: str, encoder: str) -> AlgoConfig:
    cls = ALGOS.get(name).config_class
    return dataclasses.replace(
        cls(),
        encoder=EncoderConfig(kind=encoder, history=4, embedding_dim=8, hidden_dim=8),
        batch_size=16,
    )


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("name", ALGOS.names())
def test_algorithm_contract(
    name: str, encoder: str, tiny_dataset: PreparedDataset, tmp_path: Path
) -> None:
    cfg = small_config(name, encoder)
    assert cfg.algo == name
    rec = cfg.create()
    result = rec.fit(
        tiny_dataset, fit=FitConfig(epochs=2, max_steps=4, progress=False, tensorboard=False)
    )
    algo = rec.algo
    assert algo is not None
    if algo.trainable:
        assert result.steps == 4
        batch = next(iter(TransitionSampler(tiny_dataset, history=4, batch_size=16)))
        algo.train(True)
        stats = algo.update(batch)
        assert isinstance(stats, UpdateStats)
        assert all(np.isfinite(v) for v in stats.to_dict().values())
    assert set(result.valid) >= {"hr@10", "ndcg@10", "mrr@10"}
    assert set(result.test) >= {"hr@10", "ndcg@10"}

    recs = rec.recommend(["u1", "u2", "nobody"], n=5)
    assert [len(r) for r in recs.items] == [5, 5, 5]
    assert recs.scores.shape == (3, 5)
    assert all(len(set(r)) == 5 for r in recs.items)
    consumed = set(np.asarray(tiny_dataset.item_ids)[tiny_dataset.item[tiny_dataset.user == 1] - 1])
    assert not consumed & set(recs.items[0])

    art_dir = rec.save(tmp_path / "run")
    art = load_artifact(tmp_path / "run")
    assert art.path == art_dir
    assert art.algo == name
    user, history, reward = example_inputs(rec.policy, batch=6)
    rec.policy.eval()
    with torch.inference_mode():
        expected = rec.policy(user, history, reward)
        got = art.policy(user, history, reward)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    onnx_path = export_onnx(art, tmp_path / "policy.onnx")
    assert check_onnx(onnx_path, art) < 1e-4
