"""A QEMU process driver: command lines for cocon's machines, start, QMP, stop, guaranteed clean-up.

`MachineConfig` describes a VM (kernel, initramfs, command line, machine type, accelerator, memory,
vCPUs, raw disks (`Disk`), 9p shares (`Share`), the agent's virtio-serial channel, extra virtio
devices); `build_command` turns it into a `qemu-system-x86_64` command line:

- the `microvm` machine (no PCI, no firmware tables beyond ACPI, virtio-mmio devices: devices named
  `virtio-*-device`) by default; `q35` where a feature needs PCI (devices named `virtio-*-pci`);
  `virtio_device(machine, kind)` gives the right name;
- `-nodefaults -no-user-config -nographic`, `-no-reboot` (a guest reset ends QEMU), no network
  device unless the caller adds one (`-nic none`), the serial console (ttyS0) written to a file;
- a QMP server on a Unix socket: `-qmp unix:PATH,server=on,wait=off`;
- disks in the order given (the first is the guest's /dev/vda): `-drive if=none,id=diskN,file=PATH,
  format=raw,readonly=on|off` + `-device virtio-blk-*,drive=diskN`;
- 9p shares: `-fsdev local,id=fsN,path=DIR,security_model=passthrough,multidevs=remap[,readonly=on]`
  + `-device virtio-9p-*,fsdev=fsN,mount_tag=TAG` (guest: `mount -t 9p -o trans=virtio TAG DIR`);
- the agent channel: `-device virtio-serial-*` + `-chardev socket,id=agent,path=SOCK,server=on,
  wait=off` + `-device virtserialport,chardev=agent,name=org.cocon.agent.0` (guest: the
  /dev/vportNpM whose /sys/class/virtio-ports/vportNpM/name is that; no udev, so no
  /dev/virtio-ports/ link).

`Qemu` runs one such process. It is synchronous: QMP goes through `qemu.qmp.QMPClient` (asyncio) on
a private event loop in a helper thread, and every call takes a timeout, so callers in threads or in
an executor of the daemon's loop use it alike. A `Qemu` is a context manager; leaving it (or
`close()`) makes sure no QEMU process is left: it sends `quit`, then SIGKILLs and reaps the process.
A QEMU that exits unexpectedly raises `QemuError` with its exit status and the tail of its log
(QEMU's own stderr and the guest's serial console).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cocon.vmm.errors import QemuError

__all__ = [
    "AGENT_PORT",
    "QEMU_BINARY",
    "Disk",
    "MachineConfig",
    "Qemu",
    "Share",
    "build_command",
    "host_tsc_khz",
    "virtio_device",
]

QEMU_BINARY = "qemu-system-x86_64"
MACHINES = ("microvm", "q35")
ACCELERATORS = ("tcg", "kvm")
#: Kernel command line every guest gets (before `MachineConfig.cmdline`): console on the first
#: serial port, reboot at once on panic (with -no-reboot: QEMU exits), no slow console output, no
#: crypto self tests at boot (crypto_algapi_init waited ~0.2 s for them, crypto_kdf108_init another
#: 0.2 s under TCG: the guest reaches python ~0.4 s sooner; a FIPS kernel runs them regardless).
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet cryptomgr.notests"
#: The name of the agent's virtio-serial port (the guest sees /dev/virtio-ports/<name>).
AGENT_PORT = "org.cocon.agent.0"
#: Longest Unix socket path (sun_path holds 108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107
_TAG = re.compile(r"[A-Za-z0-9_.-]{1,31}\Z")

T = TypeVar("T")


def virtio_device(machine: str, kind: str) -> str:
    """The QEMU device name of a virtio `kind` ("blk", "net", "serial", "rng", …) on `machine`."""
    return f"virtio-{kind}-device" if machine == "microvm" else f"virtio-{kind}-pci"


@functools.lru_cache(maxsize=1)
def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz when the host kernel knows it exactly (flags tsc_known_freq
    and constant_tsc, no cpufreq scaling: /proc/cpuinfo's "cpu MHz" is then the TSC's); else None.

    Under TCG the guest's TSC is the host's, and a TCG guest on a busy host often fails to
    calibrate it against the PIT (microvm has no HPET or ACPI PM timer to fall back on): it marks
    the TSC unstable and then hangs before its console comes up. `tsc_early_khz=` skips that."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    flags: set[str] = set()
    mhz: float | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
        elif not line.strip() and flags:
            break  # the first CPU is enough
    if mhz is None or not {"tsc_known_freq", "constant_tsc"} <= flags:
        return None
    if os.path.isdir("/sys/devices/system/cpu/cpu0/cpufreq"):
        return None  # "cpu MHz" is the current clock, not the TSC's
    return round(mhz * 1000)


def _opt(value: str) -> str:
    """A value for a QEMU -option list: a comma is written twice."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class Disk:
    """A disk image or block device, given to the guest as a virtio-blk disk (or, with `cdrom`, as
    a SATA CD-ROM on q35: installer and live ISOs boot from there)."""

    path: str
    readonly: bool = True
    format: str = "raw"  # or "qcow2"
    cdrom: bool = False
    #: The virtio-blk serial number: the guest's /dev/disk/by-id/virtio-<serial> (at most 20 bytes).
    serial: str | None = None
    #: The QEMU id of the drive (for hot-unplug and snapshots); None: diskN by position.
    node: str | None = None
    #: Firmware boot order (1 first); None: not a boot device of its own.
    bootindex: int | None = None


