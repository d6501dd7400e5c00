"""uvicorn's httptools protocol, sending each response's head and body in one write.

uvicorn writes a response's status line and headers when the app sends
``http.response.start`` and the body when it sends ``http.response.body``: two
``transport.write`` calls, each a ``send(2)`` on the socket (uvloop writes at once when
nothing is buffered) and, with ``TCP_NODELAY``, two segments that wake the client twice.
:class:`CorkedHttpToolsProtocol` holds a response's head until the next write (its body,
or a streamed response's first chunk), which takes it along in the same ``send``; the
response's completion, the client's end of stream, a close, or the event loop's next turn
sends a head that is still held.

Measured on ``recloop serve``'s 2-core benchmark machine against uvicorn's own protocol, in
the same interleaved rounds: 1.00-1.03x the requests/s and 0.97-1.01x the workers' CPU per
request at c=16 and c=64 (docs/benchmarks.md, "One write per response") -- small on
loopback, where a segment costs little; on a real network it is one packet less per
response.  What it changes:

- only a response head (a write that starts with ``HTTP/``) is ever held, at most one at a
  time, and never past its response's completion or the loop turn it was written in;
  a body, a chunk or a large head is written at once, as before, so a streamed body keeps
  the transport's own buffering and back-pressure (``pause_writing``);
- nothing is reordered: whatever is written next goes out with the held head, after it;
- ``close`` and the client's half-close (``eof_received``, after which uvloop closes the
  transport itself) send what is held first; ``abort`` drops it, as the transport would;
- a WebSocket upgrade hands the raw transport to the WebSocket protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

STRAIGHT_BYTES = 64 * 1024
"""A head at least this large is written at once (uvloop's default write high-water mark)."""


class CorkedTransport:
    """Wraps a transport: holds one response head until the next write, :meth:`flush`,
    ``close`` or the loop's next turn.

    Everything but ``write``, ``writelines``, ``close``, ``abort`` and
    ``get_write_buffer_size`` is the wrapped transport's own.
    """

    __slots__ = ("_held", "_loop", "_scheduled", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:  # the body after its head: both go now, in one send
            self._held = None
            self.transport.writelines((held, data))  # uvloop: one writev, no copy
            return
        if data[:5] == b"HTTP/" and len(data) < STRAIGHT_BYTES and not self.transport.is_closing():
            self._held = data if isinstance(data, bytes) else bytes(data)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._send_held)
            return
        self.transport.write(data)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def _send_held(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Send the held head now (if any)."""
        held, self._held = self._held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + len(self._held or b"")

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held = None
        self.transport.abort()

    def __getattr__(self, name: str) -> Any:
        if name in CorkedTransport.__slots__:  # not set yet (a copy, say): no recursion
            raise AttributeError(name)
        return getattr(self.transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` over a :class:`CorkedTransport` (``uvicorn.run(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        corked = CorkedTransport(transport, asyncio.get_running_loop())
        super().connection_made(corked)  # type: ignore[arg-type]

    def _flush(self) -> None:
        if isinstance(self.transport, CorkedTransport):
            self.transport.flush()

    def on_response_complete(self) -> None:
        # a response whose head was its last write (HEAD, 204, 304) goes now, not after
        # whatever the app still does in this task step
        self._flush()
        super().on_response_complete()

    def eof_received(self) -> None:
        # uvloop closes the transport itself, not through the wrapper, when this returns
        self._flush()
        super().eof_received()

    def handle_websocket_upgrade(self) -> None:
        corked = self.transport
        if isinstance(corked, CorkedTransport):
            corked.flush()
            self.transport = corked.transport
        super().handle_websocket_upgrade()


def http_protocol() -> str:
    """What ``recloop serve`` passes to ``uvicorn.run(http=...)``: the corked protocol where
    httptools is installed (uvicorn[standard], a dependency), else uvicorn's choice."""
    import importlib.util

    if importlib.util.find_spec("httptools") is None:
        return "auto"
    return f"{__name__}:CorkedHttpToolsProtocol"
