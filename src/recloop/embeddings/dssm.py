"""DSSM two-tower pretraining of user and item embeddings (Huang et al., CIKM 2013).

A user tower (user id + the columns of ``dataset.user_features``) and an item tower (item
id + the columns of ``dataset.item_features``) each map to a D-dimensional, L2-normalised
vector; their cosine scores a (user, item) pair.  Trained on the TRAIN split against
``neg_ratio`` negatives per positive drawn uniformly from the items the user did not
consume; validated each epoch on the VALID split (loss and rank-based AUC).  The results
initialise the item (and user) embedding tables of the policies.

On disk (:func:`save_embeddings`)::

    manifest.json            kind, format version, config, shapes, id-map sha256, history
    embeddings.safetensors   user_embeddings (U + 1, D), item_embeddings (N + 1, D)
    user_ids.txt item_ids.txt  raw ids, line n = index n (the dataset's id maps)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

from recloop import __version__
from recloop.config import check, config_from_dict, config_to_dict
from recloop.data.dataset import TRAIN, VALID, PreparedDataset, read_ids, sha256_file, write_ids
from recloop.embeddings.negatives import ConsumedItems
from recloop.errors import ArtifactError, DataError
from recloop.progress import progress as progress_bar

logger = logging.getLogger(__name__)

FORMAT = "recloop-embeddings"
FORMAT_VERSION = 1
WEIGHTS_FILE = "embeddings.safetensors"


@dataclass(frozen=True, kw_only=True)
class DSSMConfig:
    """Two-tower DSSM embedding pretraining."""

    embedding_dim: int = 32
    """D, the size of the output user and item embeddings (the policies' D)."""
    id_dim: int = 64
    """Width of the user-id and item-id embeddings fed into the towers."""
    feature_dim: int = 16
    """Width of the embedding of each categorical feature column."""
    hidden: tuple[int, ...] = (256, 128)
    """Hidden layer widths of each tower's MLP (Linear, BatchNorm, ReLU per layer)."""
    epochs: int = 10
    """Passes over the TRAIN split."""
    batch_size: int = 4096
    """Positive pairs per step (each with ``neg_ratio`` negatives).  The towers run once per
    distinct id in a step, so on small catalogues large batches cost little more than small
    ones (ml-100k: 4096 reaches a higher AUC per second than 1024)."""
    lr: float = 3e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Adam weight decay (L2) on all tower parameters."""
    neg_ratio: int = 4
    """Negatives per positive, drawn uniformly from the items the user has not consumed."""
    loss: Literal["cosine", "bce"] = "bce"
    """``cosine``: 1 - cos for positives, max(0, cos - margin) for negatives (as
    ``nn.CosineEmbeddingLoss``); ``bce``: binary cross-entropy on ``scale * cos``."""
    margin: float = 0.0
    """Margin of the cosine loss for negatives (cosine loss only)."""
    scale: float = 10.0
    """Logit scale applied to the cosine before the BCE loss (bce loss only)."""
    seed: int = 0
    """Seed of initialisation, shuffling and negative sampling."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""

    def __post_init__(self) -> None:
        check(self.embedding_dim >= 1, f"embedding_dim must be >= 1, got {self.embedding_dim}")
        check(self.id_dim >= 1, f"id_dim must be >= 1, got {self.id_dim}")
        check(self.feature_dim >= 1, f"feature_dim must be >= 1, got {self.feature_dim}")
        check(all(h >= 1 for h in self.hidden), f"hidden sizes must be >= 1, got {self.hidden}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.batch_size >= 2, f"batch_size must be >= 2, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.neg_ratio >= 1, f"neg_ratio must be >= 1, got {self.neg_ratio}")
        check(self.loss in ("cosine", "bce"), f"loss must be cosine or bce, got {self.loss!r}")
        check(-1.0 <= self.margin <= 1.0, f"margin must be in [-1, 1], got {self.margin}")
        check(self.scale > 0, f"scale must be > 0, got {self.scale}")
        check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
            f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}",
        )


