"""Container cgroups: v1, hybrid (v1 + an empty cgroup2 "unified" mount) and v2 behind one interface.

`open_cgroup(linux.cgroupsPath, id)` finds the hierarchies from /proc/self/mountinfo and returns a
`CgroupV1` (v1 and hybrid) or a `CgroupV2`; `create(resources)` makes the directories and applies
`linux.resources`. See docs/cgroups.md for how paths and resources map to files.

Imports stay cheap: the drivers are imported when a cgroup is opened.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING, record

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from cocon.oci.runtime_spec import Resources

__all__ = [
    "Cgroup",
    "CgroupStats",
    "cgroup_from_state",
    "cgroup_mode",
    "open_cgroup",
]


@record
class CgroupStats:
    """Usage numbers of a cgroup; None where the kernel does not report it (or the limit is unlimited)."""

    cpu_usage_ns: int | None = None
    memory_usage: int | None = None
    memory_limit: int | None = None
    memory_max_usage: int | None = None
    oom_kills: int | None = None
    pids_current: int | None = None
    pids_limit: int | None = None
    blkio_read_bytes: int | None = None
    blkio_write_bytes: int | None = None


if TYPE_CHECKING:
    from typing import Literal, Protocol

    class Cgroup(Protocol):
        """A container's cgroup in every hierarchy. Implemented by CgroupV1 and CgroupV2."""

        version: int
        path: str

        def create(self, resources: Resources | None) -> None: ...
        def apply(self, resources: Resources | None) -> None: ...
        def add(self, pid: int) -> None: ...
        def enter(self) -> None: ...
        def pids(self) -> list[int]: ...
        def freeze(self) -> None: ...
        def thaw(self) -> None: ...
        def frozen(self) -> bool: ...
        def kill_all(self, sig: int) -> None: ...
        def destroy_if_empty(self) -> bool: ...
        def destroy(self) -> None: ...
        def stats(self) -> CgroupStats: ...
        def container_mounts(self) -> list[tuple[str, str]]: ...
        def hierarchies(self) -> list[tuple[str, str]]: ...
        def to_state(self) -> dict[str, object]: ...


def cgroup_mode() -> Literal["v1", "hybrid", "v2"]:
    """How cgroups are mounted here: "v1", "hybrid" (v1 controllers plus a cgroup2 mount) or "v2"."""
    from cocon.runtime.cgroups.mountinfo import read_cgroup_mounts

    return read_cgroup_mounts().mode


def open_cgroup(cgroups_path: str | None, container_id: str) -> Cgroup:
    """The cgroup for `linux.cgroupsPath` (None: "/cocon/<id>") in this host's hierarchies.

    Absolute and relative paths are both relative to the root of each hierarchy. Nothing is created
    until `create`.
    """
    from cocon.runtime.cgroups.common import resolve_path
    from cocon.runtime.cgroups.mountinfo import read_cgroup_mounts

    path = resolve_path(cgroups_path, container_id)
    mounts = read_cgroup_mounts()
    if mounts.mode == "v2":
        from cocon.runtime.cgroups.v2 import CgroupV2

        assert mounts.unified is not None
        return CgroupV2(path, mounts.unified)
    from cocon.runtime.cgroups.v1 import CgroupV1

    return CgroupV1(path, mounts.v1, mounts.unified)


def cgroup_from_state(data: dict[str, object]) -> Cgroup:
    """Reopen a cgroup from what `Cgroup.to_state()` returned (possibly in another process)."""
    from cocon.runtime.errors import CgroupError

    version = data.get("version")
    if version == 2:
        from cocon.runtime.cgroups.v2 import CgroupV2

        return CgroupV2.from_state(data)
    if version == 1:
        from cocon.runtime.cgroups.v1 import CgroupV1

        return CgroupV1.from_state(data)
    raise CgroupError(f"cgroup state: unknown version {version!r}; the state file is damaged")


def _no_warm_up() -> None:
    pass


# --- joining ahead (a runtime started before its container: `create --await`) -----------------------

# The cgroup2 directory this process joined ahead of its container (`prejoin`), or "", and the
# directory it came from.
_prejoined = ""
_prejoin_origin = ""


def prejoined() -> str:
    """The cgroup2 directory `prejoin` put this process in ("" if none): a child forked from here is
    already in it, and `Cgroup.enter` need not (and must not pay to) move it there again."""
    return _prejoined


def prejoin(container_id: str) -> Callable[[], None] | None:
    """Move this process into the cgroup2 directory the container `container_id` will have with the
    default cgroupsPath (`/cocon/<id>` under the cgroup2 mount, pure v2 or hybrid's `unified`), made
    now. The move through `cgroup.procs` waits for an RCU grace period (see start_attach_warm_up);
    done while the runtime waits for its container, it is off the path to it, and the container's
    init, forked from here, needs no move in that hierarchy at all.

    Returns the undo for a container that never comes (move back, remove the directory), or None
    when there is no cgroup2 hierarchy or the move failed (the create then works as usual)."""
    global _prejoined
    from cocon.runtime.cgroups.common import join, resolve_path
    from cocon.runtime.cgroups.mountinfo import read_cgroup_mounts

    try:
        mounts = read_cgroup_mounts()
        if mounts.unified is None:
            return None
        with open("/proc/self/cgroup") as f:
            home = next((line.rstrip("\n").split(":", 2)[2] for line in f if line.startswith("0::")), None)
        if home is None:
            return None
        target = join(mounts.unified, resolve_path(None, container_id))
        os.makedirs(target, 0o755, exist_ok=True)
        with open(os.path.join(target, "cgroup.procs"), "w") as f:
            f.write("0")
    except (OSError, ValueError, StopIteration):
        return None
    global _prejoin_origin
    _prejoined = target
    _prejoin_origin = join(mounts.unified, home) if home != "/" else mounts.unified

    def undo() -> None:
        leave_prejoined()
        try:
            os.rmdir(target)
        except OSError:
            pass

    return undo


