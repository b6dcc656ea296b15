"""The VM shim's part of live migration (cocon.vmm.migration has the QMP side, cocon.engine.vm_migration
the daemons' side; docs/vm-migration.md).

The shim runs in the instance's network namespace, but migration traffic goes between the hosts: the
sockets are made in the namespace the shim started in (the daemon's), kept open as `host_netns`, and
QEMU gets them as file descriptors. Over TCP the target listens on the address the source reached its
daemon at; over a Unix socket (a target daemon on the same machine) on files next to the shim's state.

Requests (on the shim's control socket):
- target `migrate-listen` {transport, host, nodes}: export the disks over NBD, wait for the migration
  stream; the reply has both addresses, a secret name per export and a cookie the stream must start
  with (the first connection that presents it is handed to QEMU, others are closed).
- source `migrate-out` {nbd, migration, exports, cookie}: connect, mirror the disks, migrate.
- target `migrate-finish`: the source has handed over: run the guest here.
- source `migrate-resume`: the target could not take over after all: run the guest here again.
"""

from __future__ import annotations

import os
import secrets
import selectors
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cocon.isolation.vm_shim import VmShim

COOKIE_BYTES = 16


class ShimMigration:
    """Migration state of one VM shim (made before the shim joins the instance's network namespace)."""

    def __init__(self, shim: VmShim) -> None:
        self.shim = shim
        self.host_netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.stream_listener: socket.socket | None = None
        self.nbd_listener: socket.socket | None = None
        self.cookie = b""
        self.exported = False
        self.accepted = False
        self.sending = False
        self.paths: list[str] = []

    # --- sockets in the daemon's network namespace ------------------------------------------------
    def _socket(self, family: int) -> socket.socket:
        if family == socket.AF_UNIX:
            return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        from cocon import _linux as L

        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            L.setns(self.host_netns, L.CLONE_NEWNET)
            try:
                return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            finally:
                L.setns(here, L.CLONE_NEWNET)
        finally:
            os.close(here)

    def _listener(self, transport: str, host: str, kind: str) -> tuple[socket.socket, dict[str, Any]]:
        if transport == "unix":
            path = os.path.join(os.path.dirname(self.shim.dir), f"mig-{self.shim.cid[:12]}-{kind}.sock")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            sock = self._socket(socket.AF_UNIX)
            sock.bind(path)
            os.chmod(path, 0o600)
            self.paths.append(path)
            address: dict[str, Any] = {"transport": "unix", "path": path}
        else:
            sock = self._socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.bind((host, 0))
            address = {"transport": "tcp", "host": host, "port": sock.getsockname()[1]}
        sock.listen(8)
        return sock, address

    def _connect(self, address: dict[str, Any]) -> socket.socket:
        if address.get("transport") == "unix":
            sock = self._socket(socket.AF_UNIX)
            target: Any = str(address["path"])
        else:
            host = str(address["host"])
            sock = self._socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            target = (host, int(address["port"]))
        sock.settimeout(30)
        try:
            sock.connect(target)
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot connect to the migration target at {target}: {exc.strerror}") from None
        sock.settimeout(None)
        return sock

    # --- the target ---------------------------------------------------------------------------------
    def listen(self, request: dict[str, Any]) -> dict[str, Any]:
        from cocon.vmm.migration import export_disks

        vm = self.shim.vm
        assert vm is not None
        if self.stream_listener is not None:
            return {"ok": False, "error": "this VM is waiting for a migration already"}
        transport = str(request.get("transport") or "unix")
        host = str(request.get("host") or "")
        if transport not in ("unix", "tcp") or (transport == "tcp" and not host):
            return {"ok": False, "error": "migrate-listen needs transport unix, or tcp with a host"}
        nodes = [str(n) for n in request.get("nodes") or []]
        exports = {node: f"{node}-{secrets.token_hex(8)}" for node in nodes}
        self.nbd_listener, nbd_address = self._listener(transport, host, "nbd")
        export_disks(vm, self.nbd_listener.fileno(), exports)
        self.exported = bool(nodes)
        self.nbd_listener.close()  # QEMU holds its own copy
        self.nbd_listener = None
        self.stream_listener, stream_address = self._listener(transport, host, "ram")
        self.stream_listener.setblocking(False)
        self.cookie = secrets.token_bytes(COOKIE_BYTES)
        self.shim.sel.register(self.stream_listener, selectors.EVENT_READ, self._accept_stream)
        return {"ok": True, "nbd": nbd_address, "migration": stream_address, "exports": exports,
                "cookie": self.cookie.hex()}  # fmt: skip

    def _accept_stream(self, key: selectors.SelectorKey, events: int) -> None:
        from cocon.vmm.migration import accept_incoming

        assert self.stream_listener is not None and self.shim.vm is not None
        try:
            conn, _ = self.stream_listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(10)
            try:
                got = b""
                while len(got) < COOKIE_BYTES:
                    chunk = conn.recv(COOKIE_BYTES - len(got))
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                got = b""
            if not secrets.compare_digest(got, self.cookie):
                return  # not the source: keep waiting for it
            conn.settimeout(None)
            accept_incoming(self.shim.vm, conn.fileno())
        self.accepted = True
        self.shim.sel.unregister(self.stream_listener)
        self.stream_listener.close()
        self.stream_listener = None
        self._unlink_paths()  # the source is connected (its NBD connections came first): no new clients

    def finish(self) -> dict[str, Any]:
        from cocon.vmm.migration import finish_incoming

        assert self.shim.vm is not None
        if not self.accepted:
            return {"ok": False, "error": "no migration reached this VM"}
        finish_incoming(self.shim.vm, exported=self.exported)
        self.close()
        return {"ok": True}

    # --- the source ---------------------------------------------------------------------------------
    def send_later(self, conn: socket.socket, request: dict[str, Any]) -> dict[str, Any] | None:
        """`migrate-out` in a thread, answered on `conn` when done: the shim's loop relays the console,
        the DHCP answers and other requests meanwhile."""
        import json
        import threading

        if self.sending:
            return {"ok": False, "error": "this VM is migrating already"}
        self.sending = True

        def run() -> None:
            try:
                reply = self.send(request)
            except Exception as exc:
                reply = {"ok": False, "error": str(exc), "exit_code": 125}
            finally:
                self.sending = False
            try:
                conn.setblocking(True)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass
            conn.close()

        threading.Thread(target=run, name="cocon-migrate", daemon=True).start()
        return None

    def send(self, request: dict[str, Any]) -> dict[str, Any]:
        from cocon.vmm.migration import send

        assert self.shim.vm is not None
        try:
            cookie = bytes.fromhex(str(request.get("cookie") or ""))
        except ValueError:
            cookie = b""
        exports = request.get("exports") or {}
        if len(cookie) != COOKIE_BYTES or not isinstance(exports, dict):
            return {"ok": False, "error": "migrate-out needs the target's cookie and exports"}
        sockets: list[socket.socket] = []
        try:
            # node → (a connection to the NBD server, the export to ask for on it)
            disks: dict[str, tuple[int, str]] = {}
            for node, export in exports.items():
                sock = self._connect(request["nbd"])
                sockets.append(sock)
                disks[str(node)] = (sock.fileno(), str(export))
            stream = self._connect(request["migration"])
            sockets.append(stream)
            stream.sendall(cookie)
            result = send(self.shim.vm, disks, stream.fileno(),
                          downtime_limit_ms=int(request.get("downtime_limit_ms") or 300))  # fmt: skip
        finally:
            for sock in sockets:
                sock.close()
        # CLOCK_MONOTONIC is the host's: the daemon times the hand-over from this instant
        return {"ok": True, **result.as_dict(), "CompletedAt": result.completed_at}

    def resume(self) -> dict[str, Any]:
        from cocon.vmm.migration import resume_after_failed_handover

        assert self.shim.vm is not None
        resume_after_failed_handover(self.shim.vm)
        return {"ok": True}

    def close(self) -> None:
        for sock in (self.stream_listener, self.nbd_listener):
            if sock is not None:
                try:
                    self.shim.sel.unregister(sock)
                except (KeyError, ValueError):
                    pass
                sock.close()
        self.stream_listener = self.nbd_listener = None
        self._unlink_paths()

    def _unlink_paths(self) -> None:
        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.paths = []
