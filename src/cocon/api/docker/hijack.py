"""Docker's hijacked connections (`POST /containers/{id}/attach`, `POST /exec/{id}/start`).

The client sends `Connection: Upgrade` and `Upgrade: tcp`; the server answers `101 UPGRADED`
(`Content-Type: application/vnd.docker.raw-stream`, or `…multiplexed-stream` without a TTY) and from
then on the socket carries raw bytes both ways: the client's stdin in, the process's output out
(without a TTY in frames of an 8-byte header — stream 1/2, 3 zero bytes, big-endian length — and
the payload: `frame()`). No HTTP framing, no chunked encoding. The client half-closes its side when
its stdin ends and keeps reading until the server closes.

With aiohttp: the 101 goes out through a prepared `StreamResponse` (a 1xx answer has no body, so
aiohttp adds no chunked encoding), bytes that arrived behind the request are collected, and the
transport is handed to our own `asyncio.Protocol` with `transport.set_protocol()`. That protocol
keeps the connection open on the client's half-close (`eof_received` returns True; aiohttp's own
would close it) and gives flow control in both directions. Checked against the docker CLI
(`docker exec -i`) and docker-py (`exec_start(socket=True)`) before anything was built on it; the
test is tests/integration/test_api_server.py::test_hijacked_stream_*.

One trap, shared with dockerd: docker-py reads the 101's headers through a buffered reader and then
switches to the raw socket, so output sent in the same instant as the headers can be lost to it.
The container routes send output only once the process runs (after the 101 went out), which in
practice separates the two.

    stream = await hijack(request)          # after reading the request's JSON body, if any
    data = await stream.read()              # b"" once the client half-closed (or went away)
    await stream.write(frame(1, b"out"))
    stream.close()
    return stream.response
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aiohttp import web

RAW = "application/vnd.docker.raw-stream"
MULTIPLEXED = "application/vnd.docker.multiplexed-stream"

_HIGH_WATER = 1 << 20


def frame(stream: int, data: bytes) -> bytes:
    """One frame of Docker's multiplexed stream (1 stdout, 2 stderr, 3 system error)."""
    return struct.pack(">BxxxL", stream, len(data)) + data


class _Collector:
    """Stands in for aiohttp's payload parser for an instant, to receive the bytes it buffered."""

    def __init__(self) -> None:
        self.data = bytearray()

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        pass


class _RawProtocol(asyncio.Protocol):
    def __init__(self, stream: HijackedStream) -> None:
        self.stream = stream

    def data_received(self, data: bytes) -> None:
        self.stream._feed(bytes(data))

    def eof_received(self) -> bool:
        self.stream._feed(b"")
        return True  # keep our side open: the output goes on after the client's stdin ended

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._lost()

    def pause_writing(self) -> None:
        self.stream._can_write.clear()

    def resume_writing(self) -> None:
        self.stream._can_write.set()


class HijackedStream:
    """Both directions of a hijacked connection."""

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        transport = request.transport
        assert transport is not None
        self.transport: Any = transport
        self._chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self._buffered = 0
        self._eof = False
        self._closed = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    def _feed(self, data: bytes) -> None:
        if self._eof:
            return
        if not data:
            self._eof = True
        self._chunks.put_nowait(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._closed:
            self.transport.pause_reading()

    def _lost(self) -> None:
        self._closed = True
        self._can_write.set()
        self._feed(b"")

    async def read(self) -> bytes:
        """The next bytes from the client; b"" at its end of input (and ever after)."""
        if self._eof and self._chunks.empty():
            return b""
        data = await self._chunks.get()
        self._buffered -= len(data)
        if self._buffered <= _HIGH_WATER // 2 and not self._closed:
            try:
                self.transport.resume_reading()
            except (AttributeError, RuntimeError):
                pass
        return data

    @property
    def closed(self) -> bool:
        return self._closed or self.transport.is_closing()

    async def write(self, data: bytes) -> None:
        """Send bytes (waits while the client reads slower than we write). ConnectionResetError
        once the client is gone."""
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)
        await self._can_write.wait()

    def close_write(self) -> None:
        """Half-close our side (the client sees the end of the output)."""
        if not self.closed and self.transport.can_write_eof():
            self.transport.write_eof()

    def close(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()
        self._closed = True


async def hijack(request: web.Request, content_type: str = MULTIPLEXED) -> HijackedStream:
    """Answer `101 UPGRADED` and take the connection over. Read the request body before calling
    this. A request without `Upgrade: tcp` is refused (400): every Docker client sends it, and the
    raw stream needs a connection that no HTTP framing follows."""
    from cocon.api.docker.common import HTTPError

    if request.headers.get("Upgrade", "").lower() != "tcp":
        raise HTTPError(
            400, "this route streams on the connection itself: send 'Connection: Upgrade' and 'Upgrade: tcp'"
        )
    headers = {"Content-Type": content_type, "Connection": "Upgrade", "Upgrade": "tcp"}
    response = web.StreamResponse(status=101, reason="UPGRADED", headers=headers)
    response.force_close()  # aiohttp closes (never reuses) the connection once the handler returns
    await response.prepare(request)
    stream = HijackedStream(request, response)
    collector = _Collector()
    request.protocol.set_parser(collector)  # type: ignore[arg-type]  # hands over what it buffered
    stream.transport.set_protocol(_RawProtocol(stream))
    if collector.data:
        stream._feed(bytes(collector.data))
    return stream
