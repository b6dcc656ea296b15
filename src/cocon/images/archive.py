"""Image import and export in standard formats: `cocon image import`, `cocon save`, `cocon load`.

Three functions on top of `cocon.images.store.ImageStore` (see docs/archive.md):

- `import_rootfs(store, source, name)`: a root file system (tar: plain, gzip or zstd; or a directory)
  becomes a one-layer image, like `docker import`. The tar is unpacked with `apply_layer` (which
  refuses `..`, absolute and symlink-escaping members and links to outside) into a private directory,
  then archived again with `dir_to_layer`: what the image holds is what a safe extraction produced.
- `save(store, refs, dest, format=...)`: images to an OCI image layout (a directory, `oci-dir`, or a
  tar of one, `oci-archive`) or to a `docker-archive` (what `docker save` writes). Written to a
  temporary sibling and renamed into place: a failed save leaves no partial file.
- `load(store, source)`: an OCI layout (directory or tar) or a docker-archive (tar or extracted
  directory), either tar possibly gzip or zstd compressed. Archives are untrusted input: member paths
  are checked (no absolute or `..` paths, links resolved inside the archive only), every blob is
  checked against its descriptor's digest and size while it streams into the content store, JSON
  documents have size limits, and images are recorded only after every image of the archive has
  been checked, so a failed load records nothing (blobs it wrote are collected by the next gc).

The format-specific halves live in `oci_layout.py` and `docker_archive.py`; this module holds the
public API, the errors, and what both share (reading members of a tar or a directory safely, writing
a tar or a directory atomically, copying blobs with progress and verification).

Nothing here prints: pass `progress(what, done_bytes, total_bytes)` to follow long copies.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, BinaryIO, Literal, Protocol, cast

from cocon import _linux
from cocon._streams import Peekable
from cocon.content import ContentError, DigestMismatch
from cocon.images.build_errors import ContainerfileError
from cocon.images.errors import ImageError, LayerError
from cocon.images.layers import Compression, apply_layer, dir_to_layer
from cocon.images.reference import Reference, ReferenceError
from cocon.images.store import Image, ImageCorrupt, ImageStore, normalize_name
from cocon.oci.digest import Digest, DigestError, Hasher
from cocon.oci.image_spec import (
    ContainerConfig,
    Descriptor,
    History,
    ImageConfig,
    RootFS,
    encode_image_config,
    host_platform,
)

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ArchiveError",
    "CorruptArchive",
    "Format",
    "Progress",
    "SaveResult",
    "SavedImage",
    "UnsafeArchive",
    "detect_format",
    "import_rootfs",
    "load",
    "save",
]

Format = Literal["oci-archive", "oci-dir", "docker-archive"]
FORMATS: tuple[str, ...] = ("oci-archive", "oci-dir", "docker-archive")

Progress = Callable[[str, int, int], None]
"""progress(what, done_bytes, total_bytes): called as a blob or file is copied (total 0: unknown)."""

# Annotations on the entries of an OCI layout's index.json that name an image.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"  # the full name, as containerd and Docker 25+ write it

MAX_JSON_SIZE = 4 << 20  # index.json, manifest.json, oci-layout, manifests, indexes
MAX_CONFIG_SIZE = 8 << 20  # image configs (long histories and labels)
MAX_MEMBERS = 100_000  # members of an archive's tar (not of its layers)
MAX_LINK_HOPS = 40
CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
HEX64 = re.compile(r"[0-9a-f]{64}")
_SPECIAL_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


# --- errors ---------------------------------------------------------------------------------------


class ArchiveError(ImageError):
    """An image archive or root file system cannot be imported, saved or loaded."""


class UnsafeArchive(ArchiveError):
    """An archive tried to reach outside itself: an absolute or `..` member path, a link that leaves
    the archive or the directory, a device member. It is hostile or broken: nothing was loaded."""


class CorruptArchive(ArchiveError):
    """An archive's content does not check out: a blob that does not match its digest or size, a
    blob or file that is missing, a JSON document that is malformed or too large."""


# --- results --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedImage:
    """One image written by `save`, with the names the archive records for it (familiar form)."""

    id: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class SaveResult:
    """What `save` wrote: where (a path, or "-" for a stream), in which format, which images, and how
    many bytes (the archive's size; for `oci-dir`, the bytes of the files written)."""

    dest: str
    format: str
    images: tuple[SavedImage, ...]
    size: int


@dataclass
class Selected:
    """An image to save and the names (normalized) the archive should give it."""

    image: Image
    names: list[str] = field(default_factory=list)


@dataclass
class PendingImage:
    """An image a loader has checked and stored the blobs of, to be recorded once all are ready."""

    manifest_digest: str
    names: list[str]


# --- small stream helpers -------------------------------------------------------------------------


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def sniff_compression(head: bytes) -> Compression:
    """gzip, zstd or None (anything else, a plain tar included), from the first bytes of a stream."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    return None


class _Decompressing:
    """Decompresses a gzip or zstd stream (several members or frames), passes anything else through;
    decompression errors raise the `error` it is given (CorruptArchive when reading an archive)."""

    def __init__(self, raw: Readable, what: str, error: type[ImageError]) -> None:
        self._error = error
        peek = Peekable(raw)
        self.compression = sniff_compression(peek.peek(4))
        self._what = what
        self._stream: Any
        if self.compression == "gzip":
            self._stream = gzip.GzipFile(fileobj=cast(IO[bytes], peek), mode="rb")
        elif self.compression == "zstd":
            import zstandard

            self._stream = zstandard.ZstdDecompressor().stream_reader(
                cast(IO[bytes], peek), read_across_frames=True, closefd=False
            )
        else:
            self._stream = peek

    def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = self._stream.read(n)
        except ArchiveError:
            raise
        except (EOFError, OSError, zlib.error) as e:
            raise self._error(f"{self._what} is corrupt or truncated: {e}") from e
        except Exception as e:  # zstandard.ZstdError
            raise self._error(f"{self._what} cannot be decompressed: {e}") from e
        return data


def decompressing(raw: Readable, what: str, error: type[ImageError] = CorruptArchive) -> _Decompressing:
    """A reader of `raw`'s content, decompressed when it is gzip or zstd (see `.compression`); a
    corrupt stream raises `error`."""
    return _Decompressing(raw, what, error)


class CountingReader:
    """Counts (and reports) the bytes read through it; optionally hashes them."""

    def __init__(
        self, raw: Readable, what: str, total: int, progress: Progress | None, hasher: Hasher | None = None
    ) -> None:
        self._raw = raw
        self._what = what
        self._total = total
        self._progress = progress
        self.hasher = hasher
        self.done = 0
        self._reported = 0
        if progress is not None:
            progress(what, 0, total)

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self.done += len(data)
            if self.hasher is not None:
                self.hasher.update(data)
            if self._progress is not None and (
                self.done - self._reported >= CHUNK or self.done == self._total
            ):
                self._reported = self.done
                self._progress(self._what, self.done, self._total)
        return data

    def finish(self) -> None:
        if self._progress is not None and self._reported != self.done:
            self._progress(self._what, self.done, self._total)


def store_tmp_dir(store: ImageStore) -> str:
    """`<root>/tmp`: scratch space on the store's file system (spooled archives, imports)."""
    path = os.path.join(store.root, "tmp")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ArchiveError(f"cannot create the scratch directory {path}: {e.strerror}") from None
    return path


def describe(source: str | os.PathLike[str] | IO[bytes] | BinaryIO) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "the input stream"


# --- member paths ---------------------------------------------------------------------------------


def member_path(name: str, where: str) -> str | None:
    """A member name as a clean relative path (`./a//b` → `a/b`; None for the root itself). Absolute
    paths and `..` components are refused: image archives never need them."""
    if "\x00" in name:
        raise UnsafeArchive(
            f"{where}: member name {name!r} contains a NUL byte; the archive is hostile or broken"
        )
    if name.startswith("/"):
        raise UnsafeArchive(
            f"{where}: member {name!r} has an absolute path; image archives hold relative paths only, "
            "so the archive is hostile or broken and nothing was loaded"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(
            f"{where}: member {name!r} climbs out with '..'; the archive is hostile or broken and nothing "
            "was loaded"
        )
    return "/".join(parts) or None


# --- reading archives: a tar file or a directory ------------------------------------------------


class ArchiveSource(Protocol):
    """The members of an archive being loaded, by clean relative path."""

    where: str

    def size(self, path: str) -> int | None:
        """The size of the regular file at `path` (links resolved inside the archive), None if absent."""
        ...

    def open(self, path: str) -> tuple[Readable, int]:
        """A reader of the file at `path` and its size; CorruptArchive if it is absent."""
        ...

    def close(self) -> None: ...


def read_member(src: ArchiveSource, path: str, limit: int, what: str) -> bytes:
    """The whole content of a small member (a JSON document), refusing it if larger than `limit`."""
    size = src.size(path)
    if size is None:
        raise CorruptArchive(
            f"{src.where}: {what} {path} is missing; the archive is incomplete or not an image"
        )
    if size > limit:
        raise CorruptArchive(
            f"{src.where}: {what} {path} is {size} bytes, more than the limit of {limit}: the archive is "
            "corrupt or hostile"
        )
    reader, _ = src.open(path)
    data = _read_exactly(reader, size)
    if len(data) != size:
        raise CorruptArchive(f"{src.where}: {path} is truncated")
    return data


def _read_exactly(reader: Readable, size: int) -> bytes:
    chunks: list[bytes] = []
    left = size
    while left > 0:
        data = reader.read(min(left, CHUNK))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


class _TarInfo(tarfile.TarInfo):
    """Caps PAX and GNU long-name headers, which tarfile reads into memory whole."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in _SPECIAL_TYPES and self.size > MAX_JSON_SIZE:
            raise CorruptArchive(
                f"a tar extended header of {self.size} bytes: the archive is corrupt or hostile"
            )
        return getattr(super(), "_proc_member")(tarfile_)  # noqa: B009 - not in typeshed


@dataclass(frozen=True)
class _Member:
    kind: Literal["file", "symlink", "hardlink"]
    offset: int = 0
    size: int = 0
    target: str = ""


class _Slice:
    """Reads `size` bytes at `offset` of a file descriptor (pread: no shared file position)."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = fd
        self._pos = offset
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if n < 0 else min(n, self._left)
        data = os.pread(self._fd, min(want, 16 * CHUNK), self._pos)
        self._pos += len(data)
        self._left -= len(data)
        return data


class TarSource:
    """The members of a plain (uncompressed) tar in a seekable file, indexed in one pass over the
    headers. Nothing is extracted: member data is read in place. Links are resolved inside the
    archive's own namespace, and a link that leaves it is refused."""

    def __init__(self, f: IO[bytes], where: str) -> None:
        self.where = where
        self._f = f
        self._fd = f.fileno()
        self._members: dict[str, _Member] = {}
        file_size = os.fstat(self._fd).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r:", tarinfo=_TarInfo)  # noqa: SIM115 - f is closed by close()
        except tarfile.TarError as e:
            raise ArchiveError(
                f"{where} is not a tar archive (nor a gzip or zstd compressed one): {e}; give an OCI "
                "layout or a docker-archive (cocon save, docker save, skopeo copy)"
            ) from None
        count = 0
        while True:
            try:
                m = tar.next()
            except ArchiveError:
                raise
            except (tarfile.TarError, EOFError, OSError) as e:
                raise CorruptArchive(f"{where} is corrupt or truncated: {e}") from None
            if m is None:
                break
            tar.members.clear()  # type: ignore[attr-defined] # offsets are kept here; tarfile need not remember members
            count += 1
            if count > MAX_MEMBERS:
                raise CorruptArchive(
                    f"{where} has more than {MAX_MEMBERS} members: it is not an image archive"
                )
            path = member_path(m.name, where)
            if path is None:
                continue
            if m.type == tarfile.GNUTYPE_SPARSE or m.sparse is not None:
                raise CorruptArchive(
                    f"{where}: member {m.name!r} is a sparse file, which image archives never hold"
                )
            if m.isreg():
                if m.offset_data + m.size > file_size:
                    raise CorruptArchive(
                        f"{where} is truncated: member {m.name!r} ends past the end of the file"
                    )
                self._members[path] = _Member("file", m.offset_data, m.size)
            elif m.isdir():
                self._members.pop(path, None)
            elif m.issym():
                self._members[path] = _Member("symlink", target=m.linkname)
            elif m.islnk():
                target = member_path(m.linkname, where)
                if target is None:
                    raise UnsafeArchive(f"{where}: member {m.name!r} is a hard link to the archive's root")
                self._members[path] = _Member("hardlink", target=target)
            else:
                raise UnsafeArchive(
                    f"{where}: member {m.name!r} is a device or FIFO; image archives hold only files, "
                    "directories and links, so the archive is hostile or broken"
                )

    def _lookup(self, name: str) -> _Member | None:
        path = member_path(name, self.where)
        if path is None:
            return None
        seen = 0
        while True:
            m = self._members.get(path)
            if m is None or m.kind == "file":
                return m
            seen += 1
            if seen > MAX_LINK_HOPS:
                raise UnsafeArchive(f"{self.where}: too many levels of links at {path!r}")
            if m.kind == "hardlink":
                path = m.target
                continue
            if m.target.startswith("/"):
                raise UnsafeArchive(
                    f"{self.where}: member {path!r} is a symlink to the absolute path {m.target!r}, outside "
                    "the archive; the archive is hostile or broken and nothing was loaded"
                )
            joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), m.target))
            if joined == ".." or joined.startswith("../") or joined == ".":
                raise UnsafeArchive(
                    f"{self.where}: member {path!r} is a symlink to {m.target!r}, outside the archive; the "
                    "archive is hostile or broken and nothing was loaded"
                )
            path = joined

    def size(self, path: str) -> int | None:
        m = self._lookup(path)
        return None if m is None else m.size

    def open(self, path: str) -> tuple[Readable, int]:
        m = self._lookup(path)
        if m is None:
            raise CorruptArchive(f"{self.where}: {path} is missing; the archive is incomplete")
        return _Slice(self._fd, m.offset, m.size), m.size

    def close(self) -> None:
        self._f.close()


