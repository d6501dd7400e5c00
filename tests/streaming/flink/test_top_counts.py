"""recloop's sliding-window Top-N for the Flink job (``java/flink-udf``, ``TopCounts``) by
hand, against the Python ranking the publisher and the Redis runner use: counts added and
taken back, ties broken by item id in code point order, ids of any characters in valid
JSON.  Runs the class with ``java``'s single-file launch (about a second, no Flink job)."""

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


def units(item: str) -> str:
    raw = item.encode("utf-16-be")
    return "".join(f"u{raw[i]:02x}{raw[i + 1]:02x}" for i in range(0, len(raw), 2))


def run_top_counts(flink_python: str, lines: list[str]) -> list[str]:
    env = Path(flink_python).absolute().parent.parent
    jar = env / "recloop-jars" / UDF_JAR
    lib = subprocess.run(
        [flink_python, "-c", "import os, pyflink; print(os.path.dirname(pyflink.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    classpath = ":".join([str(jar), *map(str, sorted(Path(lib, "lib").glob("flink-table*.jar")))])
    done = subprocess.run(
        ["java", "-cp", classpath, str(HERE / "java" / "TopCountsCheck.java")],
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
    ]
    out = [json.loads(x) for x in run_top_counts(flink_python, lines)]
    assert out == [[["c", 5], ["a", 2]], [["b", 3], ["a", 2]], []]


def test_ranks_as_python_on_random_streams_of_odd_ids(flink_python: str) -> None:
    # Quotes, backslashes, control characters, non-ASCII and characters past U+FFFF (where
    # UTF-16 order and code point order differ) — ids the event schema allows.
    ids = ['a"b', "a\\b", "tab\there", "é", "\ufb01", "\U0001f600", "x", "x\n", "\ue000", "y"]
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
    got = [json.loads(x) for x in run_top_counts(flink_python, lines)]
    assert got == want
