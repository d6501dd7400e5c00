"""Served lists through the stream processor, and the attribution of feedback to them:
explicit recommendation ids, the time window, out-of-order and duplicated deliveries."""

from __future__ import annotations

import random
import re
from typing import Any

import orjson
import polars as pl
import pytest

from recloop.stores import MemoryStore
from recloop.streaming.bus import MemoryBus
from recloop.streaming.events import EVENT_SCHEMA, BusMessage, parse_batch
from recloop.streaming.log import BehaviorLog
from recloop.streaming.runner import run_worker_async
from recloop.streaming.served import attribute, encode_served, served_rows
from recloop.streaming.settings import StreamSettings

WINDOW = 1800


def served(rid: str, user: str, ts: int, items: list[str]) -> dict[str, Any]:
    return {
        "recommendation_id": rid,
        "user_id": user,
        "ts": ts,
        "model_version": "m1",
        "policy": "softmax",
        "temperature": 0.5,
        "epsilon": None,
        "seed": 7,
        "source": "policy",
        "slate_propensity": 0.5 ** len(items),
        "items": items,
        "scores": [1.0] * len(items),
        "propensities": [0.5] * len(items),
    }


LISTS = [
    served("r1", "u1", 1000, ["a", "b", "c"]),
    served("r2", "u1", 1500, ["b", "d"]),
    served("r3", "u2", 1000, ["a"]),
]
EVENTS: list[dict[str, Any]] = [
    # no id: the latest list that showed u1 item b before it (r2, not r1)
    {"event_id": "e1", "user_id": "u1", "item_id": "b", "ts": 1600, "reward": 1.0},
    # names its list: r1's a, although e6 came earlier in the window too
    {"event_id": "e2", "user_id": "u1", "item_id": "a", "ts": 1100, "reward": 2.0,
     "recommendation_id": "r1"},
    # c was shown at 1000: 1000 + 1800 < 2900, outside the window
    {"event_id": "e3", "user_id": "u1", "item_id": "c", "ts": 2900, "reward": 5.0},
    # names a list that is not u2's: falls back to the window (r3)
    {"event_id": "e4", "user_id": "u2", "item_id": "a", "ts": 1200, "reward": 3.0,
     "recommendation_id": "r1"},
    # no reward: counts as 1
    {"event_id": "e5", "user_id": "u1", "item_id": "d", "ts": 1700},
    {"event_id": "e6", "user_id": "u1", "item_id": "a", "ts": 1050, "reward": 4.0},
]  # fmt: skip
EXPECTED = {  # (recommendation_id, position) -> (event_id, reward, attributed_by)
    ("r1", 0): ("e2", 2.0, "id"),
    ("r1", 1): (None, 0.0, None),
    ("r1", 2): (None, 0.0, None),
    ("r2", 0): ("e1", 1.0, "window"),
    ("r2", 1): ("e5", 1.0, "window"),
    ("r3", 0): ("e4", 3.0, "window"),
}


def impressions() -> pl.DataFrame:
    return served_rows(LISTS).select("recommendation_id", "position", "user_id", "item_id", "ts")


def event_frame(events: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            (
                e["event_id"],
                e["user_id"],
                e["item_id"],
                e["ts"],
                e.get("reward"),
                e.get("recommendation_id"),
            )
            for e in events
        ],
        schema={
            "event_id": pl.String,
            "user_id": pl.String,
            "item_id": pl.String,
            "ts": pl.Int64,
            "reward": pl.Float64,
            "recommendation_id": pl.String,
        },
        orient="row",
    )


