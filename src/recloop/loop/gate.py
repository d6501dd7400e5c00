"""The gate: is the candidate at least as good as the current model on the newest holdout?

Fairness.  Both models are scored on the **same prepared holdout** (the candidate's
dataset, TEST split): the same users, the same states (each user's last H events before
the holdout, as raw events), the same targets and the same masked items.  The current model
was trained with other id maps, so it is evaluated through a translation of the candidate
dataset's indices into its own (:func:`mapped_scorer`): users and history items are looked
up by raw id (an unknown user becomes its unknown-user row; history items it does not
know are dropped before its last H are taken, as its service does), and its scores are
gathered back into the new item order.  Items it has never seen get -inf: it could not
serve them, and that is exactly what a retrained model may gain over it.

OPE uses the pieces :func:`recloop.evaluation.ope.ope_for_runs` is built from, on the same
holdout: one :class:`LoggedEvents` (events, propensities -- the logged ``propensity``
column when the data has one, else one behaviour model fitted on TRAIN -- and one reward
model) shared by both policies, and the paired bootstrap of candidate minus current.
``ope_for_runs`` itself takes artifact paths whose id maps must equal the dataset's, which
the current model's do not; the scorer translation above is what makes the pairing possible.
The candidate is scored without the items that have no TRAIN row
(:class:`recloop.evaluation.ope.TrainedCatalogue`): their ids come from the holdout itself,
and an exploring policy that spreads its ε over them would be judged on a catalogue drawn
from the very impressions it is scored on.

Rewarded targets.  On a log of impressions (``source: impressions``) most holdout rows are
items the service showed and the user ignored (reward 0).  Ranking those as targets
measures how well a model predicts *what the logging policy showed* -- which the current
model, the logging policy itself, does best -- not what users want: in ``recloop
experiment`` such a gate kept a cold-start model against candidates that were truly 50 %
better.  With ``rewarded_targets`` the ranking metric's targets are the holdout rows with a
positive reward only (the ignored impressions before a user's first rewarded one are part of
the state and are masked like every consumed item); OPE still uses every impression.

Decision (``margin`` m >= 0): with a current model, promote when
``metric(candidate) >= metric(current) - m`` and, with OPE, the lower end of the paired
interval of ``estimator(candidate) - estimator(current)`` is ``>= -m``.  The first model is
promoted when its metric is above the popularity ranking's (train counts) on the holdout.

Trusted estimates only (``require_trusted``, ``min_ess``).  The OPE check fails, and the
current model stays, when either model's estimate is no evidence (:func:`untrusted`): the
estimate or its interval outside the observed outcomes' range; a mean unclipped weight
pi / beta outside ``ope.mean_weight_bounds`` (it is 1 in expectation for any pi that beta
covers: far below, most of pi's mass is on actions the log never showed and DR there is
its reward model's opinion; far above, a few huge weights dominate); or an effective
sample size (Kish) of the clipped weights below ``min_ess`` (30: a heuristic floor, the
"n >= 30" rule of thumb for a large-sample interval).  Found in ``recloop experiment``
(2026-12-06): on the loop's epsilon-greedy logs the ESS of the gate's weights had a median
of 3.7 events of 226-1,108; a candidate truly worse by 0.26 per session passed on a DR
difference of +0.20 [+0.01, +0.53] (current model: DR -0.16 with rewards in [0, 1], mean
weight 9.7), and one truly worse by 0.43 on +0.08 [+0.02, +0.23] with both mean weights
within bounds and an ESS of 4.

The outer check (``bound_bias``).  Clipped IPS values the share of a policy's probability
that its clipped weights cannot weigh (its unweighed mass: items the log shows with a
probability below pi / cap, or never) at 0, and DR at the reward model's prediction.  The
outer difference (:func:`recloop.evaluation.ope.outer_difference`; Bottou et al. 2013,
section 4.4) values it at the worst observed outcome for the candidate and at the best for
the current model, with the same paired bootstrap; with ``bound_bias`` its interval's low
end, too, must be ``>= -margin``: the candidate passes on what the log can weigh, whatever
a reward model says of the rest.  On an epsilon-greedy log a candidate's unweighed mass is
about the share of states where its choice is not the current model's, so such a gate
promotes little that departs from the current model: what the log cannot judge is left to a
canary (with which the check does not gate) or to a log that explores more (softmax).  The
bracket needs the logging policy's own probabilities: on fitted ones (``source: events``)
the outer interval bounds nothing, and with ``bound_bias`` the OPE check fails (the
reason says so).

The re-serve check (target ``served``, logged propensities with their ``policy_version``).
On the holdout impressions the current model served, the served target must give it back
the propensities its service logged (pi / beta = 1 at every slot).  Where it does not, the
served target scored it on a context (state, excluded items, catalogue) that the service
did not see, or its service scored otherwise (onnxruntime inference, an ANN index) -- every
model's served probabilities on these events are then suspect -- and the current model's
estimate carries a warning (``max_unreproduced``: the share tolerated).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from recloop.artifacts.bundle import Artifact
from recloop.data.dataset import NO_TARGET, TEST, TRAIN, VALID, PreparedDataset
from recloop.data.schema import POLICY_VERSION
from recloop.evaluation.ope import (
    DR_IPS_DISAGREE,
    OUTER_NOT_LOGGED,
    Interval,
    OPEConfig,
    OPEReport,
    ServingIndex,
    TrainedCatalogue,
    logged_events,
    ope_report,
    outer_difference,
    paired_report,
    policy_terms,
    reserve_check,
)
from recloop.evaluation.protocol import EvalConfig, Scorer, evaluate
from recloop.loop.warmstart import row_map

logger = logging.getLogger(__name__)


def index_translation(old_ids: list[str], new_ids: list[str]) -> np.ndarray:
    """(len(new_ids) + 1,) int64: the old index of each new index's raw id, 0 when the old
    map lacks it (and for index 0)."""
    m = row_map(old_ids, new_ids)
    out = np.zeros(len(new_ids) + 1, np.int64)
    out[m.new] = m.old
    return out


class MappedScorer:
    """An artifact's policy as a scorer over a dataset's user and item indices (raw ids
    translated; the dataset's items the artifact lacks at -inf, padding included).  Its
    ``serving_index`` lets OPE's ``served`` target re-serve it as its service does (tie keys
    of the artifact's own indices, and its whole catalogue through :meth:`catalogue`: a
    list may show, and a softmax spreads over, the items only the artifact indexes)."""

    def __init__(self, artifact: Artifact, dataset: PreparedDataset) -> None:
        self.users = torch.from_numpy(index_translation(artifact.user_ids, dataset.user_ids))
        self.items = torch.from_numpy(index_translation(artifact.item_ids, dataset.item_ids))
        self.unknown = self.items == 0  # (N_new + 1,), padding included: never ranked
        seen = np.zeros(len(artifact.item_ids) + 1, bool)
        seen[self.items.numpy()] = True
        self.unseen = torch.from_numpy(np.flatnonzero(~seen))  # old columns, never 0
        # a history's index N_new + 1 + x is unseen item x (from a logged context)
        self._history_items = torch.cat([self.items, self.unseen])
        self.policy = artifact.policy
        self.history_len = artifact.history_len
        self.serving_index = ServingIndex(
            user=self.users,
            item=self.items,
            unseen=self.unseen,
            catalogue_scorer=self.catalogue,
            unseen_ids=tuple(str(artifact.item_ids[i - 1]) for i in self.unseen.tolist()),
        )

    def history(self, history: Tensor, history_reward: Tensor) -> tuple[Tensor, Tensor]:
        """The artifact's own history of windows (B, W) of dataset items (index N + 1 + x:
        its unseen item x, which a logged context may name): as its service does, the items
        it does not know are dropped first, then the last ``history_len`` known ones are
        kept (right-aligned, padding 0 with reward 0 on the left).  Give a window wider than
        ``history_len`` (:data:`MAPPED_WINDOW`) so that dropped items leave room for earlier
        known ones."""
        old = self._history_items[history]  # (B, W) 0: padding or unknown to the artifact
        order = torch.argsort((old > 0).to(torch.int8), dim=1, stable=True)  # known last
        old = old.gather(1, order)[:, -self.history_len :]
        reward = history_reward.gather(1, order)[:, -self.history_len :]
        return old, reward * (old > 0).to(reward.dtype)

    def _old_scores(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        """(B, N_old + 1) the artifact's own scores."""
        items, reward = self.history(history, history_reward)
        return self.policy(self.users[user], items, reward)

    def __call__(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        old = self._old_scores(user, history, history_reward)
        return old[:, self.items].masked_fill(self.unknown, float("-inf"))  # (B, N_new + 1)

    def catalogue(self, user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        """(B, N_new + 1 + X) the scores of :meth:`__call__`, then those of the artifact's
        items the dataset lacks (``serving_index.unseen``), from one pass of the policy."""
        old = self._old_scores(user, history, history_reward)
        new = old[:, self.items].masked_fill(self.unknown, float("-inf"))
        return torch.cat([new, old[:, self.unseen]], 1)


MAPPED_WINDOW = 4
"""The current model is given windows of this many times its history: it drops the items it
does not know and keeps its last ``history_len`` known ones, as its service does (exact
while at most 3 in 4 of a user's latest items are new to it)."""


def mapped_scorer(artifact: Artifact, dataset: PreparedDataset) -> Scorer:
    """``artifact``'s policy as a scorer over ``dataset``'s user and item indices."""
    return MappedScorer(artifact, dataset)


@dataclass(frozen=True, kw_only=True, eq=False)
class OPEScorers:
    """The two policies the gate's OPE compares on a candidate's dataset, each with the
    history window it is given."""

    candidate: Scorer
    """The candidate without the items no TRAIN row has
    (:class:`recloop.evaluation.ope.TrainedCatalogue`)."""
    candidate_history: int
    current: Scorer
    """The current model through its own id maps and catalogue (:class:`MappedScorer`)."""
    current_history: int


def ope_scorers(candidate: Artifact, current: Artifact, dataset: PreparedDataset) -> OPEScorers:
    """How the gate's OPE scores ``candidate`` (trained on ``dataset``) and ``current``:
    what :func:`gate` and the experiment's one-step truth share."""
    return OPEScorers(
        candidate=TrainedCatalogue(candidate.policy, dataset),
        candidate_history=candidate.history_len,
        current=mapped_scorer(current, dataset),
        # MappedScorer keeps its last history_len known items of a wider window
        current_history=MAPPED_WINDOW * current.history_len,
    )


def popularity_scorer(dataset: PreparedDataset) -> Scorer:
    """Every user gets the items ranked by their TRAIN counts."""
    counts = np.bincount(dataset.item[dataset.split == TRAIN], minlength=dataset.n_items + 1)
    row = torch.from_numpy(counts.astype(np.float32))
    row[0] = float("-inf")

    def score(user: Tensor, history: Tensor, history_reward: Tensor) -> Tensor:
        return row.expand(user.shape[0], -1)

    return score


@dataclass(frozen=True, kw_only=True)
class GateResult:
    """The gate's numbers and decision."""

    promote: bool
    """Whether the candidate becomes current."""
    reason: str
    """One line: the numbers that decided."""
    metric: str
    """The gating ranking metric (NAME@K)."""
    candidate: dict[str, float]
    """Candidate's ranking metrics on the holdout."""
    baseline: dict[str, float]
    """The current model's (or, for the first model, popularity's) metrics."""
    baseline_name: str
    """``current`` or ``popularity``."""
    holdout_users: int
    """Users evaluated."""
    ope: dict[str, Any] = field(default_factory=dict)
    """Per-model OPE reports and the paired difference (empty when OPE is off)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "reason": self.reason,
            "metric": self.metric,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "holdout_users": self.holdout_users,
            "ope": self.ope,
        }


NOT_A_TARGET = NO_TARGET + TRAIN
"""Split code of the TRAIN rows that are no target (:data:`recloop.data.dataset.NO_TARGET`)."""


def rewarded_holdout(dataset: PreparedDataset) -> PreparedDataset:
    """``dataset`` whose TEST split keeps only the rows with a positive reward (the other
    holdout rows get the code ``NO_TARGET + TEST``, which no split has: they stay in the
    users' sequences)."""
    split = dataset.split.copy()
    split[(split == TEST) & (dataset.reward <= 0)] += NO_TARGET
    return dataclasses.replace(dataset, split=split)


def rewarded_training(dataset: PreparedDataset) -> PreparedDataset:
    """``dataset`` whose TRAIN and VALID splits keep only the rows with a positive reward as
    targets (the others get ``NO_TARGET`` + their split's code, which no split has: they
    stay in the users' sequences as history, with their reward 0, in their split's period)
    -- what ``train_targets: rewarded`` trains on."""
    split = dataset.split.copy()
    split[((split == TRAIN) | (split == VALID)) & (dataset.reward <= 0)] += NO_TARGET
    return dataclasses.replace(dataset, split=split)


def untrusted(report: OPEReport, estimator: str, *, min_ess: float = 0.0) -> list[str]:
    """The warnings that make ``report``'s ``estimator`` estimate no evidence: the estimate
    or its interval outside the observed outcomes' range (a variance too large for the
    interval to mean anything), a mean weight outside the report's bounds (below: most of
    the target's mass is on actions the log never showed, so DR is its reward model's
    opinion there; above: a few huge weights dominate), an effective sample size of the
    clipped weights below ``min_ess`` (the estimate rests on that many events' worth of
    data, too few for a bootstrap interval), and, for DR, intervals of DR and IPS that do
    not overlap (the reward model carries DR where the events do not:
    :func:`recloop.evaluation.ope.estimators_disagree`)."""
    out = list(report.estimates[estimator].flags)
    if estimator == "dr" and DR_IPS_DISAGREE in report.flags:
        iv, ips = report.estimates["dr"], report.estimates["ips"]
        out.append(f"DR [{iv.low:.3f}, {iv.high:.3f}] vs IPS [{ips.low:.3f}, {ips.high:.3f}]")
    if "mean_weight_far_from_1" in report.flags:
        out.append(f"mean weight {report.mean_weight:.2f}")
    if report.ess < min_ess:
        out.append(f"ESS {report.ess:.1f} < {min_ess:g}")
    return out


@dataclass(frozen=True, kw_only=True)
class OPECheck:
    """The OPE half of the gate's decision."""

    passed: bool
    """Whether OPE lets the candidate through."""
    words: str
    """How it decided, for the reason line."""


def ope_check(
    difference: Interval,
    warnings: dict[str, list[str]],
    *,
    margin: float,
    require_trusted: bool,
    outer: Interval | None = None,
    bound_bias: bool = False,
) -> OPECheck:
    """Passed when the paired interval's low end is >= ``-margin``, with ``bound_bias`` also
    the low end of ``outer`` (:func:`recloop.evaluation.ope.outer_difference`: what the
    log cannot weigh valued at the worst outcome for the candidate and the best for the
    current model), and, with ``require_trusted``, no model's estimate has a warning
    (``warnings``: model name -> its :func:`untrusted` list)."""
    # equal policies give a difference of 0 up to rounding
    ok = difference.low >= -margin - 1e-9
    words = f"low {'>=' if ok else '<'} {-margin:g}"
    if outer is not None and OUTER_NOT_LOGGED in outer.flags:
        # no bracket without the logging policy's own probabilities: it cannot pass
        words += "; outer check needs logged propensities (source: impressions)"
        words += "" if bound_bias else " (not gating)"
        ok = ok and not bound_bias
    elif outer is not None:
        outer_ok = outer.low >= -margin - 1e-9
        words += (
            f"; outer low {outer.low:+.4f} {'>=' if outer_ok else '<'} {-margin:g}"
            f"{'' if bound_bias else ' (not gating)'}"
        )
        ok = ok and (outer_ok or not bound_bias)
    flagged = [f"{name} {', '.join(w)}" for name, w in warnings.items() if w]
    if flagged:
        trust = "untrusted" if require_trusted else "warnings, not gating"
        words += f"; OPE {trust}: {'; '.join(flagged)}"
    return OPECheck(passed=ok and not (require_trusted and flagged), words=words)


def gate(
    candidate: Artifact,
    current: Artifact | None,
    dataset: PreparedDataset,
    *,
    metric: str,
    margin: float,
    use_ope: bool,
    estimator: str,
    ope_cfg: OPEConfig,
    rewarded_targets: bool = False,
    use_metric: bool = True,
    require_trusted: bool = True,
    min_ess: float = 30.0,
    max_unreproduced: float = 0.01,
    bound_bias: bool = False,
) -> GateResult:
    """Compare ``candidate`` (trained on ``dataset``) with ``current`` on its TEST split
    (only its rewarded rows as ranking targets with ``rewarded_targets``; with a current
    model, ``use_metric`` false and ``use_ope`` true, OPE alone decides; with
    ``require_trusted`` an OPE report's warning on either model, :func:`untrusted` with
    ``min_ess``, fails the OPE check).  With target ``served`` on logged propensities, the
    current model must get back the propensities of the impressions it served
    (:func:`recloop.evaluation.ope.reserve_check`): where more than ``max_unreproduced`` of
    them differ, the current model's estimate carries that warning.  With ``bound_bias``
    the OPE check also needs the outer low end (module docstring) >= ``-margin``; it is
    reported either way.  (``recloop loop`` turns it on by default: ``ope_bound_bias``.)"""
    k = int(metric.partition("@")[2])
    eval_cfg = EvalConfig(ks=(k,) if k == 10 else (k, 10))
    ranked = rewarded_holdout(dataset) if rewarded_targets else dataset
    cand_scorer: Scorer = candidate.policy
    cand = evaluate(cand_scorer, ranked, split="test", history=candidate.history_len, cfg=eval_cfg)
    scorers = None if current is None else ope_scorers(candidate, current, dataset)
    if scorers is None:
        base_scorer, base_name, base_h = popularity_scorer(dataset), "popularity", 1
    else:  # the current model is ranked as its OPE scores it (its own ids and catalogue)
        base_scorer, base_name, base_h = scorers.current, "current", scorers.current_history
    base = evaluate(base_scorer, ranked, split="test", history=base_h, cfg=eval_cfg)
    c, b = cand.metrics[metric], base.metrics[metric]
    # the metric decides for the first model, and whenever OPE does not gate alone
    metric_gates = current is None or use_metric or not use_ope
    ok_metric = c > b if current is None else (c >= b - margin or not metric_gates)
    rel = ">" if c > b else "<=" if current is None else (">=" if c >= b - margin else "<")
    on = " (rewarded targets)" if rewarded_targets else ""
    words = [f"{metric}{on} {c:.4f} vs {base_name} {b:.4f}"]
    if current is not None:
        words[0] += f" (margin {margin:g})"
    words[0] = f"{words[0]}: {rel}"
    if not metric_gates:
        words[0] += " (not gating)"
    ope_doc: dict[str, Any] = {}
    ok_ope = True
    if use_ope and current is not None and scorers is not None:
        events = logged_events(dataset, split="test", cfg=ope_cfg)
        t_cur = policy_terms(base_scorer, dataset, events, history=base_h, cfg=ope_cfg)
        t_cand = policy_terms(
            scorers.candidate, dataset, events, history=scorers.candidate_history, cfg=ope_cfg
        )
        diff = paired_report(
            events, t_cur, t_cand, cfg=ope_cfg, run="candidate", baseline_run="current"
        )
        iv = diff.differences[estimator]
        returns = ope_cfg.outcome == "return"
        reports = {
            "candidate": ope_report(events, t_cand, ope_cfg),
            "current": ope_report(events, t_cur, ope_cfg),
        }
        warnings = {name: untrusted(r, estimator, min_ess=min_ess) for name, r in reports.items()}
        reserved = None
        if (
            ope_cfg.target == "served"
            and events.behaviour == "logged"
            and POLICY_VERSION in dataset.extra
        ):
            reserved = reserve_check(dataset, events, t_cur, version=current.model_version)
            logger.info("re-serve check of the current model: %s", reserved.words())
            if reserved.share > max_unreproduced:
                warnings["current"].append(reserved.words())
        outer = outer_difference(events, t_cur, t_cand, cfg=ope_cfg)
        check = ope_check(
            iv,
            warnings,
            margin=margin,
            require_trusted=require_trusted,
            outer=outer,
            bound_bias=bound_bias,
        )
        ok_ope = check.passed
        ope_doc = {
            "behaviour": events.behaviour,
            "n_events": events.n_events,
            "left_out": events.left_out,
            "estimator": estimator,
            "target": ope_cfg.target,
            **{name: r.to_dict() for name, r in reports.items()},
            "paired": diff.to_dict(),
            "warnings": warnings,
            "require_trusted": require_trusted,
            "min_ess": min_ess,
            "outer": outer.to_dict(),
            "outer_low": outer.low,
            "bound_bias": bound_bias,
            "reserve": None if reserved is None else reserved.to_dict(),
            "max_unreproduced": max_unreproduced,
        }
        words.append(
            f"OPE {estimator} difference {iv.value:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] "
            f"({events.behaviour} propensities{', session returns' * returns}, "
            f"ESS {reports['candidate'].ess:.1f} / {reports['current'].ess:.1f} of "
            f"{events.n_events}): {check.words}"
        )
    promote = ok_metric and ok_ope
    verdict = "promote" if promote else "keep current" if current is not None else "not promoted"
    return GateResult(
        promote=promote,
        reason=f"{verdict}: " + "; ".join(words),
        metric=metric,
        candidate={k: float(v) for k, v in cand.metrics.items()},
        baseline={k: float(v) for k, v in base.metrics.items()},
        baseline_name=base_name,
        holdout_users=cand.n_users,
        ope=ope_doc,
    )
