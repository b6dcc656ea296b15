"""Starting processes inside a container: the init of `create` and the processes of `exec`.

Both follow the same two-stage fork (as runc's nsexec does, in Python):

    runtime ──fork──▶ stage 1: join namespaces by path, unshare new ones (user first, so the
       │                       others belong to it; the runtime writes its id maps), set time
       │                       offsets, then fork again so the child is born in the new pid and
       │                       time namespaces, report that child's pid, and exit
       │                 └─fork─▶ stage 2: the container process (pid 1 of a new pid namespace)
       └── a SOCK_SEQPACKET socketpair carries the handshake, errors and the pty master fd.

Stage 1 moves itself into the container's cgroup before anything else, so every later process starts
inside the cgroup. Everything that runs in the container before execve is non-dumpable (set in
the runtime before the first fork and inherited), so processes in the container cannot open
/proc/PID/exe or /proc/PID/mem of the runtime's interpreter (the CVE-2019-5736 class).
"""

from __future__ import annotations

import _socket  # the C module: `socket` wraps it in enums, costly to import
import os
import sys

from cocon import _fastjson as json
from cocon import _linux as L
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    from _socket import socket as Socket
    from collections.abc import Callable
    from typing import Any

    from cocon.oci.runtime_spec import IDMapping, Process, Spec
    from cocon.runtime.cgroups import Cgroup
    from cocon.runtime.seccomp_bpf import CompiledFilter

_MAX_MSG = 65536


# --- the handshake channel ----------------------------------------------------------------------
def send(sock: Socket, kind: str, fds: list[int] | None = None, **payload: Any) -> None:
    data = json.dumps({"type": kind, **payload}).encode()
    if fds:
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)
        sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    else:
        sock.send(data)


def recv(sock: Socket, expect: str, what: str) -> tuple[dict[str, Any], list[int]]:
    """Receive one message; an error message or a closed channel becomes a RuntimeFailure."""
    try:
        data, ancillary, _, _ = sock.recvmsg(_MAX_MSG, _socket.CMSG_LEN(4 * 4))
    except OSError as exc:
        raise RuntimeFailure(f"{what}: lost contact with the container process: {exc.strerror}") from None
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(
                int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, len(payload) - 3, 4)
            )
    if not data:
        raise RuntimeFailure(f"{what}: the container process exited unexpectedly")
    msg: dict[str, Any] = json.loads(data)
    if msg["type"] == "error":
        for fd in fds:
            os.close(fd)
        raise RuntimeFailure(msg["message"])
    if msg["type"] != expect:
        raise RuntimeFailure(f"{what}: protocol error: expected {expect!r}, got {msg['type']!r}")
    return msg, fds


def _child_fail(sock: Socket, exc: BaseException) -> None:
    """Report an error from a child stage to the runtime, then exit the child."""
    if isinstance(exc, RuntimeFailure):
        message = str(exc)
    elif isinstance(exc, OSError):
        message = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        message = f"container setup failed: {message}"
    else:
        message = f"container setup failed: {type(exc).__name__}: {exc}"
    try:
        send(sock, "error", message=message)
    except OSError:
        print(f"cocon-runtime: {message}", file=sys.stderr)
    os._exit(1)


# --- namespaces -------------------------------------------------------------------------------
class NamespacePlan:
    """Which namespaces to create (clone flags) and which to join (type, path: user first, mount last)."""

    def __init__(self) -> None:
        self.new_flags = 0
        self.joins: list[tuple[str, str]] = []
        self.uid_mappings: list[IDMapping] = []
        self.gid_mappings: list[IDMapping] = []
        self.time_offsets: dict[str, tuple[int, int]] = {}

    @property
    def new_userns(self) -> bool:
        return bool(self.new_flags & L.CLONE_NEWUSER)

    @property
    def in_userns(self) -> bool:
        return self.new_userns or any(t == "user" for t, _ in self.joins)

    @property
    def needs_second_fork(self) -> bool:
        return bool(self.new_flags & (L.CLONE_NEWPID | L.CLONE_NEWTIME)) or any(
            t in ("pid", "time") for t, _ in self.joins
        )

    def has(self, ns_type: str) -> bool:
        return bool(self.new_flags & L.NAMESPACES[ns_type][0]) or any(t == ns_type for t, _ in self.joins)


_JOIN_ORDER = ("user", "ipc", "uts", "network", "pid", "cgroup", "time", "mount")


def plan_namespaces(spec: Spec) -> NamespacePlan:
    plan = NamespacePlan()
    linux = spec.linux
    assert linux is not None
    for ns in linux.namespaces or ():
        if ns.path:
            plan.joins.append((ns.type, ns.path))
        else:
            plan.new_flags |= L.NAMESPACES[ns.type][0]
    plan.joins.sort(key=lambda j: _JOIN_ORDER.index(j[0]))
    plan.uid_mappings = list(linux.uid_mappings or [])
    plan.gid_mappings = list(linux.gid_mappings or [])
    for clock, off in (linux.time_offsets or {}).items():
        plan.time_offsets[clock] = (off.secs, off.nanosecs)
    return plan


