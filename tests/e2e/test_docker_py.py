"""docker-py (the Docker SDK for Python) against `cocon daemon`: the same operations as the docker CLI
tests, through the SDK's own API client over the Unix socket."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

import docker
import docker.errors

from daemon_helpers import Daemon, cleanup, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(str(tmp_path_factory.mktemp("docker-py")))
    try:
        yield d
    finally:
        code = d.stop()
        log = d.log()
        cleanup(d)
        assert code == 0 and "Traceback" not in log, log


@pytest.fixture
def client(daemon: Daemon) -> Iterator[docker.DockerClient]:
    c = docker.DockerClient(base_url=f"unix://{daemon.sock}", version="auto", timeout=120)
    try:
        yield c
    finally:
        c.close()


def test_version_info_ping(client: docker.DockerClient) -> None:
    assert client.ping() is True
    assert client.api.api_version == "1.47"  # negotiated ("auto") from the daemon's /version
    version = client.version()
    assert version["ApiVersion"] == "1.47" and version["Components"][0]["Name"] == "Engine"
    info = client.info()
    assert info["Driver"] == "overlay2" and info["Cocon"]["Isolation"]["container"] == "available"
    df = client.df()
    assert df["LayersSize"] > 0 and {"Images", "Volumes", "Containers", "BuildCache"} <= set(df)


def test_images(client: docker.DockerClient) -> None:
    image = client.images.get("busybox")
    assert image.tags == ["busybox:latest"] and image.short_id.startswith("sha256:")
    assert any("busybox:latest" in i.tags for i in client.images.list())
    assert image.tag("pysdk/tagged", "1") is True
    assert sorted(client.images.get("pysdk/tagged:1").tags) == ["busybox:latest", "pysdk/tagged:1"]
    assert [i.id for i in client.images.list(name="pysdk/tagged")] == [image.id]
    assert client.images.list(name="pysdk/nothing") == []
    history = image.history()
    assert history[0]["Id"] == image.id and "bootstrap busybox" in history[0]["CreatedBy"]
    with pytest.raises(docker.errors.APIError) as err:
        client.images.remove(image.id)  # two names: refused without force, as Docker
    assert err.value.status_code == 409
    client.images.remove("pysdk/tagged:1")
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get("pysdk/tagged:1")
    assert client.images.get("busybox").tags == ["busybox:latest"]


def test_save_and_load(client: docker.DockerClient, daemon: Daemon) -> None:
    client.images.get("busybox").tag("pysdk/saved", "2")
    data = b"".join(client.images.get("pysdk/saved:2").save(named="pysdk/saved:2"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert "manifest.json" in tf.getnames()
    client.images.remove("pysdk/saved:2")
    loaded = client.images.load(data)
    assert "pysdk/saved:2" in [t for i in loaded for t in i.tags]
    client.images.remove("pysdk/saved:2")
    with pytest.raises(docker.errors.APIError) as err:
        client.images.load(b"definitely not an archive" * 100)
    assert err.value.status_code == 400


def test_build(client: docker.DockerClient, tmp_path: Any) -> None:
    (tmp_path / "Dockerfile").write_text(
        'FROM busybox\nARG NAME=x\nCOPY data.txt /data.txt\nRUN echo "name=$NAME" && wc -c /data.txt\nCMD ["sh"]\n'
    )
    (tmp_path / "data.txt").write_text("twelve bytes")
    image, logs = client.images.build(
        path=str(tmp_path),
        tag="pysdk/built:1",
        buildargs={"NAME": "sdk"},
        labels={"via": "docker-py"},
        rm=True,
    )
    text = "".join(chunk.get("stream", "") for chunk in logs)
    assert "name=sdk" in text and "12 /data.txt" in text
    assert image.tags == ["pysdk/built:1"] and image.labels == {"via": "docker-py"}
    (tmp_path / "Dockerfile").write_text("FROM busybox\nRUN echo broken && false\n")
    with pytest.raises(docker.errors.BuildError) as err:
        client.images.build(path=str(tmp_path), tag="pysdk/broken:1")
    assert "status 1" in str(err.value)
    client.images.remove("pysdk/built:1")


def test_volumes_networks_events(client: docker.DockerClient) -> None:
    since = time.time()
    vol = client.volumes.create("pysdkvol", labels={"k": "v"})
    assert vol.name == "pysdkvol" and vol.attrs["Labels"] == {"k": "v"}
    assert "pysdkvol" in [v.name for v in client.volumes.list()]
    assert [v.name for v in client.volumes.list(filters={"label": "k=v"})] == ["pysdkvol"]
    assert client.volumes.get("pysdkvol").attrs["Driver"] == "local"
    with pytest.raises(docker.errors.APIError) as err:
        client.volumes.create("badvol", driver_opts={"type": "nfs"})
    assert err.value.status_code == 400 and "not supported" in str(err.value)
    vol.remove()
    with pytest.raises(docker.errors.NotFound):
        client.volumes.get("pysdkvol")
    names = sorted(n.name for n in client.networks.list())
    assert names == ["bridge", "host", "none"]
    assert client.networks.get("host").attrs["Driver"] == "host"
    events = list(
        client.events(since=since, until=time.time() + 0.5, decode=True, filters={"type": "volume"})
    )
    assert [(e["Action"], e["Actor"]["ID"]) for e in events] == [
        ("create", "pysdkvol"),
        ("destroy", "pysdkvol"),
    ]
