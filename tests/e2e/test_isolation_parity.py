"""The same container semantics at two isolation levels: every test runs with `--isolation container`
and `--isolation microvm` (a real QEMU under TCG here, the guest agent and cocon's runtime inside),
through the real `cocon` CLI and daemon, with the same busybox image. Then what only a microVM
gives: its own kernel, a host it cannot see, and a kernel a root process can wreck without the host
noticing; and `docker run --isolation=hyperv` through the API.

The guest assets are built once for the module (COCON_ASSETS_ROOT: a cache shared by the daemons of one
host); no QEMU, shim or conmon of the module may be left at the end."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON, read_until
from daemon_helpers import Daemon, docker, start_daemon, stop_and_clean
from vm_helpers import kill_processes, processes_naming

LEVELS = ["container", "microvm"]


@pytest.fixture(scope="module")
def assets_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("assets-root"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stop_and_check(d: Daemon) -> None:
    code, log = stop_and_clean(d)
    left = kill_processes(d.run) + kill_processes(d.run, b"python")
    assert left == [], f"microVM processes left behind: {left}"
    assert code == 0 and "Traceback" not in log, log


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, assets_root: str) -> Iterator[Daemon]:
    base = str(tmp_path_factory.mktemp("parity"))
    d = start_daemon(base, env={"COCON_ASSETS_ROOT": assets_root})
    try:
        yield d
    finally:
        _stop_and_check(d)


def cocon(
    d: Daemon, *args: str, input: bytes | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([COCON, *args], env=d.env, input=input, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))  # fmt: skip


def run(d: Daemon, level: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return cocon(d, "run", "--rm", "--isolation", level, *args, **kw)


@pytest.fixture
def cleanup_containers(daemon: Daemon) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        cocon(daemon, "rm", "-f", name)


# --- the same semantics -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_exit_code_and_separate_streams(daemon: Daemon, level: str) -> None:
    p = run(daemon, level, "busybox", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert p.returncode == 3, p
    assert p.stdout == "out\n"
    assert "err\n" in p.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_command_not_found_is_127(daemon: Daemon, level: str) -> None:
    p = run(daemon, level, "busybox", "/no/such/command")
    assert p.returncode == 127, p
    assert "/no/such/command" in p.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_stdin_env_user_and_workdir(daemon: Daemon, level: str) -> None:
    p = run(daemon, level, "-i", "-e", "GREETING=hello", "-u", "1000:1000", "-w", "/tmp/work", "busybox",
            "sh", "-c", 'echo "$GREETING $(id -u):$(id -g) $(pwd)"; cat', input=b"from stdin\n")  # fmt: skip
    assert p.returncode == 0, p
    assert p.stdout == "hello 1000:1000 /tmp/work\nfrom stdin\n"


@pytest.mark.parametrize("level", LEVELS)
def test_security_defaults(daemon: Daemon, level: str) -> None:
    """Docker's capabilities, no_new_privs and the seccomp filter (compiled on the host and handed to
    the guest for a microVM), and a read-only /proc/sys, at both levels."""
    p = run(daemon, level, "busybox", "sh", "-c",
            'grep -E "^(CapEff|NoNewPrivs|Seccomp):" /proc/self/status; mount | grep " /proc/sys "')  # fmt: skip
    assert p.returncode == 0, p
    lines = p.stdout.splitlines()
    assert lines[:3] == ["CapEff:\t00000000a80425fb", "NoNewPrivs:\t1", "Seccomp:\t2"], p.stdout
    assert "(ro," in lines[3], p.stdout


@pytest.mark.parametrize("level", LEVELS)
def test_terminal_input_and_resize(daemon: Daemon, level: str) -> None:
    """`run -it` on a real pty: the size from the start, typed input, a resize, the exit code."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    script = "tty; stty size; read line; echo got:$line; sleep 1; stty size; exit 6"
    proc = subprocess.Popen(
        [COCON, "run", "--rm", "-it", "--network", "none", "--isolation", level, "busybox", "sh", "-c", script],
        stdin=slave, stdout=slave, stderr=slave, env=daemon.env, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    try:
        out = read_until(master, b"30 100", timeout=120)
        assert b"/dev/pts/0" in out
        os.write(master, b"typed\r")
        out += read_until(master, b"got:typed")
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.killpg(proc.pid, signal.SIGWINCH)  # what the terminal sends to its foreground group
        out += read_until(master, b"40 120")
        assert proc.wait(timeout=60) == 6
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


@pytest.mark.parametrize("level", LEVELS)
def test_limits_inside(daemon: Daemon, level: str) -> None:
    # the host may have cgroup v1 (a container sees it); a microVM's guest always has cgroup v2
    script = (
        "if [ -d /sys/fs/cgroup/memory ]; then cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
        "/sys/fs/cgroup/pids/pids.max; else cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; fi"
    )
    p = run(daemon, level, "--memory", "64m", "--pids-limit", "20", "busybox", "sh", "-c", script)
    assert p.returncode == 0, p
    assert p.stdout.split() == [str(64 << 20), "20"]


@pytest.mark.parametrize("level", LEVELS)
def test_signals_exec_logs_and_stop(daemon: Daemon, level: str, cleanup_containers: list[str]) -> None:
    name = f"sig-{level}"
    cleanup_containers.append(name)
    script = (
        'trap "echo got-term; exit 7" TERM; echo started; echo to-stderr >&2; while :; do sleep 0.1; done'
    )
    p = cocon(daemon, "run", "-d", "--name", name, "--isolation", level, "busybox", "sh", "-c", script)
    assert p.returncode == 0, p
    deadline = time.monotonic() + 120
    while "started" not in cocon(daemon, "logs", name).stdout:
        assert time.monotonic() < deadline, cocon(daemon, "logs", name)
        time.sleep(0.2)
    e = cocon(daemon, "exec", "-e", "X=42", name, "sh", "-c", 'echo "exec $X"; echo exec-err >&2; exit 4')
    assert e.returncode == 4, e
    assert e.stdout == "exec 42\n" and "exec-err" in e.stderr
    top = cocon(daemon, "top", name)
    lines = top.stdout.splitlines()
    assert top.returncode == 0 and lines[0].split()[:2] == ["UID", "PID"], top
    assert any("sh -c trap" in line for line in lines[1:]), top  # the container's init, by its command
    st = json.loads(cocon(daemon, "stats", "--no-stream", "--format", "json", name).stdout)
    assert st["Name"] == name and st["PIDs"] != "0" and not st["MemUsage"].startswith("0B")
    missing = cocon(daemon, "exec", name, "/no/such")
    assert missing.returncode != 0 and "/no/such" in missing.stderr, missing
    assert cocon(daemon, "kill", "-s", "TERM", name).returncode == 0
    w = cocon(daemon, "wait", name)
    assert w.stdout.strip() == "7", w
    logs = cocon(daemon, "logs", name)
    assert "started" in logs.stdout and "got-term" in logs.stdout
    assert "to-stderr" in logs.stderr
    info = json.loads(cocon(daemon, "inspect", name).stdout)[0]
    assert info["State"]["ExitCode"] == 7 and info["HostConfig"]["Isolation"] == level


@pytest.mark.parametrize("level", LEVELS)
def test_stop_kills_what_ignores_sigterm(daemon: Daemon, level: str, cleanup_containers: list[str]) -> None:
    name = f"stop-{level}"
    cleanup_containers.append(name)
    p = cocon(daemon, "run", "-d", "--name", name, "--isolation", level, "busybox", "sh", "-c",
              "trap '' TERM; echo up; while :; do sleep 0.1; done")  # fmt: skip
    assert p.returncode == 0, p
    deadline = time.monotonic() + 120
    while "up" not in cocon(daemon, "logs", name).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert cocon(daemon, "stop", "-t", "1", name).returncode == 0
    info = json.loads(cocon(daemon, "inspect", name).stdout)[0]
    assert info["State"]["Status"] == "exited" and info["State"]["ExitCode"] == 137


def test_volume_shared_between_levels(daemon: Daemon) -> None:
    """A named volume written by a microVM is read by a container, and the other way round."""
    try:
        p = run(daemon, "microvm", "-v", "parityvol:/data", "busybox", "sh", "-c",
                "echo from-vm > /data/a && cat /data/b 2>/dev/null; true")  # fmt: skip
        assert p.returncode == 0, p
        p = run(daemon, "container", "-v", "parityvol:/data", "busybox", "sh", "-c",
                "cat /data/a && echo from-ct > /data/b")  # fmt: skip
        assert p.stdout == "from-vm\n", p
        p = run(daemon, "microvm", "-v", "parityvol:/data", "busybox", "cat", "/data/b")
        assert p.stdout == "from-ct\n", p
    finally:
        cocon(daemon, "volume", "rm", "-f", "parityvol")


def test_network_between_levels(daemon: Daemon, cleanup_containers: list[str]) -> None:
    """A container and a microVM on one user network: the microVM reaches the container's server by
    name (DNS) over the shared bridge, and the other way round."""
    cleanup_containers.extend(["srv-ct", "srv-vm"])
    assert cocon(daemon, "network", "create", "paritynet").returncode == 0
    try:
        for name, level in (("srv-ct", "container"), ("srv-vm", "microvm")):
            p = cocon(daemon, "run", "-d", "--name", name, "--network", "paritynet", "--isolation", level,
                      "busybox", "sh", "-c", f"while :; do echo hello-from-{name} | nc -l -p 8080; done")  # fmt: skip
            assert p.returncode == 0, p
        for client, server in (("microvm", "srv-ct"), ("container", "srv-vm")):
            deadline = time.monotonic() + 120
            while True:
                p = run(daemon, client, "--network", "paritynet", "busybox", "sh", "-c",
                        f"nc -w 5 {server} 8080 </dev/null")  # fmt: skip
                if f"hello-from-{server}" in p.stdout:
                    break
                assert time.monotonic() < deadline, p
                time.sleep(1)
    finally:
        for name in ("srv-ct", "srv-vm"):
            cocon(daemon, "rm", "-f", name)
        cocon(daemon, "network", "rm", "paritynet")


# --- what only a microVM gives ----------------------------------------------------------------------


def test_microvm_has_its_own_kernel_and_sees_nothing_of_the_host(daemon: Daemon) -> None:
    p = run(daemon, "microvm", "busybox", "sh", "-c", "uname -r; cat /proc/1/cmdline | tr '\\0' ' '; echo; "
            "ls /proc | grep -c '^[0-9]'; cat /proc/mounts")  # fmt: skip
    assert p.returncode == 0, p
    lines = p.stdout.splitlines()
    assert lines[0] != os.uname().release  # the guest kernel
    assert lines[0].endswith("-amd64")
    assert int(lines[2]) < 10  # only the container's own processes, not the host's hundreds
    assert daemon.root not in p.stdout and "/run/cocon" not in p.stdout.split("\n", 3)[-1].split(" ")[0]
    c = run(daemon, "container", "busybox", "uname", "-r")
    assert c.stdout.strip() == os.uname().release


def test_exhausting_memory_stays_in_the_guest(daemon: Daemon) -> None:
    """A process that eats all the memory it may: the guest's OOM killer ends it (137); the host and
    a container running next to it carry on."""
    p = run(daemon, "microvm", "--memory", "64m", "busybox", "sh", "-c",
            "x=a; while :; do x=$x$x$x$x; done")  # fmt: skip
    assert p.returncode == 137, p
    assert run(daemon, "container", "busybox", "true").returncode == 0


def test_docker_run_isolation_hyperv_starts_a_microvm(daemon: Daemon) -> None:
    p = docker(daemon, "run", "--rm", "--isolation=hyperv", "busybox", "uname", "-r", check=False)
    assert p.returncode == 0, p
    assert p.stdout.strip() != os.uname().release and p.stdout.strip().endswith("-amd64")


def test_a_crashed_guest_kernel_ends_only_its_microvm(daemon: Daemon, cleanup_containers: list[str]) -> None:
    """Root with every capability crashes its kernel (sysrq c): that microVM ends with a clear
    reason (State.Error), its neighbour microVM and the host's containers carry on."""
    cleanup_containers.extend(["crash", "neighbour"])
    p = cocon(daemon, "run", "-d", "--name", "neighbour", "--network", "none", "--isolation", "microvm",
              "busybox", "sleep", "600")  # fmt: skip
    assert p.returncode == 0, p
    p = cocon(daemon, "run", "--name", "crash", "--network", "none", "--isolation", "microvm",
              "--cap-add", "ALL", "--security-opt", "seccomp=unconfined", "busybox", "sh", "-c",
              "mount -o remount,bind,rw /proc/sysrq-trigger && echo c > /proc/sysrq-trigger; sleep 60")  # fmt: skip
    assert p.returncode == 255, p
    assert "stopped unexpectedly" in p.stderr
    info = json.loads(cocon(daemon, "inspect", "crash").stdout)[0]
    assert "stopped unexpectedly" in info["State"]["Error"]
    assert cocon(daemon, "exec", "neighbour", "true").returncode == 0
    assert run(daemon, "container", "busybox", "true").returncode == 0


def test_killed_qemu_is_reported_as_the_instance_exiting(
    daemon: Daemon, cleanup_containers: list[str]
) -> None:
    cleanup_containers.append("victim")
    p = cocon(daemon, "run", "-d", "--name", "victim", "--network", "none", "--isolation", "microvm",
              "busybox", "sleep", "600")  # fmt: skip
    assert p.returncode == 0, p
    cid = p.stdout.strip()
    qemus = processes_naming(cid[:12])
    assert len(qemus) == 1, qemus
    os.kill(qemus[0], signal.SIGKILL)
    assert cocon(daemon, "wait", "victim").stdout.strip() == "255"
    info = json.loads(cocon(daemon, "inspect", "victim").stdout)[0]
    assert "stopped unexpectedly" in info["State"]["Error"] and info["State"]["Status"] == "exited"


def test_cold_boot_and_live_restore(tmp_path: Any, assets_root: str) -> None:
    """Without templates (COCON_MICROVM_TEMPLATES=0) a microVM boots cold; it keeps running while
    its daemon restarts, and the next daemon execs in it, stops it and collects its exit code."""
    env = {"COCON_ASSETS_ROOT": assets_root, "COCON_MICROVM_TEMPLATES": "0"}
    first = start_daemon(str(tmp_path), env=env)
    second = None
    try:
        p = cocon(first, "run", "-d", "--name", "pet", "--network", "none", "--isolation", "microvm",
                  "busybox", "sh", "-c", "echo booted; exec sleep 600")  # fmt: skip
        assert p.returncode == 0, p
        cid = p.stdout.strip()
        assert processes_naming(cid[:12], b"qemu-system"), "no QEMU for the microVM"
        with open(os.path.join(first.run, "vm", cid[:12], "console.log"), errors="replace") as f:
            assert "cocon-agent: ready" in f.read()  # booted: a restored VM has no boot on its console
        assert first.stop() == 0
        second = start_daemon(str(tmp_path), root=first.root, run=first.run, env=env)
        e = cocon(second, "exec", "pet", "sh", "-c", "echo still-here")
        assert e.returncode == 0 and e.stdout == "still-here\n", e
        assert cocon(second, "stop", "-t", "2", "pet").returncode == 0
        info = json.loads(cocon(second, "inspect", "pet").stdout)[0]
        assert info["State"]["Status"] == "exited" and info["State"]["ExitCode"] in (137, 143)
        assert "booted" in cocon(second, "logs", "pet").stdout
    finally:
        if second is not None:
            _stop_and_check(second)
        _stop_and_check(first)


def test_a_module_loaded_by_root_stays_in_the_guest(daemon: Daemon, assets_root: str, tmp_path: Any) -> None:
    """Root with CAP_SYS_MODULE and no seccomp loads a kernel module (the guest kernel's `dummy`,
    from the kernel package the assets were built from): the guest has it, the host does not."""
    from cocon.vmm.assets import ensure_assets

    ensure_assets(assets_root)  # the kernel package is kept with them
    debs = os.path.join(assets_root, "assets", "debs")
    deb = next(os.path.join(debs, n) for n in os.listdir(debs) if n.startswith("linux-image-"))
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path), "--wildcards", "*/drivers/net/dummy.ko"], input=tar,
                   check=True)  # fmt: skip
    module = next(os.path.join(d, "dummy.ko") for d, _, files in os.walk(tmp_path) if "dummy.ko" in files)
    host_before = _host_modules()
    p = run(daemon, "microvm", "--network", "none", "--cap-add", "SYS_MODULE", "--security-opt",
            "seccomp=unconfined", "-v", f"{module}:/dummy.ko:ro", "busybox", "sh", "-c",
            "insmod /dummy.ko && grep -c '^dummy ' /proc/modules")  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "1", p
    assert _host_modules() == host_before  # nothing reached the host's kernel
    c = run(daemon, "container", "--network", "none", "--cap-add", "SYS_MODULE", "--security-opt",
            "seccomp=unconfined", "-v", f"{module}:/dummy.ko:ro", "busybox", "insmod", "/dummy.ko")  # fmt: skip
    assert c.returncode != 0  # a container shares the host's kernel: the guest's module does not fit it


def _host_modules() -> set[str] | None:
    """The host kernel's loaded modules (None: a kernel built without module support)."""
    try:
        with open("/proc/modules") as f:
            return {line.split()[0] for line in f}
    except FileNotFoundError:
        return None
