"""Find the cgroup hierarchies of this mount namespace from /proc/self/mountinfo (pure parsing).

A v1 hierarchy is a `cgroup` mount; several controllers can share one (`cpu,cpuacct`), and named
hierarchies carry no controller (`name=systemd`). The v2 hierarchy is a `cgroup2` mount. The mode is:
"v1" when only v1 hierarchies with controllers exist, "hybrid" when there is also a cgroup2 mount,
"v2" when cgroup2 is the only hierarchy with controllers.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING, record
from cocon.runtime.errors import CgroupError

if TYPE_CHECKING:
    from typing import Literal

    Mode = Literal["v1", "hybrid", "v2"]

MOUNTINFO = "/proc/self/mountinfo"

# Controllers a v1 hierarchy can carry; other super options (rw, xattr, release_agent=...) are not.
V1_CONTROLLERS = frozenset(
    {
        "cpuset", "cpu", "cpuacct", "blkio", "memory", "devices", "freezer", "net_cls", "perf_event",
        "net_prio", "hugetlb", "pids", "rdma", "misc", "debug",
    }
)  # fmt: skip


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@record(frozen=True)
class MountEntry:
    mount_id: int
    root: str
    mountpoint: str
    fstype: str
    super_options: tuple[str, ...]


@record(frozen=True)
class Hierarchy:
    """One mounted v1 hierarchy.

    `controllers` are its subsystems (empty for a named hierarchy), `name` its `name=` option if any,
    `mountpoint` where it is mounted here, `root` the hierarchy path that mountpoint shows.
    """

    mountpoint: str
    controllers: tuple[str, ...]
    name: str | None = None
    root: str = "/"

    @property
    def label(self) -> str:
        """Directory name under a cgroup mount: the mountpoint's base name (`cpu,cpuacct`, `systemd`)."""
        base = os.path.basename(self.mountpoint.rstrip("/"))
        if base:
            return base
        return self.name or ",".join(self.controllers)

    @property
    def mount_data(self) -> str:
        """The `data` argument of mount(2) that mounts this hierarchy again (in a cgroup namespace)."""
        opts = list(self.controllers)
        if self.name is not None:
            if not opts:
                opts.append("none")
            opts.append(f"name={self.name}")
        return ",".join(opts)

    def to_json(self) -> dict[str, object]:
        return {
            "mountpoint": self.mountpoint,
            "controllers": list(self.controllers),
            "name": self.name,
            "root": self.root,
        }

    @classmethod
    def from_json(cls, data: object) -> Hierarchy:
        if not isinstance(data, dict):
            raise CgroupError(f"cgroup state: hierarchy {data!r} is not an object; the state file is damaged")
        try:
            mountpoint = data["mountpoint"]
            controllers = data.get("controllers") or []
            name = data.get("name")
            root = data.get("root") or "/"
        except KeyError as exc:
            raise CgroupError(f"cgroup state: hierarchy lacks {exc}; the state file is damaged") from None
        if not isinstance(mountpoint, str) or not isinstance(controllers, list):
            raise CgroupError("cgroup state: bad hierarchy entry; the state file is damaged")
        return cls(
            mountpoint=mountpoint,
            controllers=tuple(str(c) for c in controllers),
            name=str(name) if name is not None else None,
            root=str(root),
        )


@record(frozen=True)
class CgroupMounts:
    """What the mount namespace offers: v1 hierarchies (one entry each) and the cgroup2 mount."""

    v1: tuple[Hierarchy, ...]
    unified: str | None
    unified_root: str = "/"

    @property
    def mode(self) -> Mode:
        has_v1 = any(h.controllers for h in self.v1)
        if has_v1:
            return "hybrid" if self.unified is not None else "v1"
        if self.unified is not None:
            return "v2"
        raise CgroupError(
            "no cgroup filesystem is mounted in this mount namespace (no cgroup or cgroup2 entry in "
            f"{MOUNTINFO}); mount cgroup2 on /sys/fs/cgroup (mount -t cgroup2 none /sys/fs/cgroup)"
        )


def parse_mountinfo_line(line: str) -> MountEntry | None:
    """Parse one line of mountinfo (proc(5)); None for a malformed line."""
    fields = line.split()
    try:
        sep = fields.index("-", 6)
    except ValueError:
        return None
    if len(fields) < sep + 3:
        return None
    try:
        mount_id = int(fields[0])
    except ValueError:
        return None
    return MountEntry(
        mount_id=mount_id,
        root=_unescape(fields[3]),
        mountpoint=_unescape(fields[4]),
        fstype=fields[sep + 1],
        super_options=tuple(fields[sep + 3].split(",")) if len(fields) > sep + 3 else (),
    )


def parse_cgroup_mounts(text: str) -> CgroupMounts:
    """Find the cgroup hierarchies in mountinfo text; the first mount of each hierarchy wins."""
    v1: list[Hierarchy] = []
    seen: set[tuple[tuple[str, ...], str | None]] = set()
    cgroup2: list[MountEntry] = []
    for line in text.splitlines():
        entry = parse_mountinfo_line(line)
        if entry is None:
            continue
        if entry.fstype == "cgroup2":
            cgroup2.append(entry)
        elif entry.fstype == "cgroup":
            controllers = tuple(sorted(o for o in entry.super_options if o in V1_CONTROLLERS))
            name = next((o[5:] for o in entry.super_options if o.startswith("name=")), None)
            if not controllers and name is None:
                continue
            key = (controllers, name)
            if key in seen:
                continue
            seen.add(key)
            v1.append(Hierarchy(entry.mountpoint, controllers, name, entry.root))
    unified: MountEntry | None = None
    if cgroup2:
        # Prefer the conventional places: /sys/fs/cgroup (pure v2), /sys/fs/cgroup/unified (hybrid).
        preferred = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified")
        unified = next((e for p in preferred for e in cgroup2 if e.mountpoint == p), cgroup2[0])
    return CgroupMounts(
        v1=tuple(v1),
        unified=unified.mountpoint if unified else None,
        unified_root=unified.root if unified else "/",
    )


def read_cgroup_mounts(path: str = MOUNTINFO) -> CgroupMounts:
    """Parse this process's mountinfo."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        raise CgroupError(
            f"cannot read {path} to find the cgroup mounts: {exc.strerror}; is /proc mounted?"
        ) from None
    return parse_cgroup_mounts(text)
