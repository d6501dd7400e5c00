"""Reading the SQL behaviour log back as training data (``recloop prepare --from-db``)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
import sqlalchemy as sa

from recloop.data.loaders.sql import load_from_db
from recloop.errors import DataError
from recloop.streaming.events import EVENT_SCHEMA
from recloop.streaming.log import BehaviorLog

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def logged(
    rows: list[tuple[str, str, str, int, str | None, float | None, float | None]],
) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'log.db'}" if request.param == "sqlite" else POSTGRES_URL


def test_log_reads_back_as_raw_events(url: str) -> None:
    prefix = f"ld{uuid.uuid4().hex[:8]}_"
    log = BehaviorLog(url, prefix=prefix)
    try:
        log.append(
            logged(
                [
                    ("e2", "196", "242", 20, None, 3.0, 1.0),
                    ("e1", "186", "302", 10, None, 4.0, 2.0),
                    ("e3", "196", "51", 30, None, None, 0.5),
                ]
            ),
            slide_s=80,
        )
        raw = load_from_db(url, table=f"{prefix}behavior_log")
    finally:
        log.drop_schema()
        log.dispose()
    ev = raw.events
    assert ev.columns == ["user", "item", "timestamp", "rating", "reward", "event_id"]
    assert ev["user"].dtype == pl.Int64 and ev["item"].dtype == pl.Int64
    assert ev.rows() == [
        (186, 302, 10, 4.0, 2.0, "e1"),
        (196, 242, 20, 3.0, 1.0, "e2"),
        (196, 51, 30, None, 0.5, "e3"),
    ]
    assert f"table {prefix}behavior_log" in raw.source


def test_string_ids_and_behaviors_are_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = BehaviorLog(url)
    log.append(
        logged(
            [
                ("a", "u1", "007", 1, "pv", None, None),
                ("b", "u2", "7", 2, "buy", None, None),
            ]
        ),
        slide_s=80,
    )
    ev = load_from_db(url).events
    assert ev.columns == ["user", "item", "timestamp", "behavior", "reward", "event_id"]
    # "007" and "7" are different items: ids stay strings unless they read back the same.
    assert ev["item"].to_list() == ["007", "7"] and ev["item"].dtype == pl.String
    assert ev["behavior"].to_list() == ["pv", "buy"]


def test_missing_table_and_wrong_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(DataError, match="no such table"):
        load_from_db(url)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE other (event_id TEXT, user_id TEXT)"))
    engine.dispose()
    with pytest.raises(DataError, match="missing columns item_id, ts"):
        load_from_db(url, table="other")


def test_logged_events_prepare_into_the_next_training_set(tmp_path: Path) -> None:
    """Closing the loop: the stream's log → load_from_db → prepare → a PreparedDataset."""
    import numpy as np

    from recloop.data.prepare import PrepareConfig, prepare

    rng = np.random.default_rng(0)
    n = 2000
    url = f"sqlite:///{tmp_path / 'log.db'}"
    events = pl.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": [f"u{k}" for k in rng.integers(1, 40, n)],
            "item_id": [f"i{k}" for k in rng.integers(1, 60, n)],
            "ts": np.sort(rng.integers(0, 10**6, n)),
            "behavior": [None] * n,
            "rating": rng.integers(1, 6, n).astype(float),
            "reward": [None] * n,
        },
        schema=EVENT_SCHEMA,
    )
    log = BehaviorLog(url)
    log.append(events, slide_s=80)
    log.append(events[:500], slide_s=80)  # a redelivery changes nothing
    ds = prepare(load_from_db(url), PrepareConfig())
    assert ds.n_events == n
    assert sorted(ds.user_ids) == sorted(events["user_id"].unique().to_list())
    assert sorted(ds.item_ids) == sorted(events["item_id"].unique().to_list())


def context_of(k: int) -> dict[str, list[Any]] | None:
    """The context list ``k`` of :func:`served_lists` logs (even lists only, as if the odd
    ones came from a service from before contexts)."""
    if k % 2:
        return None
    return {"recent": [f"i{k}", "gone"], "rewards": [1.0, 0.0], "excluded": [f"i{k}"]}


