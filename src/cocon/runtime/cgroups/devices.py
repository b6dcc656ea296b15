"""OCI device rules (`linux.resources.devices`) for both cgroup versions; pure logic, no syscalls.

The OCI list is ordered and the last rule that matches a device decides. Two translations:

* cgroup v1 (`devices.allow` / `devices.deny`): the list is run through an emulator of the kernel's
  device cgroup (as runc does) to get the final state, a default (allow or deny) plus exceptions; the
  driver then writes "a" to reset to that default and writes the exceptions. Like the kernel (and
  runc), the emulator cannot punch a hole into a wildcard exception (allow `c *:* rwm`, then deny
  `c 1:5 rwm`): that is a CgroupError on v1.
* cgroup v2: an eBPF program of type BPF_PROG_TYPE_CGROUP_DEVICE (`device_filter`). The rules are
  emitted in reverse order, so the first block that matches at run time is the last rule of the list;
  with no match the access is denied. Evaluation is per access bit: a deny rule refuses the access if
  it covers any still-undecided requested bit; an allow rule decides the bits it covers and accepts
  once every requested bit is decided. So `[allow c 1:3 rwm, deny c 1:3 w]` allows reading /dev/null
  and refuses writing it, and holes in wildcards work.
"""

from __future__ import annotations

import struct

from cocon._typing import TYPE_CHECKING, record
from cocon.runtime.errors import CgroupError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cocon.oci.runtime_spec import DeviceCgroup

FIELD = "linux.resources.devices"
ACCESS_ALL = "rwm"


@record(frozen=True)
class DeviceRule:
    """One normalized rule: type "a", "c" or "b"; None major/minor is the wildcard."""

    allow: bool
    type: str = "a"
    major: int | None = None
    minor: int | None = None
    access: str = ACCESS_ALL

    def v1_entry(self) -> str:
        """The line written to devices.allow / devices.deny."""
        if self.type == "a":
            return "a"
        major = "*" if self.major is None else str(self.major)
        minor = "*" if self.minor is None else str(self.minor)
        return f"{self.type} {major}:{minor} {self.access}"

    @property
    def matches_all(self) -> bool:
        return self.type == "a" and self.major is None and self.minor is None and self.access == ACCESS_ALL


def _norm_access(access: str | None, field: str) -> str:
    if access is None or access == "":
        return ACCESS_ALL
    bad = set(access) - set(ACCESS_ALL)
    if bad:
        raise CgroupError(f"{field}.access: {access!r} has {''.join(sorted(bad))!r}; use only r, w and m")
    return "".join(c for c in ACCESS_ALL if c in access)


def normalize_rules(rules: Sequence[DeviceCgroup]) -> list[DeviceRule]:
    """OCI rules to DeviceRule; a missing type is "a", a missing or negative number is the wildcard."""
    out = []
    for i, r in enumerate(rules):
        field = f"{FIELD}[{i}]"
        dtype = r.type or "a"
        if dtype not in ("a", "c", "b"):
            raise CgroupError(f"{field}.type: {dtype!r} is not a, c or b")
        major = r.major if r.major is not None and r.major >= 0 else None
        minor = r.minor if r.minor is not None and r.minor >= 0 else None
        for name, num in (("major", major), ("minor", minor)):
            if num is not None and num > 0x7FFFFFFF:
                raise CgroupError(f"{field}.{name}: {num} is out of range")
        out.append(DeviceRule(r.allow, dtype, major, minor, _norm_access(r.access, field)))
    return out


# --- cgroup v1: emulate the kernel's exception list -----------------------------------------------------


@record
class V1DeviceState:
    """The final state of a v1 device cgroup: default behaviour plus exceptions (in insertion order)."""

    default_allow: bool
    exceptions: dict[tuple[str, int | None, int | None], str]

    def writes(self) -> list[tuple[str, str]]:
        """(file, value) writes that produce this state from any state, when the cgroup has no children."""
        if self.default_allow:
            ops = [("devices.allow", "a")]
            ops += [("devices.deny", DeviceRule(False, *k, v).v1_entry()) for k, v in self.exceptions.items()]
        else:
            ops = [("devices.deny", "a")]
            ops += [("devices.allow", DeviceRule(True, *k, v).v1_entry()) for k, v in self.exceptions.items()]
        return ops


def emulate_v1(rules: Sequence[DeviceRule]) -> V1DeviceState:
    """Apply `rules` in order to a default-deny device cgroup, as the kernel would; see the module doc."""
    state = V1DeviceState(default_allow=False, exceptions={})
    for i, rule in enumerate(rules):
        if rule.type == "a":
            # The kernel ignores numbers and access for "a": it resets the cgroup.
            state = V1DeviceState(default_allow=rule.allow, exceptions={})
            continue
        key = (rule.type, rule.major, rule.minor)
        if rule.allow == state.default_allow:
            _remove_exception(state, key, rule.access, i)
        else:
            old = state.exceptions.get(key, "")
            state.exceptions[key] = "".join(c for c in ACCESS_ALL if c in old or c in rule.access)
    return state


