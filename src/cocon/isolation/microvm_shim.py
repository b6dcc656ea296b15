"""`cocon-microvm-runtime`: runc's command line for microVMs, and the shim behind it.

conmon runs it as it runs `cocon-runtime` (`create --bundle B --pid-file P [--console-socket S] ID`,
then the engine's `start`, `kill`, `delete`, `exec`, `pause`, `resume`, `state`). `create` forks
the shim, which stays as the container's process (conmon's child after `create` returns):

- the shim enters a private mount namespace (the share binds below vanish with it, whatever
  happens) and the instance's network namespace when it has one (the tap QEMU makes lives there);
- binds the rootfs and every bind mount's source into `<state>/share` (see microvm.guest_config);
- starts QEMU with the guest assets, the share over 9p and the agent channel; waits for the agent;
  asks it to mount the share, configure the network, set the hostname and create the container;
- reports to `create` (which writes the pid file and exits), then serves until the container ends:
  stdin from conmon's pipe or terminal → the agent; the container's output → conmon; requests on
  `<state>/ctl.sock` (start, signal, pause, resume, stats, exec streams);
- exits with the container's exit status (128+N for signal N) after powering the guest off.
  A QEMU that dies first ends the shim with status 255 and the reason on stderr and in
  `<state>/exit-reason`.

State: `<root>/<first 12 characters of the id>/` (short: QEMU's Unix socket paths must fit 107
bytes): state.json, ctl.sock, agent.sock, qmp.sock, console.log, qemu.log, share/.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, NoReturn

from cocon._typing import TYPE_CHECKING
from cocon.isolation.base import IsolationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from cocon.vmm.agent_client import AgentClient
    from cocon.vmm.qemu import MachineConfig, Qemu

#: Seconds from QEMU's start to the agent's answer (TCG on a busy 2-core machine is slow).
BOOT_TIMEOUT = 120.0
#: What the agent prints on the console once it listens (cocon.vmm.guest.agent's READY_LINE).
READY = "cocon-agent: ready 1"
#: Seconds the guest gets to power off after the container ended, before QEMU is killed.
POWEROFF_TIMEOUT = 10.0
TAP = "tap0"


class ShimError(IsolationError):
    pass


# --- state ----------------------------------------------------------------------------------------


def state_dir(root: str, cid: str) -> str:
    if not cid or "/" in cid or cid.startswith("."):
        raise ShimError(f"invalid container id {cid!r}")
    return os.path.join(root, cid[:12])


def _read_state(root: str, cid: str) -> dict[str, Any]:
    try:
        with open(os.path.join(state_dir(root, cid), "state.json")) as f:
            doc: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return {}
    return doc if doc.get("id") == cid else {}


def _write_state(directory: str, doc: dict[str, Any]) -> None:
    tmp = os.path.join(directory, "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, os.path.join(directory, "state.json"))


def _alive(pid: int, start: int | None = None) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return False
    if fields[0] == "Z":
        return False
    return start is None or int(fields[19]) == start


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def state(root: str, cid: str) -> dict[str, Any]:
    """runc's `state` document; status "stopped" once the shim is gone, {} for an unknown id."""
    doc = _read_state(root, cid)
    if not doc:
        return {}
    if not _alive(int(doc.get("pid") or 0), doc.get("pid_start")):
        doc["status"] = "stopped"
    return {
        "ociVersion": "1.2.0", "id": cid, "status": doc.get("status", "unknown"),
        "pid": int(doc.get("pid") or 0), "bundle": doc.get("bundle", ""),
        "annotations": {"org.cocon.isolation": "microvm", "org.cocon.qemu.pid": str(doc.get("qemu_pid", 0))},
    }  # fmt: skip


