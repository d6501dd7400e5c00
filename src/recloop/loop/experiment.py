"""``recloop experiment``: closed loops side by side in a ground-truth world.

Each *arm* is a complete deployment of its own: an artifact registry, a SQLite behaviour
log, an in-process event bus (``memory://exp-<arm>``), the real FastAPI app (driven through
an in-process ASGI client, its lifespan running: the served-list logger and the registry
follower are live), the real stream processor and the real :class:`LoopController`.  One
round, for every arm in turn::

    users     U fresh simulated users of the world, each for the world's sessions: at
              every step a batch of POST /v1/recommend/batch requests (n = 1, the user's
              shown items as recent_items with the rewards they earned ({item, reward}),
              exclude_consumed, a seed per request), the world's exact response model
              answers (world.step), the clicks become events (behaviour, reward,
              recommendation_id) published onto the arm's bus; the service publishes every
              served list onto the same bus itself.  Event time is simulated
              (:class:`SimClock`: a step is the world's step_seconds, sessions are its
              session gap apart), so each session's order and boundaries survive prepare.
              A user with no history is answered by the arm's policy from the model's
              empty state (the service's ``cold_start: policy``), not a fixed popular list
    stream    the stream processor drains the bus into the log (behaviour log, served
              items, feedback links, attribution); when the round's users have all left
              the experiment closes their impressions (BehaviorLog.settle), as the
              processor does once the event-time watermark passes them
    loop      LoopController.run_once() -- what ``recloop loop --once`` runs -- on the
              arm's served-items table (source: impressions, logged propensities):
              prepare, warm-started training (RL arms on every impression, popularity and
              supervised arms on the rewarded ones: ``train_targets``), the gate, publish,
              promote
    truth     the candidate and the model that was current are rolled out in the world
              on the same fresh users with the same random numbers (``recloop world
              evaluate``'s roll-out): the gate's decision is checked against the truth
    swap      when promoted, the service's registry follower hot-swaps; the experiment
              waits until the service names the new model version

Reward per round is the **true** reward the round's users got from the world (the sum of
their step rewards per session; 95 % normal interval over users).  Users and random
numbers are common to the arms (users ``u{BASE + round * U + i}``, the world's uniforms
and each request's seed derived from (seed, round, user, session, step)), so arms are
compared on the same people with the same luck, user by user against a baseline arm
(:func:`paired`).

Round 1 of every arm is served by the same bootstrap model: ``popularity`` counts of the
clicks of a log generated in the world by its ``bootstrap`` policy (``bootstrap_users``
users).  The random arm serves that model with epsilon 1 (a uniform choice among the
unshown items) and runs no loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from recloop.artifacts.bundle import load_artifact
from recloop.artifacts.registry import ArtifactRegistry
from recloop.config import check, set_dotted
from recloop.errors import ConfigError, RecloopError
from recloop.evaluation.ope import OUTCOMES, OPEConfig
from recloop.evaluation.worlds.base import ITEM_PREFIX, RESPONSES, USER_PREFIX, UserState, World
from recloop.evaluation.worlds.rollout import (
    Estimate,
    Policy,
    Selection,
    make_policy,
    simulate,
    t_interval,
)
from recloop.loop.config import LoopConfig
from recloop.loop.controller import ROUNDS, LoopController, LoopError, exclusive_lock

logger = logging.getLogger(__name__)

USER_BASE = 500_000_000
"""First user number of the experiment's users (a generated bootstrap log uses 0..U-1,
``world evaluate`` 10^9 and up)."""
TRUTH_USER_BASE = 1_500_000_000
"""First user number of the gate-truth roll-outs (fresh, the same for every round)."""
RANDOM = "random"
START_TS = 1_700_000_000
"""Event time (unix seconds) of the experiment's first step on its simulated clock."""


class SimClock:
    """The experiment's event time, shared by an arm's service (it stamps the served lists)
    and its users (they stamp their clicks).

    Step t of session s of round r happens at ``START_TS + ((r - 1) * S + s) * gap + t *
    step`` with the world's ``step_seconds`` and ``session_gap_seconds`` (what ``recloop
    world generate`` writes): every user's events are strictly increasing in time, step by
    step, so a session's order survives ``prepare --from-db`` (one impression per user and
    second), and the world's sessions are further apart than prepare's session gap, so each
    stays a session of its own.  A round's users share the clock: they act in parallel."""

    def __init__(self, world: World, start: int = START_TS) -> None:
        m = world.mech
        self.start = start
        self.sessions = m.sessions
        self.step_s = m.step_seconds
        self.gap_s = m.session_gap_seconds
        self.now = start

    def __call__(self) -> float:
        return float(self.now)

    def at(self, round_no: int, session: int, step: int) -> int:
        """Event time of (round, session, step); also moves the clock there."""
        self.now = (
            self.start
            + ((round_no - 1) * self.sessions + session) * self.gap_s
            + step * self.step_s
        )
        return self.now


def check_serving(*, policy: Any, epsilon: Any, temperature: Any, where: str = "") -> None:
    """The serving settings of the experiment (``where`` ""), or of one arm: ``policy``
    epsilon or softmax, ε in [0, 1], T in [MIN_TEMPERATURE, 1e6]; ConfigError otherwise."""
    from recloop.artifacts.manifest import MIN_TEMPERATURE

    def number(x: Any) -> bool:
        return isinstance(x, int | float) and not isinstance(x, bool)

    check(
        policy in ("epsilon", "softmax"),
        f"{where}policy must be epsilon or softmax, got {policy!r}",
    )
    check(
        number(epsilon) and 0 <= epsilon <= 1,
        f"{where}epsilon must be in [0, 1], got {epsilon!r}",
    )
    check(
        number(temperature) and MIN_TEMPERATURE <= temperature <= 1e6,
        f"{where}temperature must be in [{MIN_TEMPERATURE:g}, 1e6], got {temperature!r}",
    )


@dataclass(frozen=True, kw_only=True)
class ArmSpec:
    """One closed loop: what it trains and how it serves."""

    name: str
    """Label in the reports (``rl-reinforce``, ``supervised-sasrec``, ...)."""
    algo: str | None
    """Algorithm the arm's loop trains each round; None: no loop (the random arm)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Training config fields of the round (``behaviour: logged`` ...)."""
    policy: str = "epsilon"
    """Serving policy of the arm: ``epsilon`` (ε-greedy) or ``softmax`` (Plackett–Luce)."""
    epsilon: float = 0.1
    """ε of the epsilon policy (1 = uniform)."""
    temperature: float = 1.0
    """T of the softmax policy."""
    train_targets: str = "all"
    """The loop's ``train_targets``: ``all`` impressions (RL arms: every shown item with its
    reward, 0 when ignored, and its logged propensity) or ``rewarded`` ones only
    (popularity and supervised arms: trained on every impression they would count or
    imitate what the serving model chose, ignored items included)."""

    def __post_init__(self) -> None:
        check_serving(
            policy=self.policy,
            epsilon=self.epsilon,
            temperature=self.temperature,
            where=f"--arms: {self.name}: serve.",
        )

    def selection(self) -> Selection:
        """The same policy in the world's roll-outs (n = 1: one item per step)."""
        if self.policy == "softmax":
            return Selection(kind="softmax", temperature=self.temperature, top_k=None)
        return Selection(kind="epsilon", epsilon=self.epsilon)


DEFAULT_ARMS = "reinforce:behaviour=logged,cql,sasrec,popularity,random"
"""REINFORCE with the logged propensities, the best other RL algorithm of docs/worlds.md's
shop table (CQL), the best supervised sequence model there (SASRec), popularity, random."""

_KIND = {
    "reinforce": "rl",
    "cql": "rl",
    "sqn": "rl",
    "sa2c": "rl",
    "sac": "rl",
    "bcq": "rl",
    "ddpg": "rl",
    "td3": "rl",
    "supervised": "supervised",
    "sasrec": "supervised",
    "gru4rec": "supervised",
}


def _scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


