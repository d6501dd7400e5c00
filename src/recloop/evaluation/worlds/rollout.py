"""Policies acting in a world: simulation of sessions, logs with exact propensities, returns.

Every active user of a chunk is stepped at once (numpy and torch over the batch; no loop
over users).  A policy is a scorer over the world's items plus a selection rule:

- ``epsilon`` (ε-greedy): the top-1 of the masked scores (shared tie-break,
  :func:`recloop.ranking.topk`) with probability 1 - ε, else a uniform candidate; the
  logged propensity is ``(1 - ε) [a = top-1] + ε / n_candidates``;
- ``softmax``: ``softmax(scores / T)`` over the top K masked scores (K = None: all), the
  target policy of :mod:`recloop.evaluation.ope` (its :func:`target_probs`); the
  propensity is that probability.

Candidates are the items not yet shown to the user (a policy never repeats an item, as the
service and OPE's ``mask_consumed`` do), or with ``feedback="clicks"`` the items the user has
not responded to (a service that reads its users' recent items from an online store of
their behaviour events).  A saved model (:class:`ArtifactScorer`) is rolled out as its
service serves it: its own catalogue only (for exploration too) and ties broken by its own
user and item indices (:func:`recloop.ranking.topk`), which for a user it never saw is the
same order for every user.  Random numbers are common across policies: the
uniforms of (chunk, session, step) are drawn for every user of the chunk whatever the
policy, so two policies rolled out with one seed meet the same users with the same luck
(a paired comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from recloop.config import check
from recloop.evaluation.ope import target_probs
from recloop.evaluation.worlds.base import ITEM_PREFIX, USER_PREFIX, UserState, World
from recloop.ranking import topk

EVAL_USER_BASE = 1_000_000_000
"""First user number of evaluation roll-outs: fresh users, never in a generated log."""


class Scorer(Protocol):
    """Scores of every world item (B, N + 1) for B users; column 0 is ignored."""

    history: int
    static: bool
    """True when the scores depend on the item alone (one order serves every step)."""

    def __call__(
        self, user: np.ndarray, hist_item: np.ndarray, hist_reward: np.ndarray, state: UserState
    ) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class Selection:
    """How a policy turns scores into a shown item."""

    kind: str = "epsilon"
    """"epsilon" (ε-greedy; ε = 0 is the deterministic top-1) or "softmax"."""
    epsilon: float = 0.0
    """Exploration share of ε-greedy."""
    temperature: float = 1.0
    """Softmax temperature."""
    top_k: int | None = None
    """Softmax over the K best candidates; None = all candidates."""

    def describe(self) -> dict[str, Any]:
        if self.kind == "epsilon":
            return {"kind": "epsilon", "epsilon": self.epsilon}
        return {"kind": "softmax", "temperature": self.temperature, "top_k": self.top_k}


class PopularityScorer:
    """The world's true item popularity (log weights)."""

    history = 1
    static = True

    def __init__(self, world: World) -> None:
        with np.errstate(divide="ignore"):
            self.row = torch.from_numpy(np.log(world.params.popularity)).float()

    def __call__(
        self, user: np.ndarray, hist_item: np.ndarray, hist_reward: np.ndarray, state: UserState
    ) -> torch.Tensor:
        return self.row.expand(user.shape[0], -1)


class ConstantScorer:
    """Every item scores 0: with ε = 1 (or a softmax) a uniform random policy."""

    history = 1
    static = True

    def __init__(self, world: World) -> None:
        self.n = world.n_items + 1

    def __call__(
        self, user: np.ndarray, hist_item: np.ndarray, hist_reward: np.ndarray, state: UserState
    ) -> torch.Tensor:
        return torch.zeros(user.shape[0], self.n)


