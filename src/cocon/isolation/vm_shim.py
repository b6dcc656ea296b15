"""`cocon-vm-runtime`: runc's command line for full VMs, and the shim behind it.

The command line, the state files and the fork of the shim are the microVM's (cocon.isolation.
microvm_shim: `create`, `start`, `kill`, `delete`, `state`, `pause`, `resume`); the shim differs:

- it starts QEMU (q35) paused with the machine the engine prepared (the annotation
  cocon.isolation.vm.MACHINE_ANNOTATION): root disk, further disks, CD-ROMs (ISO, cloud-init seed),
  SeaBIOS or OVMF, or a direct kernel boot; the NIC is a tap in the instance's network namespace,
  joined to its veth by tc (as for microVMs), and the shim answers the guest's DHCP with the
  instance's address (cocon.vmm.dhcp);
- ttyS0 is the console: its Unix socket is relayed to conmon's stdio or terminal, so `cocon logs`,
  `attach` and `cocon vm console` see it (QEMU also logs it to console.log);
- in "cmd" mode (an image's command run by cocon's init) ttyS1 is the control line: the guest says
  `cocon-vm: exit N` there, the shim sends `signal N`, `winch ROWS COLS` and `eof`;
- `start` is QMP `cont`. SIGTERM (docker stop) presses the ACPI power button, or in "cmd" mode
  signals the command; SIGKILL ends QEMU at once (cocon.isolation.microvm_shim.kill).
- the exit status: the command's in "cmd" mode; 0 when the guest powered itself off; 255 (with the
  reason in `exit-reason`) when QEMU failed.
Control requests on ctl.sock: start, signal, pause, resume, stats, powerdown, disk-add, disk-remove,
snapshot-save/-load/-delete (with the guest's memory), migrate-listen/-out/-finish/-resume
(cocon.isolation.vm_migration), status.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, NoReturn

from cocon.isolation.microvm_shim import (
    Shim,
    ShimError,
    _connect_tap,
    _enter_netns,
    _start_time,
    _tty_size,
    _write_all,
    _write_state,
    assets_root,
    bind_into_share,
    main,
    netns_path,
)

#: Seconds QEMU gets to open its sockets.
QEMU_START_TIMEOUT = 30.0
TAP = "tap0"
#: Disks that can be hot-plugged into a running VM (one PCIe root port each).
HOTPLUG_PORTS = 4
EXIT_MARKER = b"cocon-vm: exit "


class VmShim(Shim):
    """One full VM: QEMU, the console relay, the control line and the DHCP answer."""

    def setup(self) -> None:
        from cocon import _linux as L
        from cocon.isolation.vm import MACHINE_ANNOTATION, SHARE_TAG, run_script, share_binds
        from cocon.vmm.qemu import Disk, MachineConfig, Qemu, Share

        annotations = self.config.get("annotations") or {}
        try:
            machine: dict[str, Any] = json.loads(annotations[MACHINE_ANNOTATION])
        except (KeyError, ValueError):
            raise ShimError("the bundle's config.json has no VM machine: create VMs through cocon") from None
        self.machine = machine
        self.mode = str(machine.get("mode"))
        L.unshare(L.CLONE_NEWNS)  # the share binds below vanish with this process
        L.mount("none", "/", None, L.MS_REC | L.MS_SLAVE)
        shares: tuple[Share, ...] = ()
        binds: list[tuple[str, str]] = []
        if self.mode == "cmd":
            share = os.path.join(self.dir, "share")
            os.makedirs(share, 0o700, exist_ok=True)
            share_list, written = share_binds(self.config)
            for host, destination, name in share_list:
                bind_into_share(share, host, name)
                binds.append((destination, name))
            shares = (Share(share, SHARE_TAG),) if binds else ()
        from cocon.isolation.vm_migration import ShimMigration

        self.migration = ShimMigration(self)  # before joining the instance's network namespace
        self.incoming = bool(machine.get("incoming"))
        netns = netns_path(self.config)
        self.network: dict[str, Any] | None = _enter_netns(netns) if netns else None
        if self.network == {}:
            self.network = None
        disks = [Disk(machine["root"]["path"], readonly=False, format=machine["root"].get("format", "qcow2"),
                      node="root", bootindex=2 if machine.get("iso") else 1)]  # fmt: skip
        for extra in machine.get("disks") or []:
            disks.append(Disk(extra["path"], readonly=bool(extra.get("readonly")),
                              format=extra.get("format", "qcow2"),
                              serial=extra.get("serial"), node=extra.get("node")))  # fmt: skip
        if machine.get("iso"):
            disks.append(Disk(machine["iso"], cdrom=True, node="iso", bootindex=1))
        if machine.get("seed"):
            disks.append(Disk(machine["seed"], cdrom=True, node="seed"))
        extra_args: list[str] = []
        if self.network is not None:
            extra_args += [
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-pci,netdev=n0,mac={self.network['mac']},id=nic0",
            ]  # fmt: skip
        # PCIe root ports with free slots: q35's root bus takes no hot-plugged devices
        for port in range(HOTPLUG_PORTS):
            extra_args += ["-device", f"pcie-root-port,id=hp{port},chassis={port + 1},slot={port + 1}"]
        if machine.get("loadvm"):  # a --memory snapshot restored while the VM was stopped
            extra_args += ["-loadvm", str(machine["loadvm"])]
        if machine.get("firmware") == "uefi":
            from cocon.vmm.firmware import resolve_firmware

            extra_args += resolve_firmware("uefi", str(machine.get("nvram") or self.dir)).qemu_args()
        fw_cfg: tuple[tuple[str, str], ...] = ()
        console_socket = os.path.join(self.dir, "console.sock")
        serial: tuple[str, ...] = (console_socket,)
        cmdline = str(machine.get("cmdline") or "")
        #: "cmd" mode without a terminal: the command's standard error on ttyS2, relayed to fd 2
        separate_errors = self.mode == "cmd" and not self.terminal
        if self.mode == "cmd":
            process = self.config.get("process") or {}
            size = process.get("consoleSize") or {}
            script = os.path.join(self.dir, "run.sh")
            with open(script, "w") as f:
                f.write(run_script(
                    process, hostname=str(self.config.get("hostname") or self.cid[:12]), network=self.network,
                    binds=binds, files=written, stdin=True, rows=int(size.get("height") or 24),
                    cols=int(size.get("width") or 80), stderr=separate_errors,
                ))  # fmt: skip
            fw_cfg = (("opt/org.cocon/run", script),)
            serial += (os.path.join(self.dir, "control.sock"),)
            if separate_errors:
                serial += (os.path.join(self.dir, "stderr.sock"),)
            cmdline = f"cocon.vm=cmd loglevel=4 {cmdline}"
            console = "ttyS1"
        elif self.mode == "boot":
            cmdline = f"cocon.vm=boot cocon.init={machine.get('init') or '/sbin/init'} {cmdline}"
            console = "ttyS0"
        else:
            console = "ttyS0"
        if self.mode in ("boot", "kernel"):
            hostname = str(self.config.get("hostname") or self.cid[:12])
            cmdline += f" systemd.hostname={hostname}"
        if self.mode == "kernel":
            cmdline = f"root=LABEL=cocon-root rw {cmdline}"
        memory, cpus = int(machine.get("memory_mib") or 1024), int(machine.get("cpus") or 1)
        config = MachineConfig(
            machine.get("kernel") if self.mode != "firmware" else None,
            machine.get("initrd") if self.mode != "firmware" else None,
            cmdline=cmdline.strip(), machine="q35", accel=_accel(), memory_mib=memory, cpus=cpus,
            disks=tuple(disks), shares=shares, extra_args=tuple(extra_args), serial_sockets=serial,
            reboot=bool(machine.get("reboot", self.mode != "cmd")), paused=True,
            incoming=machine.get("incoming"), fw_cfg=fw_cfg, console=console,
        )  # fmt: skip
        self.shares = shares
        self.vm = Qemu(config, self.dir)
        self.vm.start(timeout=QEMU_START_TIMEOUT, die_with_parent=True)
        self.console = _connect(console_socket)
        self.control_line = _connect(serial[1]) if len(serial) > 1 else None
        self.errors = _connect(serial[2]) if len(serial) > 2 else None
        self.control_buffer = b""
        self.command_exit: int | None = None
        #: "cmd" mode: console input and control requests held until the guest's init listens (an
        #: incoming guest listens already: it ran at the source)
        self.pending: list[tuple[str, bytes]] | None = (
            [] if self.control_line is not None and not self.incoming else None
        )
        if self.network is not None:
            _connect_tap(self.network)
            self.dhcp = self._dhcp()
        else:
            self.dhcp = None
        self.memory_mib = memory
        self.hotplugged: dict[str, str] = {}  # node → root port of disks attached while running
        self._save_state()
        self.listener = self._listen()

    def _dhcp(self) -> Any:
        """The guest's DHCP answer: the instance's address, gateway and DNS servers (the resolv.conf
        the engine wrote for it)."""
        from cocon.vmm.dhcp import DhcpResponder, Lease

        assert self.network is not None
        v4 = [a for a in self.network.get("addresses") or [] if ":" not in a]
        if not v4:
            return None
        gateway = next(
            (r["gateway"] for r in self.network.get("routes") or [] if ":" not in r["gateway"]), None
        )
        dns, search = _resolv_conf(self.config)
        lease = Lease(
            mac=self.network["mac"], address=v4[0], gateway=gateway, dns=dns, search=search,
            hostname=str(self.config.get("hostname") or self.cid[:12]),
            mtu=int(self.network.get("mtu") or 1500),
        )  # fmt: skip
        return DhcpResponder(TAP, lease)

    # --- serving ---------------------------------------------------------------------------------
    def serve(self) -> int:
        assert self.vm is not None and self.vm.pid is not None
        self.console.setblocking(False)
        self.sel.register(self.console, selectors.EVENT_READ, self._console_output)
        if self.errors is not None:
            self.errors.setblocking(False)
            self.sel.register(self.errors, selectors.EVENT_READ, self._console_output)
        if self.control_line is not None:
            self.control_line.setblocking(False)
            self.sel.register(self.control_line, selectors.EVENT_READ, self._control_output)
        if self.dhcp is not None:
            self.sel.register(
                self.dhcp.fileno(), selectors.EVENT_READ, lambda key, events: self.dhcp.on_readable()
            )
        self.qemu_fd = os.pidfd_open(self.vm.pid)
        self.sel.register(self.qemu_fd, selectors.EVENT_READ, self._qemu_exited)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self._signals()  # the microVM shim's wake-up pipe; _signal_event below handles them
        self._stdin_source()
        while self.exit_code is None:
            for key, events in self.sel.select(1.0):
                key.data(key, events)
        self._drain_console()
        self.vm.kill()
        self.migration.close()
        return self.exit_code

    def _output_fd(self, sock: socket.socket) -> int:
        """Where a serial port's output goes: the terminal, else stdout (the console) or stderr."""
        if self.terminal:
            return self.tty
        return 2 if sock is self.errors else 1

    def _console_output(self, key: selectors.SelectorKey, events: int) -> None:
        sock: socket.socket = key.fileobj  # type: ignore[assignment]
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            return
        _write_all(self._output_fd(sock), data)

    def _drain_console(self) -> None:
        """What the guest wrote before it powered off (QEMU closes the sockets as it exits)."""
        for sock in (self.console, self.errors):
            if sock is None:
                continue
            deadline = time.monotonic() + 2
            sock.setblocking(False)
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    if self.vm is not None and self.vm.returncode is not None:
                        break
                    time.sleep(0.02)
                    continue
                except OSError:
                    break
                if not data:
                    break
                _write_all(self._output_fd(sock), data)

    def _control_output(self, key: selectors.SelectorKey, events: int) -> None:
        assert self.control_line is not None
        try:
            data = self.control_line.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(self.control_line)
            return
        self._control_lines(data)

    def _control_lines(self, data: bytes) -> None:
        """The guest's control line: kernel messages (kept in boot.log) and the init's markers."""
        with open(os.path.join(self.dir, "boot.log"), "ab") as log:
            log.write(data)
        self.control_buffer = (self.control_buffer + data)[-65536:]
        while b"\n" in self.control_buffer:
            line, self.control_buffer = self.control_buffer.split(b"\n", 1)
            line = line.strip(b"\r")
            if line.startswith(EXIT_MARKER):
                try:
                    self.command_exit = int(line[len(EXIT_MARKER) :].strip())
                except ValueError:
                    pass
            elif line == b"cocon-vm: started" and self.pending is not None:
                pending, self.pending = self.pending, None
                for kind, data in pending:  # what came before the guest listened
                    self._send_control(data.decode()) if kind == "control" else self._send_console(data)

    def _qemu_exited(self, key: selectors.SelectorKey | None, events: int) -> None:
        if self.exit_code is not None:
            return
        assert self.vm is not None
        try:
            status = self.vm.process.wait(5) if self.vm.process is not None else None
        except Exception:
            status = None
        if self.control_line is not None:  # the exit marker may still be in the socket
            try:
                self.control_line.setblocking(True)
                self.control_line.settimeout(0.5)
                while True:
                    data = self.control_line.recv(65536)
                    if not data:
                        break
                    self._control_lines(data)
            except OSError:
                pass
        if self.command_exit is not None:
            self.exit_code = self.command_exit
            return
        if self.mode != "cmd" and status == 0:
            self.exit_code = 0  # the guest powered itself off
            return
        tail = self.vm.log_tail(5)
        what = "the VM's command did not report its exit" if self.mode == "cmd" and status == 0 else \
            f"the VM stopped unexpectedly (QEMU exit status {status})"  # fmt: skip
        self.reason = what + (f": {tail}" if tail else "")
        _write_all(2, f"cocon: {self.reason}\n".encode())
        try:
            with open(os.path.join(self.dir, "exit-reason"), "w") as f:
                f.write(self.reason + "\n")
        except OSError:
            pass
        self.exit_code = 255

    def _send_control(self, line: str) -> None:
        """A request on the control line (kept until the guest's init listens: a serial line
        that nobody has open drops what arrives)."""
        if self.control_line is None:
            return
        if self.pending is not None:
            self.pending.append(("control", line.encode()))
            return
        try:
            self.control_line.setblocking(True)
            self.control_line.sendall(line.encode() + b"\n")
            self.control_line.setblocking(False)
        except OSError:
            pass

    # --- stdin -----------------------------------------------------------------------------------
    def _stdin_source(self) -> None:
        fd = self.tty if self.terminal else 0
        try:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, self._stdin)
        except (OSError, ValueError, PermissionError):
            self._send_control("eof")  # /dev/null or a file: nothing will come

    def _stdin(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            data = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._send_console(data)
            return
        self.sel.unregister(key.fd)
        if not self.terminal:
            self._send_control("eof")

    def _send_console(self, data: bytes) -> None:
        if self.pending is not None:
            self.pending.append(("console", data))
            return
        try:
            self.console.setblocking(True)
            self.console.sendall(data)
        except OSError:
            pass
        finally:
            self.console.setblocking(False)

    # --- signals -----------------------------------------------------------------------------------
    def _signal_event(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            data = self._wake[0].recv(256)
        except BlockingIOError:
            return
        for sig in data:
            self._deliver(sig)

    def _deliver(self, sig: int) -> None:
        """A signal for the VM: to the command in "cmd" mode; SIGTERM/SIGINT/SIGPWR press the power
        button otherwise (the guest's OS shuts down)."""
        assert self.vm is not None
        if sig == signal.SIGWINCH:
            if self.terminal and self.mode == "cmd":
                rows, cols = _tty_size(self.tty)
                self._send_control(f"winch {rows} {cols}")
            return
        if sig == signal.SIGHUP and self.terminal:
            return  # conmon closed the terminal's master
        if self.mode == "cmd":
            self._send_control(f"signal {sig}")
        elif sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPWR):
            try:
                self.vm.powerdown()
            except Exception:
                pass

    # --- control socket --------------------------------------------------------------------------
    def handle(self, conn: socket.socket, request: dict[str, Any]) -> dict[str, Any] | None:
        assert self.vm is not None
        op = request.get("op")
        if op == "start":
            if self.incoming:  # the guest runs once the source has handed over (migrate-finish)
                self.status = "paused"
            else:
                self.vm.qmp("cont")
                self.status = "running"
            self._save_state()
            return {"ok": True}
        if op == "migrate-listen":
            if not self.incoming:
                return {"ok": False, "error": "this VM was not started as a migration target"}
            return self.migration.listen(request)
        if op == "migrate-finish":
            reply = self.migration.finish()
            if reply.get("ok"):
                self.incoming = False
                self.status = "running"
                self._save_state()
            return reply
        if op == "migrate-out":
            if self.status != "running":
                return {"ok": False, "error": f"only a running VM migrates (this one is {self.status})"}
            return self.migration.send_later(conn, request)
        if op == "migrate-resume":
            return self.migration.resume()
        if op == "signal":
            self._deliver(int(request.get("signal", 15)))
            return {"ok": True}
        if op in ("pause", "resume"):
            if self.incoming and self.vm.qmp("query-migrate").get("status") != "completed":
                return {"ok": False, "error": "a VM is migrating here: it runs once the source hands over"}
            self.vm.qmp("stop" if op == "pause" else "cont")
            self.status = "paused" if op == "pause" else "running"
            self._save_state()
            return {"ok": True}
        if op == "powerdown":
            self.vm.powerdown()
            return {"ok": True}
        if op == "status":
            return {"ok": True, "status": self.vm.status(), "mode": self.mode, "shares": bool(self.shares)}
        if op == "stats":
            return {"ok": True, **_qemu_stats(self.vm.pid or 0, self.memory_mib)}
        if op == "disk-add":
            return self._disk_add(request)
        if op == "disk-remove":
            return self._disk_remove(str(request.get("node") or ""))
        if op in ("snapshot-save", "snapshot-load", "snapshot-delete"):
            return self._snapshot(op, str(request.get("name") or ""), bool(request.get("memory")))
        if op == "exec":
            return {"ok": False, "exit_code": 126,
                    "error": "a full VM runs no cocon agent: use `cocon vm console` (or ssh) to run "
                             "commands in it"}  # fmt: skip
        if op == "top":
            return {"ok": False, "error": "a full VM's processes are its own: look inside it"}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _disk_add(self, request: dict[str, Any]) -> dict[str, Any]:
        """Hot-plug a disk: a block node for the file, a virtio-blk device on a free root port."""
        assert self.vm is not None
        node, path = str(request.get("node") or ""), str(request.get("path") or "")
        fmt = str(request.get("format") or "qcow2")
        if not node or not path or fmt not in ("qcow2", "raw"):
            return {"ok": False, "error": "disk-add needs node, path and a format (qcow2 or raw)"}
        if node in self.hotplugged or any(d.get("device") == node for d in self.vm.qmp("query-block")):
            return {"ok": False, "error": f"the disk {node} is attached already"}
        taken = set(self.hotplugged.values())
        port = next((f"hp{n}" for n in range(HOTPLUG_PORTS) if f"hp{n}" not in taken), None)
        if port is None:
            return {
                "ok": False,
                "error": f"all {HOTPLUG_PORTS} hot-plug slots are in use: detach a disk first",
            }
        readonly = bool(request.get("readonly"))
        self.vm.qmp("blockdev-add", {"driver": fmt, "node-name": node, "read-only": readonly,
                                     "file": {"driver": "file", "filename": path}})  # fmt: skip
        device: dict[str, Any] = {"driver": "virtio-blk-pci", "id": f"{node}-dev", "drive": node, "bus": port}
        if request.get("serial"):
            device["serial"] = str(request["serial"])[:20]
        try:
            self.vm.qmp("device_add", device)
        except Exception:
            self.vm.qmp("blockdev-del", {"node-name": node})
            raise
        self.hotplugged[node] = port
        return {"ok": True, "bus": port}

    def _disk_remove(self, node: str) -> dict[str, Any]:
        """Hot-unplug: the guest is asked to let the device go (PCIe hot-plug), then the node goes."""
        assert self.vm is not None
        if not node:
            return {"ok": False, "error": "disk-remove needs the disk's node"}
        self.vm.qmp("device_del", {"id": f"{node}-dev"})
        deadline = time.monotonic() + 60
        while any(str(d.get("qdev", "")).endswith(f"{node}-dev") for d in self.vm.qmp("query-block")):
            if time.monotonic() > deadline:
                return {"ok": False, "error": f"the guest did not release the disk {node} within 60 s"}
            time.sleep(0.1)
        try:
            self.vm.qmp("blockdev-del", {"node-name": node})
        except Exception:
            pass  # gone with its device
        self.hotplugged.pop(node, None)
        return {"ok": True}

    def _snapshot(self, op: str, name: str, memory: bool) -> dict[str, Any]:
        """Internal qcow2 snapshots of the running VM's root disk: with `memory`, QEMU's snapshot-save
        job (the guest pauses while its RAM is written into the disk, then carries on), else a
        disk-only snapshot taken atomically (blockdev-snapshot-internal-sync); snapshot-load puts
        disk and machine back where they were; snapshot-delete removes either kind."""
        assert self.vm is not None
        if not name:
            return {"ok": False, "error": "a snapshot needs a name"}
        if op == "snapshot-save" and not memory:
            self.vm.qmp("blockdev-snapshot-internal-sync", {"device": "root", "name": name}, timeout=120)
            return {"ok": True}
        if op == "snapshot-delete":
            self.vm.qmp(
                "blockdev-snapshot-delete-internal-sync", {"device": "root", "name": name}, timeout=120
            )
            return {"ok": True}
        job = f"{op}-{time.monotonic_ns()}"
        args = {"job-id": job, "tag": name, "vmstate": "root-node", "devices": ["root-node"]}
        self.vm.qmp(op, args)
        deadline = time.monotonic() + 600
        while True:
            jobs = [j for j in self.vm.qmp("query-jobs") if j.get("id") == job]
            if not jobs or jobs[0].get("status") == "concluded":
                break
            if time.monotonic() > deadline:
                return {"ok": False, "error": f"{op} of {name} did not finish within 600 s"}
            time.sleep(0.05)
        error = jobs[0].get("error") if jobs else None
        if error and "mount_tag" in str(error):
            error = (f"{error} (a VM whose volumes are shared over 9p cannot save its memory: snapshot its "
                     "disk without --memory, or use disk volumes)")  # fmt: skip
        try:
            self.vm.qmp("job-dismiss", {"id": job})
        except Exception:
            pass
        if error:
            return {"ok": False, "error": f"{op} {name}: {error}"}
        if op == "snapshot-load" and self.status == "running":
            self.vm.qmp("cont")  # a loaded machine state resumes as it was saved: running
        return {"ok": True}

    def _save_state(self) -> None:
        vm = self.vm
        doc = {
            "id": self.cid, "bundle": self.bundle, "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "qemu_pid": vm.pid if vm is not None else 0,
            "qemu_pid_start": _start_time(vm.pid) if vm is not None and vm.pid else None,
            "status": self.status, "created": time.time(), "mode": getattr(self, "mode", ""),
        }  # fmt: skip
        _write_state(self.dir, doc)


def _accel() -> str:
    """KVM when the bounded probe (made on cocon's guest kernel) says it works, else TCG."""
    try:
        from cocon.vmm.assets import ensure_assets
        from cocon.vmm.kvm import probe_kvm

        return probe_kvm(ensure_assets(assets_root())).accel
    except Exception:
        return "tcg"


def _connect(path: str) -> socket.socket:
    deadline = time.monotonic() + QEMU_START_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise ShimError(f"QEMU did not open {path}") from None
            time.sleep(0.02)


def _resolv_conf(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The DNS servers and search domains of the resolv.conf the engine bind-mounts for the instance."""
    for mount in config.get("mounts") or []:
        if mount.get("destination") == "/etc/resolv.conf" and isinstance(mount.get("source"), str):
            servers, search = [], []
            try:
                with open(mount["source"]) as f:
                    for line in f:
                        words = line.split()
                        if len(words) >= 2 and words[0] == "nameserver" and ":" not in words[1]:
                            servers.append(words[1])
                        elif words and words[0] == "search":
                            search = words[1:]
            except OSError:
                pass
            return servers, search
    return [], []


def _qemu_stats(pid: int, memory_mib: int) -> dict[str, Any]:
    """The VM seen from the host: QEMU's CPU time and resident memory, the guest's memory as limit."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu_usec = (int(fields[11]) + int(fields[12])) * 1_000_000 // ticks
        threads = int(fields[17])
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        cpu_usec, threads, rss = 0, 0, 0
    return {"cpu_usage_usec": cpu_usec, "memory_current": rss, "memory_max": memory_mib << 20,
            "pids_current": threads}  # fmt: skip


def entry() -> NoReturn:
    code = main(prog="cocon-vm-runtime", shim_class=VmShim)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