SERVING_FIELDS = ("policy", "epsilon", "temperature")
"""What an arm may set for its own serving (``serve.<field>=value`` in ``--arms``)."""


def _serving_field(key: str, token: str) -> str:
    name = key.removeprefix("serve.")
    if name not in SERVING_FIELDS:
        raise ConfigError(
            f"--arms: {key!r} in {token!r}: an arm's serving fields are "
            + ", ".join(f"serve.{f}" for f in SERVING_FIELDS)
        )
    return name


def _check_training(algo: str, train: dict[str, Any], token: str) -> None:
    """Refuse an arm whose training fields would not make a run config, before any round
    runs: a typo would otherwise fail every round's training and leave the arm serving its
    bootstrap model."""
    from recloop.training.runconfig import load_run_config

    try:
        load_run_config(algo, values=train)
    except ConfigError as exc:
        raise ConfigError(f"--arms: {token!r}: {exc}") from None


def parse_arms(
    spec: str, *, epsilon: float, policy: str = "epsilon", temperature: float = 1.0
) -> list[ArmSpec]:
    """``algo[:field=value[:field=value]]`` separated by commas; ``random`` is the arm
    without a loop.  A field is a training setting (dotted for a nested one:
    ``encoder.use_user=false``, ``fit.epochs=4``), or with ``serve.`` the arm's own serving
    ``policy``, ``epsilon`` or ``temperature`` (``reinforce:serve.epsilon=0.3``: that loop
    explores more than the others).  Names: ``rl-…``, ``supervised-…``, ``popularity``,
    ``random``."""
    arms: list[ArmSpec] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        algo, *fields = token.split(":")
        if algo == RANDOM:
            arms.append(ArmSpec(name=RANDOM, algo=None, epsilon=1.0))
            continue
        from recloop.algos import ALGOS

        if algo not in ALGOS.names():
            raise ConfigError(f"--arms: unknown algorithm {algo!r} in {token!r}")
        train: dict[str, Any] = {}
        serve: dict[str, Any] = {"policy": policy, "epsilon": epsilon, "temperature": temperature}
        seen: set[str] = set()
        for f in fields:
            key, eq, value = f.partition("=")
            key = key.strip()
            if not eq:
                raise ConfigError(f"--arms: {f!r} in {token!r} is not field=value")
            if not all(key.split(".")):
                raise ConfigError(f"--arms: {f!r} in {token!r} has an empty field name")
            if key in seen:
                raise ConfigError(f"--arms: {key!r} is set twice in {token!r}")
            if key == "seed":
                raise ConfigError(
                    f"--arms: {token!r} sets seed: every arm trains with the experiment's "
                    "--seed (the arms are compared on the same users and luck)"
                )
            seen.add(key)
            if key.startswith("serve."):
                serve[_serving_field(key, token)] = _scalar(value)
                continue
            # a dotted key sets a nested field: encoder.use_user=false, fit.epochs=4
            set_dotted(train, key, _scalar(value), where=f"--arms {token!r}")
        _check_training(algo, train, token)
        kind = _KIND.get(algo)
        name = algo if kind is None else f"{kind}-{algo}"
        if fields:
            name += "(" + ",".join(fields) + ")"
        arms.append(
            ArmSpec(
                name=name,
                algo=algo,
                train=train,
                policy=serve["policy"],
                epsilon=serve["epsilon"],
                temperature=serve["temperature"],
                train_targets="all" if kind == "rl" else "rewarded",
            )
        )
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or not arms:
        raise ConfigError(f"--arms: give distinct arms, got {names}")
    return arms


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Sizes and settings of ``recloop experiment``."""

    world: str = "shop"
    """Registered world (``recloop world``)."""
    world_overrides: tuple[str, ...] = ()
    """``--set`` overrides of the world's config."""
    rounds: int = 5
    """Rounds of serve → stream → loop."""
    users: int = 150
    """Fresh simulated users per round and arm (each for the world's sessions)."""
    bootstrap_users: int = 300
    """Users of the world-generated log the shared first model is trained on."""
    truth_users: int = 400
    """Users of each gate-truth roll-out (candidate and current, paired)."""
    epochs: int = 2
    """Training epochs of each round's candidate."""
    policy: str = "epsilon"
    """Serving policy of the learning arms: ``epsilon`` or ``softmax``."""
    epsilon: float = 0.1
    """ε of the epsilon serving policy."""
    temperature: float = 1.0
    """T of the softmax serving policy."""
    history_source: str = "request"
    """Where each arm's service reads a user's recent items: ``request`` (the users send
    every item they were shown, with the reward it earned, 0 when ignored) or ``store``
    (they send none: the service reads the arm's online store, a SQLite file, which the
    stream processor fills with the users' behaviour events, i.e. their clicks; it excludes
    those only, so an ignored item may be shown again).  The truth roll-outs feed each
    model the same (:func:`recloop.evaluation.worlds.rollout.simulate`'s ``feedback``)."""
    bootstrap: str = "random"
    """World policy whose log trains the shared first model (``popularity`` counts of that
    log): ``random`` (uniform: a cold start that knows next to nothing) or ``popularity``
    (the world's popularity, ε 0.3: a strong start, near the world's best simple policy)."""
    margin: float = 0.0
    """The loop's gate margin; the truth check flags a promotion whose true return is
    worse than the current model's by more than this (return per session)."""
    gate: str = "both"
    """What the loops' gates decide on once a model is current: ``both`` (the ranking
    metric on the holdout's rewarded impressions and the paired DR difference on the logged
    propensities, as ``recloop loop`` does by default), ``ope`` (DR alone) or ``metric``
    (the metric alone).  In a closed loop the metric favours the model that chose what was
    shown, and DR alone promoted candidates that were truly far worse
    (docs/experiment.md)."""
    canary: float = 0.0
    """With a share in (0, 1), a candidate that passes a loop's gate becomes the registry's
    canary for that share of the arm's users, and the next round promotes or stops it on
    their behaviour (``recloop loop``'s ``canary_share``); 0 = promote at the gate."""
    canary_min_users: int = 30
    """Users each side of a canary needs before it is judged (the loops' ``canary_min_users``:
    until then the next rounds wait, training nothing)."""
    gate_trusted: bool = True
    """The loops' gates act only on OPE estimates their reports do not warn about
    (``recloop loop``'s ``ope_require_trusted``); False: the warnings are only logged."""
    gate_min_ess: float = 30.0
    """Smallest effective sample size of an OPE estimate the loops' gates act on
    (``recloop loop``'s ``ope_min_ess``); 0 = no minimum."""
    gate_mean_weight: tuple[float, float] = (0.5, 2.0)
    """Bounds of the mean unclipped importance weight of an estimate the loops' gates act on
    (their ``ope.mean_weight_bounds``): below the low one, that share of the model's
    choices was never shown in the log, and its estimate rests on the reward model there."""
    gate_bound_bias: bool = True
    """The loops' gates also need the OPE difference's outer low end (what the clipped
    weights cannot weigh valued pessimistically) to clear the margin (``recloop loop``'s
    ``ope_bound_bias``)."""
    gate_target: str = "served"
    """The policy the gates' OPE scores each model as (``ope.target`` of the loops):
    ``served`` (as the arm's service serves it, with the log's exploration settings: the
    policy the truth rolls out) or ``uniform_topk`` (one of its top 10 uniformly, the
    default until 2026-12-06: no estimate was trusted, and nothing was promoted)."""
    gate_outcome: str = "reward"
    """The outcome the gates' DR estimates per logged impression (``ope.outcome`` of the
    loops): its ``reward``, or the discounted ``return`` to the end of its session (what the
    impression did to the rest of the session, under the logging policy)."""
    seed: int = 0
    """Seed of the users' random numbers, request seeds and training."""
    baseline: str | None = None
    """Arm every other arm is compared with, per user (paired differences and ratios in the
    JSON and CSV); None: the first supervised arm, else ``random``, else the first arm."""

    def __post_init__(self) -> None:
        check(self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}")
        check(
            self.history_source in ("request", "store"),
            f"history_source must be request or store, got {self.history_source!r}",
        )
        check(self.users >= 2, f"users must be >= 2, got {self.users}")
        check(
            self.bootstrap_users >= 2, f"bootstrap_users must be >= 2, got {self.bootstrap_users}"
        )
        check(self.truth_users >= 0, f"truth_users must be >= 0, got {self.truth_users}")
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.margin >= 0, f"margin must be >= 0, got {self.margin}")
        check(
            self.gate in ("ope", "metric", "both"), f"gate: ope, metric or both, got {self.gate!r}"
        )
        check_serving(policy=self.policy, epsilon=self.epsilon, temperature=self.temperature)
        check(0.0 <= self.canary < 1.0, f"canary must lie in [0, 1), got {self.canary}")
        low, high = self.gate_mean_weight
        check(
            0.0 <= low <= 1.0 <= high,
            f"gate_mean_weight must satisfy 0 <= low <= 1 <= high, got {low}, {high}",
        )
        check(
            self.canary_min_users >= 2,
            f"canary_min_users must be >= 2, got {self.canary_min_users}",
        )
        check(
            self.gate_outcome in OUTCOMES,
            f"gate_outcome: {' or '.join(OUTCOMES)}, got {self.gate_outcome!r}",
        )
        check(
            self.gate_target in ("uniform_topk", "served"),
            f"gate_target: uniform_topk or served, got {self.gate_target!r}",
        )
        check(
            self.bootstrap in ("random", "popularity"),
            f"bootstrap: random or popularity, got {self.bootstrap!r}",
        )


