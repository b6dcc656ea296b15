"""Container cgroups: v1, hybrid (v1 + an empty cgroup2 "unified" mount) and v2 behind one interface.

`open_cgroup(linux.cgroupsPath, id)` finds the hierarchies from /proc/self/mountinfo and returns a
`CgroupV1` (v1 and hybrid) or a `CgroupV2`; `create(resources)` makes the directories and applies
`linux.resources`. See docs/cgroups.md for how paths and resources map to files.

Imports stay cheap: the drivers are imported when a cgroup is opened.
"""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING, record

if TYPE_CHECKING:
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
