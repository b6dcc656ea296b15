"""Opening the engine's SQLite databases: WAL, NORMAL sync, a versioned schema applied in one transaction.

WAL with synchronous=NORMAL never corrupts the database on a crash; a power loss may lose the last
transactions, which the engine's reconciliation at start-up tolerates (it re-reads the supervisors'
exit files).
"""

from __future__ import annotations

import _sqlite3  # the C module: `sqlite3` adds a few ms of imports to `cocon run`
import os

from cocon.engine.errors import EngineError


def open_db(root: str, path: str, schema: str, version: int, *, what: str) -> _sqlite3.Connection:
    """Open `path` (creating `root` 0700), and create or upgrade its tables with `schema` (idempotent
    CREATE … IF NOT EXISTS statements) when its user_version is below `version`."""
    try:
        os.makedirs(root, 0o700, exist_ok=True)
        db = _sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > version:
            db.close()
            raise EngineError(
                f"{path} was written by a newer cocon (schema {found}; this one knows {version}): "
                "upgrade cocon"
            )
        if found < version:
            db.execute("PRAGMA journal_mode=WAL")
            # one script, one transaction; CREATE … IF NOT EXISTS makes a concurrent set-up harmless
            db.executescript(f"BEGIN IMMEDIATE;{schema}PRAGMA user_version={version};COMMIT;")
    except (_sqlite3.Error, OSError) as exc:
        raise EngineError(f"cannot open the {what} {path}: {exc}; check that {root} is writable") from None
    return db