@dataclass(frozen=True)
class EpochStats:
    """Losses and validation AUC after one epoch (valid fields None without a VALID split)."""

    epoch: int
    """1-based epoch number."""
    train_loss: float
    """Mean training loss over the epoch's steps."""
    valid_loss: float | None
    """Loss on VALID positives and their sampled negatives."""
    valid_auc: float | None
    """ROC AUC of the cosine score, VALID positives against sampled negatives."""


@dataclass(frozen=True, kw_only=True, eq=False)
class PretrainResult:
    """Pretrained embeddings with the id maps they index.  U users, N items."""

    user_embeddings: Tensor  # (U + 1, D) float32, row 0 (unknown user) zeros
    item_embeddings: Tensor  # (N + 1, D) float32, row 0 (padding) zeros
    history: list[EpochStats]
    config: DSSMConfig
    user_ids: list[str]
    """Raw user ids; row i of ``user_embeddings`` is ``user_ids[i - 1]``."""
    item_ids: list[str]
    """Raw item ids; row i of ``item_embeddings`` is ``item_ids[i - 1]``."""

    @property
    def user_ids_sha256(self) -> str:
        return ids_sha256(self.user_ids)

    @property
    def item_ids_sha256(self) -> str:
        return ids_sha256(self.item_ids)

    def check_matches(self, dataset: PreparedDataset, *, source: str = "embeddings") -> None:
        """Raise :class:`ArtifactError` unless both id maps equal the dataset's."""
        for name, ours, theirs in (
            ("user_ids.txt", self.user_ids_sha256, dataset_ids_sha256(dataset, "user")),
            ("item_ids.txt", self.item_ids_sha256, dataset_ids_sha256(dataset, "item")),
        ):
            if ours != theirs:
                where = dataset.path if dataset.path is not None else "the dataset"
                raise ArtifactError(
                    f"{source}: {name} sha256 {ours} does not match {where}'s {theirs}; "
                    "these embeddings were pretrained on other id maps, pretrain again"
                )


def ids_sha256(ids: list[str]) -> str:
    """sha256 of an id file as :func:`recloop.data.dataset.write_ids` writes it."""
    return hashlib.sha256("".join(f"{raw}\n" for raw in ids).encode("utf-8")).hexdigest()


