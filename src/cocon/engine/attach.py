"""Attaching to a detached container's stdio through conmon's attach socket.

conmon listens on `<bundle>/attach` (a SOCK_SEQPACKET unix socket). Every packet it sends is one
chunk of output whose first byte names the stream (2 stdout, 3 stderr: podman's AttachPipe*); what
a client writes is the container's stdin (when it was started with `-i`). conmon closes the socket
when the container exits. A resize is a line `1 <rows> <cols>` written to conmon's control FIFO
`ctl` (message type 1), which conmon forwards as `<rows> <cols>` to its `winsz` FIFO.
"""

from __future__ import annotations

import os
import socket

from cocon._typing import TYPE_CHECKING
from cocon.engine.errors import Conflict, EngineError

if TYPE_CHECKING:
    from collections.abc import Callable

DETACH_KEYS = b"\x10\x11"  # Ctrl-P Ctrl-Q, Docker's default
STDOUT, STDERR = 2, 3


def connect(path: str, name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dfd = -1
    try:
        # through the directory's fd: the full path may be longer than a socket address allows
        dfd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
    except OSError as exc:
        sock.close()
        raise Conflict(f"cannot attach to container {name}: {exc.strerror or exc}; is it running?") from None
    finally:
        if dfd >= 0:
            os.close(dfd)
    return sock


def resize(bundle: str, rows: int, cols: int) -> None:
    """conmon's resize: `1 ROWS COLS` on its control FIFO (`ctl`: message type 1, a window resize);
    its `winsz` FIFO takes `ROWS COLS` without the type (the form conmon itself forwards)."""
    for name, line in (("ctl", f"1 {rows} {cols}\n"), ("winsz", f"{rows} {cols}\n")):
        path = os.path.join(bundle, name)
        if os.path.exists(path):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.write(fd, line.encode())
            except OSError:
                pass
            finally:
                os.close(fd)
            return


def relay(
    sock: socket.socket,
    output: Callable[[int, bytes], None],
    stdin_fd: int = -1,
    detach_keys: bytes | None = None,
) -> bool:
    """Copy output packets to `output(stream, data)` and `stdin_fd` into the socket until the
    container closes it (True) or the detach keys are typed (False)."""
    import select

    fds = [sock.fileno()] + ([stdin_fd] if stdin_fd >= 0 else [])
    typed = b""
    while True:
        ready, _, _ = select.select(fds, [], [])
        if sock.fileno() in ready:
            try:
                data = sock.recv(65536)
            except OSError:
                return True
            if not data:
                return True
            output(data[0], data[1:])
        if stdin_fd >= 0 and stdin_fd in ready:
            try:
                data = os.read(stdin_fd, 65536)
            except OSError:
                data = b""
            if not data:
                fds.remove(stdin_fd)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                stdin_fd = -1
                continue
            if detach_keys:
                typed = (typed + data)[-len(detach_keys) :]
                if typed == detach_keys:
                    return False
            try:
                sock.sendall(data)
            except OSError as exc:
                raise EngineError(f"cannot write to the container's input: {exc.strerror}") from None
