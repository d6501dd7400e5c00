"""``recloop simulate`` end to end on a tiny saved artifact and prepared dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import recloop.cli.simulate  # noqa: F401  (registers the command until cli/__init__ imports it)
from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.cli import main
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.encoders.base import EncoderConfig


@pytest.fixture
def run_and_data(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    n_users, n_items, length = 8, 12, 10
    t = np.arange(length)
    split = np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN))
    ds = PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, n_users + 1), length),
        item=rng.integers(1, n_items + 1, n_users * length),
        timestamp=np.tile(t, n_users),
        reward=rng.uniform(0, 2, n_users * length),
        split=np.tile(split, n_users),
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )
    data = ds.save(tmp_path / "data")
    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=n_users,
        n_items=n_items,
        encoder=EncoderConfig(kind="mean", history=3, embedding_dim=8),
        head=HeadConfig(),
    )
    run = tmp_path / "run"
    save_artifact(
        run / "artifact", algo="supervised", config={}, policy=PolicyNet(spec).eval(),
        popularity=np.zeros(n_items + 1, np.float32), user_ids=ds.user_ids, item_ids=ds.item_ids,
    )  # fmt: skip
    return run, data


def test_simulate_json(run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, data = run_and_data
    args = ["simulate", str(run), "--data", str(data), "--horizon", "5", "--users", "6"]
    code = main([*args, "--set", "epochs=2", "--set", "history=4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["algo"] == "supervised"
    assert out["config"]["horizon"] == 5 and out["config"]["history"] == 4
    assert 0.0 <= out["accuracy"]["auc"] <= 1.0 and out["accuracy"]["n_events"] == 8
    modes = {(m["repeats"], m["quit"]): m for m in out["modes"]}
    assert set(modes) == {(True, False), (True, True), (False, False), (False, True)}
    assert all(m["n_users"] == 6 for m in modes.values())
    assert modes[(True, False)]["session_length"] == 5.0
    assert modes[(False, False)]["distinct_ratio"] == 1.0
    assert modes[(True, True)]["session_length"] <= 5.0


def test_simulate_table_and_errors(
    run_and_data: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = run_and_data
    assert (
        main(["simulate", str(run), "--data", str(data), "--horizon", "3", "--set", "epochs=1"])
        == 0
    )
    out = capsys.readouterr().out
    assert "AUC" in out and "repeats" in out
    assert len([line for line in out.splitlines() if line.startswith(("yes", "no"))]) == 4
    assert main(["simulate", str(run), "--data", str(data), "--set", "patience=0"]) == 2
    assert "patience" in capsys.readouterr().err
    assert main(["simulate", str(run)]) == 2  # no recorded dataset path and no --data
    assert "--data" in capsys.readouterr().err
