"""The `container` isolation level: the instance's process in Linux namespaces and cgroups on the host
kernel, run by cocon's runtime (`cocon.runtime.container.Runtime`) in-process.

The runtime config comes from `cocon.isolation.spec` (Docker's merge of image and `docker run`
flags, Docker's capabilities, seccomp profile, masked and read-only paths, no_new_privs), built for
each instance: the root path, the command, the hostname, the cgroup path and the mounts after
Docker's defaults (volumes, binds, tmpfs) come from the `InstanceConfig`.

The runtime reads the config from `<state_dir>/config.json` (a bundle directory). It forks the
container's init from this process: the init inherits the `Stdio` fds as its stdin/stdout/stderr
(without a terminal), or gets a pty whose master comes back in the `Handle`. This process is a child
subreaper while `create` runs, so that the init becomes its child and `wait` can reap it.
"""

from __future__ import annotations

import os

from cocon import _fastjson
from cocon import _linux as L
from cocon._typing import TYPE_CHECKING
from cocon.isolation.base import Handle, IsolationError

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cocon.isolation.base import InstanceConfig, Stdio
    from cocon.runtime.container import Runtime


def exit_code_for(message: str) -> int:
    """Docker's mapping of a start error to `docker run`'s exit status."""
    if "executable file not found" in message or "no such file or directory" in message.lower():
        return 127
    if "permission denied" in message.lower() or "is a directory" in message.lower():
        return 126
    return 125


