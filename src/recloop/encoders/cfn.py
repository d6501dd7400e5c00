"""Chaos-Free Network (Laurent & von Brecht, "A recurrent neural network without chaos", 2017)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recloop.data.batch import PAD_ID
from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder, require_layers


class CFNLayer(nn.Module):
    """One CFN layer (Laurent & von Brecht 2017, eq. 2):

    h_t = θ_t ⊙ tanh(h_{t-1}) + η_t ⊙ tanh(W x_t)
    θ_t = σ(U_θ h_{t-1} + V_θ x_t + b_θ),  η_t = σ(U_η h_{t-1} + V_η x_t + b_η)
    """

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.v = nn.Linear(inputs, 2 * hidden)  # [V_θ; V_η] with [b_θ; b_η]
        self.w = nn.Linear(inputs, hidden, bias=False)  # W, no bias in the paper
        self.u = nn.Linear(hidden, 2 * hidden, bias=False)  # [U_θ; U_η]

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:  # (B, H, F), (B, H, 1) -> (B, H, h)
        gates_x = self.v(x)  # (B, H, 2h), input parts for every step at once
        drive = torch.tanh(self.w(x))  # (B, H, h)
        h = x.new_zeros(x.shape[0], self.hidden)
        out = []
        for t in range(x.shape[1]):  # H is small and fixed: unrolled for ONNX
            theta, eta = torch.sigmoid(gates_x[:, t] + self.u(h)).chunk(2, dim=-1)
            h = torch.where(valid[:, t], theta * torch.tanh(h) + eta * drive[:, t], h)
            out.append(h)
        return torch.stack(out, dim=1)


@ENCODERS.register("cfn")
class CFNEncoder(EmbeddingStateEncoder):
    """``[user, top CFN layer after the last real item]``: S = D + hidden.

    ``num_layers`` stacked CFN layers.  A padding position leaves the hidden state as it was,
    so left padding changes nothing and an empty history gives zero.  The recurrence is a
    step loop over the H positions (CFN has no fused kernel); H is small.
    """

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__(cfg, item_embedding=item_embedding, user_embedding=user_embedding)
        require_layers(cfg)
        sizes = [self.input_dim] + [cfg.hidden_dim] * cfg.num_layers
        self.layers = nn.ModuleList(CFNLayer(sizes[i], sizes[i + 1]) for i in range(cfg.num_layers))
        self.between = nn.Dropout(cfg.dropout)
        self.state_dim = self.user_dim + cfg.hidden_dim

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        z = self.inputs(history, history_reward)
        valid = (history != PAD_ID).unsqueeze(-1)
        for i, layer in enumerate(self.layers):
            if i:
                z = self.between(z)
            z = layer(z, valid)
        return self.finish(z[:, -1], user)
