"""Event validation: every kind of malformed event gets its reason; good events come through
typed; encoding and parsing round-trip."""

from __future__ import annotations

import orjson
import polars as pl
import pytest

from recloop.streaming.events import (
    EVENT_SCHEMA,
    MAX_ID_LEN,
    BusMessage,
    encode_events,
    parse_batch,
)

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": 100}


def msgs(*payloads: bytes | dict[str, object]) -> list[BusMessage]:
    return [
        BusMessage(f"{n}-0", p if isinstance(p, bytes) else orjson.dumps(p))
        for n, p in enumerate(payloads, start=1)
    ]


def with_(**kw: object) -> dict[str, object]:
    d = dict(GOOD)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "unparsable JSON"),
        (b"[1, 2]", "not a JSON object (got list)"),
        (b'"text"', "not a JSON object (got str)"),
        (with_(event_id=...), "event_id: missing"),
        (with_(user_id=None), "user_id: missing"),
        (with_(item_id=...), "item_id: missing"),
        (with_(ts=...), "ts: missing"),
        (with_(user_id=196), "user_id: expected a string, got int 196"),
        (with_(item_id=["a"]), "item_id: expected a string, got list ['a']"),
        (with_(event_id=""), "event_id: empty string"),
        (with_(user_id="x" * (MAX_ID_LEN + 1)), f"user_id: longer than {MAX_ID_LEN} characters"),
        (with_(ts="100"), "ts: expected integer seconds, got str '100'"),
        (with_(ts=1.5), "ts: expected integer seconds, got float 1.5"),
        (with_(ts=True), "ts: expected integer seconds, got bool True"),
        (with_(ts=-1), "ts: out of range (0 .. 2**53), got -1"),
        (with_(ts=2**53), f"ts: out of range (0 .. 2**53), got {2**53}"),
        (
            with_(behavior="clik"),
            "behavior: unknown value 'clik' (expected one of pv, cart, fav, buy)",
        ),
        (with_(behavior=3), "behavior: expected a string, got int 3"),
        (with_(rating="5"), "rating: expected a number, got str '5'"),
        (with_(reward=False), "reward: expected a number, got bool False"),
        (with_(reward={"a": 1}), "reward: expected a number, got dict"),
    ],
)
def test_each_malformed_event_is_dead_lettered_with_its_reason(
    payload: bytes | dict[str, object], reason: str
) -> None:
    batch = msgs(GOOD, payload, with_(event_id="e2"))
    parsed = parse_batch(batch)
    assert parsed.entry_ids == ["1-0", "2-0", "3-0"]
    assert parsed.events["event_id"].to_list() == ["e1", "e2"]
    assert len(parsed.dead) == 1
    dead = parsed.dead[0]
    assert dead.entry_id == "2-0"
    assert dead.payload == batch[1].payload
    assert dead.reason.startswith(reason), dead.reason


def test_first_problem_of_an_event_is_its_reason() -> None:
    parsed = parse_batch(msgs(with_(event_id=..., user_id=5, ts="x")))
    assert [d.reason for d in parsed.dead] == ["event_id: missing"]


def test_good_events_are_typed_and_optional_fields_null_when_absent() -> None:
    parsed = parse_batch(
        msgs(
            GOOD,
            with_(event_id="e2", behavior="buy", rating=4, reward=2.5, extra="ignored"),
            with_(event_id="e3", behavior=None, rating=None, reward=0),
        )
    )
    assert parsed.dead == []
    ev = parsed.events
    assert dict(ev.schema) == EVENT_SCHEMA
    assert ev.rows() == [
        ("e1", "u1", "i1", 100, None, None, None),
        ("e2", "u1", "i1", 100, "buy", 4.0, 2.5),
        ("e3", "u1", "i1", 100, None, None, 0.0),
    ]


def test_all_bad_batch_gives_an_empty_typed_frame() -> None:
    parsed = parse_batch(msgs(b"x", b"y"))
    assert parsed.events.height == 0
    assert dict(parsed.events.schema) == EVENT_SCHEMA
    assert len(parsed.dead) == 2


def test_empty_batch() -> None:
    parsed = parse_batch([])
    assert parsed.events.height == 0 and parsed.dead == [] and parsed.entry_ids == []


def test_two_objects_in_one_payload_are_not_split_into_two_events() -> None:
    # The whole-batch decode joins payloads into one array; a payload holding "{..},{..}"
    # must still be one (unparsable) message.
    two = orjson.dumps(GOOD) + b"," + orjson.dumps(with_(event_id="e9"))
    parsed = parse_batch(msgs(two, with_(event_id="e2")))
    assert parsed.events["event_id"].to_list() == ["e2"]
    assert parsed.dead[0].entry_id == "1-0"
    assert parsed.dead[0].reason.startswith("unparsable JSON")


def test_encode_leaves_out_null_fields_and_round_trips() -> None:
    frame = pl.DataFrame(
        {
            "event_id": ["a", "b", "c"],
            "user_id": ["u", "v", "w"],
            "item_id": ["x", "y", "z"],
            "ts": [1, 2, 3],
            "behavior": [None, "pv", None],
            "rating": [None, None, 3.5],
            "reward": [1.0, None, 2.0],
        },
        schema=EVENT_SCHEMA,
    )
    payloads = encode_events(frame)
    assert [orjson.loads(p) for p in payloads] == [
        {"event_id": "a", "user_id": "u", "item_id": "x", "ts": 1, "reward": 1.0},
        {"event_id": "b", "user_id": "v", "item_id": "y", "ts": 2, "behavior": "pv"},
        {"event_id": "c", "user_id": "w", "item_id": "z", "ts": 3, "rating": 3.5, "reward": 2.0},
    ]
    back = parse_batch(msgs(*payloads))
    assert back.dead == []
    assert back.events.equals(frame)


def test_ids_with_quotes_and_unicode_round_trip() -> None:
    frame = pl.DataFrame(
        {"event_id": ['e"1'], "user_id": ["ü ser"], "item_id": ["i\\tem"], "ts": [5]},
    ).with_columns(
        pl.lit(None, pl.String).alias("behavior"),
        pl.lit(None, pl.Float64).alias("rating"),
        pl.lit(None, pl.Float64).alias("reward"),
    )
    back = parse_batch(msgs(*encode_events(frame)))
    assert back.events.row(0)[:4] == ('e"1', "ü ser", "i\\tem", 5)
