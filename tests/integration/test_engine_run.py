"""The engine in this process: real containers from real images (busybox, and images committed here
with VOLUMEs, symlinks and many layers), real overlay snapshots, volumes and cgroups."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import (
    cgroup_dirs,
    leaked_cgroups,
    mounts_under,
    new_root_with_busybox,
    remove_cgroup,
    reset_network,
    unmount_all,
)
from cocon.engine.engine import Engine
from cocon.engine.errors import Conflict, InvalidRequest, NotFound, StartFailed
from cocon.images.busybox import make_rootfs
from cocon.images.layers import dir_to_layer
from cocon.isolation.base import Stdio
from cocon.oci.image_spec import OCI_LAYER_GZIP, Descriptor
from cocon.snapshots import OverlaySnapshotter
from cocon.snapshots.probe import overlay_volatile_supported


@pytest.fixture
def engine(tmp_path: Any) -> Iterator[Engine]:
    before = cgroup_dirs()
    root = os.path.join(str(tmp_path), "root")
    run = tempfile.mkdtemp(prefix="cocon-test-run-", dir="/run")
    new_root_with_busybox(root)
    eng = Engine(root, run)
    try:
        yield eng
        active = os.path.join(root, "snapshots", "overlayfs", "active")
        assert os.listdir(active) == [], "snapshots left behind"
        assert mounts_under(root) == [] and mounts_under(run) == [], "mounts left behind"
        assert leaked_cgroups(before) == [], "cgroups left behind"
        runtime = os.path.join(run, "runtime")
        assert not os.path.isdir(runtime) or [n for n in os.listdir(runtime) if not n.startswith(".")] == []
    finally:
        for rec in eng.instances.list():
            try:
                eng.containers.remove(rec.id, force=True, volumes=True)
            except Exception:
                pass
        eng.close()
        unmount_all(run)
        unmount_all(root)
        reset_network(root, run)
        for d in leaked_cgroups(before):
            remove_cgroup(d)
        shutil.rmtree(run, ignore_errors=True)


class Output:
    """stdout and stderr of a container, as files."""

    def __init__(self, tmp: str) -> None:
        self.out_path, self.err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        self.stdin = os.open("/dev/null", os.O_RDONLY)
        self.out = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.err = os.open(self.err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    @property
    def stdio(self) -> Stdio:
        return Stdio(stdin=self.stdin, stdout=self.out, stderr=self.err)

    def text(self) -> tuple[str, str]:
        return open(self.out_path).read(), open(self.err_path).read()

    def close(self) -> None:
        for fd in (self.stdin, self.out, self.err):
            os.close(fd)


def run(engine: Engine, tmp: str, body: dict[str, Any], name: str | None = None) -> tuple[int, str, str]:
    out = Output(tmp)
    try:
        cid = engine.containers.create(body, name)["Id"]
        engine.containers.start(cid, out.stdio)
        code = engine.containers.wait(cid)
        return (code, *out.text())
    finally:
        out.close()


def commit_image(engine: Engine, layer_dirs: list[str], config: dict[str, Any], name: str) -> str:
    store = engine.images
    descs, diff_ids = [], []
    for d in layer_dirs:
        buf = io.BytesIO()
        info = dir_to_layer(d, buf)
        store.content.put(buf.getvalue())
        descs.append(Descriptor(media_type=OCI_LAYER_GZIP, digest=info.digest, size=info.size))
        diff_ids.append(info.diff_id)
    doc = {"architecture": "amd64", "os": "linux", "config": config,
           "rootfs": {"type": "layers", "diff_ids": diff_ids}}  # fmt: skip
    return store.commit(json.dumps(doc).encode(), descs, names=[name]).id


def test_life_cycle_records_and_inspect(engine: Engine, tmp_path: Any) -> None:
    out = Output(str(tmp_path))
    try:
        cid = engine.containers.create({"Image": "busybox", "Cmd": ["sh", "-c", "echo hi; exit 2"]}, "cycle")[
            "Id"
        ]
        assert engine.instances.get("cycle").status == "created"
        assert engine.containers.inspect(cid[:8])["State"]["Status"] == "created"
        engine.containers.start(cid, out.stdio)
        assert engine.containers.inspect("cycle")["State"]["Running"] is True
        assert engine.containers.wait(cid) == 2
    finally:
        out.close()
    assert out.text() == ("hi\n", "")
    doc = engine.containers.inspect("cycle")
    assert doc["State"]["Status"] == "exited" and doc["State"]["ExitCode"] == 2
    assert doc["Path"] == "sh" and doc["Args"] == ["-c", "echo hi; exit 2"]
    assert doc["Config"]["Hostname"] == cid[:12]
    listed = engine.containers.list(all=True)
    assert [c["Names"] for c in listed] == [["/cycle"]] and listed[0]["Status"].startswith("Exited (2)")
    assert engine.containers.list() == []
    snap = os.path.join(engine.snapshot_root, "active", cid)
    assert os.path.isdir(snap) and mounts_under(snap) == []  # kept, unmounted
    with pytest.raises(Conflict):
        engine.containers.create({"Image": "busybox", "Cmd": ["true"]}, "cycle")
    engine.containers.remove("cycle")
    assert not os.path.exists(snap)
    with pytest.raises(NotFound):
        engine.containers.inspect("cycle")


def test_the_root_filesystem_is_a_snapshotter_snapshot(engine: Engine, tmp_path: Any) -> None:
    cid = engine.containers.create({"Image": "busybox", "Cmd": ["true"]})["Id"]
    snapshotter = OverlaySnapshotter(os.path.join(engine.root, "snapshots", "overlayfs"))
    assert snapshotter.list_active() == [cid]
    snap = snapshotter.snapshot(cid)
    assert snap.kind == "overlay" and snap.mount_cwd is None and not snap.readonly
    merged = snapshotter.mount(cid)  # another snapshotter (another process) mounts it …
    assert os.path.isfile(os.path.join(merged, "bin", "busybox"))
    snapshotter.unmount(cid)
    engine.containers.remove(cid)  # … and the engine removes it
    assert snapshotter.list_active() == []


def test_a_removed_containers_overlay_is_volatile(engine: Engine, tmp_path: Any) -> None:
    """--rm: no sync of the upper dir at unmount (Linux 5.10+); a kept container's overlay syncs."""
    options = {}
    for auto_remove in (True, False):
        body = {"Image": "busybox", "Cmd": ["sh", "-c", "grep ' / / ' /proc/self/mountinfo"],
                "HostConfig": {"AutoRemove": auto_remove}}  # fmt: skip
        code, out, err = run(engine, str(tmp_path), body, f"vol-{auto_remove}".lower())
        assert code == 0, err
        options[auto_remove] = out
    engine.containers.remove("vol-false")
    flags = {k: set(v.split()[-1].split(",")) & {"volatile", "fsync=volatile"} for k, v in options.items()}
    assert bool(flags[True]) == overlay_volatile_supported() and not flags[False]


