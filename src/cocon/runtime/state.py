"""Container state on disk: `<root>/<id>/state.json`, the exec FIFO, and the status derived from them.

The status follows runc: a container whose init process is gone (or was replaced by another process
with the same pid) is `stopped`; while the exec FIFO exists it is `created`; a frozen cgroup makes it
`paused`; otherwise it is `running`. `creating` is recorded while `create` is still at work.
"""

from __future__ import annotations

import fcntl
import os
import time

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

from cocon import _fastjson as json
from cocon.runtime.errors import ContainerNotFound, RuntimeFailure

STATE_FILE = "state.json"
EXEC_FIFO = "exec.fifo"
CONFIG_COPY = "config.json"
OCI_VERSION = "1.2.0"

_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.+-")


def validate_id(container_id: str) -> None:
    if not (
        0 < len(container_id) <= 128 and container_id[0].isalnum() and _ID_CHARS.issuperset(container_id)
    ):
        raise RuntimeFailure(
            f"invalid container id {container_id!r}: use 1 to 128 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )


class ContainerState:
    """What state.json records. (A plain class: dataclasses cost the hot path an import.)"""

    FIELDS = ("id", "bundle", "rootfs", "status", "pid", "pid_start_time", "created", "owner", "annotations",
              "cgroup", "creator_pid")  # fmt: skip

    def __init__(
        self,
        id: str,
        bundle: str,
        rootfs: str,
        status: str = "creating",
        pid: int = 0,
        pid_start_time: int = 0,  # field 22 of /proc/PID/stat: tells a reused pid apart
        created: str = "",
        owner: str = "",
        annotations: dict[str, str] | None = None,
        cgroup: dict[str, Any] | None = None,
        creator_pid: int = 0,
    ) -> None:
        self.id = id
        self.bundle = bundle
        self.rootfs = rootfs
        self.status = status
        self.pid = pid
        self.pid_start_time = pid_start_time
        self.created = created
        self.owner = owner
        self.annotations = annotations or {}
        self.cgroup = cgroup or {}
        self.creator_pid = creator_pid

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def to_oci(self, status: str) -> dict[str, Any]:
        """The runtime-spec state document (what hooks get on stdin and `state` prints)."""
        doc: dict[str, Any] = {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "status": status,
            "pid": self.pid if status not in ("stopped", "creating") else 0,
            "bundle": self.bundle,
        }
        if self.annotations:
            doc["annotations"] = self.annotations
        return doc

    def to_runc_state(self, status: str) -> dict[str, Any]:
        """`state` output: the OCI document plus the fields runc adds (rootfs, created, owner)."""
        doc = self.to_oci(status)
        doc.update(rootfs=self.rootfs, created=self.created, owner=self.owner)
        return doc


class StateDir:
    """One container's directory under the runtime root."""

    def __init__(self, root: str, container_id: str) -> None:
        self.root = root
        self.id = container_id
        self.path = os.path.join(root, container_id)

    @property
    def fifo(self) -> str:
        return os.path.join(self.path, EXEC_FIFO)

    @property
    def config_copy(self) -> str:
        return os.path.join(self.path, CONFIG_COPY)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def make(self) -> None:
        """Create the directory; the atomic mkdir is what makes ids unique."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.mkdir(self.path, 0o700)

    def lock(self) -> int:
        """Take the container's lock (released when the returned fd is closed or the process ends)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerNotFound(f"container {self.id!r} does not exist") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def save(self, state: ContainerState) -> None:
        tmp = os.path.join(self.path, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(state.to_dict()))
        os.rename(tmp, os.path.join(self.path, STATE_FILE))

    def load(self) -> ContainerState:
        try:
            with open(os.path.join(self.path, STATE_FILE)) as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            raise ContainerNotFound(f"container {self.id!r} does not exist") from None
        except ValueError as exc:
            raise RuntimeFailure(
                f"state of container {self.id!r} is corrupt ({exc}); remove it with `delete --force`"
            ) from None
        return ContainerState(**data)

    def remove(self) -> None:
        for name in os.listdir(self.path) if os.path.isdir(self.path) else ():
            os.unlink(os.path.join(self.path, name))
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass


def process_start_time(pid: int) -> int | None:
    """Start time of a live (non-zombie) process in clock ticks since boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def init_alive(state: ContainerState) -> bool:
    return state.pid > 0 and process_start_time(state.pid) == state.pid_start_time


def current_status(sd: StateDir, state: ContainerState) -> str:
    if state.status == "creating":
        creator = state.creator_pid
        return "creating" if creator and process_start_time(creator) is not None else "stopped"
    if not init_alive(state):
        return "stopped"
    if os.path.exists(sd.fifo):
        return "created"
    if state.cgroup:
        from cocon.runtime.cgroups import cgroup_from_state

        try:
            if cgroup_from_state(state.cgroup).frozen():
                return "paused"
        except OSError:
            pass
    return "running"


def now_rfc3339() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"
