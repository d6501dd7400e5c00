"""Dense codes, frequency-ranked id maps and feature encoding."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recloop.data.ids import (
    FeatureConfig,
    dense_codes,
    encode_features,
    frequency_ranked,
)
from recloop.errors import DataError


@pytest.mark.parametrize(
    "ids",
    [
        pl.Series("user", [30, 10, 20, 10]),  # direct addressing
        pl.Series("user", [3 * 10**15, 10**15, 2 * 10**15, 10**15]),  # sparse: sort path
        pl.Series("user", ["c", "a", "b", "a"]),  # strings
    ],
)
def test_dense_codes_follow_ascending_raw_ids(ids: pl.Series) -> None:
    codes = dense_codes(ids, name="user")
    np.testing.assert_array_equal(codes.codes, [2, 0, 1, 0])
    assert codes.values.to_list() == sorted(set(ids.to_list()))
    assert codes.codes.dtype == np.int32


def test_dense_codes_reject_missing_ids() -> None:
    with pytest.raises(DataError, match='"item": 1 missing'):
        dense_codes(pl.Series("item", [1, None, 3]), name="item")


def test_frequency_ranked_most_frequent_first_ties_by_raw_id() -> None:
    # raw ids (as codes 0..4 in ascending raw order): counts 2, 3, 2, 0, 1
    codes = np.array([1, 0, 2, 1, 4, 2, 1, 0])
    m = frequency_ranked(codes, 5)
    # code 1 (3 events) → 1; codes 0 and 2 tie at 2 → smaller raw id first; code 4 → 4.
    np.testing.assert_array_equal(m.code_of_index, [-1, 1, 0, 2, 4])
    np.testing.assert_array_equal(m.index_of_code, [2, 1, 3, 0, 4])
    np.testing.assert_array_equal(m.counts, [0, 3, 2, 2, 1])
    assert m.size == 4
    values = pl.Series("item", ["a", "b", "c", "d", "e"])
    assert m.raw_ids(values) == ["b", "a", "c", "e"]


def test_frequency_ranked_does_not_depend_on_row_order() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 50, 2000)
    a = frequency_ranked(codes, 50)
    b = frequency_ranked(rng.permutation(codes), 50)
    np.testing.assert_array_equal(a.index_of_code, b.index_of_code)


def test_encode_features_aligns_codes_and_buckets() -> None:
    values = pl.Series("user", [10, 20, 30, 40])  # dense codes 0..3
    id_map = frequency_ranked(np.array([2, 2, 0, 3]), 4)  # index 1 = raw 30, 2 = 10, 3 = 40
    table = pl.DataFrame(
        {
            "user": [40, 10, 30, 99],
            "sex": ["F", "M", None, "M"],
            "age": ["31", "25", "31", "40"],
            "score": [0.5, 1.5, 2.5, 9.0],
            "shop": [700, 5, 123, 9],
        }
    )
    cfg = FeatureConfig(max_numeric_codes=2, numeric_buckets=2)
    enc = encode_features(table, key="user", values=values, id_map=id_map, cfg=cfg)
    assert enc.table is not None
    assert enc.table["user"].to_list() == [1, 2, 3]
    # sex: F → 1, M → 2, missing → 0, in index order (raw 30, 10, 40).
    assert enc.table["sex"].to_list() == [0, 2, 1]
    # age is text of numbers: two distinct (25, 31) → codes in numeric order.
    assert enc.table["age"].to_list() == [2, 1, 2]
    assert enc.columns["age"] == {"kind": "codes", "vocab": 3, "values": [25, 31]}
    # score has 3 distinct values among the users kept (> 2) → 2 quantile buckets (median 1.5).
    assert enc.columns["score"]["kind"] == "buckets"
    assert enc.columns["score"]["edges"] == [1.5]
    assert enc.table["score"].to_list() == [2, 2, 1]
    # Integers are ids (a shop, a brand): one code each however many, in numeric order.
    assert enc.table["shop"].to_list() == [2, 1, 3]
    assert enc.columns["shop"] == {"kind": "codes", "vocab": 4, "values": [5, 123, 700]}
    assert all(enc.table[c].dtype == pl.Int32 for c in ("sex", "age", "score", "shop"))


def test_encode_features_codes_list_columns_element_by_element() -> None:
    values = pl.Series("item", [1, 2, 3, 4])
    id_map = frequency_ranked(np.array([0, 1, 2, 3]), 4)  # index i = raw i (ties by code)
    table = pl.DataFrame(
        {
            "item": [1, 2, 3],  # raw 4 has no row
            "genres": [["Drama", "Comedy"], [], None],
        },
        schema={"item": pl.Int64, "genres": pl.List(pl.String)},
    )
    enc = encode_features(table, key="item", values=values, id_map=id_map, cfg=FeatureConfig())
    assert enc.table is not None
    assert enc.table["genres"].dtype == pl.List(pl.Int32)
    # One vocabulary over the elements (Comedy 1, Drama 2); no row / empty / null → [].
    assert enc.table["genres"].to_list() == [[2, 1], [], [], []]
    assert enc.columns["genres"] == {
        "kind": "codes_list",
        "vocab": 3,
        "values": ["Comedy", "Drama"],
    }


def test_encode_features_leaves_out_id_like_text_and_dropped_columns() -> None:
    n = 300
    values = pl.Series("item", np.arange(n))
    id_map = frequency_ranked(np.arange(n), n)
    table = pl.DataFrame(
        {"item": np.arange(n), "title": [f"t{i}" for i in range(n)], "cat": ["a", "b", "c"] * 100}
    )
    enc = encode_features(
        table, key="item", values=values, id_map=id_map, cfg=FeatureConfig(drop=("cat",))
    )
    assert enc.table is None
    assert "title" in enc.skipped and "id-like" in enc.skipped["title"]
    enc = encode_features(table, key="item", values=values, id_map=id_map, cfg=FeatureConfig())
    assert enc.table is not None and enc.table.columns == ["item", "cat"]
    assert enc.columns["cat"]["vocab"] == 4
