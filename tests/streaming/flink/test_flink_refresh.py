"""The Flink job's recent-list push and recommendation refresh, without a JVM: the job's
own functions (:func:`job.push_lists`, :func:`job.kept_events`) and
:class:`~recloop.streaming.flink.refresh.FlinkRefresh` on the shared Redis (a prefix of the
test's own) and a SQLite log, fed what the job's Top-N would give them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from recloop.stores import RedisStore
from recloop.stores.redis import RECENT_PUSH_SCRIPT
from recloop.streaming.flink import job
from recloop.streaming.flink.refresh import FlinkRefresh
from recloop.streaming.log import BehaviorLog

pytestmark = pytest.mark.integration

ITEMS = [f"i{k}" for k in range(1, 21)]


def blob(*events: tuple[int, str, str, float]) -> str:
    """A user's list as recent_query's JSON: [ts, event id, item, reward] per event."""
    return json.dumps([list(e) for e in events])


def test_kept_events_dedupes_orders_and_caps() -> None:
    raw = blob((5, "b", "i2", 1.0), (3, "a", "i1", 2.0), (5, "b", "i2", 1.0), (5, "a2", "i3", 0.0))
    assert job.kept_events(raw, 10) == [
        [3, "a", "i1", 2.0],
        [5, "a2", "i3", 0.0],
        [5, "b", "i2", 1.0],
    ]
    assert job.kept_events(raw, 2) == [[5, "a2", "i3", 0.0], [5, "b", "i2", 1.0]]


@pytest.fixture
def redis_client(redis_url: str, names: dict[str, str]) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(f"{names['store_prefix']}*"):
        client.delete(key)
    client.close()


def test_push_returns_only_the_events_it_added(
    redis_client: Any, names: dict[str, str], redis_url: str
) -> None:
    sha = redis_client.script_load(job.RECENT_PUSH_SCRIPT)
    prefix = names["store_prefix"]
    first = {"u1": blob((1, "a", "i1", 1.0), (2, "b", "i2", 0.5)), "u2": blob((1, "c", "i3", 1.0))}
    assert job.push_lists(redis_client, sha, prefix, 3, first) == [
        ("u1", "i1", 1.0, 1, "a"),
        ("u1", "i2", 0.5, 2, "b"),
        ("u2", "i3", 1.0, 1, "c"),
    ]
    # The same lists again (a replay): nothing new.  A longer list: only its new event.
    assert job.push_lists(redis_client, sha, prefix, 3, first) == []
    more = {"u1": blob((1, "a", "i1", 1.0), (2, "b", "i2", 0.5), (4, "d", "i4", 2.0))}
    assert job.push_lists(redis_client, sha, prefix, 3, more) == [("u1", "i4", 2.0, 4, "d")]

    async def read() -> dict[str, list[tuple[str, float]]]:
        store = RedisStore(redis_url, prefix=prefix)
        try:
            return await store.get_recent(["u1", "u2"], n=3)
        finally:
            await store.close()

    # What the store's own reader sees: the job writes the store's format.
    assert asyncio.run(read()) == {
        "u1": [("i1", 1.0), ("i2", 0.5), ("i4", 2.0)],
        "u2": [("i3", 1.0)],
    }
    assert job.RECENT_PUSH_SCRIPT == RECENT_PUSH_SCRIPT


def test_refresh_logs_realised_reward_of_the_previous_list_once(
    redis_client: Any, names: dict[str, str], redis_url: str, tmp_path: Path, make_artifact: Any
) -> None:
    prefix = names["store_prefix"]
    art = make_artifact(tmp_path / "art", user_ids=["u1", "u2", "u3"], item_ids=ITEMS)
    refresh = FlinkRefresh(
        artifact=art,
        database_url=f"sqlite:///{tmp_path / 'log.db'}",
        table_prefix="",
        store_url=redis_url,
        store_prefix=prefix,
        recent_len=10,
        rec_n=5,
    )
    log = BehaviorLog(f"sqlite:///{tmp_path / 'log.db'}")
    sha = redis_client.script_load(job.RECENT_PUSH_SCRIPT)
    try:
        u1 = [(100, "a1", "i1", 1.0), (102, "a3", "i3", 1.0)]
        lists = {"u1": blob(*u1), "u2": blob((101, "a2", "i2", 1.0))}
        assert refresh.refresh(job.push_lists(redis_client, sha, prefix, 10, lists)) == 2
        hist = log.read_recommendations()
        assert hist["user_id"].to_list() == ["u1", "u2"]
        assert hist["ts"].to_list() == [102, 101]
        assert hist["realised_reward"].to_list() == [None, None]
        first = {u: orjson.loads(x) for u, x in zip(hist["user_id"], hist["items"], strict=True)}
        assert len(first["u1"]) == 5 and not {"i1", "i3"} & set(first["u1"])
        stored = redis_client.get(f"{prefix}recs:u1")
        assert [i for i, _ in orjson.loads(stored)["items"]] == first["u1"]

        # u1 consumes two items of its list (rewards 2 and 0.5) and one other; u2 nothing of
        # its list; u3 is new.
        other = next(i for i in ITEMS if i not in first["u1"] and i not in {"i1", "i3"})
        miss = next(i for i in ITEMS if i not in first["u2"] and i != "i2")
        u1 += [(200, "b1", first["u1"][0], 2.0), (201, "b2", other, 7.0)]
        u1 += [(202, "b3", first["u1"][3], 0.5)]
        lists = {
            "u1": blob(*u1),
            "u2": blob((101, "a2", "i2", 1.0), (203, "b4", miss, 4.0)),
            "u3": blob((204, "b5", "i9", 1.0)),
        }
        assert refresh.refresh(job.push_lists(redis_client, sha, prefix, 10, lists)) == 3
        # The same lists again (a replay after a restore): no new event, no refresh, so the
        # realised rewards are counted once.
        assert refresh.refresh(job.push_lists(redis_client, sha, prefix, 10, lists)) == 0
        hist = log.read_recommendations()
        assert hist.height == 5
        new = {r["user_id"]: r for r in hist[2:].iter_rows(named=True)}
        assert (new["u1"]["realised_reward"], new["u1"]["hits"]) == (2.5, 2)
        assert (new["u2"]["realised_reward"], new["u2"]["hits"]) == (0.0, 0)
        assert (new["u3"]["realised_reward"], new["u3"]["hits"]) == (None, None)
        consumed = {"i1", "i3", first["u1"][0], other, first["u1"][3]}
        assert not consumed & set(orjson.loads(new["u1"]["items"]))
    finally:
        refresh.close()
        log.dispose()
