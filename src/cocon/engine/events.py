"""The engine's event log: what happened to images, volumes, networks (and containers), in Docker's terms.

    log = EventLog(root)                       # $COCON_ROOT/events.db (SQLite, WAL)
    log.emit("image", "tag", image_id, {"name": "app:1"})
    log.read(after_id=0, since_ns=..., until_ns=...)   # oldest first
    token = subscribe(log.path, callback)      # callback(event) in the emitting thread, this process

Every event is a row (`id` grows monotonically, `time_ns` is wall-clock time): the database is the
source of truth, so a reader in another process (the node daemon, while the CLI works in-process)
sees every event by reading rows after the last id it saw. Subscribers in the same process are also
called right after an event is committed, so a stream (`GET /events`) can answer at once instead of
waiting for its next poll. History is bounded: rows older than the newest `max_events` are deleted
(every 64 inserts), like Docker's in-memory ring of recent events (256 there).

`EventFilter` is Docker's `filters` of `GET /events` (type, event, image, container, volume,
network, label, scope, daemon); `Event.to_docker()` is one line of that stream.

Emitting is cheap (one INSERT, no fsync) and imports only `_sqlite3`: container events will be on
`cocon run`'s path. Nothing here prints; callers decide whether a failed emit matters (the engine
treats events as best effort, see `Engine.emit`).
"""

from __future__ import annotations

import _sqlite3
import _thread
import os
import time

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING, record
from cocon.engine.db import open_db
from cocon.engine.errors import EngineError, InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from typing import Any

DB_NAME = "events.db"
MAX_EVENTS = 1000
TRIM_EVERY = 64

#: Docker's event types (`Type`); cocon emits image, volume, network and (later) container events.
TYPES = ("builder", "config", "container", "daemon", "image", "network", "node", "plugin", "secret",
         "service", "volume")  # fmt: skip

