"""The controller of ``recloop loop``: read the log, train, gate, publish -- and survive.

One round::

    check    count the log's events newer than the watermark; stop unless a trigger fired
    prepare  read the log, cut the window, split it (recloop.loop.window), save the data
    train    build the algorithm, warm-start it from the current artifact, fit, save
    gate     candidate vs current (or popularity) on the holdout (recloop.loop.gate)
    publish  registry.publish with lineage; promote when the gate passed -- or, with
             ``canary_share``, start it as the registry's canary

With a canary running, a due round (the same triggers) first judges it on the users'
behaviour since it started (recloop.loop.canary): promote it, stop it, or wait -- training
nothing new -- until both arms have ``canary_min_users`` users and the canary served
``canary_min_served`` of its arm (stopped as expired after ``canary_max_days``).  Each
verdict is one pointer write in the registry, made only if the pointer still names the
canary that was judged (an operator may have stopped or replaced it meanwhile).

Crash safety.  ``WORKDIR/state.json`` (rewritten atomically: temporary file, fsync,
rename) holds the watermark of the last window whose round finished.  A round that dies
before its gate decided leaves the state as it was, so the restarted controller trains
that window again (with whatever arrived since); the registry is untouched, the current
model keeps serving.  Once the gate has decided, the decision, lineage and candidate path
are written to the state as ``pending`` *before* the registry is touched; a restarted
controller finishes a pending publish (publishing is idempotent, and the promotion is
redone only while the current version is still the one the candidate was gated against)
and then advances the watermark, so a finished window is never trained twice.

One round at a time per workdir.  A round (its canary verdict, training, gate, publish and
promotion) holds an exclusive ``flock`` on ``WORKDIR/.lock``, taken without waiting; the
kernel drops it when the process dies, even by kill -9.  A second controller on the same
workdir -- a cron ``--once`` that starts while the last one still trains, a second
``recloop loop`` -- does not run a round beside it (which would train the same window
twice and race on ``state.json``): its call returns ``busy`` (``--once`` exits 75).  Two
long-running controllers on one workdir take turns, each round re-reading the state.  The
lock is as good as the filesystem's ``flock``: local filesystems, and NFS only where the
mount supports locks (not ``nolock``; ``local_lock=flock`` makes it host-local).  It
guards the workdir, not the registry: controllers with different workdirs on one registry
are kept apart only by the registry's conditional promotion.

Test hook: with ``RECLOOP_LOOP_HOOK=STEP[:SECONDS]`` in the environment the controller
writes ``WORKDIR/.hook-STEP`` (its pid) when it reaches STEP and sleeps there (default an
hour), so a test can kill it at that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from recloop.artifacts.bundle import Artifact, load_artifact
from recloop.artifacts.registry import ArtifactRegistry, Canary
from recloop.data.dataset import PreparedDataset
from recloop.data.schema import TIMESTAMP, RawData
from recloop.data.splits import SplitConfig
from recloop.errors import ArtifactError, ConfigError, DataError, RecloopError
from recloop.loop.config import LoopConfig
from recloop.loop.gate import GateResult, gate, rewarded_training
from recloop.loop.window import (
    Cuts,
    Watermark,
    count_newer,
    holdout_cuts,
    newest_ts,
    round_due,
    window_events,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
ROUNDS = "rounds"
LOCK_FILE = ".lock"
HOOK_ENV = "RECLOOP_LOOP_HOOK"
STEPS = ("check", "canary", "prepare", "train", "gate", "publish")


class LoopError(RecloopError):
    """A round failed at a step; the current model is unchanged."""

    def __init__(self, step: str, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        text = " ".join(str(cause).split()) or type(cause).__name__
        super().__init__(f"round failed at {step}: {type(cause).__name__}: {text}")


@dataclass(frozen=True, kw_only=True)
class RoundResult:
    """What one call of :meth:`LoopController.run_once` did."""

    status: str
    """skipped (no trigger), promoted, published (gate said no), canary (passed the gate,
    now the registry's canary), canary-waiting (a canary has too few users yet),
    resumed-... for a pending publish finished after a restart, or busy (another controller
    holds the workdir's lock: nothing was done)."""
    reason: str
    """One line: why."""
    version: str | None = None
    """The candidate's model version (published rounds)."""
    parent: str | None = None
    """The version that was current when the candidate was gated."""
    current: str | None = None
    """The current version after the round."""
    window: dict[str, Any] = field(default_factory=dict)
    """First/last event time and event count of the window, and the holdout cut."""
    gate: dict[str, Any] = field(default_factory=dict)
    """The gate's numbers (:class:`recloop.loop.gate.GateResult`)."""
    warm_start: dict[str, Any] = field(default_factory=dict)
    """What the warm start copied."""
    seconds: float = 0.0
    """Wall time of the round."""
    canary: dict[str, Any] = field(default_factory=dict)
    """The verdict on the canary that was running when the round started
    (:class:`recloop.loop.canary.CanaryVerdict`; empty when none ran)."""
    round: str | None = None
    """The round's folder under the workdir's ``rounds/`` (its prepared ``data`` and the
    candidate's ``run``; kept for the newest ``keep_rounds`` rounds)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created with its parents), taken without waiting:
    yields whether it was got, and holds it until the exit.  ``OSError`` when no lock can be
    taken at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_json_atomic(path: Path, doc: Any) -> None:
    """``path`` replaced by ``doc`` as JSON in one step: a reader (or a restart after a
    crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def hook(step: str, workdir: Path) -> None:
    """The kill-point test hook (module docstring)."""
    spec = os.environ.get(HOOK_ENV)
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name != step:
        return
    (workdir / f".hook-{step}").write_text(str(os.getpid()))
    logger.warning("%s=%s: pausing at %s", HOOK_ENV, spec, step)
    time.sleep(float(seconds or 3600))


class LoopController:
    """Runs rounds for one :class:`LoopConfig` (see the module docstring)."""

    def __init__(self, cfg: LoopConfig, *, clock: Callable[[], float] = time.time) -> None:
        cfg.require_paths()
        self.cfg = cfg
        self.workdir = Path(cfg.workdir)
        self.registry = ArtifactRegistry(cfg.registry)
        self.clock = clock
        self.step = "check"
        self.canary_verdict: dict[str, Any] = {}
        """The verdict on the canary of the last :meth:`run_once` (empty: none judged); kept
        when a later step of that round fails, so a caller still learns of a promotion."""

    # -- state -----------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    def read_state(self) -> dict[str, Any]:
        """The state file ({} before the first round)."""
        if not self.state_path.is_file():
            return {}
        try:
            doc: dict[str, Any] = json.loads(self.state_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RecloopError(f"{self.state_path}: unreadable state ({exc})") from None
        return doc

    def _write_state(self, doc: dict[str, Any]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.state_path, doc)

    # -- a round ---------------------------------------------------------------------

    def run_once(self) -> RoundResult:
        """One round (or the completion of a pending publish); raises :class:`LoopError`
        naming the step when it fails, leaving the registry's current version as it was."""
        start = time.perf_counter()
        self.step = "check"
        self.canary_verdict = {}
        with contextlib.ExitStack() as stack:
            try:  # a lock that cannot be taken at all (read-only dir, NFS without locks)
                held = stack.enter_context(exclusive_lock(self.workdir / LOCK_FILE))
            except OSError as exc:
                raise LoopError(self.step, exc) from exc
            if not held:
                try:
                    current = self.registry.current()
                except Exception as exc:
                    raise LoopError(self.step, exc) from exc
                return RoundResult(
                    status="busy",
                    reason=f"another controller is running a round in {self.workdir} "
                    f"(it holds {self.workdir / LOCK_FILE}); nothing done",
                    current=current,
                )
            return self._locked_round(start)

    def _locked_round(self, start: float) -> RoundResult:
        try:
            result = self._round()
        except LoopError:
            raise
        except Exception as exc:
            # One line reaches the user (LoopError); the traceback is there with --verbose.
            logger.debug("loop round failed at %s", self.step, exc_info=True)
            raise LoopError(self.step, exc) from exc
        return dataclasses.replace(result, seconds=round(time.perf_counter() - start, 3))

    def _round(self) -> RoundResult:
        cfg = self.cfg
        self.workdir.mkdir(parents=True, exist_ok=True)
        state = self.read_state()
        if state.get("pending"):
            self.step = "publish"
            return self._finish_pending(state, resumed=True)
        watermark = Watermark.from_dict(state.get("watermark"))
        since = None if watermark is None else watermark.ts
        new = count_newer(
            cfg.database_url,
            table=cfg.source_table,
            ts=since,
            settled_only=cfg.source == "impressions",
        )
        last = state.get("last_round_unix")
        due, why = round_due(
            new_events=new,
            every_events=cfg.every_events,
            every_minutes=cfg.every_minutes,
            seconds_since_last=None if watermark is None else self.clock() - float(last or 0),
        )
        if not due:
            return RoundResult(status="skipped", reason=why, current=self.registry.current())
        logger.info("loop round: %s", why)
        if cfg.canary_share > 0:
            # a canary is judged on the served-items table: without one it could never be
            # promoted or stopped, so no round trains before the table is there
            try:
                newest_ts(cfg.database_url, table=cfg.served_table)
            except DataError as exc:
                raise ConfigError(
                    f"canary_share {cfg.canary_share:g} needs the served-items table "
                    f"{cfg.served_table!r} (serve with --database-url or --bus-url and run "
                    f"`recloop stream`): {exc}"
                ) from None
        verdict: dict[str, Any] = {}
        running = self.registry.canary()
        if running is not None:
            self.step = "canary"
            # while it waits, every check that finds a round due judges it again: how
            # much data a verdict sees is set by canary_min_users and canary_min_served
            verdict = self.canary_verdict = self._judge_canary(running)
            if verdict["decision"] == "wait":
                return RoundResult(
                    status="canary-waiting",
                    reason=verdict["reason"],
                    current=self.registry.current(),
                    canary=verdict,
                )
            state = {**state, "last_canary": {**verdict, "at": _now()}}
            self._write_state(state)
        current = self.registry.current()

        self.step = "prepare"
        hook("prepare", self.workdir)
        round_dir = self.workdir / ROUNDS / f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
        cur_art: Artifact | None = None
        floor: int | None = None
        if current is not None:
            cur_art = load_artifact(self.registry.current_path())
            lineage = self._lineage(current)
            floor = lineage.get("window", {}).get("holdout_start")
        dataset, mark, window = self._prepare(round_dir, floor=floor)

        self.step = "train"
        hook("train", self.workdir)
        artifact_dir, warm = self._train(dataset, round_dir, cur_art)

        self.step = "gate"
        hook("gate", self.workdir)
        candidate = load_artifact(artifact_dir)
        result = gate(
            candidate,
            cur_art,
            dataset,
            metric=cfg.metric,
            margin=cfg.margin,
            use_ope=cfg.use_ope,
            estimator=cfg.ope_estimator,
            ope_cfg=cfg.ope,
            rewarded_targets=cfg.rewarded_targets,
            use_metric=cfg.use_metric,
            # with a canary the users judge the candidate: the offline gate only screens it
            require_trusted=cfg.ope_require_trusted and not cfg.canary_share,
            min_ess=cfg.ope_min_ess,
            max_unreproduced=cfg.ope_max_unreproduced,
            bound_bias=cfg.bound_bias and not cfg.canary_share,
        )
        logger.info("gate: %s", result.reason)

        self.step = "publish"
        pending = {
            "round": round_dir.name,
            "artifact": str(artifact_dir),
            "version": candidate.model_version,
            "parent": current,
            "promote": result.promote,
            "reason": result.reason,
            "watermark": mark.to_dict(),
            "lineage": self._lineage_doc(window, result, warm),
            "warm_start": warm,
        }
        state = {**state, "pending": pending}
        self._write_state(state)
        hook("publish", self.workdir)
        return dataclasses.replace(self._finish_pending(state, resumed=False), canary=verdict)

    def _judge_canary(self, canary: Canary) -> dict[str, Any]:
        """Judge ``canary`` (the registry's, as read) on the settled impressions since it
        started, and promote or stop it (:mod:`recloop.loop.canary`; a verdict applies only
        if the registry still names it); returns the verdict."""
        from recloop.data.loaders.sql import load_impressions_from_db
        from recloop.loop.canary import judge_canary

        cfg, reg = self.cfg, self.registry
        # the canary counts rewards per user and arm: the lists' contexts are not read
        raw = load_impressions_from_db(cfg.database_url, table=cfg.served_table, context=False)
        v = judge_canary(
            raw.events,
            canary,
            min_users=cfg.canary_min_users,
            margin=cfg.canary_margin,
            min_served=cfg.canary_min_served,
            max_age_s=None if cfg.canary_max_days is None else cfg.canary_max_days * 86400,
        )
        logger.info("canary: %s", v.reason)
        doc = v.to_dict()
        if v.decision in ("promote", "stop"):
            reason = f"canary: {v.reason}" if v.decision == "promote" else v.reason
            if not reg.finish_canary(canary, promote=v.decision == "promote", reason=reason):
                # stopped, replaced, promoted or rolled back by someone else meanwhile
                doc["decision"] = "superseded"
                doc["reason"] = f"{v.reason} (not applied: the registry changed meanwhile)"
                logger.warning("canary verdict not applied: the registry changed meanwhile")
        return doc

    def _lineage(self, version: str) -> dict[str, Any]:
        for e in self.registry.entries():
            if e.version == version:
                return e.lineage
        return {}

    def _lineage_doc(
        self, window: dict[str, Any], result: GateResult, warm: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "window": window,
            "gate": result.to_dict(),
            "decision": "promote" if result.promote else "reject",
            "warm_start": bool(warm),
            "loop": {
                "algo": self.cfg.algo,
                "workdir": str(self.workdir),
                "database_table": self.cfg.source_table,
                "source": self.cfg.source,
            },
        }

    def _prepare(
        self, round_dir: Path, *, floor: int | None
    ) -> tuple[PreparedDataset, Watermark, dict[str, Any]]:
        from recloop.data.loaders.sql import load_from_db, load_impressions_from_db
        from recloop.data.prepare import prepare

        cfg = self.cfg
        if cfg.source == "impressions":
            # settled impressions only: an open one's reward is not known yet (it joins a
            # later window; the watermark is the newest *settled* impression's time)
            raw = load_impressions_from_db(cfg.database_url, table=cfg.served_table)
        else:
            raw = load_from_db(cfg.database_url, table=cfg.table)
        events = raw.events
        if events.height == 0:
            raise RecloopError(f"table {cfg.source_table} holds no events")
        mark = Watermark(ts=int(events[TIMESTAMP].max()), events=events.height)  # type: ignore[arg-type]
        events = window_events(events, window=cfg.window, days=cfg.window_days)
        ts = events[TIMESTAMP].to_numpy()
        cuts = holdout_cuts(ts, holdout=cfg.holdout, valid=cfg.valid, floor=floor)
        split = SplitConfig(
            mode="time",
            train=1.0 - cfg.holdout - cfg.valid,
            valid=cfg.valid,
            test=cfg.holdout,
            valid_start=cuts.valid_start,
            test_start=cuts.test_start,
        )
        job = dataclasses.replace(cfg.prepare, split=split)
        dataset = prepare(RawData(events=events, source=raw.source), job)
        round_dir.mkdir(parents=True, exist_ok=True)
        dataset.save(round_dir / "data")
        dataset = PreparedDataset.load(round_dir / "data")
        window = self._window_doc(events, cuts, floor=floor, dataset=dataset)
        logger.info("window: %s", window)
        return dataset, mark, window

    def _window_doc(
        self, events: pl.DataFrame, cuts: Cuts, *, floor: int | None, dataset: PreparedDataset
    ) -> dict[str, Any]:
        ts = events[TIMESTAMP]
        return {
            "kind": self.cfg.window,
            "days": self.cfg.window_days,
            "first_event_ts": int(ts.min()),  # type: ignore[arg-type]
            "last_event_ts": int(ts.max()),  # type: ignore[arg-type]
            "events": events.height,
            "holdout_start": cuts.test_start,
            "valid_start": cuts.valid_start,
            "holdout_floor": floor,
            "splits": dataset.split_counts(),
        }

    def _train(
        self, dataset: PreparedDataset, round_dir: Path, current: Artifact | None
    ) -> tuple[Path, dict[str, Any]]:
        from recloop.loop.warmstart import warm_start
        from recloop.training.runconfig import load_run_config

        cfg = self.cfg
        if cfg.train_targets == "rewarded":
            dataset = rewarded_training(dataset)
        run = load_run_config(cfg.algo, values=cfg.train)
        rec = run.config.create()
        algo = rec.build(dataset, device=run.fit.device)
        warm: dict[str, Any] = {}
        if cfg.warm_start and current is not None:
            warm = warm_start(algo, current, dataset).to_dict()
        run_dir = round_dir / "run"
        rec.fit(dataset, fit=run.fit, run_dir=run_dir)
        return rec.save(run_dir), warm

    def _finish_pending(self, state: dict[str, Any], *, resumed: bool) -> RoundResult:
        """Publish (and maybe promote) the pending candidate, then advance the watermark."""
        p = state["pending"]
        reg = self.registry
        try:
            version = reg.publish(
                Path(p["artifact"]), parent=p["parent"], lineage=p["lineage"], reason=p["reason"]
            )
        except ArtifactError:
            if Path(p["artifact"]).exists():
                raise
            # The candidate is gone (its round folder was removed by hand): drop the pending
            # publish, keep the watermark, and the next round trains this window again.
            self._write_state({**state, "pending": None})
            raise
        hook("promote", self.workdir)
        promoted = canaried = False
        note = ""
        if p["promote"]:
            now = reg.current()
            running = reg.canary()
            if now == version:
                promoted = True  # the promotion itself happened before a crash
            elif now != p["parent"]:
                note = f" (not promoted: current moved from {p['parent']} to {now} meanwhile)"
            elif self.cfg.canary_share > 0 and p["parent"] is not None:
                # this round's canary started before a crash: running now, or stopped by
                # someone since (then it stays stopped); the history line carries the round
                started = (running is not None and running.version == version) or (
                    resumed
                    and any(
                        h.get("action") == "canary-start"
                        and h.get("version") == version
                        and h.get("tag") == p["round"]
                        for h in reg.history()
                    )
                )
                if started:
                    canaried = True
                else:
                    # the newest served impression, settled or not: lists served before the
                    # canary never count in its comparison
                    since = newest_ts(self.cfg.database_url, table=self.cfg.served_table)
                    canaried = (
                        reg.start_canary(
                            version,
                            share=self.cfg.canary_share,
                            since_ts=int(p["watermark"]["ts"]) if since is None else since,
                            reason=p["reason"],
                            expect_current=p["parent"],
                            tag=p["round"],
                        )
                        is not None
                    )
                    if not canaried:
                        note = (
                            " (not started as a canary: the registry changed meanwhile -- "
                            "another canary runs, or the current version moved)"
                        )
            elif resumed and any(
                h.get("action") == "promote"
                and h.get("version") == version
                and h.get("tag") == p["round"]
                for h in reg.history()
            ):
                # promoted before a crash, and the parent is current again since: an
                # operator's rollback, which stands
                note = " (promoted before a crash and rolled back since: left as it is)"
            else:
                promoted = reg.promote(
                    version, reason=p["reason"], expect_current=p["parent"], tag=p["round"]
                )
                if not promoted:
                    note = f" (not promoted: current moved from {p['parent']} meanwhile)"
        status = "promoted" if promoted else "canary" if canaried else "published"
        summary = {
            "status": status,
            "version": version,
            "parent": p["parent"],
            "reason": p["reason"] + note,
            "at": _now(),
        }
        new_state = {
            **state,
            "pending": None,
            "watermark": p["watermark"],
            "last_round_unix": self.clock(),
            "last_round_at": _now(),
            "last": summary,
        }
        self._write_state(new_state)
        self._prune(keep=p["round"])
        return RoundResult(
            status=("resumed-" if resumed else "") + status,
            reason=p["reason"] + note,
            version=version,
            parent=p["parent"],
            current=reg.current(),
            window=p["lineage"].get("window", {}),
            gate=p["lineage"].get("gate", {}),
            warm_start=p.get("warm_start") or {},
            round=p["round"],
        )

    def _prune(self, *, keep: str) -> None:
        """Remove round folders but the newest ``keep_rounds`` (always keeping ``keep``)."""
        root = self.workdir / ROUNDS
        if not root.is_dir():
            return
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        for name in names[: max(0, len(names) - self.cfg.keep_rounds)]:
            if name != keep:
                shutil.rmtree(root / name, ignore_errors=True)

    # -- forever ---------------------------------------------------------------------

    def run_forever(self, *, max_rounds: int | None = None) -> None:
        """Check the triggers every ``poll_seconds``; a failed round is logged and retried
        at the next check (the current model keeps serving meanwhile)."""
        done = 0
        while max_rounds is None or done < max_rounds:
            try:
                result = self.run_once()
                if result.status == "busy":
                    logger.warning("%s", result.reason)
                elif result.status != "skipped":
                    logger.info("round %s: %s", result.status, result.reason)
                else:
                    logger.debug("no round: %s", result.reason)
            except LoopError as exc:
                logger.error("%s; retrying in %.0f s", exc, self.cfg.poll_seconds)
            done += 1
            if max_rounds is None or done < max_rounds:
                time.sleep(self.cfg.poll_seconds)
