"""In-process store (``memory://`` or no URL): dicts in one process, for tests and demos."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from recloop.stores.base import (
    RecentItem,
    Scored,
    check_max_len,
    merge_recent,
)


class MemoryStore:
    """Plain dicts in this process; the reference behaviour for the other stores."""

    def __init__(self) -> None:
        self._recent: dict[str, list[RecentItem]] = {}
        self._popular: list[Scored] = []
        self._recs: dict[str, tuple[list[Scored], str]] = {}

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

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# ----------------------------------------------------------------------------- redis
