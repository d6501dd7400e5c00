"""Off-policy evaluation of ranking policies on held-out logged events.

Each event of the evaluated split is one contextual-bandit round: the context is the user's
last H items before the event (whatever their split), the logged action is the event's item
and the reward its logged reward.  The target policy pi is the policy's **top-K softmax**:
``softmax(scores / temperature)`` over its K best-scored items, 0 elsewhere (``top_k=None``:
over the whole catalogue).  That is the stochastic version of the slate it would serve;
items outside its top K get no weight, so pi's support is what it can actually show.  With
``mask_consumed`` (default) it is the policy as served: the items the user consumed before
the event are removed from its scores first.

Target ``served`` (``OPEConfig.target``) scores a model **as the service would serve it,
with the same exploration as the log**: each impression of a log read by ``prepare
--from-db --impressions`` carries its serving policy, settings, position and list length,
and pi(a|s) is the exact probability that the model, served with those settings from the
state of the impression's list, shows item a at that position (ε-greedy: the slot's
marginal :func:`recloop.slates.epsilon_marginals` over the model's greedy list; top-k: 1
for the model's greedy item of the slot; softmax: softmax(scores / T) over every unmasked
item not shown above the slot).  The estimate is then the value per impression of the
policy the loop would put in production, and, since pi covers every item beta covers, its
mean weight is 1 in expectation.  Each position of a greedy or ε-greedy list is scored as
its own round (the item-position model: an impression's reward depends on its item and
position, not on its neighbours).  A softmax list is drawn one slot after the other, and the
service logs each slot's choice probability given the slots above it: a slot j > 0 is
scored given the items logged above it, its weight times theirs (cascade weights, the
Cascade-DR of Kiyohara, Saito, Matsuhiro, Narita, Shimizu & Yamamoto, WSDM 2022; unbiased
when a slot's reward depends on the items at and above it, not below), so its variance grows
with its depth.

Estimators (Dudik, Langford & Li, ICML 2011; Swaminathan & Joachims, NeurIPS 2015), with
importance weights ``w = min(pi(a|s) / beta(a|s), cap)``:

- IPS   ``mean(w r)``
- SNIPS ``sum(w r) / sum(w)``
- DR    ``mean(V(s) + w (r - q(s, a)))`` with ``V(s) = sum_a pi(a|s) q(s, a)``
- DM    ``mean(V(s))``, the reward model alone, for reference (target ``served``: a softmax
  slot below the first contributes its V times the weight of the items above it).

Two runs' estimates are comparable only when they are computed against the same beta and the
same q on the same events, so everything that does not depend on the policy -- the events,
the propensities ``beta(a|s)`` of the logged actions and the reward model -- is built once
per dataset (:class:`LoggedEvents`) and shared by every policy compared on it:

- propensities come from the dataset's logged ``propensity`` column (an extra event column,
  the logging policy's probability of the logged item) when it has one, else from a
  behaviour model fitted here on the TRAIN split only: a softmax over items on the mean of
  the last ``behaviour_history`` items' embeddings, trained by cross-entropy.  A REINFORCE
  run's own behaviour head is used only on request (``behaviour=beta_head``), one run at a
  time: two runs' heads are two different betas;
- the reward model ``q`` is the shrunk additive baseline ``mu + b_user + b_item`` (Koren
  2010, section 2.1) fitted on TRAIN.

Confidence intervals are percentile bootstraps over events.  With several policies, each
one's difference to the first is bootstrapped **paired**: every replicate resamples the same
events for both, so the shared noise of the events cancels (Efron & Tibshirani 1993, ch. 10).

Honesty checks: an estimate (or its interval) that leaves the range of the rewards logged on
the split is flagged ``<estimator>_out_of_range`` (IPS can; SNIPS, a weighted mean of
rewards, cannot), a mean unclipped weight outside ``mean_weight_bounds`` is flagged
``mean_weight_far_from_1``: ``E_beta[pi / beta] = 1`` when beta is right and covers pi, and
DR and IPS intervals that do not overlap are flagged ``dr_ips_disagree``
(:func:`estimators_disagree`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recloop.artifacts.heads import HeadConfig, LinearHead
from recloop.artifacts.policy import PolicyNet
from recloop.config import check, config_from_dict, config_to_dict
from recloop.data.dataset import SPLIT_NAMES, TRAIN, PreparedDataset, split_period
from recloop.data.lists import (
    context_windows,
    events_file,
    item_id_frame,
    list_first,
    list_starts,
)
from recloop.data.sampler import TransitionSampler, gather_windows
from recloop.data.schema import (
    EPSILON,
    LIST_LENGTH,
    LIST_SOURCE,
    POLICY_VERSION,
    POSITION,
    SERVED_CONTEXT,
    SERVED_POLICY,
    TEMPERATURE,
)
from recloop.errors import ConfigError, DataError
from recloop.evaluation.protocol import Scorer, batch_rows, csr_ranges, split_code
from recloop.ranking import topk
from recloop.slates import inverse_pool_means

logger = logging.getLogger(__name__)

Behaviour = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(user (B,), history (B, H), history_reward (B, H)) -> logits (B, N + 1)`` of beta."""

PROPENSITY = "propensity"
"""Extra event column holding the logging policy's probability of the logged item."""

BEHAVIOURS = ("auto", "logged", "fitted", "beta_head")
"""Values of ``OPEConfig.behaviour``."""
TARGETS = ("uniform_topk", "softmax", "served")
"""Values of ``OPEConfig.target``."""
OUTCOMES = ("reward", "return")
"""Values of ``OPEConfig.outcome``."""


@dataclass(frozen=True, kw_only=True)
class OPEConfig:
    """How the target policy, the behaviour and reward models and the intervals are built."""

    target: str = "uniform_topk"
    """The stochastic policy evaluated for each run: uniform_topk (one of its top K items,
    each with probability 1/K: depends only on the ranking, so runs whose scores live on
    different scales — logits, Q-values, cosines — are compared on the same footing),
    softmax (softmax(scores / temperature) over the top K: depends on the score scale) or
    served (the run served with each impression's logged policy, settings and position, see
    the module docstring; needs the serving columns of ``prepare --from-db --impressions``,
    and ignores ``top_k`` and ``temperature``)."""
    temperature: float = 1.0
    """Softmax temperature of the ``softmax`` target policy over its scores."""
    positions: int | None = None
    """Target ``served`` only: evaluate the impressions at the first ``positions`` slots of
    their lists, the others left out and counted; None = every slot.  A softmax list's lower
    slots carry the product of the weights above them, so their variance grows with depth:
    fewer positions trade the lower slots' value for a tighter estimate of the top ones'."""
    top_k: int | None = 10
    """The target policy picks from its K best items; None = the whole catalogue."""
    cluster_by_user: bool = True
    """Bootstrap resamples users (all of a user's events together), not events: a user's
    events are not independent, and resampling them one by one makes intervals too narrow
    when users have several events (ratio and time splits; leave-one-out has one each)."""
    mask_consumed: bool = True
    """Evaluate the policy as served: items the user consumed before the event are removed
    from its scores (the service excludes them), so a repeat of one gets pi = 0.  All of the
    user's earlier items are masked; the service masks the ones its store holds (the last
    ``consumed_len``, 100 by default), which differs only for users with longer histories."""
    weight_cap: float | None = 100.0
    """Importance weights are clipped at this value; None = no clipping."""
    behaviour: str = "auto"
    """Propensity source, one for every compared run: auto (the dataset's logged
    ``propensity`` column when it has one, else fitted), logged (that column, required),
    fitted (a behaviour model fitted on the TRAIN split, once per dataset) or beta_head (a
    REINFORCE run's own behaviour head; one run at a time, refused when comparing runs)."""
    behaviour_history: int = 10
    """Items of history the fitted behaviour model sees; one value for every run, so that
    every run is scored against the same beta."""
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
    outcome: str = "reward"
    """What each logged event's outcome is, for the estimators and the reward model: its
    immediate ``reward``, or the discounted ``return`` to the end of its session (prepare's
    ``returns``: gamma from the prepare config, sessions cut where the split changes).  With
    ``return`` a one-step estimate values showing the target's item *and then following the
    logging policy* (Q^beta(s, a)): it sees what the item does to the rest of the session -- a
    click that does not satisfy and makes the user leave -- which the immediate reward
    cannot; it is still not the value of following the target policy for the whole
    session."""
    mean_weight_bounds: tuple[float, float] = (0.5, 2.0)
    """The mean unclipped weight is about 1 when beta is right; outside these bounds the
    report is flagged ``mean_weight_far_from_1``."""
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
        check(
            self.target in TARGETS,
            f"ope.target must be one of {', '.join(TARGETS)}, got {self.target!r}",
        )
        check(self.top_k is None or self.top_k >= 1, f"ope.top_k must be >= 1, got {self.top_k}")
        check(
            self.positions is None or self.positions >= 1,
            f"ope.positions must be >= 1, got {self.positions}",
        )
        check(
            self.weight_cap is None or self.weight_cap > 0,
            f"ope.weight_cap must be > 0, got {self.weight_cap}",
        )
        check(
            self.behaviour in BEHAVIOURS,
            f"ope.behaviour must be one of {', '.join(BEHAVIOURS)}, got {self.behaviour!r}",
        )
        check(self.behaviour_history >= 1, "ope.behaviour_history must be >= 1")
        check(self.behaviour_dim >= 1, "ope.behaviour_dim must be >= 1")
        check(self.behaviour_epochs >= 1, "ope.behaviour_epochs must be >= 1")
        check(self.behaviour_lr > 0, "ope.behaviour_lr must be > 0")
        check(self.behaviour_batch_size >= 1, "ope.behaviour_batch_size must be >= 1")
        check(self.reward_shrinkage >= 0, "ope.reward_shrinkage must be >= 0")
        check(
            self.outcome in OUTCOMES,
            f"ope.outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}",
        )
        lo, hi = self.mean_weight_bounds
        check(
            0 <= lo <= 1 <= hi,
            f"ope.mean_weight_bounds must satisfy 0 <= low <= 1 <= high, got {lo}, {hi}",
        )
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


def self_normalised_dr(
    w: np.ndarray, r: np.ndarray, q_logged: np.ndarray, v_target: np.ndarray
) -> float:
    """mean(V(s)) + sum(w (r - q(s, a))) / sum(w): DR whose correction is a weighted mean
    (the weighted DR of Thomas & Brunskill 2016, section 5); DM when sum(w) = 0."""
    total = float(np.sum(w))
    corr = float(np.sum(w * (r - q_logged))) / total if total > 0 else 0.0
    return float(np.mean(v_target)) + corr


