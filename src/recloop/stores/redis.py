"""Redis store (``redis://``): capped sorted sets per user, one round trip per batch."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from recloop.errors import ConfigError
from recloop.stores.base import (
    RecentItem,
    Scored,
    StoreDataError,
    StoreError,
    check_max_len,
    dump_scored,
    heartbeat_ts,
    load_heartbeat,
    load_scored,
)


def _recent_value(item: str, reward: float) -> str:
    # "reward item": a float's repr has no space, so the first space splits it off, and the
    # item id may hold anything (spaces included) without JSON's cost per entry on reads.
    return f"{float(reward)!r} {item}"


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
# merge_recent sorts; the first version of an event id wins (HSETNX), as in the log.  The
# push returns the ids it added (the Flink job refreshes recommendations only for those).
# A user's events come as one JSON array of [ts, event id, "reward item"] (ARGV[2]): one
# argument per user instead of three per event, which the client would encode one by one.
RECENT_PUSH_SCRIPT = """
local n = tonumber(ARGV[1])
local added = {}
for _, e in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('HSETNX', KEYS[2], e[2], e[3]) == 1 then
    redis.call('ZADD', KEYS[1], e[1], e[2])
    added[#added + 1] = e[2]
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
return added
"""
# A user's last n events, for many users in one call (KEYS: each user's two keys in turn),
# one list per user: a batch's read is one command, not one per user, whose encoding, reply
# parsing and timeout handling cost the client more than the read costs Redis.  On Redis
# Cluster the keys of one call would have to share a hash slot (CROSSSLOT otherwise): a
# cluster client must group a batch by slot.  recloop's client is a standalone one.
RECENT_READ_SCRIPT = """
local n = tonumber(ARGV[1])
local out = {}
for u = 1, #KEYS, 2 do
  local ids = redis.call('ZRANGE', KEYS[u], -n, -1)
  local got = {}
  for j = 1, #ids, 1000 do
    local part = redis.call('HMGET', KEYS[u + 1], unpack(ids, j, math.min(j + 999, #ids)))
    for k = 1, #part do got[#got + 1] = part[k] end
  end
  out[#out + 1] = got
end
return out
"""
READ_MANY_USERS = 256
"""Users per read-many call: a long batch is split so that no one script holds Redis long."""
_SHA = {
    script: hashlib.sha1(script.encode()).hexdigest()
    for script in (RECENT_PUSH_SCRIPT, RECENT_READ_SCRIPT)
}


RECENT_KEY = "recent_ts"
"""Redis key kind of the recent sets (``<prefix>recent_ts:{<user>}``)."""
RECENT_EVENTS_KEY = "recent_ev"
"""Redis key kind of the recent events' payloads (``<prefix>recent_ev:{<user>}``)."""


class RedisStore:
    """Redis keys under ``prefix``: ``recent_ts:{<user>}`` (sorted set of event ids scored by
    event time) with ``recent_ev:{<user>}`` (hash event id → reward and item), ``popular``
    (JSON string), ``recs:<user>`` (JSON string ``{"model_version", "items"}``).

    Batched writes and reads go through one non-transactional pipeline (one round trip); a
    user's recent list is added to and capped by a small Lua script (``EVALSHA``, loaded on
    demand), so each push is atomic, and a batch's recent lists are read by one script call
    per 256 users.  Commands fail fast (``retries`` = 0
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
        check_max_len(max_len)
        calls: list[tuple[list[str], list[Any]]] = []
        for user, items in events.items():
            if not items:
                continue
            entries = [[int(r.ts), str(r.event_id), _recent_value(r.item, r.reward)] for r in items]
            calls.append((self._recent_keys(user), [max_len, orjson.dumps(entries)]))
        if calls:
            await self._scripts("push_recent", RECENT_PUSH_SCRIPT, calls)

    async def get_recent(self, users: Sequence[str], *, n: int) -> dict[str, list[Scored]]:
        if n <= 0 or not users:
            return {u: [] for u in users}
        chunks = [users[i : i + READ_MANY_USERS] for i in range(0, len(users), READ_MANY_USERS)]
        calls = [([k for u in chunk for k in self._recent_keys(u)], [n]) for chunk in chunks]
        replies = await self._scripts("get_recent", RECENT_READ_SCRIPT, calls)
        lists = [raw for reply in replies for raw in reply]
        return {
            u: _decode_all(raw, self._key(RECENT_EVENTS_KEY, f"{{{u}}}"))
            for u, raw in zip(users, lists, strict=True)
        }

    async def set_popular(self, items: Sequence[Scored]) -> None:
        blob = dump_scored(items)
        await self._run("set_popular", lambda: self._client.set(self._key("popular"), blob))

    async def get_popular(self, n: int) -> list[Scored]:
        key = self._key("popular")
        raw = await self._run("get_popular", lambda: self._client.get(key))
        return [] if raw is None or n <= 0 else load_scored(raw, key)[:n]

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

    async def put_heartbeat(self, name: str, doc: Mapping[str, Any]) -> None:
        heartbeat_ts(name, doc)
        blob = orjson.dumps(doc)
        key = self._key("heartbeats")
        await self._run("put_heartbeat", lambda: self._client.hset(key, name, blob))

    async def get_heartbeats(self, *, max_age_s: float) -> dict[str, dict[str, Any]]:
        import time

        key = self._key("heartbeats")
        raw = await self._run("get_heartbeats", lambda: self._client.hgetall(key))
        oldest = time.time() - max_age_s
        out: dict[str, dict[str, Any]] = {}
        stale: list[bytes] = []
        for field, blob in raw.items():
            name = field.decode(errors="replace")
            doc = load_heartbeat(blob, f"{key}[{name!r}]")
            if doc["ts"] < oldest:
                stale.append(field)
            else:
                out[name] = doc
        if stale:
            # a gone process's record: one hash of a few fields, pruned by whoever reads it
            await self._run("get_heartbeats", lambda: self._client.hdel(key, *stale))
        return out

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
