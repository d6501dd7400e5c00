"""The configuration of ``recloop loop``: one frozen dataclass, YAML via ``--config``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from recloop.config import check
from recloop.data.prepare import PrepareConfig
from recloop.evaluation.ope import OPEConfig
from recloop.training.fit import METRIC_NAMES


def _gate_ope() -> OPEConfig:
    # 200 paired replicates: enough for a 95% interval's ends on the small holdouts of a
    # round, and a fraction of the round's training time.
    return OPEConfig(n_boot=200)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """What ``recloop loop`` reads, trains, compares and publishes, and when."""

    database_url: str = ""
    """SQLAlchemy URL of the behaviour log written by ``recloop stream``."""
    table: str = "behavior_log"
    """The behaviour-log table."""
    source: Literal["events", "impressions"] = "events"
    """What a round trains on: ``events`` (the behaviour log ``table``: what users did) or
    ``impressions`` (the served-items table ``served_table``: every item the service showed,
    with its attributed reward -- 0 when ignored -- and the serving policy's logged
    propensity and model version, as ``recloop prepare --from-db --impressions`` reads it).
    Off-policy corrections (REINFORCE ``behaviour: logged``, the OPE gate) need the
    second."""
    served_table: str = "served_items"
    """The served-items table (``source: impressions``)."""
    train_targets: Literal["all", "rewarded"] = "all"
    """Rows a candidate learns to predict: ``all`` of the window's training rows, or only
    the ``rewarded`` ones (reward > 0; the others stay in the users' sequences as history).
    With ``source: impressions`` a model that fits every shown item -- popularity counts,
    a supervised next-item model -- learns what the serving policy chose, not what users
    wanted; ``rewarded`` makes it learn from the clicks.  The gate still sees every
    holdout row (its OPE needs the ignored impressions too)."""
    registry: str = ""
    """Artifact registry (``recloop registry``: a directory, or ``s3://BUCKET/PREFIX``):
    candidates are published there and the current version moves when the gate passes."""
    workdir: str = ""
    """Controller's own directory: ``state.json`` (the watermark) and one folder per round
    (prepared data and training run)."""
    algo: str = ""
    """Algorithm trained each round (a name from ``recloop train --help``)."""
    train: dict[str, Any] = field(default_factory=dict)
    """The run config of each round, laid out as ``recloop train --config`` files are
    (algorithm fields at the top, ``fit:`` for the fit loop)."""
    every_events: int | None = None
    """Start a round once this many events newer than the watermark are logged; None = only
    on the clock."""
    every_minutes: float | None = None
    """Start a round once this many minutes have passed since the last one (and at least one
    new event is logged); None = only on the event count."""
    poll_seconds: float = 30.0
    """How often the long-running controller checks its triggers."""
    window: Literal["growing", "sliding"] = "growing"
    """growing: every logged event so far; sliding: the last ``window_days`` days (event
    time, counted back from the newest event)."""
    window_days: float | None = None
    """Length of the sliding window in days (required with ``window: sliding``)."""
    holdout: float = 0.1
    """Share of the window's events (newest first, by event time) held out for the gate; the
    cut never lies before the current model's own holdout cut, so no holdout event has
    reached either model's training (see :mod:`recloop.loop.window`)."""
    valid: float = 0.1
    """Share of the window's events, just before the holdout, for early stopping; 0 = none."""
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """How the window's events are prepared (filters, reward, sessions, gamma); its split is
    set by the loop (a global time cut at ``holdout`` / ``valid``)."""
    warm_start: bool = True
    """Start the candidate from the current artifact's weights where ids and shapes allow."""
    metric: str = "ndcg@10"
    """Ranking metric of the gate (NAME@K), full ranking on the holdout."""
    gate_targets: Literal["auto", "all", "rewarded"] = "auto"
    """Targets of the gate's ranking metric: ``all`` holdout rows, or only the ``rewarded``
    ones (reward > 0; see :mod:`recloop.loop.gate`); ``auto``: rewarded with ``source:
    impressions`` (where most rows are ignored impressions), all otherwise."""
    margin: float = 0.0
    """The candidate is promoted unless its metric is below the current model's by more than
    this (absolute), and (with OPE) the lower end of the paired OPE difference is below
    ``-margin``."""
    use_metric: bool = True
    """Gate on the ranking metric.  In a closed loop every logged target (even a rewarded
    one: users can click only what was shown) was chosen by the current model, so the
    metric favours it; with logged propensities OPE alone is the unbiased comparison
    (``use_metric: false``).  The first model is always gated on the metric (no OPE
    without a current model)."""
    use_ope: bool = True
    """Also gate on off-policy evaluation of the two models on the holdout."""
    ope_estimator: Literal["dr", "snips", "ips"] = "dr"
    """The OPE estimate whose paired difference gates."""
    ope_require_trusted: bool = True
    """The OPE check fails when either model's estimate is no evidence: it (or its interval)
    lies outside the range of the logged outcomes, the mean importance weight is outside
    ``ope.mean_weight_bounds``, or the effective sample size of the weights is below
    ``ope_min_ess`` (see :mod:`recloop.loop.gate`).  False: the warnings are logged with the
    decision but do not count.  With a canary (``canary_share`` > 0) they do not count
    either: a candidate that passes the rest of the gate starts as the canary, and its users'
    behaviour, not the offline estimate, decides its promotion."""
    ope_min_ess: float = 30.0
    """Smallest effective sample size (Kish, of the clipped weights) of either model's OPE
    estimate that the gate acts on; 0 = no minimum."""
    ope_bound_bias: bool | None = None
    """None: on with ``source: impressions``, off with ``source: events``.  On: the OPE
    check also needs the low end of the outer difference to be ``>= -margin``:
    the share of each policy's probability the clipped weights cannot weigh valued at the
    worst observed outcome for the candidate and at the best for the current model, instead
    of at 0 (IPS) or at the reward model's prediction (DR), with the same paired bootstrap
    (Bottou et al. 2013, section 4.4; :func:`recloop.evaluation.ope.outer_difference`).
    The check then holds whatever the reward model says where the log cannot weigh the
    candidate's choices.  With a canary it does not count (the users judge the candidate).
    The outer interval is in every gate report either way.  On by default since
    2026-12-07: in ``recloop experiment`` (store-fed, seeds 0-2) the gate without it
    promoted 2 truly worse models of 60 on epsilon-greedy logs, with it none (and nothing
    else either: such logs cannot weigh what a candidate changes); docs/experiment.md.
    The bracket needs logged propensities (``source: impressions``): on the fitted ones of
    ``source: events`` the outer interval bounds nothing, so there it is off by default
    (the gate then rests on DR and its trust checks, as before 2026-12-07) and refused when
    asked for (it could never pass)."""

    @property
    def bound_bias(self) -> bool:
        """Whether the outer check gates (``ope_bound_bias`` resolved for the source)."""
        if self.ope_bound_bias is None:
            return self.source == "impressions"
        return self.ope_bound_bias

    ope_max_unreproduced: float = 0.01
    """With ``ope: {target: served}`` on logged propensities: the largest share of the
    current model's own holdout impressions whose propensity the served target may fail to
    re-serve (more than 0.1 % off) before the current model's estimate carries a warning.
    Such a gap means the served target scored the models on a context their services did not
    see (a list logged without its context, whose state the service read from the online
    store), or that the service scored otherwise than the artifact's torch policy
    (``inference: onnxruntime``, an ANN index): no estimate on those events is evidence."""
    ope: OPEConfig = field(default_factory=_gate_ope)
    """Target policy, behaviour and reward models, and bootstrap of the OPE gate.  With
    ``source: impressions``, ``ope: {target: served}`` scores each model as the service
    would serve it with the log's own exploration (see docs/experiment.md)."""
    canary_share: float = 0.0
    """With a share in (0, 1), a candidate that passes the gate while a model is current is
    not promoted at once: it becomes the registry's canary and serves this share of the
    users, and a later round promotes it or stops it on what those users did against the
    others (:mod:`recloop.loop.canary`).  0 = promote when the gate passes."""
    canary_min_users: int = 30
    """Users each arm needs since the canary started before it is judged (rounds wait,
    training nothing new, until both have them)."""
    canary_margin: float = 0.0
    """The canary is promoted when the low end of the interval of (canary - current) reward
    per user since it started is >= -canary_margin, and stopped otherwise."""
    canary_min_served: float = 0.9
    """The canary is judged only once it served at least this share of its arm's impressions
    (the rest were served by the current model before a service picked it up, or by a
    service that does not follow the registry; they pull the difference towards 0)."""
    canary_max_days: float | None = 7.0
    """A canary still waiting (too few users, or too little served) this many days of event
    time after it started is stopped, so that the loop trains again; None = wait forever."""
    keep_rounds: int = 3
    """Round folders kept in ``workdir/rounds`` (the newest finished ones)."""

    def __post_init__(self) -> None:
        check(
            not (self.ope_bound_bias and self.use_ope and self.source == "events"),
            "ope_bound_bias: true needs source: impressions (the outer check's bracket needs "
            "the logged propensities; on the behaviour log's fitted ones it could never pass): "
            "set source: impressions, or leave ope_bound_bias unset",
        )
        check(
            self.window in ("growing", "sliding"),
            f"window must be growing or sliding, got {self.window!r}",
        )
        if self.window == "sliding":
            check(
                self.window_days is not None and self.window_days > 0,
                f"window: sliding needs window_days > 0, got {self.window_days}",
            )
        check(
            self.every_events is None or self.every_events >= 1,
            f"every_events must be >= 1 or null, got {self.every_events}",
        )
        check(
            self.every_minutes is None or self.every_minutes > 0,
            f"every_minutes must be > 0 or null, got {self.every_minutes}",
        )
        check(
            self.every_events is not None or self.every_minutes is not None,
            "give a trigger: every_events or every_minutes (or both)",
        )
        check(
            self.source in ("events", "impressions"),
            f"source must be events or impressions, got {self.source!r}",
        )
        check(
            self.train_targets in ("all", "rewarded"),
            f"train_targets must be all or rewarded, got {self.train_targets!r}",
        )
        check(
            self.gate_targets in ("auto", "all", "rewarded"),
            f"gate_targets must be auto, all or rewarded, got {self.gate_targets!r}",
        )
        check(self.poll_seconds > 0, f"poll_seconds must be > 0, got {self.poll_seconds}")
        check(0 < self.holdout < 1, f"holdout must lie in (0, 1), got {self.holdout}")
        check(0 <= self.valid < 1, f"valid must lie in [0, 1), got {self.valid}")
        check(
            self.holdout + self.valid < 1,
            f"holdout + valid must be < 1 (training needs events), got "
            f"{self.holdout} + {self.valid}",
        )
        name, _, k = self.metric.partition("@")
        check(
            name in METRIC_NAMES and k.isdigit() and int(k) >= 1,
            f"metric must be NAME@K with NAME in {list(METRIC_NAMES)}, got {self.metric!r}",
        )
        check(self.margin >= 0, f"margin must be >= 0, got {self.margin}")
        check(self.ope_min_ess >= 0, f"ope_min_ess must be >= 0, got {self.ope_min_ess}")
        check(
            0 <= self.ope_max_unreproduced <= 1,
            f"ope_max_unreproduced must lie in [0, 1], got {self.ope_max_unreproduced}",
        )
        check(
            self.ope.target != "served" or self.source == "impressions",
            "ope.target=served scores models as the service served the logged impressions: "
            "it needs source: impressions (the served-items table), got source: events",
        )
        check(
            self.ope_estimator in ("dr", "snips", "ips"),
            f"ope_estimator must be dr, snips or ips, got {self.ope_estimator!r}",
        )
        check(
            0.0 <= self.canary_share < 1.0,
            f"canary_share must lie in [0, 1), got {self.canary_share}",
        )
        check(
            self.canary_min_users >= 2,
            f"canary_min_users must be >= 2, got {self.canary_min_users}",
        )
        check(self.canary_margin >= 0, f"canary_margin must be >= 0, got {self.canary_margin}")
        check(
            0.0 <= self.canary_min_served <= 1.0,
            f"canary_min_served must lie in [0, 1], got {self.canary_min_served}",
        )
        check(
            self.canary_max_days is None or self.canary_max_days > 0,
            f"canary_max_days must be > 0 or null, got {self.canary_max_days}",
        )
        check(self.keep_rounds >= 1, f"keep_rounds must be >= 1, got {self.keep_rounds}")

    @property
    def source_table(self) -> str:
        """The table a round reads (and whose new rows trigger it)."""
        return self.served_table if self.source == "impressions" else self.table

    @property
    def rewarded_targets(self) -> bool:
        """Whether the gate ranks the rewarded holdout rows only (:attr:`gate_targets`)."""
        if self.gate_targets == "auto":
            return self.source == "impressions"
        return self.gate_targets == "rewarded"

    @property
    def metric_k(self) -> int:
        """K of :attr:`metric`."""
        return int(self.metric.partition("@")[2])

    def require_paths(self) -> None:
        """The fields without a usable default, checked before a round starts."""
        for name in ("database_url", "registry", "workdir", "algo"):
            check(bool(getattr(self, name)), f"{name} is required (a flag or the config file)")
