"""`LocalClient`: the client interface answered by an engine in this process.

Until the node daemon exists, the CLI uses this. It is the in-process twin of the future HTTP client:
same requests, same JSON-shaped answers, same errors (`APIError` with the status the daemon would
answer with). What only works in-process is how streams travel: the container's process gets this
process's own stdin/stdout/stderr (`Attachment(direct=True)`), or hands back its pty's master side.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING
from cocon.api.client import APIError, Attachment, Client
from cocon.engine.errors import EngineError, StartFailed

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any

    from cocon.api.client import Progress
    from cocon.engine.engine import Engine
    from cocon.engine.logs import Entry
    from cocon.engine.supervisor import Supervisor


class _Errors:
    """Turns engine errors into APIError (a class, not contextlib: `cocon run` avoids that import)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, EngineError):
            raise APIError(
                str(exc), exc.status, exc.exit_code if isinstance(exc, StartFailed) else None
            ) from None


_errors = _Errors()


class LocalClient(Client):
    """The engine in this process (`root`, `run`: its state directories; default $COCON_ROOT and
    $COCON_RUN, else /var/lib/cocon and /run/cocon)."""

    def __init__(self, root: str | None = None, run: str | None = None, engine: Engine | None = None) -> None:
        if engine is None:
            from cocon.engine.engine import Engine

            engine = Engine(root, run)
        self.engine = engine
        self._devnull = -1

    # --- containers --------------------------------------------------------------------------------
    def container_create(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        with _errors:
            return self.engine.containers.create(config, name)

    def container_start(self, container: str, *, stdin: bool = False) -> Attachment:
        from cocon.isolation.base import Stdio

        if stdin:
            stdin_fd = 0
        else:
            if self._devnull < 0:
                self._devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            stdin_fd = self._devnull
        with _errors:
            pty = self.engine.containers.start(container, Stdio(stdin=stdin_fd, stdout=1, stderr=2))
        return Attachment(direct=pty < 0, fd=pty)

    def container_wait(self, container: str) -> dict[str, Any]:
        with _errors:
            return {"StatusCode": self.engine.containers.wait(container), "Error": None}

    def container_kill(self, container: str, signal: int) -> None:
        with _errors:
            self.engine.containers.kill(container, signal)

    def container_resize(self, container: str, height: int, width: int) -> None:
        with _errors:
            self.engine.containers.resize(container, height, width)

    def container_remove(self, container: str, *, force: bool = False, volumes: bool = False) -> str:
        with _errors:
            return self.supervisor.remove(container, force=force, volumes=volumes)  # detached ones too

    def container_list(self, *, all: bool = False) -> list[dict[str, Any]]:
        with _errors:
            return self.supervisor.ps(all=all)  # detached containers' state too

    def container_inspect(self, container: str) -> dict[str, Any]:
        with _errors:
            return self.supervisor.inspect(container)

    # --- detached containers (cocon.engine.supervisor) ---------------------------------------------
    @property
    def supervisor(self) -> Supervisor:
        return self.engine.supervisor

    def container_run_detached(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        with _errors:
            return self.supervisor.run(config, name)

    def container_start_detached(self, container: str) -> None:
        with _errors:
            self.supervisor.start(container)

    def container_stop(self, container: str, *, timeout: int | None = None) -> None:
        with _errors:
            self.supervisor.stop(container, timeout)

    def container_restart(self, container: str, *, timeout: int | None = None) -> None:
        with _errors:
            self.supervisor.restart(container, timeout)

    def container_wait_until(self, container: str, condition: str = "not-running") -> dict[str, Any]:
        with _errors:
            return {"StatusCode": self.supervisor.wait(container, condition), "Error": None}

    def container_logs(
        self,
        container: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        since: str | None = None,
        until: str | None = None,
        tail: int | None = None,
        timestamps: bool = False,
        follow: bool = False,
    ) -> Iterator[tuple[str, bytes]]:
        from cocon.engine import logs
        from cocon.engine.errors import InvalidRequest

        with _errors:
            try:
                since_t, until_t = logs.parse_since(since), logs.parse_since(until)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            rec, files = self.supervisor.log_files(container)
            sup = self.supervisor
            entries = logs.read_logs(
                files, stdout=stdout, stderr=stderr, since=since_t, until=until_t, tail=tail,
                follow=follow, running=lambda: sup.running(rec.id),
            )  # fmt: skip
        return _log_lines(entries, timestamps)

    def container_exec(
        self,
        container: str,
        cmd: Sequence[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        user: str | None = None,
        workdir: str | None = None,
        env: Sequence[str] = (),
    ) -> int:
        import subprocess

        with _errors:
            args = self.supervisor.exec_args(container, list(cmd), tty=tty, user=user, workdir=workdir,
                                             env=tuple(env))  # fmt: skip
        return subprocess.run(args, stdin=None if stdin or tty else subprocess.DEVNULL).returncode

    def container_start_attach(self, container: str, *, stdin: bool = False) -> int:
        from cocon.engine import attach

        socks: list[Any] = []

        def connect(rec: Any) -> None:
            socks.append(attach.connect(self.supervisor.attach_socket(rec.id), rec.name))

        with _errors:
            self.supervisor.start(container, on_created=connect)
        return self._relay_attached(container, socks[0], stdin)

    def container_attach(
        self, container: str, *, stdin: bool = True, detach_keys: bytes | None = None
    ) -> int:
        from cocon.engine import attach

        with _errors:
            rec = self.engine.instances.get(container)
            sock = attach.connect(self.supervisor.attach_socket(rec.id), rec.name)
        return self._relay_attached(container, sock, stdin, detach_keys)

    def _relay_attached(
        self, container: str, sock: Any, stdin: bool, detach_keys: bytes | None = None
    ) -> int:
        import sys

        from cocon.engine import attach

        with _errors:
            rec = self.engine.instances.get(container)
        tty = bool(rec.config["Create"].get("Tty"))
        restore = None
        if tty and stdin and os.isatty(0):
            import termios
            import tty as ttymod

            restore = termios.tcgetattr(0)
            ttymod.setraw(0)
            size = os.get_terminal_size(0)
            attach.resize(self.supervisor.bundle(rec.id), size.lines, size.columns)

        def out(stream: int, data: bytes) -> None:
            fd = 2 if stream == attach.STDERR else 1
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

        try:
            with _errors:
                keys = (detach_keys or attach.DETACH_KEYS) if tty else None
                ended = attach.relay(sock, out, 0 if stdin else -1, keys)
        finally:
            sock.close()
            if restore is not None:
                import termios

                termios.tcsetattr(0, termios.TCSADRAIN, restore)
        if not ended:
            sys.stderr.write("\nread escape sequence\n")
            return -1
        with _errors:
            return int(self.supervisor.wait(rec.id))

    def container_pause(self, container: str) -> None:
        with _errors:
            self.supervisor.pause(container)

    def container_unpause(self, container: str) -> None:
        with _errors:
            self.supervisor.unpause(container)

    def container_rename(self, container: str, name: str) -> None:
        with _errors:
            self.supervisor.rename(container, name)

    def container_top(self, container: str, ps_args: str | None = None) -> dict[str, Any]:
        with _errors:
            return self.supervisor.top(container, ps_args)

    def container_stats(self, container: str) -> dict[str, Any]:
        with _errors:
            return self.supervisor.stats(container)

    def container_copy_from(self, container: str, path: str, dest: str) -> None:
        with _errors:
            self.supervisor.copy(container, dest=dest, path=path)

    def container_copy_to(self, container: str, source: str, path: str) -> None:
        with _errors:
            self.supervisor.copy(container, src=source, path=path)

    def container_port(self, container: str) -> dict[str, Any]:
        from cocon.engine import netattach

        with _errors:
            rec = self.engine.instances.get(container)
            eps = netattach.live_endpoints(self.engine, [rec.id]).get(rec.id, [])
            ports: dict[str, Any] = netattach.settings(rec, eps, {})["Ports"]
            return ports

    # --- images ------------------------------------------------------------------------------------
    def image_list(self, *, all: bool = False, dangling: bool | None = None) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.imageops.image_list(all=all, dangling=dangling)

    def image_inspect(self, image: str) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_inspect(image)

    def image_history(self, image: str) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.imageops.image_history(image)

    def image_tag(self, source: str, target: str) -> None:
        with _errors:
            self.engine.imageops.image_tag(source, target)

    def image_remove(self, image: str, *, force: bool = False, noprune: bool = False) -> list[dict[str, str]]:
        with _errors:
            return self.engine.imageops.image_remove(image, force=force, prune=not noprune)

    def image_prune(self, *, all: bool = False) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_prune(all=all)

    def image_import(
        self,
        source: str,
        name: str | None = None,
        *,
        changes: Sequence[str] = (),
        message: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_import(
                source, name, changes=changes, message=message, progress=progress
            )

    def image_save(
        self,
        images: Sequence[str],
        dest: str,
        *,
        format: str = "oci-archive",
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_save(images, dest, format=format, progress=progress)

    def image_load(self, source: str, *, progress: Progress | None = None) -> list[dict[str, Any]]:
        with _errors:
            return self.engine.imageops.image_load(source, progress=progress)

    def image_bootstrap(
        self,
        what: str,
        *,
        mirror: str | None = None,
        tarball: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_bootstrap(
                what, mirror=mirror, tarball=tarball, progress=progress
            )

    def image_build(
        self,
        context: str,
        *,
        tags: Sequence[str] = (),
        dockerfile: str | None = None,
        build_args: dict[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        output: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.image_build(
                context,
                tags=tags,
                dockerfile=dockerfile,
                build_args=build_args,
                target=target,
                no_cache=no_cache,
                output=output,
            )

    # --- volumes -----------------------------------------------------------------------------------
    def volume_create(
        self,
        name: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        driver_opts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_create(name, labels, driver_opts)

    def volume_list(self) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_list()

    def volume_inspect(self, name: str) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_inspect(name)

    def volume_remove(self, name: str, *, force: bool = False) -> None:
        with _errors:
            self.engine.imageops.volume_remove(name, force=force)

    def volume_prune(self, *, all: bool = False) -> dict[str, Any]:
        with _errors:
            return self.engine.imageops.volume_prune(all=all)

    # --- networks (the daemon's route logic, cocon.api.docker.networks, in this process) -----------
    def _networks(self, fn: Any, *args: Any) -> Any:
        from cocon.api.docker.common import HTTPError

        try:
            with _errors:
                return fn(self.engine, *args)
        except HTTPError as exc:
            raise APIError(exc.message, exc.status) from None

    def network_create(self, config: dict[str, Any]) -> dict[str, Any]:
        from cocon.api.docker import networks

        result: dict[str, Any] = self._networks(networks.network_create, config)
        return result

    def network_list(self) -> list[dict[str, Any]]:
        from cocon.api.docker import networks

        result: list[dict[str, Any]] = self._networks(networks._list, {})
        return result

    def network_inspect(self, name: str) -> dict[str, Any]:
        from cocon.api.docker import networks

        result: dict[str, Any] = self._networks(networks.network_inspect, name)
        return result

    def network_remove(self, name: str) -> None:
        from cocon.api.docker import networks

        self._networks(networks.network_remove, name)

    def network_connect(
        self, name: str, container: str, *, aliases: Sequence[str] = (), ip: str | None = None,
        ip6: str | None = None,
    ) -> None:  # fmt: skip
        from cocon.api.docker import networks

        endpoint: dict[str, Any] = {"Aliases": list(aliases)}
        if ip or ip6:
            endpoint["IPAMConfig"] = {k: v for k, v in (("IPv4Address", ip), ("IPv6Address", ip6)) if v}
        self._networks(networks.network_connect, name, {"Container": container, "EndpointConfig": endpoint})

    def network_disconnect(self, name: str, container: str, *, force: bool = False) -> None:
        from cocon.api.docker import networks

        self._networks(networks.network_disconnect, name, {"Container": container, "Force": force})

    def vm_create(self, spec: dict[str, Any]) -> dict[str, Any]:
        from cocon.engine.vms import create_vm

        result: dict[str, Any] = self._networks(create_vm, spec)
        return result

    def vm_list(self, *, all: bool = True) -> list[dict[str, Any]]:
        from cocon.engine.vms import list_vms

        result: list[dict[str, Any]] = self._networks(lambda engine: list_vms(engine, all=all))
        return result

    def vm_remove(self, name: str, *, force: bool = False, delete_disk: bool = False) -> None:
        from cocon.engine.vms import remove_vm

        self._networks(lambda engine: remove_vm(engine, name, force=force, delete_disk=delete_disk))

    def vm_disk_attach(self, name: str, volume: str) -> dict[str, Any]:
        from cocon.engine.vms import attach_disk

        result: dict[str, Any] = self._networks(attach_disk, name, volume)
        return result

    def vm_disk_detach(self, name: str, volume: str) -> None:
        from cocon.engine.vms import detach_disk

        self._networks(detach_disk, name, volume)

    def vm_migrate(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        from cocon.engine.vm_migration import migrate_vm

        result: dict[str, Any] = self._networks(migrate_vm, name, spec)
        return result

    def vm_snapshots(self, name: str) -> list[dict[str, Any]]:
        from cocon.engine import vm_snapshots

        result: list[dict[str, Any]] = self._networks(vm_snapshots.list_snapshots, name)
        return result

    def vm_snapshot_create(self, name: str, snapshot: str, *, memory: bool = False) -> dict[str, Any]:
        from cocon.engine import vm_snapshots

        create = vm_snapshots.create_snapshot
        result: dict[str, Any] = self._networks(lambda engine: create(engine, name, snapshot, memory=memory))
        return result

    def vm_snapshot_restore(self, name: str, snapshot: str) -> dict[str, Any]:
        from cocon.engine import vm_snapshots

        result: dict[str, Any] = self._networks(vm_snapshots.restore_snapshot, name, snapshot)
        return result

    def vm_snapshot_remove(self, name: str, snapshot: str) -> None:
        from cocon.engine import vm_snapshots

        self._networks(vm_snapshots.remove_snapshot, name, snapshot)

    def network_policy_list(self, name: str) -> list[dict[str, Any]]:
        from cocon.engine import netattach

        result: list[dict[str, Any]] = self._networks(netattach.policy_list, name)
        return result

    def network_policy_add(
        self, name: str, source: str, ports: str = "", description: str = ""
    ) -> dict[str, Any]:
        from cocon.api.docker import networks

        doc = {"From": source, "Ports": ports, "Description": description}
        result: dict[str, Any] = self._networks(networks.policy_add, name, doc)
        return result

    def network_policy_remove(self, name: str, rule: str) -> dict[str, Any]:
        from cocon.api.docker import networks

        result: dict[str, Any] = self._networks(networks.policy_remove, name, rule)
        return result

    def system_reset(self) -> dict[str, Any]:
        from cocon.engine.system import reset

        with _errors:
            return reset(self.engine)

    def system_assets(self) -> dict[str, Any]:
        from cocon.engine.system import assets_info

        with _errors:
            return assets_info(self.engine)

    def system_assets_build(
        self, *, rebuild: bool = False, progress: Progress | None = None
    ) -> dict[str, Any]:
        from cocon.engine.system import assets_build

        with _errors:
            return assets_build(self.engine, rebuild=rebuild, progress=progress)

    def info(self) -> dict[str, Any]:
        import time

        from cocon.api.docker.system import info_doc

        with _errors:
            return info_doc(self.engine, time.time())

    def events(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        filters: dict[str, list[str]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        import time

        from cocon.engine import events as ev

        with _errors:
            flt = ev.EventFilter(filters or {})
            since_ns = ev.parse_time(since, "since") if since else None
            until_ns = ev.parse_time(until, "until") if until else None
            log = self.engine.events
            last = log.last_id()
        if since_ns is not None:
            with _errors:
                history = log.read(since_ns=since_ns, until_ns=until_ns)
            for event in history:
                last = max(last, event.id)
                if flt.matches(event):
                    yield event.to_docker(legacy=False)
        while until_ns is None or time.time_ns() <= until_ns:  # other processes write the log too
            wait = 0.2 if until_ns is None else min(0.2, (until_ns - time.time_ns()) / 1e9 + 0.01)
            time.sleep(max(wait, 0.01))
            with _errors:
                fresh = log.read(after_id=last, until_ns=until_ns)
            for event in fresh:
                last = max(last, event.id)
                if flt.matches(event):
                    yield event.to_docker(legacy=False)

    def close(self) -> None:
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1
        self.engine.close()


def _log_lines(entries: Iterator[Entry], timestamps: bool) -> Iterator[tuple[str, bytes]]:
    from cocon.engine.logs import docker_time

    for stream, t, stamp, line in entries:
        yield stream, (docker_time(t, stamp).encode() + b" " + line) if timestamps else line
