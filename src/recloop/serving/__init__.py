"""The real-time recommendation service (``recloop serve``) and the online stores.

Names are resolved lazily: stream workers import ``recloop.serving.stores`` and must not pay
for torch and FastAPI, which ``app`` and ``service`` pull in.
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
    "MemoryStore": "recloop.serving.stores",
    "OnlineStore": "recloop.serving.stores",
    "RedisStore": "recloop.serving.stores",
    "SqliteStore": "recloop.serving.stores",
    "StoreDataError": "recloop.serving.stores",
    "StoreError": "recloop.serving.stores",
    "open_store": "recloop.serving.stores",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'recloop.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
