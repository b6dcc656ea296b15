"""Seccomp filters loaded into real (forked) processes on this kernel.

Every filter is loaded in a child made with os.fork(): a seccomp filter can never be removed, so
the test process itself must stay unfiltered. The child reports back over a pipe as JSON, or dies
(KILL actions), and always ends with os._exit.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import shutil
import signal
import socket
import struct
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cocon import _linux as linux
from cocon.oci.runtime_spec import Seccomp, SeccompArg, SeccompSyscall
from cocon.oci.seccomp_profiles import docker_default_seccomp
from cocon.runtime import capabilities
from cocon.runtime import seccomp as rsc
from cocon.runtime.capabilities import DOCKER_DEFAULT_CAPABILITIES
from cocon.runtime.errors import SeccompError

libc = ctypes.CDLL(None, use_errno=True)  # our own handle: argtypes set here stay here
_syscall = libc.syscall
_syscall.restype = ctypes.c_long
SYS_clone3 = 435
SYS_mount = 165
AF_ALG = 38
AF_VSOCK = 40


def run_in_child(fn: Callable[[], Any], *, before: Callable[[int], None] | None = None) -> tuple[int, Any]:
    """Run fn in a forked child; return (wait status, fn's JSON-able result or {"error": traceback})."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files from SIGSYS
            linux.prctl(linux.PR_SET_DUMPABLE, 0)  # not even to a core_pattern pipe
            payload = json.dumps({"result": fn()})
        except BaseException:
            payload = json.dumps({"error": traceback.format_exc()})
            code = 1
        try:
            os.write(w, payload.encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        if before is not None:
            before(pid)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    return status, json.loads(data) if data else None


def result_of(fn: Callable[[], Any]) -> Any:
    status, out = run_in_child(fn)
    assert out is not None, f"child died: status {status:#x}"
    assert "error" not in out, out["error"]
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    return out["result"]


def try_call(fn: Callable[[], object]) -> int:
    """0 if fn succeeds, else the errno of the OSError it raised."""
    try:
        fn()
    except OSError as exc:
        return exc.errno or -1
    return 0


def seccomp_mode() -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return line.split(":", 1)[1].strip()
    return "?"


def libc_errno(ret: int) -> int:
    return ctypes.get_errno() if ret == -1 else 0


def raw_syscall(nr: int, *args: int) -> int:
    ret = _syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
    return libc_errno(int(ret))


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="cocon-seccomp-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def allow_except(*rules: SeccompSyscall, **kw: Any) -> Seccomp:
    return Seccomp(default_action="SCMP_ACT_ALLOW", syscalls=list(rules), **kw)


def test_errno_rule_for_mkdir(workdir: str) -> None:
    sc = allow_except(SeccompSyscall(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO"))

    def child() -> dict[str, Any]:
        before = seccomp_mode()
        fd = rsc.load(sc)
        out = {"fd": fd, "before": before, "after": seccomp_mode()}
        out["mkdir"] = try_call(lambda: os.mkdir(os.path.join(workdir, "d")))
        path = os.path.join(workdir, "f")
        with open(path, "w") as f:
            f.write("still works")
        out["rename"] = try_call(lambda: os.rename(path, path + "2"))
        out["exists"] = os.path.exists(path + "2")
        return out

    r = result_of(child)
    assert r["before"] == "0"
    assert r["after"] == "2"  # SECCOMP_MODE_FILTER
    assert r["fd"] is None
    assert r["mkdir"] == errno.EPERM
    assert r["rename"] == 0 and r["exists"]
    assert not os.path.exists(os.path.join(workdir, "d"))
    assert seccomp_mode() == "0"  # the test process itself is untouched


def test_errno_ret_of_a_rule(workdir: str) -> None:
    sc = allow_except(
        SeccompSyscall(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO", errno_ret=errno.EROFS)
    )

    def child() -> int:
        rsc.load(sc)
        return try_call(lambda: os.mkdir(os.path.join(workdir, "d")))

    assert result_of(child) == errno.EROFS


def test_argument_condition_socket_family() -> None:
    sc = allow_except(
        SeccompSyscall(
            names=["socket"],
            action="SCMP_ACT_ERRNO",
            errno_ret=errno.EACCES,
            args=[SeccompArg(index=0, value=socket.AF_INET, op="SCMP_CMP_EQ")],
        )
    )

    def child() -> dict[str, int]:
        rsc.load(sc)
        return {
            "inet": try_call(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
            "unix": try_call(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
            "inet6": try_call(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()),
        }

    r = result_of(child)
    assert r["inet"] == errno.EACCES
    assert r["unix"] == 0
    assert r["inet6"] in (0, errno.EAFNOSUPPORT)  # not filtered (IPv6 may be off on the host)


def test_two_conditions_on_one_argument_are_alternatives() -> None:
    sc = allow_except(
        SeccompSyscall(
            names=["socket"],
            action="SCMP_ACT_ERRNO",
            args=[
                SeccompArg(index=0, value=socket.AF_INET, op="SCMP_CMP_EQ"),
                SeccompArg(index=0, value=socket.AF_NETLINK, op="SCMP_CMP_EQ"),
            ],
        )
    )

    def child() -> dict[str, int]:
        rsc.load(sc)
        return {
            "inet": try_call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()),
            "netlink": try_call(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
            "unix": try_call(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close()),
        }

    assert result_of(child) == {"inet": errno.EPERM, "netlink": errno.EPERM, "unix": 0}


def test_masked_eq_value_is_the_mask(workdir: str) -> None:
    existing = os.path.join(workdir, "existing")
    with open(existing, "w") as f:
        f.write("x")
    sc = allow_except(
        SeccompSyscall(
            names=["openat"],
            action="SCMP_ACT_ERRNO",
            args=[SeccompArg(index=2, value=os.O_CREAT, value_two=os.O_CREAT, op="SCMP_CMP_MASKED_EQ")],
        )
    )

    def child() -> dict[str, int]:
        rsc.load(sc)
        return {
            "read": try_call(lambda: open(existing).close()),
            "create": try_call(lambda: open(os.path.join(workdir, "new"), "w").close()),
        }

    assert result_of(child) == {"read": 0, "create": errno.EPERM}


def test_personality_allow_list() -> None:
    # Docker's pattern: only the listed personas are allowed, everything else gets the default.
    sc = Seccomp(
        default_action="SCMP_ACT_ALLOW",
        syscalls=[
            SeccompSyscall(
                names=["personality"],
                action="SCMP_ACT_ERRNO",
                args=[SeccompArg(index=0, value=0xFFFFFFFF, op="SCMP_CMP_NE")],
            )
        ],
    )
    personality = libc.personality
    personality.argtypes = [ctypes.c_ulong]

    def child() -> dict[str, int]:
        rsc.load(sc)
        query = personality(0xFFFFFFFF)
        return {"query": libc_errno(query), "set": libc_errno(personality(0x0008))}

    assert result_of(child) == {"query": 0, "set": errno.EPERM}


def test_docker_default_profile() -> None:
    sc = docker_default_seccomp(DOCKER_DEFAULT_CAPABILITIES)
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    unshare = libc.unshare

    def child() -> dict[str, Any]:
        rsc.load(sc)
        return {
            "mode": seccomp_mode(),
            # a target that does not exist: ENOENT if the filter let mount through
            "mount": libc_errno(mount(b"none", b"/nonexistent-cocon", b"tmpfs", 0, None)),
            "unshare": libc_errno(unshare(linux.CLONE_NEWNS)),
            "keyctl": raw_syscall(linux.SYS_keyctl, 0, 0),
            "clone3": raw_syscall(SYS_clone3, 0, 0),
            "alg": try_call(lambda: socket.socket(AF_ALG, socket.SOCK_SEQPACKET).close()),
            "vsock": try_call(lambda: socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()),
            "unix": try_call(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()),
            "getpid": os.getpid() > 0,
            "fork": _fork_and_wait(),
        }

    r = result_of(child)
    assert r["mode"] == "2"
    assert r["mount"] == errno.EPERM
    assert r["unshare"] == errno.EPERM
    assert r["keyctl"] == errno.EPERM
    assert r["clone3"] == errno.ENOSYS  # explicit ERRNO(38) rule, so glibc falls back to clone
    assert r["alg"] == errno.EPERM
    assert r["vsock"] == errno.EPERM
    assert r["unix"] == 0
    assert r["getpid"] and r["fork"] == 0


def _fork_and_wait() -> int:
    pid = os.fork()  # clone without namespace flags is allowed
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    return 0 if os.WEXITSTATUS(status) == 7 else 1


def test_default_errno_ret() -> None:
    sc = docker_default_seccomp(DOCKER_DEFAULT_CAPABILITIES)
    sc.default_errno_ret = errno.EXDEV
    unshare = libc.unshare

    def child() -> dict[str, int]:
        rsc.load(sc)
        return {
            "unshare": libc_errno(unshare(linux.CLONE_NEWUTS)),
            "keyctl": raw_syscall(linux.SYS_keyctl, 0, 0),
            "mount": raw_syscall(SYS_mount, 0, 0, 0, 0, 0),
        }

    assert result_of(child) == {"unshare": errno.EXDEV, "keyctl": errno.EXDEV, "mount": errno.EXDEV}


def test_sys_admin_profile_allows_unshare() -> None:
    sc = docker_default_seccomp([*DOCKER_DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"])
    unshare = libc.unshare

    def child() -> int:
        rsc.load(sc)
        return libc_errno(unshare(linux.CLONE_NEWUTS))

    assert result_of(child) == 0


def test_kill_process_dies_by_sigsys() -> None:
    sc = allow_except(SeccompSyscall(names=["getppid"], action="SCMP_ACT_KILL_PROCESS"))

    def child() -> str:
        rsc.load(sc)
        os.getppid()
        return "survived"

    status, out = run_in_child(child)
    assert out is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_kill_thread_in_a_single_threaded_process() -> None:
    sc = allow_except(SeccompSyscall(names=["getppid"], action="SCMP_ACT_KILL"))

    def child() -> str:
        rsc.load(sc)
        os.getppid()
        return "survived"

    status, out = run_in_child(child)
    assert out is None
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_trap_raises_sigsys() -> None:
    sc = allow_except(SeccompSyscall(names=["getppid"], action="SCMP_ACT_TRAP"))

    def child() -> int:
        caught: list[int] = []
        signal.signal(signal.SIGSYS, lambda signum, frame: caught.append(signum))
        rsc.load(sc)
        os.getppid()
        return caught[0] if caught else 0

    assert result_of(child) == signal.SIGSYS


def test_flags_and_extra_architectures() -> None:
    sc = allow_except(
        SeccompSyscall(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO"),
        architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        flags=["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
    )

    def child() -> dict[str, Any]:
        rsc.load(sc)
        return {"mode": seccomp_mode(), "mkdir": try_call(lambda: os.mkdir("/nonexistent-cocon/x"))}

    assert result_of(child) == {"mode": "2", "mkdir": errno.EPERM}


def test_filters_stack() -> None:
    first = allow_except(SeccompSyscall(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO"))
    second = allow_except(SeccompSyscall(names=["rmdir"], action="SCMP_ACT_ERRNO", errno_ret=errno.EBUSY))

    def child() -> dict[str, int]:
        rsc.load(first)
        rsc.load(second)
        return {
            "mkdir": try_call(lambda: os.mkdir("/nonexistent-cocon/x")),
            "rmdir": try_call(lambda: os.rmdir("/nonexistent-cocon/x")),
        }

    assert result_of(child) == {"mkdir": errno.EPERM, "rmdir": errno.EBUSY}


def test_loading_without_sys_admin_or_no_new_privs_is_explained() -> None:
    sc = allow_except(SeccompSyscall(names=["mkdir"], action="SCMP_ACT_ERRNO"))

    def child() -> str:
        eff, prm, inh = capabilities.capget()
        capabilities.capset(eff & ~(1 << capabilities.CAPABILITIES["CAP_SYS_ADMIN"]), prm, inh)
        try:
            rsc.load(sc)
        except SeccompError as exc:
            return str(exc)
        return "loaded"

    msg = result_of(child)
    assert "EACCES" in msg and "CAP_SYS_ADMIN or no_new_privs" in msg


def test_no_new_privs_allows_loading_without_sys_admin() -> None:
    sc = allow_except(SeccompSyscall(names=["mkdir", "mkdirat"], action="SCMP_ACT_ERRNO"))

    def child() -> int:
        eff, prm, inh = capabilities.capget()
        capabilities.capset(eff & ~(1 << capabilities.CAPABILITIES["CAP_SYS_ADMIN"]), prm, inh)
        linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
        rsc.load(sc)
        return try_call(lambda: os.mkdir("/nonexistent-cocon/x"))

    assert result_of(child) == errno.EPERM


# --- SCMP_ACT_NOTIFY: the fd goes to an agent at listenerPath, which answers ---------------------

SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100  # _IOWR('!', 0, struct seccomp_notif), 80 bytes
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101  # _IOWR('!', 1, struct seccomp_notif_resp), 24 bytes


def test_notify_fd_reaches_the_listener_and_gets_answers(workdir: str) -> None:
    listener_path = os.path.join(workdir, "agent.sock")
    target = os.path.join(workdir, "d")
    sc = allow_except(
        SeccompSyscall(names=["mkdir", "mkdirat"], action="SCMP_ACT_NOTIFY"),
        listener_path=listener_path,
        listener_metadata="hello",
    )
    agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent.bind(listener_path)
    agent.listen(1)
    agent.settimeout(30)
    seen: dict[str, Any] = {}

    def child() -> dict[str, Any]:
        fd = rsc.load(sc)
        assert fd is not None
        link = os.readlink(f"/proc/self/fd/{fd}")
        state = {"ociVersion": "1.2.0", "id": "t", "status": "creating", "pid": os.getpid(), "bundle": "/"}
        rsc.send_to_listener(listener_path, fd, pid=os.getpid(), state=state, metadata="hello")
        os.close(fd)
        return {"link": link, "mkdir": try_call(lambda: os.mkdir(target))}

    def agent_side(pid: int) -> None:
        conn, _ = agent.accept()
        with conn:
            msg, fds, _, _ = socket.recv_fds(conn, 65536, 1)
        seen["doc"] = json.loads(msg)
        (nfd,) = fds
        try:
            poller = select.poll()
            poller.register(nfd, select.POLLIN)
            assert poller.poll(30_000), "no notification within 30 s"
            buf = bytearray(80)
            fcntl.ioctl(nfd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
            notif_id, notif_pid, _flags, nr = struct.unpack_from("=QIIi", buf)
            seen["pid"], seen["nr"] = notif_pid, nr
            resp = struct.pack("=QqiI", notif_id, 0, -errno.EXDEV, 0)
            fcntl.ioctl(nfd, SECCOMP_IOCTL_NOTIF_SEND, bytearray(resp), True)
        finally:
            os.close(nfd)

    try:
        _status, out = run_in_child(child, before=agent_side)
    finally:
        agent.close()
    assert out is not None and "error" not in out, out
    assert out["result"]["link"] == "anon_inode:seccomp notify"
    assert out["result"]["mkdir"] == errno.EXDEV  # the agent's answer
    assert not os.path.exists(target)
    assert seen["pid"] > 0 and seen["nr"] in (83, 258)  # mkdir or mkdirat on x86_64
    doc = seen["doc"]
    assert doc["fds"] == ["seccompFd"] and doc["metadata"] == "hello" and doc["state"]["id"] == "t"
