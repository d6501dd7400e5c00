"""``recloop loop``: retrain on the behaviour log, gate against the current model, publish.

:mod:`~recloop.loop.config` (the :class:`LoopConfig`), :mod:`~recloop.loop.window` (window,
holdout cut, trigger), :mod:`~recloop.loop.warmstart` (weights carried over by raw id),
:mod:`~recloop.loop.gate` (the fair comparison) and :mod:`~recloop.loop.controller` (the
rounds, crash-safe state).
"""

from recloop.loop.config import LoopConfig
from recloop.loop.controller import LoopController, LoopError, RoundResult

__all__ = ["LoopConfig", "LoopController", "LoopError", "RoundResult"]
