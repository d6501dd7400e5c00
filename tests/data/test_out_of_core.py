"""The out-of-core path (logs in parts, read in blocks, the raw table freed early) prepares
exactly what the one-piece path prepared before it existed."""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recloop.data import prepare as prepare_module
from recloop.data.dataset import PreparedDataset
from recloop.data.loaders import ColumnMapping, LoadOptions, _read, load_raw
from recloop.data.prepare import PrepareConfig, prepare
from recloop.data.synth import SynthConfig, generate

ARRAYS = ("user", "item", "timestamp", "reward", "returns", "session", "split", "user_offsets")

ML100K_DIGEST = "05c9e071e1c3e33d86101c52e19a397875ddb9eac0edf4e611c4f77b7cbfba0c"
"""sha256 of ``_digest(prepare(ml-100k))`` as computed by the in-memory pipeline of commit
6141e28, before the out-of-core changes (default PrepareConfig)."""


def _digest(ds: PreparedDataset) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        h.update(np.ascontiguousarray(getattr(ds, name)).tobytes())
    for a in ds.extra.values():
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("\n".join(ds.user_ids).encode())
    h.update("\n".join(ds.item_ids).encode())
    return h.hexdigest()


def _same_events(a: PreparedDataset, b: PreparedDataset) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert a.extra.keys() == b.extra.keys()
    for name in a.extra:
        np.testing.assert_array_equal(a.extra[name], b.extra[name], err_msg=name)


def test_ml100k_prepares_exactly_as_before(ml100k_dir: Path) -> None:
    assert _digest(prepare(load_raw("recbole", ml100k_dir), PrepareConfig())) == ML100K_DIGEST


@pytest.fixture(scope="module")
def synth_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100k-event Tianchi-style log (ml-100k-sized), plus the same events in four parts."""
    root = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(events=100_000, seed=5), root / "whole")
    lines = (root / "whole" / "user_behavior.csv").read_bytes().splitlines(keepends=True)
    (root / "parts").mkdir()
    for k, lo in enumerate(range(0, len(lines), 25_000)):
        (root / "parts" / f"part-{k}.csv").write_bytes(b"".join(lines[lo : lo + 25_000]))
    return root


def test_blocks_and_parts_prepare_the_same_dataset(
    synth_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = prepare(load_raw("tianchi", synth_log / "whole"), PrepareConfig())
    monkeypatch.setattr(_read, "BLOCK_BYTES", 100_000)  # some 30 blocks
    blocks = prepare(load_raw("tianchi", synth_log / "whole"), PrepareConfig())
    _same_events(whole, blocks)
    assert whole.user_features is not None and blocks.user_features is not None
    assert whole.user_features.equals(blocks.user_features)
    mapping = ColumnMapping(
        user="column_1", item="column_2", behavior="column_3", timestamp="column_4",
        has_header=False,
    )  # fmt: skip
    parts = prepare(
        load_raw("csv", synth_log / "parts" / "part-*.csv", LoadOptions(columns=mapping)),
        PrepareConfig(),
    )
    _same_events(whole, parts)


def test_prepare_frees_the_raw_table_it_is_handed(
    synth_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs: list[weakref.ref[pl.DataFrame]] = []
    alive_during_sort: list[bool] = []
    clean = prepare_module._clean

    def watching_clean(*args: object, **kwargs: object) -> object:
        alive_during_sort.append(refs[0]() is not None)
        return clean(*args, **kwargs)  # type: ignore[arg-type]

    def loaded() -> object:
        raw = load_raw("tianchi", synth_log / "whole")
        refs.append(weakref.ref(raw.events))
        return raw

    monkeypatch.setattr(prepare_module, "_clean", watching_clean)
    prepare(loaded(), PrepareConfig())  # type: ignore[arg-type]
    assert alive_during_sort == [False]
    # A caller that keeps its reference keeps the table (and gets the same result).
    raw = load_raw("tianchi", synth_log / "whole")
    refs[0] = weakref.ref(raw.events)
    alive_during_sort.clear()
    prepare(raw, PrepareConfig())
    assert alive_during_sort == [True]