class DirSource:
    """The files of a directory (an OCI layout, an extracted docker-archive). Every open is resolved
    by the kernel beneath the directory (openat2 RESOLVE_BENEATH): a symlink that points outside it
    is refused, and only regular files are read (never a FIFO or a device)."""

    def __init__(self, path: str) -> None:
        self.where = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ArchiveError(f"cannot open the directory {path}: {e.strerror}") from None
        self._files: dict[str, tuple[int, int]] = {}  # path -> (fd, size), opened lazily

    def _get(self, path: str) -> tuple[int, int] | None:
        clean = member_path(path, self.where)
        if clean is None:
            return None
        if clean in self._files:
            return self._files[clean]
        try:
            fd = _linux.openat2(
                self._fd,
                clean,
                os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY,
                _linux.RESOLVE_BENEATH | _linux.RESOLVE_NO_MAGICLINKS,
            )
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise UnsafeArchive(
                    f"{self.where}: {clean} is (or passes through) a symlink that points outside the "
                    "directory; the layout is hostile or broken and nothing was loaded"
                ) from None
            raise ArchiveError(f"cannot open {clean} in {self.where}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                return None
            raise UnsafeArchive(
                f"{self.where}: {clean} is not a regular file; the layout is hostile or broken"
            )
        self._files[clean] = (fd, st.st_size)
        return fd, st.st_size

    def size(self, path: str) -> int | None:
        got = self._get(path)
        return None if got is None else got[1]

    def open(self, path: str) -> tuple[Readable, int]:
        got = self._get(path)
        if got is None:
            raise CorruptArchive(f"{self.where}: {path} is missing; the layout is incomplete")
        fd, size = got
        return _Slice(fd, 0, size), size

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()
        os.close(self._fd)


@contextlib.contextmanager
def open_source(
    store: ImageStore, source: str | os.PathLike[str] | IO[bytes] | BinaryIO, progress: Progress | None
) -> Iterator[ArchiveSource]:
    """The archive at `source`: a directory, a tar file (read in place), or a compressed tar or a
    stream (decompressed / copied into an unnamed temporary file in the store's scratch directory)."""
    where = describe(source)
    src: ArchiveSource
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            src = DirSource(path)
            try:
                yield src
            finally:
                src.close()
            return
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the TarSource or below
        except OSError as e:
            raise ArchiveError(f"cannot open {path}: {e.strerror}") from None
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # a FIFO or a terminal (/dev/stdin): copy it
                src = _spool(store, f, where, progress, 0)
                f.close()
            elif sniff_compression(f.read(4)) is None:
                f.seek(0)
                src = TarSource(f, where)
            else:
                f.seek(0)
                src = _spool(store, f, where, progress, st.st_size)
                f.close()
        except BaseException:
            f.close()
            raise
    else:
        src = _spool(store, source, where, progress, 0)
    try:
        yield src
    finally:
        src.close()


def _spool(store: ImageStore, raw: Readable, where: str, progress: Progress | None, total: int) -> TarSource:
    """Copy a (possibly compressed) stream into an unnamed temporary file, decompressed."""
    tmp = tempfile.TemporaryFile(dir=store_tmp_dir(store))  # noqa: SIM115 - closed by the TarSource
    try:
        counted = CountingReader(raw, f"reading {os.path.basename(where)}", total, progress)
        reader = decompressing(counted, where)
        try:
            while data := reader.read(CHUNK):
                tmp.write(data)
            tmp.flush()
        except OSError as e:
            raise ArchiveError(f"cannot copy {where} to {store_tmp_dir(store)}: {e.strerror}") from None
        counted.finish()
        tmp.seek(0)
        return TarSource(cast(IO[bytes], tmp), where)
    except BaseException:
        tmp.close()
        raise


def detect_format(src: ArchiveSource) -> Literal["oci", "docker"]:
    """What `src` holds: "oci" for an OCI image layout (index.json; Docker 25+ archives are both
    formats at once and are read as layouts), "docker" for a docker-archive (manifest.json)."""
    if src.size("index.json") is not None:
        return "oci"
    if src.size("manifest.json") is not None:
        return "docker"
    if src.size("repositories") is not None:
        raise ArchiveError(
            f"{src.where} is a docker-archive of the format before Docker 1.10 (no manifest.json), which "
            "cocon does not read; save the image again with a current docker, podman or skopeo"
        )
    raise ArchiveError(
        f"{src.where} is neither an OCI image layout (oci-layout, index.json) nor a docker-archive "
        "(manifest.json); give what `cocon save`, `docker save`, `podman save` or `skopeo copy` write"
    )


# --- blobs in and out of the content store ---------------------------------------------------------


def blob_path(digest: str) -> str:
    d = Digest.parse(digest)
    return f"blobs/{d.algorithm}/{d.hex}"


def _stored_size(store: ImageStore, digest: str) -> int | None:
    try:
        return store.content.size(digest)
    except ContentError:
        return None


def ingest_blob(
    store: ImageStore,
    src: ArchiveSource,
    path: str,
    expected: str | None,
    size: int | None,
    what: str,
    progress: Progress | None,
) -> Digest:
    """Stream the member at `path` into the content store, checked against `expected` (digest) and
    `size` as it is committed: a mismatch stores nothing and raises CorruptArchive. A blob already in
    the store with that digest and size is not read again."""
    if expected is not None and size is not None and _stored_size(store, expected) == size:
        return Digest.parse(expected)
    member_size = src.size(path)
    if member_size is None:
        raise CorruptArchive(
            f"{src.where}: {what} {expected or path} is not in the archive; the archive is incomplete "
            "(save or copy the whole image again)"
        )
    if size is not None and member_size != size:
        raise CorruptArchive(
            f"{src.where}: {what} {expected or path} is {member_size} bytes in the archive but {size} are "
            "expected: the archive is corrupt or was tampered with; nothing was loaded"
        )
    reader, _ = src.open(path)
    counted = CountingReader(reader, what, member_size, progress)
    try:
        digest = store.content.put_stream(counted, expected, member_size)
    except DigestMismatch as e:
        raise CorruptArchive(
            f"{src.where}: {what} {path} does not match its digest ({e}); the archive is corrupt or was "
            "tampered with"
        ) from None
    except (ContentError, DigestError) as e:
        raise ArchiveError(f"cannot store {what} {path} from {src.where}: {e}") from None
    counted.finish()
    return digest


def read_blob(store: ImageStore, src: ArchiveSource, desc: Descriptor, limit: int, what: str) -> bytes:
    """A small blob (manifest, index, config) named by `desc`: from the store when it has it, else
    from the archive, checked against the descriptor's digest and size."""
    if _stored_size(store, desc.digest) == desc.size:
        return store.content.read(desc.digest)
    if desc.size > limit:
        raise CorruptArchive(
            f"{src.where}: {what} {desc.digest} is {desc.size} bytes, more than the limit of {limit}: the "
            "archive is corrupt or hostile"
        )
    if desc.data is not None and src.size(blob_path(desc.digest)) is None:
        import base64

        data = base64.b64decode(desc.data)  # embedded in the descriptor (image-spec 1.1)
        store.content.put(data, desc.digest)
        return data
    ingest_blob(store, src, blob_path(desc.digest), desc.digest, desc.size, what, None)
    return store.content.read(desc.digest)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    import hashlib

    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


# --- writing archives: a tar (file or stream) or a directory, atomically -------------------------


class Sink(Protocol):
    """Where `save` writes: paths are relative, parents are added before children."""

    @property
    def written(self) -> int:
        """Bytes written so far."""
        ...

    def add_dir(self, path: str) -> None: ...

    def add_bytes(self, path: str, data: bytes) -> None: ...

    def add_file(self, path: str, reader: Readable, size: int) -> None: ...


class _CountingWriter:
    def __init__(self, out: IO[bytes] | BinaryIO) -> None:
        self._out = out
        self.written = 0
        self.aborted = False

    def write(self, data: bytes) -> int:
        if not self.aborted:  # after a failure, tarfile's own clean-up must write nothing
            self._out.write(data)
            self.written += len(data)
        return len(data)

    def flush(self) -> None:
        if not self.aborted:
            self._out.flush()


class TarSink:
    """A tar stream (PAX), reproducible: owner 0:0, fixed modes, mtime 0."""

    def __init__(self, out: IO[bytes] | BinaryIO) -> None:
        self._out = _CountingWriter(out)
        self._tar = tarfile.open(  # noqa: SIM115 - closed by close()
            fileobj=cast(IO[bytes], self._out), mode="w|", format=tarfile.PAX_FORMAT, bufsize=CHUNK
        )

    @property
    def written(self) -> int:
        return self._out.written

    def _info(self, path: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = kind
        info.size = size
        info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    def add_dir(self, path: str) -> None:
        self._tar.addfile(self._info(path, tarfile.DIRTYPE))

    def add_bytes(self, path: str, data: bytes) -> None:
        import io

        self._tar.addfile(self._info(path, tarfile.REGTYPE, len(data)), io.BytesIO(data))

    def add_file(self, path: str, reader: Readable, size: int) -> None:
        self._tar.addfile(self._info(path, tarfile.REGTYPE, size), cast(IO[bytes], reader))

    def close(self) -> None:
        self._tar.close()
        self._out.flush()

    def abort(self) -> None:
        """Stop after a failure: nothing more is written (not even the tar's end)."""
        self._out.aborted = True
        with contextlib.suppress(Exception):
            self._tar.close()


class DirSink:
    """Files in a (new, private) directory, each fsync'ed."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.written = 0
        self._dirs = [root]

    def add_dir(self, path: str) -> None:
        full = os.path.join(self.root, path)
        os.makedirs(full, mode=0o755, exist_ok=True)
        self._dirs.append(full)

    def _write(self, path: str, chunks: Iterator[bytes]) -> None:
        fd = os.open(
            os.path.join(self.root, path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644
        )
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                self.written += len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)

    def add_bytes(self, path: str, data: bytes) -> None:
        self._write(path, iter([data]))

    def add_file(self, path: str, reader: Readable, size: int) -> None:
        def chunks() -> Iterator[bytes]:
            left = size
            while left > 0:
                data = reader.read(min(left, CHUNK))
                if not data:
                    raise CorruptArchive(f"{path}: the source ended {left} bytes early")
                left -= len(data)
                yield data

        self._write(path, chunks())

    def sync(self) -> None:
        for d in self._dirs:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _open_sink(dest: str | os.PathLike[str] | IO[bytes] | BinaryIO, fmt: str) -> Iterator[Sink]:
    """A sink for `dest`, made visible only when the block ends without an error: a directory is
    written as a hidden sibling and renamed into place, a file as a hidden temporary file renamed
    over it. A stream is written directly (it cannot be taken back)."""
    if not isinstance(dest, (str, os.PathLike)):
        if fmt == "oci-dir":
            raise ArchiveError("the oci-dir format writes a directory: give a path, not a stream")
        tar_sink = TarSink(dest)
        try:
            yield tar_sink
        except BaseException:
            tar_sink.abort()
            raise
        tar_sink.close()
        return
    path = os.path.abspath(os.fspath(dest))
    parent, base = os.path.split(path)
    if not os.path.isdir(parent):
        raise ArchiveError(f"cannot write {path}: the directory {parent} does not exist")
    if fmt == "oci-dir":
        if os.path.lexists(path):
            if not os.path.isdir(path) or os.path.islink(path):
                raise ArchiveError(f"{path} exists and is not a directory: remove it or choose another path")
            if os.listdir(path):
                raise ArchiveError(
                    f"{path} exists and is not empty: remove it or choose another directory (cocon writes a "
                    "new layout; it does not add to an existing one)"
                )
        tmp = tempfile.mkdtemp(prefix=f".{base}.cocon-save-", dir=parent)
        try:
            os.chmod(tmp, 0o755)
            dir_sink = DirSink(tmp)
            yield dir_sink
            dir_sink.sync()
            try:
                os.rename(tmp, path)  # also replaces an empty directory
            except OSError as e:
                raise ArchiveError(f"cannot move the new layout to {path}: {e.strerror}") from None
            _fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    if os.path.isdir(path):
        raise ArchiveError(f"{path} is a directory: give a file name for the {fmt} (or use --format oci-dir)")
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.cocon-save-", dir=parent)
    try:
        with open(fd, "wb") as f:
            os.fchmod(fd, 0o644)
            file_sink = TarSink(f)
            try:
                yield file_sink
            except BaseException:
                file_sink.abort()
                raise
            file_sink.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def copy_blob(
    store: ImageStore, sink: Sink, path: str, digest: str, size: int, what: str, progress: Progress | None
) -> None:
    """Copy a stored blob into the sink, rehashing it on the way: a blob that rotted on disk stops the
    save (ImageCorrupt) instead of going out in the archive."""
    d = Digest.parse(digest)
    stored = _stored_size(store, digest)
    if stored is None:
        raise ImageCorrupt(
            f"blob {digest} ({what}) is not in the content store: the image is incomplete; remove it and "
            "pull, load or build it again"
        )
    if stored != size:
        raise ImageCorrupt(
            f"blob {digest} ({what}) is {stored} bytes but its descriptor says {size}: the image is corrupt; "
            "remove it and load or build it again"
        )
    with store.content.open(d) as f:
        counted = CountingReader(f, what, size, progress, Hasher(d.algorithm))
        sink.add_file(path, counted, size)
        counted.finish()
    assert counted.hasher is not None
    if counted.hasher.digest() != d:
        raise ImageCorrupt(
            f"blob {digest} ({what}) no longer matches its digest (disk corruption?); nothing was saved: "
            "remove the image and load or build it again"
        )


# --- save -----------------------------------------------------------------------------------------


def _select(store: ImageStore, refs: Sequence[str]) -> list[Selected]:
    """The images `refs` name, each once, with the names the archive gives them: a name the user
    typed is kept (`busybox` → docker.io/library/busybox:latest); an image given by ID or digest is
    saved without a name, as `docker save` does."""
    chosen: dict[str, Selected] = {}
    for ref in refs:
        image = store.resolve(ref)
        sel = chosen.setdefault(image.id, Selected(image))
        try:
            parsed = Reference.parse(ref)
        except ReferenceError:
            continue
        name = str(parsed)
        if parsed.digest is None and name in image.names and name not in sel.names:
            sel.names.append(name)
    return list(chosen.values())


def save(
    store: ImageStore,
    refs: Sequence[str],
    dest: str | os.PathLike[str] | IO[bytes] | BinaryIO,
    *,
    format: str = "oci-archive",
    progress: Progress | None = None,
) -> SaveResult:
    """Write the images `refs` names (names, IDs or ID prefixes) to `dest` in `format`:

    - "oci-archive": a tar of an OCI image layout (what `podman save --format oci-archive` and
      `skopeo copy ... oci-archive:FILE:NAME` write);
    - "oci-dir": the OCI image layout as a directory (`dest` must not exist or be empty);
    - "docker-archive": what `docker save` writes (layers as uncompressed tars, `manifest.json`).

    Each image keeps the names it was asked by (`busybox` saves `busybox:latest`); one given by ID is
    saved without a name. `dest` is a path (written atomically: temporary file, then rename) or a
    binary stream. Returns what was written and its size in bytes."""
    if isinstance(refs, str):
        refs = [refs]
    if not refs:
        raise ArchiveError("nothing to save: name at least one image")
    if format not in FORMATS:
        raise ArchiveError(f"unknown archive format {format!r}: use one of {', '.join(FORMATS)}")
    selection = _select(store, refs)
    where = os.fspath(dest) if isinstance(dest, (str, os.PathLike)) else "-"
    # The format modules import this one (errors, sources, sinks), so they are imported here.
    try:
        with _open_sink(dest, format) as sink:
            if format == "docker-archive":
                from cocon.images.docker_archive import write_docker_archive

                write_docker_archive(store, selection, sink, progress)
            else:
                from cocon.images.oci_layout import write_oci_layout

                write_oci_layout(store, selection, sink, progress)
    except OSError as e:  # ENOSPC, EIO, a closed pipe, ...
        detail = e.strerror or str(e)
        shown = "the output stream" if where == "-" else where
        raise ArchiveError(f"cannot write {shown}: {detail}; nothing usable was saved") from None
    saved = tuple(
        SavedImage(sel.image.id, tuple(Reference.parse(n).familiar() for n in sel.names)) for sel in selection
    )
    return SaveResult(dest=where, format=format, images=saved, size=sink.written)


# --- load -----------------------------------------------------------------------------------------


def load(
    store: ImageStore,
    source: str | os.PathLike[str] | IO[bytes] | BinaryIO,
    *,
    progress: Progress | None = None,
) -> list[Image]:
    """Load every image of an archive: an OCI image layout (directory or tar) or a docker-archive
    (tar or extracted directory); a tar may be gzip or zstd compressed, `source` may be a stream.

    From an index that lists several platforms, the host's manifest is taken. Images get the names
    the archive gives (`io.containerd.image.name`, else `org.opencontainers.image.ref.name`; a
    docker-archive's RepoTags); an image without a name is recorded dangling. Every blob is checked
    against its digest and size (docker-archive layers against the config's diff_ids) before any
    image is recorded: on any error (ArchiveError: UnsafeArchive, CorruptArchive, ...) nothing is
    recorded. Returns the loaded images in archive order."""
    try:
        return _load(store, source, progress)
    except OSError as e:  # EIO and the like while reading the archive or writing the store
        raise ArchiveError(f"cannot load {describe(source)}: {e.strerror or e}; nothing was loaded") from None


def _load(
    store: ImageStore, source: str | os.PathLike[str] | IO[bytes] | BinaryIO, progress: Progress | None
) -> list[Image]:
    with open_source(store, source, progress) as src:
        kind = detect_format(src)
        with store.content.lease():
            if kind == "oci":
                from cocon.images.oci_layout import read_oci_layout

                pending = read_oci_layout(store, src, progress)
            else:
                from cocon.images.docker_archive import read_docker_archive

                pending = read_docker_archive(store, src, progress)
            merged: dict[str, list[str]] = {}
            for p in pending:
                names = merged.setdefault(p.manifest_digest, [])
                names.extend(n for n in p.names if n not in names)
            images: list[Image] = []
            for digest, names in merged.items():
                image = store.add_manifest(digest, names=names)
                if all(i.id != image.id for i in images):
                    images.append(image)
    return [store.get(i.id) for i in images]


def normalized_names(names: Sequence[str], where: str, what: str) -> list[str]:
    """Names as the store keeps them; a name that is not a valid image reference is refused."""
    out: list[str] = []
    for n in names:
        try:
            ref = Reference.parse(n)
        except ReferenceError as e:
            raise CorruptArchive(f"{where}: {what} {n!r} is not a valid image name: {e}") from None
        if ref.digest is not None:
            continue  # a digest is not a name; the image is found by its manifest digest anyway
        if str(ref) not in out:
            out.append(str(ref))
    return out


# --- import ---------------------------------------------------------------------------------------

CHANGE_INSTRUCTIONS = (
    "CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "ONBUILD", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
)  # fmt: skip


def config_from_changes(changes: Sequence[str]) -> ContainerConfig | None:
    """Docker's `import --change`: Containerfile instructions, one per string, applied in order to an
    empty container config (ENV values expand earlier ENVs, as in a build)."""
    if not changes:
        return None
    lines: list[str] = []
    for change in changes:
        text = change.strip()
        if not text or "\n" in text or "\r" in text or text.endswith("\\"):
            raise ArchiveError(
                f"--change {change!r}: give one instruction on one line, e.g. 'ENV KEY=value' or "
                "'CMD [\"sh\"]'"
            )
        keyword = text.split(None, 1)[0].upper()
        if keyword not in CHANGE_INSTRUCTIONS:
            raise ArchiveError(
                f"--change {change!r}: {keyword} cannot be applied to an imported image; use one of "
                f"{', '.join(CHANGE_INSTRUCTIONS)}"
            )
        lines.append(text)
    from cocon.images import containerfile as cf

    try:
        stage = cf.parse("FROM scratch\n" + "\n".join(lines), "--change").resolve()[-1]
    except ContainerfileError as e:
        bad = lines[e.line - 2] if e.line is not None and 2 <= e.line < len(lines) + 2 else None
        raise ArchiveError(f"--change {bad!r}: {e.message}" if bad else str(e)) from None
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    ports: dict[str, object] = {}
    volumes: dict[str, object] = {}
    onbuild: list[str] = []
    values: dict[str, Any] = {}
    for resolved in stage.instructions:
        ins = resolved.instruction
        if isinstance(ins, (cf.Cmd, cf.Entrypoint)):
            argv = ["/bin/sh", "-c", *ins.command] if ins.prepend_shell else list(ins.command)
            values["cmd" if isinstance(ins, cf.Cmd) else "entrypoint"] = argv
        elif isinstance(ins, cf.Env):
            env.update(ins.pairs)
        elif isinstance(ins, cf.Label):
            labels.update(ins.pairs)
        elif isinstance(ins, cf.Expose):
            ports.update({p: {} for p in ins.ports})
        elif isinstance(ins, cf.Volume):
            volumes.update({p: {} for p in ins.paths})
        elif isinstance(ins, cf.Workdir):
            values["working_dir"] = posixpath.normpath(
                posixpath.join(values.get("working_dir") or "/", ins.path)
            )
        elif isinstance(ins, cf.User):
            values["user"] = ins.user
        elif isinstance(ins, cf.StopSignal):
            values["stop_signal"] = ins.signal
        elif isinstance(ins, cf.Onbuild):
            onbuild.append(ins.expression)
    return ContainerConfig(
        env=[f"{k}={v}" for k, v in env.items()] or None,
        labels=labels or None,
        exposed_ports=ports or None,
        volumes=volumes or None,
        on_build=onbuild or None,
        **values,
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def import_rootfs(
    store: ImageStore,
    source: str | os.PathLike[str] | IO[bytes] | BinaryIO,
    name: str | None = None,
    *,
    changes: Sequence[str] = (),
    message: str | None = None,
    compression: Compression = "gzip",
    progress: Progress | None = None,
) -> Image:
    """`cocon image import ROOTFS NAME[:TAG]`: a root file system becomes a one-layer image for this
    machine's platform. `source` is a tar (plain, gzip or zstd; a path or a stream) or a directory.

    The tar is untrusted: it is applied with `apply_layer` into a private directory under the store
    (absolute, `..` and symlink-escaping members, hard links to outside: UnsafeLayer, and nothing is
    recorded), and that directory is archived again as the layer. `changes` are Docker-style
    `--change` instructions (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME,
    WORKDIR); `message` becomes the history comment. Returns the new image (dangling without `name`)."""
    names = [normalize_name(name)] if name else []
    if names and Reference.parse(names[0]).digest is not None:
        raise ArchiveError(f"cannot name an imported image {name!r}: give NAME[:TAG], without a digest")
    container_config = config_from_changes(changes)
    where = describe(source)
    label = os.path.basename(where.rstrip("/")) or where
    if isinstance(source, (str, os.PathLike)) and not os.path.exists(os.fspath(source)):
        raise ArchiveError(f"cannot import {where}: no such file or directory")
    work = tempfile.mkdtemp(prefix="import-", dir=store_tmp_dir(store))
    try:
        if isinstance(source, (str, os.PathLike)) and os.path.isdir(os.fspath(source)):
            root = os.fspath(source)
        else:
            root = os.path.join(work, "rootfs")
            _unpack_rootfs(source, root, where, progress)
        with store.content.lease():
            try:
                with store.content.writer() as w:
                    info = dir_to_layer(root, cast(BinaryIO, w), compression)
                    digest = w.commit()
            except LayerError as e:
                raise type(e)(f"cannot import {where}: {e}; nothing was imported") from None
            except ContentError as e:
                raise ArchiveError(f"cannot import {where}: {e}") from None
            if str(digest) != info.digest:  # the layer writer and the content store disagree
                raise ArchiveError(f"cannot import {where}: the layer was not stored as written; try again")
            platform = host_platform()
            created = _now()
            config = ImageConfig(
                created=created,
                architecture=platform.architecture,
                os=platform.os,
                variant=platform.variant,
                config=container_config,
                rootfs=RootFS(type="layers", diff_ids=[info.diff_id]),
                history=[History(created=created, created_by=f"imported from {label}", comment=message)],
            )
            layer = Descriptor(media_type=info.media_type, digest=info.digest, size=info.size)
            return store.commit(encode_image_config(config), [layer], names=names)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _unpack_rootfs(
    source: str | os.PathLike[str] | IO[bytes] | BinaryIO, root: str, where: str, progress: Progress | None
) -> None:
    f: IO[bytes] | BinaryIO
    own = isinstance(source, (str, os.PathLike))
    if own:
        try:
            f = open(os.fspath(cast(str, source)), "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise ArchiveError(f"cannot open {where}: {e.strerror}") from None
    else:
        f = cast(BinaryIO, source)
    try:
        total = 0
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(f.fileno())
            total = st.st_size if stat.S_ISREG(st.st_mode) else 0
        counted = CountingReader(f, f"importing {os.path.basename(where)}", total, progress)
        try:
            apply_layer(cast(BinaryIO, counted), root)
        except LayerError as e:
            raise type(e)(f"cannot import {where}: {e}; nothing was imported") from None
        counted.finish()
    finally:
        if own:
            f.close()


def dumps(doc: Any) -> bytes:
    """Compact JSON (what the archive formats' small files hold)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
