"""Mount helpers: /proc/self/mountinfo queries, mounting from a directory, and careful unmounting."""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass

from cocon import _linux as linux
from cocon.snapshots.errors import SnapshotError, errtext

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
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
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


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
    real = os.path.realpath(path)
    return any(e.mount_point == real for e in read_mountinfo())


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path`, deepest first (the order to unmount them in)."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    found = {
        e.mount_point for e in read_mountinfo() if e.mount_point == real or e.mount_point.startswith(prefix)
    }
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
    still-attached filesystem.
    """
    for _ in range(64):
        if not is_mountpoint(path):
            return
        try:
            linux.umount2(path, 0)
        except OSError as e:
            if e.errno == errno.EBUSY:
                try:
                    linux.umount2(path, linux.MNT_DETACH)
                except OSError as e2:
                    raise SnapshotError(f"cannot detach {what} at {path}: {errtext(e2)}") from e2
            elif e.errno in (errno.EINVAL, errno.ENOENT):
                return
            else:
                raise SnapshotError(
                    f"cannot unmount {what} at {path}: {errtext(e)}"
                    + (": unmounting needs CAP_SYS_ADMIN (run as root)" if e.errno == errno.EPERM else "")
                ) from e
    raise SnapshotError(f"{what} at {path} is still mounted after 64 unmounts: check /proc/self/mountinfo")