def dataset_ids_sha256(dataset: PreparedDataset, which: Literal["user", "item"]) -> str:
    """The sha256 of the dataset's ``user_ids.txt`` / ``item_ids.txt``.

    Taken from the manifest's file list when the dataset was saved, else computed from the
    in-memory lists (the same value, since the file is the list one id per line).
    """
    recorded = dataset.manifest.get("files", {}).get(f"{which}_ids.txt")
    if isinstance(recorded, str):
        return recorded
    return ids_sha256(dataset.user_ids if which == "user" else dataset.item_ids)


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True, kw_only=True, eq=False)
class FeatureTable:
    """Encoded side features of every row of one id space (R = U + 1 or N + 1 rows).

    Integer columns are categorical codes (0 = missing), list-of-integer columns are
    multi-valued codes (e.g. genres; 0 = padding), float columns are numeric (standardised,
    missing = 0).
    """

    categorical: np.ndarray  # (R, Fc) int64
    cardinality: tuple[int, ...]  # (Fc,) max code + 1 per column
    multi: tuple[np.ndarray, ...]  # Fm arrays (R, L_f) int64, codes left-aligned, 0 padding
    multi_cardinality: tuple[int, ...]  # (Fm,)
    numeric: np.ndarray  # (R, Fn) float32
    names: tuple[str, ...]
    """Columns used, in the order categorical, multi, numeric."""

    @staticmethod
    def empty(rows: int) -> FeatureTable:
        return FeatureTable(
            categorical=np.zeros((rows, 0), np.int64),
            cardinality=(),
            multi=(),
            multi_cardinality=(),
            numeric=np.zeros((rows, 0), np.float32),
            names=(),
        )

    @staticmethod
    def from_frame(frame: pl.DataFrame | None, *, key: str, rows: int, source: str) -> FeatureTable:
        """Dense per-index features from a ``key`` + feature-columns frame.

        Rows of the id space missing from the frame get code 0 / value 0.  Raises
        :class:`DataError` naming ``source`` and the column for keys out of range, duplicate
        keys, negative codes and columns of an unusable type.
        """
        if frame is None or frame.width <= 1:
            return FeatureTable.empty(rows)
        if key not in frame.columns:
            raise DataError(f"{source}: no '{key}' column (columns: {', '.join(frame.columns)})")
        idx = frame[key].cast(pl.Int64, strict=False)
        at = idx.fill_null(-1).to_numpy()
        if at.size and (at.min() < 1 or at.max() >= rows):
            bad = int(at[(at < 1) | (at >= rows)][0])
            raise DataError(
                f"{source}: column '{key}' must hold indices 1..{rows - 1}, found {bad} "
                "(-1 = null or not an integer)"
            )
        if np.unique(at).shape[0] != at.shape[0]:
            raise DataError(f"{source}: column '{key}' has duplicate indices")
        cat_cols: list[np.ndarray] = []
        cards: list[int] = []
        multi: list[np.ndarray] = []
        multi_cards: list[int] = []
        numeric: list[np.ndarray] = []
        names: tuple[list[str], list[str], list[str]] = ([], [], [])
        for name in frame.columns:
            if name == key:
                continue
            col = frame[name]
            dtype = col.dtype
            if dtype.is_integer() or dtype == pl.Boolean:
                codes = col.cast(pl.Int64).fill_null(0).to_numpy()
                if dtype == pl.Boolean:
                    codes = np.where(col.is_null().to_numpy(), 0, codes + 1)
                _check_codes(codes, source=source, column=name)
                dense = np.zeros(rows, np.int64)
                dense[at] = codes
                cat_cols.append(dense)
                cards.append(int(dense.max(initial=0)) + 1)
                names[0].append(name)
            elif (
                isinstance(dtype, pl.List) and dtype.inner is not None and dtype.inner.is_integer()
            ):
                padded = _pad_lists(frame.select(key, name), key=key, rows=rows)
                _check_codes(padded, source=source, column=name)
                multi.append(padded)
                multi_cards.append(int(padded.max(initial=0)) + 1)
                names[1].append(name)
            elif dtype.is_float():
                values = col.cast(pl.Float64).to_numpy()
                ok = np.isfinite(values)
                mean = values[ok].mean() if ok.any() else 0.0
                std = values[ok].std() if ok.any() else 1.0
                dense_f = np.zeros(rows, np.float32)
                dense_f[at] = np.where(ok, (values - mean) / (std if std > 0 else 1.0), 0.0)
                numeric.append(dense_f)
                names[2].append(name)
            else:
                raise DataError(
                    f"{source}: column '{name}' has type {dtype}; prepared features must be "
                    "integer codes, lists of integer codes or floats"
                )
        return FeatureTable(
            categorical=np.stack(cat_cols, axis=1) if cat_cols else np.zeros((rows, 0), np.int64),
            cardinality=tuple(cards),
            multi=tuple(multi),
            multi_cardinality=tuple(multi_cards),
            numeric=np.stack(numeric, axis=1) if numeric else np.zeros((rows, 0), np.float32),
            names=tuple(names[0] + names[1] + names[2]),
        )


def _integer(dtype: Any) -> bool:
    return isinstance(dtype, pl.DataType) and dtype.is_integer()


def _check_codes(codes: np.ndarray, *, source: str, column: str) -> None:
    if codes.size and codes.min() < 0:
        raise DataError(
            f"{source}: column '{column}' has negative code {int(codes.min())} "
            "(codes are >= 0, 0 = missing)"
        )


