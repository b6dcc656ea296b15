"""Network records (`$COCON_ROOT/networks.db`): Docker's three predefined networks and user networks.

**Stub records only.** cocon has no bridged networking yet (that is the network layer's issue):
containers get `none` (their own namespace with `lo`) or `host`. This module keeps what Docker
clients expect to list and inspect — `bridge`, `host` and `none`, made on first use with stable
random IDs — and records user networks created through the API so that `docker network create/ls/
inspect/rm` behave, with a warning that containers cannot join them yet. The network layer will
own these records (and add IPAM, endpoints and the bridge itself) when it lands.
"""

from __future__ import annotations

import _sqlite3
import builtins
import os
import time

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING, record
from cocon.engine.db import open_db
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound

if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

DB_NAME = "networks.db"

PREDEFINED = {"bridge": "bridge", "host": "host", "none": "null"}  # name -> driver
NOT_YET = (
    "cocon has no bridged networking yet (a later release adds it): containers can use "
    "--network none or --network host"
)

SCHEMA_VERSION = 1  # raise with every change to _SCHEMA
_SCHEMA = """
CREATE TABLE IF NOT EXISTS networks (
    id TEXT PRIMARY KEY,              -- 64 hex digits
    name TEXT NOT NULL UNIQUE,
    driver TEXT NOT NULL,             -- bridge, host, null
    created TEXT NOT NULL,            -- RFC 3339, UTC
    internal INTEGER NOT NULL DEFAULT 0,
    attachable INTEGER NOT NULL DEFAULT 0,
    ipv6 INTEGER NOT NULL DEFAULT 0,
    options TEXT NOT NULL DEFAULT '{}',   -- JSON
    labels TEXT NOT NULL DEFAULT '{}',    -- JSON
    ipam TEXT NOT NULL DEFAULT '{}'       -- JSON: Docker's IPAM object as given
);
"""

_COLUMNS = "id, name, driver, created, internal, attachable, ipv6, options, labels, ipam"

_NAME_FIRST = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | set("_.-")


@record
class Network:
    id: str
    name: str
    driver: str
    created: str
    internal: bool
    attachable: bool
    ipv6: bool
    options: dict[str, str]
    labels: dict[str, str]
    ipam: dict[str, Any]

    @property
    def predefined(self) -> bool:
        return self.name in PREDEFINED

    def to_docker(self) -> dict[str, Any]:
        """Docker's `GET /networks/{id}` document."""
        ipam: dict[str, Any] = {"Driver": "default", "Options": None, "Config": []}
        ipam.update(self.ipam)
        return {
            "Name": self.name,
            "Id": self.id,
            "Created": self.created,
            "Scope": "local",
            "Driver": self.driver,
            "EnableIPv4": True,
            "EnableIPv6": self.ipv6,
            "IPAM": ipam,
            "Internal": self.internal,
            "Attachable": self.attachable,
            "Ingress": False,
            "ConfigFrom": {"Network": ""},
            "ConfigOnly": False,
            "Containers": {},
            "Options": dict(self.options),
            "Labels": dict(self.labels),
        }


def _now() -> str:
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 1_000_000_000)) + f".{ns % 10**9:09d}Z"


def _row(row: tuple[Any, ...]) -> Network:
    id_, name, driver, created, internal, attachable, ipv6, options, labels, ipam = row
    return Network(
        id=id_, name=name, driver=driver, created=created, internal=bool(internal),
        attachable=bool(attachable), ipv6=bool(ipv6), options=_fastjson.loads(options),
        labels=_fastjson.loads(labels), ipam=_fastjson.loads(ipam),
    )  # fmt: skip


def validate_name(name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 255
        or name[0] not in _NAME_FIRST
        or any(c not in _NAME_REST for c in name)
    ):
        raise InvalidRequest(
            f"invalid network name {name!r}: use letters, digits, '_', '.', '-', starting with a letter "
            "or digit"
        )
    return name


class NetworkStore:
    """The records under `root`; the predefined networks are made on first use."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, DB_NAME)
        self._db: _sqlite3.Connection | None = None

    def _conn(self) -> _sqlite3.Connection:
        if self._db is None:
            db = open_db(self.root, self.path, _SCHEMA, SCHEMA_VERSION, what="network database")
            for name, driver in PREDEFINED.items():
                db.execute(
                    f"INSERT OR IGNORE INTO networks({_COLUMNS}) VALUES (?,?,?,?,0,0,0,'{{}}','{{}}','{{}}')",
                    (os.urandom(32).hex(), name, driver, _now()),
                )
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def list(self) -> list[Network]:
        try:
            rows = self._conn().execute(f"SELECT {_COLUMNS} FROM networks ORDER BY name").fetchall()
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read {self.path}: {exc}") from None
        return [_row(r) for r in rows]

    def get(self, ref: str) -> Network:
        """By full ID, then name, then a unique ID prefix (Docker's order)."""
        db = self._conn()
        try:
            row = db.execute(f"SELECT {_COLUMNS} FROM networks WHERE id = ?", (ref,)).fetchone()
            if row is None:
                row = db.execute(f"SELECT {_COLUMNS} FROM networks WHERE name = ?", (ref,)).fetchone()
            if row is None and ref and all(c in "0123456789abcdef" for c in ref):
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM networks WHERE substr(id, 1, ?) = ?", (len(ref), ref)
                ).fetchall()
                if len(rows) > 1:
                    raise NotFound(f"network {ref!r} is ambiguous ({len(rows)} matches): give more of the ID")
                row = rows[0] if rows else None
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read {self.path}: {exc}") from None
        if row is None:
            raise NotFound(f"network {ref} not found: list them with 'docker network ls'")
        return _row(row)

    def create(
        self,
        name: str,
        *,
        driver: str = "bridge",
        internal: bool = False,
        attachable: bool = False,
        ipv6: bool = False,
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        ipam: Mapping[str, Any] | None = None,
    ) -> Network:
        validate_name(name)
        if name in PREDEFINED:
            raise Conflict(f"{name} is a pre-defined network and cannot be created again")
        if driver != "bridge":
            raise InvalidRequest(
                f"network driver {driver!r} is not supported: cocon records bridge networks only "
                f"(and {NOT_YET})"
            )
        net_id = os.urandom(32).hex()
        try:
            self._conn().execute(
                f"INSERT INTO networks({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (net_id, name, driver, _now(), int(internal), int(attachable), int(ipv6),
                 _fastjson.dumps(dict(options or {})), _fastjson.dumps(dict(labels or {})),
                 _fastjson.dumps(dict(ipam or {}))),
            )  # fmt: skip
        except _sqlite3.IntegrityError:
            raise Conflict(f"network with name {name} already exists: choose another name") from None
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None
        return self.get(net_id)

    def remove(self, ref: str) -> Network:
        net = self.get(ref)
        if net.predefined:
            raise PredefinedNetwork(f"{net.name} is a pre-defined network and cannot be removed")
        try:
            self._conn().execute("DELETE FROM networks WHERE id = ?", (net.id,))
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None
        return net

    def prune(self) -> builtins.list[Network]:
        """Remove every user network (none can be in use before cocon has networking)."""
        removed = []
        for net in self.list():
            if not net.predefined:
                removed.append(self.remove(net.id))
        return removed


class PredefinedNetwork(EngineError):
    """Docker answers 403 Forbidden for operations on the predefined networks."""

    status = 403
