"""Docker's default security profile: the seccomp profile, and the masked and read-only paths.

`data/docker-default-seccomp.json` is Docker's default seccomp profile, copied unchanged from the
Moby project (`profiles/seccomp/default.json` in github.com/moby/moby, since moved to
github.com/moby/profiles as `seccomp/default.json`; copied from moby/profiles commit
02e898b137aed1024e232d59bcb05e6179b72177). Copyright The Moby Authors, licensed under the Apache
License, Version 2.0 (https://www.apache.org/licenses/LICENSE-2.0), the license cocon is under too.

The profile is in Docker's format: rules carry `includes`/`excludes` conditions on the container's
capabilities, the architecture and the kernel version, and `archMap` lists sub-architectures.
`docker_default_seccomp` (and `docker_profile_to_oci` for profiles users give in that format) turn
it into an OCI `linux.seccomp` object exactly as moby's `setupSeccomp` does:

- `architectures` is the archMap entry of the target architecture plus its sub-architectures;
- a rule is dropped if `excludes.arches` has the architecture, if any of `excludes.caps` is in the
  capability set, or if the kernel is at least `excludes.minKernel`;
- a rule is kept only if `includes.arches` (when given) has the architecture, every one of
  `includes.caps` is in the set, and the kernel is at least `includes.minKernel`.

Capabilities are compared with the bounding set, as moby does. The kernel version is read with
uname(2) only (kernel.major, as "4.8"); nothing else touches the system. The JSON is read once,
on first use.

`DEFAULT_MASKED_PATHS` and `DEFAULT_READONLY_PATHS` are Docker's (moby `daemon/pkg/oci/defaults.go`);
`default_masked_paths()` adds, like Docker, each CPU's `thermal_throttle` directory that exists.
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING
from cocon.oci.errors import ConfigError
from cocon.oci.jsonobj import DecodeError, decode, json_object
from cocon.oci.runtime_spec import Seccomp, SeccompArg, SeccompSyscall

if TYPE_CHECKING:
    from collections.abc import Iterable

DEFAULT_PROFILE_PATH = os.path.join(os.path.dirname(__file__), "data", "docker-default-seccomp.json")

DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)

DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)


def default_masked_paths(sysfs: str = "/sys") -> list[str]:
    """Docker's masked paths plus /sys/devices/system/cpu/cpuN/thermal_throttle where present."""
    paths = list(DEFAULT_MASKED_PATHS)
    for cpu in _possible_cpus(sysfs):
        path = f"/sys/devices/system/cpu/cpu{cpu}/thermal_throttle"
        if os.path.exists(os.path.join(sysfs, path[len("/sys/") :])):
            paths.append(path)
    return paths


