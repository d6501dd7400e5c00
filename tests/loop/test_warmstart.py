"""Warm start across grown id maps: old ids keep their rows, new ids get fresh ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recloop.algos.supervised import SupervisedConfig
from recloop.artifacts.bundle import load_artifact
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.loop.warmstart import id_axes, row_map, warm_start, warm_state


def _dataset(user_ids: list[str], item_ids: list[str]) -> PreparedDataset:
    n_u, n_i = len(user_ids), len(item_ids)
    user = np.repeat(np.arange(1, n_u + 1), 2)
    item = (np.arange(user.shape[0]) % n_i) + 1
    return PreparedDataset.from_arrays(
        user=user,
        item=item,
        timestamp=np.arange(user.shape[0]) * 10,
        n_users=n_u,
        n_items=n_i,
        user_ids=user_ids,
        item_ids=item_ids,
    )


def test_row_map_matches_raw_ids_in_new_order() -> None:
    m = row_map(["a", "b", "c"], ["c", "x", "a"])
    assert m.new.tolist() == [0, 1, 3]  # row 0, then c (new 1) and a (new 3)
    assert m.old.tolist() == [0, 3, 1]
    assert m.shared == 2


def test_id_axes_finds_the_item_and_user_tables() -> None:
    spec = PolicySpec(
        n_users=4,
        n_items=6,
        encoder=EncoderConfig(kind="mean", history=3, embedding_dim=5),
        head=HeadConfig(kind="linear"),
    )
    axes = id_axes(spec)
    assert axes["item_embedding.weight"] == ("item", 0)
    assert axes["user_embedding.weight"] == ("user", 0)
    linear = [k for k, v in axes.items() if k.startswith("head.") and v == ("item", 0)]
    assert linear  # the linear head's per-item output rows
    shapes = {k: v.shape for k, v in PolicyNet(spec).state_dict().items()}
    for name, (kind, axis) in axes.items():
        assert shapes[name][axis] == (7 if kind == "item" else 5)


def test_warm_state_copies_shared_rows_and_keeps_fresh_ones() -> None:
    old = {"emb": torch.arange(8.0).reshape(4, 2), "w": torch.ones(3), "gone": torch.ones(2)}
    new = {"emb": -torch.ones(5, 2), "w": torch.zeros(3), "reshaped": torch.zeros(2)}
    # old ids a b c (rows 1..3), new ids c d a e (rows 1..4)
    maps = {"item": row_map(["a", "b", "c"], ["c", "d", "a", "e"])}
    out, report = warm_state(old, new, axes={"emb": ("item", 0)}, maps=maps)
    assert out["emb"].tolist() == [
        [0.0, 1.0],  # row 0 <- row 0
        [6.0, 7.0],  # c <- old row 3
        [-1.0, -1.0],  # d: fresh
        [2.0, 3.0],  # a <- old row 1
        [-1.0, -1.0],  # e: fresh
    ]
    assert out["w"].tolist() == [1.0, 1.0, 1.0]
    assert report.rows == ["emb"] and report.copied == ["w"] and report.fresh == ["reshaped"]
    assert new["emb"].tolist()[1] == [-1.0, -1.0]  # the input is not modified


def test_warm_start_of_an_algorithm_keeps_old_vectors_by_raw_id(tmp_path: Path) -> None:
    cfg = SupervisedConfig(encoder=EncoderConfig(kind="mean", history=3, embedding_dim=4), seed=1)
    old_ds = _dataset(["u1", "u2"], ["a", "b", "c"])
    rec = cfg.create()
    rec.build(old_ds, device="cpu")
    art = load_artifact(rec.save(tmp_path / "old"))

    new_ds = _dataset(["u3", "u2", "u1"], ["c", "d", "a", "e"])
    fresh_rec = cfg.create()
    fresh_algo = fresh_rec.build(new_ds, device="cpu")
    fresh = {k: v.clone() for k, v in fresh_algo.policy.state_dict().items()}
    warm_rec = cfg.create()
    algo = warm_rec.build(new_ds, device="cpu")
    report = warm_start(algo, art, new_ds)

    old_item = art.policy.item_embedding.weight.detach()
    new_item = algo.policy.item_embedding.weight.detach()
    for raw in ("a", "c"):
        assert torch.equal(new_item[new_ds.item_ids.index(raw) + 1], old_item[art.item_index[raw]])
    for raw in ("d", "e"):  # new items: the fresh model's initialisation (same seed)
        row = new_ds.item_ids.index(raw) + 1
        assert torch.equal(new_item[row], fresh["item_embedding.weight"][row])
        assert not torch.equal(new_item[row], old_item[1])
    assert algo.policy.user_embedding is not None and art.policy.user_embedding is not None
    new_user = algo.policy.user_embedding.weight.detach()
    old_user = art.policy.user_embedding.weight.detach()
    assert torch.equal(new_user[new_ds.user_ids.index("u1") + 1], old_user[art.user_index["u1"]])
    assert torch.equal(new_user[0], old_user[0])  # the unknown-user row carries over
    assert torch.equal(new_user[1], fresh["user_embedding.weight"][1])  # u3 is new
    assert (report.shared_items, report.new_items) == (2, 2)
    assert (report.shared_users, report.new_users) == (2, 1)
    # the policy scores a shared item as the old one did for the same raw state
    with torch.no_grad():
        u_new = torch.tensor([new_ds.user_ids.index("u2") + 1])
        h_new = torch.tensor([[0, 0, new_ds.item_ids.index("a") + 1]])
        u_old = torch.tensor([art.user_index["u2"]])
        h_old = torch.tensor([[0, 0, art.item_index["a"]]])
        r = torch.ones(1, 3)
        s_new = algo.policy(u_new, h_new, r)[0]
        s_old = art.policy(u_old, h_old, r)[0]
    assert torch.allclose(
        s_new[new_ds.item_ids.index("c") + 1], s_old[art.item_index["c"]], atol=1e-6
    )
