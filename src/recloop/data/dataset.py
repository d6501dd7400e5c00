"""The prepared dataset: dense ids, rewards, returns, sessions and splits, on disk and in memory.

On disk a prepared dataset is a directory::

    manifest.json          format version, recloop version, prepare config, counts, file hashes
    events.arrow           one row per kept event, sorted by (user, timestamp, original order):
                           an uncompressed Arrow IPC file holding one record batch
    user_ids.txt           raw user ids; line n (1-based) is user index n
    item_ids.txt           raw item ids; line n (1-based) is item index n
    user_features.parquet  optional: ``user`` index + encoded feature columns
    item_features.parquet  optional: ``item`` index + encoded feature columns

Index 0 is reserved in both id spaces: item 0 is padding (``PAD_ID``), user 0 the unknown
user.  In memory the events are flat numpy arrays plus per-user offsets, so samplers and
evaluators slice them without copying.

:meth:`PreparedDataset.load` memory-maps ``events.arrow``: every numeric event column is a
read-only numpy view of the file's pages, so opening 100M events costs no heap, the kernel
pages in what a sampler touches, and two processes (trainers, DataLoader workers) that open
the same dataset share one copy in the page cache.  One record batch keeps each column one
contiguous buffer (several batches would need a concatenating copy).  Format 1 directories
(``events.parquet``) still load, into the heap.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from recloop import __version__
from recloop.data.schema import SERVED_CONTEXT
from recloop.errors import DataError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Format 1 stored the events as ``events.parquet`` (read into the heap); 2 as ``events.arrow``."""
EVENTS_FILE = "events.arrow"
LEGACY_EVENTS_FILE = "events.parquet"
TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = {TRAIN: "train", VALID: "valid", TEST: "test"}
NO_TARGET = 3
"""A row of split S that is no target (kept in the users' sequences as history, drawn by
no sampler, ranked by no protocol) has the code ``NO_TARGET + S``, which no split has: its
period (:func:`split_period`) stays S."""


def split_period(split: np.ndarray) -> np.ndarray:
    """(E,) int8 the split each row's time belongs to: its code, or for a row that is no
    target (``NO_TARGET + S``) S.  Comparing periods, not codes, tells a change of split
    from a row that is merely no target."""
    out: np.ndarray = np.asarray(split) % NO_TARGET
    return out.astype(np.int8, copy=False)


EVENT_COLUMNS = ("user", "item", "timestamp", "reward", "return", "session", "split")
"""Columns every events file has; ``behavior``, ``rating``, ... may follow."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_ids(path: Path, ids: list[str]) -> str:
    """Write raw ids one per line (line n = index n); return the file's sha256."""
    for i, raw in enumerate(ids, start=1):
        if "\n" in raw or "\r" in raw:
            raise DataError(f"raw id {raw!r} (index {i}) contains a line break")
    path.write_text("".join(f"{raw}\n" for raw in ids), encoding="utf-8")
    return sha256_file(path)


