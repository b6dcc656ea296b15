"""Mount helpers: mounting from a directory and careful unmounting (queries are in cocon._mountinfo)."""

from __future__ import annotations

import errno
import os

from cocon import _linux as linux
from cocon._mountinfo import (  # re-exported: the snapshotter's modules import them from here
    MountEntry,
    filesystem_of,
    is_mountpoint,
    mounts_under,
    read_mountinfo,
)
from cocon.snapshots.errors import SnapshotError, errtext

__all__ = [
    "MountEntry",
    "filesystem_of",
    "is_mountpoint",
    "mount_from",
    "mounts_under",
    "read_mountinfo",
    "unmount_all",
]


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
