"""Thin ctypes access to the Linux system calls Python 3.11's `os` module lacks.

Kept small and import-cheap: cocon-runtime's create/start path imports it. Every wrapper raises
OSError with the errno on failure, like the `os` module does.

The `ctypes` package costs more to import (~1.5 ms: it defines dozens of types and imports `struct`
and `types`) than all the system calls the runtime makes through it, so the few C types cocon uses
are declared here on top of its C module, `_ctypes`, as `ctypes` itself declares them; modules use
them from here (`L.Structure`, `L.c_uint32`, …).
"""

from __future__ import annotations

import os

from cocon._typing import TYPE_CHECKING

# The ctypes names other modules use from here (listed for type checkers, which see ctypes' own).
__all__ = [
    "CDLL",
    "POINTER",
    "Structure",
    "addressof",
    "byref",
    "c_char",
    "c_char_p",
    "c_int",
    "c_long",
    "c_size_t",
    "c_uint",
    "c_uint32",
    "c_uint64",
    "c_ulong",
    "c_ushort",
    "c_void_p",
    "create_string_buffer",
    "get_errno",
    "sizeof",
]

if TYPE_CHECKING:
    from ctypes import (
        CDLL,
        POINTER,
        Structure,
        addressof,
        byref,
        c_char,
        c_char_p,
        c_int,
        c_long,
        c_size_t,
        c_uint,
        c_uint32,
        c_uint64,
        c_ulong,
        c_ushort,
        c_void_p,
        create_string_buffer,
        get_errno,
        sizeof,
    )
else:
    import _ctypes
    from _ctypes import POINTER, Structure, addressof, byref, get_errno, sizeof

    class c_int(_ctypes._SimpleCData):
        _type_ = "i"

    class c_uint(_ctypes._SimpleCData):
        _type_ = "I"

    class c_long(_ctypes._SimpleCData):
        _type_ = "l"

    class c_ulong(_ctypes._SimpleCData):
        _type_ = "L"

    class c_ushort(_ctypes._SimpleCData):
        _type_ = "H"

    class c_char(_ctypes._SimpleCData):
        _type_ = "c"

    class c_char_p(_ctypes._SimpleCData):
        _type_ = "z"

    class c_void_p(_ctypes._SimpleCData):
        _type_ = "P"

    c_size_t, c_uint32, c_uint64 = c_ulong, c_uint, c_ulong  # as ctypes picks them on x86_64 (LP64)

    def create_string_buffer(init, size=None):
        """A char array holding `init` (bytes, NUL-terminated when `size` leaves room) or `init` zeros."""
        if isinstance(init, int):
            return (c_char * init)()
        buf = (c_char * (len(init) + 1 if size is None else size))()
        buf.value = init
        return buf

    class _Function(_ctypes.CFuncPtr):
        _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO  # errno for get_errno()
        _restype_ = c_int

    class CDLL:
        """A shared library; its functions are attributes (returning an int, keeping errno for
        get_errno), as with ctypes.CDLL(name, use_errno=True)."""

        def __init__(self, name):
            self._name = name
            self._handle = _ctypes.dlopen(name, _ctypes.RTLD_LOCAL)

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            func = _Function((name, self))
            setattr(self, name, func)
            return func


libc = CDLL(None)  # the C library, as linked into the interpreter
_syscall = libc.syscall
_syscall.restype = c_long

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
        err = get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def syscall(number: int, *args: int | bytes | c_void_p | None, what: str = "syscall") -> int:
    """Call a raw system call; integer and bytes arguments only."""
    return check(_syscall(c_long(number), *args), what)


# --- namespaces -------------------------------------------------------------------------------
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# runtime-spec namespace type -> (clone flag, /proc/PID/ns/ name)
NAMESPACES: dict[str, tuple[int, str]] = {
    "user": (CLONE_NEWUSER, "user"),
    "mount": (CLONE_NEWNS, "mnt"),
    "pid": (CLONE_NEWPID, "pid"),
    "network": (CLONE_NEWNET, "net"),
    "ipc": (CLONE_NEWIPC, "ipc"),
    "uts": (CLONE_NEWUTS, "uts"),
    "cgroup": (CLONE_NEWCGROUP, "cgroup"),
    "time": (CLONE_NEWTIME, "time"),
}


def unshare(flags: int) -> None:
    check(libc.unshare(c_int(flags)), "unshare")


def setns(fd: int, nstype: int = 0) -> None:
    check(libc.setns(c_int(fd), c_int(nstype)), "setns")


# --- mounts -----------------------------------------------------------------------------------
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

_mount = libc.mount
_mount.argtypes = [c_char_p, c_char_p, c_char_p, c_ulong, c_char_p]


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    ret = _mount(
        source.encode() if source is not None else None,
        target.encode(),
        fstype.encode() if fstype is not None else None,
        flags,
        data.encode() if data else None,
    )
    check(ret, f"mount {source or fstype or ''} on {target}", target)


def umount2(target: str, flags: int = 0) -> None:
    check(libc.umount2(target.encode(), c_int(flags)), f"umount {target}", target)


def pivot_root(new_root: str, put_old: str) -> None:
    check(_syscall(c_long(SYS_pivot_root), new_root.encode(), put_old.encode()), "pivot_root")


# --- openat2: kernel-side safe path resolution inside a root (Linux 5.6+) ------------------------
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10


class _OpenHow(Structure):
    _fields_ = [("flags", c_uint64), ("mode", c_uint64), ("resolve", c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    ret = _syscall(
        c_long(SYS_openat2),
        c_int(dirfd),
        path.encode(),
        byref(how),
        c_size_t(sizeof(how)),
    )
    return check(ret, f"open {path}", path)


# --- process attributes -----------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_prctl = libc.prctl
_prctl.argtypes = [c_int, c_ulong, c_ulong, c_ulong, c_ulong]


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return check(_prctl(option, arg2, arg3, arg4, arg5), "prctl")


def sethostname(name: str) -> None:
    raw = name.encode()
    check(libc.sethostname(raw, c_size_t(len(raw))), "sethostname")


def setdomainname(name: str) -> None:
    raw = name.encode()
    check(libc.setdomainname(raw, c_size_t(len(raw))), "setdomainname")


KEYCTL_JOIN_SESSION_KEYRING = 1


def join_session_keyring(name: str) -> None:
    """Give the container its own session keyring, as runc does (keys are not namespaced)."""
    check(
        _syscall(c_long(SYS_keyctl), c_int(KEYCTL_JOIN_SESSION_KEYRING), name.encode()),
        "keyctl",
    )
