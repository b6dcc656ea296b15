"""OCI image layers: read (plain tar, gzip, zstd), apply with whiteouts, and create — safely.

Layers are untrusted input. The model is containerd's `archive` package and the OCI image-spec's
"layer.md": a layer is a tar changeset; `.wh.NAME` deletes NAME from the lower layers and
`.wh..wh..opq` empties a directory's lower content while keeping what the same layer adds.

Applying a layer never leaves the destination half-changed (see docs/layers.md):

1. **Stage.** The tar is streamed once. Every member is validated (names, link targets, types,
   sizes) and written into a private staging directory on the destination's file system — a sibling
   of `dest` when that is on the same mount, otherwise a hidden directory inside `dest`. The
   uncompressed stream is hashed on the way, so the diff_id is known when the tar ends.
2. **Verify.** A wrong `expected_diff_id`, a corrupt or truncated stream, or any refused member
   raises here, before `dest` has been touched; the staging directory is removed.
3. **Commit.** The staged tree is merged into `dest` with renames only: lower entries that are
   whited out or replaced are renamed into the staging "trash", staged entries are renamed into
   place, and the layer's directory metadata is applied last. Every step is journaled; if one fails
   the journal is undone in reverse (entries renamed back, metadata and directory times restored),
   so `dest` is as it was. After success the trash is deleted.

Everything inside `dest` is reached with `openat`-style walking (`O_NOFOLLOW | O_DIRECTORY` one
component at a time), so no write can follow a symlink out of `dest`. Symlinks that the lower
layers put on a parent path (Debian's `lib -> usr/lib`) are followed the way Docker and containerd
do, but resolved *inside* `dest` as if it were `/`; a symlink that this same layer creates is never
written through.

`apply_layer(..., whiteouts="overlay")` unpacks a layer into its own directory for an overlayfs
snapshotter: whiteouts become 0:0 character devices and opaque directories get the overlay opaque
xattr. `create_layer` goes the other way, from an overlay upper directory (or a full-tree diff)
to a reproducible PAX layer; `dir_to_layer` archives a whole root file system.
"""

from __future__ import annotations

import base64
import errno
import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.parse
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, BinaryIO, Literal

from cocon._streams import Peekable
from cocon.images.errors import LayerError, UnsafeLayer

if TYPE_CHECKING:
    import zstandard

log = logging.getLogger(__name__)

Compression = Literal["gzip", "zstd"] | None

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

MEDIA_TYPE_TAR = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPES: dict[Compression, str] = {
    None: MEDIA_TYPE_TAR,
    "gzip": MEDIA_TYPE_TAR + "+gzip",
    "zstd": MEDIA_TYPE_TAR + "+zstd",
}

MAX_NAME_BYTES = 255  # NAME_MAX
MAX_PATH_BYTES = 4095  # PATH_MAX without the NUL
MAX_DEPTH = 256  # path components of one member; bounds recursion and open descriptors
MAX_SYMLINKS = 40  # like the kernel's limit when resolving a path
MAX_SPECIAL_HEADER = 1 << 20  # PAX and GNU long-name headers, like Go's archive/tar
_SPECIAL_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)

_CHUNK = 1 << 20
_ZSTD_SLICE = 1024  # compressed bytes per decompress call: bounds the output of one call (~32 MiB)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_TWO63 = 1 << 63
_IS_ROOT = os.geteuid() == 0


# --- reading: compression detection and hashing ----------------------------------------------------


class _ZstdReader:
    """Streaming zstd decompression that notices truncation (zstandard's stream_reader does not).

    The input is fed in small slices so that one call's output stays bounded even for a
    decompression bomb; frames are read back to back, as `zstd -d` does."""

    def __init__(self, raw: Peekable) -> None:
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self._in = b""
        self._pos = 0
        self._out = bytearray()
        self._done = False

    def read(self, n: int = -1) -> bytes:
        while not self._done and (n < 0 or len(self._out) < n):
            self._step()
        if n < 0 or n > len(self._out):
            n = len(self._out)
        data = bytes(self._out[:n])
        del self._out[:n]
        return data

    def _step(self) -> None:
        if self._pos >= len(self._in):
            self._in, self._pos = self._raw.read(64 * 1024), 0
            if not self._in:
                if self._obj is not None and not self._obj.eof:
                    raise LayerError("the zstd stream ends in the middle of a frame: the layer is truncated")
                self._done = True
                return
        if self._obj is None or self._obj.eof:
            self._obj = self._dctx.decompressobj()
        piece = memoryview(self._in)[self._pos : self._pos + _ZSTD_SLICE]
        self._pos += len(piece)
        try:
            self._out += self._obj.decompress(piece)
        except self._zstd.ZstdError as e:
            raise LayerError(f"corrupt zstd stream: {e}") from e
        if self._obj.eof:
            rest = self._obj.unused_data
            if rest:
                self._in, self._pos = rest + self._in[self._pos :], 0


class _HashingReader:
    """Hashes and counts the uncompressed stream as tarfile reads it; decompression errors become
    LayerError. Has just enough of a file's interface for tarfile's stream mode."""

    def __init__(self, src: Any, max_size: int | None) -> None:
        self._src = src
        self._max = max_size
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self._src.read(n)
        except LayerError:
            raise
        except EOFError as e:
            raise LayerError(f"the compressed stream is truncated ({e})") from e
        except (OSError, zlib.error) as e:
            raise LayerError(f"cannot read the layer: {e}") from e
        except Exception as e:  # zstandard.ZstdError and friends
            raise LayerError(f"cannot decompress the layer: {e}") from e
        self.sha.update(data)
        self.size += len(data)
        if self._max is not None and self.size > self._max:
            raise LayerError(f"the layer is larger than the limit of {self._max} bytes uncompressed")
        return data

    def write(self, data: bytes) -> int:
        raise OSError(errno.EBADF, "read-only stream")

    def tell(self) -> int:
        return self.size

    def seek(self, pos: int, whence: int = 0) -> int:
        raise OSError(errno.ESPIPE, "not seekable")

    def close(self) -> None:
        pass


class _TarInfo(tarfile.TarInfo):
    """Records why tarfile stopped reading headers: tarfile ends the archive quietly on a corrupt or
    truncated header after the first member, and we want to tell that apart from a proper end."""

    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        # tarfile reads a PAX or GNU long-name header into memory whole: cap it like Go's tar.
        if self.type in _SPECIAL_TYPES and self.size > MAX_SPECIAL_HEADER:
            raise LayerError(
                f"a tar extended header of {self.size} bytes (the limit is {MAX_SPECIAL_HEADER}): "
                "the layer is corrupt or hostile"
            )
        return getattr(super(), "_proc_member")(tarfile)  # noqa: B009 - not in typeshed

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> _TarInfo:
        try:
            return super().fromtarfile(tarfile)
        except Exception as e:
            if isinstance(tarfile, _TarFile):
                tarfile.header_error = e
            raise


class _TarFile(tarfile.TarFile):
    header_error: Exception | None = None
    members: list[tarfile.TarInfo]  # not in typeshed


# tarfile's header errors are not in typeshed.
_EOFHeaderError: type[Exception] = getattr(tarfile, "EOFHeaderError")  # noqa: B009
_EmptyHeaderError: type[Exception] = getattr(tarfile, "EmptyHeaderError")  # noqa: B009
_TruncatedHeaderError: type[Exception] = getattr(tarfile, "TruncatedHeaderError")  # noqa: B009