@dataclass(frozen=True, kw_only=True)
class GateCheck:
    """The gate's decision of one round next to the truth."""

    decision: str
    """promote / reject (the gate's, or a canary's verdict), canary (passed the gate and
    started as the canary: not a final decision), or the loop's failure."""
    reason: str
    """The gate's one line."""
    candidate: str | None
    """Candidate model version."""
    current: str | None
    """Version that was current (what the candidate was gated against)."""
    true_candidate: Estimate | None
    """True return per session of the candidate (roll-outs, ε-greedy as served)."""
    true_current: Estimate | None
    """Same users and random numbers: the current model."""
    true_diff: Estimate | None
    """Paired candidate − current, per user."""
    violation: bool
    """Promoted although truly worse by more than the margin (the whole interval of the
    paired difference below −margin)."""
    worse_point: bool
    """Promoted and the point estimate of the difference is below −margin (a weaker flag:
    the interval may still cover −margin)."""
    ope_untrusted: bool = False
    """The gate's OPE check failed on estimates with warnings (``ope_require_trusted``):
    the log could not evaluate the candidate, whatever its interval said."""
    ope_diff: Estimate | None = None
    """The gate's paired OPE difference, candidate − current, per impression (its
    estimator's bootstrap interval; None without OPE)."""
    ope_diffs: dict[str, Estimate] = field(default_factory=dict)
    """The paired differences of every estimator of the gate's report (``ope_diff`` is
    the gating one's)."""
    one_step_diff: float | None = None
    """The exact value of what that difference estimates with ``--gate-outcome reward``:
    the mean over the same impressions of ``V_cand(s) − V_cur(s)`` at their logged states
    (:func:`one_step_difference`).  Against ``ope_diff`` it tells an estimation error;
    against ``true_diff`` a one-step value that is not the session's."""
    on_candidate_states: Estimate | None = None
    """The candidate's one-step advantage per session over the current model in the
    states of its own truth roll-out (:attr:`TruthCheck.on_candidate_states`)."""
    on_current_states: Estimate | None = None
    """The same in the current model's roll-out: when it has the sign of ``one_step_diff``
    and the other one that of ``true_diff``, the gate's estimate was right about the
    states it read and the candidate leads users elsewhere."""
    outer_low: float | None = None
    """The low end of the gate's outer difference (what the clipped weights cannot weigh
    valued at the worst outcome for the candidate and the best for the current model:
    :func:`recloop.evaluation.ope.outer_difference`), whether or not it gated (None
    without OPE)."""
    unweighed_mass: float | None = None
    """The candidate's share of probability the gate's clipped weights could not weigh
    (:func:`recloop.evaluation.ope.unweighed_mass`)."""


@dataclass(kw_only=True)
class ArmRound:
    """One arm in one round."""

    round: int
    arm: str
    algo: str
    reward: Estimate
    """True reward per session of the round's users (95 % interval over users)."""
    sessions: int
    steps: int
    clicks: int
    model_version: str
    """The model that served the round."""
    promoted: bool = False
    """Whether the loop after this round promoted a model (its candidate, or the canary)."""
    gate: GateCheck | None = None
    canary: GateCheck | None = None
    """The verdict on the canary that served part of this round's users (``--canary``);
    its truth is the one computed when the canary passed the gate."""
    loop_seconds: float = 0.0
    serve_seconds: float = 0.0
    per_user: np.ndarray | None = None
    """(U,) true reward per session of each of the round's users, in the round's user order
    (the same users in every arm): what the paired comparisons use."""


@dataclass(frozen=True, kw_only=True)
class Paired:
    """One arm against the baseline arm in one round, user by user."""

    baseline: str
    diff: Estimate
    """Mean over users of (arm − baseline) reward per session, 95 % interval."""
    ratio: float
    """Mean reward of the arm / mean reward of the baseline."""
    ratio_low: float
    ratio_high: float
    """95 % percentile bootstrap interval of the ratio, users resampled in pairs."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "diff": self.diff.to_dict(),
            "ratio": self.ratio,
            "ratio_interval": [self.ratio_low, self.ratio_high],
        }


def paired(
    arm: np.ndarray, base: np.ndarray, *, baseline: str, n_boot: int = 2000, seed: int = 0
) -> Paired:
    """Per-user paired difference and ratio of means of ``arm`` over ``base`` (both (U,),
    the same users in the same order)."""
    if arm.shape != base.shape:
        raise ValueError(f"paired arms differ in users: {arm.shape} vs {base.shape}")
    n = arm.shape[0]
    ratio = float(arm.mean() / base.mean()) if base.mean() > 0 else math.inf
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    num, den = arm[idx].mean(1), base[idx].mean(1)
    boot = np.divide(num, den, out=np.full(n_boot, np.inf), where=den > 0)
    lo, hi = np.quantile(boot, [0.025, 0.975]) if n > 1 else (ratio, ratio)
    return Paired(
        baseline=baseline,
        diff=t_interval(arm - base),
        ratio=ratio,
        ratio_low=float(lo),
        ratio_high=float(hi),
    )


def baseline_arm(baseline: str | None, arms: Sequence[ArmSpec]) -> str:
    """The arm the others are compared with: ``baseline`` (:attr:`ExperimentConfig.baseline`,
    which must name an arm), else the first supervised arm, else ``random``, else the first."""
    names = [a.name for a in arms]
    if baseline is not None:
        if baseline not in names:
            raise ConfigError(f"baseline {baseline!r} is not an arm of {names}")
        return baseline
    sup = [n for n in names if n.startswith("supervised-")]
    return sup[0] if sup else RANDOM if RANDOM in names else names[0]


@dataclass(kw_only=True)
class ExperimentResult:
    config: ExperimentConfig
    arms: list[ArmSpec]
    rows: list[ArmRound]
    world: dict[str, Any]
    bootstrap_version: str
    seconds: float = 0.0

    def arm_rows(self, name: str) -> list[ArmRound]:
        return sorted((r for r in self.rows if r.arm == name), key=lambda r: r.round)

    def baseline(self) -> str:
        """The arm the others are compared with (:func:`baseline_arm`)."""
        return baseline_arm(self.config.baseline, self.arms)

    def paired(self) -> dict[tuple[int, str], Paired]:
        """(round, arm) → the arm against the baseline arm on the round's users."""
        base = self.baseline()
        of = {(r.round, r.arm): r for r in self.rows}
        out: dict[tuple[int, str], Paired] = {}
        for (rnd, arm), row in of.items():
            b = of.get((rnd, base))
            if arm == base or b is None or row.per_user is None or b.per_user is None:
                continue
            out[(rnd, arm)] = paired(row.per_user, b.per_user, baseline=base, seed=rnd)
        return out

    def to_dict(self) -> dict[str, Any]:
        arms = []
        pairs = self.paired()
        for a in self.arms:
            rows = self.arm_rows(a.name)
            vs = [pairs.get((r.round, a.name)) for r in rows]
            arms.append(
                {
                    "name": a.name,
                    "algo": a.algo or RANDOM,
                    "train_targets": a.train_targets if a.algo else None,
                    "reward_per_round": [r.reward.value for r in rows],
                    "interval_per_round": [[r.reward.low, r.reward.high] for r in rows],
                    "promoted_per_round": [r.promoted for r in rows],
                    "model_version_per_round": [r.model_version for r in rows],
                    "paired_vs_baseline_per_round": [
                        None if p is None else p.to_dict() for p in vs
                    ],
                }
            )
        checks = [
            {"round": r.round, "arm": r.arm, "stage": stage, **_gate_doc(g)}
            for r in self.rows
            for stage, g in (("canary", r.canary), ("gate", r.gate))
            if g is not None
        ]
        return {
            "world": self.world,
            "config": dataclasses.asdict(self.config),
            "bootstrap_version": self.bootstrap_version,
            "baseline": self.baseline(),
            "arms": arms,
            "gate_checks": checks,
            "gate_violations": sum(1 for c in checks if c["violation"]),
            "gate_summary": gate_summary(
                self.rows, ope_outcome=self.config.gate_outcome, margin=self.config.margin
            ),
            "seconds": round(self.seconds, 1),
        }


