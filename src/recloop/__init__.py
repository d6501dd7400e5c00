"""recloop: offline reinforcement-learning recommenders, from logged events to real-time serving."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("recloop")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
