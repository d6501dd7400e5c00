"""recloop's Java functions for the Flink job (``java/flink-udf``) by hand, against the
Python the publisher, the store and the Redis runner use: the sliding-window Top-N
(``TopCounts``: counts added and taken back, ties broken by item id in code point order)
and the per-user recent events (``RecentEvents``: ordered by (ts, event id), capped, the
first version of an event id kept), ids of any characters in valid JSON.  Runs them with
``java``'s single-file launch (about a second each, no Flink job)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from recloop.streaming.flink import job
from recloop.streaming.flink.runner import UDF_JAR

pytestmark = [pytest.mark.flink]

HERE = Path(__file__).parent


# Quotes, backslashes, control characters, non-ASCII and characters past U+FFFF (where UTF-16
# order and code point order differ): ids the event schema allows.
ODD_IDS = ['a"b', "a\\b", "tab\there", "é", "\ufb01", "\U0001f600", "x", "x\n", "\ue000", "y"]


def units(item: str) -> str:
    raw = item.encode("utf-16-be")
    return "".join(f"u{raw[i]:02x}{raw[i + 1]:02x}" for i in range(0, len(raw), 2))


def run_check(flink_python: str, function: str, lines: list[str]) -> list[str]:
    env = Path(flink_python).absolute().parent.parent
    jar = env / "recloop-jars" / UDF_JAR
    lib = subprocess.run(
        [flink_python, "-c", "import os, pyflink; print(os.path.dirname(pyflink.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    flink_jars = sorted(
        [*Path(lib, "lib").glob("flink-table*.jar"), *Path(lib, "lib").glob("flink-dist*.jar")]
    )
    classpath = ":".join([str(jar), *map(str, flink_jars)])
    done = subprocess.run(
        ["java", "-cp", classpath, str(HERE / "java" / "FunctionsCheck.java"), function],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def python_top(counts: dict[str, int], top: int) -> list[list[object]]:
    """The publisher's ranking (:func:`job.popular_list`) of the same counts."""
    listed = json.dumps([[i, n] for i, n in counts.items() if n > 0])
    return [[i, int(n)] for i, n in json.loads(job.popular_list(listed, top))]


def test_counts_added_and_taken_back_and_ties(flink_python: str) -> None:
    lines = [
        "+ " + units("b") + " 2",
        "+ " + units("a") + " 2",
        "+ " + units("c") + " 5",
        "top 2",  # c first; a before b on the tie
        "- " + units("c") + " 5",  # gone, not a zero count
        "+ " + units("b") + " 1",
        "top 5",
        "- " + units("zz") + " 1",  # never counted: no effect
        "top 0",
        f"+ {units('d')} 1 {units('a')} 1",  # a slide of two items
        "top 5",
        f"- {units('a')} 3 {units('b')} 3",  # a slide of two items leaves the window
        "top 5",
    ]
    out = [json.loads(x) for x in run_check(flink_python, "top-counts", lines)]
    assert out == [
        [["c", 5], ["a", 2]],
        [["b", 3], ["a", 2]],
        [],
        [["a", 3], ["b", 3], ["d", 1]],
        [["d", 1]],
    ]


def test_ranks_as_python_on_random_streams_of_odd_ids(flink_python: str) -> None:
    ids = ODD_IDS
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    lines: list[str] = []
    want: list[list[list[object]]] = []
    for step in range(300):
        item = ids[int(rng.integers(len(ids)))]
        if counts.get(item, 0) > 0 and rng.random() < 0.4:
            n = int(rng.integers(1, counts[item] + 1))
            counts[item] -= n
            lines.append(f"- {units(item)} {n}")
        else:
            n = int(rng.integers(1, 3))
            counts[item] = counts.get(item, 0) + n
            lines.append(f"+ {units(item)} {n}")
        if step % 10 == 9:
            top = int(rng.integers(1, 6))
            lines.append(f"top {top}")
            want.append(python_top(counts, top))
    got = [json.loads(x) for x in run_check(flink_python, "top-counts", lines)]
    assert got == want


def test_recent_events_keep_the_last_ones_by_time_then_id(flink_python: str) -> None:
    def add(ts: int, event_id: str, item: str, reward: float, cap: int) -> str:
        return f"+ {ts} {units(event_id)} {units(item)} {reward!r} {cap}"

    lines = [
        add(5, "b", "i1", 1.0, 3),
        add(3, "x", "i2", 0.5, 3),  # out of order: goes first
        add(5, "a", "i3", 2.0, 3),  # same time: ordered by id
        "list",
        add(5, "b", "i9", 9.0, 3),  # an id kept already: the first version stays
        add(1, "z", "i4", 1.0, 3),  # older than every kept event of a full list
        add(7, "c", "i5", 0.0, 3),  # the oldest drops out
        "list",
    ]
    out = [json.loads(x) for x in run_check(flink_python, "recent", lines)]
    assert out == [
        [[3, "x", "i2", 0.5], [5, "a", "i3", 2.0], [5, "b", "i1", 1.0]],
        [[5, "a", "i3", 2.0], [5, "b", "i1", 1.0], [7, "c", "i5", 0.0]],
    ]


