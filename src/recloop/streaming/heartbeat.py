"""Stream workers' heartbeats: throughput and lag, written to the online store they share
with the service, whose dashboard (``GET /dashboard``) reads them.

Every :data:`HEARTBEAT_INTERVAL_S` a worker replaces its record (``OnlineStore.put_heartbeat``,
under its consumer name) with its counters, its event rate since the previous record and
three measures of how far behind it is:

- ``pending``: entries read by the group and not yet acknowledged;
- ``undelivered``: entries on the bus the group has not read yet (where the bus can say);
- ``lag_s``: wall-clock seconds between the bus appending the last entry this worker
  processed and now — only on Redis, whose entry ids begin with the append time in ms.

A heartbeat is best effort: a store that cannot take it is logged (debug) and the worker
goes on; its record then ages out of the dashboard.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recloop.streaming.runner import StreamProcessor

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 2.0
"""How often a worker replaces its record."""
HEARTBEAT_MAX_AGE_S = 30.0
"""Records older than this are a gone worker's (the dashboard drops them)."""
_REDIS_ID_MS_MIN = 10**12
"""Entry ids whose first part is at least this (2001-09-09 in ms) are append times."""


def publish_lag_s(entry_id: str | None, now: float) -> float | None:
    """Seconds since the bus appended ``entry_id``, when its id says (Redis: ``<ms>-<seq>``);
    None for other ids (the in-process bus counts from 1)."""
    if not entry_id:
        return None
    head = entry_id.split("-", 1)[0]
    if not head.isdigit() or int(head) < _REDIS_ID_MS_MIN:
        return None
    return max(0.0, now - int(head) / 1000.0)


class Heartbeat:
    """Writes one worker's record at most every ``interval_s`` (see the module doc)."""

    def __init__(self, processor: StreamProcessor, *, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.p = processor
        self.interval_s = interval_s
        self.started = time.time()
        self._at = time.monotonic()
        self._messages = 0
        self._last_beat = -float("inf")

    async def maybe_beat(self) -> None:
        if time.monotonic() - self._last_beat >= self.interval_s:
            await self.beat()

    async def beat(self, *, state: str = "running") -> None:
        """Write the record now (``state`` "stopped" as a worker ends)."""
        self._last_beat = time.monotonic()
        try:
            doc = await self.record(state=state)
            await self.p.store.put_heartbeat(self.p.consumer, doc)
        except Exception as exc:  # best effort: the stream's work comes first
            logger.debug("%s: heartbeat not written: %s", self.p.consumer, exc)

    async def record(self, *, state: str = "running") -> dict[str, Any]:
        p, s = self.p, self.p.settings
        now_mono, now = time.monotonic(), time.time()
        stats = p.stats
        elapsed = now_mono - self._at
        rate = (stats.messages - self._messages) / elapsed if elapsed > 0 else 0.0
        self._at, self._messages = now_mono, stats.messages
        undelivered = getattr(p.bus, "undelivered", None)  # not every bus can say
        return {
            "ts": now,
            "consumer": p.consumer,
            "pid": os.getpid(),
            "state": state,
            "started": self.started,
            "stream": s.stream,
            "group": s.group,
            "events_per_s": round(rate, 2),
            "messages": stats.messages,
            "logged": stats.logged,
            "batches": stats.batches,
            "dead_letters": stats.dead_letters,
            "recommendations": stats.recommendations,
            "popular_refreshes": stats.popular_refreshes,
            "pending": await p.bus.pending_count(s.group),
            "undelivered": await undelivered(s.group) if undelivered is not None else None,
            "lag_s": publish_lag_s(p.last_entry_id, now),
            "watermark_ts": p.watermark.max_ts,
            # settled impressions per A/B arm since the worker started (final attributions)
            "arms": {
                arm: {"impressions": t.impressions, "clicks": t.clicks, "reward": t.reward}
                for arm, t in p.arm_totals.items()
            },
        }
