"""Online stores: each user's recent items, real-time popular items, latest recommendations.

One :class:`OnlineStore` protocol, three implementations that pass the same contract tests:

- :class:`RedisStore` (``redis://…``): capped sorted sets per user, one round trip per batch;
- :class:`MemoryStore` (``memory://`` or no URL): dicts in one process, for tests and demos;
- :class:`SqliteStore` (``sqlite:///path``): one embedded file shared by several processes on
  one laptop (WAL mode), so ``recloop stream`` and ``recloop serve`` can run without Redis.

Everything is keyed by raw ids (strings).  A user's recent items are kept in **event-time**
order (ties by event id) and are **idempotent by event id**: stream workers that finish
their batches out of order, or a batch delivered twice after a crash, leave the same list —
the last ``max_len`` events by event time.  Failures to reach the backend raise
:class:`StoreError`, whatever the backend library raised; a backend that answers with data
it cannot decode raises :class:`StoreDataError` naming the key, so that callers can tell a
corrupt value (fall back for that read) from an outage (stop asking for a while).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import orjson

from recloop.errors import ConfigError, RecloopError

T = TypeVar("T")

Scored = tuple[str, float]
"""A raw id with a score (popular items, recommendations) or a reward (recent items)."""


class RecentItem(NamedTuple):
    """One consumed item of a user's recent list, as the stream processor pushes it."""

    item: str
    """Raw item id."""
    reward: float
    """The event's reward."""
    ts: int
    """Event time in seconds: the list's order."""
    event_id: str
    """The event's id: pushing it again changes nothing; breaks ties of ``ts``."""


def merge_recent(
    old: Sequence[RecentItem], new: Sequence[RecentItem], *, max_len: int
) -> list[RecentItem]:
    """``old`` and ``new`` as one list ordered by (ts, event_id), one entry per event id (the
    first version wins, as in the behaviour log), the last ``max_len`` — the reference
    behaviour of every store.  ``new`` entries are coerced to their field types."""
    typed = [RecentItem(str(i), float(r), int(t), str(e)) for i, r, t, e in new]
    by_id = {r.event_id: r for r in reversed(typed)}
    by_id.update((r.event_id, r) for r in old)
    return sorted(by_id.values(), key=lambda r: (r.ts, r.event_id))[-max_len:]


class StoreError(RecloopError):
    """The online store cannot be reached or answered with an error."""


class StoreDataError(RecloopError):
    """The online store answered, but a value under one key is not what recloop writes there."""


@runtime_checkable
class OnlineStore(Protocol):
    """Per-user recent items, popular items and latest recommendations, all by raw id."""

    async def push_recent(
        self, events: Mapping[str, Sequence[RecentItem]], *, max_len: int
    ) -> None:
        """Add each user's events; keep the last ``max_len`` by event time (see module doc)."""
        ...

    async def get_recent(self, users: Sequence[str], *, n: int) -> dict[str, list[Scored]]:
        """Each user's last ``n`` (item, reward) pairs, oldest first; [] for unknown users."""
        ...

    async def set_popular(self, items: Sequence[Scored]) -> None:
        """Replace the popular list (item, score), best first."""
        ...

    async def get_popular(self, n: int) -> list[Scored]:
        """The first ``n`` popular items, best first ([] when none were set)."""
        ...

    async def set_recommendations(
        self, recs: Mapping[str, Sequence[Scored]], *, model_version: str
    ) -> None:
        """Store each user's latest ranked list and the model version that made it."""
        ...

    async def get_recommendations(self, user: str) -> tuple[list[Scored], str] | None:
        """The user's latest list and its model version, or None."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers; never raises."""
        ...

    async def close(self) -> None: ...


def open_store(
    url: str | None, *, prefix: str = "recloop:", timeout_s: float = 1.0, retries: int = 0
) -> OnlineStore:
    """The store a URL names: ``redis://``/``rediss://``/``unix://`` → Redis, ``memory://``
    or None → in-process, ``sqlite:///relative/path`` or ``sqlite:////absolute/path`` → SQLite.

    ``prefix`` namespaces Redis keys; ``timeout_s`` bounds connects and commands (and SQLite's
    wait for a lock); ``retries`` is how often a failed Redis command is retried at once.
    Nothing is contacted here: the first call connects (:func:`check_store` tries it).
    """
    kind = check_store_url(url)
    if kind == "memory":
        return MemoryStore()
    assert url is not None
    if kind == "redis":
        return RedisStore(url, prefix=prefix, timeout_s=timeout_s, retries=retries)
    return SqliteStore(sqlite_path(url), timeout_s=timeout_s)


