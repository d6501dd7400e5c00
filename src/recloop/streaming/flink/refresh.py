"""The Flink job's recommendation refresh, run inside the job's Python worker.

:mod:`recloop.streaming.flink.job` keeps each user's last H events in Flink state (SQL
Top-N, JVM) and pushes the changed lists to the Redis store in batches; the events a push
really added (the store's script returns their ids: a replayed event adds nothing) are the
batch's *new* events.  For their users this module does what the Redis Streams workers do
after a batch (:meth:`recloop.streaming.runner.StreamProcessor._refresh`), with the same
functions: read the users' recent lists from the store, score them in one
:class:`~recloop.streaming.operators.Recommender` call, take each user's previous list from
the recommendation log, compute its realised reward from the new events
(:func:`~recloop.streaming.operators.realised_rewards`), log the new lists and write them to
the store.

Why in the Flink worker (torch in the Flink environment) and not a call to ``recloop
serve``'s ``/v1/recommend/batch``: the service answers with its own policy settings
(exploration, A/B arms, popular fallbacks for unknown users, the store's consumed items) and
logs what it serves as impressions, so its lists would not be the workers' refresh; scoring
here gives the same lists from the same recent items.  ``torch`` installs beside
``apache-flink`` without moving its numpy/pandas/pyarrow pins (``scripts/flink_env.sh
--scorer``).

This module imports recloop (torch, polars, SQLAlchemy), so the Flink environment needs
them; the job ships recloop's package to its workers (``python.files``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from recloop.artifacts import load_artifact
from recloop.stores import RedisStore
from recloop.streaming.events import EVENT_SCHEMA
from recloop.streaming.log import BehaviorLog
from recloop.streaming.operators import Recommender, realised_rewards, recommendation_rows

logger = logging.getLogger(__name__)

NewEvent = tuple[str, str, float, int, str]
"""(user_id, item_id, reward, ts, event_id) of an event a push added to a recent list."""


class FlinkRefresh:
    """Refreshes the lists of the users with new events: one scorer call per batch."""

    def __init__(
        self,
        *,
        artifact: Path,
        database_url: str,
        table_prefix: str,
        store_url: str,
        store_prefix: str,
        recent_len: int,
        rec_n: int,
    ) -> None:
        self.recommender = Recommender(load_artifact(artifact), n=rec_n)
        self.log = BehaviorLog(database_url, prefix=table_prefix)
        self.recent_len = recent_len
        # The store's own code (key names, list format, recommendation blobs), run on a
        # loop of this worker's own: the Flink operator calling us is synchronous.
        self.loop = asyncio.new_event_loop()
        self.store = RedisStore(store_url, prefix=store_prefix, timeout_s=5.0)
        self.refreshed = 0

    def refresh(self, new_events: Sequence[NewEvent]) -> int:
        """Refresh the lists of the users of ``new_events``; returns how many."""
        if not new_events:
            return 0
        user, item, reward, ts, event_id = zip(*new_events, strict=True)
        new = pl.DataFrame(
            {
                "event_id": list(event_id),
                "user_id": list(user),
                "item_id": list(item),
                "ts": list(ts),
                "reward": list(reward),
            },
            schema={k: EVENT_SCHEMA[k] for k in ("event_id", "user_id", "item_id", "ts", "reward")},
        )
        users = new["user_id"].unique(maintain_order=True).to_list()
        recent = self.loop.run_until_complete(self.store.get_recent(users, n=self.recent_len))
        recs = self.recommender.recommend(recent)
        previous = self.log.previous_lists(users)
        rows = recommendation_rows(recs, new, realised_rewards(previous, new))
        self.log.append_recommendations(rows)
        lists = {
            u: list(zip(i, s, strict=True))
            for u, i, s in zip(recs.users, recs.items, recs.scores, strict=True)
        }
        self.loop.run_until_complete(
            self.store.set_recommendations(lists, model_version=recs.model_version)
        )
        self.refreshed += len(users)
        return len(users)

    def close(self) -> None:
        self.loop.run_until_complete(self.store.close())
        self.loop.close()
        self.log.dispose()
