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

from recloop.errors import ConfigError
from recloop.stores.base import (
    OnlineStore,
    RecentItem,
    Scored,
    StoreDataError,
    StoreError,
    check_max_len,
    merge_recent,
    sqlite_path,
)
from recloop.stores.memory import MemoryStore
from recloop.stores.redis import RECENT_EVENTS_KEY, RECENT_KEY, RECENT_READ_SCRIPT, RedisStore
from recloop.stores.sqlite import SqliteStore


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


__all__ = [
    "RECENT_EVENTS_KEY",
    "RECENT_KEY",
    "RECENT_READ_SCRIPT",
    "MemoryStore",
    "OnlineStore",
    "RecentItem",
    "RedisStore",
    "Scored",
    "SqliteStore",
    "StoreDataError",
    "StoreError",
    "check_max_len",
    "check_store",
    "check_store_url",
    "merge_recent",
    "open_store",
    "sqlite_path",
]
