"""Load: 50 concurrent `docker run --rm` requests against one real `cocon daemon`.

Each request is what the docker CLI sends for `docker run --rm busybox sh -c ...`: create (with
HostConfig.AutoRemove), attach (a hijacked connection), wait (condition=removed; its headers come
back before the start), start, then the attach stream's output and the wait's exit code. Every
request must get its own exit code and output; afterwards nothing may be left: no container
record, no overlay mount under the daemon's roots, no cgroup of those containers, no conmon or
container process of this daemon (found by the daemon's paths in /proc/*/cmdline and by
/proc/*/root, never by name: other test runs may be live on the machine)."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import mounts_under, remove_cgroup
from daemon_helpers import Daemon, UnixHTTPConnection, cleanup, start_daemon

COUNT = 50
API = "/v1.44"


@pytest.fixture
def daemon(tmp_path: Any) -> Iterator[Daemon]:
    d = start_daemon(str(tmp_path))
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            ids = [c["Id"] for c in d.request("GET", f"{API}/containers/json?all=1").json()]
            for cid in ids:
                d.request("DELETE", f"{API}/containers/{cid}?force=1")
        code = d.stop()
        log = d.log()
        for pid in processes_of(d):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cleanup(d)
        assert code == 0 and "Traceback" not in log, log


def processes_of(d: Daemon, ids: list[str] | None = None) -> list[int]:
    """Processes that belong to this daemon's containers (not the daemon itself): their command line
    names its root or run directory (conmon, the runtime, the clean-up command), or their root
    directory is under the daemon's root (a container's processes). With `ids`: only those whose
    command line names one of these containers, or whose root is under the daemon's root."""
    roots = (os.path.realpath(d.root).encode(), os.path.realpath(d.run).encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (d.proc.pid, os.getpid()):
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            proc_root = os.readlink(f"/proc/{entry}/root").encode()
        except OSError:
            continue
        in_root = proc_root.startswith(roots[0] + b"/")
        names_us = any(r in cmdline for r in roots) and (
            ids is None or any(i.encode() in cmdline for i in ids)
        )
        if in_root or names_us:
            found.append(int(entry))
    return found


def describe(pids: list[str]) -> str:
    """Each process's pid, parent, state and command line (for a failure message)."""
    lines = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            lines.append(
                f"{pid} ppid={fields[1]} state={fields[0]} root={os.readlink(f'/proc/{pid}/root')}: {cmd}"
            )
        except OSError:
            lines.append(f"{pid}: gone")
    return "\n".join(lines)


def leftovers(d: Daemon, ids: list[str] | None) -> dict[str, list[str]]:
    """What is left of containers `ids` (None: of any container): records, mounts, cgroups,
    processes, and per-container files under the daemon's roots."""
    mine = (lambda name: name in ids) if ids is not None else (lambda name: not name.startswith("."))
    left: dict[str, list[str]] = {
        "mounts": mounts_under(d.root) + mounts_under(d.run),
        "cgroups": cgroups_of(ids) if ids is not None else [],
        "processes": [str(p) for p in processes_of(d, ids)],
    }
    if d.proc.poll() is None:
        left["records"] = [c["Id"][:12] for c in d.request("GET", f"{API}/containers/json?all=1").json()]
    for sub in ("instances", "exits", "locks", "runtime"):
        path = os.path.join(d.run, sub)
        left[f"run/{sub}"] = [n for n in os.listdir(path) if mine(n)] if os.path.isdir(path) else []
    for sub in ("containers", "snapshots/overlayfs/active"):
        path = os.path.join(d.root, sub)
        left[f"root/{sub}"] = [n for n in os.listdir(path) if mine(n)] if os.path.isdir(path) else []
    return left


def cgroups_of(ids: list[str]) -> list[str]:
    """The cgroup directories of these containers still present (cocon's default parent /cocon)."""
    found = []
    for cid in ids:
        found += glob.glob(f"/sys/fs/cgroup/*/cocon/{cid}") + glob.glob(f"/sys/fs/cgroup/cocon/{cid}")
    return found


class Hijacked:
    """`POST /containers/{id}/attach` over a raw socket: the 101 answer, then Docker's multiplexed
    frames (8-byte header: stream, 0, 0, 0, big-endian length) until the container's output ends."""

    def __init__(self, path: str, cid: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.sock.sendall(
            f"POST {API}/containers/{cid}/attach?stream=1&stdout=1&stderr=1 HTTP/1.1\r\n"
            "Host: localhost\r\nContent-Length: 0\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError(f"attach: the connection closed during the answer: {head!r}")
            head += chunk
        status_line = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status_line or b" 200 " in status_line, status_line
        self.rest = head.split(b"\r\n\r\n", 1)[1]

    def read_all(self) -> dict[int, bytes]:
        data = self.rest
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        out: dict[int, bytes] = {1: b"", 2: b""}
        while data:
            assert len(data) >= 8, f"a truncated frame header: {data!r}"
            kind, size = data[0], int.from_bytes(data[4:8], "big")
            out[kind] = out.get(kind, b"") + data[8 : 8 + size]
            data = data[8 + size :]
        return out


def run_rm(d: Daemon, i: int) -> tuple[str, int, dict[int, bytes]]:
    """One `docker run --rm` as the docker CLI does it; (container id, exit code, output by stream)."""
    code = i % 7
    script = f"echo out-{i}; echo err-{i} >&2; exit {code}" if i % 2 == 0 else f"exit {code}"
    body = {
        "Image": "busybox",
        "Cmd": ["sh", "-c", script],
        "AttachStdout": True,
        "AttachStderr": True,
        "Labels": {"load": str(i)},
        "HostConfig": {"AutoRemove": True, "NetworkMode": "none"},
    }
    reply = d.request(
        "POST", f"{API}/containers/create", json.dumps(body), {"Content-Type": "application/json"}
    )
    assert reply.status == 201, (i, reply.status, reply.body)
    cid = reply.json()["Id"]
    attach = Hijacked(d.sock, cid)
    wait = UnixHTTPConnection(d.sock, timeout=60)
    try:
        wait.request("POST", f"{API}/containers/{cid}/wait?condition=removed")
        wait_resp = wait.getresponse()  # the headers come before the start
        assert wait_resp.status == 200, (i, wait_resp.status)
        started = d.request("POST", f"{API}/containers/{cid}/start")
        assert started.status == 204, (i, started.status, started.body)
        output = attach.read_all()
        result = json.loads(wait_resp.read())
    finally:
        wait.close()
    assert result.get("Error") is None, (i, result)
    return cid, int(result["StatusCode"]), output


def test_fifty_concurrent_run_rm(daemon: Daemon) -> None:
    started = time.monotonic()
    results: dict[int, tuple[str, int, dict[int, bytes]]] = {}
    errors: dict[int, BaseException] = {}
    barrier = threading.Barrier(COUNT)

    def worker(i: int) -> None:
        try:
            barrier.wait(30)
            results[i] = run_rm(daemon, i)
        except BaseException as exc:
            errors[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), name=f"run-{i}") for i in range(COUNT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "some requests did not finish within 90 s"
    assert errors == {}, f"{len(errors)} requests failed: {dict(list(errors.items())[:5])}\n{daemon.log()}"
    elapsed = time.monotonic() - started

    wrong = []
    for i, (cid, code, output) in sorted(results.items()):
        want_out = {1: f"out-{i}\n".encode(), 2: f"err-{i}\n".encode()} if i % 2 == 0 else {1: b"", 2: b""}
        if code != i % 7 or output != want_out:
            wrong.append((i, cid[:12], code, output))
    assert wrong == [], f"requests with a wrong exit code or output: {wrong}"
    ids = [cid for cid, _, _ in results.values()]
    assert len(set(ids)) == COUNT

    # nothing left of those containers while the daemon runs (it may keep a pre-started conmon ready
    # for the next container: cocon.engine.prestart), then nothing at all once it stopped
    deadline = time.monotonic() + 10
    while True:
        left = leftovers(daemon, ids)
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    try:
        assert not any(left.values()), (
            f"left behind after {COUNT} run --rm: {left}\n{describe(left['processes'])}\n{daemon.log()[-3000:]}"
        )
    finally:
        for path in cgroups_of(ids):
            remove_cgroup(path)

    # every container's life is in the event log: create, start, die (its exit code), destroy
    filters = urllib.parse.quote(json.dumps({"type": ["container"], "label": ["load"]}))
    reply = daemon.request("GET", f"{API}/events?since=0&until={time.time():.3f}&filters={filters}")
    events = reply.lines()
    for i, (cid, code, _) in results.items():
        mine = [e for e in events if e["Actor"]["ID"] == cid]
        actions = [e["Action"] for e in mine]
        assert actions.count("destroy") == 1 and "create" in actions and "start" in actions, (i, actions)
        die = [e for e in mine if e["Action"] == "die"]
        assert len(die) == 1 and die[0]["Actor"]["Attributes"]["exitCode"] == str(code), (i, die)

    assert daemon.stop() == 0, daemon.log()
    left = leftovers(daemon, None)
    assert not any(left.values()), (
        f"left behind after the daemon stopped: {left}\n{describe(left['processes'])}"
    )
    print(f"{COUNT} concurrent run --rm in {elapsed:.1f} s")