def test_many_layers_use_the_snapshotter(engine: Engine, tmp_path: Any) -> None:
    base = os.path.join(str(tmp_path), "layers")
    dirs = []
    for n in range(40):
        d = os.path.join(base, str(n))
        os.makedirs(d)
        if n == 0:
            make_rootfs(d)
        with open(os.path.join(d, f"f{n}"), "w") as f:
            f.write(str(n))
    commit_image(
        engine, dirs := [os.path.join(base, str(n)) for n in range(40)], {"Cmd": ["ls", "/"]}, "deep"
    )
    assert len(dirs) == 40
    code, out, _ = run(engine, str(tmp_path), {"Image": "deep", "HostConfig": {"AutoRemove": True}})
    assert code == 0 and "f0" in out.split() and "f39" in out.split()


def test_image_volumes_are_anonymous_filled_and_removed(engine: Engine, tmp_path: Any) -> None:
    layer = os.path.join(str(tmp_path), "layer")
    make_rootfs(layer)
    os.makedirs(os.path.join(layer, "data", "sub"))
    with open(os.path.join(layer, "data", "sub", "seed"), "w") as f:
        f.write("seeded\n")
    os.chown(os.path.join(layer, "data", "sub", "seed"), 1000, 1000)
    commit_image(engine, [layer], {"Volumes": {"/data": {}}, "Cmd": ["cat", "/data/sub/seed"]}, "withvol")
    code, out, _ = run(engine, str(tmp_path), {"Image": "withvol", "HostConfig": {"AutoRemove": True}})
    assert (code, out) == (0, "seeded\n")
    assert engine.volumes.list() == []  # removed with the container
    code, _, _ = run(engine, str(tmp_path), {"Image": "withvol"}, "keeps")
    vols = engine.volumes.list()
    assert len(vols) == 1 and vols[0].anonymous
    seed = os.path.join(vols[0].mountpoint, "sub", "seed")
    assert open(seed).read() == "seeded\n" and os.stat(seed).st_uid == 1000
    engine.containers.remove("keeps", volumes=True)
    assert engine.volumes.list() == []


