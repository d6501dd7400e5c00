"""The fit loop: records, early stopping with best-weight restore, max_steps, throughput."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from recloop.algos.supervised import SupervisedConfig
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError, TrainingError
from recloop.training.callbacks import Callback, EarlyStopping, FitState
from recloop.training.checkpoint import FitProgress
from recloop.training.fit import FitConfig, fit

ENC = EncoderConfig(kind="mean", history=3, embedding_dim=8, hidden_dim=8)
QUIET = {"progress": False, "tensorboard": False}


def supervised(**kw: Any) -> SupervisedConfig:
    return SupervisedConfig(encoder=ENC, batch_size=16, **kw)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", -1, "fit.epochs must be >= 0"),
        ("metric", "ndcg@7", "fit.metric must be NAME@K"),
        ("metric", "auc@10", "fit.metric must be NAME@K"),
        ("device", "tpu", "fit.device must be one of"),
        ("patience", 0, "fit.patience must be >= 1"),
    ],
)
def test_fit_config_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FitConfig(**{field: value})  # type: ignore[arg-type]


def test_records_and_metrics_file(tiny_dataset: PreparedDataset, tmp_path: Path) -> None:
    rec = supervised().create()
    result = rec.fit(tiny_dataset, fit=FitConfig(epochs=3, **QUIET), run_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    n_train = 12 * 8
    assert all(r["transitions"] == n_train for r in lines)
    assert lines[-1]["step"] == 3 * 6  # 96 transitions / batch 16
    assert set(lines[0]["train"]) == {"loss"}
    assert "ndcg@10" in lines[0]["valid"]
    assert result.epochs == 3 and result.steps == 18 and result.transitions == 3 * n_train
    assert result.history == lines
    assert result.transitions_per_s > 0
    assert (tmp_path / "checkpoint" / "last.pt").is_file()
    assert (tmp_path / "checkpoint" / "best.pt").is_file()


def test_max_steps_stops_mid_epoch(tiny_dataset: PreparedDataset) -> None:
    rec = supervised().create()
    result = rec.fit(tiny_dataset, fit=FitConfig(epochs=5, max_steps=8, **QUIET))
    assert result.steps == 8
    assert result.epochs == 2
    assert result.history[-1]["transitions"] == 2 * 16


def test_early_stopping_counts_and_restores(tiny_dataset: PreparedDataset) -> None:
    algo = supervised().create().build(tiny_dataset, device="cpu")
    stopper = EarlyStopping(metric="ndcg@10", patience=3)
    state = FitState(algo=algo, progress=FitProgress(epoch=0, step=0, transitions=0), epochs=9)
    weights = []
    for epoch, value in enumerate([0.1, 0.3, 0.2, 0.25, 0.29], start=1):
        with torch.no_grad():
            algo.policy.item_embedding.weight.add_(1.0)
        weights.append(algo.policy.item_embedding.weight.detach().clone())
        record: dict[str, Any] = {"epoch": epoch, "valid": {"ndcg@10": value}}
        assert not state.stop
        stopper.on_epoch_end(state, record)
        assert record["best"] == (epoch in (1, 2))
    assert state.stop
    assert state.progress.best_epoch == 2 and state.progress.best_metric == 0.3
    assert state.progress.bad_epochs == 3
    stopper.on_fit_end(state)
    torch.testing.assert_close(algo.policy.item_embedding.weight, weights[1])


def test_fit_keeps_the_best_validation_epoch(tiny_dataset: PreparedDataset) -> None:
    rec = supervised(lr=0.05).create()
    result = rec.fit(tiny_dataset, fit=FitConfig(epochs=6, patience=None, **QUIET))
    values = [r["valid"]["ndcg@10"] for r in result.history]
    best = values.index(max(values)) + 1
    assert result.best_epoch == best
    assert result.best_metric == pytest.approx(max(values))
    # The final evaluation scores the restored weights: it reproduces the best epoch.
    assert result.valid["ndcg@10"] == pytest.approx(max(values), abs=1e-6)


def test_no_valid_split_trains_all_epochs(tiny_dataset: PreparedDataset) -> None:
    import dataclasses

    import numpy as np

    ds = dataclasses.replace(tiny_dataset, split=np.zeros_like(tiny_dataset.split))
    result = supervised().create().fit(ds, fit=FitConfig(epochs=2, **QUIET))
    assert result.epochs == 2 and result.best_epoch is None
    assert result.valid == {} and result.test == {}


def test_callbacks_see_every_epoch(tiny_dataset: PreparedDataset) -> None:
    seen: list[int] = []

    class Spy(Callback):
        def on_epoch_end(self, state: FitState, record: dict[str, Any]) -> None:
            seen.append(record["epoch"])

    rec = supervised().create()
    algo = rec.build(tiny_dataset, device="cpu")
    fit(algo, tiny_dataset, cfg=FitConfig(epochs=2, **QUIET), callbacks=[Spy()])
    assert seen == [1, 2]


def _poisoned(algo: Any, *, at: int, loss: bool) -> None:
    """Make update number ``at`` return a NaN loss, or leave NaN in a weight after it."""
    update = algo.update
    calls = [0]

    def wrapped(batch: Any) -> Any:
        calls[0] += 1
        stats = update(batch)
        if calls[0] == at:
            if loss:
                return dataclasses.replace(stats, loss=torch.tensor(float("nan")))
            with torch.no_grad():
                algo.policy.item_embedding.weight[1, 0] = float("inf")
        return stats

    algo.update = wrapped


def test_fit_stops_at_the_first_non_finite_loss(
    tiny_dataset: PreparedDataset, tmp_path: Path
) -> None:
    algo = supervised().create().build(tiny_dataset, device="cpu")
    _poisoned(algo, at=8, loss=True)  # 6 updates per epoch: the second update of epoch 2
    with pytest.raises(TrainingError, match=r"^loss became non-finite at epoch 2 step 8 \("):
        fit(algo, tiny_dataset, cfg=FitConfig(epochs=3, **QUIET), run_dir=tmp_path)
    # Epoch 1 was recorded; the broken epoch 2 was not.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1]


def test_fit_stops_when_the_weights_become_non_finite(tiny_dataset: PreparedDataset) -> None:
    algo = supervised().create().build(tiny_dataset, device="cpu")
    _poisoned(algo, at=6, loss=False)  # after the last update of epoch 1: its loss was finite
    with pytest.raises(
        TrainingError,
        match=r"^weights became non-finite at epoch 1 step 6 \(first: policy\.item_embedding",
    ):
        fit(algo, tiny_dataset, cfg=FitConfig(epochs=3, **QUIET))


def test_exploding_learning_rate_stops_training(tiny_dataset: PreparedDataset) -> None:
    with pytest.raises(TrainingError, match=r"loss became non-finite at epoch 1 step \d+"):
        supervised(lr=1e30).create().fit(tiny_dataset, fit=FitConfig(epochs=2, **QUIET))


def test_fit_refuses_non_finite_configs_from_python(tiny_dataset: PreparedDataset) -> None:
    with pytest.raises(ConfigError, match=r"^lr must be finite, got inf$"):
        supervised(lr=float("inf")).create().fit(tiny_dataset, fit=FitConfig(**QUIET))
    with pytest.raises(ConfigError, match=r"^fit\.min_delta must be finite, got nan$"):
        supervised().create().fit(tiny_dataset, fit=FitConfig(min_delta=float("nan"), **QUIET))


def test_bf16_mixed_precision_trains_finite_on_cpu(tiny_dataset: PreparedDataset) -> None:
    rec = supervised().create()
    result = rec.fit(tiny_dataset, fit=FitConfig(epochs=2, precision="bf16", **QUIET))
    assert result.steps > 0
    assert all(torch.isfinite(p).all() for p in rec.algo.networks()["policy"].parameters())
    with pytest.raises(ConfigError, match=r"fit\.precision must be fp32 or bf16"):
        FitConfig(precision="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_training(tiny_dataset: PreparedDataset) -> None:
    rec = supervised().create()
    result = rec.fit(
        tiny_dataset, fit=FitConfig(epochs=2, device="cuda", precision="bf16", **QUIET)
    )
    assert result.steps > 0 and result.valid
    assert next(rec.algo.networks()["policy"].parameters()).device.type == "cuda"
