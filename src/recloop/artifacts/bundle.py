"""Save and load the serving bundle: a directory of data, never a pickle.

::

    artifact/
      manifest.json        format version, recloop version, algorithm, full config, policy spec,
                           tensor shapes, dataset summary, id-map sha256, weights sha256, metrics
      weights.safetensors  PolicyNet state dict ("policy.*") and train-set popularity
      user_ids.txt         raw user ids, line n = user index n
      item_ids.txt         raw item ids, line n = item index n

Loading checks the format version, the file hashes and every tensor shape, and fails with a
message that says what does not match.  A run directory is accepted wherever an artifact is:
its ``artifact/`` subdirectory is used.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from recloop import __version__
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.config import config_from_dict, config_to_dict
from recloop.data.dataset import read_ids, sha256_file, write_ids
from recloop.encoders.base import EncoderConfig
from recloop.errors import ArtifactError, RecloopError
from recloop.ranking import topk

FORMAT_VERSION = 1
ARTIFACT_DIR = "artifact"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def resolve_artifact_dir(path: Path) -> Path:
    """An artifact directory, or a run directory holding ``artifact/``."""
    path = Path(path)
    if (path / MANIFEST).is_file() and (path / WEIGHTS).is_file():
        return path
    if (path / ARTIFACT_DIR / MANIFEST).is_file():
        return path / ARTIFACT_DIR
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact or run directory")
    raise ArtifactError(
        f"{path}: not an artifact (no {MANIFEST} + {WEIGHTS}, nor {ARTIFACT_DIR}/{MANIFEST})"
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class Artifact:
    """A loaded policy with its id maps, ready to rank items for raw ids."""

    path: Path
    """The artifact directory."""
    manifest: dict[str, Any]
    """The parsed manifest.json."""
    policy: PolicyNet
    """The policy in eval mode on the CPU."""
    popularity: np.ndarray  # (N + 1,) float32 train-set interaction counts, 0 at padding
    user_ids: list[str]
    """Raw user ids; index i ↔ user_ids[i - 1]."""
    item_ids: list[str]
    """Raw item ids; index i ↔ item_ids[i - 1]."""
    user_index: dict[str, int]
    """Raw user id → index (1-based)."""
    item_index: dict[str, int]
    """Raw item id → index (1-based)."""

    @property
    def algo(self) -> str:
        return str(self.manifest["algo"])

    @property
    def model_version(self) -> str:
        """Algorithm name plus the first 12 hex digits of the weights' sha256."""
        return f"{self.algo}-{self.manifest['weights_sha256'][:12]}"

    @property
    def history_len(self) -> int:
        """H, the number of recent items the policy's state reads."""
        return self.policy.spec.encoder.history

    @property
    def n_items(self) -> int:
        return self.policy.spec.n_items

    @property
    def n_users(self) -> int:
        return self.policy.spec.n_users

    @torch.inference_mode()
    def recommend(
        self,
        user: Tensor,
        history: Tensor,
        history_reward: Tensor | None = None,
        *,
        n: int,
        exclude: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Top-n item indices and scores, each (B, n), best first.

        ``user`` (B,) int64 (0 = unknown), ``history`` (B, H) int64 left-padded with 0,
        ``history_reward`` (B, H) float32 (ones when None), ``exclude`` (B, N + 1) bool.
        """
        if history_reward is None:
            history_reward = (history != 0).to(torch.float32)
        scores = self.policy(user, history, history_reward)
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        top = topk(scores, min(n, self.n_items), row_keys=user)
        return top.indices, top.values


def save_artifact(
    directory: Path,
    *,
    algo: str,
    config: Any,
    policy: PolicyNet,
    popularity: np.ndarray,
    user_ids: list[str],
    item_ids: list[str],
    dataset_summary: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle described in the module docstring; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spec = policy.spec
    if len(user_ids) != spec.n_users or len(item_ids) != spec.n_items:
        raise ArtifactError(
            f"id maps hold {len(user_ids)} users and {len(item_ids)} items, "
            f"the policy expects {spec.n_users} and {spec.n_items}"
        )
    pop = np.asarray(popularity, dtype=np.float32)
    if pop.shape != (spec.n_items + 1,):
        raise ArtifactError(f"popularity has shape {pop.shape}, expected ({spec.n_items + 1},)")
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    tensors["popularity"] = torch.from_numpy(pop.copy())
    save_file(tensors, str(directory / WEIGHTS))
    manifest = {
        "format_version": FORMAT_VERSION,
        "recloop_version": __version__,
        "torch_version": torch.__version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "algo": algo,
        "config": config_to_dict(config) if dataclasses.is_dataclass(config) else config,
        "policy": {
            "n_users": spec.n_users,
            "n_items": spec.n_items,
            "encoder": config_to_dict(spec.encoder),
            "head": config_to_dict(spec.head),
        },
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "dataset": dataset_summary or {},
        "metrics": metrics or {},
        "id_maps": {
            "user_ids.txt": write_ids(directory / "user_ids.txt", user_ids),
            "item_ids.txt": write_ids(directory / "item_ids.txt", item_ids),
        },
        "weights_sha256": sha256_file(directory / WEIGHTS),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an artifact (or run) directory, checked for its format version."""
    directory = resolve_artifact_dir(path)
    mpath = directory / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath}: invalid JSON ({exc})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: artifact format_version {version!r}, this recloop reads {FORMAT_VERSION}"
        )
    return manifest


