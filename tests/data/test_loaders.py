"""MovieLens, RecBole and Tianchi loaders on small files written here, and the real ml-100k."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from recloop.cli import main
from recloop.data.loaders import FORMATS, LOADERS, LoadOptions, load_raw
from recloop.data.loaders._validate import infer_int
from recloop.data.schema import BEHAVIORS
from recloop.errors import ConfigError, DataError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_every_format_is_registered() -> None:
    assert sorted(FORMATS) == LOADERS.names()
    with pytest.raises(ConfigError, match="unknown data format 'nope'"):
        load_raw("nope", Path("."))


# --- MovieLens -------------------------------------------------------------------------------


def _ml100k(root: Path) -> Path:
    write(
        root / "u.data", "196\t242\t3\t881250949\n186\t302\t3.5\t891717742\n22\t242\t1\t878887116\n"
    )
    write(root / "u.user", "196|24|M|technician|85711\n186|53|F|other|94043\n22||M|writer|T8H1N\n")
    flags_toy = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)
    flags_none = "|".join(["0"] * 19)
    write(
        root / "u.item",
        f"242|Kolya (1996)|24-Jan-1997||http://x|{flags_toy}\n"
        f"302|Café Society (1995)|01-Jan-1995||http://y|{flags_none}\n",
        encoding="latin-1",
    )
    return root


def test_movielens_100k_events_users_items(tmp_path: Path) -> None:
    raw = load_raw("movielens", _ml100k(tmp_path / "ml-100k"))
    expected = pl.DataFrame(
        {
            "user": [196, 186, 22],
            "item": [242, 302, 242],
            "rating": [3.0, 3.5, 1.0],
            "timestamp": [881250949, 891717742, 878887116],
        }
    )
    assert_frame_equal(raw.events, expected)
    assert raw.users is not None and raw.items is not None
    assert raw.users.to_dicts()[2] == {
        "user": 22,
        "age": None,
        "gender": "M",
        "occupation": "writer",
        "zip_code": "T8H1N",
    }
    assert raw.users.schema["age"] == pl.Int64
    assert raw.items.to_dicts() == [
        {
            "item": 242,
            "title": "Kolya (1996)",
            "year": 1996,
            "genres": "Animation|Children's|Comedy",
        },
        {"item": 302, "title": "Café Society (1995)", "year": 1995, "genres": None},
    ]
    assert raw.skipped.count == 0


def test_movielens_finds_the_folder_from_its_parent_or_a_file(tmp_path: Path) -> None:
    _ml100k(tmp_path / "unpacked" / "ml-100k")
    assert load_raw("movielens", tmp_path / "unpacked").events.height == 3
    assert load_raw("movielens", tmp_path / "unpacked" / "ml-100k" / "u.data").events.height == 3
    with pytest.raises(DataError, match="not a MovieLens directory"):
        load_raw("movielens", write(tmp_path / "other" / "x.txt", "").parent)


def test_movielens_1m_double_colon_files(tmp_path: Path) -> None:
    write(
        tmp_path / "ratings.dat",
        "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
    )
    write(tmp_path / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n")
    write(
        tmp_path / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n",
        encoding="latin-1",
    )
    raw = load_raw("movielens", tmp_path)
    assert raw.events["item"].to_list() == [1193, 661, 1193]
    assert raw.events["rating"].to_list() == [5.0, 3.0, 4.0]
    assert raw.users is not None and raw.items is not None
    assert raw.users.row(1) == (2, "M", 56, 16, "70072")
    assert raw.items["genres"].to_list() == ["Drama", "Animation|Children's|Musical"]
    assert raw.items["year"].to_list() == [1975, 1996]


def test_movielens_1m_bad_number_names_line_and_column(tmp_path: Path) -> None:
    write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::x::978302109\n")
    with pytest.raises(DataError) as err:
        load_raw("movielens", tmp_path)
    assert str(err.value) == (
        f'{tmp_path / "ratings.dat"} line 2, column "rating": cannot parse "x" as a number'
    )
    assert err.value.location is not None and err.value.location.value == "x"


def test_movielens_20m_csv_with_quoted_titles(tmp_path: Path) -> None:
    write(
        tmp_path / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,3.5,1112484676\n",
    )
    write(
        tmp_path / "movies.csv",
        'movieId,title,genres\n2,"American President, The (1995)",Comedy|Drama\n'
        "29,Unknown Film,(no genres listed)\n",
    )
    raw = load_raw("movielens", tmp_path)
    assert raw.events.columns == ["user", "item", "rating", "timestamp"]
    assert raw.events["timestamp"].to_list() == [1112486027, 1112484676]
    assert raw.users is None and raw.items is not None
    assert raw.items.to_dicts() == [
        {
            "item": 2,
            "title": "American President, The (1995)",
            "year": 1995,
            "genres": "Comedy|Drama",
        },
        {"item": 29, "title": "Unknown Film", "year": None, "genres": None},
    ]


def test_movielens_20m_missing_header_column(tmp_path: Path) -> None:
    write(tmp_path / "ratings.csv", "userId,movieId,stars,timestamp\n1,2,3.5,1112486027\n")
    with pytest.raises(DataError, match=r'line 1, column "rating": missing column "rating"'):
        load_raw("movielens", tmp_path)


# --- RecBole ---------------------------------------------------------------------------------


def _recbole(root: Path) -> Path:
    write(
        root / "toy.inter",
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\tsession:token\n"
        "u1\t10\t4\t100.9\ts1\nu2\t11\t2.5\t200\ts2\n",
    )
    write(root / "toy.user", "user_id:token\tage:token\tscore:float\nu1\t24\t0.5\nu2\t53\t\n")
    write(
        root / "toy.item",
        "item_id:token\tmovie_title:token_seq\tvec:float_seq\n10\tToy Story\t1 2\n11\tHeat\t3 4\n",
    )
    return root


def test_recbole_atomic_files(tmp_path: Path) -> None:
    raw = load_raw("recbole", _recbole(tmp_path))
    assert raw.events.schema == pl.Schema(
        {
            "user": pl.String,
            "item": pl.Int64,
            "rating": pl.Float64,
            "timestamp": pl.Int64,
            "session": pl.String,
        }
    )
    assert raw.events.rows() == [("u1", 10, 4.0, 100, "s1"), ("u2", 11, 2.5, 200, "s2")]
    assert raw.users is not None and raw.items is not None
    assert raw.users.rows() == [("u1", "24", 0.5), ("u2", "53", None)]
    # token_seq fields are lists of tokens; float_seq stays text
    assert raw.items.rows() == [(10, ["Toy", "Story"], "1 2"), (11, ["Heat"], "3 4")]
    # The .inter file itself works as the path, too.
    assert load_raw("recbole", tmp_path / "toy.inter").events.height == 2


def test_recbole_header_problems(tmp_path: Path) -> None:
    write(tmp_path / "a" / "x.inter", "user_id:token\titem_id:tokn\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(DataError, match=r'column "item_id:tokn": unknown field type "tokn"'):
        load_raw("recbole", tmp_path / "a")
    write(tmp_path / "b" / "x.inter", "user_id:token\ttimestamp:float\n1\t3\n")
    with pytest.raises(DataError, match=r'line 1, column "item_id": missing field "item_id"'):
        load_raw("recbole", tmp_path / "b")
    write(tmp_path / "c" / "x.inter", "")
    write(tmp_path / "c" / "y.inter", "")
    with pytest.raises(DataError, match=r"2 \.inter files in this directory \(x.inter, y.inter\)"):
        load_raw("recbole", tmp_path / "c")
    with pytest.raises(DataError, match="empty file"):
        load_raw("recbole", tmp_path / "c" / "x.inter")


def test_recbole_real_ml100k(ml100k_dir: Path) -> None:
    raw = load_raw("recbole", ml100k_dir)
    ev = raw.events
    assert ev.height == 100_000
    assert ev["user"].n_unique() == 943
    assert ev["item"].n_unique() == 1682
    assert ev.schema["user"] == pl.Int64 and ev.schema["timestamp"] == pl.Int64
    assert ev.row(0) == (196, 242, 3.0, 881250949)
    assert raw.users is not None and raw.items is not None
    assert raw.users.columns == ["user", "age", "gender", "occupation", "zip_code"]
    assert raw.items.columns == ["item", "movie_title", "release_year", "class"]
    assert raw.users.height == 943 and raw.items.height == 1682
    assert raw.skipped.count == 0


# --- Tianchi ---------------------------------------------------------------------------------

GOOD_EVENTS = "1,10,pv,100\n1,11,cart,160\n2,10,buy,170\n"


def _tianchi(root: Path, events: str = GOOD_EVENTS) -> Path:
    write(root / "user_behavior.csv", events)
    write(root / "user.csv", "1,0,3,5\n2,1,,2\n")
    write(root / "item.csv", "10,7,70,700\n11,7,71,\n")
    return root


def test_tianchi_loads_events_and_features(tmp_path: Path) -> None:
    raw = load_raw("tianchi", _tianchi(tmp_path))
    expected = pl.DataFrame(
        {
            "user": [1, 1, 2],
            "item": [10, 11, 10],
            "timestamp": [100, 160, 170],
            # One-byte codes, not text: a 100M-event log's behaviours take 100 MB.
            "behavior": pl.Series(["pv", "cart", "buy"], dtype=pl.Enum(BEHAVIORS)),
        }
    )
    assert_frame_equal(raw.events, expected)
    assert raw.users is not None and raw.items is not None
    assert raw.users.rows() == [(1, 0, 3, 5), (2, 1, None, 2)]
    assert raw.items.columns == ["item", "category", "shop", "brand"]
    assert raw.items.schema["brand"] == pl.Int64
    assert load_raw("tianchi", tmp_path / "user_behavior.csv").events.height == 3


def _error(tmp_path: Path, events: str) -> DataError:
    _tianchi(tmp_path, events)
    with pytest.raises(DataError) as err:
        load_raw("tianchi", tmp_path)
    return err.value


def test_tianchi_unknown_behaviour_message(tmp_path: Path) -> None:
    err = _error(tmp_path, GOOD_EVENTS + "3,12,clik,180\n")
    f = tmp_path / "user_behavior.csv"
    assert str(err) == (
        f'{f} line 4, column "behavior": unknown value "clik" (expected one of pv, cart, fav, buy)'
    )
    assert err.location is not None
    assert (err.location.line, err.location.column, err.location.value) == (4, "behavior", "clik")


def test_tianchi_reports_first_bad_row_and_how_many_more(tmp_path: Path) -> None:
    err = _error(tmp_path, "1,10,pv,100\n1,10,pv,1e\n1,10,xx,100\n1,10,pv,\n")
    assert err.reason == (
        'cannot parse "1e" as a timestamp (2 more bad rows; --skip-bad-rows skips them)'
    )
    assert err.location is not None and err.location.line == 2


def test_tianchi_field_count_and_delimiter_messages(tmp_path: Path) -> None:
    err = _error(tmp_path, "1\t10\tpv\t100\n")
    assert err.location is not None and err.location.line == 1
    assert "expected 4 fields separated by comma, found 1" in err.reason
    assert "looks tab-separated" in err.reason and "wrong delimiter" in err.reason
    err = _error(tmp_path, "1,10,pv,100\n1,10,pv,100,9\n")
    assert err.location is not None and err.location.line == 2
    assert err.reason.startswith("expected 4 fields separated by comma, found 5")
    err = _error(tmp_path, "1,10,pv,100\n1,10,pv\n")
    assert err.location is not None and err.location.line == 2
    assert err.reason.startswith("expected 4 fields separated by comma, found 3")
    err = _error(tmp_path, "1,10,pv,100\n1,,pv,100\n")
    assert str(err).endswith('line 2, column "item": missing value')


def test_tianchi_empty_and_missing_files(tmp_path: Path) -> None:
    err = _error(tmp_path, "")
    assert err.reason == "empty file"
    err = _error(tmp_path, "\n\n")
    assert err.reason == "empty file (no data rows)"
    _tianchi(tmp_path, "\n1,10,pv,100\n")
    assert load_raw("tianchi", tmp_path).events.height == 1
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"no user_behavior\.csv in this directory"):
        load_raw("tianchi", tmp_path / "none")
    with pytest.raises(DataError, match="no such file or directory"):
        load_raw("tianchi", tmp_path / "absent")


def test_tianchi_blank_lines_keep_line_numbers(tmp_path: Path) -> None:
    err = _error(tmp_path, "1,10,pv,100\n\n1,10,pv,100\n1,10,bad,1\n")
    assert err.location is not None and err.location.line == 4
    _tianchi(tmp_path, "1,10,pv,100\n\n1,10,pv,101\n")
    assert load_raw("tianchi", tmp_path).events["timestamp"].to_list() == [100, 101]


def test_tianchi_skip_bad_rows_counts_and_reports(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = "1,10,pv,100\n1,x1,pv,1\n2,10,clik,2\n\n2,11,fav,300\n2,11,buy,4.5x\n2,11,buy,400,1\n"
    _tianchi(tmp_path, events)
    with caplog.at_level(logging.WARNING):
        raw = load_raw("tianchi", tmp_path, LoadOptions(skip_bad_rows=True, max_examples=2))
    # "x1" is a valid string id: ids become strings, and the row is kept.
    assert raw.events["item"].to_list() == ["10", "x1", "11"]
    assert raw.skipped.count == 3
    f = tmp_path / "user_behavior.csv"
    assert raw.skipped.examples == (
        f'{f} line 3, column "behavior": unknown value "clik" (expected one of pv, cart, fav, buy)',
        f'{f} line 6, column "time": cannot parse "4.5x" as a timestamp',
    )
    assert "skipped 3 bad rows" in caplog.text


def test_skipped_string_id_row_does_not_leave_ids_as_strings(tmp_path: Path) -> None:
    _tianchi(tmp_path, "1,10,pv,100\nx,10,pv\n2,11,buy,200\n")
    raw = load_raw("tianchi", tmp_path, LoadOptions(skip_bad_rows=True))
    assert raw.events.schema["user"] == pl.Int64
    assert raw.events["user"].to_list() == [1, 2]


def test_inspect_cli_json_and_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _tianchi(tmp_path)
    assert main(["data", "inspect", "--format", "tianchi", "--input", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["events"], out["users"], out["items"]) == (3, 2, 2)
    assert (out["time_min"], out["time_max"]) == (100, 170)
    assert out["behaviors"] == {"pv": 1, "cart": 1, "buy": 1}
    assert out["user_features"]["rows"] == 2
    assert main(["data", "inspect", "-f", "tianchi", "-i", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "events" in text and "pv 1, cart 1, buy 1" in text
    _tianchi(tmp_path, GOOD_EVENTS + "3,12,clik,180\n")
    assert main(["data", "inspect", "--format", "tianchi", "--input", str(tmp_path)]) == 2
    assert 'unknown value "clik"' in capsys.readouterr().err
    args = ["data", "inspect", "-f", "tianchi", "-i", str(tmp_path), "--skip-bad-rows", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == 1


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        (["7", "8", None], pl.Int64),
        (["-3", "0"], pl.Int64),
        (["007", "7"], pl.String),  # two ids, not one
        (["+7", "8"], pl.String),
        (["00", "1"], pl.String),
        ([" 7", "8"], pl.String),
        (["a", "1"], pl.String),
    ],
)
def test_ids_become_integers_only_when_they_read_back_the_same(
    values: list[str | None], dtype: pl.DataType
) -> None:
    out = infer_int(pl.Series("id", values))
    assert out.dtype == dtype
    assert out.cast(pl.String).to_list() == values
