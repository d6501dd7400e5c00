"""The online store protocol, its record types, errors and the helpers every backend shares."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import orjson

from recloop.errors import ConfigError, RecloopError

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

    async def put_heartbeat(self, name: str, doc: Mapping[str, Any]) -> None:
        """Replace process ``name``'s status record: a JSON-able ``doc`` whose ``ts`` is the
        wall-clock time it was taken (the stream workers' throughput and lag, which the
        service's dashboard reads)."""
        ...

    async def get_heartbeats(self, *, max_age_s: float) -> dict[str, dict[str, Any]]:
        """Each process's latest status record taken in the last ``max_age_s`` seconds;
        older ones are deleted (their processes are gone)."""
        ...

    async def ping(self) -> bool:
        """True when the backend answers; never raises."""
        ...

    async def close(self) -> None: ...


def sqlite_path(url: str) -> str:
    """``sqlite:///a.db`` → ``a.db``, ``sqlite:////tmp/a.db`` → ``/tmp/a.db`` (as SQLAlchemy)."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"store url {url!r}: expected sqlite:///relative or sqlite:////absolute")
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    if not path:
        raise ConfigError(f"store url {url!r}: no database file")
    return path


def check_max_len(max_len: int) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def heartbeat_ts(name: str, doc: Mapping[str, Any]) -> float:
    """The ``ts`` of a status record; raises ValueError naming the record without one."""
    ts = doc.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValueError(f"heartbeat {name!r}: needs a numeric 'ts' (seconds), got {ts!r}")
    return float(ts)


def load_heartbeat(raw: bytes | str, key: str) -> dict[str, Any]:
    """A status record as stored; anything but a JSON object with a ``ts`` raises
    :class:`StoreDataError` naming the key."""
    try:
        doc = orjson.loads(raw)
        if not isinstance(doc, dict):
            raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
        heartbeat_ts(key, doc)
    except (ValueError, TypeError) as exc:
        raise StoreDataError(f"key {key!r}: unreadable heartbeat ({exc})") from None
    return doc


def dump_scored(items: Sequence[Scored]) -> bytes:
    return orjson.dumps([[str(i), float(s)] for i, s in items])


def load_scored(raw: bytes | str, key: str) -> list[Scored]:
    """A JSON list of ``[id, score]`` pairs; anything else raises :class:`StoreDataError`."""
    try:
        return [(str(i), float(s)) for i, s in orjson.loads(raw)]
    except (ValueError, TypeError) as exc:  # orjson.JSONDecodeError is a ValueError
        shown = raw[:60] if isinstance(raw, str) else raw[:60].decode(errors="replace")
        raise StoreDataError(
            f"key {key!r}: expected a JSON list of [id, score] pairs, got {shown!r} "
            f"({type(exc).__name__}: {exc})"
        ) from None