def _detect(head: Peekable) -> Compression:
    magic = head.peek(4)
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic == ZSTD_MAGIC:
        return "zstd"
    return None


def _media_compression(media_type: str) -> Compression | str:
    if media_type.endswith(("+gzip", ".gzip")):
        return "gzip"
    if media_type.endswith(("+zstd", ".zstd")):
        return "zstd"
    if media_type.endswith((".tar", "tar.diff")):
        return None
    return "unknown"


class LayerReader:
    """A layer opened for streaming, from `open_layer`: iterate its members in order (a regular
    member's data is readable with `extractfile` while it is the current member), then call
    `finish()` for the diff_id and uncompressed size."""

    def __init__(
        self,
        raw: IO[bytes],
        *,
        close_raw: bool,
        media_type: str | None = None,
        max_size: int | None = None,
        name: str = "layer",
        allow_missing_end: bool = False,
    ) -> None:
        self._raw = raw
        self._close_raw = close_raw
        self.name = name
        self._allow_missing_end = allow_missing_end
        self._ended = False
        try:
            head = Peekable(raw)
            self.compression: Compression = _detect(head)
            if media_type is not None:
                declared = _media_compression(media_type)
                if declared != self.compression:
                    log.debug(
                        "%s: media type %s but the content is %s; going by the content",
                        name,
                        media_type,
                        self.compression or "plain tar",
                    )
            stream: Any
            if self.compression == "gzip":
                stream = gzip.GzipFile(fileobj=head, mode="rb")
            elif self.compression == "zstd":
                stream = _ZstdReader(head)
            else:
                stream = head
            self._hashing = _HashingReader(stream, max_size)
            try:
                self.tar = _TarFile.open(
                    fileobj=self._hashing,
                    mode="r|",
                    tarinfo=_TarInfo,
                    bufsize=_CHUNK,
                )
            except tarfile.TarError as e:
                raise LayerError(f"{name} is not a tar archive (or is corrupt): {e}") from e
        except BaseException:
            if close_raw:
                raw.close()
            raise

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        tar = self.tar
        while not self._ended:
            try:
                member = tar.next()
            except LayerError:
                raise
            except (tarfile.TarError, EOFError, zlib.error) as e:
                if self._allow_missing_end and str(e) == "unexpected end of data":
                    self._ended = True  # the last member's padding is missing too: see open_layer
                    return
                raise LayerError(f"{self.name} is corrupt or truncated: {e}") from e
            if member is None:
                self._ended = True
                self._check_end()
                return
            tar.members.clear()  # stream mode: nothing refers back to earlier members
            yield member

    def _check_end(self) -> None:
        err = self.tar.header_error
        if err is None or isinstance(err, _EOFHeaderError):
            return
        if isinstance(err, _EmptyHeaderError):
            if self._allow_missing_end:
                return
            raise LayerError(f"{self.name} ends without the tar end-of-archive marker: it is truncated")
        if isinstance(err, _TruncatedHeaderError):
            raise LayerError(f"{self.name} ends in the middle of a tar header: it is truncated")
        raise LayerError(f"{self.name} has a corrupt tar header at offset {self.tar.offset}: {err}")

    def extractfile(self, member: tarfile.TarInfo) -> IO[bytes] | None:
        return self.tar.extractfile(member)

    def finish(self) -> tuple[str, int]:
        """Read to the end (members left unread, padding after the end-of-archive marker) and
        return ("sha256:<hex>" of the uncompressed stream, its size)."""
        for _ in self:
            pass
        while self._hashing.read(_CHUNK):
            pass
        return "sha256:" + self._hashing.sha.hexdigest(), self._hashing.size

    def close(self) -> None:
        try:
            self.tar.close()
        finally:
            if self._close_raw:
                self._raw.close()

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_layer(
    path_or_fileobj: str | os.PathLike[str] | IO[bytes],
    media_type: str | None = None,
    *,
    max_size: int | None = None,
    allow_missing_end: bool = False,
) -> LayerReader:
    """Open a layer blob for streaming. The compression (gzip, zstd or none) is detected from the
    content's magic bytes; `media_type` is only a hint and may disagree. A path is closed with the
    reader; a file object is left open. `max_size` caps the uncompressed size (decompression bombs).
    `allow_missing_end` accepts a stream that stops after the last member's data, without its
    padding or the end-of-archive marker, as Go's archive/tar does (umoci 0.4.7 writes such
    layers); only safe when the caller checks the diff_id, which catches any truncation."""
    if isinstance(path_or_fileobj, (str, os.PathLike)):
        path = os.fspath(path_or_fileobj)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by LayerReader.close
        except OSError as e:
            raise LayerError(f"cannot open layer {path}: {e.strerror}") from e
        return LayerReader(
            f,
            close_raw=True,
            media_type=media_type,
            max_size=max_size,
            name=f"layer {path}",
            allow_missing_end=allow_missing_end,
        )
    return LayerReader(
        path_or_fileobj,
        close_raw=False,
        media_type=media_type,
        max_size=max_size,
        allow_missing_end=allow_missing_end,
    )


# --- member names, ids, times, xattrs ---------------------------------------------------------------


