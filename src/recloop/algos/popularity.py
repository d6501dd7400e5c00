"""Most-popular baseline: every user gets the items most consumed in the train split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from recloop.algos.base import ALGOS, Algo, AlgoConfig, DatasetSpec, UpdateStats
from recloop.artifacts.heads import HeadConfig, PopularityHead
from recloop.config import check
from recloop.data.batch import TransitionBatch
from recloop.data.dataset import PreparedDataset
from recloop.encoders.base import EncoderConfig

TRANSFORMS = ("log", "count")


@dataclass(frozen=True, kw_only=True)
class PopularityConfig(AlgoConfig):
    """Train-set popularity: scores are the same for every user (closed form, no training)."""

    algo: ClassVar[str] = "popularity"
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(kind="mean", embedding_dim=8, use_user=False)
    )
    """Unused by the scores; kept small since the artifact still carries an encoder."""
    transform: str = "log"
    """Score of an item with c train interactions: ``log`` = log(1 + c), ``count`` = c.
    Both rank the same; ``log`` keeps the scores on a softmax-friendly scale."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.transform in TRANSFORMS, f"transform must be one of {list(TRANSFORMS)}")


@ALGOS.register("popularity")
class Popularity(Algo[PopularityConfig]):
    """Ranks items by their number of interactions in the train split."""

    config_class = PopularityConfig
    trainable = False

    def __init__(self, cfg: PopularityConfig, spec: DatasetSpec, *, device: torch.device) -> None:
        super().__init__(cfg, spec, device=device)
        self._set_scores(spec.popularity)

    def head_config(self) -> HeadConfig:
        return HeadConfig(kind="popularity")

    def _set_scores(self, counts: np.ndarray) -> None:
        c = torch.as_tensor(np.asarray(counts, np.float32), device=self.device)
        scores = torch.log1p(c) if self.cfg.transform == "log" else c
        head = self.policy.head
        assert isinstance(head, PopularityHead)
        with torch.no_grad():
            head.scores.copy_(scores)

    def fit_closed_form(self, dataset: PreparedDataset) -> None:
        self._set_scores(DatasetSpec.from_dataset(dataset).popularity)

    def update(self, batch: TransitionBatch) -> UpdateStats:
        raise NotImplementedError("popularity is fitted in closed form (trainable = False)")

    def networks(self) -> dict[str, Any]:
        return {"policy": self.policy}
