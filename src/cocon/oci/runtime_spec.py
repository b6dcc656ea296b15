"""Typed OCI runtime-spec (1.x, Linux) configuration: parsing and validation, no side effects.

`load_config` decodes config.json into these classes (types are checked while decoding, and a type
error names the JSON path of the field), then `validate_config` checks the rules the types cannot
express. JSON names are the camelCase of the attributes; the irregular ones (`containerID`, `hostID`,
`kernelTCP`, …) are given explicitly. The classes are `cocon.oci.jsonobj` objects, not msgspec
Structs, because cocon-runtime decodes a config on every create and must start fast.
"""

from __future__ import annotations

from cocon.oci.errors import ConfigError
from cocon.oci.jsonobj import DecodeError, decode, encode, field, json_object

OCI_VERSION = "1.2.0"


@json_object(omit_defaults=False)
class User:
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] | None = None
    username: str | None = None


@json_object()
class Box:
    height: int = 0
    width: int = 0


@json_object()
class Capabilities:
    bounding: list[str] | None = None
    effective: list[str] | None = None
    inheritable: list[str] | None = None
    permitted: list[str] | None = None
    ambient: list[str] | None = None


@json_object()
class Rlimit:
    type: str
    soft: int
    hard: int


@json_object()
class Process:
    cwd: str  # required by the spec (runc refuses a config without it)
    args: list[str] | None = None
    env: list[str] | None = None
    terminal: bool = False
    console_size: Box | None = None
    user: User = field(default_factory=User)
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] | None = None
    no_new_privileges: bool = False
    apparmor_profile: str | None = None
    oom_score_adj: int | None = None
    selinux_label: str | None = None
    command_line: str | None = None


@json_object()
class Root:
    path: str
    readonly: bool = False


@json_object()
class Mount:
    destination: str
    source: str | None = None
    type: str | None = None
    options: list[str] | None = None
    uid_mappings: list[IDMapping] | None = None
    gid_mappings: list[IDMapping] | None = None


@json_object()
class Hook:
    path: str
    args: list[str] | None = None
    env: list[str] | None = None
    timeout: int | None = None


@json_object()
class Hooks:
    prestart: list[Hook] | None = None
    create_runtime: list[Hook] | None = None
    create_container: list[Hook] | None = None
    start_container: list[Hook] | None = None
    poststart: list[Hook] | None = None
    poststop: list[Hook] | None = None


@json_object()
class IDMapping:
    container_id: int = field(metadata={"json": "containerID"})
    host_id: int = field(metadata={"json": "hostID"})
    size: int


@json_object()
class Namespace:
    type: str
    path: str | None = None


@json_object()
class Device:
    type: str
    path: str
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    uid: int | None = None
    gid: int | None = None


@json_object()
class DeviceCgroup:
    allow: bool
    type: str | None = None
    major: int | None = None
    minor: int | None = None
    access: str | None = None


@json_object()
class Memory:
    limit: int | None = None
    reservation: int | None = None
    swap: int | None = None
    kernel: int | None = None
    kernel_tcp: int | None = field(default=None, metadata={"json": "kernelTCP"})
    swappiness: int | None = None
    disable_oom_killer: bool | None = field(default=None, metadata={"json": "disableOOMKiller"})
    use_hierarchy: bool | None = None
    check_before_update: bool | None = None


@json_object()
class CPU:
    shares: int | None = None
    quota: int | None = None
    burst: int | None = None
    period: int | None = None
    realtime_runtime: int | None = None
    realtime_period: int | None = None
    cpus: str | None = None
    mems: str | None = None
    idle: int | None = None


@json_object()
class Pids:
    limit: int


@json_object()
class WeightDevice:
    major: int
    minor: int
    weight: int | None = None
    leaf_weight: int | None = None


@json_object()
class ThrottleDevice:
    major: int
    minor: int
    rate: int


@json_object()
class BlockIO:
    weight: int | None = None
    leaf_weight: int | None = None
    weight_device: list[WeightDevice] | None = None
    throttle_read_bps_device: list[ThrottleDevice] | None = None
    throttle_write_bps_device: list[ThrottleDevice] | None = None
    throttle_read_iops_device: list[ThrottleDevice] | None = field(
        default=None, metadata={"json": "throttleReadIOPSDevice"}
    )
    throttle_write_iops_device: list[ThrottleDevice] | None = field(
        default=None, metadata={"json": "throttleWriteIOPSDevice"}
    )


