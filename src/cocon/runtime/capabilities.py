"""Linux capabilities of the container process: resolve the spec's names, then apply the five sets.

`resolve` turns `process.capabilities` into capability numbers (validating every name) and `apply`
sets them in the container's init right before execve, in the order runc uses:

1. drop from the bounding set every capability not listed in `bounding` (PR_CAPBSET_DROP);
2. PR_SET_KEEPCAPS 1, switch user (setgroups/setgid/setuid), PR_SET_KEEPCAPS 0, so the permitted
   set survives a switch to a non-root uid;
3. capset(2) (version 3, 64-bit sets) for effective, permitted and inheritable;
4. clear the ambient set and raise each ambient capability.

A name cocon knows but the running kernel does not (a number above /proc/sys/kernel/cap_last_cap)
is dropped silently, as runc does; a name nobody knows is an error naming the spec field.

This module is on the hot path of `create`/`start`: it imports only `cocon._linux` (for ctypes), typing
and the errors module.
"""

from __future__ import annotations

import os

from cocon import _linux as L
from cocon._typing import TYPE_CHECKING, record
from cocon.runtime.errors import CapabilityError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cocon.oci.runtime_spec import Capabilities

# capabilities(7), include/uapi/linux/capability.h
CAPABILITIES: dict[str, int] = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_LINUX_IMMUTABLE": 9,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_BROADCAST": 11,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_IPC_LOCK": 14,
    "CAP_IPC_OWNER": 15,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_PACCT": 20,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_BOOT": 22,
    "CAP_SYS_NICE": 23,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYS_TIME": 25,
    "CAP_SYS_TTY_CONFIG": 26,
    "CAP_MKNOD": 27,
    "CAP_LEASE": 28,
    "CAP_AUDIT_WRITE": 29,
    "CAP_AUDIT_CONTROL": 30,
    "CAP_SETFCAP": 31,
    "CAP_MAC_OVERRIDE": 32,
    "CAP_MAC_ADMIN": 33,
    "CAP_SYSLOG": 34,
    "CAP_WAKE_ALARM": 35,
    "CAP_BLOCK_SUSPEND": 36,
    "CAP_AUDIT_READ": 37,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
    "CAP_CHECKPOINT_RESTORE": 40,
}
CAPABILITY_NAMES: dict[int, str] = {v: k for k, v in CAPABILITIES.items()}

# Docker's default set (moby daemon/pkg/oci/caps/defaults.go), in Docker's order.
DOCKER_DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

SET_NAMES = ("bounding", "effective", "inheritable", "permitted", "ambient")

# prctl(2) options
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_last_cap: int | None = None


def last_cap() -> int:
    """The highest capability number the running kernel knows (/proc/sys/kernel/cap_last_cap)."""
    global _last_cap
    if _last_cap is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
                _last_cap = int(f.read().strip())
        except (OSError, ValueError):
            # Kernels before 3.2 lack the file; CAP_BLOCK_SUSPEND (36) came with 3.5.
            _last_cap = max(CAPABILITIES.values())
    return _last_cap


def mask(caps: Iterable[int]) -> int:
    """The 64-bit mask of capability numbers, as /proc/self/status shows it (CapEff: %016x)."""
    m = 0
    for c in caps:
        m |= 1 << c
    return m


@record(frozen=True)
class ResolvedCaps:
    """Capability numbers per set, ready for `apply`.

    `unchanged` is true when the spec has no `process.capabilities`: like runc, `apply` then only
    switches user and leaves the sets to the kernel's rules for setuid and execve.
    `ignored` lists what was left out and why (kernel too old for a capability, or an ambient
    capability missing from permitted or inheritable, which the kernel refuses to raise), for the
    caller to warn about.
    """

    bounding: frozenset[int] = frozenset()
    effective: frozenset[int] = frozenset()
    inheritable: frozenset[int] = frozenset()
    permitted: frozenset[int] = frozenset()
    ambient: frozenset[int] = frozenset()
    unchanged: bool = False
    ignored: tuple[str, ...] = ()

    def names(self, which: str) -> list[str]:
        """The names in one set (`bounding`, `effective`, ...), in capability-number order."""
        nums: frozenset[int] = getattr(self, which)
        return [CAPABILITY_NAMES[n] for n in sorted(nums)]


def _hint(name: str) -> str:
    upper = name.strip().upper().replace("-", "_")
    candidate = upper if upper.startswith("CAP_") else "CAP_" + upper
    if candidate in CAPABILITIES:
        return f'; did you mean "{candidate}"?'
    if upper in ("ALL", "CAP_ALL"):
        return "; the runtime spec has no ALL: list each capability (the caller expands ALL)"
    return "; use names like CAP_CHOWN from capabilities(7) (CAP_CHOWN … CAP_CHECKPOINT_RESTORE)"


def resolve_names(names: Iterable[str], field: str) -> tuple[frozenset[int], list[str]]:
    """Validate capability names; return the numbers this kernel knows and the names it does not.

    `field` names the spec field in error messages, e.g. `process.capabilities.bounding`.
    """
    top = last_cap()
    out: set[int] = set()
    unknown_to_kernel: list[str] = []
    for i, name in enumerate(names):
        num = CAPABILITIES.get(name)
        if num is None:
            raise CapabilityError(f'{field}[{i}]: unknown capability "{name}"{_hint(name)}')
        if num > top:
            unknown_to_kernel.append(name)
            continue
        out.add(num)
    return frozenset(out), unknown_to_kernel