SCHEMA_VERSION = 1  # raise with every change to _SCHEMA
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, also after trimming
    time_ns INTEGER NOT NULL,              -- wall clock, nanoseconds since the epoch
    type TEXT NOT NULL,                    -- image, volume, network, container, ...
    action TEXT NOT NULL,                  -- tag, delete, create, destroy, ...
    actor TEXT NOT NULL,                   -- the object's ID (image ID, volume name, ...)
    attributes TEXT NOT NULL,              -- JSON object of strings (name, labels, ...)
    scope TEXT NOT NULL DEFAULT 'local'
);
CREATE INDEX IF NOT EXISTS events_by_time ON events(time_ns);
"""


@record(frozen=True)
class Event:
    id: int
    time_ns: int
    type: str
    action: str
    actor: str
    attributes: dict[str, str]
    scope: str = "local"

    def to_docker(self, legacy: bool = True) -> dict[str, Any]:
        """One message of Docker's `GET /events` stream. `legacy` adds the fields API versions below
        1.46 still send (`status`, `id`, `from`)."""
        doc: dict[str, Any] = {
            "Type": self.type,
            "Action": self.action,
            "Actor": {"ID": self.actor, "Attributes": dict(self.attributes)},
            "scope": self.scope,
            "time": self.time_ns // 1_000_000_000,
            "timeNano": self.time_ns,
        }
        if legacy and self.type in ("container", "image"):
            doc["status"] = self.action
            doc["id"] = self.actor
            if self.type == "container" and "image" in self.attributes:
                doc["from"] = self.attributes["image"]
        return doc


# --- in-process subscribers --------------------------------------------------------------------------

_lock = _thread.allocate_lock()
_subscribers: dict[int, tuple[str, Callable[[Event], None]]] = {}
_next_token = [0]


def subscribe(path: str, callback: Callable[[Event], None]) -> int:
    """Call `callback(event)` for each event emitted in this process to the log at `path` (in the
    emitting thread, after the commit: keep it short and thread-safe). Returns a token for
    `unsubscribe`. Events emitted by other processes are only seen by reading the log."""
    with _lock:
        _next_token[0] += 1
        token = _next_token[0]
        _subscribers[token] = (os.path.abspath(path), callback)
    return token


def unsubscribe(token: int) -> None:
    with _lock:
        _subscribers.pop(token, None)


def _notify(path: str, event: Event) -> None:
    with _lock:
        callbacks = [cb for p, cb in _subscribers.values() if p == path]
    for cb in callbacks:
        try:
            cb(event)
        except Exception:  # a subscriber's failure is its own problem, not the emitter's
            pass


# --- the log -----------------------------------------------------------------------------------------


def _row(row: tuple[Any, ...]) -> Event:
    id_, time_ns, type_, action, actor, attributes, scope = row
    attrs = _fastjson.loads(attributes)
    return Event(id_, time_ns, type_, action, actor, attrs if isinstance(attrs, dict) else {}, scope)


class EventLog:
    """The events under `root` (`root/events.db`)."""

    def __init__(self, root: str, *, max_events: int = MAX_EVENTS) -> None:
        self.root = root
        self.path = os.path.abspath(os.path.join(root, DB_NAME))
        self.max_events = max_events
        self._db: _sqlite3.Connection | None = None

    def _conn(self) -> _sqlite3.Connection:
        if self._db is None:
            db = open_db(self.root, self.path, _SCHEMA, SCHEMA_VERSION, what="event log")
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def emit(self, type: str, action: str, actor: str, attributes: Mapping[str, str] | None = None) -> Event:
        """Record an event now and tell this process's subscribers."""
        attrs = {str(k): str(v) for k, v in (attributes or {}).items()}
        now = time.time_ns()
        try:
            cur = self._conn().execute(
                "INSERT INTO events(time_ns, type, action, actor, attributes) VALUES (?,?,?,?,?)",
                (now, type, action, actor, _fastjson.dumps(attrs)),
            )
            event_id = int(cur.lastrowid or 0)
            if event_id % TRIM_EVERY == 0:
                self._conn().execute("DELETE FROM events WHERE id <= ?", (event_id - self.max_events,))
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot record an event in {self.path}: {exc}") from None
        event = Event(event_id, now, type, action, actor, attrs)
        _notify(self.path, event)
        return event

    def read(
        self,
        *,
        after_id: int = 0,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events with id > `after_id` and `since_ns` <= time <= `until_ns`, oldest first."""
        sql = "SELECT id, time_ns, type, action, actor, attributes, scope FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if since_ns is not None:
            sql += " AND time_ns >= ?"
            args.append(since_ns)
        if until_ns is not None:
            sql += " AND time_ns <= ?"
            args.append(until_ns)
        sql += " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        try:
            return [_row(r) for r in self._conn().execute(sql, args)]
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read the event log {self.path}: {exc}") from None

    def last_id(self) -> int:
        try:
            row = self._conn().execute("SELECT max(id) FROM events").fetchone()
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read the event log {self.path}: {exc}") from None
        return int(row[0] or 0)

    def count(self) -> int:
        try:
            return int(self._conn().execute("SELECT count(*) FROM events").fetchone()[0])
        except _sqlite3.Error as exc:
            raise EngineError(f"cannot read the event log {self.path}: {exc}") from None


# --- filters -----------------------------------------------------------------------------------------

FILTER_KEYS = ("config", "container", "daemon", "event", "image", "label", "network", "node", "plugin",
               "scope", "secret", "service", "type", "volume")  # fmt: skip


class EventFilter:
    """Docker's event filters: every key given must match (values of one key are alternatives).

    `type`, `event` (the action; `exec_start: sh` matches `exec_start`), `scope` (local/swarm),
    `label` (`key` or `key=value` among the attributes), and per object type (`image`, `container`,
    `volume`, `network`, `daemon`, …) the actor's ID or its `name` attribute; `image` also matches
    container events of that image (attribute `image`)."""

    def __init__(self, filters: Mapping[str, Iterable[str]] | None = None) -> None:
        self.filters: dict[str, list[str]] = {}
        for key, values in (filters or {}).items():
            if key not in FILTER_KEYS:
                raise InvalidRequest(f"invalid filter {key!r}: use one of {', '.join(FILTER_KEYS)}")
            self.filters[key] = [str(v) for v in values]
        for value in self.filters.get("type", []):
            if value not in TYPES:
                raise InvalidRequest(f"invalid event type {value!r}: use one of {', '.join(TYPES)}")

    def matches(self, event: Event) -> bool:
        for key, values in self.filters.items():
            if not values:
                continue
            if key == "type":
                ok = event.type in values
            elif key == "event":
                action = event.action.split(":", 1)[0]
                ok = event.action in values or action in values
            elif key == "scope":
                ok = event.scope in values
            elif key == "label":
                ok = any(_label_matches(event.attributes, v) for v in values)
            else:
                ok = any(_object_matches(event, key, v) for v in values)
            if not ok:
                return False
        return True


def _label_matches(attributes: Mapping[str, str], spec: str) -> bool:
    key, sep, value = spec.partition("=")
    if key not in attributes:
        return False
    return not sep or attributes[key] == value


def _object_matches(event: Event, kind: str, value: str) -> bool:
    if event.type == kind:
        if event.actor == value or event.attributes.get("name") == value:
            return True
        if kind == "image" and _same_image(event.attributes.get("name", ""), value):
            return True
        # an ID given in short form (docker events -f image=1a2b3c)
        hex_actor = event.actor.partition(":")[2] or event.actor
        return len(value) >= 4 and hex_actor.startswith(value.partition(":")[2] or value)
    if kind == "image" and event.type == "container":
        return _same_image(event.attributes.get("image", ""), value)
    return False


def _same_image(name: str, value: str) -> bool:
    """`busybox` matches `busybox:latest` (Docker's filter takes an untagged name as :latest)."""
    if not name:
        return False
    if name == value:
        return True
    last = value.rsplit("/", 1)[-1]
    return ":" not in last and "@" not in value and name == f"{value}:latest"


def parse_time(text: str, what: str) -> int:
    """A `since`/`until` value as nanoseconds: Unix seconds with an optional fraction
    (`1700000000.5`, what the docker CLI sends) or an RFC 3339 time."""
    t = text.strip()
    sec, dot, frac = t.partition(".")
    if sec.isdigit() and (not dot or frac.isdigit()):
        return int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] if dot else 0)
    from cocon.engine.imageops import parse_created

    if "T" in t:
        seconds = parse_created(t)
        if seconds:
            return seconds * 1_000_000_000
    raise InvalidRequest(
        f"{what}={text!r} is not a time: give Unix seconds (1700000000 or 1700000000.5) or an RFC 3339 "
        "time (2024-01-02T15:04:05Z)"
    )
