"""docker-compose 1.29 (Debian's `docker-compose`, docker-py underneath, API version 1.38) against
`cocon daemon`: a project of two busybox services and a named volume brought up, listed, logged,
run once more and taken down. The project network is a real cocon network: one service reaches the
other by its service name."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


from daemon_helpers import Daemon, module_daemon

COMPOSE = shutil.which("docker-compose") or "/usr/bin/docker-compose"

COMPOSE_FILE = """\
version: "3.8"
services:
  web:
    image: busybox:latest
    command: ["sh", "-c", "i=0; while true; do i=$$((i+1)); echo web line $$i; echo $$i >> /data/count.txt; sleep 0.2; done"]
    volumes:
      - data:/data
  worker:
    image: busybox:latest
    command: ["sh", "-c", "echo worker says $$GREETING; while true; do sleep 1; done"]
    environment:
      GREETING: hello-from-worker
    labels:
      com.example.role: worker
volumes:
  data:
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    assert os.access(COMPOSE, os.X_OK), (
        f"docker-compose is needed at {COMPOSE} (apt-get install docker-compose)"
    )
    yield from module_daemon(str(tmp_path_factory.mktemp("docker-compose")))


class Project:
    """A compose project in its own directory, run against the daemon."""

    def __init__(self, daemon: Daemon, base: str, name: str) -> None:
        self.daemon = daemon
        self.name = name
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir)
        self.file = os.path.join(self.dir, "docker-compose.yml")
        with open(self.file, "w") as f:
            f.write(COMPOSE_FILE)
        self.env = dict(daemon.env, DOCKER_CONFIG=os.path.join(daemon.run, "docker-config"))
        self.env.pop("DOCKER_API_VERSION", None)
        self.env.pop("COMPOSE_API_VERSION", None)

    def argv(self, *args: str) -> list[str]:
        return [COMPOSE, "-p", self.name, "-f", self.file, *args]

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args), env=self.env, cwd=self.dir, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=timeout,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def api(self, path: str) -> Any:
        reply = self.daemon.request("GET", path)
        assert reply.status == 200, (path, reply.status, reply.body)
        return reply.json()

    def containers(self) -> list[dict[str, Any]]:
        label = json.dumps({"label": [f"com.docker.compose.project={self.name}"]})
        return list(self.api(f"/v1.47/containers/json?all=1&filters={urllib.parse.quote(label)}"))


