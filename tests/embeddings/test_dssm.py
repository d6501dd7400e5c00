from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recloop.cli import main
from recloop.data.dataset import TRAIN, VALID, PreparedDataset, sha256_file
from recloop.embeddings import (
    DSSMConfig,
    dataset_ids_sha256,
    load_embeddings,
    pretrain_dssm,
    roc_auc,
    save_embeddings,
)
from recloop.embeddings.dssm import FeatureTable, pair_loss
from recloop.errors import ArtifactError, ConfigError, DataError

TwoGroups = Callable[..., PreparedDataset]

FAST = DSSMConfig(epochs=3, batch_size=64, lr=1e-2, hidden=(32,), id_dim=16, device="cpu")


# ------------------------------------------------------------------ pure functions


def test_auc_hand_computed() -> None:
    # positives 0.9 and 0.7 against negatives 0.8, 0.6, 0.5: 0.9 wins 3, 0.7 wins 2 of 6
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0])) == 5 / 6
    # ties count one half: positives 0.8, 0.5 against 0.5, 0.2 -> (1 + 1 + 0.5 + 1) / 4
    assert roc_auc(np.array([0.8, 0.5, 0.5, 0.2]), np.array([1, 1, 0, 0])) == 0.875
    assert roc_auc(np.array([0.3, 0.3]), np.array([True, False])) == 0.5
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_auc_against_all_pairs() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_pair_losses_hand_computed() -> None:
    pos = torch.tensor([0.5])
    neg = torch.tensor([[0.3, -0.2]])
    cos = DSSMConfig(loss="cosine", margin=0.1)
    assert pair_loss(pos, neg, cfg=cos).item() == pytest.approx((0.5 + 0.2 + 0.0) / 3)
    bce = DSSMConfig(loss="bce", scale=2.0)

    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    expected = (softplus(-1.0) + softplus(0.6) + softplus(-0.4)) / 3
    assert pair_loss(pos, neg, cfg=bce).item() == pytest.approx(expected, rel=1e-6)


