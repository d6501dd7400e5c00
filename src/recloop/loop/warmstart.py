"""Warm start: a new round's networks begin from the current artifact's weights.

Between rounds the id maps change: new users and items appear, and prepare ranks ids by
training frequency, so an id's index moves too.  Rows of the id-indexed tables (item and
user embeddings, a linear head's per-item output rows, a popularity head's scores) are
therefore copied **by raw id**: the row of raw id x in the old table goes to the row of x in
the new table; rows of ids the old model never saw keep the fresh initialisation the new
network was built with.  Row 0 (padding item, unknown user) maps to row 0.  Every other
tensor is copied when its shape is unchanged and left fresh otherwise.

Which tensors are id-indexed, and along which axis, is found by building the policy on the
meta device (no memory) with one more item, then one more user, and seeing which shapes
grow -- so a new head or encoder needs no list of names here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from recloop.algos.base import Algo
from recloop.artifacts.bundle import Artifact
from recloop.artifacts.policy import PolicyNet, PolicySpec
from recloop.data.dataset import PreparedDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowMap:
    """Rows of the ids present in both id maps, padding / unknown row 0 included."""

    new: np.ndarray  # (M,) int64 rows in the new table, 0 first
    old: np.ndarray  # (M,) int64 rows of the same raw ids in the old table

    @property
    def shared(self) -> int:
        """Real ids in both maps (row 0 not counted)."""
        return int(self.new.shape[0]) - 1


def row_map(old_ids: Sequence[str], new_ids: Sequence[str]) -> RowMap:
    """Match two id maps (index i ↔ ids[i - 1]) by raw id, in the new map's order."""
    old = pl.DataFrame(
        {"id": list(old_ids), "old": np.arange(1, len(old_ids) + 1, dtype=np.int64)},
        schema={"id": pl.String, "old": pl.Int64},
    )
    new = pl.DataFrame(
        {"id": list(new_ids), "new": np.arange(1, len(new_ids) + 1, dtype=np.int64)},
        schema={"id": pl.String, "new": pl.Int64},
    )
    both = new.join(old, on="id", how="inner").sort("new")
    zero = np.zeros(1, np.int64)
    return RowMap(
        new=np.concatenate([zero, both["new"].to_numpy()]),
        old=np.concatenate([zero, both["old"].to_numpy()]),
    )


def id_axes(spec: PolicySpec) -> dict[str, tuple[str, int]]:
    """Policy tensor name → ("item" or "user", the axis that is indexed by that id)."""
    with torch.device("meta"):
        base = {k: v.shape for k, v in PolicyNet(spec).state_dict().items()}
        more_items = PolicyNet(dataclasses.replace(spec, n_items=spec.n_items + 1)).state_dict()
        more_users = PolicyNet(dataclasses.replace(spec, n_users=spec.n_users + 1)).state_dict()
    out: dict[str, tuple[str, int]] = {}
    for kind, grown in (("item", more_items), ("user", more_users)):
        for name, shape in base.items():
            pairs = zip(shape, grown[name].shape, strict=True)
            diff = [a for a, (x, y) in enumerate(pairs) if x != y]
            if diff:
                out[name] = (kind, diff[0])
    return out


@dataclass(frozen=True, kw_only=True)
class WarmStartReport:
    """What a warm start copied."""

    copied: list[str] = field(default_factory=list)
    """Tensors copied whole (same shape)."""
    rows: list[str] = field(default_factory=list)
    """Id-indexed tensors whose shared ids' rows were copied."""
    fresh: list[str] = field(default_factory=list)
    """Tensors left as freshly initialised (absent from the old model or reshaped)."""
    shared_users: int = 0
    """Users in both id maps."""
    shared_items: int = 0
    """Items in both id maps."""
    new_users: int = 0
    """Users only in the new id map (fresh rows)."""
    new_items: int = 0
    """Items only in the new id map (fresh rows)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def warm_state(
    old: Mapping[str, Tensor],
    new: Mapping[str, Tensor],
    *,
    axes: Mapping[str, tuple[str, int]],
    maps: Mapping[str, RowMap],
) -> tuple[dict[str, Tensor], WarmStartReport]:
    """``new`` (a freshly built state dict) with ``old``'s values where they carry over.

    ``axes`` says which tensors are indexed by item or user ids (:func:`id_axes`), ``maps``
    holds the item and user :class:`RowMap`.  An id-indexed tensor gets the old rows of the
    shared ids along its id axis when every other axis has the same size; any other tensor
    is copied when its shape is the same.  ``new`` is not modified.
    """
    out: dict[str, Tensor] = {}
    copied: list[str] = []
    rows: list[str] = []
    fresh: list[str] = []
    for name, fresh_t in new.items():
        old_t = old.get(name)
        value = fresh_t
        if old_t is not None and name in axes:
            kind, axis = axes[name]
            old_rest = [n for i, n in enumerate(old_t.shape) if i != axis]
            new_rest = [n for i, n in enumerate(fresh_t.shape) if i != axis]
            same_rest = old_t.dim() == fresh_t.dim() and old_rest == new_rest
            if same_rest:
                m = maps[kind]
                value = fresh_t.detach().clone()
                src = old_t.detach().to(fresh_t.device, fresh_t.dtype)
                value.index_copy_(
                    axis,
                    torch.from_numpy(m.new).to(fresh_t.device),
                    src.index_select(axis, torch.from_numpy(m.old).to(fresh_t.device)),
                )
                rows.append(name)
            else:
                fresh.append(name)
        elif old_t is not None and old_t.shape == fresh_t.shape:
            value = old_t.detach().to(fresh_t.device, fresh_t.dtype).clone()
            copied.append(name)
        else:
            fresh.append(name)
        out[name] = value
    return out, WarmStartReport(copied=copied, rows=rows, fresh=fresh)


def warm_start(algo: Algo[Any], artifact: Artifact, dataset: PreparedDataset) -> WarmStartReport:
    """Load ``artifact``'s policy into ``algo``, freshly built for ``dataset``, through
    :func:`warm_state`; a target copy of the policy (DQN, DDPG, ...) gets the same weights.
    Parameters are written in place, so optimisers built on them stay valid."""
    policy = algo.policy
    spec = policy.spec
    new_users, new_items = dataset.user_ids, dataset.item_ids
    maps = {
        "item": row_map(artifact.item_ids, new_items),
        "user": row_map(artifact.user_ids, new_users),
    }
    state, report = warm_state(
        artifact.policy.state_dict(), policy.state_dict(), axes=id_axes(spec), maps=maps
    )
    keys = set(state)
    with torch.no_grad():
        for name, net in algo.networks().items():
            if not isinstance(net, torch.nn.Module) or set(net.state_dict()) != keys:
                continue
            for key, target in net.state_dict(keep_vars=True).items():
                target.copy_(state[key])
            logger.debug("warm start: %s", name)
    report = dataclasses.replace(
        report,
        shared_users=maps["user"].shared,
        shared_items=maps["item"].shared,
        new_users=len(new_users) - maps["user"].shared,
        new_items=len(new_items) - maps["item"].shared,
    )
    logger.info(
        "warm start from %s: %d tensors copied, %d by id rows (%d/%d items, %d/%d users "
        "shared), %d fresh",
        artifact.model_version, len(report.copied), len(report.rows), report.shared_items,
        len(new_items), report.shared_users, len(new_users), len(report.fresh),
    )  # fmt: skip
    return report