def leave_prejoined() -> None:
    """Move this process back out of the directory `prejoin` joined (before that cgroup is destroyed:
    a runtime whose create failed must not kill itself with its container's processes)."""
    global _prejoined
    if not _prejoined:
        return
    try:
        with open(os.path.join(_prejoin_origin, "cgroup.procs"), "w") as f:
            f.write("0")
    except OSError:
        pass
    _prejoined = ""


# A warm-up started by the command line as soon as it knows the command, for `create` to use.
_early_warm_up: Callable[[], None] | None = None
_early_owner = 0  # the pid that started it: a forked child must not use its parent's


def start_attach_warm_up(*, early: bool = False) -> Callable[[], None]:
    """Start, in a thread, a no-op move of this process into its own cgroup; return a wait function.

    Moving a process between cgroups through `cgroup.procs` takes a global lock whose first use waits
    for an RCU grace period (~8 ms here, longer under load) while holding the cgroup mutex, so every
    other cgroup operation waits too; uses within about a grace period of the last one are fast. A
    v1 hierarchy is joined without that lock (`Cgroup.enter`), but a cgroup2 hierarchy (pure v2, or
    hybrid's `unified`) has no such path. Paying the grace period here, while the runtime imports
    and reads its configuration, takes it off the path to the container. Without a cgroup2 hierarchy
    there is nothing to warm up.

    `early=True` (the command line, right after parsing) keeps the warm-up for the next call, which
    returns it instead of starting another. The returned function waits for the thread to be gone:
    call it before forking (and in any case: it also closes a file). Failures are ignored: this
    only changes timing.
    """
    if _prejoined:
        return _no_warm_up  # the container's cgroup2 directory was joined ahead (prejoin)
    global _early_warm_up, _early_owner
    if _early_warm_up is not None:
        started, _early_warm_up = _early_warm_up, None
        if _early_owner == os.getpid():
            return started
        # Inherited through fork: the thread and perhaps the file are the parent's; leave them alone.
    import _thread

    try:
        fd = _own_procs_file()
    except (OSError, ValueError):
        fd = -1
    owner = os.getpid()
    pid = str(owner).encode()
    gone: list[Any] = []  # the thread's sentinel lock, released when the thread is gone

    def move() -> None:
        try:
            os.write(fd, pid)  # the GIL is released while the kernel waits
        except OSError:
            pass

    if fd >= 0:
        writing = _thread.allocate_lock()  # released once the thread is about to block in the kernel

        def warm_up() -> None:
            sentinel = _thread._set_sentinel()  # type: ignore[attr-defined]
            sentinel.acquire()  # released when this thread is gone (as threading.Thread does)
            gone.append(sentinel)
            writing.release()
            move()

        writing.acquire()
        try:
            _thread.start_new_thread(warm_up, ())
        except RuntimeError:  # no thread to spare: go without
            os.close(fd)
        else:
            # A new thread only runs once this one lets go of the GIL, which imports rarely do: wait
            # for it to start its write (a fraction of a millisecond), or the grace period starts late.
            writing.acquire()

    def wait() -> None:
        """Return once the thread is gone; later calls return at once.

        One more move first, fast now, keeps the lock fast for about another grace period: the
        container's move comes right after the fork, however long the runtime took since the first.
        """
        global _early_warm_up
        if _early_warm_up is wait:  # started early, then not used: the command failed before
            _early_warm_up = None
        if os.getpid() != owner:
            # A forked child: the fd number may since have been closed and reused (a config.json
            # being written, say); writing our pid there would corrupt it. The parent closes its own.
            return
        if gone:
            gone.pop().acquire()
            move()
            os.close(fd)

    if early:
        _early_warm_up, _early_owner = wait, owner
    return wait


def _own_procs_file() -> int:
    """This process's cgroup.procs in one of its hierarchies, open for writing; -1 without cgroup2."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]  # "ID:CONTROLLERS:PATH"
    if not any(entry[0] == "0" for entry in lines):
        return -1  # no cgroup2 hierarchy: every move is lock-free
    # any v1 hierarchy will do; on pure v2 the one line "0::PATH"
    _, controllers, path = next((entry for entry in lines if entry[1]), lines[0])
    name = controllers.split(",")[0].replace("name=", "") if controllers else ""
    base = f"/sys/fs/cgroup/{name}" if name else "/sys/fs/cgroup"
    return os.open(f"{base}{path.rstrip('/')}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
