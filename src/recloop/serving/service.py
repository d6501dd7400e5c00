"""The recommendation service in plain Python: raw ids in, ranked raw ids out.

:class:`RecommenderService` knows nothing of HTTP.  Per request it maps raw ids to indices,
reads the user's recent items from the online store, scores every policy-answerable request
of a batch in one inference call, masks consumed items, and falls back to popular items
(real-time from the store, else the artifact's train counts) when the policy cannot answer.

Concurrency: the served model is one immutable :class:`LoadedModel` behind one attribute;
a reload builds the next one off the event loop and swaps the reference, and every batch
reads the reference once, so requests in flight finish on the model they started with.
Concurrent single requests are gathered by :class:`MicroBatcher` into one call of
:meth:`RecommenderService.recommend_many` — one store round trip and one forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from recloop.artifacts import Artifact, load_artifact
from recloop.artifacts.ann import ItemIndex, load_index
from recloop.errors import ArtifactError, ConfigError, RecloopError
from recloop.ranking import topk, topk_inner_product
from recloop.serving import exploration
from recloop.serving.ab import AbSplit
from recloop.serving.admin import log_safe
from recloop.serving.metrics import ServiceMetrics
from recloop.serving.schemas import RecommendRequest
from recloop.serving.served_log import ServedLog
from recloop.serving.settings import ServeSettings
from recloop.stores import OnlineStore, Scored, StoreDataError

logger = logging.getLogger(__name__)

MAX_LISTED_IDS = 10
"""Unknown ids named in one warning; the rest are counted."""

CHUNKED_ITEMS = 65_536
"""Catalogues above this size are ranked in item chunks when the head allows it."""
CHUNK_CELLS = 1 << 20
"""Scores per chunk of a micro-batch (rows x items): about 4 MB, cache-sized."""
MIN_CHUNK = 4096
"""Fewest items per chunk (larger batches would otherwise take tiny chunks)."""

SOURCE_POLICY = "policy"
SOURCE_POPULAR = "popular"

CORRUPT: Any = object()
"""What :meth:`RecommenderService._from_store` returns for a value the store cannot decode."""


Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], torch.Tensor]
"""``(user (B,), history (B, H), history_reward (B, H)) -> scores (B, N + 1)``, writable."""


def torch_scorer(artifact: Artifact) -> Scorer:
    """The artifact's PyTorch policy (called under ``inference_mode``)."""
    policy = artifact.policy

    def score(user: np.ndarray, history: np.ndarray, reward: np.ndarray) -> torch.Tensor:
        return policy(torch.from_numpy(user), torch.from_numpy(history), torch.from_numpy(reward))

    return score


def onnx_scorer(artifact: Artifact, *, threads: int = 1, tolerance: float = 1e-3) -> Scorer:
    """The artifact's policy exported to ONNX once, in memory, and run by onnxruntime.

    The export is checked against PyTorch on random inputs first (a max difference above
    ``tolerance`` times the largest score, or 1, is refused).  onnxruntime runs a small GRU
    policy at batch 1 about 5x faster than eager PyTorch on these CPUs (docs/benchmarks.md).
    """
    import tempfile

    from recloop.artifacts.export import OUTPUT, check_onnx, export_onnx

    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "inference = onnxruntime needs onnxruntime and onnx: pip install 'recloop[export]'"
        ) from None
    with tempfile.TemporaryDirectory(prefix="recloop-onnx-") as tmp:
        path = export_onnx(artifact, Path(tmp) / "policy.onnx")
        diff = check_onnx(path, artifact, relative=True)
        if diff > tolerance:
            raise ArtifactError(
                f"{artifact.path}: the ONNX export differs from PyTorch by {diff:.2e} of its "
                f"largest score (> {tolerance:g}); serve it with inference = torch"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            path.read_bytes(), options, providers=["CPUExecutionProvider"]
        )
    names = [i.name for i in session.get_inputs()]

    def score(user: np.ndarray, history: np.ndarray, reward: np.ndarray) -> torch.Tensor:
        feed = {"user": user, "history": history, "history_reward": reward}
        (out,) = session.run([OUTPUT], {n: feed[n] for n in names})
        return torch.from_numpy(out)

    return score


