"""uvicorn's httptools protocol, sending each response's head and body in one write.

uvicorn writes a response's status line and headers when the app sends
``http.response.start`` and the body when it sends ``http.response.body``: two
``transport.write`` calls, each a ``send(2)`` on the socket (uvloop writes at once when
nothing is buffered) and, with ``TCP_NODELAY``, two segments that wake the client twice.
:class:`CorkedHttpToolsProtocol` holds a write while it is the only one pending; the next
write, or the event loop's next turn, sends it.  A head followed by its body in the same
turn (every response of a non-streaming route) leaves in one ``send``.

One ``send`` less per response saved 2-5 % of the workers' CPU per request and gave
1.04-1.06x the requests/s at c=64 on ``recloop serve``'s 2-core benchmark machine, and
nothing measurable at c=16 (docs/benchmarks.md, "One write per response").  What it
changes:

- nothing is reordered, dropped or held past the loop turn it was written in;
- a write of :data:`STRAIGHT_BYTES` or more goes out at once, so a large or streamed body
  keeps the transport's own buffering and back-pressure (``pause_writing``);
- ``close`` sends what is held first; ``abort`` drops it, as the transport would;
- a WebSocket upgrade hands the raw transport to the WebSocket protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

STRAIGHT_BYTES = 64 * 1024
"""A write at least this large is not held (uvicorn's flow control high-water mark)."""


class CorkedTransport:
    """Wraps a transport: holds one pending write until the next write or loop turn.

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
        if self._held is not None:  # the body after its head: both go now, in one send
            data = self._held + bytes(data)
            self._held = None
            self.transport.write(data)
            return
        if len(data) >= STRAIGHT_BYTES or self.transport.is_closing():
            self.transport.write(data)
            return
        self._held = bytes(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._send_held)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def _send_held(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Send the held write now (if any)."""
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
        return getattr(self.transport, name)


class CorkedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` over a :class:`CorkedTransport` (``uvicorn.run(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        corked = CorkedTransport(transport, asyncio.get_running_loop())
        super().connection_made(corked)  # type: ignore[arg-type]

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
