"""Docker's default seccomp profile → OCI conversion, and compiling (not loading) seccomp filters."""

from __future__ import annotations

import json
import tempfile
from typing import Any

import pytest

from cocon.oci import seccomp_profiles as sp
from cocon.oci.errors import ConfigError
from cocon.oci.runtime_spec import Seccomp, SeccompArg, SeccompSyscall
from cocon.runtime import seccomp as rsc
from cocon.runtime.capabilities import CAPABILITIES, DOCKER_DEFAULT_CAPABILITIES
from cocon.runtime.errors import SeccompError

DOCKER = DOCKER_DEFAULT_CAPABILITIES
NEW_KERNEL = "6.1.0-18-amd64"


def rules_for(sc: Seccomp, name: str) -> list[SeccompSyscall]:
    return [r for r in sc.syscalls or () if name in r.names]


def unconditionally_allowed(sc: Seccomp, name: str) -> bool:
    return any(r.action == "SCMP_ACT_ALLOW" and not r.args for r in rules_for(sc, name))


def mentioned(sc: Seccomp, name: str) -> bool:
    return bool(rules_for(sc, name))


# --- the data file ------------------------------------------------------------------------------


def test_data_file_is_dockers_profile() -> None:
    with open(sp.DEFAULT_PROFILE_PATH, "rb") as f:
        doc = json.load(f)
    assert doc["defaultAction"] == "SCMP_ACT_ERRNO"
    assert doc["defaultErrnoRet"] == 1
    assert doc["archMap"][0] == {
        "architecture": "SCMP_ARCH_X86_64",
        "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    }
    first = doc["syscalls"][0]
    assert first["action"] == "SCMP_ACT_ALLOW" and "read" in first["names"] and "mount" not in first["names"]
    assert len(first["names"]) == len(set(first["names"])) > 300


def test_profile_is_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    sp.docker_default_seccomp(DOCKER)
    loaded = sp._default_profile
    assert loaded is not None
    sp.docker_default_seccomp(DOCKER)
    assert sp._default_profile is loaded


# --- docker_default_seccomp ---------------------------------------------------------------------


def test_defaults_with_docker_caps() -> None:
    sc = sp.docker_default_seccomp(DOCKER, kernel_release=NEW_KERNEL)
    assert sc.default_action == "SCMP_ACT_ERRNO"
    assert sc.default_errno_ret == 1
    assert sc.architectures == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for name in ("mount", "umount2", "unshare", "setns", "keyctl", "add_key", "bpf", "reboot", "kexec_load"):
        assert not any(r.action == "SCMP_ACT_ALLOW" for r in rules_for(sc, name)), name
    for name in ("read", "write", "openat", "execve", "exit_group", "chown", "mknod", "arch_prctl"):
        assert unconditionally_allowed(sc, name), name
    assert unconditionally_allowed(sc, "chroot")  # CAP_SYS_CHROOT is a Docker default


def test_clone_is_allowed_only_without_namespace_flags() -> None:
    sc = sp.docker_default_seccomp(DOCKER, kernel_release=NEW_KERNEL)
    clone = rules_for(sc, "clone")
    assert len(clone) == 1
    assert clone[0].action == "SCMP_ACT_ALLOW"
    assert clone[0].args == [SeccompArg(index=0, value=0x7E020000, op="SCMP_CMP_MASKED_EQ", value_two=0)]
    clone3 = rules_for(sc, "clone3")
    assert len(clone3) == 1
    assert (clone3[0].action, clone3[0].errno_ret) == (
        "SCMP_ACT_ERRNO",
        38,
    )  # ENOSYS: glibc falls back to clone


def test_socket_and_personality_conditions() -> None:
    sc = sp.docker_default_seccomp(DOCKER, kernel_release=NEW_KERNEL)
    socket_rules = rules_for(sc, "socket")
    assert all(r.action == "SCMP_ACT_ALLOW" and r.args and len(r.args) == 1 for r in socket_rules)
    allowed_values = {(r.args[0].op, r.args[0].value) for r in socket_rules if r.args}
    assert ("SCMP_CMP_LT", 12) in allowed_values  # AF_UNIX … AF_NETBEUI
    assert ("SCMP_CMP_EQ", 10) not in allowed_values  # covered by the range
    assert ("SCMP_CMP_EQ", 38) not in allowed_values  # AF_ALG is blocked
    assert ("SCMP_CMP_EQ", 40) not in allowed_values  # AF_VSOCK is blocked
    personas = {r.args[0].value for r in rules_for(sc, "personality") if r.args}
    assert personas == {0, 8, 0x20000, 0x20008, 0xFFFFFFFF}


def test_ptrace_needs_kernel_4_8() -> None:
    new = sp.docker_default_seccomp(DOCKER, kernel_release="4.8.0")
    old = sp.docker_default_seccomp(DOCKER, kernel_release="4.4.0-210-generic")
    assert unconditionally_allowed(new, "ptrace")
    assert unconditionally_allowed(new, "process_vm_readv")
    assert not mentioned(old, "ptrace")
    assert unconditionally_allowed(sp.docker_default_seccomp(DOCKER, kernel_release="5.10"), "ptrace")
    # with CAP_SYS_PTRACE it is allowed on any kernel
    traced = sp.docker_default_seccomp([*DOCKER, "CAP_SYS_PTRACE"], kernel_release="4.4.0")
    assert unconditionally_allowed(traced, "ptrace")
    assert unconditionally_allowed(traced, "kcmp")


def test_running_kernel_is_used_by_default() -> None:
    assert unconditionally_allowed(sp.docker_default_seccomp(DOCKER), "ptrace")  # every CI kernel is >= 4.8


def test_sys_admin_allows_mount_and_namespaces() -> None:
    sc = sp.docker_default_seccomp([*DOCKER, "CAP_SYS_ADMIN"], kernel_release=NEW_KERNEL)
    for name in ("mount", "umount2", "unshare", "setns", "clone", "clone3", "bpf", "fsopen", "sethostname"):
        assert unconditionally_allowed(sc, name), name
    assert not any(r.args for r in rules_for(sc, "clone"))  # the masked clone rule is excluded
    assert not any(r.action == "SCMP_ACT_ERRNO" for r in rules_for(sc, "clone3"))
    assert not any(r.action == "SCMP_ACT_ALLOW" for r in rules_for(sc, "keyctl"))  # no cap enables keyctl


def test_other_capabilities_enable_their_syscalls() -> None:
    base = sp.docker_default_seccomp(DOCKER, kernel_release=NEW_KERNEL)
    for cap, name in (
        ("CAP_SYS_BOOT", "reboot"),
        ("CAP_SYS_MODULE", "init_module"),
        ("CAP_SYS_TIME", "settimeofday"),
        ("CAP_SYSLOG", "syslog"),
        ("CAP_BPF", "bpf"),
        ("CAP_PERFMON", "perf_event_open"),
        ("CAP_DAC_READ_SEARCH", "open_by_handle_at"),
        ("CAP_SYS_NICE", "mbind"),
    ):
        assert not unconditionally_allowed(base, name), name
        sc = sp.docker_default_seccomp([*DOCKER, cap], kernel_release=NEW_KERNEL)
        assert unconditionally_allowed(sc, name), name


def test_chroot_needs_sys_chroot() -> None:
    sc = sp.docker_default_seccomp([c for c in DOCKER if c != "CAP_SYS_CHROOT"], kernel_release=NEW_KERNEL)
    assert not mentioned(sc, "chroot")


def test_other_architectures() -> None:
    arm = sp.docker_default_seccomp(DOCKER, "aarch64", kernel_release=NEW_KERNEL)
    assert arm.architectures == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert not mentioned(arm, "arch_prctl")
    assert unconditionally_allowed(arm, "cacheflush")
    s390 = sp.docker_default_seccomp(DOCKER, "s390x", kernel_release=NEW_KERNEL)
    clone = rules_for(s390, "clone")
    assert len(clone) == 1 and clone[0].args and clone[0].args[0].index == 1
    ppc = sp.docker_default_seccomp(DOCKER, "ppc64le", kernel_release=NEW_KERNEL)
    assert ppc.architectures is None  # moby's archMap has no ppc64le entry
    assert unconditionally_allowed(ppc, "swapcontext")
    assert (
        sp.docker_default_seccomp(DOCKER, "amd64").architectures
        == sp.docker_default_seccomp(DOCKER).architectures
    )


def test_unknown_architecture() -> None:
    with pytest.raises(ConfigError, match="unknown architecture 'vax'"):
        sp.docker_default_seccomp(DOCKER, "vax")


def test_results_are_independent_copies() -> None:
    a = sp.docker_default_seccomp(DOCKER, kernel_release=NEW_KERNEL)
    assert a.syscalls is not None
    for r in a.syscalls:
        r.names.append("mount")
        for arg in r.args or ():
            arg.value = 0
    b = sp.docker_default_seccomp(DOCKER, kernel_release=NEW_KERNEL)
    assert not mentioned(b, "mount")
    assert rules_for(b, "clone")[0].args == [
        SeccompArg(index=0, value=0x7E020000, op="SCMP_CMP_MASKED_EQ", value_two=0)
    ]


# --- Docker-format profiles in general ----------------------------------------------------------


def convert(doc: dict[str, Any], caps: list[str] | None = None, kernel: str = NEW_KERNEL) -> Seccomp | None:
    profile = sp.parse_docker_profile(json.dumps(doc).encode())
    return sp.docker_profile_to_oci(profile, caps or [], "x86_64", kernel_release=kernel)


def test_empty_profile_disables_seccomp() -> None:
    assert convert({}) is None


def test_profile_conditions() -> None:
    doc = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"name": "mkdir", "action": "SCMP_ACT_ERRNO"},
            {"names": ["a"], "action": "SCMP_ACT_LOG", "excludes": {"minKernel": "5.0"}},
            {"names": ["b"], "action": "SCMP_ACT_LOG", "excludes": {"minKernel": "7.0"}},
            {"names": ["c"], "action": "SCMP_ACT_LOG", "includes": {"caps": ["CAP_A", "CAP_B"]}},
            {"names": ["d"], "action": "SCMP_ACT_LOG", "excludes": {"caps": ["CAP_X", "CAP_B"]}},
            {"names": ["e"], "action": "SCMP_ACT_LOG", "includes": {"arches": ["arm64"]}},
            {"names": ["f"], "action": "SCMP_ACT_LOG", "excludes": {"arches": ["amd64"]}},
        ],
    }
    sc = convert(doc, ["CAP_A"], kernel="6.1.0")
    assert sc is not None
    assert sc.architectures == ["SCMP_ARCH_X86_64"]
    assert [r.names for r in sc.syscalls or ()] == [["mkdir"], ["b"], ["d"]]
    sc = convert(doc, ["CAP_A", "CAP_B"], kernel="4.19.0")
    assert sc is not None
    assert [r.names for r in sc.syscalls or ()] == [["mkdir"], ["a"], ["b"], ["c"]]


