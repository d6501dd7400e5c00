"""``shop``: a generative e-commerce world with taste clusters, popularity and a funnel.

Items: ``n_items`` unit embeddings around ``n_clusters`` random unit cluster centres
(``normalize(c_k + item_noise g / sqrt(D))``), each with a Zipf popularity
``pop ∝ rank^-zipf`` (ranks a random permutation, independent of the cluster); the click
logit's popularity term is ``pop_weight (log pop_a - mean log pop)``.

Users: user n's initial taste is ``taste_norm * normalize(c_k + user_noise g / sqrt(D))``
with k drawn from the cluster shares; a pure function of (seed, n), drawn in blocks of 1024
users so any user can be rebuilt alone.

The mechanics (funnel, satiety, quit, drift) are :class:`~recloop.evaluation.worlds.base.
Mechanics`; with the defaults an unsatiated user clicks a well matched item (cosine 0.8) with
probability 0.2 to 0.6 (by popularity), a random one about 0.05 to 0.3, and a click
satisfies only at a match of 2 (cosine 0.67, in practice the user's own cluster).  The
popularity weight is strong enough that the most popular items out of the user's cluster
are often the myopically best choice once the user is satiated with their own cluster:
they earn clicks but not satisfaction, so they raise the quit risk (the clickbait
trade-off of RecSim's interest-evolution environment, Ie et al. 2019).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recloop.config import check
from recloop.evaluation.worlds.base import WORLDS, Mechanics, World, WorldParams

BLOCK = 1024
"""Users drawn per random block: user n comes from block n // BLOCK."""


@dataclass(frozen=True, kw_only=True)
class ShopConfig:
    """The latent catalogue and population of the shop world."""

    seed: int = 0
    """Seed of the items and the users' initial tastes (not of simulated outcomes)."""
    n_items: int = 1000
    """Catalogue size N."""
    n_clusters: int = 10
    """Taste clusters K."""
    dim: int = 16
    """Embedding dimension D."""
    item_noise: float = 0.5
    """Spread of items around their cluster centre (before normalisation)."""
    user_noise: float = 0.5
    """Spread of users' tastes around their cluster centre (before normalisation)."""
    taste_norm: float = 3.0
    """|taste|: the match taste . e_a of a unit item lies in [-taste_norm, taste_norm]."""
    zipf: float = 1.0
    """Zipf exponent of item popularity."""
    pop_weight: float = 0.8
    """Weight of the centred log popularity in the click logit."""
    offset: float = -3.0
    """Constant of the click logit (sets the base click rate, ~5 % for a random item)."""
    mechanics: Mechanics = field(default_factory=Mechanics)
    """Funnel, satiety, quit and session mechanics."""

    def __post_init__(self) -> None:
        check(self.n_items >= 2, f"shop.n_items must be >= 2, got {self.n_items}")
        check(self.n_clusters >= 1, f"shop.n_clusters must be >= 1, got {self.n_clusters}")
        check(self.dim >= 1, f"shop.dim must be >= 1, got {self.dim}")
        check(self.taste_norm > 0, "shop.taste_norm must be > 0")
        check(self.zipf >= 0, "shop.zipf must be >= 0")
        check(self.item_noise >= 0 and self.user_noise >= 0, "shop noises must be >= 0")


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.asarray(x / np.where(norm > 0, norm, 1.0))


@WORLDS.register("shop")
class ShopWorld(World):
    """Generative e-commerce world (module docstring)."""

    name = "shop"
    version = "shop-1"
    config_cls = ShopConfig

    def __init__(self, config: ShopConfig) -> None:
        rng = np.random.default_rng([config.seed, 0])
        d, n = config.dim, config.n_items
        self.centres = _normalize(rng.standard_normal((config.n_clusters, d)))  # (K, D)
        self.item_cluster = rng.integers(0, config.n_clusters, n)  # (N,)
        raw = self.centres[self.item_cluster] + config.item_noise * rng.standard_normal(
            (n, d)
        ) / np.sqrt(d)
        unit = np.zeros((n + 1, d))
        unit[1:] = _normalize(raw)
        rank = rng.permutation(n) + 1
        pop = rank.astype(np.float64) ** -config.zipf
        pop /= pop.sum()
        log_pop = np.log(pop)
        bias = np.full(n + 1, -np.inf)
        bias[1:] = config.pop_weight * (log_pop - log_pop.mean())
        params = WorldParams(
            item_emb=unit,
            item_unit=unit,
            item_bias=bias,
            popularity=np.r_[0.0, pop],
            offset=config.offset,
        )
        super().__init__(config, params, config.mechanics)

    @classmethod
    def create(cls, config: ShopConfig) -> ShopWorld:
        return cls(config)

    def initial_taste(self, user: np.ndarray) -> np.ndarray:
        cfg: ShopConfig = self.config
        d = cfg.dim
        out = np.empty((user.shape[0], d))
        block = user // BLOCK
        for b in np.unique(block):
            rows = np.flatnonzero(block == b)
            rng = np.random.default_rng([cfg.seed, 1, int(b)])
            cluster = rng.integers(0, cfg.n_clusters, BLOCK)
            noise = rng.standard_normal((BLOCK, d)) / np.sqrt(d)
            at = user[rows] % BLOCK
            out[rows] = self.centres[cluster[at]] + cfg.user_noise * noise[at]
        return cfg.taste_norm * _normalize(out)