def gate_summary(
    rows: Sequence[ArmRound], *, ope_outcome: str = "reward", margin: float = 0.0
) -> dict[str, int]:
    """Gate decisions against the truth: how many promoted, promoted although truly worse
    (violations), rejected although truly better, rejected and truly worse (intervals of
    the paired true difference wholly above 0 / below 0), and rejected because the OPE
    estimates could not be trusted.

    And where the OPE went wrong, over the gate decisions with an OPE difference and its
    one-step truth (``one_step_checked``): ``ope_misses_one_step`` counts the OPE intervals
    that do not hold the exact one-step difference they estimate (an estimation error; with
    ``ope_outcome`` ``return`` the estimand is not the one-step value and this is not
    counted), ``one_step_contradicts_truth`` the decisions whose session truth is resolved
    (its interval excludes 0) and whose exact one-step difference has the other sign: there
    a perfect one-step estimate would mislead the gate; ``one_step_misses_<estimator>``
    count the misses of each estimator of the gate's report (IPS, SNIPS, DR).
    ``one_step_flips`` counts the gate decisions whose candidate's one-step advantage is
    resolved (interval excluding 0) with one sign in the current model's roll-out states
    and with the other in its own: there the states a model leads its users to decide.
    A gate decision that started a canary counts in these (it had OPE), not in
    ``decisions``.  ``outer_would_keep_out`` counts the promotions whose outer OPE low end
    (``outer_low``) is below ``-margin``: those that ``ope_bound_bias`` would have kept out
    (0 when it gated)."""
    gates = [
        g
        for r in rows
        for g in (r.canary, r.gate)
        if g is not None and g.decision in ("promote", "reject")
    ]
    promoted = [g for g in gates if g.decision == "promote"]
    rejected = [g for g in gates if g.decision == "reject" and g.true_diff is not None]
    with_ope = [
        r.gate
        for r in rows
        if r.gate is not None and r.gate.ope_diff is not None and r.gate.one_step_diff is not None
    ]

    def missed(iv: Estimate | None, one: float | None) -> bool:
        return iv is not None and one is not None and not iv.low <= one <= iv.high

    def opposite(a: Estimate | None, b: float | Estimate | None) -> bool:
        """``a`` resolved one way and ``b`` (a value, or a resolved interval) the other."""
        if a is None or b is None:
            return False
        lo, hi = (b, b) if isinstance(b, float) else (b.low, b.high)
        return (a.low > 0 and hi < 0) or (a.high < 0 and lo > 0)

    reward = ope_outcome == "reward"  # else the intervals do not estimate the one-step value
    return {
        "decisions": len(gates),
        "promoted": len(promoted),
        "violations": sum(g.violation for g in promoted),
        "truly_better_rejected": sum(g.true_diff.low > 0 for g in rejected if g.true_diff),
        "truly_worse_rejected": sum(g.true_diff.high < 0 for g in rejected if g.true_diff),
        "rejected_untrusted": sum(g.ope_untrusted for g in gates if g.decision == "reject"),
        "one_step_checked": len(with_ope),
        "ope_misses_one_step": reward * sum(missed(g.ope_diff, g.one_step_diff) for g in with_ope),
        **{
            f"one_step_misses_{name}": reward
            * sum(missed(g.ope_diffs.get(name), g.one_step_diff) for g in with_ope)
            for name in ("ips", "snips", "dr")
        },
        "one_step_contradicts_truth": sum(opposite(g.true_diff, g.one_step_diff) for g in with_ope),
        "one_step_flips": sum(
            opposite(r.gate.on_current_states, r.gate.on_candidate_states)
            for r in rows
            if r.gate is not None
        ),
        "outer_would_keep_out": sum(
            g.outer_low is not None and g.outer_low < -margin - 1e-9 for g in promoted
        ),
    }


def _est(e: Estimate | None) -> dict[str, float] | None:
    return None if e is None else e.to_dict()


def _gate_doc(g: GateCheck | None) -> dict[str, Any]:
    if g is None:
        return {}
    doc = dataclasses.asdict(g)
    for k in ("true_candidate", "true_current", "true_diff", "ope_diff", "on_candidate_states",
              "on_current_states"):  # fmt: skip
        doc[k] = _est(getattr(g, k))
    doc["ope_diffs"] = {name: e.to_dict() for name, e in g.ope_diffs.items()}
    return doc