def test_profile_errors() -> None:
    with pytest.raises(ConfigError, match="both 'architectures' and 'archMap'"):
        convert(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": None}],
            }
        )
    with pytest.raises(ConfigError, match="both 'name' and 'names'"):
        convert(
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "a", "names": ["b"], "action": "X"}]}
        )
    with pytest.raises(ConfigError, match="minKernel"):
        convert(
            {
                "defaultAction": "X",
                "syscalls": [{"names": ["a"], "action": "X", "includes": {"minKernel": "x"}}],
            }
        )
    with pytest.raises(ConfigError, match="not valid JSON"):
        sp.parse_docker_profile(b"{")
    with pytest.raises(ConfigError, match="invalid seccomp profile"):
        sp.parse_docker_profile(b'{"syscalls": [{"names": ["a"]}]}')


# --- masked and read-only paths -----------------------------------------------------------------


def test_masked_and_readonly_paths() -> None:
    assert set(sp.DEFAULT_MASKED_PATHS) == {
        "/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
        "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug",
        "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
    }  # fmt: skip
    assert sp.DEFAULT_READONLY_PATHS == (
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    )


def test_default_masked_paths_adds_thermal_throttle() -> None:
    import os

    with tempfile.TemporaryDirectory() as sysfs:
        cpu = os.path.join(sysfs, "devices/system/cpu")
        os.makedirs(os.path.join(cpu, "cpu0/thermal_throttle"))
        os.makedirs(os.path.join(cpu, "cpu2/thermal_throttle"))
        os.makedirs(os.path.join(cpu, "cpu1"))
        with open(os.path.join(cpu, "possible"), "w") as f:
            f.write("0-2\n")
        paths = sp.default_masked_paths(sysfs)
    assert paths[: len(sp.DEFAULT_MASKED_PATHS)] == list(sp.DEFAULT_MASKED_PATHS)
    assert paths[len(sp.DEFAULT_MASKED_PATHS) :] == [
        "/sys/devices/system/cpu/cpu0/thermal_throttle",
        "/sys/devices/system/cpu/cpu2/thermal_throttle",
    ]
    assert sp.default_masked_paths("/nonexistent") == list(sp.DEFAULT_MASKED_PATHS)


