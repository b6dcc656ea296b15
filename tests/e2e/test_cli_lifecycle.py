"""Detached containers through the real `cocon` command (each command a fresh process: the engine
that started a container is always gone when the next command looks at it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON, CoconEnv, cocon_env_fixture


def conmons(run: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and argv[0].endswith(b"conmon") and any(run.encode() in a for a in argv):
            out.append(int(name))
    return out


@pytest.fixture
def cocon_env(tmp_path: Any) -> Iterator[CoconEnv]:
    gen = cocon_env_fixture(tmp_path)
    env = next(gen)
    try:
        yield env
        ids = env("ps", "-aq", "--no-trunc").stdout.split()
        if ids:
            env("rm", "-f", *ids)
        env.stop_daemon()  # with its pre-started runtime: what remains is a leak
        deadline = time.monotonic() + 10
        while conmons(env.run) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conmons(env.run) == [], "conmon left running"
        logs = os.path.join(env.root, "containers")
        assert not os.path.isdir(logs) or os.listdir(logs) == [], "logs left behind"
    finally:
        for pid in conmons(env.run):
            os.kill(pid, 9)
        try:
            next(gen)
        except StopIteration:
            pass


def ps(env: CoconEnv, *args: str) -> dict[str, dict[str, Any]]:
    lines = env("ps", "-a", "--format", "json", *args).stdout.splitlines()
    return {c["Names"]: c for c in map(json.loads, lines)}


def test_run_detached_logs_stop_start(cocon_env: CoconEnv) -> None:
    env = cocon_env
    t = time.monotonic()
    out = env("run", "-d", "--name", "web", "busybox", "sh", "-c",
              "trap 'echo bye; exit 0' TERM; echo hello; echo oops >&2; while true; do sleep 0.05; done")  # fmt: skip
    assert time.monotonic() - t < 5
    cid = out.stdout.strip()
    assert len(cid) == 64
    time.sleep(0.3)
    assert ps(env)["web"]["State"] == "running"
    logs = env("logs", "web")
    assert logs.stdout == "hello\n" and logs.stderr == "oops\n"
    stamped = env("logs", "-t", "--tail", "2", "web").stdout  # the last line is on stderr
    assert stamped.endswith(" hello\n") and stamped[:4].isdigit() and "T" in stamped.split()[0]
    assert env("logs", "--since", "1h", "web").stdout == "hello\n"
    assert env("logs", "--since", str(time.time() + 60), "web").stdout == ""
    env("stop", "web")
    c = ps(env)["web"]
    assert c["State"] == "exited" and c["Status"].startswith("Exited (0)")
    assert "bye\n" in env("logs", "web").stdout
    env("start", "web")
    assert ps(env)["web"]["State"] == "running"
    env("restart", "-t", "1", "web")
    assert ps(env)["web"]["State"] == "running"
    assert env("logs", "web").stdout.count("hello\n") == 3
    env("kill", "-s", "USR1", "web")  # PID 1 without a handler for it: nothing happens
    time.sleep(0.2)
    assert ps(env)["web"]["State"] == "running"
    env("kill", "web")
    assert env("wait", "web").stdout.strip() == "137"
    inspect = json.loads(env("inspect", "web").stdout)[0]
    assert inspect["State"]["Status"] == "exited" and inspect["State"]["ExitCode"] == 137


def test_logs_follow(cocon_env: CoconEnv) -> None:
    env = cocon_env
    env("run", "-d", "--name", "counter", "busybox", "sh", "-c",
        "for i in 1 2 3 4 5; do echo n$i; sleep 0.2; done")  # fmt: skip
    proc = subprocess.run([COCON, "logs", "-f", "counter"], env=env.env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.stdout.split() == ["n1", "n2", "n3", "n4", "n5"]
    assert env("wait", "counter").stdout.strip() == "0"


def test_create_start_attach_wait_rm(cocon_env: CoconEnv) -> None:
    env = cocon_env
    cid = env("create", "--name", "later", "busybox", "sh", "-c", "echo from-start; exit 3").stdout.strip()
    assert ps(env)["later"]["State"] == "created"
    started = env("start", "-a", "later", check=False)
    assert started.returncode == 3 and started.stdout == "from-start\n"
    assert env("wait", cid[:12]).stdout.strip() == "3"
    env("rm", "later")
    assert "later" not in ps(env)


def test_exec(cocon_env: CoconEnv) -> None:
    env = cocon_env
    env("run", "-d", "--name", "box", "busybox", "sleep", "1000")
    out = env("exec", "-u", "nobody", "-w", "/tmp", "-e", "A=b", "box", "sh", "-c", "id -u; pwd; echo $A")
    assert out.stdout.split() == ["65534", "/tmp", "b"]
    assert env("exec", "box", "sh", "-c", "exit 7", check=False).returncode == 7
    assert env("exec", "-i", "box", "cat", input="piped\n").stdout == "piped\n"
    env("stop", "-t", "0", "box")
    assert env("exec", "box", "true", check=False).returncode == 1


def test_live_restore_and_exit_meanwhile(cocon_env: CoconEnv) -> None:
    env = cocon_env
    env("run", "-d", "--name", "stays", "busybox", "sleep", "1000")
    env("run", "-d", "--name", "ends", "busybox", "sh", "-c", "sleep 0.3; exit 4")
    time.sleep(1.0)
    c = ps(env)
    assert c["stays"]["State"] == "running" and c["ends"]["State"] == "exited"
    assert c["ends"]["Status"].startswith("Exited (4)")
    assert [n for n in ps(env, "--filter", "status=running")] == ["stays"]
    assert [n for n in ps(env, "--filter", "exited=4")] == ["ends"]
    assert sorted(ps(env, "--filter", "name=s")) == ["ends", "stays"]


def test_restart_policy_without_daemon(cocon_env: CoconEnv) -> None:
    env = cocon_env
    env(
        "run", "-d", "--name", "flaky", "--restart", "on-failure:2", "busybox", "sh", "-c", "echo try; exit 1"
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if env("logs", "flaky").stdout.count("try") == 3 and ps(env)["flaky"]["State"] == "exited":
            break
        time.sleep(0.1)
    time.sleep(0.5)
    assert env("logs", "flaky").stdout.count("try") == 3
    assert json.loads(env("inspect", "flaky").stdout)[0]["State"]["ExitCode"] == 1
    bad = env("run", "-d", "--restart", "sometimes", "busybox", "true", check=False)
    assert bad.returncode == 125 and "restart" in bad.stderr


def test_pause_rename_top_stats_cp(cocon_env: CoconEnv, tmp_path: Any) -> None:
    env = cocon_env
    env("run", "-d", "--name", "busy", "busybox", "sh", "-c", "echo inside > /srv.txt; sleep 1000")
    time.sleep(0.3)
    top = env("top", "busy").stdout
    assert "sleep 1000" in top and "PID" in top.splitlines()[0]
    stats = json.loads(env("stats", "--no-stream", "--format", "json", "busy").stdout)
    assert stats["Name"] == "busy" and stats["PIDs"] == "1"  # sh execs its last command
    env("pause", "busy")
    assert ps(env)["busy"]["State"] == "paused"
    env("unpause", "busy")
    assert ps(env)["busy"]["State"] == "running"
    env("rename", "busy", "calm")
    assert "calm" in ps(env) and "busy" not in ps(env)
    env("cp", "calm:/srv.txt", str(tmp_path / "out.txt"))
    assert (tmp_path / "out.txt").read_text() == "inside\n"
    (tmp_path / "in.txt").write_text("from host\n")
    env("exec", "calm", "ln", "-s", "/", "/tmp/up")
    env("cp", str(tmp_path / "in.txt"), "calm:/tmp/up/etc/")  # the symlink resolves inside the container
    assert not os.path.exists("/etc/in.txt")
    assert env("exec", "calm", "cat", "/etc/in.txt").stdout == "from host\n"
    assert env("port", "calm").stdout == ""


def test_attach_with_a_terminal_and_detach_keys(cocon_env: CoconEnv) -> None:
    import pty
    import select

    env = cocon_env
    env("run", "-dit", "--name", "shell", "busybox", "sh")
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(COCON, [COCON, "attach", "shell"], env.env)
    try:
        time.sleep(0.8)
        os.write(fd, b"echo attached-$((1+2))\n")
        out = b""
        deadline = time.monotonic() + 10
        while b"attached-3\r\n" not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                out += os.read(fd, 4096)
        assert b"attached-3\r\n" in out
        os.write(fd, b"\x10\x11")  # Ctrl-P Ctrl-Q: detach, the container goes on
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)
    assert ps(env)["shell"]["State"] == "running"