def control(root: str, cid: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One request to the VM's shim over its control socket; its JSON reply (ShimError on failure)."""
    path = os.path.join(state_dir(root, cid), "ctl.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ShimError(
                f"VM {cid[:12]} is not running (its shim does not answer: {exc.strerror})"
            ) from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise ShimError(f"VM {cid[:12]} did not answer {request.get('op')} within {timeout:g} s") from None
    finally:
        sock.close()
    try:
        reply: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ShimError(f"VM {cid[:12]} closed the control connection during {request.get('op')}") from None
    if not reply.get("ok"):
        raise ShimError(
            str(reply.get("error") or "the shim refused the request"), int(reply.get("exit_code", 125))
        )
    return reply


def kill(root: str, cid: str, sig: int) -> None:
    """Send `sig` to the container's init in the guest; SIGKILL ends the VM at once (QEMU and shim)."""
    doc = _read_state(root, cid)
    pid, start = int(doc.get("pid") or 0), doc.get("pid_start")
    if not doc or not _alive(pid, start):
        return
    if sig == signal.SIGKILL:
        _kill_vm(doc)
        return
    try:
        control(root, cid, {"op": "signal", "signal": int(sig)})
    except ShimError:
        if _alive(pid, start):
            os.kill(pid, sig)


def _kill_vm(doc: dict[str, Any]) -> None:
    for key in ("qemu_pid", "pid"):
        pid = int(doc.get(key) or 0)
        if _alive(pid, doc.get(key + "_start")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def delete(root: str, cid: str, *, force: bool = False) -> None:
    doc = _read_state(root, cid)
    directory = state_dir(root, cid)
    if doc and _alive(int(doc.get("pid") or 0), doc.get("pid_start")) and not force:
        raise ShimError(f"VM {cid[:12]} is running: stop it first or delete with --force")
    if doc:
        _kill_vm(doc)  # also a QEMU whose shim was killed
        deadline = time.monotonic() + 5
        while _alive(int(doc.get("pid") or 0), doc.get("pid_start")) and time.monotonic() < deadline:
            time.sleep(0.01)
    import glob
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    # what a VM shim killed during a migration left (cocon.isolation.vm_migration: short paths, next
    # to the state directories, since a Unix socket's path is limited to 107 bytes)
    for leftover in glob.glob(os.path.join(root, f"mig-{cid[:12]}-*.sock")):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass


def assets_root() -> str:
    """The directory whose `assets/` holds the guest assets: $COCON_ASSETS_ROOT (a cache several
    daemons of one host may share) or the engine's root."""
    return os.environ.get("COCON_ASSETS_ROOT") or os.environ.get("COCON_ROOT") or "/var/lib/cocon"


# --- the shim ----------------------------------------------------------------------------------------


class Shim:
    """One microVM: QEMU, the agent connection and the relays (see the module docstring)."""

    def __init__(self, root: str, cid: str, bundle: str, console_socket: str | None, report_fd: int) -> None:
        self.root, self.cid, self.bundle = root, cid, bundle
        self.dir = state_dir(root, cid)
        self.console_socket = console_socket
        self.report_fd = report_fd
        with open(os.path.join(bundle, "config.json")) as f:
            self.config: dict[str, Any] = json.load(f)
        self.terminal = bool((self.config.get("process") or {}).get("terminal"))
        self.vm: Qemu | None = None
        self.agent: AgentClient | None = None
        self.exit_code: int | None = None
        self.reason = ""
        self.sel = selectors.DefaultSelector()
        self.tty = -1  # the terminal's slave side, which the shim holds (terminal mode)
        self.execs: dict[int, _ExecConn] = {}
        self.next_process = 1
        self.closing = False
        self.status = "created"

    # --- boot ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from cocon import _linux as L
        from cocon.isolation.microvm import GUEST_SHARE, SHARE_OPTIONS, SHARE_TAG, guest_config, machine_size
        from cocon.vmm.agent_client import AgentClient, connect_unix
        from cocon.vmm.agent_protocol import PROTOCOL_VERSION
        from cocon.vmm.assets import ensure_assets
        from cocon.vmm.kvm import probe_kvm
        from cocon.vmm.qemu import Disk, MachineConfig, Qemu, Share

        doc, binds = guest_config(self.config)
        # a private mount namespace: the binds below are gone with this process and its QEMU
        L.unshare(L.CLONE_NEWNS)
        L.mount("none", "/", None, L.MS_REC | L.MS_SLAVE)
        share = os.path.join(self.dir, "share")
        os.makedirs(share, 0o700, exist_ok=True)
        for host, name in binds:
            bind_into_share(share, host, name)
        netns = netns_path(self.config)
        network: dict[str, Any] | None = None
        if netns:
            network = _enter_netns(netns)
        assets = ensure_assets(assets_root())
        if assets.utility is None:
            raise ShimError(
                "the guest assets have no utility image: rebuild them (cocon system assets --rebuild)"
            )
        accel = probe_kvm(assets).accel
        memory, cpus = machine_size(self.config)
        agent_sock = os.path.join(self.dir, "agent.sock")
        extra: list[str] = []
        if network is not None:
            extra += [
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
                "-device", f"virtio-net-device,netdev=n0,mac={network['mac']}",
            ]  # fmt: skip
        machine = MachineConfig(
            assets.kernel, assets.initrd, cmdline="cocon.agent=1", machine="microvm", accel=accel,
            memory_mib=memory, cpus=cpus, disks=(Disk(assets.utility),), shares=(Share(share, SHARE_TAG),),
            agent_socket=agent_sock, extra_args=tuple(extra),
        )  # fmt: skip
        held: list[socket.socket] = []

        def connect(vm: Qemu) -> None:
            # Connected before the guest opens its port (or before a saved guest resumes), so the
            # agent never sees a host arrive later; nothing is written until the agent is ready:
            # QEMU 7.2 spins on an unread socket and starves the guest's vCPU.
            held.append(connect_unix(agent_sock, BOOT_TIMEOUT))

        self.vm = self._restore(machine, assets.digest, network is not None, connect)
        self.restored = self.vm is not None
        if self.vm is None:  # a cold boot
            for sock in held:  # a connection to a restore that failed
                sock.close()
            held.clear()
            self.vm = Qemu(machine, self.dir)
            self.vm.start()
            connect(self.vm)
            self._save_state()
            self.vm.wait_for_console(READY, BOOT_TIMEOUT)
        else:
            self._save_state()
        if network is not None:
            _connect_tap(network)
        self.agent = agent = AgentClient(held[-1])
        agent.request("hello", version=PROTOCOL_VERSION, timeout=BOOT_TIMEOUT)
        if self.restored:  # a copy of the template's guest: its own randomness and the time of now
            import base64

            agent.request("reseed", entropy=base64.b64encode(os.urandom(64)).decode())
            agent.request("set_clock", unix_ns=time.time_ns())
        agent.request("mount", source=SHARE_TAG, target=GUEST_SHARE, fstype="9p", options=SHARE_OPTIONS)
        if network is not None:
            args = {k: v for k, v in network.items() if k != "host_if"}
            agent.request("network", interface="eth0", **args)  # the guest's one NIC
        agent.request("set_hostname", hostname=str(doc.get("hostname") or self.cid[:12]))
        create_args: dict[str, Any] = {}
        program = self._seccomp_program()
        if program is not None:
            create_args["seccomp_program"] = program
        reply = agent.request(
            "create",
            container_id=self.cid,
            config=doc,
            terminal=self.terminal,
            stdin=True,
            timeout=60,
            **create_args,
        )
        self.guest_pid = int(reply.get("pid") or 0)
        self.listener = self._listen()  # before `create` returns: the engine's `start` comes next

    def _listen(self) -> socket.socket:
        """The control socket (root only: its directory is 0700, the socket 0600)."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        ctl = os.path.join(self.dir, "ctl.sock")
        try:
            os.unlink(ctl)
        except FileNotFoundError:
            pass
        listener.bind(ctl)
        os.chmod(ctl, 0o600)
        listener.listen(16)
        listener.setblocking(False)
        return listener

    def _seccomp_program(self) -> str | None:
        """The container's seccomp filter compiled here (and cached under the runtime root), base64,
        for the agent: libseccomp's compiler under emulation costs ~0.15 s per container."""
        if not (self.config.get("linux") or {}).get("seccomp"):
            return None
        import base64

        from cocon.oci.errors import OCIError
        from cocon.oci.runtime_spec import parse_config
        from cocon.runtime.errors import SeccompError
        from cocon.runtime.seccomp_bpf import compiled_filter

        try:
            spec = parse_config(json.dumps(self.config).encode(), "config.json")
            assert spec.linux is not None and spec.linux.seccomp is not None
            compiled = compiled_filter(spec.linux.seccomp, os.path.join(self.root, ".seccomp"))
        except (OCIError, SeccompError, OSError):
            return None  # the guest's runtime compiles it (or says what is wrong)
        return base64.b64encode(compiled.program).decode()

    def _restore(
        self, machine: MachineConfig, assets_digest: str, networked: bool, connect: Callable[[Qemu], None]
    ) -> Qemu | None:
        """The VM restored from the pre-booted template of this machine and device layout (made
        first when there is none: one boot, ~0.1 s more than a cold start), or None: boot cold
        ($COCON_MICROVM_TEMPLATES=0, or a template that cannot be made or restored)."""
        from cocon.isolation.microvm import SHARE_TAG
        from cocon.vmm.agent_client import connect_unix
        from cocon.vmm.errors import QemuError
        from cocon.vmm.qemu import Share
        from cocon.vmm.template import TemplateKey, TemplateStore

        if os.environ.get("COCON_MICROVM_TEMPLATES", "1") == "0":
            return None
        layout = "virtio-net" if networked else "no-nic"
        key = TemplateKey.for_config(machine, assets_digest=assets_digest, layout=layout)
        store = TemplateStore(os.path.join(assets_root(), "assets"))
        if store.find(key) is None:
            # the template VM: the same devices, with its own (empty) share and channel, and a NIC
            # on a hub with nothing else on it
            share = os.path.join(self.dir, "template-share")
            os.makedirs(share, exist_ok=True)
            extra: tuple[str, ...] = ()
            if networked:
                extra = ("-netdev", "hubport,id=n0,hubid=0", "-device", "virtio-net-device,netdev=n0")
            config = dataclasses.replace(
                machine, shares=(Share(share, SHARE_TAG),), extra_args=extra,
                agent_socket=os.path.join(self.dir, "template-agent.sock"),
            )  # fmt: skip
            channel: list[socket.socket] = []  # held while the template is made and saved
            try:
                store.create(
                    key, config, ready=READY, timeout=BOOT_TIMEOUT,
                    on_started=lambda vm: channel.append(connect_unix(str(vm.config.agent_socket), 30)),
                )  # fmt: skip
            except QemuError as exc:
                _write_all(2, f"cocon: no microVM template ({exc}); booting cold\n".encode())
                return None
            finally:
                for sock in channel:
                    sock.close()
        try:
            return store.restore_or_none(key, machine, self.dir, timeout=60, on_started=connect)
        except QemuError:
            return None

    # --- serving ---------------------------------------------------------------------------------
    def serve(self) -> int:
        assert self.agent is not None and self.vm is not None and self.vm.pid is not None
        agent = self.agent
        agent.on_output = self._on_output
        agent.on_eof = self._on_eof
        agent.on_exit = self._on_exit
        agent.on_closed = self._on_closed
        self.sel.register(agent.fileno(), selectors.EVENT_READ, self._agent_event)
        self.qemu_fd = os.pidfd_open(self.vm.pid)
        self.sel.register(self.qemu_fd, selectors.EVENT_READ, self._qemu_exited)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self._signals()
        self._stdin_source()
        while self.exit_code is None:
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if agent.wants_write() else 0)
            self.sel.modify(agent.fileno(), want, self._agent_event)
            for key, events in self.sel.select(1.0):
                key.data(key, events)
        self._power_off()
        return self.exit_code

    def _agent_event(self, key: selectors.SelectorKey, events: int) -> None:
        assert self.agent is not None
        if events & selectors.EVENT_WRITE:
            self.agent.on_writable()
        if events & selectors.EVENT_READ:
            self.agent.on_readable()

    def _on_output(self, process: int, stream: int, data: bytes) -> None:
        if process == 0:
            fd = self.tty if self.terminal else (1 if stream == 1 else 2)
            _write_all(fd, data)
        elif process in self.execs:
            self.execs[process].output(stream, data)

    def _on_eof(self, process: int, stream: int) -> None:
        if process in self.execs:
            self.execs[process].eof(stream)

    def _on_exit(self, process: int, code: int) -> None:
        if process == 0:
            self.exit_code = code
        elif process in self.execs:
            self.execs.pop(process).exited(code)

    def _on_closed(self) -> None:
        if self.exit_code is None:
            self._qemu_exited(None, 0)

    def _qemu_exited(self, key: selectors.SelectorKey | None, events: int) -> None:
        if self.exit_code is not None:
            return
        assert self.vm is not None
        try:
            status = self.vm.process.wait(2) if self.vm.process is not None else None
        except Exception:
            status = None
        tail = self.vm.log_tail(5)
        self.reason = f"the microVM stopped unexpectedly (QEMU exit status {status})" + (
            f": {tail}" if tail else ""
        )
        _write_all(2, f"cocon: {self.reason}\n".encode())
        try:
            with open(os.path.join(self.dir, "exit-reason"), "w") as f:
                f.write(self.reason + "\n")
        except OSError:
            pass
        self.exit_code = 255

    def _power_off(self) -> None:
        assert self.vm is not None
        for conn in list(self.execs.values()):
            conn.exited(255 if self.reason else 137)
        self.execs.clear()
        if self.agent is not None and self.vm.returncode is None and not self.reason:
            try:
                self.agent.request("shutdown", timeout=POWEROFF_TIMEOUT)
            except Exception:
                pass
            try:
                self.vm.wait(POWEROFF_TIMEOUT)
            except Exception:
                pass
        self.vm.kill()

    # --- stdin -----------------------------------------------------------------------------------
    def _stdin_source(self) -> None:
        fd = self.tty if self.terminal else 0
        try:
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, self._stdin)
        except (OSError, ValueError, PermissionError):
            # /dev/null or a regular file cannot be polled: nothing will come, end the stream
            assert self.agent is not None
            self.agent.close_stdin(0)

    def _stdin(self, key: selectors.SelectorKey, events: int) -> None:
        assert self.agent is not None
        try:
            data = os.read(key.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.agent.send_stdin(0, data)
            return
        self.sel.unregister(key.fd)
        if not self.terminal:
            self.agent.close_stdin(0)

    # --- signals: forwarded to the container's init ------------------------------------------
    def _signals(self) -> None:
        rd, wr = socket.socketpair()
        rd.setblocking(False)
        wr.setblocking(False)
        signal.set_wakeup_fd(wr.fileno(), warn_on_full_buffer=False)
        self._wake = (rd, wr)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                    signal.SIGHUP, signal.SIGWINCH, signal.SIGCONT):  # fmt: skip
            signal.signal(sig, lambda *_: None)
        self.sel.register(rd, selectors.EVENT_READ, self._signal_event)

    def _signal_event(self, key: selectors.SelectorKey, events: int) -> None:
        assert self.agent is not None
        try:
            data = self._wake[0].recv(256)
        except BlockingIOError:
            return
        for sig in data:
            if sig == signal.SIGWINCH:
                if self.terminal:
                    rows, cols = _tty_size(self.tty)
                    self.agent.request_async("resize", _ignore, process_number=0, rows=rows, cols=cols)
            elif sig == signal.SIGHUP and self.terminal:
                continue  # conmon closed the terminal's master: not for the container
            else:
                self.agent.request_async("signal", _ignore, process_number=0, signal=sig)

    # --- control socket --------------------------------------------------------------------------
    def _accept(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.sel.register(conn, selectors.EVENT_READ, _Request(self, conn).readable)

    def handle(self, conn: socket.socket, request: dict[str, Any]) -> dict[str, Any] | None:
        """A control request; the reply (None: answered later or the connection became an exec)."""
        assert self.agent is not None and self.vm is not None
        op = request.get("op")
        if op == "start":
            self.agent.request("start", container_id=self.cid, timeout=30)
            self.status = "running"
            self._save_state()
            return {"ok": True}
        if op == "signal":
            self.agent.request("signal", process_number=0, signal=int(request.get("signal", 15)))
            return {"ok": True}
        if op in ("pause", "resume"):
            self.vm.qmp("stop" if op == "pause" else "cont")
            self.status = "paused" if op == "pause" else "running"
            self._save_state()
            return {"ok": True}
        if op == "top":
            return self.agent.request("ps", container_id=self.cid)
        if op == "stats":
            reply = self.agent.request("stats", container_id=self.cid)
            reply["qemu_pid"] = self.vm.pid
            return reply
        if op == "exec":
            number = self.next_process
            self.next_process += 1
            exec_conn = _ExecConn(self, conn, number)
            self.execs[number] = exec_conn
            try:
                self.agent.request(
                    "exec", container_id=self.cid, process_number=number, process=request.get("process"),
                    terminal=bool(request.get("terminal")), stdin=bool(request.get("stdin")), timeout=30,
                )  # fmt: skip
            except Exception:
                self.execs.pop(number, None)
                raise
            exec_conn.started()
            return None
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _save_state(self) -> None:
        vm = self.vm
        doc = {
            "id": self.cid, "bundle": self.bundle, "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "qemu_pid": vm.pid if vm is not None else 0,
            "qemu_pid_start": _start_time(vm.pid) if vm is not None and vm.pid else None,
            "status": self.status, "created": time.time(),
        }  # fmt: skip
        _write_state(self.dir, doc)


def _ignore(reply: object) -> None:
    pass


class _Request:
    """A control connection until its first line: a one-shot request, or the start of an exec."""

    def __init__(self, shim: Shim, conn: socket.socket) -> None:
        self.shim, self.conn, self.data = shim, conn, b""

    def readable(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            chunk = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        self.data += chunk
        if b"\n" not in self.data:
            if not chunk or len(self.data) > 1 << 20:
                self.shim.sel.unregister(self.conn)
                self.conn.close()
            return
        # one line per request; an exec's client sends its frames only after the reply
        line = self.data.split(b"\n", 1)[0]
        self.shim.sel.unregister(self.conn)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
            reply = self.shim.handle(self.conn, request)
        except Exception as exc:
            reply = {"ok": False, "error": str(exc), "exit_code": getattr(exc, "exit_code", 125)}
        if reply is None:
            return
        try:
            self.conn.setblocking(True)
            self.conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        self.conn.close()


class _ExecConn:
    """An exec's client (`cocon-microvm-runtime exec`): after the request line, the connection carries
    the agent protocol's frames for that one process (stdin in, output and the exit event out)."""

    def __init__(self, shim: Shim, conn: socket.socket, number: int) -> None:
        from cocon.vmm.agent_protocol import Decoder

        self.shim, self.conn, self.number = shim, conn, number
        self.decoder = Decoder()

    def started(self) -> None:
        self.conn.setblocking(True)
        self.conn.sendall(json.dumps({"ok": True}).encode() + b"\n")
        self.conn.setblocking(False)
        self.shim.sel.register(self.conn, selectors.EVENT_READ, self.readable)

    def readable(self, key: selectors.SelectorKey, events: int) -> None:
        from cocon.vmm import agent_protocol as P

        agent = self.shim.agent
        assert agent is not None
        try:
            chunk = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client went away: its process gets a hang-up
            self.shim.sel.unregister(self.conn)
            agent.close_stdin(self.number)
            return
        try:
            frames = self.decoder.feed(chunk)
        except Exception:
            frames = []
        for frame in frames:
            if frame.kind == P.DATA:
                agent.send_stdin(self.number, frame.payload)
            elif frame.kind == P.EOF:
                agent.close_stdin(self.number)
            elif frame.kind == P.CONTROL:
                msg = frame.control()
                if msg.get("op") == "resize":
                    agent.request_async("resize", _ignore, process_number=self.number,
                                        rows=int(msg["rows"]), cols=int(msg["cols"]))  # fmt: skip
                elif msg.get("op") == "signal":
                    agent.request_async("signal", _ignore, process_number=self.number,
                                        signal=int(msg["signal"]))  # fmt: skip

    def _send(self, data: bytes) -> None:
        try:
            self.conn.setblocking(True)
            self.conn.sendall(data)
            self.conn.setblocking(False)
        except OSError:
            pass

    def output(self, stream: int, data: bytes) -> None:
        from cocon.vmm import agent_protocol as P

        self._send(P.encode_data(0, stream, data))

    def eof(self, stream: int) -> None:
        from cocon.vmm import agent_protocol as P

        self._send(P.encode_eof(0, stream))

    def exited(self, code: int) -> None:
        from cocon.vmm import agent_protocol as P

        self._send(P.encode_control({"event": "exit", "process_number": 0, "exit_code": code}))
        try:
            self.shim.sel.unregister(self.conn)
        except (KeyError, ValueError):
            pass
        self.conn.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)
            continue
        except OSError:
            return  # the reader is gone (conmon): the output has nowhere to go
        view = view[n:]


def _tty_size(fd: int) -> tuple[int, int]:
    import fcntl
    import struct
    import termios

    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    return rows, cols


def bind_into_share(share: str, host: str, name: str) -> None:
    """Bind `host` (a directory or a file) at `share/name`, the directory QEMU exports over 9p."""
    from cocon import _linux as L

    target = os.path.join(share, name)
    try:
        if os.path.isdir(host):
            os.makedirs(target, exist_ok=True)
        else:
            open(target, "a").close()
        L.mount(host, target, None, L.MS_BIND | L.MS_REC)
    except OSError as exc:
        raise ShimError(f"cannot share {host} with the VM: {exc.strerror}") from None


def netns_path(config: dict[str, Any]) -> str | None:
    """The network namespace a runtime config joins by path (the instance's), None without one."""
    return next(
        (ns.get("path") for ns in (config.get("linux") or {}).get("namespaces") or []
         if ns.get("type") == "network" and ns.get("path")), None,
    )  # fmt: skip


# --- networking: the instance's netns, a tap joined to its veth -----------------------------------


def _enter_netns(path: str) -> dict[str, Any]:
    """Join the instance's network namespace and read eth0's configuration (set up by the engine as
    for a container): the guest's NIC gets eth0's MAC and addresses, and tc redirects every frame
    between eth0 and the tap QEMU makes (Kata's tc-mirred scheme: no bridge, no double NAT)."""
    from cocon import _linux as L

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        L.setns(fd, L.CLONE_NEWNET)
    finally:
        os.close(fd)
    links = json.loads(_ip("-j", "addr", "show"))
    interfaces = []
    for link in links:
        name = link.get("ifname")
        if name == "lo" or not link.get("address"):
            continue
        addresses = [
            f"{a['local']}/{a['prefixlen']}"
            for a in link.get("addr_info") or []
            if a.get("scope") == "global"
        ]
        interfaces.append({"host_if": name, "mac": link["address"], "mtu": link.get("mtu", 1500),
                           "addresses": addresses})  # fmt: skip
    if not interfaces:
        return {}
    routes = []
    for family in ("-4", "-6"):
        for r in json.loads(_ip(family, "-j", "route", "show", "default")):
            if r.get("gateway"):
                routes.append({"destination": "default", "gateway": r["gateway"]})
    first = interfaces[0]
    return {"host_if": first["host_if"], "mac": first["mac"], "mtu": first["mtu"],
            "addresses": first["addresses"], "routes": routes}  # fmt: skip


def _connect_tap(network: dict[str, Any]) -> None:
    host_if = network["host_if"]
    _ip("link", "set", TAP, "up", "mtu", str(network["mtu"]))
    for dev, to in ((host_if, TAP), (TAP, host_if)):
        _run("tc", "qdisc", "add", "dev", dev, "ingress")
        _run("tc", "filter", "add", "dev", dev, "parent", "ffff:", "protocol", "all", "u32", "match",
             "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to)  # fmt: skip


def _ip(*args: str) -> str:
    return _run("ip", *args)


def _run(*argv: str) -> str:
    import subprocess

    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ShimError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


# --- the command line ----------------------------------------------------------------------------


def _create(
    root: str, cid: str, bundle: str, pid_file: str | None, console_socket: str | None,
    shim_class: type[Shim] | None = None,
) -> int:  # fmt: skip
    """Fork the shim (`shim_class`: Shim, or the full VM's), wait until it set the VM up, write the
    pid file; the shim's error otherwise, with nothing left behind."""
    directory = state_dir(root, cid)
    old = _read_state(root, cid)
    if old and _alive(int(old.get("pid") or 0), old.get("pid_start")):
        raise ShimError(f"VM {cid} exists already")
    os.makedirs(directory, 0o700, exist_ok=True)
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the shim
        os.close(rd)
        code = 1
        try:
            os.setsid()
            shim = (shim_class or Shim)(root, cid, bundle, console_socket, wr)
            try:
                shim.setup()
                if shim.terminal:
                    shim.tty = _terminal(shim, console_socket)
            except BaseException as exc:
                message = str(exc) or type(exc).__name__
                report = {"error": message, "exit_code": getattr(exc, "exit_code", 125)}
                os.write(wr, b"error " + json.dumps(report).encode() + b"\n")
                if shim.vm is not None:
                    shim.vm.kill()
                os._exit(1)
            os.write(wr, b"ok\n")
            os.close(wr)
            code = shim.serve()
        except BaseException as exc:
            _write_all(2, f"cocon: the VM's shim failed: {exc}\n".encode())
            code = 255
        finally:
            sys.stdout.flush()
            os._exit(code)
    os.close(wr)
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(rd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(rd)
    if data.startswith(b"ok"):
        if pid_file:
            with open(pid_file + ".tmp", "w") as f:
                f.write(str(pid))
            os.replace(pid_file + ".tmp", pid_file)
        return 0
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    import shutil

    shutil.rmtree(directory, ignore_errors=True)
    if data.startswith(b"error "):
        doc = json.loads(data[6:])
        raise ShimError(str(doc["error"]), int(doc.get("exit_code", 125)))
    raise ShimError("the VM's shim ended before the instance was created")


def _terminal(shim: Shim, console_socket: str | None) -> int:
    """A pty whose master goes to conmon's console socket; the shim keeps the slave (raw: the guest's
    own terminal does the echo and line editing) as its controlling terminal, for SIGWINCH."""
    import fcntl
    import termios
    import tty

    from cocon.runtime.console import connect_console_socket, send_console, set_size

    if not console_socket:
        raise ShimError("a terminal needs --console-socket")
    master, slave = os.openpty()
    size = (shim.config.get("process") or {}).get("consoleSize") or {}
    if size.get("height") and size.get("width"):
        set_size(master, int(size["height"]), int(size["width"]))
    tty.setraw(slave)
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    sock = connect_console_socket(console_socket)
    try:
        send_console(sock, master, os.ttyname(slave))
    finally:
        sock.close()
        os.close(master)
    return slave


def _exec(root: str, cid: str, args: Any) -> int:
    """Run a process in the VM's container through its shim and relay this process's stdio."""
    import select

    from cocon.vmm import agent_protocol as P

    doc = _read_state(root, cid)
    if not doc or not _alive(int(doc.get("pid") or 0), doc.get("pid_start")):
        raise ShimError(f"VM {cid[:12]} is not running")
    process = _exec_process(doc, args)
    terminal = bool(args.tty)
    interactive = (not os.isatty(0) and _pollable(0)) or terminal
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(os.path.join(state_dir(root, cid), "ctl.sock"))
    request = {"op": "exec", "process": process, "terminal": terminal, "stdin": interactive}
    sock.sendall(json.dumps(request).encode() + b"\n")
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ShimError("the VM's shim closed the connection")
        line += chunk
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ShimError(str(reply.get("error")), int(reply.get("exit_code", 126)))
    saved = None
    if terminal and os.isatty(0):
        import fcntl
        import termios
        import tty

        try:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # for SIGWINCH when we lead a session without one
        except OSError:
            pass
        saved = termios.tcgetattr(0)
        tty.setraw(0)
        rows, cols = _tty_size(0)
        sock.sendall(P.encode_control({"op": "resize", "rows": rows, "cols": cols}))
        wake_r, wake_w = socket.socketpair()
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGWINCH, lambda *_: None)
    else:
        wake_r = None
    decoder = P.Decoder()
    inputs: list[Any] = [sock] + ([0] if interactive else []) + ([wake_r] if wake_r is not None else [])
    code = 255
    try:
        while True:
            ready, _, _ = select.select(inputs, [], [])
            if wake_r is not None and wake_r in ready:
                wake_r.recv(64)
                rows, cols = _tty_size(0)
                sock.sendall(P.encode_control({"op": "resize", "rows": rows, "cols": cols}))
            if 0 in ready:
                data = os.read(0, 65536)
                if data:
                    sock.sendall(P.encode_data(0, 0, data))
                else:
                    inputs.remove(0)
                    sock.sendall(P.encode_eof(0, 0))
            if sock in ready:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                done = False
                for frame in decoder.feed(chunk):
                    if frame.kind == P.DATA:
                        _write_all(1 if frame.stream == 1 or terminal else 2, frame.payload)
                    elif frame.kind == P.CONTROL and frame.control().get("event") == "exit":
                        code = int(frame.control().get("exit_code", 255))
                        done = True
                if done:
                    break
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(0, termios.TCSADRAIN, saved)
    return code


def _pollable(fd: int) -> bool:
    import stat

    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))


