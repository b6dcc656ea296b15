"""A content-addressed blob store on the local filesystem (model: containerd's `core/content` local store).

Layout under the store's root (the `blobs/` tree is the same as an OCI image layout's):

    blobs/<algorithm>/<hex>   committed blobs, read-only (0444), named by the digest of their bytes
    ingest/<random>           writes in progress: hashed while written, renamed into blobs/ on commit
    lock                      flock(2): shared while committing or inside lease(), exclusive during gc

Guarantees: a blob is visible under its digest only once its bytes are complete, on disk (fsync'ed file,
then fsync'ed directory after the rename) and match the digest (and size) the writer was told to expect.
A failed, abandoned or killed write never shows under blobs/; what it leaves in ingest/ is removed by
`clean_ingest` (run for hour-old leftovers whenever a store is opened). gc never deletes a blob while
a commit or a lease is in progress.
"""

from __future__ import annotations

import builtins
import fcntl
import os
import stat
import time
from _thread import _local

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING
from cocon.content.errors import (
    BlobCorrupt,
    BlobNotFound,
    ContentError,
    DigestMismatch,
    GCError,
    SizeMismatch,
)
from cocon.oci.digest import ALGORITHMS, Digest, DigestError, Hasher, as_digest, digest_of

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import TracebackType
    from typing import BinaryIO, Protocol

    class Readable(Protocol):
        def read(self, size: int, /) -> bytes: ...


__all__ = ["CHUNK_SIZE", "MAX_MANIFEST_SIZE", "ContentStore", "Writer"]

CHUNK_SIZE = 1 << 20
# Larger blobs are never read as manifests (containerd refuses manifests above 4 MiB as well).
MAX_MANIFEST_SIZE = 4 << 20
INGEST_MAX_AGE = 3600.0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_mismatch(expected: int, actual: int, what: str) -> SizeMismatch:
    return SizeMismatch(
        f"{what} is {actual} bytes but {expected} were expected: the data is truncated or not the "
        "expected blob; nothing was stored",
        expected,
        actual,
    )