def as_dict(frame: pl.DataFrame) -> dict[tuple[str, int], tuple[Any, ...]]:
    return {
        (r["recommendation_id"], r["position"]): (r["event_id"], r["reward"], r["attributed_by"])
        for r in frame.iter_rows(named=True)
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attribute_is_a_function_of_the_events_not_their_order_or_copies(seed: int) -> None:
    rng = random.Random(seed)
    events = EVENTS + rng.sample(EVENTS, 3)  # redeliveries
    rng.shuffle(events)
    got = as_dict(attribute(impressions(), event_frame(events), window_s=WINDOW))
    # unsettled: unanswered impressions have no reward yet (null), not 0
    want = {k: (e, None if e is None else r, how) for k, (e, r, how) in EXPECTED.items()}
    assert got == want


def test_served_rows_one_row_per_item_with_positions() -> None:
    rows = served_rows(LISTS)
    assert rows.height == 6
    assert rows.filter(pl.col("recommendation_id") == "r1")["position"].to_list() == [0, 1, 2]
    with pytest.raises(ValueError, match="differ in length"):
        served_rows([{**LISTS[0], "propensities": [0.5]}])


def test_served_rows_keep_a_lists_context_as_json_on_its_first_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = {"recent": ["a", "z"], "rewards": [1.0, 0.0], "excluded": ["a"]}
    rows = served_rows([{**LISTS[0], "context": ctx}, LISTS[1]])
    assert orjson.loads(rows["context"][0]) == ctx
    assert rows["context"][1:].to_list() == [None] * 4  # other positions; a list without one
    # a context of another shape is dropped, named in a warning; the list is kept
    for bad, why in [
        ({**ctx, "rewards": [1.0]}, r"recent and rewards differ in length \(2, 1\)"),
        ({"recent": [], "rewards": []}, "needs the list excluded"),
        (["a"], "must be an object, got list"),
    ]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="recloop.streaming.served"):
            rows = served_rows([{**LISTS[0], "context": bad}])
        assert rows.height == 3 and rows["context"].null_count() == 3
        assert re.search(f"served list 'r1': field 'context' {why}; context dropped", caplog.text)


def test_events_carry_recommendation_ids_apart_and_bad_ones_are_dead_letters() -> None:
    msgs = [BusMessage(str(i), orjson.dumps(e)) for i, e in enumerate(EVENTS)]
    msgs.append(BusMessage("9", b'{"event_id":"x","user_id":"u","item_id":"i","ts":1,'
                                b'"recommendation_id":7}'))  # fmt: skip
    parsed = parse_batch(msgs)
    assert parsed.links is not None
    assert parsed.links.rows() == [("e2", "r1"), ("e4", "r1")]
    assert [d.reason for d in parsed.dead] == ["recommendation_id: expected a string, got int 7"]


def settings(names: dict[str, str], **kw: Any) -> StreamSettings:
    return StreamSettings(
        stream=names["stream"],
        group=names["group"],
        batch_size=3,
        block_ms=20,
        exit_when_idle_s=0.2,
        popular_refresh_s=0.0,
        attribution_window_s=WINDOW,
        **{"allowed_lateness_s": 5000, **kw},
    )


@pytest.mark.parametrize("seed", [0, 1])
async def test_processor_attributes_out_of_order_and_duplicated_deliveries(
    names: dict[str, str], log: BehaviorLog, seed: int
) -> None:
    """Lists and events in a shuffled order with copies, in batches of 3; then one event far
    later moves the watermark past every list, which settles them."""
    rng = random.Random(seed)
    payloads = [encode_served(d) for d in LISTS] + [orjson.dumps(e) for e in EVENTS]
    payloads += rng.sample(payloads, 4)
    rng.shuffle(payloads)
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(payloads)
    s = settings(names)
    stats = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w")
    assert stats.dead_letters == 0
    served_now = log.read_served()
    assert served_now.height == 6 and not served_now["settled"].any()  # not settled yet
    # a late event of another user pushes the watermark: 20000 - 1800 - 5000 > 1500
    await bus.publish(
        [orjson.dumps({"event_id": "z", "user_id": "u9", "item_id": "a", "ts": 20000})]
    )
    stats = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w")
    assert stats.settled == 6
    final = log.read_served()
    assert final["settled"].all()
    assert as_dict(final) == EXPECTED
    # the logged propensities and settings travel with the rows
    assert final["propensity"].to_list() == [0.5] * 6
    assert set(final["policy"]) == {"softmax"} and set(final["seed"]) == {7}


