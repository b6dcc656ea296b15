"""From an image config and what the user asked for to an OCI runtime config, the way Docker does it.

`process_from_image` merges the image's Entrypoint/Cmd/Env/WorkingDir/User with `docker run`'s
overrides; `resolve_user` reads the user and groups from the container's own /etc/passwd and /etc/group
(opened inside the rootfs, never following a symlink out of it); `container_spec` writes the runtime
config with Docker's defaults: its capability set, its seccomp profile, no_new_privs, masked and
read-only paths, a private /dev, and the usual namespaces.

Used by every place that runs an image's process with cocon's runtime: `cocon run` and the RUN steps of
`cocon build`.
"""

from __future__ import annotations

import errno
import os

from cocon import _linux
from cocon._typing import record
from cocon.oci.image_spec import ContainerConfig
from cocon.oci.runtime_spec import (
    CPU,
    OCI_VERSION,
    Capabilities,
    DeviceCgroup,
    Linux,
    Memory,
    Mount,
    Namespace,
    Pids,
    Process,
    Resources,
    Rlimit,
    Root,
    Seccomp,
    Spec,
    User,
)

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD = 100_000  # microseconds, Docker's --cpus period


class SpecError(ValueError):
    """What the user asked for cannot be turned into a container (message says what to change)."""


class _Fields:
    """Equality and repr over `_FIELDS`, for the request classes below (which are plain classes
    rather than dataclasses: `dataclasses` costs `cocon run` more than building the config does)."""

    __slots__ = ()
    _FIELDS: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass without frozen=True

    def __repr__(self) -> str:
        values = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._FIELDS)
        return f"{type(self).__name__}({values})"


class ProcessRequest(_Fields):
    """`docker run`-style overrides of the image's process settings (None: keep the image's)."""

    _FIELDS = ("command", "entrypoint", "env", "workdir", "user")
    __slots__ = ("command", "entrypoint", "env", "user", "workdir")

    def __init__(
        self,
        command: list[str] | None = None,  # CMD… after the image name
        entrypoint: list[str] | None = None,  # --entrypoint ([] clears it)
        env: list[str] | None = None,  # -e/--env-file, K=V
        workdir: str | None = None,  # -w
        user: str | None = None,  # -u
    ) -> None:
        self.command = command
        self.entrypoint = entrypoint
        self.env: list[str] = env if env is not None else []
        self.workdir = workdir
        self.user = user


@record
class ResolvedProcess:
    args: list[str]
    env: list[str]
    cwd: str
    user: str  # as given ("" = root); resolved against the rootfs by resolve_user


def merge_env(base: list[str], overrides: list[str]) -> list[str]:
    """Docker's rule: a later K=V replaces an earlier K, order of first appearance kept."""
    merged: dict[str, str] = {}
    for item in [*base, *overrides]:
        key, sep, value = item.partition("=")
        if not key:
            raise SpecError(f"invalid environment variable {item!r}: use KEY=VALUE")
        merged[key] = f"{key}{sep}{value}" if sep else key
    return list(merged.values())


