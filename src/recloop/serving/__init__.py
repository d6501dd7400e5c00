"""The real-time recommendation service (``recloop serve``); its stores are :mod:`recloop.stores`.

Names are resolved lazily: importing the package must not pay for torch and FastAPI, which
``app`` and ``service`` pull in.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "app_from_env": "recloop.serving.app",
    "create_app": "recloop.serving.app",
    "LoadedModel": "recloop.serving.service",
    "Recommendation": "recloop.serving.service",
    "RecommenderService": "recloop.serving.service",
    "ServeSettings": "recloop.serving.settings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'recloop.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