def mean_se(x: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """Standard error of ``mean(x)`` (E,); with ``clusters`` (E,) the cluster-robust one
    (whole clusters independent, events within one not; Cameron & Miller 2015, eq. 11)."""
    e = x.shape[0]
    if e < 2:
        return 0.0
    if clusters is None:
        return float(np.std(x, ddof=1) / np.sqrt(e))
    _, inv = np.unique(clusters, return_inverse=True)
    g = int(inv.max()) + 1
    if g < 2:
        return 0.0
    resid = np.bincount(inv, x - x.mean(), minlength=g)  # (G,) per-cluster residual sums
    return float(np.sqrt(g / (g - 1) * np.sum(resid**2)) / e)


SLOPE_CAPS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, float("inf"))
"""Weight caps the SLOPE rule chooses among (ascending, ending unclipped); a geometric
grid fixed here once, never tuned on a ground truth."""


@dataclass(frozen=True)
class SlopeChoice:
    """The clipped DR the SLOPE rule picked."""

    value: float
    cap: float
    """The chosen weight cap (inf: unclipped DR)."""
    se: float
    """Standard error of the chosen estimate."""


def slope_clipped_dr(
    w: np.ndarray,
    r: np.ndarray,
    q_logged: np.ndarray,
    v_target: np.ndarray,
    *,
    caps: Sequence[float] = SLOPE_CAPS,
    clusters: np.ndarray | None = None,
    width: float = 2.0,
) -> SlopeChoice:
    """DR with weights ``min(w, c)``, the cap c picked by SLOPE (Su, Srinath &
    Krishnamurthy, ICML 2020, Algorithm 1), which looks at the log only.

    ``w`` (E,) are the unclipped weights.  A larger cap has less bias (none when it clips
    nothing: DR with exact propensities is unbiased) and more variance.  Candidates are
    taken from the largest cap down (least bias first), each with the interval
    ``estimate ± width * SE`` (SE: :func:`mean_se`, by ``clusters`` when given); the pick
    is the last one whose interval still meets every earlier (less biased) one's —
    Lepski's principle: clip harder while the estimate moves by less than the noise of the
    less biased ones.  With the oracle cap i* (least bias + SE), every interval up to i*
    holds the value, so the pick clips at least as hard as i* and lies within about
    ``2 width`` SE(i*) of it (Su et al., Theorem 3).
    """
    order = sorted(caps, reverse=True)
    lo, hi = -np.inf, np.inf
    best: SlopeChoice | None = None
    for c in order:
        terms = v_target + np.minimum(w, c) * (r - q_logged)
        value, se = float(terms.mean()), mean_se(terms, clusters)
        lo, hi = max(lo, value - width * se), min(hi, value + width * se)
        if lo > hi and best is not None:
            break
        best = SlopeChoice(value=value, cap=float(c), se=se)
    assert best is not None, "SLOPE needs at least one cap"
    return best


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
    flags: tuple[str, ...] = ()
    """Warnings about this estimate, e.g. ``ips_out_of_range``."""

    def excludes(self, x: float) -> bool:
        """Whether ``x`` lies outside [low, high]."""
        return x < self.low or x > self.high

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "low": self.low, "high": self.high, "flags": list(self.flags)}


