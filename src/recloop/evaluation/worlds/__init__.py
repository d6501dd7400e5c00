"""Ground-truth worlds: user models whose truth is known (see docs/worlds.md).

``WORLDS`` names every world; importing this package registers ``shop`` and ``ml100k``.
"""

from recloop.evaluation.worlds import ml100k as _ml100k  # noqa: F401  (registers "ml100k")
from recloop.evaluation.worlds import shop as _shop  # noqa: F401  (registers "shop")
from recloop.evaluation.worlds.base import WORLDS, Mechanics, World, build_world

__all__ = ["WORLDS", "Mechanics", "World", "build_world"]
