"""The World protocol: user models whose truth is known, and the mechanics they share.

A world is a generative user model: every quantity an evaluation needs — the probability
that a user consumes a shown item, the expected reward of showing it, how the user's state
changes — is a closed-form function of the world's latent state, so off-policy estimates
and learned policies can be checked against the exact answer instead of a fitted proxy.

State of one user (all exact, all vectorised over a batch of users B):

- ``taste`` (B, D): the latent preference vector.  It drifts towards what the user
  consumes: ``taste <- (1 - drift) taste + drift |taste| unit(e_a)`` after a click on a.
- ``satiety`` (B, D): an exponentially decayed sum of the unit embeddings of the items the
  user consumed in the current session, ``S <- boredom_decay S + unit(e_a)`` (every step
  multiplies by the decay, a click adds the item).  It is reset at a session start.  It is
  the "last W consumed items" memory with a soft window of about ``1 / (1 - decay)`` steps.
- ``misses`` (B,): unsatisfying steps since the last satisfying one (for the quit rule).

One step, showing item a:

- click (consumption) logit  ``z = offset + taste . e_a + bias_a - boredom * relu(unit(e_a) . S)``
  and ``p_click = sigmoid(z)``; ``bias_a`` is the item's popularity effect;
- match ``m = taste . e_a``; the e-commerce funnel after a click:
  ``P(cart | click) = sigmoid(logit(cart_rate) + match_slope (m - satisfied_match))``, the
  same for ``fav`` (given no cart) with ``fav_rate``, and ``P(buy | cart) = buy_rate``;
  the step's reward is the deepest behaviour's (pv 1, cart 2, fav 2, buy 3) and 0 when the
  item is ignored;
- the step satisfies iff the user clicked and ``m >= satisfied_match``; otherwise
  ``misses += 1`` (a satisfying step resets it to 0);
- after the step the user quits the session with probability
  ``min(1, quit_base + quit_per_miss * misses)``.

The expected reward of showing a in state s is therefore exact:
``R(s, a) = p_click (1 + c + (1 - c) f + c b)`` with c, f, b the three funnel
probabilities (``E[deepest reward | click] = 1 (1-c)(1-f) + 2 (1-c) f + 2 c (1-b) + 3 c b``).

The long-term effects are the satiety (consuming similar items lowers their click
probability for a few steps), the quit rule (an unsatisfying step — ignored, or a click on
a poorly matched, e.g. merely popular, item — raises the chance the session ends) and the
drift of tastes.  None of them enters ``R(s, a)`` beyond the current state, so a policy
that maximises ``R`` step by step is myopic, not optimal.

Randomness: the world's latent parameters (items, users) come from ``WorldConfig.seed``;
the outcomes of a simulation from the simulation's seed.  User ``n`` (raw id ``u{n}``) has
the same initial taste in every simulation, and item ``j`` (raw id ``i{j}``) is item index
j of the world, so a logged event maps back to the world's user and item by its raw ids and
a user's state is reconstructed by replaying their logged events (:func:`replay_states`).
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from recloop.config import check, config_to_dict
from recloop.errors import DataError
from recloop.registry import Registry

USER_PREFIX = "u"
ITEM_PREFIX = "i"
RESPONSES = ("none", "pv", "cart", "fav", "buy")
"""Response codes 0..4 written to the ``response`` column: the step's deepest behaviour."""


