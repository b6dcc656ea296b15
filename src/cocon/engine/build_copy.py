"""COPY and ADD for `cocon build`: find the sources, hash them for the cache, copy them into a rootfs.

Sources come from a **source root**: the build context (after .dockerignore) or the mounted rootfs of
another stage or image (`COPY --from`). Everything about paths is resolved *inside* that root:

- a source path is cleaned like a path below `/`: an absolute path starts at the root; a `..` that
  would climb above the root is refused (the file is outside the context);
- symbolic links on the way to a source (and a source that is itself a link) are followed the way
  the kernel's RESOLVE_IN_ROOT does: an absolute target starts again at the root, `..` stops there.
  A link can therefore never lead out of the context; inside a copied directory links are copied as
  links, never followed;
- wildcards (`*`, `?`, `[a-z]`, `\\` escapes: Go's filepath.Match, per path component) match the
  entries of the root that the context offers (excluded paths are invisible).

Files are opened relative to the root's descriptor with `openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`
and written into the target rootfs relative to its descriptor (`openat2(RESOLVE_IN_ROOT)` for
existing directories, `O_CREAT|O_EXCL|O_NOFOLLOW` and `*at` calls for new entries), so neither side
can be redirected outside its root by a link, even one that changes while the copy runs.

Metadata follows Docker: context files become `0:0` (or `--chown`), files from another stage keep
their owners unless `--chown` is given; modes (setuid included), mtimes, xattrs a layer may carry and
hard links (within one instruction) are kept; `--chmod` (octal) sets the mode of every copied file and
directory. Directories that the copy creates belong to the new owner; an existing destination
directory keeps its own metadata.
"""

from __future__ import annotations

import bz2
import errno
import hashlib
import lzma
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, BinaryIO, cast

from cocon import _linux
from cocon.engine.build_cache import BuildCache, FileStat, SourceDigest, file_stat
from cocon.images.build_errors import BuildError
from cocon.images.dockerignore import DockerIgnore
from cocon.images.errors import LayerError
from cocon.images.layers import apply_layer, keep_xattr
from cocon.isolation.spec import SpecError, resolve_user

_CHUNK = 1 << 20
_MAX_LINKS = 40
_GLOB_CHARS = frozenset("*?[\\")
URL_PREFIXES = ("http://", "https://", "git://", "git@", "ssh://")


class CopyError(BuildError):
    """A COPY/ADD source cannot be found or used, or the destination cannot be written."""


# --- wildcards -----------------------------------------------------------------------------------------


def has_wildcards(component: str) -> bool:
    return any(c in _GLOB_CHARS for c in component)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match for one path component, as a regular expression (fullmatch it)."""
    out: list[str] = []
    i, n = 0, len(pattern)

    def bad() -> CopyError:
        return CopyError(f"syntax error in pattern {pattern!r}: check its [ ] classes and \\ escapes")

    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= n:
                raise bad()
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            ranges: list[str] = []
            while True:
                if j >= n:
                    raise bad()
                if pattern[j] == "]" and ranges:
                    break
                lo = pattern[j]
                if lo == "\\":
                    j += 1
                    if j >= n:
                        raise bad()
                    lo = pattern[j]
                j += 1
                if j + 1 < n and pattern[j] == "-" and pattern[j + 1] != "]":
                    hi = pattern[j + 1]
                    j += 2
                    if hi == "\\":
                        if j >= n:
                            raise bad()
                        hi = pattern[j]
                        j += 1
                    if hi < lo:
                        raise bad()
                    ranges.append(f"{re.escape(lo)}-{re.escape(hi)}")
                else:
                    ranges.append(re.escape(lo))
            out.append("[" + ("^/" if negate else "") + "".join(ranges) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


# --- source roots --------------------------------------------------------------------------------------


def clean_source(path: str, label: str = "build context") -> list[str]:
    """A source path as components below the root; `..` above the root is an error."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise CopyError(
                    f"{path!r}: the path leads outside the {label}; "
                    "only files inside it can be copied (move the file into the context, or use a "
                    "bigger context directory)"
                )
            parts.pop()
            continue
        parts.append(part)
    return parts


