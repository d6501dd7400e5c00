"""A user simulator fitted on logged events, and policy rollouts against it.

**Response model.**  A user's state is their user embedding plus the mean embedding of their
last H items.  For a recommended item a it predicts

- ``p(s, a) = sigmoid(<s, Q_a> + c_a)``, the probability the user consumes a, trained by
  logistic loss on logged events (label 1) against uniformly sampled items (label 0);
- ``m(s, a) = mu + d_a + <s * Q_a, v>``, the reward if consumed, trained by squared error on
  the logged rewards;

so the reward of a step is ``p m`` (``reward_mode="expected"``) or ``m`` with probability p
and 0 otherwise (``"sample"``).  Its accuracy is reported on the VALID split: the AUC of p on
logged items against sampled ones, and the RMSE of m on the logged rewards.

How it is fitted fixes its scale, and every report says so (``SimulationResult.fit``): p
is the probability that the item is the logged one rather than one of ``negatives`` uniform
draws — not a real consumption rate — so returns (and the quit rule, which compares
rewards with a threshold) change with ``negatives`` and compare only between policies
under one fitted simulator.  It is also fitted on the very log the policies learn from.
For returns on a known scale, against a truth no model can fake, use ``recloop world``.

**Rollouts.**  Users start from their real last H items before their first event of the start
split (the evaluation protocol's state).  Each step, for all users at once, the policy scores
the catalogue, the items the user consumed before the start are masked as the service masks
them (``mask_consumed``), its top item is recommended (with ``repeats=False`` items already
recommended in the rollout are masked too), the simulator answers, and item and reward
enter the history.  Return and session length come with 95 % bootstrap intervals over
users.
With ``quit=True`` a user leaves after ``patience`` consecutive steps with reward below
``quit_threshold``; the rest of their horizon counts nothing.

**Boredom.**  The response model alone rewards showing a user the same confident item again
and again.  Users tire of that (the "boredom" of Ie et al.'s RecSim interest-evolution
model, and of KuaiSim): the reward of a step is scaled by ``1 − boredom · max(0, cos)``,
``cos`` taken between the item and the most similar item recommended in the last
``boredom_window`` steps (the response model's item vectors; a repeat has cos 1); negative
rewards are left as they are.
``boredom=0`` turns it off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recloop.config import check, config_to_dict
from recloop.data.dataset import TRAIN, VALID, PreparedDataset
from recloop.data.sampler import TransitionSampler
from recloop.errors import DataError
from recloop.evaluation.protocol import Scorer, build_eval_users
from recloop.ranking import topk

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """The response model's size and training, and how rollouts run."""

    history: int = 10
    """H, items of the user's history the response model reads."""
    embedding_dim: int = 32
    """D of the response model's user and item embeddings."""
    negatives: int = 4
    """Items drawn uniformly from the whole catalogue per logged event (a draw may hit an
    item the user consumed: a little label noise, as in plain negative sampling)."""
    epochs: int = 5
    """Passes over the TRAIN events."""
    lr: float = 0.01
    """Adam learning rate."""
    batch_size: int = 512
    """Logged events per training step."""
    horizon: int = 20
    """T, steps per rollout."""
    n_users: int | None = None
    """Users rolled out (the first ones of the start split); None = all."""
    start_split: str = "test"
    """Rollouts start from the history before each user's first event of this split."""
    reward_mode: str = "expected"
    """expected: reward p m; sample: m with probability p, else 0 (seeded)."""
    quit_threshold: float | None = None
    """A step with reward below this disappoints; None = half the mean logged TRAIN reward."""
    patience: int = 3
    """Consecutive disappointing steps after which the user leaves (quit modes)."""
    boredom: float = 0.5
    """b in [0, 1]: a step's reward is scaled by 1 − b · max(0, cos) with the most similar item
    recommended in the last ``boredom_window`` steps (a repeat: 1 − b); 0 = no boredom."""
    boredom_window: int = 5
    """Recommendations a user remembers when getting bored."""
    mask_consumed: bool = True
    """Mask the items each user consumed before the start, as the service does."""
    n_boot: int = 1000
    """Bootstrap resamples of the users for the intervals of return and length."""
    seed: int = 0
    """Seed of the model's initialisation, negative sampling and sampled rewards."""

    def __post_init__(self) -> None:
        check(self.history >= 1, f"simulator.history must be >= 1, got {self.history}")
        check(self.n_boot >= 0, f"simulator.n_boot must be >= 0, got {self.n_boot}")
        check(self.embedding_dim >= 1, "simulator.embedding_dim must be >= 1")
        check(self.negatives >= 1, f"simulator.negatives must be >= 1, got {self.negatives}")
        check(self.epochs >= 1, f"simulator.epochs must be >= 1, got {self.epochs}")
        check(self.lr > 0, f"simulator.lr must be > 0, got {self.lr}")
        check(self.batch_size >= 1, "simulator.batch_size must be >= 1")
        check(self.horizon >= 1, f"simulator.horizon must be >= 1, got {self.horizon}")
        check(self.n_users is None or self.n_users >= 1, "simulator.n_users must be >= 1")
        check(self.start_split in ("valid", "test"), "simulator.start_split must be valid or test")
        check(
            self.reward_mode in ("expected", "sample"),
            f"simulator.reward_mode must be expected or sample, got {self.reward_mode!r}",
        )
        check(self.patience >= 1, f"simulator.patience must be >= 1, got {self.patience}")
        check(
            0.0 <= self.boredom <= 1.0, f"simulator.boredom must be in [0, 1], got {self.boredom}"
        )
        check(self.boredom_window >= 1, "simulator.boredom_window must be >= 1")


