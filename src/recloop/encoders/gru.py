"""GRU over the history; the state is the last real item's hidden state."""

from __future__ import annotations

from torch import Tensor, nn

from recloop.encoders.base import ENCODERS, EncoderConfig
from recloop.encoders.common import EmbeddingStateEncoder, compact_left, gather_last, require_layers


@ENCODERS.register("gru")
class GRUEncoder(EmbeddingStateEncoder):
    """``[user, h_L]`` where h_L is the top GRU layer after the last real item: S = D + hidden.

    The real items are moved to the front of the sequence before the GRU runs
    (:func:`~recloop.encoders.common.compact_left`), so the state is the same however much
    left padding there is; an empty history gives a zero vector.  Uses the fused ``nn.GRU``
    rather than ``pack_padded_sequence``, which does not export to ONNX.
    """

    rnn_class: type[nn.GRU] | type[nn.LSTM] = nn.GRU
    """The fused recurrent layer (:class:`~recloop.encoders.lstm.LSTMEncoder` sets LSTM)."""

    def __init__(
        self,
        cfg: EncoderConfig,
        *,
        item_embedding: nn.Embedding,
        user_embedding: nn.Embedding | None,
    ) -> None:
        super().__init__(cfg, item_embedding=item_embedding, user_embedding=user_embedding)
        require_layers(cfg)
        self.rnn = self.rnn_class(
            self.input_dim,
            cfg.hidden_dim,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.state_dim = self.user_dim + cfg.hidden_dim

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        x = self.inputs(history, history_reward)
        seq = compact_left(history, x)
        # an explicit zero initial state keeps the batch size dynamic in the ONNX graph
        h0 = x.new_zeros(self.cfg.num_layers, x.shape[0], self.cfg.hidden_dim)
        # an LSTM also starts from a zero cell state
        state = (h0, h0) if isinstance(self.rnn, nn.LSTM) else h0
        out, _ = self.rnn(seq.x, state)  # (B, H, hidden)
        last = gather_last(out, seq.length)
        return self.finish(last, user)
