"""State encoders, one module each, registered in :data:`recloop.encoders.base.ENCODERS`.

Importing this package fills the registry; :func:`build_encoder` builds one by config.
"""

from __future__ import annotations

from torch import nn

# Each import registers its encoder.
from recloop.encoders import attention as _attention  # noqa: F401
from recloop.encoders import cfn as _cfn  # noqa: F401
from recloop.encoders import concat as _concat  # noqa: F401
from recloop.encoders import esn as _esn  # noqa: F401
from recloop.encoders import gru as _gru  # noqa: F401
from recloop.encoders import lstm as _lstm  # noqa: F401
from recloop.encoders import mean as _mean  # noqa: F401
from recloop.encoders import tcn as _tcn  # noqa: F401
from recloop.encoders.base import ENCODERS, EncoderConfig, StateEncoder


def build_encoder(
    cfg: EncoderConfig,
    *,
    item_embedding: nn.Embedding,
    user_embedding: nn.Embedding | None,
) -> StateEncoder:
    """The encoder ``cfg.kind`` names; :class:`~recloop.errors.ConfigError` if unknown."""
    return ENCODERS.get(cfg.kind)(cfg, item_embedding=item_embedding, user_embedding=user_embedding)


__all__ = ["ENCODERS", "EncoderConfig", "StateEncoder", "build_encoder"]
