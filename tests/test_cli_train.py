"""recloop train / evaluate / recommend / export / algos, through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.cli import main
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset

FAST = [
    "--set", "encoder.kind=mean",
    "--set", "encoder.history=3",
    "--set", "encoder.embedding_dim=8",
    "--set", "batch_size=16",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n_users, n_items, length = 10, 12, 8
    t = np.arange(length)
    start = np.arange(n_users) % n_items
    ds = PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, n_users + 1), length),
        item=((start[:, None] + t[None, :]) % n_items + 1).ravel(),
        timestamp=np.tile(t, n_users),
        split=np.tile(
            np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
        ),
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"m{i}" for i in range(1, n_items + 1)],
    )
    return ds.save(tmp_path_factory.mktemp("cli") / "data")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--no-progress", "-q", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for algo in ("popularity", "supervised"):
        code = main(
            ["--no-progress", "-q", "train", "--algo", algo, "--data", str(data_dir),
             "--out", str(base / algo), "--epochs", "2", *FAST]
        )  # fmt: skip
        assert code == 0
        out[algo] = base / algo
    return out


def test_train_json(capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path) -> None:
    code, out, _ = run(
        capsys, "train", "--algo", "reinforce", "--data", data_dir, "--out", tmp_path / "r",
        "--epochs", "1", "--json", *FAST,
    )  # fmt: skip
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"valid", "test"}
    assert 0.0 <= doc["test"]["hr@10"] <= 1.0 and "ndcg@10" in doc["valid"]
    assert (tmp_path / "r" / "artifact" / "manifest.json").is_file()


def test_train_bad_config_names_the_field(
    capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "train", "--algo", "reinforce", "--data", data_dir, "--out", tmp_path / "r",
        "--set", "weight_cap=-1",
    )  # fmt: skip
    assert code == 2
    assert "weight_cap must be > 0" in err
    code, _, err = run(
        capsys, "train", "--algo", "nosuchalgo", "--data", data_dir, "--out", tmp_path
    )
    assert code == 2 and "unknown algorithm 'nosuchalgo'" in err


def test_evaluate_table_and_json(capsys: pytest.CaptureFixture[str], runs: dict[str, Path]) -> None:
    code, out, _ = run(capsys, "evaluate", runs["popularity"], runs["supervised"])
    assert code == 0
    assert "popularity" in out and "supervised" in out and "ndcg@10" in out
    assert "MASKED: consumed items masked" in out and "UNMASKED: nothing removed" in out
    code, out, _ = run(
        capsys, "evaluate", *runs.values(), "--json", "--no-mask", "--split", "valid"
    )
    doc = json.loads(out)
    assert doc["split"] == "valid" and doc["mask_consumed"] is False
    assert [r["algo"] for r in doc["runs"]] == ["popularity", "supervised"]
    results = json.loads((runs["supervised"] / "results.json").read_text())
    code, out, _ = run(capsys, "evaluate", runs["supervised"], "--json")
    both = json.loads(out)
    assert both["protocol"] == "both" and both["mask_consumed"] is True
    again = both["runs"][0]["metrics"]
    assert again["ndcg@10"] == pytest.approx(results["test"]["ndcg@10"], abs=1e-6)
    code, out, _ = run(capsys, "evaluate", runs["supervised"], "--json", "--protocol", "unmasked")
    unmasked = json.loads(out)["runs"][0]["metrics"]
    assert unmasked == both["runs"][0]["metrics_unmasked"]
    assert unmasked["hr@10"] != again["hr@10"]


def test_recommend(capsys: pytest.CaptureFixture[str], runs: dict[str, Path]) -> None:
    code, out, _ = run(capsys, "recommend", runs["supervised"], "--user", "u1", "-n", "3", "--json")
    assert code == 0
    doc = json.loads(out)
    assert len(doc["items"]) == 3 and doc["known_user"] is True
    assert doc["history_from"].endswith("data")
    consumed = {f"m{i}" for i in range(1, 9)}  # user 1 walked items 1..8
    assert not consumed & set(doc["items"])
    code, out, _ = run(
        capsys, "recommend", runs["supervised"], "--user", "u1", "--history", "m1,m2"
    )
    lines = out.strip().splitlines()
    assert len(lines) == 10 and lines[0].split()[0] == "1"
    assert not {"m1", "m2"} & {line.split()[1] for line in lines}
    code, _, err = run(capsys, "recommend", runs["supervised"], "--user", "u1", "--history", "zz")
    assert code == 2 and "item 'zz'" in err


def test_export_onnx(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "export", runs["supervised"], "--out", tmp_path / "p.onnx")
    assert code == 0 and "onnxruntime matches PyTorch" in out
    assert (tmp_path / "p.onnx").stat().st_size > 0
    code, _, err = run(
        capsys, "export", runs["supervised"], "--format", "tflite", "--out", tmp_path / "x"
    )
    assert code == 2 and "--format must be one of" in err


def test_algos_lists_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "algos", "reinforce")
    assert code == 0
    assert "top_k (int, default 10)" in out and "lambda_K" in out and "fit.epochs" in out
    code, out, _ = run(capsys, "algos", "--json")
    doc = json.loads(out)
    assert {"popularity", "reinforce", "supervised"} <= set(doc["algos"])


def test_evaluate_refuses_other_data(
    capsys: pytest.CaptureFixture[str], runs: dict[str, Path], tmp_path: Path
) -> None:
    other = PreparedDataset.from_arrays(
        user=np.array([1, 1, 1]),
        item=np.array([1, 2, 3]),
        timestamp=np.arange(3),
        split=np.array([TRAIN, VALID, TEST]),
        user_ids=["someone"],
        item_ids=["a", "b", "c"],
    ).save(tmp_path / "other")
    code, _, err = run(capsys, "evaluate", runs["supervised"], "--data", other)
    assert code == 2 and "trained on other data" in err


def test_evaluate_with_ope(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "evaluate", runs["popularity"], runs["supervised"], "--ope", "--json",
        "--ope-set", "n_boot=50", "--ope-set", "behaviour_epochs=1",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    for r in doc["runs"]:
        ope = r["ope"]
        assert set(ope["estimates"]) >= {"ips", "snips", "dr"}
        assert ope["n_events"] == 10  # one test event per user
        for est in ope["estimates"].values():
            assert est["low"] <= est["value"] <= est["high"]
        assert ope["behaviour"] == "fitted"  # neither run has a REINFORCE beta head
    code, out, err = run(capsys, "evaluate", runs["supervised"], "--ope", "--ope-set", "nope=1")
    assert code == 2
    assert "unknown field 'nope'" in err


def test_train_from_pretrained_embeddings(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = tmp_path / "dssm"
    code, _, err = run(
        capsys, "pretrain", "--data", data_dir, "--out", emb, "--epochs", "1",
        "--set", "embedding_dim=8", "--set", "hidden=[16]",
    )  # fmt: skip
    assert code == 0, err
    frozen = [*FAST, "--set", "encoder.freeze_item_embeddings=true"]
    code, _, err = run(
        capsys, "train", "--algo", "supervised", "--data", data_dir, "--out", tmp_path / "r",
        "--epochs", "1", "--pretrained", emb, *frozen,
    )  # fmt: skip
    assert code == 0, err
    from recloop.artifacts import load_artifact
    from recloop.embeddings import load_embeddings

    pre = load_embeddings(emb)
    art = load_artifact(tmp_path / "r")
    # The tables start from the pretrained ones: frozen item embeddings stay exactly there.
    assert torch.equal(art.policy.item_embedding.weight.detach(), pre.item_embeddings.float())
    code, _, err = run(
        capsys, "train", "--algo", "supervised", "--data", data_dir, "--out", tmp_path / "r2",
        "--epochs", "1", "--pretrained", emb, *FAST, "--set", "encoder.embedding_dim=4",
    )  # fmt: skip
    assert code == 2
    assert "embedding_dim" in err