CSV_FIELDS = (
    "round", "arm", "algo", "reward", "lo", "hi", "promoted", "model_version",
    "sessions", "steps", "clicks", "gate_decision", "candidate",
    "true_candidate", "true_current", "true_diff", "true_diff_lo", "true_diff_hi",
    "violation", "baseline", "diff_vs_baseline", "diff_lo", "diff_hi",
    "ratio_vs_baseline", "ratio_lo", "ratio_hi",
    "canary_decision", "canary_candidate", "canary_true_diff", "canary_violation",
    "ope_diff", "ope_diff_lo", "ope_diff_hi", "one_step_diff",
    "on_candidate_states", "on_current_states", "outer_low", "unweighed_mass",
)  # fmt: skip


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def write_csv(result: ExperimentResult, path: Path) -> None:
    """One row per (round, arm): the columns of :data:`CSV_FIELDS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        pairs = result.paired()
        base = result.baseline()
        for r in sorted(result.rows, key=lambda r: (r.round, r.arm)):
            p = pairs.get((r.round, r.arm))
            vs = (
                ["", "", "", "", "", ""]
                if p is None
                else [_num(x) for x in (p.diff.value, p.diff.low, p.diff.high, p.ratio,
                                        p.ratio_low, p.ratio_high)]
            )  # fmt: skip
            g, c = r.gate, r.canary
            cand = None if g is None else g.true_candidate
            cur = None if g is None else g.true_current
            diff = None if g is None else g.true_diff
            shadowed = (None, None) if g is None else (g.on_candidate_states,
                                                       g.on_current_states)  # fmt: skip
            w.writerow(
                [
                    r.round, r.arm, r.algo,
                    _num(r.reward.value), _num(r.reward.low), _num(r.reward.high),
                    int(r.promoted), r.model_version, r.sessions, r.steps, r.clicks,
                    "" if g is None else g.decision,
                    "" if g is None else g.candidate or "",
                    _num(None if cand is None else cand.value),
                    _num(None if cur is None else cur.value),
                    *(["", "", ""] if diff is None else map(_num, (diff.value, diff.low,
                                                                   diff.high))),
                    "" if g is None else int(g.violation),
                    base, *vs,
                    "" if c is None else c.decision,
                    "" if c is None else c.candidate or "",
                    _num(None if c is None or c.true_diff is None else c.true_diff.value),
                    "" if c is None else int(c.violation),
                    *(["", "", ""] if g is None or g.ope_diff is None else map(_num, (
                        g.ope_diff.value, g.ope_diff.low, g.ope_diff.high))),
                    _num(None if g is None else g.one_step_diff),
                    *(_num(None if e is None else e.value) for e in shadowed),
                    _num(None if g is None else g.outer_low),
                    _num(None if g is None else g.unweighed_mass),
                ]
            )  # fmt: skip


# --- the bootstrap model -----------------------------------------------------------------


def bootstrap_model(world: World, cfg: ExperimentConfig, workdir: Path) -> Path:
    """``popularity`` counts of the rewarded events of a log of the world's ``bootstrap``
    policy (ε 0.3); returns the artifact directory (reused when it exists: it depends on
    the config only)."""
    from recloop.data.loaders import LoadOptions, load_raw
    from recloop.data.prepare import PrepareConfig, prepare
    from recloop.data.splits import SplitConfig
    from recloop.evaluation.worlds.rollout import write_events
    from recloop.loop.gate import rewarded_training
    from recloop.training.recommender import train_run

    root = workdir / f"bootstrap-clicks-{cfg.bootstrap}-{cfg.bootstrap_users}-{cfg.seed}"
    artifact = root / "run" / "artifact"
    if (artifact / "manifest.json").is_file():
        return artifact
    users = np.arange(cfg.bootstrap_users, dtype=np.int64)
    policy = make_policy(world, cfg.bootstrap, Selection(kind="epsilon", epsilon=0.3))
    roll = simulate(world, policy, users, seed=cfg.seed + 10_007)
    write_events(world, roll, root / "log" / "events.csv")
    raw = load_raw("csv", root / "log" / "events.csv", LoadOptions())
    dataset = prepare(raw, PrepareConfig(split=SplitConfig(mode="loo")))
    # popularity counts the clicks only: counted over every impression it would count what
    # the logging policy showed (uniform: an arbitrary order), not what users wanted; the
    # ignored impressions stay in the data, so every shown item is in the catalogue
    rewarded_training(dataset).save(root / "data")
    train_run("popularity", root / "data", root / "run", overwrite=True, progress=False)
    return artifact


# --- one arm's deployment ----------------------------------------------------------------


class ArmStack:
    """Registry, log, bus, service and loop of one arm (see the module docstring)."""

    def __init__(
        self,
        spec: ArmSpec,
        *,
        root: Path,
        cfg: ExperimentConfig,
        bootstrap: Path,
        clock: SimClock,
        store_url: str = "memory://",
        store_prefix: str = "recloop:",
    ) -> None:
        self.spec = spec
        self.store_url = store_url
        """The online store of the arm's service and stream processor: with a shared one
        (Redis) a request that sends no recent items is served from the recent items the
        processor stored, as in a deployment; the experiment's users send theirs."""
        self.store_prefix = store_prefix
        self.root = root
        self.cfg = cfg
        self.registry = ArtifactRegistry(root / "registry")
        self.database_url = f"sqlite:///{root / 'log.db'}"
        self.bus_url = f"memory://exp-{root.name}-{id(self)}"
        self.registry.publish(bootstrap, promote=True, reason="experiment bootstrap")
        self.clock = clock
        self.loop: LoopController | None = None
        self.truth: dict[str, TruthCheck] = {}
        """Truth roll-outs of each gated candidate against the model it was gated against
        (a canary's verdict is checked with its gate-time truth)."""
        self.expected = 0
        """Entries the bus should hold: served lists and events so far."""
        if spec.algo is not None:
            train: dict[str, Any] = {
                **spec.train,
                "seed": cfg.seed,
                "fit": {
                    "epochs": cfg.epochs,
                    "device": "cpu",
                    "progress": False,
                    "tensorboard": False,
                    **dict(spec.train.get("fit") or {}),
                },
            }
            from recloop.config import config_from_dict

            loop_cfg = config_from_dict(
                LoopConfig,
                {
                    "database_url": self.database_url,
                    "registry": str(root / "registry"),
                    "workdir": str(root / "loop"),
                    "algo": spec.algo,
                    "train": train,
                    "source": "impressions",
                    "train_targets": spec.train_targets,
                    "every_events": 1,
                    "holdout": 0.15,
                    "valid": 0.0,
                    "margin": cfg.margin,
                    "use_ope": cfg.gate in ("ope", "both"),
                    "use_metric": cfg.gate in ("metric", "both"),
                    "ope_require_trusted": cfg.gate_trusted,
                    "ope_min_ess": cfg.gate_min_ess,
                    "ope_bound_bias": cfg.gate_bound_bias,
                    "ope": {
                        "n_boot": 100,
                        "outcome": cfg.gate_outcome,
                        "target": cfg.gate_target,
                        "mean_weight_bounds": list(cfg.gate_mean_weight),
                    },
                    "canary_share": cfg.canary,
                    "canary_min_users": cfg.canary_min_users,
                    # each round's users live all their sessions in the round: reward per
                    # user over it is `sessions` x the return per session the margin is in
                    "canary_margin": cfg.margin * clock.sessions,
                    "keep_rounds": 2,
                },
                source="recloop experiment",
            )
            self.loop = LoopController(loop_cfg)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Any]:
        """The real app with its lifespan, and an ASGI client to it."""
        import httpx

        from recloop.serving.app import create_app
        from recloop.serving.settings import ServeSettings

        settings = ServeSettings.model_validate(
            {
                "artifact": self.registry.current_path(),
                "registry": str(self.root / "registry"),
                "artifact_root": self.root / "registry" / "versions",
                "reload_poll_s": 0.1,
                "bus_url": self.bus_url,
                "store_url": self.store_url,
                "store_prefix": self.store_prefix,
                "history_source": "request" if self.store_url == "memory://" else "store",
                # a fresh user's first list is drawn by the arm's policy from the model's
                # empty state (random: uniform), as the world's roll-outs draw it
                "cold_start": "policy",
                "policy": self.spec.policy,
                "epsilon": self.spec.epsilon,
                "temperature": self.spec.temperature,
                "max_batch": 100_000,
                "microbatch": False,
                "gc_freeze": False,
            }
        )
        app = create_app(settings, clock=self.clock)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://arm") as client:
                yield client

    async def drain(self, *, idle_s: float = 0.3, settle: bool = True) -> dict[str, float]:
        """Wait for the service's served-list logger to have published every list, run the
        stream processor until the bus is idle for ``idle_s``, then (``settle``) close the
        round's impressions; returns the worker's counters."""
        from recloop.streaming.bus import open_bus
        from recloop.streaming.log import BehaviorLog
        from recloop.streaming.runner import run_worker_async
        from recloop.streaming.settings import load_stream_settings

        settings = load_stream_settings(
            bus_url=self.bus_url,
            database_url=self.database_url,
            store_url=self.store_url,
            store_prefix=self.store_prefix,
            batch_size=5000,
            block_ms=50,
            exit_when_idle_s=idle_s,
            attribution_window_s=0,
            allowed_lateness_s=0,
            popular_refresh_s=60.0,
            stats_interval_s=600.0,
            # every click a user can make in a round stays in the store (the service reads
            # up to its consumed_len, 100): the truth's roll-outs never forget one either
            recent_len=100,
        )
        bus = open_bus(self.bus_url)
        deadline = time.monotonic() + 30.0
        while await bus.length() < self.expected:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.spec.name}: the bus holds {await bus.length()} entries, "
                    f"expected {self.expected} (served lists not logged?)"
                )
            await asyncio.sleep(0.02)
        stats = await run_worker_async(settings, stop=asyncio.Event())
        if not settle:
            return stats.as_dict()
        log = BehaviorLog(self.database_url)
        try:
            await asyncio.to_thread(log.settle, self.clock.now + 1)
        finally:
            log.dispose()
        return stats.as_dict()


