"""The `vm` isolation level: a full virtual machine with its own kernel, init and persistent disk.

Two kinds of instance run at this level (docs/vm.md):

- from an OCI image (`cocon run --isolation vm IMAGE`): the engine turns the image into a root disk
  (an ext4 filesystem, cached per image, with a copy-on-write overlay per instance: cocon.storage.
  vm_disks) and picks a boot mode (`boot_mode`):
    "kernel"  the image has its own kernel (/boot/vmlinuz-*) and init: they boot, with its initrd
    "boot"    the image has an init (systemd) but no kernel: cocon's guest kernel and initramfs
              mount the disk and switch_root into the image's init
    "cmd"     otherwise (or a command was given): cocon's initramfs stays PID 1 and runs the image's
              command in the disk's root (`run_script`), then powers the VM off with its exit code
- from any disk or ISO (`cocon vm create NAME --disk FILE [--iso FILE]`): mode "firmware": SeaBIOS
  or OVMF boots whatever is on the disk or CD-ROM; the guest needs nothing of cocon.

As for microVMs, conmon runs a runc-like command (`cocon-vm-runtime`) whose `create` forks a shim
per VM (cocon.isolation.vm_shim) that owns QEMU (q35 machine), relays the serial console to conmon
(so logs, attach and `cocon vm console` are the container path's), answers the guest's DHCP, and
serves start, signals (SIGTERM: the ACPI power button, or the command's signal in "cmd" mode),
pause/resume, stats, disk hot-plug, snapshots and migration on its control socket.
"""

from __future__ import annotations

import os
import shlex

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.isolation.base import IsolationError
from cocon.isolation.container import ContainerDriver
from cocon.isolation.microvm import MicrovmDriver

if TYPE_CHECKING:
    from typing import Any

    from cocon.isolation.base import InstanceConfig

#: The runc-compatible command conmon runs for full VMs (pyproject's console script).
RUNTIME_COMMAND = "cocon-vm-runtime"
#: The runtime config's annotation that carries the machine (JSON) from the engine to the shim.
MACHINE_ANNOTATION = "org.cocon.vm.machine"
BOOT_MODES = ("cmd", "boot", "kernel", "firmware")
#: Guest memory and vCPUs without --memory / --cpus.
DEFAULT_MEMORY_MIB = 1024
MIN_MEMORY_MIB = 128
#: The 9p share that carries volumes and /etc files into a "cmd" mode guest.
SHARE_TAG = "cocon-share"
GUEST_SHARE = "/run/share"
#: Where the init scripts of images with an init live (first match wins).
INIT_CANDIDATES = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")

#: Keys of the machine document (InstanceConfig.machine):
#:   mode            one of BOOT_MODES
#:   root            {"path", "format"}: the instance's root disk (the first virtio disk)
#:   disks           [{"path", "format", "serial", "readonly", "node"}]: further disks (volumes)
#:   iso, seed       an install/live ISO (CD-ROM, boots first), a cloud-init NoCloud seed (CD-ROM)
#:   kernel, initrd  for mode "kernel": the image's, copied out of it; "cmd"/"boot": filled here
#:   init            for "boot": the image's init; cmdline: extra kernel command line
#:   firmware        "bios" or "uefi"; nvram: the directory of the VM's UEFI variables
#:   memory_mib, cpus, reboot (a guest reset reboots: True except in "cmd" mode)
#:   loadvm          the internal snapshot (with memory) to resume from at this start
MACHINE_KEYS = (
    "mode", "root", "disks", "iso", "seed", "kernel", "initrd", "init", "cmdline", "firmware", "nvram",
    "memory_mib", "cpus", "reboot", "loadvm",
)  # fmt: skip


