"""The real docker CLI against `cocon daemon`'s container routes: run (attached, -i, -d), ps, logs,
exec, stop, inspect, cp, rm, and a detached container that outlives the daemon (live restore)."""

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

from cli_helpers import COCON
from daemon_helpers import (
    DOCKER,
    Daemon,
    cleanup,
    conmons_of,
    docker,
    module_daemon,
    remove_all,
    start_daemon,
    stop_and_clean,
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    assert os.access(DOCKER, os.X_OK), f"the docker CLI is needed at {DOCKER}"
    yield from module_daemon(str(tmp_path_factory.mktemp("docker-cli-containers")))


def test_run_attached_exit_code_and_streams(daemon: Daemon) -> None:
    out = docker(daemon, "run", "--rm", "busybox", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert out.returncode == 3
    assert out.stdout == "out\n"
    assert out.stderr.splitlines()[-1] == "err"
    assert "network mode" not in out.stderr  # the default bridge: no warning any more
    assert docker(daemon, "ps", "-aq").stdout.split() == []  # --rm removed it


def test_run_with_stdin(daemon: Daemon) -> None:
    out = docker(daemon, "run", "--rm", "-i", "busybox", "cat", input=b"hi\nthere\n")
    assert out.stdout == "hi\nthere\n"


def test_refused_options(daemon: Daemon) -> None:
    out = docker(daemon, "run", "--rm", "--isolation", "jail", "busybox", "true", check=False)
    assert out.returncode == 125 and "unknown isolation 'jail'" in out.stderr
    out = docker(daemon, "run", "--rm", "--privileged", "busybox", "true", check=False)
    assert out.returncode == 125 and "Privileged" in out.stderr


def test_detached_lifecycle(daemon: Daemon, tmp_path: Any) -> None:
    cid = docker(daemon, "run", "-d", "--name", "cli-x", "busybox", "sh", "-c", "echo started; sleep 60")
    cid_text = cid.stdout.strip()
    try:
        assert len(cid_text) == 64
        ps = docker(daemon, "ps", "--format", "{{.Names}} {{.Status}}").stdout.splitlines()
        assert any(line.startswith("cli-x Up") for line in ps), ps
        deadline = time.monotonic() + 10
        while "started" not in docker(daemon, "logs", "cli-x").stdout and time.monotonic() < deadline:
            time.sleep(0.05)
        assert docker(daemon, "logs", "cli-x").stdout == "started\n"
        assert docker(daemon, "exec", "cli-x", "echo", "hi").stdout == "hi\n"
        assert docker(daemon, "exec", "-i", "cli-x", "cat", input=b"from stdin\n").stdout == "from stdin\n"
        assert docker(daemon, "exec", "cli-x", "sh", "-c", "exit 4", check=False).returncode == 4
        src = tmp_path / "in.txt"
        src.write_text("copied in\n")
        docker(daemon, "cp", str(src), "cli-x:/tmp/in.txt")
        assert docker(daemon, "exec", "cli-x", "cat", "/tmp/in.txt").stdout == "copied in\n"
        docker(daemon, "cp", "cli-x:/tmp/in.txt", str(tmp_path / "back.txt"))
        assert (tmp_path / "back.txt").read_text() == "copied in\n"
        doc = json.loads(docker(daemon, "inspect", "cli-x").stdout)[0]
        assert doc["Id"] == cid_text and doc["Name"] == "/cli-x" and doc["State"]["Running"] is True
        assert doc["State"]["Pid"] > 0 and doc["Config"]["Image"] == "busybox"
        started = time.monotonic()
        docker(daemon, "stop", "-t", "1", "cli-x")
        assert time.monotonic() - started < 5
        doc = json.loads(docker(daemon, "inspect", "cli-x").stdout)[0]
        assert doc["State"]["Status"] == "exited" and doc["State"]["ExitCode"] == 137  # sh ignores TERM
        assert "cli-x" in docker(daemon, "ps", "-a", "--filter", "status=exited").stdout
        assert "cli-x" not in docker(daemon, "ps").stdout
    finally:
        docker(daemon, "rm", "-f", "cli-x", check=False)
    assert "cli-x" not in docker(daemon, "ps", "-a").stdout
    assert conmons_of(daemon.run) == []


def test_detached_container_survives_the_daemon(tmp_path: Any) -> None:
    d = start_daemon(str(tmp_path))
    d2: Daemon | None = None
    try:
        docker(d, "run", "-d", "--name", "survivor", "busybox", "sleep", "60")
        assert d.stop() == 0
        assert len(conmons_of(d.run)) == 1  # conmon kept the container running
        d2 = start_daemon(str(tmp_path), root=d.root, run=d.run)
        ps = docker(d2, "ps", "--format", "{{.Names}} {{.State}}").stdout.split("\n")
        assert "survivor running" in ps
        docker(d2, "rm", "-f", "survivor")
        assert conmons_of(d2.run) == []
    finally:
        if d2 is not None:
            stop_and_clean(d2)
        else:  # no daemon: the CLI's in-process engine removes it
            subprocess.run([COCON, "rm", "-f", "survivor"], env=d.env, capture_output=True, timeout=60)
            remove_all(d)
            cleanup(d)


def test_logs_follow_attach_and_tty(daemon: Daemon) -> None:
    docker(
        daemon,
        "run",
        "-d",
        "--name",
        "cli-f",
        "busybox",
        "sh",
        "-c",
        "for i in 1 2 3; do echo $i; sleep 0.2; done",
    )
    try:
        assert docker(daemon, "logs", "-f", "cli-f").stdout == "1\n2\n3\n"  # ends when the container does
        assert docker(daemon, "wait", "cli-f").stdout.strip() == "0"
        assert docker(daemon, "logs", "--tail", "1", "cli-f").stdout == "3\n"
    finally:
        docker(daemon, "rm", "-f", "cli-f", check=False)
    docker(daemon, "run", "-d", "--name", "cli-a", "busybox", "sh", "-c", "sleep 0.5; echo late; exit 7")
    try:
        out = docker(daemon, "attach", "--no-stdin", "cli-a", check=False)
        assert out.stdout == "late\n" and out.returncode == 7
    finally:
        docker(daemon, "rm", "-f", "cli-a", check=False)
    out = docker(
        daemon, "run", "--rm", "-t", "busybox", "sh", "-c", "test -t 1 && echo tty; exit 2", check=False
    )
    assert out.returncode == 2 and out.stdout == "tty\r\n"  # the terminal's line discipline: raw stream


def test_restart_policy_runs_in_the_daemon(daemon: Daemon) -> None:
    docker(
        daemon, "run", "-d", "--name", "cli-r", "--restart", "on-failure:2", "busybox", "sh", "-c", "exit 1"
    )
    try:
        deadline = time.monotonic() + 20
        actions: list[str] = []
        while time.monotonic() < deadline:
            events = docker(daemon, "events", "--since", "0", "--until", "0s", "--filter", "container=cli-r")
            actions = [line.split()[2] for line in events.stdout.splitlines()]
            if actions.count("die") == 3:
                break
            time.sleep(0.1)
        assert actions == ["create"] + ["start", "die"] * 3, actions  # the monitor restarted it twice
        doc = json.loads(docker(daemon, "inspect", "cli-r").stdout)[0]
        assert doc["RestartCount"] == 2 and doc["State"]["ExitCode"] == 1, doc["State"]
        time.sleep(0.5)
        assert json.loads(docker(daemon, "inspect", "cli-r").stdout)[0]["State"]["Status"] == "exited"
    finally:
        docker(daemon, "rm", "-f", "cli-r", check=False)
