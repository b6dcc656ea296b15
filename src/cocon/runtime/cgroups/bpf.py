"""bpf(2) through ctypes: load a cgroup device program and attach it to a cgroup v2 directory."""

from __future__ import annotations

import errno
import os

from cocon import _linux as L
from cocon.runtime.errors import CgroupError

BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_PROG_QUERY = 16

BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2

FIELD = "linux.resources.devices"


class _ProgLoadAttr(L.Structure):
    _fields_ = (
        ("prog_type", L.c_uint32),
        ("insn_cnt", L.c_uint32),
        ("insns", L.c_uint64),
        ("license", L.c_uint64),
        ("log_level", L.c_uint32),
        ("log_size", L.c_uint32),
        ("log_buf", L.c_uint64),
        ("kern_version", L.c_uint32),
        ("prog_flags", L.c_uint32),
        ("prog_name", L.c_char * 16),
        ("prog_ifindex", L.c_uint32),
        ("expected_attach_type", L.c_uint32),
    )


class _AttachAttr(L.Structure):
    _fields_ = (
        ("target_fd", L.c_uint32),
        ("attach_bpf_fd", L.c_uint32),
        ("attach_type", L.c_uint32),
        ("attach_flags", L.c_uint32),
        ("replace_bpf_fd", L.c_uint32),
    )


class _QueryAttr(L.Structure):
    _fields_ = (
        ("target_fd", L.c_uint32),
        ("attach_type", L.c_uint32),
        ("query_flags", L.c_uint32),
        ("attach_flags", L.c_uint32),
        ("prog_ids", L.c_uint64),
        ("prog_cnt", L.c_uint32),
        ("_pad", L.c_uint32),
    )


class _GetFdByIdAttr(L.Structure):
    _fields_ = (
        ("prog_id", L.c_uint32),
        ("next_id", L.c_uint32),
        ("open_flags", L.c_uint32),
    )


def _bpf(cmd: int, attr: L.Structure, what: str) -> int:
    ptr = L.c_void_p(L.addressof(attr))
    return L.syscall(L.SYS_bpf, cmd, ptr, L.sizeof(attr), what=what)


def load_device_program(code: bytes) -> int:
    """Load a BPF_PROG_TYPE_CGROUP_DEVICE program; returns its fd. The verifier log is in the error."""
    if len(code) % 8:
        raise ValueError("eBPF code must be a whole number of 8-byte instructions")
    insns = L.create_string_buffer(code, len(code))
    license_ = L.create_string_buffer(b"Apache")
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt=len(code) // 8,
        insns=L.addressof(insns),
        license=L.addressof(license_),
        prog_name=b"cocon_devices",
    )
    try:
        return _bpf(BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD)")
    except OSError as exc:
        first = exc
    # Load again with the verifier log to say why.
    log = L.create_string_buffer(65536)
    attr.log_level = 1
    attr.log_size = len(log)
    attr.log_buf = L.addressof(log)
    try:
        return _bpf(BPF_PROG_LOAD, attr, "bpf(BPF_PROG_LOAD)")
    except OSError:
        pass
    detail = log.value.decode(errors="replace").strip()[-2000:]
    hint = (
        "the kernel needs CONFIG_CGROUP_BPF and CAP_SYS_ADMIN (or CAP_BPF)"
        if first.errno in (errno.EPERM, errno.EINVAL, errno.ENOSYS)
        else "see the verifier log"
    )
    raise CgroupError(
        f"{FIELD}: cannot load the device eBPF program: {os.strerror(first.errno or 0)}; {hint}"
        + (f"\nverifier log:\n{detail}" if detail else "")
    ) from None


def query_device_programs(cgroup_fd: int) -> list[int]:
    """Ids of the device programs attached directly to the cgroup."""
    attr = _QueryAttr(target_fd=cgroup_fd, attach_type=BPF_CGROUP_DEVICE)
    _bpf(BPF_PROG_QUERY, attr, "bpf(BPF_PROG_QUERY)")
    count = attr.prog_cnt
    if count == 0:
        return []
    ids = (L.c_uint32 * count)()
    attr = _QueryAttr(
        target_fd=cgroup_fd, attach_type=BPF_CGROUP_DEVICE, prog_ids=L.addressof(ids), prog_cnt=count
    )
    _bpf(BPF_PROG_QUERY, attr, "bpf(BPF_PROG_QUERY)")
    return list(ids[: attr.prog_cnt])


def attach_device_program(cgroup_fd: int, prog_fd: int, flags: int = BPF_F_ALLOW_MULTI) -> None:
    attr = _AttachAttr(
        target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=BPF_CGROUP_DEVICE, attach_flags=flags
    )
    _bpf(BPF_PROG_ATTACH, attr, "bpf(BPF_PROG_ATTACH)")


def detach_device_program(cgroup_fd: int, prog_id: int) -> None:
    """Detach the program with id `prog_id` from the cgroup; a program already gone is fine."""
    get = _GetFdByIdAttr(prog_id=prog_id)
    try:
        prog_fd = _bpf(BPF_PROG_GET_FD_BY_ID, get, "bpf(BPF_PROG_GET_FD_BY_ID)")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    try:
        attr = _AttachAttr(target_fd=cgroup_fd, attach_bpf_fd=prog_fd, attach_type=BPF_CGROUP_DEVICE)
        try:
            _bpf(BPF_PROG_DETACH, attr, "bpf(BPF_PROG_DETACH)")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
    finally:
        os.close(prog_fd)


def set_device_program(cgroup_dir: str, code: bytes) -> None:
    """Replace the device programs cocon attached to `cgroup_dir` by one running `code`.

    The new program is attached (BPF_F_ALLOW_MULTI) before the old ones are detached, so there is no
    moment without a filter.
    """
    prog_fd = load_device_program(code)
    try:
        try:
            cg_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise CgroupError(f"{FIELD}: cannot open cgroup {cgroup_dir}: {exc.strerror}") from None
        try:
            try:
                old = query_device_programs(cg_fd)
            except OSError:
                old = []
            try:
                attach_device_program(cg_fd, prog_fd)
            except OSError as exc:
                raise CgroupError(
                    f"{FIELD}: cannot attach the device eBPF program to {cgroup_dir}: "
                    f"{os.strerror(exc.errno or 0)}; another program may be attached without "
                    "BPF_F_ALLOW_MULTI, or the kernel lacks CONFIG_CGROUP_BPF"
                ) from None
            for prog_id in old:
                try:
                    detach_device_program(cg_fd, prog_id)
                except OSError as exc:
                    raise CgroupError(
                        f"{FIELD}: cannot detach the previous device program {prog_id} from {cgroup_dir}: "
                        f"{os.strerror(exc.errno or 0)}"
                    ) from None
        finally:
            os.close(cg_fd)
    finally:
        os.close(prog_fd)
