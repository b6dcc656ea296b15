"""`cocon cp`: files between a container's root filesystem and the host, with Docker's rules.

Paths in the container are resolved *inside* its root (openat2 RESOLVE_IN_ROOT): `..` and
symlinks, absolute or relative, cannot lead out of it. The copy then works on directory file
descriptors only: every entry is opened or created relative to its directory's fd with O_NOFOLLOW,
so no symlink met on the way (in the container, or already at the destination) is followed.
Symlinks are copied as symlinks; regular files, directories and their modes and times are copied;
devices, fifos and sockets are skipped. New files belong to root (the user running `cp`), as with
Docker.

Docker's destination rules: a destination that is an existing directory receives the source under
its own name; otherwise the source is copied *as* the destination (its parent must exist); a source
ending in `/.` copies the directory's content.
"""

from __future__ import annotations

import os
import stat

from cocon import _linux as L
from cocon.engine.errors import EngineError, InvalidRequest, NotFound

RESOLVE = L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_in_root(rootfs: str, path: str) -> int:
    """A directory of the container, as an fd, resolved inside its root."""
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return L.openat2(root, path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, RESOLVE)
    except FileNotFoundError:
        raise NotFound(f"no such directory in the container: {path}") from None
    except NotADirectoryError:
        raise InvalidRequest(f"{path} in the container is not a directory") from None
    except OSError as exc:
        raise InvalidRequest(f"cannot open {path} in the container: {exc.strerror}") from None
    finally:
        os.close(root)


def _copy_entry(src_dir: int, name: str, dst_dir: int, dst_name: str) -> None:
    """Copy `name` in `src_dir` to `dst_name` in `dst_dir` (recursively), following no symlink."""
    st = os.lstat(name, dir_fd=src_dir)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(name, dir_fd=src_dir)
        try:
            os.unlink(dst_name, dir_fd=dst_dir)
        except FileNotFoundError:
            pass
        os.symlink(target, dst_name, dir_fd=dst_dir)
    elif stat.S_ISDIR(st.st_mode):
        try:
            os.mkdir(dst_name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dst_dir)
        except FileExistsError:
            pass
        sfd = os.open(name, _DIR, dir_fd=src_dir)
        try:
            dfd = os.open(dst_name, _DIR, dir_fd=dst_dir)
            try:
                _copy_children(sfd, dfd)
                os.chmod(dfd, stat.S_IMODE(st.st_mode))
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif stat.S_ISREG(st.st_mode):
        sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            dfd = os.open(dst_name, flags, stat.S_IMODE(st.st_mode), dir_fd=dst_dir)
            try:
                while True:
                    n = os.sendfile(dfd, sfd, None, 1 << 20)
                    if n == 0:
                        break
                os.chmod(dfd, stat.S_IMODE(st.st_mode))
                os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)


def _copy_children(src_dir: int, dst_dir: int) -> None:
    for entry in sorted(os.listdir(src_dir)):
        _copy_entry(src_dir, entry, dst_dir, entry)


def _split(path: str) -> tuple[str, str]:
    """(parent, name); name "." for `dir/.` (the directory's content)."""
    if path.endswith("/.") or path == ".":
        return path[:-2] or "/", "."
    path = path.rstrip("/") or "/"
    if path == "/":
        return "/", "."
    parent, name = os.path.split(path)
    return parent or "/", name


def _copy(src_dir: int, name: str, dst_parent: int, dst_exists_dir: bool, dst_name: str) -> None:
    """Docker's rules for one copy, between fds."""
    if name == ".":
        if dst_exists_dir:
            _copy_children(src_dir, dst_parent)
            return
        os.mkdir(dst_name, 0o755, dir_fd=dst_parent)
        dfd = os.open(dst_name, _DIR, dir_fd=dst_parent)
        try:
            _copy_children(src_dir, dfd)
        finally:
            os.close(dfd)
        return
    try:
        os.lstat(name, dir_fd=src_dir)
    except FileNotFoundError:
        raise NotFound(f"no such file or directory: {name}") from None
    _copy_entry(src_dir, name, dst_parent, name if dst_exists_dir else dst_name)


def copy_from(rootfs: str, path: str, dest: str) -> None:
    """Container `path` → host `dest`."""
    parent, name = _split(path if path.startswith("/") else "/" + path)
    src = _open_in_root(rootfs, parent)
    try:
        dest = os.path.abspath(dest)
        is_dir = os.path.isdir(dest)
        target = dest if is_dir else os.path.dirname(dest)
        try:
            dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise InvalidRequest(
                f"the destination directory {target} cannot be used: {exc.strerror}"
            ) from None
        try:
            _copy(src, name, dfd, is_dir, os.path.basename(dest))
        finally:
            os.close(dfd)
    except OSError as exc:
        raise EngineError(f"cannot copy {path} out of the container: {exc}") from None
    finally:
        os.close(src)


def copy_to(rootfs: str, source: str, path: str) -> None:
    """Host `source` → container `path`."""
    parent, name = _split(os.path.abspath(source) + ("/." if source.endswith("/.") else ""))
    try:
        src = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {source}: {exc.strerror}") from None
    try:
        path = path if path.startswith("/") else "/" + path
        try:
            dfd = _open_in_root(rootfs, path)
            is_dir, dst_name = True, name
        except NotFound:
            dparent, dst_name = _split(path)
            dfd = _open_in_root(rootfs, dparent)
            is_dir = False
        try:
            _copy(src, name, dfd, is_dir, dst_name)
        finally:
            os.close(dfd)
    except OSError as exc:
        raise EngineError(f"cannot copy {source} into the container: {exc}") from None
    finally:
        os.close(src)