def machine_size(memory: int | None, cpus: float | None) -> tuple[int, int]:
    """(guest memory in MiB, vCPUs) from --memory (bytes) and --cpus: the guest gets exactly
    --memory (at least MIN_MEMORY_MIB), --cpus rounded up (at least 1, at most the host's CPUs)."""
    mib = DEFAULT_MEMORY_MIB if not memory else max(MIN_MEMORY_MIB, -(-memory // (1 << 20)))
    count = 1 if not cpus else int(-(-cpus // 1))
    return mib, max(1, min(count, os.cpu_count() or 1))


def boot_mode(rootfs: str, *, command_given: bool, image_cmd: list[str]) -> tuple[str, str | None]:
    """How an image boots (see the module docstring): ("kernel" | "boot" | "cmd", the init path).
    An image "has an init" when its command is one of INIT_CANDIDATES, or when it has systemd and
    the user gave no command of their own."""

    def exists(path: str) -> bool:
        try:
            return os.path.isfile(resolve_in_root(rootfs, path))
        except OSError:
            return False

    init: str | None = None
    if image_cmd and image_cmd[0] in INIT_CANDIDATES and exists(image_cmd[0]):
        init = image_cmd[0]
    elif not command_given and any(exists(p) for p in INIT_CANDIDATES[1:]) and exists("/sbin/init"):
        init = "/sbin/init"
    if init is None:
        return "cmd", None
    return ("kernel" if image_kernel(rootfs) is not None else "boot"), init


def image_kernel(rootfs: str) -> tuple[str, str | None] | None:
    """(kernel, initrd) host paths of the newest /boot/vmlinuz-<release> in the image (and its
    /boot/initrd.img-<release>), resolved inside the image; None when it has none."""
    try:
        names = os.listdir(resolve_in_root(rootfs, "/boot"))
    except OSError:
        return None
    releases = sorted((n[len("vmlinuz-") :] for n in names if n.startswith("vmlinuz-")), key=_release_key)
    for release in reversed(releases):
        try:
            kernel = resolve_in_root(rootfs, f"/boot/vmlinuz-{release}")
        except OSError:
            continue
        if not os.path.isfile(kernel):
            continue
        try:
            initrd: str | None = resolve_in_root(rootfs, f"/boot/initrd.img-{release}")
        except OSError:
            initrd = None
        return kernel, (initrd if initrd is not None and os.path.isfile(initrd) else None)
    return None


def resolve_in_root(rootfs: str, path: str) -> str:
    """The host path of `path` as the image sees it: symlinks and `..` never leave `rootfs`
    (OSError when it does not exist)."""
    from cocon.runtime.rootfs import fd_path, open_in_root

    rootfd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_in_root(rootfd, path)
        try:
            return os.readlink(fd_path(fd))
        finally:
            os.close(fd)
    finally:
        os.close(rootfd)


def _release_key(release: str) -> list[tuple[int, int, str]]:
    """Orders kernel releases as versions: 6.1.0-10 after 6.1.0-9."""
    return [(1, int(p), "") if p.isdigit() else (0, 0, p) for p in release.replace("-", ".").split(".")]


def run_script(
    process: dict[str, Any], *, hostname: str, network: dict[str, Any] | None, binds: list[tuple[str, str]],
    stdin: bool, rows: int = 24, cols: int = 80, files: list[tuple[str, bytes]] | None = None,
    stderr: bool = False,
) -> str:  # fmt: skip
    """The run configuration of a "cmd" mode guest: shell code the guest's init sources (QEMU hands
    it in over fw_cfg). Every value from the image or the user is quoted (shlex.quote): nothing in
    them can run as code. `binds`: (destination in the guest, name in the 9p share); `stderr`: the
    command's standard error goes to its own serial port (ttyS2), not the console."""
    q = shlex.quote
    user = process.get("user") or {}
    env = [e for e in process.get("env") or [] if isinstance(e, str) and "=" in e]
    args = [str(a) for a in process.get("args") or []]
    if not args:
        raise IsolationError("the instance has no command to run")
    cwd = str(process.get("cwd") or "/")
    lines = [
        f"COCON_HOSTNAME={q(hostname)}",
        f"COCON_CWD={q(cwd if cwd.startswith('/') else '/' + cwd)}",
        f"COCON_UID={int(user.get('uid') or 0)}",
        f"COCON_GID={int(user.get('gid') or 0)}",
        f"COCON_TERMINAL={1 if process.get('terminal') else 0}",
        f"COCON_STDIN={1 if stdin else 0}",
        f"COCON_STDERR={1 if stderr else 0}",
        f"COCON_ROWS={int(rows)}",
        f"COCON_COLS={int(cols)}",
        "cocon_network() {",
    ]
    if network:
        lines.append(f"    ip link set eth0 mtu {int(network.get('mtu') or 1500)} up || return 1")
        for address in network.get("addresses") or []:
            lines.append(f"    ip addr add {q(str(address))} dev eth0 || return 1")
        for route in network.get("routes") or []:
            lines.append(f"    ip route add default via {q(str(route['gateway']))} dev eth0 || return 1")
    lines += ["    return 0", "}", "cocon_mounts() {"]
    for destination, content in files or []:  # replaced, not followed: a symlink there is the image's
        target = "$root" + q(destination)
        lines.append(
            f"    rm -f {target}; printf '%s' {q(content.decode(errors='replace'))} > {target} || return 1"
        )
    if binds:
        lines.append(f"    mkdir -p {GUEST_SHARE} || return 1")
        lines.append(f"    mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 {SHARE_TAG} "
                     f"{GUEST_SHARE} "
                     "|| return 1")  # fmt: skip
        for destination, name in binds:
            source, target = f"{GUEST_SHARE}/{name}", "$root" + q(destination)
            lines.append(f"    if [ -d {source} ]; then mkdir -p {target}; "
                         f"else mkdir -p \"$(dirname {target})\"; touch {target}; fi")  # fmt: skip
            lines.append(f"    mount --bind {source} {target} || return 1")
    lines += ["    return 0", "}"]
    argv = ["env", "-i", *env, *args]
    lines.append("set -- " + " ".join(q(a) for a in argv))
    return "\n".join(lines) + "\n"


#: Files the engine bind-mounts into containers that a VM gets written into its disk instead (a 9p
#: share in use keeps QEMU from saving the machine: no memory snapshots, no migration).
WRITTEN_FILES = ("/etc/hosts", "/etc/resolv.conf", "/etc/hostname")
MAX_WRITTEN_FILE = 64 << 10


def share_binds(config: dict[str, Any]) -> tuple[list[tuple[str, str, str]], list[tuple[str, bytes]]]:
    """The bind mounts of a runtime config that reach a "cmd" mode guest: over 9p
    [(host source, destination, name in the share)], and the small /etc files written into its disk
    [(destination, content)]. Kernel filesystems (proc, sysfs, tmpfs, …) are the guest init's own."""
    binds, files = [], []
    for index, mount in enumerate(config.get("mounts") or []):
        options = mount.get("options") or []
        if mount.get("type") == "bind" or "bind" in options or "rbind" in options:
            source = mount.get("source")
            if not isinstance(source, str) or not source.startswith("/"):
                raise IsolationError(f"the bind mount {mount.get('destination')} has no absolute source")
            destination = str(mount.get("destination"))
            if destination in WRITTEN_FILES and os.path.isfile(source):
                with open(source, "rb") as f:
                    files.append((destination, f.read(MAX_WRITTEN_FILE)))
                continue
            binds.append((source, destination, f"m{index}"))
    return binds, files


class VmDriver(MicrovmDriver):
    """Full VMs under the daemon: the engine prepares the machine (InstanceConfig.machine) and
    spawns conmon with RUNTIME_COMMAND; this driver reaches each VM's shim through its control
    socket under `runtime_root`, as the microVM driver does (start, signals, state, delete, exit
    reason, pause/resume are the same requests)."""

    isolation = "vm"
    runtime_command = RUNTIME_COMMAND

    def config_for(self, cfg: InstanceConfig) -> dict[str, Any]:
        """The runtime config (a container's: the process, mounts, hostname) with the machine in an
        annotation; cocon's guest kernel and initramfs for the modes that boot them (built here, in
        the daemon, on first use)."""
        machine = dict(cfg.machine or {})
        mode = machine.get("mode")
        if mode not in BOOT_MODES:
            raise IsolationError(f"the VM has no valid boot mode ({mode!r})")
        if mode in ("cmd", "boot"):
            from cocon.isolation.microvm_shim import assets_root
            from cocon.vmm.assets import ensure_assets
            from cocon.vmm.errors import VmmError

            try:
                assets = ensure_assets(assets_root())
            except VmmError as exc:
                raise IsolationError(f"cannot prepare the guest kernel: {exc}") from None
            machine["kernel"], machine["initrd"] = assets.kernel, assets.initrd
        if cfg.rootfs:
            doc = ContainerDriver(self.runtime_root).config_for(cfg)
        else:  # a VM from a disk: no image, no process
            doc = {"ociVersion": "1.2.0", "hostname": cfg.hostname, "mounts": [],
                   "process": {"terminal": cfg.terminal, "args": ["firmware"], "cwd": "/"},
                   "root": {"path": ""}, "linux": {"namespaces": []}}  # fmt: skip
            if cfg.network not in ("none", "host") and cfg.network:
                doc["linux"]["namespaces"].append({"type": "network", "path": cfg.network})
        annotations = doc.setdefault("annotations", {})
        annotations["org.cocon.isolation"] = "vm"
        annotations[MACHINE_ANNOTATION] = _fastjson.dumps(machine)
        return doc

    def control(self, instance_id: str, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """A request to the VM's shim (pause, resume, stats, disk hot-plug, snapshots, migration)."""
        from cocon.isolation import microvm_shim

        return microvm_shim.control(self.runtime_root, instance_id, request, timeout)

    def top(self, instance_id: str) -> dict[str, Any]:
        raise IsolationError("a full VM's processes are its own: use cocon vm console (or ssh) to see them")

    def stats(self, instance_id: str) -> dict[str, Any]:
        return self.control(instance_id, {"op": "stats"})
