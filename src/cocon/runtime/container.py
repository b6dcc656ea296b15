"""Container lifecycle operations behind the cocon-runtime commands (runc's semantics).

create → created → start → running ⇄ paused → stopped → delete. Each operation takes the container's
lock, reads its state, checks the transition, and leaves nothing behind when it fails.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` wraps it in enums, costly to import
import errno
import os
import select
import time

from cocon import _linux as L
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import ContainerExists, ContainerNotFound, InvalidState, RuntimeFailure
from cocon.runtime.state import (
    ContainerState,
    StateDir,
    current_status,
    now_rfc3339,
    process_start_time,
    validate_id,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cocon.oci.runtime_spec import Hook, Linux, Process, Resources, Spec
    from cocon.runtime.cgroups import Cgroup
    from cocon.runtime.seccomp_bpf import CompiledFilter

DEFAULT_ROOT = "/run/cocon-runtime"
SECCOMP_CACHE = ".seccomp"  # under the root; not a valid container id, so never listed


class Runtime:
    def __init__(self, root: str = DEFAULT_ROOT) -> None:
        self.root = root

    # -- lookups ----------------------------------------------------------------------------
    def _dir(self, container_id: str) -> StateDir:
        validate_id(container_id)
        return StateDir(self.root, container_id)

    def _load(self, container_id: str) -> tuple[StateDir, int, ContainerState, str]:
        sd = self._dir(container_id)
        lock = sd.lock()
        try:
            state = sd.load()
        except BaseException:
            os.close(lock)
            raise
        return sd, lock, state, current_status(sd, state)

    def state(self, container_id: str) -> dict[str, Any]:
        _sd, lock, state, status = self._load(container_id)
        os.close(lock)
        return state.to_runc_state(status)

    def list_states(self) -> list[dict[str, Any]]:
        out = []
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                out.append(self.state(name))
            except RuntimeFailure:
                continue
        return out

    # -- create / start / run ---------------------------------------------------------------------
    def create(
        self,
        container_id: str,
        bundle: str,
        *,
        pid_file: str | None = None,
        console_socket: str | None = None,
        preserve_fds: int = 0,
        new_keyring: bool = True,
        foreground: bool = False,
    ) -> tuple[ContainerState, int]:
        """Create the container; return its state and the pty master (-1 without a terminal, or when
        it was handed to the console socket)."""
        from cocon.runtime.cgroups import start_attach_warm_up

        validate_id(container_id)
        # The kernel's wait on a process's first cgroup move (an RCU grace period) overlaps with
        # reading the config; the real move right after the fork is then fast.
        attach_warmed_up = start_attach_warm_up()
        try:
            return self._create(container_id, bundle, attach_warmed_up, pid_file=pid_file,
                                console_socket=console_socket, preserve_fds=preserve_fds,
                                new_keyring=new_keyring, foreground=foreground)  # fmt: skip
        finally:
            attach_warmed_up()

    def _create(
        self,
        container_id: str,
        bundle: str,
        attach_warmed_up: Callable[[], None],
        *,
        pid_file: str | None,
        console_socket: str | None,
        preserve_fds: int,
        new_keyring: bool,
        foreground: bool,
    ) -> tuple[ContainerState, int]:
        from cocon.oci.runtime_spec import load_config
        from cocon.runtime import process

        bundle = os.path.abspath(bundle)
        spec = load_config(os.path.join(bundle, "config.json"))
        proc = spec.process
        if proc is None:
            raise RuntimeFailure(f"{bundle}/config.json: process: is required to create a container")
        assert spec.root is not None
        rootfs = os.path.normpath(os.path.join(bundle, spec.root.path))
        if not os.path.isdir(rootfs):
            raise RuntimeFailure(f"root.path: rootfs {rootfs} does not exist or is not a directory")
        process.check_rlimits(proc.rlimits)
        if proc.terminal and console_socket is None and not foreground:
            raise RuntimeFailure(
                "process.terminal is true: pass --console-socket to receive the terminal (or set it false)"
            )
        if console_socket is not None and not proc.terminal:
            raise RuntimeFailure("--console-socket needs process.terminal: true in config.json")
        console_sock = None
        if console_socket is not None:
            from cocon.runtime import console

            console_sock = console.connect_console_socket(console_socket)
        sd = StateDir(self.root, container_id)
        try:
            sd.make()
        except FileExistsError:
            if console_sock:
                console_sock.close()
            raise ContainerExists(f"container {container_id!r} already exists; pick another id") from None
        lock = sd.lock()
        state = ContainerState(
            id=container_id,
            bundle=bundle,
            rootfs=rootfs,
            created=now_rfc3339(),
            owner=_user_name(os.getuid()),
            annotations=dict(spec.annotations or {}),
            creator_pid=os.getpid(),
        )
        cgroup: Cgroup | None = None
        init_pid = 0
        try:
            sd.save(state)
            with open(os.path.join(bundle, "config.json"), "rb") as src, open(sd.config_copy, "wb") as dst:
                dst.write(src.read())
            master, init_pid, cgroup = self._spawn_init(
                spec, sd, state, bundle, rootfs, preserve_fds, new_keyring, attach_warmed_up
            )
            if master >= 0 and console_sock is not None:
                from cocon.runtime import console

                console.send_console(console_sock, master, "/dev/ptmx")
                os.close(master)
                master = -1
            state.status = "created"
            sd.save(state)
            if pid_file:
                _write_pid_file(pid_file, init_pid)
        except BaseException:
            _destroy(init_pid, cgroup)
            sd.remove()
            raise
        finally:
            if console_sock:
                console_sock.close()
            os.close(lock)
        return state, master

    def _spawn_init(
        self,
        spec: Spec,
        sd: StateDir,
        state: ContainerState,
        bundle: str,
        rootfs: str,
        preserve_fds: int,
        new_keyring: bool,
        attach_warmed_up: Callable[[], None],
    ) -> tuple[int, int, Cgroup | None]:
        from cocon.runtime import hooks, spawn
        from cocon.runtime.cgroups import open_cgroup

        linux = spec.linux
        proc = spec.process
        assert linux is not None and proc is not None
        cgroup = open_cgroup(linux.cgroups_path, state.id)
        state.cgroup = cgroup.to_state()
        init_pid = 0
        try:
            try:
                # What needs no cgroup comes first: while the warm-up waits, it holds the kernel's
                # cgroup mutex, which making the cgroup needs.
                seccomp = self._compiled_seccomp(spec)
                spawn.preload_init(proc)
                cgroup.create(with_default_device_rules(linux))
            finally:
                attach_warmed_up()  # no other thread may run when we fork
            old_umask = os.umask(0)
            try:
                os.mkfifo(sd.fifo, 0o622)
            finally:
                os.umask(old_umask)
            plan = spawn.plan_namespaces(spec)
            cfg = spawn.InitConfig(
                spec=spec,
                bundle=bundle,
                rootfs=rootfs,
                plan=plan,
                cgroup=cgroup,
                seccomp=seccomp,
                preserve_fds=preserve_fds,
                new_keyring=new_keyring,
                container_id=state.id,
            )
            L.prctl(L.PR_SET_DUMPABLE, 0)
            init_pid, sock = spawn.staged_fork(
                plan,
                cgroup.enter,
                lambda sock: spawn.init_main(cfg, sock),
                "create",
                preserve_fds,
            )
            try:
                spawn.recv(sock, "mounted", "create")
                state.pid = init_pid
                state.pid_start_time = process_start_time(init_pid) or 0
                oci_state = state.to_oci("creating")
                oci_state["pid"] = init_pid
                if spec.hooks:
                    hooks.run_hooks("prestart", spec.hooks.prestart, oci_state)
                    hooks.run_hooks("createRuntime", spec.hooks.create_runtime, oci_state)
                fifo_fd = os.open(sd.fifo, os.O_PATH | os.O_CLOEXEC)
                try:
                    spawn.send(sock, "state", fds=[fifo_fd], state=oci_state)
                finally:
                    os.close(fifo_fd)
                _, fds = spawn.recv(sock, "ready", "create")
            finally:
                sock.close()
            return (fds[0] if fds else -1), init_pid, cgroup
        except BaseException:
            _destroy(init_pid, cgroup)
            raise

    def _compiled_seccomp(self, spec: Spec) -> CompiledFilter | None:
        if spec.linux is None or spec.linux.seccomp is None:
            return None
        from cocon.runtime.seccomp_bpf import compiled_filter

        return compiled_filter(spec.linux.seccomp, os.path.join(self.root, SECCOMP_CACHE))

    def start(self, container_id: str) -> None:
        sd, lock, state, status = self._load(container_id)
        try:
            if status != "created":
                raise InvalidState(
                    f"cannot start container {container_id!r}: it is {status}; only a created container "
                    "can be started"
                )
            self._start(sd, state)
        finally:
            os.close(lock)

    def _start(self, sd: StateDir, state: ContainerState) -> None:
        """Let a created container's init exec the user's process (lock held, state checked)."""
        from cocon.runtime import hooks

        _release_init(sd.fifo, state.pid)
        os.unlink(sd.fifo)
        state.status = "running"
        sd.save(state)
        poststart = _hooks_of(sd, "poststart")
        if poststart:
            hooks.run_hooks("poststart", poststart, state.to_oci("running"), fatal=False)

    def run(
        self,
        container_id: str,
        bundle: str,
        *,
        detach: bool = False,
        keep: bool = False,
        pid_file: str | None = None,
        console_socket: str | None = None,
        preserve_fds: int = 0,
        new_keyring: bool = True,
    ) -> int:
        """create + start; in the foreground, wait and return the exit status (128+N for signal N)."""
        if not detach:
            L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
        state, master = self.create(
            container_id,
            bundle,
            pid_file=pid_file,
            console_socket=console_socket,
            preserve_fds=preserve_fds,
            new_keyring=new_keyring,
            foreground=not detach,
        )
        sd = StateDir(self.root, container_id)
        if detach:
            self._locked(sd, lambda: self._start(sd, state))
            return 0
        forward = _forward_signals(state.pid)
        try:
            self._locked(sd, lambda: self._start(sd, state))
            if master >= 0:
                from cocon.runtime import console

                console.relay(master)
            status = _wait_child(state.pid)
        except BaseException:
            self.delete(container_id, force=True)
            raise
        finally:
            _restore_signals(forward)
            if master >= 0:
                os.close(master)
        if not keep:
            # the init was our child and is reaped: the container is stopped
            try:
                self._locked(sd, lambda: self._delete(sd, state, "stopped"))
            except ContainerNotFound:
                pass  # deleted by someone else meanwhile
        return status

    @staticmethod
    def _locked(sd: StateDir, action: Callable[[], None]) -> None:
        lock = sd.lock()
        try:
            action()
        finally:
            os.close(lock)

    # -- signals and pause ------------------------------------------------------------------------
    def kill(self, container_id: str, sig: int, all_processes: bool = False) -> None:
        _sd, lock, state, status = self._load(container_id)
        try:
            if status == "stopped" and not all_processes:
                raise InvalidState(f"cannot kill container {container_id!r}: it is not running")
            if all_processes:
                _cgroup(state).kill_all(sig)
            else:
                os.kill(state.pid, sig)
        except ProcessLookupError:
            raise InvalidState(f"cannot kill container {container_id!r}: it is not running") from None
        finally:
            os.close(lock)

    def pause(self, container_id: str) -> None:
        _sd, lock, state, status = self._load(container_id)
        try:
            if status != "running":
                raise InvalidState(f"cannot pause container {container_id!r}: it is {status}, not running")
            _cgroup(state).freeze()
        finally:
            os.close(lock)

    def resume(self, container_id: str) -> None:
        _sd, lock, state, status = self._load(container_id)
        try:
            if status != "paused":
                raise InvalidState(f"cannot resume container {container_id!r}: it is {status}, not paused")
            _cgroup(state).thaw()
        finally:
            os.close(lock)

    def pids(self, container_id: str) -> list[int]:
        _sd, lock, state, _status = self._load(container_id)
        try:
            return sorted(_cgroup(state).pids()) if state.cgroup else []
        finally:
            os.close(lock)

    # -- delete --------------------------------------------------------------------------------
    def delete(self, container_id: str, force: bool = False) -> None:
        try:
            sd, lock, state, status = self._load(container_id)
        except ContainerNotFound:
            if force:
                return
            raise
        try:
            if status in ("running", "paused", "creating") and not force:
                raise InvalidState(
                    f"cannot delete container {container_id!r}: it is {status}; stop it first (kill) or "
                    "use delete --force"
                )
            self._delete(sd, state, status)
        finally:
            os.close(lock)

    def _delete(self, sd: StateDir, state: ContainerState, status: str) -> None:
        """Kill what is left, remove the cgroup, run poststop hooks, forget the container."""
        from cocon.runtime import hooks

        cgroup = _cgroup(state) if state.cgroup else None
        if status == "paused" and cgroup is not None:
            cgroup.thaw()
        _destroy(state.pid if status != "stopped" else 0, cgroup, state.pid_start_time)
        poststop = _hooks_of(sd, "poststop")
        if poststop:
            hooks.run_hooks("poststop", poststop, state.to_oci("stopped"), fatal=False)
        sd.remove()

    # -- exec ----------------------------------------------------------------------------------
    def load_spec(self, container_id: str) -> Spec:
        from cocon.oci.runtime_spec import load_config

        return load_config(self._dir(container_id).config_copy)

    def exec(
        self,
        container_id: str,
        proc: Process,
        *,
        detach: bool = False,
        pid_file: str | None = None,
        console_socket: str | None = None,
        preserve_fds: int = 0,
    ) -> int:
        from cocon.runtime.cgroups import start_attach_warm_up

        # As in create: the first cgroup move's grace period overlaps with reading state and config.
        attach_warmed_up = start_attach_warm_up()
        try:
            pid, master = self._exec(container_id, proc, attach_warmed_up, detach=detach, pid_file=pid_file,
                                     console_socket=console_socket, preserve_fds=preserve_fds)  # fmt: skip
        finally:
            attach_warmed_up()
        if detach:
            return 0
        forward = _forward_signals(pid)
        try:
            if master >= 0:
                from cocon.runtime import console

                console.relay(master)
                os.close(master)
            return _wait_child(pid)
        finally:
            _restore_signals(forward)

    def _exec(
        self,
        container_id: str,
        proc: Process,
        attach_warmed_up: Callable[[], None],
        *,
        detach: bool,
        pid_file: str | None,
        console_socket: str | None,
        preserve_fds: int,
    ) -> tuple[int, int]:
        """Start the process of `exec`; return its pid and its pty master (-1 if none or handed over)."""
        from cocon.runtime import process, spawn

        _sd, lock, state, status = self._load(container_id)
        try:
            if status not in ("running", "created"):
                raise InvalidState(f"cannot exec in container {container_id!r}: it is {status}")
            spec = self.load_spec(container_id)
            process.check_rlimits(proc.rlimits)
            if proc.terminal and console_socket is None and detach:
                raise RuntimeFailure("--tty with --detach needs --console-socket to receive the terminal")
            console_sock = None
            if console_socket is not None:
                from cocon.runtime import console

                console_sock = console.connect_console_socket(console_socket)
            plan = spawn.plan_exec_namespaces(state.pid)
            cfg = spawn.ExecConfig(
                process=proc,
                seccomp=self._compiled_seccomp(spec),
                preserve_fds=preserve_fds,
            )
            process.preload(proc)
            if not detach:
                L.prctl(L.PR_SET_CHILD_SUBREAPER, 1)
            L.prctl(L.PR_SET_DUMPABLE, 0)
            cgroup = _cgroup(state) if state.cgroup else None
            attach_warmed_up()  # no other thread may run when we fork
            pid, sock = spawn.staged_fork(
                plan,
                cgroup.enter if cgroup is not None else None,
                lambda sock: spawn.exec_main(cfg, sock),
                "exec",
                preserve_fds,
            )
            try:
                _, fds = spawn.recv(sock, "ready", "exec")
            except BaseException:
                _kill_wait(pid)
                raise
            finally:
                sock.close()
            master = fds[0] if fds else -1
            if master >= 0 and console_sock is not None:
                from cocon.runtime import console

                console.send_console(console_sock, master, "/dev/ptmx")
                os.close(master)
                master = -1
            if console_sock is not None:
                console_sock.close()
            if pid_file:
                _write_pid_file(pid_file, pid)
        finally:
            os.close(lock)
        return pid, master


# --- helpers ------------------------------------------------------------------------------------
def _hooks_of(sd: StateDir, kind: str) -> list[Hook] | None:
    """The container's hooks of one kind; the saved config is only decoded when it has any."""
    from cocon.oci.errors import ConfigError
    from cocon.oci.runtime_spec import parse_config

    try:
        with open(sd.config_copy, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if f'"{kind}"'.encode() not in data:
        return None
    try:
        spec = parse_config(data, sd.config_copy)
    except ConfigError:
        return None
    hooks: list[Hook] | None = getattr(spec.hooks, kind, None) if spec.hooks else None
    return hooks


# Devices every container may use, allowed after the config's own rules (as runc does): the
# default /dev nodes, ptys, and /dev/console.
_DEFAULT_ALLOWED_DEVICES = (("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9), ("c", 5, 0),
                            ("c", 5, 1), ("c", 5, 2), ("c", 136, None))  # fmt: skip


def with_default_device_rules(linux: Linux) -> Resources | None:
    """The config's resources with the default devices and `linux.devices` allowed, when the config
    restricts devices at all."""
    from cocon.oci.jsonobj import replace
    from cocon.oci.runtime_spec import DeviceCgroup

    res = linux.resources
    if res is None or res.devices is None:
        return res
    extra = [
        DeviceCgroup(allow=True, type=t, major=ma, minor=mi, access="rwm")
        for t, ma, mi in _DEFAULT_ALLOWED_DEVICES
    ]
    for d in linux.devices or ():
        if d.type in ("c", "b", "u"):
            extra.append(DeviceCgroup(allow=True, type="b" if d.type == "b" else "c", major=d.major,
                                      minor=d.minor, access="rwm"))  # fmt: skip
    updated: Resources = replace(res, devices=[*res.devices, *extra])
    return updated


def _cgroup(state: ContainerState) -> Cgroup:
    from cocon.runtime.cgroups import cgroup_from_state

    return cgroup_from_state(state.cgroup)


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _write_pid_file(path: str, pid: int) -> None:
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(str(pid))
    os.rename(tmp, path)


def _release_init(fifo: str, init_pid: int) -> None:
    """Open the exec FIFO for reading, which lets the init's blocked open() go on, and read its byte.

    The pidfd is taken first, while the init is still blocked in its open(): once the FIFO is open the
    init writes its byte and execs the user's process, which may exit and be reaped by its parent
    (conmon) at once, so a pidfd_open after that fails with ESRCH although the start worked."""
    try:
        pidfd = os.pidfd_open(init_pid)
    except ProcessLookupError:
        raise RuntimeFailure("the container's init exited before it could be started") from None
    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        os.close(pidfd)
        raise
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if fd in events and os.read(fd, 1) == b"0":
                return
            if pidfd in events or (fd in events and events[fd] & select.POLLHUP):
                raise RuntimeFailure("the container's init exited before it could be started")
    finally:
        os.close(fd)
        os.close(pidfd)


def _wait_gone(pid: int, start_time: int, timeout: float = 10.0) -> None:
    """Wait for process `pid`, started at `start_time`, to exit (and reap it if it is our child)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if process_start_time(pid) != start_time:
            return  # gone already: a zombie, or the pid is another process's now
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)  # readable once the process has exited
        if not poller.poll(int(timeout * 1000)):
            raise RuntimeFailure(f"process {pid} did not exit after SIGKILL")
    finally:
        os.close(pidfd)
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill_wait(pid: int) -> None:
    start = process_start_time(pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if start is not None:
        _wait_gone(pid, start)


def _destroy(init_pid: int, cgroup: Cgroup | None, start_time: int | None = None) -> None:
    """Kill the container's processes and remove its cgroup; tolerant of parts already gone."""
    if init_pid > 0:
        st = process_start_time(init_pid)
        if st is not None and (start_time is None or start_time == 0 or st == start_time):
            try:
                os.kill(init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(init_pid, st)
    if cgroup is not None:
        from cocon.runtime.cgroups import leave_prejoined

        leave_prejoined()  # a runtime that joined the cgroup ahead (create --await) is not its process
        # Nothing is left in the cgroup once the init is gone, as a rule (a pid namespace dies with
        # its init): removing it first spares scanning every hierarchy for processes.
        if cgroup.destroy_if_empty():
            return
        try:
            for _ in range(100):
                pids = cgroup.pids()
                if not pids:
                    break
                cgroup.kill_all(signal.SIGKILL)
                for pid in pids:
                    try:
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                time.sleep(0.005)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        cgroup.destroy()


def _wait_child(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 255
        if os.WIFEXITED(status):
            return os.WEXITSTATUS(status)
        if os.WIFSIGNALED(status):
            return 128 + os.WTERMSIG(status)


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def _forward_signals(pid: int) -> dict[int, Any]:
    def forward(sig: int, _frame: object) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    return {sig: signal.signal(sig, forward) for sig in _FORWARDED}


def _restore_signals(saved: dict[int, Any]) -> None:
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def parse_signal(value: str) -> int:
    """`KILL`, `SIGKILL` or `9`."""
    if value.isdigit():
        num = int(value)
        if 0 < num < signal.NSIG:
            return num
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal, name, None) if not name.startswith("SIG_") else None
        if isinstance(sig, int):
            return sig
    raise RuntimeFailure(f"unknown signal {value!r}: use a name like TERM or SIGKILL, or a number")