def test_a_served_table_from_before_ab_serving_gets_its_arm_and_context_columns(
    log: BehaviorLog,
) -> None:
    """create_all leaves an existing table alone: the arm and context columns are added by
    ALTER TABLE."""
    import sqlalchemy as sa

    old = sa.MetaData()
    sv = log.tables.served
    added = {"arm", "context"}
    sa.Table(sv.name, old, *[c._copy() for c in sv.columns if c.name not in added])
    old.create_all(log.engine)
    assert not added & {c["name"] for c in sa.inspect(log.engine).get_columns(sv.name)}
    log.create_schema()
    assert added <= {c["name"] for c in sa.inspect(log.engine).get_columns(sv.name)}
    doc = {
        "recommendation_id": "r1",
        "user_id": "u1",
        "ts": 5,
        "model_version": "m",
        "arm": "explore",
        "policy": "topk",
        "source": "policy",
        "slate_propensity": 1.0,
        "items": ["i1"],
        "scores": [0.5],
        "propensities": [1.0],
    }
    log.append_served(served_rows([doc]))
    assert log.read_served()["arm"].to_list() == ["explore"]
    assert log.read_served()["context"].to_list() == [None]  # a service from before context
    fresh = BehaviorLog(log.url, prefix=sv.name.removesuffix("served_items"))
    fresh.create_schema()  # a second process: nothing left to add
    fresh.dispose()


async def test_settled_clicks_and_rewards_are_counted_per_arm_once(
    names: dict[str, str], log: BehaviorLog
) -> None:
    """The worker counts each impression once, when it settles it (its attribution is final
    then), under the arm its list recorded; the heartbeat carries the totals, and the
    service's /metrics text shows them per arm and worker."""
    from recloop.serving.metrics import arm_feedback

    lists = [{**d, "arm": arm} for d, arm in zip(LISTS, ["a", "b", "a"], strict=True)]
    late = {"event_id": "z", "user_id": "u9", "item_id": "a", "ts": 20000}
    bus = MemoryBus(stream=names["stream"])
    await bus.publish([encode_served(d) for d in lists] + [orjson.dumps(e) for e in EVENTS])
    await bus.publish([orjson.dumps(late)])
    store = MemoryStore()
    stats = await run_worker_async(settings(names), bus=bus, store=store, log=log, consumer="w")
    assert stats.settled == 6
    beats = await store.get_heartbeats(max_age_s=60)
    # EXPECTED: a = r1 (3 shown, e2 reward 2) + r3 (1 shown, e4 reward 3); b = r2 (e1, e5)
    assert beats["w"]["arms"] == {
        "a": {"impressions": 4, "clicks": 2, "reward": 5.0},
        "b": {"impressions": 2, "clicks": 2, "reward": 2.0},
    }
    assert log.settle_by_arm(10**9) == {}  # settled rows are never counted again
    text = arm_feedback(beats).decode()
    assert 'recloop_ab_attributed_clicks_total{arm="a",worker="w"} 2.0' in text
    assert 'recloop_ab_attributed_reward_total{arm="b",worker="w"} 2.0' in text
    assert 'recloop_ab_settled_impressions_total{arm="a",worker="w"} 4.0' in text


def test_an_explicit_click_on_an_item_shown_twice_in_its_list_is_one_reward() -> None:
    """The list shows x at positions 0 and 2: the event naming it goes to position 0 only,
    as a window event does."""
    lists = [served("r1", "u1", 0, ["x", "y", "x"])]
    imps = served_rows(lists).select("recommendation_id", "position", "user_id", "item_id", "ts")
    for link in ("r1", None):
        ev = {"event_id": "e", "user_id": "u1", "item_id": "x", "ts": 10, "reward": 1.0}
        got = as_dict(
            attribute(imps, event_frame([{**ev, "recommendation_id": link}]), window_s=WINDOW)
        )
        assert [k for k, v in got.items() if v[0] == "e"] == [("r1", 0)], link


