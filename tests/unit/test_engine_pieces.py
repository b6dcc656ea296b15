"""Pieces of the engine that need no container: images for running (through the image store and the
snapshotter), instance records, names and options, the runtime config of an instance."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from cocon._units import human_duration
from cocon.engine.containers import _tmpfs_options, effective_args, validate_name
from cocon.engine.engine import Engine
from cocon.engine.errors import Conflict, EngineError, InvalidRequest, NotFound
from cocon.engine.instances import InstanceRecord, InstanceStore
from cocon.isolation.base import InstanceConfig, IsolationError
from cocon.isolation.container import ContainerDriver, exit_code_for
from cocon.snapshots import chain_ids


def test_images_for_running_come_from_the_image_store(tmp_path: Any) -> None:
    import io

    from cocon.images.layers import dir_to_layer
    from cocon.oci.image_spec import OCI_LAYER_GZIP, Descriptor

    engine = Engine(str(tmp_path / "root"), str(tmp_path / "run"))
    try:
        descs, diff_ids = [], []
        for n in range(2):
            layer_dir = tmp_path / f"layer{n}"
            layer_dir.mkdir()
            (layer_dir / f"file{n}").write_text(str(n))
            buf = io.BytesIO()
            layer = dir_to_layer(str(layer_dir), buf)
            engine.images.content.put(buf.getvalue())
            descs.append(Descriptor(media_type=OCI_LAYER_GZIP, digest=layer.digest, size=layer.size))
            diff_ids.append(layer.diff_id)
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Cmd": ["sh"], "Env": ["A=1"], "Volumes": {"/data": {}}},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()  # fmt: skip
        image = engine.images.commit(config, descs, names=["team/app:1"])
        chains = tuple(chain_ids(diff_ids))
        info = engine.image_for_run("team/app:1")
        assert info.id == image.id and info.chain_ids == chains and len(chains) == 2
        assert info.config == {"Cmd": ["sh"], "Env": ["A=1"], "Volumes": {"/data": {}}}
        for chain in chains:  # unpacked on first use, into the snapshotter
            assert engine.snapshotter.has_layer(chain)
        with open(os.path.join(engine.snapshotter.layer_dir(chains[1]), "file1")) as f:
            assert f.read() == "1"
        # the image store's ways of naming an image: full and partial IDs, name@manifest-digest
        for ref in (image.id, image.id[7:19], f"team/app@{image.manifest_digest}", "docker.io/team/app:1"):
            assert engine.image_for_run(ref) == info
        with pytest.raises(NotFound, match="no image 'team/app:2'"):
            engine.image_for_run("team/app:2")
        with pytest.raises(NotFound, match="neither an image name nor an image ID"):
            engine.image_for_run("Not A Name")
    finally:
        engine.close()


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


def test_runtime_config_of_each_instance(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    from cocon.images.busybox import make_rootfs

    make_rootfs(os.path.join(tmp, "rootfs"))
    driver = ContainerDriver(os.path.join(tmp, "runtime"))
    mount = {"destination": "/data", "type": "bind", "source": "/v", "options": ["rbind", "rw"]}
    doc = driver.config_for(_cfg(tmp, mounts=[mount], process={"Env": ["X=1"]}, cgroups_path="/cocon/c1"))
    assert doc["root"]["path"] == os.path.join(tmp, "rootfs") and doc["hostname"] == "host1"
    assert doc["process"]["env"][:2] == ["PATH=/bin", "HOSTNAME=host1"] and "X=1" in doc["process"]["env"]
    assert doc["mounts"][-1] == mount and doc["mounts"][0]["destination"] == "/proc"
    assert doc["process"]["args"] == ["sh"] and doc["linux"]["cgroupsPath"] == "/cocon/c1"
    assert doc["process"]["noNewPrivileges"] is True and doc["linux"]["seccomp"] is not None
    assert os.listdir(tmp) == ["rootfs"]  # nothing cached or written
    # what differs between instances is what they asked for
    other = driver.config_for(_cfg(tmp, hostname="other", process={"Entrypoint": ["echo"], "Cmd": ["hi"]}))
    assert other["hostname"] == "other" and "HOSTNAME=other" in other["process"]["env"]
    assert other["mounts"] == doc["mounts"][:-1] and other["process"]["args"] == ["echo", "hi"]
    assert "cgroupsPath" not in other["linux"]
    dropped = driver.config_for(_cfg(tmp, cap_drop=["ALL"], memory=64 << 20, seccomp="unconfined"))
    caps = dropped["process"]["capabilities"]
    assert caps == {"bounding": [], "effective": [], "permitted": []} and "seccomp" not in dropped["linux"]
    assert dropped["linux"]["resources"]["memory"] == {"limit": 64 << 20, "swap": 128 << 20}
    with pytest.raises(IsolationError, match="unable to find user"):
        driver.config_for(_cfg(tmp, process={"User": "ghost"}))
    with pytest.raises(IsolationError, match="no command to run"):
        driver.config_for(_cfg(tmp, process={"Entrypoint": []}))  # clears the image's CMD too
    with pytest.raises(IsolationError, match="not valid JSON"):
        driver.config_for(_cfg(tmp, image_config=b"{"))


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
            client.container_create({"Image": "busybox", "HostConfig": {"Isolation": "jail"}})
        assert info.value.status == 400 and "unknown isolation 'jail'" in str(info.value)
        assert client.volume_create("data")["Name"] == "data"
        assert [v["Name"] for v in client.volume_list()["Volumes"]] == ["data"]
        with pytest.raises(APIError) as info:
            client.image_tag("nosuch", "x:1")
        assert info.value.status == 404
        assert client.image_list() == [] and client.container_list(all=True) == []
    finally:
        client.close()