@dataclass(frozen=True, kw_only=True)
class Mechanics:
    """The behaviour model every world shares: funnel, satiety, quit, drift, sessions."""

    cart_rate: float = 0.07
    """P(cart | click) at the satisfying match.  Alibaba's UserBehavior log (Tianchi 2017,
    100 M events) has 5.5 M carts per 89.7 M page views (6 %); industry add-to-cart rates
    are quoted at 5-10 % of product views."""
    fav_rate: float = 0.03
    """P(fav | click, no cart) at the satisfying match; UserBehavior: 2.9 M favs per 89.7 M
    page views (3 %)."""
    buy_rate: float = 0.35
    """P(buy | cart); Baymard Institute's average documented cart abandonment is about 70 %,
    UserBehavior has 2.0 M buys per 5.5 M carts (36 %)."""
    match_slope: float = 1.0
    """How much a better match deepens the funnel: the cart and fav logits move by
    ``match_slope * (match - satisfied_match)``; 0 makes the funnel rates constant."""
    reward_pv: float = 1.0
    """Reward of a click (page view) that goes no deeper (recloop's default pv reward)."""
    reward_cart: float = 2.0
    """Reward of a cart (not bought)."""
    reward_fav: float = 2.0
    """Reward of a favourite."""
    reward_buy: float = 3.0
    """Reward of a purchase."""
    boredom: float = 2.0
    """Satiety penalty on the click logit per unit of ``relu(unit(e_a) . S)``; 0 = none."""
    boredom_decay: float = 0.75
    """Per-step decay of the satiety vector (recovery); memory of about 1/(1-decay) steps."""
    drift: float = 0.03
    """Step of the taste towards each consumed item's direction; 0 = fixed tastes."""
    satisfied_match: float = 2.0
    """A click satisfies when the match ``taste . e_a`` is at least this."""
    quit_base: float = 0.03
    """Per-step quit probability after a satisfying step."""
    quit_per_miss: float = 0.15
    """Added quit probability per unsatisfying step since the last satisfying one."""
    sessions: int = 3
    """Sessions per user."""
    horizon: int = 20
    """Most steps per session (a session also ends when the user quits)."""
    step_seconds: int = 60
    """Seconds between two steps of a session in the written timestamps."""
    session_gap_seconds: int = 86_400
    """Seconds between session starts; more than prepare's 1 h session gap plus a session."""

    def __post_init__(self) -> None:
        for name in ("cart_rate", "fav_rate", "buy_rate", "boredom_decay"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"mechanics.{name} must lie in [0, 1], got {v}")
        for name in ("boredom", "drift", "quit_base", "quit_per_miss"):
            v = getattr(self, name)
            check(v >= 0.0, f"mechanics.{name} must be >= 0, got {v}")
        check(self.drift <= 1.0, f"mechanics.drift must be <= 1, got {self.drift}")
        check(self.sessions >= 1, f"mechanics.sessions must be >= 1, got {self.sessions}")
        check(self.horizon >= 1, f"mechanics.horizon must be >= 1, got {self.horizon}")
        check(self.step_seconds >= 1, "mechanics.step_seconds must be >= 1")
        check(
            self.session_gap_seconds > self.horizon * self.step_seconds + 3600,
            "mechanics.session_gap_seconds must exceed a session plus prepare's 1 h gap, got "
            f"{self.session_gap_seconds}",
        )

    def deep_reward(self, c: np.ndarray, f: np.ndarray) -> np.ndarray:
        """E[reward | click] from P(cart | click) ``c`` and P(fav | click, no cart) ``f``."""
        b = self.buy_rate
        return (
            self.reward_pv * (1 - c) * (1 - f)
            + self.reward_fav * (1 - c) * f
            + self.reward_cart * c * (1 - b)
            + self.reward_buy * c * b
        )


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True, kw_only=True, eq=False)
class WorldParams:
    """The latent item side of a world and its calibration (float64 throughout)."""

    item_emb: np.ndarray  # (N + 1, D) item embeddings e_a, row 0 (padding) zeros
    item_unit: np.ndarray  # (N + 1, D) unit(e_a), row 0 zeros
    item_bias: np.ndarray  # (N + 1,) popularity effect on the click logit, row 0 -inf
    popularity: np.ndarray  # (N + 1,) the world's popularity weights (sum 1), row 0 zero
    offset: float
    """Constant of the click logit."""

    @property
    def n_items(self) -> int:
        return int(self.item_emb.shape[0] - 1)

    @property
    def dim(self) -> int:
        return int(self.item_emb.shape[1])