def _possible_cpus(sysfs: str) -> list[int]:
    try:
        with open(os.path.join(sysfs, "devices/system/cpu/possible")) as f:
            text = f.read().strip()
    except OSError:
        return []
    cpus: list[int] = []
    for part in text.split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            cpus.extend(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            return []
    return cpus


# --- Docker's profile format (moby profiles/seccomp/seccomp.go) -------------------------------


@json_object()
class DockerFilter:
    caps: list[str] | None = None
    arches: list[str] | None = None
    min_kernel: str | None = None


@json_object()
class DockerSyscall:
    names: list[str] | None = None
    name: str | None = None  # deprecated single name, still accepted by moby
    action: str
    errno_ret: int | None = None
    args: list[SeccompArg] | None = None
    comment: str | None = None
    includes: DockerFilter | None = None
    excludes: DockerFilter | None = None


@json_object()
class DockerArch:
    architecture: str
    sub_architectures: list[str] | None = None


@json_object()
class DockerProfile:
    default_action: str = ""
    default_errno_ret: int | None = None
    architectures: list[str] | None = None
    arch_map: list[DockerArch] | None = None
    flags: list[str] | None = None
    listener_path: str | None = None
    listener_metadata: str | None = None
    syscalls: list[DockerSyscall] | None = None


_default_profile: DockerProfile | None = None

# libseccomp/moby arch names ("amd64", "arm64", ...) -> OCI architecture. moby nativeToSeccomp.
_NATIVE_TO_SECCOMP = {
    "x86": "SCMP_ARCH_X86",
    "amd64": "SCMP_ARCH_X86_64",
    "x32": "SCMP_ARCH_X32",
    "arm": "SCMP_ARCH_ARM",
    "arm64": "SCMP_ARCH_AARCH64",
    "loong64": "SCMP_ARCH_LOONGARCH64",
    "mips64": "SCMP_ARCH_MIPS64",
    "mips64n32": "SCMP_ARCH_MIPS64N32",
    "mipsel64": "SCMP_ARCH_MIPSEL64",
    "mips3l64n32": "SCMP_ARCH_MIPSEL64N32",
    "mipsle": "SCMP_ARCH_MIPSEL",
    "ppc": "SCMP_ARCH_PPC",
    "ppc64": "SCMP_ARCH_PPC64",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "riscv64": "SCMP_ARCH_RISCV64",
    "s390": "SCMP_ARCH_S390",
    "s390x": "SCMP_ARCH_S390X",
}

# uname -m and Go GOARCH spellings -> the libseccomp name moby matches `arches` against.
_MACHINE_TO_NATIVE = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "i386": "x86",
    "i486": "x86",
    "i586": "x86",
    "i686": "x86",
    "386": "x86",
    "x86": "x86",
    "x32": "x32",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv6l": "arm",
    "armv7l": "arm",
    "armv8l": "arm",
    "arm": "arm",
    "loongarch64": "loong64",
    "loong64": "loong64",
    "mips64": "mips64",
    "mips64n32": "mips64n32",
    "mips64p32": "mips64n32",
    "mips64el": "mipsel64",
    "mips64le": "mipsel64",
    "mipsel64": "mipsel64",
    "mips64p32le": "mips3l64n32",
    "mips3l64n32": "mips3l64n32",
    "mipsel": "mipsle",
    "mipsle": "mipsle",
    "ppc": "ppc",
    "ppc64": "ppc64",
    "ppc64le": "ppc64le",
    "riscv64": "riscv64",
    "s390": "s390",
    "s390x": "s390x",
}


def native_arch(arch: str) -> str:
    """The libseccomp/moby name of an architecture given as `uname -m`, GOARCH or libseccomp name."""
    try:
        return _MACHINE_TO_NATIVE[arch.lower()]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {arch!r}; use a `uname -m` name such as x86_64 or aarch64"
        ) from None


def _leading_digits(text: str) -> str:
    """The decimal digits `text` starts with (as the regular expression `\\d+` matches them)."""
    end = 0
    while end < len(text) and text[end].isdecimal():
        end += 1
    return text[:end]


def _parse_kernel(text: str, what: str) -> tuple[int, int]:
    """`5.10.0-26-amd64` -> (5, 10): the leading `<kernel>.<major>` of a version."""
    kernel = _leading_digits(text)
    major = _leading_digits(text[len(kernel) + 1 :]) if text[len(kernel) : len(kernel) + 1] == "." else ""
    if not kernel or not major:
        raise ConfigError(f'{what}: cannot read a kernel version from {text!r}; expected "<kernel>.<major>"')
    return int(kernel), int(major)


def _default_profile_data() -> DockerProfile:
    global _default_profile
    if _default_profile is None:
        with open(DEFAULT_PROFILE_PATH, "rb") as f:
            _default_profile = parse_docker_profile(f.read(), DEFAULT_PROFILE_PATH)
    return _default_profile


def parse_docker_profile(data: bytes, source: str = "seccomp profile") -> DockerProfile:
    """Decode a seccomp profile in Docker's JSON format (`docker run --security-opt seccomp=FILE`)."""
    try:
        profile: DockerProfile = decode(data, DockerProfile)
    except DecodeError as exc:
        raise ConfigError(f"{source}: invalid seccomp profile: {exc}") from None
    return profile


