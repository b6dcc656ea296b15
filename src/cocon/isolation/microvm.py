"""The `microvm` isolation level: the same container, run by cocon's own runtime inside a lightweight
VM with its own kernel (Kata Containers', Firecracker's and Hyper-V isolation's idea).

How an instance runs (docs/microvm.md):

    conmon → `cocon-microvm-runtime create` → the shim (cocon.isolation.microvm_shim), one per VM:
        QEMU (`microvm` machine) booting cocon's guest assets (cocon.vmm.assets)
          guest: initramfs init → switch_root into the read-only utility image → the agent (PID 1)
        the agent channel (virtio-serial), over which the shim asks the agent to mount the share,
        configure the network, create and start the container, exec, signal, resize, and relays
        the container's stdin/stdout/stderr to conmon's pipes (or its terminal).

conmon sees the shim as the container's process: logs, attach, wait, exit codes, restart policies
and live restore work as for `--isolation container`, because conmon and the shim outlive the daemon.

The root filesystem and volumes reach the guest over 9p: the shim bind-mounts the host's overlay
rootfs and every bind source into one per-VM directory that QEMU exports; inside the guest the
agent mounts it at `GUEST_SHARE`, and the runtime config's paths are rewritten to point there
(`guest_config`). So `cocon cp`, `diff`, `commit` and volumes shared with other instances see the
same files as with containers.

This module holds what the engine needs (the driver) and the pure config translation; the shim and
its command line are in cocon.isolation.microvm_shim.
"""

from __future__ import annotations

import math
import os

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.isolation.base import Handle, IsolationError
from cocon.isolation.container import ContainerDriver

if TYPE_CHECKING:
    from typing import Any

    from cocon.isolation.base import InstanceConfig, Stdio

#: Where the agent mounts the 9p share in the guest; the rootfs is `rootfs` under it.
GUEST_SHARE = "/run/cocon/share"
SHARE_TAG = "cocon-share"
#: 9p options: version 9p2000.L (POSIX semantics), 512 KiB messages, mmap-able files.
SHARE_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap"

#: Guest memory without --memory (touched lazily: an idle guest uses far less).
DEFAULT_MEMORY_MIB = 512
#: With --memory M, the guest gets M plus this for its kernel, the agent and page cache; the
#: container's own cgroup inside the guest is limited to M, so OOM semantics match a container.
MEMORY_OVERHEAD_MIB = 128
MIN_MEMORY_MIB = 128

#: The runc-compatible command conmon runs for microVMs (pyproject's console script).
RUNTIME_COMMAND = "cocon-microvm-runtime"


