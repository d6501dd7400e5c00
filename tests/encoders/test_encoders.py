from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recloop.encoders import ENCODERS, EncoderConfig, StateEncoder, build_encoder
from recloop.encoders.common import compact_left
from recloop.encoders.esn import make_reservoir
from recloop.encoders.tcn import levels_to_cover
from recloop.errors import ConfigError

N_ITEMS, N_USERS, D = 30, 7, 8
KINDS = ENCODERS.names()
SEQUENCE_KINDS = [k for k in KINDS if k != "concat"]


def small_cfg(kind: str, **kw: object) -> EncoderConfig:
    base: dict[str, object] = {
        "kind": kind,
        "history": 4,
        "embedding_dim": D,
        "hidden_dim": 12,
        "reservoir_size": 20,
        "n_heads": 2,
    }
    base.update(kw)
    return EncoderConfig(**base)  # type: ignore[arg-type]


class Owner(nn.Module):
    """What a policy does: owns (registers) the tables and hands them to the encoder."""

    def __init__(self, cfg: EncoderConfig, *, with_user: bool = True) -> None:
        super().__init__()
        self.item_embedding = nn.Embedding(N_ITEMS + 1, cfg.embedding_dim, padding_idx=0)
        self.user_embedding = nn.Embedding(N_USERS + 1, cfg.embedding_dim) if with_user else None
        self.encoder = build_encoder(
            cfg, item_embedding=self.item_embedding, user_embedding=self.user_embedding
        )

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return self.encoder(user, history, history_reward)


def make_owner(cfg: EncoderConfig, *, seed: int = 0, with_user: bool = True) -> Owner:
    torch.manual_seed(seed)
    return Owner(cfg, with_user=with_user).eval()


def make(cfg: EncoderConfig, *, seed: int = 0, with_user: bool = True) -> StateEncoder:
    return make_owner(cfg, seed=seed, with_user=with_user).encoder