def test_volume_copy_never_follows_a_symlink_out_of_the_image(engine: Engine, tmp_path: Any) -> None:
    layer = os.path.join(str(tmp_path), "layer")
    make_rootfs(layer)
    os.symlink("/../../../../etc", os.path.join(layer, "data"))  # absolute: the image's own /etc
    commit_image(engine, [layer], {"Cmd": ["ls", "/data"]}, "linky")
    code, _, _ = run(
        engine,
        str(tmp_path),
        {"Image": "linky", "HostConfig": {"Binds": ["vv:/data"], "AutoRemove": True, "NetworkMode": "none"}},
    )
    assert code == 0
    copied = sorted(os.listdir(engine.volumes.data_dir("vv")))
    assert copied == sorted(os.listdir(os.path.join(layer, "etc")))  # passwd, group, hostname
    assert "os-release" not in copied and os.path.exists("/etc/os-release")
    engine.imageops.volume_remove("vv")


def test_start_failures(engine: Engine, tmp_path: Any) -> None:
    out = Output(str(tmp_path))
    try:
        cid = engine.containers.create({"Image": "busybox", "Cmd": ["/no/such/program"]}, "failing")["Id"]
        with pytest.raises(StartFailed) as info:
            engine.containers.start(cid, out.stdio)
        assert info.value.exit_code == 127
        rec = engine.instances.get("failing")
        assert rec.status == "created" and rec.exit_code == 127 and "not found" in rec.error
        assert mounts_under(engine.root) == []
        engine.containers.remove("failing")
        cid = engine.containers.create(
            {"Image": "busybox", "Cmd": ["/etc/passwd"], "HostConfig": {"AutoRemove": True}}
        )["Id"]
        with pytest.raises(StartFailed) as info:
            engine.containers.start(cid, out.stdio)
        assert info.value.exit_code == 126
        assert engine.instances.list() == []  # AutoRemove: nothing left
    finally:
        out.close()


def test_bad_requests(engine: Engine) -> None:
    bad: list[dict[str, Any]] = [
        {"Image": ""},
        {"Image": "busybox", "Cmd": "not a list"},
        {"Image": "busybox", "WorkingDir": "relative"},
        {"Image": "busybox", "HostConfig": {"Memory": 1024}},
        {"Image": "busybox", "HostConfig": {"NanoCpus": 10**15}},
        {"Image": "busybox", "HostConfig": {"Binds": ["a:b:c:d"]}},
        {"Image": "busybox", "HostConfig": {"Binds": ["/x:/y:rw,ro"]}},
        {"Image": "busybox", "HostConfig": {"Tmpfs": {"/t": "bogus"}}},
        {"Image": "busybox", "HostConfig": {"SecurityOpt": ["apparmor=x"]}},
        {"Image": "busybox", "HostConfig": {"NetworkMode": "container:abc"}},
        {"Image": "busybox", "HostConfig": {"Isolation": "nonsense"}},
        {"Image": "busybox", "Hostname": "bad_host!"},
    ]
    for body in bad:
        with pytest.raises(InvalidRequest):
            engine.containers.create(body)
    with pytest.raises(NotFound):
        engine.containers.create({"Image": "nosuch"})
    with pytest.raises(InvalidRequest):
        engine.containers.create({"Image": "busybox"}, "x")  # too short a name
    assert engine.instances.list() == [] and engine.volumes.list() == []


def test_terminal(engine: Engine, tmp_path: Any) -> None:
    out = Output(str(tmp_path))
    try:
        cid = engine.containers.create(
            {
                "Image": "busybox",
                "Tty": True,
                "Cmd": ["sh", "-c", "tty; echo $TERM"],
                "HostConfig": {"AutoRemove": True},
            }
        )["Id"]
        pty = engine.containers.start(cid, out.stdio)
        assert pty >= 0
        data = b""
        while True:
            ready, _, _ = select.select([pty], [], [], 20)
            assert ready, f"no output from the terminal; got {data!r}"
            try:
                chunk = os.read(pty, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        assert engine.containers.wait(cid) == 0
        assert data.split() == [b"/dev/pts/0", b"xterm"]
    finally:
        out.close()


def test_images_in_use_and_volumes_in_use(engine: Engine, tmp_path: Any) -> None:
    run(
        engine,
        str(tmp_path),
        {"Image": "busybox", "Cmd": ["true"], "HostConfig": {"Binds": ["held:/h"]}},
        "user",
    )
    with pytest.raises(Conflict):
        engine.imageops.image_remove("busybox")
    with pytest.raises(Conflict):
        engine.imageops.volume_remove("held")
    assert engine.imageops.image_list()[0]["Containers"] == 1
    engine.containers.remove("user")
    engine.imageops.volume_remove("held")
    assert [d for d in engine.imageops.image_remove("busybox") if "Deleted" in d]
