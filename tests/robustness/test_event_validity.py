"""One definition of a valid event: the loaders' validation, the replay check and the stream
validator accept and refuse the same events (a table of tricky cases, then arbitrary unicode)."""

from __future__ import annotations

import orjson
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recloop.data.loaders._read import Table
from recloop.data.loaders._validate import FieldSpec, validate
from recloop.data.validity import MAX_ID_LEN, TS_END
from recloop.errors import DataError
from recloop.streaming.events import EVENT_SCHEMA, BusMessage, parse_batch
from recloop.streaming.replay import check_events

FIELDS = [
    FieldSpec(source="user", name="user", kind="id"),
    FieldSpec(source="item", name="item", kind="id"),
    FieldSpec(source="timestamp", name="timestamp", kind="timestamp"),
]

# (case, user id, item id, time, valid)
CASES = [
    ("plain", "u1", "i1", 100, True),
    ("case differs", "Order-1", "order-1", 1, True),
    ("accent", "ordér-1", "i", 1, True),
    ("trailing space", "order-1 ", "i ", 1, True),
    ("blank only", " ", "\t", 1, True),
    ("control character", "u\x01", "i\x7f", 1, True),
    ("emoji, 4 bytes", "u🙂", "🙂" * MAX_ID_LEN, 1, True),
    ("non-character U+FFFF", "u\uffff", "i", 1, True),
    ("right-to-left marks", "\u202eu", "i\u200f", 1, True),
    ("longest ascii id", "u" * MAX_ID_LEN, "i", 1, True),
    ("longest id in 2-byte characters", "é" * MAX_ID_LEN, "i", 1, True),
    ("time 0", "u", "i", 0, True),
    ("last time", "u", "i", TS_END - 1, True),
    ("empty user id", "", "i", 1, False),
    ("empty item id", "u", "", 1, False),
    ("ascii id one too long", "u" * (MAX_ID_LEN + 1), "i", 1, False),
    ("2-byte id one too long", "u", "é" * (MAX_ID_LEN + 1), 1, False),
    ("NUL inside", "a\x00b", "i", 1, False),
    ("NUL alone", "u", "\x00", 1, False),
    ("negative time", "u", "i", -1, False),
    ("time 2**53", "u", "i", TS_END, False),
    ("time far out", "u", "i", 2**62, False),
]


def stream_accepts(user: str, item: str, ts: int) -> bool:
    payload = orjson.dumps({"event_id": "e1", "user_id": user, "item_id": item, "ts": ts})
    parsed = parse_batch([BusMessage("1-0", payload)])
    return parsed.events.height == 1


def loader_accepts(user: str, item: str, ts: int) -> bool:
    table = Table(
        frame=pl.DataFrame(
            {"user": [user], "item": [item], "timestamp": [ts]},
            schema={"user": pl.String, "item": pl.String, "timestamp": pl.Int64},
        ),
        file="events.parquet",
    )
    kept = validate(table, FIELDS, skip_bad_rows=True)
    try:
        validate(table, FIELDS)
    except DataError:
        assert kept.frame.height == 0 and kept.skipped.count == 1
        return False
    assert kept.frame.height == 1
    return True


def replay_accepts(user: str, item: str, ts: int) -> bool:
    row = {"event_id": "e1", "user_id": user, "item_id": item, "ts": ts}
    frame = pl.DataFrame([row], schema=EVENT_SCHEMA)
    try:
        check_events(frame)
    except DataError:
        return False
    return True


@pytest.mark.parametrize(("case", "user", "item", "ts", "valid"), CASES, ids=[c[0] for c in CASES])
def test_loader_replay_and_stream_agree_on_tricky_events(
    case: str, user: str, item: str, ts: int, valid: bool
) -> None:
    verdicts = {
        "stream": stream_accepts(user, item, ts),
        "loader": loader_accepts(user, item, ts),
        "replay": replay_accepts(user, item, ts),
    }
    assert verdicts == dict.fromkeys(verdicts, valid), case


def test_loader_names_the_rule_a_row_breaks() -> None:
    table = Table(
        frame=pl.DataFrame({"user": ["u", "a\x00b"], "item": ["i", "j"], "timestamp": [1, 2]}),
        file="events.parquet",
    )
    with pytest.raises(DataError) as info:
        validate(table, FIELDS)
    assert str(info.value) == (
        'events.parquet column "user": contains a NUL character (U+0000), which the SQL log '
        "cannot store in row 2"
    )


def test_stream_names_the_rule_an_event_breaks() -> None:
    events = [
        {"event_id": "e1", "user_id": "u", "item_id": "i", "ts": 1},
        {"event_id": "e\x00", "user_id": "u", "item_id": "i", "ts": 1},
        {"event_id": "e3", "user_id": "u", "item_id": "i", "ts": -5},
    ]
    parsed = parse_batch([BusMessage(f"{n}-0", orjson.dumps(e)) for n, e in enumerate(events)])
    assert parsed.events["event_id"].to_list() == ["e1"]
    assert [(d.entry_id, d.reason) for d in parsed.dead] == [
        ("1-0", "event_id: contains a NUL character (U+0000), which the SQL log cannot store"),
        ("2-0", "ts: out of range (0 .. 2**53), got -5"),
    ]


def test_lone_surrogate_is_dead_lettered_as_unparsable() -> None:
    # Not valid Unicode: orjson refuses it (polars could not hold it either).
    parsed = parse_batch(
        [BusMessage("1-0", b'{"event_id":"e\\ud800","user_id":"u","item_id":"i","ts":1}')]
    )
    assert parsed.events.height == 0
    assert parsed.dead[0].reason.startswith("unparsable JSON")


# Arbitrary unicode (surrogates excluded: neither JSON text nor polars can carry them), with
# NUL and long ids made likely, and times around both ends of the range.
ids = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=MAX_ID_LEN + 8),
    st.text(st.sampled_from(["a", "é", "🙂", "\x00", " "]), max_size=MAX_ID_LEN + 2),
)
times = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-3, 3),
    st.integers(TS_END - 3, TS_END + 3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=ids, item=ids, ts=times)
def test_loader_and_stream_agree_on_arbitrary_unicode_ids(user: str, item: str, ts: int) -> None:
    expected = (
        all(0 < len(x) <= MAX_ID_LEN and "\x00" not in x for x in (user, item)) and 0 <= ts < TS_END
    )
    assert stream_accepts(user, item, ts) == loader_accepts(user, item, ts) == expected
