"""The Python face of training: ``ReinforceConfig(...).create().fit(dataset)`` and runs.

:class:`Recommender` wraps one algorithm: it builds the networks for a dataset, fits them
with the fit loop, evaluates, recommends raw item ids and saves the serving artifact.
:func:`train_run` is what ``recloop train`` (and the demo) call: config → data → fit →
artifact + ``results.json`` in a run directory::

    RUN_DIR/
      run.json         algorithm, full config, fit settings, data path (written first)
      metrics.jsonl    one record per epoch
      checkpoint/      last.pt, best.pt (resume)
      artifact/        the serving bundle (recloop.artifacts)
      results.json     final valid / test metrics
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from recloop import __version__
from recloop.algos.base import ALGOS, Algo, AlgoConfig, DatasetSpec
from recloop.artifacts.bundle import ARTIFACT_DIR, save_artifact
from recloop.artifacts.policy import PolicyNet
from recloop.config import config_from_dict, config_to_dict, merge
from recloop.data.dataset import PreparedDataset
from recloop.data.sampler import gather_windows
from recloop.errors import ConfigError, DataError
from recloop.ranking import topk
from recloop.training import distributed
from recloop.training.callbacks import Callback
from recloop.training.device import resolve_device, seed_everything
from recloop.training.fit import FitConfig, FitResult
from recloop.training.fit import fit as fit_loop
from recloop.training.runconfig import load_run_config

if TYPE_CHECKING:
    from recloop.evaluation import RankingReport
    from recloop.training.tracking import Tracker

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RESULTS_FILE = "results.json"
_RUN_OUTPUTS = (RUN_FILE, RESULTS_FILE, "metrics.jsonl", "checkpoint", ARTIFACT_DIR, "tensorboard")


@dataclass(frozen=True)
class Recommendations:
    """Top-n raw item ids per user, best first."""

    users: list[str]
    """The raw user ids asked for."""
    items: list[list[str]]
    """Raw item ids, ``n`` per user (fewer when fewer items are left after exclusions)."""
    scores: np.ndarray  # (B, n) float32, the policy's top scores, -inf past the end of items


def dataset_summary(dataset: PreparedDataset) -> dict[str, Any]:
    """What an artifact records about its training data: counts, path and file hashes."""
    return {
        **dataset.summary(),
        "path": str(dataset.path.resolve()) if dataset.path is not None else None,
        "files": dict(dataset.manifest.get("files", {})),
    }


def user_histories(
    dataset: PreparedDataset, users: np.ndarray, *, history: int
) -> tuple[Tensor, Tensor]:
    """Each user's last ``history`` items and rewards in ``dataset`` (all splits), left-padded.

    ``users`` (B,) int indices (0 = unknown: an empty history) → (B, H) int64, (B, H) float32.
    """
    u = np.asarray(users, np.int64)
    start = dataset.user_offsets[u]
    end = np.where(u > 0, dataset.user_offsets[u + 1], start)
    win = gather_windows(dataset.item, dataset.reward, end=end, start=start, length=history)
    return torch.from_numpy(win.item.astype(np.int64)), torch.from_numpy(win.reward)


def consumed_mask(dataset: PreparedDataset, users: np.ndarray) -> Tensor:
    """(B, N + 1) bool: True where user b has an event with the item (any split)."""
    u = np.asarray(users, np.int64)
    mask = np.zeros((u.shape[0], dataset.n_items + 1), bool)
    lengths = np.where(u > 0, dataset.user_offsets[u + 1] - dataset.user_offsets[u], 0)
    rows = np.repeat(np.arange(u.shape[0]), lengths)
    starts = np.repeat(dataset.user_offsets[u], lengths)
    within = np.arange(rows.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    mask[rows, dataset.item[starts + within]] = True
    return torch.from_numpy(mask)


def pad_histories(histories: Sequence[Sequence[int]], *, history: int) -> Tensor:
    """Item-index lists → (B, H) int64, keeping the last H of each, left-padded with 0."""
    out = torch.zeros((len(histories), history), dtype=torch.int64)
    for b, items in enumerate(histories):
        tail = list(items)[-history:]
        if tail:
            out[b, history - len(tail) :] = torch.as_tensor(tail, dtype=torch.int64)
    return out


class Recommender:
    """One algorithm, fitted on one dataset; ``AlgoConfig.create()`` returns one."""

    def __init__(self, cfg: AlgoConfig) -> None:
        import recloop.algos  # noqa: F401  (fills the registry)

        cls = ALGOS.get(cfg.algo)
        if not isinstance(cfg, cls.config_class):
            raise ConfigError(
                f"{type(cfg).__name__} is not the config of {cfg.algo!r} "
                f"({cls.config_class.__name__})"
            )
        self.cfg = cfg
        self.algo_class = cls
        self.algo: Algo[Any] | None = None
        self.dataset: PreparedDataset | None = None
        self.result: FitResult | None = None
        self._user_index: dict[str, int] | None = None
        self._item_index: dict[str, int] | None = None

    @property
    def name(self) -> str:
        return self.cfg.algo

    @property
    def policy(self) -> PolicyNet:
        return self._built().policy

    def _built(self) -> Algo[Any]:
        if self.algo is None:
            raise ConfigError(f"the {self.name} recommender is not fitted yet: call .fit(dataset)")
        return self.algo

    def build(self, dataset: PreparedDataset, *, device: str = "auto") -> Algo[Any]:
        """Seed, load pretrained embeddings if configured, and build the networks."""
        dev = resolve_device(device)
        seed_everything(self.cfg.seed)
        item_emb = user_emb = None
        if self.cfg.pretrained is not None:
            from recloop.embeddings import load_embeddings

            pre = load_embeddings(Path(self.cfg.pretrained), dataset=dataset)
            item_emb, user_emb = pre.item_embeddings, pre.user_embeddings
        spec = DatasetSpec.from_dataset(dataset, item_embeddings=item_emb, user_embeddings=user_emb)
        self.algo = self.algo_class(self.cfg, spec, device=dev)
        self.dataset = dataset
        self._user_index = self._item_index = None
        return self.algo

    def fit(
        self,
        dataset: PreparedDataset,
        *,
        fit: FitConfig | None = None,
        run_dir: Path | None = None,
        resume: bool = False,
        callbacks: Sequence[Callback] = (),
    ) -> FitResult:
        """Train on ``dataset``'s train split (see :func:`recloop.training.fit.fit`).

        The networks are built on the first call (or for a new dataset); a second call on
        the same dataset continues training from the current weights.
        """
        # the algorithm's tuned fit settings (fit_defaults) when no fit config is given
        cfg = fit if fit is not None else config_from_dict(FitConfig, dict(self.cfg.fit_defaults))
        if self.algo is None or self.dataset is not dataset:
            self.build(dataset, device=cfg.device)
        assert self.algo is not None
        self.result = fit_loop(
            self.algo, dataset, cfg=cfg, run_dir=run_dir, resume=resume, callbacks=callbacks
        )
        return self.result

    def evaluate(
        self,
        dataset: PreparedDataset | None = None,
        *,
        split: str = "test",
        mask_consumed: bool = True,
        ks: tuple[int, ...] = (5, 10, 20),
        batch_size: int = 1024,
    ) -> RankingReport:
        """Full-ranking metrics of the fitted policy on ``split`` of ``dataset`` (default:
        the dataset it was fitted on)."""
        from recloop.evaluation import EvalConfig, evaluate

        algo = self._built()
        ds = dataset if dataset is not None else self.dataset
        assert ds is not None
        algo.train(False)
        return evaluate(
            algo.policy,
            ds,
            split=split,
            history=algo.cfg.encoder.history,
            cfg=EvalConfig(ks=ks, mask_consumed=mask_consumed, batch_size=batch_size),
            device=algo.device,
        )

    def _indices(self) -> tuple[dict[str, int], dict[str, int]]:
        if self._user_index is None or self._item_index is None:
            ds = self.dataset
            assert ds is not None
            self._user_index = {u: i for i, u in enumerate(ds.user_ids, start=1)}
            self._item_index = {x: i for i, x in enumerate(ds.item_ids, start=1)}
        return self._user_index, self._item_index

    @torch.inference_mode()
    def recommend(
        self,
        users: Sequence[str],
        *,
        n: int = 10,
        histories: Sequence[Sequence[str]] | None = None,
        exclude_consumed: bool = True,
    ) -> Recommendations:
        """Top-``n`` raw item ids for raw user ids.

        Without ``histories`` a user's state reads their last H events in the fitted
        dataset (all splits); unknown users get the unknown-user row and an empty
        history.  ``exclude_consumed`` drops items the user has in the dataset or in the
        given history.  Unknown raw item ids in ``histories`` raise :class:`DataError`.
        """
        algo = self._built()
        ds = self.dataset
        assert ds is not None
        user_index, item_index = self._indices()
        h = algo.cfg.encoder.history
        u = np.array([user_index.get(str(x), 0) for x in users], np.int64)
        if histories is None:
            hist, rew = user_histories(ds, u, history=h)
        else:
            if len(histories) != len(users):
                raise DataError(f"{len(histories)} histories given for {len(users)} users")
            idx: list[list[int]] = []
            for raw in histories:
                unknown = [x for x in raw if str(x) not in item_index]
                if unknown:
                    raise DataError(f"unknown item id {unknown[0]!r} in the history")
                idx.append([item_index[str(x)] for x in raw])
            hist = pad_histories(idx, history=h)
            rew = (hist != 0).to(torch.float32)
        exclude = consumed_mask(ds, u) if exclude_consumed else None
        if exclude is not None and histories is not None:
            exclude.scatter_(1, hist, True)
        algo.train(False)
        dev = algo.device
        scores = algo.policy(torch.from_numpy(u).to(dev), hist.to(dev), rew.to(dev)).cpu()
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        top = topk(scores, min(n, ds.n_items), row_keys=torch.from_numpy(u))
        finite = torch.isfinite(top.values).tolist()
        items = [
            [ds.item_ids[i - 1] for i, ok in zip(row, oks, strict=True) if ok]
            for row, oks in zip(top.indices.tolist(), finite, strict=True)
        ]
        return Recommendations(
            users=[str(x) for x in users], items=items, scores=top.values.numpy()
        )

    def save(self, run_dir: Path) -> Path:
        """Write the serving artifact to ``RUN_DIR/artifact/``; returns that directory."""
        algo = self._built()
        ds = self.dataset
        assert ds is not None
        metrics: dict[str, Any] = {}
        if self.result is not None:
            metrics = {
                "valid": self.result.valid,
                "test": self.result.test,
                "mask_consumed": self.result.mask_consumed,
                "best_epoch": self.result.best_epoch,
                "epochs": self.result.epochs,
            }
        return save_artifact(
            Path(run_dir) / ARTIFACT_DIR,
            algo=self.name,
            config=self.cfg,
            policy=algo.policy,
            popularity=algo.spec.popularity,
            user_ids=ds.user_ids,
            item_ids=ds.item_ids,
            dataset_summary=dataset_summary(ds),
            metrics=metrics,
        )


def read_run(run_dir: Path) -> dict[str, Any]:
    """The ``run.json`` of a run directory ({} when there is none)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        out: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
    return out


