"""Dense integer codes: raw ids to frequency-ranked indices, feature values to Int32 codes.

Raw ids first become *dense codes* ``0..V-1`` in ascending raw-id order (numeric order for
integer ids, lexicographic for strings).  After filtering, :func:`frequency_ranked` turns the
codes that are still present into 1-based indices by descending frequency — the most frequent
id gets index 1 — with ties broken by ascending raw id, so the map depends only on the data,
not on row order.  ``prepare`` counts only TRAINING events for the ranking (ids seen only in
valid/test follow, by raw id), so the order of the indices carries no held-out information.
Index 0 stays reserved (padding item, unknown user).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from recloop.config import check
from recloop.errors import DataError

logger = logging.getLogger(__name__)

_DIRECT_MAX_FACTOR = 4
"""Integer ids map by direct addressing (a bincount) when max id <= 4 * rows + 2**20."""


@dataclass(frozen=True)
class DenseCodes:
    """Raw ids as dense codes."""

    codes: np.ndarray  # (E,) int32 in 0..V-1
    values: pl.Series  # (V,) distinct raw ids, ascending

    @property
    def n_codes(self) -> int:
        return int(self.values.len())


def dense_codes(ids: pl.Series, *, name: str) -> DenseCodes:
    """Codes of ``ids`` (E,) in ascending raw-id order; nulls are an error naming ``name``."""
    if ids.null_count():
        raise DataError(f'column "{name}": {ids.null_count()} missing ids')
    if ids.dtype.is_integer():
        arr = ids.to_numpy()
        if arr.shape[0] == 0:
            return DenseCodes(np.zeros(0, np.int32), pl.Series(name, [], dtype=pl.Int64))
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= _DIRECT_MAX_FACTOR * arr.shape[0] + (1 << 20):
            # Direct addressing is O(E) and far cheaper than hashing or sorting.
            present = np.flatnonzero(np.bincount(arr, minlength=hi + 1))
            lut = np.zeros(hi + 1, np.int32)
            lut[present] = np.arange(present.shape[0], dtype=np.int32)
            return DenseCodes(lut[arr], pl.Series(name, present.astype(np.int64)))
        values = ids.unique().sort()
        codes = np.searchsorted(values.to_numpy(), arr).astype(np.int32)
        return DenseCodes(codes, values.rename(name))
    strings = ids.cast(pl.String)
    values = strings.unique().sort()
    if values.len() == 0:
        return DenseCodes(np.zeros(0, np.int32), values.rename(name))
    codes = strings.cast(pl.Enum(values.to_list())).to_physical().to_numpy()
    return DenseCodes(codes.astype(np.int32, copy=False), values.rename(name))


@dataclass(frozen=True)
class IdMap:
    """Dense codes → 1-based indices ranked by frequency (0 reserved)."""

    index_of_code: np.ndarray  # (V,) int32, 0 for codes no longer present
    code_of_index: np.ndarray  # (n + 1,) int64, code_of_index[0] = -1
    counts: np.ndarray  # (n + 1,) int64 events per index, counts[0] = 0

    @property
    def size(self) -> int:
        """Number of real indices n (1..n)."""
        return int(self.code_of_index.shape[0] - 1)

    def raw_ids(self, values: pl.Series) -> list[str]:
        """Raw ids as strings in index order (entry i - 1 is index i)."""
        return values.gather(self.code_of_index[1:]).cast(pl.String).to_list()


def frequency_ranked(
    codes: np.ndarray, n_codes: int, *, rank_by: np.ndarray | None = None
) -> IdMap:
    """Rank the codes present in ``codes`` (E,) by descending count, ties by ascending code.

    With ``rank_by`` (E,) bool only the marked events are counted for the order (codes with
    none of them follow, by ascending code); ``counts`` still counts every event.
    """
    counts = np.bincount(codes, minlength=n_codes).astype(np.int64)
    present = np.flatnonzero(counts)
    rank_counts = counts if rank_by is None else np.bincount(codes[rank_by], minlength=n_codes)
    # lexsort: last key is primary; codes are in raw-id order, so ties go to the smaller raw id.
    ranked = present[np.lexsort((present, -rank_counts[present]))]
    index_of_code = np.zeros(n_codes, np.int32)
    index_of_code[ranked] = np.arange(1, ranked.shape[0] + 1, dtype=np.int32)
    return IdMap(
        index_of_code=index_of_code,
        code_of_index=np.concatenate([[-1], ranked]).astype(np.int64),
        counts=np.concatenate([[0], counts[ranked]]).astype(np.int64),
    )


# --- feature tables ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    """How user and item feature tables become Int32 code columns (0 = missing)."""

    enabled: bool = True
    """Keep the user and item feature tables of the source."""
    drop: tuple[str, ...] = ()
    """Feature columns to leave out (by name, in either table)."""
    max_numeric_codes: int = 64
    """A float column with at most this many distinct values gets one code per value; one with
    more is cut into quantile buckets.  Integer and text columns (ids such as category, shop,
    brand, or small counts such as age) always get one code per value."""
    numeric_buckets: int = 10
    """Number of quantile buckets for float columns with many distinct values."""
    max_listed_values: int = 1000
    """The manifest lists the values behind the codes of columns with at most this many."""
    max_distinct_share: float = 0.5
    """A text or integer column with more distinct values than this share of the table's rows
    (and more than 100) is id-like, e.g. a title, and is left out (recorded in the manifest)."""

    def __post_init__(self) -> None:
        check(self.max_numeric_codes >= 1, "features.max_numeric_codes must be >= 1")
        check(self.numeric_buckets >= 2, "features.numeric_buckets must be >= 2")
        check(self.max_listed_values >= 0, "features.max_listed_values must be >= 0")
        check(0 < self.max_distinct_share <= 1, "features.max_distinct_share must lie in (0, 1]")


@dataclass(frozen=True)
class EncodedFeatures:
    """A feature table aligned with an id map, and how each column was encoded."""

    table: pl.DataFrame | None
    """``key`` index 1..n (every index, in order) plus one Int32 code column per feature."""
    columns: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per column: kind (codes/buckets), vocab (codes incl. 0), values or bucket edges."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Columns left out, with the reason."""