def test_config_checks_name_the_field() -> None:
    with pytest.raises(ConfigError, match="neg_ratio"):
        DSSMConfig(neg_ratio=0)
    with pytest.raises(ConfigError, match="loss"):
        DSSMConfig(loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device"):
        DSSMConfig(device="tpu")


# ------------------------------------------------------------------ feature tables


def test_feature_table_from_frame() -> None:
    frame = pl.DataFrame(
        {
            "item": [3, 1],
            "category": pl.Series([2, None], dtype=pl.Int32),
            "genres": [[4, 1], [2]],
            "year": [1990.0, None],
        }
    )
    t = FeatureTable.from_frame(frame, key="item", rows=5, source="item_features")
    assert t.names == ("category", "genres", "year")
    assert t.categorical[:, 0].tolist() == [0, 0, 0, 2, 0]  # missing rows and nulls -> 0
    assert t.cardinality == (3,)
    assert t.multi[0].tolist() == [[0, 0], [2, 0], [0, 0], [4, 1], [0, 0]]
    assert t.multi_cardinality == (5,)
    assert t.numeric[:, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 0.0]  # one value: std 0 -> 0


def test_feature_table_errors_name_the_column() -> None:
    with pytest.raises(DataError, match="user_features: column 'city' has type String"):
        FeatureTable.from_frame(
            pl.DataFrame({"user": [1], "city": ["x"]}), key="user", rows=3, source="user_features"
        )
    with pytest.raises(DataError, match=r"column 'user' must hold indices 1\.\.2, found 3"):
        FeatureTable.from_frame(
            pl.DataFrame({"user": [3], "age": [1]}), key="user", rows=3, source="user_features"
        )
    with pytest.raises(DataError, match="negative code -2"):
        FeatureTable.from_frame(
            pl.DataFrame({"user": [1], "age": [-2]}), key="user", rows=3, source="user_features"
        )


# ------------------------------------------------------------------ training


def test_learns_two_groups_with_features(two_groups: TwoGroups) -> None:
    result = pretrain_dssm(two_groups(), FAST)
    assert [s.epoch for s in result.history] == [1, 2, 3]
    assert result.history[-1].valid_auc is not None and result.history[-1].valid_auc > 0.8
    users, items = result.user_embeddings, result.item_embeddings
    assert users.shape == (61, 32) and items.shape == (21, 32)
    assert torch.equal(users[0], torch.zeros(32)) and torch.equal(items[0], torch.zeros(32))
    torch.testing.assert_close(users[1:].norm(dim=1), torch.ones(60))
    torch.testing.assert_close(items[1:].norm(dim=1), torch.ones(20))
    # users score their own group's items above the other group's
    scores = users[1:] @ items[1:].T  # (60, 20)
    group = torch.arange(1, 61) % 2
    own = torch.where(group[:, None] == 0, scores[:, :10], scores[:, 10:]).mean()
    other = torch.where(group[:, None] == 0, scores[:, 10:], scores[:, :10]).mean()
    assert own > other + 0.3


@pytest.mark.parametrize("loss", ["bce", "cosine"])
def test_learns_two_groups_from_ids_alone(two_groups: TwoGroups, loss: str) -> None:
    cfg = DSSMConfig(
        epochs=12, batch_size=64, lr=1e-2, hidden=(32,), id_dim=16, loss=loss, device="cpu"
    )  # type: ignore[arg-type]
    result = pretrain_dssm(two_groups(features=False), cfg)
    auc = result.history[-1].valid_auc
    assert auc is not None and auc > 0.8
    assert result.history[0].valid_auc is not None and result.history[0].valid_auc < auc


def test_training_is_seeded_and_leaves_global_rng_alone(two_groups: TwoGroups) -> None:
    ds = two_groups()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = pretrain_dssm(ds, FAST)
    assert torch.equal(torch.rand(1), before)
    b = pretrain_dssm(ds, FAST)
    assert torch.equal(a.item_embeddings, b.item_embeddings)
    assert torch.equal(a.user_embeddings, b.user_embeddings)
    assert a.history == b.history
    c = pretrain_dssm(ds, DSSMConfig(**{**FAST.__dict__, "seed": 1}))
    assert not torch.equal(a.item_embeddings, c.item_embeddings)


def test_without_valid_split_reports_none(two_groups: TwoGroups) -> None:
    ds = two_groups()
    train_only = PreparedDataset.from_arrays(
        user=ds.user,
        item=ds.item,
        timestamp=ds.timestamp,
        n_users=ds.n_users,
        n_items=ds.n_items,
    )
    result = pretrain_dssm(train_only, DSSMConfig(**{**FAST.__dict__, "epochs": 1}))
    assert result.history[0].valid_loss is None and result.history[0].valid_auc is None


def test_no_train_events_is_a_data_error(two_groups: TwoGroups) -> None:
    ds = two_groups()
    valid_only = PreparedDataset.from_arrays(
        user=ds.user,
        item=ds.item,
        timestamp=ds.timestamp,
        split=np.full(ds.n_events, VALID),
    )
    with pytest.raises(DataError, match="no TRAIN events"):
        pretrain_dssm(valid_only, FAST)


# ------------------------------------------------------------------ files


def test_save_load_round_trip(two_groups: TwoGroups, tmp_path: Path) -> None:
    ds = two_groups()
    result = pretrain_dssm(ds, DSSMConfig(**{**FAST.__dict__, "epochs": 1}))
    out = save_embeddings(result, tmp_path / "emb")
    loaded = load_embeddings(out, dataset=ds)
    assert torch.equal(loaded.user_embeddings, result.user_embeddings)
    assert torch.equal(loaded.item_embeddings, result.item_embeddings)
    assert loaded.history == result.history
    assert loaded.config == result.config
    assert loaded.user_ids == ds.user_ids and loaded.item_ids == ds.item_ids
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shapes"] == {"user_embeddings": [61, 32], "item_embeddings": [21, 32]}
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))
    # the recorded hashes are those of the dataset's own id files once it is saved
    saved = PreparedDataset.load(ds.save(tmp_path / "data"))
    assert manifest["id_maps"]["item_ids.txt"] == sha256_file(tmp_path / "data" / "item_ids.txt")
    assert manifest["id_maps"]["user_ids.txt"] == dataset_ids_sha256(saved, "user")
    load_embeddings(out, dataset=saved)


def test_id_map_mismatch_names_both_hashes(two_groups: TwoGroups, tmp_path: Path) -> None:
    ds = two_groups()
    out = save_embeddings(pretrain_dssm(ds, DSSMConfig(**{**FAST.__dict__, "epochs": 1})), tmp_path)
    other = PreparedDataset.from_arrays(
        user=ds.user,
        item=ds.item,
        timestamp=ds.timestamp,
        split=ds.split,
        item_ids=[f"x{i}" for i in range(1, ds.n_items + 1)],
        user_ids=ds.user_ids,
    )
    ours = json.loads((out / "manifest.json").read_text())["id_maps"]["item_ids.txt"]
    theirs = dataset_ids_sha256(other, "item")
    with pytest.raises(
        ArtifactError, match=f"item_ids.txt sha256 {ours} does not match .*{theirs}"
    ):
        load_embeddings(out, dataset=other)


def test_changed_file_is_refused(two_groups: TwoGroups, tmp_path: Path) -> None:
    ds = two_groups()
    out = save_embeddings(pretrain_dssm(ds, DSSMConfig(**{**FAST.__dict__, "epochs": 1})), tmp_path)
    (out / "item_ids.txt").write_text("tampered\n")
    with pytest.raises(ArtifactError, match=r"item_ids.txt: sha256 .* does not match manifest"):
        load_embeddings(out)
    with pytest.raises(ArtifactError, match=r"no manifest\.json"):
        load_embeddings(tmp_path / "nowhere")