def train_run(
    algo: str | None,
    data: Path,
    run_dir: Path,
    *,
    config_path: Path | None = None,
    overrides: Sequence[str] = (),
    epochs: int | None = None,
    device: str | None = None,
    pretrained: str | None = None,
    progress: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    values: Mapping[str, Any] | None = None,
    trackers: Sequence[Tracker] = (),
) -> FitResult:
    """Train one algorithm on a prepared dataset into ``run_dir``; what ``recloop train`` does.

    The config (``--config`` file, ``--set`` overrides, and the flags ``epochs``, ``device``,
    ``pretrained``, ``progress``) is validated before the data is read.  ``resume`` continues
    the run in ``run_dir`` from its last checkpoint with the config recorded in its
    ``run.json`` (fit settings such as ``epochs`` may be changed, the algorithm's may not).
    A directory that already holds a run is refused unless ``resume`` or ``overwrite``.
    Returns the :class:`FitResult` with ``artifact`` set.  ``trackers`` (see
    :mod:`recloop.training.tracking`) get the hyper-parameters, every epoch's metrics, then
    the final metrics, the evaluation table and the artifact.
    """
    run_dir = Path(run_dir)
    saved = read_run(run_dir)
    if saved and not resume and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({RUN_FILE}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if resume and not saved:
        raise ConfigError(f"{run_dir}: nothing to resume (no {RUN_FILE})")
    base = None
    if resume:
        base = {"algo": saved["algo"], **saved["config"], "fit": saved.get("fit", {})}
    flag_values: dict[str, Any] = {
        "pretrained": pretrained,
        "fit": {"epochs": epochs, "device": device, "progress": progress},
    }
    flag_values = merge(flag_values, values or {})
    run = load_run_config(
        algo, path=config_path, values=flag_values, overrides=overrides, base=base
    )
    # Started by torchrun as one of several ranks: join the group on the run's device.
    ctx = distributed.setup(run.fit.device) if distributed.launched() else None
    main = ctx is None or ctx.is_main
    distributed.barrier()  # every rank has read the directory before rank 0 changes it
    if saved and not resume:
        for name in _RUN_OUTPUTS if main else ():
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        saved = {}
    if ctx is not None:
        run = dataclasses.replace(run, fit=dataclasses.replace(run.fit, device=ctx.device))
    if any(t.name == "tensorboard" for t in trackers) and not run.fit.tensorboard:
        # the per-epoch scalars come from the fit loop's TensorBoard sink: asked for, it is on
        run = dataclasses.replace(run, fit=dataclasses.replace(run.fit, tensorboard=True))
    dataset = PreparedDataset.load(Path(data))
    if not main:
        result = run.config.create().fit(dataset, fit=run.fit, run_dir=run_dir, resume=resume)
        distributed.barrier()  # rank 0 saves the artifact
        return result
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(
        json.dumps(
            {
                "algo": run.algo,
                "config": config_to_dict(run.config),
                "fit": config_to_dict(run.fit),
                "data": str(Path(data).resolve()),
                "recloop_version": __version__,
                "distributed": distributed.describe(ctx),
                "created_at": saved.get("created_at")
                or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        )
        + "\n"
    )
    rec = run.config.create()
    try:
        for tracker in trackers:
            tracker.start(
                params={
                    "algo": run.algo,
                    **config_to_dict(run.config),
                    "fit": config_to_dict(run.fit),
                },
                tags={
                    "run_name": run_dir.name,
                    "recloop.algo": run.algo,
                    "recloop.run_dir": str(run_dir.resolve()),
                    "recloop.data": str(Path(data).resolve()),
                    "recloop.version": __version__,
                    "recloop.resumed": str(resume).lower(),
                },
            )
        result = rec.fit(dataset, fit=run.fit, run_dir=run_dir, resume=resume, callbacks=trackers)
        artifact = rec.save(run_dir)
        result = dataclasses.replace(result, artifact=artifact)
        rec.result = result
        (run_dir / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        for tracker in trackers:
            tracker.finish(result, run_dir=run_dir)
    except BaseException as exc:
        for tracker in trackers:
            tracker.abort(exc)
        raise
    distributed.barrier()  # the other ranks wait for rank 0's artifact
    return result