@dataclass(frozen=True, kw_only=True, eq=False)
class LoadedModel:
    """An artifact with everything the request path precomputes from it."""

    artifact: Artifact
    """The loaded artifact (policy in eval mode)."""
    model_version: str
    """``artifact.model_version``."""
    history_len: int
    """H."""
    n_items: int
    """N."""
    item_ids: np.ndarray  # (N + 1,) object: raw item id per index, "" at padding
    item_index: dict[str, int]
    """Raw item id → index."""
    user_index: dict[str, int]
    """Raw user id → index."""
    train_popular: np.ndarray  # (N,) int64 item indices by train popularity, best first
    train_counts: np.ndarray  # (N + 1,) float32 train-set counts
    scorer: Scorer
    """The policy's forward pass (PyTorch or onnxruntime)."""
    inference: str = "torch"
    """Which engine ``scorer`` runs on: torch or onnxruntime."""
    serving: Mapping[str, Any] = field(default_factory=dict)
    """The artifact's ``serving`` section (default policy, temperature, epsilon; unset keys
    absent), see :class:`recloop.artifacts.manifest.ServingSection`."""
    ann: ItemIndex | None = None
    """The artifact's approximate item index when top-k lists are served from it."""
    ann_margin: int = 16
    """Candidates asked of the index beyond k plus the row's masked items."""
    chunked: bool = False
    """Exact top-k lists are ranked in item chunks (:meth:`score_chunked`): a PyTorch policy
    whose head is an inner product, over a catalogue of more than ``CHUNKED_ITEMS`` items."""

    @classmethod
    def from_artifact(
        cls,
        artifact: Artifact,
        *,
        inference: str = "torch",
        threads: int = 1,
        search: str = "auto",
        ann_margin: int = 16,
    ) -> LoadedModel:
        """``search``: ``auto`` (the artifact's index when it has one), ``ann`` (its index, or
        refuse to load) or ``exact`` (score every item)."""
        counts = np.asarray(artifact.popularity, dtype=np.float32)
        # Ties between equal counts follow recloop.ranking's hashed keys, not index order.
        ranked = topk(torch.from_numpy(counts[None, 1:]), len(counts) - 1, row_keys=torch.zeros(1))
        order = ranked.indices[0].numpy().astype(np.int64) + 1
        ann = load_ann(artifact, search=search, threads=threads)
        model = cls(
            artifact=artifact,
            model_version=artifact.model_version,
            history_len=artifact.history_len,
            n_items=artifact.n_items,
            item_ids=np.array(["", *artifact.item_ids], dtype=object),
            item_index=artifact.item_index,
            user_index=artifact.user_index,
            train_popular=order,
            train_counts=counts,
            scorer=(
                onnx_scorer(artifact, threads=threads)
                if inference == "onnxruntime"
                else torch_scorer(artifact)
            ),
            inference=inference,
            serving={
                k: v for k, v in (artifact.manifest.get("serving") or {}).items() if v is not None
            },
            ann=ann,
            ann_margin=ann_margin,
            chunked=(
                inference == "torch"
                and artifact.n_items + 1 > CHUNKED_ITEMS
                and artifact.policy.factors()
            ),
        )
        model.warm_up()
        return model

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        inference: str = "torch",
        threads: int = 1,
        search: str = "auto",
        ann_margin: int = 16,
    ) -> LoadedModel:
        """Load and verify an artifact (raises :class:`ArtifactError`)."""
        try:
            return cls.from_artifact(
                load_artifact(path),
                inference=inference,
                threads=threads,
                search=search,
                ann_margin=ann_margin,
            )
        except RecloopError:
            raise
        except Exception as exc:  # a corrupt file can fail deep inside torch or safetensors
            raise ArtifactError(
                f"{path}: cannot load artifact ({type(exc).__name__}: {exc})"
            ) from exc

    def warm_up(self) -> None:
        """One pass of every scoring path the model uses, so the first request does not pay
        for lazy initialisation."""
        h = self.history_len
        batch: dict[str, Any] = {
            "user": np.zeros(2, np.int64),
            "history": np.zeros((2, h), np.int64),
            "history_reward": np.zeros((2, h), np.float32),
            "exclude_rows": np.zeros(0, np.int64),
            "exclude_cols": np.zeros(0, np.int64),
            "k": 1,
        }
        self.score(**batch)
        if self.chunked:
            self.score_chunked(**batch)
        if self.ann is not None:
            self.score_ann(**batch)

    def score(
        self,
        *,
        user: np.ndarray,
        history: np.ndarray,
        history_reward: np.ndarray,
        exclude_rows: np.ndarray,
        exclude_cols: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (indices, scores), each (B, k), best first; excluded items score -inf.

        ``user`` (B,) int64, ``history`` (B, H) int64 left-padded, ``history_reward`` (B, H)
        float32; ``exclude_rows``/``exclude_cols`` (E,) int64 pairs (row, item index) to mask.
        The mask is written into the score tensor in place: no (B, N + 1) boolean mask.
        """
        idx, val, _ = self.score_full(
            user=user,
            history=history,
            history_reward=history_reward,
            exclude_rows=exclude_rows,
            exclude_cols=exclude_cols,
            k=k,
        )
        return idx, val

    @torch.inference_mode()
    def score_full(
        self,
        *,
        user: np.ndarray,
        history: np.ndarray,
        history_reward: np.ndarray,
        exclude_rows: np.ndarray,
        exclude_cols: np.ndarray,
        k: int,
        top_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """:meth:`score`, plus every masked score (B, N + 1) (the padding column too, which
        the exploring policies never show).  ``top_rows`` (R,) int64: compute the top-k of
        these rows only (the indices and values are then (R, k); rows whose policy samples
        from all the scores need no top-k)."""
        scores = self.scorer(user, history, history_reward)
        # a NaN or +inf score is a numerical fault, not a preference: never shown, so that
        # every policy fills its list from the finite ones (top-k ranked +inf first and then
        # dropped it, answering fewer items than asked)
        peak = float(scores.amax()) if scores.numel() else 0.0  # NaN if any is NaN
        if math.isnan(peak) or peak == math.inf:  # one pass when all is well
            bad = torch.isnan(scores) | torch.isposinf(scores)
            scores = scores.masked_fill(bad, float("-inf"))
            _warn_non_finite(int(bad.sum()), self.model_version)
        if len(exclude_rows):
            scores[torch.from_numpy(exclude_rows), torch.from_numpy(exclude_cols)] = float("-inf")
        k = min(k, self.n_items)
        if top_rows is None:
            top = topk(scores, k, row_keys=torch.from_numpy(user))
        elif len(top_rows) == 0:
            empty = np.zeros((0, k), np.int64)
            return empty, empty.astype(np.float32), scores
        else:
            rows = torch.from_numpy(top_rows)
            top = topk(scores[rows], k, row_keys=torch.from_numpy(user[top_rows]))
        return top.indices.numpy(), top.values.numpy(), scores

    @torch.inference_mode()
    def score_chunked(
        self,
        *,
        user: np.ndarray,
        history: np.ndarray,
        history_reward: np.ndarray,
        exclude_rows: np.ndarray,
        exclude_cols: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score` without the (B, N + 1) table: the head's inner product ranked in item
        chunks by :func:`recloop.ranking.topk_inner_product` (the same lists; a score may
        differ from the whole table's in its last bit, as chunked matrix products round)."""
        policy = self.artifact.policy
        b = len(user)
        inner = policy.inner_product(
            torch.from_numpy(user), torch.from_numpy(history), torch.from_numpy(history_reward)
        )
        assert inner is not None  # chunked is set only for heads that factor
        width = self.n_items + 1
        # the padding column and the masked (row, item) pairs, as flat keys of the table
        exclude = np.concatenate(
            [np.arange(b, dtype=np.int64) * width, exclude_rows * width + exclude_cols]
        )
        top = topk_inner_product(
            inner,
            min(k, self.n_items),
            row_keys=torch.from_numpy(user),
            exclude=torch.from_numpy(exclude),
            chunk=max(MIN_CHUNK, CHUNK_CELLS // max(b, 1)),
        )
        return top.indices.numpy(), top.values.numpy()

    @torch.inference_mode()
    def score_ann(
        self,
        *,
        user: np.ndarray,
        history: np.ndarray,
        history_reward: np.ndarray,
        exclude_rows: np.ndarray,
        exclude_cols: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score` over the candidates of the approximate index.

        Per row the index is asked for k + (that batch's most masked items in one row) +
        ``ann_margin`` candidates; they are rescored exactly, masked, and ranked by
        :func:`recloop.ranking.topk` with the tie-break keys of their item indices, so a list
        differs from :meth:`score`'s only by the items the index missed.  The state is
        computed by PyTorch whatever ``inference`` says (onnxruntime exports the full scores).
        """
        assert self.ann is not None
        policy = self.artifact.policy
        b = len(user)
        k = min(k, self.n_items)
        user_t = torch.from_numpy(user)
        state = policy.state(user_t, torch.from_numpy(history), torch.from_numpy(history_reward))
        query = self.ann.form.query(state)  # (B, d)
        most_masked = int(np.bincount(exclude_rows, minlength=b).max()) if len(exclude_rows) else 0
        c = min(self.n_items, k + most_masked + self.ann_margin)
        cand = self.ann.search(query, c)  # (B, C) item indices, 0 where none was found
        scores = self.ann.form.rescore(query, cand)
        masked = cand == 0
        if len(exclude_rows):
            # (row, item) pairs as one int64 key each: the candidates to mask in one isin
            width = self.n_items + 1
            cand_np = cand.numpy()
            keys = np.arange(b, dtype=np.int64)[:, None] * width + cand_np
            hit = np.isin(keys, exclude_rows * width + exclude_cols)
            masked |= torch.from_numpy(hit)
        scores.masked_fill_(masked, float("-inf"))
        top = topk(scores, k, row_keys=user_t, items=cand)
        return cand.gather(1, top.indices).numpy(), top.values.numpy()


def load_ann(artifact: Artifact, *, search: str, threads: int) -> ItemIndex | None:
    """The artifact's item index as ``search`` asks (see :meth:`LoadedModel.from_artifact`)."""
    if search == "exact":
        return None
    if search == "ann" and artifact.manifest.get("index") is None:
        raise ArtifactError(
            f"{artifact.path}: search = ann but the artifact has no index "
            "(build one with: recloop index build ARTIFACT)"
        )
    try:
        ann = load_index(artifact)
    except ConfigError:  # faiss is not installed
        if search == "ann":
            raise
        logger.warning(
            "%s has an approximate index but faiss is not installed (pip install "
            "'recloop[ann]'): scoring every item",
            artifact.path,
        )
        return None
    if ann is not None:
        import faiss  # load_index succeeded, so it is installed

        # one thread per worker, as torch: the workers, not threads, use the cores
        faiss.omp_set_num_threads(threads)
    return ann


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedContext:
    """What a list was drawn from, beyond the user: logged with the list so that OPE's
    ``served`` target scores every model on the very context the service saw (it cannot be
    rebuilt from the log when the state came from the online store)."""

    recent: Sequence[tuple[str, float]]
    """(raw item id, reward) the state was built from, oldest first: the request's
    ``recent_items``, else the store's list; ids the model does not know included (another
    model may know them)."""
    excluded: set[str]
    """Raw ids of every consumed item excluded from the ranking, those the model does not
    know included: another model's service, knowing them, would have masked them."""

    def to_doc(self) -> dict[str, list[Any]]:
        """``{"recent": [id, ...], "rewards": [r, ...], "excluded": [id, ...]}``."""
        return {
            "recent": [i for i, _ in self.recent],
            "rewards": [r for _, r in self.recent],
            "excluded": sorted(self.excluded),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class Recommendation:
    """One answer: ranked raw ids with scores."""

    item_ids: list[str]
    """Raw item ids, best first."""
    scores: list[float]
    """Their scores."""
    model_version: str
    """The model that answered (also for popular fallbacks)."""
    source: str
    """``policy`` or ``popular``."""
    warnings: list[str]
    """What was ignored or unavailable."""
    recommendation_id: str = ""
    """Id of this served list (logged with it)."""
    user_id: str = ""
    """The raw user id asked for."""
    propensities: list[float] | None = None
    """Probability of each item at its position (see :mod:`.exploration`); None: all 1."""
    slate_propensity: float | None = 1.0
    """Probability of the whole list (None for epsilon-greedy)."""
    policy: str = "topk"
    """Serving policy that drew it: topk, softmax or epsilon."""
    temperature: float | None = None
    epsilon: float | None = None
    seed: int | None = None
    """Seed of the draws, to reproduce the list."""
    ts: int = 0
    """Unix time it was served, in whole seconds."""
    arm: str | None = None
    """A/B arm that served it (None: no A/B split)."""
    context: ServedContext | None = None
    """What the model drew the list from (None for the popular fallback)."""

    def _propensities(self) -> list[float]:
        return self.propensities if self.propensities is not None else [1.0] * len(self.item_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "recommendation_id": self.recommendation_id,
            "items": [
                {"item_id": i, "score": s, "propensity": p}
                for i, s, p in zip(self.item_ids, self.scores, self._propensities(), strict=True)
            ],
            "slate_propensity": self.slate_propensity,
            "policy": {
                "name": self.policy,
                "temperature": self.temperature,
                "epsilon": self.epsilon,
                "seed": self.seed,
            },
            "model_version": self.model_version,
            "arm": self.arm,
            "source": self.source,
            "warnings": self.warnings,
        }

    def log_doc(self) -> dict[str, Any]:
        """The served-list document of :mod:`recloop.streaming.served`."""
        return {
            "recommendation_id": self.recommendation_id,
            "user_id": self.user_id,
            "ts": self.ts,
            "model_version": self.model_version,
            "arm": self.arm,
            "policy": self.policy,
            "temperature": self.temperature,
            "epsilon": self.epsilon,
            "seed": self.seed,
            "source": self.source,
            "slate_propensity": self.slate_propensity,
            "items": self.item_ids,
            "scores": self.scores,
            "propensities": self._propensities(),
            "context": None if self.context is None else self.context.to_doc(),
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class PopularList:
    items: list[Scored]
    """(raw item id, score), best first."""
    source: str
    """``realtime`` (from the store) or ``train`` (artifact counts)."""
    model_version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "items": [{"item_id": i, "score": s} for i, s in self.items],
            "source": self.source,
            "model_version": self.model_version,
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class ReloadResult:
    model_version: str
    previous_model_version: str
    artifact: str


def _name_ids(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_LISTED_IDS])
    more = len(ids) - MAX_LISTED_IDS
    return shown + (f" and {more} more" if more > 0 else "")


class _Row:
    """Per-request working state of one batch (internal)."""

    __slots__ = (
        "arm",
        "consumed_raw",
        "epsilon",
        "exclude",
        "hist",
        "hist_reward",
        "n",
        "policy",
        "recent",
        "seed",
        "temperature",
        "user",
        "user_id",
        "warnings",
    )

    def __init__(self, n: int) -> None:
        self.n = n
        self.arm: str | None = None
        self.user_id = ""
        self.policy = "topk"
        self.temperature: float | None = None
        self.epsilon: float | None = None
        self.seed: int | None = None
        self.user = 0
        self.hist: list[int] = []
        self.hist_reward: list[float] = []
        self.recent: Sequence[tuple[str, float]] = ()
        self.exclude: set[int] = set()
        self.consumed_raw: set[str] = set()
        self.warnings: list[str] = []


def _fill_row(row: _Row, req: RecommendRequest, model: LoadedModel, stored: list[Scored]) -> None:
    """Map one request's raw ids: user index, the state's history, items to exclude.

    The state reads the given ``recent_items`` when the request has them (with the rewards
    given as ``{"item", "reward"}`` entries, 1 for a bare id), else the stored list (with its
    logged rewards); both are excluded when asked.  Ids the model does not know are dropped —
    named in a warning when the client sent them.
    """
    item_index = model.item_index
    h = model.history_len
    row.user_id = req.user_id
    row.user = model.user_index.get(req.user_id, 0)
    if req.recent_items is not None:
        known = []
        known_reward = []
        unknown = []
        raws = []
        recent = []
        for entry in req.recent_items:
            raw, reward = (entry, 1.0) if isinstance(entry, str) else (entry.item, entry.reward)
            raws.append(raw)
            recent.append((raw, float(reward)))
            idx = item_index.get(raw)
            if idx is None:
                unknown.append(raw)
            else:
                known.append(idx)
                known_reward.append(float(reward))
        if unknown:
            row.warnings.append(f"unknown item ids ignored: {_name_ids(unknown)}")
        row.hist = known[-h:]
        row.hist_reward = known_reward[-h:]
        row.recent = recent
        if req.exclude_consumed:
            row.exclude.update(known)
            row.consumed_raw.update(raws)
    else:
        row.recent = stored
        pairs = [(item_index.get(i, 0), r) for i, r in stored]
        pairs = [p for p in pairs if p[0]][-h:]
        row.hist = [i for i, _ in pairs]
        row.hist_reward = [r for _, r in pairs]
    if req.exclude_consumed and stored:
        for raw, _ in stored:
            idx = item_index.get(raw)
            if idx is not None:
                row.exclude.add(idx)
        row.consumed_raw.update(raw for raw, _ in stored)
    if row.user == 0 and row.hist:
        row.warnings.append(f"unknown user {req.user_id!r}: scored from its recent items")


@dataclass(frozen=True, kw_only=True, slots=True)
class PolicyDefaults:
    """What a request that names no policy (or no temperature, epsilon) gets."""

    policy: str
    temperature: float
    epsilon: float

    @classmethod
    def resolve(cls, s: ServeSettings, *layers: Mapping[str, Any]) -> PolicyDefaults:
        """The service's settings, overridden by each layer in turn (the artifact's
        ``serving`` section, then the A/B arm's), keys absent where unset."""
        out = {"policy": s.policy, "temperature": s.temperature, "epsilon": s.epsilon}
        for layer in layers:
            out.update({k: layer[k] for k in out if layer.get(k) is not None})
        name = str(out["policy"])
        return cls(
            policy="softmax" if name == "plackett_luce" else name,
            temperature=float(out["temperature"]),
            epsilon=float(out["epsilon"]),
        )


CURRENT_ARM = "current"
"""Arm name of the current model's lists while a registry canary runs."""
CANARY_ARM = "canary"
"""Arm name of a registry canary's lists."""


@dataclass(frozen=True, kw_only=True, eq=False, slots=True)
class Arm:
    """A model the service answers with, and its A/B name and serving defaults."""

    name: str | None
    """A/B arm name (None: no split)."""
    model: LoadedModel
    path: Path
    """Where ``model`` was loaded from."""
    overrides: Mapping[str, Any]
    """The arm's own policy, temperature, epsilon (unset keys absent)."""
    defaults: PolicyDefaults
    """Settings, then the artifact's serving section, then ``overrides``."""


_NON_FINITE_BATCHES = itertools.count(1)
"""Batches in which a model gave NaN or +inf scores, in this process."""


def _warn_non_finite(n: int, version: str) -> None:
    """Log the first batch with non-finite scores, then every 1,000th."""
    batches = next(_NON_FINITE_BATCHES)
    if batches == 1 or batches % 1000 == 0:
        logger.warning(
            "model %s gave %d NaN or +inf scores in a batch (%d batches so far): those items "
            "are not shown",
            log_safe(version),
            n,
            batches,
        )


def _choose_policy(row: _Row, req: RecommendRequest, d: PolicyDefaults) -> None:
    """The request's serving policy and its settings; where it says none, the arm's
    defaults (service settings < artifact's serving section < A/B arm)."""
    name = req.policy or d.policy
    row.policy = "softmax" if name == "plackett_luce" else name
    if row.policy == "softmax":
        row.temperature = req.temperature if req.temperature is not None else d.temperature
    elif row.policy == "epsilon":
        row.epsilon = req.epsilon if req.epsilon is not None else d.epsilon
    if req.seed is not None:
        row.seed = req.seed
    elif row.policy != "topk":
        row.seed = secrets.randbits(63)  # returned with the list: the answer can be redrawn


def _recommendation_ids(n: int) -> list[str]:
    """``n`` random 128-bit ids as 32 hex digits (uuid4's size), from one system call."""
    blob = os.urandom(16 * n).hex()
    return [blob[32 * i : 32 * (i + 1)] for i in range(n)]


def _seed(row: _Row) -> int:
    if row.seed is None:  # every exploring row has one (:func:`_choose_policy`)
        raise RuntimeError(f"an exploring {row.policy} list without a seed")
    return row.seed


def _explore(row: _Row, scores: np.ndarray, greedy: np.ndarray) -> exploration.Slate:
    """One row's epsilon-greedy list; ``scores`` (N + 1,) float64 masked, ``greedy`` its
    top-n (softmax rows are drawn for the whole batch in :meth:`_score_policy`)."""
    assert row.epsilon is not None
    rng = exploration.thread_generator(_seed(row))
    return exploration.sample_epsilon_greedy(scores, greedy, epsilon=row.epsilon, rng=rng)


class RecommenderService:
    """Answers recommendation requests for the model it holds; swap models with :meth:`reload`."""

    def __init__(
        self,
        *,
        settings: ServeSettings,
        store: OnlineStore,
        model: LoadedModel,
        metrics: ServiceMetrics | None = None,
        artifact_path: Path | None = None,
        served_log: ServedLog | None = None,
        arm_models: Sequence[LoadedModel] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``model`` is the one served (with A/B serving, the first arm's); ``arm_models``
        the other arms' of ``settings.ab``, in order; ``clock`` stamps the served lists
        (unix seconds; a simulation passes its own event time)."""
        self.settings = settings
        self.clock = clock
        self.served_log = served_log
        """Where every served list is queued for logging (None: not logged)."""
        self.store = store
        self.metrics = metrics or ServiceMetrics()
        self.limits = settings.limits
        if len(arm_models) != max(len(settings.ab) - 1, 0):
            raise ConfigError(
                f"{len(settings.ab)} A/B arms need {len(settings.ab) - 1} more models, "
                f"got {len(arm_models)}"
            )
        split = (
            AbSplit([a.weight for a in settings.ab], salt=settings.ab_salt) if settings.ab else None
        )
        control = self._arm(0, model, Path(artifact_path or settings.artifact))
        arms = (
            control,
            *(self._arm(i, m, settings.ab[i].artifact) for i, m in enumerate(arm_models, 1)),
        )
        self._routing: tuple[AbSplit | None, tuple[Arm, ...]] = (split, arms)
        """The user split (None: one arm) and every arm; the first arm is the control,
        swapped by :meth:`reload`.  Replaced as a whole (one reference assignment), read
        once per batch, so a batch never sees a split of one state and arms of another."""
        self._canary: tuple[str, float, str] | None = None
        """(version, share, salt) of the registry canary being served, if any."""
        self._reload_lock = asyncio.Lock()
        self._store_down_until = -1.0
        self._store_failing = False
        self._popular_cache: tuple[float, list[Scored]] | None = None
        self._batcher: MicroBatcher[RecommendRequest, Recommendation] | None = (
            MicroBatcher(self.recommend_many, max_size=settings.microbatch_max)
            if settings.microbatch
            else None
        )
        self._fallback = {
            r: self.metrics.fallbacks.labels(reason=r)
            for r in ("unknown_user", "store_unavailable", "store_corrupt", "train_popular")
        }
        self._served = {
            s: self.metrics.recommendations.labels(source=s)
            for s in (SOURCE_POLICY, SOURCE_POPULAR)
        }
        self._arm_served = {
            (a.name, s): self.metrics.arm_lists.labels(arm=a.name, source=s)
            for a in arms
            if a.name is not None
            for s in (SOURCE_POLICY, SOURCE_POPULAR)
        }
        self.metrics.set_model(model.model_version)

    def _arm_counter(self, name: str, source: str) -> Any:
        counter = self._arm_served.get((name, source))
        if counter is None:  # a canary's arms appear at run time
            counter = self._arm_served[(name, source)] = self.metrics.arm_lists.labels(
                arm=name, source=source
            )
        return counter

    def _arm(self, i: int, model: LoadedModel, path: Path) -> Arm:
        """Arm ``i`` of the settings' split (or the only one) serving ``model``."""
        cfg = self.settings.ab[i] if self.settings.ab else None
        overrides = (
            {}
            if cfg is None
            else {
                k: v
                for k, v in (
                    ("policy", cfg.policy),
                    ("temperature", cfg.temperature),
                    ("epsilon", cfg.epsilon),
                )
                if v is not None
            }
        )
        return Arm(
            name=None if cfg is None else cfg.name,
            model=model,
            path=path,
            overrides=overrides,
            defaults=PolicyDefaults.resolve(self.settings, model.serving, overrides),
        )

    @property
    def _arms(self) -> tuple[Arm, ...]:
        return self._routing[1]

    @property
    def _model(self) -> LoadedModel:
        return self._arms[0].model

    @property
    def model(self) -> LoadedModel:
        """The served model (with A/B serving, the control arm's)."""
        return self._arms[0].model

    @property
    def arms(self) -> tuple[Arm, ...]:
        return self._arms

    @property
    def artifact_path(self) -> Path:
        return self._arms[0].path

    @property
    def _artifact_path(self) -> Path:
        return self._arms[0].path

    @property
    def canary(self) -> tuple[str, float, str] | None:
        """(version, share, salt) of the registry canary this service serves, or None."""
        return self._canary

    async def _load(self, path: Path) -> LoadedModel:
        """Load an artifact as the settings say, in a thread (requests go on meanwhile)."""
        return await asyncio.to_thread(
            LoadedModel.load,
            path,
            inference=self.settings.inference,
            threads=self.settings.torch_threads,
            search=self.settings.search,
            ann_margin=self.settings.ann_margin,
        )

    async def set_canary(self, path: Path | None, *, share: float = 0.0, salt: str = "") -> None:
        """Serve the artifact at ``path`` to a ``share`` of the users (by a hash of the user
        id with ``salt``) and the current model to the others, as arms ``canary`` and
        ``current``; ``path`` None ends the canary.  Refused with A/B arms from the
        settings (they would be silently reshuffled)."""
        if self.settings.ab:
            raise ConfigError("a registry canary cannot run beside A/B arms from the settings")
        async with self._reload_lock:
            control = self._arms[0]
            if path is None:
                self._routing = (None, (dataclasses.replace(control, name=None),))
                self._canary = None
                logger.info("canary ended: serving %s to every user", control.model.model_version)
                return
            model = await self._load(Path(path))
            canary = Arm(
                name=CANARY_ARM,
                model=model,
                path=Path(path),
                overrides={},
                defaults=PolicyDefaults.resolve(self.settings, model.serving),
            )
            split = AbSplit([1.0 - share, share], salt=salt)
            self._routing = (split, (dataclasses.replace(control, name=CURRENT_ARM), canary))
            self._canary = (model.model_version, share, salt)
            logger.info(
                "canary %s on %.0f %% of users beside %s",
                log_safe(model.model_version),
                100 * share,
                log_safe(control.model.model_version),
            )

    # ------------------------------------------------------------------ store access

    def store_available(self) -> bool:
        """False while a recent store failure keeps the store benched."""
        return asyncio.get_running_loop().time() >= self._store_down_until

    async def _from_store(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """``await call()``, or None when the store is benched or fails (then bench it), or
        :data:`CORRUPT` when it answered with data it cannot decode (a bad value under one
        key is not an outage: this read falls back, the store stays in use)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._store_down_until:
            return None
        try:
            got = await call()
        except StoreDataError as exc:
            logger.warning(
                "online store: %s read corrupt data, falling back: %s", what, log_safe(exc)
            )
            self._fallback["store_corrupt"].inc()
            return CORRUPT
        except Exception as exc:  # any store failure must degrade, not fail the request
            if not self._store_failing:
                logger.warning("online store unavailable (%s: %s); serving fallbacks", what, exc)
            self._store_failing = True
            self._store_down_until = loop.time() + self.settings.store_retry_s
            return None
        if self._store_failing:
            logger.warning("online store reachable again")
            self._store_failing = False
        return got

    async def _popular(self) -> tuple[list[Scored] | None, str]:
        """The store's popular list (cached briefly), else None and why not."""
        loop = asyncio.get_running_loop()
        cached = self._popular_cache
        if cached is not None and loop.time() < cached[0]:
            return cached[1], ""
        fetch = self.settings.max_n + self.settings.consumed_len
        got = await self._from_store("get_popular", lambda: self.store.get_popular(fetch))
        if got is CORRUPT:
            return None, "online store's popular items unreadable: popular items from training"
        if got is None:
            return None, "online store unavailable: popular items from training"
        self._popular_cache = (loop.time() + self.settings.popular_cache_s, got)
        return list(got), ""

    # ------------------------------------------------------------------ recommend

    async def recommend(self, req: RecommendRequest) -> Recommendation:
        """One user's list; concurrent calls share a batch when micro-batching is on."""
        if self._batcher is not None:
            return await self._batcher.submit(req)
        return (await self.recommend_many([req]))[0]

    async def recommend_many(self, reqs: Sequence[RecommendRequest]) -> list[Recommendation]:
        """Lists for many users: one store round trip for all of them, and one forward pass
        per A/B arm (one in all without a split)."""
        split, arms = self._routing  # read once: a reload during this batch does not touch it
        s = self.settings

        # Users whose history or consumed items the store holds.
        need = [
            r.user_id
            for r in reqs
            if s.history_source == "store" and (r.recent_items is None or r.exclude_consumed)
        ]
        recent: dict[str, list[Scored]] = {}
        store_warning: str | None = None
        if need:
            fetch = max(max(a.model.history_len for a in arms), s.consumed_len)
            unique = list(dict.fromkeys(need))
            got = await self._from_store(
                "get_recent", lambda: self.store.get_recent(unique, n=fetch)
            )
            if got is CORRUPT:
                store_warning = "online store's recent items unreadable: ignored"
            elif got is None:
                store_warning = "online store unavailable: the user's recent items are unknown"
                self._fallback["store_unavailable"].inc()
            else:
                recent = got

        if split is None or len(arms) == 1:
            recs = await self._answer_arm(arms[0], reqs, recent, store_warning)
        else:
            assign = split.assign
            groups: dict[int, list[int]] = {}
            for i, r in enumerate(reqs):
                groups.setdefault(assign(r.user_id), []).append(i)
            answers: list[Recommendation | None] = [None] * len(reqs)
            for a, where in groups.items():
                got_arm = await self._answer_arm(
                    arms[a], [reqs[i] for i in where], recent, store_warning
                )
                for i, rec in zip(where, got_arm, strict=True):
                    answers[i] = rec
            recs = [r for r in answers if r is not None]
        if self.served_log is not None:
            for rec in recs:
                self.served_log.submit(rec)
        return recs

    async def _answer_arm(
        self,
        arm: Arm,
        reqs: Sequence[RecommendRequest],
        recent: dict[str, list[Scored]],
        store_warning: str | None,
    ) -> list[Recommendation]:
        """The lists of ``reqs``, all answered by ``arm``."""
        model = arm.model
        s = self.settings
        rows = [_Row(min(r.n or s.default_n, model.n_items)) for r in reqs]
        for req, row in zip(reqs, rows, strict=True):
            if store_warning is not None and (req.recent_items is None or req.exclude_consumed):
                row.warnings.append(store_warning)
            _fill_row(row, req, model, recent.get(req.user_id, []))
            _choose_policy(row, req, arm.defaults)
            row.arm = arm.name

        cold_policy = s.cold_start == "policy"
        policy_rows = [i for i, row in enumerate(rows) if row.user or row.hist or cold_policy]
        out: list[Recommendation | None] = [None] * len(rows)
        if policy_rows:
            self._score_policy(model, [rows[i] for i in policy_rows], policy_rows, out)
        popular_rows = [i for i, row in enumerate(rows) if out[i] is None]
        if popular_rows:
            await self._answer_popular(model, reqs, rows, popular_rows, out)
        if arm.name is not None:
            self._arm_counter(arm.name, SOURCE_POLICY).inc(len(policy_rows))
            self._arm_counter(arm.name, SOURCE_POPULAR).inc(len(popular_rows))
        return [o for o in out if o is not None]

    def _score_policy(
        self,
        model: LoadedModel,
        rows: list[_Row],
        where: list[int],
        out: list[Recommendation | None],
    ) -> None:
        b, h = len(rows), model.history_len
        user = np.fromiter((r.user for r in rows), np.int64, b)
        history = np.zeros((b, h), np.int64)
        history_reward = np.zeros((b, h), np.float32)
        ex_rows: list[int] = []
        ex_cols: list[int] = []
        for j, r in enumerate(rows):
            if r.hist:
                history[j, h - len(r.hist) :] = r.hist
                history_reward[j, h - len(r.hist) :] = r.hist_reward
            if r.exclude:
                ex_rows.extend([j] * len(r.exclude))
                ex_cols.extend(r.exclude)
        k = max(r.n for r in rows)
        sampled = [j for j, r in enumerate(rows) if r.policy == "softmax"]
        greedy = [j for j, r in enumerate(rows) if r.policy != "softmax"]
        full: torch.Tensor | None = None
        if model.ann is not None and all(r.policy == "topk" for r in rows):
            # Exploring policies draw from every item's score: those batches score them all.
            idx, val = model.score_ann(
                user=user,
                history=history,
                history_reward=history_reward,
                exclude_rows=np.asarray(ex_rows, np.int64),
                exclude_cols=np.asarray(ex_cols, np.int64),
                k=k,
            )
        elif model.chunked and all(r.policy == "topk" for r in rows):
            idx, val = model.score_chunked(
                user=user,
                history=history,
                history_reward=history_reward,
                exclude_rows=np.asarray(ex_rows, np.int64),
                exclude_cols=np.asarray(ex_cols, np.int64),
                k=k,
            )
        else:
            idx, val, full = model.score_full(
                user=user,
                history=history,
                history_reward=history_reward,
                exclude_rows=np.asarray(ex_rows, np.int64),
                exclude_cols=np.asarray(ex_cols, np.int64),
                k=k,
                top_rows=np.asarray(greedy, np.int64) if sampled else None,
            )
        self.metrics.batch_size.observe(b)
        slates: dict[int, exploration.Slate] = {}
        if sampled:
            # every softmax row of the batch in one vectorised draw (each with its own seed)
            assert full is not None  # sampling rows take the exact path
            sub = (
                full.numpy()  # every row samples (a softmax service): no gather
                if len(sampled) == b
                else full[torch.from_numpy(np.asarray(sampled, np.int64))].numpy()
            )
            scores64 = sub.astype(np.float64)  # (S, N + 1), a copy
            scores64[:, 0] = -np.inf  # padding is never shown
            drawn = exploration.sample_plackett_luce_many(
                scores64,
                np.array([rows[j].n for j in sampled], np.int64),
                temperature=np.array([rows[j].temperature for j in sampled], np.float64),
                seeds=[_seed(rows[j]) for j in sampled],
            )
            slates = dict(zip(sampled, drawn, strict=True))
            sampled_scores = dict(zip(sampled, scores64, strict=True))
        top_of = {j: t for t, j in enumerate(greedy)} if sampled else None
        finite = np.isfinite(val)
        ids = model.item_ids
        now = int(self.clock())
        rec_ids = _recommendation_ids(b)
        for j, r in enumerate(rows):
            prop: list[float] | None = None
            slate_p: float | None = 1.0
            if r.policy == "softmax":
                slate = slates[j]
                ri, rv = slate.items, sampled_scores[j][slate.items]
                prop, slate_p = slate.propensity.tolist(), slate.slate_propensity
            else:
                t = j if top_of is None else top_of[j]
                keep = finite[t, : r.n]
                ri, rv = idx[t, : r.n], val[t, : r.n]
                if not keep.all():
                    ri, rv = ri[keep], rv[keep]
                if r.policy == "epsilon":
                    assert full is not None  # epsilon rows take the exact path
                    row_scores = full[j].numpy().astype(np.float64)  # (N + 1,) a copy
                    row_scores[0] = -np.inf  # padding is never shown
                    slate = _explore(r, row_scores, ri)
                    ri, rv = slate.items, row_scores[slate.items]
                    prop, slate_p = slate.propensity.tolist(), slate.slate_propensity
            out[where[j]] = Recommendation(
                item_ids=ids[ri].tolist(),
                scores=rv.tolist(),
                model_version=model.model_version,
                source=SOURCE_POLICY,
                warnings=r.warnings,
                recommendation_id=rec_ids[j],
                user_id=r.user_id,
                propensities=prop,
                slate_propensity=slate_p,
                policy=r.policy,
                temperature=r.temperature,
                epsilon=r.epsilon,
                seed=r.seed,
                ts=now,
                arm=r.arm,
                context=(  # only a logged list needs it
                    ServedContext(recent=r.recent, excluded=r.consumed_raw)
                    if self.served_log is not None
                    else None
                ),
            )
        self._served[SOURCE_POLICY].inc(b)

    async def _answer_popular(
        self,
        model: LoadedModel,
        reqs: Sequence[RecommendRequest],
        rows: list[_Row],
        where: list[int],
        out: list[Recommendation | None],
    ) -> None:
        live, why = await self._popular()
        if live is None:
            for i in where:
                if not any(w.startswith("online store unavailable") for w in rows[i].warnings):
                    rows[i].warnings.append(why)
        for i in where:
            row = rows[i]
            self._fallback["unknown_user"].inc()
            row.warnings.append(
                f"unknown user {reqs[i].user_id!r} without known recent items: popular items"
            )
            items = self._pick_popular(model, live, row.consumed_raw, row.n)
            # Popular fallbacks are deterministic whatever the policy asked: propensity 1.
            out[i] = Recommendation(
                item_ids=[x for x, _ in items],
                scores=[sc for _, sc in items],
                model_version=model.model_version,
                source=SOURCE_POPULAR,
                warnings=row.warnings,
                recommendation_id=_recommendation_ids(1)[0],
                user_id=row.user_id,
                seed=None,  # nothing was drawn: a seed would reproduce nothing
                ts=int(self.clock()),
                arm=row.arm,
            )
        self._served[SOURCE_POPULAR].inc(len(where))

    def _pick_popular(
        self, model: LoadedModel, live: list[Scored] | None, skip: set[str], n: int
    ) -> list[Scored]:
        if live:
            return [(i, s) for i, s in live if i not in skip][:n]
        self._fallback["train_popular"].inc()
        return self._train_popular(model, skip, n)

    @staticmethod
    def _train_popular(model: LoadedModel, skip: set[str], n: int) -> list[Scored]:
        # Only the first n + |skip| entries can matter: each skipped id removes at most one.
        head = model.train_popular[: n + len(skip)]
        ids = model.item_ids[head].tolist()
        counts = model.train_counts[head].tolist()
        return [(i, c) for i, c in zip(ids, counts, strict=True) if i not in skip][:n]

    async def popular(self, n: int | None = None) -> PopularList:
        """Real-time popular items from the store, else the artifact's train-set counts."""
        model = self._model
        n = self.settings.default_n if n is None else n
        live, _ = await self._popular()
        if live:
            return PopularList(items=live[:n], source="realtime", model_version=model.model_version)
        self._fallback["train_popular"].inc()
        return PopularList(
            items=self._train_popular(model, set(), n),
            source="train",
            model_version=model.model_version,
        )

    # ------------------------------------------------------------------ lifecycle

    async def readiness(self) -> list[str]:
        """Reasons the service is not ready; empty when it is."""
        reasons = []
        try:
            ok = await asyncio.wait_for(
                self.store.ping(), timeout=self.settings.store_timeout_s * 4
            )
        except Exception:  # a ping that hangs or breaks means unreachable all the same
            ok = False
        if ok:
            self._store_down_until = -1.0
        else:
            reasons.append("online store unreachable")
        return reasons

    async def reload(self, path: Path | None = None) -> ReloadResult:
        """Load ``path`` (default: the current artifact path, read again) and swap it in.

        Raises :class:`ArtifactError` and keeps the current model when the artifact is
        broken.  Loading runs in a thread, so requests keep being answered meanwhile.
        """
        async with self._reload_lock:
            target = Path(path) if path is not None else self._artifact_path
            previous = self._model
            try:
                model = await self._load(target)
            except ArtifactError as exc:
                self.metrics.reloads.labels(outcome="refused").inc()
                # repr and escapes: the path and the message may come from a client
                logger.error("reload of %r refused: %s", str(target), log_safe(exc))
                raise
            # the swap: one reference assignment (the control arm, with A/B serving)
            split, arms = self._routing
            control = dataclasses.replace(self._arm(0, model, target), name=arms[0].name)
            self._routing = (split, (control, *arms[1:]))
            self._popular_cache = None
            self.metrics.set_model(model.model_version)
            self.metrics.reloads.labels(outcome="ok").inc()
            logger.info(
                "now serving %s from %r (was %s)",
                log_safe(model.model_version),
                str(target),
                log_safe(previous.model_version),
            )
            return ReloadResult(
                model_version=model.model_version,
                previous_model_version=previous.model_version,
                artifact=str(target),
            )

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.drain()
        if self.served_log is not None:
            await self.served_log.close()


Req = TypeVar("Req")
Res = TypeVar("Res")


class MicroBatcher(Generic[Req, Res]):
    """Gathers the submissions of one event-loop turn into one ``run(batch)`` call.

    The first submission schedules a flush with ``call_soon``; every request that reaches
    :meth:`submit` before the loop gets to it joins the batch, so under load a batch holds
    the requests that arrived together and at low load a request waits no extra time.
    """

    def __init__(
        self, run: Callable[[list[Req]], Awaitable[list[Res]]], *, max_size: int = 64
    ) -> None:
        self._run = run
        self.max_size = max_size
        self._pending: list[tuple[Req, asyncio.Future[Res]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, req: Req) -> Res:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Res] = loop.create_future()
        self._pending.append((req, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), self.max_size):
            task = asyncio.get_running_loop().create_task(
                self._process(pending[i : i + self.max_size])
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _process(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        try:
            results = await self._run([r for r, _ in batch])
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), res in zip(batch, results, strict=True):
            if not fut.done():  # a cancelled request (client gone) just drops its answer
                fut.set_result(res)

    async def drain(self) -> None:
        """Wait for the batches in progress."""
        while self._tasks or self._pending:
            if self._pending and not self._scheduled:
                self._flush()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await asyncio.sleep(0)