class OracleScorer:
    """Knows the world.  Scores = the exact E[reward] of each item now (``engage`` 0: the
    myopic optimum), plus ``engage`` times the probability that showing it satisfies the
    user (a click with a match >= satisfied_match), which keeps the quit risk low."""

    history = 1
    static = False

    def __init__(self, world: World, *, engage: float = 0.0) -> None:
        self.world = world
        self.engage = engage

    def __call__(
        self, user: np.ndarray, hist_item: np.ndarray, hist_reward: np.ndarray, state: UserState
    ) -> torch.Tensor:
        r = self.world.expected_reward_all(state.taste, state.satiety)
        if self.engage > 0:
            r = r + self.engage * self.world.satisfy_prob_all(state.taste, state.satiety)
        return torch.from_numpy(r)


class ArtifactScorer:
    """A saved recloop policy: raw ids ``u{n}`` / ``i{j}`` map world users and items onto
    its indices; users it never saw are index 0 (unknown), items it never saw score -inf."""

    def __init__(self, artifact: Any, world: World) -> None:
        self.art = artifact
        self.static = False
        self.history = int(artifact.history_len)
        idx = artifact.item_index
        self.art_of_world = np.array(
            [0] + [idx.get(f"{ITEM_PREFIX}{j}", 0) for j in range(1, world.n_items + 1)], np.int64
        )
        self.cols = torch.from_numpy(self.art_of_world)
        self.unknown = torch.from_numpy(self.art_of_world == 0)
        self.user_index = artifact.user_index
        # as its service serves: ties broken by its own user and item indices, and only
        # its catalogue to show (the world's other items are never candidates, not even
        # for exploration)
        self.tie_items = self.cols
        self.blocked = np.flatnonzero(self.art_of_world[1:] == 0) + 1

    def tie_keys(self, user: np.ndarray) -> np.ndarray:
        """(B,) int64 the service's tie-break key of each world user: its user index."""
        return np.array([self.user_index.get(f"{USER_PREFIX}{n}", 0) for n in user], np.int64)

    @torch.inference_mode()
    def __call__(
        self, user: np.ndarray, hist_item: np.ndarray, hist_reward: np.ndarray, state: UserState
    ) -> torch.Tensor:
        u = self.tie_keys(user)
        h = torch.from_numpy(self.art_of_world[hist_item])
        r = torch.from_numpy(hist_reward.astype(np.float32))
        scores = self.art.policy(torch.from_numpy(u), h, r).float()
        return scores[:, self.cols].masked_fill(self.unknown, float("-inf"))


@dataclass(frozen=True, kw_only=True)
class Policy:
    """A scorer with its selection rule and a name for reports."""

    name: str
    scorer: Scorer
    selection: Selection


NEG = -1e30
"""Finite stand-in for a candidate's -inf score, so that a candidate always outranks a
shown item (masked to -inf) and the top-1 is a candidate."""