def table(log: BehaviorLog) -> dict[str, Any]:
    frame = log.read_served()
    return {
        r["recommendation_id"]: (r["event_id"], r["settled"]) for r in frame.iter_rows(named=True)
    }


def at(event_id: str, user: str, item: str, ts: int, **kw: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "item_id": item, "ts": ts, **kw})


async def test_a_click_held_by_a_settled_list_is_never_the_reward_of_another(
    names: dict[str, str], log: BehaviorLog
) -> None:
    """Settled is final: u1 is shown x in A (t=0) and in B (t=1000) and clicks x naming A
    (t=1100); once A has settled with the click, later activity of u1 must not hand the
    same click to B by the window.  And a list that reaches the log after a settled list
    took a window click (a late publish) does not take that click too."""
    s = settings(names, allowed_lateness_s=300)
    bus = MemoryBus(stream=names["stream"])

    async def run(*payloads: bytes) -> Any:
        await bus.publish(list(payloads))
        return await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w")

    await run(
        encode_served(served("A", "u1", 0, ["x"])),
        encode_served(served("B", "u1", 1000, ["x"])),
        at("E", "u1", "x", 1100, recommendation_id="A"),
    )
    await run(at("z1", "u9", "q", 2500))  # watermark 2500 - 1800 - 300 = 400: A settles
    assert table(log) == {"A": ("E", True), "B": (None, False)}
    await run(at("e2", "u1", "other", 2600))  # u1 again: B is attributed again
    stats = await run(at("z2", "u9", "q", 6000))  # B settles
    assert table(log) == {"A": ("E", True), "B": (None, True)}
    assert stats.feedback_after_settlement == 0
    # a window click held by settled C; D (earlier, the same item) is logged only now
    await run(encode_served(served("C", "u2", 7000, ["y"])), at("F", "u2", "y", 7100))
    await run(at("z3", "u9", "q", 9500))  # C settles with F
    await run(encode_served(served("D", "u2", 7050, ["y"])))
    await run(at("z4", "u9", "q", 12000))  # D settles
    got = table(log)
    assert got["C"] == ("F", True) and got["D"] == (None, True)


async def test_feedback_for_a_list_another_worker_settled_is_counted_not_lost_silently(
    names: dict[str, str], log: BehaviorLog
) -> None:
    """Worker w1's watermark settles list A; the click naming A reaches worker w2 only
    afterwards (within w2's own lateness, so not a late event).  A stays settled, the click
    is logged, attributed to nothing (not to B, which showed u1 the same item just before
    it, by the window), and counted."""
    s = settings(names, allowed_lateness_s=300)
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(
        [
            encode_served(served("A", "u1", 0, ["x"])),
            encode_served(served("B", "u1", 500, ["x"])),
            at("z1", "u9", "q", 2500),  # watermark 2500 - 1800 - 300 = 400: A settles, B not
        ]
    )
    first = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w1")
    assert first.settled == 1
    await bus.publish([at("E", "u1", "x", 600, recommendation_id="A")])
    second = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w2")
    assert second.logged == 1 and second.late_events == 0
    assert second.feedback_after_settlement == 1
    assert table(log) == {"A": (None, True), "B": (None, False)}
    # redelivered, it is a duplicate and not counted again
    await bus.publish([at("E", "u1", "x", 600, recommendation_id="A")])
    again = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w2")
    assert again.duplicates == 1 and again.feedback_after_settlement == 0
    assert table(log) == {"A": (None, True), "B": (None, False)}


def test_the_served_log_reads_back_when_its_first_hundreds_of_lists_had_no_click(
    log: BehaviorLog,
) -> None:
    """The attribution columns are null on every row before the first click: the reader
    must not take their type from the first rows (it took it from 100 of them)."""
    lists = [served(f"r{i:04d}", "u1", i, ["a"]) for i in range(150)]
    log.append_served(served_rows(lists))
    ev = {"event_id": "e1", "user_id": "u1", "item_id": "a", "ts": 149, "reward": 2.0}
    log.append(
        pl.DataFrame([{**ev, "behavior": "click", "rating": None}], schema=EVENT_SCHEMA),
        slide_s=60,
    )
    log.attribute_users(["u1"], window_s=0)
    log.settle(10**6)
    frame = log.read_served()
    assert frame.height == 150
    assert frame["event_id"].to_list() == [None] * 149 + ["e1"]
    assert frame["reward"].to_list() == [0.0] * 149 + [2.0]
    assert frame["attributed_by"].to_list()[-1] == "window"


