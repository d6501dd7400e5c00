"""recloop.serving.http_protocol: one socket write per response, nothing lost or reordered."""

from __future__ import annotations

import asyncio
import copy
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from recloop.serving.http_protocol import (
    STRAIGHT_BYTES,
    CorkedHttpToolsProtocol,
    CorkedTransport,
    http_protocol,
)

if TYPE_CHECKING:  # the fixture's type; tests/*/conftest.py are several modules named conftest
    from conftest import ThreadServer


class FakeTransport:
    """Records each send: a ``write``, or a ``writelines`` (one writev)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False
        self.buffered = 0

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))

    def writelines(self, lines: Any) -> None:
        assert not self.closed, "written after close"
        self.writes.append(b"".join(lines))

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


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


async def _corked() -> tuple[CorkedTransport, FakeTransport]:
    raw = FakeTransport()
    return CorkedTransport(raw, asyncio.get_running_loop()), raw  # type: ignore[arg-type]


def test_head_and_body_leave_in_one_send() -> None:
    async def main() -> None:
        t, raw = await _corked()
        t.write(HEAD)
        assert raw.writes == []  # held: its body may follow in this turn
        t.write(b"{}")
        assert raw.writes == [HEAD + b"{}"]
        await asyncio.sleep(0)  # the scheduled send finds nothing held
        assert len(raw.writes) == 1

    asyncio.run(main())


def test_a_lone_head_leaves_on_the_next_loop_turn_and_chunks_go_at_once() -> None:
    async def main() -> None:
        t, raw = await _corked()
        t.write(CHUNKED_HEAD)
        assert t.get_write_buffer_size() == len(CHUNKED_HEAD)
        await asyncio.sleep(0)
        assert raw.writes == [CHUNKED_HEAD]
        t.write(b"1\r\na\r\n")  # a streamed chunk: never held
        t.write(b"0\r\n\r\n")
        assert raw.writes[1:] == [b"1\r\na\r\n", b"0\r\n\r\n"]
        assert t.get_write_buffer_size() == 0

    asyncio.run(main())


def test_only_heads_are_held_and_large_ones_are_not() -> None:
    async def main() -> None:
        t, raw = await _corked()
        t.write(b"just bytes")
        assert raw.writes == [b"just bytes"]
        big = b"HTTP/1.1 200 OK\r\nx-big: " + b"x" * STRAIGHT_BYTES + b"\r\n\r\n"
        t.write(big)
        assert raw.writes == [b"just bytes", big]
        t.write(HEAD)
        t.write(b"y" * STRAIGHT_BYTES)  # a large body still takes its head along, after it
        assert raw.writes[2:] == [HEAD + b"y" * STRAIGHT_BYTES]

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
        t.write(HEAD)
        t.abort()
        await asyncio.sleep(0)
        assert raw.writes == [] and raw.aborted

    asyncio.run(main())


def test_everything_else_is_the_transports() -> None:
    async def main() -> None:
        t, raw = await _corked()
        assert t.get_extra_info("peername") == ("127.0.0.1", 5)
        raw.buffered = 10
        t.write(HEAD)
        assert t.get_write_buffer_size() == 10 + len(HEAD)
        t.writelines([b"d", b"e"])
        assert raw.writes == [HEAD + b"de"]
        copied = copy.copy(t)  # __getattr__ must not recurse on a bare instance
        assert copied.transport is raw

    asyncio.run(main())


def test_serve_uses_it_where_httptools_is_installed() -> None:
    pytest.importorskip("httptools")
    assert http_protocol() == "recloop.serving.http_protocol:CorkedHttpToolsProtocol"


# ------------------------------------------------------------------ over a real socket
# uvicorn in a thread, on uvloop where it is installed (as recloop serve runs), with a
# recorder under the corked transport: every send(2) the protocol makes is in SENDS.

SENDS: list[bytes] = []
BLOCKING = threading.Event()  # set by the app just before it blocks its event loop


class _Recorder:
    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport

    def write(self, data: bytes) -> None:
        SENDS.append(bytes(data))
        self._t.write(data)

    def writelines(self, lines: Any) -> None:
        lines = list(lines)
        SENDS.append(b"".join(lines))
        self._t.writelines(lines)

    def __getattr__(self, name: str) -> Any:
        if name == "_t":
            raise AttributeError(name)
        return getattr(self._t, name)


class RecordedCorked(CorkedHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Recorder(transport))  # type: ignore[arg-type]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        msg = await receive()
        await send({"type": "websocket.send", "text": "echo:" + (msg.get("text") or "")})
        await send({"type": "websocket.close"})
        return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    path = scope["path"]
    if path == "/stream":  # chunks with the loop turning between them
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"end"})
        return
    if path == "/block-after-head":  # the head only, then the loop blocked a while
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )
        BLOCKING.set()
        time.sleep(0.5)
        await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"hello"})
        return
    if path == "/block-after-response":  # complete (HEAD: the head is all), then CPU work
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
        )
        await send({"type": "http.response.body", "body": b"hello"})
        BLOCKING.set()
        time.sleep(1.0)
        return
    out = b"y" * 200_000 if path == "/big" else b"echo:" + body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


@pytest.fixture(scope="module")
def running(serve_in_thread: Any) -> Iterator[ThreadServer]:
    pytest.importorskip("httptools")
    with serve_in_thread(_app, http=RecordedCorked) as running:
        yield running


@pytest.fixture
def port(running: ThreadServer) -> int:
    SENDS.clear()
    BLOCKING.clear()
    return running.port


def _read(s: socket.socket, *, until: bytes | None) -> bytes:
    """Read until ``until`` has arrived, or (None) until the server closes."""
    got = b""
    while until is None or until not in got:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def _exchange(port: int, data: bytes, *, until: bytes | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        return _read(s, until=until)


def _post(path: str, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n%s" % (
        path.encode(),
        len(body),
        body,
    )


def test_a_response_is_one_send(port: int) -> None:
    got = _exchange(port, _post("/a", b"one"), until=b"echo:one")
    assert got.startswith(b"HTTP/1.1 200 OK")
    assert [got] == SENDS  # head and body in one send, not two


def test_pipelined_requests_get_whole_responses_in_order(port: int) -> None:
    got = _exchange(port, _post("/a", b"one") + _post("/b", b"two"), until=b"echo:two")
    first, second = got.index(b"echo:one"), got.index(b"echo:two")
    assert got.count(b"HTTP/1.1 200 OK") == 2 and first < second
    assert len(SENDS) == 2


def test_streamed_and_large_bodies_arrive_whole(port: int) -> None:
    got = _exchange(port, b"GET /stream HTTP/1.1\r\nhost: t\r\n\r\n", until=b"0\r\n\r\n")
    assert b"transfer-encoding: chunked" in got
    assert got.index(b"part0;") < got.index(b"part1;") < got.index(b"part2;") < got.index(b"end")

    got = _exchange(port, b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n", until=b"y" * 200_000)
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"content-length: 200000" in head and body == b"y" * 200_000


def test_a_refused_request_still_gets_its_answer_before_the_close(port: int) -> None:
    # uvicorn answers a malformed request with a 400 written just before it closes
    got = _exchange(port, b"NOT HTTP AT ALL\r\n\r\n", until=None)
    assert got.startswith(b"HTTP/1.1 400 Bad Request")


def test_a_head_only_response_leaves_when_complete_not_after_the_apps_work(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"HEAD /block-after-response HTTP/1.1\r\nhost: t\r\n\r\n")
        assert BLOCKING.wait(10)
        s.settimeout(0.5)  # the app blocks its loop for 1 s after its response
        assert _read(s, until=b"\r\n\r\n").startswith(b"HTTP/1.1 200 OK")


def test_a_held_head_is_sent_when_the_client_half_closes(port: int) -> None:
    # uvloop closes the transport itself on EOF; the head held then must have gone first
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /block-after-head HTTP/1.1\r\nhost: t\r\n\r\n")
        assert BLOCKING.wait(10)
        s.shutdown(socket.SHUT_WR)  # while the app blocks with its head held
        assert _read(s, until=None).startswith(b"HTTP/1.1 200 OK")


def test_100_continue_is_sent(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"POST /c HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
        )
        assert _read(s, until=b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abc")
        assert b"echo:abc" in _read(s, until=b"echo:abc")


def test_a_websocket_gets_the_raw_transport(running: ThreadServer, port: int) -> None:
    pytest.importorskip("websockets")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
        )
        assert _read(s, until=b"\r\n\r\n").startswith(b"HTTP/1.1 101")
        ws = [
            p
            for p in running.server.server_state.connections
            if not isinstance(p, CorkedHttpToolsProtocol)
        ]
        assert len(ws) == 1
        assert isinstance(ws[0].transport, _Recorder)  # the raw one, not a CorkedTransport
        mask = b"\x01\x02\x03\x04"
        s.sendall(b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi")))
        assert b"echo:hi" in _read(s, until=b"echo:hi")
