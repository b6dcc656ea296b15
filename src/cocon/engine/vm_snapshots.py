"""`cocon snapshot create|ls|restore|rm VM NAME`: snapshots of a VM's root disk, and with `--memory`
of its running state too (docs/vm.md).

Snapshots are qcow2 internal snapshots of the root disk (the instance's overlay for a VM from an
image; the disk given to `cocon vm create`, which must then be qcow2):

- create: a stopped VM `qemu-img snapshot -c`; a running one disk only with QMP
  blockdev-snapshot-internal-sync (atomic, the guest runs on), with `--memory` QMP snapshot-save (the
  guest pauses while its RAM is written into the disk).
- restore: a stopped VM `qemu-img snapshot -a`, and for a memory snapshot its next start resumes from
  it (`-loadvm`); a running VM only from a memory snapshot (QMP snapshot-load: disk and machine back,
  running on); a disk snapshot of a running VM is refused (stop it first).
- rm: `qemu-img snapshot -d`, or QMP blockdev-snapshot-delete-internal-sync while it runs.
- ls: `qemu-img snapshot -l` (`-U` while QEMU holds the image).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cocon.engine.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord


def _vm(e: Engine, ref: str) -> InstanceRecord:
    rec = e.containers._get(ref)
    if rec.isolation != "vm":
        raise InvalidRequest(
            f"{rec.name} is not a VM (isolation {rec.isolation}): snapshots are of VM disks; "
            "commit a container with cocon commit"
        )
    return rec


def root_disk(e: Engine, rec: InstanceRecord) -> str:
    """The VM's root disk (qcow2), made on its first start for a VM from an image."""
    from cocon.engine.vm_machines import disks_of, vm_settings

    settings = vm_settings(rec)
    if settings.get("Disk"):
        if settings.get("DiskFormat", "qcow2") != "qcow2":
            raise InvalidRequest(
                f"the disk of {rec.name} is raw: snapshots need qcow2 (convert it with qemu-img convert -O "
                "qcow2, then create the VM from the copy)"
            )
        return str(settings["Disk"])
    path = str(disks_of(e).instance_path(rec.id))
    if not os.path.exists(path):
        raise InvalidRequest(f"{rec.name} has no disk yet: start it once first")
    return path


def _running(e: Engine, rec: InstanceRecord) -> bool:
    return e.containers.status(rec) in ("running", "paused")


def _errors(fn: Any) -> Any:
    from cocon.isolation.base import IsolationError
    from cocon.storage.volumes import VolumeError

    try:
        return fn()
    except (VolumeError, IsolationError) as exc:
        raise InvalidRequest(str(exc)) from None


def list_snapshots(e: Engine, ref: str) -> list[dict[str, Any]]:
    from cocon.storage import qemu_img

    rec = _vm(e, ref)
    disk = root_disk(e, rec)
    snaps = _errors(lambda: qemu_img.snapshot_list(disk, force_share=True))
    return [{"Name": s.name, "Memory": s.vm_state_size > 0, "VmStateSize": s.vm_state_size, "Created": s.date}
            for s in snaps]  # fmt: skip


def _find(e: Engine, ref: str, name: str) -> dict[str, Any] | None:
    return next((s for s in list_snapshots(e, ref) if s["Name"] == name), None)


def create_snapshot(e: Engine, ref: str, name: str, *, memory: bool = False) -> dict[str, Any]:
    from cocon.storage import qemu_img

    rec = _vm(e, ref)
    _errors(lambda: qemu_img.validate_snapshot_name(name))
    disk = root_disk(e, rec)
    if _find(e, rec.id, name) is not None:
        raise Conflict(f"{rec.name} has a snapshot {name} already: remove it or choose another name")
    if _running(e, rec):
        driver = e.driver("vm")
        _errors(lambda: driver.control(rec.id, {"op": "snapshot-save", "name": name, "memory": memory}, 900))  # type: ignore[attr-defined]
    elif memory:
        raise InvalidRequest(f"{rec.name} is not running: a --memory snapshot saves a running VM's state")
    else:
        _errors(lambda: qemu_img.snapshot_create(disk, name))
    e.emit("container", "snapshot-create", rec.id, name=rec.name, snapshot=name)
    snap = _find(e, rec.id, name)
    assert snap is not None
    return snap


def restore_snapshot(e: Engine, ref: str, name: str) -> dict[str, Any]:
    from cocon.storage import qemu_img

    rec = _vm(e, ref)
    snap = _find(e, rec.id, name)
    if snap is None:
        raise NotFound(f"{rec.name} has no snapshot {name}: see cocon snapshot ls {rec.name}")
    disk = root_disk(e, rec)
    if _running(e, rec):
        if not snap["Memory"]:
            raise Conflict(
                f"{name} is a disk snapshot and {rec.name} is running: stop it first (a disk snapshot "
                "restores a stopped VM), or restore a --memory snapshot"
            )
        driver = e.driver("vm")
        _errors(lambda: driver.control(rec.id, {"op": "snapshot-load", "name": name}, 900))  # type: ignore[attr-defined]
        result = {"Restored": name, "Resumed": True}
    elif snap["Memory"]:
        _errors(lambda: qemu_img.snapshot_apply(disk, name))
        config = dict(rec.config)
        config["VM"] = {**(config.get("VM") or {}), "LoadVm": name}  # the next start resumes from it
        e.instances.update(rec.id, config=config)
        e.containers._records.pop(rec.id, None)
        result = {"Restored": name, "Resumed": False, "ResumesAtStart": True}
    else:
        _errors(lambda: qemu_img.snapshot_apply(disk, name))
        result = {"Restored": name, "Resumed": False}
    e.emit("container", "snapshot-restore", rec.id, name=rec.name, snapshot=name)
    return result


def remove_snapshot(e: Engine, ref: str, name: str) -> None:
    from cocon.storage import qemu_img

    rec = _vm(e, ref)
    if _find(e, rec.id, name) is None:
        raise NotFound(f"{rec.name} has no snapshot {name}: see cocon snapshot ls {rec.name}")
    disk = root_disk(e, rec)
    if _running(e, rec):
        driver = e.driver("vm")
        _errors(lambda: driver.control(rec.id, {"op": "snapshot-delete", "name": name}, 300))  # type: ignore[attr-defined]
    else:
        _errors(lambda: qemu_img.snapshot_delete(disk, name))
    e.emit("container", "snapshot-remove", rec.id, name=rec.name, snapshot=name)