@dataclass
class SourceRoot:
    """Where sources are read from: the build context, or a mounted stage/image rootfs."""

    path: str  # absolute
    label: str  # "build context" or "stage build" / "image busybox" for messages
    included: frozenset[str] | None = None  # context paths .dockerignore lets through (None: all)
    keep_owner: bool = False  # True for --from sources: copies keep uid/gid
    cache: BuildCache | None = None  # context only: remembered file digests
    fd: int = -1
    _digests: dict[str, tuple[FileStat, str]] | None = None
    _new_digests: list[tuple[str, FileStat, str]] = field(default_factory=list)

    def open(self) -> None:
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise CopyError(f"cannot open the {self.label} {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.flush()

    def flush(self) -> None:
        if self.cache is not None and self._new_digests:
            self.cache.save_file_digests(self._new_digests)
            self._new_digests.clear()

    def visible(self, rel: str) -> bool:
        return self.included is None or rel == "" or rel in self.included

    def lstat(self, rel: str) -> os.stat_result:
        return os.stat(rel or ".", dir_fd=self.fd, follow_symlinks=False)

    def open_beneath(self, rel: str, flags: int) -> int:
        """Open a resolved path (no links in it) without following any link or leaving the root."""
        return _linux.openat2(
            self.fd,
            rel or ".",
            flags | os.O_CLOEXEC | os.O_NOFOLLOW,
            _linux.RESOLVE_BENEATH | _linux.RESOLVE_NO_SYMLINKS | _linux.RESOLVE_NO_MAGICLINKS,
        )

    def resolve(
        self, parts: Sequence[str], shown: str, follow_last: bool = True
    ) -> tuple[str, os.stat_result]:
        """Resolve components inside the root, following links the way RESOLVE_IN_ROOT does; returns
        the real relative path and its lstat."""
        todo = list(reversed(parts))
        stack: list[str] = []
        links = 0
        via_link = False
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if stack:
                    stack.pop()
                continue
            rel = "/".join([*stack, name])
            try:
                st = self.lstat(rel)
            except FileNotFoundError:
                raise self._not_found(shown, via_link) from None
            except OSError as exc:
                raise CopyError(f"cannot read {shown!r} in the {self.label}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode) and (todo or follow_last):
                links += 1
                via_link = True
                if links > _MAX_LINKS:
                    raise CopyError(f"{shown!r} in the {self.label}: too many levels of symbolic links")
                target = os.readlink(rel, dir_fd=self.fd)
                if target.startswith("/"):
                    stack = []
                todo.extend(reversed(target.split("/")))
                continue
            if todo and not stat.S_ISDIR(st.st_mode):
                raise CopyError(f"{shown!r} in the {self.label}: {rel!r} is not a directory")
            stack.append(name)
        rel = "/".join(stack)
        if not self.visible(rel):
            raise self._not_found(shown, via_link, excluded=True)
        return rel, self.lstat(rel)

    def _not_found(self, shown: str, via_link: bool, excluded: bool = False) -> CopyError:
        if self.included is not None:
            hint = "not found in the build context or excluded by .dockerignore"
        else:
            hint = f"not found in the {self.label}"
        if excluded:
            hint = "excluded by .dockerignore" if self.included is not None else hint
        if via_link:
            hint += " (it goes through a symbolic link: links are resolved inside the context, never outside)"
        return CopyError(f"{shown!r}: {hint}")

    def listdir(self, rel: str) -> list[str]:
        fd = self.open_beneath(rel, os.O_RDONLY | os.O_DIRECTORY)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        return [n for n in names if self.visible(f"{rel}/{n}" if rel else n)]

    def file_digest(self, rel: str, st: os.stat_result) -> str:
        if self.cache is not None:
            if self._digests is None:
                self._digests = self.cache.file_digests(self.path)
            full = os.path.join(self.path, rel)
            known = self._digests.get(full)
            if known is not None and known[0] == file_stat(st):
                return known[1]
        started = time.time_ns()
        fd = self.open_beneath(rel, os.O_RDONLY)
        try:
            h = hashlib.sha256()
            while True:
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    break
                h.update(chunk)
            now_st = os.fstat(fd)
        finally:
            os.close(fd)
        digest = "sha256:" + h.hexdigest()
        settled = now_st.st_ctime_ns < started - 1_000_000_000
        if self.cache is not None and settled and file_stat(now_st) == file_stat(st):
            self._new_digests.append((os.path.join(self.path, rel), file_stat(st), digest))
        return digest


# --- what a COPY copies --------------------------------------------------------------------------------


@dataclass
class Entry:
    src: str  # real path relative to the source root
    dest: str  # path relative to where this item lands ("" = that place itself)
    st: os.stat_result


@dataclass
class Item:
    """One source of a COPY/ADD: a file or directory of a root, or a heredoc."""

    root: SourceRoot | None
    name: str  # basename the item gets in a destination directory
    is_dir: bool
    entries: list[Entry]  # for a directory: itself ("") then everything below, parents first
    heredoc: bytes | None = None


def _kind(mode: int) -> str | None:
    for test, kind in (
        (stat.S_ISREG, "f"),
        (stat.S_ISDIR, "d"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
        (stat.S_ISFIFO, "p"),
    ):
        if test(mode):
            return kind
    return None  # sockets (and unknown types) are not copied, as in Docker


def expand_sources(
    root: SourceRoot, patterns: Sequence[str], exclude: DockerIgnore | None = None
) -> list[Item]:
    """The items `patterns` name in `root`, wildcards expanded (in name order)."""
    root.open()
    items: list[Item] = []
    for pattern in patterns:
        if pattern.startswith(URL_PREFIXES):
            raise CopyError(f"{pattern}: a URL is not a file of the {root.label}")
        parts = clean_source(pattern, root.label)
        if any(has_wildcards(p) for p in parts):
            matches = _glob(root, parts, pattern)
            if not matches:
                raise CopyError(
                    f"{pattern}: no files in the {root.label} match the pattern"
                    + (" (or they are excluded by .dockerignore)" if root.included is not None else "")
                )
        else:
            matches = [parts]
        if exclude is not None and matches != [parts]:
            # --exclude also filters what a wildcard matched (BuildKit: COPY --exclude=*.txt hom* /d/)
            matches = [m for m in matches if not exclude.matches("/".join(m))]
        for match in matches:
            rel, st = root.resolve(match, pattern)
            name = match[-1] if match else ""
            items.append(_item(root, rel, st, name, exclude))
    return items


def _glob(root: SourceRoot, parts: list[str], pattern: str) -> list[list[str]]:
    found: list[list[str]] = [[]]
    for part in parts:
        nxt: list[list[str]] = []
        if not has_wildcards(part):
            nxt = [[*cand, part] for cand in found]
        else:
            regex = glob_regex(part)
            for cand in found:
                try:
                    rel, st = root.resolve(cand, pattern)
                except CopyError:
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    continue
                nxt += [[*cand, n] for n in root.listdir(rel) if regex.fullmatch(n)]
        found = nxt
    return found


def _item(root: SourceRoot, rel: str, st: os.stat_result, name: str, exclude: DockerIgnore | None) -> Item:
    if not stat.S_ISDIR(st.st_mode):
        return Item(root=root, name=name, is_dir=False, entries=[Entry(rel, "", st)])
    entries = [Entry(rel, "", st)]

    def walk(src_dir: str, dest_dir: str) -> None:
        for name in root.listdir(src_dir):
            src = f"{src_dir}/{name}" if src_dir else name
            dest = f"{dest_dir}/{name}" if dest_dir else name
            if exclude is not None and exclude.matches(dest):
                continue
            est = root.lstat(src)
            if _kind(est.st_mode) is None:
                continue
            entries.append(Entry(src, dest, est))
            if stat.S_ISDIR(est.st_mode):
                walk(src, dest)

    walk(rel, "")
    return Item(root=root, name=name, is_dir=True, entries=entries)


def heredoc_item(name: str, content: str) -> Item:
    return Item(root=None, name=name, is_dir=False, entries=[], heredoc=content.encode())


def digest_items(items: Sequence[Item], digest: SourceDigest) -> None:
    """Feed what the items would copy into `digest` (everything but times)."""
    first_link: dict[tuple[int, int], str] = {}  # hard links copy as hard links: part of the result
    for n, item in enumerate(items):
        if item.heredoc is not None:
            digest.item("heredoc", item.name)
            digest.entry("", "f", 0o644, None, len(item.heredoc), hashlib.sha256(item.heredoc).hexdigest())
            continue
        assert item.root is not None
        digest.item("dir" if item.is_dir else "file", item.name)
        for e in item.entries:
            st = e.st
            kind = _kind(st.st_mode) or "?"
            owner = (st.st_uid, st.st_gid) if item.root.keep_owner else None
            if kind == "f" and st.st_nlink > 1 and (st.st_dev, st.st_ino) in first_link:
                detail = "link to " + first_link[(st.st_dev, st.st_ino)]
            elif kind == "f":
                detail = item.root.file_digest(e.src, st)
                if st.st_nlink > 1:
                    first_link[(st.st_dev, st.st_ino)] = f"{n}:{e.dest}"
            elif kind == "l":
                detail = os.readlink(e.src, dir_fd=item.root.fd)
            elif kind in ("c", "b"):
                detail = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                detail = ""
            size = st.st_size if kind == "f" else 0
            digest.entry(e.dest, kind, st.st_mode, owner, size, detail)
        item.root.flush()


# --- ADD archives --------------------------------------------------------------------------------------

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
)


def _is_tar_header(block: bytes) -> bool:
    if len(block) < 512:
        return False
    field_ = block[148:156].replace(b"\0", b" ").strip()
    try:
        stored = int(field_, 8)
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:512])
    signed = unsigned - 256 * sum(1 for b in (*block[:148], *block[156:512]) if b > 127)
    return stored in (unsigned, signed)