@dataclass(frozen=True)
class Share:
    """A host directory shared over virtio-9p; the guest mounts it with
    `mount -t 9p -o trans=virtio,version=9p2000.L TAG DIR`."""

    path: str
    tag: str  # the mount tag: 1-31 of [A-Za-z0-9_.-]
    readonly: bool = False


@dataclass(frozen=True)
class MachineConfig:
    """One VM: what to boot and on what."""

    #: The kernel to boot directly; None: the firmware boots from the disks (full VMs).
    kernel: str | None
    initrd: str | None = None
    cmdline: str = ""  # appended to BASE_CMDLINE
    machine: str = "microvm"  # or "q35"
    accel: str = "tcg"  # or "kvm"
    memory_mib: int = 256
    cpus: int = 1
    #: The -cpu model; None: "host" under KVM, "max" under TCG.
    cpu: str | None = None
    #: virtio-blk disks, in order: the first is /dev/vda in the guest (the utility image goes there).
    disks: tuple[Disk, ...] = ()
    #: Host directories shared over virtio-9p.
    shares: tuple[Share, ...] = ()
    #: Path of the Unix socket QEMU listens on for the agent's virtio-serial port (AGENT_PORT);
    #: None: no agent channel. Its directory must exist (make it root-only).
    agent_socket: str | None = None
    #: Further arguments (drives, -device …, -chardev …); use virtio_device() for device names.
    extra_args: tuple[str, ...] = ()
    binary: str = QEMU_BINARY
    #: Serial ports as Unix socket servers (ttyS0, ttyS1, …) whose host ends a process connects to;
    #: the first one's output is also logged to the console log. Empty: ttyS0 written to the log only.
    serial_sockets: tuple[str, ...] = ()
    #: True: a guest reset reboots it (a full VM); False: it ends QEMU (-no-reboot).
    reboot: bool = False
    #: Start with the vCPUs stopped (-S): QMP `cont` runs the guest.
    paused: bool = False
    #: `-incoming` (a migration target: "defer", "tcp:HOST:PORT", "unix:PATH", "exec:CMD").
    incoming: str | None = None
    #: QEMU firmware config items (name, host file): the guest reads
    #: /sys/firmware/qemu_fw_cfg/by_name/<name>/raw (module qemu_fw_cfg). Names start with "opt/".
    fw_cfg: tuple[tuple[str, str], ...] = ()
    #: The guest kernel's console device (console= on its command line).
    console: str = "ttyS0"

    def validate(self) -> None:
        if self.machine not in MACHINES:
            raise QemuError(f"unknown machine type {self.machine!r}: use one of {', '.join(MACHINES)}")
        if self.accel not in ACCELERATORS:
            raise QemuError(f"unknown accelerator {self.accel!r}: use one of {', '.join(ACCELERATORS)}")
        if self.memory_mib < 32:
            raise QemuError(f"{self.memory_mib} MiB of guest memory is too little: give at least 32")
        if not 1 <= self.cpus <= 255:
            raise QemuError(f"{self.cpus} vCPUs: give between 1 and 255")
        for path in (self.kernel, self.initrd):
            if path is not None and not os.path.isfile(path):
                raise QemuError(f"{path} does not exist: build the guest assets (cocon.vmm.assets)")
        if self.kernel is None and self.initrd is not None:
            raise QemuError("an initrd needs a kernel: give both or neither")
        for name, path in self.fw_cfg:
            if not name.startswith("opt/") or "," in name:
                raise QemuError(f"the fw_cfg name {name!r} must start with 'opt/' and have no comma")
            if not os.path.isfile(path):
                raise QemuError(f"the fw_cfg file {path} does not exist")
        for sock in self.serial_sockets:
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                raise QemuError(f"the serial socket path {sock} is too long for a Unix socket")
        for disk in self.disks:
            if disk.format not in ("raw", "qcow2"):
                raise QemuError(f"the disk {disk.path} has format {disk.format!r}: use raw or qcow2")
            if disk.cdrom and self.machine != "q35":
                raise QemuError("a CD-ROM needs the q35 machine")
            try:
                mode = os.stat(disk.path).st_mode
            except OSError as exc:
                raise QemuError(f"the disk {disk.path} cannot be used: {exc.strerror}") from exc
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise QemuError(f"the disk {disk.path} is neither a file nor a block device: give an image")
        tags: set[str] = set()
        for share in self.shares:
            if not os.path.isdir(share.path):
                raise QemuError(f"the shared directory {share.path} does not exist: create it first")
            if not _TAG.match(share.tag):
                raise QemuError(
                    f"the 9p mount tag {share.tag!r} is not 1-31 letters, digits or '_.-': choose another"
                )
            if share.tag in tags:
                raise QemuError(f"two shares have the mount tag {share.tag!r}: give each its own")
            tags.add(share.tag)
        if self.agent_socket is not None:
            if len(os.fsencode(self.agent_socket)) > MAX_SOCKET_PATH:
                raise QemuError(
                    f"the agent socket path {self.agent_socket} is too long for a Unix socket "
                    f"(over {MAX_SOCKET_PATH} bytes): use a shorter directory"
                )
            parent = os.path.dirname(os.path.abspath(self.agent_socket))
            if not os.path.isdir(parent):
                raise QemuError(f"the agent socket's directory {parent} does not exist: create it first")
            if os.path.isdir(self.agent_socket):
                raise QemuError(f"the agent socket path {self.agent_socket} is a directory: give a file name")

    def device_args(self) -> list[str]:
        """The -drive/-fsdev/-chardev/-device arguments for the disks, shares and agent channel."""
        args: list[str] = []
        for n, disk in enumerate(self.disks):
            node = disk.node or f"disk{n}"
            readonly = "on" if disk.readonly or disk.cdrom else "off"
            media = ",media=cdrom" if disk.cdrom else ""
            # the format node is named `<node>-node` (snapshot-save and migration name nodes, not drives)
            args += ["-drive", f"if=none,id={node},node-name={node}-node,file={_opt(disk.path)},"
                     f"format={disk.format},readonly={readonly}{media}"]  # fmt: skip
            device = "ide-cd,bus=ide.0" if disk.cdrom else virtio_device(self.machine, "blk")
            device += f",drive={node},id={node}-dev"
            if disk.serial and not disk.cdrom:
                device += f",serial={_opt(disk.serial)}"
            if disk.bootindex is not None:
                device += f",bootindex={disk.bootindex}"
            args += ["-device", device]
        for name, path in self.fw_cfg:
            args += ["-fw_cfg", f"name={name},file={_opt(path)}"]
        for n, share in enumerate(self.shares):
            fsdev = f"local,id=fs{n},path={_opt(share.path)},security_model=passthrough,multidevs=remap"
            if share.readonly:
                fsdev += ",readonly=on"
            args += [
                "-fsdev",
                fsdev,
                "-device",
                f"{virtio_device(self.machine, '9p')},fsdev=fs{n},mount_tag={share.tag}",
            ]
        if self.agent_socket is not None:
            args += [
                "-device",
                f"{virtio_device(self.machine, 'serial')},id=agent-serial",
                "-chardev",
                f"socket,id=agent,path={_opt(self.agent_socket)},server=on,wait=off",
                "-device",
                f"virtserialport,bus=agent-serial.0,chardev=agent,name={AGENT_PORT}",
            ]
        return args


