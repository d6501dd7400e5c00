"""Generic CSV and Parquet loading with a column mapping."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from recloop.cli import main
from recloop.config import config_from_dict
from recloop.data.loaders import ColumnMapping, LoadOptions, load_raw
from recloop.errors import ConfigError, DataError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def opts(**mapping: object) -> LoadOptions:
    return config_from_dict(LoadOptions, {"columns": mapping})


def test_column_mapping_from_config_dict() -> None:
    options = config_from_dict(
        LoadOptions,
        {
            "skip_bad_rows": True,
            "columns": {
                "user": "uid",
                "item": "sku",
                "timestamp": "ts",
                "timestamp_format": "%Y-%m-%d %H:%M:%S",
                "delimiter": "\t",
                "behavior_values": ["click", "order"],
                "item_features": "items.csv",
            },
        },
    )
    assert options.columns == ColumnMapping(
        user="uid",
        item="sku",
        timestamp="ts",
        timestamp_format="%Y-%m-%d %H:%M:%S",
        delimiter="\t",
        behavior_values=("click", "order"),
        item_features=Path("items.csv"),
    )
    with pytest.raises(ConfigError, match="delimiter must be one character"):
        config_from_dict(LoadOptions, {"columns": {"delimiter": ";;"}})
    with pytest.raises(ConfigError, match="mapped to two fields"):
        ColumnMapping(user="id", item="id")
    with pytest.raises(ConfigError, match=r"unknown field 'columns\.usr'"):
        config_from_dict(LoadOptions, {"columns": {"usr": "a"}})


def test_csv_with_mapping_time_format_and_extras(tmp_path: Path) -> None:
    f = write(
        tmp_path / "log.csv",
        "uid,sku,when,event,price\n"
        "a,1,2024-01-02 03:04:05,click,9.5\n"
        "b,2,2024-01-02 03:04:06,order,\n",
    )
    raw = load_raw(
        "csv",
        f,
        opts(
            user="uid",
            item="sku",
            timestamp="when",
            behavior="event",
            timestamp_format="%Y-%m-%d %H:%M:%S",
            behavior_values=["click", "order"],
        ),
    )
    t0 = int(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC).timestamp())
    assert raw.events.columns == ["user", "item", "timestamp", "behavior", "price"]
    assert raw.events.rows() == [("a", 1, t0, "click", "9.5"), ("b", 2, t0 + 1, "order", None)]
    assert raw.source == f"csv {f}"


def test_csv_defaults_pick_behavior_and_rating_by_name(tmp_path: Path) -> None:
    write(tmp_path / "d" / "events.csv", "user,item,timestamp,rating\n1,2,1700000000123,4\n")
    raw = load_raw("csv", tmp_path / "d", opts(timestamp_format="ms"))
    assert raw.events.rows() == [(1, 2, 1700000000, 4.0)]


def test_csv_without_header_uses_positional_names(tmp_path: Path) -> None:
    f = write(tmp_path / "e.tsv", "7\t8\t100\n7\t9\t101.7\n")
    raw = load_raw(
        "csv",
        f,
        opts(
            user="column_1", item="column_2", timestamp="column_3", delimiter="\t", has_header=False
        ),
    )
    assert raw.events.rows() == [(7, 8, 100), (7, 9, 101)]


def test_csv_errors_name_line_column_and_value(tmp_path: Path) -> None:
    f = write(tmp_path / "e.csv", "user,item,timestamp,rating\n1,2,3,4\n1,2,3,four\n")
    with pytest.raises(DataError) as err:
        load_raw("csv", f)
    assert str(err.value) == f'{f} line 3, column "rating": cannot parse "four" as a number'
    f = write(tmp_path / "m.csv", "user,item,time\n1,2,3\n")
    with pytest.raises(DataError, match=r'line 1, column "timestamp": missing column "timestamp"'):
        load_raw("csv", f)
    f = write(tmp_path / "s.csv", "user;item;timestamp\n1;2;3\n")
    with pytest.raises(DataError, match="looks semicolon-separated but comma was expected"):
        load_raw("csv", f)
    f = write(tmp_path / "b.csv", "user,item,timestamp,behavior\n1,2,3,click\n1,2,3,clack\n")
    with pytest.raises(DataError, match=r'line 3, column "behavior": unknown value "clack"'):
        load_raw("csv", f, opts(behavior_values=["click"]))
    f = write(tmp_path / "t.csv", "user,item,timestamp\n1,2,2024-13-01\n")
    with pytest.raises(
        DataError, match="cannot parse \"2024-13-01\" as a time with format '%Y-%m-%d'"
    ):
        load_raw("csv", f, opts(timestamp_format="%Y-%m-%d"))
    f = write(tmp_path / "c.csv", "uid,user,item,timestamp\n1,2,3,4\n")
    with pytest.raises(DataError, match='column "user" is not mapped but has the name of a schema'):
        load_raw("csv", f, opts(user="uid"))
    with pytest.raises(DataError, match="empty file"):
        load_raw("csv", write(tmp_path / "h.csv", "user,item,timestamp\n"))


def test_csv_feature_files_align_id_types(tmp_path: Path) -> None:
    write(tmp_path / "ev.csv", "user,item,timestamp\n1,10,5\n2,11,6\n")
    write(tmp_path / "items.csv", "item,color,size\n10,red,1\nX,blue,2\n10,green,3\n")
    write(tmp_path / "users.csv", "user,tier\n1,3\n")
    raw = load_raw(
        "csv",
        tmp_path / "ev.csv",
        opts(item_features=str(tmp_path / "items.csv"), user_features=str(tmp_path / "users.csv")),
    )
    assert raw.items is not None and raw.users is not None
    # One item id is not an integer, so both sides become strings; the duplicate 10 is dropped.
    assert raw.events["item"].to_list() == ["10", "11"]
    assert raw.items.rows() == [("10", "red", 1), ("X", "blue", 2)]
    assert raw.users.rows() == [(1, 3)]


def test_parquet_typed_columns(tmp_path: Path) -> None:
    t = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    frame = pl.DataFrame(
        {
            "u": [1, 2, 3],
            "i": ["a", "b", "c"],
            "at": [t, t + dt.timedelta(seconds=90), t],
            "rating": [1.0, 2.0, 3.0],
            "extra": [True, False, True],
        }
    )
    frame.write_parquet(tmp_path / "ev.parquet")
    raw = load_raw("parquet", tmp_path / "ev.parquet", opts(user="u", item="i", timestamp="at"))
    base = int(t.timestamp())
    assert raw.events.rows() == [
        (1, "a", base, 1.0, True),
        (2, "b", base + 90, 2.0, False),
        (3, "c", base, 3.0, True),
    ]


def test_parquet_bad_rows_are_named_by_row(tmp_path: Path) -> None:
    pl.DataFrame(
        {"user": [1, None, 3], "item": [1, 2, 3], "timestamp": [1.5, 2.0, None]}
    ).write_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError) as err:
        load_raw("parquet", tmp_path)
    assert str(err.value).endswith(
        'p.parquet column "user": missing value in row 2'
        " (1 more bad rows; --skip-bad-rows skips them)"
    )
    raw = load_raw("parquet", tmp_path, LoadOptions(skip_bad_rows=True))
    assert raw.events.rows() == [(1, 1, 1)]
    assert raw.skipped.count == 2
    with pytest.raises(DataError, match="0 parquet files in this directory"):
        load_raw("parquet", write(tmp_path / "x" / "a.csv", "").parent)


def test_inspect_reads_the_mapping_from_a_prepare_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = write(tmp_path / "ev.csv", "uid,sku,ts\n1,2,3\n1,3,4\n")
    config = write(tmp_path / "prep.yaml", "gamma: 0.9\nload:\n  columns:\n    user: uid\n")
    args = ["data", "inspect", "-f", "csv", "-i", str(f), "--config", str(config), "--json"]
    assert main([*args, "--set", "columns.item=sku", "--set", "columns.timestamp=ts"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["events"], out["users"], out["items"]) == (2, 1, 2)
    assert main([*args, "--set", "columns.item=nope"]) == 2
    assert 'missing column "nope"' in capsys.readouterr().err


def test_csv_parts_in_a_directory_or_a_glob_load_as_one_log(tmp_path: Path) -> None:
    head = "user,item,timestamp\n"
    write(tmp_path / "log" / "part-0.csv", head + "1,10,100\n2,20,200\n")
    write(tmp_path / "log" / "part-1.csv", head + "u3,30,300\n")
    write(tmp_path / "log" / "other.txt", head + "4,40,400\n")
    whole = load_raw("csv", tmp_path / "log")
    assert whole.events.rows() == [("4", 40, 400), ("1", 10, 100), ("2", 20, 200), ("u3", 30, 300)]
    parts = load_raw("csv", tmp_path / "log" / "part-*.csv")
    # Integer ids in one part and text in another: text everywhere.
    assert parts.events.rows() == [("1", 10, 100), ("2", 20, 200), ("u3", 30, 300)]
    with pytest.raises(DataError, match="no file matches this pattern"):
        load_raw("csv", tmp_path / "log" / "nothing-*.csv")


def test_a_bad_value_in_a_part_names_that_part_and_its_line(tmp_path: Path) -> None:
    head = "user,item,timestamp\n"
    write(tmp_path / "log" / "a.csv", head + "1,10,100\n")
    write(tmp_path / "log" / "b.csv", head + "2,20,200\n3,30,soon\n")
    with pytest.raises(DataError) as err:
        load_raw("csv", tmp_path / "log")
    message = str(err.value)
    assert "b.csv" in message and "line 3" in message and '"timestamp"' in message
    assert "soon" in message
    raw = load_raw("csv", tmp_path / "log" / "*.csv", LoadOptions(skip_bad_rows=True))
    assert raw.events.height == 2 and raw.skipped.count == 1


def test_parquet_parts_are_validated_one_by_one(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    pl.DataFrame({"user": [1], "item": [1], "timestamp": [1]}).write_parquet(
        tmp_path / "p" / "a.parquet"
    )
    pl.DataFrame({"user": [2, None], "item": [2, 2], "timestamp": [2, 3]}).write_parquet(
        tmp_path / "p" / "b.parquet"
    )
    with pytest.raises(DataError) as err:
        load_raw("parquet", tmp_path / "p" / "*.parquet")
    assert str(err.value).endswith('b.parquet column "user": missing value in row 2')
    raw = load_raw("parquet", tmp_path / "p", LoadOptions(skip_bad_rows=True))
    assert raw.events.rows() == [(1, 1, 1), (2, 2, 2)]


def test_feature_files_beside_the_parts_are_not_read_as_events(tmp_path: Path) -> None:
    write(tmp_path / "log" / "events.csv", "user,item,timestamp\n1,10,100\n")
    write(tmp_path / "log" / "users.csv", "user,age\n1,30\n")
    mapping = ColumnMapping(user_features=tmp_path / "log" / "users.csv")
    raw = load_raw("csv", tmp_path / "log", LoadOptions(columns=mapping))
    assert raw.events.rows() == [(1, 10, 100)]
    assert raw.users is not None and raw.users.height == 1
