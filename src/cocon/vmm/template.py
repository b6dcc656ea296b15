"""Pre-booted VM templates: boot a guest once, save its state, start later VMs from the saved state.

A template is a guest that booted to a caller-given readiness marker, was paused (QMP `stop`) and
saved with QEMU's migration to a file (QEMU 7.2: an `exec:` URI). `TemplateStore.restore` starts a
new QEMU with `-incoming defer`, feeds it the file (`migrate-incoming`), and resumes it (`cont`):
the guest carries on from where the template stopped, without booting.

Two ways to keep the guest's RAM (`TemplateKey.for_config(..., mode=...)`; part of the key):

- `"ram-file"` (the default, fastest): the template VM's RAM is a `memory-backend-file` with
  `share=on` in the template directory, and the migration runs with the `x-ignore-shared`
  capability, so the saved stream holds only device and CPU state (~60 KB). A restored VM maps the
  same file with `share=off` (MAP_PRIVATE): its RAM *is* the file, copy-on-write. Nothing is read
  at restore; pages the guest only reads stay shared (page cache) between every VM restored from
  the template; pages it writes become private to that VM. The RAM file must never change while a
  VM maps it: it is written once, fsynced, made read-only, and only ever removed by unlinking.
- `"stream"`: plain RAM, the whole (non-zero) guest memory goes into the saved stream and is read
  back into each restored VM's own anonymous memory (no sharing; ~100 MB per template here).

Layout under `<root>/templates/`:

    <key digest>/manifest.json   the key, mode, file sizes, sha256 of `state`, timings
    <key digest>/state           the migration stream
    <key digest>/ram             the guest RAM ("ram-file" mode)
    <key digest>/console.log     the template VM's boot console (for diagnosis)
    tmp/<key prefix>-<random>/   templates being made (renamed into place when complete)
    locks/<key digest>.lock      flock'ed by a creator: two creators of one key never race

A template is keyed (`TemplateKey`) by everything that must match between save and restore: the
guest assets' digest, machine type, memory size, vCPUs, accelerator, CPU model, kernel command
line, the QEMU binary's identity (path, size, mtime; under KVM also the host CPU), the RAM mode,
the devices `MachineConfig` makes itself (disks — read-only ones with their file's identity —, 9p
share tags, the agent channel; not their per-VM paths) and a caller-given *device layout* string
for everything in `extra_args`: the devices must be the same at save and restore, but their
arguments hold per-VM paths, so the caller names the layout (and puts the digest of any disk image
whose content the guest may have cached into it).

A template that cannot be restored (files missing, truncated, corrupt, or QEMU refusing the stream)
is removed and `TemplateError` (a `QemuError`) raised; `restore_or_none` turns that into None so the
caller boots cold instead.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cocon.vmm.errors import QemuError
from cocon.vmm.qemu import MachineConfig, Qemu

__all__ = [
    "FORMAT_VERSION",
    "MODES",
    "Template",
    "TemplateError",
    "TemplateKey",
    "TemplateStore",
    "qemu_identity",
]

#: Bump when the way templates are made or restored changes (it is part of every key).
FORMAT_VERSION = 1
MODES = ("ram-file", "stream")
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state"
RAM_FILE = "ram"
#: The QOM id of the RAM backend; the RAM block's name in the stream, so it must not change.
RAM_BACKEND_ID = "cocon-ram"


class TemplateError(QemuError):
    """A template could not be made or restored. When restoring, the template has been removed:
    boot the VM cold (and make a new template)."""


def qemu_identity(binary: str) -> str:
    """The QEMU binary's path, size and mtime: a different build gives a different identity."""
    path = shutil.which(binary) or binary
    try:
        st = os.stat(path)
    except OSError as exc:
        raise QemuError(f"cannot find the QEMU binary {binary}: install qemu-system-x86") from exc
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _host_cpu() -> str:
    """A digest of the host CPU's model and flags (what a KVM guest with -cpu host sees)."""
    wanted: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "flags") and name not in wanted:
                    wanted[name] = value.strip()
                if len(wanted) == 2:
                    break
    except OSError:
        return "unknown"
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]


