"""A/B serving: which artifact (arm) answers a user, by a stable hash of the user id.

A user's arm is ``bisect(cumulative weights, u)`` with ``u`` the first 8 bytes of
``blake2b(salt + NUL + user_id)`` read as a number in [0, 1): the same user always gets the
same arm (across requests, workers, restarts and machines), the arms get their weights' share
of users, and a new ``salt`` (one per experiment) reshuffles users independently of the
last experiment.  Changing the weights moves only the users whose ``u`` falls between the
old and the new boundaries.

Arms come from ``recloop serve --ab NAME=PATH:WEIGHT ...`` (or ``RECLOOP_AB``, a JSON list
of :class:`ArmConfig`, which may also give an arm its own serving policy); the first arm is
the *control*: /admin/reload switches it, the other arms keep the artifact they were started
with (a registry is not followed in A/B serving).  Every served list records its arm
(response field ``arm``, served-log column ``arm``) and ``/metrics`` counts lists per arm
(``recloop_ab_lists``).  Clicks and rewards per arm come from the served log once
``recloop stream`` has attributed feedback to it: each stream worker counts the impressions
it settles per arm (``recloop_ab_settled_impressions``, ``recloop_ab_attributed_clicks``,
``recloop_ab_attributed_reward`` on this service's ``/metrics``, from the workers'
heartbeats in the shared store), and ``recloop evaluate --ab`` reads the log and compares
the arms with intervals (:mod:`recloop.evaluation.ab`).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recloop.artifacts.manifest import MIN_TEMPERATURE
from recloop.errors import ConfigError

ARM_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
"""Arm names: short, and safe as Prometheus label values and SQL column values."""


class ArmConfig(BaseModel):
    """One arm of an A/B split."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str = Field(pattern=ARM_NAME)
    """Arm name, recorded with every list it serves."""
    artifact: Path
    """Artifact or run directory this arm serves."""
    weight: float = Field(gt=0, allow_inf_nan=False)
    """Relative share of users (weights need not sum to 1)."""
    policy: Literal["topk", "softmax", "plackett_luce", "epsilon"] | None = None
    """This arm's serving policy (None: the artifact's ``serving`` section, else the
    service's); a request's own ``policy`` still wins."""
    temperature: float | None = Field(default=None, ge=MIN_TEMPERATURE, le=1e6, allow_inf_nan=False)
    """This arm's softmax temperature (None: the artifact's, else the service's)."""
    epsilon: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    """This arm's epsilon (None: the artifact's, else the service's)."""


def parse_arm(text: str) -> ArmConfig:
    """``NAME=PATH:WEIGHT`` (the last colon splits, so a path may hold colons)."""
    name, eq, rest = text.partition("=")
    path, colon, weight = rest.rpartition(":")
    if not eq or not colon or not name or not path:
        raise ConfigError(f"--ab {text!r}: expected NAME=PATH:WEIGHT, e.g. control=runs/a:0.5")
    try:
        w = float(weight)
    except ValueError:
        raise ConfigError(f"--ab {text!r}: weight {weight!r} is not a number") from None
    try:
        return ArmConfig(name=name, artifact=Path(path), weight=w)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"--ab {text!r}: {field}: {first['msg']}") from None


def check_arms(arms: Sequence[ArmConfig]) -> None:
    """At least two arms, distinct names."""
    if len(arms) < 2:
        raise ConfigError(f"A/B serving needs at least two arms, got {len(arms)}")
    names = [a.name for a in arms]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"A/B arm name {dup!r} is used twice")


def user_unit(user_id: str, salt: str) -> float:
    """The user's hash as a number in [0, 1) (module docstring)."""
    digest = hashlib.blake2b(
        salt.encode() + b"\0" + user_id.encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class AbSplit:
    """Arm index of a user id for fixed weights and salt."""

    def __init__(self, weights: Sequence[float], *, salt: str) -> None:
        if not weights or min(weights) <= 0:
            raise ConfigError(f"A/B weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        acc = 0.0
        self.bounds: list[float] = []
        for w in weights[:-1]:
            acc += w / total
            self.bounds.append(acc)
        self.salt = salt

    def assign(self, user_id: str) -> int:
        return bisect.bisect_right(self.bounds, user_unit(user_id, self.salt))
