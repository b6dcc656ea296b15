"""Seccomp filters from `linux.seccomp`, compiled and loaded with libseccomp's Python bindings.

`compile_filter` follows runc's libcontainer/seccomp (InitSeccomp and matchCall):

- the default action takes `defaultErrnoRet` (ERRNO and TRACE default to EPERM);
  SCMP_ACT_KILL is SCMP_ACT_KILL_THREAD, as in runc;
- `architectures` are added to the filter (the native one is always there); an OCI name the
  installed libseccomp does not know (e.g. LOONGARCH64 on 2.5.x) is skipped: calls from that ABI
  then get the filter's bad-arch action (kill), which is the safe side;
- `flags` map to filter attributes: TSYNC → CTL_TSYNC, LOG → CTL_LOG, SPEC_ALLOW → CTL_SSB;
- a rule whose action equals the default action is skipped (libseccomp refuses it with EACCES);
- a syscall name libseccomp does not know is skipped (an older libseccomp, or a newer profile);
- conditions on distinct arguments go into one rule (all must match); when two conditions name the
  same argument, libseccomp refuses them in one rule, so, like runc, every condition of that rule
  becomes a rule of its own (any one matching triggers the action);
- SCMP_CMP_MASKED_EQ uses `value` as the mask and `valueTwo` as the datum: (arg & value) == valueTwo;
- the no_new_privs attribute is cleared: the runtime sets no_new_privs itself from
  `process.noNewPrivileges`, so loading needs CAP_SYS_ADMIN unless no_new_privs is already set.

SCMP_ACT_NOTIFY is supported: `load` returns the listener fd, and `send_to_listener` hands it to
the agent at `listenerPath` as the runtime spec describes. Not done (unlike runc): runc patches the
generated BPF so that syscalls newer than the profile get ENOSYS instead of the default action.

`import seccomp` (the bindings) happens inside the functions only: this module is imported on the
runtime's hot path.
"""

from __future__ import annotations

import errno
import os

from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import SeccompError

if TYPE_CHECKING:
    from typing import Any

    import seccomp

    from cocon.oci.runtime_spec import Seccomp, SeccompArg

# OCI architecture name -> attribute of seccomp.Arch
ARCHITECTURES: dict[str, str] = {
    "SCMP_ARCH_X86": "X86",
    "SCMP_ARCH_X86_64": "X86_64",
    "SCMP_ARCH_X32": "X32",
    "SCMP_ARCH_ARM": "ARM",
    "SCMP_ARCH_AARCH64": "AARCH64",
    "SCMP_ARCH_MIPS": "MIPS",
    "SCMP_ARCH_MIPS64": "MIPS64",
    "SCMP_ARCH_MIPS64N32": "MIPS64N32",
    "SCMP_ARCH_MIPSEL": "MIPSEL",
    "SCMP_ARCH_MIPSEL64": "MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32": "MIPSEL64N32",
    "SCMP_ARCH_PPC": "PPC",
    "SCMP_ARCH_PPC64": "PPC64",
    "SCMP_ARCH_PPC64LE": "PPC64LE",
    "SCMP_ARCH_S390": "S390",
    "SCMP_ARCH_S390X": "S390X",
    "SCMP_ARCH_PARISC": "PARISC",
    "SCMP_ARCH_PARISC64": "PARISC64",
    "SCMP_ARCH_RISCV64": "RISCV64",
    "SCMP_ARCH_LOONGARCH64": "LOONGARCH64",
    "SCMP_ARCH_M68K": "M68K",
    "SCMP_ARCH_SH": "SH",
    "SCMP_ARCH_SHEB": "SHEB",
}

# OCI flag -> attribute of seccomp.Attr
FLAGS: dict[str, str] = {
    "SECCOMP_FILTER_FLAG_TSYNC": "CTL_TSYNC",
    "SECCOMP_FILTER_FLAG_LOG": "CTL_LOG",
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": "CTL_SSB",
}

