"""`cocon run` end to end: the real `cocon` command in a subprocess, real containers from a real busybox
image, in private roots (tests/cli_helpers.py checks that nothing is left behind)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON, CoconEnv, cocon_env_fixture
from cocon.runtime.capabilities import CAPABILITIES, DOCKER_DEFAULT_CAPABILITIES


@pytest.fixture
def cocon_env(tmp_path: Any) -> Iterator[CoconEnv]:
    yield from cocon_env_fixture(tmp_path)


def _mask(names: object) -> int:
    return sum(1 << CAPABILITIES[n] for n in names)  # type: ignore[attr-defined]


def _status_field(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in {text!r}")


def test_output_and_exit_codes(cocon_env: CoconEnv) -> None:
    p = cocon_env("run", "--rm", "busybox", "echo", "hello from busybox")
    assert p.stdout == "hello from busybox\n"
    assert cocon_env("run", "--rm", "busybox", "sh", "-c", "exit 3", check=False).returncode == 3
    p = cocon_env("run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2")
    assert (p.stdout, p.stderr) == ("out\n", "err\n")


def test_docker_exit_codes_for_cocon_failures(cocon_env: CoconEnv) -> None:
    p = cocon_env("run", "--rm", "busybox", "no-such-command", check=False)
    assert p.returncode == 127
    assert p.stderr.startswith("cocon: error: ") and "not found" in p.stderr and p.stderr.count("\n") == 1
    p = cocon_env("run", "--rm", "busybox", "/etc/passwd", check=False)
    assert p.returncode == 126 and "permission denied" in p.stderr
    p = cocon_env("run", "--rm", "no-such-image", "true", check=False)
    assert p.returncode == 125 and "no image 'no-such-image'" in p.stderr
    p = cocon_env("run", "--bogus", "busybox", check=False)
    assert p.returncode == 125 and "unknown flag: --bogus" in p.stderr
    p = cocon_env("run", "--memory", "lots", "busybox", "true", check=False)
    assert p.returncode == 125 and "--memory" in p.stderr
    p = cocon_env("run", "--rm", check=False)
    assert p.returncode == 125 and "requires at least 1 argument" in p.stderr
    assert cocon_env("ps", "-aq").stdout == ""


def test_help_lists_every_flag(cocon_env: CoconEnv) -> None:
    p = cocon_env("run", "--help")
    for flag in ("--rm", "--interactive", "--tty", "--env-file", "--workdir", "--entrypoint", "--volume",
                 "--read-only", "--tmpfs", "--memory", "--cpus", "--pids-limit", "--cap-add", "--cap-drop",
                 "--security-opt", "--hostname"):  # fmt: skip
        assert flag in p.stdout, flag


def test_image_config_and_overrides(cocon_env: CoconEnv, tmp_path: object) -> None:
    env_file = os.path.join(str(tmp_path), "env")
    with open(env_file, "w") as f:
        f.write("# comment\nFROM_FILE=1\n\nFROM_HOST\n")
    cocon_env.extra_env["FROM_HOST"] = "host value"
    cocon_env.extra_env["PASSED"] = "passed"
    p = cocon_env(
        "run", "--rm", "-e", "A=b c", "-e", "PASSED", "--env-file", env_file, "-w", "/srv/app", "-u", "nobody",
        "-h", "box", "busybox", "sh", "-c", 'echo "$A|$FROM_FILE|$FROM_HOST|$PASSED|$PATH"; pwd; id; hostname; echo $HOME',
    )  # fmt: skip
    assert p.stdout.splitlines() == [
        "b c|1|host value|passed|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "/srv/app",
        "uid=65534(nobody) gid=65534(nogroup)",
        "box",
        "/home",  # the busybox image's passwd entry
    ]
    p = cocon_env("run", "--rm", "--entrypoint", "echo", "busybox", "entry", "point")
    assert p.stdout == "entry point\n"
    p = cocon_env("run", "--rm", "-u", "1234:5678", "busybox", "id")
    assert p.stdout.strip() == "uid=1234 gid=5678"
    p = cocon_env("run", "--rm", "-u", "nosuchuser", "busybox", "id", check=False)
    assert p.returncode == 125 and "unable to find user nosuchuser" in p.stderr


def test_default_hostname_is_the_short_id_and_records_stay_without_rm(cocon_env: CoconEnv) -> None:
    p = cocon_env(
        "run", "--name", "keeper", "busybox", "sh", "-c", "hostname; echo data > /file; exit 4", check=False
    )
    assert p.returncode == 4
    doc = json.loads(cocon_env("inspect", "keeper").stdout)[0]
    assert doc["Id"][:12] == p.stdout.strip()
    assert doc["State"]["Status"] == "exited" and doc["State"]["ExitCode"] == 4
    assert doc["Name"] == "/keeper" and doc["Path"] == "sh"
    upper = doc["GraphDriver"]["Data"]["UpperDir"]
    assert open(os.path.join(upper, "file")).read() == "data\n"  # the stopped container keeps its changes
    ps = cocon_env("ps", "-a").stdout.splitlines()
    assert ps[0].split() == ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert "Exited (4)" in ps[1] and ps[1].endswith("keeper")
    assert cocon_env("ps").stdout.splitlines()[1:] == []  # not running
    line = json.loads(cocon_env("ps", "-a", "--format", "json").stdout)
    assert line["Names"] == "keeper" and line["State"] == "exited" and line["Image"] == "busybox"
    p = cocon_env("run", "--name", "keeper", "busybox", "true", check=False)
    assert p.returncode == 125 and "already used" in p.stderr
    assert cocon_env("rm", "keeper").stdout == "keeper\n"
    assert not os.path.exists(upper)
    assert cocon_env("ps", "-aq").stdout == ""


def test_security_defaults_hold_inside(cocon_env: CoconEnv) -> None:
    script = (
        "cat /proc/self/status; echo ---; wc -c < /proc/interrupts; "
        "echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo sys-writable || echo sys-ro; "
        "touch /sys/x 2>/dev/null && echo sysfs-writable || echo sysfs-ro; "
        "ls /proc | grep -c '^[0-9]'"
    )
    out = cocon_env("run", "--rm", "busybox", "sh", "-c", script).stdout
    status, rest = out.split("---\n")
    expected = _mask(DOCKER_DEFAULT_CAPABILITIES)
    assert int(_status_field(status, "CapBnd"), 16) == expected
    assert int(_status_field(status, "CapEff"), 16) == expected
    assert _status_field(status, "NoNewPrivs") == "1"
    assert _status_field(status, "Seccomp") == "2"
    masked, sys_state, sysfs_state, procs = rest.split()
    assert os.path.getsize("/proc/interrupts") == 0 and open("/proc/interrupts").read()  # non-empty here
    assert (masked, sys_state, sysfs_state) == ("0", "sys-ro", "sysfs-ro")  # masked: /dev/null over it
    assert int(procs) <= 3  # its own pid namespace: sh, ls, grep
    # seccomp: Docker's profile refuses what the default capabilities do not allow
    p = cocon_env("run", "--rm", "busybox", "sh", "-c", "unshare -U true; echo $?", check=False)
    assert p.stdout.strip() != "0"


def test_capabilities_and_seccomp_options(cocon_env: CoconEnv, tmp_path: object) -> None:
    eff = cocon_env(
        "run", "--rm", "--cap-drop", "ALL", "busybox", "grep", "CapEff", "/proc/self/status"
    ).stdout
    assert int(eff.split()[1], 16) == 0
    eff = cocon_env("run", "--rm", "--cap-add", "NET_ADMIN", "--cap-drop", "chown", "busybox", "grep", "CapEff",
                    "/proc/self/status").stdout  # fmt: skip
    value = int(eff.split()[1], 16)
    assert value & (1 << CAPABILITIES["CAP_NET_ADMIN"]) and not value & (1 << CAPABILITIES["CAP_CHOWN"])
    p = cocon_env("run", "--rm", "--cap-add", "NOT_A_CAP", "busybox", "true", check=False)
    assert p.returncode == 125 and "unknown capability" in p.stderr
    out = cocon_env("run", "--rm", "--security-opt", "seccomp=unconfined", "busybox", "grep", "Seccomp:",
                    "/proc/self/status").stdout  # fmt: skip
    assert out.split()[1] == "0"
    profile = os.path.join(str(tmp_path), "profile.json")
    with open(profile, "w") as f:
        json.dump({"defaultAction": "SCMP_ACT_ALLOW",
                   "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}, f)  # fmt: skip
    p = cocon_env(
        "run", "--rm", "--security-opt", f"seccomp={profile}", "busybox", "mkdir", "/tmp/x", check=False
    )
    assert p.returncode == 1 and "Operation not permitted" in p.stderr
    p = cocon_env("run", "--rm", "--security-opt", "seccomp=/no/such/file", "busybox", "true", check=False)
    assert p.returncode == 125 and "cannot read the profile" in p.stderr


def test_read_only_tmpfs_and_limits(cocon_env: CoconEnv) -> None:
    script = (
        "touch /x 2>/dev/null && echo root-rw || echo root-ro; "
        "echo ok > /scratch/f && cat /scratch/f; grep ' /scratch ' /proc/mounts; "
        "if [ -d /sys/fs/cgroup/memory ]; then cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
        "/sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/cpu/cpu.cfs_quota_us; "
        "else cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max; cut -d' ' -f1 /sys/fs/cgroup/cpu.max; fi"
    )
    out = cocon_env("run", "--rm", "--read-only", "--tmpfs", "/scratch:size=1m,mode=1777", "--memory", "64m",
                    "--pids-limit", "20", "--cpus", "0.5", "busybox", "sh", "-c", script).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[:2] == ["root-ro", "ok"]
    assert "tmpfs" in lines[2] and "size=1024k" in lines[2] and "noexec" in lines[2] and "nosuid" in lines[2]
    assert lines[3:] == [str(64 << 20), "20", "50000"]


def test_stdin_only_with_interactive(cocon_env: CoconEnv) -> None:
    assert cocon_env("run", "--rm", "-i", "busybox", "cat", input="piped in\n").stdout == "piped in\n"
    assert cocon_env("run", "--rm", "busybox", "cat", input="not passed\n").stdout == ""


def test_signals_are_forwarded(cocon_env: CoconEnv) -> None:
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.1; done"
    proc = subprocess.Popen([COCON, "run", "--rm", "busybox", "sh", "-c", script], env=cocon_env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 7, err
        assert out == b"got TERM\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_by_signal_exits_128_plus_n_and_rm_force(cocon_env: CoconEnv) -> None:
    proc = subprocess.Popen([COCON, "run", "--name", "victim", "busybox", "sleep", "60"], env=cocon_env.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            docs = json.loads(cocon_env("inspect", "victim", check=False).stdout or "[]")
            if docs and docs[0]["State"]["Running"]:
                break
            assert time.monotonic() < deadline, "the container did not start"
            time.sleep(0.05)
        assert "Up " in cocon_env("ps").stdout
        p = cocon_env("rm", "victim", check=False)
        assert p.returncode == 1 and "is running" in p.stderr
        os.kill(docs[0]["State"]["Pid"], signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGKILL
        assert json.loads(cocon_env("inspect", "victim").stdout)[0]["State"]["ExitCode"] == 137
        cocon_env("rm", "victim")
        # rm -f from another process stops a running container its supervisor waits for
        proc = subprocess.Popen([COCON, "run", "--rm", "--name", "second", "busybox", "sleep", "60"],
                                env=cocon_env.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        deadline = time.monotonic() + 20
        while "second" not in cocon_env("ps").stdout:
            assert time.monotonic() < deadline, "the container did not start"
            time.sleep(0.05)
        cocon_env("rm", "-f", "second")
        proc.communicate(timeout=30)
        assert proc.returncode == 137
        assert cocon_env("ps", "-aq").stdout == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_supervisor_killed_leaves_a_container_rm_can_clean(cocon_env: CoconEnv) -> None:
    proc = subprocess.Popen([COCON, "run", "--name", "orphan", "busybox", "sleep", "60"], env=cocon_env.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "orphan" not in cocon_env("ps").stdout:
            assert time.monotonic() < deadline, "the container did not start"
            time.sleep(0.05)
        proc.kill()  # the CLI dies; the container goes on (as with a killed `docker run` client)
        proc.wait()
        assert "Up " in cocon_env("ps").stdout
        cocon_env("rm", "-f", "orphan")
        assert cocon_env("ps", "-aq").stdout == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