def machine_size(config: dict[str, Any]) -> tuple[int, int]:
    """(guest memory in MiB, vCPUs) for a runtime config: `--memory` plus the overhead, and
    `--cpus` rounded up (at least 1, at most the host's CPUs)."""
    resources = (config.get("linux") or {}).get("resources") or {}
    limit = (resources.get("memory") or {}).get("limit")
    if isinstance(limit, int) and limit > 0:
        memory = max(MIN_MEMORY_MIB, -(-limit // (1 << 20)) + MEMORY_OVERHEAD_MIB)
    else:
        memory = DEFAULT_MEMORY_MIB
    cpu = resources.get("cpu") or {}
    quota, period = cpu.get("quota"), cpu.get("period")
    cpus = 1
    if isinstance(quota, int) and isinstance(period, int) and quota > 0 and period > 0:
        cpus = math.ceil(quota / period)
    return memory, max(1, min(cpus, os.cpu_count() or 1))


def share_name(index: int) -> str:
    return f"m{index}"


def guest_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The runtime config the agent gets, and the binds the shim makes in the share directory:
    [(host path, name in the share)]. The rootfs and every bind mount's source are rewritten to
    their place under GUEST_SHARE; namespaces joined by path (the host's netns) are dropped: the
    container shares the guest's own network namespace, which only the VM's NIC reaches; hooks
    run on the host's side only for containers, so none reach the guest."""
    doc = _fastjson.loads(_fastjson.dumps(config))  # a deep copy
    binds: list[tuple[str, str]] = [(str(doc["root"]["path"]), "rootfs")]
    doc["root"]["path"] = f"{GUEST_SHARE}/rootfs"
    for index, mount in enumerate(doc.get("mounts") or []):
        options = mount.get("options") or []
        if mount.get("type") == "bind" or "bind" in options or "rbind" in options:
            source = mount.get("source")
            if not isinstance(source, str) or not source.startswith("/"):
                raise IsolationError(f"the bind mount {mount.get('destination')} has no absolute source")
            binds.append((source, share_name(index)))
            mount["source"] = f"{GUEST_SHARE}/{share_name(index)}"
    linux = doc.setdefault("linux", {})
    linux["namespaces"] = [
        ns for ns in linux.get("namespaces") or [] if ns.get("type") != "network" and not ns.get("path")
    ]
    doc.pop("hooks", None)
    return doc, binds


class MicrovmDriver:
    """microVMs under the daemon: the engine writes the bundle (`config_for`, the same runtime config
    as a container's) and spawns conmon with RUNTIME_COMMAND; this driver reaches each VM's shim
    through its control socket under `runtime_root` (`$COCON_RUN/vm`)."""

    isolation = "microvm"
    runtime_command = RUNTIME_COMMAND

    def __init__(self, runtime_root: str) -> None:
        self.runtime_root = runtime_root

    def config_for(self, cfg: InstanceConfig) -> dict[str, Any]:
        """The container's runtime config; also builds the guest assets on a microVM's first start
        (here, in the daemon, so a long build is not mistaken for a hung shim)."""
        from cocon.isolation.microvm_shim import assets_root
        from cocon.vmm.assets import ensure_assets
        from cocon.vmm.errors import VmmError

        try:
            ensure_assets(assets_root())
        except VmmError as exc:
            raise IsolationError(f"cannot prepare the microVM guest assets: {exc}") from None
        doc = ContainerDriver(self.runtime_root).config_for(cfg)
        doc.setdefault("annotations", {})["org.cocon.isolation"] = "microvm"
        return doc

    def runtime_args(self) -> list[str]:
        return ["--root", self.runtime_root]

    def warm_up(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def create(self, config: InstanceConfig, stdio: Stdio) -> Handle:
        raise IsolationError(
            "a microVM runs under the cocon daemon (its shim outlives the caller): use the cocon CLI "
            "or the API, not an in-process client"
        )

    def start(self, handle: Handle) -> None:
        from cocon.isolation import microvm_shim

        microvm_shim.control(self.runtime_root, handle.id, {"op": "start"})

    def wait(self, handle: Handle) -> int:
        raise IsolationError("a microVM's exit is collected by its conmon")

    def signal(self, instance_id: str, sig: int) -> None:
        from cocon.isolation import microvm_shim

        microvm_shim.kill(self.runtime_root, instance_id, sig)

    def resize(self, handle: Handle, rows: int, cols: int) -> None:
        pass  # conmon resizes the terminal the shim holds; the shim forwards it

    def state(self, instance_id: str) -> str:
        from cocon.isolation import microvm_shim

        return str(microvm_shim.state(self.runtime_root, instance_id).get("status", "unknown"))

    def delete(self, instance_id: str, *, force: bool = False) -> None:
        from cocon.isolation import microvm_shim

        microvm_shim.delete(self.runtime_root, instance_id, force=force)

    def exit_reason(self, instance_id: str) -> str:
        """Why the VM ended when its container did not end it (QEMU died), "" otherwise."""
        from cocon.isolation import microvm_shim

        try:
            directory = microvm_shim.state_dir(self.runtime_root, instance_id)
            with open(os.path.join(directory, "exit-reason")) as f:
                return f.read().strip()
        except (OSError, IsolationError):
            return ""

    def pause(self, instance_id: str) -> None:
        from cocon.isolation import microvm_shim

        microvm_shim.control(self.runtime_root, instance_id, {"op": "pause"})

    def resume(self, instance_id: str) -> None:
        from cocon.isolation import microvm_shim

        microvm_shim.control(self.runtime_root, instance_id, {"op": "resume"})

    def top(self, instance_id: str) -> dict[str, Any]:
        """Docker's top document of the container's processes in the guest (`ps -ef` columns)."""
        from cocon.isolation import microvm_shim

        reply = microvm_shim.control(self.runtime_root, instance_id, {"op": "top"})
        return {"Titles": reply["titles"], "Processes": reply["processes"]}

    def stats(self, instance_id: str) -> dict[str, Any]:
        from cocon.isolation import microvm_shim

        return microvm_shim.control(self.runtime_root, instance_id, {"op": "stats"})