@json_object()
class HugepageLimit:
    page_size: str
    limit: int


@json_object()
class Resources:
    devices: list[DeviceCgroup] | None = None
    memory: Memory | None = None
    cpu: CPU | None = None
    pids: Pids | None = None
    block_io: BlockIO | None = field(default=None, metadata={"json": "blockIO"})
    hugepage_limits: list[HugepageLimit] | None = None
    unified: dict[str, str] | None = None


@json_object()
class SeccompArg:
    index: int
    value: int
    op: str
    value_two: int = 0


@json_object()
class SeccompSyscall:
    names: list[str]
    action: str
    errno_ret: int | None = None
    args: list[SeccompArg] | None = None


@json_object()
class Seccomp:
    default_action: str
    default_errno_ret: int | None = None
    architectures: list[str] | None = None
    flags: list[str] | None = None
    listener_path: str | None = None
    listener_metadata: str | None = None
    syscalls: list[SeccompSyscall] | None = None


@json_object()
class TimeOffset:
    secs: int = 0
    nanosecs: int = 0


@json_object()
class Linux:
    namespaces: list[Namespace] | None = None
    uid_mappings: list[IDMapping] | None = None
    gid_mappings: list[IDMapping] | None = None
    time_offsets: dict[str, TimeOffset] | None = None
    devices: list[Device] | None = None
    cgroups_path: str | None = None
    resources: Resources | None = None
    rootfs_propagation: str | None = None
    seccomp: Seccomp | None = None
    sysctl: dict[str, str] | None = None
    masked_paths: list[str] | None = None
    readonly_paths: list[str] | None = None
    mount_label: str | None = None
    personality: dict[str, object] | None = None


@json_object()
class Spec:
    oci_version: str
    root: Root | None = None
    process: Process | None = None
    hostname: str | None = None
    domainname: str | None = None
    mounts: list[Mount] | None = None
    hooks: Hooks | None = None
    annotations: dict[str, str] | None = None
    linux: Linux | None = None


NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
PROPAGATIONS = ("private", "rprivate", "slave", "rslave", "shared", "rshared", "unbindable", "runbindable")
RLIMIT_TYPES = (
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
    "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK",
)  # fmt: skip
DEVICE_TYPES = ("c", "b", "u", "p")
SECCOMP_ACTIONS = (
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
    "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY",
)  # fmt: skip
SECCOMP_OPS = (
    "SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
)  # fmt: skip


def parse_config(data: bytes, source: str = "config.json") -> Spec:
    """Decode and validate a config.json document; raises ConfigError naming the bad field."""
    try:
        spec: Spec = decode(data, Spec)
    except DecodeError as exc:
        problem = str(exc)
        if not problem.startswith("not valid JSON"):
            problem = f"invalid configuration: {problem}"
        raise ConfigError(f"{source}: {problem}") from None
    validate_config(spec, source)
    return spec


