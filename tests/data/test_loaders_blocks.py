"""Large text files are read and validated in blocks: same table, the file's line numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data.loaders import LoadOptions, _read, load_raw
from recloop.errors import DataError


def _tianchi(directory: Path, n: int = 3000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "user": rng.integers(1, 200, n),
            "item": rng.integers(1, 500, n),
            "behavior": rng.choice(["pv", "cart", "fav", "buy"], n),
            "time": rng.integers(0, 10**6, n),
        }
    ).write_csv(directory / "user_behavior.csv", include_header=False)
    return directory


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_read, "BLOCK_BYTES", 997)  # many blocks, none on a line boundary


def test_blocks_give_the_same_events_as_one_read(tmp_path: Path, small_blocks: None) -> None:
    d = _tianchi(tmp_path / "t")
    lines = (d / "user_behavior.csv").read_bytes().count(b"\n")
    blocks = list(
        _read.read_text_blocks(d / "user_behavior.csv", delimiter=",", names=("a", "b", "c", "d"))
    )
    assert len(blocks) > 20
    assert sum(t.frame.height for t in blocks) == lines
    whole = _read.read_text(d / "user_behavior.csv", delimiter=",", names=("a", "b", "c", "d"))
    assert pl.concat([t.frame for t in blocks]).equals(whole.frame)
    raw = load_raw("tianchi", d)
    assert raw.events.height == lines
    assert raw.events.schema["behavior"] == pl.Enum(["pv", "cart", "fav", "buy"])


def test_a_bad_row_in_a_later_block_names_its_line_in_the_file(
    tmp_path: Path, small_blocks: None
) -> None:
    d = _tianchi(tmp_path / "t")
    path = d / "user_behavior.csv"
    lines = path.read_text().splitlines()
    lines[2500] = "7,8,pv,yesterday"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_raw("tianchi", d)
    message = str(err.value)
    assert "line 2501" in message and "yesterday" in message and '"time"' in message
    raw = load_raw("tianchi", d, LoadOptions(skip_bad_rows=True))
    assert raw.events.height == len(lines) - 1 and raw.skipped.count == 1
    assert "line 2501" in raw.skipped.examples[0]


def test_csv_with_a_header_in_blocks(tmp_path: Path, small_blocks: None) -> None:
    rows = [f"{i % 37},{i % 101},{1000 + i}" for i in range(2000)]
    rows[1500] = "5,x"  # a short line: named with its line in the file (header = line 1)
    (tmp_path / "e.csv").write_text("user,item,timestamp\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        load_raw("csv", tmp_path / "e.csv")
    assert "line 1502" in str(err.value)
    raw = load_raw("csv", tmp_path / "e.csv", LoadOptions(skip_bad_rows=True))
    assert raw.events.height == 1999
    assert raw.events["timestamp"].to_list()[:3] == [1000, 1001, 1002]