def served_lists(n_lists: int, seed: int = 0) -> pl.DataFrame:
    """Served-items rows of random lists of 3 (SERVED_SCHEMA), propensities in (0, 1]."""
    import numpy as np

    from recloop.streaming.served import served_rows

    rng = np.random.default_rng(seed)
    docs = []
    for k in range(n_lists):
        items = [f"i{x}" for x in rng.choice(30, 3, replace=False)]
        docs.append(
            {
                "recommendation_id": f"r{k}",
                "user_id": f"u{rng.integers(20)}",
                "ts": 1000 + 10 * k,
                "model_version": "m1" if k % 2 else "m2",
                "policy": "softmax",
                "temperature": 1.0,
                "epsilon": None,
                "seed": k,
                "source": "policy",
                "slate_propensity": None,
                "items": items,
                "scores": [0.0] * 3,
                "propensities": rng.uniform(0.05, 1.0, 3).round(3).tolist(),
                "context": context_of(k),
            }
        )
    return served_rows(docs)


def test_impressions_read_back_with_rewards_and_propensities(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from recloop.data.loaders.sql import load_impressions_from_db

    prefix = f"ld{uuid.uuid4().hex[:8]}_"
    log = BehaviorLog(url, prefix=prefix)
    rows = served_lists(4)
    try:
        log.append_served(rows)
        log.append(
            logged([("e1", rows["user_id"][1], rows["item_id"][1], 1001, None, None, 2.5)]),
            slide_s=80,
        )
        log.attribute_users(rows["user_id"].to_list(), window_s=600)
        log.settle(1020)  # the first two lists (ts 1000, 1010) are settled, not the others
        table = f"{prefix}served_items"
        raw = load_impressions_from_db(url, table=table)
        everything = load_impressions_from_db(url, table=table, settled_only=False)
    finally:
        log.drop_schema()
        log.dispose()
    ev = raw.events
    assert ev.columns == [
        "user", "item", "timestamp", "rating", "propensity", "policy_version", "policy",
        "temperature", "epsilon", "list_source", "position", "list_length", "event_id",
        "served_context",
    ]  # fmt: skip
    assert ev.height == 6 and everything.events.height == 12
    # the open ones are left out with a count, not silently
    assert raw.source.endswith("(6 open impressions left out)")
    assert "6 impressions left out, their attribution window still open" in caplog.text
    assert "left out" not in everything.source
    assert ev["rating"].to_list() == [0.0, 2.5, 0.0, 0.0, 0.0, 0.0]  # reward of r0's item 1
    assert ev["propensity"].to_list() == rows["propensity"][:6].to_list()
    assert ev["policy_version"].to_list() == ["m2"] * 3 + ["m1"] * 3
    assert ev["event_id"][:2].to_list() == ["r0:0", "r0:1"]
    assert ev["position"].to_list() == [0, 1, 2] * 2
    assert ev["list_length"].to_list() == [3] * 6
    assert ev["temperature"].to_list() == [1.0] * 6
    assert ev["epsilon"].null_count() == 6
    assert ev["list_source"].to_list() == ["policy"] * 6
    # each list's context on its first row (r0 logged one, r1 did not)
    assert orjson.loads(ev["served_context"][0]) == context_of(0)
    assert ev["served_context"][1:].to_list() == [None] * 5


def test_a_context_column_without_a_value_is_kept(tmp_path: Path) -> None:
    """A served-items table from before contexts were logged gets the column (ALTER), every
    value null: it is read all the same, so that OPE can say its lists carry none."""
    from recloop.data.loaders.sql import load_impressions_from_db

    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = BehaviorLog(url)
    rows = served_lists(4).with_columns(pl.lit(None, pl.String).alias("context"))
    log.append_served(rows)
    log.settle(10**9)
    log.dispose()
    ev = load_impressions_from_db(url).events
    assert ev["served_context"].null_count() == ev.height == 12
    # a reader that does not need the contexts does not read them
    assert "served_context" not in load_impressions_from_db(url, context=False).events.columns


def test_impressions_prepare_with_their_logged_propensities(tmp_path: Path) -> None:
    """The off-policy loop: served lists → attributed impressions → a prepared dataset whose
    ``propensity`` column OPE and REINFORCE read."""
    import numpy as np

    from recloop.data.dataset import PreparedDataset
    from recloop.data.loaders.sql import load_impressions_from_db
    from recloop.data.prepare import PrepareConfig, prepare

    url = f"sqlite:///{tmp_path / 'log.db'}"
    log = BehaviorLog(url)
    rows = served_lists(400, seed=1)
    log.append_served(rows)
    log.settle(10**9)
    ds = prepare(load_impressions_from_db(url), PrepareConfig())
    assert "propensity" in ds.extra
    got = np.sort(ds.extra["propensity"])
    assert ds.n_events == rows.height
    np.testing.assert_allclose(got, np.sort(rows["propensity"].to_numpy()))
    assert set(np.unique(ds.reward).tolist()) == {0.0}
    # how each impression was served, for OPE's served target, survives a save and a load
    ds.save(tmp_path / "ds")
    back = PreparedDataset.load(tmp_path / "ds")
    assert back.extra["policy"].tolist() == ["softmax"] * rows.height
    assert back.extra["list_length"].tolist() == [3] * rows.height
    assert np.isnan(back.extra["epsilon"]).all() and (back.extra["temperature"] == 1.0).all()
    # ... and so does what each list was drawn from: on its first row, as objects
    ctx = back.extra["served_context"]
    assert ctx.dtype == object
    # written as a large string (64-bit offsets: past 2 GiB of contexts in one column)
    import pyarrow as pa
    import pyarrow.ipc as ipc

    events_file = next((tmp_path / "ds").glob("events*.arrow"))
    table = ipc.open_file(pa.memory_map(str(events_file), "r")).read_all()
    assert table.schema.field("served_context").type == pa.large_string()
    texts = {orjson.loads(t)["recent"][0]: t for t in ctx.tolist() if t}
    assert len(texts) == 200 and (ctx[back.extra["position"] > 0] == "").all()
    assert orjson.loads(texts["i4"]) == context_of(4)
    # a list's rows stay together, in position order, at one time
    pos = back.extra["position"]
    first = np.flatnonzero(pos == 0)
    assert first.shape[0] == 400
    np.testing.assert_array_equal(pos[first[:, None] + np.arange(3)], [[0, 1, 2]] * 400)
    np.testing.assert_array_equal(np.diff(back.timestamp[first[:, None] + np.arange(3)]), 0)
    # and OPE's served target scores every slot of these softmax lists, the lower ones given
    # the items logged above them
    import torch

    from recloop.evaluation.ope import OPEConfig, logged_events, policy_terms

    # (these random lists show a user the same items again and again: nothing masked here)
    cfg = OPEConfig(target="served", n_boot=0, mask_consumed=False)
    events = logged_events(back, cfg=cfg)
    table = torch.randn(
        back.n_users + 1, back.n_items + 1, generator=torch.Generator().manual_seed(0)
    )
    terms = policy_terms(lambda u, h, r: table[u], back, events, history=2, cfg=cfg)
    slots = back.extra["position"][events.rows]
    assert set(slots.tolist()) == {0, 1, 2}
    assert np.isfinite(terms.p_target).all() and (terms.p_target > 0).all()


def test_impressions_need_from_db(tmp_path: Path) -> None:
    from recloop.cli.prepare import run_prepare
    from recloop.data.prepare import PrepareJob
    from recloop.errors import ConfigError

    with pytest.raises(ConfigError, match="--impressions"):
        run_prepare(
            fmt=None, input_path=None, output=tmp_path / "o", job=PrepareJob(), impressions=True
        )


def test_a_log_with_some_events_without_a_behaviour_prepares_with_skip_bad_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stream accepts an event without a behaviour; rewards from behaviours need one
    per event: the error says what to do, and --skip-bad-rows leaves those events out with
    a count naming them (not the whole log)."""
    import json

    import numpy as np

    from recloop.cli import main

    rng = np.random.default_rng(0)
    n = 300
    url = f"sqlite:///{tmp_path / 'log.db'}"
    behaviors = [None if i in (7, 100) else ["pv", "cart"][i % 2] for i in range(n)]
    events = pl.DataFrame(
        {
            "event_id": [f"e{i:03d}" for i in range(n)],
            "user_id": [f"u{k}" for k in rng.integers(1, 20, n)],
            "item_id": [f"i{k}" for k in rng.integers(1, 30, n)],
            "ts": np.arange(n) * 10,
            "behavior": behaviors,
            "rating": [None] * n,
            "reward": [1.0] * n,
        },
        schema=EVENT_SCHEMA,
    )
    log = BehaviorLog(url)
    log.append(events, slide_s=80)
    log.dispose()
    args = ["prepare", "--from-db", url, "--split", "ratio", "--json"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "2 events without a behaviour" in err and "--skip-bad-rows" in err
    assert main([*args, "--output", str(tmp_path / "b"), "--skip-bad-rows"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n_events"] == n - 2, doc
    assert doc["skipped_bad_rows"] == 2
    assert "event 'e007': column behavior: no value" in doc["skipped_examples"][0]
    # rewards from elsewhere need no behaviour: nothing is skipped
    const = [*args, "--output", str(tmp_path / "c"), "--skip-bad-rows"]
    assert main([*const, "--set", "reward.source=constant"]) == 0
    assert json.loads(capsys.readouterr().out)["n_events"] == n