@dataclass(kw_only=True, eq=False)
class UserState:
    """Mutable state of B users; see the module docstring."""

    user: np.ndarray  # (B,) int64 user numbers (raw id u{n})
    taste: np.ndarray  # (B, D) float64
    satiety: np.ndarray  # (B, D) float64
    misses: np.ndarray  # (B,) int64

    def copy(self) -> UserState:
        return UserState(
            user=self.user.copy(),
            taste=self.taste.copy(),
            satiety=self.satiety.copy(),
            misses=self.misses.copy(),
        )


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What happened at one step for B users."""

    response: np.ndarray  # (B,) int8 code in RESPONSES (0 ignored)
    reward: np.ndarray  # (B,) float64
    satisfied: np.ndarray  # (B,) bool
    quit: np.ndarray  # (B,) bool, the user ends the session after this step


class World(ABC):
    """A ground-truth world: latent items and users plus :class:`Mechanics`.

    Subclasses build :attr:`params` and define :meth:`initial_taste`; everything else —
    the exact click and reward probabilities, the step, the replay of logged events — is
    shared here and is a pure function of (params, mechanics, state, action).
    """

    name: str = ""
    version: str = ""
    config_cls: type[Any] = object

    @classmethod
    @abstractmethod
    def create(cls, config: Any) -> World:
        """Build the world from its config (fitting or loading from the cache if need be)."""

    def __init__(self, config: Any, params: WorldParams, mechanics: Mechanics) -> None:
        self.config = config
        self.params = params
        self.mech = mechanics

    # --- identity -------------------------------------------------------------------

    @property
    def n_items(self) -> int:
        return self.params.n_items

    def describe(self) -> dict[str, Any]:
        """Name, version, config and its hash: what every output records."""
        conf = config_to_dict(self.config)
        return {
            "world": self.name,
            "version": self.version,
            "config": conf,
            "config_hash": config_hash(self.name, self.version, conf),
        }

    @abstractmethod
    def initial_taste(self, user: np.ndarray) -> np.ndarray:
        """(B, D) float64 initial taste of user numbers ``user`` (B,); a pure function of
        the world config and the user number."""

    def initial_state(self, user: np.ndarray) -> UserState:
        user = np.asarray(user, np.int64)
        b, d = user.shape[0], self.params.dim
        return UserState(
            user=user.copy(),
            taste=self.initial_taste(user),
            satiety=np.zeros((b, d)),
            misses=np.zeros(b, np.int64),
        )

    # --- exact quantities -----------------------------------------------------------

    def _terms(
        self, taste: np.ndarray, satiety: np.ndarray, items: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Click logit and match of items (B,) or (B, K) for users (B, D); same shapes."""
        p = self.params
        if items.ndim == 1:
            e, u = p.item_emb[items], p.item_unit[items]  # (B, D)
            match = np.einsum("bd,bd->b", taste, e)
            sat = np.einsum("bd,bd->b", satiety, u)
        else:
            e, u = p.item_emb[items], p.item_unit[items]  # (B, K, D)
            match = np.einsum("bd,bkd->bk", taste, e)
            sat = np.einsum("bd,bkd->bk", satiety, u)
        logit = p.offset + match + p.item_bias[items] - self.mech.boredom * np.maximum(sat, 0.0)
        return logit, match

    def _all_terms(self, taste: np.ndarray, satiety: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Click logit and match of every item (B, N + 1); column 0 has logit -inf."""
        p = self.params
        match = taste @ p.item_emb.T
        sat = satiety @ p.item_unit.T
        logit = p.offset + match + p.item_bias[None, :] - self.mech.boredom * np.maximum(sat, 0)
        return logit, match

    def funnel(self, match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P(cart | click), P(fav | click, no cart)) for matches of any shape."""
        m = self.mech
        shift = m.match_slope * (match - m.satisfied_match)
        c = np.where(m.cart_rate > 0, sigmoid(_logit(m.cart_rate) + shift), 0.0)
        f = np.where(m.fav_rate > 0, sigmoid(_logit(m.fav_rate) + shift), 0.0)
        return c, f

    def click_prob(self, state: UserState, items: np.ndarray) -> np.ndarray:
        """Exact P(click) of showing ``items`` (B,) or (B, K) to the users of ``state``."""
        logit, _ = self._terms(state.taste, state.satiety, items)
        return sigmoid(logit)

    def expected_reward(self, state: UserState, items: np.ndarray) -> np.ndarray:
        """Exact E[reward] of showing ``items`` (B,) or (B, K); item 0 (padding) gets 0."""
        logit, match = self._terms(state.taste, state.satiety, items)
        c, f = self.funnel(match)
        return np.where(items > 0, sigmoid(logit) * self.mech.deep_reward(c, f), 0.0)

    def expected_reward_all(self, taste: np.ndarray, satiety: np.ndarray) -> np.ndarray:
        """Exact E[reward] of every item (B, N + 1) for users (B, D); column 0 is 0."""
        logit, match = self._all_terms(taste, satiety)
        c, f = self.funnel(match)
        out = sigmoid(logit) * self.mech.deep_reward(c, f)
        out[:, 0] = 0.0
        return out

    def satisfy_prob_all(self, taste: np.ndarray, satiety: np.ndarray) -> np.ndarray:
        """Exact P(the step satisfies) of every item (B, N + 1): P(click) [match >= m0]."""
        logit, match = self._all_terms(taste, satiety)
        out = sigmoid(logit) * (match >= self.mech.satisfied_match)
        out[:, 0] = 0.0
        return np.asarray(out)

    # --- dynamics -------------------------------------------------------------------

    def start_session(self, state: UserState, rows: np.ndarray | None = None) -> None:
        """Clear satiety and misses (a new session), for all users or ``rows``."""
        if rows is None:
            state.satiety[:] = 0.0
            state.misses[:] = 0
        else:
            state.satiety[rows] = 0.0
            state.misses[rows] = 0

    def transition(self, state: UserState, items: np.ndarray, clicked: np.ndarray) -> np.ndarray:
        """Update ``state`` in place after showing ``items`` (B,) with outcome ``clicked``
        (B,) bool; returns ``satisfied`` (B,).  Deterministic: replaying logged clicks
        reproduces the state exactly."""
        p, m = self.params, self.mech
        match = np.einsum("bd,bd->b", state.taste, p.item_emb[items])
        satisfied = clicked & (match >= m.satisfied_match)
        unit = p.item_unit[items] * clicked[:, None]
        state.satiety *= m.boredom_decay
        state.satiety += unit
        if m.drift > 0:
            norm = np.linalg.norm(state.taste, axis=1, keepdims=True)
            new = (1 - m.drift) * state.taste + m.drift * norm * p.item_unit[items]
            state.taste = np.where(clicked[:, None], new, state.taste)
        state.misses = np.where(satisfied, 0, state.misses + 1)
        return satisfied

    def quit_prob(self, misses: np.ndarray) -> np.ndarray:
        """P(quit after a step) given the misses after it."""
        return np.minimum(1.0, self.mech.quit_base + self.mech.quit_per_miss * misses)

    def step(self, state: UserState, items: np.ndarray, uniforms: np.ndarray) -> StepOutcome:
        """Show ``items`` (B,) and sample the outcomes from ``uniforms`` (5, B) in [0, 1):
        click, cart, fav, buy, quit.  Updates ``state`` in place."""
        logit, match = self._terms(state.taste, state.satiety, items)
        clicked = (uniforms[0] < sigmoid(logit)) & (items > 0)
        c, f = self.funnel(match)
        cart = clicked & (uniforms[1] < c)
        fav = clicked & ~cart & (uniforms[2] < f)
        buy = cart & (uniforms[3] < self.mech.buy_rate)
        response = np.where(
            buy, 4, np.where(cart, 2, np.where(fav, 3, np.where(clicked, 1, 0)))
        ).astype(np.int8)
        m = self.mech
        table = np.array([0.0, m.reward_pv, m.reward_cart, m.reward_fav, m.reward_buy])
        satisfied = self.transition(state, items, clicked)
        quit_ = uniforms[4] < self.quit_prob(state.misses)
        return StepOutcome(
            response=response, reward=table[response], satisfied=satisfied, quit=quit_
        )


WORLDS: Registry[type[World]] = Registry("world")
"""World name → World class (its ``config_cls`` and ``create``)."""


def config_hash(name: str, version: str, conf: dict[str, Any]) -> str:
    blob = json.dumps({"world": name, "version": version, "config": conf}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_ids(raw: np.ndarray | list[str], prefix: str, *, what: str) -> np.ndarray:
    """(E,) int64 numbers of raw ids like ``u17``; a foreign id is a :class:`DataError`."""
    arr = np.asarray(raw).astype(str)
    if arr.shape[0] == 0:
        return np.zeros(0, np.int64)
    ok = np.char.startswith(arr, prefix)
    tail = np.char.lstrip(np.char.replace(arr, prefix, "", count=1), "0123456789")
    bad = np.flatnonzero(~ok | (tail != "") | (np.char.str_len(arr) <= len(prefix)))
    if bad.shape[0]:
        raise DataError(
            f"{what} id {arr[bad[0]]!r} is not a world id ({prefix}<number>); the data does "
            f"not come from `recloop world generate` ({bad.shape[0]} such ids)"
        )
    return np.char.replace(arr, prefix, "", count=1).astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class ReplayedStates:
    """The world state before each of E logged events (rows of the input, in order)."""

    taste: np.ndarray  # (E, D)
    satiety: np.ndarray  # (E, D)
    user: np.ndarray  # (E,) int64 user numbers


def replay_states(
    world: World,
    *,
    user: np.ndarray,
    item: np.ndarray,
    clicked: np.ndarray,
    new_session: np.ndarray,
) -> ReplayedStates:
    """Reconstruct the state before every logged event by replaying the log.

    ``user`` (E,) user numbers, ``item`` (E,) world item indices, ``clicked`` (E,) bool
    (reward > 0), ``new_session`` (E,) bool (first event of a session); events grouped by
    user in time order.  Vectorised over users: one transition per position in the
    longest history.
    """
    e = user.shape[0]
    if e == 0:
        d = world.params.dim
        return ReplayedStates(taste=np.zeros((0, d)), satiety=np.zeros((0, d)), user=user)
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    lengths = np.diff(np.r_[starts, e])
    if np.unique(user[starts]).shape[0] != starts.shape[0]:
        raise DataError("replay_states: events must be grouped by user")
    pos = np.arange(e) - np.repeat(starts, lengths)  # position within the user's block
    state = world.initial_state(user[starts])
    d = world.params.dim
    taste_out, sat_out = np.empty((e, d)), np.empty((e, d))
    for t in range(int(lengths.max())):
        rows = np.flatnonzero(lengths > t)
        ev = starts[rows] + t
        sub = UserState(
            user=state.user[rows],
            taste=state.taste[rows],
            satiety=state.satiety[rows],
            misses=state.misses[rows],
        )
        fresh = new_session[ev]
        if fresh.any():
            world.start_session(sub, np.flatnonzero(fresh))
        taste_out[ev], sat_out[ev] = sub.taste, sub.satiety
        world.transition(sub, item[ev], clicked[ev])
        state.taste[rows], state.satiety[rows], state.misses[rows] = (
            sub.taste,
            sub.satiety,
            sub.misses,
        )
    del pos
    return ReplayedStates(taste=taste_out, satiety=sat_out, user=user.copy())


# --- building worlds and reading world.json -------------------------------------------


def build_world(name: str, overrides: list[str] | tuple[str, ...] = ()) -> World:
    """The registered world ``name`` with ``--set``-style config overrides."""
    from recloop.config import load_config

    cls = WORLDS.get(name)
    return cls.create(load_config(cls.config_cls, overrides=list(overrides)))


WORLD_JSON = "world.json"
"""The description ``recloop world generate`` writes beside events.csv."""


def read_world_json(directory: Any) -> dict[str, Any]:
    from pathlib import Path

    path = Path(directory) / WORLD_JSON
    if not path.is_file():
        raise DataError(f"{path}: not found; pass the directory `recloop world generate` wrote")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def world_from_json(data: dict[str, Any], *, source: str = WORLD_JSON) -> World:
    """Rebuild the world a generated log came from; its version must be this code's."""
    from recloop.config import config_from_dict

    cls = WORLDS.get(str(data.get("world")))
    if data.get("version") != cls.version:
        raise DataError(
            f'{source}: field "version" is {data.get("version")!r} but this recloop\'s '
            f"{cls.name} world is {cls.version!r}; regenerate the log"
        )
    return cls.create(config_from_dict(cls.config_cls, data.get("config", {}), source=source))
