"""Terminals: a pty opened inside the container, its master handed to a console socket (runc's
protocol: one SCM_RIGHTS message) or relayed to our own stdio when running in the foreground."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import sys
import termios
import tty

from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    from cocon.oci.runtime_spec import Box

TIOCSPTLCK = 0x40045431
TIOCGPTPEER = 0x5441
TIOCGPTN = 0x80045430


def open_pty(size: Box | None) -> tuple[int, int, str]:
    """Open /dev/ptmx (the container's devpts when called after it is mounted): master, slave, name."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
    (number,) = struct.unpack("I", fcntl.ioctl(master, TIOCGPTN, b"\0" * 4))
    name = f"/dev/pts/{number}"
    try:  # TIOCGPTPEER opens the peer without a path lookup (Linux 4.13+)
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        slave = os.open(name, os.O_RDWR | os.O_NOCTTY)
    if size is not None and size.height and size.width:
        set_size(master, size.height, size.width)
    return master, slave, name


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def make_controlling(slave: int) -> None:
    """The pty becomes the process's controlling terminal and its stdio."""
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for target in (0, 1, 2):
        os.dup2(slave, target)
    if slave > 2:
        os.close(slave)


def connect_console_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(f"--console-socket {path}: cannot connect: {exc.strerror}") from None
    return sock


def send_console(sock: socket.socket, master: int, name: str) -> None:
    socket.send_fds(sock, [name.encode()], [master])


def relay(master: int) -> None:
    """Copy our stdin to the pty and the pty to our stdout until the pty closes."""
    stdin_tty = os.isatty(0)
    saved = termios.tcgetattr(0) if stdin_tty else None
    if stdin_tty:
        tty.setraw(0)
        cols, rows = os.get_terminal_size(0)  # (columns, lines)
        set_size(master, rows, cols)

        def resize(_sig: int, _frame: object) -> None:
            c, r = os.get_terminal_size(0)
            set_size(master, r, c)

        signal.signal(signal.SIGWINCH, resize)
    inputs = [master, 0]
    try:
        while True:
            try:
                ready, _, _ = select.select(inputs, [], [])
            except InterruptedError:
                continue
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    data = b""
                if not data:
                    break
                os.write(1, data)
            if 0 in ready:
                data = os.read(0, 65536)
                if not data:
                    inputs.remove(0)
                    os.write(master, b"\x04")
                else:
                    os.write(master, data)
    finally:
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        sys.stdout.flush()
