"""Full VMs (`cocon run --isolation vm IMAGE`) end to end: a real daemon, real QEMU (TCG), real images.

- busybox boots in "cmd" mode (cocon's guest kernel and initramfs run the image's command in the
  instance's root disk): exit code, output, environment, user, working directory, hostname, stdin,
  its own kernel; the disk persists across `cocon start` and goes with `cocon rm`, each instance has
  its own copy-on-write disk; a directory volume reaches the VM over 9p; signals and `cocon stop`.
- debian-vm:bookworm (bootstrapped once per session from scripts/setup.sh's tarball) boots its own
  kernel and systemd: login prompt on the serial console, an address from the shim's DHCP that a
  container on the same network reaches, ACPI power-off on `cocon stop`, a second boot on `cocon start`,
  a login through `cocon attach`.
- the docker CLI starts a VM with `--isolation vm`; `cocon exec` into a VM and a missing command fail
  clearly.

The guest assets are built once for the module (COCON_ASSETS_ROOT); at the end every instance is
removed, the daemon stopped, and no QEMU, shim or conmon of the module may be left."""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON
from daemon_helpers import Daemon, docker, start_daemon, stop_and_clean
from vm_helpers import kill_processes

#: Seconds a Debian VM (its kernel and systemd, under TCG) gets to reach its login prompt.
DEBIAN_BOOT_TIMEOUT = 300


@pytest.fixture(scope="module")
def assets_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("vm-assets-root"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, assets_root: str) -> Iterator[Daemon]:
    base = str(tmp_path_factory.mktemp("vm-isolation"))
    d = start_daemon(base, env={"COCON_ASSETS_ROOT": assets_root})
    try:
        yield d
    finally:
        try:
            code, log = stop_and_clean(d)
            left = kill_processes(d.run) + kill_processes(d.run, b"python")
            assert left == [], f"VM processes left behind: {left}"
            assert code == 0 and "Traceback" not in log, log
        finally:
            shutil.rmtree(base, ignore_errors=True)  # the root's VM disks are large


@pytest.fixture(scope="module")
def debian_image(daemon: Daemon, debian_vm: tuple[str, str]) -> str:
    """debian-vm:bookworm in the daemon's store: loaded from the session's archive (conftest's
    debian_vm, made with `cocon image bootstrap debian-vm` offline from the setup tarball)."""
    p = cocon(daemon, "load", "-i", debian_vm[0], timeout=600)
    assert p.returncode == 0, p
    return "debian-vm:bookworm"


def cocon(
    d: Daemon, *args: str, input: bytes | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([COCON, *args], env=d.env, input=input, capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))  # fmt: skip


def inspect(d: Daemon, name: str) -> dict[str, Any]:
    p = cocon(d, "inspect", name)
    assert p.returncode == 0, p
    doc: dict[str, Any] = json.loads(p.stdout)[0]
    return doc


def wait_for_log(d: Daemon, name: str, text: str, count: int = 1, timeout: float = 120) -> str:
    """`cocon logs NAME` once it shows `text` `count` times (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = cocon(d, "logs", name)
        if (logs.stdout + logs.stderr).count(text) >= count:
            return logs.stdout + logs.stderr
        assert time.monotonic() < deadline, f"no {text!r} (x{count}) in the logs of {name}:\n{logs}"
        time.sleep(1)


@pytest.fixture
def names(daemon: Daemon) -> Iterator[list[str]]:
    """Instances (and volumes, prefixed `volume:`) the test made: removed afterwards, also on failure."""
    made: list[str] = []
    yield made
    for name in made:
        if name.startswith("volume:"):
            cocon(daemon, "volume", "rm", "-f", name.removeprefix("volume:"))
        else:
            cocon(daemon, "rm", "-f", name)


# --- "cmd" mode: an image's command in a VM -----------------------------------------------------------


def test_command_in_a_vm_behaves_like_a_container(daemon: Daemon) -> None:
    """Exit code, output, -e, -w, -u, --hostname and stdin (-i) as in a container, and the guest's own
    kernel. The command's stderr has its own serial port: it comes out on stderr, as in a container."""
    script = 'echo "$GREETING"; pwd; id -u; id -g; hostname; uname -r; cat; echo to-stderr >&2; exit 5'
    p = cocon(daemon, "run", "--rm", "-i", "--isolation", "vm", "-e", "GREETING=hello from a vm",
              "-w", "/tmp/work", "-u", "1000:1000", "--hostname", "vmhost", "busybox", "sh", "-c", script,
              input=b"from stdin\n")  # fmt: skip
    assert p.returncode == 5, p
    lines = p.stdout.splitlines()
    assert lines[:5] == ["hello from a vm", "/tmp/work", "1000", "1000", "vmhost"], p
    assert lines[5] != os.uname().release and lines[5].endswith("-amd64"), p  # cocon's guest kernel
    assert lines[6:] == ["from stdin"], p
    assert p.stderr.splitlines() == ["to-stderr"], p


