"""Save and load the serving bundle: a directory of data, never a pickle.

::

    artifact/
      manifest.json        format version, recloop version, algorithm, full config, policy spec,
                           tensor shapes, dataset summary, id-map sha256, weights sha256,
                           metrics, model version
      weights.safetensors  PolicyNet state dict ("policy.*") and train-set popularity
      user_ids.txt         raw user ids, line n = user index n
      item_ids.txt         raw item ids, line n = item index n

Loading trusts nothing it reads: the manifest is checked against a schema
(:mod:`recloop.artifacts.manifest`), then the file hashes, the model version (derived from
the weights, id maps, config and policy spec), the sizes of the id maps, repeated ids,
every tensor's shape against the manifest and the policy, and that every tensor is finite.
Any failure is one :class:`ArtifactError` line naming the file and the field.  Saving
refuses what loading would refuse.  A run directory is accepted wherever an artifact is:
its ``artifact/`` subdirectory is used.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import Tensor

from recloop import __version__
from recloop.artifacts.heads import HeadConfig
from recloop.artifacts.manifest import (
    ITEM_IDS,
    USER_IDS,
    Manifest,
    canonical_json,
    model_version_of,
    parse_manifest_text,
    validate_manifest,
)
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.config import config_from_dict, config_to_dict
from recloop.data.dataset import sha256_file, write_ids
from recloop.encoders.base import EncoderConfig
from recloop.errors import ArtifactError, RecloopError
from recloop.ranking import topk

FORMAT_VERSION = 2
"""2: the manifest records ``model_version`` and is validated against a schema."""
ARTIFACT_DIR = "artifact"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
POPULARITY = "popularity"


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
        """``{algo}-{12 hex}``, a hash of everything that changes behaviour; checked at load
        (see :mod:`recloop.artifacts.manifest`)."""
        return str(self.manifest["model_version"])

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


def _finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (informational sections only)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    return value


def _non_finite(name: str, t: Tensor) -> str | None:
    """A description of the NaN/inf entries of a floating tensor, None when all are finite."""
    if not t.is_floating_point():
        return None
    # A finite sum proves every entry finite (NaN and inf propagate), without the boolean
    # tensor isfinite allocates; only a non-finite sum (or an overflow) looks closer.
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):
        return None
    finite = torch.isfinite(t)
    if bool(finite.all()):
        return None
    n_nan = int(torch.isnan(t).sum())
    n_inf = int((~finite).sum()) - n_nan
    return f"tensor '{name}' holds {n_nan} NaN and {n_inf} inf of {t.numel()} values"


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
    """Write the bundle described in the module docstring; returns the directory.

    Refuses (:class:`ArtifactError`, nothing written) non-finite weights or popularity,
    duplicate ids, and id maps or popularity whose sizes disagree with the policy.
    """
    directory = Path(directory)
    spec = policy.spec
    if len(user_ids) != spec.n_users or len(item_ids) != spec.n_items:
        raise ArtifactError(
            f"id maps hold {len(user_ids)} users and {len(item_ids)} items, "
            f"the policy expects {spec.n_users} and {spec.n_items}"
        )
    for name, ids in ((USER_IDS, user_ids), (ITEM_IDS, item_ids)):
        dup = _first_duplicate(ids)
        if dup is not None:
            raise ArtifactError(f"{name}: {dup}")
    pop = np.asarray(popularity, dtype=np.float32)
    if pop.shape != (spec.n_items + 1,):
        raise ArtifactError(f"popularity has shape {pop.shape}, expected ({spec.n_items + 1},)")
    tensors = {f"policy.{k}": v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    tensors[POPULARITY] = torch.from_numpy(pop.copy())
    for name, t in tensors.items():
        bad = _non_finite(name, t)
        if bad is not None:
            raise ArtifactError(f"{directory}: refusing to save non-finite weights: {bad}")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS))
    manifest: dict[str, Any] = {
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
        "dataset": _finite_json(dataset_summary or {}),
        "metrics": _finite_json(metrics or {}),
        "id_maps": {
            USER_IDS: write_ids(directory / USER_IDS, user_ids),
            ITEM_IDS: write_ids(directory / ITEM_IDS, item_ids),
        },
        "weights_sha256": sha256_file(directory / WEIGHTS),
    }
    try:
        # The round trip makes the version hash the very JSON that loading will read back.
        manifest = json.loads(canonical_json(manifest))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{directory}: the config is not plain finite JSON ({exc})") from None
    manifest["model_version"] = model_version_of(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _first_duplicate(ids: list[str]) -> str | None:
    """A message naming the first repeated id and its two lines, None when all are distinct."""
    if len(set(ids)) == len(ids):
        return None
    seen: dict[str, int] = {}
    for line, raw in enumerate(ids, start=1):  # error path only
        if raw in seen:
            return f"duplicate id {raw!r} on lines {seen[raw]} and {line}"
        seen[raw] = line
    return None  # pragma: no cover  (the set said there is one)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of an artifact (or run) directory, checked for its format version and
    against the schema (:class:`~recloop.artifacts.manifest.Manifest`)."""
    return _read_manifest(resolve_artifact_dir(path))[0]


def _read_manifest(directory: Path) -> tuple[dict[str, Any], Manifest]:
    mpath = directory / MANIFEST
    try:
        text = mpath.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{mpath}: unreadable ({exc})") from None
    manifest = parse_manifest_text(text, path=mpath)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        hint = " (re-save it with this recloop: retrain, or resume the run)" if version == 1 else ""
        raise ArtifactError(
            f"{mpath}: artifact format_version {version!r}, this recloop reads "
            f"{FORMAT_VERSION}{hint}"
        )
    return manifest, validate_manifest(manifest, path=mpath)


