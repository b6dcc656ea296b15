"""Thin ctypes access to the Linux system calls Python 3.11's `os` module lacks.

Kept small and import-cheap: cocon-runtime's create/start path imports it. Every wrapper raises
OSError with the errno on failure, like the `os` module does.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
_syscall = libc.syscall
_syscall.restype = ctypes.c_long

# x86_64 system call numbers not exposed by glibc wrappers we can rely on.
SYS_pivot_root = 155
SYS_capget = 125
SYS_capset = 126
SYS_setns = 308
SYS_keyctl = 250
SYS_bpf = 321
SYS_openat2 = 437
SYS_pidfd_open = 434
SYS_close_range = 436


def check(ret: int, what: str, path: str | None = None) -> int:
    """Turn a -1 return into OSError(errno), like the os module does."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def syscall(number: int, *args: int | bytes | ctypes.c_void_p | None, what: str = "syscall") -> int:
    """Call a raw system call; integer and bytes arguments only."""
    return check(_syscall(ctypes.c_long(number), *args), what)