async def _publish_events(bus_url: str, docs: list[dict[str, Any]]) -> None:
    from recloop.streaming.bus import open_bus

    if docs:
        bus = open_bus(bus_url)
        await bus.publish([orjson.dumps(d) for d in docs])


@dataclass(frozen=True, kw_only=True)
class Served:
    """What users got in one round (per user sums)."""

    reward: np.ndarray  # (U,) float64 reward per session
    steps: int
    clicks: int
    versions: list[str]
    shown: list[list[str]]
    """Per user, the items shown, in order."""
    earned: list[list[float]]
    """Per user, the reward of each shown item (0: ignored)."""
    session_of: list[list[int]]
    """Per user, the world session of each shown item."""


async def serve_round(
    stack: ArmStack,
    client: Any,
    world: World,
    *,
    users: np.ndarray,
    seed: Sequence[int],
    round_no: int = 1,
) -> Served:
    """The round's users in the arm's service; the world answers (module docstring).  Each
    request sends the user's shown items with the rewards they earned (0: ignored), as the
    log records them and the world's roll-outs feed them; events carry the simulated clock's
    time (:class:`SimClock`).  With ``history_source: store`` requests send no recent items
    and the stream processor stores each step's events before the next step's requests,
    as a deployment's does between a user's requests."""
    from_store = stack.cfg.history_source == "store"
    m = world.mech
    b = users.shape[0]
    state = world.initial_state(users)
    shown: list[list[str]] = [[] for _ in range(b)]
    earned: list[list[float]] = [[] for _ in range(b)]
    session_of: list[list[int]] = [[] for _ in range(b)]
    total = np.zeros(b)
    steps = clicks = 0
    versions: dict[str, None] = {}
    ids = [f"{USER_PREFIX}{u}" for u in users.tolist()]
    for s in range(m.sessions):
        world.start_session(state)
        alive = np.ones(b, bool)
        for t in range(m.horizon):
            now = stack.clock.at(round_no, s, t)
            # uniforms for every user (common random numbers), then the request seeds
            rng = np.random.default_rng([*seed, s, t])
            uni = rng.random((5, b))
            req_seed = np.asarray(rng.integers(0, 2**62, size=b), np.int64)
            # until the user has been shown (or, served from the store: has clicked) every item
            seen = [sum(1 for r in e if r) for e in earned] if from_store else map(len, shown)
            rows = np.flatnonzero(alive & (np.fromiter(seen, np.int64, b) < world.n_items))
            if rows.shape[0] == 0:
                break
            body = {
                "requests": [
                    {
                        "user_id": ids[i],
                        **(
                            {}
                            if from_store
                            else {
                                "recent_items": [
                                    {"item": it, "reward": r}
                                    for it, r in zip(shown[i], earned[i], strict=True)
                                ]
                            }
                        ),
                        "exclude_consumed": True,
                        "n": 1,
                        "seed": int(req_seed[i]),
                    }
                    for i in rows.tolist()
                ]
            }
            resp = await client.post("/v1/recommend/batch", json=body)
            if resp.status_code != 200:
                raise RuntimeError(f"service answered {resp.status_code}: {resp.text[:300]}")
            results = resp.json()["results"]
            stack.expected += sum(1 for r in results if not r["items"])  # logged all the same
            ok = np.array([bool(r["items"]) for r in results])
            rows, results = rows[ok], [r for r, k in zip(results, ok, strict=True) if k]
            if rows.shape[0] == 0:
                break
            raw = [r["items"][0]["item_id"] for r in results]
            item = np.array([int(x[len(ITEM_PREFIX) :]) for x in raw], np.int64)
            sub = UserState(
                user=users[rows],
                taste=state.taste[rows],
                satiety=state.satiety[rows],
                misses=state.misses[rows],
            )
            out = world.step(sub, item, uni[:, rows])
            state.taste[rows], state.satiety[rows], state.misses[rows] = (
                sub.taste,
                sub.satiety,
                sub.misses,
            )
            events: list[dict[str, Any]] = []
            for j, i in enumerate(rows.tolist()):
                shown[i].append(raw[j])
                earned[i].append(float(out.reward[j]))
                session_of[i].append(s)
                versions[results[j]["model_version"]] = None
                code = int(out.response[j])
                if code:
                    rid = results[j]["recommendation_id"]
                    events.append(
                        {
                            "event_id": f"{rid}:0",
                            "user_id": ids[i],
                            "item_id": raw[j],
                            "ts": now,
                            "behavior": RESPONSES[code],
                            "reward": float(out.reward[j]),
                            "recommendation_id": rid,
                        }
                    )
            await _publish_events(stack.bus_url, events)
            stack.expected += len(results) + len(events)
            if from_store:  # the clicks are in the store before the next requests
                stats = await stack.drain(idle_s=0.01, settle=False)
                if stats.get("failed_steps"):  # a store write failed: the next state is stale
                    raise RuntimeError(
                        f"{stack.spec.name}: the stream processor failed to store events "
                        f"({stats}); the next requests would be served from a stale store"
                    )
            total[rows] += out.reward
            steps += rows.shape[0]
            clicks += len(events)
            alive[:] = False
            alive[rows] = ~out.quit
    return Served(
        reward=total / m.sessions,
        steps=steps,
        clicks=clicks,
        versions=list(versions),
        shown=shown,
        earned=earned,
        session_of=session_of,
    )


FEEDBACK_OF = {"request": "shown", "store": "clicks"}
"""The roll-outs' ``feedback`` for each ``history_source`` of the arms' services."""


@dataclass(frozen=True, kw_only=True)
class TruthCheck:
    """Two models rolled out in the world on the same fresh users and random numbers."""

    candidate: Estimate
    """True return per session of the candidate."""
    current: Estimate
    """The same for the current model."""
    diff: Estimate
    """Paired candidate − current, per user."""
    on_candidate_states: Estimate
    """One-step advantage per session of the candidate's items over the current model's,
    in the states of the candidate's own roll-out (the current model as its shadow,
    :func:`recloop.evaluation.worlds.rollout.simulate`): the states a canary's users
    reach."""
    on_current_states: Estimate
    """The same in the states of the current model's roll-out (the candidate as its
    shadow): the states of the log the gate's OPE reads."""


def true_values(
    world: World,
    candidate: Path,
    current: Path,
    *,
    users: int,
    sel: Selection,
    seed: int,
    feedback: str = "shown",
) -> TruthCheck:
    """True return per session of two artifacts on the same fresh users and random numbers
    (with the arm's serving policy ``sel``, fed ``feedback`` as the arms' services are),
    their paired difference, and each one's roll-out with the other as its shadow."""
    who = TRUTH_USER_BASE + np.arange(users, dtype=np.int64)
    cand: Policy = make_policy(world, str(candidate), sel)
    cur: Policy = make_policy(world, str(current), sel)
    ret, adv = [], []
    for policy, other in ((cand, cur), (cur, cand)):
        roll = simulate(world, policy, who, seed=seed, feedback=feedback, shadow=other.scorer)
        per_user = roll.per_user()
        ret.append(per_user["return"])
        adv.append(per_user["advantage"])
    return TruthCheck(
        candidate=t_interval(ret[0]),
        current=t_interval(ret[1]),
        diff=t_interval(ret[0] - ret[1]),
        on_candidate_states=t_interval(adv[0]),
        # the current model's advantage over its shadow, turned into the candidate's
        on_current_states=t_interval(-adv[1]),
    )