def test_recent_events_equal_the_stores_list_on_random_streams(flink_python: str) -> None:
    # Times with many ties and odd ids, records sent twice: the list the Redis store keeps
    # (distinct event ids, ordered by (ts, id) in code point order, the last `cap`), which
    # the job's own check (job.kept_events) computes too.
    rng = np.random.default_rng(1)
    cap = 7
    sent: list[list[object]] = []
    lines: list[str] = []
    want: list[list[list[object]]] = []
    for step in range(400):
        if sent and rng.random() < 0.15:
            ts, event_id, item, reward = sent[int(rng.integers(len(sent)))]  # sent twice
        else:
            ts = int(rng.integers(0, 40))
            event_id = ODD_IDS[int(rng.integers(len(ODD_IDS)))] + str(step)
            item = ODD_IDS[int(rng.integers(len(ODD_IDS)))]
            reward = float(rng.integers(0, 3)) / 2
            sent.append([ts, event_id, item, reward])
        lines.append(f"+ {ts} {units(str(event_id))} {units(str(item))} {reward!r} {cap}")
        if step % 20 == 19:
            lines.append("list")
            want.append(job.kept_events(json.dumps(sent), cap))
    got = [json.loads(x) for x in run_check(flink_python, "recent", lines)]
    assert got == want


# Records and the reason each is not a valid event (None: it is one), in the Flink job's
# wording; the Redis Streams runner's parse_batch must agree on which are events.
RECORDS: list[tuple[bytes | None, str | None]] = [
    (b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5}', None),
    (
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5,"behavior":"buy","rating":4,'
        b'"reward":2.5}',
        None,
    ),
    (b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5,"rating":null}', None),
    ('{"event_id":"é","user_id":"🙂","item_id":"x","ts":0}'.encode(), None),
    (('{"event_id":"' + "🙂" * 128 + '","user_id":"u","item_id":"i","ts":1}').encode(), None),
    (
        ('{"event_id":"' + "e" * 129 + '","user_id":"u","item_id":"i","ts":1}').encode(),
        "event_id: missing, not a string or number, empty or over 128 characters",
    ),
    (None, "not a JSON object"),
    (b"garbage", "not a JSON object"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5} trailing', "not a JSON object"),
    (
        b'{"event_id":"e1","item_id":"i","ts":5}',
        "user_id: missing, not a string or number, empty or over 128 characters",
    ),
    (
        b'{"event_id":"","user_id":"u","item_id":"i","ts":5}',
        "event_id: missing, not a string or number, empty or over 128 characters",
    ),
    (
        b'{"event_id":"e1","user_id":{"a":1},"item_id":"i","ts":5}',
        "user_id: missing, not a string or number, empty or over 128 characters",
    ),
    (
        b'{"event_id":"e1","user_id":"u","item_id":true,"ts":5}',
        "item_id: missing, not a string or number, empty or over 128 characters",
    ),
    (b'{"event_id":"e1","user_id":"u","item_id":"i"}', "ts: missing or not an integer"),
    (b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5.5}', "ts: missing or not an integer"),
    (b'{"event_id":"e1","user_id":"u","item_id":"i","ts":-1}', "ts: outside [0, 2**53)"),
    (
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":9007199254740992}',
        "ts: outside [0, 2**53)",
    ),
    (
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":99999999999999999999}',
        "ts: outside [0, 2**53)",
    ),
    (
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5,"behavior":"clik"}',
        "behavior: not one of pv, cart, fav, buy",
    ),
    (
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5,"rating":"abc"}',
        "rating: not a number",
    ),
    (
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5,"reward":"1.5"}',
        "reward: not a number",
    ),
    (b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5,"reward":true}', "reward: not a number"),
]


def test_each_record_is_an_event_or_has_a_reason(flink_python: str) -> None:
    lines = ["-" if p is None else p.hex() for p, _ in RECORDS]
    out = [line.split("\t") for line in run_check(flink_python, "parse", lines)]
    assert len(out) == len(RECORDS)
    for (payload, want), fields in zip(RECORDS, out, strict=True):
        reason = None if fields[7] == "null" else fields[7]
        assert reason == want, payload
        event_time = None if fields[8] == "null" else int(fields[8])
        if want is None:
            doc = json.loads(payload or b"")
            assert fields[:3] == [doc["event_id"], doc["user_id"], doc["item_id"]]
            assert int(fields[3]) == doc["ts"] == event_time
        else:
            assert event_time is None  # never moves the watermark


def test_a_parse_is_reused_only_for_the_same_bytes(flink_python: str) -> None:
    # The job parses a record up to three times in a row (watermark, event time, fields) and
    # keeps the last parse: records of the same length written into one array in place (as
    # a caller reusing its buffer would), each one twice, must each get their own fields.
    same_length = [
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5}',
        b'{"event_id":"e2","user_id":"v","item_id":"j","ts":6}',
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":5}',
        b'{"event_id":"e1","user_id":"u","item_id":"i","ts":x}',
    ]
    lines = [p.hex() for p in same_length] + ["-" if p is None else p.hex() for p, _ in RECORDS]
    fresh = run_check(flink_python, "parse", lines)
    assert run_check(flink_python, "parse-reused", lines) == fresh
    fields = [line.split("\t") for line in fresh[:4]]
    assert [f[0] for f in fields[:3]] == ["e1", "e2", "e1"]
    assert [f[8] for f in fields] == ["5", "6", "5", "null"]
    assert fields[3][7] == "not a JSON object"


def test_the_redis_runner_agrees_on_which_records_are_events() -> None:
    from recloop.streaming.events import BusMessage, parse_batch

    messages = [BusMessage(str(i), p, None) for i, (p, _) in enumerate(RECORDS)]
    parsed = parse_batch(messages)
    dead = {d.entry_id for d in parsed.dead}
    for i, (payload, want) in enumerate(RECORDS):
        assert (str(i) not in dead) == (want is None), payload
