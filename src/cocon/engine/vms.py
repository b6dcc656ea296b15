"""`cocon vm create`: a full VM from any disk or ISO (no image): validation and the instance record.

The VM is an instance like any other (isolation "vm", no image): `cocon vm start/stop/console/rm`
are the container life cycle's start, stop (ACPI power button, then force), attach and remove, and
`cocon ps` lists it. Its record's "VM" section holds the files (cocon.engine.vm_machines reads it):

    Disk, DiskFormat    the boot disk, used in place (created with DiskSize when it does not exist,
                        grown to DiskSize when it is smaller); CreatedDisk: cocon made it
    Iso                 an installer or live ISO (a CD-ROM that boots first)
    Seed                the NoCloud seed cocon built from --cloud-init (in the instance's disk dir)
    Firmware            "bios" or "uefi"
    DeleteDisk          set by `cocon vm rm --delete-disk`

Everything a user gives is checked before anything is made (cocon.storage.qemu_img.inspect_user_disk:
raw or qcow2, not corrupt, no backing file; cocon.vmm.media.check_iso; firmware installed; cloud-init
user data valid); a failure leaves nothing behind (no record, no created disk, no seed).
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
from typing import TYPE_CHECKING, Any

from cocon.engine.errors import InvalidRequest

if TYPE_CHECKING:
    from cocon.engine.engine import Engine

#: The fields of `POST /cocon/v1/vms` and their types.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "Name": str, "Disk": str, "DiskSize": (str, int), "Iso": str, "Firmware": str, "Cpus": (int, float),
    "Memory": (str, int), "CloudInit": str, "NetworkConfig": str, "Network": str, "Hostname": str,
    "Volumes": list,
}  # fmt: skip


def create_vm(e: Engine, doc: Any) -> dict[str, Any]:
    """`POST /cocon/v1/vms`: validate, prepare the disk and seed, record the instance; {"Id", "Warnings"}.
    CloudInit and NetworkConfig are base64 (the files' bytes)."""
    from cocon.storage import qemu_img
    from cocon.storage.volumes import VolumeError
    from cocon.vmm.errors import VmmError

    if not isinstance(doc, dict):
        raise InvalidRequest("the VM request must be a JSON object")
    for key, value in doc.items():
        if key not in FIELDS:
            raise InvalidRequest(f"unknown field {key!r} in the VM request: use {', '.join(FIELDS)}")
        if value is not None and not isinstance(value, FIELDS[key]):
            raise InvalidRequest(f"{key} has the wrong type")
    name = doc.get("Name")
    if not name:
        raise InvalidRequest("a VM needs a name: cocon vm create NAME --disk FILE")
    disk = doc.get("Disk")
    if not disk:
        raise InvalidRequest(
            "a VM needs a disk: --disk FILE (an existing raw or qcow2 image, or a new one with --disk-size)"
        )
    if not os.path.isabs(disk):
        raise InvalidRequest(f"the disk path {disk!r} must be absolute")
    firmware = doc.get("Firmware") or "bios"
    if firmware not in ("bios", "uefi"):
        raise InvalidRequest(f"unknown firmware {firmware!r}: use bios or uefi")
    try:
        size = qemu_img.parse_size(doc["DiskSize"]) if doc.get("DiskSize") not in (None, "", 0) else None
        memory = qemu_img.parse_size(doc["Memory"]) if doc.get("Memory") not in (None, "", 0) else None
    except (VolumeError, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None
    cpus = doc.get("Cpus")
    if cpus is not None and not 0 < float(cpus) <= 255:
        raise InvalidRequest(f"--cpus {cpus}: give between 1 and 255")
    iso = doc.get("Iso")
    user_data = _decode(doc.get("CloudInit"), "CloudInit")
    network_config = _decode(doc.get("NetworkConfig"), "NetworkConfig")
    if network_config is not None and user_data is None:
        raise InvalidRequest("--network-config needs --cloud-init (the seed carries both)")
    try:
        if iso:
            from cocon.vmm.media import check_iso

            check_iso(iso)
        if firmware == "uefi":
            from cocon.vmm.firmware import OVMF_CODE, OVMF_DIR, OVMF_VARS

            for part in (OVMF_CODE, OVMF_VARS):
                if not os.path.isfile(os.path.join(OVMF_DIR, part)):
                    raise InvalidRequest(
                        f"firmware uefi is not installed ({os.path.join(OVMF_DIR, part)} is missing): "
                        "apt-get install ovmf"
                    )
        if user_data is not None:
            from cocon.vmm.cloud_init import validate_user_data

            validate_user_data(user_data)
        if os.path.exists(disk):
            info = qemu_img.inspect_user_disk(disk)
            if size is not None and size < info.virtual_size:
                raise InvalidRequest(
                    f"--disk-size {size} is smaller than the disk {disk} ({info.virtual_size} bytes): "
                    "cocon does not shrink disks"
                )
            created = False
            disk_format = info.format
        else:
            if size is None:
                raise InvalidRequest(
                    f"the disk {disk} does not exist: give --disk-size to create it, or the path of an image"
                )
            if not os.path.isdir(os.path.dirname(disk)):
                raise InvalidRequest(f"the directory of {disk} does not exist: create it first")
            disk_format = "raw" if disk.endswith((".raw", ".img")) else "qcow2"
            info = None
            created = True
    except (VolumeError, VmmError) as exc:
        raise InvalidRequest(str(exc)) from None
    host: dict[str, Any] = {"Isolation": "vm", "NetworkMode": doc.get("Network") or "default",
                            "Binds": list(doc.get("Volumes") or [])}  # fmt: skip
    if memory:
        host["Memory"] = memory
    if cpus:
        host["NanoCpus"] = int(float(cpus) * 1e9)
    body: dict[str, Any] = {
        "Image": "",
        "Tty": True,
        "OpenStdin": True,
        "AttachStdin": True,
        "HostConfig": host,
    }
    if doc.get("Hostname"):
        body["Hostname"] = doc["Hostname"]
    made: list[str] = []
    try:
        if created:
            qemu_img.create(disk, size, fmt=disk_format)
            made.append(disk)
        elif info is not None and size is not None and size > info.virtual_size:
            qemu_img.resize(disk, size)
        ct = e.containers
        result = ct._create(body, name, "", host, "vm")
        cid = result["Id"]
        settings = {"Disk": disk, "DiskFormat": disk_format, "Iso": iso or None, "Firmware": firmware,
                    "CreatedDisk": created}  # fmt: skip
        if user_data is not None:
            settings["Seed"] = _make_seed(e, cid, name, user_data, network_config)
        rec = e.instances.get(cid)
        config = dict(rec.config)
        config["VM"] = settings
        e.instances.update(cid, config=config)
        ct._records.pop(cid, None)
        return result
    except BaseException as exc:
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
        if isinstance(exc, (VolumeError, VmmError)):
            raise InvalidRequest(str(exc)) from None
        raise


def _decode(value: str | None, what: str) -> bytes | None:
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{what} must be base64 (the file's bytes)") from None


def _make_seed(e: Engine, cid: str, name: str, user_data: bytes, network_config: bytes | None) -> str:
    """The NoCloud seed ISO in the instance's disk directory."""
    from cocon.engine.vm_machines import disks_of
    from cocon.vmm.cloud_init import make_seed

    network: dict[str, Any] | None = None
    if network_config is not None:
        import yaml  # type: ignore[import-untyped]

        try:
            network = yaml.safe_load(network_config)
        except yaml.YAMLError as exc:
            raise InvalidRequest(f"the network config is not YAML: {exc}") from None
        if not isinstance(network, dict):
            raise InvalidRequest("the network config must be a YAML mapping (netplan version 2)")
    directory = disks_of(e).instance_dir(cid)
    os.makedirs(directory, 0o700, exist_ok=True)
    try:
        return make_seed(os.path.join(directory, "seed.iso"), user_data=user_data, instance_id=cid,
                         hostname=name, network_config=network)  # fmt: skip
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise


def remove_vm(e: Engine, ref: str, *, force: bool = False, delete_disk: bool = False) -> None:
    """`DELETE /cocon/v1/vms/{id}`: `cocon rm`, and with `delete_disk` the disk file given at create."""
    from cocon.engine.errors import NotFound

    rec = e.containers._get(ref)
    if rec.isolation != "vm":
        raise NotFound(f"{ref} is not a VM: remove it with cocon rm")
    disk = (rec.config.get("VM") or {}).get("Disk") if delete_disk else None
    e.containers.remove(rec.id, force=force)
    if disk:
        try:
            os.unlink(disk)
        except FileNotFoundError:
            pass


def _disk_node(volume: str) -> str:
    return f"vol-{volume}"[:31]


def attach_disk(e: Engine, ref: str, volume: str) -> dict[str, Any]:
    """`cocon vm attach-disk VM VOLUME`: a disk volume as a virtio disk, hot-plugged into a running VM
    (QMP blockdev-add + device_add on a free PCIe root port) and kept for its next starts."""
    from cocon.engine.errors import Conflict, NotFound
    from cocon.isolation.base import IsolationError
    from cocon.storage.volumes import VolumeError

    rec = e.containers._get(ref)
    if rec.isolation != "vm":
        raise InvalidRequest(f"{rec.name} is not a VM: disk volumes attach to VMs only")
    try:
        vol = e.volumes.get(volume)
    except VolumeError as exc:
        raise NotFound(str(exc)) from None
    if vol.type != "disk":
        raise InvalidRequest(
            f"volume {volume} is a directory volume: create one with --type disk --size SIZE"
        )
    settings = dict(rec.config.get("VM") or {})
    attached = list(settings.get("Disks") or [])
    if volume in attached or any(m.get("Name") == volume for m in rec.config.get("Mounts") or []):
        raise Conflict(f"volume {volume} is attached to {rec.name} already")
    if e.containers.status(rec) in ("running", "paused"):
        request = {"op": "disk-add", "node": _disk_node(volume), "path": vol.disk_path, "format": "qcow2",
                   "serial": volume[:20]}  # fmt: skip
        try:
            e.driver("vm").control(rec.id, request)  # type: ignore[attr-defined]
        except IsolationError as exc:
            raise InvalidRequest(f"cannot attach {volume} to {rec.name}: {exc}") from None
    settings["Disks"] = [*attached, volume]
    config = dict(rec.config)
    config["VM"] = settings
    e.instances.update(rec.id, config=config)
    e.containers._records.pop(rec.id, None)
    return {"Volume": volume, "Serial": volume[:20], "Live": e.containers.status(rec) == "running"}


def detach_disk(e: Engine, ref: str, volume: str) -> None:
    """`cocon vm detach-disk VM VOLUME`: hot-unplugged from a running VM (the guest lets it go)."""
    from cocon.engine.errors import NotFound
    from cocon.isolation.base import IsolationError

    rec = e.containers._get(ref)
    settings = dict(rec.config.get("VM") or {})
    attached = list(settings.get("Disks") or [])
    if rec.isolation != "vm" or volume not in attached:
        raise NotFound(f"volume {volume} is not attached to {rec.name} (attach-disk attaches one)")
    if e.containers.status(rec) in ("running", "paused"):
        try:
            e.driver("vm").control(rec.id, {"op": "disk-remove", "node": _disk_node(volume)}, 90)  # type: ignore[attr-defined]
        except IsolationError as exc:
            raise InvalidRequest(f"cannot detach {volume} from {rec.name}: {exc}") from None
    settings["Disks"] = [v for v in attached if v != volume]
    config = dict(rec.config)
    config["VM"] = settings
    e.instances.update(rec.id, config=config)
    e.containers._records.pop(rec.id, None)


def list_vms(e: Engine, *, all: bool = True) -> list[dict[str, Any]]:
    """The VMs (isolation "vm"), for `cocon vm ls`: name, state, machine, disk, address."""
    from cocon.engine.vm_machines import vm_settings
    from cocon.isolation.vm import machine_size

    out = []
    ct = e.containers
    for rec in e.instances.list():
        if rec.isolation != "vm":
            continue
        status = ct.status(rec)
        if not all and status != "running":
            continue
        settings = vm_settings(rec)
        limits = rec.config.get("Limits") or {}
        memory, cpus = machine_size(limits.get("Memory"), limits.get("Cpus"))
        settings_doc = ct.inspect(rec.id).get("NetworkSettings") or {}
        networks = settings_doc.get("Networks") or {}
        addresses = [n["IPAddress"] for n in networks.values() if isinstance(n, dict) and n.get("IPAddress")]
        if not addresses and settings_doc.get("IPAddress"):
            addresses = [settings_doc["IPAddress"]]
        out.append({
            "Id": rec.id, "Name": rec.name, "State": status, "Image": rec.image_ref,
            "Disk": settings.get("Disk") or "", "Iso": settings.get("Iso") or "",
            "Firmware": settings.get("Firmware") or "bios", "Cpus": cpus, "MemoryMiB": memory,
            "Addresses": addresses,
        })  # fmt: skip
    return out