def load_artifact(path: Path) -> Artifact:
    """Load and verify an artifact; raises :class:`ArtifactError` saying what does not match."""
    directory = resolve_artifact_dir(path)
    manifest = read_manifest(directory)
    for name, digest in manifest["id_maps"].items():
        p = directory / name
        if not p.is_file():
            raise ArtifactError(f"{directory}: id map {name} is missing")
        actual = sha256_file(p)
        if actual != digest:
            raise ArtifactError(
                f"{p}: sha256 {actual[:12]}… does not match the manifest's {digest[:12]}…"
            )
    wpath = directory / WEIGHTS
    actual = sha256_file(wpath)
    if actual != manifest["weights_sha256"]:
        raise ArtifactError(
            f"{wpath}: sha256 {actual[:12]}… does not match the manifest's "
            f"{manifest['weights_sha256'][:12]}…"
        )
    try:
        p = manifest["policy"]
        spec = PolicySpec(
            n_users=int(p["n_users"]),
            n_items=int(p["n_items"]),
            encoder=config_from_dict(EncoderConfig, p["encoder"], source=f"{directory}/{MANIFEST}"),
            head=config_from_dict(HeadConfig, p["head"], source=f"{directory}/{MANIFEST}"),
        )
        policy = PolicyNet(spec)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{directory}/{MANIFEST}: malformed policy section ({exc})") from None
    except RecloopError as exc:
        raise ArtifactError(f"{directory}: cannot rebuild the policy: {exc}") from None
    try:
        tensors = load_file(str(wpath))
    except SafetensorError as exc:
        raise ArtifactError(f"{wpath}: unreadable safetensors file ({exc})") from None
    state = {k.removeprefix("policy."): v for k, v in tensors.items() if k.startswith("policy.")}
    expected = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:4]
        raise ArtifactError(f"{wpath}: tensors do not match the policy spec: {diff}")
    policy.load_state_dict(state)
    policy.eval()
    user_ids = read_ids(directory / "user_ids.txt")
    item_ids = read_ids(directory / "item_ids.txt")
    if len(user_ids) != spec.n_users or len(item_ids) != spec.n_items:
        raise ArtifactError(
            f"{directory}: id maps hold {len(user_ids)} users / {len(item_ids)} items, "
            f"manifest says {spec.n_users} / {spec.n_items}"
        )
    return Artifact(
        path=directory,
        manifest=manifest,
        policy=policy,
        popularity=tensors["popularity"].numpy(),
        user_ids=user_ids,
        item_ids=item_ids,
        user_index={u: i for i, u in enumerate(user_ids, start=1)},
        item_index={x: i for i, x in enumerate(item_ids, start=1)},
    )
