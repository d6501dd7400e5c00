"""The serving bundle: save/load round trip and the checks that refuse a damaged one."""

from __future__ import annotations

import hashlib
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
from recloop.artifacts.manifest import model_version_of
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


def test_model_version_hashes_what_changes_behaviour(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    m = json.loads((directory / "manifest.json").read_text())
    payload = {
        "algo": "supervised",
        "config": {"lr": 0.1},
        "policy": m["policy"],
        "weights_sha256": hashlib.sha256(
            (directory / "weights.safetensors").read_bytes()
        ).hexdigest(),
        "id_maps": {
            "user_ids.txt": hashlib.sha256(b"a\nb\nc\n").hexdigest(),
            "item_ids.txt": hashlib.sha256(b"x\ny\nz\nw\nv\n").hexdigest(),
        },
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    expected = "supervised-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    assert m["model_version"] == expected == load_artifact(directory).model_version


@pytest.mark.parametrize(
    ("field", "value", "changes"),
    [
        ("config", {"lr": 0.2}, True),
        ("policy", {"n_users": 4}, True),
        ("weights_sha256", "0" * 64, True),
        ("id_maps", {"item_ids.txt": "1" * 64}, True),
        ("algo", "dqn", True),
        ("metrics", {"test": {"hr@10": 0.9}}, False),
        ("dataset", {"path": "/elsewhere"}, False),
        ("created_at", "1999-01-01T00:00:00+00:00", False),
    ],
)
def test_model_version_inputs(tmp_path: Path, field: str, value: object, changes: bool) -> None:
    _, directory = saved(tmp_path)
    m = json.loads((directory / "manifest.json").read_text())
    edited = dict(m)
    edited[field] = {**m[field], **value} if isinstance(value, dict) else value
    assert (model_version_of(edited) != model_version_of(m)) is changes


EMB = r"policy\.item_embedding\.weight"


@pytest.mark.parametrize(
    ("target", "value", "message"),
    [
        ("item_embedding", float("nan"), rf"tensor '{EMB}' holds 1 NaN"),
        ("item_embedding", float("-inf"), rf"tensor '{EMB}' holds 0 NaN and 1 inf"),
        ("popularity", float("inf"), r"tensor 'popularity' holds 0 NaN and 1 inf of 6 values"),
    ],
)  # fmt: skip
def test_save_refuses_non_finite_tensors(
    tmp_path: Path, target: str, value: float, message: str
) -> None:
    policy, _ = saved(tmp_path / "ok")
    pop = np.array([0, 3, 1, 0, 2, 5], np.float32)
    if target == "popularity":
        pop[2] = value
    else:
        with torch.no_grad():
            policy.item_embedding.weight[2, 1] = value
    with pytest.raises(ArtifactError, match="refusing to save non-finite weights: " + message):
        save_artifact(
            tmp_path / "bad", algo="supervised", config={}, policy=policy, popularity=pop,
            user_ids=["a", "b", "c"], item_ids=["x", "y", "z", "w", "v"],
        )  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_save_refuses_repeated_ids(tmp_path: Path) -> None:
    policy, _ = saved(tmp_path / "ok")
    with pytest.raises(ArtifactError, match=r"item_ids\.txt: duplicate id 'y' on lines 2 and 5"):
        save_artifact(
            tmp_path / "bad", algo="supervised", config={}, policy=policy,
            popularity=np.zeros(6, np.float32), user_ids=["a", "b", "c"],
            item_ids=["x", "y", "z", "w", "y"],
        )  # fmt: skip


def test_non_finite_metrics_are_saved_as_null(tmp_path: Path) -> None:
    policy, _ = saved(tmp_path / "ok")
    directory = save_artifact(
        tmp_path / "a", algo="supervised", config={}, policy=policy,
        popularity=np.zeros(6, np.float32), user_ids=["a", "b", "c"],
        item_ids=["x", "y", "z", "w", "v"], metrics={"test": {"hr@10": float("nan"), "n": 2.5}},
    )  # fmt: skip
    assert load_artifact(directory).manifest["metrics"] == {"test": {"hr@10": None, "n": 2.5}}


def test_refuses_format_1_with_a_hint(tmp_path: Path) -> None:
    _, directory = saved(tmp_path)
    m = json.loads((directory / "manifest.json").read_text())
    m["format_version"] = 1
    (directory / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"format_version 1, this recloop reads 2 \(re-save"):
        load_artifact(directory)
