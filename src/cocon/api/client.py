"""The interface between the `cocon` command and the engine: every operation the CLI can ask for.

Each method is one request of the Docker Engine API (or a cocon route beside them) with plain data in
and out: dicts shaped like that API's JSON (a container create body, `/images/json` entries, image
inspect ≈ `/images/{id}/json`, volume objects …). Today `cocon.api.local.LocalClient` answers them by
calling the engine in the same process; the node daemon will answer the same requests over HTTP, and
an HTTP client will implement this class. Only the transport changes: the CLI stays as it is.

Errors are `APIError`: the HTTP status the request fails with (400 bad request, 404 not found, 409
conflict, 500 other) and a message that says what to do. `exit_code` is set when the error decides
what `cocon run` exits with (126/127 when the command cannot be run).

Streams: `container_start` returns an `Attachment`. With `direct` the container's process already
writes to (and, with stdin, reads from) the caller's own stdin/stdout/stderr (the in-process engine
hands them over, nothing to copy); otherwise `fd` is one bidirectional byte stream to relay (a pty's
master side here; a hijacked HTTP connection later) and `resize` reaches the container's terminal.

Files (`image_import`, `image_save`, `image_load`, `image_build`'s context) are paths on the client's
machine: an HTTP client streams them.

This module imports nothing at run time: `cocon run` loads it on its hot path.
"""

from __future__ import annotations

from cocon._typing import TYPE_CHECKING, record

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any

    Progress = Callable[[str, int, int], None]  # (what, done, total); total 0 = not known