def load_config(path: str) -> Spec:
    """Read, decode and validate the config.json at `path`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: a bundle needs a config.json (see `spec`)") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return parse_config(data, path)


def encode_config(spec: Spec) -> bytes:
    """Encode a Spec as indented JSON, as `spec` writes it."""
    return encode(spec, indent=2) + b"\n"


def _fail(source: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: {field}: {problem}")


def validate_config(spec: Spec, source: str = "config.json") -> None:
    """Check the rules of the runtime-spec that the types alone do not express."""
    if not spec.oci_version.startswith("1."):
        raise _fail(source, "ociVersion", f"{spec.oci_version!r} is not a 1.x runtime-spec version")
    if spec.root is None or not spec.root.path:
        raise _fail(source, "root.path", "is required: the directory holding the container's rootfs")
    if spec.process is not None:
        _validate_process(spec.process, source, "process")
    for i, m in enumerate(spec.mounts or ()):
        if not m.destination.startswith("/"):
            raise _fail(source, f"mounts[{i}].destination", f"{m.destination!r} must be an absolute path")
    for kind, hooks in _hook_lists(spec.hooks):
        for i, h in enumerate(hooks):
            if not h.path.startswith("/"):
                raise _fail(source, f"hooks.{kind}[{i}].path", f"{h.path!r} must be an absolute path")
            if h.timeout is not None and h.timeout <= 0:
                raise _fail(source, f"hooks.{kind}[{i}].timeout", "must be a positive number of seconds")
    if spec.linux is not None:
        _validate_linux(spec, spec.linux, source)


def _validate_process(p: Process, source: str, where: str) -> None:
    if not p.args:
        raise _fail(source, f"{where}.args", "must name at least the program to run")
    if not p.cwd.startswith("/"):
        raise _fail(source, f"{where}.cwd", f"{p.cwd!r} must be an absolute path")
    for i, e in enumerate(p.env or ()):
        if "=" not in e:
            raise _fail(source, f"{where}.env[{i}]", f"{e!r} is not of the form KEY=VALUE")
    seen: set[str] = set()
    for i, r in enumerate(p.rlimits or ()):
        if r.type not in RLIMIT_TYPES:
            raise _fail(source, f"{where}.rlimits[{i}].type", f"unknown rlimit {r.type!r}")
        if r.type in seen:
            raise _fail(source, f"{where}.rlimits[{i}].type", f"{r.type} is given twice")
        seen.add(r.type)
        if r.soft > r.hard:
            raise _fail(source, f"{where}.rlimits[{i}]", f"soft limit {r.soft} is above hard limit {r.hard}")
    if p.oom_score_adj is not None and not -1000 <= p.oom_score_adj <= 1000:
        raise _fail(source, f"{where}.oomScoreAdj", "must be between -1000 and 1000")


def validate_process(p: Process, source: str = "process.json") -> None:
    """Validate a process object on its own, as `exec --process` reads it."""
    _validate_process(p, source, "process")


def _hook_lists(hooks: Hooks | None) -> list[tuple[str, list[Hook]]]:
    if hooks is None:
        return []
    return [
        (name, lst)
        for name, lst in (
            ("prestart", hooks.prestart),
            ("createRuntime", hooks.create_runtime),
            ("createContainer", hooks.create_container),
            ("startContainer", hooks.start_container),
            ("poststart", hooks.poststart),
            ("poststop", hooks.poststop),
        )
        if lst
    ]


def _validate_linux(spec: Spec, linux: Linux, source: str) -> None:
    types: set[str] = set()
    for i, ns in enumerate(linux.namespaces or ()):
        if ns.type not in NAMESPACE_TYPES:
            raise _fail(source, f"linux.namespaces[{i}].type", f"unknown namespace {ns.type!r}")
        if ns.type in types:
            raise _fail(source, f"linux.namespaces[{i}].type", f"namespace {ns.type!r} is given twice")
        types.add(ns.type)
        if ns.path is not None and not ns.path.startswith("/"):
            raise _fail(source, f"linux.namespaces[{i}].path", f"{ns.path!r} must be an absolute path")
    if "mount" not in types:
        raise _fail(source, "linux.namespaces", "a mount namespace is required (pivot_root needs one)")
    for name in ("uid_mappings", "gid_mappings"):
        maps: list[IDMapping] = getattr(linux, name) or []
        json_name = "uidMappings" if name == "uid_mappings" else "gidMappings"
        if maps and "user" not in types:
            raise _fail(source, f"linux.{json_name}", "mappings need a user namespace")
        for i, m in enumerate(maps):
            if m.size <= 0 or m.container_id < 0 or m.host_id < 0:
                raise _fail(source, f"linux.{json_name}[{i}]", "ids must be >= 0 and size > 0")
    joins_userns = any(ns.type == "user" and ns.path for ns in linux.namespaces or ())
    if "user" in types and not joins_userns and (not linux.uid_mappings or not linux.gid_mappings):
        raise _fail(source, "linux.uidMappings", "a new user namespace needs uid and gid mappings")
    if linux.time_offsets and "time" not in types:
        raise _fail(source, "linux.timeOffsets", "offsets need a time namespace")
    for clock in linux.time_offsets or {}:
        if clock not in ("monotonic", "boottime"):
            raise _fail(source, f"linux.timeOffsets.{clock}", "only monotonic and boottime can be offset")
    if linux.rootfs_propagation is not None and linux.rootfs_propagation not in PROPAGATIONS:
        raise _fail(
            source, "linux.rootfsPropagation", f"{linux.rootfs_propagation!r} is not one of {PROPAGATIONS}"
        )
    for i, d in enumerate(linux.devices or ()):
        if d.type not in DEVICE_TYPES:
            raise _fail(source, f"linux.devices[{i}].type", f"{d.type!r} is not one of c, b, u, p")
        if not d.path.startswith("/dev/"):
            raise _fail(source, f"linux.devices[{i}].path", f"{d.path!r} must be under /dev")
        if d.type != "p" and (d.major is None or d.minor is None):
            raise _fail(source, f"linux.devices[{i}]", "character and block devices need major and minor")
    res = linux.resources
    if res is not None:
        for i, dc in enumerate(res.devices or ()):
            if dc.type not in (None, "a", "c", "b"):
                raise _fail(source, f"linux.resources.devices[{i}].type", f"{dc.type!r} is not a, c or b")
            if dc.access is not None and (not dc.access or set(dc.access) - set("rwm")):
                raise _fail(source, f"linux.resources.devices[{i}].access", f"{dc.access!r} is not r, w, m")
        if res.pids is not None and res.pids.limit == 0:
            raise _fail(source, "linux.resources.pids.limit", "0 is not a limit; use -1 for unlimited")
        if res.memory is not None:
            mem = res.memory
            if mem.limit is not None and 0 <= mem.limit < 4096 * 64:
                raise _fail(source, "linux.resources.memory.limit", f"{mem.limit} bytes is too small")
            if mem.swap is not None and mem.limit is not None and 0 < mem.swap < mem.limit:
                raise _fail(source, "linux.resources.memory.swap", "memory+swap must be >= memory limit")
        if res.cpu is not None and res.cpu.shares is not None and res.cpu.shares < 2:
            raise _fail(source, "linux.resources.cpu.shares", "must be at least 2")
    if linux.seccomp is not None:
        _validate_seccomp(linux.seccomp, source)
    for key in linux.sysctl or {}:
        _validate_sysctl(key, types, source)


def _validate_seccomp(sc: Seccomp, source: str) -> None:
    if sc.default_action not in SECCOMP_ACTIONS:
        raise _fail(source, "linux.seccomp.defaultAction", f"unknown action {sc.default_action!r}")
    for i, rule in enumerate(sc.syscalls or ()):
        if rule.action not in SECCOMP_ACTIONS:
            raise _fail(source, f"linux.seccomp.syscalls[{i}].action", f"unknown action {rule.action!r}")
        if not rule.names:
            raise _fail(source, f"linux.seccomp.syscalls[{i}].names", "must name at least one syscall")
        for j, arg in enumerate(rule.args or ()):
            if arg.op not in SECCOMP_OPS:
                raise _fail(source, f"linux.seccomp.syscalls[{i}].args[{j}].op", f"unknown op {arg.op!r}")
            if not 0 <= arg.index <= 5:
                raise _fail(source, f"linux.seccomp.syscalls[{i}].args[{j}].index", "must be 0 to 5")


# Sysctls a container may set: those isolated by its own namespaces (as runc allows).
_IPC_SYSCTLS = {
    "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem", "kernel.shmall", "kernel.shmmax",
    "kernel.shmmni", "kernel.shm_rmid_forced",
}  # fmt: skip


def _validate_sysctl(key: str, ns_types: set[str], source: str) -> None:
    field = f"linux.sysctl.{key}"
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        if "ipc" not in ns_types:
            raise _fail(source, field, "needs an ipc namespace")
    elif key.startswith("net."):
        if "network" not in ns_types:
            raise _fail(source, field, "needs a network namespace")
    elif key in ("kernel.hostname", "kernel.domainname"):
        if "uts" not in ns_types:
            raise _fail(source, field, "needs a uts namespace")
    else:
        raise _fail(source, field, "is not namespaced: setting it would change the host")
