"""The daemon's pre-started conmon + runtime (cocon.engine.prestart) against the real daemon: a fitting
container gets the waiting pair's ID and runs through it, a container removed before it started
cancels its pair, and pairs a killed daemon left are cancelled by the next one."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from daemon_helpers import Daemon, cleanup, start_daemon


def waiting_runtimes(run: str) -> list[int]:
    """`cocon-runtime … --await` processes of this run directory (pre-started, no container yet)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv[0].endswith(b"conmon") and b"--await" in argv and any(run.encode() in a for a in argv):
            found.append(int(entry))
    return found


def pair_ids(run: str) -> set[str]:
    base = os.path.join(run, "instances")
    if not os.path.isdir(base):
        return set()
    return {n for n in os.listdir(base) if os.path.exists(os.path.join(base, n, "start.fifo"))}


def pair_ready(run: str) -> bool:
    """One pair whose runtime reads its FIFO (what the daemon waits for before offering it)."""
    ids = pair_ids(run)
    if len(ids) != 1:
        return False
    fifo = os.path.join(run, "instances", next(iter(ids)), "start.fifo")
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        return False
    time.sleep(0.1)  # the daemon looks every 5 ms
    return True


def wait_until(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def daemon(tmp_path: Any) -> Iterator[Daemon]:
    d = start_daemon(str(tmp_path))
    try:
        yield d
    finally:
        c = d.client()
        if d.proc.poll() is None:
            for item in c.container_list(all=True):
                c.container_remove(item["Id"], force=True)
        cleanup(d)


def test_a_fitting_container_runs_on_the_waiting_pair(daemon: Daemon) -> None:
    wait_until(lambda: pair_ready(daemon.run))
    (ready,) = pair_ids(daemon.run)
    c = daemon.client()
    created = c.container_create({"Image": "busybox", "Cmd": ["sh", "-c", "echo via pair; exit 5"],
                                  "HostConfig": {"NetworkMode": "none"}})  # fmt: skip
    assert created["Id"] == ready  # the pair's ID went to the container
    c.container_start_detached(ready)
    assert c.container_wait_until(ready)["StatusCode"] == 5
    assert [line for _, line in c.container_logs(ready)] == [b"via pair\n"]
    wait_until(lambda: len(waiting_runtimes(daemon.run)) == 1 and ready not in pair_ids(daemon.run))
    # a TTY container does not fit the pair: it starts cold and the pair keeps waiting
    waiting = pair_ids(daemon.run)
    tty = c.container_create(
        {"Image": "busybox", "Cmd": ["true"], "Tty": True, "HostConfig": {"NetworkMode": "none"}}
    )
    assert tty["Id"] not in waiting
    c.container_start_detached(tty["Id"])
    assert c.container_wait_until(tty["Id"])["StatusCode"] == 0
    assert pair_ids(daemon.run) == waiting


def test_removed_before_start_cancels_the_pair(daemon: Daemon) -> None:
    wait_until(lambda: pair_ready(daemon.run))
    c = daemon.client()
    body = {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"NetworkMode": "none"}}
    cid = c.container_create(body)["Id"]
    assert pair_ids(daemon.run) == {cid}  # reserved for it; the next is launched once it is used
    c.container_remove(cid)
    wait_until(lambda: len(waiting_runtimes(daemon.run)) == 1 and cid not in pair_ids(daemon.run))
    assert len(pair_ids(daemon.run)) == 1  # a new pair replaced the cancelled one
    assert not os.path.exists(os.path.join(daemon.run, "instances", cid))
    assert not os.path.exists(os.path.join(daemon.root, "containers", cid))


def test_pairs_of_a_killed_daemon_are_cancelled_by_the_next(tmp_path: Any) -> None:
    d = start_daemon(str(tmp_path))
    d2: Daemon | None = None
    try:
        wait_until(lambda: len(waiting_runtimes(d.run)) == 1)
        (old,) = pair_ids(d.run)
        d.stop(signal.SIGKILL)
        assert len(waiting_runtimes(d.run)) == 1  # nobody cancelled it
        d2 = start_daemon(str(tmp_path), root=d.root, run=d.run)
        wait_until(lambda: old not in pair_ids(d.run) and len(waiting_runtimes(d.run)) == 1)
        assert not os.path.exists(os.path.join(d.run, "instances", old))
        # and a clean stop cancels the pair it made
        d2.stop()
        wait_until(lambda: waiting_runtimes(d.run) == [])
        assert pair_ids(d.run) == set()
    finally:
        if d2 is not None:
            cleanup(d2)
        cleanup(d)
