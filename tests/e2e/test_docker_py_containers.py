"""docker-py (the Docker SDK for Python) against `cocon daemon`'s container routes."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections.abc import Iterator

import docker
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


from daemon_helpers import Daemon, docker_py_client, module_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(str(tmp_path_factory.mktemp("docker-py-containers")))


@pytest.fixture
def client(daemon: Daemon) -> Iterator[docker.DockerClient]:
    with docker_py_client(daemon) as c:
        yield c


def test_run_attached(client: docker.DockerClient) -> None:
    out = client.containers.run(
        "busybox", ["sh", "-c", "echo hello; echo oops >&2"], remove=True, stderr=True
    )
    assert out == b"hello\noops\n"
    with pytest.raises(docker.errors.ContainerError) as info:
        client.containers.run("busybox", ["sh", "-c", "exit 5"], remove=True)
    assert info.value.exit_status == 5


def test_detached_container(client: docker.DockerClient) -> None:
    ct = client.containers.run("busybox", ["sh", "-c", "echo one; sleep 60"], detach=True, name="py-x")
    assert ct.name == "py-x"
    ct.reload()
    assert ct.status == "running"
    stream = ct.logs(stream=True)
    assert next(stream) == b"one\n"
    result = ct.exec_run(["sh", "-c", "echo in-exec; exit 2"])
    assert result.exit_code == 2 and result.output == b"in-exec\n"
    top = ct.top()
    assert any("sleep" in " ".join(p) for p in top["Processes"])
    stats = ct.stats(stream=False)
    assert stats["pids_stats"]["current"] >= 1 and "memory_stats" in stats and "cpu_stats" in stats
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = b"put by docker-py\n"
        info = tarfile.TarInfo("put.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    assert ct.put_archive("/tmp", buf.getvalue()) is True
    chunks, stat = ct.get_archive("/tmp/put.txt")
    assert stat["name"] == "put.txt" and stat["size"] == len(data)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        member = tf.extractfile("put.txt")
        assert member is not None and member.read() == data
    ct.stop(timeout=1)
    assert ct.wait()["StatusCode"] == 137
    ct.remove()
    assert client.containers.list(all=True) == []
