"""The client's end of a container's stdio: relay a terminal (a pty master in this process, or a raw
hijacked connection) or Docker's multiplexed stream to this process's own stdin/stdout/stderr.

A multiplexed stream (a container without a TTY, over `POST /containers/{id}/attach` or
`/exec/{id}/start`) carries frames: an 8-byte header (stream 0/1/2, three zero bytes, big-endian
payload length) and the payload; stream 1 goes to our stdout, 2 to our stderr. Our input goes the
other way unframed. When our stdin ends, a connection is half-closed (`shutdown(SHUT_WR)`, what the
docker CLI does) and a pty gets ^D, as a terminal would send it; either way the output is read to its
end.

`relay()` returns when the container's side closes; with `detach_keys` (a terminal attached with
`cocon attach`) it returns False as soon as the user typed them (Ctrl-P Ctrl-Q), True otherwise.

This module imports nothing beyond the standard library's C modules at import time: `cocon run`
loads it on its hot path.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

STDOUT, STDERR = 1, 2
HEADER = 8
DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Demuxer:
    """Feeds Docker's multiplexed frames in, calls `out(stream, payload)` per complete piece."""

    def __init__(self, out: Callable[[int, bytes], None]) -> None:
        self.out = out
        self.buf = b""

    def feed(self, data: bytes) -> None:
        buf = self.buf + data
        while len(buf) >= HEADER:
            size = int.from_bytes(buf[4:8], "big")
            if len(buf) < HEADER + size:
                break
            stream = buf[0]
            self.out(STDERR if stream == STDERR else STDOUT, buf[HEADER : HEADER + size])
            buf = buf[HEADER + size :]
        self.buf = buf


def to_stdio(stream: int, data: bytes) -> None:
    write_all(STDERR if stream == STDERR else STDOUT, data)


def _half_close(fd: int) -> None:
    import _socket

    sock = _socket.socket(fileno=fd)
    try:
        sock.shutdown(_socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


def relay(
    fd: int,
    *,
    stdin: bool,
    resize: Callable[[int, int], None] | None,
    multiplexed: bool = False,
    is_socket: bool = False,
    detach_keys: bytes | None = None,
    initial: bytes = b"",
) -> bool:
    """Copy the container's output from `fd` to our stdout/stderr and (with `stdin`) our input to it;
    our terminal in raw mode when our stdin is one and we relay it; follow our window's size through
    `resize(rows, cols)`; `initial`: output already read from `fd`. True when the container's side
    closed, False when the user detached."""
    import select
    import signal

    tty_in = stdin and os.isatty(0) and not multiplexed
    saved = None
    if tty_in:
        import termios
        import tty

        saved = termios.tcgetattr(0)
    size_fd = 0 if os.isatty(0) else 1 if os.isatty(1) else -1

    def follow_size(*_: object) -> None:
        if size_fd >= 0 and resize is not None:
            try:
                cols, rows = os.get_terminal_size(size_fd)
                resize(rows, cols)
            except OSError:
                pass

    old_winch = signal.signal(signal.SIGWINCH, follow_size) if resize is not None else None
    follow_size()
    demux = Demuxer(to_stdio) if multiplexed else None
    if initial:
        demux.feed(initial) if demux is not None else write_all(STDOUT, initial)
    inputs = [fd, 0] if stdin else [fd]
    typed = b""
    try:
        if tty_in:
            tty.setraw(0)
        while True:
            try:
                ready, _, _ = select.select(inputs, [], [])
            except InterruptedError:
                continue
            if fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    return True
                if demux is not None:
                    demux.feed(data)
                else:
                    write_all(STDOUT, data)
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    inputs.remove(0)
                    if is_socket:
                        _half_close(fd)
                    else:
                        write_all(fd, b"\x04")  # end of input, as a terminal sends it
                    continue
                if detach_keys:
                    typed = (typed + data)[-len(detach_keys) :]
                    if typed == detach_keys:
                        return False
                try:
                    write_all(fd, data)
                except OSError:
                    return True
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if old_winch is not None:
            signal.signal(signal.SIGWINCH, old_winch)
