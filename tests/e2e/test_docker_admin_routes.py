"""Container administration routes (prune, changes, export, commit, update) through docker-py and the
docker CLI against a real `cocon daemon`."""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import mounts_under
from daemon_helpers import DOCKER, Daemon, docker_py_client, module_daemon
from daemon_helpers import docker as docker_cli


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(str(tmp_path_factory.mktemp("docker-admin")))


@pytest.fixture
def client(daemon: Daemon) -> Iterator[docker.DockerClient]:
    def remove_images(c: docker.DockerClient) -> None:
        for image in c.images.list():
            if not any(t.startswith("busybox") for t in image.tags):
                c.images.remove(image.id, force=True)

    with docker_py_client(daemon, then=remove_images) as c:
        yield c
    assert mounts_under(daemon.root + "/snapshots/overlayfs/active") == []


def _finished(client: docker.DockerClient, script: str, **kw: Any) -> Any:
    # no network: nothing mounted over /etc (hosts, resolv.conf), which the scripts change freely
    kw.setdefault("network_mode", "none")
    ct = client.containers.run("busybox", ["sh", "-c", script], detach=True, **kw)
    assert ct.wait(timeout=30)["StatusCode"] == 0, ct.logs()
    return ct


def _output(client: docker.DockerClient, image: str, cmd: list[str] | None = None) -> bytes:
    """What running `image` prints. Not `containers.run(remove=True)`: docker-py reads its log stream
    only after removing the container, and the daemon may lose the output then (its log reader opens
    the log file after answering the headers)."""
    ct = client.containers.run(image, cmd, detach=True)
    try:
        assert ct.wait(timeout=30)["StatusCode"] == 0
        data: bytes = ct.logs()
        return data
    finally:
        ct.remove(force=True)


def test_diff(client: docker.DockerClient, daemon: Daemon) -> None:
    ct = _finished(
        client, "echo new > /added; echo x >> /etc/passwd; rm /bin/ls; mkdir -p /tmp/d; touch /tmp/d/f"
    )
    changes = {(c["Path"], c["Kind"]) for c in ct.diff()}
    assert {("/added", 1), ("/etc", 0), ("/etc/passwd", 0), ("/bin", 0), ("/bin/ls", 2),
            ("/tmp", 0), ("/tmp/d", 1), ("/tmp/d/f", 1)} <= changes, changes  # fmt: skip
    paths = [c["Path"] for c in ct.diff()]
    assert paths == sorted(paths)
    out = docker_cli(daemon, "diff", ct.id).stdout.splitlines()
    assert "A /added" in out and "D /bin/ls" in out and "C /etc/passwd" in out, out
    # an opaque directory (rm -rf a directory of the image, then make it again) hides what was below
    ct2 = _finished(client, "rm -rf /etc && mkdir /etc && echo only > /etc/only")
    kinds = {c["Path"]: c["Kind"] for c in ct2.diff()}
    assert kinds["/etc"] == 0 and kinds["/etc/only"] == 1 and kinds.get("/etc/passwd") == 2, kinds
    with pytest.raises(docker.errors.NotFound):
        client.api.diff("no-such-container")