class ContainerDriver:
    """Containers on the host kernel; `runtime_root` holds the runtime's state (in `$COCON_RUN`)."""

    isolation = "container"

    def __init__(self, runtime_root: str) -> None:
        self.runtime_root = runtime_root
        self._runtime: Runtime | None = None
        self._warm: Callable[[], None] | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            from cocon.runtime.container import Runtime

            self._runtime = Runtime(self.runtime_root)
        return self._runtime

    # --- the runtime config ----------------------------------------------------------------------
    def config_for(self, cfg: InstanceConfig) -> dict[str, Any]:
        """The runtime config (runtime-spec JSON as a dict) of one instance."""
        from cocon.isolation.spec import (
            ContainerRequest,
            ProcessRequest,
            SpecError,
            container_spec,
            process_from_image,
        )
        from cocon.oci.errors import OCIError
        from cocon.oci.image_spec import parse_image_config
        from cocon.oci.jsonobj import to_builtins
        from cocon.oci.runtime_spec import Mount

        p = cfg.process
        try:
            image = parse_image_config(cfg.image_config, f"config of image {cfg.image_id}").config
            proc = process_from_image(
                image,
                ProcessRequest(
                    command=p.get("Cmd"),
                    entrypoint=p.get("Entrypoint"),
                    env=list(p.get("Env") or []),
                    workdir=p.get("WorkingDir") or None,
                    user=p.get("User"),
                ),
            )
            request = ContainerRequest(
                hostname=cfg.hostname,
                terminal=cfg.terminal,
                read_only=cfg.read_only,
                mounts=[
                    Mount(
                        destination=m["destination"],
                        type=m.get("type"),
                        source=m.get("source"),
                        options=m.get("options"),
                    )
                    for m in cfg.mounts
                ],
                cap_add=list(cfg.cap_add),
                cap_drop=list(cfg.cap_drop),
                seccomp=cfg.seccomp,
                memory=cfg.memory,
                memory_swap=cfg.memory_swap,
                cpus=cfg.cpus,
                pids_limit=cfg.pids_limit,
                network=cfg.network,
                cgroups_path=cfg.cgroups_path,
            )
            doc: dict[str, Any] = to_builtins(container_spec(cfg.rootfs, proc, request))
        except SpecError as exc:
            raise IsolationError(str(exc)) from None
        except OCIError as exc:
            raise IsolationError(f"image {cfg.image_id}: {exc}") from None
        return doc

    # --- life cycle ------------------------------------------------------------------------------
    def warm_up(self) -> None:
        """The runtime's cgroup warm-up (cocon.runtime.cgroups.start_attach_warm_up): on a host with a
        cgroup2 hierarchy the first move of a process between cgroups waits for an RCU grace period
        (~8 ms); started here, it overlaps with the engine's work before `create`, which uses it."""
        if self._warm is None:
            from cocon.runtime.cgroups import start_attach_warm_up

            self._warm = start_attach_warm_up(early=True)

    def settle(self) -> None:
        """Wait for the warm-up's thread (needed before any fork, and to release its file)."""
        if self._warm is not None:
            warm, self._warm = self._warm, None
            warm()

    def create(self, cfg: InstanceConfig, stdio: Stdio) -> Handle:
        from cocon.runtime.errors import RuntimeFailure

        doc = self.config_for(cfg)
        make_workdir(cfg.rootfs, doc["process"].get("cwd") or "/")
        try:
            os.makedirs(cfg.state_dir, 0o700, exist_ok=True)
            with open(os.path.join(cfg.state_dir, "config.json"), "w") as f:
                f.write(_fastjson.dumps(doc))
        except OSError as exc:
            raise IsolationError(
                f"cannot write the container's config in {cfg.state_dir}: {exc.strerror}"
            ) from None
        # The runtime forks twice; the container's init becomes this process's child (so that `wait`
        # can reap it) only if this process is a child subreaper when the first fork exits. Only then:
        # a process that stays a subreaper inherits every orphan of its descendants and must reap them.
        L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
        saved = _redirect_stdio(stdio) if not cfg.terminal else []
        try:
            state, master = self.runtime.create(cfg.id, cfg.state_dir, foreground=True)  # uses the warm-up
        except RuntimeFailure as exc:
            message = str(exc)
            raise IsolationError(message, exit_code_for(message)) from None
        finally:
            L.prctl(L.PR_SET_CHILD_SUBREAPER, 0)
            _restore_stdio(saved)
            self.settle()
        return Handle(id=cfg.id, pid=state.pid, pty=master)

    def start(self, handle: Handle) -> None:
        from cocon.runtime.errors import RuntimeFailure

        try:
            self.runtime.start(handle.id)
        except RuntimeFailure as exc:
            message = str(exc)
            raise IsolationError(message, exit_code_for(message)) from None

    def wait(self, handle: Handle) -> int:
        while True:
            try:
                _, status = os.waitpid(handle.pid, 0)
            except ChildProcessError:
                return 255  # reaped elsewhere: the status is lost
            if os.WIFEXITED(status):
                return os.WEXITSTATUS(status)
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)

    def signal(self, instance_id: str, sig: int) -> None:
        from cocon.runtime.errors import ContainerNotFound, InvalidState, RuntimeFailure

        try:
            self.runtime.kill(instance_id, sig)
        except (ContainerNotFound, InvalidState):
            return  # already gone: nothing to signal
        except RuntimeFailure as exc:
            raise IsolationError(str(exc)) from None

    def resize(self, handle: Handle, rows: int, cols: int) -> None:
        if handle.pty < 0:
            return
        import fcntl
        import struct
        import termios

        try:
            fcntl.ioctl(handle.pty, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        except OSError:
            pass  # the terminal is gone with the container

    def state(self, instance_id: str) -> str:
        from cocon.runtime.errors import RuntimeFailure

        try:
            return str(self.runtime.state(instance_id)["status"])
        except RuntimeFailure:
            return "unknown"

    def delete(self, instance_id: str, *, force: bool = False) -> None:
        from cocon.runtime.errors import ContainerNotFound, RuntimeFailure

        try:
            self.runtime.delete(instance_id, force=force)
        except ContainerNotFound:
            return
        except RuntimeFailure as exc:
            raise IsolationError(str(exc)) from None


def _redirect_stdio(stdio: Stdio) -> list[tuple[int, int]]:
    """Make fds 0-2 the requested ones for the fork; returns what to restore."""
    saved: list[tuple[int, int]] = []
    for target, fd in ((0, stdio.stdin), (1, stdio.stdout), (2, stdio.stderr)):
        if fd == target:
            continue
        try:
            backup = os.dup(target)
        except OSError:
            backup = -1
        os.dup2(fd, target)
        saved.append((target, backup))
    return saved


def _restore_stdio(saved: list[tuple[int, int]]) -> None:
    for target, backup in saved:
        if backup >= 0:
            os.dup2(backup, target)
            os.close(backup)
        else:
            os.close(target)


def make_workdir(rootfs: str, cwd: str) -> None:
    """Create the process's working directory in the rootfs if it is missing (as Docker does), root
    owned, mode 0755; resolved inside the rootfs, so a symlink in the image cannot lead out of it."""
    if cwd in ("", "/"):
        return
    try:
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise IsolationError(f"the root filesystem {rootfs} is not there: {exc.strerror}") from None
    try:
        try:
            fd = L.openat2(
                root_fd, cwd, os.O_PATH | os.O_CLOEXEC, L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS
            )
            os.close(fd)
            return
        except OSError:
            pass
        resolve = L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS
        parts = [p for p in cwd.split("/") if p and p != "."]
        if ".." in parts:
            raise IsolationError(f"the working directory {cwd!r} must not contain '..'")
        try:
            for n in range(1, len(parts) + 1):
                prefix = "/" + "/".join(parts[:n])
                try:
                    os.close(L.openat2(root_fd, prefix, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, resolve))
                    continue
                except FileNotFoundError:
                    pass
                parent = L.openat2(
                    root_fd,
                    "/" + "/".join(parts[: n - 1]),
                    os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                    resolve,
                )
                try:
                    os.mkdir(parts[n - 1], 0o755, dir_fd=parent)
                except FileExistsError:
                    pass
                finally:
                    os.close(parent)
        except OSError as exc:
            raise IsolationError(
                f"cannot create the working directory {cwd} in the container: {exc.strerror}"
            ) from None
    finally:
        os.close(root_fd)
