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
        def pids(self) -> list[int]: ...
        def freeze(self) -> None: ...
        def thaw(self) -> None: ...
        def frozen(self) -> bool: ...
        def kill_all(self, sig: int) -> None: ...
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


def start_attach_warm_up() -> Callable[[], None]:
    """Start, in a thread, a no-op move of this process into its own cgroup; return a wait function.

    The first move of a process between cgroups waits for an RCU grace period (the kernel switches the
    threadgroup semaphore to its slow mode, ~15 ms here); moves shortly after it are fast. Doing one
    early, while the runtime reads its configuration, takes that wait off the path to the container.
    The returned function waits for the thread to be gone: call it before forking. Failures are
    ignored: this only changes timing.
    """
    import _thread

    def warm_up(done: list[object]) -> None:
        done.append(_thread._set_sentinel())  # type: ignore[attr-defined]  # released when the thread is gone
        try:
            with open("/proc/self/cgroup") as f:
                lines = [line.rstrip("\n").split(":", 2) for line in f]  # "ID:CONTROLLERS:PATH"
            # any v1 hierarchy will do; on pure v2 the one line "0::PATH"
            _, controllers, path = next((entry for entry in lines if entry[1]), lines[0])
            name = controllers.split(",")[0].replace("name=", "") if controllers else ""
            base = f"/sys/fs/cgroup/{name}" if name else "/sys/fs/cgroup"
            with open(f"{base}{path.rstrip('/')}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        except (OSError, ValueError):
            pass

    done: list[object] = []
    _thread.start_new_thread(warm_up, (done,))

    def wait() -> None:
        """Return once the thread has exited; later calls return at once."""
        while not done:
            _thread.allocate_lock().acquire(True, 0.0005)  # a short sleep without importing time
        sentinel = done[0]
        if sentinel is not None:
            sentinel.acquire()  # type: ignore[attr-defined]
            done[0] = None

    return wait