def _encode_list_column(s: pl.Series, cfg: FeatureConfig) -> tuple[pl.Series, dict[str, Any]] | str:
    """A list column (e.g. a movie's genres) as lists of Int32 codes, one vocabulary over
    all elements (missing rows: empty lists)."""
    inner = s.dtype.inner if isinstance(s.dtype, pl.List) else None
    if inner is None or inner.is_nested():
        return f"nested type {s.dtype} is not encoded"
    flat = (
        pl.DataFrame({"v": s}).with_row_index("row").explode("v").filter(pl.col("v").is_not_null())
    )
    encoded = _encode_column(flat["v"].rename(s.name), cfg)
    if isinstance(encoded, str):
        return encoded
    codes, desc = encoded
    assert isinstance(codes, np.ndarray)
    lists = (
        pl.DataFrame({"row": flat["row"], "code": codes})
        .filter(pl.col("code") > 0)
        .group_by("row", maintain_order=True)
        .agg("code")
    )
    out = (
        pl.DataFrame({"row": np.arange(s.len(), dtype=np.uint32)})
        .join(lists, on="row", how="left", maintain_order="left")["code"]
        .fill_null([])
        .cast(pl.List(pl.Int32))
        .rename(s.name)
    )
    return out, {**desc, "kind": f"{desc['kind']}_list"}