def test_a_settled_event_worth_nothing_is_no_click_of_its_arm(log: BehaviorLog) -> None:
    lists = [{**served("r1", "u1", 0, ["a", "b"]), "arm": "x"}]
    log.append_served(served_rows(lists))
    events = [
        {"event_id": "e1", "user_id": "u1", "item_id": "a", "ts": 5, "reward": 0.0},
        {"event_id": "e2", "user_id": "u1", "item_id": "b", "ts": 6, "reward": 2.0},
    ]
    log.append(
        pl.DataFrame(
            [{**e, "behavior": "click", "rating": None} for e in events], schema=EVENT_SCHEMA
        ),
        slide_s=60,
    )
    assert log.attribute_users(["u1"], window_s=WINDOW) == 2
    tally = log.settle_by_arm(10**6)
    assert (tally["x"].impressions, tally["x"].clicks, tally["x"].reward) == (2, 1, 2.0)


async def test_a_served_list_the_log_cannot_store_is_a_dead_letter_alone(
    names: dict[str, str], log: BehaviorLog
) -> None:
    """A producer's list whose user id holds a NUL (PostgreSQL refuses such a row on every
    try): refused by the per-list check, dead-lettered with the field named; the rest of
    the batch is logged."""
    bad = served("rbad", "a\x00b", 10, ["x"])
    with pytest.raises(ValueError, match=r"served list 'rbad': field 'user_id' contains a NUL"):
        served_rows([bad])
    # wider than the table's column: PostgreSQL refuses the row, MariaDB may cut it short
    with pytest.raises(
        ValueError, match=r"field 'recommendation_id' longer than 64 characters \(80\)"
    ):
        served_rows([served("r" * 80, "u1", 10, ["x"])])
    with pytest.raises(ValueError, match=r"field 'arm' longer than 64 characters"):
        served_rows([{**served("r1", "u1", 10, ["x"]), "arm": "a" * 65}])
    bus = MemoryBus(stream=names["stream"])
    long = served("r" * 80, "u1", 10, ["x"])
    ok = served("rok", "u1", 10, ["x", "y"])
    await bus.publish([encode_served(bad), encode_served(long), encode_served(ok)])
    stats = await run_worker_async(settings(names), bus=bus, store=MemoryStore(), log=log)
    assert (stats.served_lists, stats.dead_letters) == (1, 2)
    assert log.read_served()["recommendation_id"].to_list() == ["rok", "rok"]
    reasons = " | ".join(d.reason for d in await bus.read_dead_letters())
    assert "'rbad': field 'user_id' contains a NUL" in reasons
    assert "field 'recommendation_id' longer than 64 characters" in reasons


async def test_a_click_attributed_in_time_is_not_counted_as_after_settlement(
    names: dict[str, str], log: BehaviorLog
) -> None:
    """The list shows x twice; the explicit click takes position 0, position 2 settles
    empty in the same batch: the click was on time, and is not counted."""
    s = settings(names, allowed_lateness_s=0)
    bus = MemoryBus(stream=names["stream"])
    await bus.publish(
        [
            encode_served(served("A", "u1", 0, ["x", "y", "x"])),
            at("E", "u1", "x", 100, recommendation_id="A"),
            at("z", "u9", "q", 5000),  # settles A in this run
        ]
    )
    stats = await run_worker_async(s, bus=bus, store=MemoryStore(), log=log, consumer="w")
    got = log.read_served()
    assert got["event_id"].to_list() == ["E", None, None] and got["settled"].all()
    assert stats.feedback_after_settlement == 0