def process_from_image(image: ContainerConfig | None, req: ProcessRequest) -> ResolvedProcess:
    """The args, env, cwd and user of the container's process: Docker's merge of image and request."""
    image = image or ContainerConfig()
    entrypoint = req.entrypoint if req.entrypoint is not None else (image.entrypoint or [])
    if req.command:
        cmd = req.command
    elif req.entrypoint is not None:
        cmd = []  # --entrypoint clears the image's CMD, as in Docker
    else:
        cmd = image.cmd or []
    args = [*entrypoint, *cmd]
    if not args:
        raise SpecError(
            "no command to run: the image has no CMD or ENTRYPOINT; give a command after the image"
        )
    env = merge_env(image.env or [], req.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    cwd = req.workdir or image.working_dir or "/"
    if not cwd.startswith("/"):
        raise SpecError(f"the working directory {cwd!r} must be an absolute path")
    return ResolvedProcess(
        args=args, env=env, cwd=cwd, user=req.user if req.user is not None else image.user or ""
    )


# --- users -------------------------------------------------------------------------------------------


def _read_in_root(rootfs: str, path: str) -> str | None:
    """A small file of the rootfs, resolved as if rootfs were `/` (symlinks cannot leave it)."""
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _linux.openat2(
            root_fd, path, os.O_RDONLY | os.O_NOFOLLOW, _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS
        )
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise
    finally:
        os.close(root_fd)
    with os.fdopen(fd, "rb") as f:
        return f.read(1 << 20).decode("utf-8", "replace")


def _entries(text: str | None) -> list[list[str]]:
    return [line.split(":") for line in (text or "").splitlines() if line and not line.startswith("#")]


def resolve_user(rootfs: str, user: str) -> tuple[int, int, list[int], str]:
    """Docker's `-u` rules: `name|uid[:group|gid]`, names looked up in the container's /etc/passwd and
    /etc/group. Returns (uid, gid, additional gids, home)."""
    name, _, group = (user or "0").partition(":")
    passwd = _entries(_read_in_root(rootfs, "/etc/passwd"))
    uid: int | None = None
    gid = 0
    home = "/"
    for entry in passwd:
        if len(entry) < 6:
            continue
        if entry[0] == name or (name.isdigit() and entry[2] == name):
            uid, gid, home = int(entry[2]), int(entry[3]), entry[5] or "/"
            break
    if uid is None:
        if not name.isdigit():
            raise SpecError(f"unable to find user {name}: no matching entries in the image's /etc/passwd")
        uid = int(name)
        home = "/root" if uid == 0 else "/"
    groups = _entries(_read_in_root(rootfs, "/etc/group"))
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            match = [g for g in groups if len(g) >= 3 and g[0] == group]
            if not match:
                raise SpecError(
                    f"unable to find group {group}: no matching entries in the image's /etc/group"
                )
            gid = int(match[0][2])
    user_name = next((e[0] for e in passwd if len(e) >= 3 and e[2] == str(uid)), None)
    extra = sorted(
        {
            int(g[2])
            for g in groups
            if len(g) >= 4 and user_name and user_name in g[3].split(",") and g[2].isdigit()
        }
        - {gid}
    )
    if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
        raise SpecError(f"user {user!r}: ids must be below 4294967295")
    return uid, gid, extra, home


# --- the runtime config ----------------------------------------------------------------------------


class ContainerRequest(_Fields):
    """Everything about the container except its process: what `cocon run` flags set."""

    _FIELDS = (
        "hostname", "terminal", "read_only", "mounts", "cap_add", "cap_drop", "seccomp", "memory",
        "memory_swap", "cpus", "pids_limit", "network", "cgroups_path", "rlimits", "sysctl",
    )  # fmt: skip
    __slots__ = _FIELDS

    def __init__(
        self,
        hostname: str = "cocon",
        terminal: bool = False,
        read_only: bool = False,
        mounts: list[Mount] | None = None,  # volumes, binds, tmpfs (after the defaults)
        cap_add: list[str] | None = None,
        cap_drop: list[str] | None = None,
        seccomp: str = "default",  # "default", "unconfined", or a path to a Docker-format profile
        memory: int | None = None,  # bytes
        memory_swap: int | None = None,  # bytes of memory + swap (-1: unlimited)
        cpus: float | None = None,
        pids_limit: int | None = None,
        network: str = "none",  # "none" (own empty netns), "host", or a path to a netns to join
        cgroups_path: str | None = None,
        rlimits: list[Rlimit] | None = None,
        sysctl: dict[str, str] | None = None,
    ) -> None:
        self.hostname = hostname
        self.terminal = terminal
        self.read_only = read_only
        self.mounts: list[Mount] = mounts if mounts is not None else []
        self.cap_add: list[str] = cap_add if cap_add is not None else []
        self.cap_drop: list[str] = cap_drop if cap_drop is not None else []
        self.seccomp = seccomp
        self.memory = memory
        self.memory_swap = memory_swap
        self.cpus = cpus
        self.pids_limit = pids_limit
        self.network = network
        self.cgroups_path = cgroups_path
        self.rlimits = rlimits
        self.sysctl: dict[str, str] = sysctl if sysctl is not None else {}


def _capability_set(cap_add: list[str], cap_drop: list[str]) -> list[str]:
    from cocon.runtime.capabilities import CAPABILITIES, DOCKER_DEFAULT_CAPABILITIES

    def norm(name: str) -> str:
        n = name.upper()
        n = n if n.startswith("CAP_") or n == "ALL" else f"CAP_{n}"
        if n != "ALL" and n not in CAPABILITIES:
            raise SpecError(
                f"unknown capability {name!r}: use a name like NET_ADMIN or CAP_NET_ADMIN, or ALL"
            )
        return n

    add = {norm(c) for c in cap_add}
    drop = {norm(c) for c in cap_drop}
    caps = set(DOCKER_DEFAULT_CAPABILITIES)
    if "ALL" in drop:
        caps = set()
    caps -= drop
    caps |= set(CAPABILITIES) if "ALL" in add else add - {"ALL"}
    return sorted(caps)


def _seccomp(profile: str, caps: list[str]) -> Seccomp | None:
    from cocon.oci.errors import OCIError
    from cocon.oci.seccomp_profiles import docker_default_seccomp, docker_profile_to_oci, parse_docker_profile

    arch = os.uname().machine
    if profile == "unconfined":
        return None
    if profile == "default":
        return docker_default_seccomp(caps, arch)
    try:
        with open(profile, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SpecError(f"--security-opt seccomp={profile}: {exc.strerror}") from None
    try:
        return docker_profile_to_oci(parse_docker_profile(data, profile), caps, arch, source=profile)
    except OCIError as exc:
        raise SpecError(f"--security-opt seccomp={profile}: {exc}") from None


def default_mounts() -> list[Mount]:
    """Docker's: /proc, a tmpfs /dev with pts, shm and mqueue, read-only /sys and cgroups."""
    nosuid_noexec_nodev = ["nosuid", "noexec", "nodev"]
    return [
        Mount(destination="/proc", type="proc", source="proc", options=[*nosuid_noexec_nodev]),
        Mount(destination="/dev", type="tmpfs", source="tmpfs",
              options=["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount(destination="/dev/pts", type="devpts", source="devpts",
              options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
        Mount(destination="/dev/shm", type="tmpfs", source="shm",
              options=[*nosuid_noexec_nodev, "mode=1777", "size=65536k"]),
        Mount(destination="/dev/mqueue", type="mqueue", source="mqueue", options=[*nosuid_noexec_nodev]),
        Mount(destination="/sys", type="sysfs", source="sysfs", options=[*nosuid_noexec_nodev, "ro"]),
        Mount(destination="/sys/fs/cgroup", type="cgroup", source="cgroup",
              options=[*nosuid_noexec_nodev, "relatime", "ro"]),
    ]  # fmt: skip


def container_spec(rootfs: str, proc: ResolvedProcess, req: ContainerRequest) -> Spec:
    """The runtime config for `proc` in `rootfs` (an absolute path, e.g. a mounted overlay snapshot)."""
    from cocon.oci.seccomp_profiles import DEFAULT_MASKED_PATHS, DEFAULT_READONLY_PATHS

    uid, gid, extra_gids, home = resolve_user(rootfs, proc.user)
    env = list(proc.env)
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={home}")
    if not any(e.startswith("HOSTNAME=") for e in env):
        env.insert(1, f"HOSTNAME={req.hostname}")
    if req.terminal and not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    caps = _capability_set(req.cap_add, req.cap_drop)
    namespaces = [Namespace(type=t) for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if req.network == "none":
        namespaces.append(Namespace(type="network"))
    elif req.network != "host":
        namespaces.append(Namespace(type="network", path=req.network))
    resources = Resources(devices=[DeviceCgroup(allow=False, access="rwm")])
    if req.memory is not None:
        swap = req.memory_swap if req.memory_swap is not None else 2 * req.memory  # Docker's default
        resources.memory = Memory(limit=req.memory, swap=swap)
    if req.cpus is not None:
        if req.cpus <= 0:
            raise SpecError(f"--cpus {req.cpus}: give a positive number of CPUs, e.g. 0.5 or 2")
        resources.cpu = CPU(quota=round(req.cpus * CPU_PERIOD), period=CPU_PERIOD)
    if req.pids_limit is not None and req.pids_limit > 0:
        resources.pids = Pids(limit=req.pids_limit)
    return Spec(
        oci_version=OCI_VERSION,
        root=Root(path=rootfs, readonly=req.read_only),
        process=Process(
            terminal=req.terminal,
            user=User(uid=uid, gid=gid, additional_gids=extra_gids or None),
            args=proc.args,
            env=env,
            cwd=proc.cwd,
            capabilities=Capabilities(bounding=caps, effective=caps, permitted=caps),
            rlimits=req.rlimits
            if req.rlimits is not None
            else [Rlimit(type="RLIMIT_NOFILE", soft=1024, hard=1024)],
            no_new_privileges=True,
        ),
        hostname=req.hostname,
        mounts=[*default_mounts(), *req.mounts],
        linux=Linux(
            namespaces=namespaces,
            resources=resources,
            cgroups_path=req.cgroups_path,
            masked_paths=list(DEFAULT_MASKED_PATHS),
            readonly_paths=list(DEFAULT_READONLY_PATHS),
            seccomp=_seccomp(req.seccomp, caps),
            sysctl=req.sysctl or None,
        ),
    )
