"""Policy learners, registered by name in :data:`recloop.algos.base.ALGOS`.

Importing this package imports every algorithm module, which fills the registry.
"""

from recloop.algos import (
    bcq,
    bcq_discrete,
    cql,
    ddpg,
    dqn,
    gru4rec,
    popularity,
    reinforce,
    sa2c,
    sac,
    sasrec,
    sqn,
    supervised,
    td3,
)
from recloop.algos.base import ALGOS, Algo, AlgoConfig, DatasetSpec, UpdateStats

__all__ = [
    "ALGOS",
    "Algo",
    "AlgoConfig",
    "DatasetSpec",
    "UpdateStats",
    "bcq",
    "bcq_discrete",
    "cql",
    "ddpg",
    "dqn",
    "gru4rec",
    "popularity",
    "reinforce",
    "sa2c",
    "sac",
    "sasrec",
    "sqn",
    "supervised",
    "td3",
]