def _exec_process(doc: dict[str, Any], args: Any) -> dict[str, Any]:
    """The exec's runtime-spec process: the container's (its env, user, capabilities, ...) with the
    exec's command, -e, --cwd, -u, -g and -t (or a --process file as is)."""
    from cocon.isolation.microvm import guest_config

    if args.process:
        with open(args.process) as f:
            process: dict[str, Any] = json.load(f)
        return process
    with open(os.path.join(doc["bundle"], "config.json")) as f:
        config, _ = guest_config(json.load(f))
    process = dict(config.get("process") or {})
    if not args.args:
        raise ShimError("exec needs a command")
    process["args"] = list(args.args)
    process["terminal"] = bool(args.tty)
    process.pop("consoleSize", None)
    env = [e for e in process.get("env") or []]
    for item in args.env:
        key = item.split("=", 1)[0]
        env = [e for e in env if e.split("=", 1)[0] != key] + [item]
    process["env"] = env
    if args.cwd:
        process["cwd"] = args.cwd
    if args.user:
        uid, _, gid = args.user.partition(":")
        process["user"] = {
            "uid": int(uid),
            "gid": int(gid or 0),
            "additionalGids": list(args.additional_gids),
        }
    return process


def _parser(prog: str = "cocon-microvm-runtime", kind: str = "microVMs") -> Any:
    import argparse

    p = argparse.ArgumentParser(
        prog=prog, description=f"runc's command line for cocon {kind} (used by conmon)"
    )
    p.add_argument("--root", default="/run/cocon/vm", help="state directory")
    p.add_argument("--log", help="ignored (errors go to stderr)")
    p.add_argument("--log-format", help="ignored")
    p.add_argument("--debug", action="store_true", help="ignored")
    p.add_argument("--systemd-cgroup", action="store_true", help="ignored")
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("create", help="boot the microVM and create the container in it")
    sp.add_argument("-b", "--bundle", default=".")
    sp.add_argument("--pid-file")
    sp.add_argument("--console-socket")
    sp.add_argument("--no-pivot", action="store_true")
    sp.add_argument("--no-new-keyring", action="store_true")
    sp.add_argument("--preserve-fds", type=int, default=0)
    sp.add_argument("id")
    for name, text in (
        ("start", "start the container's process"),
        ("state", "print the state as JSON"),
        ("pause", "pause the VM"),
        ("resume", "resume a paused VM"),
        ("ps", "print the shim's pid as JSON (the guest's processes are not the host's)"),
    ):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--format", "-f", default="json")
        sp.add_argument("id")
    sp = sub.add_parser("kill", help="send a signal to the container's init (SIGKILL ends the VM)")
    sp.add_argument("-a", "--all", action="store_true")
    sp.add_argument("id")
    sp.add_argument("signal", nargs="?", default="TERM")
    sp = sub.add_parser("delete", help="delete the VM's state (with --force: kill it first)")
    sp.add_argument("-f", "--force", action="store_true")
    sp.add_argument("id")
    sp = sub.add_parser("exec", help="run a process in the container")
    sp.add_argument("-p", "--process")
    sp.add_argument("-t", "--tty", action="store_true")
    sp.add_argument("--cwd")
    sp.add_argument("-e", "--env", action="append", default=[])
    sp.add_argument("-u", "--user")
    sp.add_argument("-g", "--additional-gids", action="append", type=int, default=[])
    sp.add_argument("-d", "--detach", action="store_true")
    sp.add_argument("--pid-file")
    sp.add_argument("id")
    sp.add_argument("args", nargs="...")
    return p