# --- compiling filters (cocon.runtime.seccomp) --------------------------------------------------


def _pfc(sc: Seccomp) -> str:
    filt = rsc.compile_filter(sc)
    with tempfile.TemporaryFile("w+") as f:
        filt.export_pfc(f)
        f.seek(0)
        return f.read()


def test_compile_docker_default() -> None:
    rsc.compile_filter(sp.docker_default_seccomp(DOCKER))
    rsc.compile_filter(sp.docker_default_seccomp(list(CAPABILITIES)))  # every conditional rule at once
    rsc.compile_filter(sp.docker_default_seccomp(DOCKER, "aarch64"))


def test_compile_all_actions_and_operators() -> None:
    actions = ["SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP",
               "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_LOG"]  # fmt: skip
    ops = ["SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT",
           "SCMP_CMP_MASKED_EQ"]  # fmt: skip
    names = ["mkdir", "rmdir", "chdir", "getppid", "sync", "uname", "kill"]
    sc = Seccomp(
        default_action="SCMP_ACT_ALLOW",
        architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_LOONGARCH64"],
        flags=["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        syscalls=[
            SeccompSyscall(names=[n], action=a, errno_ret=5, args=[SeccompArg(index=1, value=3, op=o)])
            for n, a, o in zip(names, actions, ops, strict=True)
        ],
    )
    text = _pfc(sc)
    assert "ERRNO(5)" in text
    assert "TRACE(5)" in text
    assert "KILL_PROCESS" in text


