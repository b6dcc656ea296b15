"""`exec -it` through the daemon with a real terminal: the docker CLI and `cocon exec` each get a pty
in the container (its size, raw input, the exit code), driven from a pty of the test's own."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON, read_until
from daemon_helpers import DOCKER, Daemon, cleanup, start_daemon

SCRIPT = "tty; stty size; read line; echo got:$line; exit 5"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(str(tmp_path_factory.mktemp("exec-tty")))
    try:
        c = d.client()
        body = {"Image": "busybox", "Cmd": ["sleep", "600"], "HostConfig": {"NetworkMode": "none"}}
        c.container_start_detached(c.container_create(body, "box")["Id"])
        yield d
    finally:
        if d.proc.poll() is None:
            d.client().container_remove("box", force=True)
        cleanup(d)


def run_in_pty(argv: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run `argv` on a new 30x100 terminal, answer the script's `read`, return (status, output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    try:
        out = read_until(master, b"30 100")
        os.write(master, b"typed\r")
        out += read_until(master, b"got:typed")
        return proc.wait(timeout=30), out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.parametrize("client", ["docker", "cocon"])
def test_exec_it_gets_a_terminal(daemon: Daemon, client: str) -> None:
    env: dict[str, Any] = daemon.env
    tool = DOCKER if client == "docker" else COCON
    code, out = run_in_pty([tool, "exec", "-it", "box", "sh", "-c", SCRIPT], env)
    assert code == 5
    assert b"/dev/pts/" in out  # a terminal of its own in the container
    assert b"30 100" in out  # with the size of the caller's
    assert b"got:typed" in out  # raw input went through (the container's line discipline echoes it)