def _clean_path(name: str, member: str, what: str = "path") -> list[str]:
    """The components of a member path relative to the layer root; refuses escapes."""
    if "\x00" in name:
        raise LayerError(f"layer member {member!r}: its {what} contains a NUL byte")
    if len(os.fsencode(name)) > MAX_PATH_BYTES:
        raise LayerError(f"layer member {member[:80]!r}...: {what} longer than {MAX_PATH_BYTES} bytes")
    if name.startswith("/"):
        raise UnsafeLayer(
            f"layer member {member!r}: absolute {what} {name!r}; layers hold paths relative to the root"
        )
    parts: list[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UnsafeLayer(f"layer member {member!r}: {what} {name!r} climbs out of the layer root")
            parts.pop()
            continue
        if len(os.fsencode(comp)) > MAX_NAME_BYTES:
            raise LayerError(
                f"layer member {member!r}: a name in its {what} is longer than {MAX_NAME_BYTES} bytes"
            )
        parts.append(comp)
    if len(parts) > MAX_DEPTH:
        raise LayerError(f"layer member {member[:80]!r}...: {what} deeper than {MAX_DEPTH} directories")
    return parts


def _ids(m: tarfile.TarInfo) -> tuple[int, int]:
    if not (0 <= m.uid < 0xFFFFFFFF and 0 <= m.gid < 0xFFFFFFFF):
        raise LayerError(f"layer member {m.name!r}: invalid owner {m.uid}:{m.gid}")
    return m.uid, m.gid


def _pax_ns(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        ns = int(Decimal(value) * 1_000_000_000)
    except (InvalidOperation, ValueError):
        return None
    return ns


def _times(m: tarfile.TarInfo) -> tuple[int, int]:
    mtime = _pax_ns(m.pax_headers.get("mtime"))
    if mtime is None:
        mtime = int(Decimal(repr(m.mtime)) * 1_000_000_000)
    atime = _pax_ns(m.pax_headers.get("atime"))
    if atime is None:
        atime = mtime
    if not (-_TWO63 < mtime < _TWO63 and -_TWO63 < atime < _TWO63):
        raise LayerError(f"layer member {m.name!r}: its time is out of range")
    return atime, mtime


def keep_xattr(name: str) -> bool:
    """Extended attributes a layer may carry: user.*, trusted.* and security.capability.

    Overlayfs' own attributes (trusted.overlay.*, user.overlay.*) are never taken from or put into a
    layer: they would change how an overlay mount of the layer behaves. Other security.* (SELinux
    labels, IMA) and system.* (ACLs) are host policy and are dropped."""
    if name.startswith(("trusted.overlay.", "user.overlay.")):
        return False
    return name.startswith(("user.", "trusted.")) or name == "security.capability"


def member_xattrs(m: tarfile.TarInfo) -> dict[str, bytes]:
    """The xattrs recorded in a member's PAX header (SCHILY.xattr.* and LIBARCHIVE.xattr.*)."""
    out: dict[str, bytes] = {}
    for key, value in m.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            name, data = key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr.") :])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError as e:
                raise LayerError(f"layer member {m.name!r}: bad LIBARCHIVE.xattr record {name!r}") from e
        else:
            continue
        if keep_xattr(name):
            out[name] = data
        else:
            log.debug("layer member %r: dropping xattr %s", m.name, name)
    return out


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("%s", msg)


def _set_xattrs(target: int | str, xattrs: dict[str, bytes], member: str, follow: bool = True) -> None:
    for name, value in xattrs.items():
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EPERM):
                # Like Docker: a file system without xattrs (or user.* on a symlink or device)
                # drops them rather than failing the whole image.
                _warn_once(
                    f"xattr:{name.split('.')[0]}:{e.errno}",
                    f"cannot set xattr {name} on {member!r} ({e.strerror}); dropping such xattrs",
                )
            else:
                raise


def _chown(target: int | str, uid: int, gid: int, dir_fd: int | None = None) -> None:
    try:
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            os.chown(target, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError:
        if _IS_ROOT:
            raise
        _warn_once("chown", "not root: layer file ownership is not applied")


def _apply_meta_fd(fd: int, m: tarfile.TarInfo) -> None:
    uid, gid = _ids(m)
    _chown(fd, uid, gid)
    os.fchmod(fd, m.mode & 0o7777)  # after chown, which clears setuid/setgid
    _set_xattrs(fd, member_xattrs(m), m.name)  # after chown and data: both clear security.capability
    os.utime(fd, ns=_times(m))


def _apply_meta_at(dir_fd: int, name: str, m: tarfile.TarInfo, symlink: bool) -> None:
    uid, gid = _ids(m)
    _chown(name, uid, gid, dir_fd)
    if not symlink:
        os.chmod(name, m.mode & 0o7777, dir_fd=dir_fd, follow_symlinks=False)
    xattrs = member_xattrs(m)
    if xattrs:
        _set_xattrs(f"/proc/self/fd/{dir_fd}/{name}", xattrs, m.name, follow=False)
    os.utime(name, ns=_times(m), dir_fd=dir_fd, follow_symlinks=False)


# --- descriptor-relative walking -------------------------------------------------------------------


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def _open_path(root_fd: int, path: str) -> int:
    """Open directory `path` below `root_fd` one component at a time, never following a symlink."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=root_fd)
    try:
        for comp in _split(path):
            nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _resolve_in_root(root_fd: int, path: str) -> str | None:
    """Resolve `path` below `root_fd` as if `root_fd` were `/` (chroot semantics: absolute symlinks
    start at the root, `..` stops at it). Returns the symlink-free path of the directory it leads to,
    or None if it does not lead to an existing directory."""
    pending = deque(_split(path))
    parts: list[str] = []
    links = 0
    while pending:
        comp = pending.popleft()
        if comp in ("", "."):
            continue
        if comp == "..":
            if parts:
                parts.pop()
            continue
        try:
            fd = _open_path(root_fd, "/".join(parts))
        except OSError:
            return None
        try:
            st = _lstat(fd, comp)
            if st is None:
                return None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_SYMLINKS:
                    return None
                target = os.readlink(comp, dir_fd=fd)
                if target.startswith("/"):
                    parts = []
                pending.extendleft(reversed(target.split("/")))
            elif stat.S_ISDIR(st.st_mode):
                parts.append(comp)
            else:
                return None
        finally:
            os.close(fd)
    return "/".join(parts)


# --- apply, step 1: stage and validate --------------------------------------------------------------


@dataclass(eq=False)
class _Node:
    """One path of the layer, as staged. Directories that the layer names only as parents are
    implicit: they merge into what the lower layers have and change none of its metadata."""

    kind: int  # stat.S_IFDIR, S_IFREG, S_IFLNK, ...
    explicit: bool = True
    member: tarfile.TarInfo | None = None
    children: dict[str, _Node] = field(default_factory=dict)
    whiteouts: dict[str, None] = field(default_factory=dict)  # lower names to delete, in order
    opaque: bool = False
    mark_opaque: bool = False  # overlay format: give the directory the opaque xattr
    additions: bool = False  # this node or something below it is added by the layer
    visit: bool = False  # ... or something below it is deleted


class _Stager:
    def __init__(self, tree_fd: int, overlay_xattr: str | None = None, parents: tuple[int, ...] = ()) -> None:
        self.tree_fd = tree_fd
        self.overlay_xattr = overlay_xattr  # None: whiteouts delete; else write overlay format
        self.parents = parents  # overlay format: the lower layers' directories, topmost first
        self.root = _Node(stat.S_IFDIR, explicit=False)
        self.entries = 0
        self._cache: tuple[tuple[str, ...], int] | None = None

    def close(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None

    def run(self, reader: LayerReader) -> None:
        for m in reader:
            self.entries += 1
            try:
                self._add(m, reader)
            except LayerError:
                raise
            except (tarfile.TarError, EOFError, zlib.error) as e:
                raise LayerError(f"layer member {m.name!r}: {e}: the layer is truncated or corrupt") from e
            except OSError as e:
                raise LayerError(f"cannot stage layer member {m.name!r}: {e}") from e
        self.close()

    def _enter_parent(self, parts: list[str], member: str) -> tuple[_Node, int]:
        key = tuple(parts[:-1])
        node = self.root
        for i, comp in enumerate(key):
            if comp.startswith(WHITEOUT_PREFIX):
                raise LayerError(f"layer member {member!r}: whiteout name {comp!r} used as a directory")
            child = node.children.get(comp)
            if child is None:
                child = node.children[comp] = _Node(stat.S_IFDIR, explicit=False)
            elif child.kind == stat.S_IFLNK:
                raise UnsafeLayer(
                    f"layer member {member!r} would be written through {'/'.join(key[: i + 1])!r}, "
                    "a symlink in this same layer"
                )
            elif child.kind != stat.S_IFDIR:
                raise LayerError(
                    f"layer member {member!r}: its parent {'/'.join(key[: i + 1])!r} is not a directory"
                )
            node = child
        if self._cache is not None and self._cache[0] == key:
            return node, self._cache[1]
        self.close()
        fd = os.open(".", _DIR_FLAGS, dir_fd=self.tree_fd)
        try:
            for comp in key:
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        self._cache = (key, fd)
        return node, fd

    def _lookup(self, parts: list[str]) -> _Node | None:
        node = self.root
        for comp in parts:
            if node.kind != stat.S_IFDIR:
                return None
            child = node.children.get(comp)
            if child is None:
                return None
            node = child
        return node

    def _remove(self, pfd: int, name: str, node: _Node) -> None:
        if node.kind == stat.S_IFDIR:
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)

    def _add(self, m: tarfile.TarInfo, reader: LayerReader) -> None:
        parts = _clean_path(m.name, m.name)
        if not parts:
            if not m.isdir():
                raise LayerError(f"layer member {m.name!r} names the root but is not a directory")
            self.root.explicit, self.root.member = True, m
            return
        base = parts[-1]
        if base.startswith(WHITEOUT_PREFIX):
            parent, _ = self._enter_parent(parts, m.name)
            if base == OPAQUE_WHITEOUT:
                parent.opaque = True
            elif base.startswith(WHITEOUT_META_PREFIX):
                log.debug("layer member %r: skipping aufs metadata", m.name)
            else:
                target = base[len(WHITEOUT_PREFIX) :]
                if target in ("", ".", ".."):
                    raise UnsafeLayer(
                        f"layer member {m.name!r}: a whiteout must name one entry, not {target!r}"
                    )
                parent.whiteouts[target] = None
            return

        parent, pfd = self._enter_parent(parts, m.name)
        existing = parent.children.get(base)
        if m.isdir():
            if existing is not None and existing.kind == stat.S_IFDIR:
                existing.explicit, existing.member = True, m  # a repeated directory: last one wins
                return
            if existing is not None:
                self._remove(pfd, base, existing)
            os.mkdir(base, 0o700, dir_fd=pfd)
            parent.children[base] = _Node(stat.S_IFDIR, member=m)
            return

        if m.islnk():
            tparts = _clean_path(m.linkname, m.name, "hard link target")
            tnode = self._lookup(tparts) if tparts else None
            if tnode is None:
                raise LayerError(
                    f"layer member {m.name!r} is a hard link to {m.linkname!r}, which is not an earlier "
                    "member of this layer"
                )
            if tnode.kind == stat.S_IFDIR:
                raise LayerError(f"layer member {m.name!r} is a hard link to a directory")
            if tnode is existing:
                raise LayerError(f"layer member {m.name!r} is a hard link to itself")
            if existing is not None:
                self._remove(pfd, base, existing)
            tfd = _open_path(self.tree_fd, "/".join(tparts[:-1]))
            try:
                os.link(tparts[-1], base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(tfd)
            parent.children[base] = _Node(tnode.kind, member=m)
            return

        if existing is not None:
            self._remove(pfd, base, existing)
            del parent.children[base]
        if m.isreg():
            fd = os.open(
                base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=pfd
            )
            with open(fd, "wb") as f:
                src = reader.extractfile(m)
                if src is not None:
                    shutil.copyfileobj(src, f, _CHUNK)
                f.flush()
                _apply_meta_fd(fd, m)
            kind = stat.S_IFREG
        elif m.issym():
            if not m.linkname or "\x00" in m.linkname or len(os.fsencode(m.linkname)) > MAX_PATH_BYTES:
                raise LayerError(f"layer member {m.name!r}: invalid symlink target")
            os.symlink(m.linkname, base, dir_fd=pfd)
            _apply_meta_at(pfd, base, m, symlink=True)
            kind = stat.S_IFLNK
        elif m.ischr() or m.isblk() or m.isfifo():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK if m.isblk() else stat.S_IFIFO
            device = 0
            if kind != stat.S_IFIFO:
                if not (0 <= m.devmajor < 1 << 32 and 0 <= m.devminor < 1 << 32):
                    raise LayerError(f"layer member {m.name!r}: invalid device number")
                device = os.makedev(m.devmajor, m.devminor)
            try:
                os.mknod(base, kind | 0o600, device, dir_fd=pfd)
            except PermissionError as e:
                raise LayerError(
                    f"layer member {m.name!r}: cannot create a device node ({e.strerror})"
                ) from e
            _apply_meta_at(pfd, base, m, symlink=False)
        else:
            raise LayerError(f"layer member {m.name!r} has an unsupported tar type {m.type!r}")
        parent.children[base] = _Node(kind, member=m)

    def finalize(self) -> None:
        """Directory metadata once all content is in (post-order), and the add/visit flags."""
        self.close()
        fd = os.open(".", _DIR_FLAGS, dir_fd=self.tree_fd)
        try:
            self._finalize(self.root, fd, [], is_root=True)
        finally:
            os.close(fd)

    def _finalize(self, node: _Node, fd: int, parts: list[str], is_root: bool = False) -> None:
        if self.overlay_xattr is not None:
            self._overlay_format(node, fd)
        additions = node.explicit and not is_root
        visit = node.opaque or bool(node.whiteouts)
        for name, child in node.children.items():
            if child.kind == stat.S_IFDIR:
                cfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._finalize(child, cfd, [*parts, name])
                finally:
                    os.close(cfd)
            else:
                child.additions = child.visit = True
            additions = additions or child.additions
            visit = visit or child.visit
        node.additions = additions
        node.visit = visit or additions
        if node.explicit and not is_root and node.member is not None:
            _apply_meta_fd(fd, node.member)
        elif not is_root and self.parents:
            # An implicit directory of a layer in overlay format hides the lower layers' metadata
            # of that directory: copy it from them, as containerd does (WithParents).
            found = _lower_dir(self.parents, parts, self.overlay_xattr)
            if found is not None:
                st, xattrs = found
                _chown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                _set_xattrs(fd, xattrs, "/".join(parts))
                os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        if node.mark_opaque and not is_root and self.overlay_xattr is not None:
            os.setxattr(fd, self.overlay_xattr, b"y")

    def _overlay_format(self, node: _Node, fd: int) -> None:
        """Whiteouts as overlayfs keeps them in a layer directory: a 0:0 character device for a
        deleted name, the opaque xattr for a directory whose lower content is hidden (also when the
        layer deletes a directory and adds one of the same name)."""
        for name in node.whiteouts:
            child = node.children.get(name)
            if child is None:
                os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=fd)
                node.children[name] = _Node(stat.S_IFCHR)
            elif child.kind == stat.S_IFDIR:
                child.mark_opaque = True
        if node.opaque:
            node.mark_opaque = True


def _lower_dir(
    parents: tuple[int, ...], parts: list[str], opaque_xattr: str | None
) -> tuple[os.stat_result, dict[str, bytes]] | None:
    """The directory `parts` as an overlay of `parents` (topmost first) shows it: its stat and
    xattrs from the topmost layer that has it, or None if a whiteout, a non-directory or an opaque
    directory hides it first."""
    for top in parents:
        fd = os.open(".", _DIR_FLAGS, dir_fd=top)
        hides_lower = False  # a directory on the way is opaque in this layer
        try:
            for comp in parts:
                st = _lstat(fd, comp)
                if st is None:
                    if hides_lower:
                        return None
                    break  # not in this layer: look in the next one down
                if not stat.S_ISDIR(st.st_mode):
                    return None  # a whiteout or a non-directory hides it
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
                if opaque_xattr is not None and not hides_lower:
                    try:
                        hides_lower = os.getxattr(fd, opaque_xattr) == b"y"
                    except OSError:
                        pass
            else:
                return os.fstat(fd), _kept(_read_xattrs(fd, True))
        finally:
            os.close(fd)
    return None


# --- apply, step 3: commit with a journal ----------------------------------------------------------


def _hint(e: OSError) -> str:
    if e.errno == errno.EBUSY:
        return " (a mount point inside the destination? unmount it first)"
    if e.errno == errno.EXDEV:
        return (
            " (another file system inside the destination, or an overlayfs directory from a lower "
            "layer: apply layers to a plain directory, or with whiteouts='overlay' into the layer's own)"
        )
    return ""


@dataclass
class _Op:
    kind: Literal["in", "trash", "meta"]
    phys: str  # directory in dest, symlink-free, relative to dest
    name: str = ""
    other: str = ""  # "in": the staged parent path; "trash": the name in the trash
    old: tuple[int, int, int, dict[str, bytes | None]] | None = None  # "meta": mode, uid, gid, xattrs


class _Committer:
    def __init__(
        self,
        dest: str,
        dest_fd: int,
        tree_fd: int,
        trash_fd: int,
        reserved: str | None,
        overlay_xattr: str | None = None,
    ) -> None:
        self.dest = dest
        self.overlay_xattr = overlay_xattr
        self.dest_fd = dest_fd
        self.tree_fd = tree_fd
        self.trash_fd = trash_fd
        self.reserved = reserved  # the staging directory's name when it sits inside dest
        self.journal: list[_Op] = []
        self.touched: dict[str, tuple[int, int]] = {}
        self._trash_n = 0

    def run(self, root: _Node) -> None:
        sfd = os.open(".", _DIR_FLAGS, dir_fd=self.tree_fd)
        dfd = os.open(".", _DIR_FLAGS, dir_fd=self.dest_fd)
        try:
            self._merge(root, sfd, "", dfd, "")
            self._dir_meta(dfd, "", root)
        finally:
            os.close(sfd)
            os.close(dfd)

    def _touch(self, dfd: int, phys: str) -> None:
        if phys not in self.touched:
            st = os.fstat(dfd)
            self.touched[phys] = (st.st_atime_ns, st.st_mtime_ns)

    def _trash(self, dfd: int, phys: str, name: str, logical: str) -> None:
        self._touch(dfd, phys)
        tname = str(self._trash_n)
        self._trash_n += 1
        try:
            os.rename(name, tname, src_dir_fd=dfd, dst_dir_fd=self.trash_fd)
        except OSError as e:
            raise LayerError(
                f"cannot remove {_join(phys, name)!r} (for {logical!r}) in {self.dest}: {e}{_hint(e)}"
            ) from e
        self.journal.append(_Op("trash", phys, name, tname))

    def _move_in(self, sfd: int, srel: str, dfd: int, phys: str, name: str) -> None:
        self._touch(dfd, phys)
        try:
            os.rename(name, name, src_dir_fd=sfd, dst_dir_fd=dfd)
        except OSError as e:
            raise LayerError(f"cannot put {_join(srel, name)!r} into {self.dest}: {e}{_hint(e)}") from e
        self.journal.append(_Op("in", phys, name, srel))

    def _dir_meta(self, fd: int, phys: str, node: _Node) -> None:
        """The layer's metadata for a directory that was merged into an existing one, journaled."""
        m = node.member if node.explicit else None
        extra = {self.overlay_xattr: b"y"} if node.mark_opaque and self.overlay_xattr else {}
        if m is None and not extra:
            return
        self._touch(fd, phys)
        st = os.fstat(fd)
        old: dict[str, bytes | None] = {}
        for name in [*(member_xattrs(m) if m is not None else {}), *extra]:
            try:
                old[name] = os.getxattr(fd, name)
            except OSError:
                old[name] = None
        self.journal.append(_Op("meta", phys, old=(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, old)))
        if m is not None:
            _apply_meta_fd(fd, m)
        for name, value in extra.items():
            os.setxattr(fd, name, value)

    def _merge(self, node: _Node, sfd: int, srel: str, dfd: int, phys: str) -> None:
        if node.opaque:
            for name in sorted(os.listdir(dfd)):
                if not (phys == "" and name == self.reserved):
                    self._trash(dfd, phys, name, _join(srel, OPAQUE_WHITEOUT))
        for name in node.whiteouts:
            if phys == "" and name == self.reserved:
                continue
            if _lstat(dfd, name) is not None:
                self._trash(dfd, phys, name, _join(srel, WHITEOUT_PREFIX + name))
        for name, child in node.children.items():
            if not child.visit:
                continue
            logical = _join(srel, name)
            if phys == "" and name == self.reserved:
                raise LayerError(f"layer member {logical!r} collides with the staging directory; retry")
            st = _lstat(dfd, name)
            if child.kind == stat.S_IFDIR:
                target: str | None = None
                if st is not None and stat.S_ISDIR(st.st_mode):
                    target = _join(phys, name)
                elif not child.explicit and st is not None:
                    # An implicit parent that the lower layers have as something else: follow a
                    # symlink inside dest (lib -> usr/lib), as Docker and containerd do.
                    if stat.S_ISLNK(st.st_mode):
                        target = _resolve_in_root(self.dest_fd, _join(phys, name))
                        if target is not None and _split(target)[:1] == [self.reserved]:
                            raise UnsafeLayer(f"layer member {logical!r} leads into the staging directory")
                    if target is None:
                        if child.additions:
                            what = (
                                "a symlink that does not lead to a directory"
                                if stat.S_ISLNK(st.st_mode)
                                else "a non-directory"
                            )
                            raise LayerError(
                                f"layer member {logical!r}: the lower layers have {logical!r} as {what}; "
                                "the layer does not fit on them"
                            )
                        continue
                elif not child.explicit and not child.additions:
                    continue  # whiteouts below a directory the lower layers do not have
                if target is not None:
                    csfd = os.open(name, _DIR_FLAGS, dir_fd=sfd)
                    try:
                        cdfd = _open_path(self.dest_fd, target)
                        try:
                            self._merge(child, csfd, logical, cdfd, target)
                            self._dir_meta(cdfd, target, child)
                        finally:
                            os.close(cdfd)
                    finally:
                        os.close(csfd)
                    continue
            if st is not None:
                self._trash(dfd, phys, name, logical)
            self._move_in(sfd, srel, dfd, phys, name)

    def rollback(self) -> list[str]:
        problems: list[str] = []
        for op in reversed(self.journal):
            try:
                dfd = _open_path(self.dest_fd, op.phys)
                try:
                    if op.kind == "in":
                        sfd = _open_path(self.tree_fd, op.other)
                        try:
                            os.rename(op.name, op.name, src_dir_fd=dfd, dst_dir_fd=sfd)
                        finally:
                            os.close(sfd)
                    elif op.kind == "trash":
                        os.rename(op.other, op.name, src_dir_fd=self.trash_fd, dst_dir_fd=dfd)
                    elif op.old is not None:
                        mode, uid, gid, xattrs = op.old
                        os.fchown(dfd, uid, gid)
                        os.fchmod(dfd, mode)
                        for name, value in xattrs.items():
                            try:
                                if value is None:
                                    os.removexattr(dfd, name)
                                else:
                                    os.setxattr(dfd, name, value)
                            except OSError as e:
                                if e.errno not in (errno.ENODATA, errno.ENOTSUP):
                                    raise
                finally:
                    os.close(dfd)
            except OSError as e:
                problems.append(f"{op.kind} {_join(op.phys, op.name)}: {e}")
        for phys, times in self.touched.items():
            try:
                fd = _open_path(self.dest_fd, phys)
            except OSError:
                continue  # a directory of the layer that went back to staging
            try:
                os.utime(fd, ns=times)
            except OSError as e:
                problems.append(f"times of {phys or '.'}: {e}")
            finally:
                os.close(fd)
        return problems


# --- apply_layer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyResult:
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # bytes of the uncompressed tar
    entries: int  # tar members, whiteouts included
    compression: Compression


def _mnt_id(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _make_staging(dest: str, dest_fd: int) -> tuple[str, bool]:
    """A private directory on dest's mount: a sibling if possible, else inside dest (hidden)."""
    parent = os.path.dirname(dest)
    if dest != parent:
        try:
            pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pfd = -1
        if pfd >= 0:
            try:
                same_dev = os.fstat(pfd).st_dev == os.fstat(dest_fd).st_dev
                same_mount = same_dev and _mnt_id(pfd) == _mnt_id(dest_fd)
            finally:
                os.close(pfd)
            if same_mount:
                try:
                    prefix = f".{os.path.basename(dest)}.cocon-apply-"
                    return tempfile.mkdtemp(prefix=prefix, dir=parent), False
                except OSError:
                    pass
    return tempfile.mkdtemp(prefix=".cocon-apply-", dir=dest), True


def apply_layer(
    layer: str | os.PathLike[str] | BinaryIO,
    dest: str | os.PathLike[str],
    *,
    media_type: str | None = None,
    expected_diff_id: str | None = None,
    max_size: int | None = None,
    whiteouts: Literal["delete", "overlay"] = "delete",
    opaque_xattr: str = "trusted.overlay.opaque",
    parents: Sequence[str] = (),
) -> ApplyResult:
    """Apply one layer (plain tar, gzip or zstd) onto the directory `dest`, whiteouts included.

    Raises UnsafeLayer for a hostile member and LayerError for anything else that stops the layer
    (corrupt or truncated data, a diff_id other than `expected_diff_id`, more than `max_size`
    uncompressed bytes, I/O errors); in every such case `dest` is left as it was. Not for two
    concurrent writers on the same `dest`.

    `whiteouts="delete"` (the default) applies the layer onto the lower content in `dest`.
    `whiteouts="overlay"` unpacks a layer into its own (normally empty) directory, to be used as an
    overlayfs lower: a whiteout is also written as a 0:0 character device, an opaque directory
    gets `opaque_xattr`=y (`user.overlay.opaque` for overlays mounted with `userxattr`), and a
    directory the layer implies without an entry of its own copies its metadata from `parents`,
    the lower layers' directories, topmost first (else it is 0755 root:root)."""
    if whiteouts not in ("delete", "overlay"):
        raise LayerError(f"unknown whiteout handling {whiteouts!r}: use 'delete' or 'overlay'")
    if opaque_xattr not in ("trusted.overlay.opaque", "user.overlay.opaque"):
        raise LayerError(f"{opaque_xattr!r} is not an overlayfs opaque xattr")
    overlay_xattr = opaque_xattr if whiteouts == "overlay" else None
    if expected_diff_id is not None and not _DIGEST_RE.fullmatch(expected_diff_id):
        raise LayerError(f"expected diff_id {expected_diff_id!r} is not of the form sha256:<64 hex digits>")
    dest = os.path.abspath(os.fspath(dest))
    created = False
    try:
        dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        try:
            os.mkdir(dest, 0o755)
            dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise LayerError(f"cannot create the destination {dest}: {e.strerror}") from e
        created = True
    except OSError as e:
        raise LayerError(f"cannot open the destination {dest}: {e.strerror}") from e

    ok = False
    try:
        root_st = os.fstat(dest_fd)
        root_times = (root_st.st_atime_ns, root_st.st_mtime_ns)
        try:
            staging, inside = _make_staging(dest, dest_fd)
        except OSError as e:
            raise LayerError(f"cannot make a staging directory for {dest}: {e}") from e
        final_times: tuple[int, int] | None = root_times
        try:
            result, final_times = _apply(
                layer,
                dest,
                dest_fd,
                staging,
                inside,
                media_type,
                expected_diff_id,
                max_size,
                root_times,
                overlay_xattr,
                tuple(parents),
            )
            ok = True
        finally:
            try:
                shutil.rmtree(staging)
            except OSError as e:
                log.warning("cannot remove the staging directory %s: %s", staging, e)
            if inside:
                # Making and removing the staging directory changed dest's own times.
                times = final_times if ok else root_times
                if times is not None:
                    os.utime(dest_fd, ns=times)
        return result
    finally:
        os.close(dest_fd)
        if created and not ok:
            try:
                os.rmdir(dest)
            except OSError:
                pass


def _apply(
    layer: str | os.PathLike[str] | BinaryIO,
    dest: str,
    dest_fd: int,
    staging: str,
    inside: bool,
    media_type: str | None,
    expected_diff_id: str | None,
    max_size: int | None,
    root_times: tuple[int, int],
    overlay_xattr: str | None,
    parents: tuple[str, ...],
) -> tuple[ApplyResult, tuple[int, int] | None]:
    """Stage, verify, commit. Returns the result and the times dest itself should end with (None:
    as they are now)."""
    tree, trash = os.path.join(staging, "tree"), os.path.join(staging, "trash")
    os.mkdir(tree, 0o700)
    os.mkdir(trash, 0o700)
    tree_fd = os.open(tree, _DIR_FLAGS)
    trash_fd = -1
    parent_fds: list[int] = []
    try:
        trash_fd = os.open(trash, _DIR_FLAGS)
        for p in parents if overlay_xattr is not None else ():
            try:
                parent_fds.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as e:
                raise LayerError(f"cannot open the parent layer {p}: {e.strerror}") from e
        # 1. Stage and validate every member; hash the uncompressed stream.
        stager = _Stager(tree_fd, overlay_xattr, tuple(parent_fds))
        try:
            # With a diff_id to check, a missing end-of-archive marker is harmless (Go's tar reader
            # accepts it too): a truncated stream cannot hash to the expected diff_id.
            lenient = expected_diff_id is not None
            reader = open_layer(layer, media_type, max_size=max_size, allow_missing_end=lenient)
            with reader:
                stager.run(reader)
                diff_id, size = reader.finish()
        finally:
            stager.close()
        # 2. Verify, before dest is touched.
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise LayerError(
                f"the layer's diff_id is {diff_id}, not the expected {expected_diff_id}: it is corrupt or "
                f"not the layer the image names; nothing was applied to {dest}"
            )
        try:
            stager.finalize()
        except OSError as e:
            raise LayerError(f"cannot stage the layer's directories: {e}") from e
        # 3. Commit with renames, undone on any failure.
        reserved = os.path.basename(staging) if inside else None
        committer = _Committer(dest, dest_fd, tree_fd, trash_fd, reserved, overlay_xattr)
        try:
            committer.run(stager.root)
        except BaseException as e:
            problems = committer.rollback()
            if problems:
                raise LayerError(
                    f"applying the layer to {dest} failed ({e}) and undoing it failed too; {dest} may be "
                    f"inconsistent, recreate it: {'; '.join(problems)}"
                ) from e
            if isinstance(e, OSError):
                raise LayerError(f"cannot apply the layer to {dest}: {e}; nothing was changed") from e
            if isinstance(e, LayerError):
                raise type(e)(f"{e}; {dest} was left as it was") from e
            raise
        result = ApplyResult(
            diff_id=diff_id, size=size, entries=stager.entries, compression=reader.compression
        )
        if stager.root.explicit and stager.root.member is not None:
            return result, _times(stager.root.member)
        return result, (None if "" in committer.touched else root_times)
    finally:
        os.close(tree_fd)
        if trash_fd >= 0:
            os.close(trash_fd)
        for fd in parent_fds:
            os.close(fd)


# --- creating layers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    digest: str  # "sha256:<hex>" of the bytes written to `out` (the blob's descriptor digest)
    diff_id: str  # "sha256:<hex>" of the uncompressed tar
    size: int  # bytes written to `out`
    uncompressed_size: int
    media_type: str
    entries: int


class _HashingWriter:
    def __init__(self, out: Any) -> None:
        self._out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._out.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def read(self, n: int = -1) -> bytes:
        raise OSError(errno.EBADF, "write-only stream")

    def tell(self) -> int:
        return self.size

    def seek(self, pos: int, whence: int = 0) -> int:
        raise OSError(errno.ESPIPE, "not seekable")

    def close(self) -> None:
        pass


class _LayerWriter:
    """tar (PAX) -> hash of the uncompressed stream -> compressor -> hash of the blob -> out."""

    def __init__(self, out: IO[bytes] | BinaryIO, compression: Compression) -> None:
        self.compression = compression
        self.blob = _HashingWriter(out)
        self._compressor: Any = None
        if compression == "gzip":
            # No name and mtime 0 in the gzip header: the same tree gives the same blob.
            self._compressor = gzip.GzipFile(
                filename="", mode="wb", fileobj=self.blob, mtime=0, compresslevel=6
            )
        elif compression == "zstd":
            import zstandard

            cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
            self._compressor = cctx.stream_writer(self.blob, closefd=False)  # type: ignore[arg-type]
        elif compression is not None:
            raise LayerError(f"unknown layer compression {compression!r}: use 'gzip', 'zstd' or None")
        self.plain = _HashingWriter(self._compressor if self._compressor is not None else self.blob)
        self.tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=self.plain, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_CHUNK
        )
        self.entries = 0

    def add(self, info: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        self.tar.addfile(info, fileobj)
        self.entries += 1

    def close(self) -> LayerInfo:
        self.tar.close()
        if self._compressor is not None:
            self._compressor.close()
        self.blob.flush()
        return LayerInfo(
            digest="sha256:" + self.blob.sha.hexdigest(),
            diff_id="sha256:" + self.plain.sha.hexdigest(),
            size=self.blob.size,
            uncompressed_size=self.plain.size,
            media_type=MEDIA_TYPES[self.compression],
            entries=self.entries,
        )


def _read_xattrs(target: int | str, follow: bool) -> dict[str, bytes]:
    """All xattrs of a file that a layer may carry, plus overlayfs' own (for the caller to read)."""
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    out: dict[str, bytes] = {}
    for name in sorted(names):
        if keep_xattr(name) or name.startswith(("trusted.overlay.", "user.overlay.")):
            try:
                out[name] = os.getxattr(target, name, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                    raise
    return out


_OVERLAY_UNSUPPORTED = ("redirect", "metacopy")


class _Archiver:
    """Walks directories with descriptors (O_NOFOLLOW at every step, regular files reopened from an
    O_PATH descriptor after checking their type) so that a tree that changes under us — a running
    container's upper directory — cannot make us read a file outside it or open a device."""

    def __init__(self, writer: _LayerWriter, *, overlay: bool, clamp: int | None) -> None:
        self.w = writer
        self.overlay = overlay
        self.clamp = clamp
        self.hardlinks: dict[tuple[int, int], str] = {}
        self.pending: list[tarfile.TarInfo] = []  # parent directories written only if a change follows

    def _mtime(self, st: os.stat_result) -> int:
        mtime = st.st_mtime_ns // 1_000_000_000
        return min(mtime, self.clamp) if self.clamp is not None else mtime

    def _info(self, path: str, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = self._mtime(st)
        info.pax_headers = {
            "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
            for k, v in xattrs.items()
            if keep_xattr(k)
        }
        return info

    def _whiteout(self, path: str, st: os.stat_result, mode: int = 0o600) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = tarfile.REGTYPE
        info.mode = mode
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = self._mtime(st)
        return info

    def _add(self, info: tarfile.TarInfo, fileobj: IO[bytes] | None = None) -> None:
        for parent in self.pending:
            self.w.add(parent)
        self.pending.clear()
        self.w.add(info, fileobj)

    def _check_overlay(self, path: str, xattrs: dict[str, bytes]) -> None:
        for prefix in ("trusted.overlay.", "user.overlay."):
            for feature in _OVERLAY_UNSUPPORTED:
                if prefix + feature in xattrs:
                    raise LayerError(
                        f"{path!r} in the upper directory uses overlayfs {feature}; mount the overlay with "
                        f"redirect_dir=off,metacopy=off to commit it as a layer"
                    )

    def entry(self, dir_fd: int, name: str, path: str, st: os.stat_result) -> int | None:
        """Write the entry for `name` (a whiteout, in overlay mode, for a 0:0 character device).
        Returns an open descriptor for a directory to descend into, else None."""
        if name.startswith(WHITEOUT_PREFIX):
            raise LayerError(
                f"{path!r}: a file whose name starts with {WHITEOUT_PREFIX} cannot be put in a layer"
            )
        mode = st.st_mode
        if self.overlay and stat.S_ISCHR(mode) and st.st_rdev == 0:
            self._add(self._whiteout(_join(_dirname(path), WHITEOUT_PREFIX + name), st))
            return None
        if stat.S_ISDIR(mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                xattrs = _read_xattrs(fd, True)
                info = self._info(path, st, xattrs)
                info.type = tarfile.DIRTYPE
                self._add(info)
                self._overlay_dir(path, st, xattrs)
            except BaseException:
                os.close(fd)
                raise
            return fd
        if stat.S_ISREG(mode):
            self._regular(dir_fd, name, path)
            return None
        if stat.S_ISSOCK(mode):
            log.debug("%s: skipping a socket", path)
            return None
        xattrs = _read_xattrs(f"/proc/self/fd/{dir_fd}/{name}", False)
        if self.overlay:
            self._check_overlay(path, xattrs)
        info = self._info(path, st, xattrs)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.hardlinks:
            info.type, info.linkname = tarfile.LNKTYPE, self.hardlinks[key]
        elif stat.S_ISLNK(mode):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            raise LayerError(f"{path!r}: unsupported file type {stat.S_IFMT(mode):o}")
        if st.st_nlink > 1 and key not in self.hardlinks:
            self.hardlinks[key] = path
        self._add(info)
        return None

    def _overlay_dir(self, path: str, st: os.stat_result, xattrs: dict[str, bytes]) -> None:
        if not self.overlay:
            return
        self._check_overlay(path, xattrs)
        if xattrs.get("trusted.overlay.opaque") == b"y" or xattrs.get("user.overlay.opaque") == b"y":
            self._add(self._whiteout(_join(path, OPAQUE_WHITEOUT), st, stat.S_IMODE(st.st_mode)))

    def _regular(self, dir_fd: int, name: str, path: str) -> None:
        fd, st = _open_regular(dir_fd, name, path)
        with open(fd, "rb") as f:
            xattrs = _read_xattrs(fd, True)
            if self.overlay:
                self._check_overlay(path, xattrs)
            info = self._info(path, st, xattrs)
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.hardlinks:
                info.type, info.linkname = tarfile.LNKTYPE, self.hardlinks[key]
                self._add(info)
                return
            info.type, info.size = tarfile.REGTYPE, st.st_size
            try:
                self._add(info, f)
            except tarfile.ReadError as e:
                raise LayerError(f"{path!r} changed while it was being archived: {e}") from e
        if st.st_nlink > 1:
            self.hardlinks[key] = path

    def tree(self, dir_fd: int, prefix: str, depth: int = 0) -> None:
        """Every entry below `dir_fd`, depth first, names in byte order (parents before children)."""
        if depth > MAX_DEPTH:
            raise LayerError(f"{prefix!r}: deeper than {MAX_DEPTH} directories")
        for name in sorted(os.listdir(dir_fd), key=os.fsencode):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            sub = self.entry(dir_fd, name, _join(prefix, name), st)
            if sub is not None:
                try:
                    self.tree(sub, _join(prefix, name), depth + 1)
                finally:
                    os.close(sub)

    # --- full-tree diff against a base directory ---

    def diff(self, base_fd: int, up_fd: int, prefix: str, up_st: os.stat_result, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise LayerError(f"{prefix!r}: deeper than {MAX_DEPTH} directories")
        up_names = set(os.listdir(up_fd))
        base_names = set(os.listdir(base_fd))
        for name in sorted(up_names | base_names, key=os.fsencode):
            path = _join(prefix, name)
            if name not in up_names:
                self._add(self._whiteout(_join(prefix, WHITEOUT_PREFIX + name), up_st))
                continue
            st = os.stat(name, dir_fd=up_fd, follow_symlinks=False)
            bst = _lstat(base_fd, name) if name in base_names else None
            if bst is not None and stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(bst.st_mode):
                self._diff_dir(base_fd, up_fd, name, path, bst, depth)
                continue
            if bst is not None and self._same(base_fd, up_fd, name, bst, st):
                continue
            sub = self.entry(up_fd, name, path, st)
            if sub is not None:
                try:
                    self.tree(sub, path, depth + 1)
                finally:
                    os.close(sub)

    def _diff_dir(
        self, base_fd: int, up_fd: int, name: str, path: str, bst: os.stat_result, depth: int
    ) -> None:
        ufd = os.open(name, _DIR_FLAGS, dir_fd=up_fd)
        try:
            bfd = os.open(name, _DIR_FLAGS, dir_fd=base_fd)
            try:
                st = os.fstat(ufd)
                xattrs = _read_xattrs(ufd, True)
                info = self._info(path, st, xattrs)
                info.type = tarfile.DIRTYPE
                changed = (
                    stat.S_IMODE(st.st_mode) != stat.S_IMODE(bst.st_mode)
                    or (st.st_uid, st.st_gid) != (bst.st_uid, bst.st_gid)
                    or st.st_mtime_ns != bst.st_mtime_ns
                    or _kept(xattrs) != _kept(_read_xattrs(bfd, True))
                )
                if changed:
                    self._add(info)
                else:
                    self.pending.append(info)  # written before the first change below it, if any
                self.diff(bfd, ufd, path, st, depth + 1)
                if self.pending and self.pending[-1] is info:
                    self.pending.pop()
            finally:
                os.close(bfd)
        finally:
            os.close(ufd)

    def _same(self, base_fd: int, up_fd: int, name: str, bst: os.stat_result, st: os.stat_result) -> bool:
        if (bst.st_dev, bst.st_ino) == (st.st_dev, st.st_ino):
            return True
        if (
            stat.S_IFMT(bst.st_mode) != stat.S_IFMT(st.st_mode)
            or stat.S_IMODE(bst.st_mode) != stat.S_IMODE(st.st_mode)
            or (bst.st_uid, bst.st_gid) != (st.st_uid, st.st_gid)
        ):
            return False
        if stat.S_ISLNK(st.st_mode):
            if os.readlink(name, dir_fd=base_fd) != os.readlink(name, dir_fd=up_fd):
                return False
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            if bst.st_rdev != st.st_rdev:
                return False
        elif stat.S_ISREG(st.st_mode) and (bst.st_size != st.st_size or bst.st_mtime_ns != st.st_mtime_ns):
            return False
        b_x = _kept(_read_xattrs(f"/proc/self/fd/{base_fd}/{name}", False))
        u_x = _kept(_read_xattrs(f"/proc/self/fd/{up_fd}/{name}", False))
        if b_x != u_x:
            return False
        if stat.S_ISREG(st.st_mode) and st.st_mtime_ns % 1_000_000_000 == 0:
            # Whole-second times (a file system or a copy without nanoseconds): the times say
            # little, compare the content, as containerd does.
            return _same_content(base_fd, up_fd, name)
        return True


def _dirname(path: str) -> str:
    return path.rpartition("/")[0]


def _kept(xattrs: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in xattrs.items() if keep_xattr(k)}


def _open_regular(dir_fd: int, name: str, path: str) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without following a symlink and without ever opening a
    device or FIFO swapped in after the caller's lstat: check the type on an O_PATH descriptor,
    then reopen that very inode."""
    pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise LayerError(f"{path!r} changed while it was being archived")
        return os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC), st
    finally:
        os.close(pfd)


def _same_content(base_fd: int, up_fd: int, name: str) -> bool:
    with (
        open(_open_regular(base_fd, name, name)[0], "rb") as a,
        open(_open_regular(up_fd, name, name)[0], "rb") as b,
    ):
        while True:
            x, y = a.read(_CHUNK), b.read(_CHUNK)
            if x != y:
                return False
            if not x:
                return True


def _open_root(path: str, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise LayerError(f"cannot open {what} {path}: {e.strerror}") from e


def create_layer(
    upper_dir: str,
    out: IO[bytes] | BinaryIO,
    *,
    compression: Compression = "gzip",
    base: str | None = None,
    mtime: int | None = None,
) -> LayerInfo:
    """Write the changes in `upper_dir` as a layer to `out`.

    Without `base`, `upper_dir` is an overlayfs upper directory: a 0:0 character device becomes
    `.wh.NAME`, a directory with trusted.overlay.opaque=y gets a `.wh..wh..opq` entry, and
    overlayfs' own xattrs are left out. Unmount the overlay first (or freeze what writes to it).

    With `base`, `upper_dir` is a full directory tree and the layer is its difference from `base`:
    added and changed entries (with their parent directories), and `.wh.NAME` for what was removed.

    Entries are depth first with names in byte order, in PAX format, with mode, owner, xattrs and
    hard links kept; `mtime` clamps every time (like SOURCE_DATE_EPOCH) for reproducible layers."""
    writer = _LayerWriter(out, compression)
    arch = _Archiver(writer, overlay=base is None, clamp=mtime)
    up_fd = _open_root(upper_dir, "upper directory")
    try:
        if base is None:
            root_x = _read_xattrs(up_fd, True)
            arch._check_overlay(".", root_x)
            if root_x.get("trusted.overlay.opaque") == b"y" or root_x.get("user.overlay.opaque") == b"y":
                arch._add(arch._whiteout(OPAQUE_WHITEOUT, os.fstat(up_fd)))
            arch.tree(up_fd, "")
        else:
            base_fd = _open_root(base, "base directory")
            try:
                arch.diff(base_fd, up_fd, "", os.fstat(up_fd))
            finally:
                os.close(base_fd)
        return writer.close()
    except OSError as e:
        raise LayerError(f"cannot create a layer from {upper_dir}: {e}") from e
    finally:
        os.close(up_fd)


def dir_to_layer(
    root_dir: str,
    out: IO[bytes] | BinaryIO,
    compression: Compression = "gzip",
    *,
    mtime: int | None = None,
) -> LayerInfo:
    """Write the whole tree below `root_dir` (not the root itself) as one layer to `out`: for
    importing a root file system as an image. Same format rules as `create_layer`."""
    writer = _LayerWriter(out, compression)
    arch = _Archiver(writer, overlay=False, clamp=mtime)
    fd = _open_root(root_dir, "directory")
    try:
        arch.tree(fd, "")
        return writer.close()
    except OSError as e:
        raise LayerError(f"cannot create a layer from {root_dir}: {e}") from e
    finally:
        os.close(fd)
