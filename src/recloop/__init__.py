"""recloop: offline reinforcement-learning recommenders, from logged events to real-time serving."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up on first use (PEP 562): importlib.metadata costs ~70 ms at start-up, a
    # fifth of the budget of `recloop --help`.
    if name != "__version__":
        raise AttributeError(f"module 'recloop' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        value = version("recloop")
    except PackageNotFoundError:  # running from a source tree that was not installed
        value = "0.0.0+unknown"
    globals()["__version__"] = value
    return value
