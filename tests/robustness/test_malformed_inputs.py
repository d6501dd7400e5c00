"""Files that cannot be read as they stand: each is reported on one line naming file, line and
column (or skipped and counted with ``skip_bad_rows``), never as a polars error or traceback."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recloop.data.loaders import ColumnMapping, LoadOptions, load_raw
from recloop.data.loaders._read import field_index, scan_lines
from recloop.errors import ConfigError, DataError

HEADER = b"user,item,timestamp,rating\n"


def _good(n: int) -> bytes:
    """n well-formed event lines: user u rates items 1..5."""
    return b"".join(b"%d,%d,%d,4\n" % (r // 5 + 1, r % 5 + 1, 1000 + r) for r in range(n))


def _csv(tmp_path: Path, body: bytes, name: str = "ev.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(body)
    return path


def _error(path: Path, fmt: str = "csv") -> DataError:
    with pytest.raises(DataError) as err:
        load_raw(fmt, path)
    assert "\n" not in str(err.value)
    return err.value


def test_scan_finds_bad_bytes_and_open_quotes_by_line() -> None:
    data = b'a,b\n1,\xff2\n"x,1\nok,"q""z"\n3,\xe2\x82\n'
    bad = scan_lines(data, quote='"')
    assert sorted(bad) == [1, 2, 4]
    assert bad[1].reason.startswith("invalid UTF-8 byte 0xFF")
    assert (bad[1].pos, bad[2].pos) == (2, None)
    assert bad[4].reason.startswith("invalid UTF-8 byte 0xE2")  # a truncated 3-byte sequence
    assert bad[2].reason.startswith("unbalanced quote")
    assert scan_lines(b"a,b\n1,2", quote='"') == {}


def test_field_index_ignores_quoted_delimiters() -> None:
    assert field_index('1,"a,b",3,', ",", '"') == 3
    assert field_index('1,"a,b",3,', ",", None) == 4
    assert field_index("", ",", '"') == 0


def test_invalid_utf8_names_line_and_column_and_is_skippable(tmp_path: Path) -> None:
    path = _csv(tmp_path, HEADER + _good(10) + b"7,\xff8,1000,3\n" + _good(10))
    err = _error(path)
    assert str(err) == (
        f'{path} line 12, column "item": invalid UTF-8 byte 0xFF (the file must be UTF-8 '
        "text); the line reads '7,\ufffd8,1000,3'"
    )
    raw = load_raw("csv", path, LoadOptions(skip_bad_rows=True))
    assert raw.events.height == 20 and raw.skipped.count == 1
    assert raw.skipped.examples[0].startswith(f'{path} line 12, column "item": invalid UTF-8')
    # Rows after the bad line keep their line numbers (and their integer ids).
    assert raw.events.schema["user"] == pl.Int64


def test_unterminated_quote_is_one_short_line(tmp_path: Path) -> None:
    body = HEADER + _good(3) + b'4,"5,1000,3\n' + _good(20_000)  # ~300 KB after the quote
    path = _csv(tmp_path, body)
    err = _error(path)
    assert len(str(err)) < len(str(path)) + 250
    assert str(err).startswith(f'{path} line 5, column "item": unbalanced quote')
    assert str(err).endswith("""the line reads '4,"5,1000,3'""")
    raw = load_raw("csv", path, LoadOptions(skip_bad_rows=True))
    assert raw.events.height == 20_003 and raw.skipped.count == 1


def test_quoted_id_with_a_line_break_names_file_and_line(tmp_path: Path) -> None:
    # polars reads this without complaint, as user "7\n7": every later row shifts a line.
    path = _csv(tmp_path, HEADER + _good(2) + b'"7\n7",8,1000,3\n' + _good(2) + b"9,x,1,z\n")
    err = _error(path)
    assert str(err).startswith(f'{path} line 4, column "user": unbalanced quote')
    assert err.reason.endswith("""reads '"7' (2 more bad rows; --skip-bad-rows skips them)""")
    raw = load_raw("csv", path, LoadOptions(skip_bad_rows=True))
    # Both halves of the broken record and the bad last line are counted; lines stay true.
    assert raw.skipped.count == 3
    assert raw.skipped.examples[1].startswith(f'{path} line 5, column "user": unbalanced')
    assert raw.skipped.examples[2].startswith(f'{path} line 8, column "rating"')
    assert raw.events["user"].to_list() == [1, 1, 1, 1]


def test_bad_last_line_without_a_line_break(tmp_path: Path) -> None:
    path = _csv(tmp_path, HEADER + _good(2) + b"3,\xff,1,1")
    assert _error(path).location.line == 4  # type: ignore[union-attr]
    assert load_raw("csv", path, LoadOptions(skip_bad_rows=True)).skipped.count == 1


def test_invalid_utf8_header_is_fatal_even_when_skipping(tmp_path: Path) -> None:
    path = _csv(tmp_path, b"us\xe9r,item,timestamp\n1,2,3\n")
    with pytest.raises(DataError) as err:
        load_raw("csv", path, LoadOptions(skip_bad_rows=True))
    assert str(err.value).startswith(f"{path} line 1: invalid UTF-8 byte 0xE9")


def test_tianchi_headerless_and_movielens_double_colon(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    _csv(tmp_path / "t", b"1,10,pv,100\n2,1\xc30,pv,100\n", name="user_behavior.csv")
    err = _error(tmp_path / "t", "tianchi")
    assert err.location is not None
    assert (err.location.line, err.location.column) == (2, "item")
    raw = load_raw("tianchi", tmp_path / "t", LoadOptions(skip_bad_rows=True))
    assert raw.events.height == 1 and raw.skipped.count == 1
    (tmp_path / "m").mkdir()
    _csv(tmp_path / "m", b"1::10::5::100\n2::11::4::1\xff0\n", name="ratings.dat")
    err = _error(tmp_path / "m", "movielens")
    assert err.location is not None
    assert (err.location.line, err.location.column) == (2, "timestamp")
    assert err.reason.endswith("the line reads '2::11::4::1\ufffd0'")


def test_recbole_invalid_utf8(tmp_path: Path) -> None:
    body = b"user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n\xff\t2\t3\n"
    path = _csv(tmp_path, body, name="x.inter")
    err = _error(path, "recbole")
    assert err.location is not None
    assert (err.location.line, err.location.column) == (3, "user_id:token")


def test_line_text_is_cut_to_about_80_characters(tmp_path: Path) -> None:
    path = _csv(tmp_path, HEADER + b"1,2,3,\xff" + b"9" * 10_000 + b"\n")
    err = _error(path)
    assert err.location is not None and err.location.line == 2
    assert len(err.reason) < 200 and err.reason.endswith("999...'")


def _parquet(tmp_path: Path, **columns: pl.Series | list[object]) -> Path:
    base: dict[str, pl.Series | list[object]] = {
        "user": [1, 2],
        "item": [3, 4],
        "timestamp": [5, 6],
    }
    path = tmp_path / "ev.parquet"
    pl.DataFrame(base | columns).write_parquet(path)
    return path


@pytest.mark.parametrize(
    ("columns", "column", "found"),
    [
        ({"user": [[1], [2]]}, "user", "List(Int64)"),
        ({"item": [{"a": 1}, {"a": 2}]}, "item", "Struct({'a': Int64})"),
        ({"user": [1.0, 2.0]}, "user", "Float64"),
        ({"timestamp": [True, False]}, "timestamp", "Boolean"),
        ({"timestamp": ["5", "6"]}, "timestamp", "String"),
        ({"rating": ["4", "5"]}, "rating", "String"),
        ({"rating": [True, False]}, "rating", "Boolean"),
        ({"behavior": [1, 2]}, "behavior", "Int64"),
    ],
)
def test_parquet_column_types_are_checked(
    tmp_path: Path, columns: dict[str, list[object]], column: str, found: str
) -> None:
    path = _parquet(tmp_path, **columns)
    with pytest.raises(DataError) as err:
        load_raw("parquet", path, LoadOptions(skip_bad_rows=True))
    assert str(err.value).startswith(f'{path} column "{column}": type {found} cannot hold')


def test_parquet_types_that_are_fine(tmp_path: Path) -> None:
    cat = pl.Series(["pv", "buy"], dtype=pl.Categorical)
    path = _parquet(tmp_path, user=["a", "b"], rating=[4, 5], behavior=cat)
    raw = load_raw("parquet", path)
    assert raw.events.rows() == [("a", 3, 5, "pv", 4.0), ("b", 4, 6, "buy", 5.0)]
    text_times = ColumnMapping(timestamp_format="%Y-%m-%d")
    path = _parquet(tmp_path, timestamp=["1970-01-02", "1970-01-03"])
    raw = load_raw("parquet", path, LoadOptions(columns=text_times))
    assert raw.events["timestamp"].to_list() == [86_400, 172_800]


def test_parquet_u64_columns(tmp_path: Path) -> None:
    big = pl.Series([2**64 - 1, 2**63], dtype=pl.UInt64)
    # Hashed 64-bit ids stay distinct as text instead of failing a cast to Int64.
    raw = load_raw("parquet", _parquet(tmp_path, user=big))
    assert raw.events["user"].to_list() == [str(2**64 - 1), str(2**63)]
    # A time beyond Int64 is a bad row with its row number, not a traceback.
    err = _error(_parquet(tmp_path, timestamp=big), "parquet")
    assert err.reason.startswith(f'cannot parse "{2**64 - 1}" as a timestamp in row 1')


def test_parquet_feature_file_key_type(tmp_path: Path) -> None:
    feats = tmp_path / "items.parquet"
    pl.DataFrame({"item": [[3], [4]], "colour": ["r", "g"]}).write_parquet(feats)
    with pytest.raises(DataError, match=r'items\.parquet column "item": type List\(Int64\)'):
        load_raw(
            "parquet",
            _parquet(tmp_path),
            LoadOptions(columns=ColumnMapping(item_features=feats)),
        )


def test_unreadable_parquet_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ev.parquet"
    path.write_bytes(b"PAR1" + bytes(range(256)) * 8 + b"PAR1")
    assert _error(path, "parquet").reason.startswith("cannot read Parquet file: ")


@pytest.mark.parametrize("delimiter", ["§", "\n"])
def test_delimiters_the_reader_cannot_take_are_config_errors(delimiter: str) -> None:
    with pytest.raises(ConfigError, match=r"columns\.delimiter"):
        ColumnMapping(delimiter=delimiter)
    with pytest.raises(ConfigError, match=r"columns\.quote_char"):
        ColumnMapping(delimiter=";", quote_char=";")
