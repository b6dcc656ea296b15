"""Compiled seccomp filters, cached: libseccomp compiles a profile once, the BPF is reused.

Compiling Docker's profile (about 350 syscalls with argument rules) through libseccomp takes tens of
milliseconds, more than the rest of `create`. The BPF program libseccomp produces depends only on
the profile, the libseccomp version, the architecture and the kernel (syscalls it knows), so the
runtime keeps it under `<root>/seccomp/<sha256>.bpf` (a tmpfs under /run: gone at reboot) and the
container process loads it with one seccomp(2) call. The cache is written atomically (temp file,
rename) by root into a root-only directory, and a program whose length is not a whole number of BPF
instructions is recompiled, never loaded.
"""

from __future__ import annotations

import errno
import os

from cocon import _linux as L
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import SeccompError

if TYPE_CHECKING:
    from cocon.oci.runtime_spec import Seccomp

SYS_seccomp = 317
SECCOMP_SET_MODE_FILTER = 1
FILTER_FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}
_INSN_SIZE = 8  # struct sock_filter


class _SockFprog(L.Structure):
    _fields_ = [("len", L.c_ushort), ("filter", L.c_void_p)]


class CompiledFilter:
    """A BPF program ready for seccomp(SECCOMP_SET_MODE_FILTER, flags, prog)."""

    def __init__(self, program: bytes, flags: int) -> None:
        self.program = program
        self.flags = flags

    def load(self) -> None:
        buf = L.create_string_buffer(self.program, len(self.program))
        prog = _SockFprog(len(self.program) // _INSN_SIZE, L.addressof(buf))
        try:
            L.syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, self.flags, L.c_void_p(L.addressof(prog)))
        except OSError as exc:
            if exc.errno == errno.EACCES:
                raise SeccompError(
                    "linux.seccomp: the kernel refused the filter (EACCES): loading it needs CAP_SYS_ADMIN "
                    "or no_new_privs; set process.noNewPrivileges or keep CAP_SYS_ADMIN"
                ) from None
            raise SeccompError(f"linux.seccomp: loading the filter failed: {exc.strerror}") from None


def _libseccomp_version() -> str:
    class _Version(L.Structure):
        _fields_ = [("major", L.c_uint), ("minor", L.c_uint), ("micro", L.c_uint)]

    try:
        lib = L.CDLL("libseccomp.so.2")
    except OSError:
        raise SeccompError("libseccomp is not installed: install Debian's libseccomp2") from None
    lib.seccomp_version.restype = L.POINTER(_Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def _digest(data: bytes) -> str:
    try:  # the builtin module: no OpenSSL load on the hot path
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - interpreters built without it
        from hashlib import sha256
    digest: str = sha256(data).hexdigest()
    return digest


def compiled_filter(sc: Seccomp, cache_dir: str) -> CompiledFilter:
    """The compiled program for `linux.seccomp`, from the cache or compiled (and cached) now."""

    if any(rule.action == "SCMP_ACT_NOTIFY" for rule in sc.syscalls or ()):
        raise SeccompError(
            "linux.seccomp: SCMP_ACT_NOTIFY (seccomp user notification) is not supported by "
            "cocon-runtime yet; use another action"
        )
    flags = 0
    for i, flag in enumerate(sc.flags or ()):
        if flag not in FILTER_FLAGS:
            raise SeccompError(
                f"linux.seccomp.flags[{i}]: unknown flag {flag!r}; use {', '.join(FILTER_FLAGS)}"
            )
        flags |= FILTER_FLAGS[flag]
    path = cache_path(sc, cache_dir)
    try:
        with open(path, "rb") as f:
            program = f.read()
        if program and len(program) % _INSN_SIZE == 0:
            return CompiledFilter(program, flags)
    except FileNotFoundError:
        pass
    program = _compile(sc)
    store(sc, cache_dir, program)
    return CompiledFilter(program, flags)


def cache_path(sc: Seccomp, cache_dir: str) -> str:
    """Where the compiled program of `sc` is cached: keyed by the profile, this kernel and arch, and
    the libseccomp version."""
    from cocon.oci.jsonobj import encode

    uname = os.uname()
    key = _digest(b"\0".join([encode(sc), uname.release.encode(), uname.machine.encode(),
                              _libseccomp_version().encode()]))  # fmt: skip
    return os.path.join(cache_dir, key + ".bpf")


def store(sc: Seccomp, cache_dir: str, program: bytes) -> None:
    """Put a compiled program into the cache (atomically). A microVM's agent stores the program its
    host compiled, so that the guest does not run libseccomp's compiler under emulation."""
    if not program or len(program) % _INSN_SIZE:
        raise SeccompError("a compiled seccomp program must be a whole number of BPF instructions")
    path = cache_path(sc, cache_dir)
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(program)
    os.rename(tmp, path)


def _compile(sc: Seccomp) -> bytes:
    import tempfile

    from cocon.runtime.seccomp import compile_filter

    filt = compile_filter(sc)
    with tempfile.TemporaryFile() as f:
        filt.export_bpf(f)
        f.seek(0)
        program = f.read()
    if not program or len(program) % _INSN_SIZE:
        raise SeccompError("linux.seccomp: libseccomp produced no usable BPF program")
    return program
