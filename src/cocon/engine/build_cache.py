"""The layer cache of `cocon build`: which step results exist, keyed by everything that determines them.

A build step's result is an image config (bytes) and the layer descriptors of the image after the step.
The cache stores that pair in SQLite (`<state_dir>/cache.db`) under the step's **key**:

    key = sha256(canonical JSON of {version, parent, op})

- `parent` is the ID (config digest) of the image the step starts from: the base image, or the result
  of the previous step. The parent's config holds the ENV, WORKDIR, USER, SHELL and layers in force,
  so none of them has to be repeated; a changed step changes its result's ID and so every later key.
- `op` describes the instruction after variable expansion: its keyword, words and flags (never its
  line number), and what else it depends on: for RUN the build environment (ENV plus ARG values;
  the proxy build args are left out, as Docker does), for COPY/ADD the digest of the source files
  (`SourceDigest`: names, types, modes, owners where they are kept, contents and link targets —
  never mtimes, as in Docker).

Intermediate results are **not images**: they live only here. Their layer blobs stay in the content
store because `roots()` gives them to `ImageStore.gc(extra_roots=...)`. `prune()` forgets entries, after
which the next gc frees their blobs.

The cache also remembers the sha256 of context files by (path, device, inode, size, mtime, ctime), so
that a cached rebuild does not read every source file again (the idea of git's index and BuildKit's
content checksum cache). An entry is only kept for a file whose ctime is at least a second older than
the moment it was hashed, so a file changed right after being hashed is never mistaken for the old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from cocon.images.build_errors import BuildError
from cocon.oci.errors import OCIError
from cocon.oci.image_spec import Descriptor, encode_descriptor, parse_descriptor

CACHE_VERSION = "cocon-build-cache-v1"
DB_NAME = "cache.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    key TEXT PRIMARY KEY,       -- sha256 of (version, parent image ID, normalized instruction)
    config BLOB NOT NULL,       -- the image config after the step (its sha256 is the result's ID)
    layers TEXT NOT NULL,       -- JSON list of the layer descriptors after the step
    created REAL NOT NULL,
    used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,      -- absolute path of a context file
    dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime INTEGER NOT NULL, ctime INTEGER NOT NULL,   -- nanoseconds
    digest TEXT NOT NULL
);
"""

# Fields of an instruction that say where it is, not what it does.
_POSITION_FIELDS = frozenset({"line", "end_line", "original"})


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def step_key(parent: str, op: Mapping[str, Any]) -> str:
    """The cache key of a step that starts from image `parent` (an image ID, or "scratch") and does `op`."""
    doc = {"version": CACHE_VERSION, "parent": parent, "op": op}
    return "sha256:" + hashlib.sha256(canonical(doc)).hexdigest()


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name)) for f in fields(value) if f.name not in _POSITION_FIELDS
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def instruction_doc(instruction: Any) -> dict[str, Any]:
    """An expanded instruction as plain data, without its place in the file: moving an instruction to
    another line, or re-indenting the file, keeps its cache entry."""
    doc = _plain(instruction)
    if not isinstance(doc, dict):
        raise TypeError(f"not an instruction: {instruction!r}")
    doc["class"] = type(instruction).__name__
    return doc


def config_op(instruction: Any, **resolved: Any) -> dict[str, Any]:
    """The cache input of an instruction that changes the config only (and WORKDIR): the expanded
    instruction plus what the builder resolved (the final CMD/ENTRYPOINT argv, the WORKDIR path)."""
    op = instruction_doc(instruction)
    op.update(resolved)
    return op


def run_op(
    instruction: Any,
    argv: Sequence[str],
    env: Mapping[str, str],
    network: str,
    script: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The cache input of a RUN: the instruction, the argv it runs (SHELL applied), its build
    environment (ENV and ARG values; never the proxy args) and network mode."""
    op = instruction_doc(instruction)
    op.update(argv=list(argv), env=sorted(env.items()), network=network, script=script)
    return op


def copy_op(instruction: Any, sources: str, from_rootfs: bool) -> dict[str, Any]:
    """The cache input of a COPY/ADD: the instruction (sources, destination, flags) and the digest of
    the files it copies (`SourceDigest`)."""
    op = instruction_doc(instruction)
    op.update(sources=sources, from_kind="rootfs" if from_rootfs else "context")
    return op


class SourceDigest:
    """The digest of what a COPY/ADD copies, fed one entry at a time in copy order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def item(self, kind: str, name: str) -> None:
        """A new source (a file or directory named on the instruction's line, or a heredoc)."""
        self._h.update(canonical(["item", kind, name]) + b"\n")

    def entry(
        self,
        path: str,
        kind: str,
        mode: int,
        owner: tuple[int, int] | None,
        size: int,
        detail: str,
    ) -> None:
        """One file system entry: `path` relative to its source, `kind` ("f", "d", "l", "c", "b", "p"),
        permission bits, owner when the copy keeps it, size, and content digest / link target /
        device number."""
        self._h.update(canonical([path, kind, mode & 0o7777, owner, size, detail]) + b"\n")

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    key: str
    config: bytes
    layers: tuple[Descriptor, ...]
    created: float

    @property
    def image_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.config).hexdigest()


