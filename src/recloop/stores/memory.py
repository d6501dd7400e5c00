"""In-process store (``memory://`` or no URL): dicts in one process, for tests and demos."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from recloop.stores.base import (
    RecentItem,
    Scored,
    check_max_len,
    heartbeat_ts,
    merge_recent,
)


class MemoryStore:
    """Plain dicts in this process; the reference behaviour for the other stores."""

    def __init__(self) -> None:
        self._recent: dict[str, list[RecentItem]] = {}
        self._popular: list[Scored] = []
        self._recs: dict[str, tuple[list[Scored], str]] = {}
        self._heartbeats: dict[str, tuple[float, bytes]] = {}

    async def push_recent(
        self, events: Mapping[str, Sequence[RecentItem]], *, max_len: int
    ) -> None:
        check_max_len(max_len)
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

    async def put_heartbeat(self, name: str, doc: Mapping[str, Any]) -> None:
        # stored as JSON, as the other stores do: the reader gets a copy, and a doc that
        # cannot be stored fails here in every store alike
        self._heartbeats[name] = (heartbeat_ts(name, doc), orjson.dumps(doc))

    async def get_heartbeats(self, *, max_age_s: float) -> dict[str, dict[str, Any]]:
        oldest = time.time() - max_age_s
        for name in [n for n, (ts, _) in self._heartbeats.items() if ts < oldest]:
            del self._heartbeats[name]
        return {n: orjson.loads(raw) for n, (_, raw) in self._heartbeats.items()}

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# ----------------------------------------------------------------------------- redis