# OCI operator -> name of the seccomp module's comparison constant
OPERATORS: dict[str, str] = {
    "SCMP_CMP_NE": "NE",
    "SCMP_CMP_LT": "LT",
    "SCMP_CMP_LE": "LE",
    "SCMP_CMP_EQ": "EQ",
    "SCMP_CMP_GE": "GE",
    "SCMP_CMP_GT": "GT",
    "SCMP_CMP_MASKED_EQ": "MASKED_EQ",
}

ACTIONS = (
    "SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO",
    "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY",
)  # fmt: skip

_NOTIFY_API_LEVEL = 6  # libseccomp >= 2.5.0 on Linux >= 5.7, as runc requires
_MAX_ERRNO = 4095
_MAX_ARG = 2**64 - 1
_SYSCALL_MAX_ARGS = 6
_NR_SCMP_ERROR = -1


def _no_bindings() -> SeccompError:
    return SeccompError(
        "linux.seccomp: cocon needs libseccomp's Python bindings to load seccomp filters; "
        "install them (Debian: apt-get install python3-seccomp) or remove linux.seccomp"
    )


def _lib_errno(exc: Exception) -> int:
    """The errno in the bindings' "Library error (errno = -22)" messages (0 if there is none)."""
    text = str(exc)
    if "errno = " in text:
        try:
            return abs(int(text.rsplit("errno = ", 1)[1].rstrip(")")))
        except ValueError:
            return 0
    return 0


def _why(exc: Exception) -> str:
    err = _lib_errno(exc)
    return f"{os.strerror(err)} ({errno.errorcode.get(err, err)})" if err else str(exc)


def has_notify(sc: Seccomp) -> bool:
    """Whether any rule uses SCMP_ACT_NOTIFY (the filter then yields a listener fd)."""
    return any(rule.action == "SCMP_ACT_NOTIFY" for rule in sc.syscalls or ())