def check_store_url(url: str | None) -> str:
    """The kind of store ``url`` names (``memory``, ``redis`` or ``sqlite``); raises
    :class:`ConfigError` saying what is wrong with it.  Contacts nothing."""
    if url is None or url in ("", "memory://", "memory:"):
        return "memory"
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from redis.connection import parse_url

        try:
            parse_url(url)
        except ValueError as exc:
            raise ConfigError(f"store url {url!r}: {exc}") from None
        return "redis"
    if scheme == "sqlite":
        sqlite_path(url)
        return "sqlite"
    raise ConfigError(
        f"store url {url!r}: unsupported scheme {scheme!r} "
        "(expected redis://, rediss://, unix://, sqlite:/// or memory://)"
    )


async def check_store(store: OnlineStore) -> None:
    """Connect once and raise :class:`StoreError` saying why the store cannot be used (a
    server that refuses the database number, a SQLite directory that does not exist)."""
    check = getattr(store, "check", None)
    if check is not None:
        await check()
    elif not await store.ping():
        raise StoreError(f"{type(store).__name__}: does not answer")


def sqlite_path(url: str) -> str:
    """``sqlite:///a.db`` → ``a.db``, ``sqlite:////tmp/a.db`` → ``/tmp/a.db`` (as SQLAlchemy)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"store url {url!r}: expected sqlite:///relative or sqlite:////absolute")
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    if not path:
        raise ConfigError(f"store url {url!r}: no database file")
    return path


def _check_max_len(max_len: int) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


# ----------------------------------------------------------------------------- memory


class MemoryStore:
    """Plain dicts in this process; the reference behaviour for the other stores."""

    def __init__(self) -> None:
        self._recent: dict[str, list[RecentItem]] = {}
        self._popular: list[Scored] = []
        self._recs: dict[str, tuple[list[Scored], str]] = {}

    async def push_recent(
        self, events: Mapping[str, Sequence[RecentItem]], *, max_len: int
    ) -> None:
        _check_max_len(max_len)
        for user, items in events.items():
            self._recent[user] = merge_recent(self._recent.get(user, []), items, max_len=max_len)

    async def get_recent(self, users: Sequence[str], *, n: int) -> dict[str, list[Scored]]:
        if n <= 0:
            return {u: [] for u in users}
        return {u: [(r.item, r.reward) for r in self._recent.get(u, ())[-n:]] for u in users}

    async def set_popular(self, items: Sequence[Scored]) -> None:
        self._popular = [(str(i), float(s)) for i, s in items]

    async def get_popular(self, n: int) -> list[Scored]:
        return list(self._popular[: max(n, 0)])

    async def set_recommendations(
        self, recs: Mapping[str, Sequence[Scored]], *, model_version: str
    ) -> None:
        for user, items in recs.items():
            self._recs[user] = ([(str(i), float(s)) for i, s in items], model_version)

    async def get_recommendations(self, user: str) -> tuple[list[Scored], str] | None:
        got = self._recs.get(user)
        return None if got is None else (list(got[0]), got[1])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# ----------------------------------------------------------------------------- redis


def _encode_recent(item: str, reward: float) -> bytes:
    # "reward item": a float's repr has no space, so the first space splits it off, and the
    # item id may hold anything (spaces included) without JSON's cost per entry.
    return f"{float(reward)!r} {item}".encode()


def _decode_recent(raw: bytes) -> Scored:
    reward, item = raw.decode().split(" ", 1)
    return item, float(reward)


def _decode_all(raw: Sequence[bytes | None], key: str) -> list[Scored]:
    # None: a payload deleted by hand behind the sorted set's back; the event is skipped
    try:
        return [_decode_recent(x) for x in raw if x is not None]
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreDataError(f"key {key!r}: unreadable recent item ({exc})") from None


# Per user, a sorted set of event ids scored by event time and a hash event id → "reward
# item".  Equal scores order by member bytes, i.e. by event id in code-point order, as
# merge_recent sorts; the first version of an event id wins (HSETNX), as in the log.
RECENT_PUSH_SCRIPT = """
local n = tonumber(ARGV[1])
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i + 1], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local extra = redis.call('ZCARD', KEYS[1]) - n
if extra > 0 then
  local gone = redis.call('ZRANGE', KEYS[1], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
  for j = 1, #gone, 1000 do
    redis.call('HDEL', KEYS[2], unpack(gone, j, math.min(j + 999, #gone)))
  end
end
return 0
"""
RECENT_READ_SCRIPT = """
local ids = redis.call('ZRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
local out = {}
for j = 1, #ids, 1000 do
  local part = redis.call('HMGET', KEYS[2], unpack(ids, j, math.min(j + 999, #ids)))
  for k = 1, #part do out[#out + 1] = part[k] end
end
return out
"""
_SHA = {
    script: hashlib.sha1(script.encode()).hexdigest()
    for script in (RECENT_PUSH_SCRIPT, RECENT_READ_SCRIPT)
}


def _dump_scored(items: Sequence[Scored]) -> bytes:
    return orjson.dumps([[str(i), float(s)] for i, s in items])


def _load_scored(raw: bytes | str, key: str) -> list[Scored]:
    """A JSON list of ``[id, score]`` pairs; anything else raises :class:`StoreDataError`."""
    try:
        return [(str(i), float(s)) for i, s in orjson.loads(raw)]
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        shown = raw[:60] if isinstance(raw, str) else raw[:60].decode(errors="replace")
        raise StoreDataError(
            f"key {key!r}: expected a JSON list of [id, score] pairs, got {shown!r} "
            f"({type(exc).__name__}: {exc})"
        ) from None


RECENT_KEY = "recent_ts"
"""Redis key kind of the recent sets (``<prefix>recent_ts:{<user>}``)."""
RECENT_EVENTS_KEY = "recent_ev"
"""Redis key kind of the recent events' payloads (``<prefix>recent_ev:{<user>}``)."""


class RedisStore:
    """Redis keys under ``prefix``: ``recent_ts:{<user>}`` (sorted set of event ids scored by
    event time) with ``recent_ev:{<user>}`` (hash event id → reward and item), ``popular``
    (JSON string), ``recs:<user>`` (JSON string ``{"model_version", "items"}``).

    Batched writes and reads go through one non-transactional pipeline (one round trip); a
    user's recent list is added to, capped and read by two small Lua scripts (``EVALSHA``,
    loaded on demand), so each is atomic.  Commands fail fast (``retries`` = 0
    by default) so that a service can fall back instead of waiting on a dead server.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "recloop:",
        timeout_s: float = 1.0,
        retries: int = 0,
        recs_ttl_s: int | None = None,
    ) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.url = url
        self.prefix = prefix
        self.recs_ttl_s = recs_ttl_s
        try:
            self._client: Any = aioredis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(ExponentialBackoff(cap=timeout_s, base=0.01), retries),
                decode_responses=False,
            )
        except ValueError as exc:
            raise ConfigError(f"store url {url!r}: {exc}") from None

    def _recent_keys(self, user: str) -> list[str]:
        # {user} is a Redis Cluster hash tag: a user's two keys share a slot, as the scripts
        # that touch both require.
        return [self._key(RECENT_KEY, f"{{{user}}}"), self._key(RECENT_EVENTS_KEY, f"{{{user}}}")]

    async def _scripts(
        self, what: str, script: str, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """``EVALSHA script`` once per (keys, args), pipelined in one round trip; when the
        server has lost the script (restart, SCRIPT FLUSH) it is loaded and the pipeline run
        again (both scripts are idempotent)."""
        from redis.exceptions import NoScriptError

        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(_SHA[script], len(keys), *keys, *args)
            try:
                return list(await self._run(what, pipe.execute))
            except StoreError as exc:
                if attempt or not isinstance(exc.__cause__, NoScriptError):
                    raise
            await self._run(what, lambda: self._client.script_load(script))
        raise AssertionError("unreachable")

    def _key(self, kind: str, user: str | None = None) -> str:
        return f"{self.prefix}{kind}" if user is None else f"{self.prefix}{kind}:{user}"

    async def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await fn()
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreError(f"redis store {self.url}: {what} failed ({exc})") from exc

    async def push_recent(
        self, events: Mapping[str, Sequence[RecentItem]], *, max_len: int
    ) -> None:
        _check_max_len(max_len)
        calls: list[tuple[list[str], list[Any]]] = []
        for user, items in events.items():
            if not items:
                continue
            args: list[Any] = [max_len]
            for r in items:
                args += [int(r.ts), str(r.event_id), _encode_recent(r.item, r.reward)]
            calls.append((self._recent_keys(user), args))
        if calls:
            await self._scripts("push_recent", RECENT_PUSH_SCRIPT, calls)

    async def get_recent(self, users: Sequence[str], *, n: int) -> dict[str, list[Scored]]:
        if n <= 0 or not users:
            return {u: [] for u in users}
        calls = [(self._recent_keys(u), [n]) for u in users]
        lists = await self._scripts("get_recent", RECENT_READ_SCRIPT, calls)
        return {
            u: _decode_all(raw, self._key(RECENT_EVENTS_KEY, f"{{{u}}}"))
            for u, raw in zip(users, lists, strict=True)
        }

    async def set_popular(self, items: Sequence[Scored]) -> None:
        blob = _dump_scored(items)
        await self._run("set_popular", lambda: self._client.set(self._key("popular"), blob))

    async def get_popular(self, n: int) -> list[Scored]:
        key = self._key("popular")
        raw = await self._run("get_popular", lambda: self._client.get(key))
        return [] if raw is None or n <= 0 else _load_scored(raw, key)[:n]

    async def set_recommendations(
        self, recs: Mapping[str, Sequence[Scored]], *, model_version: str
    ) -> None:
        if not recs:
            return
        pipe = self._client.pipeline(transaction=False)
        for user, items in recs.items():
            blob = orjson.dumps(
                {"model_version": model_version, "items": [[str(i), float(s)] for i, s in items]}
            )
            pipe.set(self._key("recs", user), blob, ex=self.recs_ttl_s)
        await self._run("set_recommendations", pipe.execute)

    async def get_recommendations(self, user: str) -> tuple[list[Scored], str] | None:
        key = self._key("recs", user)
        raw = await self._run("get_recommendations", lambda: self._client.get(key))
        if raw is None:
            return None
        try:
            doc = orjson.loads(raw)
            return [(str(i), float(s)) for i, s in doc["items"]], str(doc["model_version"])
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreDataError(f"key {key!r}: unreadable recommendations ({exc!r})") from None

    async def ping(self) -> bool:
        try:
            return bool(await self._run("ping", self._client.ping))
        except StoreError:
            return False

    async def check(self) -> None:
        """Connect (authenticating and selecting the database) and ping; raises
        :class:`StoreError` with the server's reason."""
        await self._run("connect", self._client.ping)

    async def close(self) -> None:
        await self._client.aclose()

    async def delete_all(self) -> int:
        """Delete every key under this store's prefix (tests, resets); returns how many."""
        keys = [k async for k in self._client.scan_iter(match=f"{self.prefix}*", count=1000)]
        return int(await self._client.delete(*keys)) if keys else 0


# ----------------------------------------------------------------------------- sqlite


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS recloop_recent_ts (user TEXT PRIMARY KEY, items TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recloop_popular (
    id INTEGER PRIMARY KEY CHECK (id = 0), items TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS recloop_recommendations (
    user TEXT PRIMARY KEY, items TEXT NOT NULL, model_version TEXT NOT NULL
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
        _check_max_len(max_len)
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
        blob = _dump_scored(items).decode()

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
        return [] if row is None or n <= 0 else _load_scored(row[0], "recloop_popular")[:n]

    async def set_recommendations(
        self, recs: Mapping[str, Sequence[Scored]], *, model_version: str
    ) -> None:
        rows = [(u, _dump_scored(items).decode(), model_version) for u, items in recs.items()]
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
        return _load_scored(row[0], f"recloop_recommendations[{user!r}]"), str(row[1])

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
