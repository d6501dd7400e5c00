"""Approximate top-k retrieval over an artifact's items: a FAISS inner-product index.

At a million items, scoring every item per request is most of the request (a (B, N) score
matrix, a top-k over it).  When a policy's scores are an inner product between a query
computed from the state and one vector per item, a maximum-inner-product index finds the
best candidates without scoring the catalogue; the service then rescores those candidates
exactly and ranks them with :func:`recloop.ranking.topk`'s tie-break, so an approximate
list differs from the exact one only where the index missed an item (recall).

Which heads are an inner product (:func:`mips_form`):

- ``dot`` with ``similarity = dot``, and ``bcq``: score = a(s) · e_i, item vector e_i;
- ``dot`` / ``bcq`` with ``similarity = cosine``: score = a/|a| · e_i/|e_i|; the index holds
  the normalised item vectors;
- ``linear``: score = W_i · f(s) + b_i, i.e. [W_i, b_i] · [f(s), 1] (the bias as one more
  dimension).

``popularity`` (constant scores: nothing to search) and ``bcq_discrete`` (a behaviour
threshold that is not an inner product) are refused with one line saying so.

The index lives in the artifact directory (``items.faiss``, FAISS's own binary format, not a
pickle) and is described by the manifest's optional ``index`` section: kind, parameters,
sha256 of the file, and the ``weights_sha256`` of the artifact it was built from.  Loading
checks the file's hash, that it was built from these very weights (so from this item
table), its size and dimension; anything else is refused with one :class:`ArtifactError`
line.  The section is not part of the model version (like ``serving``): the index changes
which candidates are considered, never a score.

Needs ``faiss-cpu`` (``pip install 'recloop[ann]'``); imported only where an index is built
or loaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recloop.artifacts.bundle import (
    MANIFEST,
    Artifact,
    load_artifact,
    read_manifest,
    resolve_artifact_dir,
)
from recloop.artifacts.policy import PolicyNet
from recloop.config import check
from recloop.errors import ArtifactError, ConfigError

logger = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"
KINDS = ("hnsw", "ivf")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            "an approximate index needs faiss-cpu: pip install 'recloop[ann]'"
        ) from None
    return faiss


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """How ``recloop index build`` builds an artifact's item index."""

    kind: str = "ivf"
    """``ivf`` (inverted lists, IndexIVFFlat) or ``hnsw`` (graph, IndexHNSWFlat), both with
    the inner-product metric over the uncompressed item vectors.  On bench_ann's million
    clustered items ivf (nprobe 64) matched hnsw's recall@10 (0.94 vs 0.96 at ef 256) at
    less CPU per request, built in 40 % of the time and takes a third of the memory."""
    m: int = 32
    """hnsw: neighbours per node (memory grows with it: 2 * m int32 links per item)."""
    ef_construction: int = 200
    """hnsw: candidate list while building (build time grows with it, so does recall)."""
    ef_search: int = 256
    """hnsw: candidate list while searching (raised to the candidates asked for if fewer);
    recall@10 0.91 at 128, 0.96 at 256 on bench_ann's million items."""
    nlist: int = 0
    """ivf: number of inverted lists (0: 4 * sqrt(N), rounded)."""
    nprobe: int = 64
    """ivf: lists searched per query (recall@10 0.94 at 64, 0.85 at 32 on bench_ann's
    million clustered items with 4,000 lists)."""
    seed: int = 0
    """Seed of the ivf k-means (and of its training sample)."""

    def __post_init__(self) -> None:
        check(self.kind in KINDS, f"index kind must be one of {list(KINDS)}, got {self.kind!r}")
        check(self.m >= 2, "m must be >= 2")
        check(self.ef_construction >= 1 and self.ef_search >= 1, "ef values must be >= 1")
        check(self.nlist >= 0 and self.nprobe >= 1, "nlist must be >= 0 and nprobe >= 1")

    def params(self, n_items: int) -> dict[str, int]:
        """The parameters that apply to this kind, as recorded in the manifest."""
        if self.kind == "hnsw":
            return {
                "m": self.m,
                "ef_construction": self.ef_construction,
                "ef_search": self.ef_search,
            }
        nlist = self.nlist or max(1, round(4 * n_items**0.5))
        return {"nlist": min(nlist, n_items), "nprobe": self.nprobe, "seed": self.seed}