def _decompressed_head(fd: int, kind: str) -> bytes:
    with os.fdopen(os.dup(fd), "rb") as raw:
        stream: IO[bytes]
        if kind == "gzip":
            import gzip

            stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw))
        elif kind == "zstd":
            import zstandard

            stream = cast(IO[bytes], zstandard.ZstdDecompressor().stream_reader(raw))
        elif kind == "xz":
            stream = lzma.LZMAFile(raw)  # noqa: SIM115 - closed below
        else:
            stream = bz2.BZ2File(raw)
        try:
            return stream.read(512)
        except (OSError, EOFError, lzma.LZMAError, ValueError):
            return b""
        except Exception:  # zstandard.ZstdError and friends: not an archive we can read
            return b""
        finally:
            stream.close()


def archive_kind(root: SourceRoot, rel: str) -> str | None:
    """ "tar", "gzip", "zstd", "xz" or "bzip2" when the file is a (compressed) tar archive, as Docker
    decides it: by the content, not the name."""
    fd = root.open_beneath(rel, os.O_RDONLY)
    try:
        head = os.pread(fd, 512, 0)
        for magic, kind in _MAGIC:
            if head.startswith(magic):
                return kind if _is_tar_header(_decompressed_head(fd, kind)) else None
        return "tar" if _is_tar_header(head) else None
    finally:
        os.close(fd)