FileStat = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns


def file_stat(st: os.stat_result) -> FileStat:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class BuildCache:
    """Step results and context-file digests in `<state_dir>/cache.db` (SQLite, WAL)."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, 0o700, exist_ok=True)
        self.path = os.path.join(state_dir, DB_NAME)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()  # one connection, shared by the threads of a daemon

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                raise BuildError(
                    f"cannot open the build cache {self.path}: {exc}; remove the file to start an empty cache"
                ) from None
            self._db = db
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- step results ------------------------------------------------------------------------------

    def get(self, key: str) -> CacheEntry | None:
        rows = self._query("SELECT config, layers, created FROM steps WHERE key = ?", (key,))
        if not rows:
            return None
        row = rows[0]
        try:
            layers = tuple(parse_descriptor(json.dumps(d), "cached layer") for d in json.loads(row[1]))
        except (ValueError, OCIError):
            self.remove(key)  # a damaged row is a miss, and goes
            return None
        with self._transaction() as db:
            db.execute("UPDATE steps SET used = ? WHERE key = ?", (time.time(), key))
        return CacheEntry(key=key, config=bytes(row[0]), layers=layers, created=row[2])

    def put(self, key: str, config: bytes, layers: Sequence[Descriptor]) -> CacheEntry:
        """Record a step result (replacing an older one with the same key, as `--no-cache` builds do).
        The layer blobs must already be in the content store: write them and call this inside
        `content.lease()`, so that gc cannot run in between."""
        now = time.time()
        encoded = json.dumps([json.loads(encode_descriptor(d)) for d in layers])
        with self._transaction() as db:
            db.execute(
                "INSERT INTO steps(key, config, layers, created, used) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET config = excluded.config, layers = excluded.layers, "
                "created = excluded.created, used = excluded.used",
                (key, config, encoded, now, now),
            )
        return CacheEntry(key=key, config=config, layers=tuple(layers), created=now)

    def remove(self, key: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM steps WHERE key = ?", (key,))

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM steps")[0][0])

    def roots(self) -> list[str]:
        """The layer blobs cached results need: pass as `ImageStore.gc(extra_roots=cache.roots)`."""
        found: set[str] = set()
        for (layers,) in self._query("SELECT layers FROM steps"):
            try:
                found.update(str(d["digest"]) for d in json.loads(layers))
            except (ValueError, TypeError, KeyError):
                continue
        return sorted(found)

    def prune(self, *, unused_for: float | None = None) -> int:
        """Forget cached steps (all, or those not used for `unused_for` seconds); returns how many.
        Their blobs go at the next `ImageStore.gc(extra_roots=cache.roots)`."""
        with self._transaction() as db:
            if unused_for is None:
                cur = db.execute("DELETE FROM steps")
                db.execute("DELETE FROM files")
            else:
                cur = db.execute("DELETE FROM steps WHERE used < ?", (time.time() - unused_for,))
        return cur.rowcount

    # --- context file digests ----------------------------------------------------------------------

    def file_digests(self, directory: str) -> dict[str, tuple[FileStat, str]]:
        """Remembered digests of the files below `directory` (absolute path), by path."""
        prefix = directory.rstrip("/") + "/"
        rows = self._query(
            "SELECT path, dev, ino, size, mtime, ctime, digest FROM files WHERE path >= ? AND path < ?",
            (prefix, prefix[:-1] + "0"),  # "0" sorts right after "/"
        )
        return {r[0]: ((r[1], r[2], r[3], r[4], r[5]), r[6]) for r in rows}

    def save_file_digests(self, entries: Iterable[tuple[str, FileStat, str]]) -> None:
        rows = [(path, *st, digest) for path, st, digest in entries]
        if not rows:
            return
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO files(path, dev, ino, size, mtime, ctime, digest) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET dev = excluded.dev, ino = excluded.ino, "
                "size = excluded.size, mtime = excluded.mtime, ctime = excluded.ctime, "
                "digest = excluded.digest",
                rows,
            )