def bootstrap_means(
    cols: np.ndarray,
    *,
    n_boot: int,
    rng: np.random.Generator,
    chunk_elems: int = 1 << 20,
    clusters: np.ndarray | None = None,
) -> np.ndarray:
    """(n_boot, k) column means of ``n_boot`` resamples with replacement of the rows of
    ``cols`` (E, k) (Efron 1979).

    Replicates come in chunks, each a (b, E) matrix of resampled row indices with
    b * E <= ``chunk_elems``; every column is averaged over the same index row, so the
    columns of one replicate are computed on the same resampled events.

    With ``clusters`` (E,) (e.g. the user of each event) whole clusters are resampled — the
    cluster bootstrap (Davison & Hinkley 1997, section 3.8): a replicate's mean is the sum
    over the drawn clusters' row sums divided by their row count.
    """
    if clusters is not None:
        _, inverse = np.unique(clusters, return_inverse=True)
        n_c = int(inverse.max()) + 1 if inverse.shape[0] else 0
        if n_c < cols.shape[0]:  # with one row per cluster it is the plain bootstrap
            sums = np.zeros((n_c, cols.shape[1]))
            np.add.at(sums, inverse, cols)
            size = np.bincount(inverse, minlength=n_c).astype(np.float64)
            # the sums and the sizes resampled as one table: columns k..k+1 are the sizes
            table = np.concatenate([sums, size[:, None]], axis=1)
            m = bootstrap_means(table, n_boot=n_boot, rng=rng, chunk_elems=chunk_elems)
            return m[:, :-1] / m[:, -1:]
    e, k = cols.shape
    out = np.empty((n_boot, k))
    chunk = max(1, chunk_elems // max(e, 1))
    cols_t = np.ascontiguousarray(cols.T)  # (k, E): one contiguous gather per column
    for lo in range(0, n_boot, chunk):
        b = min(chunk, n_boot - lo)
        idx = rng.integers(0, e, size=(b, e))  # (b, E)
        for j in range(k):
            out[lo : lo + b, j] = cols_t[j][idx].mean(axis=1)
    return out


def _percentiles(
    point: dict[str, float], boots: dict[str, np.ndarray], confidence: float
) -> dict[str, Interval]:
    alpha = (1 - confidence) / 2
    out = {}
    for k, v in point.items():
        lo, hi = np.quantile(boots[k], [alpha, 1 - alpha])
        out[k] = Interval(v, float(lo), float(hi))
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den is 0 (a resample with no weight shows nothing)."""
    safe = np.where(den > 0, den, 1.0)
    return np.where(den > 0, num / safe, 0.0)


def bootstrap_intervals(
    w: np.ndarray,
    r: np.ndarray,
    q_logged: np.ndarray,
    v_target: np.ndarray,
    *,
    n_boot: int,
    confidence: float = 0.95,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> dict[str, Interval]:
    """IPS, SNIPS, DR and DM with percentile bootstrap intervals over events (or over
    ``clusters`` (E,), e.g. users: see :func:`bootstrap_means`).

    Every estimator is a function of column means, so a replicate is one
    :func:`bootstrap_means` row.  A given ``seed`` resamples the same events for every policy
    evaluated on the same E events, which is what :func:`paired_bootstrap` relies on.
    """
    e = w.shape[0]
    point = {
        "ips": ips(w, r),
        "snips": snips(w, r),
        "dr": doubly_robust(w, r, q_logged, v_target),
        "dm": float(np.mean(v_target)) if e else 0.0,
    }
    if n_boot == 0 or e == 0:
        return {k: Interval(v, v, v) for k, v in point.items()}
    cols = np.stack([w * r, w, v_target + w * (r - q_logged), v_target], axis=1)  # (E, 4)
    m = bootstrap_means(cols, n_boot=n_boot, rng=np.random.default_rng(seed), clusters=clusters)
    boots = {"ips": m[:, 0], "snips": _ratio(m[:, 0], m[:, 1]), "dr": m[:, 2], "dm": m[:, 3]}
    return _percentiles(point, boots, confidence)


def paired_bootstrap(
    r: np.ndarray,
    q_logged: np.ndarray,
    w_a: np.ndarray,
    v_a: np.ndarray,
    w_b: np.ndarray,
    v_b: np.ndarray,
    *,
    n_boot: int,
    confidence: float = 0.95,
    seed: int = 0,
    paired: bool = True,
    clusters: np.ndarray | None = None,
) -> dict[str, Interval]:
    """IPS, SNIPS and DR of policy B minus policy A on the same E events, with intervals.

    ``paired`` (the default, and the right one): each replicate resamples the same events
    for both policies, so the difference's interval reflects only how the two policies
    differ on the events, not which events happened to be logged.  ``paired=False`` resamples
    them independently, as two separate reports would; it is there for comparison.
    """
    e = r.shape[0]
    dr_a, dr_b = v_a + w_a * (r - q_logged), v_b + w_b * (r - q_logged)
    point = {
        "ips": ips(w_b, r) - ips(w_a, r),
        "snips": snips(w_b, r) - snips(w_a, r),
        "dr": float(np.mean(dr_b) - np.mean(dr_a)) if e else 0.0,
    }
    if n_boot == 0 or e == 0:
        return {k: Interval(v, v, v) for k, v in point.items()}
    cols_a = np.stack([w_a * r, w_a, dr_a], axis=1)  # (E, 3)
    cols_b = np.stack([w_b * r, w_b, dr_b], axis=1)
    rng = np.random.default_rng(seed)
    if paired:
        both = np.concatenate([cols_a, cols_b], axis=1)
        m = bootstrap_means(both, n_boot=n_boot, rng=rng, clusters=clusters)
        m_a, m_b = m[:, :3], m[:, 3:]
    else:
        m_a = bootstrap_means(cols_a, n_boot=n_boot, rng=rng, clusters=clusters)
        rng_b = np.random.default_rng([seed, 1])
        m_b = bootstrap_means(cols_b, n_boot=n_boot, rng=rng_b, clusters=clusters)
    boots = {
        "ips": m_b[:, 0] - m_a[:, 0],
        "snips": _ratio(m_b[:, 0], m_b[:, 1]) - _ratio(m_a[:, 0], m_a[:, 1]),
        "dr": m_b[:, 2] - m_a[:, 2],
    }
    return _percentiles(point, boots, confidence)


def range_flags(name: str, iv: Interval, low: float, high: float) -> tuple[str, ...]:
    """``(name_out_of_range,)`` when the estimate or its interval leaves [low, high].

    A policy's value is a mean reward, so it lies in the range of the rewards; an estimate
    outside it is wrong, whatever its interval says.  Round-off is not flagged.
    """
    tol = 1e-9 * max(1.0, abs(low), abs(high))
    outside = min(iv.value, iv.low) < low - tol or max(iv.value, iv.high) > high + tol
    return (f"{name}_out_of_range",) if outside else ()


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


def train_view(dataset: PreparedDataset) -> PreparedDataset:
    """The TRAIN events alone, as a dataset with the same ids.

    Models fitted on it cannot see a validation or test event, not even as another event's
    history (splits are chronological per user today, but this does not rely on it).
    """
    rows = np.flatnonzero(dataset.split == TRAIN)
    return PreparedDataset.from_arrays(
        user=dataset.user[rows],
        item=dataset.item[rows],
        timestamp=dataset.timestamp[rows],
        reward=dataset.reward[rows],
        returns=dataset.returns[rows],
        session=dataset.session[rows],
        split=dataset.split[rows],
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        user_ids=dataset.user_ids,
        item_ids=dataset.item_ids,
    )


def fit_behaviour(
    dataset: PreparedDataset, *, cfg: OPEConfig, history: int | None = None
) -> MeanHistoryBehaviour:
    """Fit :class:`MeanHistoryBehaviour` by cross-entropy on the TRAIN events only.

    ``history`` defaults to ``cfg.behaviour_history``.
    """
    sampler = TransitionSampler(
        train_view(dataset),
        history=cfg.behaviour_history if history is None else history,
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


def event_outcomes(dataset: PreparedDataset, outcome: str = "reward") -> np.ndarray:
    """(E,) the per-event outcome OPE estimates (:attr:`OPEConfig.outcome`): the dataset's
    ``reward`` or its per-session discounted ``returns``."""
    if outcome == "reward":
        return dataset.reward
    if outcome == "return":
        return dataset.returns
    raise ConfigError(f"ope.outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")


def fit_baseline_rewards(
    dataset: PreparedDataset, *, shrinkage: float, split: int = TRAIN, outcome: str = "reward"
) -> BaselineRewards:
    """Item biases first, then user biases on the residuals, each sum / (count + lambda),
    of the ``outcome`` (:func:`event_outcomes`) on ``split``."""
    rows = dataset.split == split
    if not rows.any():
        raise DataError(f"no event in the {SPLIT_NAMES[split]} split to fit the reward model on")
    y = event_outcomes(dataset, outcome)
    u, a, r = dataset.user[rows], dataset.item[rows], y[rows].astype(np.float64)
    mu = float(r.mean())
    n_i = np.bincount(a, minlength=dataset.n_items + 1)
    b_i = np.bincount(a, r - mu, minlength=dataset.n_items + 1) / (n_i + shrinkage + 1e-12)
    n_u = np.bincount(u, minlength=dataset.n_users + 1)
    res = r - mu - b_i[a]
    b_u = np.bincount(u, res, minlength=dataset.n_users + 1) / (n_u + shrinkage + 1e-12)
    return BaselineRewards(
        mu=mu, user_bias=b_u.astype(np.float32), item_bias=b_i.astype(np.float32)
    )


# --- the policy-independent half: events, propensities, reward model ---------------------


def logged_propensities(dataset: PreparedDataset, rows: np.ndarray) -> np.ndarray | None:
    """(E,) float64 logged ``propensity`` of the events at ``rows``; None without the column.

    Each must be a probability in (0, 1]: the logging policy chose the logged item.
    """
    col = dataset.extra.get(PROPENSITY)
    if col is None:
        return None
    try:
        p = np.asarray(col[rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(
            f"{events_file(dataset)}: column {PROPENSITY!r} must be numeric, got dtype {col.dtype}"
        ) from None
    bad = np.flatnonzero(~((p > 0) & (p <= 1)))  # NaN fails both tests
    if bad.shape[0]:
        row = int(rows[bad[0]])
        raise DataError(
            f"{events_file(dataset)}, row {row}: field {PROPENSITY!r} must be a probability "
            f"in (0, 1], got {float(p[bad[0]])} ({bad.shape[0]} such events in the split)"
        )
    return p


@torch.no_grad()
def model_log_propensities(
    behaviour: Behaviour,
    dataset: PreparedDataset,
    rows: np.ndarray,
    *,
    history: int,
    batch_size: int = 1024,
) -> np.ndarray:
    """(E,) float64 log beta(a|s) of the logged items at ``rows`` under a behaviour model
    that sees the last ``history`` items before each event."""
    user = dataset.user[rows].astype(np.int64)
    win = gather_windows(
        dataset.item, dataset.reward, end=rows, start=dataset.user_offsets[user], length=history
    )
    action = torch.from_numpy(dataset.item[rows].astype(np.int64))[:, None]
    out = np.empty(rows.shape[0])
    for lo in range(0, rows.shape[0], batch_size):
        sl = slice(lo, lo + batch_size)
        logits = behaviour(
            torch.from_numpy(user[sl]),
            torch.from_numpy(win.item[sl].astype(np.int64)),
            torch.from_numpy(win.reward[sl]),
        )
        out[sl] = torch.log_softmax(logits.double(), 1).gather(1, action[sl])[:, 0].numpy()
    return out


@dataclass(frozen=True, kw_only=True, eq=False)
class LoggedEvents:
    """The policy-independent half of OPE on one split: events, propensities, reward model.

    Built once per dataset by :func:`logged_events` and shared by every policy compared on
    it, so that their estimates differ by the policies and nothing else.
    """

    split: int
    """Split code of the events."""
    rows: np.ndarray  # (E,) int64 dataset rows, ascending
    user: np.ndarray  # (E,) int64
    action: np.ndarray  # (E,) int64 logged items
    reward: np.ndarray  # (E,) float64 logged outcomes (rewards, or returns: cfg.outcome)
    log_propensity: np.ndarray  # (E,) float64 log beta(a|s) of the logged items
    behaviour: str
    """Where the propensities come from: logged, fitted or beta_head."""
    rewards: BaselineRewards
    """The reward model q (fitted on TRAIN)."""
    q_logged: np.ndarray  # (E,) float64 q(s, a) of the logged items
    left_out: int = 0
    """Impressions of the split not evaluated: with target ``served``, those of fallback
    lists (``list_source`` ``popular``), which no model's policy drew, and those below
    ``positions``."""
    position: np.ndarray | None = None  # (E,) int64 slot of each impression in its list
    # (target served, lists of more than one item), for the report's ESS by position

    @property
    def n_events(self) -> int:
        return int(self.rows.shape[0])

    @property
    def reward_range(self) -> tuple[float, float]:
        """[min r, max r] of the logged rewards: every policy's value lies inside."""
        return float(self.reward.min()), float(self.reward.max())


def logged_events(
    dataset: PreparedDataset,
    *,
    split: str | int = "test",
    cfg: OPEConfig = OPEConfig(),
    behaviour: Behaviour | None = None,
    behaviour_name: str = "model",
    history: int | None = None,
    rewards: BaselineRewards | None = None,
) -> LoggedEvents:
    """The events of ``split`` with their propensities and the reward model.

    Propensities: from ``behaviour`` when one is given (it sees ``history`` items, default
    ``cfg.behaviour_history``), else by ``cfg.behaviour``: the logged ``propensity`` column
    (auto, logged) or a model fitted on TRAIN (auto without the column, fitted).  ``rewards``
    defaults to the baseline fitted on TRAIN.  The outcome of each event is its reward or its
    session's discounted return from it (``cfg.outcome``).
    """
    code = split_code(split)
    rows = np.flatnonzero(dataset.split == code)
    if rows.shape[0] == 0:
        raise DataError(f"no event in the {SPLIT_NAMES[code]} split; nothing to evaluate")
    left_out = 0
    if cfg.target == "served" and LIST_SOURCE in dataset.extra:
        # a fallback list was drawn by no model's policy: serving a model there means
        # whatever its service falls back to, which the served target does not model, so
        # every policy is compared on the impressions of lists a policy drew
        drawn = dataset.extra[LIST_SOURCE][rows].astype(str) != FALLBACK_SOURCE
        left_out = int(rows.shape[0] - drawn.sum())
        rows = rows[drawn]
        if rows.shape[0] == 0:
            raise DataError(
                f"{events_file(dataset)}: every impression of the {SPLIT_NAMES[code]} split "
                f"is of a fallback list ({LIST_SOURCE} {FALLBACK_SOURCE!r}); ope.target=served "
                "has nothing to evaluate"
            )
        if left_out:
            logger.info("served target: %d fallback-list impressions left out", left_out)
    if cfg.target == "served" and cfg.positions is not None:
        if POSITION not in dataset.extra:
            raise DataError(
                f"{events_file(dataset)}: ope.positions needs each impression's "
                f"{POSITION!r} (`recloop prepare --from-db --impressions` keeps it)"
            )
        top = dataset.extra[POSITION][rows] < cfg.positions
        lower = int(rows.shape[0] - top.sum())
        if lower == rows.shape[0]:
            raise DataError(
                f"{events_file(dataset)}: no impression of the {SPLIT_NAMES[code]} split is "
                f"at the first {cfg.positions} slots of its list; nothing to evaluate"
            )
        rows = rows[top]
        left_out += lower
        logger.info(
            "served target: %d impressions below position %d left out", lower, cfg.positions
        )
    if behaviour is not None:
        h = cfg.behaviour_history if history is None else history
        log_p = model_log_propensities(behaviour, dataset, rows, history=h)
        name = behaviour_name
    elif cfg.behaviour == "beta_head":
        raise ConfigError("ope.behaviour=beta_head: the behaviour head is a run's; pass it")
    else:
        logged = logged_propensities(dataset, rows) if cfg.behaviour != "fitted" else None
        if logged is None and cfg.behaviour == "logged":
            raise DataError(
                f"{events_file(dataset)}: ope.behaviour=logged but the events have no "
                f"{PROPENSITY!r} column"
            )
        if logged is not None:
            log_p, name = np.log(logged), "logged"
        else:
            model = fit_behaviour(dataset, cfg=cfg)
            log_p = model_log_propensities(
                model, dataset, rows, history=cfg.behaviour_history, batch_size=cfg.batch_size
            )
            name = "fitted"
    if rewards is None:
        rewards = fit_baseline_rewards(dataset, shrinkage=cfg.reward_shrinkage, outcome=cfg.outcome)
    user = dataset.user[rows].astype(np.int64)
    action = dataset.item[rows].astype(np.int64)
    position = None
    if cfg.target == "served" and POSITION in dataset.extra:
        position = dataset.extra[POSITION][rows].astype(np.int64)
        if not (position > 0).any():
            position = None  # lists of one: the report's ESS says it all
    return LoggedEvents(
        left_out=left_out,
        position=position,
        split=code,
        rows=rows,
        user=user,
        action=action,
        reward=event_outcomes(dataset, cfg.outcome)[rows].astype(np.float64),
        log_propensity=log_p,
        behaviour=name,
        rewards=rewards,
        q_logged=rewards(user, action).astype(np.float64),
    )


# --- the policy's half ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, eq=False)
class PolicyTerms:
    """What one target policy contributes on the events of a :class:`LoggedEvents`."""

    p_target: np.ndarray  # (E,) float64 pi(a|s) of the logged items (target served:
    # times the weight of the items above a softmax slot, see served_terms)
    v_target: np.ndarray  # (E,) float64 V(s) = sum_a pi(a|s) q(s, a) (the same)


def target_probs(
    scores: Tensor,
    *,
    temperature: float,
    top_k: int | None,
    row_keys: Tensor,
    target: str = "softmax",
) -> tuple[Tensor, Tensor]:
    """pi as (items (B, K), probs (B, K)) over the top K of each row: softmax(scores / T)
    (``target="softmax"``) or 1 / K each (``"uniform_topk"``; 1 / the number of unmasked
    items when fewer than K are left).  Masked items (-inf) get 0.

    ``row_keys`` (B,) (the user index) seeds the tie-break of :func:`recloop.ranking.topk`.
    """
    k = scores.shape[1] if top_k is None else min(top_k, scores.shape[1])
    ranked = topk(scores, k, row_keys=row_keys)
    if target == "uniform_topk":
        shown = (ranked.values > float("-inf")).to(torch.float32)
        return ranked.indices, shown / shown.sum(1, keepdim=True)
    return ranked.indices, torch.softmax(ranked.values / temperature, dim=1)


class TrainedCatalogue:
    """A policy trained on ``dataset``, scored without the items it cannot have learnt:
    those with no row in the TRAIN period (at -inf).

    Why.  A model trained on the dataset has an id (and an untrained row) for every item of
    every split, so its catalogue depends on the very events it is evaluated on: an item
    the logging policy explored once, in the holdout, is in the catalogue because it was
    explored there.  Served with exploration, such a model spreads its ε over that
    catalogue, and at every explored holdout impression its weight pi / beta is
    |beta's catalogue| / |its catalogue| instead of 0 for the items it would not have had.
    In ``recloop experiment`` (store-fed, 2026-12-07) that biased the gate's DR difference
    of a popularity refit by -0.025 against an exact one-step difference of +0.0004.
    Without those items the policy no longer depends on the events it is scored on."""

    def __init__(self, policy: Scorer, dataset: PreparedDataset) -> None:
        known = np.zeros(dataset.n_items + 1, bool)
        known[dataset.item[split_period(dataset.split) == TRAIN]] = True
        self.policy = policy
        self.unknown = torch.from_numpy(~known)  # (N + 1,), padding included

    def __call__(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return self.policy(user, history, history_reward).masked_fill(self.unknown, float("-inf"))


def served_scores(
    policy: Scorer,
    dataset: PreparedDataset,
    rows: np.ndarray,
    *,
    history: int,
    cfg: OPEConfig,
    extra_ids: Sequence[str] = (),
) -> Iterator[tuple[slice, Tensor, Tensor]]:
    """Per batch of the event ``rows`` (E,): (its slice, users (b,), scores (b, N + 1)) of
    ``policy`` in the state before each event, as served — padding and, with
    ``cfg.mask_consumed``, the user's earlier items at -inf.

    Target ``served``: a row that carries the context its list was drawn from
    (:data:`recloop.data.schema.SERVED_CONTEXT`) is scored on it instead -- the state from
    the logged recent items, the logged excluded items at -inf (whatever
    ``cfg.mask_consumed``) -- as its service saw it.  ``extra_ids``: raw ids of the
    scorer's columns past N (a catalogue scorer's items the dataset lacks), read in the
    contexts too.

    Equal rows next to each other (the served target's slots of one list, which share the
    list's state) are scored once and their scores repeated: a list of K costs one forward
    pass, not K."""
    pad = torch.zeros(1, dtype=torch.long)
    ids = (
        item_id_frame(dataset, extra_ids)
        if cfg.target == "served" and SERVED_CONTEXT in dataset.extra
        else None
    )
    for lo in range(0, rows.shape[0], cfg.batch_size):
        sl = slice(lo, min(lo + cfg.batch_size, rows.shape[0]))
        at = rows[sl]
        new = np.ones(at.shape[0], bool)
        new[1:] = at[1:] != at[:-1]
        uniq = at[new]  # (u,) the distinct states of the batch, in order
        user = dataset.user[uniq].astype(np.int64)
        start = dataset.user_offsets[user]
        win = gather_windows(dataset.item, dataset.reward, end=uniq, start=start, length=history)
        hist, hist_reward = win.item.astype(np.int64), win.reward
        ctx = None if ids is None else context_windows(dataset, uniq, history=history, ids=ids)
        if ctx is not None and ctx.has.any():
            hist = np.where(ctx.has[:, None], ctx.item, hist)
            hist_reward = np.where(ctx.has[:, None], ctx.reward, hist_reward)
        # index_fill out of place: the scorer's own tensors stay as they are
        scores = policy(
            torch.from_numpy(user),
            torch.from_numpy(hist),
            torch.from_numpy(hist_reward),
        ).index_fill(1, pad, float("-inf"))
        width = scores.shape[1]  # N + 1, or more for a scorer's own extra columns
        if cfg.mask_consumed:
            # each event's earlier items, built per batch: all events' prefixes at once
            # would grow with the square of the users' history lengths
            offsets, c_rows = csr_ranges(start, uniq)
            c_row, c_sl = batch_rows(offsets, 0, uniq.shape[0])
            c_item = dataset.item[c_rows[c_sl]].astype(np.int64)
            if ctx is not None:  # a logged context says what its service excluded
                keep = ~ctx.has[c_row]
                c_row, c_item = c_row[keep], c_item[keep]
            key = torch.from_numpy(c_row * width + c_item)
            scores.view(-1).index_fill_(0, key, float("-inf"))
        if ctx is not None and ctx.excluded_row.shape[0]:
            key = torch.from_numpy(ctx.excluded_row * width + ctx.excluded_item)
            scores.view(-1).index_fill_(0, key, float("-inf"))
        if uniq.shape[0] < at.shape[0]:
            scores = scores.index_select(0, torch.from_numpy(np.cumsum(new) - 1))
        yield sl, torch.from_numpy(dataset.user[at].astype(np.int64)), scores


SERVED_REQUIRED = (SERVED_POLICY, POSITION, LIST_LENGTH, EPSILON, TEMPERATURE)
"""The serving columns the ``served`` target needs (``list_source`` is optional)."""
FALLBACK_SOURCE = "popular"
"""``list_source`` of the service's popular fallback lists."""
SOFTMAX_POLICIES = ("softmax", "plackett_luce")
"""Logged policy names of a softmax (Plackett–Luce) list."""
GREEDY_POLICIES = ("topk", "epsilon")
"""Logged policy names of a list built on the greedy top-k (top-k is ε-greedy with ε = 0)."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ServingIndex:
    """How the service of a model scored over a dataset's indices (a scorer's optional
    ``serving_index`` attribute; :func:`recloop.loop.gate.mapped_scorer` sets it) indexes
    users and items, so that the ``served`` target re-serves it exactly: the service breaks
    ties by keys of its own user and item indices, and explores over its own catalogue.
    Without one, the dataset's indices are the service's (a model trained on the dataset)."""

    user: Tensor  # (U + 1,) int64 the service's index of each dataset user, 0 = unknown
    item: Tensor  # (N + 1,) int64 the service's index of each dataset item
    unseen: Tensor  # (X,) int64 the service's indices of its items the dataset lacks
    catalogue_scorer: Scorer
    """The scorer's table over the whole catalogue, (B, N + 1 + X): the dataset's columns,
    then the ``unseen`` items'.  Its histories may hold index N + 1 + x for unseen item x
    (a logged context's recent item that only the service knows)."""
    unseen_ids: tuple[str, ...] = ()
    """(X,) raw ids of the ``unseen`` items, to read them in logged contexts."""


@dataclass(frozen=True, kw_only=True, eq=False)
class ServedSettings:
    """How each logged impression was served, for the ``served`` target."""

    state_row: np.ndarray  # (E,) int64 first row of its list (recloop.data.lists.list_starts)
    slot: np.ndarray  # (E,) int64 0-based position in its list
    length: np.ndarray  # (E,) int64 items in its list
    epsilon: np.ndarray  # (E,) float64 exploration share (0 for top-k and softmax)
    temperature: np.ndarray  # (E,) float64 softmax temperature (1 for the others)
    softmax: np.ndarray  # (E,) bool, a softmax list


def served_settings(dataset: PreparedDataset, rows: np.ndarray) -> ServedSettings:
    """The serving columns of the events at ``rows`` (E,), checked.

    The state an impression's list was drawn from is the user's state before the list's
    first row: a list's items are logged with one time and sorted by position, so its rows
    run from a position 0 (or, where prepare dropped that row, a change of user or time) to
    the next, and the items above a slot are not part of its state.  Two lists served to
    one user in the same second are told apart by their positions, but their order is the
    served-items table's (time, then recommendation id), which need not be the order they
    were served in.
    """
    where = events_file(dataset)
    missing = [c for c in SERVED_REQUIRED if c not in dataset.extra]
    if missing:
        raise DataError(
            f"{where}: ope.target=served needs how each impression was served, the columns "
            f"{', '.join(SERVED_REQUIRED)} (`recloop prepare --from-db --impressions` keeps "
            f"them); missing {', '.join(missing)}"
        )
    policy = dataset.extra[SERVED_POLICY][rows].astype(str)
    softmax = np.isin(policy, SOFTMAX_POLICIES)
    bad = np.flatnonzero(~(softmax | np.isin(policy, GREEDY_POLICIES)))

    def fail(i: np.ndarray, field: str, value: object, what: str) -> DataError:
        return DataError(
            f"{where}, row {int(rows[i[0]])}: field {field!r} {value!r} {what} "
            f"({i.shape[0]} such events in the split)"
        )

    if bad.shape[0]:
        known = ", ".join(GREEDY_POLICIES + SOFTMAX_POLICIES)
        raise fail(bad, SERVED_POLICY, str(policy[bad[0]]), f"is no serving policy ({known})")
    slot = dataset.extra[POSITION][rows].astype(np.int64)
    eps = dataset.extra[EPSILON][rows].astype(np.float64)
    temp = dataset.extra[TEMPERATURE][rows].astype(np.float64)
    is_eps = policy == "epsilon"
    bad = np.flatnonzero(is_eps & ~((eps >= 0) & (eps <= 1)))
    if bad.shape[0]:
        raise fail(bad, EPSILON, float(eps[bad[0]]), "of an epsilon list is not in [0, 1]")
    bad = np.flatnonzero(softmax & ~(temp > 0))
    if bad.shape[0]:
        raise fail(bad, TEMPERATURE, float(temp[bad[0]]), "of a softmax list is not > 0")
    starts = list_starts(dataset.user, dataset.timestamp, dataset.extra[POSITION])
    state_row = list_first(starts, rows)
    # below its first position a softmax slot is scored with the items above it (cascade
    # weights, :func:`softmax_slot`): every one of them must be in the data, in order, and
    # drawn by the same softmax
    deep = np.flatnonzero(softmax & (slot > 0))
    if deep.shape[0]:
        length = dataset.extra[LIST_LENGTH]
        first = state_row[deep]
        bad = deep[rows[deep] - first != slot[deep]]
        lacks = (
            "of a softmax list lacks positions above it: ope.target=served scores a softmax "
            "slot below the first with the items and propensities of every slot above it in "
            "its list"
        )
        if bad.shape[0]:
            raise fail(bad, POSITION, int(slot[bad[0]]), lacks)
        _, above = csr_ranges(first, rows[deep])  # (sum of the slots,) the rows above
        group = np.repeat(np.arange(deep.shape[0]), slot[deep])  # (sum of the slots,)
        # each row above is its list's slot l (l = 0, 1, ...), of the same list length

        def groups(hit: np.ndarray) -> np.ndarray:
            return deep[np.unique(group[hit])]

        hit = (dataset.extra[POSITION][above] != above - np.repeat(first, slot[deep])) | (
            length[above] != length[rows[deep]].repeat(slot[deep])
        )
        if hit.any():
            bad = groups(hit)
            raise fail(bad, POSITION, int(slot[bad[0]]), lacks)
        p_above = dataset.extra[SERVED_POLICY][above].astype(str)
        t_above = dataset.extra[TEMPERATURE][above].astype(np.float64)
        hit = ~np.isin(p_above, SOFTMAX_POLICIES) | (t_above != temp[deep].repeat(slot[deep]))
        if hit.any():
            bad = groups(hit)
            raise fail(
                bad,
                POSITION,
                int(slot[bad[0]]),
                "of a softmax list sits below a slot served with another policy or temperature",
            )
        width = dataset.n_items + 1
        keys = np.concatenate([group, np.arange(deep.shape[0])]) * width
        keys += np.concatenate([dataset.item[above], dataset.item[rows[deep]]])
        uniq, count = np.unique(keys, return_counts=True)
        if (count > 1).any():
            bad = deep[np.unique(uniq[count > 1] // width)]
            raise fail(
                bad,
                POSITION,
                int(slot[bad[0]]),
                "of a softmax list repeats an item above it (a softmax list draws without "
                "replacement)",
            )
    return ServedSettings(
        state_row=state_row,
        slot=slot,
        length=dataset.extra[LIST_LENGTH][rows].astype(np.int64),
        epsilon=np.where(is_eps, eps, 0.0),
        temperature=np.where(softmax, temp, 1.0),
        softmax=softmax,
    )


def served_probs(
    scores: Tensor,
    *,
    keys: Tensor,
    cols: Tensor | None,
    slot: np.ndarray,
    length: np.ndarray,
    epsilon: np.ndarray,
    temperature: np.ndarray,
    softmax: np.ndarray,
    above: Tensor | None = None,
) -> ServedProbs:
    """pi (b, C) float64 over the columns of ``scores`` (b, C), masked at -inf: the
    probability that a service serving these scores with each row's settings (``slot``,
    ``length``, ``epsilon``, ``temperature``, ``softmax``, all (b,)) shows each item at the
    row's slot j.  With M unmasked columns and k = min(length, M):

    * top-k and ε-greedy (ε = 0 for top-k), greedy list g = the top k (ties by
      :func:`recloop.ranking.topk` with ``keys`` (b,) and item keys ``cols`` (b, C)): the
      slot's greedy item 1 - ε + εA, another greedy item ε²B, any other unmasked item εA
      (:func:`recloop.slates.epsilon_marginals`); a row with j >= k is all 0 (the slot
      shows nothing);
    * softmax: softmax(scores / T) over the unmasked columns not shown above slot j
      (``above`` (b, J) int64, the columns at slots 0..j-1 of each softmax row, J >= max j;
      needed when a softmax row has j > 0), and the choice probability of each of those
      (:func:`softmax_slot`).
    """
    b = scores.shape[0]
    n_above = np.where(softmax, slot, 0)  # (b,)
    if above is None:
        if (n_above > 0).any():
            raise ValueError("softmax rows below their first slot need the items above them")
        above = torch.zeros((b, 0), dtype=torch.long)
    chosen = torch.ones(above.shape, dtype=torch.float64)
    # each kind of row computed on its own rows only: a (b, C) pass costs the same for a row
    # whatever it holds
    soft = np.flatnonzero(softmax)
    greedy = np.flatnonzero(~softmax)
    if soft.shape[0] == b:
        sm = softmax_slot(
            scores, temperature=torch.from_numpy(temperature), above=above,
            n_above=torch.from_numpy(n_above),
        )  # fmt: skip
        return ServedProbs(probs=sm.probs, above=sm.above)
    if greedy.shape[0] == b:
        probs = _greedy_probs(
            scores, keys=keys, cols=cols, slot=slot, length=length, epsilon=epsilon
        )
        return ServedProbs(probs=probs, above=chosen)
    probs = torch.zeros(scores.shape, dtype=torch.float64)
    g_idx = torch.from_numpy(greedy)
    probs[g_idx] = _greedy_probs(
        scores[g_idx], keys=keys[g_idx], cols=None if cols is None else cols[g_idx],
        slot=slot[greedy], length=length[greedy], epsilon=epsilon[greedy],
    )  # fmt: skip
    s_idx = torch.from_numpy(soft)
    sm = softmax_slot(
        scores[s_idx], temperature=torch.from_numpy(temperature[soft]), above=above[s_idx],
        n_above=torch.from_numpy(n_above[soft]),
    )  # fmt: skip
    probs[s_idx] = sm.probs
    chosen[s_idx] = sm.above
    return ServedProbs(probs=probs, above=chosen)


def _greedy_probs(
    scores: Tensor,
    *,
    keys: Tensor,
    cols: Tensor | None,
    slot: np.ndarray,
    length: np.ndarray,
    epsilon: np.ndarray,
) -> Tensor:
    """:func:`served_probs` of top-k and ε-greedy rows, (b, C) float64."""
    b = scores.shape[0]
    finite = torch.isfinite(scores)  # (b, C)
    m = finite.sum(1)  # (b,)
    slot_t = torch.from_numpy(slot)
    k = torch.minimum(torch.from_numpy(length), m)  # (b,) the served list's length
    kmax = int(k.max()) if b else 0
    if not kmax:
        return torch.zeros(scores.shape, dtype=torch.float64)
    g = topk(scores, kmax, row_keys=keys, items=cols).indices  # (b, kmax) greedy lists
    valid = torch.arange(kmax)[None, :] < k[:, None]  # (b, kmax)
    trip = np.stack([k.numpy(), m.numpy(), epsilon], 1)
    uniq, inv = np.unique(trip, axis=0, return_inverse=True)
    ab = np.array([inverse_pool_means(int(x), int(y), z) if x else (0, 0) for x, y, z in uniq])
    pool_a = torch.from_numpy(ab[inv.reshape(-1), 0])  # (b,) E[1 / |pool|], k - 1 slots
    pool_b = torch.from_numpy(ab[inv.reshape(-1), 1])  # (b,) same, k - 2 slots
    eps = torch.from_numpy(epsilon)
    pool = (eps * pool_a)[:, None]  # (b, 1) an item outside the greedy list
    at_greedy = torch.where(
        torch.arange(kmax)[None, :] == slot_t[:, None],
        (1.0 - eps + eps * pool_a)[:, None],
        (eps * eps * pool_b)[:, None],
    )  # (b, kmax)
    # the pool's share on the unmasked items, the greedy list's slots, the masked items
    # (and ranked ones that are not finite) at 0 again: in place, two (b, C) passes
    probs = torch.where(finite, pool, 0.0)
    probs.scatter_(1, g, torch.where(valid, at_greedy, pool))
    probs.masked_fill_(~finite, 0.0)
    empty = slot_t >= k  # (b,) the slot shows nothing
    if bool(empty.any()):
        probs[empty] = 0.0
    return probs


@dataclass(frozen=True, kw_only=True, eq=False)
class ServedProbs:
    """What :func:`served_probs` gives for a batch of b impressions."""

    probs: Tensor  # (b, C) float64 pi(a | state, slot j, and for softmax the items above j)
    above: Tensor  # (b, J) float64 softmax rows: pi of the item at each slot l < j given the
    # items above l; 1 elsewhere


@dataclass(frozen=True, kw_only=True, eq=False)
class SoftmaxSlot:
    """:func:`softmax_slot`'s Plackett–Luce probabilities along one list per row."""

    probs: Tensor  # (b, C) float64 pi(a | the items above slot j) at slot j
    above: Tensor  # (b, J) float64 pi(a_l | a_0..a_{l-1}) of the item at each slot l < j; 1
    # past j


def softmax_slot(
    scores: Tensor, *, temperature: Tensor, above: Tensor, n_above: Tensor
) -> SoftmaxSlot:
    """Plackett–Luce choice probabilities (Plackett 1975; the service's softmax lists, drawn
    without replacement, :mod:`recloop.serving.exploration`) at slot j = ``n_above`` (b,) of
    a list whose slots 0..j-1 show the columns ``above`` (b, J) (entries past j ignored), for
    ``scores`` (b, C) masked at -inf and ``temperature`` (b,).

    With p = softmax(scores / T) over the unmasked columns, slot l's item a_l is chosen with
    p(a_l) / (1 - p(a_0) - ... - p(a_{l-1})), and slot j's distribution is p over the items
    not above it, renormalised.  Everything is taken in the log domain, the mass left before
    slot l as the log-sum-exp of the logits of the items not above j and of a_l..a_{j-1}
    (positive terms only, as the service sums them): exact however far apart the scores are
    (the service allows T down to 1e-4, where a gap of 0.1 in the scores is a factor e^1000).
    A row with j = 0 gets softmax(scores / T) itself, bit for bit.  Column 0 is the padding,
    masked (:func:`served_scores` masks it): entries of ``above`` past j are sent there.
    """
    logits = scores.double() / temperature.double()[:, None]  # (b, C), masked -inf
    # a score that is not finite (NaN, +inf) is never shown, as in the service's sampler
    logits.nan_to_num_(nan=float("-inf"), posinf=float("-inf"), neginf=float("-inf"))
    if not bool((n_above > 0).any()):
        probs = torch.softmax(logits, 1).nan_to_num(nan=0.0)
        return SoftmaxSlot(probs=probs, above=torch.ones(above.shape, dtype=torch.float64))
    valid = torch.arange(above.shape[1])[None, :] < n_above[:, None]  # (b, J)
    # the items above slot j out of its pool; past j, column 0 (the padding, masked already)
    cols = torch.where(valid, above, 0)
    l_above = logits.gather(1, cols).masked_fill(~valid, float("-inf"))  # (b, J)
    rest = logits.scatter_(1, cols, float("-inf"))  # (b, C) the items not above j (in place)
    probs = torch.softmax(rest, 1)  # rows with nothing above: softmax(logits), bit for bit
    top = rest.max(1).values  # (b,)
    empty = torch.isinf(top)  # nothing left to show: softmax gave NaN
    if bool(empty.any()):
        probs[empty] = 0.0
    # log of the mass left: softmax's own normaliser, read off its largest entry
    # (p_max = exp(top - log_left)) instead of a second pass of exps
    log_left = torch.where(empty, float("-inf"), top - torch.log(probs.max(1).values))
    log_before = torch.logaddexp(
        log_left[:, None], torch.logcumsumexp(l_above.flip(1), 1).flip(1)
    )  # (b, J) the log mass left before each slot l
    cond = torch.exp(l_above - log_before).nan_to_num(nan=0.0)  # -inf - -inf: nothing left
    return SoftmaxSlot(probs=probs, above=torch.where(valid, cond, 1.0))


@dataclass(frozen=True, kw_only=True, eq=False)
class ServedBatch:
    """One batch of :func:`served_distributions`."""

    rows: slice
    """The batch's slice of the impressions."""
    probs: Tensor  # (b, C) float64 pi at each impression's slot (see served_probs)
    above_weight: np.ndarray  # (b,) float64 softmax rows below their first slot: the
    # product over the slots l above of pi(a_l | a_<l) / beta(a_l | a_<l), the logged
    # items' choice probabilities under the policy over their logged ones; 1 elsewhere


def served_distributions(
    policy: Scorer,
    dataset: PreparedDataset,
    rows: np.ndarray,
    *,
    history: int,
    cfg: OPEConfig,
) -> Iterator[ServedBatch]:
    """Per batch of the impression ``rows`` (E,): pi (b, C) of ``policy`` served as each
    was (:func:`served_probs`, from its list's state), C = N + 1 columns plus, with a
    ``serving_index``, the items only the policy's service has (after the dataset's); and,
    for a softmax slot j > 0, the weight of the items logged above it (cascade weights,
    Kiyohara et al., WSDM 2022): pi there is the slot's distribution given the logged items
    above, so an estimate needs the probability of reaching them under pi over under beta
    (the logged ``propensity`` of a softmax slot is its choice probability given the slots
    above, what the service logs)."""
    st = served_settings(dataset, rows)
    index: ServingIndex | None = getattr(policy, "serving_index", None)
    scorer = policy
    extra_ids: Sequence[str] = ()
    if index is not None and index.unseen.shape[0]:
        # the service ranks, explores and samples over its whole catalogue
        scorer, extra_ids = index.catalogue_scorer, index.unseen_ids
    if SERVED_CONTEXT in dataset.extra:
        first = np.unique(st.state_row)
        bare = int((dataset.extra[SERVED_CONTEXT][first] == "").sum())
        if bare:
            logger.warning(
                "served target: %d of %d lists carry no logged context (served before "
                "contexts were logged, or prepare dropped their first row): scored on the "
                "state rebuilt from the log",
                bare,
                first.shape[0],
            )
    deep = st.softmax & (st.slot > 0)  # (E,)
    if deep.any() and PROPENSITY not in dataset.extra:
        raise DataError(
            f"{events_file(dataset)}: ope.target=served scores a softmax slot below the first "
            f"with the logged {PROPENSITY!r} of the slots above it; the events have no such "
            "column"
        )
    for sl, users, scores in served_scores(
        scorer, dataset, st.state_row, history=history, cfg=cfg, extra_ids=extra_ids
    ):
        keys, cols = users, None  # the service's tie-break keys: its user and item indices
        if index is not None:
            keys = index.user[users]
            cols = torch.cat([index.item, index.unseen]).expand(users.shape[0], -1)
        n_above = np.where(deep[sl], st.slot[sl], 0)  # (b,)
        j = int(n_above.max()) if n_above.shape[0] else 0
        above_rows = st.state_row[sl, None] + np.arange(j)[None, :]  # (b, J)
        valid = np.arange(j)[None, :] < n_above[:, None]
        above_rows = np.where(valid, above_rows, st.state_row[sl, None])
        out = served_probs(
            scores,
            keys=keys,
            cols=cols,
            slot=st.slot[sl],
            length=st.length[sl],
            epsilon=st.epsilon[sl],
            temperature=st.temperature[sl],
            softmax=st.softmax[sl],
            above=torch.from_numpy(dataset.item[above_rows].astype(np.int64)),
        )
        weight = np.ones(n_above.shape[0])
        if j:
            beta = np.ones(above_rows.shape)  # (b, J), read only where a slot is above
            logged = logged_propensities(dataset, above_rows[valid])
            assert logged is not None  # the column is there: checked above
            beta[valid] = logged
            weight = np.prod(out.above.numpy() / beta, axis=1)
        yield ServedBatch(rows=sl, probs=out.probs, above_weight=weight)


@torch.no_grad()
def served_terms(
    policy: Scorer,
    dataset: PreparedDataset,
    events: LoggedEvents,
    *,
    history: int,
    cfg: OPEConfig = OPEConfig(),
) -> PolicyTerms:
    """pi(a|s) and V(s) = sum_a pi(a|s) q(s, a) of ``policy`` served as each impression was
    (target ``served``, :func:`served_distributions`); an item only the policy's service
    has is valued at the reward model's unseen item, ``mu + b_user``.

    A softmax slot j > 0 is a step of its list (the cascade model: its reward may depend on
    the items above it, not below): with W the weight of the items logged above it
    (:attr:`ServedBatch.above_weight`), its terms are W pi(a | above) and W V(s, above), so
    that IPS averages W w r and DR W (V + w (r - q)), the Cascade-DR of Kiyohara et al.
    (WSDM 2022) with the reward model q(s, a).  Unbiased for the slot's value under pi, for
    every policy, given the logged propensities of the whole list (before clipping: with
    ``cfg.weight_cap`` the baseline term is min(W, cap) V, as the estimators clip W w).  Such
    a slot's "DM" is W V, the reward model reweighted, not a direct method.
    """
    extra = dataset.extra
    if events.behaviour != "logged" and SERVED_POLICY in extra and POSITION in extra:
        policy_col = extra[SERVED_POLICY][events.rows].astype(str)
        deep = np.isin(policy_col, SOFTMAX_POLICIES) & (extra[POSITION][events.rows] > 0)
        if deep.any():
            raise ConfigError(
                "ope.target=served scores softmax slots below the first with the logged "
                f"propensities of their lists; these events' propensities are "
                f"{events.behaviour}: they need the events' own {PROPENSITY!r} column, "
                "with ope.behaviour logged (or auto)"
            )
    rw = events.rewards
    p_pi = np.empty(events.n_events)
    v = np.empty(events.n_events)
    n_cols = dataset.n_items + 1
    item_bias = torch.from_numpy(rw.item_bias)  # (N + 1,) float32
    for batch in served_distributions(policy, dataset, events.rows, history=history, cfg=cfg):
        sl, probs = batch.rows, batch.probs
        c = probs.shape[1]
        # q (b, N + 1): float32 sums as the reward model computes them (q_logged's values)
        base = rw.mu + rw.user_bias[events.user[sl]]  # (b,) float32
        q = (torch.from_numpy(base)[:, None] + item_bias[None, :]).double()
        v_slot = (probs[:, :n_cols] * q).sum(1).numpy()
        if c > n_cols:  # items only the policy's service has: the unseen item, mu + b_user
            q_one = rw.mu + rw.user_bias[events.user[sl]].astype(np.float64)  # (b,)
            v_slot = v_slot + probs[:, n_cols:].sum(1).numpy() * q_one
        a = torch.from_numpy(events.action[sl])[:, None]
        w_above = batch.above_weight
        p_pi[sl] = w_above * probs.gather(1, a)[:, 0].numpy()
        # the baseline term's weight is clipped at the estimators' cap like the others (each
        # weight of an estimate bounded); 0 wherever V is (an overflowed weight times 0)
        cap = np.inf if cfg.weight_cap is None else cfg.weight_cap
        v[sl] = np.where(v_slot == 0.0, 0.0, np.minimum(w_above, cap) * v_slot)
    return PolicyTerms(p_target=p_pi, v_target=v)


@torch.no_grad()
def policy_terms(
    policy: Scorer,
    dataset: PreparedDataset,
    events: LoggedEvents,
    *,
    history: int,
    cfg: OPEConfig = OPEConfig(),
) -> PolicyTerms:
    """pi(a|s) of the logged items and V(s) of ``policy`` on ``events`` (its history H)."""
    if cfg.target == "served":
        return served_terms(policy, dataset, events, history=history, cfg=cfg)
    rows, user, action = events.rows, events.user, events.action
    e = rows.shape[0]
    p_pi = np.empty(e)
    v = np.empty(e)
    for sl, users, scores in served_scores(policy, dataset, rows, history=history, cfg=cfg):
        items, probs = target_probs(
            scores,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            row_keys=users,
            target=cfg.target,
        )
        probs = probs.nan_to_num(nan=0.0)  # a row with every item masked shows nothing
        a = torch.from_numpy(action[sl])[:, None]
        p_pi[sl] = (probs * (items == a)).sum(1).double().numpy()
        q_top = events.rewards(user[sl, None], items.numpy())  # (b, K)
        v[sl] = (probs.double().numpy() * q_top).sum(1)
    return PolicyTerms(p_target=p_pi, v_target=v)


@dataclass(frozen=True, kw_only=True)
class ReserveCheck:
    """Whether the ``served`` target gives a model back the propensities its own service
    logged (:func:`reserve_check`): the test that it rebuilds the state, the exclusions and
    the catalogue the service served from.  On the impressions the model served, pi must
    equal beta at every slot (W = 1 above a softmax slot too); where it does not, every
    model's served probabilities on these events are computed from the wrong context, and
    no estimate that rests on them is evidence."""

    version: str
    """The model version checked (the ``policy_version`` of its impressions)."""
    impressions: int
    """Evaluated impressions that version served."""
    mismatched: int
    """Those whose re-served probability differs from the logged one by more than ``rtol``."""
    rtol: float
    """Relative tolerance on pi / beta - 1."""
    worst: float
    """Largest |pi / beta - 1| over the version's impressions (0 when it has none)."""
    first_row: int | None = None
    """Dataset row of the first mismatched impression."""
    logged: float | None = None
    """Its logged propensity."""
    reserved: float | None = None
    """Its re-served probability (times the weight of the items above it)."""

    @property
    def share(self) -> float:
        """Mismatched share of the version's impressions (0 when it has none)."""
        return self.mismatched / self.impressions if self.impressions else 0.0

    def words(self) -> str:
        """One line for a reason or a log."""
        if not self.impressions:
            return f"not checked: no evaluated impression was served by {self.version}"
        if not self.mismatched:
            return f"its {self.impressions} own impressions re-served with their propensities"
        return (
            f"{self.mismatched} of its {self.impressions} own impressions re-served with "
            f"other propensities (row {self.first_row}: logged {self.logged:.4g}, re-served "
            f"{self.reserved:.4g}; worst |pi/beta - 1| {self.worst:.3g}): the served target "
            "does not re-serve what its service served (another context, or another scorer: "
            "onnxruntime inference, an ANN index)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "impressions": self.impressions,
            "mismatched": self.mismatched,
            "share": self.share,
            "rtol": self.rtol,
            "worst": self.worst,
            "first_row": self.first_row,
            "logged": self.logged,
            "reserved": self.reserved,
        }


def reserve_check(
    dataset: PreparedDataset,
    events: LoggedEvents,
    terms: PolicyTerms,
    *,
    version: str,
    rtol: float = 1e-3,
) -> ReserveCheck:
    """Compare ``terms`` (target ``served``, of the model ``version``) with the logged
    propensities on the impressions that version served (column ``policy_version``).

    Exact re-serving gives pi / beta = 1 up to float32 rounding (about 1e-6): the service
    and the served target draw from the same float32 scores.  A larger gap means the served
    target scored the model on a context its service did not see -- a list without its
    logged context whose state the service read from its online store, say -- or with
    other scores than the service's: its ``inference: onnxruntime`` (equal to torch's to
    about 1e-3 of the largest score) or an approximate (ANN) index for its top-k.
    """
    if POLICY_VERSION not in dataset.extra:
        raise DataError(
            f"{events_file(dataset)}: the re-serve check needs each impression's "
            f"{POLICY_VERSION!r} (`recloop prepare --from-db --impressions` keeps it)"
        )
    if events.behaviour != "logged":
        raise ConfigError(
            f"the re-serve check compares with logged propensities; these are {events.behaviour}"
        )
    mine = np.flatnonzero(dataset.extra[POLICY_VERSION][events.rows].astype(str) == version)
    if mine.shape[0] == 0:
        return ReserveCheck(version=version, impressions=0, mismatched=0, rtol=rtol, worst=0.0)
    logged = np.exp(events.log_propensity[mine])
    reserved = terms.p_target[mine]
    gap = np.abs(reserved / logged - 1.0)
    bad = np.flatnonzero(~(gap <= rtol))  # a NaN gap is a mismatch too
    first = int(bad[0]) if bad.shape[0] else None
    return ReserveCheck(
        version=version,
        impressions=int(mine.shape[0]),
        mismatched=int(bad.shape[0]),
        rtol=rtol,
        worst=float(np.nanmax(gap)) if np.isfinite(gap).any() else float("inf"),
        first_row=None if first is None else int(events.rows[mine[first]]),
        logged=None if first is None else float(logged[first]),
        reserved=None if first is None else float(reserved[first]),
    )


def importance_weights(
    events: LoggedEvents, terms: PolicyTerms, cap: float | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Unclipped weights pi / beta, clipped ones, and the share the cap changed; all (E,).

    An event pi does not show has weight 0 whatever beta says (even a beta of 0).
    """
    with np.errstate(over="ignore"):
        inv_beta = np.exp(-events.log_propensity)
    w_raw = np.where(terms.p_target > 0, terms.p_target * inv_beta, 0.0)
    w, clipped = clip_weights(w_raw, cap)
    return w_raw, w, clipped


# --- reports ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OPEReport:
    """Off-policy estimates of one policy's per-event value on one split."""

    split: str
    """The evaluated split."""
    n_events: int
    """Logged events (bandit rounds) evaluated."""
    behaviour: str
    """Where the propensities came from: logged, fitted or beta_head."""
    estimates: dict[str, Interval]
    """ips, snips, dr, dm → value with its bootstrap interval and flags."""
    logged_value: float
    """Mean logged outcome (reward, or return: ``config["outcome"]``): the behaviour
    policy's own value."""
    reward_range: tuple[float, float]
    """[min r, max r] of the logged outcomes on the split."""
    behaviour_nll: float
    """Mean -log beta(a|s) of the logged actions on this split."""
    support: float
    """Share of events the target policy could have logged (w > 0): their item is in its top
    K, or, for target ``served``, shown with positive probability."""
    mean_weight: float
    """Mean unclipped weight; near 1 when beta is right and pi's support is covered by beta."""
    max_weight: float
    """Largest unclipped weight."""
    clipped_share: float
    """Share of weights the cap changed."""
    ess: float
    """Effective sample size of the clipped weights, (sum w)^2 / sum w^2."""
    unweighed_mass: float = 0.0
    """Estimated share of the target's probability that the clipped weights cannot weigh
    (:func:`unweighed_mass`): what the estimates value at 0 (IPS) or at the reward model's
    prediction (DR) rather than by the events (see :func:`outer_difference`)."""
    flags: tuple[str, ...] = ()
    """Every warning: the estimates' flags, ``mean_weight_far_from_1`` and (with
    intervals) ``dr_ips_disagree``."""
    left_out: int = 0
    """Impressions of the split not evaluated (:attr:`LoggedEvents.left_out`)."""
    ess_by_position: dict[int, float] = field(default_factory=dict)
    """Target ``served`` on lists: each slot's effective sample size over its impressions,
    as a share of them (a softmax list's lower slots weigh the items above them too)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The OPE config used."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_events": self.n_events,
            "behaviour": self.behaviour,
            "estimates": {k: v.to_dict() for k, v in self.estimates.items()},
            "logged_value": self.logged_value,
            "reward_range": list(self.reward_range),
            "behaviour_nll": self.behaviour_nll,
            "support": self.support,
            "mean_weight": self.mean_weight,
            "max_weight": self.max_weight,
            "clipped_share": self.clipped_share,
            "ess": self.ess,
            "ess_ratio": self.ess / self.n_events if self.n_events else 0.0,
            "unweighed_mass": self.unweighed_mass,
            "flags": list(self.flags),
            "left_out": self.left_out,
            "ess_by_position": {str(k): v for k, v in self.ess_by_position.items()},
            "config": dict(self.config),
        }


def unweighed_mass(w: np.ndarray) -> float:
    """1 - the mean clipped weight ``w`` (E,), within [0, 1]: the estimated share m of the
    target's probability that the clipped weights cannot weigh.

    E_beta[min(pi / beta, c)] = sum_a min(pi(a), c beta(a)): the target's mass the log can
    weigh at cap c, so one minus it is the mass the estimators miss -- on actions the log
    shows with a probability below pi / c, or never.  The mean of weights bounded by c is
    a low-variance estimate of it, where the unclipped mean weight (:attr:`OPEReport.
    mean_weight`) is not.  Bottou et al. 2013, "Counterfactual reasoning and learning
    systems", section 4.4 (the clipped mass W-bar and the outer confidence interval).
    With ``weight_cap`` None, only the mass beta never shows is missed, and this estimates
    that.
    """
    if w.shape[0] == 0:
        return 0.0
    return float(np.clip(1.0 - np.mean(w), 0.0, 1.0))


DR_IPS_DISAGREE = "dr_ips_disagree"
"""Flag of a report whose DR and IPS intervals do not overlap (:func:`estimators_disagree`)."""


def estimators_disagree(dr: Interval, ips: Interval) -> bool:
    """Whether the intervals of DR and IPS are disjoint (touching intervals overlap).

    DR is IPS plus the reward model's control variate.  Where the target puts its mass on
    actions the log seldom shows, IPS rests on the few events that show them and DR on the
    reward model; when the two do not even overlap, the reward model carries DR beyond what
    the events support.  IPS is no referee either: it is unbiased only before clipping, and
    when the weights that would lift it are too rare to be in the sample it reads low.  So
    in practice the flag fires when much of the target's mass is off the log's choices (on
    the loop's ε-greedy logs, about where the mean weight falls below 0.7-0.8), whether or not
    the reward model is wrong there: a conservative check, not a test of the model.

    Found in ``recloop experiment`` (2026-12-06, ``served`` target): every truly worse
    promotion of five seeds had it (8 of 8), 1 of 6 truly better ones did; on five fresh
    seeds it alone kept out 3 truly worse candidates and 10 truly better ones
    (docs/experiment.md).  On a world log (``recloop world ope --target served``) a
    REINFORCE run's DR was 0.45 [0.44, 0.47], its IPS 0.31 [0.30, 0.33], the truth 0.36.
    """
    return dr.high < ips.low or ips.high < dr.low


def _ess_by_position(w: np.ndarray, position: np.ndarray | None) -> dict[int, float]:
    """{slot: ESS of the clipped weights ``w`` (E,) at that slot / its impressions}."""
    if position is None:
        return {}
    out = {}
    for slot in np.unique(position).tolist():
        at = w[position == slot]
        out[int(slot)] = effective_sample_size(at) / at.shape[0]
    return out


def ope_report(events: LoggedEvents, terms: PolicyTerms, cfg: OPEConfig) -> OPEReport:
    """The estimates, intervals, diagnostics and flags of one policy on ``events``."""
    w_raw, w, clipped = importance_weights(events, terms, cfg.weight_cap)
    raw = bootstrap_intervals(
        w, events.reward, events.q_logged, terms.v_target,
        n_boot=cfg.n_boot, confidence=cfg.confidence, seed=cfg.seed,
        clusters=events.user if cfg.cluster_by_user else None,
    )  # fmt: skip
    lo, hi = events.reward_range
    estimates = {
        k: Interval(iv.value, iv.low, iv.high, range_flags(k, iv, lo, hi)) for k, iv in raw.items()
    }
    mean_weight = float(w_raw.mean())
    flags = [f for iv in estimates.values() for f in iv.flags]
    w_lo, w_hi = cfg.mean_weight_bounds
    if not w_lo <= mean_weight <= w_hi:
        flags.append("mean_weight_far_from_1")
    if cfg.n_boot and estimators_disagree(estimates["dr"], estimates["ips"]):
        flags.append(DR_IPS_DISAGREE)
    return OPEReport(
        split=SPLIT_NAMES[events.split],
        n_events=events.n_events,
        behaviour=events.behaviour,
        estimates=estimates,
        logged_value=float(events.reward.mean()),
        reward_range=(lo, hi),
        behaviour_nll=float(-events.log_propensity.mean()),
        support=float(np.mean(terms.p_target > 0)),
        mean_weight=mean_weight,
        max_weight=float(w_raw.max()),
        clipped_share=clipped,
        ess=effective_sample_size(w),
        unweighed_mass=unweighed_mass(w),
        flags=tuple(flags),
        left_out=events.left_out,
        ess_by_position=_ess_by_position(w, events.position),
        config=config_to_dict(cfg),
    )


def off_policy_evaluate(
    policy: Scorer,
    dataset: PreparedDataset,
    *,
    history: int,
    events: LoggedEvents,
    cfg: OPEConfig = OPEConfig(),
) -> OPEReport:
    """IPS / SNIPS / DR / DM of ``policy`` on ``events`` (module docstring)."""
    return ope_report(events, policy_terms(policy, dataset, events, history=history, cfg=cfg), cfg)


@dataclass(frozen=True, kw_only=True)
class PairedReport:
    """Estimated value of one run minus the baseline run's, on the same events."""

    run: str
    """The run compared."""
    baseline: str
    """The run it is compared with (the first one given)."""
    split: str
    """The evaluated split."""
    n_events: int
    """Logged events both were evaluated on."""
    behaviour: str
    """The propensity source both were evaluated with."""
    differences: dict[str, Interval]
    """ips, snips, dr → run − baseline with its paired bootstrap interval."""
    n_boot: int
    """Bootstrap replicates (0: no intervals)."""
    confidence: float
    """Coverage of the intervals."""

    def excludes_zero(self, name: str) -> bool | None:
        """Whether the interval of ``name`` excludes 0; None without a bootstrap."""
        return self.differences[name].excludes(0.0) if self.n_boot else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "baseline": self.baseline,
            "split": self.split,
            "n_events": self.n_events,
            "behaviour": self.behaviour,
            "n_boot": self.n_boot,
            "confidence": self.confidence,
            "differences": {
                k: {**iv.to_dict(), "excludes_zero": self.excludes_zero(k)}
                for k, iv in self.differences.items()
            },
        }


def paired_report(
    events: LoggedEvents,
    baseline: PolicyTerms,
    other: PolicyTerms,
    *,
    cfg: OPEConfig,
    run: str,
    baseline_run: str,
) -> PairedReport:
    """``other`` − ``baseline`` on ``events`` with paired bootstrap intervals."""
    _, w_a, _ = importance_weights(events, baseline, cfg.weight_cap)
    _, w_b, _ = importance_weights(events, other, cfg.weight_cap)
    diffs = paired_bootstrap(
        events.reward, events.q_logged, w_a, baseline.v_target, w_b, other.v_target,
        n_boot=cfg.n_boot, confidence=cfg.confidence, seed=cfg.seed,
        clusters=events.user if cfg.cluster_by_user else None,
    )  # fmt: skip
    return PairedReport(
        run=run,
        baseline=baseline_run,
        split=SPLIT_NAMES[events.split],
        n_events=events.n_events,
        behaviour=events.behaviour,
        differences=diffs,
        n_boot=cfg.n_boot,
        confidence=cfg.confidence,
    )


OUTER_NOT_FINITE = "outer_not_finite"
"""Flag of an outer difference whose weights overflowed: it is the worst the outcomes allow."""
OUTER_NOT_LOGGED = "outer_propensities_not_logged"
"""Flag of an outer difference computed on fitted or estimated propensities: its bracket
needs the logging policy's own probabilities, so it is no bound there."""


def outer_difference(
    events: LoggedEvents, baseline: PolicyTerms, other: PolicyTerms, *, cfg: OPEConfig
) -> Interval:
    """A pessimistic estimate of V(other) - V(baseline) with a paired bootstrap interval
    (the resamples of :func:`paired_report`).  The share of each policy's probability that
    the clipped weights cannot weigh is valued at the worst outcome for ``other`` and at the
    best for ``baseline``, where IPS values it at 0 and DR at a reward model's prediction.

    With clipped weights w (E,), outcomes r in [lo, hi], f = min(lo, 0) and g = max(hi, 0):
    L = mean(w (r - f)) + f and H = mean(w (r - g)) + g.  With u(a) = pi(a) - min(pi(a),
    c beta(a)) >= 0, V - E[L] = sum_a u(a) (q(a) - f) - f (1 - sum_a pi(a)) >= 0, and
    likewise E[H] >= V.  So L and H bracket the value whatever the log cannot show; their
    gap is (g - f) times the unweighed mass (:func:`unweighed_mass`).  This is the outer
    confidence interval of Bottou et al. 2013, "Counterfactual reasoning and learning
    systems", section 4.4, and the bootstrap carries the noise of the mass with the rest.
    It holds on the served target's lower softmax slots too, given exact propensities:
    their weights carry the ratio of the items above, whose expectation is at most 1.
    The interval's low end is an approximate lower confidence bound on the true
    difference.  The outcomes' range is the one observed on ``events``.

    Only with logged propensities: a fitted behaviour model's weights need not have
    expectation at most 1 (a mean weight of 4.6 gave an "outer" difference of +15.5 on
    rewards in [1, 5]), so on any other ``events.behaviour`` the interval is flagged
    :data:`OUTER_NOT_LOGGED` and bounds nothing.
    """
    if events.n_events == 0:
        return Interval(0.0, 0.0, 0.0)
    _, w_a, _ = importance_weights(events, baseline, cfg.weight_cap)
    _, w_b, _ = importance_weights(events, other, cfg.weight_cap)
    lo, hi = events.reward_range
    f, g = min(lo, 0.0), max(hi, 0.0)
    r = events.reward
    with np.errstate(invalid="ignore", over="ignore"):
        col = w_b * (r - f) + f - (w_a * (r - g) + g)  # (E,) per event: L of other - H of base
    if not np.isfinite(col).all():
        # an unclipped weight overflowed (weight_cap None): no estimate, so the worst
        # difference the outcomes allow -- the candidate at f everywhere, the baseline at g
        return Interval(f - g, f - g, f - g, (OUTER_NOT_FINITE,))
    value = float(col.mean())
    flags = () if events.behaviour == "logged" else (OUTER_NOT_LOGGED,)
    if cfg.n_boot == 0:
        return Interval(value, value, value, flags)
    m = bootstrap_means(
        col[:, None],
        n_boot=cfg.n_boot,
        rng=np.random.default_rng(cfg.seed),
        clusters=events.user if cfg.cluster_by_user else None,
    )
    iv = _percentiles({"outer": value}, {"outer": m[:, 0]}, cfg.confidence)["outer"]
    return replace(iv, flags=iv.flags + flags)


# --- saved runs -------------------------------------------------------------------------


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


@dataclass(frozen=True, kw_only=True)
class OPEComparison:
    """OPE of several runs against one beta and one q per dataset, with paired differences."""

    runs: list[str]
    """The runs as given; the first is the baseline of the paired differences."""
    reports: list[OPEReport]
    """One report per run, in order."""
    paired: list[PairedReport]
    """Each later run minus the first, for the runs evaluated on the first one's events."""
    unpaired: dict[str, str] = field(default_factory=dict)
    """Later runs that could not be paired with the first → why."""


def _dataset_key(dataset: PreparedDataset) -> object:
    """Datasets with the same events file hash hold the same events; else identity."""
    digest = dataset.events_sha256
    return ("events", digest) if digest else ("object", id(dataset))


def ope_for_runs(
    runs: Sequence[Path],
    datasets: Sequence[PreparedDataset],
    *,
    split: str = "test",
    cfg: OPEConfig = OPEConfig(),
) -> OPEComparison:
    """OPE of saved runs (or artifacts) on ``split``, ``datasets[i]`` being run i's dataset.

    The events, propensities and reward model are built once per dataset and shared by all
    of its runs (see the module docstring); ``behaviour=beta_head`` takes a REINFORCE run's
    own head and is therefore refused for more than one run.
    """
    from recloop.artifacts import load_artifact

    if len(runs) != len(datasets):
        raise ConfigError(f"ope_for_runs: {len(runs)} runs but {len(datasets)} datasets")
    if cfg.behaviour == "beta_head" and len(runs) > 1:
        raise ConfigError(
            "ope.behaviour=beta_head scores each run against its own behaviour head, so the "
            f"estimates of {len(runs)} runs would not be comparable; compare them with "
            "ope.behaviour=auto (logged propensities or one fitted model), or evaluate one run"
        )
    shared: dict[object, LoggedEvents] = {}
    keys: list[object] = []
    events_of: list[LoggedEvents] = []
    terms: list[PolicyTerms] = []
    reports: list[OPEReport] = []
    for run, ds in zip(runs, datasets, strict=True):
        art = load_artifact(run)
        if art.n_items != ds.n_items or art.n_users != ds.n_users:
            raise DataError(
                f"{run}: the policy has {art.n_users} users and {art.n_items} items, "
                f"the dataset {ds.path or ''} {ds.n_users} and {ds.n_items}"
            )
        key = _dataset_key(ds)
        if cfg.behaviour == "beta_head":
            run_dir = art.path.parent if art.path.name == "artifact" else art.path
            beta = reinforce_beta(run_dir, art.policy, art.manifest)
            if beta is None:
                raise DataError(f"{run}: no saved REINFORCE beta head (checkpoint/)")
            events = logged_events(
                ds, split=split, cfg=cfg, behaviour=beta, behaviour_name="beta_head",
                history=art.history_len,
            )  # fmt: skip
        else:
            if key not in shared:
                shared[key] = logged_events(ds, split=split, cfg=cfg)
            events = shared[key]
        # a run trained on ds: the items only the evaluated splits have are not its to know
        t = policy_terms(
            TrainedCatalogue(art.policy, ds), ds, events, history=art.history_len, cfg=cfg
        )
        keys.append(key)
        events_of.append(events)
        terms.append(t)
        reports.append(ope_report(events, t, cfg))
    paired: list[PairedReport] = []
    unpaired: dict[str, str] = {}
    for i in range(1, len(runs)):
        if keys[i] != keys[0]:
            unpaired[str(runs[i])] = f"evaluated on other events than {runs[0]}"
            continue
        diff = paired_report(
            events_of[0], terms[0], terms[i], cfg=cfg, run=str(runs[i]), baseline_run=str(runs[0])
        )
        paired.append(diff)
    return OPEComparison(
        runs=[str(r) for r in runs], reports=reports, paired=paired, unpaired=unpaired
    )


def ope_for_run(
    run_or_artifact: Path,
    dataset: PreparedDataset,
    *,
    split: str = "test",
    cfg: OPEConfig = OPEConfig(),
) -> OPEReport:
    """OPE of one saved run's (or artifact's) policy on ``split`` (see :func:`ope_for_runs`)."""
    return ope_for_runs([run_or_artifact], [dataset], split=split, cfg=cfg).reports[0]
