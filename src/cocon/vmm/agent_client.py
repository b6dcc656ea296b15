"""The host's side of the guest agent channel (docs/agent.md): requests, stdio relay, exit events.

`AgentClient(sock)` wraps a connected stream socket (the QEMU chardev of the virtio-serial port
`org.cocon.agent.0`). It is made for a host shim's selector loop: register `fileno()` for reading
(and for writing while `wants_write()`), call `on_readable()` / `on_writable()`. Incoming frames are
dispatched to the callbacks `on_output(process_number, stream, data)`, `on_eof(process_number,
stream)`, `on_exit(process_number, exit_code)`, `on_event(message)` (other events) and `on_closed()`.

`request(op, timeout=..., **args)` blocks until its reply (dispatching whatever else arrives
meanwhile, in order) and raises `AgentError` for an error reply, a timeout or a closed channel.
`request_async(op, callback, **args)` returns at once; `callback(reply)` later gets the reply object
(`reply["ok"]` says which; a closed channel gives an error reply with exit_code 125).
"""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from cocon.vmm.agent_protocol import (
    CONTROL,
    DATA,
    EOF,
    EXIT_OTHER,
    PROTOCOL_VERSION,
    STDIN,
    Decoder,
    Frame,
    ProtocolError,
    encode_control,
    encode_data,
    encode_eof,
)
from cocon.vmm.errors import VmmError

DEFAULT_TIMEOUT = 60.0
READ_CHUNK = 262144


class AgentError(VmmError):
    """The agent refused a request, did not answer in time, or the channel is closed.

    `exit_code` follows Docker: 127 command not found, 126 not executable, 125 anything else."""

    def __init__(self, message: str, exit_code: int = EXIT_OTHER) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _ignore(*_args: Any) -> None:
    pass


class AgentClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)
        self.decoder = Decoder()
        self.closed = False
        self._out = bytearray()
        self._incoming: collections.deque[Frame] = collections.deque()
        self._next_id = 1
        self._waiting: dict[int, Callable[[dict[str, Any]], None]] = {}
        self.on_output: Callable[[int, int, bytes], None] = _ignore
        self.on_eof: Callable[[int, int], None] = _ignore
        self.on_exit: Callable[[int, int], None] = _ignore
        self.on_event: Callable[[dict[str, Any]], None] = _ignore
        self.on_closed: Callable[[], None] = _ignore

    # -- for the caller's loop --------------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def wants_write(self) -> bool:
        return bool(self._out) and not self.closed

    def on_writable(self) -> None:
        """Write what the socket takes now."""
        while self._out and not self.closed:
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    self._set_closed()
                    return
                raise
            del self._out[:n]

    def on_readable(self) -> None:
        """Read what has arrived (without blocking) and dispatch it."""
        self._receive()
        self._dispatch_all()

    def close(self) -> None:
        if not self.closed:
            self._set_closed()
        self.sock.close()

    # -- requests ---------------------------------------------------------------------------------
    def _send_request(self, op: str, args: dict[str, Any], callback: Callable[[dict[str, Any]], None]) -> int:
        if self.closed:
            raise AgentError(f"{op}: the agent channel is closed; the VM has stopped or lost its agent")
        rid = self._next_id
        self._next_id += 1
        frame = encode_control({**args, "id": rid, "op": op})
        self._waiting[rid] = callback
        self._out += frame
        self.on_writable()
        return rid

    def request_async(self, op: str, callback: Callable[[dict[str, Any]], None], **args: Any) -> int:
        """Send a request; `callback(reply)` runs from on_readable (or a later request's pump)."""
        return self._send_request(op, args, callback)

    def request(self, op: str, timeout: float = DEFAULT_TIMEOUT, **args: Any) -> dict[str, Any]:
        """Send a request and wait for its reply; other frames meanwhile go to the callbacks."""
        box: list[dict[str, Any]] = []
        rid = self._send_request(op, args, box.append)
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            while True:
                self._dispatch_all()
                if box:
                    break
                if self.closed:
                    self._waiting.pop(rid, None)
                    raise AgentError(f"{op}: the agent channel closed before the reply; the VM has stopped")
                left = deadline - time.monotonic()
                if left <= 0:
                    self._waiting.pop(rid, None)
                    raise AgentError(
                        f"{op}: the agent did not answer within {timeout:g} s; the guest may be hung or "
                        "overloaded (check its console log)"
                    )
                sel.modify(self.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if self._out else 0))
                for _key, events in sel.select(left):
                    if events & selectors.EVENT_WRITE:
                        self.on_writable()
                    if events & selectors.EVENT_READ:
                        self._receive()
        reply = box[0]
        if not reply.get("ok"):
            code = reply.get("exit_code")
            raise AgentError(
                str(reply.get("error") or f"{op} failed"),
                code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OTHER,
            )
        return reply

    def hello(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Check the agent speaks our protocol version: {version, kernel, pid}."""
        return self.request("hello", timeout=timeout, version=PROTOCOL_VERSION)

    # -- stdin ------------------------------------------------------------------------------------
    def send_stdin(self, process_number: int, data: bytes) -> None:
        """Queue bytes for a process's stdin (written as the socket takes them)."""
        if data and not self.closed:
            self._out += encode_data(process_number, STDIN, data)
            self.on_writable()

    def close_stdin(self, process_number: int) -> None:
        if not self.closed:
            self._out += encode_eof(process_number, STDIN)
            self.on_writable()

    # -- receiving --------------------------------------------------------------------------------
    def _receive(self) -> None:
        if self.closed:
            return
        for _ in range(64):  # bounded, so one busy guest cannot starve the caller's loop
            try:
                data = self.sock.recv(READ_CHUNK)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise
                data = b""
            if not data:
                self._set_closed()
                return
            frames, errors = self.decoder.feed_collect(data)
            self._incoming.extend(frames)
            for err in errors:
                self.on_event({"event": "error", "error": f"from the agent: {err}"})
            if self.decoder.broken:
                self._set_closed()
                return

    def _dispatch_all(self) -> None:
        # One queue for every caller: a callback that calls request() continues with the next frame.
        while self._incoming:
            self._dispatch(self._incoming.popleft())
        if self.closed and self._waiting:
            waiting, self._waiting = self._waiting, {}
            message = "the agent channel closed before the reply; the VM has stopped"
            for rid, callback in waiting.items():
                callback({"id": rid, "ok": False, "exit_code": EXIT_OTHER, "error": message})

    def _dispatch(self, frame: Frame) -> None:
        if frame.kind == DATA:
            self.on_output(frame.process, frame.stream, frame.payload)
        elif frame.kind == EOF:
            self.on_eof(frame.process, frame.stream)
        elif frame.kind == CONTROL:
            try:
                message = frame.control()
            except ProtocolError as exc:
                self.on_event({"event": "error", "error": f"from the agent: {exc}"})
                return
            if "event" in message:
                if message["event"] == "exit":
                    self.on_exit(int(message["process_number"]), int(message["exit_code"]))
                else:
                    self.on_event(message)
                return
            rid = message.get("id")
            callback = self._waiting.pop(rid, None) if isinstance(rid, int) else None
            if callback is not None:
                callback(message)
            else:
                self.on_event({"event": "error", "error": "reply to no pending request", "reply": message})

    def _set_closed(self) -> None:
        self.closed = True
        self._out.clear()
        self.on_closed()


def connect_unix(path: str, timeout: float = DEFAULT_TIMEOUT) -> socket.socket:
    """Connect to a unix socket (QEMU's chardev server), retrying until it accepts or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN):
                raise AgentError(f"cannot connect to the agent socket {path}: {exc.strerror}") from None
            if time.monotonic() >= deadline:
                raise AgentError(
                    f"the agent socket {path} did not accept a connection within {timeout:g} s "
                    f"({exc.strerror}); is QEMU running with the virtio-serial chardev?"
                ) from None
        time.sleep(0.05)
