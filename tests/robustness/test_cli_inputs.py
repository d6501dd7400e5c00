"""A hostile user's inputs through ``recloop prepare`` and ``recloop data inspect``: every one
ends with exit code 2 and exactly one line on stderr naming the file (and the line and column
where there is one), never a traceback.

The corpus is generated here, in tmp_path; no real data set is involved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest

from recloop.cli import main

HEADER = b"user,item,timestamp,rating\n"
GOOD = b"1,10,1000,4\n1,11,1001,5\n2,10,1002,3\n"


@dataclass(frozen=True)
class Case:
    fmt: str
    input: str
    """Path of the input, relative to the corpus folder."""
    names: str
    """The file the message must name, relative to the corpus folder."""
    line: int | None = None
    column: str | None = None
    says: str = ""
    """A fragment of the reason."""
    args: tuple[str, ...] = ()


CASES = {
    "invalid_utf8": Case("csv", "utf8.csv", "utf8.csv", 3, "item", "invalid UTF-8 byte 0xFF"),
    "unterminated_quote": Case("csv", "quote.csv", "quote.csv", 5, "item", "unbalanced quote"),
    "line_break_in_quoted_id": Case("csv", "break.csv", "break.csv", 2, "user", "unbalanced"),
    "wrong_delimiter": Case("csv", "tabs.csv", "tabs.csv", 1, "user", "tab-separated"),
    "missing_column": Case("csv", "nots.csv", "nots.csv", 1, "timestamp", "missing column"),
    "empty_file": Case("csv", "empty.csv", "empty.csv", says="empty file"),
    "header_only": Case("csv", "header.csv", "header.csv", says="no data rows"),
    "directory_named_like_a_file": Case("csv", "dir", "dir/events.csv", says="not a regular file"),
    "missing_input": Case("csv", "absent.csv", "absent.csv", says="no such file"),
    "binary_garbage": Case("csv", "garbage.csv", "garbage.csv", 1, says="invalid UTF-8"),
    "huge_timestamp": Case("csv", "huge.csv", "huge.csv", 3, "timestamp", "cannot parse"),
    "huge_rating": Case("csv", "hugerating.csv", "hugerating.csv", 2, "rating", "cannot parse"),
    "nan_rating": Case("csv", "nan.csv", "nan.csv", 3, "rating", '"nan"'),
    "recbole_invalid_utf8": Case(
        "recbole", "rb/x.inter", "rb/x.inter", 2, "item_id:token", "invalid UTF-8"
    ),
    "recbole_missing_field": Case(
        "recbole", "rb2/y.inter", "rb2/y.inter", 1, "timestamp", "missing field"
    ),
    "tianchi_binary": Case("tianchi", "tc", "tc/user_behavior.csv", 2, "user", "invalid UTF-8"),
    "parquet_list_id": Case("parquet", "list.parquet", "list.parquet", None, "user", "List"),
    "parquet_struct_id": Case(
        "parquet", "struct.parquet", "struct.parquet", None, "item", "Struct"
    ),
    "parquet_bool_time": Case(
        "parquet", "bool.parquet", "bool.parquet", None, "timestamp", "Boolean"
    ),
    "parquet_u64_time": Case(
        "parquet", "u64.parquet", "u64.parquet", None, "timestamp", "in row 1"
    ),
    "parquet_text_rating": Case("parquet", "str.parquet", "str.parquet", None, "rating", "String"),
    "parquet_garbage": Case("parquet", "bad.parquet", "bad.parquet", says="cannot read Parquet"),
    "binary_config": Case(
        "csv", "ok.csv", "bin.yaml", 1, says="not a YAML config", args=("--config", "bin.yaml")
    ),
    "invalid_yaml": Case(
        "csv", "ok.csv", "bad.yaml", 2, says="invalid YAML at column", args=("--config", "bad.yaml")
    ),
    "yaml_not_a_mapping": Case(
        "csv", "ok.csv", "list.yaml", says="must hold a mapping", args=("--config", "list.yaml")
    ),
    "multibyte_delimiter": Case(
        "csv", "ok.csv", "", says="columns.delimiter", args=("--set", "columns.delimiter=§")
    ),
}
"""Each case as both commands see it (``--set`` goes under ``load.`` for prepare)."""

OUTPUT_CASES = {
    "output_is_a_file": ("out.txt", "is a file"),
    "output_inside_a_file": ("out.txt/run", "which is a file"),
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()

    def put(name: str, data: bytes) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)

    put("ok.csv", HEADER + GOOD)
    put("utf8.csv", HEADER + b"1,10,1000,4\n1,\xff11,1001,5\n2,10,1002,3\n")
    put("quote.csv", HEADER + GOOD + b'3,"12,1003,4\n' + GOOD * 5000)
    put("break.csv", HEADER + b'"1\n1",10,1000,4\n' + GOOD)
    put("tabs.csv", (HEADER + GOOD).replace(b",", b"\t"))
    put("nots.csv", b"user,item,rating\n1,10,4\n")
    put("empty.csv", b"")
    put("header.csv", HEADER)
    (root / "dir" / "events.csv").mkdir(parents=True)
    put("garbage.csv", bytes((i * 97 + 13) % 256 for i in range(4096)))
    put("huge.csv", HEADER + b"1,10,1000,4\n1,11,99999999999999999999999999,5\n")
    put("hugerating.csv", HEADER + b"1,10,1000,1e999\n")
    put("nan.csv", HEADER + b"1,10,1000,4\n1,11,1001,nan\n")
    put("rb/x.inter", b"user_id:token\titem_id:token\ttimestamp:float\n1\t\xfe2\t3\n")
    put("rb2/y.inter", b"user_id:token\titem_id:token\n1\t2\n")
    put("tc/user_behavior.csv", b"1,10,pv,100\n\xff\xfe,10,pv,100\n")
    base = {"user": [1, 2], "item": [10, 11], "timestamp": [1000, 1001]}
    for name, extra in {
        "list": {"user": [[1], [2]]},
        "struct": {"item": [{"a": 1}, {"a": 2}]},
        "bool": {"timestamp": [True, False]},
        "u64": {"timestamp": pl.Series([2**64 - 1, 2**63], dtype=pl.UInt64)},
        "str": {"rating": ["4", "5"]},
    }.items():
        pl.DataFrame(base | extra).write_parquet(root / f"{name}.parquet")
    put("bad.parquet", b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    put("bin.yaml", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    put("bad.yaml", b"gamma: [0.9\nsplit: 1\n")
    put("list.yaml", b"- 1\n- 2\n")
    put("out.txt", b"not a directory")
    return root


def _argv(command: str, case: Case, root: Path, tmp_path: Path) -> list[str]:
    args = [a if not a.endswith(".yaml") else str(root / a) for a in case.args]
    if command == "prepare":
        args = [a.replace("columns.", "load.columns.", 1) for a in args]
        head = ["prepare", "--output", str(tmp_path / "prepared")]
    else:
        head = ["data", "inspect"]
    return [*head, "--format", case.fmt, "--input", str(root / case.input), *args]


def _one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    out = capsys.readouterr()
    assert code == 2, out.err
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err + out.out
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["prepare", "inspect"])
@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_one_line_exit_2(
    name: str, command: str, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES[name]
    line = _one_error_line(capsys, main(_argv(command, case, corpus, tmp_path)))
    if case.names:
        assert f"error: {corpus / case.names}" in line
    if case.line is not None:
        assert f" line {case.line}" in line
    if case.column is not None:
        assert f'column "{case.column}"' in line
    assert case.says in line
    assert len(line) < 400
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("name", list(OUTPUT_CASES))
def test_output_that_cannot_be_a_directory(
    name: str, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output, says = OUTPUT_CASES[name]
    argv = ["prepare", "-f", "csv", "-i", str(corpus / "ok.csv"), "-o", str(corpus / output)]
    line = _one_error_line(capsys, main(argv))
    assert line.startswith(f"error: --output {corpus / output} ") and says in line
    assert (corpus / "out.txt").read_bytes() == b"not a directory"


@pytest.mark.parametrize("command", ["train", "pretrain", "synth"])
def test_other_directory_outputs_are_checked_first(
    command: str, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(corpus / "out.txt")
    argv = {
        "train": ["train", "--algo", "reinforce", "--data", str(corpus), "--out", out],
        "pretrain": ["pretrain", "--data", str(corpus), "--out", out],
        "synth": ["data", "synth", "--events", "100", "--output", out],
    }[command]
    line = _one_error_line(capsys, main(argv))
    assert f"{out} is a file" in line


def test_unknown_option_is_a_usage_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["train", "--output", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "No such option: --output" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("fmt", "name", "line", "column"),
    [
        ("csv", "utf8.csv", 3, "item"),
        ("csv", "quote.csv", 5, "item"),
        ("csv", "break.csv", 2, "user"),
        ("tianchi", "tc", 2, "user"),
    ],
)
def test_skip_bad_rows_skips_unreadable_lines_and_reports_them(
    fmt: str,
    name: str,
    line: int,
    column: str,
    corpus: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["prepare", "-f", fmt, "-i", str(corpus / name), "-o", str(tmp_path / "p")]
    assert main([*argv, "--skip-bad-rows", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    # The quoted line break breaks two physical lines, both counted.
    assert doc["skipped_bad_rows"] == (2 if name == "break.csv" else 1)
    assert f'line {line}, column "{column}"' in doc["skipped_examples"][0]


def test_negative_ratings_are_data_not_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Some logs score dislikes below zero; a negative rating is a value, not a malformed row.
    path = tmp_path / "neg.csv"
    path.write_bytes(HEADER + b"1,10,1000,-2\n1,11,1001,-0.5\n")
    assert main(["data", "inspect", "-f", "csv", "-i", str(path), "--json"]) == 0
    assert '"min": -2.0' in capsys.readouterr().out


def test_entry_point_in_a_fresh_process(corpus: Path) -> None:
    """The installed way in: no traceback, one line, exit code 2."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    inspect = ["data", "inspect", "-f", "csv", "-i", str(corpus / "ok.csv")]
    for argv in (
        ["data", "inspect", "-f", "parquet", "-i", str(corpus / "list.parquet")],
        [*inspect, "--config", str(corpus / "bin.yaml")],
    ):
        code = "import sys; from recloop.cli import main; sys.exit(main())"
        run = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr
