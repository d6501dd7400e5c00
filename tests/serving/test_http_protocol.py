"""recloop.serving.http_protocol: one socket write per response, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from recloop.serving.http_protocol import (
    STRAIGHT_BYTES,
    CorkedHttpToolsProtocol,
    CorkedTransport,
    http_protocol,
)


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.buffered = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)


async def _corked() -> tuple[CorkedTransport, FakeTransport]:
    raw = FakeTransport()
    return CorkedTransport(raw, asyncio.get_running_loop()), raw  # type: ignore[arg-type]


def test_head_and_body_leave_in_one_write() -> None:
    async def main() -> None:
        t, raw = await _corked()
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert raw.writes == []  # held: its body may follow in this turn
        t.write(b"{}")
        assert raw.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        await asyncio.sleep(0)  # the scheduled send finds nothing held
        assert len(raw.writes) == 1

    asyncio.run(main())


def test_a_lone_write_leaves_on_the_next_loop_turn() -> None:
    async def main() -> None:
        t, raw = await _corked()
        t.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        assert t.get_write_buffer_size() == 47
        await asyncio.sleep(0)
        assert raw.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
        t.write(b"1\r\na\r\n")  # a streamed chunk, a turn later
        await asyncio.sleep(0)
        t.write(b"0\r\n\r\n")
        await asyncio.sleep(0)
        assert raw.writes[1:] == [b"1\r\na\r\n", b"0\r\n\r\n"]
        assert t.get_write_buffer_size() == 0

    asyncio.run(main())


def test_large_writes_go_straight_and_keep_their_order() -> None:
    async def main() -> None:
        t, raw = await _corked()
        big = b"x" * STRAIGHT_BYTES
        t.write(big)
        assert raw.writes == [big]  # not held: the transport's back-pressure sees it
        t.write(b"head")
        t.write(big)
        assert raw.writes == [big, b"head" + big]

    asyncio.run(main())


def test_close_sends_what_is_held_and_abort_drops_it() -> None:
    async def main() -> None:
        t, raw = await _corked()
        t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        t.close()
        assert raw.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"] and raw.closed
        await asyncio.sleep(0)  # the scheduled send does not write to the closed transport
        assert len(raw.writes) == 1

        t, raw = await _corked()
        t.write(b"partial")
        t.abort()
        await asyncio.sleep(0)
        assert raw.writes == [] and raw.aborted

    asyncio.run(main())


def test_everything_else_is_the_transports() -> None:
    async def main() -> None:
        t, raw = await _corked()
        assert t.get_extra_info("peername") == ("127.0.0.1", 5)
        raw.buffered = 10
        t.write(b"abc")
        assert t.get_write_buffer_size() == 13
        t.writelines([b"d", b"e"])
        assert raw.writes == [b"abcde"]

    asyncio.run(main())


def test_serve_uses_it_where_httptools_is_installed() -> None:
    pytest.importorskip("httptools")
    assert http_protocol() == "recloop.serving.http_protocol:CorkedHttpToolsProtocol"


# ------------------------------------------------------------------ over a real socket


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["path"] == "/stream":  # chunks with the loop turning between them
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"end"})
        return
    out = b"y" * 200_000 if scope["path"] == "/big" else b"echo:" + body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    pytest.importorskip("httptools")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = uvicorn.Config(
        _app, host="127.0.0.1", port=free, log_level="warning", http=CorkedHttpToolsProtocol
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield free
    server.should_exit = True
    thread.join(timeout=10)


def _exchange(port: int, data: bytes, *, until: bytes, closes: bool = False) -> bytes:
    """Send ``data``; read until ``until`` has arrived (or, with ``closes``, until EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while closes or until not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (
        path.encode(),
        len(body),
        body,
    )


def test_pipelined_requests_get_whole_responses_in_order(port: int) -> None:
    got = _exchange(port, _post("/a", b"one") + _post("/b", b"two"), until=b"echo:two")
    first, second = got.index(b"echo:one"), got.index(b"echo:two")
    assert got.count(b"HTTP/1.1 200 OK") == 2 and first < second


def test_streamed_and_large_bodies_arrive_whole(port: int) -> None:
    got = _exchange(port, b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n", until=b"0\r\n\r\n")
    assert b"transfer-encoding: chunked" in got
    assert got.index(b"part0;") < got.index(b"part1;") < got.index(b"part2;") < got.index(b"end")

    got = _exchange(port, b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n", until=b"y" * 200_000)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-length: 200000" in head and body == b"y" * 200_000


def test_a_refused_request_still_gets_its_answer_before_the_close(port: int) -> None:
    # uvicorn answers a malformed request with a 400 written just before it closes
    got = _exchange(port, b"NOT HTTP AT ALL\r\n\r\n", until=b"400", closes=True)
    assert got.startswith(b"HTTP/1.1 400 Bad Request")
