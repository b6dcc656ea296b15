"""Pure parts of cocon-runtime: mount option parsing, signal names, container ids, process status,
the C types of cocon._linux, and what the create path imports."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import subprocess
import sys

import pytest

from cocon import _linux as L
from cocon.runtime.container import _wait_gone, parse_signal
from cocon.runtime.errors import RuntimeFailure
from cocon.runtime.rootfs import MountOptions
from cocon.runtime.state import process_start_time, validate_id


def test_mount_options_split_flags_propagation_and_data() -> None:
    opts = MountOptions(["nosuid", "ro", "rw", "noexec", "rbind", "rslave", "mode=755", "size=64k"])
    assert opts.flags == L.MS_NOSUID | L.MS_NOEXEC | L.MS_BIND | L.MS_REC
    assert opts.propagation == [L.MS_SLAVE | L.MS_REC]
    assert opts.data == "mode=755,size=64k"
    assert opts.is_bind


def test_unsupported_mount_option_is_an_error() -> None:
    with pytest.raises(RuntimeFailure, match="idmap"):
        MountOptions(["idmap"])


@pytest.mark.parametrize("value, expected", [("KILL", 9), ("SIGTERM", 15), ("9", 9), ("hup", 1)])
def test_parse_signal(value: str, expected: int) -> None:
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", ["SIGNOPE", "0", "999", ""])
def test_parse_signal_rejects(value: str) -> None:
    with pytest.raises(RuntimeFailure, match="unknown signal"):
        parse_signal(value)


@pytest.mark.parametrize("cid", ["../x", "a/b", "", ".hidden", "x" * 200])
def test_invalid_ids(cid: str) -> None:
    with pytest.raises(RuntimeFailure, match="invalid container id"):
        validate_id(cid)


def test_process_start_time_tells_live_from_gone() -> None:
    assert process_start_time(os.getpid()) is not None
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert process_start_time(pid) is None


def test_wait_gone_returns_when_the_process_exits_and_reaps_it() -> None:
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        start = process_start_time(pid)
        assert start is not None
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, start, timeout=10)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped already
        _wait_gone(pid, start)  # gone: returns at once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# --- cocon._linux's C types (declared on _ctypes, without the ctypes package) ---------------------
@pytest.mark.parametrize(
    "name",
    ["c_int", "c_uint", "c_long", "c_ulong", "c_ushort", "c_char", "c_char_p", "c_void_p", "c_size_t",
     "c_uint32", "c_uint64"],
)  # fmt: skip
def test_linux_c_types_are_ctypes_own(name: str) -> None:
    ours, theirs = getattr(L, name), getattr(ctypes, name)
    assert ours._type_ == theirs._type_
    assert L.sizeof(ours) == ctypes.sizeof(theirs)


def test_linux_string_buffers_and_structures() -> None:
    assert bytes(L.create_string_buffer(b"abc")) == b"abc\0"
    assert bytes(L.create_string_buffer(b"ab", 4)) == b"ab\0\0"
    assert bytes(L.create_string_buffer(3)) == b"\0\0\0"

    class Pair(L.Structure):
        _fields_ = [("a", L.c_uint32), ("b", L.c_uint64)]

    assert L.sizeof(Pair) == 16
    pair = Pair(1, 2)
    assert (pair.a, pair.b) == (1, 2)


def test_linux_calls_report_errno() -> None:
    assert L.syscall(39) == os.getpid()  # getpid
    with pytest.raises(OSError) as exc:
        L.check(L.libc.close(L.c_int(-1)), "close")
    assert exc.value.errno == errno.EBADF


def test_create_path_imports_no_ctypes_types_or_argparse() -> None:
    """The runtime's start-up cost: the packages `_linux`, `_fastjson` and the CLI's parser avoid."""
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    code = (
        f"import sys; sys.path.insert(0, {src!r})\n"
        "from cocon.runtime import capabilities, cgroups, cli, container, process, rootfs, seccomp_bpf, spawn\n"
        "from cocon.runtime.cgroups import v1, v2\n"
        "cli.fast_parse(['run', 'x'])\n"
        "print(sorted({'ctypes', 'types', 'argparse', 'json', 'socket', 'signal', 'typing'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