def test_a_vm_is_on_the_default_network_with_the_daemons_dns(daemon: Daemon, names: list[str]) -> None:
    """eth0 has the address `cocon inspect` shows, on the default network, and a default route;
    resolv.conf names the daemon's DNS (as a container's); a container on that network reaches it."""
    names.append("netvm")
    p = cocon(daemon, "run", "-d", "--name", "netvm", "--isolation", "vm", "busybox", "sh", "-c",
              "ip -4 -o addr show eth0; cat /etc/resolv.conf; ip route; echo ready; exec sleep 600")  # fmt: skip
    assert p.returncode == 0, p
    logs = wait_for_log(daemon, "netvm", "ready")
    address = inspect(daemon, "netvm")["NetworkSettings"]["IPAddress"]
    assert address and f"inet {address}/" in logs, logs
    assert "default via " in logs, logs
    ct = cocon(daemon, "run", "--rm", "busybox", "sh", "-c",
               f"ip -4 -o addr show eth0; cat /etc/resolv.conf; ping -c 2 -W 5 {address}")  # fmt: skip
    assert ct.returncode == 0, ct
    network = ipaddress.ip_interface(ct.stdout.split()[3]).network
    assert ipaddress.ip_address(address) in network, (address, ct.stdout)
    dns = [line for line in ct.stdout.splitlines() if line.startswith("nameserver")]
    assert dns and dns == [line for line in logs.splitlines() if line.startswith("nameserver")], (ct, logs)


def test_command_not_found_is_127(daemon: Daemon) -> None:
    p = cocon(daemon, "run", "--rm", "--isolation", "vm", "busybox", "/no/such/command")
    assert p.returncode == 127, p
    assert "/no/such/command" in p.stdout + p.stderr, p


def test_the_disk_persists_across_start_and_goes_with_rm(daemon: Daemon, names: list[str]) -> None:
    """A pet's root disk keeps what its command wrote across `cocon start`; another instance of the
    image starts from the image (its own copy-on-write overlay); `cocon rm` removes the disk."""
    names += ["pet", "other"]
    script = "cat /data.txt 2>/dev/null; echo run >> /data.txt"
    p = cocon(daemon, "run", "--name", "pet", "--isolation", "vm", "busybox", "sh", "-c", script)
    assert p.returncode == 0 and p.stdout == "", p
    for expected in ("run\n", "run\nrun\n"):
        p = cocon(daemon, "start", "-a", "pet")
        assert p.returncode == 0 and p.stdout == expected, p
    other = cocon(daemon, "run", "--name", "other", "--isolation", "vm", "busybox", "cat", "/data.txt")
    assert other.returncode == 1 and "run" not in other.stdout, other
    cid = inspect(daemon, "pet")["Id"]
    disk_dir = os.path.join(daemon.root, "disks", "instances", cid)
    assert os.path.isdir(disk_dir), os.listdir(os.path.join(daemon.root, "disks", "instances"))
    assert cocon(daemon, "rm", "pet").returncode == 0
    assert not os.path.exists(disk_dir)


def test_a_directory_volume_is_shared_with_containers(daemon: Daemon, names: list[str]) -> None:
    """A named volume reaches the VM over 9p: what a container wrote, the VM reads, and the other way
    round."""
    names.append("volume:vmvol")
    p = cocon(daemon, "run", "--rm", "-v", "vmvol:/data", "busybox", "sh", "-c", "echo from-ct > /data/b")
    assert p.returncode == 0, p
    p = cocon(daemon, "run", "--rm", "--isolation", "vm", "-v", "vmvol:/data", "busybox", "sh", "-c",
              "cat /data/b && echo from-vm > /data/a")  # fmt: skip
    assert p.returncode == 0 and p.stdout == "from-ct\n", p
    p = cocon(daemon, "run", "--rm", "-v", "vmvol:/data", "busybox", "cat", "/data/a")
    assert p.returncode == 0 and p.stdout == "from-vm\n", p


