"""ONNX and TorchScript export of the scorer, checked against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec
from recloop.artifacts.export import (
    INPUTS,
    check_onnx,
    example_inputs,
    export_onnx,
    export_torchscript,
)
from recloop.encoders.base import EncoderConfig


def policy(kind: str = "gru", head: str = "linear") -> PolicyNet:
    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=6,
        n_items=11,
        encoder=EncoderConfig(kind=kind, history=4, embedding_dim=8, hidden_dim=8),
        head=HeadConfig(kind=head),
    )
    return PolicyNet(spec).eval()


@pytest.mark.parametrize(
    ("kind", "head"), [("gru", "linear"), ("concat", "dot"), ("mean", "popularity")]
)
def test_onnx_matches_pytorch_at_any_batch_size(kind: str, head: str, tmp_path: Path) -> None:
    p = policy(kind, head)
    path = export_onnx(p, tmp_path / "p.onnx")
    model = onnx.load(str(path))
    # All three inputs are declared, in order, even those the policy ignores.
    assert [i.name for i in model.graph.input] == list(INPUTS)
    assert [o.name for o in model.graph.output] == ["scores"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5, 33):
        user, history, reward = example_inputs(p, batch=batch, seed=batch)
        (got,) = session.run(
            None,
            {"user": user.numpy(), "history": history.numpy(), "history_reward": reward.numpy()},
        )
        expected = p(user, history, reward).detach().numpy()
        assert got.shape == (batch, 12)
        assert np.all(np.isneginf(got[:, 0]))
        np.testing.assert_allclose(got[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-5)
    assert check_onnx(path, p) < 1e-4


def test_check_onnx_detects_other_weights(tmp_path: Path) -> None:
    p = policy()
    path = export_onnx(p, tmp_path / "p.onnx")
    with torch.no_grad():
        p.item_embedding.weight.add_(1.0)
    assert check_onnx(path, p) > 1e-3


def test_export_leaves_the_policy_as_it_was(tmp_path: Path) -> None:
    p = policy()
    p.train()
    before = {k: v.clone() for k, v in p.state_dict().items()}
    export_onnx(p, tmp_path / "p.onnx")
    assert p.training
    for k, v in p.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_torchscript_matches_pytorch(tmp_path: Path) -> None:
    p = policy("attention")
    path = export_torchscript(p, tmp_path / "p.pt")
    with warnings.catch_warnings():  # PyTorch deprecates TorchScript in favour of torch.export
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path))
    user, history, reward = example_inputs(p, batch=6, seed=3)
    torch.testing.assert_close(loaded(user, history, reward), p(user, history, reward))


def test_check_onnx_relative_scales_by_the_largest_score(tmp_path: Path) -> None:
    p = policy()
    with torch.no_grad():
        for w in p.head.parameters():
            w.mul_(1000.0)  # scores in the thousands, as Q-values can be
    path = export_onnx(p, tmp_path / "p.onnx")
    absolute, relative = check_onnx(path, p), check_onnx(path, p, relative=True)
    assert relative <= absolute
    assert relative < 1e-5
    with torch.no_grad():
        p.item_embedding.weight.add_(1.0)
    assert check_onnx(path, p, relative=True) > 1e-3