@dataclass(frozen=True, kw_only=True, eq=False)
class MipsForm:
    """A policy's scores as an inner product: score(s, i) = query(s) · item_i (+ bias_i).

    ``weight`` and ``bias`` are views of the policy's parameters (no copy), so rescoring the
    candidates reads the same numbers as the exact forward pass."""

    weight: Tensor  # (N + 1, d) item vectors, row 0 = padding
    bias: Tensor | None  # (N + 1,) per-item offsets (linear head), else None
    normalize: bool
    """Cosine similarity: item vectors are normalised (the query is, by ``query``)."""
    query: Callable[[Tensor], Tensor]
    """state (B, S) → query (B, d)."""

    @property
    def index_dim(self) -> int:
        """Dimension of the indexed vectors: d, plus one for the bias."""
        return int(self.weight.shape[1]) + (self.bias is not None)

    def index_vectors(self) -> np.ndarray:
        """(N, index_dim) float32, items 1..N: what the index is built from."""
        w = self.weight[1:].detach()
        if self.normalize:
            w = nn.functional.normalize(w, dim=-1)
        if self.bias is not None:
            w = torch.cat([w, self.bias[1:].detach()[:, None]], dim=1)
        return np.ascontiguousarray(w.numpy(), dtype=np.float32)

    def index_query(self, q: Tensor) -> np.ndarray:
        """(B, d) query → (B, index_dim) float32 for the index."""
        if self.bias is not None:
            q = torch.cat([q, q.new_ones(q.shape[0], 1)], dim=1)
        return np.ascontiguousarray(q.numpy(), dtype=np.float32)

    def rescore(self, q: Tensor, items: Tensor) -> Tensor:
        """Exact scores (B, C) of candidate item indices ``items`` (B, C) for queries (B, d)."""
        g = self.weight[items]  # (B, C, d)
        if self.normalize:
            g = nn.functional.normalize(g, dim=-1)
        scores = torch.bmm(g, q.unsqueeze(2)).squeeze(2)
        if self.bias is not None:
            scores = scores + self.bias[items]
        return scores


def mips_form(policy: PolicyNet) -> MipsForm:
    """The inner-product form of ``policy``'s head (its ``query`` and ``item_vectors``, the
    ones evaluation's chunked ranking uses); :class:`ArtifactError` when it has none."""
    head = policy.head
    if not policy.factors():
        raise ArtifactError(
            f"head {policy.spec.head.kind!r} is not an inner product between the state and an "
            "item vector, so an approximate (MIPS) index cannot serve it; heads with an index: "
            "dot, bcq, linear"
        )
    weight, bias = head.item_vectors(policy.item_embedding.weight)

    def query(state: Tensor) -> Tensor:
        q = head.query(state)
        assert q is not None  # the probe above found an inner-product head
        return q

    return MipsForm(weight=weight, bias=bias, normalize=head.normalize_items, query=query)


@dataclass(frozen=True, kw_only=True)
class BuiltIndex:
    """What :func:`build_index` wrote."""

    path: Path
    """The index file."""
    section: dict[str, Any]
    """The manifest's new ``index`` section."""
    build_s: float
    """Wall seconds of the FAISS build (training and adding the items)."""


def _make_index(vectors: np.ndarray, cfg: IndexConfig, params: dict[str, int]) -> Any:
    faiss = _faiss()
    n, d = vectors.shape
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["m"], ip)
        index.hnsw.efConstruction = params["ef_construction"]
        index.add(vectors)
        return index
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], ip)
    index.cp.seed = params["seed"]
    # FAISS's own rule of thumb: k-means needs no more than ~256 points per centroid.
    sample = min(n, 256 * params["nlist"])
    rng = np.random.default_rng(params["seed"])
    train = vectors if sample == n else vectors[np.sort(rng.choice(n, sample, replace=False))]
    index.train(train)
    index.add(vectors)
    return index


