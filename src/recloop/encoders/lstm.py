"""LSTM over the history; the state is the last real item's hidden state."""

from __future__ import annotations

from torch import nn

from recloop.encoders.base import ENCODERS
from recloop.encoders.gru import GRUEncoder


@ENCODERS.register("lstm")
class LSTMEncoder(GRUEncoder):
    """``[user, h_L]`` where h_L is the top LSTM layer after the last real item: S = D + hidden.

    :class:`~recloop.encoders.gru.GRUEncoder` with the fused ``nn.LSTM`` (zero initial hidden
    and cell states); everything else, padding handling included, is the same.
    """

    rnn_class = nn.LSTM
