"""Embedding pretraining: the DSSM two-tower model and its negative sampler.

Training code only; serving reads the saved files (``embeddings.safetensors`` +
``manifest.json``) and never imports this package.
"""

from __future__ import annotations

from recloop.embeddings.dssm import (
    DSSMConfig,
    EpochStats,
    PretrainResult,
    dataset_ids_sha256,
    ids_sha256,
    load_embeddings,
    pretrain_dssm,
    roc_auc,
    save_embeddings,
)
from recloop.embeddings.negatives import ConsumedItems

__all__ = [
    "ConsumedItems",
    "DSSMConfig",
    "EpochStats",
    "PretrainResult",
    "dataset_ids_sha256",
    "ids_sha256",
    "load_embeddings",
    "pretrain_dssm",
    "roc_auc",
    "save_embeddings",
]