def _pad_lists(frame: pl.DataFrame, *, key: str, rows: int) -> np.ndarray:
    """(rows, L) codes of a list column, left-aligned, 0-padded; L = longest list (>= 1)."""
    name = frame.columns[1]
    flat = (
        frame.explode(name)
        .drop_nulls(name)
        .with_columns(pl.int_range(pl.len()).over(key).alias("_pos"))
    )
    pos = flat["_pos"].to_numpy()
    out = np.zeros((rows, int(pos.max(initial=0)) + 1), np.int64)
    out[flat[key].to_numpy(), pos] = flat[name].cast(pl.Int64).to_numpy()
    return out


# ----------------------------------------------------------------------------- model


class Tower(nn.Module):
    """id embedding + feature embeddings → MLP (Linear, BatchNorm, ReLU)* → Linear → L2 norm."""

    cat_codes: Tensor  # (R, Fc) int64
    numeric: Tensor  # (R, Fn) float32

    def __init__(self, *, n_ids: int, features: FeatureTable, cfg: DSSMConfig) -> None:
        super().__init__()
        self.id_embedding = nn.Embedding(n_ids, cfg.id_dim)
        self.categorical = nn.ModuleList(
            nn.Embedding(card, cfg.feature_dim, padding_idx=0) for card in features.cardinality
        )
        self.multi = nn.ModuleList(
            nn.EmbeddingBag(card, cfg.feature_dim, mode="mean", padding_idx=0)
            for card in features.multi_cardinality
        )
        # lookup tables live on the model's device; not persistent: only outputs are saved
        self.register_buffer("cat_codes", torch.from_numpy(features.categorical), persistent=False)
        for i, table in enumerate(features.multi):
            self.register_buffer(f"multi_codes_{i}", torch.from_numpy(table), persistent=False)
        self.register_buffer("numeric", torch.from_numpy(features.numeric), persistent=False)
        width = (
            cfg.id_dim
            + cfg.feature_dim * (len(features.cardinality) + len(features.multi))
            + features.numeric.shape[1]
        )
        layers: list[nn.Module] = []
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, cfg.embedding_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, ids: Tensor) -> Tensor:  # (M,) int64 -> (M, D), unit length
        parts = [self.id_embedding(ids)]
        codes: Tensor = self.cat_codes[ids]
        parts += [emb(codes[:, j]) for j, emb in enumerate(self.categorical)]
        for i, bag in enumerate(self.multi):
            table: Tensor = getattr(self, f"multi_codes_{i}")  # (R, L) int64
            parts.append(bag(table[ids]))
        parts.append(self.numeric[ids])
        return F.normalize(self.mlp(torch.cat(parts, dim=-1)), dim=-1)


class DSSM(nn.Module):
    """The two towers; ``score`` is the cosine of the user and item vectors."""

    def __init__(
        self,
        *,
        n_users: int,
        n_items: int,
        user_features: FeatureTable,
        item_features: FeatureTable,
        cfg: DSSMConfig,
    ) -> None:
        super().__init__()
        self.user_tower = Tower(n_ids=n_users + 1, features=user_features, cfg=cfg)
        self.item_tower = Tower(n_ids=n_items + 1, features=item_features, cfg=cfg)