def extract_archive(root: SourceRoot, rel: str, kind: str, dest_dir: str) -> None:
    """Unpack a local archive into the empty directory `dest_dir` with cocon's safe layer extraction
    (no path leaves `dest_dir`, nothing half-written on failure)."""
    fd = root.open_beneath(rel, os.O_RDONLY)
    with os.fdopen(fd, "rb") as raw:
        stream: BinaryIO = raw
        if kind == "xz":
            stream = cast(BinaryIO, lzma.LZMAFile(raw))  # noqa: SIM115 - closed with raw
        elif kind == "bzip2":
            stream = cast(BinaryIO, bz2.BZ2File(raw))
        try:
            apply_layer(stream, dest_dir)
        except LayerError as exc:
            raise CopyError(f"cannot unpack {rel!r}: {exc}") from None
        except (OSError, EOFError, lzma.LZMAError) as exc:
            raise CopyError(f"cannot unpack {rel!r}: the archive is damaged ({exc})") from None


# --- owners --------------------------------------------------------------------------------------------


def resolve_chown(rootfs: str, chown: str) -> tuple[int, int]:
    """`--chown=user[:group]` with names from the target image's /etc/passwd and /etc/group; a user
    without a group gets their primary group (a bare number: the same number), as BuildKit does."""
    user, sep, group = chown.partition(":")
    if not user or (sep and not group) or ":" in group:
        raise CopyError(f"--chown={chown}: give user[:group], by name or number")
    try:
        if user.isdigit() and not sep:
            return int(user), int(user)
        uid, gid, _, _ = resolve_user(rootfs, chown)
    except SpecError as exc:
        raise CopyError(f"--chown={chown}: {exc}") from None
    return uid, gid