@pytest.fixture
def project(daemon: Daemon, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[Project]:
    name = "cc" + re.sub(r"[^a-z0-9]", "", request.node.name.lower())[-20:]
    p = Project(daemon, str(tmp_path), name)
    try:
        yield p
    finally:
        p(
            "down", "-v", "--timeout", "1", check=False
        )  # also after a failure; the daemon fixture does the rest


def wait_until(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_up_ps_logs_down(project: Project) -> None:
    up = project("up", "-d")
    assert "Creating network" in up.stderr and f'Creating volume "{project.name}_data"' in up.stderr

    ps = project("ps").stdout
    rows = {line.split()[0]: line for line in ps.splitlines()[2:] if line.strip()}
    assert set(rows) == {f"{project.name}_web_1", f"{project.name}_worker_1"}, ps
    assert all(re.search(r"\sUp\s", row) for row in rows.values()), ps

    wait_until(lambda: "web line 3" in project("logs", "--no-color").stdout, "three web lines")
    logs = project("logs", "--no-color").stdout
    assert re.search(r"^web_1\s+\| web line 1$", logs, re.M), logs
    assert re.search(r"^worker_1\s+\| worker says hello-from-worker$", logs, re.M), logs
    web_only = project("logs", "--no-color", "web").stdout
    assert "web line 2" in web_only and "worker says" not in web_only

    # following with a tail: the last line, then new ones as they are written
    follow = subprocess.Popen(
        project.argv("logs", "--no-color", "-f", "--tail=1", "web"), env=project.env, cwd=project.dir,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert follow.stdout is not None
        numbers: list[int] = []
        deadline = time.monotonic() + 30
        while len(numbers) < 3 and time.monotonic() < deadline:
            line = follow.stdout.readline()
            if match := re.search(r"web line (\d+)$", line):
                numbers.append(int(match.group(1)))
        assert len(numbers) == 3 and numbers == sorted(numbers) and numbers[0] > 2, numbers
    finally:
        follow.terminate()
        follow.wait(10)

    # what compose made, as the daemon reports it
    worker = project.api(f"/v1.47/containers/{project.name}_worker_1/json")
    assert "GREETING=hello-from-worker" in worker["Config"]["Env"]
    labels = worker["Config"]["Labels"]
    assert labels["com.example.role"] == "worker"
    assert labels["com.docker.compose.project"] == project.name
    assert labels["com.docker.compose.service"] == "worker"
    assert worker["HostConfig"]["NetworkMode"] == f"{project.name}_default"
    assert "worker" in worker["NetworkSettings"]["Networks"][f"{project.name}_default"]["Aliases"]
    net = project.api(f"/v1.47/networks/{project.name}_default")
    assert net["Labels"]["com.docker.compose.project"] == project.name
    assert sorted(c["Name"] for c in net["Containers"].values()) == [
        f"{project.name}_web_1", f"{project.name}_worker_1",
    ]  # fmt: skip
    addresses = [c["IPv4Address"] for c in net["Containers"].values()]
    assert all(a.count(".") == 3 and "/" in a for a in addresses), net
    ping = project("exec", "-T", "worker", "ping", "-c1", "-W2", "web")  # by service name (the DNS)
    assert "1 packets received" in ping.stdout, ping.stdout
    volume = project.api(f"/v1.47/volumes/{project.name}_data")
    assert volume["Labels"]["com.docker.compose.project"] == project.name
    assert volume["Labels"]["com.docker.compose.volume"] == "data"
    count = os.path.join(volume["Mountpoint"], "count.txt")
    with open(count) as f:
        assert f.read().splitlines()[:3] == ["1", "2", "3"]

    down = project("down", "-v", "--timeout", "1")
    assert f"Removing network {project.name}_default" in down.stderr
    assert f"Removing volume {project.name}_data" in down.stderr
    assert project.containers() == []
    assert [n["Name"] for n in project.api("/v1.47/networks")] == ["bridge", "host", "none"]
    assert project.api("/v1.47/volumes")["Volumes"] == []
    assert not os.path.exists(count)


def test_up_twice_and_run(project: Project) -> None:
    project("up", "-d")
    first = {c["Names"][0]: c["Id"] for c in project.containers()}
    again = project("up", "-d")
    assert f"{project.name}_web_1 is up-to-date" in again.stderr, again.stderr
    assert f"{project.name}_worker_1 is up-to-date" in again.stderr, again.stderr
    assert {c["Names"][0]: c["Id"] for c in project.containers()} == first  # nothing recreated

    run = project("run", "--rm", "web", "echo", "hi")
    assert run.stdout.splitlines() == ["hi"], (run.stdout, run.stderr)
    assert {c["Names"][0]: c["Id"] for c in project.containers()} == first  # the one-off is gone
    run = project("run", "--rm", "-e", "X=from-run", "worker", "sh", "-c", "echo $X $GREETING")
    assert "from-run hello-from-worker" in run.stdout

    project("down", "-v", "--timeout", "1")
    assert project.containers() == []


def test_pinned_old_api_version(project: Project) -> None:
    project.env["COMPOSE_API_VERSION"] = "1.38"  # every request under /v1.38, answered as 1.41
    project("up", "-d")
    ps = project("ps").stdout
    assert len([line for line in ps.splitlines()[2:] if re.search(r"\sUp\s", line)]) == 2, ps
    worker = project.api(f"/v1.38/containers/{project.name}_worker_1/json")
    aliases = worker["NetworkSettings"]["Networks"][f"{project.name}_default"]["Aliases"]
    assert aliases == ["worker", worker["Id"][:12]]  # created so: compose did not reconnect it
    project("down", "-v", "--timeout", "1")
    assert project.containers() == []
