"""Off-policy evaluation of a ranking policy on held-out logged events.

Each event of the evaluated split is one contextual-bandit round: the context is the user's
last H items before the event (whatever their split), the logged action is the event's item
and the reward its logged reward.  The target policy pi is the policy's **top-K softmax**:
``softmax(scores / temperature)`` over its K best-scored items, 0 elsewhere (``top_k=None``:
over the whole catalogue).  That is the stochastic version of the slate it would serve;
items outside its top K get no weight, so pi's support is what it can actually show.  With
``mask_consumed`` (default) it is the policy as served: the items the user consumed before
the event are removed from its scores first.

Estimators (Dudik, Langford & Li, ICML 2011; Swaminathan & Joachims, NeurIPS 2015), with
importance weights ``w = min(pi(a|s) / beta(a|s), cap)``:

- IPS   ``mean(w r)``
- SNIPS ``sum(w r) / sum(w)``
- DR    ``mean(V(s) + w (r - q(s, a)))`` with ``V(s) = sum_a pi(a|s) q(s, a)``
- DM    ``mean(V(s))``, the reward model alone, for reference.

Propensities ``beta(a|s)`` come from REINFORCE's behaviour head when the run saved one, else
from a behaviour model fitted here on the TRAIN split: a softmax over items on the mean of the
history's item embeddings, trained by cross-entropy.  The reward model ``q`` is the shrunk
additive baseline ``mu + b_user + b_item`` (Koren 2010, section 2.1) fitted on TRAIN.
Confidence intervals are percentile bootstraps over events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recloop.artifacts.heads import HeadConfig, LinearHead
from recloop.artifacts.policy import PolicyNet
from recloop.config import check, config_from_dict, config_to_dict
from recloop.data.dataset import SPLIT_NAMES, TRAIN, PreparedDataset
from recloop.data.sampler import TransitionSampler, gather_windows
from recloop.errors import DataError
from recloop.evaluation.protocol import Scorer, batch_rows, csr_ranges, split_code
from recloop.ranking import topk

logger = logging.getLogger(__name__)

Behaviour = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(user (B,), history (B, H), history_reward (B, H)) -> logits (B, N + 1)`` of beta."""


@dataclass(frozen=True, kw_only=True)
class OPEConfig:
    """How the target policy, the behaviour and reward models and the intervals are built."""

    temperature: float = 1.0
    """Softmax temperature of the target policy over its scores."""
    top_k: int | None = 10
    """The target policy samples from its K best items; None = the whole catalogue."""
    mask_consumed: bool = True
    """Evaluate the policy as served: items the user consumed before the event are removed
    from its scores (the service excludes them), so a repeat of one gets pi = 0.  All of the
    user's earlier items are masked; the service masks the ones its store holds (the last
    ``consumed_len``, 100 by default), which differs only for users with longer histories."""
    weight_cap: float | None = 100.0
    """Importance weights are clipped at this value; None = no clipping."""
    behaviour: str = "auto"
    """Propensity source: beta_head (REINFORCE's), fitted, or auto (beta_head if saved)."""
    behaviour_dim: int = 32
    """Embedding size of the fitted behaviour model."""
    behaviour_epochs: int = 3
    """Passes over the TRAIN events when fitting the behaviour model."""
    behaviour_lr: float = 0.01
    """Adam learning rate of the fitted behaviour model."""
    behaviour_batch_size: int = 512
    """Events per step when fitting the behaviour model."""
    reward_shrinkage: float = 5.0
    """Pseudo-count lambda shrinking the user and item reward biases towards 0."""
    n_boot: int = 500
    """Bootstrap resamples for the confidence intervals; 0 = no intervals."""
    confidence: float = 0.95
    """Coverage of the percentile bootstrap intervals."""
    batch_size: int = 1024
    """Events scored at once."""
    seed: int = 0
    """Seed of the behaviour model's initialisation and shuffling and of the bootstrap."""

    def __post_init__(self) -> None:
        check(self.temperature > 0, f"ope.temperature must be > 0, got {self.temperature}")
        check(self.top_k is None or self.top_k >= 1, f"ope.top_k must be >= 1, got {self.top_k}")
        check(
            self.weight_cap is None or self.weight_cap > 0,
            f"ope.weight_cap must be > 0, got {self.weight_cap}",
        )
        check(
            self.behaviour in ("auto", "beta_head", "fitted"),
            f"ope.behaviour must be auto, beta_head or fitted, got {self.behaviour!r}",
        )
        check(self.behaviour_dim >= 1, "ope.behaviour_dim must be >= 1")
        check(self.behaviour_epochs >= 1, "ope.behaviour_epochs must be >= 1")
        check(self.behaviour_lr > 0, "ope.behaviour_lr must be > 0")
        check(self.behaviour_batch_size >= 1, "ope.behaviour_batch_size must be >= 1")
        check(self.reward_shrinkage >= 0, "ope.reward_shrinkage must be >= 0")
        check(self.n_boot >= 0, f"ope.n_boot must be >= 0, got {self.n_boot}")
        check(0 < self.confidence < 1, f"ope.confidence must be in (0, 1), got {self.confidence}")
        check(self.batch_size >= 1, "ope.batch_size must be >= 1")


