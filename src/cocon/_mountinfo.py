"""/proc/self/mountinfo queries (proc(5)): which mounts exist, at or below a path, and what holds a path.

Dependency-free, below every layer: the snapshotter, the base-image bootstrap, volumes and the API's
`info` all ask these questions, and mountinfo's escaping is easy to get subtly wrong.
"""

from __future__ import annotations

import os

from cocon._typing import record

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL_DIGITS = b"01234567"


@record(frozen=True)
class MountEntry:
    """One line of mountinfo (proc(5)), the fields the snapshotter needs."""

    mount_id: int
    mount_point: str
    fstype: str
    source: str
    options: str
    super_options: str


def _unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    if b"\\" not in field:
        return os.fsdecode(field)
    out = bytearray()
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == 0x5C and len(code) == 3 and all(c in _OCTAL_DIGITS for c in code):
            out.append(int(code, 8) & 0xFF)
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def _escape(path: str) -> bytes:
    """A path as mountinfo writes it (the inverse of _unescape for the characters the kernel escapes)."""
    raw = os.fsencode(path)
    if b"\\" in raw:
        raw = raw.replace(b"\\", b"\\134")
    return raw.replace(b" ", b"\\040").replace(b"\t", b"\\011").replace(b"\n", b"\\012")


def _mount_points() -> list[bytes]:
    """The mount point field of every line of mountinfo, still escaped (cheaper than read_mountinfo
    for the questions below, which `cocon run` asks several times)."""
    with open(MOUNTINFO, "rb") as f:
        data = f.read()
    points = []
    for line in data.splitlines():
        fields = line.split(b" ", 5)
        if len(fields) > 4:
            points.append(fields[4])
    return points


def read_mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    with open(path, "rb") as f:
        data = f.read()
    entries: list[MountEntry] = []
    for line in data.splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-", 6)
            entries.append(
                MountEntry(
                    mount_id=int(fields[0]),
                    mount_point=_unescape(fields[4]),
                    fstype=fields[sep + 1].decode(),
                    source=_unescape(fields[sep + 2]),
                    options=fields[5].decode(),
                    super_options=fields[sep + 3].decode() if len(fields) > sep + 3 else "",
                )
            )
        except (ValueError, IndexError):
            continue
    return entries


def is_mountpoint(path: str) -> bool:
    """True when something is mounted exactly at `path` (compared after resolving symlinks)."""
    return _escape(os.path.realpath(path)) in _mount_points()


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    real = _escape(os.path.realpath(path))
    prefix = real.rstrip(b"/") + b"/"
    found = {_unescape(p) for p in _mount_points() if p == real or p.startswith(prefix)}
    return sorted(found, key=lambda p: (p.count("/"), p), reverse=True)


def filesystem_of(path: str) -> MountEntry | None:
    """The mount that holds `path`: the longest mount point prefix, the last one mounted there."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for e in read_mountinfo():
        mp = e.mount_point
        inside = real == mp or mp == "/" or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = e
    return best
