"""SQLite store (``sqlite:///path``): one embedded file shared by several processes (WAL)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from recloop.stores.base import (
    RecentItem,
    Scored,
    StoreError,
    check_max_len,
    dump_scored,
    heartbeat_ts,
    load_heartbeat,
    load_scored,
    merge_recent,
)

T = TypeVar("T")

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS recloop_recent_ts (user TEXT PRIMARY KEY, items TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recloop_popular (
    id INTEGER PRIMARY KEY CHECK (id = 0), items TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS recloop_recommendations (
    user TEXT PRIMARY KEY, items TEXT NOT NULL, model_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS recloop_heartbeats (
    name TEXT PRIMARY KEY, ts REAL NOT NULL, doc TEXT NOT NULL
);
"""
_SQLITE_CHUNK = 500  # stays far below SQLite's limit on bound parameters


class SqliteStore:
    """One SQLite file (WAL mode) shared by the processes of one machine.

    Each user's recent list is one JSON row of ``[item, reward, ts, event_id]`` entries,
    merged by :func:`merge_recent` inside ``BEGIN IMMEDIATE``
    so concurrent writers from other processes serialise instead of losing items.  Calls run
    the blocking sqlite3 module in a worker thread, one connection guarded by a lock.
    """

    def __init__(self, path: str | Path, *, timeout_s: float = 5.0) -> None:
        self.path = str(path)
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SQLITE_SCHEMA)
            self._conn = conn
        return self._conn

    async def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._connect())

        try:
            return await asyncio.to_thread(locked)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite store {self.path}: {what} failed ({exc})") from exc

    @staticmethod
    def _write(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], None]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _select_lists(conn: sqlite3.Connection, users: Sequence[str]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for i in range(0, len(users), _SQLITE_CHUNK):
            chunk = list(users[i : i + _SQLITE_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT user, items FROM recloop_recent_ts WHERE user IN ({marks})", chunk
            )
            out.update((u, orjson.loads(items)) for u, items in rows)
        return out

    async def push_recent(
        self, events: Mapping[str, Sequence[RecentItem]], *, max_len: int
    ) -> None:
        check_max_len(max_len)
        events = {u: p for u, p in events.items() if p}
        if not events:
            return

        def txn(conn: sqlite3.Connection) -> None:
            old = self._select_lists(conn, list(events))
            rows = []
            for user, items in events.items():
                merged = merge_recent(
                    [RecentItem(*x) for x in old.get(user, [])],
                    items,
                    max_len=max_len,
                )
                rows.append((user, orjson.dumps([list(r) for r in merged]).decode()))
            conn.executemany(
                "INSERT INTO recloop_recent_ts (user, items) VALUES (?, ?) "
                "ON CONFLICT(user) DO UPDATE SET items = excluded.items",
                rows,
            )

        await self._call("push_recent", lambda conn: self._write(conn, txn))

    async def get_recent(self, users: Sequence[str], *, n: int) -> dict[str, list[Scored]]:
        if n <= 0 or not users:
            return {u: [] for u in users}
        found = await self._call("get_recent", lambda conn: self._select_lists(conn, users))
        return {u: [(str(x[0]), float(x[1])) for x in found.get(u, [])[-n:]] for u in users}

    async def set_popular(self, items: Sequence[Scored]) -> None:
        blob = dump_scored(items).decode()

        def txn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO recloop_popular (id, items) VALUES (0, ?) "
                "ON CONFLICT(id) DO UPDATE SET items = excluded.items",
                (blob,),
            )

        await self._call("set_popular", lambda conn: self._write(conn, txn))

    async def get_popular(self, n: int) -> list[Scored]:
        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute("SELECT items FROM recloop_popular WHERE id = 0").fetchone()

        row = await self._call("get_popular", read)
        return [] if row is None or n <= 0 else load_scored(row[0], "recloop_popular")[:n]

    async def set_recommendations(
        self, recs: Mapping[str, Sequence[Scored]], *, model_version: str
    ) -> None:
        rows = [(u, dump_scored(items).decode(), model_version) for u, items in recs.items()]
        if not rows:
            return

        def txn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO recloop_recommendations (user, items, model_version) "
                "VALUES (?, ?, ?) ON CONFLICT(user) DO UPDATE SET "
                "items = excluded.items, model_version = excluded.model_version",
                rows,
            )

        await self._call("set_recommendations", lambda conn: self._write(conn, txn))

    async def get_recommendations(self, user: str) -> tuple[list[Scored], str] | None:
        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT items, model_version FROM recloop_recommendations WHERE user = ?", (user,)
            ).fetchone()

        row = await self._call("get_recommendations", read)
        if row is None:
            return None
        return load_scored(row[0], f"recloop_recommendations[{user!r}]"), str(row[1])

    async def put_heartbeat(self, name: str, doc: Mapping[str, Any]) -> None:
        row = (name, heartbeat_ts(name, doc), orjson.dumps(doc).decode())

        def txn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO recloop_heartbeats (name, ts, doc) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET ts = excluded.ts, doc = excluded.doc",
                row,
            )

        await self._call("put_heartbeat", lambda conn: self._write(conn, txn))

    async def get_heartbeats(self, *, max_age_s: float) -> dict[str, dict[str, Any]]:
        import time

        oldest = time.time() - max_age_s

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM recloop_heartbeats WHERE ts < ?", (oldest,))

        def read(conn: sqlite3.Connection) -> list[Any]:
            # a plain read in the common case: only a stale record takes the write lock
            rows = conn.execute("SELECT name, ts, doc FROM recloop_heartbeats").fetchall()
            if any(ts < oldest for _, ts, _ in rows):
                self._write(conn, prune)
            return [(n, d) for n, ts, d in rows if ts >= oldest]

        rows = await self._call("get_heartbeats", read)
        return {n: load_heartbeat(d, f"recloop_heartbeats[{n!r}]") for n, d in rows}

    async def ping(self) -> bool:
        try:
            await self._call("ping", lambda conn: conn.execute("SELECT 1").fetchone())
        except StoreError:
            return False
        return True

    async def check(self) -> None:
        """Open the database; raises :class:`StoreError` when its directory does not exist
        (a service reading a store nobody writes is a typo, not a new store) or it cannot
        be opened."""
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.is_dir():
                raise StoreError(f"sqlite store {self.path}: directory {parent} does not exist")
        await self._call("connect", lambda conn: conn.execute("SELECT 1").fetchone())

    async def close(self) -> None:
        def shut() -> None:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None

        await asyncio.to_thread(shut)