class ResponseModel(nn.Module):
    """p(consume | s, a) and E[reward | consumed, s, a] (module docstring)."""

    def __init__(self, n_users: int, n_items: int, dim: int, *, mean_reward: float) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users + 1, dim)
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.out = nn.Embedding(n_items + 1, dim)  # Q
        self.consume_bias = nn.Embedding(n_items + 1, 1)  # c
        self.reward_bias = nn.Embedding(n_items + 1, 1)  # d
        self.reward_proj = nn.Linear(dim, 1, bias=False)  # v
        self.mu = mean_reward
        for emb in (self.user, self.item, self.out):
            nn.init.normal_(emb.weight, std=0.1)
        for emb in (self.consume_bias, self.reward_bias):
            nn.init.zeros_(emb.weight)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def state(self, user: Tensor, history: Tensor) -> Tensor:
        """(B,), (B, H) → (B, D)."""
        mask = (history != 0).unsqueeze(-1).float()
        mean = (self.item(history) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.user(user) + mean

    def forward(self, state: Tensor, item: Tensor) -> tuple[Tensor, Tensor]:
        """(B, D), items (B,) or (B, M) → (consume logit, reward if consumed), item's shape."""
        q = self.out(item)  # (..., D)
        s = state.unsqueeze(1) if item.dim() == 2 else state
        logit = (s * q).sum(-1) + self.consume_bias(item).squeeze(-1)
        reward = self.mu + self.reward_bias(item).squeeze(-1) + self.reward_proj(s * q).squeeze(-1)
        return logit, reward


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    scores = np.concatenate([pos, neg])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value, then of each score.
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    n_p, n_n = pos.shape[0], neg.shape[0]
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


@dataclass(frozen=True, kw_only=True)
class SimulatorAccuracy:
    """How well the response model predicts held-out (VALID) events."""

    auc: float
    """AUC of p(consume) for logged items against sampled items."""
    rmse: float
    """RMSE of the predicted reward on the logged rewards."""
    n_events: int
    """VALID events scored."""

    def to_dict(self) -> dict[str, Any]:
        return {"auc": self.auc, "rmse": self.rmse, "n_events": self.n_events}


class UserSimulator:
    """A fitted :class:`ResponseModel` answering recommendations (``respond``)."""

    def __init__(self, model: ResponseModel, cfg: SimulatorConfig, *, threshold: float) -> None:
        self.model = model.eval()
        self.cfg = cfg
        self.threshold = threshold

    @torch.no_grad()
    def predict(self, user: Tensor, history: Tensor, item: Tensor) -> tuple[Tensor, Tensor]:
        """(p(consume), reward if consumed), each (B,), for items (B,)."""
        logit, reward = self.model(self.model.state(user, history), item)
        return torch.sigmoid(logit), reward

    def respond(
        self, user: Tensor, history: Tensor, item: Tensor, *, generator: torch.Generator
    ) -> Tensor:
        """(B,) rewards of recommending ``item`` (B,) to users in state (user, history)."""
        p, m = self.predict(user, history, item)
        if self.cfg.reward_mode == "expected":
            return p * m
        consumed = torch.rand(p.shape, generator=generator) < p
        return torch.where(consumed, m, torch.zeros_like(m))

    @torch.no_grad()
    def accuracy(self, dataset: PreparedDataset, *, split: int = VALID) -> SimulatorAccuracy:
        """AUC and RMSE on the events of ``split`` (module docstring)."""
        sampler = TransitionSampler(
            dataset, history=self.cfg.history, batch_size=4096, splits=(split,), shuffle=False
        )
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        pos, neg, err = [], [], []
        for b in sampler:
            state = self.model.state(b.user, b.history)
            logit, reward = self.model(state, b.action)
            neg_items = torch.randint(1, dataset.n_items + 1, b.action.shape, generator=gen)
            pos.append(logit.numpy())
            neg.append(self.model(state, neg_items)[0].numpy())
            err.append((reward - b.reward).numpy())
        if not pos:
            raise DataError("no event in the split to measure the simulator's accuracy on")
        e = np.concatenate(err)
        return SimulatorAccuracy(
            auc=auc(np.concatenate(pos), np.concatenate(neg)),
            rmse=float(np.sqrt(np.mean(e * e))),
            n_events=int(e.shape[0]),
        )


def fit_simulator(
    dataset: PreparedDataset, cfg: SimulatorConfig = SimulatorConfig()
) -> UserSimulator:
    """Train the response model on the TRAIN events plus ``cfg.negatives`` sampled items each."""
    torch.manual_seed(cfg.seed)
    train = dataset.split == TRAIN
    if not train.any():
        raise DataError("no TRAIN event to fit the user simulator on")
    mean_reward = float(dataset.reward[train].mean())
    model = ResponseModel(
        dataset.n_users, dataset.n_items, cfg.embedding_dim, mean_reward=mean_reward
    )
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = TransitionSampler(
        dataset, history=cfg.history, batch_size=cfg.batch_size, splits=(TRAIN,), seed=cfg.seed
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    bce = nn.functional.binary_cross_entropy_with_logits
    model.train()
    for _ in range(cfg.epochs):
        for b in sampler:
            bs = b.action.shape[0]
            neg = torch.randint(1, dataset.n_items + 1, (bs, cfg.negatives), generator=gen)
            items = torch.cat([b.action[:, None], neg], 1)  # (B, 1 + negatives)
            labels = torch.zeros(items.shape)
            labels[:, 0] = 1
            logit, reward = model(model.state(b.user, b.history), items)
            loss = bce(logit, labels) + nn.functional.mse_loss(reward[:, 0], b.reward)
            opt.zero_grad()
            loss.backward()
            opt.step()
    threshold = cfg.quit_threshold if cfg.quit_threshold is not None else mean_reward / 2
    return UserSimulator(model, cfg, threshold=threshold)


def update_streak(streak: Tensor, reward: Tensor, *, threshold: float) -> Tensor:
    """Consecutive disappointing steps so far: +1 when reward < threshold, else back to 0."""
    return torch.where(reward < threshold, streak + 1, torch.zeros_like(streak))


def session_lengths(rewards: Tensor, *, threshold: float, patience: int) -> Tensor:
    """(M, T) rewards → (M,) steps each user stays: up to and including the step at which
    ``patience`` consecutive rewards below ``threshold`` make them leave, else T."""
    m, t = rewards.shape
    streak = torch.zeros(m, dtype=torch.long)
    length = torch.zeros(m, dtype=torch.long)
    active = torch.ones(m, dtype=torch.bool)
    for step in range(t):
        length += active.long()
        streak = update_streak(streak, rewards[:, step], threshold=threshold)
        active &= streak < patience
    return length


@dataclass(frozen=True, kw_only=True)
class SimulationReport:
    """One rollout mode's outcome, averaged over users."""

    repeats: bool
    """Whether an item could be recommended twice to a user."""
    quit: bool
    """Whether users could leave (the session-exit rule)."""
    n_users: int
    """Users rolled out."""
    horizon: int
    """T, the most steps a session can last."""
    cumulative_reward: float
    """Mean over users of the summed simulated reward of their session."""
    cumulative_reward_interval: tuple[float, float]
    """Its 95 % percentile bootstrap interval over users."""
    session_length: float
    """Mean steps a user stayed."""
    session_length_interval: tuple[float, float]
    """Its 95 % percentile bootstrap interval over users."""
    coverage: float
    """Distinct items recommended to anyone, over N."""
    diversity: float
    """Mean over users of 1 - mean pairwise cosine similarity (simulator's item embeddings)
    of the items recommended in their session (users with at least 2 steps)."""
    distinct_ratio: float
    """Mean over users of distinct items / steps in their session."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, kw_only=True)
class SimulationResult:
    """The simulator's accuracy and the four rollout modes."""

    accuracy: SimulatorAccuracy
    modes: list[SimulationReport]
    threshold: float
    """The quit threshold used."""
    config: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    """How the response model was fitted (module docstring): data, negatives, scale."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "fit": dict(self.fit),
            "accuracy": self.accuracy.to_dict(),
            "threshold": self.threshold,
            "modes": [m.to_dict() for m in self.modes],
            "config": dict(self.config),
        }


def boredom_factor(unit: Tensor, item: Tensor, recent: Tensor, *, boredom: float) -> Tensor:
    """(M,) multipliers ``1 − boredom · max(0, max_j cos(item, recent_j))`` of a step's reward.

    ``unit`` (N + 1, D) unit item vectors, ``item`` (M,) the items recommended now, ``recent``
    (M, W) the items recommended in the last W steps, 0 where none (then the factor is 1).
    """
    cos = torch.einsum("md,mwd->mw", unit[item], unit[recent])  # (M, W)
    cos = cos.masked_fill(recent == 0, 0.0).clamp(min=0.0)
    return 1.0 - boredom * cos.amax(1)


def intra_list_diversity(emb: Tensor, mask: Tensor) -> Tensor:
    """1 - mean cosine similarity over pairs i != j of each row's masked vectors.

    ``emb`` (M, T, D), ``mask`` (M, T) bool → (M,) float64, 1 for rows with fewer than two
    vectors (Ziegler et al. 2005's intra-list similarity, turned into a diversity).  With
    unit vectors, ``|sum e|^2 = L + sum_{i != j} cos(e_i, e_j)``: no (T, T) matrix is built.
    """
    unit = nn.functional.normalize(emb.double(), dim=-1) * mask[..., None]
    n = mask.sum(1).double()
    pair_cos = (unit.sum(1).pow(2).sum(1) - n) / (n * (n - 1)).clamp(min=1)
    return 1 - pair_cos


@torch.no_grad()
def rollout(
    policy: Scorer,
    sim: UserSimulator,
    *,
    user: Tensor,
    history: Tensor,
    history_reward: Tensor,
    policy_history: int,
    horizon: int,
    repeats: bool,
    quit: bool,
    seed: int = 0,
    consumed: Tensor | None = None,
) -> SimulationReport:
    """Roll ``policy`` out for ``horizon`` steps for users (M,) from histories (M, H).

    H must be at least the policy's ``policy_history`` and the simulator's; each reads its
    own last columns.  ``consumed`` (M, N + 1) bool: items masked at every step (what each
    user consumed before the start).
    """
    m = user.shape[0]
    h_sim = sim.cfg.history
    n = sim.model.item.num_embeddings - 1
    gen = torch.Generator().manual_seed(seed)
    hist, hist_r = history.clone(), history_reward.clone()
    shown = torch.zeros((m, n + 1), dtype=torch.bool)
    streak = torch.zeros(m, dtype=torch.long)
    active = torch.ones(m, dtype=torch.bool)
    items = torch.zeros((m, horizon), dtype=torch.long)
    rewards = torch.zeros((m, horizon))
    alive = torch.zeros((m, horizon), dtype=torch.bool)
    rows = torch.arange(m)
    unit = nn.functional.normalize(sim.model.out.weight.detach(), dim=-1)  # (N + 1, D)
    recent = torch.zeros((m, sim.cfg.boredom_window), dtype=torch.long)  # (M, W), 0 = none
    for t in range(horizon):
        scores = policy(user, hist[:, -policy_history:], hist_r[:, -policy_history:]).clone()
        scores[:, 0] = float("-inf")
        if consumed is not None:
            scores.masked_fill_(consumed, float("-inf"))
        if not repeats:
            scores.masked_fill_(shown, float("-inf"))
        a = topk(scores, 1, row_keys=user).indices[:, 0]  # (M,), ties by recloop.ranking
        r = sim.respond(user, hist[:, -h_sim:], a, generator=gen)
        if sim.cfg.boredom > 0:
            # boredom shrinks what a step is worth; it never softens a negative reward
            bored = r * boredom_factor(unit, a, recent, boredom=sim.cfg.boredom)
            r = torch.where(r > 0, bored, r)
        recent = torch.cat([recent[:, 1:], a[:, None]], 1)
        items[:, t], rewards[:, t], alive[:, t] = a, r, active
        shown[rows, a] = True
        hist = torch.cat([hist[:, 1:], a[:, None]], 1)
        hist_r = torch.cat([hist_r[:, 1:], r[:, None].to(hist_r.dtype)], 1)
        if quit:
            streak = update_streak(streak, r, threshold=sim.threshold)
            active = active & (streak < sim.cfg.patience)
    length = alive.sum(1)  # (M,)
    cum = (rewards * alive).sum(1)
    seen_any = torch.zeros(n + 1, dtype=torch.bool)
    seen_any[items[alive]] = True
    # Distinct items per user: count first occurrences in each sorted alive row.
    keyed = torch.where(alive, items, torch.full_like(items, -1)).sort(1).values
    first = torch.ones_like(keyed, dtype=torch.bool)
    first[:, 1:] = keyed[:, 1:] != keyed[:, :-1]
    distinct = (first & (keyed >= 0)).sum(1)
    div = intra_list_diversity(sim.model.out.weight[items], alive)
    many = length >= 2
    lf = length.double()
    n_boot = sim.cfg.n_boot
    return SimulationReport(
        repeats=repeats,
        quit=quit,
        n_users=m,
        horizon=horizon,
        cumulative_reward=float(cum.mean()),
        cumulative_reward_interval=user_interval(cum.double().numpy(), n_boot=n_boot, seed=seed),
        session_length=float(lf.mean()),
        session_length_interval=user_interval(lf.numpy(), n_boot=n_boot, seed=seed),
        coverage=float(seen_any[1:].sum()) / n,
        diversity=float(div[many].mean()) if bool(many.any()) else 0.0,
        distinct_ratio=float((distinct.double() / lf.clamp(min=1)).mean()),
    )


def user_interval(values: np.ndarray, *, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of per-user ``values`` (M,)."""
    if n_boot == 0 or values.shape[0] == 0:
        mean = float(values.mean()) if values.shape[0] else 0.0
        return mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.shape[0], size=(n_boot, values.shape[0]))
    low, high = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    return float(low), float(high)


def simulate(
    policy: Scorer,
    sim: UserSimulator,
    dataset: PreparedDataset,
    *,
    policy_history: int,
    accuracy: SimulatorAccuracy | None = None,
) -> SimulationResult:
    """Roll ``policy`` out in the four modes (repeats x quit) from the start split's users."""
    cfg = sim.cfg
    users = build_eval_users(
        dataset, split=cfg.start_split, history=max(policy_history, cfg.history)
    )
    m = len(users) if cfg.n_users is None else min(cfg.n_users, len(users))
    if m == 0:
        raise DataError(f"no user has an event in the {cfg.start_split} split to start from")
    consumed = None
    if cfg.mask_consumed:
        consumed = torch.zeros((m, dataset.n_items + 1), dtype=torch.bool)
        rows = np.repeat(np.arange(m), np.diff(users.consumed_offsets[: m + 1]))
        items = users.consumed_items[: int(users.consumed_offsets[m])]
        consumed[torch.from_numpy(rows), torch.from_numpy(items.astype(np.int64))] = True
    args = {
        "user": torch.from_numpy(users.user[:m]),
        "history": torch.from_numpy(users.history[:m]),
        "history_reward": torch.from_numpy(users.history_reward[:m]),
    }
    modes = [
        rollout(
            policy,
            sim,
            **args,
            consumed=consumed,
            policy_history=policy_history,
            horizon=cfg.horizon,
            repeats=repeats,
            quit=quit,
            seed=cfg.seed,
        )
        for repeats in (True, False)
        for quit in (False, True)
    ]
    fit = {
        "data": "TRAIN split of the dataset the policies learn from",
        "train_events": int((dataset.split == TRAIN).sum()),
        "negatives": cfg.negatives,
        "epochs": cfg.epochs,
        "scale": f"p = P(logged item beats {cfg.negatives} uniform negatives): returns and the "
        "quit rule change with the number of negatives; compare policies under one simulator",
        "mask_consumed": cfg.mask_consumed,
    }
    return SimulationResult(
        accuracy=accuracy if accuracy is not None else sim.accuracy(dataset),
        modes=modes,
        threshold=sim.threshold,
        config=config_to_dict(cfg),
        fit=fit,
    )