def test_export_stopped_and_running(client: docker.DockerClient, daemon: Daemon) -> None:
    ct = _finished(client, "echo exported > /proof")
    before = mounts_under(daemon.root)
    data = b"".join(ct.export())
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        names = {m.name.rstrip("/").removeprefix("./") for m in tf.getmembers()}
        member = tf.extractfile("proof") if "proof" in tf.getnames() else tf.extractfile("./proof")
        assert member is not None and member.read() == b"exported\n"
    assert {"bin/sh", "etc/passwd", "proof"} <= names
    assert mounts_under(daemon.root) == before  # the stopped container's root was unmounted again
    # the docker CLI: docker export | tar t
    out = subprocess.run(
        f"'{DOCKER}' export {ct.id} | tar t", shell=True, capture_output=True,
        env=dict(daemon.env, DOCKER_CONFIG=os.path.join(daemon.run, "docker-config")), timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    listed = {n.rstrip("/").removeprefix("./") for n in out.stdout.decode().split()}
    assert "proof" in listed and "bin/busybox" in listed
    running = client.containers.run("busybox", ["sh", "-c", "echo live > /live; sleep 60"], detach=True)
    try:
        deadline = time.monotonic() + 10
        while (
            "live" not in running.exec_run(["cat", "/live"]).output.decode() and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        with tarfile.open(fileobj=io.BytesIO(b"".join(running.export()))) as tf:
            assert any(n.rstrip("/").removeprefix("./") == "live" for n in tf.getnames())
        running.reload()
        assert running.status == "running"
    finally:
        running.remove(force=True)


def test_commit(client: docker.DockerClient, daemon: Daemon) -> None:
    ct = _finished(
        client, "echo committed > /data.txt; rm /bin/ls", environment=["FROM_CT=1"], labels={"a": "1"}
    )
    image = ct.commit(repository="committed", tag="v1", message="a comment", author="tester",
                      changes=["ENV EXTRA=2", "CMD [\"cat\", \"/data.txt\"]"])  # fmt: skip
    assert "committed:v1" in image.tags
    attrs = client.images.get("committed:v1").attrs
    cfg = attrs["Config"]
    assert "FROM_CT=1" in cfg["Env"] and "EXTRA=2" in cfg["Env"] and cfg["Cmd"] == ["cat", "/data.txt"]
    assert cfg["Labels"] == {"a": "1"} and attrs["Author"] == "tester" and attrs["Comment"] == "a comment"
    history = client.api.history("committed:v1")
    assert history[0]["Comment"] == "a comment"
    assert _output(client, "committed:v1") == b"committed\n"
    assert _output(client, "committed:v1", ["sh", "-c", "test -e /bin/ls || echo gone"]) == b"gone\n"
    # the docker CLI, with --change
    ct2 = _finished(client, "echo two > /two")
    docker_cli(daemon, "commit", "-c", "ENV CLI=yes", ct2.id, "cli-commit:latest")
    assert (
        docker_cli(daemon, "run", "--rm", "cli-commit", "sh", "-c", "cat /two; echo $CLI").stdout
        == "two\nyes\n"
    )
    bad = docker_cli(daemon, "commit", "-c", "RUN true", ct2.id, "bad:1", check=False)
    assert bad.returncode != 0 and "RUN" in bad.stderr


def _cgroup_file(cid: str, controller: str, name: str) -> str:
    found = glob.glob(f"/sys/fs/cgroup/{controller}/cocon/{cid}/{name}") + glob.glob(
        f"/sys/fs/cgroup/cocon/{cid}/{name}"
    )
    assert found, f"no {name} for container {cid[:12]}"
    with open(found[0]) as f:
        return f.read().strip()


def test_update(client: docker.DockerClient, daemon: Daemon) -> None:
    ct = client.containers.run("busybox", ["sleep", "60"], detach=True)
    ct.update(
        mem_limit="64m",
        cpu_shares=512,
        restart_policy={"Name": "on-failure", "MaximumRetryCount": 2},
    )
    assert int(_cgroup_file(ct.id, "memory", "memory.limit_in_bytes")) == 64 * 1024 * 1024
    assert _cgroup_file(ct.id, "cpu", "cpu.shares") == "512"
    ct.reload()
    host = ct.attrs["HostConfig"]
    assert host["Memory"] == 64 * 1024 * 1024 and host["CpuShares"] == 512
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    docker_cli(
        daemon,
        "update",
        "--cpus",
        "0.5",
        "--memory",
        "96m",
        "--memory-swap",
        "128m",
        "--pids-limit",
        "50",
        ct.id,
    )
    assert _cgroup_file(ct.id, "pids", "pids.max") == "50"
    assert _cgroup_file(ct.id, "cpu", "cpu.cfs_quota_us") == "50000"
    assert int(_cgroup_file(ct.id, "memory", "memory.limit_in_bytes")) == 96 * 1024 * 1024
    # the limits stay for the next start
    ct.stop(timeout=0)
    ct.start()
    assert int(_cgroup_file(ct.id, "memory", "memory.limit_in_bytes")) == 96 * 1024 * 1024
    # unsupported fields are refused with a message
    with pytest.raises(docker.errors.APIError) as info:
        ct.update(blkio_weight=300)
    assert info.value.status_code == 400 and "BlkioWeight" in str(info.value)
    with pytest.raises(docker.errors.APIError) as info:
        ct.update(mem_limit="1m")
    assert info.value.status_code == 400 and "6MB" in str(info.value)


def test_prune(client: docker.DockerClient, daemon: Daemon) -> None:
    keep_running = client.containers.run("busybox", ["sleep", "60"], detach=True)
    old = _finished(client, "true", labels={"group": "old"})
    other = _finished(client, "echo data > /f", labels={"group": "other"})
    result = client.containers.prune(filters={"label": ["group=old"]})
    assert result["ContainersDeleted"] == [old.id]
    ids = {c.id for c in client.containers.list(all=True)}
    assert old.id not in ids and other.id in ids and keep_running.id in ids
    result = client.containers.prune(filters={"until": str(int(time.time()) + 5)})
    assert result["ContainersDeleted"] == [other.id] and result["SpaceReclaimed"] > 0
    assert {c.id for c in client.containers.list(all=True)} == {keep_running.id}
    result = client.containers.prune()
    assert result["ContainersDeleted"] is None and result["SpaceReclaimed"] == 0
    out = docker_cli(daemon, "container", "prune", "-f").stdout
    assert "Total reclaimed space" in out
    with pytest.raises(docker.errors.APIError) as info:
        client.containers.prune(filters={"status": ["exited"]})
    assert info.value.status_code == 400
