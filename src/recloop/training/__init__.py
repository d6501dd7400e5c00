"""Training: the fit loop, checkpoints, metric sinks and the :class:`Recommender` API.

Serving and streaming never import this package; they load artifacts.
"""

from recloop.training.fit import FitConfig, FitResult
from recloop.training.recommender import Recommendations, Recommender, train_run
from recloop.training.runconfig import RunConfig, load_run_config

__all__ = [
    "FitConfig",
    "FitResult",
    "Recommendations",
    "Recommender",
    "RunConfig",
    "load_run_config",
    "train_run",
]