def main(
    argv: list[str] | None = None,
    *,
    prog: str = "cocon-microvm-runtime",
    shim_class: type[Shim] | None = None,
) -> int:
    """The runtime's command line; `prog` and `shim_class` make it the full VM's (cocon.isolation.vm_shim)."""
    from cocon.runtime.container import parse_signal

    args = _parser(prog, "microVMs" if shim_class is None else "VMs").parse_args(argv)
    root = args.root
    try:
        cmd = args.command
        if cmd == "create":
            bundle = os.path.abspath(args.bundle)
            return _create(root, args.id, bundle, args.pid_file, args.console_socket, shim_class)
        if cmd == "start":
            control(root, args.id, {"op": "start"}, timeout=60)
        elif cmd == "state":
            doc = state(root, args.id)
            if not doc:
                raise ShimError(f"container {args.id} does not exist")
            print(json.dumps(doc, indent=2))
        elif cmd == "kill":
            kill(root, args.id, parse_signal(args.signal))
        elif cmd == "delete":
            delete(root, args.id, force=args.force)
        elif cmd in ("pause", "resume"):
            control(root, args.id, {"op": cmd})
        elif cmd == "ps":
            print(json.dumps([state(root, args.id).get("pid", 0)]))
        elif cmd == "exec":
            return _exec(root, args.id, args)
    except IsolationError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        # an exec that could not start exits as docker exec does (126: cannot be executed)
        return exc.exit_code if cmd == "exec" else 1
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            print(f"{prog}: error: {exc.filename}: no such file", file=sys.stderr)
        else:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def entry() -> NoReturn:
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
