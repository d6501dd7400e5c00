"""The approximate item index: built from an artifact, verified at load, exact when the
search is exhaustive, and refused for heads that are not an inner product."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, load_artifact, save_artifact
from recloop.artifacts.ann import INDEX_FILE, IndexConfig, build_index, load_index, mips_form
from recloop.cli import main
from recloop.encoders.base import EncoderConfig
from recloop.errors import ArtifactError
from recloop.serving.service import LoadedModel

faiss = pytest.importorskip("faiss")

N_USERS, N_ITEMS, H = 20, 300, 4


def make_artifact(directory: Path, head: HeadConfig, *, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec = PolicySpec(
        n_users=N_USERS,
        n_items=N_ITEMS,
        encoder=EncoderConfig(kind="concat", history=H, embedding_dim=16),
        head=head,
    )
    return save_artifact(
        directory,
        algo="test",
        config={"seed": seed},
        policy=PolicyNet(spec),
        popularity=np.arange(N_ITEMS + 1, dtype=np.float32),
        user_ids=[f"u{i}" for i in range(1, N_USERS + 1)],
        item_ids=[f"i{i}" for i in range(1, N_ITEMS + 1)],
    )


def requests(b: int = 12, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    history = rng.integers(1, N_ITEMS + 1, (b, H)).astype(np.int64)
    history[: b // 3, :2] = 0  # some short histories
    ex_rows = np.repeat(np.arange(b, dtype=np.int64), H)
    return {
        "user": rng.integers(0, N_USERS + 1, b).astype(np.int64),
        "history": history,
        "history_reward": rng.random((b, H)).astype(np.float32),
        "exclude_rows": ex_rows,
        "exclude_cols": history.reshape(-1),  # consumed items masked (0 = padding is harmless)
    }


HEADS = {
    "dot": HeadConfig(kind="dot", hidden_dims=(32,)),
    "cosine": HeadConfig(kind="dot", similarity="cosine", bound_action=False),
    "linear": HeadConfig(kind="linear", hidden_dims=(32,)),
}


@pytest.mark.parametrize("head", list(HEADS))
def test_exhaustive_index_gives_the_exact_top_k(tmp_path: Path, head: str) -> None:
    """IVF probing every list, with every item a candidate: the same lists and scores as
    scoring the whole catalogue, masked items included."""
    art = make_artifact(tmp_path / "a", HEADS[head])
    build_index(art, IndexConfig(kind="ivf", nlist=8, nprobe=8))
    exact = LoadedModel.load(art, search="exact")
    ann = LoadedModel.load(art, search="ann", ann_margin=N_ITEMS)
    assert exact.ann is None and ann.ann is not None
    req = requests()
    for k in (1, 10, 50):
        i_exact, v_exact = exact.score(**req, k=k)
        i_ann, v_ann = ann.score_ann(**req, k=k)
        np.testing.assert_array_equal(i_ann, i_exact)
        np.testing.assert_allclose(v_ann, v_exact, rtol=1e-5, atol=1e-6)
        consumed = req["history"]
        assert not any(set(i_ann[r]) & set(consumed[r][consumed[r] > 0]) for r in range(len(i_ann)))


def test_hnsw_recall_on_a_small_catalogue(tmp_path: Path) -> None:
    """The graph index with the default margin finds (nearly) every exact top-10 item."""
    art = make_artifact(tmp_path / "a", HEADS["dot"])
    build_index(art, IndexConfig(kind="hnsw", m=16, ef_construction=100, ef_search=64))
    exact = LoadedModel.load(art, search="exact")
    ann = LoadedModel.load(art)  # auto: the index is used when present
    assert ann.ann is not None and ann.ann.kind == "hnsw"
    req = requests(b=30)
    i_exact, _ = exact.score(**req, k=10)
    i_ann, _ = ann.score_ann(**req, k=10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(i_ann, i_exact, strict=True)])
    assert recall >= 0.95


def test_index_is_recorded_and_leaves_the_model_version(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a", HEADS["dot"])
    before = load_artifact(art).model_version
    built = build_index(art, IndexConfig(kind="hnsw", m=8))
    loaded = load_artifact(art)
    assert loaded.model_version == before
    section = loaded.manifest["index"]
    assert section["kind"] == "hnsw" and section["n_items"] == N_ITEMS and section["dim"] == 16
    assert section["weights_sha256"] == loaded.manifest["weights_sha256"]
    assert built.path == art / INDEX_FILE
    index = load_index(loaded)
    assert index is not None and index.index.ntotal == N_ITEMS


def test_tampered_index_is_refused_in_one_line(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a", HEADS["dot"])
    build_index(art, IndexConfig(kind="hnsw", m=8))
    data = bytearray((art / INDEX_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (art / INDEX_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256") as err:
        LoadedModel.load(art)
    assert "\n" not in str(err.value) and INDEX_FILE in str(err.value)
    # exact serving does not read the index at all
    assert LoadedModel.load(art, search="exact").ann is None


def test_index_of_other_weights_is_refused(tmp_path: Path) -> None:
    a = make_artifact(tmp_path / "a", HEADS["dot"], seed=0)
    b = make_artifact(tmp_path / "b", HEADS["dot"], seed=1)
    build_index(a, IndexConfig(kind="hnsw", m=8))
    shutil.copy(a / INDEX_FILE, b / INDEX_FILE)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["index"] = json.loads((a / "manifest.json").read_text())["index"]
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built from other weights") as err:
        LoadedModel.load(b)
    assert "\n" not in str(err.value)


def test_manifest_index_section_is_schema_checked(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a", HEADS["dot"])
    build_index(art, IndexConfig(kind="hnsw", m=8))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["index"]["kind"] = "lsh"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"index\.kind"):
        load_artifact(art)


def test_search_ann_without_an_index_is_refused(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a", HEADS["dot"])
    with pytest.raises(ArtifactError, match="no index"):
        LoadedModel.load(art, search="ann")
    assert LoadedModel.load(art).ann is None  # auto without an index: exact


@pytest.mark.parametrize("kind", ["popularity", "bcq_discrete"])
def test_heads_that_are_no_inner_product_are_refused(tmp_path: Path, kind: str) -> None:
    art = make_artifact(tmp_path / "a", HeadConfig(kind=kind))
    with pytest.raises(ArtifactError, match=f"head '{kind}' is not an inner product"):
        mips_form(load_artifact(art).policy)
    assert main(["-q", "index", "build", str(art)]) == 2
    assert not (art / INDEX_FILE).exists()


def test_cli_builds_an_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    art = make_artifact(tmp_path / "a", HEADS["linear"])
    assert main(["-q", "index", "build", str(art), "--kind", "ivf", "--nlist", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "ivf" and out["params"]["nlist"] == 4 and out["dim"] == 33  # 32 + bias
    assert load_index(load_artifact(art)) is not None
    assert main(["-q", "index", "build", str(art), "--kind", "lsh"]) == 2


def test_tune_changes_the_search_effort_without_a_rebuild(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "a", HEADS["dot"])
    assert main(["-q", "index", "tune", str(art), "5"]) == 2  # no index yet
    build_index(art, IndexConfig(kind="ivf", nlist=8, nprobe=2))
    before = (art / INDEX_FILE).read_bytes()
    assert main(["-q", "index", "tune", str(art), "6"]) == 0
    assert (art / INDEX_FILE).read_bytes() == before
    index = load_index(load_artifact(art))
    assert index is not None and index.params["nprobe"] == 6
    assert faiss.extract_index_ivf(index.index).nprobe == 6
