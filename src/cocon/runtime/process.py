"""The last steps before a container process becomes the user's program, shared by init and exec.

Order matters and follows runc: rlimits and oom_score_adj while still privileged; then, with
no_new_privs, drop capabilities and switch user first and load seccomp last (so only the final
execve runs under the filter); without no_new_privs loading a filter needs CAP_SYS_ADMIN, so it is
loaded before capabilities are dropped.
"""

from __future__ import annotations

import _signal as signal  # the C module: `signal` wraps it in enums, costly to import
import os
import resource
import stat

from cocon import _linux as L
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    from collections.abc import Callable

    from cocon.oci.runtime_spec import Process, Rlimit
    from cocon.runtime.seccomp_bpf import CompiledFilter

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def preload(proc: Process) -> None:
    """Import, while the host's filesystem is still reachable, every module the container process
    needs after it has entered the container's mount namespace or pivoted into its rootfs."""
    from cocon.runtime import capabilities  # noqa: F401

    if proc.terminal:
        from cocon.runtime import console  # noqa: F401


def rlimit_number(name: str) -> int:
    value: int = getattr(resource, name)
    return value


def check_rlimits(rlimits: list[Rlimit] | None) -> None:
    """Refuse, before anything is made, an rlimit this process cannot grant.

    Raising a hard limit needs CAP_SYS_RESOURCE, which the host may withhold from cocon-runtime.
    """
    if not rlimits:
        return
    has_sys_resource = _has_capability(24)
    for i, rl in enumerate(rlimits):
        _, hard = resource.getrlimit(rlimit_number(rl.type))
        if hard != resource.RLIM_INFINITY and (rl.hard > hard or rl.hard < 0) and not has_sys_resource:
            raise RuntimeFailure(
                f"process.rlimits[{i}]: hard limit {rl.hard} for {rl.type} is above the current hard "
                f"limit {hard}, and this host does not let cocon-runtime raise it (no CAP_SYS_RESOURCE); "
                f"use at most {hard}"
            )


def _has_capability(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def set_rlimits(rlimits: list[Rlimit] | None) -> None:
    for rl in rlimits or ():
        try:
            resource.setrlimit(rlimit_number(rl.type), (rl.soft, rl.hard))
        except (ValueError, OSError) as exc:
            raise RuntimeFailure(
                f"process.rlimits: cannot set {rl.type} to {rl.soft}:{rl.hard}: {exc}"
            ) from None


def set_oom_score_adj(value: int | None) -> None:
    if value is None:
        return
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        raise RuntimeFailure(
            f"process.oomScoreAdj: cannot set {value}: {exc.strerror} (lowering it needs CAP_SYS_RESOURCE)"
        ) from None


def find_executable(arg0: str, env: list[str]) -> str:
    """Resolve args[0] with the container's PATH, as execvp would, but up front for a clear error."""
    if "/" in arg0:
        candidates = [arg0]
    else:
        path = next((e[5:] for e in env if e.startswith("PATH=")), DEFAULT_PATH)
        candidates = [os.path.join(d or ".", arg0) for d in path.split(":")]
    for c in candidates:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(c, os.X_OK):
            return c
    if "/" in arg0 and os.path.exists(arg0):
        raise RuntimeFailure(f"process.args[0]: {arg0!r} is not an executable file (permission denied)")
    raise RuntimeFailure(f"process.args[0]: {arg0!r}: executable file not found in $PATH")


def switch_user_fn(proc: Process) -> Callable[[], None]:
    user = proc.user

    def switch() -> None:
        try:
            os.setgroups(user.additional_gids or [])
            os.setgid(user.gid)
            os.setuid(user.uid)
        except OSError as exc:
            raise RuntimeFailure(
                f"process.user: cannot switch to uid {user.uid} gid {user.gid}: {exc.strerror} "
                "(is the id mapped in the container's user namespace?)"
            ) from None

    return switch


def finalize(proc: Process, seccomp: CompiledFilter | None) -> str:
    """Apply user, capabilities, no_new_privs and seccomp; return the program path to exec.

    Seccomp is loaded as late as the configuration allows: only `os.execve` runs after it when
    no_new_privs is set.
    """
    from cocon.runtime import capabilities

    env = proc.env or []
    caps = capabilities.resolve(proc.capabilities)
    if proc.user.umask is not None:
        os.umask(proc.user.umask)
    else:
        os.umask(0o022)
    if seccomp is not None and not proc.no_new_privileges:
        seccomp.load()
    capabilities.apply(caps, switch_user_fn(proc))
    os.environ.clear()
    try:
        os.chdir(proc.cwd)
    except FileNotFoundError:
        raise RuntimeFailure(f"process.cwd: {proc.cwd!r} does not exist in the container") from None
    except OSError as exc:
        raise RuntimeFailure(f"process.cwd: cannot enter {proc.cwd!r}: {exc.strerror}") from None
    assert proc.args
    path = find_executable(proc.args[0], env)
    if proc.no_new_privileges:
        L.prctl(L.PR_SET_NO_NEW_PRIVS, 1)
    return path


def load_late_seccomp(proc: Process, seccomp: CompiledFilter | None) -> None:
    """With no_new_privs the filter is loaded last, right before execve."""
    if seccomp is not None and proc.no_new_privileges:
        seccomp.load()


def reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; an ignored signal stays ignored across execve."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def exec_process(path: str, proc: Process) -> None:
    assert proc.args
    env = dict(e.split("=", 1) for e in proc.env or [])
    os.execve(path, proc.args, env)
