"""The prepared dataset on disk is memory-mapped: same arrays, no heap copy, shared pages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data.dataset import EVENTS_FILE, PreparedDataset, user_offsets
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.schema import RawData
from recloop.errors import DataError

ARRAYS = ("user", "item", "timestamp", "reward", "returns", "session", "split", "user_offsets")


def _raw(n: int = 5000, seed: int = 3) -> RawData:
    rng = np.random.default_rng(seed)
    events = pl.DataFrame(
        {
            "user": rng.integers(0, 300, n),
            "item": rng.integers(0, 700, n),
            "timestamp": rng.integers(0, 50_000, n),
            "behavior": rng.choice(["pv", "cart", "fav", "buy"], n),
            "propensity": rng.uniform(0.1, 1.0, n),
            "policy_version": rng.choice(["v1", "v2"], n),
        }
    )
    return RawData(events=events, source="test")


def _mapped(a: np.ndarray, path: Path) -> bool:
    """Whether ``a``'s memory lies inside a mapping of ``path`` (per /proc/self/maps)."""
    addr = a.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            return len(parts) >= 6 and parts[5] == str(path)
    return False


def test_loaded_arrays_equal_the_in_memory_ones(tmp_path: Path) -> None:
    ds = prepare(_raw(), PrepareConfig())
    ds.save(tmp_path / "ds")
    back = PreparedDataset.load(tmp_path / "ds")
    for name in ARRAYS:
        a, b = getattr(ds, name), getattr(back, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert set(back.extra) == set(ds.extra)
    for name, a in ds.extra.items():
        np.testing.assert_array_equal(back.extra[name], a, err_msg=name)
    assert back.summary() == ds.summary()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc (Linux)")
def test_event_columns_are_read_only_views_of_the_mapped_file(tmp_path: Path) -> None:
    prepare(_raw(), PrepareConfig()).save(tmp_path / "ds")
    back = PreparedDataset.load(tmp_path / "ds")
    path = (tmp_path / "ds" / EVENTS_FILE).resolve()
    for a in (back.user, back.item, back.timestamp, back.reward, back.returns, back.split):
        assert not a.flags.writeable
        assert _mapped(a, path)
    assert _mapped(back.extra["propensity"], path)
    with pytest.raises(ValueError, match="read-only"):
        back.item[0] = 1


_CHILD = """
import sys
from pathlib import Path
from recloop.data.dataset import PreparedDataset
ds = PreparedDataset.load(Path(sys.argv[1]), verify=False)
total = int(ds.item.sum(dtype="int64"))  # touches every page of the column
target, inside, fields = str(Path(sys.argv[1]).resolve() / "events.arrow"), False, {}
for line in Path("/proc/self/smaps").read_text().splitlines():
    parts = line.split()
    if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
        inside = len(parts) >= 6 and parts[5] == target
    elif inside and parts[0].endswith(":") and len(parts) >= 2 and parts[1].isdigit():
        fields[parts[0][:-1]] = fields.get(parts[0][:-1], 0) + int(parts[1])
# A page of a file written moments ago may still be dirty in the page cache: count both.
shared = fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0)
print(total, fields.get("Rss", 0), shared, fields.get("Anonymous", 0))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs /proc (Linux)")
def test_two_processes_share_the_pages(tmp_path: Path) -> None:
    """While this process has the item column paged in, a second process that opens the
    dataset reads the same physical pages: its mapping of events.arrow is resident, shared
    with this process (Shared_Clean/Dirty), and none of it is anonymous (a private copy)."""
    prepare(_raw(n=200_000), PrepareConfig()).save(tmp_path / "ds")
    here = PreparedDataset.load(tmp_path / "ds", verify=False)
    expected = int(here.item.sum(dtype=np.int64))  # this process touches the pages too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "ds")],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.split()
    total, rss_kb, shared_kb, anon_kb = (int(x) for x in out)
    assert total == expected
    item_kb = here.item.nbytes // 1024
    assert rss_kb >= item_kb // 2  # the child's pages of the column are resident...
    assert shared_kb >= item_kb // 2  # ...and shared with this process
    assert anon_kb == 0


def test_saving_over_a_mapped_dataset_keeps_the_old_view_readable(tmp_path: Path) -> None:
    ds = prepare(_raw(), PrepareConfig())
    ds.save(tmp_path / "ds")
    back = PreparedDataset.load(tmp_path / "ds")
    first = back.item.copy()
    prepare(_raw(seed=4), PrepareConfig()).save(tmp_path / "ds")  # replaces the file
    np.testing.assert_array_equal(back.item, first)  # the old mapping still reads
    assert not np.array_equal(PreparedDataset.load(tmp_path / "ds").item[: len(first)], first)


def test_format_1_directories_still_load(tmp_path: Path) -> None:
    ds = prepare(_raw(), PrepareConfig())
    d = ds.save(tmp_path / "ds")
    cols = {
        "user": ds.user,
        "item": ds.item,
        "timestamp": ds.timestamp,
        "reward": ds.reward,
        "return": ds.returns,
        "session": ds.session,
        "split": ds.split,
        **ds.extra,
    }
    pl.DataFrame(cols).write_parquet(d / "events.parquet")
    (d / EVENTS_FILE).unlink()
    manifest = json.loads((d / "manifest.json").read_text())
    files = manifest["files"]
    del files[EVENTS_FILE]
    from recloop.data.dataset import sha256_file

    files["events.parquet"] = sha256_file(d / "events.parquet")
    manifest["format_version"] = 1
    (d / "manifest.json").write_text(json.dumps(manifest))
    back = PreparedDataset.load(d)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(back, name), getattr(ds, name), err_msg=name)
    assert back.events_sha256 == files["events.parquet"]
    assert back.events_file == d / "events.parquet"


def test_a_corrupt_events_file_is_a_clear_error(tmp_path: Path) -> None:
    d = prepare(_raw(), PrepareConfig()).save(tmp_path / "ds")
    (d / EVENTS_FILE).write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="sha256 does not match"):
        PreparedDataset.load(d)
    with pytest.raises(DataError, match="not a readable Arrow IPC events file"):
        PreparedDataset.load(d, verify=False)


def test_user_offsets_match_a_bincount() -> None:
    user = np.repeat(np.array([1, 2, 4, 5], np.int32), [3, 1, 2, 5])
    expected = np.zeros(7, np.int64)
    np.cumsum(np.bincount(user, minlength=6), out=expected[1:])
    np.testing.assert_array_equal(user_offsets(user, 5), expected)
    np.testing.assert_array_equal(user_offsets(user[:0], 2), np.zeros(4, np.int64))
