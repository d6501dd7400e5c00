"""The serving bundle: save/load round trip and the checks that refuse a damaged one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.artifacts import (
    HeadConfig,
    PolicyNet,
    PolicySpec,
    load_artifact,
    read_manifest,
    resolve_artifact_dir,
    save_artifact,
)
from recloop.encoders.base import EncoderConfig
from recloop.errors import ArtifactError


def saved(tmp_path: Path) -> tuple[PolicyNet, Path]:
    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=3,
        n_items=5,
        encoder=EncoderConfig(kind="gru", history=4, embedding_dim=8, hidden_dim=8),
        head=HeadConfig(),
    )
    policy = PolicyNet(spec).eval()
    directory = save_artifact(
        tmp_path / "run" / "artifact",
        algo="supervised",
        config={"lr": 0.1},
        policy=policy,
        popularity=np.array([0, 3, 1, 0, 2, 5], np.float32),
        user_ids=["a", "b", "c"],
        item_ids=["x", "y", "z", "w", "v"],
        dataset_summary={"n_users": 3},
        metrics={"test": {"hr@10": 0.5}},
    )
    return policy, directory


def test_round_trip(tmp_path: Path) -> None:
    policy, directory = saved(tmp_path)
    art = load_artifact(tmp_path / "run")  # a run directory works too
    assert art.path == directory == resolve_artifact_dir(tmp_path / "run")
    assert art.algo == "supervised" and art.history_len == 4 and art.n_items == 5
    assert art.item_index == {"x": 1, "y": 2, "z": 3, "w": 4, "v": 5}
    assert art.model_version.startswith("supervised-") and len(art.model_version) == 23
    np.testing.assert_array_equal(art.popularity, [0, 3, 1, 0, 2, 5])
    user = torch.tensor([1, 0])
    history = torch.tensor([[0, 0, 1, 2], [3, 4, 5, 1]])
    reward = (history != 0).float()
    torch.testing.assert_close(art.policy(user, history, reward), policy(user, history, reward))
    idx, _ = art.recommend(
        user, history, n=3, exclude=torch.nn.functional.one_hot(history, 6).any(1).bool()
    )
    assert idx.shape == (2, 3)
    assert not set(idx[0].tolist()) & {0, 1, 2}
    assert read_manifest(directory)["metrics"]["test"]["hr@10"] == 0.5


def test_refuses_changed_files(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    (directory / "item_ids.txt").write_text("x\ny\nz\nw\nQ\n")
    with pytest.raises(ArtifactError, match=r"item_ids\.txt: sha256"):
        load_artifact(directory)


def test_refuses_other_format_version(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    m = json.loads((directory / "manifest.json").read_text())
    m["format_version"] = 99
    (directory / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="format_version 99"):
        load_artifact(directory)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such artifact"):
        load_artifact(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_artifact(tmp_path)