def build_command(config: MachineConfig, qmp_socket: str, serial_log: str) -> list[str]:
    """The qemu-system-x86_64 command line for `config` (see the module's docstring)."""
    config.validate()
    # microvm: ACPI on (the default) describes the virtio-mmio devices to the guest and gives it a
    # power button (system_powerdown) and power-off. No option ROMs. The RTC stays: without it the
    # guest kernel boots ~1.8 s slower under TCG; pit/pic stay: TCG guests need a timer.
    machine = "microvm,x-option-roms=off" if config.machine == "microvm" else "q35"
    # -nographic also makes SeaBIOS print on the serial console: wanted when the firmware boots the
    # guest (its menus, GRUB's), not when QEMU boots a kernel whose console output is the program's.
    base = BASE_CMDLINE.replace("console=ttyS0", f"console={config.console}")
    khz = host_tsc_khz() if config.accel == "tcg" and "tsc_early_khz=" not in config.cmdline else None
    if khz is not None:
        base += f" tsc_early_khz={khz}"
    cmdline = f"{base} {config.cmdline}".strip()
    cmd = [
        config.binary,
        "-M",
        machine,
        "-accel",
        config.accel,
        "-cpu",
        config.cpu or ("host" if config.accel == "kvm" else "max"),
        "-m",
        str(config.memory_mib),
        "-smp",
        str(config.cpus),
        "-nodefaults",
        "-no-user-config",
        *(("-nographic",) if config.kernel is None or config.machine == "microvm" else ("-display", "none")),
        *(() if config.reboot else ("-no-reboot",)),
        "-nic",
        "none",
        "-qmp",
        f"unix:{qmp_socket},server=on,wait=off",
    ]
    if not config.serial_sockets:
        cmd += ["-serial", f"file:{serial_log}"]
    for n, sock in enumerate(config.serial_sockets):
        log = f",logfile={_opt(serial_log)}" if n == 0 else ""
        cmd += ["-chardev", f"socket,id=serial{n},path={_opt(sock)},server=on,wait=off{log}",
                "-serial", f"chardev:serial{n}"]  # fmt: skip
    if config.paused:
        cmd.append("-S")
    if config.incoming is not None:
        cmd += ["-incoming", config.incoming]
    if config.kernel is not None:
        cmd += ["-kernel", config.kernel]
        if config.initrd is not None:
            cmd += ["-initrd", config.initrd]
        cmd += ["-append", cmdline]
    cmd += [*config.device_args(), *config.extra_args]
    return cmd


