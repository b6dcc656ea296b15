"""Unpack an untrusted tar (a build context sent to `POST /build`) into a directory, safely.

Nothing of the archive can reach outside `dest`:

- member names are cleaned: absolute names and `..` components are refused (UnsafeTar);
- parent directories are opened one component at a time with O_NOFOLLOW|O_DIRECTORY from a
  descriptor of `dest`, so a member can never be written *through* a symbolic link the archive made
  earlier (`a -> /etc`, then `a/passwd`): that is refused too;
- files are created with O_CREAT|O_EXCL|O_NOFOLLOW; symbolic links are made as given (their
  targets are never followed here, and the builder resolves them inside the context);
- hard links must name a regular file already unpacked from the same archive;
- devices, FIFOs and sockets are skipped (a build context has no use for them);
- the number of members and the bytes of file content are capped.

The tar may be plain or gzip, bzip2 or xz compressed (what `docker build` may send).
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from typing import IO, Any

from cocon._streams import Peekable

MAX_MEMBERS = 1_000_000
CHUNK = 1 << 20


class UnsafeTar(Exception):
    """The archive is not acceptable; nothing of it may be used."""


def clean_name(name: str) -> list[str] | None:
    """A member name as path components (None for the archive's root itself)."""
    if name.startswith("/"):
        raise UnsafeTar(f"member {name!r} has an absolute path")
    if "\0" in name:
        raise UnsafeTar(f"member {name!r} has a NUL byte in its name")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeTar(f"member {name!r} leads outside the archive's root ('..')")
    return parts or None


def _open_dir(root_fd: int, parts: list[str], *, create: bool, name: str) -> int:
    """A descriptor of the directory `parts` below root_fd, without following any link."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise UnsafeTar(f"member {name!r}: {'/'.join(parts)} is not in the archive") from None
                os.mkdir(part, 0o755, dir_fd=fd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeTar(
                        f"member {name!r} goes through {part!r}, which the archive made a symbolic link or a "
                        "file: refusing to write through it"
                    ) from None
                raise
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_entry(dir_fd: int, base: str, *, keep_dir: bool) -> bool:
    """Make room for a new entry `base`; returns True when a directory stays (keep_dir)."""
    try:
        st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return True
        raise UnsafeTar(f"{base!r} is a directory in the archive and also a later non-directory member")
    os.unlink(base, dir_fd=dir_fd)
    return False


class _Padded:
    """A tar stream that may stop right after its last member's data, without the padding to 512
    bytes and the two zero blocks (the docker CLI sends such tars when it adds a member, as Go's
    reader accepts them): zeros are supplied after the end, for Python's tarfile."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.pos = 0
        self.pad = -1

    def read(self, n: int = -1) -> bytes:
        if self.pad < 0:
            data: bytes = self.raw.read(n if n is not None and n >= 0 else CHUNK)
            if data:
                self.pos += len(data)
                return data
            self.pad = (-self.pos) % 512 + 1024
        size = self.pad if n is None or n < 0 else min(n, self.pad)
        self.pad -= size
        return b"\0" * size


def _decompressed(fileobj: IO[bytes]) -> Any:
    """The tar inside gzip, bzip2 or xz (decided by content, as Docker), or the stream itself."""
    rest: Any = Peekable(fileobj)
    head = rest.peek(6)
    if head.startswith(b"\x1f\x8b"):
        import gzip

        return gzip.GzipFile(fileobj=rest, mode="rb")
    if head.startswith(b"BZh"):
        import bz2

        return bz2.BZ2File(rest, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        import lzma

        return lzma.LZMAFile(rest, mode="rb")
    return rest


def extract(fileobj: IO[bytes], dest: str, *, max_bytes: int, max_members: int = MAX_MEMBERS) -> int:
    """Unpack the tar read from `fileobj` (plain, gzip, bzip2 or xz) into the existing directory
    `dest`; returns the number of members unpacked. Raises UnsafeTar (or tarfile.TarError for a
    damaged archive)."""
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    count = 0
    total = 0
    stream = _Padded(_decompressed(fileobj))
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:  # type: ignore[call-overload]
            for member in tf:
                count += 1
                if count > max_members:
                    raise UnsafeTar(f"the archive has more than {max_members} members")
                parts = clean_name(member.name)
                if parts is None:
                    continue
                parent = _open_dir(root_fd, parts[:-1], create=True, name=member.name)
                base = parts[-1]
                try:
                    mode = member.mode & 0o7777
                    if member.isdir():
                        if not _remove_entry(parent, base, keep_dir=True):
                            os.mkdir(base, 0o700, dir_fd=parent)
                        dfd = os.open(
                            base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
                        )
                        try:
                            os.fchmod(dfd, mode)
                        finally:
                            os.close(dfd)
                    elif member.isreg():
                        total += member.size
                        if total > max_bytes:
                            raise UnsafeTar(f"the archive holds more than {max_bytes} bytes of files")
                        _remove_entry(parent, base, keep_dir=False)
                        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                        ffd = os.open(base, flags, 0o600, dir_fd=parent)
                        try:
                            src = tf.extractfile(member)
                            if src is not None:
                                while data := src.read(CHUNK):
                                    view = memoryview(data)
                                    while view:
                                        view = view[os.write(ffd, view) :]
                            os.fchmod(ffd, mode)
                            os.utime(ffd, (member.mtime, member.mtime))
                        finally:
                            os.close(ffd)
                    elif member.issym():
                        _remove_entry(parent, base, keep_dir=False)
                        os.symlink(member.linkname, base, dir_fd=parent)
                    elif member.islnk():
                        target = clean_name(member.linkname)
                        if target is None:
                            raise UnsafeTar(f"hard link {member.name!r} points at the archive's root")
                        tparent = _open_dir(root_fd, target[:-1], create=False, name=member.name)
                        try:
                            st = os.stat(target[-1], dir_fd=tparent, follow_symlinks=False)
                            if not stat.S_ISREG(st.st_mode):
                                raise UnsafeTar(f"hard link {member.name!r} must point at a regular file")
                            _remove_entry(parent, base, keep_dir=False)
                            os.link(
                                target[-1], base, src_dir_fd=tparent, dst_dir_fd=parent, follow_symlinks=False
                            )
                        except FileNotFoundError:
                            raise UnsafeTar(
                                f"hard link {member.name!r} points at {member.linkname!r}, which is not "
                                "in the archive before it"
                            ) from None
                        finally:
                            os.close(tparent)
                    # devices, FIFOs, sockets: skipped
                finally:
                    os.close(parent)
    finally:
        os.close(root_fd)
    return count


def read_in_root(root: str, name: str, limit: int) -> bytes | None:
    """The content of the regular file `name` inside `root`, resolving links inside `root` only
    (RESOLVE_IN_ROOT); None when there is no such file."""
    from cocon import _linux

    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = _linux.openat2(root_fd, name, os.O_RDONLY | os.O_CLOEXEC, _linux.RESOLVE_IN_ROOT)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None
            raise
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        if st.st_size > limit:
            raise UnsafeTar(f"{name} is {st.st_size} bytes; at most {limit} are accepted")
        chunks = []
        while data := os.read(fd, CHUNK):
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)
