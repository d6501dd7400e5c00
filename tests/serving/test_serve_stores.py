"""One contract suite for every online store: memory, SQLite and (integration) Redis."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from serve_helpers import as_recent

from recloop.errors import ConfigError
from recloop.stores import (
    MemoryStore,
    OnlineStore,
    RecentItem,
    RedisStore,
    SqliteStore,
    StoreDataError,
    StoreError,
    check_store,
    check_store_url,
    open_store,
    sqlite_path,
)

REDIS_URL = os.environ.get("RECLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.integration)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OnlineStore]:
    kind = request.param
    if kind == "memory":
        s: OnlineStore = open_store("memory://")
    elif kind == "sqlite":
        s = open_store(f"sqlite:///{tmp_path}/store.db")
    else:
        s = open_store(REDIS_URL, prefix=f"recloop-test:{uuid.uuid4().hex}:")
        if not await s.ping():
            await s.close()
            pytest.skip(f"no Redis at {REDIS_URL}")
    yield s
    if isinstance(s, RedisStore):
        await s.delete_all()
    await s.close()


async def test_recent_appends_caps_and_orders_oldest_first(store: OnlineStore) -> None:
    await store.push_recent(
        as_recent({"u1": [("a", 1.0), ("b", 0.5)], "u2": [("x", 2.0)]}), max_len=3
    )
    await store.push_recent(as_recent({"u1": [("c", 0.0), ("d", -1.5)]}), max_len=3)
    got = await store.get_recent(["u1", "u2", "nobody"], n=10)
    assert got == {"u1": [("b", 0.5), ("c", 0.0), ("d", -1.5)], "u2": [("x", 2.0)], "nobody": []}
    assert await store.get_recent(["u1"], n=2) == {"u1": [("c", 0.0), ("d", -1.5)]}
    assert await store.get_recent(["u1"], n=0) == {"u1": []}
    assert await store.get_recent([], n=5) == {}


async def test_recent_one_push_longer_than_cap_keeps_its_tail(store: OnlineStore) -> None:
    await store.push_recent(as_recent({"u": [(str(i), float(i)) for i in range(10)]}), max_len=4)
    assert await store.get_recent(["u"], n=100) == {
        "u": [("6", 6.0), ("7", 7.0), ("8", 8.0), ("9", 9.0)]
    }


async def test_odd_ids_round_trip(store: OnlineStore) -> None:
    odd = ["with space", "ünïcødé 🎬", "colon:in:id", "", " lead", "1.5 2"]
    await store.push_recent(as_recent({"user with space ü": [(i, 1.0) for i in odd]}), max_len=10)
    got = await store.get_recent(["user with space ü"], n=10)
    assert got["user with space ü"] == [(i, 1.0) for i in odd]


async def test_recent_is_in_event_time_order_whatever_the_push_order(
    store: OnlineStore,
) -> None:
    """Two workers finishing their batches out of order leave the event-time order."""
    late_batch = {"u": [RecentItem("c", 3.0, 30, "e3"), RecentItem("d", 4.0, 40, "e4")]}
    early_batch = {"u": [RecentItem("a", 1.0, 10, "e1"), RecentItem("b", 2.0, 20, "e2")]}
    await store.push_recent(late_batch, max_len=3)
    await store.push_recent(early_batch, max_len=3)
    assert await store.get_recent(["u"], n=10) == {"u": [("b", 2.0), ("c", 3.0), ("d", 4.0)]}
    # an event older than everything kept falls off at once
    await store.push_recent({"u": [RecentItem("z", 9.0, 5, "e0")]}, max_len=3)
    assert await store.get_recent(["u"], n=10) == {"u": [("b", 2.0), ("c", 3.0), ("d", 4.0)]}


async def test_recent_is_idempotent_by_event_id(store: OnlineStore) -> None:
    """A batch delivered twice (a worker died before its ack) is kept once; equal event
    times order by event id; the same item in two events is two entries."""
    batch = {
        "u": [
            RecentItem("x", 1.0, 7, "ev-2"),
            RecentItem("x", 1.0, 7, "ev-1"),
            RecentItem("id with space", 0.5, 8, "odd id ü 1"),
        ]
    }
    await store.push_recent(batch, max_len=10)
    await store.push_recent(batch, max_len=10)
    assert await store.get_recent(["u"], n=10) == {
        "u": [("x", 1.0), ("x", 1.0), ("id with space", 0.5)]
    }


async def test_equal_event_times_order_by_event_id_in_every_store(store: OnlineStore) -> None:
    """Ties break by event id in code-point order ("ml-10" < "ml-9"), the same in every
    store, so every store keeps the same events when it caps the list."""
    same = [RecentItem("b", 1.0, 5, "ml-9"), RecentItem("a", 1.0, 5, "ml-10")]
    await store.push_recent({"u": same, "v": same}, max_len=2)
    assert (await store.get_recent(["u"], n=5))["u"] == [("a", 1.0), ("b", 1.0)]
    await store.push_recent({"w": same}, max_len=1)
    assert (await store.get_recent(["w"], n=5))["w"] == [("b", 1.0)]
    long_ids = [RecentItem("x", 1.0, 5, "1234567890"), RecentItem("y", 1.0, 5, "123456789")]
    await store.push_recent({"z": long_ids}, max_len=5)
    assert (await store.get_recent(["z"], n=5))["z"] == [("y", 1.0), ("x", 1.0)]


async def test_first_version_of_an_event_wins(store: OnlineStore) -> None:
    """An event id seen again with another item or reward keeps its first version (as the
    behaviour log does); it never becomes two entries."""
    await store.push_recent({"u": [RecentItem("a", 1.0, 7, "e1")]}, max_len=5)
    await store.push_recent(
        {"u": [RecentItem("a", 2.0, 7, "e1"), RecentItem("b", 1.0, 7, "e1")]}, max_len=5
    )
    assert (await store.get_recent(["u"], n=5))["u"] == [("a", 1.0)]
    await store.push_recent(
        {"v": [RecentItem("c", 3.0, 9, "e2"), RecentItem("d", 4.0, 9, "e2")]}, max_len=5
    )
    assert (await store.get_recent(["v"], n=5))["v"] == [("c", 3.0)]


async def test_empty_push_is_a_no_op(store: OnlineStore) -> None:
    await store.push_recent(as_recent({}), max_len=3)
    await store.push_recent(as_recent({"u": []}), max_len=3)
    assert await store.get_recent(["u"], n=3) == {"u": []}


async def test_bad_max_len_raises(store: OnlineStore) -> None:
    with pytest.raises(ValueError, match="max_len"):
        await store.push_recent(as_recent({"u": [("a", 1.0)]}), max_len=0)


async def test_popular_replaces_and_slices(store: OnlineStore) -> None:
    assert await store.get_popular(5) == []
    await store.set_popular([("a", 9.0), ("b", 7.0), ("c", 3.0)])
    assert await store.get_popular(2) == [("a", 9.0), ("b", 7.0)]
    await store.set_popular([("z", 1.0)])
    assert await store.get_popular(10) == [("z", 1.0)]
    assert await store.get_popular(0) == []
    await store.set_popular([])
    assert await store.get_popular(3) == []


async def test_recommendations_latest_wins(store: OnlineStore) -> None:
    assert await store.get_recommendations("u") is None
    await store.set_recommendations({"u": [("a", 0.9), ("b", 0.1)], "v": []}, model_version="m1")
    assert await store.get_recommendations("u") == ([("a", 0.9), ("b", 0.1)], "m1")
    assert await store.get_recommendations("v") == ([], "m1")
    await store.set_recommendations({"u": [("c", 0.5)]}, model_version="m2")
    assert await store.get_recommendations("u") == ([("c", 0.5)], "m2")
    await store.set_recommendations({}, model_version="m3")


async def test_ping(store: OnlineStore) -> None:
    assert await store.ping() is True


async def test_sqlite_shared_by_two_connections(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    a, b = open_store(url), open_store(url)
    await asyncio.gather(
        *[a.push_recent(as_recent({"u": [(f"a{i}", 1.0)]}), max_len=50) for i in range(10)],
        *[b.push_recent(as_recent({"u": [(f"b{i}", 1.0)]}), max_len=50) for i in range(10)],
    )
    got = (await b.get_recent(["u"], n=50))["u"]
    assert sorted(i for i, _ in got) == sorted(
        [f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)]
    )
    await a.set_popular([("p", 1.0)])
    assert await b.get_popular(1) == [("p", 1.0)]
    await a.close()
    await b.close()


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store("memory://"), MemoryStore)
    assert isinstance(open_store("redis://127.0.0.1:6379/0"), RedisStore)
    s = open_store(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(s, SqliteStore) and s.path == f"{tmp_path}/x.db"
    assert sqlite_path("sqlite:///rel/a.db") == "rel/a.db"
    assert sqlite_path("sqlite:////abs/a.db") == "/abs/a.db"
    with pytest.raises(ConfigError, match="unsupported scheme 'mongodb'"):
        open_store("mongodb://x")
    with pytest.raises(ConfigError, match="no database file"):
        open_store("sqlite:///")


async def test_redis_down_raises_store_error_fast() -> None:
    s = open_store("redis://127.0.0.1:1/0", timeout_s=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await s.ping() is False
    with pytest.raises(StoreError, match="get_recent failed"):
        await s.get_recent(["u"], n=3)
    with pytest.raises(StoreError, match="set_popular failed"):
        await s.set_popular([("a", 1.0)])
    assert loop.time() - t0 < 2.0
    await s.close()


async def test_sqlite_unwritable_path_raises_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    s = open_store(f"sqlite:///{tmp_path}/file/sub/db.sqlite")
    assert await s.ping() is False
    with pytest.raises(StoreError, match="sqlite store"):
        await s.get_popular(3)
    await s.close()


@pytest.mark.integration
async def test_redis_recent_payloads_are_trimmed_with_the_list() -> None:
    store = RedisStore(REDIS_URL, prefix=f"recloop-test:{uuid.uuid4().hex}:")
    if not await store.ping():
        await store.close()
        pytest.skip(f"no Redis at {REDIS_URL}")
    events = [RecentItem(f"i{k}", 1.0, k, f"e{k:02d}") for k in range(10)]
    await store.push_recent({"u": events[:6]}, max_len=4)
    await store.push_recent({"u": events[6:]}, max_len=4)
    ids, payloads = store._recent_keys("u")
    assert await store._client.zcard(ids) == 4
    try:
        assert sorted(await store._client.hkeys(payloads)) == [b"e06", b"e07", b"e08", b"e09"]
    finally:
        await store.delete_all()
        await store.close()


@pytest.mark.integration
async def test_redis_recent_survives_a_script_flush_and_long_lists() -> None:
    """Scripts lost by the server are loaded again; a list longer than Lua's unpack limit
    (about 8,000 values) is read in chunks."""
    store = RedisStore(REDIS_URL, prefix=f"recloop-test:{uuid.uuid4().hex}:")
    if not await store.ping():
        await store.close()
        pytest.skip(f"no Redis at {REDIS_URL}")
    try:
        many = [RecentItem(f"i{k}", 1.0, k, f"e{k:05d}") for k in range(9000)]
        await store._client.script_flush()
        await store.push_recent({"u": many, "v": many[:2]}, max_len=9000)
        await store._client.script_flush()
        got = await store.get_recent(["u", "v"], n=9000)
        assert [i for i, _ in got["u"]] == [f"i{k}" for k in range(9000)]
        assert got["v"] == [("i0", 1.0), ("i1", 1.0)]
        await store._client.script_flush()
        assert (await store.get_recent(["v"], n=1)) == {"v": [("i1", 1.0)]}
    finally:
        await store.delete_all()
        await store.close()


@pytest.mark.integration
async def test_redis_reads_many_users_in_calls_of_a_few_hundred() -> None:
    """A batch longer than one read call holds (``READ_MANY_USERS``) is split; every user
    gets its own list, users without one get [], and a payload deleted behind the sorted
    set's back is skipped, not shifted onto the next user."""
    from recloop.stores.redis import READ_MANY_USERS

    store = RedisStore(REDIS_URL, prefix=f"recloop-test:{uuid.uuid4().hex}:")
    if not await store.ping():
        await store.close()
        pytest.skip(f"no Redis at {REDIS_URL}")
    users = [f"u{k}" for k in range(READ_MANY_USERS + 40)]
    try:
        await store.push_recent(
            {
                u: [
                    RecentItem(f"{u}-a", 1.0, 1, f"{u}-e1"),
                    RecentItem(f"{u}-b", 0.5, 2, f"{u}-e2"),
                ]
                for u in users[::2]
            },
            max_len=5,
        )
        _, payloads = store._recent_keys("u2")
        await store._client.hdel(payloads, "u2-e1")
        got = await store.get_recent([*users, "nobody"], n=5)
        assert got["u0"] == [("u0-a", 1.0), ("u0-b", 0.5)]
        assert got["u2"] == [("u2-b", 0.5)]
        assert got[users[-2]] == [(f"{users[-2]}-a", 1.0), (f"{users[-2]}-b", 0.5)]
        assert all(got[u] == [] for u in users[1::2]) and got["nobody"] == []
        assert len(got) == len(users) + 1
    finally:
        await store.delete_all()
        await store.close()


