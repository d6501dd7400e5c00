"""Property tests: a loader given arbitrary bytes either reads them or says, on one line,
what is wrong — it never fails with anything but a DataError, and with ``skip_bad_rows`` it
never loses a good line."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recloop.data.loaders import LoadOptions, load_raw
from recloop.errors import DataError

HEADER = b"user,item,timestamp,rating\n"
GOOD = b"".join(b"%d,%d,%d,4\n" % (r % 7 + 1, r % 5 + 1, 1000 + r) for r in range(20))

# Lines mixing plausible fields with hostile bytes: quotes, delimiters, NUL, invalid UTF-8.
fragments = st.sampled_from(
    [b"1", b"42", b"-3", b"1e308", b"nan", b"abc", b'"', b'""', b",", b";", b"\t", b"\x00",
     b"\xff", b"\xe2\x82", b"\r", b" ", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"2**63", b""]
)  # fmt: skip
lines = st.lists(fragments, min_size=0, max_size=8).map(lambda xs: b"".join(xs) + b"\n")
bodies = st.one_of(st.binary(max_size=300), st.lists(lines, max_size=6).map(b"".join))


def _load(body: bytes, *, skip: bool, fmt: str = "csv") -> int | None:
    """Events read, or None when the loader refused the file with a one-line DataError."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("ev.csv" if fmt == "csv" else "ml-100k.inter")
        path.write_bytes(body)
        message = None
        try:
            raw = load_raw(fmt, path, LoadOptions(skip_bad_rows=skip))
        except DataError as err:
            message = str(err)
        if message is not None:
            assert "\n" not in message and "Traceback" not in message
            return None
        return raw.events.height


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=bodies, skip=st.booleans())
def test_arbitrary_bytes_after_a_header_never_crash(garbage: bytes, skip: bool) -> None:
    _load(HEADER + garbage, skip=skip)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(max_size=200))
def test_arbitrary_files_never_crash(garbage: bytes) -> None:
    _load(garbage, skip=False)
    _load(garbage, skip=True, fmt="recbole")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(lines, min_size=1, max_size=4))
def test_skipping_bad_lines_keeps_every_good_one(bad: list[bytes]) -> None:
    """Good lines around hostile ones: with skip_bad_rows every good line is read (a hostile
    line that happens to be valid is read too), so at least the 20 good events load."""
    n = _load(HEADER + GOOD[: len(GOOD) // 2] + b"".join(bad) + GOOD[len(GOOD) // 2 :], skip=True)
    assert n is not None and n >= 20