def _devices(config: MachineConfig) -> str:
    """The devices `MachineConfig` itself makes, as the guest sees them (no per-VM paths): each
    disk (read-only ones with their file's identity: the guest caches their blocks), each 9p
    share's tag, and whether there is an agent channel. `extra_args` are the caller's `layout`."""
    parts = []
    for disk in config.disks:
        if disk.readonly:
            st = os.stat(disk.path)
            parts.append(f"disk:ro:{os.path.realpath(disk.path)}:{st.st_size}:{st.st_mtime_ns}")
        else:
            parts.append("disk:rw")
    parts += [f"9p:{share.tag}:{'ro' if share.readonly else 'rw'}" for share in config.shares]
    if config.agent_socket is not None:
        parts.append("agent")
    return ",".join(parts)


@dataclass(frozen=True)
class TemplateKey:
    """Everything that must be equal between the VM a template was saved from and a restored one."""

    assets_digest: str
    machine: str
    memory_mib: int
    cpus: int
    accel: str
    cpu: str
    cmdline: str
    qemu: str  # qemu_identity()
    layout: str  # the caller's name for the device layout (identical devices at save and restore)
    devices: str  # _devices(config): the disks, 9p shares and agent channel, without per-VM paths
    mode: str = "ram-file"
    host_cpu: str = ""  # under KVM: _host_cpu(); under TCG the host CPU does not matter
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_config(
        cls, config: MachineConfig, *, assets_digest: str, layout: str, mode: str = "ram-file"
    ) -> TemplateKey:
        """The key of `config` booted from the assets `assets_digest` with the devices `layout`."""
        if mode not in MODES:
            raise QemuError(f"unknown template mode {mode!r}: use one of {', '.join(MODES)}")
        config.validate()
        return cls(
            assets_digest=assets_digest,
            machine=config.machine,
            memory_mib=config.memory_mib,
            cpus=config.cpus,
            accel=config.accel,
            cpu=config.cpu or ("host" if config.accel == "kvm" else "max"),
            cmdline=config.cmdline,
            qemu=qemu_identity(config.binary),
            layout=layout,
            devices=_devices(config),
            mode=mode,
            host_cpu=_host_cpu() if config.accel == "kvm" else "",
        )

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplateKey:
        return cls(**data)

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class Template:
    """A complete template on disk (see the module's docstring for its files)."""

    key: TemplateKey
    directory: str
    manifest: dict[str, Any]

    @property
    def mode(self) -> str:
        return self.key.mode

    @property
    def state(self) -> str:
        return os.path.join(self.directory, STATE_FILE)

    @property
    def ram(self) -> str:
        return os.path.join(self.directory, RAM_FILE)


