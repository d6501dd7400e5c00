"""Hostile events against the real databases: one bad event never takes good ones with it,
ids are compared byte for byte, rewards are doubles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
import sqlalchemy as sa

from recloop.stores import MemoryStore
from recloop.streaming.bus import MemoryBus
from recloop.streaming.events import EVENT_SCHEMA, BusMessage
from recloop.streaming.log import BehaviorLog
from recloop.streaming.runner import run_worker_async
from recloop.streaming.settings import StreamSettings


def settings(names: dict[str, str], **kw: Any) -> StreamSettings:
    base: dict[str, Any] = {
        "stream": names["stream"],
        "group": names["group"],
        "batch_size": 100,
        "block_ms": 50,
        "exit_when_idle_s": 0.3,
        "popular_refresh_s": 0.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.4,
        "allowed_lateness_s": None,
    }
    base.update(kw)
    return StreamSettings(**base)


def event(i: int, **kw: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "user_id": f"u{i % 3}",
        "item_id": f"i{i % 4}",
        "ts": 1000 + i,
    } | kw


def frame(events: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(events, schema=EVENT_SCHEMA)


async def test_one_bad_event_in_a_batch_costs_only_itself(
    log: BehaviorLog, names: dict[str, str]
) -> None:
    """20 good events and one with a NUL in its id, in one batch: 20 logged, 1 dead letter
    (PostgreSQL used to refuse the whole batch: 0 logged, 21 dead letters)."""
    good = [event(i, reward=1.0) for i in range(20)]
    bad = event(99, event_id="bad\x00id")
    payloads = [orjson.dumps(e) for e in [*good[:10], bad, *good[10:]]]
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(payloads)
    stats = await run_worker_async(settings(names), bus=bus, store=MemoryStore(), log=log)
    assert (stats.logged, stats.dead_letters) == (20, 1)
    assert sorted(log.read_events()["event_id"].to_list()) == sorted(e["event_id"] for e in good)
    assert log.bucket_table()["events"].sum() == 20
    (letter,) = await bus.read_dead_letters()
    assert letter.source_id == "11-0" and letter.payload == payloads[10]
    assert letter.reason == (
        "event_id: contains a NUL character (U+0000), which the SQL log cannot store"
    )
    assert await bus.pending_count(names["group"]) == 0


# A row that gets past validation (the log is called directly) and that the database
# itself refuses: PostgreSQL text cannot hold NUL; MySQL has no infinity.
REFUSED = {
    "postgresql": ({"event_id": "bad\x00id"}, "UntranslatableCharacter"),
    "mysql": ({"reward": float("inf")}, "ProgrammingError"),
}


def test_log_isolates_the_rows_the_database_refuses(log: BehaviorLog) -> None:
    if log.backend not in REFUSED:
        pytest.skip("SQLite stores both")
    change, error = REFUSED[log.backend]
    rows = [event(i, reward=1.0) for i in range(20)]
    rows.insert(7, event(50, reward=1.0) | change)
    result = log.append(frame(rows), slide_s=80)
    assert result.new.height == 20 and result.duplicates == 0
    assert [row for row, _ in result.rejected] == [7]
    assert result.rejected[0][1].startswith(error)
    assert log.count() == 20 and log.bucket_table()["events"].sum() == 20
    # Redelivered, the good rows are duplicates and the bad one is refused again.
    again = log.append(frame(rows), slide_s=80)
    assert again.new.height == 0 and again.duplicates == 20 and len(again.rejected) == 1


class Refusing(BehaviorLog):
    """Refuses (as a database would, for the data) any batch holding a 'poison' item, and
    counts its transactions."""

    statements = 0

    def _append_once(self, frame: pl.DataFrame, *, slide_s: int) -> list[str]:
        self.statements += 1
        if "poison" in frame["item_id"].to_list():
            raise sa.exc.DataError("INSERT", {}, Exception("value out of range"))
        return super()._append_once(frame, slide_s=slide_s)


def test_clean_batch_is_one_statement_and_a_bad_row_costs_about_two_per_halving(
    tmp_path: Path,
) -> None:
    log = Refusing(f"sqlite:///{tmp_path / 'log.db'}")
    rows = [event(i) for i in range(64)]
    log.append(frame(rows), slide_s=80)
    assert log.statements == 1
    log.statements = 0
    rows = [event(i) for i in range(100, 164)]
    rows[37] = rows[37] | {"item_id": "poison"}
    result = log.append(frame(rows), slide_s=80)
    assert [r for r, _ in result.rejected] == [37] and result.new.height == 63
    assert log.statements == 1 + 2 * 6  # the batch, then both halves at each of 6 levels


def test_connection_errors_are_raised_not_bisected(tmp_path: Path) -> None:
    class Down(Refusing):
        def _append_once(self, frame: pl.DataFrame, *, slide_s: int) -> list[str]:
            self.statements += 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("connection refused"))

    log = Down(f"sqlite:///{tmp_path / 'log.db'}")
    with pytest.raises(sa.exc.OperationalError):
        log.append(frame([event(i) for i in range(8)]), slide_s=80)
    assert log.statements == 1


async def test_worker_dead_letters_only_the_refused_events_with_their_bytes(
    tmp_path: Path, names: dict[str, str]
) -> None:
    payloads = [orjson.dumps(event(i)) for i in range(10)]
    payloads[3] = orjson.dumps(event(3, item_id="poison"))
    payloads[8] = orjson.dumps(event(8, item_id="poison"))
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(payloads)
    log = Refusing(f"sqlite:///{tmp_path / 'log.db'}")
    stats = await run_worker_async(settings(names), bus=bus, store=MemoryStore(), log=log)
    assert (stats.logged, stats.dead_letters) == (8, 2)
    letters = await bus.read_dead_letters()
    assert [(d.source_id, d.payload) for d in letters] == [
        ("4-0", payloads[3]),
        ("9-0", payloads[8]),
    ]
    assert all(
        d.reason == "behaviour log refused the event: Exception: value out of range"
        for d in letters
    )
    assert await bus.pending_count(names["group"]) == 0


def test_ids_differing_in_case_accents_or_trailing_spaces_are_different_events(
    log: BehaviorLog,
) -> None:
    ids = ["Order-1", "order-1", "ordér-1", "order-1 "]
    rows = [event(i, event_id=x, user_id=x, item_id=x) for i, x in enumerate(ids)]
    result = log.append(frame(rows), slide_s=80)
    assert result.new.height == 4 and result.duplicates == 0
    stored = log.read_events()
    assert sorted(stored["event_id"].to_list()) == sorted(ids)
    assert sorted(stored["user_id"].to_list()) == sorted(ids)
    # The window counts keep the four items apart too.
    assert sorted(log.bucket_table()["item_id"].to_list()) == sorted(ids)
    assert log.as_logged(frame(rows)).height == 4


def test_rating_and_reward_round_trip_as_doubles(log: BehaviorLog) -> None:
    value = 0.1 + 2**-40  # differs from 0.1 beyond single precision
    log.append(frame([event(1, rating=value, reward=value)]), slide_s=80)
    stored = log.read_events()
    assert stored["rating"].to_list() == [value] and stored["reward"].to_list() == [value]
    rec = pl.DataFrame(
        {
            "user_id": ["u"],
            "ts": [1],
            "model_version": ["m"],
            "items": ["[]"],
            "scores": ["[]"],
            "realised_reward": [value],
            "hits": [0],
        }
    )
    log.append_recommendations(rec)
    assert log.read_recommendations()["realised_reward"].to_list() == [value]


@pytest.mark.integration
def test_every_mariadb_string_key_is_binary_and_every_reward_double(
    mariadb_log: BehaviorLog,
) -> None:
    log = mariadb_log
    log.create_schema()
    t = log.tables
    with log.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT table_name, column_name, collation_name, data_type "
                "FROM information_schema.columns WHERE table_schema = DATABASE() "
                "AND table_name IN (:a, :b, :c)"
            ),
            {"a": t.behavior.name, "b": t.recommendations.name, "c": t.popular.name},
        ).all()
    cols = {(str(r[0]), str(r[1])): (r[2], str(r[3]).lower()) for r in rows}
    keys = [
        (t.behavior.name, "event_id"),
        (t.behavior.name, "user_id"),
        (t.behavior.name, "item_id"),
        (t.recommendations.name, "user_id"),
        (t.popular.name, "item_id"),
    ]
    assert {k: cols[k][0] for k in keys} == dict.fromkeys(keys, "utf8mb4_nopad_bin")
    floats = [
        (t.behavior.name, "rating"),
        (t.behavior.name, "reward"),
        (t.recommendations.name, "realised_reward"),
    ]
    assert {k: cols[k][1] for k in floats} == dict.fromkeys(floats, "double")


def test_bus_message_order_maps_rejected_rows_back(tmp_path: Path) -> None:
    """Rows refused by the log are found in the batch even when validation dropped others
    before them (the event rows are a subset of the messages)."""
    from recloop.streaming.events import parse_batch

    msgs = [
        BusMessage("1-0", b"garbage"),
        BusMessage("2-0", orjson.dumps(event(2))),
        BusMessage("3-0", orjson.dumps(event(3, ts=-1))),
        BusMessage("4-0", orjson.dumps(event(4, item_id="poison"))),
    ]
    parsed = parse_batch(msgs)
    assert parsed.message_index().tolist() == [1, 3]
    result = Refusing(f"sqlite:///{tmp_path / 'log.db'}").append(parsed.events, slide_s=80)
    assert [msgs[int(parsed.message_index()[r])].id for r, _ in result.rejected] == ["4-0"]
