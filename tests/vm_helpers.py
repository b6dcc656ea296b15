"""Helpers for tests that start QEMU (directly or through microVMs): find the processes of a test by a
marker in their command line (its temporary directory, a run directory, an instance id), and kill
them, so that no test leaves a VM behind."""

from __future__ import annotations

import os
import signal


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


def build_debian_vm(base: str) -> tuple[str, str]:
    """`cocon image bootstrap debian-vm` (offline, from the set-up's tarball) in a daemon of its own,
    saved as an archive that test daemons `cocon load`; and that image made into a disk that boots on
    its own through GRUB (BIOS and UEFI). Returns (archive, disk); the daemon is gone afterwards."""
    import shutil
    import subprocess
    import tempfile

    from cocon.images.store import ImageStore
    from cocon.vmm.guest_images import export_rootfs, make_bootable_disk
    from daemon_helpers import start_daemon, stop_and_clean

    archive, disk = os.path.join(base, "debian-vm.tar"), os.path.join(base, "debian-vm.qcow2")
    d = start_daemon(base)
    try:
        for argv in (["image", "bootstrap", "debian-vm", "--tarball", VM_TARBALL],
                     ["save", "-o", archive, DEBIAN_VM_IMAGE]):  # fmt: skip
            from cli_helpers import COCON

            proc = subprocess.run([COCON, *argv], env=d.env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc
        store = ImageStore(d.root)
        work = tempfile.mkdtemp(dir=base)
        try:
            export_rootfs(store, store.resolve(DEBIAN_VM_IMAGE), os.path.join(work, "rootfs"))
            make_bootable_disk(os.path.join(work, "rootfs"), disk, size="3G")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        stop_and_clean(d)
    return archive, disk
