"""`cocon system reset` and `cocon system assets`.

`reset`: everything of cocon's on this node removed, as `podman system reset` does.

In order: every container (stopped, its processes killed, its record, snapshot, logs and anonymous
volumes gone), every user network's record, then cocon's whole networking (endpoints, networks,
bridges, its nftables table: `NetworkStack.reset`), every volume, every image (and the blobs no
image needs any more). What was removed is counted in the answer. The daemon keeps running on the
empty state; the pre-started runtime it keeps waiting is not a container.

`assets_info` / `assets_build`: the microVM guest assets (cocon.vmm.assets) as JSON documents for
`/cocon/v1/system/assets`; `microvm_info`: the MicroVM part of `info` (never builds anything).
"""

from __future__ import annotations

import os
import threading
import time

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cocon.engine.engine import Engine
    from cocon.vmm.assets import Assets, AssetsStatus


def reset(e: Engine) -> dict[str, Any]:
    """Remove every container, network, volume and image; returns what was removed."""
    from cocon.engine import netattach
    from cocon.engine.networks import PREDEFINED

    containers = []
    for rec in e.instances.list():
        e.supervisor.remove(rec.id, force=True, volumes=True)
        containers.append(rec.id)
    e.networks.drop_stale_endpoints(rec.id for rec in e.instances.list())
    networks = []
    for net in e.networks.list():
        if net.name not in PREDEFINED:
            e.networks.remove(net.id)
            networks.append(net.name)
    netattach.reset(e)
    volumes = e.imageops.volume_prune(all=True).get("VolumesDeleted") or []
    images = []
    for img in e.imageops.image_list(all=True):
        for entry in e.imageops.image_remove(img["Id"], force=True, prune=True):
            if "Deleted" in entry:
                images.append(entry["Deleted"])
    e.imageops.image_prune(all=True)
    return {"ContainersDeleted": containers, "NetworksDeleted": networks, "VolumesDeleted": volumes,
            "ImagesDeleted": images}  # fmt: skip


# --- microVM guest assets (`cocon system assets`, the MicroVM part of `cocon info`) -------------------
#
# The assets live under `cocon.isolation.microvm_shim.assets_root()` ($COCON_ASSETS_ROOT, else the
# engine's root): the same place the microVM shim builds them on a first start. Status documents
# (`assets_doc`) are plain JSON for the API; AssetError becomes EngineError with what to do.

REBUILD_HINT = "cocon system assets --rebuild"

_memo_lock = threading.Lock()
_probe_lock = threading.Lock()  # one KVM probe at a time (concurrent info calls would boot two QEMUs)
_memo: dict[str, tuple[tuple[object, ...], dict[str, Any]]] = {}


