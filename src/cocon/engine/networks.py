"""Network records (`$COCON_ROOT/networks.db`): Docker's three predefined networks and user networks.

The Docker side of networks: what clients list and inspect — `bridge`, `host` and `none`, made on
first use with stable random IDs — and the user networks created through the API (IDs, labels,
options, the IPAM request). The networks themselves (bridges, addresses, firewall, DNS) are
cocon.network's `NetworkStack`, in the same database file (its `net_*` tables, among them
`net_rules`: the allow rules of `network policy` and of `cocon.policy.allow-from` labels), which
cocon.engine.netattach keeps in step with these records (docs/network.md).

Endpoints are records too: which container was created on, or connected to, which user network,
with its aliases (`docker network connect`, docker-compose's networks), so that `docker network
inspect`, `rm` (refused while a container is attached) and docker-compose behave as with dockerd.
Endpoints of containers that are gone are dropped by `drop_stale_endpoints`, which the API calls
before answering.
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
    from collections.abc import Iterable, Mapping
    from typing import Any

DB_NAME = "networks.db"

PREDEFINED = {"bridge": "bridge", "host": "host", "none": "null"}  # name -> driver

SCHEMA_VERSION = 2  # raise with every change to _SCHEMA
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
CREATE TABLE IF NOT EXISTS endpoints (
    network_id TEXT NOT NULL REFERENCES networks(id) ON DELETE CASCADE,
    container_id TEXT NOT NULL,       -- 64 hex digits
    container_name TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,        -- 64 hex digits
    aliases TEXT NOT NULL DEFAULT '[]',   -- JSON list of strings
    links TEXT NOT NULL DEFAULT '[]',     -- JSON list of "container:alias" (network-scoped links)
    created TEXT NOT NULL,
    PRIMARY KEY (network_id, container_id)
);
CREATE INDEX IF NOT EXISTS endpoints_by_container ON endpoints(container_id);
CREATE TABLE IF NOT EXISTS network_modes (  -- a container's HostConfig.NetworkMode naming a user network
    container_id TEXT PRIMARY KEY,
    network TEXT NOT NULL             -- the name given at create (kept across disconnect/connect)
);
"""

_COLUMNS = "id, name, driver, created, internal, attachable, ipv6, options, labels, ipam"

_NAME_FIRST = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | set("_.-")