def _encode_column(
    s: pl.Series, cfg: FeatureConfig
) -> tuple[np.ndarray | pl.Series, dict[str, Any]] | str:
    """Int32 codes (n,) — lists of them for a list column — and a description, or the
    reason the column cannot be encoded."""
    dtype = s.dtype
    if dtype.is_nested():
        return _encode_list_column(s, cfg)
    if dtype == pl.String:
        # Loaders keep untyped columns as text: blank means missing, and numbers written as
        # text are numbers.
        v = pl.col(s.name).str.strip_chars()
        s = s.to_frame().select(pl.when(v != "").then(v).alias(s.name)).to_series()
        parsed = s.cast(pl.Float64, strict=False)
        if parsed.null_count() == s.null_count():
            nums = parsed.drop_nulls().to_numpy()
            whole = bool(
                np.isfinite(nums).all()
                and (nums == np.floor(nums)).all()
                and (np.abs(nums) < 2.0**53).all()
            )
            s = parsed.cast(pl.Int64) if whole else parsed
            dtype = s.dtype
    if dtype.is_float():
        s = s.fill_nan(None)
    numeric = dtype.is_numeric()
    if not numeric and not isinstance(dtype, pl.String | pl.Categorical | pl.Enum | pl.Boolean):
        s = s.cast(pl.String)
    present = s.drop_nulls()
    distinct = present.unique().sort()
    n_distinct = distinct.len()
    if n_distinct == 0:
        return "no values for the ids kept"
    floats = dtype.is_float()
    if not floats and n_distinct > max(100, cfg.max_distinct_share * s.len()):
        return f"id-like: {n_distinct} distinct values in {s.len()} rows"
    if floats and n_distinct > cfg.max_numeric_codes:
        qs = np.linspace(0, 1, cfg.numeric_buckets + 1)[1:-1]
        edges = np.unique(np.quantile(present.to_numpy().astype(np.float64), qs))
        values = s.to_numpy().astype(np.float64)
        codes = np.where(
            np.isnan(values), 0, 1 + np.searchsorted(edges, values, side="right")
        ).astype(np.int32)
        return codes, {"kind": "buckets", "vocab": int(edges.shape[0] + 2), "edges": edges.tolist()}
    if numeric:
        # Sorted distinct values: a binary search gives each value its code.
        pos = np.searchsorted(distinct.to_numpy(), s.fill_null(distinct[0]).to_numpy())
        codes = np.where(s.is_null().to_numpy(), 0, pos + 1).astype(np.int32)
    else:
        if isinstance(dtype, pl.Categorical | pl.Enum | pl.Boolean):
            s, distinct = s.cast(pl.String), distinct.cast(pl.String).sort()
        lookup = pl.DataFrame({"v": distinct, "code": np.arange(1, n_distinct + 1, dtype=np.int32)})
        codes = (
            pl.DataFrame({"v": s})
            .join(lookup, on="v", how="left", maintain_order="left")["code"]
            .fill_null(0)
            .to_numpy()
            .astype(np.int32)
        )
    desc: dict[str, Any] = {"kind": "codes", "vocab": int(n_distinct + 1)}
    if n_distinct <= cfg.max_listed_values:
        desc["values"] = distinct.to_list()
    return codes, desc


def encode_features(
    table: pl.DataFrame | None,
    *,
    key: str,
    values: pl.Series,
    id_map: IdMap,
    cfg: FeatureConfig,
) -> EncodedFeatures:
    """Align ``table`` (keyed by raw ids in column ``key``) with ``id_map`` and encode it.

    ``values`` are the dense-code raw ids the map was built from.  Indices without a row get
    code 0 in every column; rows of unknown ids are ignored; duplicated ids keep the first row.
    """
    if table is None or not cfg.enabled:
        return EncodedFeatures(None)
    features = [c for c in table.columns if c != key and c not in cfg.drop]
    if not features or id_map.size == 0:
        return EncodedFeatures(None)
    if table[key].dtype != values.dtype:
        try:
            table = table.with_columns(pl.col(key).cast(values.dtype))
        except pl.exceptions.PolarsError:
            table = table.with_columns(pl.col(key).cast(pl.String))
            values = values.cast(pl.String)
    n_dup = table.height - table[key].n_unique()
    if n_dup:
        logger.warning("%s feature table: %d duplicated ids, keeping the first row", key, n_dup)
        table = table.unique(subset=[key], keep="first", maintain_order=True)
    ids = pl.DataFrame({key: values.gather(id_map.code_of_index[1:])})
    aligned = ids.join(table.select([key, *features]), on=key, how="left", maintain_order="left")
    columns: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    out: dict[str, Any] = {key: np.arange(1, id_map.size + 1, dtype=np.int32)}
    for name in features:
        encoded = _encode_column(aligned[name], cfg)
        if isinstance(encoded, str):
            skipped[name] = encoded
            logger.warning("%s feature %r left out: %s", key, name, encoded)
            continue
        out[name], columns[name] = encoded
    if len(out) == 1:
        return EncodedFeatures(None, columns, skipped)
    return EncodedFeatures(pl.DataFrame(out), columns, skipped)