def build_index(path: Path, cfg: IndexConfig) -> BuiltIndex:
    """Build ``cfg``'s index over the artifact's items, write it beside the weights and
    record it in the manifest (replacing a previous one)."""
    faiss = _faiss()
    directory = resolve_artifact_dir(path)
    artifact = load_artifact(directory)
    form = mips_form(artifact.policy)
    with torch.inference_mode():
        vectors = form.index_vectors()
    params = cfg.params(artifact.n_items)
    t0 = time.perf_counter()
    index = _make_index(vectors, cfg, params)
    build_s = time.perf_counter() - t0
    data = faiss.serialize_index(index).tobytes()
    out = directory / INDEX_FILE
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    section = {
        "file": INDEX_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "kind": cfg.kind,
        "metric": "inner_product",
        "params": params,
        "dim": int(vectors.shape[1]),
        "n_items": artifact.n_items,
        "weights_sha256": artifact.manifest["weights_sha256"],
        "faiss_version": str(faiss.__version__),
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    manifest = dict(artifact.manifest)
    manifest["index"] = section
    mpath = directory / MANIFEST
    tmp_m = mpath.with_suffix(".tmp")
    tmp_m.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp_m.replace(mpath)
    logger.info(
        "built a %s index of %d items (dim %d) in %.1f s: %s",
        cfg.kind,
        artifact.n_items,
        vectors.shape[1],
        build_s,
        out,
    )
    return BuiltIndex(path=out, section=section, build_s=build_s)


def set_search_effort(path: Path, effort: int) -> dict[str, Any]:
    """Set the recorded search-time parameter of the artifact's index — hnsw ``ef_search``
    or ivf ``nprobe`` — without rebuilding it (the file is unchanged, its hash too); returns
    the new ``index`` section.  Recall and CPU per request both grow with it."""
    check(effort >= 1, "the search effort must be >= 1")
    directory = resolve_artifact_dir(path)
    mpath = directory / MANIFEST
    manifest = read_manifest(directory)
    section = manifest.get("index")
    if section is None:
        raise ArtifactError(f"{mpath}: no index (build one with: recloop index build)")
    key = "ef_search" if section["kind"] == "hnsw" else "nprobe"
    section = {**section, "params": {**section["params"], key: effort}}
    manifest["index"] = section
    tmp = mpath.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(mpath)
    return section


@dataclass(frozen=True, kw_only=True, eq=False)
class ItemIndex:
    """A verified index of an artifact's items, ready to search."""

    index: Any
    """The FAISS index (ids 0..N-1 are items 1..N)."""
    form: MipsForm
    """The policy's inner-product form the index was built from."""
    kind: str
    params: dict[str, int]

    def search(self, query: Tensor, c: int) -> Tensor:
        """Candidate item indices (B, c) int64 for queries (B, d), best first by the index;
        0 (padding) where it found fewer than c."""
        _, labels = self.index.search(self.form.index_query(query), c)
        return torch.from_numpy(labels + 1)  # -1 (none found) becomes 0, the padding


def load_index(artifact: Artifact) -> ItemIndex | None:
    """The artifact's index, verified against it; None when its manifest records none."""
    section = artifact.manifest.get("index")
    if section is None:
        return None
    mpath = artifact.path / MANIFEST
    path = artifact.path / str(section["file"])
    if section["weights_sha256"] != artifact.manifest["weights_sha256"]:
        raise ArtifactError(
            f"{path}: built from other weights (sha256 {section['weights_sha256'][:12]}…, the "
            f"artifact's are {artifact.manifest['weights_sha256'][:12]}…): rebuild it with "
            "recloop index build"
        )
    form = mips_form(artifact.policy)
    if not path.is_file():
        raise ArtifactError(f"{path}: the index named in {mpath.name} is missing")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != section["sha256"]:
        raise ArtifactError(
            f"{path}: sha256 {digest[:12]}… does not match the manifest's {section['sha256'][:12]}…"
        )
    faiss = _faiss()
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ArtifactError(f"{path}: unreadable FAISS index ({reason})") from None
    if index.ntotal != artifact.n_items or index.d != form.index_dim:
        raise ArtifactError(
            f"{path}: holds {index.ntotal} vectors of dimension {index.d}, the artifact has "
            f"{artifact.n_items} items of dimension {form.index_dim}"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ArtifactError(f"{path}: not an inner-product index")
    params = dict(section["params"])
    need = ("ef_search",) if section["kind"] == "hnsw" else ("nprobe",)
    missing = [k for k in need if k not in params]
    if missing:
        raise ArtifactError(f"{mpath}: field 'index.params' lacks {missing}")
    if section["kind"] == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = params["ef_search"]
    else:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    return ItemIndex(index=index, form=form, kind=str(section["kind"]), params=params)