def test_check_store_url_names_what_is_wrong() -> None:
    assert check_store_url(None) == "memory"
    assert check_store_url("redis://127.0.0.1:6379/0") == "redis"
    assert check_store_url("sqlite:////tmp/a.db") == "sqlite"
    for url, why in [
        ("foo://bar", "unsupported scheme 'foo'"),
        ("localhost:6379", "unsupported scheme 'localhost'"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("sqlite:///", "no database file"),
    ]:
        with pytest.raises(ConfigError, match=why):
            check_store_url(url)


async def test_check_store_refuses_a_sqlite_directory_that_does_not_exist(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path}/missing/store.db")
    with pytest.raises(StoreError, match="missing does not exist"):
        await check_store(s)
    assert not (tmp_path / "missing").exists()  # and does not create it
    await s.close()
    s = open_store(f"sqlite:///{tmp_path}/store.db")
    await check_store(s)
    await s.close()
    await check_store(MemoryStore())


async def test_check_store_reports_why_redis_cannot_be_used() -> None:
    s = open_store("redis://127.0.0.1:1/0", timeout_s=0.2)
    with pytest.raises(StoreError, match=r"redis store .*: connect failed"):
        await check_store(s)
    await s.close()


@pytest.mark.integration
async def test_check_store_refuses_a_redis_database_out_of_range() -> None:
    probe = open_store(REDIS_URL)
    if not await probe.ping():
        await probe.close()
        pytest.skip(f"no Redis at {REDIS_URL}")
    await probe.close()
    s = open_store(REDIS_URL.rsplit("/", 1)[0] + "/99")
    with pytest.raises(StoreError, match="DB index is out of range"):
        await check_store(s)
    await s.close()


async def test_sqlite_corrupt_popular_is_a_data_error_not_an_outage(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "s.db")
    await s.set_popular([("a", 1.0)])
    for garbage in ["{not json", '{"a": 1}', "[[1, 2, 3]]", '[["a", "x"]]', "5"]:
        conn = sqlite3.connect(tmp_path / "s.db")
        conn.execute("UPDATE recloop_popular SET items = ? WHERE id = 0", (garbage,))
        conn.commit()
        conn.close()
        with pytest.raises(StoreDataError, match="key 'recloop_popular'"):
            await s.get_popular(3)
    assert await s.ping()
    await s.close()


@pytest.mark.integration
async def test_redis_corrupt_values_are_data_errors_naming_the_key() -> None:
    store = RedisStore(REDIS_URL, prefix=f"recloop-test:{uuid.uuid4().hex}:")
    if not await store.ping():
        await store.close()
        pytest.skip(f"no Redis at {REDIS_URL}")
    try:
        key = f"{store.prefix}popular"
        for garbage in [b"\xff\xfe garbage", b'{"a": 1}', b"[[1]]"]:
            await store._client.set(key, garbage)
            with pytest.raises(StoreDataError, match=f"key '{key}'"):
                await store.get_popular(3)
        await store.push_recent({"u": [RecentItem("a", 1.0, 1, "e1")]}, max_len=3)
        _, payloads = store._recent_keys("u")
        await store._client.hset(payloads, "e1", b"no-space-here")
        with pytest.raises(StoreDataError, match="recent_ev"):
            await store.get_recent(["u"], n=3)
        await store._client.set(f"{store.prefix}recs:u", b"[]")
        with pytest.raises(StoreDataError, match="recs:u"):
            await store.get_recommendations("u")
    finally:
        await store.delete_all()
        await store.close()


# ----------------------------------------------------------------------------- heartbeats


async def test_heartbeats_latest_per_name_and_stale_ones_dropped(store: OnlineStore) -> None:
    import time

    now = time.time()
    assert await store.get_heartbeats(max_age_s=60) == {}
    await store.put_heartbeat("w-1", {"ts": now - 5, "events_per_s": 10.0})
    await store.put_heartbeat("w-1", {"ts": now, "events_per_s": 12.5, "lag_s": None})
    await store.put_heartbeat("w-2", {"ts": now - 120, "events_per_s": 3.0})
    got = await store.get_heartbeats(max_age_s=60)
    assert got == {"w-1": {"ts": now, "events_per_s": 12.5, "lag_s": None}}
    # the stale record is gone for good, not only hidden from this reader
    assert await store.get_heartbeats(max_age_s=3600) == got


async def test_heartbeat_needs_a_timestamp(store: OnlineStore) -> None:
    with pytest.raises(ValueError, match="'ts'"):
        await store.put_heartbeat("w", {"events_per_s": 1.0})