def parse_chmod(chmod: str) -> int:
    if not re.fullmatch(r"[0-7]{3,4}", chmod):
        raise CopyError(f"--chmod={chmod}: give an octal mode such as 755 or 0644")
    return int(chmod, 8)


# --- writing into the target rootfs --------------------------------------------------------------------


def _in_root(root_fd: int, rel: str, flags: int) -> int:
    return _linux.openat2(
        root_fd, rel or ".", flags | os.O_CLOEXEC, _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS
    )


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    try:
        names = os.listxattr(src_fd)
    except OSError:
        return
    for name in names:
        if not keep_xattr(name):
            continue
        try:
            os.setxattr(dst_fd, name, os.getxattr(src_fd, name))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EOPNOTSUPP):
                raise


class TargetRoot:
    """The rootfs a COPY writes into (a mounted snapshot), reached only through its descriptor."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def is_dir(self, path: str) -> bool:
        try:
            fd = _in_root(self.fd, path.lstrip("/"), os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return False
        os.close(fd)
        return True

    def mkdir_all(self, path: str, owner: tuple[int, int]) -> tuple[int, bool]:
        """Open directory `path` (absolute in the rootfs), creating what is missing (mode 0755,
        `owner`). Returns a real (not O_PATH) descriptor and whether the last directory was created."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        fd = os.dup(self.fd)
        created = False
        try:
            for i, name in enumerate(parts):
                rel = "/".join(parts[: i + 1])
                created = False
                try:
                    nfd = _in_root(self.fd, rel, os.O_PATH | os.O_DIRECTORY)
                except FileNotFoundError:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        raise CopyError(
                            f"cannot create the directory /{rel}: a link that leads nowhere is in the way"
                        ) from None
                    os.chown(name, *owner, dir_fd=fd, follow_symlinks=False)
                    nfd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    created = True
                except NotADirectoryError:
                    raise CopyError(f"/{rel} exists in the image and is not a directory") from None
                os.close(fd)
                fd = nfd
            real = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return real, created
        finally:
            os.close(fd)


@dataclass
class CopyOptions:
    chown: tuple[int, int] | None  # --chown, resolved
    mode: int | None  # --chmod


