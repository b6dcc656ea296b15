"""Device rules: v1 emulation and the v2 eBPF device filter (assembled, then run in a tiny interpreter)."""

from __future__ import annotations

import struct

import pytest

from cocon.oci.runtime_spec import DeviceCgroup
from cocon.runtime.cgroups.devices import (
    ALU32_AND_K,
    ALU32_MOV_K,
    ALU32_MOV_X,
    ALU32_RSH_K,
    JMP_EXIT,
    JMP_JEQ_K,
    JMP_JNE_K,
    LDX_MEM_W,
    DeviceRule,
    Insn,
    device_filter,
    emulate_v1,
    encode_program,
    normalize_rules,
)
from cocon.runtime.errors import CgroupError

DC = DeviceCgroup
DENY_ALL = DC(allow=False, access="rwm")
NULL = DC(allow=True, type="c", major=1, minor=3, access="rwm")
ZERO = DC(allow=True, type="c", major=1, minor=5, access="rwm")

ACC = {"m": 1, "r": 2, "w": 4}
TYPES = {"b": 1, "c": 2}


def run_filter(insns: list[Insn], dev_type: str, major: int, minor: int, access: str) -> int:
    """Interpret the subset of eBPF the device filter uses, on a bpf_cgroup_dev_ctx."""
    bits = sum(ACC[c] for c in access)
    ctx = struct.pack("<III", (bits << 16) | TYPES[dev_type], major, minor)
    regs = [0] * 11
    pc = 0
    steps = 0
    m32 = 0xFFFFFFFF
    while True:
        steps += 1
        assert steps < 10_000, "program does not terminate"
        assert 0 <= pc < len(insns), f"jump out of the program at {pc}"
        i = insns[pc]
        pc += 1
        if i.code == LDX_MEM_W:
            assert i.src == 1
            regs[i.dst] = struct.unpack_from("<I", ctx, i.off)[0]
        elif i.code == ALU32_AND_K:
            regs[i.dst] = (regs[i.dst] & i.imm) & m32
        elif i.code == ALU32_RSH_K:
            regs[i.dst] = (regs[i.dst] & m32) >> i.imm
        elif i.code == ALU32_MOV_K:
            regs[i.dst] = i.imm & m32
        elif i.code == ALU32_MOV_X:
            regs[i.dst] = regs[i.src] & m32
        elif i.code == JMP_JNE_K:
            if regs[i.dst] != i.imm:
                pc += i.off
        elif i.code == JMP_JEQ_K:
            if regs[i.dst] == i.imm:
                pc += i.off
        elif i.code == JMP_EXIT:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {i.code:#x}")


def allowed(rules: list[DeviceCgroup], dev_type: str, major: int, minor: int, access: str) -> bool:
    prog = device_filter(normalize_rules(rules))
    return run_filter(prog, dev_type, major, minor, access) == 1


def test_normalize_defaults() -> None:
    rules = normalize_rules([DC(allow=False), DC(allow=True, type="c", major=-1, minor=3, access="wr")])
    assert rules == [
        DeviceRule(False, "a", None, None, "rwm"),
        DeviceRule(True, "c", None, 3, "rw"),
    ]
    assert rules[1].v1_entry() == "c *:3 rw"
    assert rules[0].v1_entry() == "a"
    with pytest.raises(CgroupError, match=r"devices\[0\]\.access"):
        normalize_rules([DC(allow=True, access="rx")])
    with pytest.raises(CgroupError, match=r"devices\[0\]\.type"):
        normalize_rules([DC(allow=True, type="p")])


def test_bpf_exact_instructions_for_typical_rules() -> None:
    prog = device_filter(normalize_rules([DENY_ALL, NULL]))
    # Prologue (6), the /dev/null block in reverse order first, then the deny-all rule, which matches
    # everything, so no default block follows.
    assert prog[:6] == [
        Insn(LDX_MEM_W, 2, 1, 0),
        Insn(ALU32_AND_K, 2, imm=0xFFFF),
        Insn(LDX_MEM_W, 3, 1, 0),
        Insn(ALU32_RSH_K, 3, imm=16),
        Insn(LDX_MEM_W, 4, 1, 4),
        Insn(LDX_MEM_W, 5, 1, 8),
    ]
    assert prog[6:] == [
        Insn(JMP_JNE_K, 2, off=4, imm=2),  # not a char device -> next rule
        Insn(JMP_JNE_K, 4, off=3, imm=1),  # major != 1 -> next
        Insn(JMP_JNE_K, 5, off=2, imm=3),  # minor != 3 -> next
        Insn(ALU32_MOV_K, 0, imm=1),
        Insn(JMP_EXIT),
        Insn(ALU32_MOV_K, 0, imm=0),  # deny all
        Insn(JMP_EXIT),
    ]
    code = encode_program(prog)
    assert len(code) == 8 * len(prog)
    assert code[:8] == bytes([0x61, 0x12, 0, 0, 0, 0, 0, 0])  # ldxw r2, [r1+0]


def test_bpf_empty_list_denies_everything() -> None:
    prog = device_filter([])
    assert prog[-2:] == [Insn(ALU32_MOV_K, 0, imm=0), Insn(JMP_EXIT)]
    assert not allowed([], "c", 1, 3, "r")


def test_bpf_allowlist() -> None:
    rules = [DENY_ALL, NULL, DC(allow=True, type="c", major=136, access="rw")]
    assert allowed(rules, "c", 1, 3, "rwm")
    assert not allowed(rules, "c", 1, 5, "r")
    assert not allowed(rules, "b", 1, 3, "r")  # type matters
    assert allowed(rules, "c", 136, 7, "rw")  # wildcard minor
    assert not allowed(rules, "c", 136, 7, "m")  # access is not covered


def test_bpf_last_rule_wins() -> None:
    # Allow everything, then take /dev/zero away again.
    rules = [DC(allow=True, access="rwm"), DC(allow=False, type="c", major=1, minor=5, access="rwm")]
    assert allowed(rules, "c", 1, 3, "rw")
    assert allowed(rules, "b", 8, 0, "r")
    assert not allowed(rules, "c", 1, 5, "r")
    # The same rules in the other order: the allow-all comes last and wins.
    assert allowed(list(reversed(rules)), "c", 1, 5, "r")


def test_bpf_partial_access_per_bit() -> None:
    rules = [DENY_ALL, NULL, DC(allow=False, type="c", major=1, minor=3, access="w")]
    assert allowed(rules, "c", 1, 3, "r")
    assert not allowed(rules, "c", 1, 3, "w")
    assert not allowed(rules, "c", 1, 3, "rw")
    # Two allow rules together cover "rw".
    split = [
        DENY_ALL,
        DC(allow=True, type="c", major=1, minor=5, access="r"),
        DC(allow=True, type="c", access="w"),
    ]
    assert allowed(split, "c", 1, 5, "rw")
    assert not allowed(split, "c", 1, 5, "rm")
    assert allowed(split, "c", 4, 1, "w")


def test_bpf_stops_after_match_all() -> None:
    rules = [NULL, ZERO, DENY_ALL]
    prog = device_filter(normalize_rules(rules))
    assert len(prog) == 8  # prologue + the deny-all block; earlier rules are unreachable
    assert not allowed(rules, "c", 1, 3, "r")


def test_v1_emulation_allowlist() -> None:
    state = emulate_v1(
        normalize_rules([DENY_ALL, NULL, ZERO, DC(allow=True, type="c", major=136, access="rw")])
    )
    assert not state.default_allow
    assert state.writes() == [
        ("devices.deny", "a"),
        ("devices.allow", "c 1:3 rwm"),
        ("devices.allow", "c 1:5 rwm"),
        ("devices.allow", "c 136:* rw"),
    ]


def test_v1_emulation_remove_and_reset() -> None:
    rules = [DENY_ALL, NULL, ZERO, DC(allow=False, type="c", major=1, minor=5, access="w")]
    assert emulate_v1(normalize_rules(rules)).writes() == [
        ("devices.deny", "a"),
        ("devices.allow", "c 1:3 rwm"),
        ("devices.allow", "c 1:5 rm"),
    ]
    rules = [NULL, DC(allow=True), DC(allow=False, type="b", major=8, access="rwm")]
    assert emulate_v1(normalize_rules(rules)).writes() == [
        ("devices.allow", "a"),
        ("devices.deny", "b 8:* rwm"),
    ]


def test_v1_emulation_refuses_hole_in_wildcard() -> None:
    rules = [DENY_ALL, DC(allow=True, type="c", access="rwm"), DC(allow=False, type="c", major=1, minor=5)]
    with pytest.raises(CgroupError, match=r"devices\[2\].*wildcard"):
        emulate_v1(normalize_rules(rules))
    # The same list is fine on v2.
    assert not allowed(rules, "c", 1, 5, "r")
    assert allowed(rules, "c", 1, 3, "r")
