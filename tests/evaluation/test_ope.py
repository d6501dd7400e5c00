"""Off-policy estimators on synthetic bandits with a known value, and OPE of saved policies."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from recloop.artifacts import HeadConfig, PolicyNet, PolicySpec, save_artifact
from recloop.artifacts.heads import LinearHead
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.encoders.base import EncoderConfig
from recloop.errors import ConfigError, DataError
from recloop.evaluation.ope import (
    OPEConfig,
    bootstrap_intervals,
    clip_weights,
    doubly_robust,
    effective_sample_size,
    fit_baseline_rewards,
    ips,
    logged_events,
    off_policy_evaluate,
    ope_for_run,
    ope_for_runs,
    snips,
    target_probs,
)

N_CTX, N_ACT = 5, 10


def _bandit(seed: int = 0) -> dict[str, np.ndarray]:
    """Reward means mu (C, A), logging policy beta (C, A), target policy pi (C, A)."""
    rng = np.random.default_rng(seed)
    mu = rng.uniform(0, 1, (N_CTX, N_ACT))
    beta = rng.dirichlet(np.ones(N_ACT), N_CTX) * 0.5 + 0.5 / N_ACT  # full support
    logits = 3 * mu
    pi = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return {"mu": mu, "beta": beta, "pi": pi}


def _log(b: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n logged rounds: uniform contexts, actions from beta, Bernoulli(mu) rewards."""
    c = rng.integers(0, N_CTX, n)
    cdf = b["beta"][c].cumsum(1)
    a = np.minimum((rng.uniform(size=(n, 1)) > cdf).sum(1), N_ACT - 1)
    r = (rng.uniform(size=n) < b["mu"][c, a]).astype(np.float64)
    return {"c": c, "a": a, "r": r, "w": b["pi"][c, a] / b["beta"][c, a]}


def _truth(b: dict[str, np.ndarray]) -> float:
    return float((b["pi"] * b["mu"]).sum(1).mean())