def pair_loss(
    pos: Tensor, neg: Tensor, *, cfg: DSSMConfig
) -> Tensor:  # (B,) cosines, (B, K) cosines -> scalar
    """Mean loss over all B + B*K pairs.

    ``cosine``: 1 - cos on positives, max(0, cos - margin) on negatives (the terms of
    ``nn.CosineEmbeddingLoss``).  ``bce``: binary cross-entropy of sigmoid(scale * cos)
    against 1 for positives and 0 for negatives.
    """
    n = pos.numel() + neg.numel()
    if cfg.loss == "cosine":
        return ((1.0 - pos).sum() + (neg - cfg.margin).clamp(min=0).sum()) / n
    bce = F.binary_cross_entropy_with_logits
    return (
        bce(cfg.scale * pos, torch.ones_like(pos), reduction="sum")
        + bce(cfg.scale * neg, torch.zeros_like(neg), reduction="sum")
    ) / n


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U), ties counted as one half.

    ``scores`` (M,) float, ``labels`` (M,) bool or 0/1.  NaN when one class is empty.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    mid_rank = ends - (counts - 1) / 2.0  # mean rank within each tie group
    rank_sum = mid_rank[inverse][labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True, eq=False)
class _Pairs:
    """Positive pairs and their negatives, as tensors on the training device."""

    user: Tensor  # (P,) int64
    item: Tensor  # (P,) int64
    negative: Tensor  # (P, K) int64


def _pairs(
    user: np.ndarray, item: np.ndarray, negative: np.ndarray, *, device: torch.device
) -> _Pairs:
    return _Pairs(
        user=torch.from_numpy(user.astype(np.int64)).to(device),
        item=torch.from_numpy(item.astype(np.int64)).to(device),
        negative=torch.from_numpy(negative.astype(np.int64)).to(device),
    )


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        if n - start >= 2:  # batch norm needs two rows
            yield slice(start, min(start + size, n))


def _tower_unique(tower: Tower, ids: Tensor) -> Tensor:  # (M,) -> (M, D)
    """The tower run once per distinct id in the batch, then spread back to the M rows.

    On small catalogues a batch repeats items many times (ml-100k at batch 4096: 20k item
    rows, at most 1.7k distinct), so this saves most of the MLP work; batch-norm statistics
    are then taken over distinct ids, which keeps popular items from dominating them.
    """
    uniq, inverse = torch.unique(ids, return_inverse=True)
    if uniq.shape[0] < 2:  # batch norm needs two rows
        return tower(ids)
    return tower(uniq)[inverse]


@torch.no_grad()
def _all_vectors(tower: Tower, n: int, chunk: int = 65536) -> Tensor:
    """Eval-mode tower output for ids 0..n with row 0 zeroed: (n + 1, D) on the tower's device."""
    device = next(tower.parameters()).device
    ids = torch.arange(n + 1, device=device)
    out = torch.cat([tower(ids[i : i + chunk]) for i in range(0, n + 1, chunk)])
    out[0] = 0.0
    return out.float()


@dataclass(frozen=True)
class _Validation:
    loss: float
    auc: float


@torch.no_grad()
def _evaluate(
    model: DSSM, pairs: _Pairs, *, cfg: DSSMConfig, n_users: int, n_items: int
) -> _Validation:
    """Loss and AUC of the eval-mode towers on fixed positive and negative pairs."""
    users = _all_vectors(model.user_tower, n_users)
    items = _all_vectors(model.item_tower, n_items)
    u = users[pairs.user]  # (P, D)
    pos = (u * items[pairs.item]).sum(-1)  # (P,)
    neg = torch.einsum("pd,pkd->pk", u, items[pairs.negative])  # (P, K)
    scores = torch.cat([pos, neg.flatten()]).cpu().numpy()
    labels = np.zeros(scores.shape[0], bool)
    labels[: pos.shape[0]] = True
    return _Validation(loss=float(pair_loss(pos, neg, cfg=cfg)), auc=roc_auc(scores, labels))