def test_exec_is_refused_and_stop_signals_the_command(daemon: Daemon, names: list[str]) -> None:
    """A running VM: `cocon exec` says to use the console; `cocon stop -t 5` ends the command within
    the timeout (SIGTERM: 143, or SIGKILL after it: 137)."""
    names.append("sleeper")
    p = cocon(daemon, "run", "-d", "--name", "sleeper", "--isolation", "vm", "busybox", "sh", "-c",
              "echo up; exec sleep 1000")  # fmt: skip
    assert p.returncode == 0, p
    wait_for_log(daemon, "sleeper", "up")
    e = cocon(daemon, "exec", "sleeper", "echo", "hi")
    assert e.returncode == 126 and "console" in e.stderr, e  # docker exec's "cannot be executed"
    started = time.monotonic()
    s = cocon(daemon, "stop", "-t", "5", "sleeper")
    took = time.monotonic() - started
    assert s.returncode == 0, s
    assert took < 5 + 10, f"cocon stop -t 5 took {took:.1f} s"
    state = inspect(daemon, "sleeper")["State"]
    assert state["Status"] == "exited" and state["ExitCode"] in (143, 137), state


def test_docker_run_isolation_vm(daemon: Daemon) -> None:
    p = docker(daemon, "run", "--rm", "--isolation", "vm", "busybox", "echo", "hi", check=False)
    assert p.returncode == 0 and p.stdout == "hi\n", p


# --- an image with its own kernel and systemd -------------------------------------------------------


def test_debian_boots_systemd_gets_an_address_stops_and_boots_again(
    daemon: Daemon, debian_image: str, names: list[str]
) -> None:
    names.append("deb")
    p = cocon(daemon, "run", "-d", "-i", "--name", "deb", "--isolation", "vm", debian_image)
    assert p.returncode == 0, p
    logs = wait_for_log(daemon, "deb", "login:", timeout=DEBIAN_BOOT_TIMEOUT)
    info = inspect(daemon, "deb")
    assert info["HostConfig"]["Isolation"] == "vm" and info["State"]["Running"], info["State"]
    address = info["NetworkSettings"]["IPAddress"]
    assert address, info["NetworkSettings"]
    assert f"IPv4: {address}" in logs, logs[-2000:]  # the guest's DHCP lease, on its login banner
    ping = cocon(daemon, "run", "--rm", "busybox", "ping", "-c", "2", "-W", "5", address)
    assert ping.returncode == 0, ping
    started = time.monotonic()
    s = cocon(daemon, "stop", "-t", "60", "deb")
    assert s.returncode == 0, s
    took = time.monotonic() - started
    state = inspect(daemon, "deb")["State"]
    assert state["Status"] == "exited" and state["ExitCode"] == 0, (state, took)  # ACPI power-off
    assert took < 60, f"the ACPI power-off took {took:.1f} s"
    prompts = wait_for_log(daemon, "deb", "login:").count("login:")
    assert cocon(daemon, "start", "deb").returncode == 0  # the same disk boots again
    wait_for_log(daemon, "deb", "login:", count=prompts + 1, timeout=DEBIAN_BOOT_TIMEOUT)
    assert inspect(daemon, "deb")["State"]["Running"]
    _login_through_attach(daemon, "deb")
    s = cocon(daemon, "stop", "-t", "60", "deb")
    assert s.returncode == 0 and inspect(daemon, "deb")["State"]["ExitCode"] == 0, s


def _login_through_attach(d: Daemon, name: str) -> None:
    """root logs in on the serial console through `cocon attach` and runs a command."""
    proc = subprocess.Popen([COCON, "attach", name], env=d.env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    chunks: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, chunks), daemon=True)
    reader.start()
    seen = b""

    def until(needle: bytes, timeout: float, send: bytes | None = None, every: float = 5) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while needle not in seen:
            now = time.monotonic()
            assert now < deadline, f"no {needle!r} on the console; got {seen[-2000:]!r}"
            if send is not None and now >= next_send:
                assert proc.stdin is not None
                proc.stdin.write(send)
                proc.stdin.flush()
                next_send = now + every
            try:
                seen += chunks.get(timeout=0.5)
            except queue.Empty:
                pass

    try:
        until(b"login:", 60, send=b"\n")  # a fresh prompt
        seen = b""
        until(b":~# ", 60, send=b"root\n", every=20)  # empty password: the shell prompt
        seen = b""
        until(b"marker-42", 60, send=b"echo marker-$((6*7))\n", every=10)
    finally:
        proc.kill()
        proc.wait()
        reader.join(5)


def _pump(stream: IO[bytes], chunks: queue.Queue[bytes]) -> None:
    while True:
        data = stream.read1(4096)  # type: ignore[attr-defined]
        if not data:
            return
        chunks.put(data)
