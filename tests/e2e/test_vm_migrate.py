"""Live migration of a running VM between two real daemons (`cocon vm migrate`), under TCG.

The target daemon has its own root and its own network namespace, reached over a veth pair as another
host would be: its API on TCP with a bearer token, QEMU's migration stream and the NBD disk copy on
TCP too. The guest is busybox run by cocon's init (`--isolation vm`): a shell counter prints on the
console once a second, so the target's logs show whether it went on or started again; the command
also writes a file to its root disk first, which a later restart on the target reads back (the disk
was copied, not shared)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON
from daemon_helpers import Daemon
from vm_helpers import kill_processes, two_hosts

COUNTER = (
    "cat /state 2>/dev/null || echo none; echo kept > /state; sync; "
    "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done"
)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon, str, str]]:
    """(source daemon, target daemon in its own network namespace, the target's token file, its URI)."""
    base = str(tmp_path_factory.mktemp("vmmigrate"))
    with two_hosts(base, {"COCON_ASSETS_ROOT": os.path.join(base, "assets")}) as pair:
        yield pair


def cocon(
    d: Daemon, *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([COCON, *args], env=d.env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc
    return proc


def ticks(d: Daemon, name: str) -> list[int]:
    return [int(n) for n in re.findall(r"^tick (\d+)", cocon(d, "logs", name, check=False).stdout, re.M)]


def wait_for(condition: object, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def vm_row(d: Daemon, name: str) -> dict[str, Any]:
    """`cocon vm ls --format json`'s line of VM `name`."""
    rows = [json.loads(line) for line in cocon(d, "vm", "ls", "--format", "json").stdout.splitlines()]
    return next(row for row in rows if row["Name"] == name)


def address(d: Daemon, name: str) -> str:
    doc = json.loads(cocon(d, "inspect", name).stdout)[0]
    networks = doc["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def test_a_running_vm_moves_with_its_memory_disk_and_address(hosts: tuple[Daemon, Daemon, str, str]) -> None:
    source, target, token, to = hosts
    name = "mover"
    try:
        cocon(source, "run", "-d", "--name", name, "--isolation", "vm", "-m", "512m", "busybox", "sh", "-c",
              COUNTER)  # fmt: skip
        wait_for(lambda: len(ticks(source, name)) >= 3, "the counter never started on the source")
        ip = address(source, name)
        before = ticks(source, name)[-1]
        p = cocon(source, "vm", "migrate", name, "--to", to, "--auth-token-file",
                  token, "--format", "json", timeout=900)  # fmt: skip
        result = json.loads(p.stdout)
        assert (
            result["Name"] == name
            and 0 <= result["DowntimeMs"] <= result["PauseMs"]
            and result["RamBytes"] > 0
        )
        assert result["DiskBytes"] > 0  # the root disk was copied
        # gone here, running there with the same address
        assert cocon(source, "ps", "-a", "-q", "--filter", f"name={name}").stdout.strip() == ""
        assert kill_processes(source.run) == []
        assert json.loads(cocon(target, "inspect", name).stdout)[0]["State"]["Running"] is True
        assert address(target, name) == ip
        # the counter went on from where it was: the guest's memory moved, it did not boot again
        wait_for(lambda: len(ticks(target, name)) >= 3, "the counter does not go on on the target")
        after = ticks(target, name)
        assert after[0] > before and after[0] <= before + 60, (before, after)
        assert after == list(range(after[0], after[0] + len(after)))
        assert "none" not in cocon(target, "logs", name).stdout  # the command did not start over
        # the guest answers on its address from a container on the target's network
        ping = cocon(target, "run", "--rm", "busybox", "ping", "-c", "1", "-W", "5", ip, check=False)
        assert ping.returncode == 0, ping
        # its disk came along: the command, started again there, reads what it wrote at the source
        cocon(target, "stop", "-t", "5", name)
        cocon(target, "start", name)
        wait_for(lambda: "kept" in cocon(target, "logs", name).stdout, "the disk's file did not come along")
    finally:
        cocon(source, "rm", "-f", name, check=False)
        cocon(target, "rm", "-f", name, check=False)


def test_a_refused_migration_leaves_the_vm_running_here(hosts: tuple[Daemon, Daemon, str, str]) -> None:
    source, target, token, to = hosts
    name = "stayer"
    try:
        cocon(source, "run", "-d", "--name", name, "--isolation", "vm", "busybox", "sh", "-c", COUNTER)
        wait_for(lambda: len(ticks(source, name)) >= 1, "the counter never started")
        # a wrong token: the target refuses
        wrong = token + ".wrong"
        with open(wrong, "w") as f:
            f.write("not-the-token")
        p = cocon(source, "vm", "migrate", name, "--to", to, "--auth-token-file", wrong, check=False)
        assert p.returncode != 0 and "--auth-token-file" in p.stderr and "runs on here" in p.stderr, p
        # the name is taken there: refused before anything moves
        cocon(target, "create", "--name", name, "busybox", "true")
        p = cocon(source, "vm", "migrate", name, "--to", to, "--auth-token-file", token, check=False)
        assert p.returncode != 0 and f"named {name} exists" in p.stderr, p
        cocon(target, "rm", name)
        # the image of a VM made from one must be there first
        context = os.path.join(source.root, "..", "ctx")
        os.makedirs(context, exist_ok=True)
        with open(os.path.join(context, "Containerfile"), "w") as f:
            f.write("FROM busybox\nLABEL only.here=1\n")
        cocon(source, "build", "-t", "onlyhere", context)
        cocon(source, "run", "-d", "--name", "onlyhere", "--isolation", "vm", "onlyhere", "sleep", "600")
        p = cocon(source, "vm", "migrate", "onlyhere", "--to", to, "--auth-token-file", token, check=False)
        assert p.returncode != 0 and "pull or load it here first" in p.stderr, p
        cocon(source, "rm", "-f", "onlyhere")
        # a bad address: nothing listens there
        p = cocon(source, "vm", "migrate", name, "--to", to.rsplit(":", 1)[0] + ":1", "--auth-token-file", token,
                  check=False)  # fmt: skip
        assert p.returncode != 0 and "cannot reach" in p.stderr, p
        p = cocon(source, "vm", "migrate", name, "--to", "ftp://x", check=False)
        assert p.returncode != 0 and "tcp://ADDR:PORT" in p.stderr, p
        # still running here, counting on; nothing on the target
        count = len(ticks(source, name))
        wait_for(lambda: len(ticks(source, name)) > count, "the VM stopped counting after the refusals")
        assert json.loads(cocon(source, "inspect", name).stdout)[0]["State"]["Running"] is True
        assert cocon(target, "ps", "-a", "-q").stdout.strip() == ""
        assert kill_processes(target.run) == []
        # a stopped VM does not migrate
        cocon(source, "stop", "-t", "5", name)
        p = cocon(source, "vm", "migrate", name, "--to", to, "--auth-token-file", token, check=False)
        assert p.returncode != 0 and "only a running VM migrates" in p.stderr, p
    finally:
        cocon(source, "rm", "-f", name, check=False)
        cocon(target, "rm", "-f", name, check=False)


TICKER = """#cloud-config
runcmd:
  - [systemd-run, --unit=ticker, sh, -c, 'i=0; while :; do i=$((i+1)); echo tick $i > /dev/ttyS0; sleep 1; done']
"""


def test_a_disk_vm_moves_on_shared_storage_and_back_with_a_copy(
    hosts: tuple[Daemon, Daemon, str, str], debian_vm: tuple[str, str], tmp_path: Any
) -> None:
    """A `cocon vm create` VM (Debian booted by SeaBIOS and GRUB, a cloud-init seed) moves to the daemon
    on this machine over its Unix socket with --shared-storage (the target opens the same disk file), then
    back with its disk copied into the daemon's store; the guest's counter runs on through both. The
    counter is started by the seed's runcmd: it is also the test that a cloud-init seed is applied."""
    source, target, _, _ = hosts
    disk, user_data = str(tmp_path / "deb.qcow2"), tmp_path / "user-data"
    shutil.copyfile(debian_vm[1], disk)
    user_data.write_text(TICKER)
    name = "debmover"
    try:
        cocon(source, "vm", "create", name, "--disk", disk, "--cloud-init", str(user_data))
        cocon(source, "vm", "start", name)
        wait_for(lambda: len(ticks(source, name)) >= 2, "the guest's counter never started", timeout=600)
        last = ticks(source, name)[-1]
        p = cocon(source, "vm", "migrate", name, "--to", f"unix://{target.sock}", "--shared-storage",
                  "--format", "json", timeout=600)  # fmt: skip
        moved = json.loads(p.stdout)
        assert moved["DiskBytes"] == 0, moved  # nothing copied: the root disk is shared, the seed sent along
        vm = vm_row(target, name)
        assert vm["Disk"] == disk and vm["State"] == "running", vm
        wait_for(lambda: ticks(target, name) and ticks(target, name)[0] > last, "no tick on the target")
        assert os.path.exists(disk)  # the source let go of the VM, not of the user's disk
        # back, the disk copied this time (into the source daemon's store)
        last = ticks(target, name)[-1]
        p = cocon(
            target, "vm", "migrate", name, "--to", f"unix://{source.sock}", "--format", "json", timeout=900
        )
        back = json.loads(p.stdout)
        assert back["DiskBytes"] >= os.path.getsize(debian_vm[1]) // 2, back
        wait_for(lambda: ticks(source, name) and ticks(source, name)[0] > last, "no tick back at the source")
        vm = vm_row(source, name)
        assert vm["Disk"].startswith(source.root) and vm["State"] == "running", vm
        p = cocon(
            source, "vm", "migrate", name, "--to", f"unix://{target.sock}", "--shared-storage", check=False
        )
        assert p.returncode != 0 and "without --shared-storage" in p.stderr, p
    finally:
        cocon(source, "rm", "-f", name, check=False)
        cocon(target, "rm", "-f", name, check=False)


def test_a_target_that_dies_midway_leaves_the_vm_running_here(hosts: tuple[Daemon, Daemon, str, str]) -> None:
    """The target's QEMU is killed as soon as the disk copy reaches it (its new disk file grows): the
    source gives up, tells the target to drop the instance, and its guest counts on."""
    import threading

    source, target, _, _ = hosts
    name = "survivor"
    stop = threading.Event()
    killed: list[int] = []

    def migration_sockets() -> list[str]:  # next to the shims' state, under the target's run dir
        return [n for _, _, files in os.walk(target.run) for n in files if n.startswith("mig-")]

    def kill_the_target_qemu() -> None:
        instances = os.path.join(target.root, "disks", "instances")
        first: dict[str, int] = {}
        while not stop.is_set():
            try:
                names = os.listdir(instances)
            except FileNotFoundError:
                names = []
            for cid in names:
                try:
                    size = os.stat(os.path.join(instances, cid, "root.qcow2")).st_size
                except FileNotFoundError:
                    continue
                if size > first.setdefault(cid, size):  # the mirror's first writes landed
                    killed.extend(kill_processes(target.run))
                    return
            time.sleep(0.005)

    try:
        cocon(source, "run", "-d", "--name", name, "--isolation", "vm", "busybox", "sh", "-c", COUNTER)
        wait_for(lambda: len(ticks(source, name)) >= 1, "the counter never started")
        watcher = threading.Thread(target=kill_the_target_qemu, daemon=True)
        watcher.start()
        p = cocon(source, "vm", "migrate", name, "--to", f"unix://{target.sock}", check=False)
        stop.set()
        watcher.join(5)
        assert killed, "the disk copy was never seen reaching the target"
        assert (
            p.returncode != 0 and f"migrating {name} to" in p.stderr and f"{name} runs on here" in p.stderr
        ), p
        count = len(ticks(source, name))
        wait_for(lambda: len(ticks(source, name)) > count, "the VM stopped counting after the failure")
        assert json.loads(cocon(source, "inspect", name).stdout)[0]["State"]["Running"] is True
        assert cocon(target, "ps", "-a", "-q").stdout.strip() == ""  # the incoming instance is gone
        assert kill_processes(target.run) == []
        assert migration_sockets() == []  # nor its sockets
    finally:
        stop.set()
        cocon(source, "rm", "-f", name, check=False)
        cocon(target, "rm", "-f", name, check=False)