def test_masked_eq_uses_value_as_mask() -> None:
    sc = Seccomp(
        default_action="SCMP_ACT_ALLOW",
        syscalls=[
            SeccompSyscall(
                names=["openat"],
                action="SCMP_ACT_ERRNO",
                args=[SeccompArg(index=2, value=0o100, value_two=0o100, op="SCMP_CMP_MASKED_EQ")],
            )
        ],
    )
    rsc.compile_filter(sc)


def test_same_argument_twice_is_split_into_rules() -> None:
    both = [SeccompArg(index=0, value=2, op="SCMP_CMP_EQ"), SeccompArg(index=0, value=10, op="SCMP_CMP_EQ")]
    sc = Seccomp(
        default_action="SCMP_ACT_ALLOW",
        syscalls=[SeccompSyscall(names=["socket"], action="SCMP_ACT_ERRNO", args=both)],
    )
    text = _pfc(sc)
    # two separate tests on arg 0, each leading to the action
    assert text.count("ERRNO(1)") >= 2


def test_unknown_syscall_and_default_action_rules_are_skipped() -> None:
    sc = Seccomp(
        default_action="SCMP_ACT_ERRNO",
        default_errno_ret=1,
        syscalls=[
            SeccompSyscall(names=["no_such_syscall", "read"], action="SCMP_ACT_ALLOW"),
            SeccompSyscall(names=["mkdir"], action="SCMP_ACT_ERRNO"),  # == default: skipped
            SeccompSyscall(names=["rmdir"], action="SCMP_ACT_ERRNO", errno_ret=1),  # == default too
            SeccompSyscall(names=["chdir"], action="SCMP_ACT_ERRNO", errno_ret=2),  # differs: kept
        ],
    )
    text = _pfc(sc)
    assert "ERRNO(2)" in text