class APIError(Exception):
    """A request failed. `status`: the HTTP status; `exit_code`: set when `cocon run` must exit
    with it (126, 127)."""

    def __init__(self, message: str, status: int = 500, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.exit_code = exit_code


@record
class Attachment:
    """How the caller's stdio reaches a started container (see the module docstring)."""

    direct: bool
    fd: int  # -1 when direct
    multiplexed: bool = False  # Docker's framed stdout/stderr (no TTY) rather than raw bytes
    is_socket: bool = False  # a connection (half-closed when our input ends) rather than a pty
    initial: bytes = b""  # output that arrived with the connection's headers, to write first


class Client:
    """The operations; LocalClient and (later) an HTTP client implement them."""

    # --- containers --------------------------------------------------------------------------------
    def container_create(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """`POST /containers/create?name=`: `config` is Docker's create body (Image, Cmd, Entrypoint,
        Env, WorkingDir, User, Hostname, Tty, OpenStdin, Labels, HostConfig{AutoRemove, Binds, Tmpfs,
        ReadonlyRootfs, Memory, MemorySwap, NanoCpus, PidsLimit, CapAdd, CapDrop, SecurityOpt,
        NetworkMode, Isolation}). Returns {"Id", "Warnings"}."""
        raise NotImplementedError

    def container_start(self, container: str, *, stdin: bool = False) -> Attachment:
        """`POST /containers/{id}/attach` + `/start`: with `stdin` the caller's input goes to the
        process (else it reads /dev/null)."""
        raise NotImplementedError

    def container_wait(self, container: str) -> dict[str, Any]:
        """`POST /containers/{id}/wait`: {"StatusCode": int, "Error": None}."""
        raise NotImplementedError

    def container_kill(self, container: str, signal: int) -> None:
        """`POST /containers/{id}/kill?signal=`."""
        raise NotImplementedError

    def container_resize(self, container: str, height: int, width: int) -> None:
        """`POST /containers/{id}/resize?h=&w=`."""
        raise NotImplementedError

    def container_remove(self, container: str, *, force: bool = False, volumes: bool = False) -> str:
        """`DELETE /containers/{id}?force=&v=`; returns the id removed."""
        raise NotImplementedError

    def container_list(self, *, all: bool = False) -> list[dict[str, Any]]:
        """`GET /containers/json?all=`."""
        raise NotImplementedError

    def container_inspect(self, container: str) -> dict[str, Any]:
        """`GET /containers/{id}/json`."""
        raise NotImplementedError

    # --- detached containers and their life cycle (docs/lifecycle.md) -------------------------------
    def container_run_detached(self, config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """`cocon run -d`: create + start under a supervisor that outlives the caller. {"Id", "Warnings"}."""
        raise NotImplementedError

    def container_start_detached(self, container: str) -> None:
        """`POST /containers/{id}/start` without attaching: the output goes to the container's log."""
        raise NotImplementedError

    def container_stop(self, container: str, *, timeout: int | None = None) -> None:
        """`POST /containers/{id}/stop?t=`: the stop signal, SIGKILL after `timeout` seconds."""
        raise NotImplementedError

    def container_restart(self, container: str, *, timeout: int | None = None) -> None:
        """`POST /containers/{id}/restart?t=`."""
        raise NotImplementedError

    def container_wait_until(self, container: str, condition: str = "not-running") -> dict[str, Any]:
        """`POST /containers/{id}/wait?condition=not-running|next-exit|removed`: {"StatusCode", "Error"}."""
        raise NotImplementedError

    def container_logs(
        self,
        container: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        since: str | None = None,
        until: str | None = None,
        tail: int | None = None,
        timestamps: bool = False,
        follow: bool = False,
    ) -> Iterator[tuple[str, bytes]]:
        """`GET /containers/{id}/logs`: ("stdout"|"stderr", line) pairs, oldest first; with
        `timestamps` each line starts with its RFC 3339 time and a space."""
        raise NotImplementedError

    def container_exec(
        self,
        container: str,
        cmd: Sequence[str],
        *,
        tty: bool = False,
        stdin: bool = False,
        user: str | None = None,
        workdir: str | None = None,
        env: Sequence[str] = (),
    ) -> int:
        """`POST /containers/{id}/exec` + `/exec/{id}/start`: run `cmd` in the running container on the
        caller's stdio (its terminal with `tty`); returns its exit code."""
        raise NotImplementedError

    def container_attach(
        self, container: str, *, stdin: bool = True, detach_keys: bytes | None = None
    ) -> int:
        """`POST /containers/{id}/attach`: the caller's stdio joined to the running container's until
        it exits (its exit code) or the caller detaches (Ctrl-P Ctrl-Q with a terminal, or
        `detach_keys`: -1)."""
        raise NotImplementedError

    def container_start_attach(self, container: str, *, stdin: bool = False) -> int:
        """`start -a`: attach (before the process runs, so that no output is missed), start, relay until
        it exits; its exit code (-1 when the caller detached)."""
        raise NotImplementedError

    def container_pause(self, container: str) -> None:
        """`POST /containers/{id}/pause`."""
        raise NotImplementedError

    def container_unpause(self, container: str) -> None:
        """`POST /containers/{id}/unpause`."""
        raise NotImplementedError

    def container_rename(self, container: str, name: str) -> None:
        """`POST /containers/{id}/rename?name=`."""
        raise NotImplementedError

    def container_top(self, container: str, ps_args: str | None = None) -> dict[str, Any]:
        """`GET /containers/{id}/top?ps_args=`: {"Titles": [...], "Processes": [[...], ...]}."""
        raise NotImplementedError

    def container_stats(self, container: str) -> dict[str, Any]:
        """`GET /containers/{id}/stats?stream=false`: Docker's stats document (cpu, memory, pids,
        blkio, networks) read from the container's cgroup and network namespace."""
        raise NotImplementedError

    def container_copy_from(self, container: str, path: str, dest: str) -> None:
        """`GET /containers/{id}/archive?path=`: copy `path` of the container to `dest` on this machine
        (Docker's `cp` rules)."""
        raise NotImplementedError

    def container_copy_to(self, container: str, source: str, path: str) -> None:
        """`PUT /containers/{id}/archive?path=`: copy `source` on this machine into the container."""
        raise NotImplementedError

    def container_port(self, container: str) -> dict[str, Any]:
        """Published ports, Docker's `NetworkSettings.Ports` ({"80/tcp": [{"HostIp", "HostPort"}]})."""
        raise NotImplementedError

    # --- images ------------------------------------------------------------------------------------
    def image_list(self, *, all: bool = False, dangling: bool | None = None) -> list[dict[str, Any]]:
        """`GET /images/json`."""
        raise NotImplementedError

    def image_inspect(self, image: str) -> dict[str, Any]:
        """`GET /images/{name}/json`."""
        raise NotImplementedError

    def image_history(self, image: str) -> list[dict[str, Any]]:
        """`GET /images/{name}/history`, newest step first."""
        raise NotImplementedError

    def image_tag(self, source: str, target: str) -> None:
        """`POST /images/{name}/tag?repo=&tag=`."""
        raise NotImplementedError

    def image_remove(self, image: str, *, force: bool = False, noprune: bool = False) -> list[dict[str, str]]:
        """`DELETE /images/{name}?force=&noprune=`: [{"Untagged": …}, {"Deleted": …}]."""
        raise NotImplementedError

    def image_prune(self, *, all: bool = False) -> dict[str, Any]:
        """`POST /images/prune`: {"ImagesDeleted": [{"Deleted": id}] | None, "SpaceReclaimed": bytes}."""
        raise NotImplementedError

    def image_import(
        self,
        source: str,
        name: str | None = None,
        *,
        changes: Sequence[str] = (),
        message: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """`POST /images/create?fromSrc=-`: a root filesystem tar (or directory) as an image."""
        raise NotImplementedError

    def image_save(
        self,
        images: Sequence[str],
        dest: str,
        *,
        format: str = "oci-archive",
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """`GET /images/get`: write images to `dest` (oci-archive, oci-dir or docker-archive)."""
        raise NotImplementedError

    def image_load(self, source: str, *, progress: Progress | None = None) -> list[dict[str, Any]]:
        """`POST /images/load`: [{"Id", "RepoTags"}] of the images loaded."""
        raise NotImplementedError

    def image_bootstrap(
        self,
        what: str,
        *,
        mirror: str | None = None,
        tarball: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """cocon's own: make a base image (busybox, debian[:SUITE]) on this machine; `tarball`: the
        packages from `debootstrap --make-tarball` instead of a mirror (offline)."""
        raise NotImplementedError

    def image_build(
        self,
        context: str,
        *,
        tags: Sequence[str] = (),
        dockerfile: str | None = None,
        build_args: dict[str, str] | None = None,
        target: str | None = None,
        no_cache: bool = False,
        output: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """`POST /build`: build `context` (a directory); `output` receives the build's log lines."""
        raise NotImplementedError

    # --- volumes -----------------------------------------------------------------------------------
    def volume_create(
        self,
        name: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        driver_opts: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """`POST /volumes/create` (`driver_opts`: {"type": "disk", "size": "10G"} for a disk volume)."""
        raise NotImplementedError

    def volume_list(self) -> dict[str, Any]:
        """`GET /volumes`: {"Volumes": [...], "Warnings": []}."""
        raise NotImplementedError

    def volume_inspect(self, name: str) -> dict[str, Any]:
        """`GET /volumes/{name}`."""
        raise NotImplementedError

    def volume_remove(self, name: str, *, force: bool = False) -> None:
        """`DELETE /volumes/{name}?force=`."""
        raise NotImplementedError

    def volume_prune(self, *, all: bool = False) -> dict[str, Any]:
        """`POST /volumes/prune`: {"VolumesDeleted": [...] | None, "SpaceReclaimed": bytes}."""
        raise NotImplementedError

    # --- networks ----------------------------------------------------------------------------------
    def network_create(self, config: dict[str, Any]) -> dict[str, Any]:
        """`POST /networks/create`: Docker's body (Name, Internal, EnableIPv6, Labels, Options,
        IPAM{Config: [{Subnet, Gateway, IPRange}]}); {"Id", "Warning"}."""
        raise NotImplementedError

    def network_list(self) -> list[dict[str, Any]]:
        """`GET /networks`."""
        raise NotImplementedError

    def network_inspect(self, name: str) -> dict[str, Any]:
        """`GET /networks/{id}`: with IPAM.Config and the containers' addresses."""
        raise NotImplementedError

    def network_remove(self, name: str) -> None:
        """`DELETE /networks/{id}` (409/403 while containers use it)."""
        raise NotImplementedError

    def network_connect(
        self, name: str, container: str, *, aliases: Sequence[str] = (), ip: str | None = None,
        ip6: str | None = None,
    ) -> None:  # fmt: skip
        """`POST /networks/{id}/connect`: a running container at once, else at its next start."""
        raise NotImplementedError

    def network_disconnect(self, name: str, container: str, *, force: bool = False) -> None:
        """`POST /networks/{id}/disconnect`."""
        raise NotImplementedError

    def network_policy_list(self, name: str) -> list[dict[str, Any]]:
        """`GET /cocon/v1/networks/{id}/policy`: the allow rules into a network."""
        raise NotImplementedError

    def network_policy_add(
        self, name: str, source: str, ports: str = "", description: str = ""
    ) -> dict[str, Any]:
        """`POST /cocon/v1/networks/{id}/policy` {From, Ports, Description}: the new rule."""
        raise NotImplementedError

    def network_policy_remove(self, name: str, rule: str) -> dict[str, Any]:
        """`DELETE /cocon/v1/networks/{id}/policy/{rule}`: the rule removed."""
        raise NotImplementedError

    def vm_create(self, spec: dict[str, Any]) -> dict[str, Any]:
        """`POST /cocon/v1/vms` (cocon.engine.vms.FIELDS): {"Id", "Warnings"}."""
        raise NotImplementedError

    def vm_list(self, *, all: bool = True) -> list[dict[str, Any]]:
        """`GET /cocon/v1/vms`: the VMs with their machine and addresses."""
        raise NotImplementedError

    def vm_remove(self, name: str, *, force: bool = False, delete_disk: bool = False) -> None:
        """`DELETE /cocon/v1/vms/{id}`: remove a VM (`delete_disk`: and the disk file it was made with)."""
        raise NotImplementedError

    def vm_disk_attach(self, name: str, volume: str) -> dict[str, Any]:
        """`POST /cocon/v1/vms/{id}/disks` {Volume}: hot-plugged when running."""
        raise NotImplementedError

    def vm_disk_detach(self, name: str, volume: str) -> None:
        """`DELETE /cocon/v1/vms/{id}/disks/{volume}`."""
        raise NotImplementedError

    def vm_migrate(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """`POST /cocon/v1/vms/{id}/migrate` {To, Token, SharedStorage, DowntimeLimitMs}."""
        raise NotImplementedError

    def vm_snapshots(self, name: str) -> list[dict[str, Any]]:
        """`GET /cocon/v1/vms/{id}/snapshots`."""
        raise NotImplementedError

    def vm_snapshot_create(self, name: str, snapshot: str, *, memory: bool = False) -> dict[str, Any]:
        """`POST /cocon/v1/vms/{id}/snapshots` {Name, Memory}."""
        raise NotImplementedError

    def vm_snapshot_restore(self, name: str, snapshot: str) -> dict[str, Any]:
        """`POST /cocon/v1/vms/{id}/snapshots/{name}/restore`."""
        raise NotImplementedError

    def vm_snapshot_remove(self, name: str, snapshot: str) -> None:
        """`DELETE /cocon/v1/vms/{id}/snapshots/{name}`."""
        raise NotImplementedError

    # --- system ------------------------------------------------------------------------------------
    def system_reset(self) -> dict[str, Any]:
        """`POST /cocon/v1/system/reset`: remove every container, network, volume and image;
        {"ContainersDeleted", "NetworksDeleted", "VolumesDeleted", "ImagesDeleted"}."""
        raise NotImplementedError

    def system_assets(self) -> dict[str, Any]:
        """`GET /cocon/v1/system/assets`: the microVM guest assets (State ready|missing|corrupt|unknown,
        Message, Digest, KernelRelease, Kernel/Initrd/Utility {Path, Size}, Packages, Directory,
        Accelerator {Accel kvm|tcg, Reason, Probed}); builds nothing."""
        raise NotImplementedError

    def system_assets_build(
        self, *, rebuild: bool = False, progress: Progress | None = None
    ) -> dict[str, Any]:
        """`POST /cocon/v1/system/assets?rebuild=`: build the guest assets (when missing, stale or
        corrupt; always with `rebuild`), `progress(stage, done, total)` over cocon.vmm.assets.STAGES;
        the status afterwards (as `system_assets`)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """`GET /info`: Docker's info document, with cocon's own fields under "Cocon" (isolation
        levels, the microVM accelerator and guest kernel under "MicroVM")."""
        raise NotImplementedError

    # --- events ------------------------------------------------------------------------------------
    def events(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        filters: dict[str, list[str]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """`GET /events?since=&until=&filters=`: the history since `since` (Unix seconds with an optional
        fraction, or RFC 3339), then events as they happen until `until` passes (without it: until
        the caller stops iterating). Each item is one message of Docker's stream (Type, Action,
        Actor{ID, Attributes}, scope, time, timeNano). `filters`: Docker's (type, event, container,
        image, volume, network, label, scope, daemon); an unknown key is an APIError 400."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (nothing to do for a client without any)."""
