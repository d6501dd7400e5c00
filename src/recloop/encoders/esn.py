"""Echo State Network: a fixed random reservoir driven by the history (Jaeger 2001)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from recloop.config import check
from recloop.data.batch import PAD_ID
from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder

RESERVOIR_SEED = 20010101
"""Seed of the reservoir's random weights: the same config always builds the same reservoir."""

RESERVOIR_DENSITY = 0.1
"""Fraction of non-zero recurrent weights (a sparse reservoir, as Jaeger recommends)."""


@dataclass(frozen=True)
class Reservoir:
    """The fixed weights of an echo-state reservoir of R units fed F inputs."""

    w_in: Tensor  # (R, F) float32
    w: Tensor  # (R, R) float32, largest |eigenvalue| = spectral radius


def make_reservoir(
    size: int, *, inputs: int, spectral_radius: float, seed: int = RESERVOIR_SEED
) -> Reservoir:
    """Random input weights (size, inputs) in U(-1, 1)/sqrt(inputs) and a sparse recurrent
    matrix (size, size) rescaled so its largest |eigenvalue| is ``spectral_radius``.

    numpy's generator and ``eigvals`` rather than torch's: the same numbers on every
    platform and torch version, and torch's multithreaded ``eigvals`` is ten times slower
    for one small matrix on a busy machine.
    """
    rng = np.random.default_rng(seed)
    w_in = rng.uniform(-1.0, 1.0, (size, inputs)) / math.sqrt(inputs)
    w = rng.uniform(-1.0, 1.0, (size, size)) * (rng.random((size, size)) < RESERVOIR_DENSITY)
    radius = float(np.abs(np.linalg.eigvals(w)).max())
    if radius > 0:
        w *= spectral_radius / radius
    return Reservoir(w_in=torch.from_numpy(w_in).float(), w=torch.from_numpy(w).float())


@ENCODERS.register("esn")
class ESNEncoder(EmbeddingStateEncoder):
    """``[user, final reservoir state]``: S = D + reservoir_size.

    r_t = tanh(W_in x_t + W r_{t-1}), r_0 = 0, with W_in and W fixed random buffers (not
    parameters: no gradient, saved with the state dict) and W scaled to the configured
    spectral radius for the echo-state property.  The trained part of an ESN, the linear
    readout, is whatever head the algorithm puts on the state.  A padding position leaves
    the reservoir as it was, so left padding changes nothing and an empty history gives
    zero.  Gradients still reach the item (and user) embeddings unless frozen.
    """

    w_in: Tensor
    w: Tensor

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__(cfg, item_embedding=item_embedding, user_embedding=user_embedding)
        check(
            cfg.reservoir_size >= 1,
            f"encoder.reservoir_size must be >= 1, got {cfg.reservoir_size}",
        )
        check(
            cfg.spectral_radius > 0.0,
            f"encoder.spectral_radius must be > 0, got {cfg.spectral_radius}",
        )
        res = make_reservoir(
            cfg.reservoir_size, inputs=self.input_dim, spectral_radius=cfg.spectral_radius
        )
        self.register_buffer("w_in", res.w_in)
        self.register_buffer("w", res.w)
        self.state_dim = self.user_dim + cfg.reservoir_size

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        x = self.inputs(history, history_reward)
        drive = x @ self.w_in.t()  # (B, H, R)
        valid = (history != PAD_ID).unsqueeze(-1)  # (B, H, 1)
        r = drive.new_zeros(drive.shape[0], drive.shape[2])
        for t in range(drive.shape[1]):  # H is small and fixed: unrolled for ONNX
            r = torch.where(valid[:, t], torch.tanh(drive[:, t] + r @ self.w.t()), r)
        return self.finish(r, user)