async def _wait_for_registry(
    client: Any, current: str | None, canary: str | None, timeout_s: float
) -> bool:
    """Until the service serves the registry's ``current`` version and ``canary`` (None:
    none).  GET /healthz names both and serves no list: nothing reaches the log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = await client.get("/healthz")
        if resp.status_code == 200:
            doc = resp.json()
            c = doc.get("canary")
            serving = (doc.get("model_version"), None if c is None else c.get("model_version"))
            if serving == (current, canary):
                return True
        await asyncio.sleep(0.1)
    return False


@dataclass(frozen=True, kw_only=True)
class LoopRound:
    """What one loop run of an arm decided, checked against the truth."""

    promoted: bool
    """Whether a model was promoted (the canary, or the gated candidate)."""
    gate: GateCheck | None
    """The gate's decision on the round's candidate (None: no candidate was trained)."""
    canary: GateCheck | None
    """The verdict on the canary that was running (None: none, or still waiting)."""
    seconds: float


def _canary_check(stack: ArmStack, verdict: dict[str, Any]) -> GateCheck | None:
    """The canary's promote/stop as a decision, with the truth of its gate round."""
    if verdict.get("decision") not in ("promote", "stop"):
        return None
    version = str(verdict["version"])
    truth = stack.truth.get(version)
    diff = None if truth is None else truth.diff
    promoted = verdict["decision"] == "promote"
    margin = stack.cfg.margin
    return GateCheck(
        decision="promote" if promoted else "reject",
        reason="canary: " + str(verdict.get("reason", "")),
        candidate=version,
        current=verdict.get("parent"),
        true_candidate=None if truth is None else truth.candidate,
        true_current=None if truth is None else truth.current,
        true_diff=diff,
        violation=bool(promoted and diff is not None and diff.high < -margin),
        worse_point=bool(promoted and diff is not None and diff.value < -margin),
        on_candidate_states=None if truth is None else truth.on_candidate_states,
        on_current_states=None if truth is None else truth.on_current_states,
    )


def _ope_untrusted(gate_doc: dict[str, Any]) -> bool:
    """Whether the gate (:class:`recloop.loop.gate.GateResult` as a dict) required trusted
    OPE estimates and either model's had a warning."""
    ope = gate_doc.get("ope") or {}
    return bool(ope.get("require_trusted")) and any(ope.get("warnings", {}).values())


def _gate_outer(gate_doc: dict[str, Any]) -> dict[str, float | None]:
    """``outer_low`` and the candidate's ``unweighed_mass`` from a gate report (None
    without OPE)."""
    ope = gate_doc.get("ope") or {}
    low, mass = ope.get("outer_low"), (ope.get("candidate") or {}).get("unweighed_mass")
    return {
        "outer_low": None if low is None else float(low),
        "unweighed_mass": None if mass is None else float(mass),
    }


def _gate_ope_diffs(gate_doc: dict[str, Any]) -> dict[str, Estimate]:
    """The gate's paired OPE differences from its report, by estimator (empty without)."""
    ope = gate_doc.get("ope") or {}
    diffs = (ope.get("paired") or {}).get("differences", {})
    return {
        name: Estimate(float(iv["value"]), float(iv["low"]), float(iv["high"]))
        for name, iv in diffs.items()
    }


def one_step_difference(
    world: World, candidate: Path, current: Path, data: Path, *, ope_cfg: OPEConfig
) -> float:
    """The exact mean, over the impressions a loop gate's OPE scored (the TEST split of the
    round's prepared ``data``), of ``V_cand(s) − V_cur(s)``, ``V(s) = sum_a pi(a | s)
    R(s, a)`` at each impression's logged state s (replayed in the world from the round's
    log: the experiment's users are fresh each round, so their whole history is in it),
    each model scored as the gate scores it (:func:`recloop.loop.gate.ope_scorers`).  It
    is what the gate's paired difference estimates with the outcome ``reward``."""
    from recloop.data.dataset import PreparedDataset
    from recloop.evaluation.ope import logged_events
    from recloop.evaluation.worlds.ope_check import WorldIndex, dataset_states, one_step_truth
    from recloop.loop.gate import ope_scorers

    dataset = PreparedDataset.load(data)
    scorers = ope_scorers(load_artifact(candidate), load_artifact(current), dataset)
    rows = logged_events(dataset, split="test", cfg=ope_cfg).rows
    index = WorldIndex.of(dataset, world)
    states = dataset_states(dataset, world, index)
    v_cand = one_step_truth(
        scorers.candidate, dataset, world, states, index, rows,
        history=scorers.candidate_history, cfg=ope_cfg,
    )  # fmt: skip
    v_cur = one_step_truth(
        scorers.current, dataset, world, states, index, rows,
        history=scorers.current_history, cfg=ope_cfg,
    )  # fmt: skip
    return float((v_cand - v_cur).mean()) if rows.shape[0] else 0.0


def run_loop_round(stack: ArmStack, world: World, *, round_no: int) -> LoopRound:
    """``recloop loop --once`` for the arm, then its decisions checked in the world."""
    assert stack.loop is not None
    cfg = stack.cfg
    current = stack.registry.current()
    start = time.perf_counter()
    try:
        result = stack.loop.run_once()
    except LoopError as exc:
        logger.error("%s round %d: %s", stack.spec.name, round_no, exc)
        g = GateCheck(
            decision=f"failed at {exc.step}",
            reason=str(exc),
            candidate=None,
            current=current,
            true_candidate=None,
            true_current=None,
            true_diff=None,
            violation=False,
            worse_point=False,
        )
        # a canary verdict made before the failure still happened
        canary = _canary_check(stack, stack.loop.canary_verdict)
        return LoopRound(
            promoted=bool(canary and canary.decision == "promote"),
            gate=g,
            canary=canary,
            seconds=time.perf_counter() - start,
        )
    seconds = time.perf_counter() - start
    canary = _canary_check(stack, result.canary)
    if result.version is None:  # no candidate: skipped, or waiting for the canary
        return LoopRound(
            promoted=bool(canary and canary.decision == "promote"),
            gate=None,
            canary=canary,
            seconds=seconds,
        )
    promoted = result.status.endswith("promoted")
    # what the candidate was gated against: the current model after any canary verdict
    parent = result.parent
    truth = None
    if cfg.truth_users > 0 and parent is not None:
        truth = true_values(
            world,
            stack.registry.versions_dir / result.version,
            stack.registry.versions_dir / parent,
            users=cfg.truth_users,
            sel=stack.spec.selection(),
            seed=cfg.seed + 7919 * round_no,
            feedback=FEEDBACK_OF[cfg.history_source],
        )
        stack.truth[result.version] = truth
    diff = None if truth is None else truth.diff
    ope_diffs = _gate_ope_diffs(result.gate)
    ope_diff = ope_diffs.get(str((result.gate.get("ope") or {}).get("estimator")))
    one_step = None
    if cfg.truth_users > 0 and parent is not None and ope_diff is not None and result.round:
        one_step = one_step_difference(
            world,
            stack.registry.versions_dir / result.version,
            stack.registry.versions_dir / parent,
            stack.loop.workdir / ROUNDS / result.round / "data",
            ope_cfg=stack.loop.cfg.ope,
        )
    canaried = result.status.endswith("canary")
    decision = "promote" if promoted else "canary" if canaried else "reject"
    g = GateCheck(
        decision=decision,
        reason=result.reason,
        candidate=result.version,
        current=parent,
        true_candidate=None if truth is None else truth.candidate,
        true_current=None if truth is None else truth.current,
        true_diff=diff,
        violation=bool(promoted and diff is not None and diff.high < -cfg.margin),
        worse_point=bool(promoted and diff is not None and diff.value < -cfg.margin),
        ope_untrusted=_ope_untrusted(result.gate),
        ope_diff=ope_diff,
        ope_diffs=ope_diffs,
        one_step_diff=one_step,
        on_candidate_states=None if truth is None else truth.on_candidate_states,
        on_current_states=None if truth is None else truth.on_current_states,
        **_gate_outer(result.gate),
    )
    return LoopRound(
        promoted=promoted or bool(canary and canary.decision == "promote"),
        gate=g,
        canary=canary,
        seconds=seconds,
    )


