"""The Recommender API and train_run: fit → recommend → save → run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.algos.supervised import SupervisedConfig
from recloop.artifacts import load_artifact
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError, DataError, TrainingError
from recloop.training.fit import FitConfig
from recloop.training.recommender import (
    Recommender,
    consumed_mask,
    pad_histories,
    train_run,
    user_histories,
)

ENC = EncoderConfig(kind="mean", history=3, embedding_dim=8, hidden_dim=8)
QUIET = FitConfig(epochs=2, progress=False, tensorboard=False)
FAST = ["encoder.kind=mean", "encoder.history=3", "encoder.embedding_dim=8", "batch_size=16"]


def test_user_histories_and_consumed(tiny_dataset: PreparedDataset) -> None:
    users = np.array([1, 0, 3])
    hist, rew = user_histories(tiny_dataset, users, history=3)
    u1 = tiny_dataset.item[tiny_dataset.user == 1]
    assert hist[0].tolist() == u1[-3:].tolist()
    assert hist[1].tolist() == [0, 0, 0] and rew[1].tolist() == [0, 0, 0]
    mask = consumed_mask(tiny_dataset, users)
    assert mask.shape == (3, 16)
    assert set(torch.nonzero(mask[0]).flatten().tolist()) == set(u1.tolist())
    assert not mask[1].any()
    assert pad_histories([[5, 6], [1, 2, 3, 4]], history=3).tolist() == [[0, 5, 6], [2, 3, 4]]


def test_recommend_before_fit_is_an_error() -> None:
    with pytest.raises(ConfigError, match="not fitted yet"):
        SupervisedConfig().create().recommend(["u1"])


def test_recommend_with_explicit_history(tiny_dataset: PreparedDataset) -> None:
    rec = SupervisedConfig(encoder=ENC, batch_size=16).create()
    rec.fit(tiny_dataset, fit=QUIET)
    out = rec.recommend(["u1", "new"], n=4, histories=[["i3", "i4"], []])
    assert all(len(r) == 4 for r in out.items)
    assert not {"i3", "i4"} & set(out.items[0])
    assert np.all(np.diff(out.scores, axis=1) <= 0)
    with pytest.raises(DataError, match="unknown item id 'zz'"):
        rec.recommend(["u1"], histories=[["zz"]])


def test_create_checks_the_config_class() -> None:
    class Wrong(SupervisedConfig):
        algo = "reinforce"

    with pytest.raises(ConfigError, match="is not the config of 'reinforce'"):
        Recommender(Wrong())


def test_train_run_writes_a_run_directory(tiny_dataset: PreparedDataset, tmp_path: Path) -> None:
    data = tiny_dataset.save(tmp_path / "data")
    run = tmp_path / "run"
    result = train_run("supervised", data, run, epochs=2, overrides=[*FAST, "fit.progress=false"])
    assert result.epochs == 2 and result.artifact == run / "artifact"
    saved = json.loads((run / "run.json").read_text())
    assert saved["algo"] == "supervised" and saved["config"]["encoder"]["kind"] == "mean"
    assert saved["fit"]["epochs"] == 2 and saved["data"] == str(data.resolve())
    results = json.loads((run / "results.json").read_text())
    assert results["test"] == pytest.approx(result.test)
    art = load_artifact(run)
    assert art.manifest["metrics"]["test"] == pytest.approx(result.test)
    assert art.manifest["dataset"]["path"] == str(data.resolve())
    assert art.manifest["config"]["batch_size"] == 16

    with pytest.raises(ConfigError, match="already holds a run"):
        train_run("supervised", data, run, epochs=1, overrides=FAST)
    resumed = train_run("supervised", data, run, epochs=3, resume=True)
    assert resumed.epochs == 3 and resumed.steps == result.steps + 6
    again = train_run("supervised", data, run, epochs=1, overrides=FAST, overwrite=True)
    assert again.epochs == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1


def test_train_run_validates_before_reading_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown field 'lrr'"):
        train_run("reinforce", tmp_path / "missing", tmp_path / "run", overrides=["lrr=1"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(DataError, match="not a prepared dataset"):
        train_run("reinforce", tmp_path / "missing", tmp_path / "run")


def test_train_run_that_diverges_writes_no_artifact(
    tiny_dataset: PreparedDataset, tmp_path: Path
) -> None:
    data = tiny_dataset.save(tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became non-finite at epoch 1 step \d+"):
        train_run("supervised", data, run, epochs=2, overrides=[*FAST, "lr=1e30"])
    assert not (run / "artifact").exists() and not (run / "results.json").exists()


@pytest.mark.parametrize(
    ("lr", "message"),
    [
        ("inf", r"error: --set: lr must be finite, got inf"),
        ("1e30", r"error: loss became non-finite at epoch 1 step \d+ \(loss = nan\); .*"),
    ],
)
def test_cli_train_refuses_non_finite_training(
    tiny_dataset: PreparedDataset,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    lr: str,
    message: str,
) -> None:
    from recloop.cli import main

    data = tiny_dataset.save(tmp_path / "data")
    args = ["train", "--algo", "supervised", "--data", data, "--out", tmp_path / "run"]
    sets = [x for s in [*FAST, f"lr={lr}"] for x in ("--set", s)]
    code = main(["--no-progress", "-q", *map(str, args), *sets])
    err = capsys.readouterr().err
    assert code == 2
    assert re.fullmatch(message, err.strip()), err
    assert not (tmp_path / "run" / "artifact").exists()
