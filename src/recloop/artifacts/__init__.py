"""The serving bundle: policy networks, save/load, and export.

Serving and streaming import only this package (and the model code it rebuilds from the
registries), never training code.
"""

from recloop.artifacts.bundle import (
    Artifact,
    load_artifact,
    read_manifest,
    resolve_artifact_dir,
    save_artifact,
)
from recloop.artifacts.heads import HEADS, HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec

__all__ = [
    "HEADS",
    "Artifact",
    "HeadConfig",
    "PolicyNet",
    "PolicySpec",
    "load_artifact",
    "read_manifest",
    "resolve_artifact_dir",
    "save_artifact",
]
