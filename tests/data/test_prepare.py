"""The prepare pipeline end to end on tiny frames, against hand-computed values."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from recloop.config import config_from_dict
from recloop.data.dataset import TEST, TRAIN, VALID, PreparedDataset
from recloop.data.filters import FilterConfig, UserSampleConfig
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.schema import RawData, SkipReport
from recloop.data.sessions import SessionConfig
from recloop.data.splits import SplitConfig
from recloop.errors import ConfigError, DataError, PrepareError


def _raw() -> RawData:
    """User "u2" (5 events, one an exact duplicate) and "u1" (3 events), shuffled."""
    events = pl.DataFrame(
        {
            "user": ["u2", "u1", "u2", "u2", "u1", "u2", "u2", "u1"],
            "item": ["b", "a", "a", "c", "b", "b", "a", "a"],
            "timestamp": [100, 50, 0, 100, 60, 100, 7300, 4000],
            "behavior": ["pv", "pv", "pv", "cart", "buy", "pv", "fav", "pv"],
        }
    )
    users = pl.DataFrame({"user": ["u1", "u2"], "sex": ["F", "M"]})
    items = pl.DataFrame({"item": ["a", "b", "c"], "category": [7, 7, 9]})
    return RawData(
        events=events, users=users, items=items, source="test", skipped=SkipReport(2, ("x",))
    )


def test_prepare_by_hand() -> None:
    ds = prepare(_raw(), PrepareConfig(split=SplitConfig(mode="loo"), gamma=0.5))
    # Source row 5 repeats row 0 exactly; u2 keeps 4 events, u1 3 → u2 is user 1.
    assert ds.user_ids == ["u2", "u1"]
    # Item counts after dedupe: a 3, b 2, c 1 → a, b, c.
    assert ds.item_ids == ["a", "b", "c"]
    assert (ds.n_users, ds.n_items, ds.n_events) == (2, 3, 7)
    np.testing.assert_array_equal(ds.user, [1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(ds.user_offsets, [0, 0, 4, 7])
    # u2 at t=100 has b/pv, c/cart (source rows 0, 3): ties keep source order.
    np.testing.assert_array_equal(ds.timestamp, [0, 100, 100, 7300, 50, 60, 4000])
    np.testing.assert_array_equal(ds.item, [1, 2, 3, 1, 1, 2, 1])
    np.testing.assert_array_equal(ds.reward, [1, 1, 2, 2, 1, 3, 1])
    np.testing.assert_array_equal(ds.extra["behavior"], [1, 1, 2, 3, 1, 4, 1])
    # Sessions (gap 3600, and cut where the split changes): u2 {0, 100 train} {100 valid}
    # {7300 test}; u1 {50 train} {60 valid} {4000 test}.
    np.testing.assert_array_equal(ds.session, [0, 0, 1, 2, 3, 4, 5])
    # Returns with gamma 0.5 never reach into the next split: 1 + .5 * 1; 1; 2; 2 | 1; 3; 1
    np.testing.assert_allclose(ds.returns, [1.5, 1.0, 2.0, 2.0, 1.0, 3.0, 1.0])
    np.testing.assert_array_equal(ds.split, [TRAIN, TRAIN, VALID, TEST, TRAIN, VALID, TEST])
    assert ds.user_features is not None and ds.item_features is not None
    assert ds.user_features.to_dict(as_series=False) == {"user": [1, 2], "sex": [2, 1]}
    assert ds.item_features.to_dict(as_series=False) == {"item": [1, 2, 3], "category": [1, 1, 2]}

    m = ds.manifest
    steps = {s["step"]: s for s in m["counts"]["steps"]}
    assert steps["load"]["events"] == 8 and steps["load"]["skipped_bad_rows"] == 2
    assert steps["dedupe"]["removed_events"] == 1 and steps["dedupe"]["duplicates"] == 1
    assert m["config"]["gamma"] == 0.5 and m["config"]["split"]["mode"] == "loo"
    assert m["features"]["item"]["category"]["vocab"] == 3
    assert m["counts"]["splits"] == {"train": 3, "valid": 2, "test": 2}
    assert m["reward_source"] == "behavior"


def test_gamma_and_session_mode_change_returns() -> None:
    one = prepare(_raw(), PrepareConfig(sessions=SessionConfig(mode="user"), gamma=0.5))
    np.testing.assert_array_equal(one.session, [0, 0, 0, 0, 1, 1, 1])
    # u2 rewards 1, 1, 2, 2 in one session: 2; 2 + .5 * 2 = 3; 1 + .5 * 3 = 2.5; 2.25
    np.testing.assert_allclose(one.returns[:4], [2.25, 2.5, 3.0, 2.0])
    zero = prepare(_raw(), PrepareConfig(gamma=0.0))
    np.testing.assert_array_equal(zero.returns, zero.reward)


def test_filters_record_what_they_remove() -> None:
    cfg = PrepareConfig(filters=FilterConfig(min_item_events=2))
    ds = prepare(_raw(), cfg)
    assert ds.item_ids == ["a", "b"]
    step = ds.manifest["counts"]["steps"][-1]
    assert step["step"] == "min_events"
    assert (step["removed_events"], step["events"], step["items"]) == (1, 6, 2)
    kept = prepare(_raw(), PrepareConfig(filters=FilterConfig(dedupe=False)))
    assert kept.n_events == 8


def test_everything_filtered_is_an_error_naming_the_step() -> None:
    with pytest.raises(PrepareError, match="after step 'k_core'"):
        prepare(_raw(), PrepareConfig(filters=FilterConfig(k_core=10)))


def test_user_sampling_in_the_pipeline() -> None:
    cfg = PrepareConfig(
        sample_users=UserSampleConfig(short_users=1, short_min_events=1, short_max_events=3)
    )
    ds = prepare(_raw(), cfg)
    assert ds.user_ids == ["u1"]
    assert ds.manifest["counts"]["steps"][-1]["short"]["chosen"] == 1


def test_ratings_integer_ids_and_time_split() -> None:
    events = pl.DataFrame(
        {
            "user": [7, 7, 3, 3, 3],
            "item": [1, 2, 1, 2, 3],
            "timestamp": [1, 2, 3, 4, 5],
            "rating": [5.0, 3.0, 4.0, 1.0, 2.0],
        }
    )
    cfg = config_from_dict(
        PrepareConfig,
        {
            "split": {"mode": "time", "train": 0.6, "valid": 0.2, "test": 0.2},
            "reward": {"rating_threshold": 3.0},
        },
    )
    ds = prepare(RawData(events=events), cfg)
    # Of 5 events in time order the last round(5 * .2) = 1 is test (t >= 5), the one before
    # valid (t >= 4); the cut is global, so user "7" (t = 1, 2) is all train.  Ids rank by
    # TRAIN events: "7" has two, "3" one (its other two are held out), so "7" comes first.
    assert ds.user_ids == ["7", "3"]
    np.testing.assert_array_equal(ds.timestamp, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ds.reward, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(ds.extra["rating"], [5, 3, 4, 1, 2])
    np.testing.assert_array_equal(ds.split, [TRAIN, TRAIN, TRAIN, VALID, TEST])
    # Item 1 has two train events, 2 one, and 3 (test only) comes last.
    np.testing.assert_array_equal(ds.item, [1, 2, 1, 2, 3])
    assert ds.manifest["split"] == {"mode": "time", "valid_start": 4, "test_start": 5}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    ds = prepare(_raw(), PrepareConfig())
    ds.save(tmp_path / "out")
    back = PreparedDataset.load(tmp_path / "out")
    for name in ("user", "item", "timestamp", "reward", "returns", "session", "split"):
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name))
    np.testing.assert_array_equal(back.extra["behavior"], ds.extra["behavior"])
    assert back.item_ids == ds.item_ids and back.user_ids == ds.user_ids
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"events.arrow", "item_ids.txt", "user_features.parquet"}
    assert manifest["config"]["filters"]["dedupe"] is True


def test_pipeline_matches_a_plain_python_reference() -> None:
    rng = np.random.default_rng(11)
    e = 3000
    events = pl.DataFrame(
        {
            "user": rng.integers(0, 80, e),
            "item": rng.integers(0, 120, e) * 1000,
            "timestamp": rng.integers(0, 30_000, e),
            "behavior": rng.choice(["pv", "cart", "fav", "buy"], e, p=[0.7, 0.1, 0.1, 0.1]),
        }
    )
    cfg = PrepareConfig(split=SplitConfig(mode="loo"), gamma=0.8)
    ds = prepare(RawData(events=events), cfg)

    rows = events.rows()
    seen: set[tuple[object, ...]] = set()
    kept = []
    for i, r in enumerate(rows):
        if r not in seen:
            seen.add(r)
            kept.append((r[0], r[2], i, r[1], r[3]))  # user, ts, source row, item, behavior
    kept.sort(key=lambda x: (x[0], x[1], x[2]))
    ucount = Counter(k[0] for k in kept)
    split_of = {}
    seen_of: Counter[object] = Counter()
    for k in kept:
        total, pos = ucount[k[0]], seen_of[k[0]]
        seen_of[k[0]] += 1
        split_of[k[2]] = 0 if total < 3 else 2 if pos == total - 1 else 1 if pos == total - 2 else 0
    # Ids rank by TRAIN counts; ids without a train event follow by raw id.
    train_u = {k[0]: 0 for k in kept}
    train_i = {k[3]: 0 for k in kept}
    for k in kept:
        if split_of[k[2]] == 0:
            train_u[k[0]] += 1
            train_i[k[3]] += 1
    by_freq = lambda c: sorted(c.items(), key=lambda x: (-x[1], x[0]))  # noqa: E731
    uidx = {u: n + 1 for n, (u, _) in enumerate(by_freq(train_u))}
    iidx = {i: n + 1 for n, (i, _) in enumerate(by_freq(train_i))}
    kept.sort(key=lambda x: (uidx[x[0]], x[1], x[2]))
    ref_split = [split_of[k[2]] for k in kept]
    reward_of = {"pv": 1.0, "cart": 2.0, "fav": 2.0, "buy": 3.0}
    ref_returns = [0.0] * len(kept)
    for n in range(len(kept) - 1, -1, -1):
        nxt = kept[n + 1] if n + 1 < len(kept) else None
        same = (
            nxt is not None
            and nxt[0] == kept[n][0]
            and nxt[1] - kept[n][1] <= 3600
            and ref_split[n + 1] == ref_split[n]
        )
        ref_returns[n] = reward_of[kept[n][4]] + (0.8 * ref_returns[n + 1] if same else 0.0)

    np.testing.assert_array_equal(ds.user, [uidx[k[0]] for k in kept])
    np.testing.assert_array_equal(ds.item, [iidx[k[3]] for k in kept])
    np.testing.assert_array_equal(ds.timestamp, [k[1] for k in kept])
    np.testing.assert_allclose(ds.returns, ref_returns, rtol=1e-6)
    np.testing.assert_array_equal(ds.split, ref_split)


def test_wrong_config_field_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"unknown field 'filters\.k_cor'"):
        config_from_dict(PrepareConfig, {"filters": {"k_cor": 5}})
    with pytest.raises(ConfigError, match="gamma"):
        PrepareConfig(gamma=1.5)


def test_movielens_100k_default_config(ml100k_dir: Path) -> None:
    from recloop.data.loaders import load_raw

    ds = prepare(load_raw("recbole", ml100k_dir), PrepareConfig())
    assert (ds.n_users, ds.n_items, ds.n_events) == (943, 1682, 100_000)
    counts = ds.split_counts()
    assert sum(counts.values()) == 100_000 and counts["test"] > 0 and counts["valid"] > 0


def test_logged_propensities_are_kept_in_event_order() -> None:
    events = pl.DataFrame(
        {
            "user": [2, 1, 1, 2],
            "item": [5, 5, 6, 6],
            "timestamp": [3, 2, 1, 4],
            "propensity": ["0.25", "0.5", "1", "0.125"],  # CSV columns arrive as text
        }
    )
    ds = prepare(RawData(events=events), PrepareConfig())
    # rows sorted by (user index, time): user 1 (t 1, 2), then user 2 (t 3, 4)
    np.testing.assert_array_equal(ds.extra["propensity"], [1.0, 0.5, 0.25, 0.125])
    assert ds.extra["propensity"].dtype == np.float64
    assert "propensity" not in ds.manifest["dropped_columns"]


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1", "nan", "x"])
def test_bad_propensity_names_the_row(bad: str) -> None:
    events = pl.DataFrame(
        {"user": [1, 1], "item": [5, 6], "timestamp": [1, 2], "propensity": ["0.5", bad]}
    )
    with pytest.raises(DataError, match=r'column "propensity".*row 2'):
        prepare(RawData(events=events), PrepareConfig())


def test_ratings_too_large_for_a_float32_reward_are_refused() -> None:
    events = pl.DataFrame(
        {"user": [1, 1, 2], "item": [5, 6, 5], "timestamp": [1, 2, 3], "rating": [4.0, 1e308, 3.0]}
    )
    with pytest.raises(DataError, match=r'column "rating", row 2: 1e\+308 does not fit'):
        prepare(RawData(events=events), PrepareConfig())


def test_policy_versions_travel_with_their_propensities(tmp_path: Path) -> None:
    events = pl.DataFrame(
        {
            "user": [2, 1, 1, 2],
            "item": [5, 5, 6, 6],
            "timestamp": [3, 2, 1, 4],
            "propensity": [0.25, 0.5, 1.0, 0.125],
            "policy_version": ["v2", "v1", "v1", "v2"],
        }
    )
    ds = prepare(RawData(events=events), PrepareConfig())
    assert ds.extra["policy_version"].tolist() == ["v1", "v1", "v2", "v2"]
    ds.save(tmp_path / "out")
    back = PreparedDataset.load(tmp_path / "out")
    assert back.extra["policy_version"].tolist() == ["v1", "v1", "v2", "v2"]
    np.testing.assert_array_equal(back.extra["propensity"], [1.0, 0.5, 0.25, 0.125])


def test_serving_columns_travel_with_their_impressions() -> None:
    events = pl.DataFrame(
        {
            "user": [2, 1, 1, 2],
            "item": [5, 5, 6, 6],
            "timestamp": [3, 2, 1, 4],
            "propensity": [0.25, 0.5, 1.0, 0.125],
            "policy": ["epsilon", "softmax", "topk", "epsilon"],
            "position": ["1", "0", "0", "0"],  # CSV columns arrive as text
            "list_length": [2, 1, 1, 1],
            "epsilon": [0.1, None, None, 0.2],
            "temperature": [None, 0.5, None, None],
        }
    )
    ds = prepare(RawData(events=events), PrepareConfig())
    assert ds.extra["policy"].tolist() == ["topk", "softmax", "epsilon", "epsilon"]
    assert ds.extra["position"].tolist() == [0, 0, 1, 0]
    assert ds.extra["position"].dtype == np.int32
    assert ds.extra["list_length"].tolist() == [1, 1, 2, 1]
    np.testing.assert_array_equal(ds.extra["epsilon"], [np.nan, np.nan, 0.1, 0.2])
    np.testing.assert_array_equal(ds.extra["temperature"], [np.nan, 0.5, np.nan, np.nan])
    assert ds.manifest["dropped_columns"] == []
    assert ds.manifest["columns"]["position"] == {"dtype": "int32"}


@pytest.mark.parametrize(
    ("column", "values", "match"),
    [
        ("position", ["0", "-1"], r'column "position", row 2: .*-1.* is not an integer >= 0'),
        ("position", [0, 1.5], r'column "position", row 2: 1\.5 is not an integer >= 0'),
        ("position", [0, None], r'column "position", row 2: None is not an integer'),
        ("list_length", [1, 0], r'column "list_length", row 2: 0 is not an integer >= 1'),
        ("epsilon", [0.1, 1.5], r'column "epsilon", row 2: 1\.5 is not in \[0, 1\]'),
        ("temperature", [None, 0.0], r'column "temperature", row 2: 0\.0 is not > 0'),
        ("list_length", [1, 1], r'column "position", row 2: 1 is not below its list_length 1'),
    ],
)
def test_bad_serving_columns_name_the_row(column: str, values: list[Any], match: str) -> None:
    cols: dict[str, list[Any]] = {
        "user": [1, 1], "item": [5, 6], "timestamp": [1, 2], "position": [0, 1],
        "list_length": [1, 2],
    }  # fmt: skip
    cols[column] = values
    with pytest.raises(DataError, match=match):
        prepare(RawData(events=pl.DataFrame(cols, strict=False)), PrepareConfig())