def inputs(history: list[list[int]], *, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    h = torch.tensor(history, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    reward = torch.rand(h.shape, generator=g) * (h != 0)
    user = torch.arange(1, h.shape[0] + 1) % N_USERS + 1
    return user, h, reward


def test_every_encoder_module_is_registered() -> None:
    assert KINDS == ["attention", "cfn", "concat", "esn", "gru", "lstm", "mean", "tcn"]


DBRL_STATE_DIMS = {
    # H=10, D=32, hidden 64, reservoir 256, user embedding included
    "concat": 32 + 10 * 32,
    "mean": 32 + 32,
    "gru": 32 + 64,
    "lstm": 32 + 64,
    "tcn": 32 + 64,
    "attention": 32 + 64,
    "esn": 32 + 256,
    "cfn": 32 + 64,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_rewards", [False, True])
@pytest.mark.parametrize("with_user", [False, True])
def test_shape_and_state_dim(kind: str, use_rewards: bool, with_user: bool) -> None:
    cfg = EncoderConfig(kind=kind, use_rewards=use_rewards)  # DBRL sizes: H=10, D=32
    enc = make(cfg, with_user=with_user)
    expected = DBRL_STATE_DIMS[kind] - (0 if with_user else 32)
    if use_rewards:
        expected += 10 if kind == "concat" else 1 if kind == "mean" else 0
    assert enc.state_dim == expected
    hist = torch.randint(0, N_ITEMS + 1, (5, 10))
    hist[0, :7] = 0
    out = enc(torch.arange(1, 6), hist, torch.rand(5, 10))
    assert out.shape == (5, expected)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_dbrl_concat_state_is_352() -> None:
    assert make(EncoderConfig(kind="concat")).state_dim == 352


def test_concat_layout_and_zero_padding() -> None:
    enc = make(small_cfg("concat", use_rewards=True))
    user, hist, reward = inputs([[0, 0, 3, 5]])
    reward[0, :2] = 7.0  # garbage at padding must not leak into the state
    out = enc(user, hist, reward)[0]
    assert enc.user_embedding is not None
    torch.testing.assert_close(out[:D], enc.user_embedding.weight[user[0]])
    assert torch.equal(out[D : 3 * D], torch.zeros(2 * D))
    torch.testing.assert_close(out[3 * D : 4 * D], enc.item_embedding.weight[3])
    torch.testing.assert_close(out[4 * D : 5 * D], enc.item_embedding.weight[5])
    torch.testing.assert_close(out[5 * D :], torch.tensor([0.0, 0.0, reward[0, 2], reward[0, 3]]))


def test_mean_against_hand_computed_value() -> None:
    enc = make(small_cfg("mean", use_user=False, use_rewards=True))
    with torch.no_grad():
        enc.item_embedding.weight[2] = torch.arange(D, dtype=torch.float32)
        enc.item_embedding.weight[4] = 3.0
    hist = torch.tensor([[0, 2, 0, 4]])
    out = enc(torch.tensor([1]), hist, torch.tensor([[9.0, 0.5, 9.0, 1.5]]))[0]
    expected = torch.cat([(torch.arange(D, dtype=torch.float32) + 3.0) / 2, torch.tensor([1.0])])
    torch.testing.assert_close(out, expected)


def transplant(src: nn.Module, dst: nn.Module) -> None:
    """Copy src's weights into dst, slicing tables whose size depends on H (positions)."""
    state = dst.state_dict()
    for name, value in src.state_dict().items():
        target = state[name]
        state[name] = value[tuple(slice(0, s) for s in target.shape)]
    dst.load_state_dict(state)


@pytest.mark.parametrize("kind", SEQUENCE_KINDS)
@pytest.mark.parametrize("use_rewards", [False, True])
def test_left_padding_changes_nothing(kind: str, use_rewards: bool) -> None:
    """History [0, 0, 0, 0, a, b, c] gives the state an H=3 encoder gives for [a, b, c]."""
    # two layers: the TCN then has as many blocks for H=3 as for H=7
    big = make_owner(small_cfg(kind, history=7, use_rewards=use_rewards, num_layers=2), seed=3)
    small = make_owner(small_cfg(kind, history=3, use_rewards=use_rewards, num_layers=2), seed=4)
    transplant(big, small)
    rows = [[5, 9, 2], [0, 4, 11], [0, 0, 30]]
    _, h3, r3 = inputs(rows)
    user = torch.tensor([1, 2, 3])
    h7 = torch.cat([torch.zeros(3, 4, dtype=torch.long), h3], dim=1)
    r7 = torch.cat([torch.full((3, 4), 5.0), r3], dim=1)  # garbage rewards at padding
    with torch.no_grad():
        torch.testing.assert_close(big(user, h7, r7), small(user, h3, r3), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_all_padding_row_gives_zero_item_state_and_no_nan(kind: str) -> None:
    enc = make(small_cfg(kind, use_rewards=True)).train()
    user, hist, reward = inputs([[0, 0, 0, 0], [1, 2, 3, 4]])
    out = enc(user, hist, reward)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, D:], torch.zeros(enc.state_dim - D))
    out.sum().backward()
    for p in enc.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_freeze_stops_gradients_into_item_embeddings(kind: str) -> None:
    enc = make(small_cfg(kind, freeze_item_embeddings=True))
    user, hist, reward = inputs([[0, 3, 4, 5], [6, 7, 8, 9]])
    enc(user, hist, reward).pow(2).sum().backward()
    grad = enc.item_embedding.weight.grad
    assert grad is None or torch.equal(grad, torch.zeros_like(grad))
    # the table itself stays trainable: it is shared with heads that may train it
    assert enc.item_embedding.weight.requires_grad
    assert enc.user_embedding is not None and enc.user_embedding.weight.grad is not None
    assert enc.user_embedding.weight.grad[user].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_items_in_the_history_only(kind: str) -> None:
    enc = make(small_cfg(kind))
    user, hist, reward = inputs([[0, 3, 4, 5], [6, 7, 8, 9]])
    enc(user, hist, reward).pow(2).sum().backward()
    grad = enc.item_embedding.weight.grad
    assert grad is not None
    seen = torch.zeros(N_ITEMS + 1, dtype=torch.bool)
    seen[hist.flatten()] = True
    seen[0] = False
    assert (grad[seen].abs().sum(dim=1) > 0).all()
    assert torch.equal(grad[~seen], torch.zeros_like(grad[~seen]))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrent_state_matches_the_rnn_on_the_unpadded_sequence(kind: str) -> None:
    enc = make(small_cfg(kind, use_user=False, num_layers=2, history=6))
    user, hist, reward = inputs([[0, 0, 0, 4, 8, 15], [16, 23, 1, 2, 3, 4], [0, 0, 0, 0, 0, 7]])
    out = enc(user, hist, reward)
    rnn = enc.rnn
    assert isinstance(rnn, nn.RNNBase)
    for b in range(3):
        real = hist[b][hist[b] != 0]
        ref, _ = rnn(enc.item_embedding(real).unsqueeze(0))
        torch.testing.assert_close(out[b], ref[0, -1])


def test_cfn_step_against_the_paper_formula() -> None:
    enc = make(small_cfg("cfn", use_user=False, hidden_dim=5))
    user, hist, reward = inputs([[0, 0, 6, 2]])
    out = enc(user, hist, reward)[0]
    layer = enc.layers[0]  # type: ignore[attr-defined]
    v, w, u = layer.v.weight, layer.w.weight, layer.u.weight
    b = layer.v.bias
    h = torch.zeros(5)
    for item in (6, 2):
        x = enc.item_embedding.weight[item]
        theta = torch.sigmoid(u[:5] @ h + v[:5] @ x + b[:5])
        eta = torch.sigmoid(u[5:] @ h + v[5:] @ x + b[5:])
        h = theta * torch.tanh(h) + eta * torch.tanh(w @ x)
    torch.testing.assert_close(out, h)


def test_esn_reservoir_is_fixed_seeded_and_scaled() -> None:
    cfg = small_cfg("esn", reservoir_size=40, spectral_radius=0.7)
    a, b = make(cfg, seed=1), make(cfg, seed=2)
    assert torch.equal(a.w, b.w) and torch.equal(a.w_in, b.w_in)
    names = {n for n, _ in a.named_parameters()}
    assert not any(n in ("w", "w_in") for n in names)
    assert {"w", "w_in"} <= set(a.state_dict())
    radius = torch.linalg.eigvals(a.w.double()).abs().max().item()
    assert radius == pytest.approx(0.7, rel=1e-5)
    res = make_reservoir(40, inputs=D, spectral_radius=0.7)
    assert torch.equal(res.w, a.w)


def test_esn_state_against_hand_rolled_reservoir() -> None:
    enc = make(small_cfg("esn", use_user=False))
    user, hist, reward = inputs([[0, 5, 0, 9]])
    out = enc(user, hist, reward)[0]
    r = torch.zeros(enc.cfg.reservoir_size)
    for item in (5, 9):
        r = torch.tanh(enc.w_in @ enc.item_embedding.weight[item] + enc.w @ r)
    torch.testing.assert_close(out, r)


def test_tcn_receptive_field_covers_the_history() -> None:
    assert levels_to_cover(10, 3) == 2  # 1 + 2 * 2 * (2^2 - 1) = 13 >= 10
    assert levels_to_cover(5, 3) == 1
    assert levels_to_cover(50, 2) == 5
    for kind in ("tcn", "attention", "gru", "cfn"):
        enc = make(EncoderConfig(kind=kind, hidden_dim=16))
        hist = torch.arange(1, 11).unsqueeze(0)
        other = hist.clone()
        other[0, 0] = 20  # the oldest item still shapes the state
        user = torch.tensor([1])
        with torch.no_grad():
            assert not torch.allclose(enc(user, hist, hist * 0.0), enc(user, other, hist * 0.0))


@pytest.mark.parametrize("kind", KINDS)
def test_tables_are_owned_by_the_policy_not_the_encoder(kind: str, tmp_path: Path) -> None:
    """Each table is in the owner's state dict once, so safetensors can save it."""
    owner = make_owner(small_cfg(kind))
    assert not any("embedding" in k for k in owner.encoder.state_dict())
    keys = list(owner.state_dict())
    assert keys.count("item_embedding.weight") == 1 and keys.count("user_embedding.weight") == 1
    assert sum(p is owner.item_embedding.weight for p in owner.parameters()) == 1
    save_file(owner.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = make_owner(small_cfg(kind), seed=9)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    user, hist, reward = inputs([[0, 1, 2, 3], [4, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(user, hist, reward), owner(user, hist, reward))
    twin = copy.deepcopy(owner)  # e.g. a target network
    assert twin.encoder.item_embedding is twin.item_embedding
    assert twin.item_embedding is not owner.item_embedding


def test_compact_left_moves_real_items_first_in_order() -> None:
    hist = torch.tensor([[0, 0, 3, 4], [5, 0, 6, 0], [0, 0, 0, 0]])
    c = compact_left(hist, hist.unsqueeze(-1).float())
    assert c.x.squeeze(-1).long().tolist() == [[3, 4, 0, 0], [5, 6, 0, 0], [0, 0, 0, 0]]
    assert c.length.tolist() == [2, 2, 0]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="n_heads"):
        make(small_cfg("attention", hidden_dim=10, n_heads=3))
    with pytest.raises(ConfigError, match="embedding_dim"):
        build_encoder(small_cfg("gru"), item_embedding=nn.Embedding(5, D + 1), user_embedding=None)
    with pytest.raises(ConfigError, match="unknown encoder 'transformerxl'"):
        make(small_cfg("transformerxl"))
    with pytest.raises(ConfigError, match="num_layers"):
        make(small_cfg("gru", num_layers=0))


def export_onnx(model: nn.Module, example: tuple[Tensor, ...], *, dynamo: bool) -> bytes:
    names = ["user", "history", "history_reward"]
    if dynamo:
        batch = torch.export.Dim("B")
        program = torch.onnx.export(
            model,
            example,
            dynamo=True,
            input_names=names,
            output_names=["state"],
            dynamic_shapes=({0: batch}, {0: batch}, {0: batch}),
            verbose=False,
        )
        assert program is not None
        return bytes(program.model_proto.SerializeToString())
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        example,
        buf,
        dynamo=False,
        input_names=names,
        output_names=["state"],
        dynamic_axes={n: {0: "B"} for n in names},
    )
    return buf.getvalue()


@pytest.mark.parametrize(
    "dynamo", [False, pytest.param(True, marks=pytest.mark.slow, id="dynamo")], ids=str
)
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_export_matches_torch(kind: str, dynamo: bool) -> None:
    """Exported with a batch of 2, run with a batch of 5: the batch size stays dynamic."""
    ort = pytest.importorskip("onnxruntime")
    cfg = dataclasses.replace(small_cfg(kind, use_rewards=True), num_layers=2)
    model = make_owner(cfg)
    onnx_bytes = export_onnx(model, inputs([[0, 0, 3, 4], [1, 2, 3, 4]]), dynamo=dynamo)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    user, hist, reward = inputs(
        [[0, 0, 0, 9], [5, 6, 7, 8], [0, 0, 0, 0], [0, 12, 0, 30], [1, 1, 1, 1]]
    )
    feeds = {"user": user.numpy(), "history": hist.numpy(), "history_reward": reward.numpy()}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        want = model(user, hist, reward).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