class _Copier:
    """Copies the entries of one source root; `keep_owner`: files keep their uid/gid (unless --chown)."""

    def __init__(self, target: TargetRoot, opts: CopyOptions, keep_owner: bool) -> None:
        self.target = target
        self.opts = opts
        self.owner: tuple[int, int] | None = (
            opts.chown if opts.chown is not None else (None if keep_owner else (0, 0))
        )
        self.links: dict[tuple[int, int], int] = {}  # (dev, ino) of a source -> O_PATH fd of its copy
        self.dir_meta: list[tuple[int, os.stat_result, int | None]] = []  # (fd, source st, source fd)
        self.opened: list[int] = []  # directories entered without taking their metadata

    def owner_of(self, st: os.stat_result) -> tuple[int, int]:
        return self.owner if self.owner is not None else (st.st_uid, st.st_gid)

    def mode_of(self, st: os.stat_result) -> int:
        return self.opts.mode if self.opts.mode is not None else stat.S_IMODE(st.st_mode)

    def close(self) -> None:
        for fd in self.links.values():
            os.close(fd)
        self.links.clear()
        for fd, _, src in self.dir_meta:
            os.close(fd)
            if src is not None:
                os.close(src)
        self.dir_meta.clear()
        for fd in self.opened:
            os.close(fd)
        self.opened.clear()

    def finish_dirs(self) -> None:
        """Directory metadata last (children change a directory's mtime), deepest first."""
        for fd, st, src in reversed(self.dir_meta):
            os.fchown(fd, *self.owner_of(st))
            os.fchmod(fd, self.mode_of(st))
            if src is not None:
                _copy_xattrs(src, fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _clear(self, dfd: int, name: str, for_dir: bool, shown: str) -> os.stat_result | None:
        """Make room for a new entry; returns the stat of what stays (a directory, or a link to be
        followed when a directory goes there)."""
        old = _lstat_at(dfd, name)
        if old is None:
            return None
        if stat.S_ISDIR(old.st_mode) or (for_dir and stat.S_ISLNK(old.st_mode)):
            if for_dir:
                return old
            raise CopyError(f"cannot replace the directory {shown} with a file")
        os.unlink(name, dir_fd=dfd)
        return None

    def copy_item(self, item: Item, dest_dir_fd: int, base: str, dest_name: str | None) -> None:
        """Copy `item` into the open directory `dest_dir_fd` (the rootfs path `base`): a file as
        `dest_name` (default its own name), a directory's content into that directory itself
        (dest_name None)."""
        if item.heredoc is not None:
            name = dest_name or item.name
            self._clear(dest_dir_fd, name, False, f"{base.rstrip('/')}/{name}")
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dest_dir_fd)  # fmt: skip
            try:
                os.write(fd, item.heredoc)
                os.fchown(fd, *(self.opts.chown or (0, 0)))
                os.fchmod(fd, self.opts.mode if self.opts.mode is not None else 0o644)
            finally:
                os.close(fd)
            return
        root = item.root
        assert root is not None
        dirs: dict[str, int] = {}
        for e in item.entries:
            if e.dest == "":
                if item.is_dir:
                    dirs[""] = dest_dir_fd
                    continue
                name = dest_name or item.name
                self._entry(root, e, dest_dir_fd, name, f"{base.rstrip('/')}/{name}")
                continue
            parent, _, name = e.dest.rpartition("/")
            pfd = dirs.get(parent)
            if pfd is None:
                continue  # below something that could not be made a directory
            opened = self._entry(root, e, pfd, name, f"{base.rstrip('/')}/{e.dest}")
            if opened is not None:
                dirs[e.dest] = opened

    def _entry(self, root: SourceRoot, e: Entry, dfd: int, name: str, shown: str) -> int | None:
        st = e.st
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            kept = self._clear(dfd, name, True, shown)
            if kept is not None and stat.S_ISLNK(kept.st_mode):
                # A link to a directory stays and is followed inside the rootfs (Debian's
                # lib -> usr/lib), as Docker does; its target keeps its own metadata.
                try:
                    fd = _in_root(self.target.fd, shown.lstrip("/"), os.O_RDONLY | os.O_DIRECTORY)
                except OSError:
                    os.unlink(name, dir_fd=dfd)
                    kept = None
                else:
                    self.opened.append(fd)
                    return fd
            if kept is None:
                os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            src = root.open_beneath(e.src, os.O_RDONLY | os.O_DIRECTORY)
            self.dir_meta.append((fd, st, src))
            return fd
        self._clear(dfd, name, False, shown)
        if stat.S_ISREG(mode):
            self._regular(root, e, dfd, name)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(e.src or ".", dir_fd=root.fd), name, dir_fd=dfd)
            os.chown(name, *self.owner_of(st), dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                os.chown(name, *self.owner_of(st), dir_fd=dfd, follow_symlinks=False)
                os.chmod(f"/proc/self/fd/{fd}", self.mode_of(st))
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd, follow_symlinks=False)
            finally:
                os.close(fd)
        return None

    def _regular(self, root: SourceRoot, e: Entry, dfd: int, name: str) -> None:
        st = e.st
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.links:
            os.link(f"/proc/self/fd/{self.links[key]}", name, dst_dir_fd=dfd, follow_symlinks=True)
            return
        src = root.open_beneath(e.src, os.O_RDONLY)
        try:
            sst = os.fstat(src)
            if not stat.S_ISREG(sst.st_mode):
                raise CopyError(f"{e.src!r} changed while it was copied")
            dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=dfd)  # fmt: skip
            try:
                offset = 0
                while True:
                    n = os.sendfile(dst, src, offset, 1 << 30)
                    if n == 0:
                        break
                    offset += n
                os.fchown(dst, *self.owner_of(st))
                os.fchmod(dst, self.mode_of(st))
                _copy_xattrs(src, dst)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                if st.st_nlink > 1 and len(self.links) < 4096:
                    self.links[key] = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            finally:
                os.close(dst)
        finally:
            os.close(src)