# --- estimators: pure functions of per-event arrays, all (E,) ---------------------------


def ips(w: np.ndarray, r: np.ndarray) -> float:
    """Inverse propensity scoring: mean(w r) (Horvitz & Thompson 1952)."""
    return float(np.mean(w * r))


def snips(w: np.ndarray, r: np.ndarray) -> float:
    """Self-normalised IPS: sum(w r) / sum(w) (Swaminathan & Joachims 2015); 0 if sum(w) = 0."""
    total = float(np.sum(w))
    return float(np.sum(w * r)) / total if total > 0 else 0.0


def doubly_robust(
    w: np.ndarray, r: np.ndarray, q_logged: np.ndarray, v_target: np.ndarray
) -> float:
    """mean(V(s) + w (r - q(s, a))) (Dudik et al. 2011, eq. 2)."""
    return float(np.mean(v_target + w * (r - q_logged)))


def effective_sample_size(w: np.ndarray) -> float:
    """Kish's (sum w)^2 / sum w^2: how many equally weighted events the estimate is worth."""
    sq = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / sq if sq > 0 else 0.0


def clip_weights(w: np.ndarray, cap: float | None) -> tuple[np.ndarray, float]:
    """``min(w, cap)`` and the share of weights the cap changed."""
    if cap is None or w.shape[0] == 0:
        return w, 0.0
    return np.minimum(w, cap), float(np.mean(w > cap))


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (equal to the estimate without one)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap_intervals(
    w: np.ndarray,
    r: np.ndarray,
    q_logged: np.ndarray,
    v_target: np.ndarray,
    *,
    n_boot: int,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """IPS, SNIPS, DR and DM with percentile bootstrap intervals over events (Efron 1979).

    A resample is a row of multinomial counts c (E,), so each estimator is a ratio of dot
    products ``c @ x``: resamples are processed as (chunk, E) count matrices, not loops.
    """
    e = w.shape[0]
    point = {
        "ips": ips(w, r),
        "snips": snips(w, r),
        "dr": doubly_robust(w, r, q_logged, v_target),
        "dm": float(np.mean(v_target)),
    }
    if n_boot == 0 or e == 0:
        return {k: Interval(v, v, v) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    cols = np.stack([w * r, w, v_target + w * (r - q_logged), v_target], axis=1)  # (E, 4)
    chunk = max(1, (1 << 22) // e)
    sums = []
    for lo in range(0, n_boot, chunk):
        counts = rng.multinomial(e, np.full(e, 1.0 / e), size=min(chunk, n_boot - lo))
        sums.append(counts.astype(np.float64) @ cols)  # (b, 4)
    s = np.concatenate(sums)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = {
            "ips": s[:, 0] / e,
            "snips": np.where(s[:, 1] > 0, s[:, 0] / s[:, 1], 0.0),
            "dr": s[:, 2] / e,
            "dm": s[:, 3] / e,
        }
    alpha = (1 - confidence) / 2
    return {
        k: Interval(
            point[k], float(np.quantile(boots[k], alpha)), float(np.quantile(boots[k], 1 - alpha))
        )
        for k in point
    }


# --- models -----------------------------------------------------------------------------


class MeanHistoryBehaviour(nn.Module):
    """beta(a|s) = softmax(W mean(E[history]) + b): a softmax over items (N + 1 logits)."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.out = nn.Linear(dim, n_items + 1)

    def forward(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        mask = (history != 0).unsqueeze(-1).float()  # (B, H, 1)
        state = (self.embedding(history) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        logits = self.out(state)  # (B, N + 1)
        return logits.index_fill(1, torch.zeros(1, dtype=torch.long), float("-inf"))


def fit_behaviour(
    dataset: PreparedDataset, *, history: int, cfg: OPEConfig
) -> MeanHistoryBehaviour:
    """Fit :class:`MeanHistoryBehaviour` by cross-entropy on the TRAIN events."""
    sampler = TransitionSampler(
        dataset,
        history=history,
        batch_size=cfg.behaviour_batch_size,
        splits=(TRAIN,),
        seed=cfg.seed,
    )
    if sampler.n_transitions == 0:
        raise DataError("no TRAIN event to fit the behaviour model on")
    torch.manual_seed(cfg.seed)
    model = MeanHistoryBehaviour(dataset.n_items, cfg.behaviour_dim)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.behaviour_lr)
    model.train()
    loss = torch.zeros(())
    for _ in range(cfg.behaviour_epochs):
        for batch in sampler:
            loss = nn.functional.cross_entropy(
                model(batch.user, batch.history, batch.history_reward), batch.action
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    logger.debug("behaviour model: last train cross-entropy %.4f", float(loss.detach()))
    return model


@dataclass(frozen=True, kw_only=True, eq=False)
class BaselineRewards:
    """q(u, a) = mu + b_user[u] + b_item[a], shrunk biases (Koren 2010, section 2.1)."""

    mu: float
    user_bias: np.ndarray  # (U + 1,) float32
    item_bias: np.ndarray  # (N + 1,) float32

    def __call__(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        """Broadcasting user (B,) or (B, 1) and item (B,) or (B, K) → predicted rewards."""
        return self.mu + self.user_bias[user] + self.item_bias[item]


def fit_baseline_rewards(
    dataset: PreparedDataset, *, shrinkage: float, split: int = TRAIN
) -> BaselineRewards:
    """Item biases first, then user biases on the residuals, each sum / (count + lambda)."""
    rows = dataset.split == split
    if not rows.any():
        raise DataError(f"no event in the {SPLIT_NAMES[split]} split to fit the reward model on")
    u, a, r = dataset.user[rows], dataset.item[rows], dataset.reward[rows].astype(np.float64)
    mu = float(r.mean())
    n_i = np.bincount(a, minlength=dataset.n_items + 1)
    b_i = np.bincount(a, r - mu, minlength=dataset.n_items + 1) / (n_i + shrinkage + 1e-12)
    n_u = np.bincount(u, minlength=dataset.n_users + 1)
    res = r - mu - b_i[a]
    b_u = np.bincount(u, res, minlength=dataset.n_users + 1) / (n_u + shrinkage + 1e-12)
    return BaselineRewards(
        mu=mu, user_bias=b_u.astype(np.float32), item_bias=b_i.astype(np.float32)
    )


# --- the evaluation ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OPEReport:
    """Off-policy estimates of one policy's per-event value on one split."""

    split: str
    """The evaluated split."""
    n_events: int
    """Logged events (bandit rounds) evaluated."""
    behaviour: str
    """Where the propensities came from: beta_head or fitted."""
    estimates: dict[str, Interval]
    """ips, snips, dr, dm → value with its bootstrap interval."""
    logged_value: float
    """Mean logged reward: the behaviour policy's own value."""
    behaviour_nll: float
    """Mean -log beta(a|s) of the logged actions on this split."""
    support: float
    """Share of events whose logged item is in the target policy's top K (w > 0)."""
    mean_weight: float
    """Mean unclipped weight; near 1 when beta is right and pi's support is covered by beta."""
    max_weight: float
    """Largest unclipped weight."""
    clipped_share: float
    """Share of weights the cap changed."""
    ess: float
    """Effective sample size of the clipped weights, (sum w)^2 / sum w^2."""
    config: dict[str, Any] = field(default_factory=dict)
    """The OPE config used."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_events": self.n_events,
            "behaviour": self.behaviour,
            "estimates": {k: v.to_dict() for k, v in self.estimates.items()},
            "logged_value": self.logged_value,
            "behaviour_nll": self.behaviour_nll,
            "support": self.support,
            "mean_weight": self.mean_weight,
            "max_weight": self.max_weight,
            "clipped_share": self.clipped_share,
            "ess": self.ess,
            "ess_ratio": self.ess / self.n_events if self.n_events else 0.0,
            "config": dict(self.config),
        }


def target_probs(
    scores: Tensor, *, temperature: float, top_k: int | None, row_keys: Tensor
) -> tuple[Tensor, Tensor]:
    """pi as (items (B, K), probs (B, K)): softmax(scores / T) over the top K of each row.

    ``row_keys`` (B,) (the user index) seeds the tie-break of :func:`recloop.ranking.topk`.
    """
    k = scores.shape[1] if top_k is None else min(top_k, scores.shape[1])
    ranked = topk(scores, k, row_keys=row_keys)
    return ranked.indices, torch.softmax(ranked.values / temperature, dim=1)


@torch.no_grad()
def off_policy_evaluate(
    policy: Scorer,
    dataset: PreparedDataset,
    *,
    history: int,
    behaviour: Behaviour,
    behaviour_name: str,
    rewards: BaselineRewards,
    split: str | int = "test",
    cfg: OPEConfig = OPEConfig(),
) -> OPEReport:
    """IPS / SNIPS / DR / DM of ``policy`` on the events of ``split`` (module docstring)."""
    code = split_code(split)
    rows = np.flatnonzero(dataset.split == code)
    e = rows.shape[0]
    if e == 0:
        raise DataError(f"no event in the {SPLIT_NAMES[code]} split; nothing to evaluate")
    user = dataset.user[rows].astype(np.int64)
    start = dataset.user_offsets[user]
    win = gather_windows(dataset.item, dataset.reward, end=rows, start=start, length=history)
    width = dataset.n_items + 1
    pad = torch.zeros(1, dtype=torch.long)
    action = dataset.item[rows].astype(np.int64)
    r = dataset.reward[rows].astype(np.float64)
    p_pi = np.empty(e)
    log_beta = np.empty(e)
    v = np.empty(e)
    for lo in range(0, e, cfg.batch_size):
        sl = slice(lo, min(lo + cfg.batch_size, e))
        args = (
            torch.from_numpy(user[sl]),
            torch.from_numpy(win.item[sl].astype(np.int64)),
            torch.from_numpy(win.reward[sl]),
        )
        # index_fill out of place: the scorer's own tensors stay as they are
        scores = policy(*args).index_fill(1, pad, float("-inf"))
        if cfg.mask_consumed:
            # each event's earlier items, built per batch: all events' prefixes at once
            # would grow with the square of the users' history lengths
            offsets, c_rows = csr_ranges(start[sl], rows[sl])
            c_row, c_sl = batch_rows(offsets, 0, sl.stop - sl.start)
            key = torch.from_numpy(c_row * width + dataset.item[c_rows[c_sl]].astype(np.int64))
            scores.view(-1).index_fill_(0, key, float("-inf"))
        items, probs = target_probs(
            scores, temperature=cfg.temperature, top_k=cfg.top_k, row_keys=args[0]
        )
        probs = probs.nan_to_num(nan=0.0)  # a row with every item masked shows nothing
        a = torch.from_numpy(action[sl])[:, None]
        p_pi[sl] = (probs * (items == a)).sum(1).double().numpy()
        log_beta[sl] = torch.log_softmax(behaviour(*args).double(), 1).gather(1, a)[:, 0].numpy()
        q_top = rewards(user[sl, None], items.numpy())  # (b, K)
        v[sl] = (probs.double().numpy() * q_top).sum(1)
    w_raw = p_pi * np.exp(-log_beta)
    w, clipped = clip_weights(w_raw, cfg.weight_cap)
    estimates = bootstrap_intervals(
        w, r, rewards(user, action).astype(np.float64), v,
        n_boot=cfg.n_boot, confidence=cfg.confidence, seed=cfg.seed,
    )  # fmt: skip
    return OPEReport(
        split=SPLIT_NAMES[code],
        n_events=e,
        behaviour=behaviour_name,
        estimates=estimates,
        logged_value=float(r.mean()),
        behaviour_nll=float(-log_beta.mean()),
        support=float(np.mean(p_pi > 0)),
        mean_weight=float(w_raw.mean()),
        max_weight=float(w_raw.max()),
        clipped_share=clipped,
        ess=effective_sample_size(w),
        config=config_to_dict(cfg),
    )


def _same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def reinforce_beta(run_dir: Path, policy: PolicyNet, manifest: dict[str, Any]) -> Behaviour | None:
    """REINFORCE's saved behaviour head on the policy's state, or None if the run has none.

    Reads ``RUN_DIR/checkpoint/best.pt`` or ``last.pt``, whichever holds the artifact's policy.
    """
    from recloop.training.checkpoint import has_checkpoint, load_checkpoint

    if manifest.get("algo") != "reinforce" or not has_checkpoint(run_dir):
        return None
    ck = load_checkpoint(run_dir)
    # The artifact holds the best epoch's weights or the last ones (restore_best): take beta
    # from the snapshot whose policy is the artifact's.
    ours = policy.state_dict()
    snapshots = [n for n in (ck.best_networks, ck.algo_state.get("networks")) if n and "beta" in n]
    same = [n for n in snapshots if _same_weights(n.get("policy", {}), ours)]
    if not same:
        return None
    nets = same[0]
    conf = manifest.get("config", {})
    head_cfg = config_from_dict(HeadConfig, conf.get("head", {}), source="artifact config head")
    beta = LinearHead(
        HeadConfig(
            hidden_dims=tuple(conf.get("beta_hidden_dims", ())), activation=head_cfg.activation
        ),
        state_dim=policy.encoder.state_dim,
        n_items=policy.spec.n_items,
        embedding_dim=policy.spec.encoder.embedding_dim,
    )
    beta.load_state_dict(nets["beta"])
    beta.eval()

    def logits(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        out: Tensor = beta(
            policy.state(user, history, history_reward), policy.item_embedding.weight
        )
        return out.index_fill(1, torch.zeros(1, dtype=torch.long), float("-inf"))

    return logits


def ope_for_run(
    run_or_artifact: Path,
    dataset: PreparedDataset,
    *,
    split: str = "test",
    cfg: OPEConfig = OPEConfig(),
) -> OPEReport:
    """OPE of a saved run's (or artifact's) policy on ``split`` of ``dataset``.

    Propensities: REINFORCE's beta head when ``cfg.behaviour`` allows it and the run saved
    one, else a behaviour model fitted on the TRAIN split (see :func:`fit_behaviour`).
    """
    from recloop.artifacts import load_artifact

    art = load_artifact(run_or_artifact)
    if art.n_items != dataset.n_items or art.n_users != dataset.n_users:
        raise DataError(
            f"{run_or_artifact}: the policy has {art.n_users} users and {art.n_items} items, "
            f"the dataset {dataset.path or ''} {dataset.n_users} and {dataset.n_items}"
        )
    beta: Behaviour | None = None
    if cfg.behaviour in ("auto", "beta_head"):
        run_dir = art.path.parent if art.path.name == "artifact" else art.path
        beta = reinforce_beta(run_dir, art.policy, art.manifest)
        if beta is None and cfg.behaviour == "beta_head":
            raise DataError(f"{run_or_artifact}: no saved REINFORCE beta head (checkpoint/)")
    name = "beta_head" if beta is not None else "fitted"
    if beta is None:
        beta = fit_behaviour(dataset, history=art.history_len, cfg=cfg)
    rewards = fit_baseline_rewards(dataset, shrinkage=cfg.reward_shrinkage)
    return off_policy_evaluate(
        art.policy, dataset, history=art.history_len, behaviour=beta,
        behaviour_name=name, rewards=rewards, split=split, cfg=cfg,
    )  # fmt: skip
