"""`cocon vm migrate NAME --to URI`: move a running VM to another cocon daemon (docs/vm-migration.md).

The source daemon drives it; the target daemon answers three routes (cocon.api.docker.vms):

1. `POST /cocon/v1/vms/incoming` (`prepare_incoming`): the target records the instance under the same
   name from the source's create request, with the same address on each network (its networks must
   exist there with subnets that hold them; the MAC follows the address), makes empty disks of the
   source's sizes in its own disk store, and starts QEMU with the same machine waiting for the
   migration (`-incoming defer`). The shim exports the disks over NBD and listens for the stream; the
   reply says where, with secret export names and a cookie.
2. The source's shim mirrors the disks and migrates the RAM (cocon.vmm.migration); the guest runs on
   during the copy and pauses only for the last dirty pages.
3. `POST /cocon/v1/vms/incoming/{id}/finish`: the target resumes the guest; the source then removes its
   instance (its copy of the disk of a VM made from an image goes with it; the file given to
   `cocon vm create --disk` is the user's and stays, now out of date).

A failure before the hand-over removes the target's instance (`DELETE /cocon/v1/vms/incoming/{id}`)
and leaves the VM running here; a target that cannot resume after the hand-over gets the same, and
the source resumes the guest. Either way: one running copy of the VM, no QEMU left behind.

With `SharedStorage` (the disk file is on storage both daemons see at the same path) the root disk is
not copied: the target opens the same file.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from typing import TYPE_CHECKING, Any

from cocon.engine.errors import Conflict, InvalidRequest, NotFound

if TYPE_CHECKING:
    from cocon.engine.engine import Engine
    from cocon.engine.instances import InstanceRecord

#: The fields of `POST /cocon/v1/vms/{id}/migrate`.
MIGRATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "To": str, "Token": str, "TlsCaCert": str, "TlsCert": str, "TlsKey": str, "SharedStorage": bool,
    "DowntimeLimitMs": int,
}  # fmt: skip
#: The fields of `POST /cocon/v1/vms/incoming` (what a source daemon sends).
INCOMING_FIELDS: dict[str, type | tuple[type, ...]] = {
    "Name": str, "Image": str, "Create": dict, "VM": dict, "Networks": dict, "Disks": dict,
    "Transport": str, "Host": str, "SharedStorage": bool, "Seed": str,
}  # fmt: skip
_SHARED_IMAGE_VM = (
    "--shared-storage is for VMs made with cocon vm create (their disk is a file of yours): a VM made "
    "from an image keeps its disk in the daemon's store, and it is always copied"
)
#: QEMU's largest downtime-limit (ms).
MAX_DOWNTIME_LIMIT_MS = 2_000_000
#: The disks a migration copies (node names in the shim): the root disk. The cloud-init seed (a small
#: read-only CD-ROM, which QEMU cannot export writable) travels in the request.
COPIED_NODES = ("root",)
#: The largest cloud-init seed a target takes.
MAX_SEED = 16 << 20


def _check_fields(doc: Any, fields: dict[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidRequest(f"the {what} request must be a JSON object")
    for key, value in doc.items():
        if key not in fields:
            raise InvalidRequest(f"unknown field {key!r} in the {what} request: use {', '.join(fields)}")
        wrong_bool = isinstance(value, bool) and fields[key] is int
        if value is not None and (wrong_bool or not isinstance(value, fields[key])):
            raise InvalidRequest(f"{key} has the wrong type in the {what} request")
    return doc


def _vm(e: Engine, ref: str) -> InstanceRecord:
    rec = e.containers._get(ref)
    if rec.isolation != "vm":
        raise InvalidRequest(f"{rec.name} is not a VM (isolation {rec.isolation}): only VMs migrate")
    return rec


# --- the source ---------------------------------------------------------------------------------------


def migrate_vm(e: Engine, ref: str, doc: Any) -> dict[str, Any]:
    """`POST /cocon/v1/vms/{id}/migrate` {To, Token | TlsCaCert+TlsCert+TlsKey (PEM), SharedStorage,
    DowntimeLimitMs}: move the running VM
    to the daemon at To; its new Id there and what the migration measured."""
    from cocon.engine.peer_daemon import PeerDaemon, PeerError, parse_peer
    from cocon.isolation.base import IsolationError

    doc = _check_fields(doc, MIGRATE_FIELDS, "migrate")
    if not doc.get("To"):
        raise InvalidRequest(
            "give the target daemon: cocon vm migrate NAME --to unix:///PATH|tcp://ADDR:PORT"
        )
    limit = doc.get("DowntimeLimitMs")
    if limit is not None and not 0 < limit <= MAX_DOWNTIME_LIMIT_MS:
        raise InvalidRequest(f"DowntimeLimitMs must be between 1 and {MAX_DOWNTIME_LIMIT_MS} (milliseconds)")
    rec = _vm(e, ref)
    address = parse_peer(str(doc["To"]))
    ct = e.containers
    status = ct.status(rec)
    if status != "running":
        raise Conflict(f"VM {rec.name} is {status}: only a running VM migrates (start it first)")
    driver: Any = e.driver("vm")
    try:
        shim = driver.control(rec.id, {"op": "status"})
    except IsolationError as exc:
        raise Conflict(f"VM {rec.name} does not answer: {exc}") from None
    if shim.get("status") != "running":
        raise Conflict(f"VM {rec.name} is {shim.get('status')}: only a running VM migrates (unpause it)")
    if shim.get("shares"):
        raise InvalidRequest(
            f"VM {rec.name} shares host directories over 9p (its volumes or binds), which QEMU cannot "
            "migrate: use disk volumes (cocon volume create --type disk) for data that must move"
        )
    settings = _settings(rec)
    if settings.get("Disks") or _disk_volumes(rec):
        raise InvalidRequest(
            f"VM {rec.name} has disk volumes attached: detach them first (cocon vm detach-disk), "
            "they do not move with it"
        )
    shared = bool(doc.get("SharedStorage"))
    if shared and rec.image:
        raise InvalidRequest(_SHARED_IMAGE_VM)
    if shared and _in_store(e, str(settings.get("Disk") or "")):
        raise InvalidRequest(
            f"the disk of {rec.name} is in this daemon's store (a copying migration put it there), which "
            "goes with the VM: migrate it without --shared-storage"
        )
    disks = _disks_to_copy(e, rec, settings, shared)
    peer = PeerDaemon(address, token=doc.get("Token") or None, tls=_tls(doc, address))
    incoming = {
        "Name": rec.name, "Image": rec.image or "", "Create": rec.config["Create"], "VM": settings,
        "Networks": _addresses(e, rec), "Disks": disks, "Transport": address.kind,
        "Host": address.host, "SharedStorage": shared,
    }  # fmt: skip
    if settings.get("Seed"):
        with open(str(settings["Seed"]), "rb") as f:
            incoming["Seed"] = base64.b64encode(f.read()).decode()
    try:
        target = peer.call("POST", "/cocon/v1/vms/incoming", incoming)
    except PeerError as exc:
        raise Conflict(f"{exc}; {rec.name} runs on here") from None
    tid = str(target.get("Id") or "")
    request = {"op": "migrate-out", "nbd": target.get("Nbd"), "migration": target.get("Migration"),
               "exports": target.get("Exports") or {}, "cookie": target.get("Cookie"),
               "downtime_limit_ms": int(doc.get("DowntimeLimitMs") or 300)}  # fmt: skip
    try:
        result = driver.control(rec.id, request, 24 * 3600)
    except IsolationError as exc:
        _abort(peer, tid)
        raise Conflict(f"migrating {rec.name} to {address} failed: {exc}; {rec.name} runs on here") from None
    try:
        peer.call("POST", f"/cocon/v1/vms/incoming/{tid}/finish", timeout=180)
    except PeerError as exc:
        _abort(peer, tid)
        try:
            driver.control(rec.id, {"op": "migrate-resume"})
        except IsolationError as again:
            raise Conflict(f"the target could not resume {rec.name} ({exc}) and neither could this daemon: "
                           f"{again}") from None  # fmt: skip
        raise Conflict(f"the target could not resume {rec.name}: {exc}; {rec.name} runs on here") from None
    emit = getattr(e, "emit", None)
    if emit is not None:
        try:
            emit("container", "migrate", rec.id, name=rec.name, image=rec.image_ref, to=str(address))
        except Exception:
            pass
    resumed = time.monotonic()
    ct.remove(rec.id, force=True)  # the guest runs on the target now; this copy is stale
    out: dict[str, Any] = {"Id": tid, "Name": rec.name, "To": str(address)}
    out.update({k: v for k, v in result.items() if k not in ("ok", "CompletedAt")})
    # the guest's whole pause: QEMU's downtime, then the hand-over until the target ran it
    handover = max(0.0, resumed - float(result.get("CompletedAt") or resumed))
    out["PauseMs"] = int(out.get("DowntimeMs") or 0) + int(handover * 1000)
    return out


def _tls(doc: dict[str, Any], address: Any) -> Any:
    from cocon.engine.peer_daemon import PeerTls

    given = [doc.get(k) for k in ("TlsCaCert", "TlsCert", "TlsKey")]
    if not any(given):
        return None
    if not all(given) or address.kind != "tcp":
        raise InvalidRequest(
            "TLS to the target needs all of --tlscacert, --tlscert and --tlskey, and a tcp:// target"
        )
    return PeerTls(*(str(text) for text in given))


def _in_store(e: Engine, path: str) -> bool:
    from cocon.engine.vm_machines import disks_of

    store = os.path.realpath(disks_of(e).instances_dir)
    return os.path.realpath(path).startswith(store + os.sep)


def _abort(peer: Any, tid: str) -> None:
    from cocon.engine.peer_daemon import PeerError

    if not tid:
        return
    try:
        peer.call("DELETE", f"/cocon/v1/vms/incoming/{tid}", timeout=120)
    except PeerError:
        pass  # the target removes an incoming VM whose source went away when it is asked again


def _settings(rec: InstanceRecord) -> dict[str, Any]:
    from cocon.engine.vm_machines import vm_settings

    return dict(vm_settings(rec))


def _disk_volumes(rec: InstanceRecord) -> list[str]:
    return [str(m.get("Name")) for m in rec.config.get("Mounts") or [] if m.get("Disk")]


def _disks_to_copy(e: Engine, rec: InstanceRecord, settings: dict[str, Any], shared: bool) -> dict[str, int]:
    """node → virtual size of the disks the target makes empty and the source mirrors into."""
    from cocon.engine.vm_machines import disks_of
    from cocon.storage import qemu_img
    from cocon.storage.volumes import VolumeError

    if shared:
        return {}
    root = str(settings.get("Disk") or disks_of(e).instance_path(rec.id))
    try:
        return {"root": qemu_img.info(root, force_share=True).virtual_size}
    except VolumeError as exc:
        raise InvalidRequest(f"cannot read the disk of {rec.name}: {exc}") from None


def _addresses(e: Engine, rec: InstanceRecord) -> dict[str, dict[str, Any]]:
    """network → the addresses and aliases the instance has there (kept by the target)."""
    networks = (e.containers.inspect(rec.id).get("NetworkSettings") or {}).get("Networks") or {}
    out = {}
    for name, ep in networks.items():
        if not isinstance(ep, dict) or not ep.get("IPAddress"):
            continue
        aliases = [a for a in ep.get("Aliases") or [] if a != rec.id[:12]]
        out[str(name)] = {"IPv4Address": ep["IPAddress"], "IPv6Address": ep.get("GlobalIPv6Address") or None,
                          "Aliases": aliases}  # fmt: skip
    return out


# --- the target ---------------------------------------------------------------------------------------


def prepare_incoming(e: Engine, doc: Any) -> dict[str, Any]:
    """`POST /cocon/v1/vms/incoming`: record the VM, make its disks, start QEMU waiting for the
    migration; {Id, Nbd, Migration, Exports, Cookie}. On failure nothing is left."""
    from cocon.engine.vm_machines import disks_of
    from cocon.isolation.base import IsolationError
    from cocon.storage import qemu_img
    from cocon.storage.volumes import VolumeError

    doc = _check_fields(doc, INCOMING_FIELDS, "incoming VM")
    name, create = str(doc.get("Name") or ""), doc.get("Create")
    if not name or not isinstance(create, dict):
        raise InvalidRequest("an incoming VM needs its Name and Create request")
    transport, host = str(doc.get("Transport") or "unix"), str(doc.get("Host") or "")
    if transport not in ("unix", "tcp") or (transport == "tcp" and not host):
        raise InvalidRequest("Transport must be unix, or tcp with the Host the source reached this daemon at")
    disks = doc.get("Disks") or {}
    if any(node not in COPIED_NODES or not isinstance(size, int) or isinstance(size, bool) or size <= 0
           for node, size in disks.items()):  # fmt: skip
        raise InvalidRequest(f"Disks must map {' or '.join(COPIED_NODES)} to a size in bytes")
    shared = bool(doc.get("SharedStorage"))
    if not shared and "root" not in disks:
        raise InvalidRequest("Disks needs the root disk's size (or SharedStorage)")
    source_vm = dict(doc.get("VM") or {})
    seed = _seed(doc.get("Seed"))
    ct = e.containers
    try:
        ct._get(name)
    except NotFound:
        pass
    else:
        raise Conflict(f"a container or VM named {name} exists on this daemon: remove or rename it first")
    image = str(doc.get("Image") or "")
    if image:
        try:
            e.images.get(image)
        except Exception:
            raise NotFound(
                f"the image {image} of {name} is not on this daemon: pull or load it here first"
            ) from None
    if shared and image:
        raise InvalidRequest(_SHARED_IMAGE_VM)
    _check_media(name, source_vm, shared)
    body = dict(create)
    body.pop("NetworkingConfig", None)  # the addresses are set below (any network, not only --subnet ones)
    host_config = dict(body.get("HostConfig") or {})
    host_config["Isolation"] = "vm"
    body["HostConfig"] = host_config
    body["Image"] = image
    result = ct._create(body, name, image, host_config, "vm")
    cid = result["Id"]
    ct._records.pop(cid, None)
    try:
        rec = ct._get(cid)
        store = disks_of(e)
        directory = store.instance_dir(cid)
        os.makedirs(directory, 0o700, exist_ok=True)
        settings = {k: v for k, v in source_vm.items() if k in ("Firmware", "Iso", "DiskSize", "DiskFormat")}
        try:
            if image:
                if not shared:
                    qemu_img.create(store.instance_path(cid), disks["root"], fmt="qcow2")
            elif shared:
                settings.update(Disk=source_vm.get("Disk"), DiskFormat=source_vm.get("DiskFormat", "qcow2"))
            else:
                path = os.path.join(directory, "disk.qcow2")
                qemu_img.create(path, disks["root"], fmt="qcow2")
                settings.update(Disk=path, DiskFormat="qcow2", CreatedDisk=True)
            if seed is not None:
                settings["Seed"] = os.path.join(directory, "seed.iso")
                with open(settings["Seed"], "wb") as f:
                    f.write(seed)
        except VolumeError as exc:
            raise InvalidRequest(f"cannot make the disks of {name}: {exc}") from None
        settings["Incoming"] = True
        config = dict(rec.config)
        config["VM"] = settings
        endpoints = dict(config.get("Endpoints") or {})
        for network, want in (doc.get("Networks") or {}).items():
            key = "bridge" if network in ("default", "bridge") else str(network)
            if key not in endpoints:
                raise InvalidRequest(
                    f"{name} is on network {network} at the source: its network mode differs here"
                )
            endpoints[key] = {**endpoints[key], "IPv4Address": want.get("IPv4Address"),
                              "IPv6Address": want.get("IPv6Address"),
                              "Aliases": list(want.get("Aliases") or [])}  # fmt: skip
        config["Endpoints"] = endpoints
        e.instances.update(cid, config=config)
        ct._records.pop(cid, None)
        e.supervisor.start(cid)
        reply = e.driver("vm").control(  # type: ignore[attr-defined]
            cid, {"op": "migrate-listen", "transport": transport, "host": host, "nodes": sorted(disks)}
        )
    except BaseException as exc:
        _remove_quietly(e, cid)
        if isinstance(exc, IsolationError):
            raise InvalidRequest(f"cannot prepare {name} for the migration: {exc}") from None
        raise
    return {"Id": cid, "Nbd": reply.get("nbd"), "Migration": reply.get("migration"),
            "Exports": reply.get("exports"), "Cookie": reply.get("cookie")}  # fmt: skip


def _check_media(name: str, source_vm: dict[str, Any], shared: bool) -> None:
    """The files the target uses in place, checked as `cocon vm create` checks them: the ISO (never
    copied) and, on shared storage, the disk."""
    from cocon.storage import qemu_img
    from cocon.storage.volumes import VolumeError
    from cocon.vmm.errors import VmmError
    from cocon.vmm.media import check_iso

    iso, disk = source_vm.get("Iso"), str(source_vm.get("Disk") or "")
    if iso and not os.path.isfile(str(iso)):
        raise InvalidRequest(f"the ISO {iso} of {name} is not on this machine: put it at the same path first")
    if shared and not os.path.isfile(disk):
        raise InvalidRequest(f"the disk {disk or '(none)'} of {name} is not on this machine (not shared)")
    try:
        if iso:
            check_iso(str(iso))
        if shared:  # in use by the source's QEMU: read without its lock, and no file outside it
            info = qemu_img.info(disk, force_share=True)
            if info.format not in ("qcow2", "raw") or info.backing_file or info.data_file:
                raise InvalidRequest(f"the disk {disk} of {name} is not a raw or qcow2 image of its own")
    except (VolumeError, VmmError) as exc:
        raise InvalidRequest(f"{name}: {exc}") from None


def _seed(text: str | None) -> bytes | None:
    """The cloud-init seed the source sent (base64): an ISO image of at most MAX_SEED bytes."""
    if text is None:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("Seed must be base64 (the seed ISO's bytes)") from None
    if len(data) > MAX_SEED or data[0x8001:0x8006] != b"CD001":
        raise InvalidRequest(f"Seed is not a cloud-init seed ISO (of at most {MAX_SEED >> 20} MiB)")
    return data


def _incoming(e: Engine, ref: str) -> InstanceRecord:
    rec = _vm(e, ref)
    if not _settings(rec).get("Incoming"):
        raise Conflict(f"{rec.name} is not waiting for a migration")
    return rec


def finish_incoming(e: Engine, ref: str) -> dict[str, Any]:
    """`POST /cocon/v1/vms/incoming/{id}/finish`: the source has handed over: run the guest here."""
    from cocon.isolation.base import IsolationError

    rec = _incoming(e, ref)
    try:
        e.driver("vm").control(rec.id, {"op": "migrate-finish"}, 180)  # type: ignore[attr-defined]
    except IsolationError as exc:
        raise Conflict(f"cannot resume {rec.name}: {exc}") from None
    config = dict(rec.config)
    config["VM"] = {k: v for k, v in _settings(rec).items() if k != "Incoming"}
    e.instances.update(rec.id, config=config)
    e.containers._records.pop(rec.id, None)
    return {"Id": rec.id}


def abort_incoming(e: Engine, ref: str) -> None:
    """`DELETE /cocon/v1/vms/incoming/{id}`: the migration failed at the source: the instance, its QEMU
    and its disks go."""
    rec = _incoming(e, ref)
    _remove_quietly(e, rec.id)


def _remove_quietly(e: Engine, cid: str) -> None:
    try:
        e.containers.remove(cid, force=True)
    except Exception:
        from cocon.engine.vm_machines import disks_of

        disks_of(e).remove_instance(cid)
