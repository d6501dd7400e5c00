"""Typed batches with their shapes.  Letters: B batch, H history, D embedding, N catalogue."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

PAD_ID = 0
"""Item index 0 is padding (and the user index 0 is the unknown user)."""


@dataclass(frozen=True)
class TransitionBatch:
    """One batch of logged transitions (s, a, r, s') drawn from per-user sequences."""

    user: Tensor  # (B,) int64, user index (1..n_users)
    history: Tensor  # (B, H) int64, last H item indices before the action, PAD_ID on the left
    history_reward: Tensor  # (B, H) float32, rewards of those items, 0 at padding
    action: Tensor  # (B,) int64, the logged item index
    reward: Tensor  # (B,) float32, the logged reward of the action
    returns: Tensor  # (B,) float32, discounted return from this step to the session end
    next_history: Tensor  # (B, H) int64, history after the action
    next_history_reward: Tensor  # (B, H) float32
    done: Tensor  # (B,) bool, True at the last transition of a session
    propensity: Tensor | None = None
    """(B,) float32 logged β(a|s) of the action, in (0, 1]; None when the data logs none."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TransitionBatch:
        fields: dict[str, Tensor | None] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fields[f.name] = None if value is None else value.to(device, non_blocking=non_blocking)
        return TransitionBatch(**fields)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.action.shape[0])