def plan_exec_namespaces(init_pid: int) -> NamespacePlan:
    """Join every namespace of the container's init that differs from ours."""
    plan = NamespacePlan()
    for ns_type in _JOIN_ORDER:
        proc_name = L.NAMESPACES[ns_type][1]
        theirs = f"/proc/{init_pid}/ns/{proc_name}"
        try:
            if os.stat(theirs).st_ino != os.stat(f"/proc/self/ns/{proc_name}").st_ino:
                plan.joins.append((ns_type, theirs))
        except FileNotFoundError:
            continue
    return plan


def _join_and_unshare(plan: NamespacePlan, sock: Socket) -> None:
    for ns_type, path in plan.joins:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise RuntimeFailure(
                f"linux.namespaces: cannot open {ns_type} namespace {path}: {exc.strerror}"
            ) from None
        try:
            L.setns(fd, L.NAMESPACES[ns_type][0])
        except OSError as exc:
            raise RuntimeFailure(
                f"linux.namespaces: cannot join {ns_type} namespace {path}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
    flags = plan.new_flags
    if flags & L.CLONE_NEWUSER:
        L.unshare(L.CLONE_NEWUSER)
        send(sock, "userns")
        recv(sock, "mapped", "user namespace")
        flags &= ~L.CLONE_NEWUSER
    if plan.in_userns:
        # become the namespace's root (the id maps must map 0), as runc does
        try:
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        except OSError:
            pass
    if flags:
        L.unshare(flags)
    if plan.time_offsets:
        with open("/proc/self/timens_offsets", "w") as f:
            for clock, (secs, nsecs) in plan.time_offsets.items():
                f.write(f"{clock} {secs} {nsecs}\n")


def write_id_maps(pid: int, plan: NamespacePlan) -> None:
    def fmt(maps: list[IDMapping]) -> str:
        return "".join(f"{m.container_id} {m.host_id} {m.size}\n" for m in maps)

    for name, maps in (("uid_map", plan.uid_mappings), ("gid_map", plan.gid_mappings)):
        try:
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(fmt(maps))
        except OSError as exc:
            field_name = "linux.uidMappings" if name == "uid_map" else "linux.gidMappings"
            raise RuntimeFailure(f"{field_name}: the kernel refused the mapping: {exc.strerror}") from None


def staged_fork(
    plan: NamespacePlan,
    enter_cgroup: Callable[[], None] | None,
    child_main: Callable[[Socket], None],
    what: str,
    preserve_fds: int = 0,
) -> tuple[int, Socket]:
    """Fork through stage 1 into the namespaces; return (pid of stage 2, runtime's socket).

    `enter_cgroup()` runs first in stage 1 (single-threaded, as `Cgroup.enter` needs), so that
    everything after starts inside the cgroup. `child_main` runs in stage 2 with the child's end of
    the socket and must never return. The runtime must have no other thread running.
    """
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    stage1 = os.fork()
    if stage1 == 0:  # stage 1
        ours.close()
        # Nothing of the runtime's reaches the container: not its lock on the state directory (a
        # flock lives as long as any copy of the fd), not fds inherited from our caller.
        keep = theirs.fileno()
        os.closerange(3 + preserve_fds, keep)
        os.closerange(keep + 1, 1 << 20)
        try:
            if enter_cgroup is not None:
                enter_cgroup()
            _join_and_unshare(plan, theirs)
            if plan.needs_second_fork:
                # Stage 2 shares the socket: it must not speak before stage 1 has reported its pid.
                reported_r, reported_w = os.pipe()
                stage2 = os.fork()
                if stage2 != 0:
                    send(theirs, "pid", pid=stage2)
                    os.close(reported_w)  # stage 2 goes on now, not once this process is torn down
                    os._exit(0)
                os.close(reported_w)
                os.read(reported_r, 1)
                os.close(reported_r)
            else:
                send(theirs, "pid", pid=os.getpid())
            child_main(theirs)
        except BaseException as exc:
            _child_fail(theirs, exc)
        os._exit(1)
    theirs.close()
    try:
        if plan.new_userns:
            recv(ours, "userns", what)
            write_id_maps(stage1, plan)
            send(ours, "mapped")
        msg, _ = recv(ours, "pid", what)
        pid = int(msg["pid"])
    except BaseException:
        _kill_and_reap(stage1)
        ours.close()
        raise
    if pid != stage1:
        os.waitpid(stage1, 0)
    return pid, ours


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# --- the container's init (stage 2 of create) ---------------------------------------------------
class InitConfig:
    """What the container's init needs; it is handed over by fork, not serialized."""

    def __init__(
        self,
        *,
        spec: Spec,
        bundle: str,
        rootfs: str,
        plan: NamespacePlan,
        cgroup: Cgroup | None,
        seccomp: CompiledFilter | None,
        preserve_fds: int = 0,
        new_keyring: bool = True,
        container_id: str = "",
    ) -> None:
        self.spec = spec
        self.bundle = bundle
        self.rootfs = rootfs
        self.plan = plan
        self.cgroup = cgroup
        self.seccomp = seccomp
        self.preserve_fds = preserve_fds
        self.new_keyring = new_keyring
        self.container_id = container_id


def _last_privileged_steps(proc: Process, seccomp: CompiledFilter | None, preserve_fds: int) -> str:
    """rlimits, oom_score_adj, user, capabilities, no_new_privs (and seccomp when it cannot wait);
    the preserved fds become inheritable. Returns the program to exec."""
    from cocon.runtime import process

    process.set_rlimits(proc.rlimits)
    process.set_oom_score_adj(proc.oom_score_adj)
    path = process.finalize(proc, seccomp)
    for fd in range(3, 3 + preserve_fds):
        try:
            os.set_inheritable(fd, True)
        except OSError:
            pass
    return path


def _report_ready(sock: Socket, master: int) -> None:
    """Tell the runtime we are ready (handing over the pty master, if any) and hang up."""
    send(sock, "ready", fds=[master] if master >= 0 else None)
    if master >= 0:
        os.close(master)
    sock.close()


def preload_init(proc: Process) -> None:
    """Import, before the fork, what the container's init needs once it has lost sight of the host's
    files."""
    from cocon.runtime import capabilities, hooks, rootfs  # noqa: F401

    if proc.terminal:
        from cocon.runtime import console  # noqa: F401


def init_main(cfg: InitConfig, sock: Socket) -> None:
    """Stage 2 of create: build the container around ourselves, wait for `start`, exec."""
    from cocon.runtime import hooks, process, rootfs

    spec = cfg.spec
    proc = spec.process
    linux = spec.linux
    assert proc is not None and linux is not None
    ready_sent = False
    try:
        os.setsid()
        if spec.hostname is not None and cfg.plan.has("uts"):
            L.sethostname(spec.hostname)
        if spec.domainname is not None and cfg.plan.has("uts"):
            L.setdomainname(spec.domainname)
        setup = rootfs.RootfsSetup(
            spec,
            cfg.rootfs,
            cfg.bundle,
            cfg.cgroup,
            userns=cfg.plan.in_userns,
            cgroupns=bool(cfg.plan.new_flags & L.CLONE_NEWCGROUP),
        )
        setup.prepare()
        send(sock, "mounted")
        # The runtime opens the exec FIFO for us: its directory may be closed to the container's
        # (mapped) root.
        msg, fds = recv(sock, "state", "create")
        fifo_fd = fds[0]
        hooks.run_hooks("createContainer", spec.hooks.create_container if spec.hooks else None, msg["state"])
        rootfs.pivot_root(cfg.rootfs)
        if linux.sysctl:
            rootfs.write_sysctls(linux.sysctl)
        master = -1
        if proc.terminal:
            from cocon.runtime import console

            master, slave, name = console.open_pty(proc.console_size)
            if setup.dev_is_tmpfs:
                setup.bind_console(name)
            console.make_controlling(slave)
        rootfs.mask_paths(linux.masked_paths or [])
        rootfs.readonly_paths(linux.readonly_paths or [])
        if spec.root and spec.root.readonly:
            rootfs.readonly_root()
        rootfs.finish_propagation(linux.rootfs_propagation)
        setup.close()
        if cfg.new_keyring:
            try:
                L.join_session_keyring(cfg.container_id)
            except OSError:
                pass  # keyrings may be unavailable (seccomp, old kernels): not fatal, as in runc
        path = _last_privileged_steps(proc, cfg.seccomp, cfg.preserve_fds)
        _report_ready(sock, master)
        ready_sent = True
        # Block until `start` opens the FIFO for reading.
        wfd = os.open(f"/proc/self/fd/{fifo_fd}", os.O_WRONLY | os.O_CLOEXEC)
        os.write(wfd, b"0")
        os.close(wfd)
        os.close(fifo_fd)
        if spec.hooks and spec.hooks.start_container:
            state = dict(msg["state"], status="created")
            hooks.run_hooks("startContainer", spec.hooks.start_container, state)
        process.reset_signals()
        process.load_late_seccomp(proc, cfg.seccomp)
        process.exec_process(path, proc)
    except BaseException as exc:
        if not ready_sent:
            _child_fail(sock, exc)
        print(f"cocon-runtime: {exc}", file=sys.stderr)
        os._exit(127)


# --- a process of `exec` (stage 2) --------------------------------------------------------------
class ExecConfig:
    def __init__(self, *, process: Process, seccomp: CompiledFilter | None, preserve_fds: int = 0) -> None:
        self.process = process
        self.seccomp = seccomp
        self.preserve_fds = preserve_fds


def exec_main(cfg: ExecConfig, sock: Socket) -> None:
    from cocon.runtime import process

    proc = cfg.process
    try:
        master = -1
        if proc.terminal:
            from cocon.runtime import console

            os.setsid()
            master, slave, _ = console.open_pty(proc.console_size)
            console.make_controlling(slave)
        path = _last_privileged_steps(proc, cfg.seccomp, cfg.preserve_fds)
        _report_ready(sock, master)
        process.reset_signals()
        process.load_late_seccomp(proc, cfg.seccomp)
        process.exec_process(path, proc)
    except BaseException as exc:
        _child_fail(sock, exc)