@pytest.mark.parametrize(
    ("sc", "message"),
    [
        (Seccomp(default_action="SCMP_ACT_NOPE"), "linux.seccomp.defaultAction: unknown action"),
        (Seccomp(default_action="SCMP_ACT_ERRNO", default_errno_ret=70000), "defaultAction: errno 70000"),
        (Seccomp(default_action="SCMP_ACT_NOTIFY"), "cannot be the default action"),
        (
            Seccomp(default_action="SCMP_ACT_ALLOW", architectures=["SCMP_ARCH_VAX"]),
            r"linux.seccomp.architectures\[0\]: unknown architecture",
        ),
        (
            Seccomp(default_action="SCMP_ACT_ALLOW", flags=["SECCOMP_FILTER_FLAG_NOPE"]),
            r"linux.seccomp.flags\[0\]: flag 'SECCOMP_FILTER_FLAG_NOPE' is not supported",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW",
                syscalls=[SeccompSyscall(names=["mkdir"], action="SCMP_ACT_BOGUS")],
            ),
            r"linux.seccomp.syscalls\[0\].action: unknown action",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW",
                syscalls=[
                    SeccompSyscall(names=["a"], action="SCMP_ACT_LOG"),
                    SeccompSyscall(
                        names=["mkdir"],
                        action="SCMP_ACT_ERRNO",
                        args=[SeccompArg(index=0, value=1, op="SCMP_CMP_XX")],
                    ),
                ],
            ),
            r"linux.seccomp.syscalls\[1\].args\[0\].op: unknown operator",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW",
                syscalls=[
                    SeccompSyscall(
                        names=["mkdir"],
                        action="SCMP_ACT_ERRNO",
                        args=[SeccompArg(index=6, value=1, op="SCMP_CMP_EQ")],
                    ),
                ],
            ),
            r"args\[0\].index: 6 is not a syscall argument",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW",
                syscalls=[
                    SeccompSyscall(
                        names=["mkdir"],
                        action="SCMP_ACT_ERRNO",
                        args=[SeccompArg(index=0, value=-1, op="SCMP_CMP_EQ")],
                    ),
                ],
            ),
            r"args\[0\].value: -1 does not fit",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW",
                syscalls=[SeccompSyscall(names=["mkdir"], action="SCMP_ACT_NOTIFY")],
            ),
            "SCMP_ACT_NOTIFY needs listenerPath",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW",
                listener_path="/run/agent.sock",
                syscalls=[SeccompSyscall(names=["read", "write"], action="SCMP_ACT_NOTIFY")],
            ),
            "cannot be used for write",
        ),
        (
            Seccomp(
                default_action="SCMP_ACT_ALLOW", syscalls=[SeccompSyscall(names=[""], action="SCMP_ACT_LOG")]
            ),
            r"syscalls\[0\].names\[0\]: an empty string",
        ),
    ],
)
def test_compile_errors_name_the_field(sc: Seccomp, message: str) -> None:
    with pytest.raises(SeccompError, match=message):
        rsc.compile_filter(sc)


def test_notify_compiles_with_listener_path() -> None:
    sc = Seccomp(
        default_action="SCMP_ACT_ALLOW",
        listener_path="/run/agent.sock",
        syscalls=[SeccompSyscall(names=["mkdir"], action="SCMP_ACT_NOTIFY")],
    )
    assert rsc.has_notify(sc)
    rsc.compile_filter(sc)


def test_runtime_module_does_not_import_the_bindings() -> None:
    import subprocess
    import sys

    code = "import sys, cocon.runtime.seccomp; print('seccomp' in sys.modules, 'msgspec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize(
    "text, version",
    [("5.10.0-26-amd64", (5, 10)), ("6.1", (6, 1)), ("4.19.0+", (4, 19)), ("10.0rc1", (10, 0))],
)
def test_kernel_versions(text: str, version: tuple[int, int]) -> None:
    from cocon.oci.seccomp_profiles import _parse_kernel

    assert _parse_kernel(text, "release") == version


@pytest.mark.parametrize("text", ["", "6", "6.", ".1", "x.y", "v5.10"])
def test_kernel_versions_refused(text: str) -> None:
    from cocon.oci.seccomp_profiles import _parse_kernel

    with pytest.raises(ConfigError, match="cannot read a kernel version"):
        _parse_kernel(text, "release")