def _action(name: str, errno_ret: int | None, field: str) -> int:
    import seccomp as lib

    if errno_ret is not None and not 0 <= errno_ret <= _MAX_ERRNO:
        raise SeccompError(
            f"{field}: errno {errno_ret} is out of range; use an errno number from 0 to {_MAX_ERRNO} "
            "(e.g. 1 for EPERM, 38 for ENOSYS)"
        )
    if name in ("SCMP_ACT_KILL", "SCMP_ACT_KILL_THREAD"):
        return lib.KILL
    if name == "SCMP_ACT_KILL_PROCESS":
        return lib.KILL_PROCESS
    if name == "SCMP_ACT_TRAP":
        return lib.TRAP
    if name == "SCMP_ACT_ERRNO":
        return lib.ERRNO(errno.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_TRACE":
        return lib.TRACE(errno.EPERM if errno_ret is None else errno_ret)
    if name == "SCMP_ACT_ALLOW":
        return lib.ALLOW
    if name == "SCMP_ACT_LOG":
        return lib.LOG
    if name == "SCMP_ACT_NOTIFY":
        return lib.NOTIFY
    raise SeccompError(f"{field}: unknown action {name!r}; use one of {', '.join(ACTIONS)}")


def _condition(arg: SeccompArg, field: str) -> seccomp.Arg:
    import seccomp as lib

    op = OPERATORS.get(arg.op)
    if op is None:
        raise SeccompError(f"{field}.op: unknown operator {arg.op!r}; use one of {', '.join(OPERATORS)}")
    if not 0 <= arg.index < _SYSCALL_MAX_ARGS:
        raise SeccompError(f"{field}.index: {arg.index} is not a syscall argument; use 0 to 5")
    for what, value in (("value", arg.value), ("valueTwo", arg.value_two)):
        if not 0 <= value <= _MAX_ARG:
            raise SeccompError(
                f"{field}.{what}: {value} does not fit an unsigned 64-bit argument; "
                "write negative numbers in two's complement (e.g. -1 is 18446744073709551615)"
            )
    # MASKED_EQ: datum_a is the mask, datum_b the value: (arg & value) == valueTwo.
    return lib.Arg(arg.index, int(getattr(lib, op)), arg.value, arg.value_two)


def _check_notify(sc: Seccomp, default_action: str) -> None:
    import seccomp as lib

    if default_action == "SCMP_ACT_NOTIFY":
        raise SeccompError(
            "linux.seccomp.defaultAction: SCMP_ACT_NOTIFY cannot be the default action (the runtime "
            "itself could not run its last syscalls); notify only selected syscalls"
        )
    if not has_notify(sc):
        return
    for i, rule in enumerate(sc.syscalls or ()):
        if rule.action == "SCMP_ACT_NOTIFY" and "write" in rule.names:
            raise SeccompError(
                f"linux.seccomp.syscalls[{i}]: SCMP_ACT_NOTIFY cannot be used for write: the runtime "
                "writes to hand the listener fd over; use another action for write"
            )
    if not sc.listener_path:
        raise SeccompError(
            "linux.seccomp.listenerPath: SCMP_ACT_NOTIFY needs listenerPath, the UNIX socket of the "
            "agent that answers notifications; set it, or use another action than SCMP_ACT_NOTIFY"
        )
    api = lib.get_api()
    if api < _NOTIFY_API_LEVEL:
        raise SeccompError(
            f"linux.seccomp: SCMP_ACT_NOTIFY needs libseccomp API level {_NOTIFY_API_LEVEL}, this host "
            f"has {api}; use libseccomp >= 2.5.0 and Linux >= 5.7, or another action"
        )


def _set_attr(filt: seccomp.SyscallFilter, attr: int, value: int, field: str, what: str) -> None:
    try:
        filt.set_attr(attr, value)
    except (RuntimeError, ValueError) as exc:
        raise SeccompError(
            f"{field}: cannot set {what}: {_why(exc)}; this kernel or libseccomp does not support it, "
            "remove it"
        ) from None


def compile_filter(sc: Seccomp) -> seccomp.SyscallFilter:
    """Build (not load) the libseccomp filter for `linux.seccomp`; raises SeccompError naming the field."""
    try:
        import seccomp as lib
    except ImportError:
        raise _no_bindings() from None
    default = _action(sc.default_action, sc.default_errno_ret, "linux.seccomp.defaultAction")
    _check_notify(sc, sc.default_action)
    try:
        filt = lib.SyscallFilter(default)
    except (RuntimeError, ValueError) as exc:
        raise SeccompError(
            f"linux.seccomp.defaultAction: libseccomp refused {sc.default_action}: {exc}"
        ) from None

    for i, name in enumerate(sc.architectures or ()):
        field = f"linux.seccomp.architectures[{i}]"
        attr = ARCHITECTURES.get(name)
        if attr is None:
            raise SeccompError(f"{field}: unknown architecture {name!r}; use names like SCMP_ARCH_X86_64")
        token: int | None = getattr(lib.Arch, attr, None)
        if token is None:
            continue  # valid OCI name, unknown to this libseccomp: its syscalls hit the bad-arch action
        try:
            if not filt.exist_arch(token):
                filt.add_arch(token)
        except (RuntimeError, ValueError) as exc:
            raise SeccompError(f"{field}: libseccomp cannot add {name}: {_why(exc)}") from None

    for i, flag in enumerate(sc.flags or ()):
        field = f"linux.seccomp.flags[{i}]"
        attr_name = FLAGS.get(flag)
        flag_attr: int | None = getattr(lib.Attr, attr_name, None) if attr_name else None
        if flag_attr is None:
            raise SeccompError(
                f"{field}: flag {flag!r} is not supported by cocon with this libseccomp; "
                f"use {', '.join(FLAGS)} or remove it"
            )
        _set_attr(filt, flag_attr, 1, field, flag)

    # Let the runtime, not libseccomp, decide about no_new_privs (process.noNewPrivileges).
    _set_attr(filt, lib.Attr.CTL_NNP, 0, "linux.seccomp", "the no_new_privs attribute")
    raw_rc: int | None = getattr(lib.Attr, "API_SYSRAWRC", None)
    if raw_rc is not None:
        # Report the kernel's errno (e.g. EACCES) rather than libseccomp's catch-all ECANCELED.
        try:
            filt.set_attr(raw_rc, 1)
        except (RuntimeError, ValueError):
            pass
    syscalls = sc.syscalls or []
    optimize: int | None = getattr(lib.Attr, "CTL_OPTIMIZE", None)
    if len(syscalls) > 32 and optimize is not None:
        # Binary tree of syscalls for long profiles, as runc does (libseccomp <= 2.5.4 misbehaves
        # with it on empty filters, hence the threshold).
        try:
            filt.set_attr(optimize, 2)
        except (RuntimeError, ValueError):
            pass

    for i, rule in enumerate(syscalls):
        field = f"linux.seccomp.syscalls[{i}]"
        action = _action(rule.action, rule.errno_ret, f"{field}.action")
        args = rule.args or []
        conditions = [_condition(a, f"{field}.args[{j}]") for j, a in enumerate(args)]
        if action == default:
            continue  # redundant, and libseccomp refuses it
        indexes = [a.index for a in args]
        split = len(set(indexes)) != len(indexes)
        for k, name in enumerate(rule.names):
            if not name:
                raise SeccompError(f"{field}.names[{k}]: an empty string is not a syscall name")
            if lib.resolve_syscall(lib.Arch.NATIVE, name) == _NR_SCMP_ERROR:
                continue  # unknown to this libseccomp: skipped, as runc does
            try:
                if split:
                    for cond in conditions:
                        filt.add_rule(action, name, cond)
                else:
                    filt.add_rule(action, name, *conditions)
            except (RuntimeError, ValueError, OverflowError) as exc:
                raise SeccompError(
                    f"{field}: libseccomp refused the rule for {name} ({rule.action}): {_why(exc)}"
                ) from None
    return filt


def load(sc: Seccomp) -> int | None:
    """Compile `linux.seccomp` and load it into the calling process (and, with TSYNC, its threads).

    Returns the notify listener fd when a SCMP_ACT_NOTIFY rule is in the filter, else None; the
    caller sends that fd to `listenerPath` (see `send_to_listener`) and closes it.
    Needs CAP_SYS_ADMIN, or no_new_privs set before the call.
    """
    filt = compile_filter(sc)
    try:
        filt.load()
    except (RuntimeError, ValueError) as exc:
        err = _lib_errno(exc)
        if err == errno.EACCES:
            raise SeccompError(
                "linux.seccomp: the kernel refused the filter (EACCES): loading it needs CAP_SYS_ADMIN "
                "or no_new_privs; load it before dropping capabilities, or set process.noNewPrivileges"
            ) from None
        if err == errno.EINVAL and sc.flags:
            raise SeccompError(
                f"linux.seccomp: the kernel refused the filter (EINVAL); it may not support "
                f"flags {sc.flags}: remove them"
            ) from None
        raise SeccompError(f"linux.seccomp: loading the filter failed: {_why(exc)}") from None
    if not has_notify(sc):
        return None
    try:
        return filt.get_notify_fd()
    except (RuntimeError, ValueError):
        return None  # every notified syscall was unknown to libseccomp: no listener


def send_to_listener(
    listener_path: str,
    fd: int,
    *,
    pid: int,
    state: dict[str, Any],
    metadata: str | None = None,
    oci_version: str = "1.2.0",
) -> None:
    """Send the notify fd to the seccomp agent at `listenerPath`, as the runtime spec says.

    Writes one ContainerProcessState JSON document ({ociVersion, fds: ["seccompFd"], pid, metadata,
    state}) on a connection to the UNIX socket, with the fd attached (SCM_RIGHTS).
    """
    import json
    import socket

    doc: dict[str, Any] = {"ociVersion": oci_version, "fds": ["seccompFd"], "pid": pid, "state": state}
    if metadata:
        doc["metadata"] = metadata
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(listener_path)
            socket.send_fds(sock, [json.dumps(doc).encode()], [fd])
    except OSError as exc:
        raise SeccompError(
            f"linux.seccomp.listenerPath: cannot send the notify fd to {listener_path}: {exc.strerror}; "
            "is the seccomp agent listening there?"
        ) from None
