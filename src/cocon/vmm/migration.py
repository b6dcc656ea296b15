"""Live migration of a running QEMU to another QEMU (the QMP side; cocon.isolation.vm_migration runs it
in the VM's shim, cocon.engine.vm_migration between the daemons; docs/vm-migration.md).

The order is libvirt's for storage that is not shared:

1. The target QEMU starts with `-incoming defer` and the same devices, its disks empty files of the
   source's sizes, and exports them over NBD (`export_disks`).
2. The source mirrors each disk into the target's export (blockdev-mirror, sync=full) while the guest
   runs on; once a mirror has copied everything it is "ready" and keeps both sides in step.
3. The RAM: QEMU's pre-copy migration over one stream. The guest pauses only for the last dirty pages
   and the device state: that pause is the downtime QEMU reports.
4. When the source's migration completes (its guest paused), the mirrors are cancelled: a ready mirror
   that is cancelled has written everything first, so the target's disks equal the source's at the
   pause. Only then does the target resume the guest (`finish_incoming`). Resuming it any earlier could
   let the guest's new writes race the mirror's last ones.

Every connection is made by the caller and passed in as a file descriptor (QMP getfd): the shim that
owns QEMU lives in the instance's network namespace, the connections belong to the host's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cocon.vmm.errors import QemuError
from cocon.vmm.qemu import Qemu

#: The downtime QEMU aims for (its migration parameter downtime-limit; QEMU's default is 300 ms).
DOWNTIME_LIMIT_MS = 300
#: No bandwidth cap (QEMU's default max-bandwidth is 128 MiB/s, slower than a local link).
MAX_BANDWIDTH = 1 << 40


@dataclass(frozen=True)
class MigrationResult:
    """What the source measured: the guest's pause up to the last byte sent (QEMU's downtime), the RAM
    phase's wall time (QEMU's total-time), the whole migration including the disk copy, the bytes
    that moved (the disk's: the size the mirror went through, unallocated ranges as zero writes), and
    when (CLOCK_MONOTONIC) the migration was seen complete: the guest stays paused until the target
    resumes it, which the caller times from there."""

    downtime_ms: int
    ram_ms: int
    total_ms: int
    disk_ms: int
    ram_bytes: int
    disk_bytes: int
    completed_at: float

    def as_dict(self) -> dict[str, int]:
        return {"DowntimeMs": self.downtime_ms, "RamMs": self.ram_ms, "TotalMs": self.total_ms,
                "DiskMs": self.disk_ms, "RamBytes": self.ram_bytes, "DiskBytes": self.disk_bytes}  # fmt: skip


# --- the target ---------------------------------------------------------------------------------------


def export_disks(vm: Qemu, listener_fd: int, exports: Mapping[str, str]) -> None:
    """Serve the disks (drive node → export name; a name hard to guess keeps others out) writable over
    NBD on the listening socket `listener_fd`, for the source's mirrors."""
    if not exports:
        return
    vm.pass_fd("mig-nbd", listener_fd)
    vm.qmp("nbd-server-start", {"addr": {"type": "fd", "data": {"str": "mig-nbd"}}})
    for node, name in exports.items():
        vm.qmp("block-export-add", {"type": "nbd", "id": f"mig-{node}", "node-name": f"{node}-node",
                                    "name": name, "writable": True})  # fmt: skip


def accept_incoming(vm: Qemu, stream_fd: int) -> None:
    """Read the migration stream from the connected socket `stream_fd` (QEMU started -incoming defer)."""
    vm.pass_fd("mig-in", stream_fd)
    vm.qmp("migrate-incoming", {"uri": "fd:mig-in"})


def finish_incoming(vm: Qemu, *, exported: bool, timeout: float = 120.0) -> None:
    """The source has handed over (its migration completed, its mirrors flushed): wait until this side
    has loaded everything, stop the NBD exports and run the guest."""
    vm.wait_for_migration("the incoming migration", time.monotonic() + timeout)
    if exported:
        vm.qmp("nbd-server-stop")  # its exports go with it
    vm.qmp("cont")


# --- the source ---------------------------------------------------------------------------------------


def send(
    vm: Qemu,
    disks: Mapping[str, tuple[int, str]],
    stream_fd: int,
    *,
    downtime_limit_ms: int = DOWNTIME_LIMIT_MS,
    timeout: float = 3600.0,
) -> MigrationResult:
    """Migrate the running VM: each disk node in `disks` mirrored to the NBD connection given for it
    (node → the connected socket and the export's name), then the RAM and devices over `stream_fd`.
    On return the source is paused for good ("postmigrate") and the target can be resumed; on failure
    (QemuError) nothing of the migration is left and the guest runs on here."""
    started = time.monotonic()
    deadline = started + timeout
    nodes: list[str] = []
    jobs: list[str] = []
    migrating = False
    try:
        for node, (fd, export) in disks.items():
            vm.pass_fd(f"mig-nbd-{node}", fd)
            vm.qmp("blockdev-add", {"driver": "nbd", "node-name": f"mig-{node}", "export": export,
                                    "server": {"type": "fd", "str": f"mig-nbd-{node}"}})  # fmt: skip
            nodes.append(f"mig-{node}")
            vm.qmp("blockdev-mirror", {"job-id": f"mig-{node}", "device": f"{node}-node", "sync": "full",
                                       "target": f"mig-{node}", "auto-dismiss": False})  # fmt: skip
            jobs.append(f"mig-{node}")
        _wait_jobs(vm, jobs, "ready", deadline)
        disk_done = time.monotonic()
        limits = {"downtime-limit": downtime_limit_ms, "max-bandwidth": MAX_BANDWIDTH}
        vm.qmp("migrate-set-parameters", limits)
        vm.pass_fd("mig-out", stream_fd)
        vm.qmp("migrate", {"uri": "fd:mig-out"})
        migrating = True
        info = vm.wait_for_migration("the migration", deadline)
        completed_at = time.monotonic()
        copied = [j for j in vm.qmp("query-jobs") if j.get("id") in jobs]
        disk_bytes = sum(int(j.get("total-progress") or 0) for j in copied)
        for job in jobs:  # a ready mirror cancelled writes what is left, then stops (no switch-over)
            vm.qmp("block-job-cancel", {"device": job})
        _wait_jobs(vm, jobs, "concluded", deadline, failed_ok=False)
        ram = info.get("ram") or {}
        return MigrationResult(
            downtime_ms=int(info.get("downtime") or 0), ram_ms=int(info.get("total-time") or 0),
            total_ms=int((time.monotonic() - started) * 1000), disk_ms=int((disk_done - started) * 1000),
            ram_bytes=int(ram.get("transferred") or 0), disk_bytes=disk_bytes, completed_at=completed_at,
        )  # fmt: skip
    except BaseException:
        if migrating:
            _quietly(vm, "migrate_cancel")
        for job in jobs:
            _quietly(vm, "block-job-cancel", {"device": job, "force": True})
        _wait_gone_quietly(vm, jobs)
        if migrating and _status(vm) in ("postmigrate", "finish-migrate"):
            _quietly(vm, "cont")  # the handover failed after the pause: the guest runs on here
        raise
    finally:
        for job in jobs:
            _quietly(vm, "job-dismiss", {"id": job})
        for node in nodes:
            _quietly(vm, "blockdev-del", {"node-name": node})


def resume_after_failed_handover(vm: Qemu) -> None:
    """The target could not take the guest after the source completed: run it here again (QEMU takes
    its disks back)."""
    if _status(vm) in ("postmigrate", "paused", "finish-migrate"):
        vm.qmp("cont")


def _wait_jobs(vm: Qemu, jobs: Sequence[str], state: str, deadline: float, failed_ok: bool = False) -> None:
    """Until every job reaches `state` ("ready" or "concluded"); QemuError with the job's error."""
    while True:
        by_id = {j.get("id"): j for j in vm.qmp("query-jobs")}
        waiting = False
        for job in jobs:
            info: dict[str, Any] = by_id.get(job) or {}
            if info.get("error") and not failed_ok:
                raise QemuError(f"copying the disk ({job}) failed: {info['error']}")
            if not info or info.get("status") == "concluded":
                if state == "ready" and not failed_ok:
                    raise QemuError(f"copying the disk ({job}) stopped before it was in sync")
                continue
            if info.get("status") != state:
                waiting = True
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise QemuError(f"the disk copy did not reach {state} in time")
        time.sleep(0.05)


def _wait_gone_quietly(vm: Qemu, jobs: Sequence[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            live = [j for j in vm.qmp("query-jobs") if j.get("id") in jobs and j.get("status") != "concluded"]
        except QemuError:
            return
        if not live:
            return
        time.sleep(0.05)


def _status(vm: Qemu) -> str:
    try:
        return vm.status()
    except QemuError:
        return ""


def _quietly(vm: Qemu, command: str, arguments: Mapping[str, object] | None = None) -> None:
    try:
        vm.qmp(command, arguments)
    except QemuError:
        pass