def resolve(caps: Capabilities | None) -> ResolvedCaps:
    """Validate `process.capabilities` and turn each set into capability numbers.

    A missing set is empty. None (no `capabilities` object at all) gives `unchanged=True`.
    """
    if caps is None:
        return ResolvedCaps(unchanged=True)
    sets: dict[str, frozenset[int]] = {}
    ignored: list[str] = []
    for which in SET_NAMES:
        names: list[str] | None = getattr(caps, which)
        nums, too_new = resolve_names(names or (), f"process.capabilities.{which}")
        sets[which] = nums
        for name in too_new:
            note = f"{name} (not known to kernel {os.uname().release})"
            if note not in ignored:
                ignored.append(note)
    ambient = sets["ambient"] & sets["permitted"] & sets["inheritable"]
    for num in sorted(sets["ambient"] - ambient):
        ignored.append(
            f"ambient {CAPABILITY_NAMES[num]} (an ambient capability must be permitted and inheritable)"
        )
    return ResolvedCaps(
        bounding=sets["bounding"],
        effective=sets["effective"],
        inheritable=sets["inheritable"],
        permitted=sets["permitted"],
        ambient=ambient,
        ignored=tuple(ignored),
    )


class _CapHeader(L.Structure):
    _fields_ = [("version", L.c_uint32), ("pid", L.c_int)]


class _CapData(L.Structure):
    _fields_ = [
        ("effective", L.c_uint32),
        ("permitted", L.c_uint32),
        ("inheritable", L.c_uint32),
    ]


_CapDataPair = _CapData * 2


def capget() -> tuple[int, int, int]:
    """The calling thread's (effective, permitted, inheritable) masks."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    L.syscall(
        L.SYS_capget,
        L.c_void_p(L.addressof(hdr)),
        L.c_void_p(L.addressof(data)),
        what="capget",
    )
    lo, hi = data[0], data[1]
    return (
        int(lo.effective) | int(hi.effective) << 32,
        int(lo.permitted) | int(hi.permitted) << 32,
        int(lo.inheritable) | int(hi.inheritable) << 32,
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """capset(2), version 3: set the calling thread's three masks (64 bits each)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapDataPair()
    for i in (0, 1):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    L.syscall(
        L.SYS_capset,
        L.c_void_p(L.addressof(hdr)),
        L.c_void_p(L.addressof(data)),
        what="capset",
    )


def _names(m: int) -> str:
    return ", ".join(CAPABILITY_NAMES.get(i, str(i)) for i in range(64) if m >> i & 1) or "none"


def drop_bounding(keep: frozenset[int]) -> None:
    """Drop from the bounding set every capability not in `keep` (needs CAP_SETPCAP)."""
    for cap in range(last_cap() + 1):
        if cap in keep:
            continue
        if L.prctl(PR_CAPBSET_READ, cap) != 1:
            continue  # already gone: dropping again would need CAP_SETPCAP for nothing
        try:
            L.prctl(PR_CAPBSET_DROP, cap)
        except OSError as exc:
            raise CapabilityError(
                f"process.capabilities.bounding: cannot drop {CAPABILITY_NAMES.get(cap, cap)} from the "
                f"bounding set: {exc.strerror}; the runtime needs CAP_SETPCAP to do that"
            ) from None


def set_ambient(ambient: frozenset[int]) -> None:
    """Clear the ambient set and raise each capability in `ambient`."""
    try:
        L.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    except OSError as exc:
        if ambient:
            raise CapabilityError(
                f"process.capabilities.ambient: this kernel has no ambient capabilities "
                f"(PR_CAP_AMBIENT: {exc.strerror}); ambient capabilities need Linux 4.3 or later"
            ) from None
        return  # pre-4.3 kernel and nothing to raise
    for cap in sorted(ambient):
        try:
            L.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)
        except OSError as exc:
            raise CapabilityError(
                f"process.capabilities.ambient: cannot raise {CAPABILITY_NAMES[cap]}: {exc.strerror}; "
                "an ambient capability must also be in permitted and inheritable"
            ) from None


def apply(caps: ResolvedCaps, switch_user: Callable[[], None]) -> None:
    """Set the process's capabilities and switch user, right before execve.

    `switch_user` does setgroups/setgid/setuid; it runs with PR_SET_KEEPCAPS so the permitted set
    survives a switch away from uid 0.
    """
    if caps.unchanged:
        switch_user()
        return
    drop_bounding(caps.bounding)
    L.prctl(L.PR_SET_KEEPCAPS, 1)
    try:
        switch_user()
    finally:
        L.prctl(L.PR_SET_KEEPCAPS, 0)
    eff, prm, inh = mask(caps.effective), mask(caps.permitted), mask(caps.inheritable)
    try:
        capset(eff, prm, inh)
    except OSError as exc:
        cur_eff, cur_prm, cur_inh = capget()
        problems = []
        if eff & ~prm:
            problems.append(f"effective has {_names(eff & ~prm)} which permitted lacks")
        if prm & ~cur_prm:
            problems.append(f"permitted asks for {_names(prm & ~cur_prm)} which the runtime does not hold")
        bnd = mask(c for c in range(last_cap() + 1) if L.prctl(PR_CAPBSET_READ, c) == 1)
        if inh & ~(cur_inh | bnd):
            problems.append(f"inheritable asks for {_names(inh & ~(cur_inh | bnd))} outside the bounding set")
        detail = "; ".join(problems) or f"the runtime holds effective {_names(cur_eff)}"
        raise CapabilityError(
            f"process.capabilities: capset failed: {exc.strerror}: {detail}; "
            "list only capabilities that are also in bounding and that this host grants"
        ) from None
    set_ambient(caps.ambient)
