"""Helpers for tests that start QEMU (directly or through microVMs): find the processes of a test by a
marker in their command line (its temporary directory, a run directory, an instance id), and kill
them, so that no test leaves a VM behind."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


def processes_naming(marker: str, program: bytes = b"qemu-system") -> list[int]:
    """Live processes whose program name contains `program` and whose command line mentions `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and program in argv[0] and any(marker.encode() in a for a in argv):
            pids.append(int(entry))
    return pids


def kill_processes(marker: str, program: bytes = b"qemu-system") -> list[int]:
    """SIGKILL what `processes_naming` finds; the pids that were still there."""
    pids = processes_naming(marker, program)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


# --- a Debian guest for full-VM tests, made once per test session ----------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VM_TARBALL = os.path.join(REPO, ".cache", "debootstrap-bookworm-vm.tgz")
DEBIAN_VM_IMAGE = "debian-vm:bookworm"


@dataclass
class DebianVm:
    """What build_debian_vm made: the image's archive (to `cocon load`), its bootable disk (copy it
    before booting), the builder's image store root, the exported root file system, the disk's
    description (cocon.vmm.guest_images.BootableDisk) and the progress make_bootable_disk reported."""

    archive: str
    disk: str
    root: str
    rootfs: str
    bootable: Any
    events: list[tuple[str, int, int]]


def build_debian_vm(base: str) -> DebianVm:
    """`cocon image bootstrap debian-vm` (offline, from the set-up's tarball) in a daemon of its own,
    saved as an archive that test daemons `cocon load`; and that image made into a disk that boots on
    its own through GRUB (BIOS and UEFI). The daemon is gone afterwards; its image store stays."""
    import subprocess

    from cli_helpers import COCON
    from cocon.images.store import ImageStore
    from cocon.vmm.guest_images import export_rootfs, make_bootable_disk
    from daemon_helpers import start_daemon, stop_and_clean

    archive, disk = os.path.join(base, "debian-vm.tar"), os.path.join(base, "debian-vm.qcow2")
    rootfs = os.path.join(base, "rootfs")
    events: list[tuple[str, int, int]] = []
    d = start_daemon(base)
    try:
        for argv in (["image", "bootstrap", "debian-vm", "--tarball", VM_TARBALL],
                     ["save", "-o", archive, DEBIAN_VM_IMAGE]):  # fmt: skip
            proc = subprocess.run([COCON, *argv], env=d.env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc
        store = ImageStore(d.root)
        try:
            export_rootfs(store, store.resolve(DEBIAN_VM_IMAGE), rootfs)
        finally:
            store.close()
        bootable = make_bootable_disk(rootfs, disk, size="3G", progress=lambda *e: events.append(e))
    finally:
        stop_and_clean(d)
    return DebianVm(archive, disk, d.root, rootfs, bootable, events)


# --- two daemons, the second as another host would be (for live migration) ---------------------------


@contextmanager
def two_hosts(base: str, env: dict[str, str] | None = None) -> Iterator[tuple[Any, Any, str, str]]:
    """(source daemon, target daemon, the target's token file, the target's URI): the target has its own
    root and its own network namespace, reached over a veth pair (a random 10.251.N.0/30, so that two
    runs at once do not reach each other's target) as another host would be, its API on TCP with a
    bearer token (and on its Unix socket). Afterwards both daemons are stopped and cleaned, no VM
    process of theirs is left, the namespace and the link are gone."""
    import secrets
    import subprocess

    from daemon_helpers import Daemon, new_roots, start_daemon, stop_and_clean

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    netns, veth = f"cmig-{secrets.token_hex(3)}", f"cmig{secrets.token_hex(2)}"
    subnet = secrets.randbelow(250) + 1
    host_addr, target_addr, port = (
        f"10.251.{subnet}.1",
        f"10.251.{subnet}.2",
        20000 + secrets.randbelow(10000),
    )
    daemons: list[Daemon] = []
    ip("netns", "add", netns)
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth-mig", "netns", netns)
        ip("addr", "add", f"{host_addr}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("-n", netns, "addr", "add", f"{target_addr}/30", "dev", "eth-mig")
        ip("-n", netns, "link", "set", "eth-mig", "up")
        ip("-n", netns, "link", "set", "lo", "up")
        for side in ("a", "b"):
            os.makedirs(os.path.join(base, side))
        source = start_daemon(os.path.join(base, "a"), env=env)
        daemons.append(source)
        root, run = new_roots(os.path.join(base, "b"))
        token = os.path.join(base, "token")
        with open(token, "w", opener=lambda p, f: os.open(p, f, 0o600)) as f:
            f.write(secrets.token_hex(16))
        uri = f"tcp://{target_addr}:{port}"
        target = start_daemon(
            os.path.join(base, "b"), "-H", f"unix://{run}/cocon.sock", "-H", uri, "--auth-token-file", token,
            root=root, run=run, env=env, prefix=["nsenter", f"--net=/run/netns/{netns}"],
        )  # fmt: skip
        daemons.append(target)
        yield source, target, token, uri
    finally:
        failures = []
        for d in daemons:
            code, log = stop_and_clean(d)
            left = kill_processes(d.run) + kill_processes(d.run, b"python")
            if left or code != 0 or "Traceback" in log:
                failures.append(f"daemon {d.run}: exit {code}, left {left}\n{log[-3000:]}")
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        assert not failures, "\n".join(failures)