@record
class Endpoint:
    """A container's record on a user network (no connectivity yet: see the module's doc)."""

    network_id: str
    network_name: str
    container_id: str
    container_name: str
    endpoint_id: str
    aliases: list[str]
    links: list[str]

    def to_docker(self) -> dict[str, Any]:
        """The container's `NetworkSettings.Networks[name]` entry (no address: no connectivity)."""
        return {
            "IPAMConfig": None, "Links": list(self.links) or None, "Aliases": list(self.aliases) or None,
            "MacAddress": "", "DriverOpts": None, "NetworkID": self.network_id,
            "EndpointID": self.endpoint_id, "Gateway": "", "IPAddress": "", "IPPrefixLen": 0,
            "IPv6Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "DNSNames": None,
        }  # fmt: skip


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

    def to_docker(self, endpoints: Iterable[Endpoint] = ()) -> dict[str, Any]:
        """Docker's `GET /networks/{id}` document; `endpoints` fill its Containers."""
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
            "Containers": {
                ep.container_id: {
                    "Name": ep.container_name,
                    "EndpointID": ep.endpoint_id,
                    "MacAddress": "",
                    "IPv4Address": "",
                    "IPv6Address": "",
                }
                for ep in endpoints
            },
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
                f"network driver {driver!r} is not supported: cocon makes bridge networks only "
                "(leave --driver out)"
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
        """Remove a user network; refused (403, as dockerd) while containers are attached to it."""
        net = self.get(ref)
        if net.predefined:
            raise PredefinedNetwork(f"{net.name} is a pre-defined network and cannot be removed")
        users = self.endpoints(network_id=net.id)
        if users:
            names = ", ".join(sorted(ep.container_name for ep in users))
            raise PredefinedNetwork(
                f"error while removing network: network {net.name} id {net.id} has active endpoints "
                f"({names}): remove those containers or disconnect them first"
            )
        try:
            self._conn().execute("DELETE FROM networks WHERE id = ?", (net.id,))
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None
        return net

    def prune(self) -> builtins.list[Network]:
        """Remove every user network no container is attached to."""
        used = {ep.network_id for ep in self.endpoints()}
        removed = []
        for net in self.list():
            if not net.predefined and net.id not in used:
                removed.append(self.remove(net.id))
        return removed

    # --- endpoints ------------------------------------------------------------------------------------
    def endpoints(
        self, *, network_id: str | None = None, container_id: str | None = None
    ) -> builtins.list[Endpoint]:
        """The endpoint records, of one network and/or one container, oldest first."""
        where, args = [], []
        if network_id is not None:
            where.append("e.network_id = ?")
            args.append(network_id)
        if container_id is not None:
            where.append("e.container_id = ?")
            args.append(container_id)
        sql = (
            "SELECT e.network_id, n.name, e.container_id, e.container_name, e.endpoint_id, e.aliases, "
            "e.links FROM endpoints e JOIN networks n ON n.id = e.network_id"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY e.created, n.name"
        )
        try:
            rows = self._conn().execute(sql, args).fetchall()
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read {self.path}: {exc}") from None
        return [
            Endpoint(
                network_id=r[0],
                network_name=r[1],
                container_id=r[2],
                container_name=r[3],
                endpoint_id=r[4],
                aliases=list(_fastjson.loads(r[5])),
                links=list(_fastjson.loads(r[6])),
            )
            for r in rows
        ]

    def connect(
        self,
        ref: str,
        container_id: str,
        container_name: str,
        aliases: Iterable[str] = (),
        *,
        links: Iterable[str] = (),
    ) -> Endpoint:
        """Record `container_id` on the user network `ref` (a Conflict if it is there already)."""
        net = self.get(ref)
        if net.predefined:
            raise InvalidRequest(
                f"containers cannot be connected to the pre-defined network {net.name} after create: "
                "choose it with --network when creating the container"
            )
        names = []
        for alias in aliases:
            if not isinstance(alias, str) or not alias or len(alias) > 255 or any(c.isspace() for c in alias):
                raise InvalidRequest(f"invalid network alias {alias!r}: give a host name")
            if alias not in names:
                names.append(alias)
        try:
            self._conn().execute(
                "INSERT INTO endpoints(network_id, container_id, container_name, endpoint_id, aliases, "
                "links, created) VALUES (?,?,?,?,?,?,?)",
                (net.id, container_id, container_name, os.urandom(32).hex(), _fastjson.dumps(names),
                 _fastjson.dumps(list(links)), _now()),
            )  # fmt: skip
        except _sqlite3.IntegrityError:
            raise Conflict(
                f"endpoint with name {container_name} already exists in network {net.name}: "
                "disconnect it first"
            ) from None
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None
        return self.endpoints(network_id=net.id, container_id=container_id)[0]

    def disconnect(self, ref: str, container_id: str, container_name: str) -> Network:
        """Drop the record of `container_id` on network `ref` (NotFound when it is not connected)."""
        net = self.get(ref)
        try:
            cur = self._conn().execute(
                "DELETE FROM endpoints WHERE network_id = ? AND container_id = ?", (net.id, container_id)
            )
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None
        if cur.rowcount == 0:
            raise NotFound(f"container {container_name} is not connected to network {net.name}")
        return net

    def set_mode(self, container_id: str, network: str) -> None:
        """Record that `container_id` was created with the user network `network` as NetworkMode."""
        try:
            self._conn().execute(
                "INSERT OR REPLACE INTO network_modes(container_id, network) VALUES (?,?)",
                (container_id, network),
            )
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None

    def modes(self) -> dict[str, str]:
        """{container id: the user network it was created with as NetworkMode}."""
        try:
            rows = self._conn().execute("SELECT container_id, network FROM network_modes").fetchall()
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read {self.path}: {exc}") from None
        return {r[0]: r[1] for r in rows}

    def forget_container(self, container_id: str) -> None:
        """Drop every endpoint (and the network mode) of a container that was removed."""
        try:
            db = self._conn()
            db.execute("DELETE FROM endpoints WHERE container_id = ?", (container_id,))
            db.execute("DELETE FROM network_modes WHERE container_id = ?", (container_id,))
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot write {self.path}: {exc}") from None

    def drop_stale_endpoints(self, live: Iterable[str]) -> None:
        """Drop the records of containers not in `live` (removed, e.g. --rm, without the API)."""
        keep = set(live)
        for container_id in ({ep.container_id for ep in self.endpoints()} | set(self.modes())) - keep:
            self.forget_container(container_id)


class PredefinedNetwork(EngineError):
    """Docker answers 403 Forbidden for operations on the predefined networks."""

    status = 403
