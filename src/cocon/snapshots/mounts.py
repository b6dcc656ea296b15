"""Mount helpers: /proc/self/mountinfo queries, mounting from a directory, and careful unmounting."""

from __future__ import annotations

import errno
import os

from cocon import _linux as linux
from cocon._typing import record
from cocon.snapshots.errors import SnapshotError, errtext

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


def mount_from(cwd: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with `cwd` as the working directory, so relative paths in `data` resolve under it.

    The working directory is per process, so this forks: the child changes directory, mounts and
    exits; its errno comes back through a pipe and is raised here as OSError. The mount is made in
    this process's mount namespace (a fork shares it).
    """
    cwd_b, data_b = os.fsencode(cwd), data.encode()
    if len(data_b) + 1 > os.sysconf("SC_PAGE_SIZE"):
        raise SnapshotError(f"mount options for {target} are {len(data_b)} bytes: more than one page")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(r)
            os.chdir(cwd_b)
            linux.mount(source, target, fstype, flags, data)
            code = 0
        except OSError as e:
            os.write(w, str(e.errno or errno.EIO).encode())
        except BaseException:
            os.write(w, str(errno.EIO).encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        chunks: list[bytes] = []
        while chunk := os.read(r, 64):
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        err = int(b"".join(chunks) or str(errno.EIO).encode())
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}", target)


def unmount_all(path: str, *, what: str = "mount") -> None:
    """Unmount everything mounted at `path` (stacked mounts too); idempotent.

    A plain umount first; MNT_DETACH only when the mount is busy (open files, a process's cwd), so a
    lazy unmount is never the first resort and a later rmdir of the mount point cannot reach into a
    still-attached filesystem. umount(2) itself says when nothing (more) is mounted there (EINVAL),
    so mountinfo is read only to tell "not mounted" from "not allowed" for an unprivileged caller.
    """
    for _ in range(64):
        try:
            linux.umount2(path, 0)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return  # not a mount point (any more), or no such path
            if e.errno == errno.EBUSY:
                try:
                    linux.umount2(path, linux.MNT_DETACH)
                except OSError as e2:
                    raise SnapshotError(f"cannot detach {what} at {path}: {errtext(e2)}") from e2
                continue
            if e.errno == errno.EPERM and not is_mountpoint(path):
                return
            raise SnapshotError(
                f"cannot unmount {what} at {path}: {errtext(e)}"
                + (": unmounting needs CAP_SYS_ADMIN (run as root)" if e.errno == errno.EPERM else "")
            ) from e
    raise SnapshotError(f"{what} at {path} is still mounted after 64 unmounts: check /proc/self/mountinfo")
