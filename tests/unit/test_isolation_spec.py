"""Docker's merge of image config and run flags, user lookup inside the rootfs, and the runtime config."""

from __future__ import annotations

import os

import pytest

from cocon.isolation.spec import (
    ContainerRequest,
    ProcessRequest,
    SpecError,
    container_spec,
    merge_env,
    process_from_image,
    resolve_user,
)
from cocon.oci.image_spec import ContainerConfig
from cocon.oci.runtime_spec import validate_config


@pytest.fixture
def rootfs(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001:app:/home/app:/bin/sh\n")
    (etc / "group").write_text("root:x:0:\napp:x:1001:\nwheel:x:10:app\n")
    return str(tmp_path)


def test_entrypoint_cmd_merge_as_docker():
    image = ContainerConfig(entrypoint=["/entry"], cmd=["a"], env=["A=1", "PATH=/bin"], working_dir="/w")
    assert process_from_image(image, ProcessRequest()).args == ["/entry", "a"]
    assert process_from_image(image, ProcessRequest(command=["b"])).args == ["/entry", "b"]
    assert process_from_image(image, ProcessRequest(entrypoint=["/x"])).args == ["/x"]
    assert process_from_image(image, ProcessRequest(entrypoint=[], command=["sh"])).args == ["sh"]
    p = process_from_image(image, ProcessRequest(env=["A=2", "B=3"], workdir="/tmp", user="app"))
    assert p.env == ["A=2", "PATH=/bin", "B=3"] and p.cwd == "/tmp" and p.user == "app"
    with pytest.raises(SpecError, match="no command"):
        process_from_image(ContainerConfig(), ProcessRequest())
    with pytest.raises(SpecError, match="absolute"):
        process_from_image(image, ProcessRequest(workdir="rel"))


def test_merge_env_rejects_empty_key():
    assert merge_env(["A=1"], ["A"]) == ["A"]
    with pytest.raises(SpecError, match="KEY=VALUE"):
        merge_env([], ["=x"])


def test_resolve_user(rootfs):
    assert resolve_user(rootfs, "") == (0, 0, [], "/root")
    assert resolve_user(rootfs, "app") == (1000, 1001, [10], "/home/app")
    assert resolve_user(rootfs, "1000:wheel") == (1000, 10, [], "/home/app")
    assert resolve_user(rootfs, "4242:4243") == (4242, 4243, [], "/")
    with pytest.raises(SpecError, match="unable to find user nobody"):
        resolve_user(rootfs, "nobody")
    with pytest.raises(SpecError, match="unable to find group staff"):
        resolve_user(rootfs, "app:staff")


def test_user_lookup_does_not_leave_the_rootfs(tmp_path):
    (tmp_path / "etc").mkdir()
    os.symlink("/etc/passwd", tmp_path / "etc" / "passwd")  # inside the root this is itself: a loop
    os.symlink("../../../../../etc/group", tmp_path / "etc" / "group")
    with pytest.raises(SpecError, match="unable to find user root"):
        resolve_user(str(tmp_path), "root")


def test_container_spec_has_docker_defaults(rootfs):
    proc = process_from_image(ContainerConfig(cmd=["sh"]), ProcessRequest(user="app"))
    spec = container_spec(
        rootfs,
        proc,
        ContainerRequest(
            hostname="h1", memory=64 << 20, cpus=0.5, pids_limit=10, cap_add=["NET_ADMIN"], cap_drop=["chown"]
        ),
    )
    validate_config(spec)
    assert spec.process is not None and spec.linux is not None
    caps = spec.process.capabilities
    assert caps is not None and "CAP_NET_ADMIN" in caps.bounding and "CAP_CHOWN" not in caps.bounding
    assert "CAP_SYS_ADMIN" not in caps.bounding
    assert spec.process.no_new_privileges
    assert spec.process.user.uid == 1000 and spec.process.user.additional_gids == [10]
    assert "HOME=/home/app" in spec.process.env and "HOSTNAME=h1" in spec.process.env
    assert spec.linux.seccomp is not None and spec.linux.masked_paths
    r = spec.linux.resources
    assert r and r.memory and r.memory.limit == 64 << 20 and r.cpu and r.cpu.quota == 50_000
    assert r.pids and r.pids.limit == 10
    assert {n.type for n in spec.linux.namespaces or []} >= {"pid", "network", "mount", "ipc", "uts"}
    unconfined = container_spec(rootfs, proc, ContainerRequest(seccomp="unconfined", network="host"))
    assert unconfined.linux and unconfined.linux.seccomp is None
    assert "network" not in {n.type for n in unconfined.linux.namespaces or []}
    with pytest.raises(SpecError, match="unknown capability"):
        container_spec(rootfs, proc, ContainerRequest(cap_add=["FLY"]))
    with pytest.raises(SpecError, match="seccomp=/nonexistent"):
        container_spec(rootfs, proc, ContainerRequest(seccomp="/nonexistent"))


def test_requests_have_fresh_defaults_equality_and_repr():
    a, b = ProcessRequest(), ProcessRequest()
    a.env.append("X=1")
    assert b.env == [] and a != b and ProcessRequest(env=["X=1"]) == a
    assert repr(a) == "ProcessRequest(command=None, entrypoint=None, env=['X=1'], workdir=None, user=None)"
    c, d = ContainerRequest(), ContainerRequest()
    c.mounts.append(None)  # type: ignore[arg-type]
    assert d.mounts == [] and d.cap_add == [] and d.sysctl == {} and c != d
    assert ContainerRequest(hostname="h", memory=1) == ContainerRequest(hostname="h", memory=1)
    assert repr(d).startswith("ContainerRequest(hostname='cocon', terminal=False, read_only=False, mounts=[]")