def test_estimators_hand_computed() -> None:
    w, r = np.array([1.0, 2.0]), np.array([1.0, 0.0])
    assert ips(w, r) == pytest.approx(0.5)
    assert snips(w, r) == pytest.approx(1 / 3)
    q, v = np.array([0.5, 0.5]), np.array([0.4, 0.6])
    assert doubly_robust(w, r, q, v) == pytest.approx((0.4 + 0.5 + 0.6 - 1.0) / 2)
    assert effective_sample_size(np.array([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)
    clipped, share = clip_weights(np.array([0.5, 3.0, 10.0, 1.0]), 2.0)
    np.testing.assert_allclose(clipped, [0.5, 2.0, 2.0, 1.0])
    assert share == pytest.approx(0.5)


def test_truth_inside_bootstrap_intervals() -> None:
    b = _bandit()
    d = _log(b, 20_000, np.random.default_rng(1))
    noisy_q = b["mu"] + 0.1  # a biased reward model: DR must still be consistent
    est = bootstrap_intervals(
        d["w"], d["r"], noisy_q[d["c"], d["a"]], (b["pi"] * noisy_q).sum(1)[d["c"]],
        n_boot=300, seed=0,
    )  # fmt: skip
    truth = _truth(b)
    for name in ("ips", "snips", "dr"):
        iv = est[name]
        assert iv.low <= truth <= iv.high, (name, iv, truth)
        assert iv.low < iv.value < iv.high
        assert iv.high - iv.low < 0.05
    assert not est["dm"].low <= truth <= est["dm"].high  # the biased model alone misses


def test_ips_unbiased_over_seeds() -> None:
    b = _bandit()
    values = [ips(**{k: v for k, v in _log(b, 200, np.random.default_rng(s)).items()
                     if k in ("w", "r")}) for s in range(400)]  # fmt: skip
    se = np.std(values) / math.sqrt(len(values))
    assert abs(np.mean(values) - _truth(b)) < 3 * se


def test_snips_bounded_by_max_reward() -> None:
    rng = np.random.default_rng(0)
    w = rng.pareto(1.0, 50) * 10  # heavy-tailed weights
    r = rng.uniform(0, 1, 50)
    assert ips(w, r) > r.max()  # IPS can leave the reward range …
    assert r.min() <= snips(w, r) <= r.max()  # … SNIPS is a weighted mean of rewards


def test_dr_exact_with_exact_reward_model() -> None:
    b = _bandit()
    d = _log(b, 300, np.random.default_rng(2))
    r = b["mu"][d["c"], d["a"]]  # deterministic rewards equal to the model's prediction
    v = (b["pi"] * b["mu"]).sum(1)[d["c"]]
    assert doubly_robust(d["w"], r, r, v) == pytest.approx(float(v.mean()), abs=1e-12)


def test_target_probs_top_k_softmax() -> None:
    scores = torch.tensor([[float("-inf"), 1.0, 3.0, 2.0]])
    items, probs = target_probs(scores, temperature=1.0, top_k=2, row_keys=torch.zeros(1))
    assert items.tolist() == [[2, 3]]
    e = math.exp(1.0)
    np.testing.assert_allclose(probs.numpy(), [[e / (e + 1), 1 / (e + 1)]], rtol=1e-6)


def _walk(n_users: int = 10, n_items: int = 8, length: int = 8) -> PreparedDataset:
    """User u walks items s_u, s_u + 1, ...; rewards 1 + (item % 2); last event test."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, n_items, n_users)
    t = np.arange(length)
    item = ((start[:, None] + t[None, :]) % n_items + 1).ravel()
    split = np.tile(
        np.where(t == length - 1, TEST, np.where(t == length - 2, VALID, TRAIN)), n_users
    )
    return PreparedDataset.from_arrays(
        user=np.repeat(np.arange(1, n_users + 1), length),
        item=item,
        timestamp=np.tile(t, n_users),
        reward=1.0 + item % 2,
        split=split,
        n_users=n_users,
        n_items=n_items,
        user_ids=[f"u{i}" for i in range(1, n_users + 1)],
        item_ids=[f"i{i}" for i in range(1, n_items + 1)],
    )


def test_baseline_rewards_hand_computed() -> None:
    ds = PreparedDataset.from_arrays(
        user=np.array([1, 1, 2]), item=np.array([1, 2, 1]), timestamp=np.array([0, 1, 0]),
        reward=np.array([3.0, 1.0, 2.0]), n_users=2, n_items=2,
        user_ids=["a", "b"], item_ids=["x", "y"],
    )  # fmt: skip
    q = fit_baseline_rewards(ds, shrinkage=0.0)
    assert q.mu == pytest.approx(2.0)
    # item biases: item 1 (3 - 2 + 2 - 2) / 2 = 0.5, item 2 (1 - 2) / 1 = -1
    np.testing.assert_allclose(q.item_bias[1:], [0.5, -1.0], rtol=1e-6)
    # user 1 residuals 3 - 2.5 and 1 - 1 → 0.25; user 2: 2 - 2.5 → -0.5
    np.testing.assert_allclose(q.user_bias[1:], [0.25, -0.5], rtol=1e-6)
    assert q(np.array([2]), np.array([2]))[0] == pytest.approx(2.0 - 0.5 - 1.0)


def test_off_policy_evaluate_weights() -> None:
    """A policy sure of the next walk item against a uniform beta: every weight is N."""
    ds = _walk()
    n = ds.n_items

    def oracle(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        nxt = history[:, -1] % n + 1
        return torch.nn.functional.one_hot(nxt, n + 1).float() * 100

    def uniform(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        out = torch.zeros(user.shape[0], n + 1)
        out[:, 0] = float("-inf")
        return out

    q = fit_baseline_rewards(ds, shrinkage=0.0)
    cfg = OPEConfig(top_k=1, weight_cap=5.0, n_boot=50)
    events = logged_events(
        ds, cfg=cfg, behaviour=uniform, behaviour_name="uniform", history=2, rewards=q
    )
    rep = off_policy_evaluate(oracle, ds, history=2, events=events, cfg=cfg)
    r = ds.reward[ds.split == TEST]
    assert rep.n_events == 10
    assert rep.support == 1.0 and rep.mean_weight == pytest.approx(n)
    assert rep.clipped_share == 1.0
    assert rep.estimates["ips"].value == pytest.approx(5.0 * r.mean(), rel=1e-6)
    assert rep.estimates["snips"].value == pytest.approx(r.mean(), rel=1e-6)
    assert rep.behaviour_nll == pytest.approx(math.log(n), rel=1e-6)
    assert rep.to_dict()["ess_ratio"] == pytest.approx(1.0)


def test_off_policy_evaluate_masks_consumed_items() -> None:
    """A policy that prefers the item just consumed is evaluated as served: that item is
    masked, its second choice (the next walk item) is what pi shows."""
    ds = _walk()
    n = ds.n_items

    def repeater(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        last = torch.nn.functional.one_hot(history[:, -1], n + 1).float() * 100
        nxt = torch.nn.functional.one_hot(history[:, -1] % n + 1, n + 1).float() * 50
        return last + nxt

    def uniform(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return torch.zeros(user.shape[0], n + 1)

    q = fit_baseline_rewards(ds, shrinkage=0.0)
    events = logged_events(ds, behaviour=uniform, behaviour_name="u", history=2, rewards=q)
    kw: dict[str, Any] = {"history": 2, "events": events}
    masked = off_policy_evaluate(repeater, ds, cfg=OPEConfig(top_k=1, n_boot=0), **kw)
    raw = off_policy_evaluate(
        repeater, ds, cfg=OPEConfig(top_k=1, n_boot=0, mask_consumed=False), **kw
    )
    assert masked.support == 1.0 and raw.support == 0.0
    assert raw.estimates["ips"].value == 0.0


def _save_policy(
    run: Path, ds: PreparedDataset, *, algo: str, config: dict[str, object]
) -> PolicyNet:
    torch.manual_seed(0)
    spec = PolicySpec(
        n_users=ds.n_users,
        n_items=ds.n_items,
        encoder=EncoderConfig(kind="mean", history=3, embedding_dim=8),
        head=HeadConfig(),
    )
    policy = PolicyNet(spec).eval()
    save_artifact(
        run / "artifact", algo=algo, config=config, policy=policy,
        popularity=np.zeros(ds.n_items + 1, np.float32), user_ids=ds.user_ids, item_ids=ds.item_ids,
    )  # fmt: skip
    return policy


def test_ope_for_run_fits_behaviour(tmp_path: Path) -> None:
    ds = _walk()
    _save_policy(tmp_path, ds, algo="supervised", config={})
    cfg = OPEConfig(behaviour_epochs=30, behaviour_lr=0.05, n_boot=20)
    rep = ope_for_run(tmp_path, ds, cfg=cfg)
    assert rep.behaviour == "fitted" and rep.split == "test" and rep.n_events == 10
    # The walk is deterministic: the fitted beta must beat the uniform NLL log N by far.
    assert rep.behaviour_nll < 0.5 * math.log(ds.n_items)
    iv = rep.estimates["dr"]
    assert iv.low <= iv.value <= iv.high


def test_ope_for_run_uses_reinforce_beta_head(tmp_path: Path) -> None:
    from recloop.training.checkpoint import FitProgress, save_best, save_checkpoint

    ds = _walk()
    policy = _save_policy(tmp_path, ds, algo="reinforce", config={"beta_hidden_dims": []})
    beta = LinearHead(
        HeadConfig(), state_dim=policy.encoder.state_dim, n_items=ds.n_items, embedding_dim=8
    )
    save_checkpoint(
        tmp_path, algo_state={"networks": {"beta": beta.state_dict()}},
        progress=FitProgress(epoch=1, step=1, transitions=1),
        config={},
    )  # fmt: skip
    save_best(tmp_path, {"policy": policy.state_dict(), "beta": beta.state_dict()})
    # By default every run is scored against the same fitted beta, the head is not used.
    assert ope_for_run(tmp_path, ds, cfg=OPEConfig(n_boot=0)).behaviour == "fitted"
    head = OPEConfig(n_boot=0, behaviour="beta_head")
    rep = ope_for_run(tmp_path, ds, cfg=head)
    assert rep.behaviour == "beta_head"
    rows = np.flatnonzero(ds.split == TEST)
    hist = torch.from_numpy(ds.item[rows[:, None] - np.arange(3, 0, -1)].astype(np.int64))
    user = torch.from_numpy(ds.user[rows].astype(np.int64))
    with torch.no_grad():
        logits = beta(
            policy.state(user, hist, torch.ones(hist.shape)), policy.item_embedding.weight
        )
        logits[:, 0] = float("-inf")
        nll = -torch.log_softmax(logits, 1).gather(
            1, torch.from_numpy(ds.item[rows].astype(np.int64))[:, None]
        )
    assert rep.behaviour_nll == pytest.approx(float(nll.mean()), rel=1e-5)
    # Two runs' heads are two betas: comparing runs with beta_head is refused.
    with pytest.raises(ConfigError, match="not be comparable"):
        ope_for_runs([tmp_path, tmp_path], [ds, ds], cfg=head)
    # A beta saved with other policy weights than the artifact's is not used.
    other = {k: v + 1 for k, v in policy.state_dict().items()}
    save_best(tmp_path, {"policy": other, "beta": beta.state_dict()})
    with pytest.raises(DataError, match="no saved REINFORCE beta head"):
        ope_for_run(tmp_path, ds, cfg=head)


def test_every_item_masked_gives_no_weight_not_nan() -> None:
    """A user who consumed the whole catalogue: pi shows nothing, the estimates stay finite."""
    ds = _walk(n_users=3, n_items=4, length=6)  # every user has seen all 4 items before the test

    def flat(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return torch.zeros(user.shape[0], ds.n_items + 1)

    q = fit_baseline_rewards(ds, shrinkage=0.0)
    events = logged_events(ds, behaviour=flat, behaviour_name="u", history=2, rewards=q)
    rep = off_policy_evaluate(flat, ds, history=2, events=events, cfg=OPEConfig(top_k=2, n_boot=10))
    assert rep.support == 0.0
    assert all(math.isfinite(iv.value) for iv in rep.estimates.values())