def pretrain_dssm(
    dataset: PreparedDataset,
    cfg: DSSMConfig,
    *,
    progress: bool | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> PretrainResult:
    """Train the two towers on the TRAIN split and return every user's and item's vector.

    ``progress`` shows a bar per epoch (None: only on a terminal); ``on_epoch`` is called
    with each epoch's stats as soon as they are known.  Global RNG state is left as it was.
    """
    train = dataset.split == TRAIN
    valid = dataset.split == VALID
    if not train.any():
        raise DataError("pretrain: the dataset has no TRAIN events")
    device = resolve_device(cfg.device)
    nu, ni = dataset.n_users, dataset.n_items
    user_features = FeatureTable.from_frame(
        dataset.user_features, key="user", rows=nu + 1, source="user_features"
    )
    item_features = FeatureTable.from_frame(
        dataset.item_features, key="item", rows=ni + 1, source="item_features"
    )
    logger.info(
        "DSSM on %s: %d users, %d items, %d train / %d valid pairs; user features %s, "
        "item features %s",
        device,
        nu,
        ni,
        int(train.sum()),
        int(valid.sum()),
        list(user_features.names) or "none",
        list(item_features.names) or "none",
    )
    # Train negatives avoid what the user consumed in TRAIN; validation negatives also avoid
    # the VALID items, so that no true positive is scored as a negative.
    seen_train = ConsumedItems.from_pairs(
        dataset.user[train], dataset.item[train], n_users=nu, n_items=ni
    )
    seen_valid = ConsumedItems.from_pairs(
        dataset.user[train | valid], dataset.item[train | valid], n_users=nu, n_items=ni
    )
    # Two streams: drawing the validation negatives must not move the training draws, or
    # the number of validation events would change the trained embeddings.
    rng = np.random.default_rng([cfg.seed, 0])
    valid_rng = np.random.default_rng([cfg.seed, 1])
    k = cfg.neg_ratio
    tr_user = dataset.user[train].astype(np.int64)
    tr_item = dataset.item[train].astype(np.int64)
    va_user = dataset.user[valid].astype(np.int64)
    va_item = dataset.item[valid].astype(np.int64)
    va_pairs = _pairs(
        va_user,
        va_item,
        seen_valid.sample(np.repeat(va_user, k), valid_rng).reshape(-1, k),
        device=device,
    )

    history: list[EpochStats] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DSSM(
            n_users=nu,
            n_items=ni,
            user_features=user_features,
            item_features=item_features,
            cfg=cfg,
        ).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for epoch in range(1, cfg.epochs + 1):
            order = rng.permutation(tr_user.shape[0])
            negatives = seen_train.sample(np.repeat(tr_user[order], k), rng).reshape(-1, k)
            tr = _pairs(tr_user[order], tr_item[order], negatives, device=device)
            model.train()
            total, steps = 0.0, 0
            bar = progress_bar(
                list(_batches(tr_user.shape[0], cfg.batch_size)),
                desc=f"dssm epoch {epoch}/{cfg.epochs}",
                unit="batch",
                enabled=progress,
            )
            for sl in bar:
                u = _tower_unique(model.user_tower, tr.user[sl])  # (B, D)
                b = u.shape[0]
                ids = torch.cat([tr.item[sl], tr.negative[sl].flatten()])  # (B + B*K,)
                items = _tower_unique(model.item_tower, ids)
                pos = (u * items[:b]).sum(-1)  # (B,)
                neg = torch.einsum("bd,bkd->bk", u, items[b:].view(b, k, -1))  # (B, K)
                loss = pair_loss(pos, neg, cfg=cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            model.eval()
            v_loss: float | None = None
            v_auc: float | None = None
            if va_user.shape[0]:
                val = _evaluate(model, va_pairs, cfg=cfg, n_users=nu, n_items=ni)
                v_loss, v_auc = val.loss, val.auc
            stats = EpochStats(
                epoch=epoch,
                train_loss=total / max(steps, 1),
                valid_loss=v_loss,
                valid_auc=v_auc,
            )
            history.append(stats)
            logger.info(
                "dssm epoch %d: train loss %.4f, valid loss %s, valid AUC %s",
                epoch,
                stats.train_loss,
                "-" if v_loss is None else f"{v_loss:.4f}",
                "-" if v_auc is None else f"{v_auc:.4f}",
            )
            if on_epoch is not None:
                on_epoch(stats)
        model.eval()
        user_vecs = _all_vectors(model.user_tower, nu).cpu()
        item_vecs = _all_vectors(model.item_tower, ni).cpu()
    return PretrainResult(
        user_embeddings=user_vecs,
        item_embeddings=item_vecs,
        history=history,
        config=cfg,
        user_ids=list(dataset.user_ids),
        item_ids=list(dataset.item_ids),
    )


# ----------------------------------------------------------------------------- files


def save_embeddings(result: PretrainResult, directory: Path) -> Path:
    """Write ``manifest.json``, ``embeddings.safetensors`` and the two id files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_file(
        {
            "user_embeddings": result.user_embeddings.detach().cpu().contiguous(),
            "item_embeddings": result.item_embeddings.detach().cpu().contiguous(),
        },
        str(weights),
    )
    files = {
        WEIGHTS_FILE: sha256_file(weights),
        "user_ids.txt": write_ids(directory / "user_ids.txt", result.user_ids),
        "item_ids.txt": write_ids(directory / "item_ids.txt", result.item_ids),
    }
    manifest: dict[str, Any] = {
        "kind": FORMAT,
        "format_version": FORMAT_VERSION,
        "recloop_version": __version__,
        "config": config_to_dict(result.config),
        "shapes": {
            "user_embeddings": list(result.user_embeddings.shape),
            "item_embeddings": list(result.item_embeddings.shape),
        },
        "id_maps": {"user_ids.txt": files["user_ids.txt"], "item_ids.txt": files["item_ids.txt"]},
        "history": [dataclasses.asdict(s) for s in result.history],
        "files": files,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def load_embeddings(directory: Path, *, dataset: PreparedDataset | None = None) -> PretrainResult:
    """Read what :func:`save_embeddings` wrote, checking format, file hashes and shapes.

    With ``dataset``, also check that the id maps are the dataset's (else
    :class:`ArtifactError` naming both sha256 values).
    """
    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{directory}: no manifest.json; not a pretrained-embeddings directory")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath}: invalid JSON ({exc})") from None
    if manifest.get("kind") != FORMAT:
        raise ArtifactError(f"{mpath}: kind {manifest.get('kind')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: format_version {manifest.get('format_version')!r}, this recloop reads "
            f"{FORMAT_VERSION}; pretrain again"
        )
    for name, digest in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: {name} is listed in manifest.json but missing")
        actual = sha256_file(path)
        if actual != digest:
            raise ArtifactError(
                f"{path}: sha256 {actual} does not match manifest.json's {digest} (file changed?)"
            )
    tensors = load_file(str(directory / WEIGHTS_FILE))
    user_ids = read_ids(directory / "user_ids.txt")
    item_ids = read_ids(directory / "item_ids.txt")
    shapes = manifest.get("shapes", {})
    for name, n in (("user_embeddings", len(user_ids)), ("item_embeddings", len(item_ids))):
        if name not in tensors:
            raise ArtifactError(f"{directory / WEIGHTS_FILE}: no tensor {name!r}")
        shape = list(tensors[name].shape)
        if shape != shapes.get(name) or shape[0] != n + 1:
            raise ArtifactError(
                f"{directory / WEIGHTS_FILE}: {name} has shape {shape}, manifest says "
                f"{shapes.get(name)} and the id file has {n} ids (+1 row for index 0)"
            )
    result = PretrainResult(
        user_embeddings=tensors["user_embeddings"],
        item_embeddings=tensors["item_embeddings"],
        history=[EpochStats(**s) for s in manifest.get("history", [])],
        config=config_from_dict(DSSMConfig, manifest.get("config", {}), source=str(mpath)),
        user_ids=user_ids,
        item_ids=item_ids,
    )
    if dataset is not None:
        result.check_matches(dataset, source=str(directory))
    return result
