"""Overlay-format layer content: whiteouts and opaque directories, as overlayfs stores them.

A layer directory used as an overlay lower holds only that layer's changes. Deletions are stored the
way overlayfs itself records them in an upper dir, so a stack of layers reads like the image:

- a deleted path is a **whiteout**: a character device with device number 0:0 at that path;
- a directory whose lower content is hidden (the tar's `.wh..wh..opq`) is **opaque**: it carries the
  xattr `trusted.overlay.opaque=y` (`user.overlay.opaque=y` when overlay runs with `userxattr`,
  which is the case inside a user namespace).

These helpers are what a layer `fill` function uses to write that format.
"""

from __future__ import annotations

import errno
import os
import stat

from cocon.snapshots.errors import SnapshotError, errtext

TRUSTED_OPAQUE = "trusted.overlay.opaque"
USER_OPAQUE = "user.overlay.opaque"
_IDENTITY_MAP = ["0", "0", "4294967295"]


def in_user_namespace() -> bool:
    """True inside a user namespace (uid_map is not the initial identity map of all ids)."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return lines != [_IDENTITY_MAP]


def opaque_xattr(userxattr: bool | None = None) -> str:
    """The xattr that marks an opaque directory: trusted.* normally, user.* with `userxattr`."""
    if userxattr is None:
        userxattr = in_user_namespace()
    return USER_OPAQUE if userxattr else TRUSTED_OPAQUE


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise SnapshotError(f"invalid whiteout name {name!r}: give one path component inside the directory")


def overlay_whiteout(directory: int | str, name: str) -> None:
    """Record that `name` in `directory` is deleted: a 0:0 character device, as overlayfs does.

    `directory` is a path or an open directory fd (for use with openat-style, symlink-safe layer
    extraction). An existing non-directory entry of that name is replaced; a directory is refused
    (the layer would be ambiguous).
    """
    _check_name(name)
    dir_fd = (
        directory
        if isinstance(directory, int)
        else os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    )
    try:
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        else:
            if stat.S_ISDIR(st.st_mode):
                raise SnapshotError(
                    f"cannot write a whiteout for {name!r}: the layer already has a directory of that name"
                )
            os.unlink(name, dir_fd=dir_fd)
        try:
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
        except OSError as e:
            hint = ""
            if e.errno == errno.EPERM:
                hint = (
                    ": creating the 0:0 device needs CAP_MKNOD in the initial user namespace; "
                    "unpack layers as real root"
                )
            raise SnapshotError(f"cannot create the whiteout {name!r}: {errtext(e)}{hint}") from e
    finally:
        if not isinstance(directory, int):
            os.close(dir_fd)


def overlay_opaque(path: str, *, userxattr: bool | None = None) -> None:
    """Mark the directory `path` opaque: the lower layers' content under it is hidden."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise SnapshotError(f"cannot mark {path} opaque: {errtext(e)}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise SnapshotError(f"cannot mark {path} opaque: it is not a directory")
    name = opaque_xattr(userxattr)
    try:
        os.setxattr(path, name, b"y", follow_symlinks=False)
    except OSError as e:
        hint = ""
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            hint = ": the filesystem has no xattr support; keep the snapshot root on ext4, xfs or btrfs"
        elif e.errno == errno.EPERM:
            hint = ": trusted.* xattrs need CAP_SYS_ADMIN in the initial user namespace"
        raise SnapshotError(f"cannot set {name} on {path}: {errtext(e)}{hint}") from e


def is_whiteout(st: os.stat_result) -> bool:
    """True for an overlay whiteout (a 0:0 character device), given an lstat result."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: str, *, userxattr: bool | None = None) -> bool:
    """True when the directory `path` carries the overlay opaque xattr set to `y`."""
    try:
        return os.getxattr(path, opaque_xattr(userxattr), follow_symlinks=False) == b"y"
    except OSError:
        return False