def kth_unshown(shown_sorted: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The k-th (1-based) item index >= 1 not in ``shown_sorted`` (B, T) (ascending, padded
    with a sentinel above every item), for each row: the fixed point of
    ``x = k + #{shown <= x}``, reached in at most T rounds over the rows not yet fixed."""
    x = k.copy()
    todo = np.arange(k.shape[0])
    while todo.shape[0]:
        new = k[todo] + (shown_sorted[todo] <= x[todo, None]).sum(1)
        moved = new != x[todo]
        x[todo] = new
        todo = todo[moved]
    return x


@dataclass(kw_only=True, eq=False)
class Shown:
    """What each user of a chunk may not be shown (again): the items shown, or with
    click feedback the items clicked, and the items the policy cannot show; a mask for
    scorers, a sorted list for uniform draws, and for static scorers a per-user order with
    a pointer."""

    mask: np.ndarray  # (B, N + 1) bool, column 0 True
    sorted: np.ndarray  # (B, T) int64 ascending shown items, padded with N + 1
    count: np.ndarray  # (B,) int64 items shown
    order: np.ndarray | None = None  # (B, N + 1) int64 items by descending static score
    pointer: np.ndarray | None = None  # (B,) int64 first position in order not yet shown

    @classmethod
    def empty(cls, b: int, n: int, slots: int, blocked: np.ndarray | None = None) -> Shown:
        """Nothing shown yet, except ``blocked`` (k,) ascending items, which count as shown
        from the start (items the policy's service cannot show: not in its catalogue)."""
        blocked = np.zeros(0, np.int64) if blocked is None else np.asarray(blocked, np.int64)
        k = blocked.shape[0]
        mask = np.zeros((b, n + 1), bool)
        mask[:, 0] = True
        mask[:, blocked] = True
        ordered = np.full((b, slots + k), n + 1, np.int64)
        ordered[:, :k] = blocked
        return cls(mask=mask, sorted=ordered, count=np.full(b, k, np.int64))

    def add(self, rows: np.ndarray, item: np.ndarray) -> None:
        """Mark ``item`` (k,) shown to the users at ``rows`` (k,); an item already out of
        reach (shown, or not in the catalogue: a shadow's) is not counted twice."""
        new = ~self.mask[rows, item]
        rows, item = rows[new], item[new]
        self.mask[rows, item] = True
        sub = self.sorted[rows]
        sub[:, -1] = item
        self.sorted[rows] = np.sort(sub, axis=1)
        self.count[rows] += 1


def top1(
    scores: torch.Tensor | None,
    shown: Shown,
    rows: np.ndarray,
    row_keys: np.ndarray,
    items: torch.Tensor | None = None,
) -> np.ndarray:
    """The best candidate of each row: :func:`recloop.ranking.topk` of the masked scores,
    or (static scorers, ``scores`` None) the first unshown item of the row's order, which
    is the same item: masking only removes items from the order."""
    if scores is None:
        assert shown.order is not None and shown.pointer is not None
        ptr = shown.pointer[rows]
        while True:
            item = shown.order[rows, ptr]
            taken = shown.mask[rows, item]
            if not taken.any():
                break
            ptr = ptr + taken
        shown.pointer[rows] = ptr
        return item
    masked = _masked(scores, shown.mask[rows])
    cols = None if items is None else items.expand(masked.shape[0], -1)
    return topk(masked, 1, row_keys=torch.from_numpy(row_keys), items=cols).indices[:, 0].numpy()


def _masked(scores: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    s = scores.float().nan_to_num(nan=NEG, neginf=NEG)
    return s.masked_fill(torch.from_numpy(mask), float("-inf"))


def select(
    scores: torch.Tensor | None,
    shown: Shown,
    rows: np.ndarray,
    selection: Selection,
    *,
    row_keys: np.ndarray,
    u_explore: np.ndarray,
    u_pick: np.ndarray,
    items: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chosen items (B,) and their exact probabilities (B,) under ``selection`` for the
    users at ``rows`` of ``shown``; ``scores`` (B, N + 1) or None for a static scorer whose
    order ``shown`` holds; ``u_explore`` and ``u_pick`` (B,) uniforms in [0, 1)."""
    n = shown.mask.shape[1] - 1
    n_cand = n - shown.count[rows]
    if selection.kind == "epsilon":
        eps = selection.epsilon
        k = np.minimum((u_pick * n_cand).astype(np.int64), n_cand - 1) + 1
        uniform = kth_unshown(shown.sorted[rows], k)
        if eps >= 1.0:
            return uniform, 1.0 / n_cand
        best = top1(scores, shown, rows, row_keys, items)
        item = np.where(u_explore < eps, uniform, best)
        prob = (1 - eps) * (item == best) + eps / n_cand
        return item.astype(np.int64), prob.astype(np.float64)
    if scores is None:
        raise ValueError("a softmax selection needs scores")
    items, probs = target_probs(
        _masked(scores, shown.mask[rows]),
        temperature=selection.temperature,
        top_k=selection.top_k,
        row_keys=torch.from_numpy(row_keys),
    )
    p = probs.double().nan_to_num(nan=0.0).numpy()
    cum = np.cumsum(p, axis=1)
    j = (cum > (u_pick * cum[:, -1])[:, None]).argmax(1)
    r = np.arange(p.shape[0])
    return items.numpy()[r, j].astype(np.int64), p[r, j]


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """Events of a simulation, grouped by user in time order, and per-user aggregates."""

    user: np.ndarray  # (E,) int64 user numbers
    item: np.ndarray  # (E,) int64 world items
    reward: np.ndarray  # (E,) float64
    response: np.ndarray  # (E,) int8 codes of RESPONSES
    propensity: np.ndarray  # (E,) float64 probability of the shown item under the policy
    expected: np.ndarray  # (E,) float64 exact E[reward] of the shown item in its state
    session: np.ndarray  # (E,) int64 session number of the user
    step: np.ndarray  # (E,) int64 step within the session
    users: np.ndarray  # (U,) int64 simulated users
    sessions: int
    """Sessions per user."""
    shadow_expected: np.ndarray | None = None
    """(E,) float64 exact E[reward] of the item a ``shadow`` policy would have shown in the
    same state (:func:`simulate`); None without one."""
    shadow_item: np.ndarray | None = None
    """(E,) int64 that item (0 where the shadow had nothing left to show)."""

    def timestamps(self, world: World, start: int = 1_600_000_000) -> np.ndarray:
        m = world.mech
        return start + self.session * m.session_gap_seconds + self.step * m.step_seconds

    def per_user(self) -> dict[str, np.ndarray]:
        """Per simulated user (U,): return per session, steps per session, and with a
        shadow the one-step advantage per session ``sum_t R(s_t, a_t) - R(s_t, a'_t)`` of
        the policy's items over the shadow's in the policy's own states."""
        pos = np.searchsorted(self.users, self.user)
        n_users = self.users.shape[0]
        ret = np.bincount(pos, self.reward, minlength=n_users) / self.sessions
        length = np.bincount(pos, minlength=n_users) / self.sessions
        out = {"return": ret, "length": length, "pos": pos}
        if self.shadow_expected is not None:
            gain = self.expected - self.shadow_expected
            out["advantage"] = np.bincount(pos, gain, minlength=n_users) / self.sessions
        return out


FEEDBACK = ("shown", "clicks")
"""What a roll-out feeds its policy (:func:`simulate`)."""


def simulate(
    world: World,
    policy: Policy,
    users: np.ndarray,
    *,
    seed: int,
    chunk: int = 8192,
    progress: Callable[[int], None] | None = None,
    feedback: str = "shown",
    shadow: Scorer | None = None,
) -> Rollout:
    """Roll ``policy`` out for ``users`` (U,) sorted user numbers over the world's sessions.

    ``feedback`` is what the policy's state and exclusions are made of: ``shown`` (every
    item shown, with its reward, 0 when ignored; none is shown twice) or ``clicks`` (the
    items the user responded to only, as a service reading its users' recent items from
    an online store that the stream processor fills with behaviour events; an ignored
    item may be shown again).

    ``shadow``: another scorer that sees the same states, histories and exclusions (within
    its own catalogue and tie-break) and chooses with the same selection and random
    numbers at every step, without acting; the exact E[reward] of its item is recorded
    (``Rollout.shadow_expected``).  The policy's one-step advantage over it in the
    policy's own states is what a comparison on the states the policy visits sees (the
    performance difference lemma, Kakade & Langford 2002, sums the shadow's advantage
    function over them; this is its one-step part)."""
    check(feedback in FEEDBACK, f"feedback must be one of {FEEDBACK}, got {feedback!r}")
    users = np.asarray(users, np.int64)
    m, n = world.mech, world.n_items
    h = max(1, int(policy.scorer.history))
    # the histories kept: the policy's, or the shadow's if longer (each is given its own)
    width = h if shadow is None else max(h, int(shadow.history))
    # a saved model is rolled out as its service serves it: its own tie-break keys (its
    # user and item indices) and its own catalogue (the world's other items are never
    # candidates); the world's reference policies rank world items by world numbers
    tie_keys: Callable[[np.ndarray], np.ndarray] = getattr(policy.scorer, "tie_keys", lambda u: u)
    tie_items: torch.Tensor | None = getattr(policy.scorer, "tie_items", None)
    blocked: np.ndarray | None = getattr(policy.scorer, "blocked", None)
    parts: list[tuple[np.ndarray, ...]] = []
    shadow_parts: list[tuple[np.ndarray, np.ndarray]] = []
    sh_keys_of: Callable[[np.ndarray], np.ndarray] = getattr(shadow, "tie_keys", lambda u: u)
    sh_items: torch.Tensor | None = getattr(shadow, "tie_items", None)
    for c, lo in enumerate(range(0, users.shape[0], chunk)):
        ids = users[lo : lo + chunk]
        b = ids.shape[0]
        rng = np.random.default_rng([seed, c])
        state = world.initial_state(ids)
        hist_item = np.zeros((b, width), np.int64)
        hist_reward = np.zeros((b, width), np.float32)
        # what the policy may not show again: every shown item, or the clicked ones only
        shown = Shown.empty(b, n, m.sessions * m.horizon, blocked)
        keys = tie_keys(ids)
        clicks = feedback == "clicks"
        if shadow is not None:
            sh_shown = Shown.empty(b, n, m.sessions * m.horizon, getattr(shadow, "blocked", None))
            sh_keys = sh_keys_of(ids)
        if policy.scorer.static:
            dummy = UserState(
                user=ids, taste=state.taste, satiety=state.satiety, misses=state.misses
            )
            full = _masked(
                policy.scorer(ids, hist_item[:, -h:], hist_reward[:, -h:], dummy), shown.mask
            )
            shown.order = topk(full, n + 1, row_keys=torch.from_numpy(ids)).indices.numpy()
            shown.pointer = np.zeros(b, np.int64)
        for s in range(m.sessions):
            world.start_session(state)
            alive = np.ones(b, bool)
            for t in range(m.horizon):
                uni = rng.random((7, b))  # drawn for every user: common random numbers
                rows = np.flatnonzero(alive & (shown.count < n))
                if rows.shape[0] == 0:
                    break
                sub = UserState(
                    user=state.user[rows],
                    taste=state.taste[rows],
                    satiety=state.satiety[rows],
                    misses=state.misses[rows],
                )
                scores = (
                    None
                    if policy.scorer.static and policy.selection.kind == "epsilon"
                    else policy.scorer(ids[rows], hist_item[rows, -h:], hist_reward[rows, -h:], sub)
                )
                item, prob = select(
                    scores,
                    shown,
                    rows,
                    policy.selection,
                    row_keys=keys[rows],
                    u_explore=uni[5, rows],
                    u_pick=uni[6, rows],
                    items=tie_items,
                )
                expected = world.expected_reward(sub, item)
                if shadow is not None:
                    shadow_parts.append(
                        _shadow_choice(
                            world, shadow, sh_shown, rows, sub, policy.selection,
                            ids=ids, hist_item=hist_item, hist_reward=hist_reward,
                            keys=sh_keys, uni=uni, items=sh_items,
                        )
                    )  # fmt: skip
                out = world.step(sub, item, uni[:5, rows])
                state.taste[rows], state.satiety[rows], state.misses[rows] = (
                    sub.taste,
                    sub.satiety,
                    sub.misses,
                )
                fed = rows[out.response != 0] if clicks else rows
                fed_item = item[out.response != 0] if clicks else item
                fed_reward = out.reward[out.response != 0] if clicks else out.reward
                shown.add(fed, fed_item)
                if shadow is not None:
                    sh_shown.add(fed, fed_item)
                hist_item[fed] = np.concatenate([hist_item[fed, 1:], fed_item[:, None]], 1)
                hist_reward[fed] = np.concatenate(
                    [hist_reward[fed, 1:], fed_reward[:, None].astype(np.float32)], 1
                )
                alive[rows] = ~out.quit
                parts.append(
                    (ids[rows], item, out.reward, out.response, prob, expected,
                     np.full(rows.shape[0], s), np.full(rows.shape[0], t))
                )  # fmt: skip
        if progress is not None:
            progress(b)
    cols = [np.concatenate([p[i] for p in parts]) for i in range(8)] if parts else None
    if cols is None:
        z = np.zeros(0)
        cols = [z.astype(np.int64), z.astype(np.int64), z, z.astype(np.int8), z, z,
                z.astype(np.int64), z.astype(np.int64)]  # fmt: skip
    order = np.lexsort((cols[7], cols[6], cols[0]))
    shadow_expected = shadow_item = None
    if shadow is not None:
        shadow_item = np.concatenate([p[0] for p in shadow_parts] or [np.zeros(0, np.int64)])
        shadow_expected = np.concatenate([p[1] for p in shadow_parts] or [np.zeros(0)])
        shadow_item, shadow_expected = shadow_item[order], shadow_expected[order]
    return Rollout(
        user=cols[0][order],
        item=cols[1][order],
        reward=cols[2][order],
        response=cols[3][order].astype(np.int8),
        propensity=cols[4][order],
        expected=cols[5][order],
        session=cols[6][order].astype(np.int64),
        step=cols[7][order].astype(np.int64),
        users=users,
        sessions=m.sessions,
        shadow_expected=shadow_expected,
        shadow_item=shadow_item,
    )


def _shadow_choice(
    world: World,
    shadow: Scorer,
    shown: Shown,
    rows: np.ndarray,
    state: UserState,
    selection: Selection,
    *,
    ids: np.ndarray,
    hist_item: np.ndarray,
    hist_reward: np.ndarray,
    keys: np.ndarray,
    uni: np.ndarray,
    items: torch.Tensor | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(b,) the item ``shadow`` would choose at ``rows`` and (b,) its exact E[reward] (item
    and value 0 where its catalogue has nothing left to show)."""
    h = max(1, int(shadow.history))
    out = np.zeros(rows.shape[0])
    chosen = np.zeros(rows.shape[0], np.int64)
    ok = np.flatnonzero(shown.count[rows] < shown.mask.shape[1] - 1)
    if ok.shape[0] == 0:
        return chosen, out
    at = rows[ok]
    sub = UserState(
        user=state.user[ok], taste=state.taste[ok], satiety=state.satiety[ok],
        misses=state.misses[ok],
    )  # fmt: skip
    scores = shadow(ids[at], hist_item[at, -h:], hist_reward[at, -h:], sub)
    item, _ = select(
        scores, shown, at, selection, row_keys=keys[at], u_explore=uni[5, at],
        u_pick=uni[6, at], items=items,
    )  # fmt: skip
    out[ok] = world.expected_reward(sub, item)
    chosen[ok] = item
    return chosen, out


# --- metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def t_interval(x: np.ndarray, confidence: float = 0.95) -> Estimate:
    """Mean of ``x`` with a normal-approximation interval (n is in the hundreds or more)."""
    n = x.shape[0]
    mean = float(x.mean()) if n else 0.0
    if n < 2:
        return Estimate(mean, mean, mean)
    z = {0.95: 1.959964, 0.9: 1.644854, 0.99: 2.575829}.get(confidence, 1.959964)
    half = z * float(x.std(ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half)


def rollout_metrics(
    world: World, roll: Rollout, *, n_boot: int = 200, seed: int = 0
) -> dict[str, Estimate]:
    """True return per session, session length, diversity (t over users) and catalogue
    coverage (bootstrap over users), each with a 95 % interval.

    Diversity: mean ``1 - cos`` between consecutive shown items of a session, per user.
    """
    agg = roll.per_user()
    pos = agg["pos"]
    n_users = roll.users.shape[0]
    unit = world.params.item_unit
    same = np.r_[False, (roll.user[1:] == roll.user[:-1]) & (roll.session[1:] == roll.session[:-1])]
    prev = np.r_[0, roll.item[:-1]]
    dis = 1.0 - np.einsum("ed,ed->e", unit[roll.item], unit[prev])
    pairs = np.bincount(pos[same], minlength=n_users)
    div_sum = np.bincount(pos[same], dis[same], minlength=n_users)
    has = pairs > 0
    diversity = div_sum[has] / pairs[has]
    # coverage: distinct items shown / N, bootstrapped over users
    n = world.n_items
    counts = np.zeros((n_users, 0))
    del counts
    point = np.unique(roll.item).shape[0] / n
    rng = np.random.default_rng(seed)
    starts = np.searchsorted(pos, np.arange(n_users))
    ends = np.searchsorted(pos, np.arange(n_users), side="right")
    boots = np.empty(n_boot)
    for i in range(n_boot):
        pick = rng.integers(0, n_users, n_users)
        lens = ends[pick] - starts[pick]
        rows = np.repeat(starts[pick], lens) + (
            np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        )
        boots[i] = np.unique(roll.item[rows]).shape[0] / n
    lo, hi = np.quantile(boots, [0.025, 0.975]) if n_boot else (point, point)
    return {
        "return": t_interval(agg["return"]),
        "length": t_interval(agg["length"]),
        "coverage": Estimate(point, float(lo), float(hi)),
        "diversity": t_interval(diversity),
    }


# --- logs -------------------------------------------------------------------------------


def write_events(
    world: World, roll: Rollout, path: Path, *, selection: Selection | None = None
) -> int:
    """Write ``roll`` as a CSV ``recloop prepare --format csv`` reads; returns the rows.

    Columns: user (``u{n}``), item (``i{j}``), timestamp (integer seconds), rating (the
    step's reward, 0 for an ignored impression), propensity (exact, of the logging policy)
    and response (the deepest behaviour name or ``none``; an extra column prepare drops —
    a ``behavior`` column would have to be pv/cart/fav/buy and could not say "ignored").
    With the logging ``selection``, when the service has the same policy (ε-greedy; softmax
    over every candidate), also how each step was served, as the served-items table says it
    (``policy``, ``position`` 0, ``list_length`` 1, ``epsilon``, ``temperature``), for OPE's
    ``served`` target.
    """
    import polars as pl

    from recloop.evaluation.worlds.base import RESPONSES

    frame = pl.DataFrame(
        {
            "u": roll.user,
            "i": roll.item,
            "timestamp": roll.timestamps(world),
            "rating": roll.reward,
            "propensity": roll.propensity,
            "r": roll.response.astype(np.int64),
        }
    ).select(
        pl.format(f"{USER_PREFIX}{{}}", pl.col("u")).alias("user"),
        pl.format(f"{ITEM_PREFIX}{{}}", pl.col("i")).alias("item"),
        pl.col("timestamp"),
        pl.col("rating"),
        pl.col("propensity"),
        pl.col("r").replace_strict(list(range(len(RESPONSES))), list(RESPONSES)).alias("response"),
    )
    # the service's softmax spreads over every unmasked item: a top-K softmax is not its
    if selection is not None and (selection.kind == "epsilon" or selection.top_k is None):
        eps = selection.kind == "epsilon"
        frame = frame.with_columns(
            pl.lit("epsilon" if eps else "softmax").alias("policy"),
            pl.lit(0, pl.Int32).alias("position"),
            pl.lit(1, pl.Int32).alias("list_length"),
            pl.lit(selection.epsilon if eps else None, pl.Float64).alias("epsilon"),
            pl.lit(None if eps else selection.temperature, pl.Float64).alias("temperature"),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.write_csv(path, float_precision=None)
    return frame.height


REFERENCE_POLICIES = ("popularity", "random")


def make_policy(world: World, spec: str, selection: Selection) -> Policy:
    """``popularity`` (the world's true popularity), ``random`` (uniform: ε = 1) or a run /
    artifact directory, with ``selection``."""
    if spec == "popularity":
        return Policy(name="popularity", scorer=PopularityScorer(world), selection=selection)
    if spec == "random":
        return Policy(name="random", scorer=ConstantScorer(world), selection=Selection(epsilon=1.0))
    from recloop.artifacts import load_artifact

    art = load_artifact(Path(spec))
    return Policy(name=spec, scorer=ArtifactScorer(art, world), selection=selection)


def evaluation_users(n: int) -> np.ndarray:
    """(n,) fresh user numbers for roll-outs, the same for every run (paired)."""
    return EVAL_USER_BASE + np.arange(n, dtype=np.int64)
