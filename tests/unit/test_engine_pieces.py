"""Pieces of the engine that need no container: fast image lookups (checked against the image store),
instance records, the lean snapshot format (checked against the snapshotter), runtime config templates."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from cocon.engine import lookup, rootfs
from cocon.engine.containers import _tmpfs_options, effective_args, human_duration, validate_name
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound
from cocon.engine.instances import InstanceRecord, InstanceStore
from cocon.images.reference import Reference
from cocon.images.store import ImageStore
from cocon.isolation.base import InstanceConfig
from cocon.isolation.container import HOSTNAME_PLACEHOLDER, ContainerDriver, exit_code_for, process_args
from cocon.snapshots import OverlaySnapshotter, chain_ids


@pytest.mark.parametrize(
    "text",
    ["busybox", "busybox:1.36", "library/busybox", "team/app:v1.0-rc_1", "a.b-c/d__e", "my.registry/app:1",
     "localhost/app", "x-y", "app:UPPER", "a/b/c/d"],
)  # fmt: skip
def test_fast_normalize_agrees_with_references(text: str) -> None:
    assert lookup.fast_normalize(text) == str(Reference.parse(text))


@pytest.mark.parametrize(
    "text",
    ["", "Busybox", "a.b-c__d/e", "busybox@sha256:" + "a" * 64, "localhost:5000/app", "docker.io/busybox", "a..b",
     "-a", "a-", "a/", "/a", "a//b", "app:", "app:-x", "a_-b", "a___b", "a" * 256, "x:" + "t" * 129],
)  # fmt: skip
def test_fast_normalize_leaves_the_rest_to_the_store(text: str) -> None:
    assert lookup.fast_normalize(text) is None


def test_chain_ids_match_the_snapshotters() -> None:
    diffs = ["sha256:" + c * 64 for c in "abc"]
    assert list(lookup.chain_ids(diffs) or []) == chain_ids(diffs)
    assert lookup.chain_ids(["sha256:short"]) is None
    assert lookup.chain_ids([]) == ()


def test_lookups_agree_with_the_image_store(tmp_path: Any) -> None:
    root = str(tmp_path)
    store = ImageStore(root)
    layer = store.content.put(b"not really a layer")
    from cocon.oci.image_spec import OCI_LAYER, Descriptor

    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"], "Env": ["A=1"]},
                         "rootfs": {"type": "layers", "diff_ids": [str(layer)]}}).encode()  # fmt: skip
    image = store.commit(
        config, [Descriptor(media_type=OCI_LAYER, digest=str(layer), size=18)], names=["team/app:1"]
    )
    store.close()
    assert lookup.resolve_id(root, "team/app:1") == image.id
    assert lookup.resolve_id(root, image.id[7:19]) == image.id
    assert lookup.resolve_id(root, image.id) == image.id
    assert lookup.resolve_id(root, "team/app:2") is None
    assert lookup.resolve_id(root, "docker.io/team/app:1") is None  # not a fast form: the store answers
    info = lookup.image_info(root, image.id)
    assert info is not None and info.config == {"Cmd": ["sh"], "Env": ["A=1"]}
    assert info.chain_ids == (str(layer),) and info.config_blob == config
    assert lookup.image_info(root, "sha256:" + "0" * 64) is None
    assert lookup.resolve_id(str(tmp_path / "empty"), "busybox") is None


def _record(cid: str, name: str, image: str = "sha256:" + "1" * 64) -> InstanceRecord:
    return InstanceRecord(
        id=cid, name=name, image=image, image_ref="busybox", isolation="container", status="created",
        exit_code=None, error="", pid=0, supervisor=0, supervisor_start=0, created=1.0, started=None,
        finished=None, snapshot=cid, config={"Create": {"Image": "busybox"}, "Mounts": []},
    )  # fmt: skip


def test_instance_records(tmp_path: Any) -> None:
    store = InstanceStore(str(tmp_path))
    a, b = "ab" + "0" * 62, "ac" + "0" * 62
    store.insert(_record(a, "first"), [("vol", False), ("anon", True)])
    store.insert(_record(b, "second"))
    with pytest.raises(Conflict, match="already used by container"):
        store.insert(_record("ff" * 32, "first"))
    assert store.get("first").id == a and store.get(b).name == "second" and store.get("ab").id == a
    with pytest.raises(NotFound, match="matches 2"):
        store.get("a")
    with pytest.raises(NotFound, match="no container"):
        store.get("zzz")
    store.update(a, status="exited", exit_code=3, config={"Create": {}, "Mounts": [1]})
    rec = store.get(a)
    assert (rec.status, rec.exit_code, rec.config) == ("exited", 3, {"Create": {}, "Mounts": [1]})
    assert store.volume_users("vol") == [a] and sorted(store.volumes_of(a)) == [
        ("anon", True),
        ("vol", False),
    ]
    assert store.uses_image("sha256:" + "1" * 64) and not store.uses_image("sha256:" + "2" * 64)
    store.delete(a)
    assert store.volume_users("vol") == [] and [r.id for r in store.list()] == [b]
    store.close()
    # the schema carries a version; a newer one is refused
    import sqlite3

    db = sqlite3.connect(os.path.join(str(tmp_path), "instances.db"))
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    db.execute("PRAGMA user_version=99")
    db.commit()
    db.close()
    with pytest.raises(EngineError, match="newer cocon"):
        InstanceStore(str(tmp_path)).list()


def test_lean_snapshots_in_the_snapshotters_format(tmp_path: Any) -> None:
    snap = OverlaySnapshotter(str(tmp_path / "snaps"))
    root = snap.root
    parents = []
    for n in range(3):
        chain = "sha256:" + str(n) * 64
        snap.add_layer(chain, lambda d: None)
        parents.append(chain)
    assert rootfs.prepare(root, "c1", parents)
    assert snap.list_active() == ["c1"]
    described = snap.snapshot("c1")
    assert described.parents == tuple(parents) and not described.readonly
    assert rootfs.mount_data(root, "c1", parents) == described.options
    with pytest.raises(rootfs.RootfsError, match="already exists"):
        rootfs.prepare(root, "c1", parents)
    with pytest.raises(Exception, match="in use"):
        snap.remove_layer(parents[0])  # the snapshotter sees the lean snapshot's parents
    assert not rootfs.prepare(root, "c2", [])  # no layers: left to the snapshotter
    assert not rootfs.prepare(root, "c3", ["sha256:" + "9" * 64])  # a missing layer: the same
    rootfs.remove(root, "c1")
    rootfs.remove(root, "c1")  # idempotent
    assert snap.list_active() == [] and os.listdir(os.path.join(root, "tmp")) == []
    snap.prepare("c4", parents)
    rootfs.remove(root, "c4")  # and the other way round
    assert snap.list_active() == []


def test_long_lowerdir_lists_are_left_to_the_snapshotter(tmp_path: Any) -> None:
    snap = OverlaySnapshotter(str(tmp_path / ("x" * 100)))
    import hashlib

    parents = ["sha256:" + hashlib.sha256(str(n).encode()).hexdigest() for n in range(40)]
    for p in parents:
        snap.add_layer(p, lambda d: None)
    assert rootfs.mount_data(snap.root, "k", parents) is None
    assert not rootfs.prepare(snap.root, "k", parents)
    assert snap.list_active() == []


def test_names_args_tmpfs_durations() -> None:
    assert validate_name("/web-1.a_b") == "web-1.a_b"
    for bad in ("x", "-a", "a b", "a/b", "é1"):
        with pytest.raises(InvalidRequest):
            validate_name(bad)
    image = {"Entrypoint": ["/entry"], "Cmd": ["default"]}
    assert effective_args(image, {}) == ["/entry", "default"]
    assert effective_args(image, {"Cmd": ["x"]}) == ["/entry", "x"]
    assert effective_args(image, {"Entrypoint": []}) == []
    assert effective_args(image, {"Entrypoint": ["sh"], "Cmd": ["-c", "y"]}) == ["sh", "-c", "y"]
    assert _tmpfs_options("/t", "") == ["nosuid", "nodev", "noexec"]
    assert _tmpfs_options("/t", "exec,size=1m,mode=1777") == ["nosuid", "nodev", "size=1m", "mode=1777"]
    with pytest.raises(InvalidRequest, match="unknown option"):
        _tmpfs_options("/t", "bogus")
    assert human_duration(3600 * 30) == "30 hours"


def test_exit_codes_for_start_errors() -> None:
    assert exit_code_for("process.args[0]: 'x': executable file not found in $PATH") == 127
    assert exit_code_for("'/etc/passwd' is not an executable file (permission denied)") == 126
    assert exit_code_for("something else") == 125


def _cfg(tmp: str, **kw: Any) -> InstanceConfig:
    base: dict[str, Any] = dict(
        id="c" * 64, state_dir=os.path.join(tmp, "state"), rootfs=os.path.join(tmp, "rootfs"),
        image_id="sha256:" + "1" * 64, image_config=json.dumps({"architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]}, "rootfs": {"type": "layers", "diff_ids": []}}).encode(),
        process={}, hostname="host1", terminal=False, read_only=False, mounts=[], cap_add=[], cap_drop=[],
        seccomp="default", memory=None, memory_swap=None, cpus=None, pids_limit=None, network="none",
        cgroups_path=None,
    )  # fmt: skip
    base.update(kw)
    return InstanceConfig(**base)


def test_runtime_config_templates(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    from cocon.images.busybox import make_rootfs

    make_rootfs(os.path.join(tmp, "rootfs"))
    driver = ContainerDriver(os.path.join(tmp, "runtime"), os.path.join(tmp, "cache"))
    mount = {"destination": "/data", "type": "bind", "source": "/v", "options": ["rbind", "rw"]}
    doc = driver.config_for(_cfg(tmp, mounts=[mount], process={"Env": ["X=1"]}))
    assert doc["root"]["path"] == os.path.join(tmp, "rootfs") and doc["hostname"] == "host1"
    assert "HOSTNAME=host1" in doc["process"]["env"] and "X=1" in doc["process"]["env"]
    assert doc["mounts"][-1] == mount and doc["process"]["args"] == ["sh"]
    assert doc["process"]["noNewPrivileges"] is True and doc["linux"]["seccomp"] is not None
    assert len(os.listdir(os.path.join(tmp, "cache"))) == 1
    # the same options again: the cached template, filled with this run's values
    again = driver.config_for(_cfg(tmp, hostname="other", process={"Env": ["X=1"]}))
    assert again["hostname"] == "other" and "HOSTNAME=other" in again["process"]["env"]
    assert again["mounts"] == doc["mounts"][:-1]
    assert HOSTNAME_PLACEHOLDER not in json.dumps(again)
    assert len(os.listdir(os.path.join(tmp, "cache"))) == 1
    # other options: another template
    other = driver.config_for(_cfg(tmp, process={"Env": ["X=1"], "Cmd": ["echo", "hi"]}))
    assert other["process"]["args"] == ["echo", "hi"]  # the command is filled in: the same template
    assert len(os.listdir(os.path.join(tmp, "cache"))) == 1
    driver.config_for(_cfg(tmp, cap_drop=["ALL"]))
    driver.config_for(_cfg(tmp, memory=64 << 20))
    assert len(os.listdir(os.path.join(tmp, "cache"))) == 3
    from cocon.isolation.base import IsolationError

    with pytest.raises(IsolationError, match="unable to find user"):
        driver.config_for(_cfg(tmp, process={"User": "ghost"}))


@pytest.mark.parametrize("image_entry", [None, ["/entry"], []])
@pytest.mark.parametrize("image_cmd", [None, ["default", "arg"], []])
@pytest.mark.parametrize("entrypoint", [None, [], ["sh", "-c"]])
@pytest.mark.parametrize("cmd", [None, [], ["echo", "x"]])
def test_process_args_follow_docker_like_the_spec_module(
    image_entry: list[str] | None,
    image_cmd: list[str] | None,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
) -> None:
    from cocon.isolation.base import IsolationError
    from cocon.isolation.spec import ProcessRequest, SpecError, process_from_image
    from cocon.oci.image_spec import ContainerConfig

    blob = json.dumps({"config": {"Entrypoint": image_entry, "Cmd": image_cmd}}).encode()
    process: dict[str, Any] = {}
    if cmd is not None:
        process["Cmd"] = cmd
    if entrypoint is not None:
        process["Entrypoint"] = entrypoint
    try:
        expected: list[str] | None = process_from_image(
            ContainerConfig(entrypoint=image_entry, cmd=image_cmd),
            ProcessRequest(command=cmd or None, entrypoint=entrypoint),
        ).args
    except SpecError:
        expected = None
    if expected is None:
        with pytest.raises(IsolationError, match="no command to run"):
            process_args(blob, process)
    else:
        assert process_args(blob, process) == expected


def test_local_client_answers_with_api_errors(tmp_path: Any) -> None:
    from cocon.api.client import APIError
    from cocon.api.local import LocalClient

    client = LocalClient(str(tmp_path / "root"), str(tmp_path / "run"))
    try:
        with pytest.raises(APIError) as info:
            client.image_inspect("nosuch")
        assert info.value.status == 404 and "no image 'nosuch'" in str(info.value)
        with pytest.raises(APIError) as info:
            client.container_remove("nosuch")
        assert info.value.status == 404
        with pytest.raises(APIError) as info:
            client.volume_create("x")
        assert info.value.status == 400 and "invalid volume name" in str(info.value)
        with pytest.raises(APIError) as info:
            client.container_create({"Image": "busybox", "HostConfig": {"Isolation": "vm"}})
        assert info.value.status == 400 and "not available yet" in str(info.value)
        assert client.volume_create("data")["Name"] == "data"
        assert [v["Name"] for v in client.volume_list()["Volumes"]] == ["data"]
        with pytest.raises(APIError) as info:
            client.image_tag("nosuch", "x:1")
        assert info.value.status == 404
        assert client.image_list() == [] and client.container_list(all=True) == []
    finally:
        client.close()