# ------------------------------------------------------------------ CLI


def test_cli_pretrain(
    two_groups: TwoGroups, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = two_groups().save(tmp_path / "data")
    out = tmp_path / "emb"
    args = [
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--set",
        "batch_size=64",
        "--set",
        "hidden=[16]",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("epoch 1/2: train loss ") and "valid AUC 0." in lines[0]
    assert lines[1].startswith("epoch 2/2")
    assert lines[2].startswith(f"embeddings saved to {out}")
    assert load_embeddings(out).config.hidden == (16,)

    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shapes"]["item_embeddings"] == [21, 32]
    assert [h["epoch"] for h in doc["history"]] == [1, 2]
    assert 0.0 <= doc["history"][-1]["valid_auc"] <= 1.0


def test_cli_pretrain_bad_field(
    two_groups: TwoGroups, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = two_groups().save(tmp_path / "data")
    args = ["pretrain", "--data", str(data), "--out", str(tmp_path / "e"), "--set", "neg_rato=3"]
    assert main(args) == 2
    assert "unknown field 'neg_rato'" in capsys.readouterr().err


# ------------------------------------------------------------------ real data


def ml100k_dataset(directory: Path) -> PreparedDataset:
    """ml-100k from its RecBole files: every rating an event, each user's last 10% VALID,
    users' age bucket / gender / occupation and items' year / genres as features."""
    inter = pl.read_csv(directory / "ml-100k.inter", separator="\t")
    inter.columns = [c.split(":")[0] for c in inter.columns]
    users = pl.read_csv(directory / "ml-100k.user", separator="\t", infer_schema=False)
    users.columns = [c.split(":")[0] for c in users.columns]
    items = pl.read_csv(
        directory / "ml-100k.item", separator="\t", infer_schema=False, quote_char=None
    )
    items.columns = [c.split(":")[0] for c in items.columns]
    user_ids = np.unique(inter["user_id"].to_numpy())
    item_ids = np.unique(inter["item_id"].to_numpy())
    u = np.searchsorted(user_ids, inter["user_id"].to_numpy()) + 1
    i = np.searchsorted(item_ids, inter["item_id"].to_numpy()) + 1
    ts = inter["timestamp"].to_numpy().astype(np.int64)
    order = np.lexsort((ts, u))
    u, i, ts = u[order], i[order], ts[order]
    counts = np.bincount(u)
    start = np.concatenate([[0], np.cumsum(counts)])[u]
    pos = np.arange(u.shape[0]) - start
    split = np.where(pos >= np.ceil(counts[u] * 0.9), VALID, TRAIN)

    def codes(values: pl.Series) -> np.ndarray:
        return values.cast(pl.String).rank("dense").fill_null(0).cast(pl.Int32).to_numpy()

    uidx = np.searchsorted(user_ids, users["user_id"].cast(pl.Int64).to_numpy()) + 1
    age = users["age"].cast(pl.Int32) // 10
    uf = pl.DataFrame(
        {
            "user": uidx,
            "age": codes(age),
            "gender": codes(users["gender"]),
            "occupation": codes(users["occupation"]),
        }
    )
    known = np.isin(items["item_id"].cast(pl.Int64).to_numpy(), item_ids)
    items = items.filter(pl.Series(known))
    genre_lists = items["class"].fill_null("").str.split(" ")
    vocab = sorted({g for gs in genre_lists.to_list() for g in gs if g})
    genres = genre_lists.list.eval(
        pl.element().replace_strict(vocab, range(1, len(vocab) + 1), default=None)
    ).list.drop_nulls()
    itf = pl.DataFrame(
        {
            "item": np.searchsorted(item_ids, items["item_id"].cast(pl.Int64).to_numpy()) + 1,
            "year": codes(items["release_year"]),
            "genres": genres,
        }
    )
    return PreparedDataset.from_arrays(
        user=u,
        item=i,
        timestamp=ts,
        split=split,
        user_ids=[str(x) for x in user_ids],
        item_ids=[str(x) for x in item_ids],
        user_features=uf,
        item_features=itf,
    )


@pytest.mark.slow
def test_ml100k_valid_auc(ml100k_dir: Path) -> None:
    ds = ml100k_dataset(ml100k_dir)
    assert ds.n_users == 943 and ds.n_items == 1682
    result = pretrain_dssm(ds, DSSMConfig(epochs=1, device="cpu"))
    auc = result.history[-1].valid_auc
    assert auc is not None and auc > 0.7, [s.valid_auc for s in result.history]