def _die_with_parent() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Loop:
    """An asyncio event loop in a daemon thread, to run QMPClient's coroutines from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cocon-qmp", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        try:
            return future.result(timeout + 1)
        except TimeoutError:
            future.cancel()
            raise

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class Qemu:
    """One QEMU process with a QMP connection; files live in `workdir` (created if missing):
    qmp.sock, console.log (the guest's serial console), qemu.log (QEMU's stdout and stderr).

        with Qemu(config, workdir) as vm:
            vm.start()
            vm.wait_for_console("cocon-guest: ready", timeout=30)
            vm.status()         # "running"
            vm.powerdown()      # ACPI power button; or vm.quit()
            vm.wait(timeout=10) # the exit status
    """

    def __init__(self, config: MachineConfig, workdir: str) -> None:
        self.config = config
        self.workdir = workdir
        self.qmp_socket = os.path.join(workdir, "qmp.sock")
        self.console_log = os.path.join(workdir, "console.log")
        self.qemu_log = os.path.join(workdir, "qemu.log")
        self.process: subprocess.Popen[bytes] | None = None
        self._loop: _Loop | None = None
        self._qmp: Any = None  # qemu.qmp.QMPClient, imported on start
        self.started_at = 0.0

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def command(self) -> list[str]:
        return build_command(self.config, self.qmp_socket, self.console_log)

    def start(self, *, timeout: float = 10.0, qmp: bool = True, die_with_parent: bool = False) -> None:
        """Start QEMU and (with `qmp`) connect to its QMP socket within `timeout` seconds.
        On any failure QEMU is killed and QemuError raised (with its exit status and log tail).
        `die_with_parent`: the kernel kills QEMU when the calling thread ends (a process that owns
        its VM, like a shim: no QEMU outlives it, even after a SIGKILL)."""
        if self.process is not None:
            raise QemuError("this QEMU was started already: make a new Qemu object")
        if len(os.fsencode(self.qmp_socket)) > MAX_SOCKET_PATH:
            raise QemuError(
                f"the QMP socket path {self.qmp_socket} is too long for a Unix socket: use a shorter workdir"
            )
        os.makedirs(self.workdir, exist_ok=True)
        cmd = self.command()
        for path in (self.qmp_socket, self.console_log):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        with open(self.qemu_log, "wb") as log:
            try:
                self.process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a signal to the caller's process group leaves it alone
                    close_fds=True,
                    preexec_fn=_die_with_parent if die_with_parent else None,
                )
            except OSError as exc:
                raise QemuError(
                    f"cannot run {cmd[0]}: {exc.strerror}; install QEMU (apt-get install -y qemu-system-x86)"
                ) from exc
        self.started_at = time.monotonic()
        if not qmp:
            return
        try:
            self._connect(timeout)
        except BaseException:
            self.kill()
            raise

    def _connect(self, timeout: float) -> None:
        from qemu.qmp import QMPClient, QMPError

        deadline = time.monotonic() + timeout
        self._loop = _Loop()
        while True:
            self._check_alive("while waiting for its QMP socket")
            if os.path.exists(self.qmp_socket):
                client = QMPClient(f"cocon-{os.path.basename(self.workdir)}")
                try:
                    self._loop.run(client.connect(self.qmp_socket), max(0.1, deadline - time.monotonic()))
                    self._qmp = client
                    return
                except (QMPError, OSError, TimeoutError):
                    pass
            if time.monotonic() > deadline:
                raise self._error(f"QEMU did not open its QMP socket within {timeout:g} s")
            time.sleep(0.02)

    def _check_alive(self, doing: str) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise self._error(f"QEMU exited with status {self.process.returncode} {doing}")

    def _error(self, message: str) -> QemuError:
        tail = self.log_tail()
        text = f"{message} (command: {' '.join(self.command())})"
        if tail:
            text += f"\n--- last lines of its log ---\n{tail}"
        return QemuError(text, returncode=self.returncode, log_tail=tail)

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines of QEMU's own log and of the guest console."""
        parts = []
        for label, path in (("qemu", self.qemu_log), ("console", self.console_log)):
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                continue
            tail = text.strip().splitlines()[-lines:]
            if tail:
                parts.append("\n".join(f"{label}: {line}" for line in tail))
        return "\n".join(parts)

    # --- QMP ----------------------------------------------------------------------------------

    def qmp(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 5.0
    ) -> Any:
        """Execute a QMP command and return its result; QemuError if it fails or QEMU is gone."""
        from qemu.qmp import ExecuteError, QMPError

        if self._qmp is None or self._loop is None:
            raise QemuError("QMP is not connected: start() the QEMU first (with qmp=True)")
        self._check_alive(f"before QMP {command}")
        try:
            return self._loop.run(self._qmp.execute(command, arguments), timeout)
        except ExecuteError as exc:
            raise QemuError(f"QMP {command} failed: {exc.error.error.desc}") from exc
        except TimeoutError as exc:
            raise self._error(f"QMP {command} did not answer within {timeout:g} s") from exc
        except (QMPError, OSError) as exc:
            self._check_alive(f"during QMP {command}")
            raise QemuError(f"QMP {command} failed: {exc}") from exc

    def pass_fd(self, name: str, fd: int, *, timeout: float = 5.0) -> None:
        """Hand QEMU a file descriptor (SCM_RIGHTS on the QMP socket, then `getfd`) under `name`, for
        arguments that take "fd:NAME" or a SocketAddress of type fd. QEMU gets its own copy."""
        from qemu.qmp import ExecuteError, QMPError

        if self._qmp is None or self._loop is None:
            raise QemuError("QMP is not connected: start() the QEMU first (with qmp=True)")
        client = self._qmp

        async def send() -> None:
            client.send_fd_scm(fd)  # in the loop's thread: nothing else writes to the socket meanwhile
            await client.execute("getfd", {"fdname": name})

        try:
            self._loop.run(send(), timeout)
        except ExecuteError as exc:
            raise QemuError(f"QMP getfd {name} failed: {exc.error.error.desc}") from exc
        except (QMPError, OSError, TimeoutError) as exc:
            self._check_alive("while passing a file descriptor")
            raise QemuError(f"cannot pass {name} to QEMU: {exc}") from exc

    def wait_for_migration(self, what: str, deadline: float) -> dict[str, Any]:
        """Poll query-migrate until the migration completes (its last answer, with downtime, total-time
        and ram); QemuError with QEMU's reason and log tail when it fails, or when the monotonic
        `deadline` passes. Polled often: a guest is paused at the end of a migration."""
        while True:
            info: dict[str, Any] = self.qmp("query-migrate")
            status = info.get("status")
            if status == "completed":
                return info
            if status in ("failed", "cancelled"):
                raise QemuError(f"{what} {status}: {info.get('error-desc') or 'no reason given'}",
                                log_tail=self.log_tail())  # fmt: skip
            if time.monotonic() > deadline:
                raise QemuError(f"{what} did not complete in time (status {status})")
            time.sleep(0.005)

    def status(self) -> str:
        """The VM's run state from query-status: "running", "paused", "shutdown", …"""
        return str(self.qmp("query-status")["status"])

    def powerdown(self) -> None:
        """Press the ACPI power button (system_powerdown); the guest decides what to do."""
        self.qmp("system_powerdown")

    def quit(self, timeout: float = 5.0) -> int:
        """Ask QEMU to exit now (QMP quit) and return its exit status; kills it if it does not."""
        from qemu.qmp import QMPError

        if self.returncode is None and self._qmp is not None and self._loop is not None:
            try:
                self._loop.run(self._qmp.execute("quit"), timeout)
            except (QMPError, OSError, TimeoutError):
                pass  # QEMU may close the socket before the answer arrives
        try:
            return self.wait(timeout)
        except QemuError:
            self.kill()
            raise

    def wait(self, timeout: float) -> int:
        """QEMU's exit status, waiting at most `timeout` seconds (QemuError if it still runs)."""
        if self.process is None:
            raise QemuError("QEMU was not started")
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise self._error(f"QEMU still runs after {timeout:g} s") from exc
        self._disconnect()
        return code

    def wait_for_console(self, text: str, timeout: float) -> str:
        """Wait until the guest's serial console shows `text`; the console so far.
        QemuError if QEMU exits first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            console = self.console()
            if text in console:
                return console
            if self.process is not None and self.process.poll() is not None:
                console = self.console()  # QEMU may have written the text as it exited
                if text in console:
                    return console
                raise self._error(
                    f"QEMU exited with status {self.process.returncode} before the console showed {text!r}"
                )
            if time.monotonic() > deadline:
                raise self._error(f"the console did not show {text!r} within {timeout:g} s")
            time.sleep(0.02)

    def console(self) -> str:
        try:
            with open(self.console_log, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    # --- clean-up -----------------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL QEMU (if it still runs) and reap it; close QMP."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self._disconnect()

    def _disconnect(self) -> None:
        if self._qmp is not None and self._loop is not None:
            try:
                self._loop.run(self._qmp.disconnect(), 2.0)
            except Exception:
                pass  # the connection is gone with QEMU; nothing to tell
        self._qmp = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def close(self, timeout: float = 2.0) -> None:
        """End QEMU: QMP quit if it still runs, SIGKILL if that takes longer than `timeout`."""
        try:
            if self.returncode is None and self._qmp is not None:
                try:
                    self.quit(timeout)
                except QemuError:
                    pass
        finally:
            self.kill()

    def __enter__(self) -> Qemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
