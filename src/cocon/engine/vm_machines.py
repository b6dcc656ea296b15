"""The machine of a full VM (`--isolation vm`, `cocon vm create`): what the engine prepares before
the VM driver starts it (cocon.isolation.vm's machine document).

- An instance from an OCI image gets its root disk from cocon.storage.vm_disks: the image's base
  disk (built once per image from a read-only view of its layers) and the instance's own
  copy-on-write overlay, which persists across stop and start and goes with `cocon rm`. The boot
  mode follows the image (cocon.isolation.vm.boot_mode); an image's own kernel and initrd are
  copied out of it next to the overlay.
- A VM made by `cocon vm create` boots its disk (and ISO) through firmware; its record's "VM"
  section says which files.
- Disk volumes (`cocon volume create --type disk`) in the instance's mounts become further virtio
  disks whose serial is the volume's name (/dev/disk/by-id/virtio-<name> in the guest).
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

from cocon.engine.errors import EngineError, InvalidRequest

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord

#: The root disk's size (the filesystem's, and the overlay's virtual size) without --disk-size.
DEFAULT_DISK_SIZE = 8 << 30


def disks_of(e: Engine) -> Any:
    from cocon.storage.vm_disks import VmDisks

    return VmDisks(os.path.join(e.root, "disks"))


def vm_settings(rec: InstanceRecord) -> dict[str, Any]:
    """The record's "VM" section (firmware, disk size, files of a `cocon vm create` VM)."""
    settings = rec.config.get("VM")
    return settings if isinstance(settings, dict) else {}


def prepare(e: Engine, rec: InstanceRecord, rootfs: str | None) -> dict[str, Any]:
    """The machine document for starting `rec` (`rootfs`: its mounted root filesystem, None for a
    VM made from a disk)."""
    from cocon.isolation.vm import machine_size
    from cocon.storage.volumes import VolumeError

    settings = vm_settings(rec)
    limits = rec.config.get("Limits") or {}
    memory, cpus = machine_size(limits.get("Memory"), limits.get("Cpus"))
    disks = disks_of(e)
    directory = disks.instance_dir(rec.id)
    os.makedirs(directory, 0o700, exist_ok=True)
    machine: dict[str, Any] = {
        "memory_mib": memory, "cpus": cpus, "firmware": settings.get("Firmware") or "bios",
        "nvram": directory, "disks": [],
    }  # fmt: skip
    try:
        if rootfs is not None:
            machine.update(_image_machine(e, rec, rootfs, disks, directory, settings))
        else:
            machine["mode"] = "firmware"
            machine["root"] = {"path": settings["Disk"], "format": settings.get("DiskFormat", "qcow2")}
            machine["iso"] = settings.get("Iso")
            machine["seed"] = settings.get("Seed")
        attached = [{"Type": "volume", "Name": v, "RW": True} for v in settings.get("Disks") or []]
        for m in [*(rec.config.get("Mounts") or []), *attached]:
            if m.get("Type") != "volume":
                continue
            volume = e.volumes.get(m["Name"])
            if getattr(volume, "type", "dir") == "disk":
                machine["disks"].append({
                    "path": volume.disk_path, "format": "qcow2", "serial": volume.name[:20],
                    "node": f"vol-{volume.name}"[:31], "readonly": not m.get("RW", True),
                })  # fmt: skip
    except VolumeError as exc:
        raise EngineError(str(exc)) from None
    if settings.get("Incoming"):  # the target of a live migration: QEMU waits for the source's state
        machine["incoming"] = "defer"
    if settings.get("LoadVm"):  # a --memory snapshot restored while stopped: resume from it, once
        machine["loadvm"] = settings["LoadVm"]
        config = dict(rec.config)
        config["VM"] = {k: v for k, v in settings.items() if k != "LoadVm"}
        e.instances.update(rec.id, config=config)
    return machine


def _image_machine(
    e: Engine, rec: InstanceRecord, rootfs: str, disks: Any, directory: str, settings: dict[str, Any]
) -> dict[str, Any]:  # fmt: skip
    from cocon.isolation.vm import boot_mode, image_kernel
    from cocon.storage.volumes import VolumeError

    size = int(settings.get("DiskSize") or DEFAULT_DISK_SIZE)
    try:
        # a base per image and size (--storage-opt size): the guest's filesystem has the disk's size
        root = str(disks.instance_path(rec.id))
        if not os.path.exists(root):  # else made before (or by a migration: a full copy, no base)
            root = disks.instance_disk(rec.id, _image_base(e, rec, disks, size))
    except VolumeError as exc:
        raise EngineError(f"cannot make the VM's root disk: {exc}") from None
    body = rec.config.get("Create") or {}
    image_cmd = [str(rec.config.get("Path") or ""), *[str(a) for a in rec.config.get("Args") or []]]
    mode, init = boot_mode(
        rootfs, command_given=bool(body.get("Cmd") or body.get("Entrypoint")), image_cmd=image_cmd
    )
    machine: dict[str, Any] = {"mode": mode, "root": {"path": root, "format": "qcow2"}, "init": init}
    if mode == "kernel":
        found = image_kernel(rootfs)
        assert found is not None
        kernel, initrd = found
        machine["kernel"] = _copy_boot_file(kernel, os.path.join(directory, "vmlinuz"))
        machine["initrd"] = _copy_boot_file(initrd, os.path.join(directory, "initrd.img")) if initrd else None
    return machine


def _image_base(e: Engine, rec: InstanceRecord, disks: Any, size: int) -> str:
    """The image's base disk of `size`: built from a read-only view of its layers (never the
    instance's own writes), once per image and size."""
    from cocon.snapshots.errors import SnapshotError

    existing = disks.cached_image_base(rec.image, size)
    if existing:
        return str(existing)
    key = f"vmbase-{rec.image.removeprefix('sha256:')[:32]}-{os.urandom(4).hex()}"
    snapshotter = e.snapshotter
    try:
        snapshotter.prepare(key, list(rec.config.get("ChainIDs") or []), readonly=True)
        try:
            view = snapshotter.mount(key)
            return str(disks.image_base(rec.image, view, size=size))
        finally:
            try:
                snapshotter.unmount(key)
            finally:
                snapshotter.remove(key)
    except SnapshotError as exc:
        raise EngineError(f"cannot read the image's layers for its VM disk: {exc}") from None


def _copy_boot_file(source: str, target: str) -> str:
    """Copy a kernel or initrd out of the image (once: the image does not change)."""
    if not os.path.exists(target):
        tmp = target + ".tmp"
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
    return target


def remove_instance(e: Engine, rec: InstanceRecord) -> None:
    """`cocon rm` of a VM: its overlay, copied kernel, UEFI variables go; a `cocon vm create` VM's own
    disk file is the user's and stays (see `cocon vm rm --delete-disk`)."""
    disks_of(e).remove_instance(rec.id)
    settings = vm_settings(rec)
    if settings.get("DeleteDisk") and settings.get("Disk"):
        try:
            os.unlink(settings["Disk"])
        except FileNotFoundError:
            pass


def validate_vm_request(spec: dict[str, Any]) -> None:
    """Checks of a `cocon vm create` body that need no engine state."""
    firmware = spec.get("Firmware") or "bios"
    if firmware not in ("bios", "uefi"):
        raise InvalidRequest(f"unknown firmware {firmware!r}: use bios or uefi")