def read_ids(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text else []


@dataclass(frozen=True, kw_only=True, eq=False)
class PreparedDataset:
    """Events of a prepared dataset as flat arrays sorted by (user, timestamp).

    E is the number of events, U = ``n_users``, N = ``n_items``.  The events of user ``u``
    are rows ``user_offsets[u]:user_offsets[u + 1]``.
    """

    n_users: int
    """Number of real users; user indices run 1..n_users (0 = unknown)."""
    n_items: int
    """Number of real items; item indices run 1..n_items (0 = padding)."""
    user: np.ndarray  # (E,) int32
    item: np.ndarray  # (E,) int32
    timestamp: np.ndarray  # (E,) int64 seconds
    reward: np.ndarray  # (E,) float32
    returns: np.ndarray  # (E,) float32, discounted return to the end of the session
    session: np.ndarray  # (E,) int32, global session number, increasing along the rows
    split: np.ndarray  # (E,) int8, TRAIN / VALID / TEST
    user_offsets: np.ndarray  # (U + 2,) int64
    user_ids: list[str]
    """Raw user ids; ``user_ids[i - 1]`` is the raw id of user index i."""
    item_ids: list[str]
    """Raw item ids; ``item_ids[i - 1]`` is the raw id of item index i."""
    user_features: pl.DataFrame | None = None
    """``user`` index column plus encoded feature columns (Int32 codes, 0 = missing)."""
    item_features: pl.DataFrame | None = None
    """``item`` index column plus encoded feature columns (Int32 codes, 0 = missing)."""
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    """Optional per-event columns kept from the source, e.g. ``behavior``, ``rating``."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The manifest this dataset was loaded from or will be saved with."""
    path: Path | None = None
    """Directory it was loaded from, if any."""

    @property
    def n_events(self) -> int:
        return int(self.item.shape[0])

    def split_counts(self) -> dict[str, int]:
        counts = np.bincount(self.split.astype(np.int64), minlength=3)
        return {SPLIT_NAMES[k]: int(counts[k]) for k in (TRAIN, VALID, TEST)}

    def summary(self) -> dict[str, Any]:
        """Machine-readable counts: n_users, n_items, n_events and per-split events."""
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_events": self.n_events,
            "splits": self.split_counts(),
            # Session numbers increase along the rows, so counting changes counts sessions.
            "sessions": int(np.count_nonzero(np.diff(self.session))) + 1 if self.n_events else 0,
            "mean_reward": float(self.reward.mean()) if self.n_events else 0.0,
        }

    @staticmethod
    def from_arrays(
        *,
        user: np.ndarray,
        item: np.ndarray,
        timestamp: np.ndarray,
        reward: np.ndarray | None = None,
        returns: np.ndarray | None = None,
        session: np.ndarray | None = None,
        split: np.ndarray | None = None,
        n_users: int | None = None,
        n_items: int | None = None,
        user_ids: list[str] | None = None,
        item_ids: list[str] | None = None,
        user_features: pl.DataFrame | None = None,
        item_features: pl.DataFrame | None = None,
        manifest: dict[str, Any] | None = None,
    ) -> PreparedDataset:
        """Build from index arrays (1-based users and items), sorting by (user, timestamp).

        Missing rewards default to 1, returns to the reward, sessions to one per user and
        splits to train.  Meant for tests and for the prepare pipeline's last step.
        """
        user = np.asarray(user, dtype=np.int32)
        item = np.asarray(item, dtype=np.int32)
        timestamp = np.asarray(timestamp, dtype=np.int64)
        e = user.shape[0]
        order = np.lexsort((np.arange(e), timestamp, user))
        reward_a = np.ones(e, np.float32) if reward is None else np.asarray(reward, np.float32)
        returns_a = reward_a.copy() if returns is None else np.asarray(returns, np.float32)
        split_a = np.zeros(e, np.int8) if split is None else np.asarray(split, np.int8)
        user, item, timestamp = user[order], item[order], timestamp[order]
        reward_a, returns_a, split_a = reward_a[order], returns_a[order], split_a[order]
        if session is None:
            session_a = user.astype(np.int32)
        else:
            session_a = np.asarray(session, np.int32)[order]
        nu = int(user.max(initial=0)) if n_users is None else n_users
        ni = int(item.max(initial=0)) if n_items is None else n_items
        if e and (user.min() < 1 or user.max() > nu):
            raise DataError(f"user indices must lie in 1..{nu}")
        if e and (item.min() < 1 or item.max() > ni):
            raise DataError(f"item indices must lie in 1..{ni}")
        offsets = np.zeros(nu + 2, np.int64)
        np.cumsum(np.bincount(user, minlength=nu + 1), out=offsets[1:])
        return PreparedDataset(
            n_users=nu,
            n_items=ni,
            user=user,
            item=item,
            timestamp=timestamp,
            reward=reward_a,
            returns=returns_a,
            session=session_a,
            split=split_a,
            user_offsets=offsets,
            user_ids=user_ids if user_ids is not None else [str(i) for i in range(1, nu + 1)],
            item_ids=item_ids if item_ids is not None else [str(i) for i in range(1, ni + 1)],
            user_features=user_features,
            item_features=item_features,
            manifest=manifest or {},
        )

    @property
    def events_sha256(self) -> str | None:
        """sha256 of the events file this dataset was saved as or loaded from, if any."""
        files = self.manifest.get("files", {})
        digest = files.get(EVENTS_FILE) or files.get(LEGACY_EVENTS_FILE)
        return str(digest) if digest else None

    @property
    def events_file(self) -> Path | None:
        """The events file of the directory this dataset was loaded from, if any."""
        if self.path is None:
            return None
        legacy = LEGACY_EVENTS_FILE in self.manifest.get("files", {})
        return self.path / (LEGACY_EVENTS_FILE if legacy else EVENTS_FILE)

    def save(self, directory: Path) -> Path:
        """Write the directory layout described in the module docstring."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cols: dict[str, Any] = {
            "user": self.user,
            "item": self.item,
            "timestamp": self.timestamp,
            "reward": self.reward,
            "return": self.returns,
            "session": self.session,
            "split": self.split,
        }
        cols.update(self.extra)
        write_events(directory / EVENTS_FILE, cols)
        files = {
            EVENTS_FILE: sha256_file(directory / EVENTS_FILE),
            "user_ids.txt": write_ids(directory / "user_ids.txt", self.user_ids),
            "item_ids.txt": write_ids(directory / "item_ids.txt", self.item_ids),
        }
        for name, table in (
            ("user_features.parquet", self.user_features),
            ("item_features.parquet", self.item_features),
        ):
            if table is not None:
                table.write_parquet(directory / name)
                files[name] = sha256_file(directory / name)
        manifest = dict(self.manifest)
        manifest.update(
            {
                "format_version": FORMAT_VERSION,
                "recloop_version": __version__,
                "summary": self.summary(),
                "files": files,
            }
        )
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return directory

    @staticmethod
    def load(directory: Path, *, verify: bool = True) -> PreparedDataset:
        """Open a prepared-dataset directory, checking its format version and file hashes.

        The event columns are read-only views of the memory-mapped ``events.arrow`` (see the
        module docstring); ``verify`` reads every file once to check its sha256, through the
        page cache, not the heap.
        """
        directory = Path(directory)
        mpath = directory / "manifest.json"
        if not mpath.is_file():
            raise DataError(
                f"{directory}: not a prepared dataset (no manifest.json); run `recloop prepare`"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{mpath}: invalid JSON ({exc})") from None
        version = manifest.get("format_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise DataError(
                f"{mpath}: format_version {version!r}, "
                f"this recloop reads {' and '.join(map(str, READABLE_VERSIONS))}; "
                "prepare the data again"
            )
        files: dict[str, str] = manifest.get("files", {})
        for name, digest in files.items():
            p = directory / name
            if not p.is_file():
                raise DataError(f"{directory}: {name} is listed in the manifest but missing")
            if verify and sha256_file(p) != digest:
                raise DataError(f"{p}: sha256 does not match manifest.json (file changed?)")
        if LEGACY_EVENTS_FILE in files:
            frame = pl.read_parquet(directory / LEGACY_EVENTS_FILE)
            ev = {c: frame[c].to_numpy() for c in frame.columns}
        else:
            ev = read_events(directory / EVENTS_FILE)
        missing = [c for c in EVENT_COLUMNS if c not in ev]
        if missing:
            raise DataError(f"{directory}: the events file lacks column(s) {', '.join(missing)}")
        user_ids = read_ids(directory / "user_ids.txt")
        item_ids = read_ids(directory / "item_ids.txt")
        n_users, n_items = len(user_ids), len(item_ids)
        user = ev["user"].astype(np.int32, copy=False)
        offsets = user_offsets(user, n_users)
        extra = {c: a for c, a in ev.items() if c not in EVENT_COLUMNS}
        uf = directory / "user_features.parquet"
        itf = directory / "item_features.parquet"
        return PreparedDataset(
            n_users=n_users,
            n_items=n_items,
            user=user,
            item=ev["item"].astype(np.int32, copy=False),
            timestamp=ev["timestamp"].astype(np.int64, copy=False),
            reward=ev["reward"].astype(np.float32, copy=False),
            returns=ev["return"].astype(np.float32, copy=False),
            session=ev["session"].astype(np.int32, copy=False),
            split=ev["split"].astype(np.int8, copy=False),
            user_offsets=offsets,
            user_ids=user_ids,
            item_ids=item_ids,
            user_features=pl.read_parquet(uf) if uf.is_file() else None,
            item_features=pl.read_parquet(itf) if itf.is_file() else None,
            extra=extra,
            manifest=manifest,
            path=directory,
        )


def user_offsets(user: np.ndarray, n_users: int) -> np.ndarray:
    """(U + 2,) int64 row offsets of each user's block in ``user`` (E,), sorted by user.

    Read from the sorted column by binary search, so a memory-mapped column is only touched
    at O(U log E) places instead of being scanned (a bincount would page in all of it).
    """
    offsets = np.zeros(n_users + 2, np.int64)
    if user.shape[0]:
        offsets[1:] = np.searchsorted(user, np.arange(1, n_users + 2), side="left")
    return offsets


OBJECT_TEXT_COLUMNS = frozenset({SERVED_CONTEXT})
"""Text columns read back as object arrays (long, and empty on most rows)."""


def write_events(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write event columns (E,) as one uncompressed Arrow IPC record batch (see :func:`load`).

    Numeric columns go to Arrow without a copy; string columns (``policy_version``) as Arrow
    strings.
    """
    arrays = {
        # long texts as large strings: 64-bit offsets, past 2 GiB of text in one column
        name: pa.array(a.tolist(), type=pa.large_string())
        if name in OBJECT_TEXT_COLUMNS
        else pa.array(a.tolist() if a.dtype.kind in "UO" else a)
        for name, a in columns.items()
    }
    batch = pa.record_batch(arrays)
    # A new file renamed over the old one: a process that has the old one mapped keeps
    # reading its pages (truncating a mapped file in place would crash it with SIGBUS).
    tmp = path.with_name(path.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(batch)
    os.replace(tmp, path)


def read_events(path: Path) -> dict[str, np.ndarray]:
    """The columns of an events file written by :func:`write_events`, memory-mapped.

    Numeric columns are read-only numpy views of the mapped file (no copy, no heap); string
    columns are decoded into numpy string arrays.
    """
    try:
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Arrow IPC events file ({exc})") from None
    out: dict[str, np.ndarray] = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            # long texts (the served context) as objects: numpy's fixed-width strings would
            # give every row the longest one's width
            out[name] = np.asarray(
                column.to_pylist(), dtype=object if name in OBJECT_TEXT_COLUMNS else str
            )
        elif column.num_chunks == 1 and column.null_count == 0:
            out[name] = column.chunk(0).to_numpy(zero_copy_only=True)
        else:
            raise DataError(
                f"{path}: column {name!r} is not one null-free record batch (written by an "
                "older or foreign writer?); prepare the data again"
            )
    return out