class Writer:
    """One blob being written: `write()` chunks, then `commit()`. Use it as a context manager: leaving
    the block without commit (or with an error) removes the partial data."""

    def __init__(self, store: ContentStore, expected: Digest | None, expected_size: int | None) -> None:
        if expected_size is not None and expected_size < 0:
            raise ContentError(f"expected size must be >= 0, got {expected_size}")
        self._store = store
        self._expected = expected
        self._expected_size = expected_size
        self._hasher = Hasher(expected.algorithm if expected is not None else "sha256")
        self._digest: Digest | None = None
        self._fd = -1
        self._path, self._fd = self._create(store._ingest)

    @staticmethod
    def _create(directory: str) -> tuple[str, int]:
        """A new ingest file, locked. The lock tells clean_ingest (in any process) that the file is in
        use; the kernel drops it when the writer's process dies, whatever the way. A clean_ingest with
        older_than=0 may take a file between its creation and its lock: then start over."""
        for _ in range(5):
            path = os.path.join(directory, os.urandom(16).hex())
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise ContentError(f"cannot start a write in {directory}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_nlink > 0:
                    return path, fd
            except BlockingIOError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise ContentError(f"cannot start a write in {directory}: its files keep being removed under it")

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._hasher.size

    @property
    def ingest_path(self) -> str:
        return self._path

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def digest(self) -> Digest | None:
        """The committed blob's digest (None before commit)."""
        return self._digest

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._fd < 0:
            raise ContentError("cannot write: the writer is closed (committed or aborted)")
        view = memoryview(data).cast("B")
        count = len(view)
        if self._expected_size is not None and self.size + count > self._expected_size:
            got = self.size + count
            self.close()
            raise _size_mismatch(self._expected_size, got, "the data written")
        self._hasher.update(view)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self.close()
            raise ContentError(f"cannot write to {self._path}: {exc.strerror}; nothing was stored") from None
        return count

    def commit(self) -> Digest:
        """Check the digest and size, make the data durable, then make it visible under its digest
        (atomically). Idempotent; on any error nothing is stored and the writer is closed."""
        if self._digest is not None:
            return self._digest
        if self._fd < 0:
            raise ContentError("cannot commit: the writer was closed without committing")
        try:
            actual = self._hasher.digest()
            if self._expected_size is not None and self.size != self._expected_size:
                raise _size_mismatch(self._expected_size, self.size, "the data written")
            if self._expected is not None and actual != self._expected:
                raise DigestMismatch(
                    f"the data written hashes to {actual}, not the expected {self._expected}: it is "
                    "corrupt or not the expected blob; nothing was stored",
                    self._expected,
                    actual,
                )
            try:
                os.fsync(self._fd)
                os.fchmod(self._fd, 0o444)
                self._store._place(self._path, actual, self.size)
            except OSError as exc:
                raise ContentError(f"cannot commit blob {actual}: {exc.strerror}") from None
        except BaseException:
            self.close()
            raise
        self._release()
        self._digest = actual
        return actual

    def _release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def close(self) -> None:
        """Abort an uncommitted write (its partial data is removed); nothing to do after commit."""
        if self._fd < 0:
            return
        self._release()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # An abandoned writer cleans up after itself, as a file object closes itself.
        if getattr(self, "_fd", -1) >= 0:
            try:
                self.close()
            except OSError:
                pass


class _StoreLock:
    """flock(2) on the store's lock file for a `with` block: shared, or exclusive (gc)."""

    __slots__ = ("_exclusive", "_fd", "_path")

    def __init__(self, path: str, exclusive: bool) -> None:
        self._path = path
        self._exclusive = exclusive
        self._fd = -1

    def __enter__(self) -> None:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self._exclusive else fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        fd, self._fd = self._fd, -1
        os.close(fd)  # drops the lock


class _Lease:
    """What `ContentStore.lease()` returns: the shared lock, and this thread's lease depth (which gc
    checks so that it never waits for a lease of its own thread)."""

    __slots__ = ("_depth", "_lock", "_store")

    def __init__(self, store: ContentStore) -> None:
        self._store = store
        self._lock = store._locked(exclusive=False)
        self._depth = 0

    def __enter__(self) -> None:
        local = self._store._local
        self._depth = getattr(local, "leases", 0)
        local.leases = self._depth + 1
        try:
            self._lock.__enter__()
        except BaseException:
            local.leases = self._depth
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._lock.__exit__(exc_type, exc, tb)
        finally:
            self._store._local.leases = self._depth


class ContentStore:
    """Blobs by digest under `root` (see the module doc for the layout and the guarantees)."""

    def __init__(self, root: str, *, clean_older_than: float = INGEST_MAX_AGE) -> None:
        self.root = os.path.abspath(root)
        self._blobs = os.path.join(self.root, "blobs")
        self._ingest = os.path.join(self.root, "ingest")
        self._lock_path = os.path.join(self.root, "lock")
        self._local = _local()  # threading.local without importing threading
        try:
            os.makedirs(os.path.join(self._blobs, "sha256"), exist_ok=True)
            os.makedirs(self._ingest, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ContentError(f"cannot create the content store at {self.root}: {exc.strerror}") from None
        self.clean_ingest(clean_older_than)

    def __repr__(self) -> str:
        return f"ContentStore({self.root!r})"

    # --- locking -------------------------------------------------------------------------------------

    def _locked(self, exclusive: bool) -> _StoreLock:
        return _StoreLock(self._lock_path, exclusive)

    def lease(self) -> _Lease:
        """Hold garbage collection off (in every process) for the block: blobs written inside it stay
        even though no root reaches them yet. Record your new roots before the block ends. Do not call
        gc() inside a lease of the same thread (it raises rather than wait for itself)."""
        return _Lease(self)

    # --- writing -------------------------------------------------------------------------------------

    def writer(self, expected: Digest | str | None = None, expected_size: int | None = None) -> Writer:
        """A Writer for one blob; `expected` (and `expected_size`) are checked at commit."""
        return Writer(self, None if expected is None else as_digest(expected), expected_size)

    def _place(self, ingest_path: str, digest: Digest, size: int) -> None:
        """Move a complete, fsync'ed ingest file to its blob path (under the shared store lock, so
        that gc never runs in between), or drop it when the blob is already there."""
        directory = os.path.join(self._blobs, digest.algorithm)
        target = os.path.join(directory, digest.hex)
        with self._locked(exclusive=False):
            os.makedirs(directory, exist_ok=True)
            try:
                existing = os.stat(target).st_size
            except FileNotFoundError:
                existing = -1
            if existing == size:
                os.unlink(ingest_path)  # dedupe: the same bytes are already stored
                return
            os.rename(ingest_path, target)  # atomic; also replaces a truncated copy
            _fsync_dir(directory)

    def put(self, data: bytes | bytearray | memoryview, expected: Digest | str | None = None) -> Digest:
        """Store `data`; returns its digest. With `expected`, raises DigestMismatch if it differs."""
        want = None if expected is None else as_digest(expected)
        actual = digest_of(data, want.algorithm if want is not None else "sha256")
        if want is not None and actual != want:
            raise DigestMismatch(
                f"the data hashes to {actual}, not the expected {want}; nothing was stored", want, actual
            )
        size = memoryview(data).nbytes
        if self._stored_size(actual) == size:
            return actual
        with self.writer(actual, size) as w:
            w.write(data)
            return w.commit()

    def put_stream(
        self, fileobj: Readable, expected: Digest | str | None = None, size: int | None = None
    ) -> Digest:
        """Store everything `fileobj.read()` returns until EOF; `size`, if known, is checked too."""
        with self.writer(expected, size) as w:
            while True:
                chunk = fileobj.read(CHUNK_SIZE)
                if not chunk:
                    break
                w.write(chunk)
            return w.commit()

    def put_file(self, path: str, expected: Digest | str | None = None) -> Digest:
        """Store a copy of the file at `path`."""
        try:
            with builtins.open(path, "rb") as f:
                st = os.fstat(f.fileno())
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                return self.put_stream(f, expected, size)
        except OSError as exc:
            raise ContentError(f"cannot read {path}: {exc.strerror}") from None

    # --- reading -------------------------------------------------------------------------------------

    def _blob_path(self, digest: Digest) -> str:
        return os.path.join(self._blobs, digest.algorithm, digest.hex)

    def _stored_size(self, digest: Digest) -> int:
        try:
            return os.stat(self._blob_path(digest)).st_size
        except FileNotFoundError:
            return -1

    def path(self, digest: Digest | str) -> str:
        """Where the blob is stored; raises BlobNotFound if it is not. Never write to it."""
        d = as_digest(digest)
        p = self._blob_path(d)
        if not os.path.isfile(p):
            raise BlobNotFound(d)
        return p

    def exists(self, digest: Digest | str) -> bool:
        return os.path.isfile(self._blob_path(as_digest(digest)))

    def size(self, digest: Digest | str) -> int:
        d = as_digest(digest)
        size = self._stored_size(d)
        if size < 0:
            raise BlobNotFound(d)
        return size

    def open(self, digest: Digest | str) -> BinaryIO:
        d = as_digest(digest)
        try:
            return builtins.open(self._blob_path(d), "rb")
        except FileNotFoundError:
            raise BlobNotFound(d) from None

    def read(self, digest: Digest | str) -> bytes:
        with self.open(digest) as f:
            return f.read()

    def verify(self, digest: Digest | str) -> None:
        """Rehash the blob; raises BlobCorrupt if its bytes no longer match its digest."""
        d = as_digest(digest)
        h = Hasher(d.algorithm)
        with self.open(d) as f:
            while chunk := f.read(CHUNK_SIZE):
                h.update(chunk)
        actual = h.digest()
        if actual != d:
            raise BlobCorrupt(d, actual)

    def list(self) -> builtins.list[Digest]:
        """Every committed blob, sorted."""
        found: builtins.list[Digest] = []
        for algorithm in sorted(os.listdir(self._blobs)):
            if algorithm not in ALGORITHMS:
                continue
            for name in os.listdir(os.path.join(self._blobs, algorithm)):
                try:
                    found.append(Digest(algorithm, name))
                except DigestError:
                    continue  # not ours
        found.sort()
        return found

    # --- removing ------------------------------------------------------------------------------------

    def delete(self, digest: Digest | str, *, missing_ok: bool = False) -> None:
        d = as_digest(digest)
        try:
            os.unlink(self._blob_path(d))
        except FileNotFoundError:
            if not missing_ok:
                raise BlobNotFound(d) from None

    def clean_ingest(self, older_than: float = INGEST_MAX_AGE) -> builtins.list[str]:
        """Remove what interrupted writes left in ingest/: files not modified for `older_than` seconds
        that no live writer holds (a writer's lock dies with its process). Returns the removed paths.
        Safe with any `older_than`, 0 included: a writer whose brand-new file is taken starts over."""
        removed: builtins.list[str] = []
        now = time.time()
        try:
            names = os.listdir(self._ingest)
        except FileNotFoundError:
            return removed
        for name in names:
            path = os.path.join(self._ingest, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < older_than:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
            finally:
                os.close(fd)
        return removed

    # --- garbage collection --------------------------------------------------------------------------

    def references(self, digest: Digest | str) -> builtins.list[Digest]:
        """The blobs a stored manifest or index refers to (index: manifests; manifest: config and
        layers; both: subject). Empty for blobs that are not manifests or are not stored. Raises
        GCError for a document that looks like a manifest cocon cannot read."""
        from cocon.oci.errors import OCIError
        from cocon.oci.image_spec import manifest_kind, parse_index, parse_manifest

        d = as_digest(digest)
        try:
            with builtins.open(self._blob_path(d), "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_MANIFEST_SIZE:
                    return []
                data = f.read(MAX_MANIFEST_SIZE + 1)
        except FileNotFoundError:
            return []
        if data.lstrip()[:1] != b"{":
            return []
        try:
            doc = _fastjson.loads(data)
        except (ValueError, UnicodeDecodeError):
            return []  # not JSON: a leaf
        source = f"blob {d}"
        try:
            kind = manifest_kind(doc)
            if kind == "index":
                index = parse_index(data, source)
                descriptors = [*index.manifests, *([index.subject] if index.subject else [])]
            elif kind == "manifest":
                m = parse_manifest(data, source, strict=False)
                descriptors = [m.config, *m.layers, *([m.subject] if m.subject else [])]
            else:
                return []  # JSON but not a manifest (an image config, an attestation, ...): a leaf
        except OCIError as exc:
            message = str(exc) if str(exc).startswith(source) else f"{source}: {exc}"
            raise GCError(
                f"{message}. It looks like a manifest that cocon cannot read, so what it refers to is "
                "unknown; remove it (or what refers to it) from the roots, or delete it"
            ) from None
        return [Digest.parse(x.digest) for x in descriptors]

    def reachable(self, roots: Iterable[Digest | str]) -> set[Digest]:
        """`roots` and every blob they reach through manifests and indexes."""
        seen: set[Digest] = set()
        stack = [as_digest(r) for r in roots]
        while stack:
            d = stack.pop()
            if d in seen:
                continue
            seen.add(d)
            stack.extend(c for c in self.references(d) if c not in seen)
        return seen

    def gc(
        self, roots: Iterable[Digest | str] | Callable[[], Iterable[Digest | str]]
    ) -> builtins.list[Digest]:
        """Delete every blob that `roots` do not reach; returns the deleted digests, sorted. Runs under
        the exclusive store lock, so it waits for commits and leases in progress. `roots` may be a
        function: it is then called once the lock is held, so roots recorded by a lease that ended
        while gc waited are seen. Raises GCError (deleting nothing) if a reachable blob is a manifest
        that cannot be read."""
        if getattr(self._local, "leases", 0):
            raise ContentError("gc() inside a lease() of the same thread would wait for itself forever")
        with self._locked(exclusive=True):
            try:
                keep = self.reachable(roots() if callable(roots) else roots)
            except GCError as exc:
                raise GCError(f"gc deleted nothing: {exc}") from None
            removed: builtins.list[Digest] = []
            touched: set[str] = set()
            for d in self.list():
                if d in keep:
                    continue
                try:
                    os.unlink(self._blob_path(d))
                except FileNotFoundError:
                    continue
                removed.append(d)
                touched.add(d.algorithm)
            for algorithm in touched:
                _fsync_dir(os.path.join(self._blobs, algorithm))
        return removed