def _ram_args(key: TemplateKey, path: str, *, share: bool) -> tuple[str, ...]:
    if key.mode != "ram-file":
        return ()
    backend = (
        f"memory-backend-file,id={RAM_BACKEND_ID},size={key.memory_mib}M,"
        f"mem-path={path},share={'on' if share else 'off'}"
    )
    # "-machine memory-backend=…" merges with the -M option the driver writes.
    return ("-object", backend, "-machine", f"memory-backend={RAM_BACKEND_ID}")


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TemplateStore:
    """Templates under `<root>/templates/` (see the module's docstring).

    key = TemplateKey.for_config(config, assets_digest=assets.digest, layout="rng")
    store = TemplateStore(root)
    template = store.find(key) or store.create(key, config, ready="cocon-guest: waiting")
    vm = store.restore(template, config, workdir)      # a running Qemu; the caller closes it
    vm = store.restore_or_none(key, config, workdir)   # None: no usable template, boot cold
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = os.path.join(root, "templates")

    # --- finding ------------------------------------------------------------------------------

    def _load(self, directory: str) -> Template:
        with open(os.path.join(directory, MANIFEST_FILE), "rb") as f:
            manifest = json.load(f)
        key = TemplateKey.from_json(manifest["key"])
        if key.digest != os.path.basename(directory):
            raise ValueError(f"{directory} holds the template of {key.digest}")
        return Template(key, directory, manifest)

    def find(self, key: TemplateKey) -> Template | None:
        """The template of `key`, or None (none made, or its manifest is unreadable: then removed)."""
        directory = os.path.join(self.base, key.digest)
        if not os.path.isdir(directory):
            return None
        try:
            template = self._load(directory)
        except (OSError, ValueError, KeyError, TypeError):
            self._discard(directory)
            return None
        return template if template.key == key else None

    def templates(self) -> list[Template]:
        """Every complete template in the store."""
        found: list[Template] = []
        try:
            names = sorted(os.listdir(self.base))
        except FileNotFoundError:
            return []
        for name in names:
            if len(name) == 64:
                try:
                    found.append(self._load(os.path.join(self.base, name)))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return found

    def prune(self, keep: Iterable[TemplateKey] = ()) -> list[str]:
        """Remove every template (complete or unreadable) but those of `keep`; the removed digests.
        Call it when the assets or QEMU change: templates of old keys are never found again."""
        kept = {key.digest for key in keep}
        removed = []
        try:
            names = sorted(os.listdir(self.base))
        except FileNotFoundError:
            return []
        for name in names:
            if len(name) == 64 and name not in kept and os.path.isdir(os.path.join(self.base, name)):
                self._discard(os.path.join(self.base, name))
                removed.append(name)
        return removed

    def remove(self, template: Template) -> None:
        """Remove a template. VMs restored from it keep running: their RAM mapping holds the file."""
        self._discard(template.directory)

    def _discard(self, directory: str) -> None:
        tmp = os.path.join(self.base, "tmp")
        os.makedirs(tmp, exist_ok=True)
        doomed = tempfile.mkdtemp(dir=tmp, prefix="discard-")
        try:
            os.rename(directory, os.path.join(doomed, "template"))
        except FileNotFoundError:
            pass  # another process removed it first
        # Unlinking (never truncating) the RAM file: restored VMs that map it are not disturbed.
        shutil.rmtree(doomed, ignore_errors=True)

    # --- making -------------------------------------------------------------------------------

    def create(
        self,
        key: TemplateKey,
        config: MachineConfig,
        *,
        ready: str,
        timeout: float = 60.0,
        on_started: Callable[[Qemu], None] | None = None,
    ) -> Template:
        """Boot `config` until the console shows `ready`, pause, save, quit: the new template.

        `config` must be the VM `key` describes (checked) with the devices of `key.layout`. If a
        template of `key` exists (or another creator finishes one while this waits) it is returned
        as is. `on_started(vm)` runs as soon as QEMU runs (e.g. to connect to a guest channel before
        the guest opens it). Raises TemplateError (nothing left behind) if the boot or the save fails."""
        self._check(key, config)
        os.makedirs(os.path.join(self.base, "locks"), exist_ok=True)
        tmp = os.path.join(self.base, "tmp")
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(self.base, "locks", key.digest + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                existing = self.find(key)
                if existing is not None:
                    return existing
                prefix = key.digest[:12] + "-"
                for name in os.listdir(tmp):  # left by a creator that died: we hold the lock
                    if name.startswith(prefix):
                        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
                work = tempfile.mkdtemp(dir=tmp, prefix=prefix)
                try:
                    manifest = self._make(key, config, work, ready, timeout, on_started)
                    with open(os.path.join(work, MANIFEST_FILE), "w") as f:
                        json.dump(manifest, f, indent=2, sort_keys=True)
                        f.flush()
                        os.fsync(f.fileno())
                    for name in (STATE_FILE, RAM_FILE, MANIFEST_FILE):
                        if os.path.exists(os.path.join(work, name)):
                            os.chmod(os.path.join(work, name), 0o400)
                    final = os.path.join(self.base, key.digest)
                    os.rename(work, final)
                    _fsync(self.base)
                except BaseException:
                    shutil.rmtree(work, ignore_errors=True)
                    raise
                return self._load(final)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _make(
        self, key: TemplateKey, config: MachineConfig, work: str, ready: str, timeout: float,
        on_started: Callable[[Qemu], None] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        state = os.path.join(work, STATE_FILE)
        ram = os.path.join(work, RAM_FILE)
        vm_config = dataclasses.replace(
            config, extra_args=(*_ram_args(key, ram, share=True), *config.extra_args)
        )
        vm = Qemu(vm_config, work)
        try:
            started = time.monotonic()
            try:
                vm.start(timeout=min(timeout, 30.0))
                if on_started is not None:
                    on_started(vm)
                vm.wait_for_console(ready, timeout=timeout)
            except QemuError as exc:
                raise TemplateError(
                    f"the template VM did not reach {ready!r}: {exc}",
                    returncode=exc.returncode,
                    log_tail=exc.log_tail,
                ) from exc
            booted = time.monotonic() - started
            started = time.monotonic()
            if key.mode == "ram-file":
                vm.qmp(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
                )
            vm.qmp("stop")
            vm.qmp("migrate", {"uri": "exec:cat > " + shlex.quote(state)})
            info = self._wait_migration(vm, timeout, "save")
            saved = time.monotonic() - started
            vm.quit(timeout=10)
        finally:
            vm.close()
        for name in ("qmp.sock", "qemu.log"):
            try:
                os.unlink(os.path.join(work, name))
            except FileNotFoundError:
                pass
        files: dict[str, dict[str, int | str]] = {}
        _fsync(state)
        st = os.stat(state)
        files[STATE_FILE] = {"size": st.st_size, "sha256": _sha256_file(state)}
        if key.mode == "ram-file":
            _fsync(ram)
            os.chmod(ram, 0o400)
            st = os.stat(ram)
            if st.st_size != key.memory_mib << 20:
                raise TemplateError(f"the RAM file {ram} has {st.st_size} bytes, not {key.memory_mib} MiB")
            files[RAM_FILE] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "allocated": st.st_blocks * 512,
            }
        return {
            "format": FORMAT_VERSION,
            "key": key.to_json(),
            "ready": ready,
            "files": files,
            "created": time.time(),
            "boot_seconds": round(booted, 3),
            "save_seconds": round(saved, 3),
            "ram_transferred": int(info.get("ram", {}).get("transferred", 0)),
        }

    @staticmethod
    def _wait_migration(vm: Qemu, timeout: float, what: str) -> dict[str, Any]:
        try:
            return vm.wait_for_migration(f"the {what} migration", time.monotonic() + timeout)
        except QemuError as exc:
            raise TemplateError(str(exc), log_tail=exc.log_tail) from None

    @staticmethod
    def _check(key: TemplateKey, config: MachineConfig) -> None:
        wanted = TemplateKey.for_config(
            config, assets_digest=key.assets_digest, layout=key.layout, mode=key.mode
        )
        if wanted != key:
            diff = [
                f"{f.name}: {getattr(key, f.name)!r} != {getattr(wanted, f.name)!r}"
                for f in dataclasses.fields(key)
                if getattr(key, f.name) != getattr(wanted, f.name)
            ]
            raise QemuError(
                "the machine configuration does not match the template key ("
                + "; ".join(diff)
                + "): make the key with TemplateKey.for_config(config, …)"
            )

    # --- restoring ----------------------------------------------------------------------------

    def _verify(self, template: Template) -> None:
        files = template.manifest["files"]
        st = os.stat(template.state)
        expected = files[STATE_FILE]
        if st.st_size != expected["size"]:
            raise ValueError(f"{template.state} has {st.st_size} bytes, not {expected['size']}")
        if _sha256_file(template.state) != expected["sha256"]:
            raise ValueError(f"{template.state} does not match its sha256")
        if template.mode == "ram-file":
            st = os.stat(template.ram)
            expected = files[RAM_FILE]
            if (st.st_size, st.st_mtime_ns) != (expected["size"], expected["mtime_ns"]):
                raise ValueError(f"{template.ram} was changed after the template was saved")

    def restore(
        self, template: Template, config: MachineConfig, workdir: str, *, timeout: float = 30.0,
        on_started: Callable[[Qemu], None] | None = None,
    ) -> Qemu:  # fmt: skip
        """A running Qemu (in `workdir`) that resumed the template's guest; the caller closes it.

        `config` must match the template's key (same machine, memory, … and the same devices under
        new per-VM paths). TemplateError, with the template removed, if its files do not verify or
        QEMU cannot load them; QemuError (template kept) if QEMU cannot start at all. `on_started(vm)`
        runs before the state is loaded (a channel connected then is connected when the guest resumes:
        the guest sees no host leave and come back)."""
        self._check(template.key, config)
        try:
            self._verify(template)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.remove(template)
            raise TemplateError(
                f"the template {template.directory} is damaged ({exc}); it was removed: boot the VM cold"
            ) from exc
        vm_config = dataclasses.replace(
            config,
            extra_args=(
                *_ram_args(template.key, template.ram, share=False),
                *config.extra_args,
                "-incoming",
                "defer",
            ),
        )
        vm = Qemu(vm_config, workdir)
        try:
            vm.start(timeout=timeout)
        except BaseException:
            vm.close()
            raise
        try:
            if on_started is not None:
                on_started(vm)
            deadline = time.monotonic() + timeout
            if template.mode == "ram-file":
                vm.qmp(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
                )
            vm.qmp("migrate-incoming", {"uri": "exec:cat " + shlex.quote(template.state)})
            while (status := vm.status()) == "inmigrate":
                if time.monotonic() > deadline:
                    raise TemplateError(f"loading the template did not finish within {timeout:g} s")
                time.sleep(0.002)
            info = vm.qmp("query-migrate")
            if status != "paused" or info.get("status") != "completed":
                raise TemplateError(
                    f"after loading the template the VM is {status!r} (migration {info.get('status')!r}),"
                    " not paused after a completed load"
                )
            vm.qmp("cont")
            if (status := vm.status()) != "running":
                raise TemplateError(f"the restored VM is {status!r} after cont, not running")
            return vm
        except QemuError as exc:
            # QEMU exits when it cannot load the stream; QMP may notice before the exit is reaped.
            try:
                returncode: int | None = vm.wait(2.0)
            except QemuError:
                returncode = None
            tail = vm.log_tail()
            vm.close()
            self.remove(template)
            raise TemplateError(
                f"the template {template.directory} could not be restored; it was removed: boot the VM "
                f"cold. {exc}"
                + (f" (QEMU exited with status {returncode})" if returncode is not None else "")
                + (f"\n--- last lines of its log ---\n{tail}" if tail and tail not in str(exc) else ""),
                returncode=returncode,
                log_tail=tail,
            ) from exc
        except BaseException:
            vm.close()
            raise

    def restore_or_none(
        self, key: TemplateKey, config: MachineConfig, workdir: str, *, timeout: float = 30.0,
        on_started: Callable[[Qemu], None] | None = None,
    ) -> Qemu | None:  # fmt: skip
        """`restore` of the template of `key`, or None when there is none or it proved unusable
        (then it was removed): the caller boots cold."""
        template = self.find(key)
        if template is None:
            return None
        try:
            return self.restore(template, config, workdir, timeout=timeout, on_started=on_started)
        except TemplateError:
            return None