def _read_verified(path: Path, digest: str, *, what: str) -> bytes:
    """The bytes of ``path`` after checking them against the manifest's sha256."""
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} is missing")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({exc.strerror})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise ArtifactError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {digest[:12]}…"
        )
    return data


def _read_id_map(path: Path, digest: str) -> list[str]:
    data = _read_verified(path, digest, what="id map")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text and not text.endswith("\n"):
        raise ArtifactError(f"{path}: the last line has no line break (truncated file?)")
    return text.split("\n")[:-1] if text else []


def _index(ids: list[str], path: Path) -> dict[str, int]:
    """Raw id → 1-based index; refuses repeated ids (two indices for one raw id)."""
    index = {raw: i for i, raw in enumerate(ids, start=1)}
    if len(index) != len(ids):
        raise ArtifactError(f"{path}: {_first_duplicate(ids)}")
    return index


def load_artifact(path: Path) -> Artifact:
    """Load and verify an artifact; raises :class:`ArtifactError` saying what does not match.

    Checked, in this order: the manifest's format version and schema; the sha256 of the id
    maps and the weights; the model version against the one derived from them (see
    :mod:`recloop.artifacts.manifest`); the id maps' sizes against the policy spec and their
    ids for repeats; the tensors against the manifest's ``shapes`` and the rebuilt policy;
    popularity's length; and that every tensor is finite.
    """
    directory = resolve_artifact_dir(path)
    mpath = directory / MANIFEST
    manifest, m = _read_manifest(directory)
    user_path, item_path = directory / USER_IDS, directory / ITEM_IDS
    user_ids = _read_id_map(user_path, m.id_maps.user_ids)
    item_ids = _read_id_map(item_path, m.id_maps.item_ids)
    wpath = directory / WEIGHTS
    raw = _read_verified(wpath, m.weights_sha256, what="weights file")
    derived = model_version_of(manifest)
    if m.model_version != derived:
        raise ArtifactError(
            f"{mpath}: field 'model_version' is {m.model_version!r} but the weights, id maps, "
            f"config and policy spec give {derived!r}: the manifest was edited"
        )
    p = m.policy
    for ids, name, n, field in ((user_ids, USER_IDS, p.n_users, "n_users"),
                                (item_ids, ITEM_IDS, p.n_items, "n_items")):  # fmt: skip
        if len(ids) != n:
            raise ArtifactError(
                f"{directory / name}: holds {len(ids)} ids, the manifest's policy.{field} is {n}"
            )
    user_index = _index(user_ids, user_path)
    item_index = _index(item_ids, item_path)
    try:
        tensors = safetensors_load(raw)
    except SafetensorError as exc:
        reason = " ".join(str(exc).split())  # one line, whatever the library says
        raise ArtifactError(f"{wpath}: unreadable safetensors file ({reason})") from None
    got_shapes = {k: list(v.shape) for k, v in tensors.items()}
    if got_shapes != m.shapes:
        names = sorted(set(got_shapes) | set(m.shapes))
        key = next(x for x in names if got_shapes.get(x) != m.shapes.get(x))
        raise ArtifactError(
            f"{mpath}: field 'shapes.{key}' is {m.shapes.get(key, 'absent')}, the tensor in "
            f"{WEIGHTS} has {got_shapes.get(key, 'none')}"
        )
    try:
        spec = PolicySpec(
            n_users=p.n_users,
            n_items=p.n_items,
            encoder=config_from_dict(EncoderConfig, p.encoder, source=f"{mpath} policy.encoder"),
            head=config_from_dict(HeadConfig, p.head, source=f"{mpath} policy.head"),
        )
    except RecloopError as exc:  # names the file and the field already
        raise ArtifactError(str(exc)) from None
    try:
        policy = PolicyNet(spec)
    except RecloopError as exc:
        raise ArtifactError(f"{mpath}: field 'policy': cannot rebuild the policy: {exc}") from None
    if POPULARITY not in tensors:
        raise ArtifactError(f"{wpath}: tensor '{POPULARITY}' is missing")
    state = {k.removeprefix("policy."): v for k, v in tensors.items() if k.startswith("policy.")}
    expected = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    for name in sorted(set(expected) | set(state)):
        want, got = expected.get(name), tuple(state[name].shape) if name in state else None
        if want != got:
            raise ArtifactError(
                f"{wpath}: tensors do not match the policy spec: 'policy.{name}' "
                + (f"has shape {got}, expected {want}" if want is not None and got is not None
                   else "is missing" if want is not None else "is unexpected")
            )  # fmt: skip
    extra = sorted(set(tensors) - {f"policy.{k}" for k in expected} - {POPULARITY})
    if extra:
        raise ArtifactError(f"{wpath}: tensors do not match the policy spec: unexpected {extra}")
    pop = tensors[POPULARITY]
    if tuple(pop.shape) != (spec.n_items + 1,) or pop.dtype != torch.float32:
        raise ArtifactError(
            f"{wpath}: tensor '{POPULARITY}' is {pop.dtype} of shape {tuple(pop.shape)}, "
            f"expected float32 of shape ({spec.n_items + 1},)"
        )
    for name, t in tensors.items():
        bad = _non_finite(name, t)
        if bad is not None:
            raise ArtifactError(f"{wpath}: {bad}")
    if bool((pop < 0).any()):
        raise ArtifactError(f"{wpath}: tensor '{POPULARITY}' holds negative counts")
    policy.load_state_dict(state)
    policy.eval()
    return Artifact(
        path=directory,
        manifest=manifest,
        policy=policy,
        popularity=pop.numpy(),
        user_ids=user_ids,
        item_ids=item_ids,
        user_index=user_index,
        item_index=item_index,
    )
