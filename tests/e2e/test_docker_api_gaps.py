"""Container and network routes of `cocon daemon` that docker-compose and docker-py use: attach with
logs=1 (the output so far, then live), PUT /archive with copyUIDGID=1, user networks as records
(create with NetworkingConfig, connect, disconnect, rm while in use), label filters, and older API
version prefixes."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Iterator

import docker
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))


from daemon_helpers import Daemon, docker_py_client, module_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(str(tmp_path_factory.mktemp("docker-api-gaps")))


@pytest.fixture
def client(daemon: Daemon) -> Iterator[docker.DockerClient]:
    def remove_networks(c: docker.DockerClient) -> None:
        for net in c.networks.list():
            if net.name not in ("bridge", "host", "none"):
                net.remove()

    with docker_py_client(daemon, then=remove_networks) as c:
        yield c


def wait_for_log(ct: docker.models.containers.Container, text: bytes, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in ct.logs(stdout=True, stderr=True):
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log of {ct.name}: {ct.logs()!r}")


def archive(members: list[tuple[str, bytes | None, dict[str, object]]]) -> bytes:
    """A tar: (name, data, or None for a directory, TarInfo attributes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data, attrs in members:
            info = tarfile.TarInfo(name)
            info.mtime = int(time.time())
            info.uid, info.gid = 1000, 1000  # what the archive says: copyUIDGID overrides it
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            else:
                info.size, info.mode = len(data), 0o644
            for key, value in attrs.items():
                setattr(info, key, value)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def put_archive(daemon: Daemon, cid: str, path: str, data: bytes, copy_uidgid: bool) -> tuple[int, str]:
    query = urllib.parse.urlencode({"path": path, **({"copyUIDGID": "1"} if copy_uidgid else {})})
    reply = daemon.request(
        "PUT", f"/v1.47/containers/{cid}/archive?{query}", data, {"Content-Type": "application/x-tar"}
    )
    return reply.status, reply.body.decode(errors="replace")


# --- attach with logs=1 ------------------------------------------------------------------------------


def test_attach_logs_replays_without_stream(client: docker.DockerClient) -> None:
    ct = client.containers.run("busybox", ["sh", "-c", "echo one; echo two >&2; sleep 60"], detach=True)
    wait_for_log(ct, b"two")
    assert ct.attach(stdout=True, stderr=True, logs=True, stream=False) == b"one\ntwo\n"
    assert ct.attach(stdout=True, stderr=False, logs=True, stream=False) == b"one\n"
    assert ct.attach(stdout=False, stderr=True, logs=True, stream=False) == b"two\n"
    # no logs and no stream: nothing (as dockerd), at once
    started = time.monotonic()
    assert ct.attach(stdout=True, stderr=True, logs=False, stream=False) == b""
    assert time.monotonic() - started < 5


def test_attach_logs_then_live_output(client: docker.DockerClient) -> None:
    script = "echo first; while [ ! -f /tmp/go ]; do sleep 0.05; done; echo second; sleep 60"
    ct = client.containers.run("busybox", ["sh", "-c", script], detach=True)
    wait_for_log(ct, b"first")
    out = ct.attach(stdout=True, stderr=True, logs=True, stream=True)
    try:
        assert next(out) == b"first\n"  # replayed
        assert ct.exec_run(["touch", "/tmp/go"]).exit_code == 0
        assert next(out) == b"second\n"  # live
    finally:
        out.close()


def test_attach_logs_replay_with_tty(client: docker.DockerClient) -> None:
    ct = client.containers.run("busybox", ["sh", "-c", "echo on-tty; sleep 60"], detach=True, tty=True)
    wait_for_log(ct, b"on-tty")
    assert ct.attach(stdout=True, stderr=True, logs=True, stream=False).replace(b"\r", b"") == b"on-tty\n"


def test_attach_logs_of_exited_container(client: docker.DockerClient) -> None:
    ct = client.containers.run("busybox", ["sh", "-c", "echo done-here"], detach=True)
    assert ct.wait(timeout=30)["StatusCode"] == 0
    assert ct.attach(stdout=True, stderr=True, logs=True, stream=False) == b"done-here\n"


# --- PUT /archive with copyUIDGID ------------------------------------------------------------------


def test_copy_uidgid_running_container(daemon: Daemon, client: docker.DockerClient) -> None:
    ct = client.containers.run("busybox", ["sleep", "60"], detach=True, user="nobody")
    data = archive([("d", None, {}), ("d/f.txt", b"owned\n", {}), ("d/l", None, {"type": tarfile.SYMTYPE,
                    "linkname": "/etc/passwd"}), ("top.txt", b"top\n", {})])  # fmt: skip
    assert put_archive(daemon, ct.id, "/tmp", data, copy_uidgid=True) == (200, "")
    res = ct.exec_run(["stat", "-c", "%u:%g %n", "/tmp/d", "/tmp/d/f.txt", "/tmp/top.txt", "/etc/passwd"])
    assert res.exit_code == 0, res.output
    assert res.output.decode().splitlines() == [
        "65534:65534 /tmp/d",
        "65534:65534 /tmp/d/f.txt",
        "65534:65534 /tmp/top.txt",
        "0:0 /etc/passwd",  # the symlink was not followed
    ]
    link = ct.exec_run(["stat", "-c", "%u:%g %N", "/tmp/d/l"]).output.decode()
    assert link.startswith("65534:65534 ") and "/etc/passwd" in link
    assert ct.exec_run(["cat", "/tmp/d/f.txt"]).output == b"owned\n"
    # without copyUIDGID the files belong to root, whatever the archive says
    assert put_archive(daemon, ct.id, "/tmp", archive([("plain.txt", b"x", {})]), False) == (200, "")
    assert ct.exec_run(["stat", "-c", "%u:%g", "/tmp/plain.txt"]).output == b"0:0\n"


def test_copy_uidgid_created_container_numeric_user(daemon: Daemon, client: docker.DockerClient) -> None:
    ct = client.containers.create("busybox", ["stat", "-c", "%u:%g", "/tmp/new.txt"], user="1234:5678")
    assert put_archive(daemon, ct.id, "/tmp", archive([("new.txt", b"n", {})]), True) == (200, "")
    ct.start()
    assert ct.wait(timeout=30)["StatusCode"] == 0
    assert ct.logs() == b"1234:5678\n"


def test_copy_uidgid_root_and_unknown_user(daemon: Daemon, client: docker.DockerClient) -> None:
    ct = client.containers.run("busybox", ["sleep", "60"], detach=True)  # no user: root
    assert put_archive(daemon, ct.id, "/tmp", archive([("r.txt", b"r", {})]), True) == (200, "")
    assert ct.exec_run(["stat", "-c", "%u:%g", "/tmp/r.txt"]).output == b"0:0\n"
    bad = client.containers.create("busybox", ["true"], user="no-such-user")
    status, body = put_archive(daemon, bad.id, "/tmp", archive([("u.txt", b"u", {})]), True)
    assert status == 400 and "no-such-user" in json.loads(body)["message"]
    status, body = put_archive(daemon, ct.id, "/no/such/dir", archive([("u.txt", b"u", {})]), True)
    assert status == 404, body


# --- user networks -------------------------------------------------------------------------------------


def test_user_network_endpoints(daemon: Daemon, client: docker.DockerClient) -> None:
    net = client.networks.create("gapnet", labels={"team": "a"})
    body = {
        "Image": "busybox", "Cmd": ["sleep", "60"], "Labels": {"app": "one"},
        "HostConfig": {"NetworkMode": "gapnet"},
        "NetworkingConfig": {"EndpointsConfig": {"gapnet": {"Aliases": ["svc"], "IPAMConfig": {}}}},
    }  # fmt: skip
    reply = daemon.request("POST", "/v1.38/containers/create?name=on-net", json.dumps(body),
                           {"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 201, reply.body
    assert reply.json()["Warnings"] == []
    ct = client.containers.get("on-net")
    ct.start()
    doc = daemon.request("GET", "/v1.38/containers/on-net/json").json()
    assert doc["HostConfig"]["NetworkMode"] == "gapnet"
    assert doc["Config"]["Labels"] == {"app": "one"}
    assert doc["NetworkSettings"]["Networks"]["gapnet"]["Aliases"] == ["svc", ct.id[:12]]
    net.reload()
    assert list(net.attrs["Containers"]) == [ct.id]
    # the container is on the network: lo and eth0 (with the address inspect shows)
    lines = ct.exec_run(["cat", "/proc/net/dev"]).output.decode().splitlines()[2:]
    assert sorted(line.split(":")[0].strip() for line in lines) == ["eth0", "lo"]
    ip = doc["NetworkSettings"]["Networks"]["gapnet"]["IPAddress"]
    assert ip.count(".") == 3
    assert ip in ct.exec_run(["ip", "-4", "-o", "addr", "show", "eth0"]).output.decode()
    # in use: rm refused; connect again refused; disconnect, then rm works
    with pytest.raises(docker.errors.APIError) as info:
        net.remove()
    assert info.value.status_code == 403 and "active endpoints" in str(info.value)
    with pytest.raises(docker.errors.APIError) as info:
        net.connect(ct)
    assert info.value.status_code == 409
    other = client.networks.create("gapnet2")
    other.connect(ct, aliases=["alt"])
    ct.reload()
    assert set(ct.attrs["NetworkSettings"]["Networks"]) == {"gapnet", "gapnet2"}
    assert [n.name for n in client.networks.list(filters={"dangling": True})] == []
    other.disconnect(ct)
    ct.reload()
    assert set(ct.attrs["NetworkSettings"]["Networks"]) == {"gapnet"}
    assert [n.name for n in client.networks.list(filters={"dangling": True})] == ["gapnet2"]
    ct.remove(force=True)
    net.reload()
    assert net.attrs["Containers"] == {}
    net.remove()
    other.remove()


def test_network_settings_that_need_networking_are_refused(
    daemon: Daemon, client: docker.DockerClient
) -> None:
    client.networks.create("strict")

    def create(body: dict[str, object]) -> tuple[int, str]:
        reply = daemon.request("POST", "/containers/create", json.dumps({"Image": "busybox", **body}),
                               {"Content-Type": "application/json"})  # fmt: skip
        return reply.status, reply.json().get("message", "") if reply.status != 201 else ""

    static = {"strict": {"IPAMConfig": {"IPv4Address": "10.9.0.5"}}}
    status, message = create({"HostConfig": {"NetworkMode": "strict"},
                              "NetworkingConfig": {"EndpointsConfig": static}})  # fmt: skip
    assert (
        status == 400 and "IPAMConfig" in message and "--subnet" in message
    )  # no subnet given: Docker's rule
    status, message = create({"HostConfig": {"NetworkMode": "no-such-net"}})
    assert status == 404 and "no-such-net" in message
    status, message = create({"HostConfig": {"NetworkMode": "none"},
                              "NetworkingConfig": {"EndpointsConfig": {"strict": {}}}})  # fmt: skip
    assert status == 400 and "network mode" in message
    status, message = create({"HostConfig": {"Links": ["x:y"]}})
    assert status == 400 and "links" in message
    status, message = create({"HostConfig": {"NetworkMode": "strict", "Links": ["no-such-ct:db"]}})
    assert status == 404
    assert client.containers.list(all=True) == []  # nothing half-made
    ct = client.containers.create("busybox", ["true"])
    reply = daemon.request("POST", "/networks/strict/connect", json.dumps(
        {"Container": ct.id, "EndpointConfig": {"IPAMConfig": {"IPv4Address": "10.9.0.6"}}}),
        {"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 400 and "user configured subnet" in reply.message
    reply = daemon.request("POST", "/networks/strict/disconnect", json.dumps({"Container": ct.id}),
                           {"Content-Type": "application/json"})  # fmt: skip
    assert reply.status == 404 and "not connected" in reply.message


def test_label_filters(client: docker.DockerClient) -> None:
    a = client.containers.create("busybox", ["true"], labels={"proj": "p1", "role": "web"})
    client.containers.create("busybox", ["true"], labels={"proj": "p2"})
    assert [c.id for c in client.containers.list(all=True, filters={"label": "proj=p1"})] == [a.id]
    assert len(client.containers.list(all=True, filters={"label": "proj"})) == 2
    assert client.containers.list(all=True, filters={"label": ["proj=p1", "role=db"]}) == []
    client.networks.create("lab1", labels={"proj": "p1"})
    client.networks.create("lab2", labels={"proj": "p2"})
    assert [n.name for n in client.networks.list(filters={"label": "proj=p1"})] == ["lab1"]
    v = client.volumes.create("vol-lab", labels={"proj": "p1"})
    try:
        assert [x.name for x in client.volumes.list(filters={"label": "proj=p1"})] == ["vol-lab"]
        assert client.volumes.list(filters={"label": "proj=p3"}) == []
    finally:
        v.remove()


def test_older_api_versions(daemon: Daemon) -> None:
    for version in ("1.24", "1.38", "1.40"):
        reply = daemon.request("GET", f"/v{version}/version")
        assert reply.status == 200 and reply.json()["MinAPIVersion"] == "1.24"
    reply = daemon.request("GET", "/v1.23/version")
    assert reply.status == 400 and "too old" in reply.message