def _copy_args(args: list[SeccompArg] | None) -> list[SeccompArg] | None:
    if args is None:
        return None
    return [SeccompArg(index=a.index, value=a.value, value_two=a.value_two, op=a.op) for a in args]


def docker_profile_to_oci(
    profile: DockerProfile,
    capabilities: Iterable[str],
    arch: str = "x86_64",
    *,
    kernel_release: str | None = None,
    source: str = "seccomp profile",
) -> Seccomp | None:
    """Turn a Docker-format profile into `linux.seccomp` for a container, as moby's setupSeccomp does.

    `capabilities` is the container's bounding set; `arch` the target architecture (`uname -m`
    name); `kernel_release` defaults to the running kernel's (uname -r). Returns None for a profile
    with neither a default action nor syscalls (moby: seccomp disabled).
    """
    if not profile.default_action and not profile.syscalls:
        return None
    if profile.architectures and profile.arch_map:
        raise ConfigError(
            f"{source}: both 'architectures' and 'archMap' are specified; "
            "use either 'architectures' or 'archMap'"
        )
    caps = set(capabilities)
    native = native_arch(arch)
    release = os.uname().release if kernel_release is None else kernel_release
    kernel: tuple[int, int] | None = None

    def kernel_at_least(min_kernel: str, field: str) -> bool:
        nonlocal kernel
        want = _parse_kernel(min_kernel, f"{source}: {field}")
        if kernel is None:
            kernel = _parse_kernel(release, "kernel release")
        return kernel >= want

    architectures = list(profile.architectures or [])
    seccomp_arch = _NATIVE_TO_SECCOMP.get(native)
    for entry in profile.arch_map or ():
        if entry.architecture == seccomp_arch:
            architectures.append(entry.architecture)
            architectures.extend(entry.sub_architectures or ())
            break

    syscalls: list[SeccompSyscall] = []
    for i, call in enumerate(profile.syscalls or ()):
        field = f"syscalls[{i}]"
        names = call.names
        if call.name:
            if names:
                raise ConfigError(f"{source}: {field}: both 'name' and 'names' are specified; use either")
            names = [call.name]
        ex = call.excludes
        if ex is not None:
            if ex.arches and native in ex.arches:
                continue
            if ex.caps and any(c in caps for c in ex.caps):
                continue
            if ex.min_kernel and kernel_at_least(ex.min_kernel, f"{field}.excludes.minKernel"):
                continue
        inc = call.includes
        if inc is not None:
            if inc.arches and native not in inc.arches:
                continue
            if inc.caps and not all(c in caps for c in inc.caps):
                continue
            if inc.min_kernel and not kernel_at_least(inc.min_kernel, f"{field}.includes.minKernel"):
                continue
        syscalls.append(
            SeccompSyscall(
                names=list(names or []),
                action=call.action,
                errno_ret=call.errno_ret,
                args=_copy_args(call.args),
            )
        )

    return Seccomp(
        default_action=profile.default_action,
        default_errno_ret=profile.default_errno_ret,
        architectures=architectures or None,
        flags=list(profile.flags) if profile.flags else None,
        listener_path=profile.listener_path,
        listener_metadata=profile.listener_metadata,
        syscalls=syscalls or None,
    )


def docker_default_seccomp(
    capabilities: Iterable[str],
    arch: str = "x86_64",
    *,
    kernel_release: str | None = None,
) -> Seccomp:
    """Docker's default seccomp profile as `linux.seccomp`, for a container with these capabilities.

    `capabilities` is the bounding set (e.g. `DOCKER_DEFAULT_CAPABILITIES` plus `--cap-add`s).
    """
    sc = docker_profile_to_oci(
        _default_profile_data(),
        capabilities,
        arch,
        kernel_release=kernel_release,
        source=DEFAULT_PROFILE_PATH,
    )
    if sc is None:  # cannot happen: the default profile has a default action
        raise ConfigError(f"{DEFAULT_PROFILE_PATH}: the default profile is empty; reinstall cocon")
    return sc