def assets_root() -> str:
    from cocon.isolation.microvm_shim import assets_root as root_of_assets

    return os.path.abspath(root_of_assets())


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _file(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        size = os.stat(path).st_size
    except OSError:
        size = None
    return {"Path": path, "Size": size}


def _accelerator(assets: Assets) -> dict[str, Any]:
    """The KVM/TCG decision for `assets`: the probe's cached answer, or a bounded probe (≤ ~5 s)."""
    from cocon.vmm.errors import VmmError
    from cocon.vmm.kvm import CACHE_FILE, probe_kvm

    try:
        with _probe_lock:
            probe = probe_kvm(assets)
    except (VmmError, OSError) as exc:
        return {"Accel": None, "Reason": f"the KVM probe failed: {exc}", "Probed": None, "Seconds": None,
                "Cpu": None, "Cached": False}  # fmt: skip
    try:
        probed: str | None = _when(os.stat(os.path.join(assets.directory, CACHE_FILE)).st_mtime)
    except OSError:  # a read-only asset directory: the answer was not kept
        probed = _when(time.time()) if not probe.cached else None
    return {"Accel": probe.accel, "Reason": probe.reason, "Probed": probed, "Seconds": probe.seconds,
            "Cpu": probe.cpu, "Cached": probe.cached}  # fmt: skip


def _message(state: str, error: str | None) -> str | None:
    if state == "missing":
        return f"not built: run '{REBUILD_HINT}' (a first microVM start builds them too, ~30 s or more)"
    if state == "corrupt":
        return f"a file does not match its manifest ({error}): run '{REBUILD_HINT}'"
    if state == "unknown":
        return (
            f"the Debian package versions cannot be resolved ({error}): run apt-get update, "
            f"then '{REBUILD_HINT}'"
        )
    return None


def assets_doc(status: AssetsStatus, root: str, *, probe: bool = True) -> dict[str, Any]:
    """What `GET /cocon/v1/system/assets` answers for `status` (of the assets under `root`)."""
    import json

    from cocon.vmm.assets import MANIFEST_FILE, assets_dir

    a = status.assets
    base = assets_dir(root)
    digest = status.digest or (a.digest if a else None)
    if a is not None:
        packages = dict(a.packages)
    elif status.inputs is not None:
        i = status.inputs
        packages = {i.kernel_package: i.kernel_version, i.busybox_package: i.busybox_version,
                    **dict(i.utility_packages)}  # fmt: skip
    else:
        packages = {}
    built = None
    if a is not None:
        try:
            with open(os.path.join(a.directory, MANIFEST_FILE), "rb") as f:
                built = json.load(f).get("built")
        except (OSError, ValueError, AttributeError):
            pass
    return {
        "State": status.state,
        "Message": _message(status.state, status.error),
        "Error": status.error,
        "Root": root,
        "Directory": a.directory if a else (os.path.join(base, digest) if digest else base),
        "Digest": digest,
        "KernelRelease": a.version if a else None,
        "Kernel": _file(a.kernel) if a else None,
        "Initrd": _file(a.initrd) if a else None,
        "Utility": _file(a.utility) if a else None,
        "Packages": packages,
        "Built": built,
        "BuiltDigests": list(status.built),
        "Accelerator": _accelerator(a) if a is not None and probe else None,
    }


def assets_info(e: Engine | None = None) -> dict[str, Any]:
    """The status of the guest assets (nothing is built or downloaded; the KVM probe may run once)."""
    from cocon.vmm.assets import assets_dir, assets_status

    root = assets_root()
    try:  # so that the package versions apt resolved are cached there (seconds per call otherwise)
        os.makedirs(assets_dir(root), exist_ok=True)
    except OSError:
        pass
    return assets_doc(assets_status(root), root)


def assets_build(
    e: Engine | None = None, *, rebuild: bool = False, progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """Build the guest assets (always with `rebuild`, else only when missing, stale or corrupt) with
    `progress(stage, done, total)` over `cocon.vmm.assets.STAGES`; the status of what was built (the
    current inputs may have changed meanwhile: `assets_info` tells)."""
    from cocon.engine.errors import EngineError
    from cocon.vmm.assets import AssetsStatus, assets_dir, ensure_assets
    from cocon.vmm.errors import VmmError

    root = assets_root()
    if progress is not None:
        progress("resolve", 0, 1)  # resolving the package versions takes seconds before any report
    try:
        assets = ensure_assets(root, progress, rebuild=rebuild)
    except VmmError as exc:
        raise EngineError(
            f"cannot build the microVM guest assets under {root}/assets: {exc} (then run '{REBUILD_HINT}')"
        ) from None
    except OSError as exc:
        raise EngineError(
            f"cannot build the microVM guest assets under {root}/assets: {exc.strerror or exc} "
            f"({exc.filename or 'the assets directory'}): check its permissions and free space, then run "
            f"'{REBUILD_HINT}'"
        ) from None
    base = assets_dir(root)
    built = sorted(n for n in os.listdir(base) if len(n) == 64 and os.path.isdir(os.path.join(base, n)))
    return assets_doc(AssetsStatus("ready", assets.digest, assets, None, built), root)


def microvm_info() -> dict[str, Any]:
    """The MicroVM part of `info`: assets state, guest kernel release, accelerator (kvm|tcg) with the
    probe's reason and time. Never builds: without assets it says so. Memoized per asset directory
    (its files' sizes and mtimes) so that an info call does not hash the images every time. Never
    fails: info must answer whatever state the assets are in."""
    try:
        return _microvm_info()
    except Exception as exc:
        return {"Assets": "unknown", "AssetsRoot": None, "KernelRelease": None, "Accelerator": None,
                "AcceleratorReason": None, "Probed": None,
                "Message": f"cannot read the microVM assets ({type(exc).__name__}: {exc}): see "
                           "'cocon system assets'"}  # fmt: skip


def _microvm_info() -> dict[str, Any]:
    from cocon.vmm.assets import assets_dir, assets_status, resolve_inputs
    from cocon.vmm.errors import VmmError

    root = assets_root()
    base = assets_dir(root)
    not_built = {"Assets": "missing", "AssetsRoot": root, "KernelRelease": None, "Accelerator": None,
                 "AcceleratorReason": None, "Probed": None,
                 "Message": "not built (cocon system assets)"}  # fmt: skip
    try:
        built = [n for n in os.listdir(base) if len(n) == 64]
    except OSError:
        built = []
    if not built:  # nothing to look at: no apt lookups, no hashing
        return not_built
    try:
        digest = resolve_inputs(cache_dir=base).digest
    except VmmError as exc:
        return {**not_built, "Assets": "unknown", "Message": f"unknown: {exc}"}
    directory = os.path.join(base, digest)
    key = _dir_key(directory)
    with _memo_lock:
        hit = _memo.get(root)
    if hit is not None and hit[0] == key:
        return hit[1]
    doc = assets_doc(assets_status(root), root)
    acc = doc["Accelerator"] or {}
    outdated = f"outdated: rebuilt at the next microVM start ({REBUILD_HINT})"
    out = {
        "Assets": doc["State"],
        "AssetsRoot": root,
        "KernelRelease": doc["KernelRelease"],
        "Accelerator": acc.get("Accel"),
        "AcceleratorReason": acc.get("Reason"),
        "Probed": acc.get("Probed"),
        "Message": {"ready": None, "missing": outdated}.get(doc["State"], doc["Message"]),
    }
    if doc["State"] == "ready":  # keyed on the files as they are now (the probe may have written its cache)
        with _memo_lock:
            _memo[root] = (_dir_key(directory), out)
    return out


def _dir_key(directory: str) -> tuple[object, ...]:
    """What a memoized answer for an asset directory depends on: its files' names, sizes, mtimes."""
    key: list[object] = [directory]
    try:
        for name in sorted(os.listdir(directory)):
            st = os.stat(os.path.join(directory, name))
            key.append((name, st.st_size, st.st_mtime_ns))
    except OSError:
        key.append("absent")
    return tuple(key)
