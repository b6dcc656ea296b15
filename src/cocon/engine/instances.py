"""Instance records in SQLite (`$COCON_ROOT/instances.db`, WAL).

One row per instance (what Docker calls a container): its id and unique name, the image it runs,
its isolation, its status and exit code, when it was created, started and finished, the snapshot
that holds its root filesystem, the process that supervises it, and its configuration (the create
request and what the engine resolved from it, as JSON). `mounts` records which volumes each instance
uses, so that a volume in use is never removed.

Every change is one transaction; writes do not wait for fsync (`synchronous=NORMAL` in WAL mode: a
power cut may lose the last transactions, never corrupt the file), which keeps `cocon run` fast.
The schema carries a version (`PRAGMA user_version`) for later migrations.

This module imports `_sqlite3` directly (the `sqlite3` package adds date adapters `cocon run` does
not need, and their import time).
"""

from __future__ import annotations

import _sqlite3
import builtins
import os
import time

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING, record
from cocon.engine.db import open_db
from cocon.engine.errors import Conflict, EngineError, NotFound

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

DB_NAME = "instances.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,              -- 64 hex digits
    name TEXT NOT NULL UNIQUE,        -- unique among instances
    image TEXT NOT NULL,              -- image ID (sha256:<hex>)
    image_ref TEXT NOT NULL,          -- the image as the user named it
    isolation TEXT NOT NULL,          -- container, microvm, vm
    status TEXT NOT NULL,             -- created, running, exited, dead
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT '',
    pid INTEGER NOT NULL DEFAULT 0,   -- the instance's main process on the host (0: none)
    supervisor INTEGER NOT NULL DEFAULT 0,  -- pid of the process that waits for it (CLI or daemon)
    supervisor_start INTEGER NOT NULL DEFAULT 0,  -- its start time (/proc/<pid>/stat field 22)
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    snapshot TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL              -- JSON
);
CREATE TABLE IF NOT EXISTS mounts (
    instance TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,
    volume TEXT NOT NULL,
    anonymous INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (instance, volume)
);
CREATE INDEX IF NOT EXISTS mounts_by_volume ON mounts(volume);
CREATE INDEX IF NOT EXISTS instances_by_image ON instances(image);
"""

_COLUMNS = (
    "id, name, image, image_ref, isolation, status, exit_code, error, pid, supervisor, supervisor_start, "
    "created, started, finished, snapshot, config"
)


@record
class InstanceRecord:
    id: str
    name: str
    image: str
    image_ref: str
    isolation: str
    status: str
    exit_code: int | None
    error: str
    pid: int
    supervisor: int
    supervisor_start: int
    created: float
    started: float | None
    finished: float | None
    snapshot: str
    config: dict[str, Any]

    @property
    def short_id(self) -> str:
        return self.id[:12]


def _row(row: tuple[Any, ...]) -> InstanceRecord:
    (id_, name, image, image_ref, isolation, status, exit_code, error, pid, supervisor, supervisor_start,
     created, started, finished, snapshot, config) = row  # fmt: skip
    return InstanceRecord(
        id=id_, name=name, image=image, image_ref=image_ref, isolation=isolation, status=status,
        exit_code=exit_code, error=error, pid=pid, supervisor=supervisor, supervisor_start=supervisor_start,
        created=created, started=started, finished=finished, snapshot=snapshot,
        config=_fastjson.loads(config),
    )  # fmt: skip


class InstanceStore:
    """The records under `root` (`root/instances.db`)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, DB_NAME)
        self._db: _sqlite3.Connection | None = None

    def _conn(self) -> _sqlite3.Connection:
        if self._db is None:
            db = open_db(self.root, self.path, _SCHEMA, SCHEMA_VERSION, what="instance database")
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, sql: str, args: Iterable[Any]) -> int:
        try:
            return self._conn().execute(sql, tuple(args)).rowcount
        except _sqlite3.IntegrityError:
            raise
        except _sqlite3.Error as exc:
            raise EngineError(f"instance database {self.path}: {exc}") from None

    # --- writing ---------------------------------------------------------------------------------
    def insert(self, rec: InstanceRecord, volumes: Iterable[tuple[str, bool]] = ()) -> None:
        """Add a record (and the volumes it mounts); Conflict if the name is taken."""
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    f"INSERT INTO instances({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.id, rec.name, rec.image, rec.image_ref, rec.isolation, rec.status, rec.exit_code,
                     rec.error, rec.pid, rec.supervisor, rec.supervisor_start, rec.created, rec.started,
                     rec.finished, rec.snapshot, _fastjson.dumps(rec.config)),
                )  # fmt: skip
                for name, anonymous in volumes:
                    db.execute(
                        "INSERT OR IGNORE INTO mounts(instance, volume, anonymous) VALUES (?,?,?)",
                        (rec.id, name, int(anonymous)),
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except _sqlite3.IntegrityError:
            if self.find_by_name(rec.name) is not None:
                raise Conflict(
                    f"the name {rec.name!r} is already used by container {self.find_by_name(rec.name)}: "
                    "remove it (cocon rm) or pick another --name"
                ) from None
            raise Conflict(f"container id {rec.id} exists already") from None
        except _sqlite3.Error as exc:
            raise EngineError(f"instance database {self.path}: {exc}") from None

    def update(self, instance_id: str, **fields: Any) -> None:
        """Set some columns of one record (`config` is given as a dict)."""
        if "config" in fields:
            fields["config"] = _fastjson.dumps(fields["config"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._write(f"UPDATE instances SET {cols} WHERE id = ?", [*fields.values(), instance_id])

    def delete(self, instance_id: str) -> None:
        self._write("DELETE FROM instances WHERE id = ?", [instance_id])

    # --- reading ---------------------------------------------------------------------------------
    def find_by_name(self, name: str) -> str | None:
        row = self._conn().execute("SELECT id FROM instances WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def get(self, ref: str) -> InstanceRecord:
        """By full id, by name, or by a unique prefix of the id (Docker's order)."""
        db = self._conn()
        row = db.execute(f"SELECT {_COLUMNS} FROM instances WHERE id = ? OR name = ?", (ref, ref)).fetchone()
        if row is not None:
            return _row(row)
        if ref and all(c in "0123456789abcdef" for c in ref):
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM instances WHERE substr(id, 1, ?) = ?", (len(ref), ref)
            ).fetchall()
            if len(rows) == 1:
                return _row(rows[0])
            if len(rows) > 1:
                raise NotFound(f"{ref!r} matches {len(rows)} containers: give more digits of the id")
        raise NotFound(f"no container {ref!r}: `cocon ps -a` lists them")

    def list(self) -> list[InstanceRecord]:
        """Every record, newest first."""
        rows = self._conn().execute(f"SELECT {_COLUMNS} FROM instances ORDER BY created DESC").fetchall()
        return [_row(r) for r in rows]

    def uses_image(self, image_id: str) -> bool:
        row = self._conn().execute("SELECT 1 FROM instances WHERE image = ? LIMIT 1", (image_id,)).fetchone()
        return row is not None

    def image_users(self) -> set[str]:
        return {str(r[0]) for r in self._conn().execute("SELECT DISTINCT image FROM instances")}

    def volume_users(self, volume: str) -> builtins.list[str]:
        rows = self._conn().execute("SELECT instance FROM mounts WHERE volume = ?", (volume,))
        return [str(r[0]) for r in rows]

    def volumes_of(self, instance_id: str) -> builtins.list[tuple[str, bool]]:
        rows = self._conn().execute("SELECT volume, anonymous FROM mounts WHERE instance = ?", (instance_id,))
        return [(str(r[0]), bool(r[1])) for r in rows]


def now() -> float:
    return time.time()
