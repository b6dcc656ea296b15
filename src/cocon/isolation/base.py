"""The one interface every isolation level implements: container, microvm and vm drivers.

The engine decides *what* runs (image, root filesystem, mounts, limits, the process); a driver decides
*how*: in namespaces on the host kernel (`container`), in a utility VM (`microvm`), or as a full VM
(`vm`). The engine talks to all of them through `Driver`:

    driver.warm_up()                        # optional: start slow kernel work early (settle() ends it)
    handle = driver.create(config, stdio)   # everything set up, the process not yet running
    driver.start(handle)                    # the process runs
    driver.wait(handle) -> exit code        # 128+N when killed by signal N (in the process that created it)
    driver.signal(id, sig) / driver.state(id) / driver.resize(handle, rows, cols)
    driver.delete(id, force=...)            # nothing of the instance left in the driver

`signal`, `state` and `delete` work by id from any process (a CLI that did not create the instance, a
daemon after a restart); `wait` and `resize` need the handle of the process that created it.

This module imports nothing heavy: `cocon run` loads it on its hot path.
"""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING, record

if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object

# Docker's names for the first two levels, accepted as aliases
ISOLATION_ALIASES = {"process": "container", "hyperv": "microvm", "default": "container"}
ISOLATION_LEVELS = ("container", "microvm", "vm")


class IsolationError(Exception):
    """Base of every error a driver raises. `exit_code` is what `docker run` would exit with:
    127 (command not found), 126 (command cannot be executed), 125 (anything else)."""

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def normalize_isolation(name: str) -> str:
    level = ISOLATION_ALIASES.get(name, name)
    if level not in ISOLATION_LEVELS:
        raise IsolationError(
            f"unknown isolation {name!r}: use container (alias process), microvm (alias hyperv) or vm"
        )
    return level


@record
class Stdio:
    """File descriptors of the caller that become the process's stdin, stdout and stderr (without a
    terminal; with one, the driver hands back a pty master instead)."""

    stdin: int
    stdout: int
    stderr: int


@record
class InstanceConfig:
    """Everything a driver needs to run one instance's process from an image."""

    id: str
    state_dir: (
        str  # a directory the driver may use for this instance (bundle, sockets); the engine removes it
    )
    rootfs: str  # the mounted root filesystem (for VMs later: a block image)
    image_id: str
    image_config: bytes  # the image's config blob (OCI/Docker JSON)
    # docker-run overrides of the image's process, Docker's names: Cmd, Entrypoint ([] clears it),
    # Env (K=V list), WorkingDir, User; a missing key keeps the image's value
    process: dict[str, Any]
    hostname: str
    terminal: bool
    read_only: bool
    mounts: list[
        dict[str, Any]
    ]  # runtime-spec mounts (destination, type, source, options) after the defaults
    cap_add: list[str]
    cap_drop: list[str]
    seccomp: str  # "default", "unconfined" or the path of a Docker-format profile
    memory: int | None  # bytes
    memory_swap: int | None  # bytes of memory + swap, -1 unlimited
    cpus: float | None
    pids_limit: int | None
    network: str  # "none" (own empty network namespace) or "host"
    cgroups_path: str | None
    #: Full VMs only: the machine the engine prepared (disks, boot mode, firmware, size); see
    #: cocon.isolation.vm.MACHINE_KEYS. None for the other levels.
    machine: dict[str, Any] | None = None


@record
class Handle:
    """A created instance, as the process that created it holds it."""

    id: str
    pid: int  # the instance's main process on the host
    pty: int  # the terminal's master side (-1 without a terminal)


class Driver(Protocol):
    """One isolation level. See the module docstring for the life cycle."""

    isolation: str

    def warm_up(self) -> None:
        """Start, in the background, slow set-up the next `create` in this process will need, so that
        it overlaps with the engine's own work (the container driver: the kernel's first cgroup move).
        Optional: `create` works without it. `settle` ends it when no `create` follows."""
        ...

    def settle(self) -> None: ...

    def create(self, config: InstanceConfig, stdio: Stdio) -> Handle: ...

    def start(self, handle: Handle) -> None: ...

    def wait(self, handle: Handle) -> int: ...

    def signal(self, instance_id: str, sig: int) -> None: ...

    def resize(self, handle: Handle, rows: int, cols: int) -> None: ...

    def state(self, instance_id: str) -> str:
        """ "created", "running", "paused", "stopped", or "unknown" when the driver has no such instance."""
        ...

    def delete(self, instance_id: str, *, force: bool = False) -> None: ...
