"""A VM's storage through the real CLI, daemon and QEMU (TCG): snapshots of its disk (stopped and
running), snapshots with its memory (a restore resumes where it was: a counter in a shell variable
goes on from the saved value), and disk volumes hot-plugged into and out of a running VM.

The guests are busybox images booted by cocon's init (`--isolation vm`, "cmd" mode): they start in a
few seconds, and their console (the logs) shows what the guest sees."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON
from daemon_helpers import Daemon, start_daemon, stop_and_clean
from vm_helpers import kill_processes


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = str(tmp_path_factory.mktemp("vmstorage"))
    d = start_daemon(base, env={"COCON_ASSETS_ROOT": os.path.join(base, "assets")})
    try:
        yield d
    finally:
        code, log = stop_and_clean(d)
        left = kill_processes(d.run) + kill_processes(d.run, b"python")
        assert left == [], f"VM processes left behind: {left}"
        assert code == 0 and "Traceback" not in log, log


def cocon(
    d: Daemon, *args: str, timeout: float = 240, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([COCON, *args], env=d.env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc
    return proc


def wait_for_log(d: Daemon, name: str, pattern: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        logs = cocon(d, "logs", name, check=False).stdout
        if re.search(pattern, logs):
            return logs
        assert time.monotonic() < deadline, f"{name}'s console never showed {pattern!r}:\n{logs[-2000:]}"
        time.sleep(0.5)


def test_disk_snapshots_of_a_stopped_vm(daemon: Daemon) -> None:
    name = "snapdisk"
    try:
        cocon(daemon, "run", "--name", name, "--isolation", "vm", "busybox", "sh", "-c",
              "cat /state 2>/dev/null || echo none; echo ${WRITE:-first} > /state")  # fmt: skip
        cocon(daemon, "snapshot", "create", name, "before")
        listing = cocon(daemon, "snapshot", "ls", name).stdout
        assert re.search(r"^before\s+no\s", listing, re.M), listing
        assert cocon(daemon, "start", "-a", name).stdout.strip() == "first"  # the disk kept it
        cocon(daemon, "snapshot", "restore", name, "before")
        assert cocon(daemon, "start", "-a", name).stdout.strip() == "first"  # back to the snapshot
        p = cocon(daemon, "snapshot", "create", name, "before", check=False)
        assert p.returncode != 0 and "already" in p.stderr
        p = cocon(daemon, "snapshot", "create", name, "mem", "--memory", check=False)
        assert p.returncode != 0 and "not running" in p.stderr
        p = cocon(daemon, "snapshot", "restore", name, "nosuch", check=False)
        assert p.returncode != 0 and "no snapshot nosuch" in p.stderr
        cocon(daemon, "snapshot", "rm", name, "before")
        assert "before" not in cocon(daemon, "snapshot", "ls", name).stdout
        p = cocon(daemon, "snapshot", "create", name, "../x", check=False)
        assert p.returncode != 0
    finally:
        cocon(daemon, "rm", "-f", name, check=False)


def test_memory_snapshot_resumes_where_it_was(daemon: Daemon) -> None:
    name = "snapmem"
    counter = "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done"
    try:
        cocon(daemon, "run", "-d", "--name", name, "--isolation", "vm", "busybox", "sh", "-c", counter)
        wait_for_log(daemon, name, r"tick-3\b")
        cocon(daemon, "snapshot", "create", name, "live", "--memory")
        saved = max(int(n) for n in re.findall(r"tick-(\d+)", cocon(daemon, "logs", name).stdout))
        assert re.search(r"^live\s+yes\s", cocon(daemon, "snapshot", "ls", name).stdout, re.M)
        wait_for_log(daemon, name, rf"tick-{saved + 5}\b")  # it runs on after the snapshot
        cocon(daemon, "snapshot", "create", name, "d1")  # a disk-only one of a running VM
        p = cocon(daemon, "snapshot", "restore", name, "d1", check=False)
        assert p.returncode != 0 and "stop it first" in p.stderr
        before = len(cocon(daemon, "logs", name).stdout)
        cocon(daemon, "snapshot", "restore", name, "live")
        time.sleep(4)
        after = cocon(daemon, "logs", name).stdout[before:]
        ticks = [int(n) for n in re.findall(r"tick-(\d+)", after)]
        # the shell's counter went back to where the snapshot was taken and counts on from there
        assert ticks and ticks[0] <= saved + 2 and ticks == list(range(ticks[0], ticks[0] + len(ticks))), (
            after
        )
        assert json.loads(cocon(daemon, "inspect", name).stdout)[0]["State"]["Status"] == "running"
    finally:
        cocon(daemon, "rm", "-f", name, check=False)


def test_disk_volume_hot_plug(daemon: Daemon) -> None:
    name = "hotplug"
    watch = "while true; do echo blocks: $(ls /sys/block | tr '\\n' ' '); sleep 1; done"
    try:
        cocon(daemon, "volume", "create", "--type", "disk", "--size", "64M", "hotdisk")
        cocon(daemon, "run", "-d", "--name", name, "--isolation", "vm", "busybox", "sh", "-c", watch)
        wait_for_log(daemon, name, r"(?m)^blocks: vda\r?$")
        out = cocon(daemon, "vm", "attach-disk", name, "hotdisk").stdout
        assert "/dev/disk/by-id/virtio-hotdisk" in out
        wait_for_log(daemon, name, r"blocks: vda vdb")
        p = cocon(daemon, "vm", "attach-disk", name, "hotdisk", check=False)
        assert p.returncode != 0 and "already" in p.stderr
        before = len(cocon(daemon, "logs", name).stdout)
        cocon(daemon, "vm", "detach-disk", name, "hotdisk")
        deadline = time.monotonic() + 60
        while not re.search(r"(?m)^blocks: vda\r?$", cocon(daemon, "logs", name).stdout[before:]):
            assert time.monotonic() < deadline, "the guest still sees the detached disk"
            time.sleep(0.5)
        p = cocon(daemon, "vm", "detach-disk", name, "hotdisk", check=False)
        assert p.returncode != 0 and "not attached" in p.stderr
        p = cocon(daemon, "run", "--rm", "-v", "hotdisk:/data", "busybox", "true", check=False)
        assert p.returncode != 0 and "disk volumes attach to VMs only" in p.stderr
    finally:
        cocon(daemon, "rm", "-f", name, check=False)
        cocon(daemon, "volume", "rm", "hotdisk", check=False)


def test_the_root_disk_size_of_a_vm_from_an_image(daemon: Daemon) -> None:
    """`--storage-opt size=` (Docker's flag) sizes a VM's root disk and its filesystem: the guest sees
    both without resizing anything."""
    out = cocon(daemon, "run", "--rm", "--isolation", "vm", "--storage-opt", "size=12G", "busybox", "sh", "-c",
                "cat /sys/block/vda/size; df -k / | tail -1").stdout.split()  # fmt: skip
    assert int(out[0]) * 512 == 12 << 30, out
    assert 11 << 20 < int(out[2]) <= 12 << 20, out  # df's 1K-blocks of /: a 12 GiB filesystem
    out = cocon(daemon, "run", "--rm", "--isolation", "vm", "busybox", "cat", "/sys/block/vda/size").stdout
    assert int(out) * 512 == 8 << 30  # the default
    for args, message in ((["--storage-opt", "size=12G"], "applies to VMs (--isolation vm)"),
                          (["--isolation", "vm", "--storage-opt", "size=1M"], "too small for a root disk"),
                          (["--isolation", "vm", "--storage-opt", "quota=1G"], "unknown storage option 'quota'"),
                          (["--isolation", "vm", "--storage-opt", "size"], "give KEY=VALUE")):  # fmt: skip
        p = cocon(daemon, "run", "--rm", *args, "busybox", "true", check=False)
        assert p.returncode == 125 and message in p.stderr, (args, p)