def copy_items(
    target: TargetRoot,
    items: Sequence[Item],
    dest: str,
    opts: CopyOptions,
    *,
    unpack: Callable[[Item], str | None] | None = None,
    scratch_dir: str | None = None,
) -> None:
    """Copy `items` to `dest` (absolute in the target rootfs) with Docker's rules: a directory's
    content goes into `dest`; a file goes to `dest` itself, or into it when `dest` ends with `/`, is
    an existing directory, or several sources are copied (which needs such a directory).
    `unpack(item)` names the archive kind of an item ADD extracts (into `dest`)."""
    dest_is_dir = dest.endswith("/") or dest.endswith("/.") or target.is_dir(dest)
    if len(items) > 1 and not dest_is_dir:
        raise CopyError(
            "when copying several sources (or a wildcard matching several files), the "
            f"destination must be a directory and end with a / (write {dest}/)"
        )
    new_owner = opts.chown or (0, 0)
    # one copier for the whole instruction: hard links between its sources stay hard links
    keep_owner = any(item.root is not None and item.root.keep_owner for item in items)
    copier = _Copier(target, opts, keep_owner=keep_owner)
    try:
        for item in items:
            kind = unpack(item) if unpack is not None else None
            if kind is not None:
                _unpack_into(target, item, kind, dest, opts, new_owner, scratch_dir)
                continue
            if item.is_dir or dest_is_dir:
                dfd, created = target.mkdir_all(dest, new_owner)
                try:
                    if item.is_dir and created:
                        # a directory the copy creates takes the source directory's metadata
                        top = item.entries[0]
                        assert item.root is not None
                        src = item.root.open_beneath(top.src, os.O_RDONLY | os.O_DIRECTORY)
                        copier.dir_meta.append((os.dup(dfd), top.st, src))
                    copier.copy_item(item, dfd, dest, None if item.is_dir else item.name)
                finally:
                    os.close(dfd)
            else:
                parent, _, name = dest.rstrip("/").rpartition("/")
                dfd, _ = target.mkdir_all(parent or "/", new_owner)
                try:
                    copier.copy_item(item, dfd, parent or "/", name)
                finally:
                    os.close(dfd)
        copier.finish_dirs()
    except OSError as exc:
        raise CopyError(f"cannot copy to {dest}: {exc.strerror or exc}") from None
    finally:
        copier.close()


def _unpack_into(
    target: TargetRoot,
    item: Item,
    kind: str,
    dest: str,
    opts: CopyOptions,
    new_owner: tuple[int, int],
    scratch_dir: str | None,
) -> None:
    """ADD of a local archive: unpack it safely into a scratch directory, then copy that tree into
    `dest` (merging with what is there); the archive's owners are kept unless --chown is given."""
    assert item.root is not None
    work = tempfile.mkdtemp(prefix="add-", dir=scratch_dir)
    try:
        tree = os.path.join(work, "tree")
        extract_archive(item.root, item.entries[0].src, kind, tree)
        root = SourceRoot(path=tree, label="archive", keep_owner=True)
        root.open()
        try:
            content = _item(root, "", root.lstat(""), item.name, None)
            copier = _Copier(target, opts, keep_owner=True)
            dfd, _ = target.mkdir_all(dest, new_owner)
            try:
                copier.copy_item(content, dfd, dest, None)
                copier.finish_dirs()
            finally:
                os.close(dfd)
                copier.close()
        finally:
            root.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
