"""The fit loop: epochs of shuffled transitions → ``algo.update`` → validation → callbacks.

The loop is deliberately thin, because at DBRL's sizes a step is a few small matrix
products and Python overhead per step shows up in the throughput: batches come straight
from :class:`~recloop.data.sampler.TransitionSampler` (one numpy gather each), they move
to the device only when it is not the CPU, update statistics stay tensors until the end
of the epoch (no host sync per step), and the progress bar refreshes a few times a second.

Non-finite training is stopped, not saved: at the end of each epoch (where the per-step
losses are read anyway, one sync) the loop finds the first step whose ``loss`` was NaN or
infinite, then checks every network's weights, and raises :class:`TrainingError` naming the
epoch and step, before any callback checkpoints the broken weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from recloop.algos.base import Algo
from recloop.config import check, check_finite, config_from_dict, config_to_dict
from recloop.data.dataset import SPLIT_NAMES, TEST, VALID, PreparedDataset
from recloop.data.sampler import STATES, TransitionSampler
from recloop.data.schema import POSITION
from recloop.errors import ConfigError, DataError, TrainingError
from recloop.progress import progress
from recloop.training import distributed
from recloop.training.callbacks import (
    Callback,
    Checkpointer,
    EarlyStopping,
    FitState,
    LogProgress,
    SinkWriter,
)
from recloop.training.checkpoint import FitProgress, load_checkpoint, set_rng_state
from recloop.training.device import DEVICES
from recloop.training.sinks import METRICS_FILE, open_sinks

logger = logging.getLogger(__name__)

METRIC_NAMES = ("hr", "ndcg", "mrr", "recall", "precision", "map", "coverage", "hit_reward")


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    """Settings of the fit loop itself (the algorithm's live in its own config)."""

    epochs: int = 8
    """Passes over the train transitions."""
    max_steps: int | None = None
    """Stop after this many updates in total, mid-epoch if need be; None = no limit."""
    eval_every: int = 1
    """Evaluate on the validation split every this many epochs (and after the last);
    0 = only after the last."""
    metric: str = "ndcg@10"
    """Validation metric for early stopping and picking the best epoch (name@k)."""
    patience: int | None = 3
    """Stop after this many evaluations without improvement; None = never stop early."""
    min_delta: float = 0.0
    """Smallest increase of ``metric`` that counts as an improvement."""
    restore_best: bool = True
    """Put back the weights of the best validation epoch at the end."""
    eval_ks: tuple[int, ...] = (5, 10, 20)
    """Cut-offs K of the ranking metrics."""
    mask_consumed: bool = True
    """Evaluation masks the items a user consumed before the target."""
    states: Literal["auto", "rows", "lists"] = "auto"
    """What a training step is: ``rows`` (each event, its state the events before it),
    ``lists`` (each served list: every slot's state is the one its list was served from,
    the logged context or the events before the list, never the slots above it; needs
    impressions with their ``position``) or ``auto`` (``lists`` when the data has positions,
    i.e. impressions read with ``prepare --from-db --impressions``, else ``rows``)."""
    eval_batch_size: int = 1024
    """Users scored at once during evaluation."""
    final_eval: bool = True
    """After training, evaluate on the valid and test splits (full ranking)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: updates run under ``torch.autocast`` with bfloat16 (mixed
    precision; weights, optimiser state and evaluation stay float32).  Worth it on GPUs with
    bf16 tensor cores; on the CPU it is supported but rarely faster at these sizes."""
    num_threads: int | None = None
    """torch intra-op threads while fitting; None = leave torch's setting."""
    progress: bool | None = None
    """Progress bars: None = on a terminal only."""
    checkpoint: bool = True
    """With a run directory: write ``checkpoint/last.pt`` each epoch and ``best.pt``."""
    tensorboard: bool = True
    """With a run directory: also log to TensorBoard when it is installed."""

    def __post_init__(self) -> None:
        check(self.epochs >= 0, f"fit.epochs must be >= 0, got {self.epochs}")
        check(
            self.max_steps is None or self.max_steps >= 1,
            f"fit.max_steps must be >= 1 or null, got {self.max_steps}",
        )
        check(self.eval_every >= 0, f"fit.eval_every must be >= 0, got {self.eval_every}")
        check(
            self.states in ("auto", *STATES),
            f"fit.states must be auto, rows or lists, got {self.states!r}",
        )
        check(
            self.patience is None or self.patience >= 1,
            f"fit.patience must be >= 1 or null, got {self.patience}",
        )
        check(
            len(self.eval_ks) > 0 and all(k >= 1 for k in self.eval_ks),
            f"fit.eval_ks must be positive, got {list(self.eval_ks)}",
        )
        name, _, k = self.metric.partition("@")
        check(
            name in METRIC_NAMES and k.isdigit() and int(k) in self.eval_ks,
            f"fit.metric must be NAME@K with NAME in {list(METRIC_NAMES)} and K in "
            f"fit.eval_ks {list(self.eval_ks)}, got {self.metric!r}",
        )
        check(
            self.eval_batch_size >= 1,
            f"fit.eval_batch_size must be >= 1, got {self.eval_batch_size}",
        )
        check(
            self.device.split(":")[0] in DEVICES,
            f"fit.device must be one of {list(DEVICES)} (or cuda:N), got {self.device!r}",
        )
        check(
            self.precision in ("fp32", "bf16"),
            f"fit.precision must be fp32 or bf16, got {self.precision!r}",
        )
        check(
            self.num_threads is None or self.num_threads >= 1,
            f"fit.num_threads must be >= 1 or null, got {self.num_threads}",
        )


@dataclass(frozen=True, kw_only=True)
class FitResult:
    """What a fit did and how good the result is."""

    algo: str
    """Algorithm name."""
    epochs: int
    """Epochs completed (a resumed run counts the earlier ones)."""
    steps: int
    """Updates done."""
    transitions: int
    """Transitions trained on."""
    metric: str
    """The early-stopping metric."""
    best_epoch: int | None
    """Epoch whose weights were kept (None without validation)."""
    best_metric: float | None
    """Its validation value."""
    stopped_early: bool
    """Whether early stopping ended training."""
    seconds: float
    """Wall time of this call, evaluations included."""
    train_seconds: float
    """Time spent in updates (this call)."""
    mask_consumed: bool
    """Whether evaluation masked consumed items."""
    valid: dict[str, float] = field(default_factory=dict)
    """Final validation metrics of the kept weights (empty without a valid split)."""
    test: dict[str, float] = field(default_factory=dict)
    """Final test metrics (empty without a test split)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per epoch, as written to ``metrics.jsonl``."""
    run_dir: Path | None = None
    """The run directory, when there is one."""
    artifact: Path | None = None
    """The saved artifact, once written."""

    @property
    def transitions_per_s(self) -> float:
        return self.transitions_this_call / self.train_seconds if self.train_seconds else 0.0

    @property
    def transitions_this_call(self) -> int:
        return int(sum(r.get("transitions", 0) for r in self.history if not r.get("resumed")))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (``results.json``), without the per-epoch history."""
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "history"
        }
        for k in ("run_dir", "artifact"):
            out[k] = str(out[k]) if out[k] is not None else None
        return out


def _has_split(dataset: PreparedDataset, split: int) -> bool:
    return bool(dataset.split_counts()[SPLIT_NAMES[split]] > 0)


def evaluate_split(
    algo: Algo[Any],
    dataset: PreparedDataset,
    *,
    split: str,
    cfg: FitConfig,
    cache: dict[tuple[str, int], Any] | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of the algorithm's policy on one split.

    ``cache`` keeps the split's evaluation users (states, targets, consumed items) between
    calls, so that validating every epoch does not rebuild them.
    """
    from recloop.evaluation import EvalConfig, build_eval_users, evaluate_users

    h = algo.cfg.encoder.history
    key = (split, h)
    users = cache.get(key) if cache is not None else None
    if users is None:
        users = build_eval_users(dataset, split=split, history=h)
        if cache is not None:
            cache[key] = users
    algo.train(False)
    report = evaluate_users(
        algo.policy,
        users,
        cfg=EvalConfig(
            ks=cfg.eval_ks, mask_consumed=cfg.mask_consumed, batch_size=cfg.eval_batch_size
        ),
        device=algo.device,
    )
    return {k: float(v) for k, v in report.metrics.items()}


def _epoch_means(acc: dict[str, list[Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, values in acc.items():
        if not values:
            continue
        if all(isinstance(v, Tensor) for v in values):
            out[name] = float(torch.stack(values).float().mean())
        else:
            out[name] = float(np.mean([float(v) for v in values]))
    return out


def _first_non_finite(values: list[Any]) -> int | None:
    """Index of the first NaN/inf among per-step scalars (None when all are finite).

    Tensors are stacked and tested on their device, so this costs one host sync.
    """
    if not values:
        return None
    if all(isinstance(v, Tensor) for v in values):
        finite = torch.isfinite(torch.stack(values).float())
    else:
        finite = torch.from_numpy(np.isfinite(np.array([float(v) for v in values], np.float64)))
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


def _non_finite_weight(algo: Algo[Any]) -> str | None:
    """``network.tensor`` of the first weight or buffer holding NaN/inf, None when all are
    finite (one host sync for all of them)."""
    named = [
        (f"{net}.{name}", t)
        for net, module in algo.networks().items()
        for name, t in module.state_dict().items()
        if t.is_floating_point()
    ]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


def _check_finite_training(
    algo: Algo[Any], losses: list[Any], *, epoch: int, first_step: int
) -> None:
    """Raise :class:`TrainingError` when an epoch's loss or the weights went NaN/inf.

    ``epoch`` is 1-based; ``first_step`` is the global number of the epoch's first update.
    """
    bad = _first_non_finite(losses)
    if bad is not None:
        raise TrainingError(
            f"loss became non-finite at epoch {epoch} step {first_step + bad} "
            f"(loss = {float(losses[bad])}); try a lower lr or grad_clip"
        )
    name = _non_finite_weight(algo)
    if name is not None:
        raise TrainingError(
            f"weights became non-finite at epoch {epoch} step {first_step + len(losses) - 1} "
            f"(first: {name}); try a lower lr or grad_clip"
        )


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [
        {**json.loads(line), "resumed": True}
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def _with_defaults(saved: dict[str, Any], cls: type[Any]) -> dict[str, Any]:
    """A checkpoint's saved config with the fields added since it was saved at their
    defaults, so a run saved by an older version resumes; one that no longer parses (a
    field removed or retyped) is compared as saved, and the comparison names the field."""
    try:
        return config_to_dict(config_from_dict(cls, saved, source="checkpoint"))
    except ConfigError:
        return saved


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    if saved == current:
        return
    diffs = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    k = diffs[0]
    raise ConfigError(
        f"{run_dir}: cannot resume, the run was started with another config: field '{k}' "
        f"was {saved.get(k)!r}, now {current.get(k)!r}"
    )


def fit(
    algo: Algo[Any],
    dataset: PreparedDataset,
    *,
    cfg: FitConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train ``algo`` on the train split of ``dataset``; returns what happened.

    With ``run_dir``: per-epoch records go to ``RUN_DIR/metrics.jsonl`` (and TensorBoard),
    checkpoints to ``RUN_DIR/checkpoint/``, and ``resume`` continues from the last finished
    epoch there (weights, optimisers, counters, early-stopping state and RNG states), after
    checking that the algorithm config is the same.  Early stopping watches
    ``cfg.metric`` on the validation split.  Algorithms with ``trainable = False`` are fitted
    in closed form instead.  The fit ends with a full-ranking evaluation on the valid and
    test splits (``cfg.final_eval``).
    """
    # Configs built from YAML or --set are checked when built; these may come from Python.
    check_finite(algo.cfg)
    check_finite(cfg, field="fit")
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _fit(
            algo,
            dataset,
            cfg=cfg,
            run_dir=Path(run_dir) if run_dir is not None else None,
            resume=resume,
            extra_callbacks=callbacks,
            t_start=t_start,
        )
    finally:
        torch.set_num_threads(old_threads)


def _fit(
    algo: Algo[Any],
    dataset: PreparedDataset,
    *,
    cfg: FitConfig,
    run_dir: Path | None,
    resume: bool,
    extra_callbacks: Sequence[Callback],
    t_start: float,
) -> FitResult:
    name = type(algo).__name__.lower()
    algo_name = getattr(algo.cfg, "algo", "") or name
    has_valid = _has_split(dataset, VALID)
    eval_cache: dict[tuple[str, int], Any] = {}
    state = FitState(
        algo=algo, progress=FitProgress(epoch=0, step=0, transitions=0), epochs=cfg.epochs
    )
    if resume:
        if run_dir is None:
            raise ConfigError("resume needs a run directory")
        ck = load_checkpoint(run_dir, map_location=algo.device)
        saved = _with_defaults(ck.config, type(algo.cfg))
        _check_resume_config(saved, config_to_dict(algo.cfg), run_dir)
        algo.load_state_dict(ck.algo_state)
        state.progress = ck.progress
        state.best_networks = ck.best_networks
        state.history = _read_history(run_dir)
        set_rng_state(ck.rng)
        logger.info(
            "resuming %s after epoch %d (step %d)", run_dir, ck.progress.epoch, ck.progress.step
        )

    callbacks: list[Callback] = []
    main = distributed.is_main()  # in a distributed run only rank 0 evaluates and writes
    if algo.trainable and has_valid and main:
        callbacks.append(
            EarlyStopping(
                metric=cfg.metric,
                patience=cfg.patience,
                min_delta=cfg.min_delta,
                restore_best=cfg.restore_best,
            )
        )
    if run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if algo.trainable and cfg.checkpoint:
            callbacks.append(Checkpointer(run_dir))
        callbacks.append(SinkWriter(open_sinks(run_dir, tensorboard=cfg.tensorboard)))
    if main:
        callbacks.append(LogProgress(metric=cfg.metric))
        callbacks.extend(extra_callbacks)

    for cb in callbacks:
        cb.on_fit_start(state)
    train_seconds = 0.0
    if algo.trainable:
        train_seconds = _train_epochs(
            algo, dataset, cfg=cfg, state=state, callbacks=callbacks, eval_cache=eval_cache
        )
    else:
        algo.fit_closed_form(dataset)
        _check_finite_training(algo, [], epoch=0, first_step=0)
        record: dict[str, Any] = {"epoch": 0, "step": 0, "closed_form": True}
        state.history.append(record)
    for cb in callbacks:
        cb.on_fit_end(state)

    valid: dict[str, float] = {}
    test: dict[str, float] = {}
    if cfg.final_eval and main:
        if has_valid:
            valid = evaluate_split(algo, dataset, split="valid", cfg=cfg, cache=eval_cache)
        if _has_split(dataset, TEST):
            test = evaluate_split(algo, dataset, split="test", cfg=cfg, cache=eval_cache)
    algo.train(False)
    p = state.progress
    return FitResult(
        algo=algo_name,
        epochs=p.epoch,
        steps=p.step,
        transitions=p.transitions,
        metric=cfg.metric,
        best_epoch=p.best_epoch,
        best_metric=p.best_metric,
        stopped_early=state.stop,
        seconds=time.perf_counter() - t_start,
        train_seconds=train_seconds,
        mask_consumed=cfg.mask_consumed,
        valid=valid,
        test=test,
        history=state.history,
        run_dir=run_dir,
    )


def training_states(cfg: FitConfig, dataset: PreparedDataset) -> str:
    """``cfg.states`` with ``auto`` resolved for ``dataset``: ``lists`` when its events carry
    their ``position`` in a served list."""
    if cfg.states == "auto":
        return "lists" if POSITION in dataset.extra else "rows"
    if cfg.states == "lists" and POSITION not in dataset.extra:
        raise ConfigError(
            f"fit.states=lists needs impressions with their {POSITION!r} in a served list "
            "(`recloop prepare --from-db --impressions`); these events have none"
        )
    return cfg.states


def _train_epochs(
    algo: Algo[Any],
    dataset: PreparedDataset,
    *,
    cfg: FitConfig,
    state: FitState,
    callbacks: Sequence[Callback],
    eval_cache: dict[tuple[str, int], Any],
) -> float:
    sampler = TransitionSampler(
        dataset,
        history=algo.cfg.encoder.history,
        batch_size=algo.cfg.batch_size,
        seed=algo.cfg.seed,
        states=training_states(cfg, dataset),
    )
    if sampler.n_transitions == 0:
        raise DataError("the train split holds no events: nothing to train on")
    batches: TransitionSampler | distributed.ShardedSampler = sampler
    main = distributed.is_main()
    if distributed.active():
        batches = distributed.ShardedSampler(
            sampler,
            rank=torch.distributed.get_rank(),
            world_size=torch.distributed.get_world_size(),
        )
        if len(batches) == 0:
            raise DataError(
                f"{sampler.n_transitions} train transitions do not fill one global batch of "
                f"{batches.global_batch} ({batches.world_size} ranks x batch_size "
                f"{sampler.batch_size}); lower batch_size or the number of processes"
            )
        distributed.broadcast_networks(algo.networks().values())
    has_valid = _has_split(dataset, VALID)
    on_cpu = algo.device.type == "cpu"
    total_seconds = 0.0
    p = state.progress
    step, transitions = p.step, p.transitions
    if has_valid and cfg.patience is not None and p.bad_epochs >= cfg.patience:
        state.stop = True  # a resumed run that had already stopped early
    for epoch in range(p.epoch, cfg.epochs):
        if state.stop or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        batches.set_epoch(epoch)
        algo.begin_epoch(epoch)
        algo.train(True)
        acc: dict[str, list[Any]] = {}
        n_epoch = 0
        first_step = step + 1
        t0 = time.perf_counter()
        bar = progress(
            total=len(batches),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            enabled=cfg.progress if main else False,
            mininterval=0.5,
        )
        try:
            for batch in batches:
                if not on_cpu:
                    batch = batch.to(algo.device, non_blocking=True)
                with torch.autocast(
                    algo.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
                ):
                    stats = algo.update(batch)
                for k, v in stats.__dict__.items():
                    acc.setdefault(k, []).append(v)
                step += 1
                n_epoch += int(batch.action.shape[0])
                bar.update(1)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
        finally:
            bar.close()
        if not on_cpu:
            torch.cuda.synchronize(algo.device)
        seconds = time.perf_counter() - t0
        _check_finite_training(algo, acc.get("loss", []), epoch=epoch + 1, first_step=first_step)
        total_seconds += seconds
        n_epoch = distributed.all_sum(n_epoch)  # every rank's share of the global batches
        transitions += n_epoch
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "transitions": n_epoch,
            "seconds": round(seconds, 4),
            "transitions_per_s": n_epoch / seconds if seconds > 0 else 0.0,
            "train": _epoch_means(acc),
        }
        last = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
        due = last or (cfg.eval_every > 0 and (epoch + 1) % cfg.eval_every == 0)
        if has_valid and main and due:
            t_eval = time.perf_counter()
            record["valid"] = evaluate_split(
                algo, dataset, split="valid", cfg=cfg, cache=eval_cache
            )
            record["eval_seconds"] = round(time.perf_counter() - t_eval, 4)
        state.progress = dataclasses.replace(
            state.progress, epoch=epoch + 1, step=step, transitions=transitions
        )
        for cb in callbacks:
            cb.on_epoch_end(state, record)
        state.stop = distributed.broadcast_flag(state.stop)  # rank 0's early stopping
        state.history.append(record)
    return total_seconds
