"""Tiny data and shared checks for the actor-critic and value-based algorithm tests."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from recloop.algos import (  # noqa: F401  (register the algorithms under test)
    base,
    bcq,
    bcq_discrete,
    cql,
    ddpg,
    dqn,
    sac,
    td3,
)
from recloop.algos.base import ALGOS, Algo, DatasetSpec
from recloop.data.batch import TransitionBatch
from recloop.encoders.base import EncoderConfig

N_ITEMS, N_USERS, B, H, D = 12, 5, 16, 4, 8


def tiny_spec() -> DatasetSpec:
    return DatasetSpec(
        n_users=N_USERS, n_items=N_ITEMS, popularity=np.ones(N_ITEMS + 1, np.float32)
    )


def tiny_batch(seed: int = 0) -> TransitionBatch:
    """B transitions over N_ITEMS items, some left padding, a few session ends."""
    g = torch.Generator().manual_seed(seed)
    hist = torch.randint(1, N_ITEMS + 1, (B, H), generator=g)
    hist[: B // 4, :2] = 0
    action = torch.randint(1, N_ITEMS + 1, (B,), generator=g)
    hr = torch.rand(B, H, generator=g) * (hist > 0)
    return TransitionBatch(
        user=torch.randint(1, N_USERS + 1, (B,), generator=g),
        history=hist,
        history_reward=hr,
        action=action,
        reward=torch.rand(B, generator=g),
        returns=torch.rand(B, generator=g),
        next_history=torch.cat([hist[:, 1:], action[:, None]], dim=1),
        next_history_reward=torch.cat([hr[:, 1:], torch.rand(B, 1, generator=g)], dim=1),
        done=torch.arange(B) % 5 == 4,
    )


def make(name: str, *, seed: int = 0, **over: Any) -> Algo[Any]:
    """A seeded algorithm on the tiny spec (concat encoder, H=4, D=8).

    A dict value is a partial section over the algorithm's own default (``critic={"tau":
    0.1}``), as ``--set critic.tau=0.1`` would be.
    """
    cls = ALGOS.get(name)
    defaults = cls.config_class()
    for key, value in over.items():
        if isinstance(value, dict):
            over[key] = dataclasses.replace(getattr(defaults, key), **value)
    over.setdefault("encoder", EncoderConfig(kind="concat", history=H, embedding_dim=D))
    over.setdefault("batch_size", B)
    cfg = cls.config_class(**over)
    torch.manual_seed(seed)
    return cls(cfg, tiny_spec(), device=torch.device("cpu"))


def run(
    algo: Algo[Any], batch: TransitionBatch, steps: int, *, seed: int = 0
) -> list[dict[str, float]]:
    torch.manual_seed(seed)
    return [algo.update(batch).to_dict() for _ in range(steps)]


def snapshot(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_polyak(before: list[Tensor], target: nn.Module, online: nn.Module, tau: float) -> None:
    """target == (1 − τ)·before + τ·online, parameter by parameter, and it moved."""
    moved = False
    for b, t, o in zip(before, target.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(
            t.detach(), (1 - tau) * b + tau * o.detach(), rtol=1e-5, atol=1e-6
        )
        moved |= not torch.equal(t.detach(), b)
    assert moved, "the target network did not change"


def grads(params: Any) -> Tensor:
    return torch.cat([p.grad.detach().flatten().clone() for p in params if p.grad is not None])


def assert_clipping_keeps_direction(
    monkeypatch: pytest.MonkeyPatch, name: str, *, steps: int, clip: float = 1e-3, **over: Any
) -> None:
    """Every optimiser step of ``steps`` updates clips its gradients by a factor in (0, 1].

    A spy around the base's ``clip_grad_norm`` records each parameter group's gradients
    before and after clipping: after = factor · before (same direction, no sign flip —
    RecNN's ``clip_grad_norm_(p, -1, 1)`` flips it), the clipped norm is at most ``clip``,
    and one group per optimiser is clipped at each step.
    """
    calls: list[tuple[Tensor, Tensor]] = []
    real = base.clip_grad_norm

    def spy(params: Sequence[Tensor], *, max_norm: float) -> Tensor:
        before = grads(params)
        out = real(params, max_norm=max_norm)
        calls.append((before, grads(params)))
        return out

    monkeypatch.setattr(base, "clip_grad_norm", spy)
    algo = make(name, grad_clip=clip, **over)
    run(algo, tiny_batch(), steps)
    groups = sum(len(o.param_groups) for o in algo.optimizers().values())
    assert len(calls) == steps * groups
    for before, after in calls:
        factor = min(1.0, clip / (before.norm().item() + 1e-6))
        torch.testing.assert_close(after, before * factor, rtol=1e-5, atol=1e-9)
        assert after.norm() <= clip * (1 + 1e-4)
    assert any(b.norm() > clip for b, _ in calls), "the test needs gradients above the clip"


def assert_recommendations(algo: Algo[Any], batch: TransitionBatch) -> None:
    """Scores (B, N + 1) with the padding column at −inf, finite elsewhere; top-k shape."""
    algo.train(False)
    with torch.no_grad():
        scores = algo.policy(batch.user, batch.history, batch.history_reward)
    assert scores.shape == (B, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()
    top = scores.topk(5, dim=1).indices
    assert top.shape == (B, 5) and (top > 0).all()


def assert_policy_reloads(algo: Algo[Any], batch: TransitionBatch) -> None:
    """A fresh PolicyNet from the same spec, loaded with the state dict, scores the same."""
    from recloop.artifacts.policy import PolicyNet

    algo.train(False)
    fresh = PolicyNet(copy.deepcopy(algo.policy.spec))
    fresh.load_state_dict(algo.policy.state_dict())
    fresh.eval()
    with torch.no_grad():
        a = algo.policy(batch.user, batch.history, batch.history_reward)
        b = fresh(batch.user, batch.history, batch.history_reward)
    torch.testing.assert_close(a, b)


def first_last(stats: list[dict[str, float]], key: str) -> tuple[float, float]:
    return stats[0][key], stats[-1][key]