def _remove_exception(
    state: V1DeviceState, key: tuple[str, int | None, int | None], access: str, index: int
) -> None:
    dtype, major, minor = key
    partials: list[tuple[str, int | None, int | None]] = [(dtype, None, minor), (dtype, major, None)]
    partials.append((dtype, None, None))
    for partial in partials:
        if partial == key:
            continue
        wild_access = state.exceptions.get(partial, "")
        if set(wild_access) & set(access):
            wild = DeviceRule(True, partial[0], partial[1], partial[2], wild_access).v1_entry()
            raise CgroupError(
                f"{FIELD}[{index}]: cgroup v1 cannot take back {access!r} for one device out of the earlier "
                f"wildcard rule {wild!r}; list the devices individually instead of the wildcard"
            )
    held = state.exceptions.get(key)
    if held is None:
        return
    rest = "".join(c for c in held if c not in access)
    if rest:
        state.exceptions[key] = rest
    else:
        del state.exceptions[key]


# --- cgroup v2: the eBPF device filter ------------------------------------------------------------------

# struct bpf_cgroup_dev_ctx { __u32 access_type; __u32 major; __u32 minor; }
# access_type = (access << 16) | type
BPF_DEVCG_ACC_MKNOD = 1
BPF_DEVCG_ACC_READ = 2
BPF_DEVCG_ACC_WRITE = 4
BPF_DEVCG_DEV_BLOCK = 1
BPF_DEVCG_DEV_CHAR = 2

# Opcodes (linux/bpf.h, linux/bpf_common.h).
LDX_MEM_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W
ALU32_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
ALU32_RSH_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K
ALU32_MOV_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K
ALU32_MOV_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X
JMP_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JMP_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K
JMP_EXIT = 0x95  # BPF_JMP | BPF_EXIT

R0, R1, R2, R3, R4, R5 = range(6)


@record(frozen=True)
class Insn:
    """One eBPF instruction; `off` of a jump is relative to the next instruction."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)


def _access_bits(access: str) -> int:
    bits = 0
    if "r" in access:
        bits |= BPF_DEVCG_ACC_READ
    if "w" in access:
        bits |= BPF_DEVCG_ACC_WRITE
    if "m" in access:
        bits |= BPF_DEVCG_ACC_MKNOD
    return bits


ALL_BITS = BPF_DEVCG_ACC_READ | BPF_DEVCG_ACC_WRITE | BPF_DEVCG_ACC_MKNOD
_NEXT = -1  # placeholder offset: "jump to the next block", fixed up per block


def _block(rule: DeviceRule) -> list[Insn]:
    """Instructions for one rule; jumps to the next block carry the offset _NEXT until fixed up."""
    insns: list[Insn] = []
    if rule.type != "a":
        dev_type = BPF_DEVCG_DEV_CHAR if rule.type == "c" else BPF_DEVCG_DEV_BLOCK
        insns.append(Insn(JMP_JNE_K, R2, off=_NEXT, imm=dev_type))
    if rule.major is not None:
        insns.append(Insn(JMP_JNE_K, R4, off=_NEXT, imm=rule.major))
    if rule.minor is not None:
        insns.append(Insn(JMP_JNE_K, R5, off=_NEXT, imm=rule.minor))
    bits = _access_bits(rule.access)
    if rule.allow:
        if bits != ALL_BITS:
            # pending &= ~bits; if pending: next rule decides the rest
            insns.append(Insn(ALU32_AND_K, R3, imm=ALL_BITS & ~bits))
            insns.append(Insn(JMP_JNE_K, R3, off=_NEXT, imm=0))
        insns += [Insn(ALU32_MOV_K, R0, imm=1), Insn(JMP_EXIT)]
    else:
        if bits != ALL_BITS:
            # if (pending & bits) == 0: this rule says nothing about the pending bits
            insns.append(Insn(ALU32_MOV_X, R1, R3))
            insns.append(Insn(ALU32_AND_K, R1, imm=bits))
            insns.append(Insn(JMP_JEQ_K, R1, off=_NEXT, imm=0))
        insns += [Insn(ALU32_MOV_K, R0, imm=0), Insn(JMP_EXIT)]
    # Fix up the jumps: the next block starts right after this one.
    return [
        Insn(i.code, i.dst, i.src, len(insns) - n - 1, i.imm) if i.off == _NEXT and i.code != JMP_EXIT else i
        for n, i in enumerate(insns)
    ]


def device_filter(rules: Sequence[DeviceRule]) -> list[Insn]:
    """Assemble the BPF_PROG_TYPE_CGROUP_DEVICE program for the ordered `rules` (see module doc).

    Registers: R2 = device type, R3 = requested access bits not yet allowed, R4 = major, R5 = minor.
    """
    prog = [
        Insn(LDX_MEM_W, R2, R1, 0),  # R2 = ctx->access_type
        Insn(ALU32_AND_K, R2, imm=0xFFFF),  # R2 &= 0xffff (type)
        Insn(LDX_MEM_W, R3, R1, 0),  # R3 = ctx->access_type
        Insn(ALU32_RSH_K, R3, imm=16),  # R3 >>= 16 (access)
        Insn(LDX_MEM_W, R4, R1, 4),  # R4 = ctx->major
        Insn(LDX_MEM_W, R5, R1, 8),  # R5 = ctx->minor
    ]
    complete = False
    for rule in reversed(rules):
        prog += _block(rule)
        if rule.matches_all:
            # Every request stops here: earlier rules can never be reached.
            complete = True
            break
    if not complete:
        prog += [Insn(ALU32_MOV_K, R0, imm=0), Insn(JMP_EXIT)]  # default: deny
    return prog


def encode_program(insns: Sequence[Insn]) -> bytes:
    return b"".join(i.encode() for i in insns)