async def run_experiment_async(
    cfg: ExperimentConfig,
    arms: list[ArmSpec],
    workdir: Path,
    *,
    say: Callable[[str], None] = lambda _: None,
) -> ExperimentResult:
    """The rounds of :func:`run_experiment`, whose caller holds ``workdir`` (its lock)."""
    from recloop.evaluation.worlds.base import build_world

    baseline_arm(cfg.baseline, arms)  # a wrong name fails now, not after every round
    start = time.perf_counter()
    world = build_world(cfg.world, list(cfg.world_overrides))
    workdir.mkdir(parents=True, exist_ok=True)
    arms_dir = workdir / "arms"
    if arms_dir.exists():
        import shutil

        shutil.rmtree(arms_dir)
    boot = bootstrap_model(world, cfg, workdir)
    boot_version = load_artifact(boot).model_version
    say(
        f"[bootstrap] popularity counts of a {cfg.bootstrap_users}-user log of the world's "
        f"{cfg.bootstrap} policy: {boot_version}"
    )
    stacks = {
        a.name: ArmStack(
            a,
            root=arms_dir / _slug(a.name),
            cfg=cfg,
            bootstrap=boot,
            clock=SimClock(world),
            store_url=(
                "memory://"
                if cfg.history_source == "request"
                else f"sqlite:///{(arms_dir / _slug(a.name) / 'store.db').resolve()}"
            ),
        )
        for a in arms
    }
    rows: list[ArmRound] = []
    async with contextlib.AsyncExitStack() as es:
        clients = {n: await es.enter_async_context(s.serving()) for n, s in stacks.items()}
        for r in range(1, cfg.rounds + 1):
            users = USER_BASE + (r - 1) * cfg.users + np.arange(cfg.users, dtype=np.int64)
            for a in arms:
                stack, client = stacks[a.name], clients[a.name]
                t0 = time.perf_counter()
                served = await serve_round(
                    stack,
                    client,
                    world,
                    users=users,
                    seed=(cfg.seed, r),
                    round_no=r,
                )
                await stack.drain()
                serve_s = time.perf_counter() - t0
                row = ArmRound(
                    round=r,
                    arm=a.name,
                    algo=a.algo or RANDOM,
                    reward=t_interval(served.reward),
                    sessions=cfg.users * world.mech.sessions,
                    steps=served.steps,
                    clicks=served.clicks,
                    model_version="+".join(served.versions),
                    serve_seconds=round(serve_s, 2),
                    per_user=served.reward,
                )
                if stack.loop is not None:
                    done = await asyncio.to_thread(run_loop_round, stack, world, round_no=r)
                    row.promoted, row.gate, row.canary = done.promoted, done.gate, done.canary
                    row.loop_seconds = round(done.seconds, 2)
                    now = stack.registry.current()
                    running = stack.registry.canary()
                    want = None if running is None else running.version
                    if not await _wait_for_registry(client, now, want, 30.0):
                        raise RuntimeError(
                            f"{a.name}: the service never followed the registry to {now} "
                            f"(canary {want})"
                        )
                rows.append(row)
                say(_round_line(row))
    return ExperimentResult(
        config=cfg,
        arms=arms,
        rows=rows,
        world=world.describe(),
        bootstrap_version=boot_version,
        seconds=time.perf_counter() - start,
    )


SLUG_MAX = 80
"""Longest arm directory name: an arm with many fields would pass the file system's 255."""


def _slug(name: str) -> str:
    """The arm's directory name: its name with every other character as ``_``; a long one
    is cut and ends with a hash of the whole name, so two arms never share a directory."""
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    if len(slug) <= SLUG_MAX:
        return slug
    digest = hashlib.blake2b(name.encode(), digest_size=6).hexdigest()
    return f"{slug[: SLUG_MAX - len(digest) - 1]}-{digest}"


def _round_line(r: ArmRound) -> str:
    line = (
        f"[round {r.round}] {r.arm:<28} reward/session {r.reward}  "
        f"({r.steps} steps, {r.clicks} clicks, served by {r.model_version}; "
        f"{r.serve_seconds:.1f} s"
    )
    if r.canary is not None:
        line += f", canary {r.canary.candidate}: {_decision_words(r.canary)}"
    if r.gate is not None:
        line += f", loop {r.loop_seconds:.1f} s) gate: {_decision_words(r.gate)}"
    else:
        line += ")"
    return line


def _decision_words(g: GateCheck) -> str:
    words = g.decision
    if g.true_diff is not None:
        words += f"; true candidate − current {g.true_diff}"
    if g.one_step_diff is not None:
        words += f" (exact one-step difference on the holdout states {g.one_step_diff:+.3f})"
    if g.on_candidate_states is not None and g.on_current_states is not None:
        words += (
            f"; one-step advantage per session in the current model's roll-out "
            f"{g.on_current_states}, in the candidate's own {g.on_candidate_states}"
        )
    return words + ("  VIOLATION" if g.violation else "")


def run_experiment(
    cfg: ExperimentConfig,
    arms: list[ArmSpec],
    workdir: Path,
    *,
    say: Callable[[str], None] = lambda _: None,
) -> ExperimentResult:
    """Run every round of every arm, write ``workdir/experiment.csv`` and
    ``workdir/experiment.json``, and return the result."""
    baseline_arm(cfg.baseline, arms)  # a wrong name fails before anything is written
    with exclusive_lock(workdir / ".lock") as held:
        # a second run here would delete this one's arms under it (each run starts afresh)
        if not held:
            raise RecloopError(
                f"{workdir}: another recloop experiment is running in this directory "
                f"(it holds {workdir / '.lock'}); give another --workdir"
            )
        result = asyncio.run(run_experiment_async(cfg, arms, workdir, say=say))
        write_csv(result, workdir / "experiment.csv")
        (workdir / "experiment.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def summary_table(result: ExperimentResult) -> str:
    """Markdown: reward per session per round and arm (95 % interval)."""
    rounds = result.config.rounds
    head = "| arm | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " |"
    lines = [head, "|---" * (rounds + 1) + "|"]
    for a in result.arms:
        cells = []
        for r in result.arm_rows(a.name):
            mark = " ↑" if r.promoted else ""
            cells.append(f"{r.reward.value:.3f} [{r.reward.low:.3f}, {r.reward.high:.3f}]{mark}")
        lines.append(f"| {a.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _last_round_pair(rl: ArmRound, sup: ArmRound) -> dict[str, Any]:
    ratio = rl.reward.value / sup.reward.value if sup.reward.value else math.inf
    doc: dict[str, Any] = {
        "rl_arm": rl.arm,
        "rl": rl.reward.to_dict(),
        "supervised_arm": sup.arm,
        "supervised": sup.reward.to_dict(),
        "ratio": ratio,
        "disjoint": rl.reward.low > sup.reward.high,
        "target_met": ratio >= 1.2 and rl.reward.low > sup.reward.high,
    }
    if rl.per_user is not None and sup.per_user is not None:
        # the same users with the same luck: the per-user difference is the sharper test
        doc["paired"] = paired(rl.per_user, sup.per_user, baseline=sup.arm).to_dict()
    return doc


def compare_last_round(result: ExperimentResult) -> dict[str, Any] | None:
    """The RL arm against the supervised arm in the last round: ratio and whether the 95 %
    intervals are disjoint (the issue's target: ratio >= 1.2 with disjoint intervals).

    Both arms are declared before the run, not picked after it: the first ``rl-`` arm of
    ``--arms``, and the baseline when it is a supervised arm, else the first supervised
    one.  The best of several arms measured on the same users would favour the side with
    more arms.  Every RL arm's own comparison is in ``all_rl_arms``."""
    last = {r.arm: r for r in result.rows if r.round == result.config.rounds}
    order = [a.name for a in result.arms if a.name in last]
    rl = [n for n in order if n.startswith("rl-")]
    sup = [n for n in order if n.startswith("supervised-")]
    if not rl or not sup:
        return None
    base = result.baseline()
    sup_arm = last[base if base in sup else sup[0]]
    doc = _last_round_pair(last[rl[0]], sup_arm)
    doc["all_rl_arms"] = [_last_round_pair(last[n], sup_arm) for n in rl]
    return doc
