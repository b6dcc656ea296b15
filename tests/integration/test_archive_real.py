"""cocon's image archives against the real tools: skopeo and umoci read what cocon saves, cocon loads
what they write, and the loaded images unpack on real overlayfs (cocon.snapshots) into the right
root file system — and run, with cocon-runtime.

Every test works under its own tmp_path (stores, snapshotter, layouts, bundles); mounts and
containers are removed even when a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocon import _linux as linux
from cocon.images.archive import CorruptArchive, import_rootfs, load, save
from cocon.images.store import Image, ImageStore
from cocon.snapshots import OverlaySnapshotter
from cocon.snapshots.unpack import unpack_image
from runtime_helpers import RuntimeCLI, make_bundle

SKOPEO = ["skopeo", "--insecure-policy"]  # no policy file needed for local transports


def run(*args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def mounts_under(path: Path) -> list[str]:
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4].replace("\\040", " ")
            if mp == real or mp.startswith(real + "/"):
                found.append(mp)
    return found


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path: Path) -> Iterator[None]:
    yield
    left = mounts_under(tmp_path)
    for mp in sorted(left, key=len, reverse=True):
        with contextlib.suppress(OSError):
            linux.umount2(mp, linux.MNT_DETACH)
    assert left == [], f"mounts left under {tmp_path}: {left}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ImageStore]:
    s = ImageStore(str(tmp_path / "store"))
    yield s
    s.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ImageStore]:
    """A second, empty store that loads what the tools wrote."""
    s = ImageStore(str(tmp_path / "fresh"))
    yield s
    s.close()


@pytest.fixture
def busybox(store: ImageStore, tmp_path: Path, busybox_rootfs: str) -> Image:
    """`cocon image import` of a busybox rootfs tar (made by GNU tar) with one file of our own."""
    root = tmp_path / "bb-rootfs"
    shutil.copytree(busybox_rootfs, root, symlinks=True)
    (root / "etc" / "cocon-test").write_text("made by cocon\n")
    run("tar", "-C", str(root), "-czf", str(tmp_path / "busybox.tar.gz"), ".")
    shutil.rmtree(root)
    return import_rootfs(store, tmp_path / "busybox.tar.gz", "busybox:test", changes=['CMD ["sh"]'])


@contextlib.contextmanager
def mounted(store: ImageStore, image: Image, tmp_path: Path, key: str) -> Iterator[Path]:
    """The image unpacked into an overlay snapshotter and mounted read-write; removed afterwards."""
    snap = OverlaySnapshotter(str(tmp_path / "snapshots"))
    chains = unpack_image(snap, store.content, image)
    snap.prepare(key, chains)
    try:
        yield Path(snap.mount(key))
    finally:
        snap.remove(key)


def run_container(tmp_path: Path, rootfs: Path, *args: str) -> str:
    """Run a container on `rootfs` with cocon-runtime; its stdout."""
    rt = RuntimeCLI(root=str(tmp_path / "runtime-state"))
    try:
        bundle = make_bundle(str(tmp_path), str(rootfs), rt, *args)
        proc = rt("run", "--bundle", bundle.path, bundle.id)
        return proc.stdout
    finally:
        rt.cleanup()


# --- cocon → file → cocon -------------------------------------------------------------------------


def test_busybox_import_unpacks_and_runs(store, busybox, tmp_path):
    assert busybox.names == ("docker.io/library/busybox:test",)
    assert busybox.config.config is not None and busybox.config.config.cmd == ["sh"]
    with mounted(store, busybox, tmp_path, "bb") as root:
        assert os.access(root / "bin" / "busybox", os.X_OK)
        assert os.readlink(root / "bin" / "sh") == "/bin/busybox"
        assert (root / "etc" / "cocon-test").read_text() == "made by cocon\n"
        assert os.stat(root / "tmp").st_mode & 0o7777 == 0o1777
        assert (
            run_container(tmp_path, root, "sh", "-c", "cat /etc/cocon-test; echo ok") == "made by cocon\nok\n"
        )


@pytest.mark.parametrize("fmt", ["oci-archive", "oci-dir", "docker-archive"])
def test_round_trip_of_a_real_image(store, fresh, busybox, tmp_path, fmt):
    dest = tmp_path / ("layout" if fmt == "oci-dir" else "busybox.tar")
    save(store, ["busybox:test"], dest, format=fmt)
    (loaded,) = load(fresh, dest)
    assert (loaded.id, loaded.names, loaded.diff_ids) == (busybox.id, busybox.names, busybox.diff_ids)
    with mounted(fresh, loaded, tmp_path, "rt") as root:
        assert (root / "etc" / "cocon-test").read_text() == "made by cocon\n"
        assert os.readlink(root / "bin" / "ls") == "/bin/busybox"


# --- skopeo and umoci read what cocon writes ------------------------------------------------------


def test_skopeo_reads_what_cocon_saves(store, busybox, tmp_path):
    save(store, ["busybox:test"], tmp_path / "layout", format="oci-dir")
    save(store, ["busybox:test"], tmp_path / "oci.tar", format="oci-archive")
    save(store, ["busybox:test"], tmp_path / "docker.tar", format="docker-archive")
    raw = json.loads(run(*SKOPEO, "inspect", "--raw", f"oci:{tmp_path}/layout:busybox:test"))
    assert raw["config"]["digest"] == busybox.id
    assert [layer["digest"] for layer in raw["layers"]] == [layer.digest for layer in busybox.manifest.layers]
    info = json.loads(run(*SKOPEO, "inspect", f"oci-archive:{tmp_path}/oci.tar:busybox:test"))
    assert info["Digest"] == busybox.manifest_digest
    info = json.loads(run(*SKOPEO, "inspect", f"docker-archive:{tmp_path}/docker.tar"))
    assert info["Layers"] == busybox.diff_ids  # uncompressed layers: their digests are the diff_ids
    assert info["Architecture"] == busybox.config.architecture
    config = json.loads(run(*SKOPEO, "inspect", "--config", f"docker-archive:{tmp_path}/docker.tar"))
    assert config["config"]["Cmd"] == ["sh"]
    # skopeo copies cocon's layout to a docker-archive and to another layout.
    run(*SKOPEO, "copy", f"oci:{tmp_path}/layout:busybox:test", f"docker-archive:{tmp_path}/copy.tar:bb:copy")
    run(*SKOPEO, "copy", f"oci:{tmp_path}/layout:busybox:test", f"oci:{tmp_path}/copy:bb:copy")
    copied = json.loads(run(*SKOPEO, "inspect", "--raw", f"oci:{tmp_path}/copy:bb:copy"))
    assert copied["config"]["digest"] == busybox.id


def test_umoci_unpacks_what_cocon_saves(store, busybox, tmp_path):
    save(store, ["busybox:test"], tmp_path / "layout", format="oci-dir")
    assert run("umoci", "ls", "--layout", str(tmp_path / "layout")).split() == ["busybox:test"]
    run("umoci", "unpack", "--image", f"{tmp_path}/layout:busybox:test", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle" / "rootfs"
    assert (rootfs / "etc" / "cocon-test").read_text() == "made by cocon\n"
    assert os.access(rootfs / "bin" / "busybox", os.X_OK)
    spec = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert spec["process"]["args"] == ["sh"]


# --- cocon loads what skopeo and umoci write ------------------------------------------------------


def test_cocon_loads_what_skopeo_writes(store, busybox, tmp_path):
    save(store, ["busybox:test"], tmp_path / "layout", format="oci-dir")
    src = f"oci:{tmp_path}/layout:busybox:test"
    run(*SKOPEO, "copy", src, f"docker-archive:{tmp_path}/sk.tar:sk/busybox:docker")
    run(*SKOPEO, "copy", src, f"oci:{tmp_path}/sk-layout:sk/busybox:oci")
    run(
        *SKOPEO,
        "copy",
        "--dest-compress-format",
        "zstd",
        src,
        f"oci-archive:{tmp_path}/sk-zstd.tar:sk/bb:zstd",
    )
    cases = [
        ("sk.tar", "docker.io/sk/busybox:docker", "application/vnd.oci.image.layer.v1.tar"),
        ("sk-layout", "docker.io/sk/busybox:oci", "application/vnd.oci.image.layer.v1.tar+gzip"),
        ("sk-zstd.tar", "docker.io/sk/bb:zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
    ]
    for n, (path, name, media_type) in enumerate(cases):
        target = ImageStore(str(tmp_path / f"store-{n}"))
        try:
            (image,) = load(target, tmp_path / path)
            assert (image.id, image.names) == (busybox.id, (name,))  # same config: same image ID
            assert [layer.media_type for layer in image.manifest.layers] == [media_type]
            with mounted(target, image, tmp_path, f"sk{n}") as root:
                assert (root / "etc" / "cocon-test").read_text() == "made by cocon\n"
                assert os.access(root / "bin" / "busybox", os.X_OK)
        finally:
            target.close()


def test_cocon_loads_what_umoci_writes(fresh, busybox_rootfs, tmp_path):
    """umoci new + repack (twice: the second adds a file and deletes one, which makes a whiteout)."""
    layout = f"{tmp_path}/umoci"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:app:1")
    run("umoci", "unpack", "--image", f"{layout}:app:1", str(tmp_path / "b1"))
    rootfs = tmp_path / "b1" / "rootfs"
    shutil.copytree(busybox_rootfs, rootfs, symlinks=True, dirs_exist_ok=True)
    (rootfs / "hello").write_text("hello from umoci\n")
    (rootfs / "gone").write_text("deleted later\n")
    run("umoci", "repack", "--image", f"{layout}:app:1", str(tmp_path / "b1"))
    run("umoci", "config", "--image", f"{layout}:app:1", "--config.cmd", "sh", "--config.env", "FROM=umoci")
    run("umoci", "unpack", "--image", f"{layout}:app:1", str(tmp_path / "b2"))
    (tmp_path / "b2" / "rootfs" / "gone").unlink()
    (tmp_path / "b2" / "rootfs" / "etc" / "added").write_text("added by repack\n")
    run("umoci", "repack", "--image", f"{layout}:app:2", str(tmp_path / "b2"))
    shutil.rmtree(tmp_path / "b1")
    shutil.rmtree(tmp_path / "b2")
    loaded = load(fresh, layout)
    by_name = {i.names[0]: i for i in loaded}
    assert sorted(by_name) == ["docker.io/library/app:1", "docker.io/library/app:2"]
    one, two = by_name["docker.io/library/app:1"], by_name["docker.io/library/app:2"]
    assert len(one.manifest.layers) == 1 and len(two.manifest.layers) == 2
    assert two.config.config is not None and "FROM=umoci" in (two.config.config.env or [])
    with mounted(fresh, one, tmp_path, "u1") as root:
        assert (root / "gone").read_text() == "deleted later\n"
    with mounted(fresh, two, tmp_path, "u2") as root:
        assert (root / "hello").read_text() == "hello from umoci\n"
        assert (root / "etc" / "added").read_text() == "added by repack\n"
        assert not (root / "gone").exists()  # the whiteout of the repacked layer
        out = run_container(
            tmp_path, root, "sh", "-c", "cat /hello /etc/added; test -e /gone || echo no /gone"
        )
        assert out == "hello from umoci\nadded by repack\nno /gone\n"


def test_cocon_runs_what_umoci_insert_writes(fresh, busybox_rootfs, tmp_path):
    """umoci 0.4.7 (Debian 12) writes `insert` layers without the tar end-of-archive marker (umoci
    PR #534); like Go's tar reader, cocon accepts that when the layer's diff_id checks out."""
    layout = f"{tmp_path}/umoci"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:base")
    run("umoci", "insert", "--image", f"{layout}:base", "--tag", "app", str(busybox_rootfs), "/")
    extra = tmp_path / "extra.txt"
    extra.write_text("inserted by umoci\n")
    run("umoci", "insert", "--image", f"{layout}:app", str(extra), "/etc/extra.txt")
    images = {i.names[0]: i for i in load(fresh, layout)}
    app = images["docker.io/library/app:latest"]
    assert len(app.manifest.layers) == 2
    with mounted(fresh, app, tmp_path, "ins") as root:
        out = run_container(tmp_path, root, "cat", "/etc/extra.txt")
        assert out == "inserted by umoci\n"


def test_tampered_skopeo_layouts_are_refused(store, fresh, busybox, tmp_path):
    save(store, ["busybox:test"], tmp_path / "layout", format="oci-dir")
    run(*SKOPEO, "copy", f"oci:{tmp_path}/layout:busybox:test", f"oci:{tmp_path}/sk:bb:1")
    layer = busybox.manifest.layers[0].digest.split(":")[1]
    blob = tmp_path / "sk" / "blobs" / "sha256" / layer
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(CorruptArchive, match="does not match its digest"):
        load(fresh, tmp_path / "sk")
    blob.unlink()
    with pytest.raises(CorruptArchive, match="not in the archive"):
        load(fresh, tmp_path / "sk")
    assert fresh.list() == []
