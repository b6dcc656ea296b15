"""Named volumes on disk (cocon.storage.volumes): records, names, removal rules, and filling a volume
from an image's tree the way Docker does, without ever leaving that tree."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import pytest

from cocon.storage.volumes import (
    VolumeError,
    VolumeInUse,
    VolumeNotFound,
    VolumeStore,
    copy_tree_in_root,
    is_volume_name,
    validate_name,
)


def test_names() -> None:
    for good in ("ab", "data", "my_vol.1-2", "A9"):
        assert validate_name(good) == good and is_volume_name(good)
    for bad in ("a", "-ab", ".ab", "a/b", "a b", "../x", "", "x" * 256, "ü1"):
        assert not is_volume_name(bad)
        with pytest.raises(VolumeError, match="invalid volume name"):
            validate_name(bad)


def test_create_get_list_remove(tmp_path: Any) -> None:
    store = VolumeStore(str(tmp_path / "volumes"))
    vol, new = store.create("data", labels={"k": "v"})
    assert new and vol.name == "data" and vol.labels == {"k": "v"} and not vol.anonymous
    assert os.path.isdir(vol.mountpoint) and stat.S_IMODE(os.stat(vol.mountpoint).st_mode) == 0o755
    again, new = store.create("data", labels={"other": "x"})
    assert not new and again.labels == {"k": "v"}  # an existing volume is returned unchanged
    anon, _ = store.create()
    assert anon.anonymous and len(anon.name) == 64
    assert [v.name for v in store.list()] == sorted(["data", anon.name])
    doc = store.get("data").to_docker()
    assert doc["Driver"] == "local" and doc["Scope"] == "local" and doc["Mountpoint"] == vol.mountpoint
    assert doc["CreatedAt"].endswith("Z")
    with open(os.path.join(vol.mountpoint, "f"), "w") as f:
        f.write("x")
    with pytest.raises(VolumeInUse, match="in use"):
        store.remove("data", in_use=lambda name: name == "data")
    store.remove("data", in_use=lambda name: False)
    with pytest.raises(VolumeNotFound):
        store.remove("data")
    store.remove("data", force=True)
    with pytest.raises(VolumeNotFound, match="cocon volume create"):
        store.get("data")
    assert [n for n in os.listdir(store.root) if n.startswith(".") and n != ".lock"] == []


def test_prune(tmp_path: Any) -> None:
    store = VolumeStore(str(tmp_path / "volumes"))
    named, _ = store.create("named")
    a, _ = store.create()
    b, _ = store.create()
    removed = store.prune(in_use=lambda n: n == b.name)
    assert [n for n, _ in removed] == [a.name]
    assert sorted(v.name for v in store.list()) == sorted(["named", b.name])
    assert [n for n, _ in store.prune(all=True, in_use=lambda n: n == b.name)] == ["named"]
    assert named.name == "named"


def test_corrupt_record_and_leftovers(tmp_path: Any) -> None:
    store = VolumeStore(str(tmp_path / "volumes"))
    store.create("good")
    os.makedirs(os.path.join(store.root, "broken"))
    with open(os.path.join(store.root, "broken", "volume.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(VolumeError, match="cocon volume rm -f broken"):
        store.get("broken")
    assert [v.name for v in store.list()] == ["good"]
    store.remove("broken", force=True)
    os.makedirs(os.path.join(store.root, ".tmp-dead", "_data"))
    store.clean_leftovers()
    assert sorted(os.listdir(store.root)) == [".lock", "good"]


def _image_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "data", "sub"))
    os.makedirs(os.path.join(root, "etc"))
    with open(os.path.join(root, "data", "file"), "w") as f:
        f.write("content\n")
    os.chmod(os.path.join(root, "data", "file"), 0o640)
    os.chown(os.path.join(root, "data", "file"), 123, 456)
    os.utime(os.path.join(root, "data", "file"), (1_000_000, 1_000_000))
    os.link(os.path.join(root, "data", "file"), os.path.join(root, "data", "sub", "hard"))
    os.symlink("/etc/shadow", os.path.join(root, "data", "abs-link"))  # copied as a link, never followed
    os.mkfifo(os.path.join(root, "data", "fifo"))
    os.mknod(os.path.join(root, "data", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(os.path.join(root, "data", "file"), "user.note", b"kept")
    os.chmod(os.path.join(root, "data"), 0o711)
    os.chown(os.path.join(root, "data"), 7, 8)
    with open(os.path.join(root, "etc", "only-in-image"), "w") as f:
        f.write("image\n")


def test_populate_copies_like_docker(tmp_path: Any) -> None:
    image = str(tmp_path / "rootfs")
    _image_tree(image)
    store = VolumeStore(str(tmp_path / "volumes"))
    vol, _ = store.create("vol")
    assert store.populate("vol", image, "/data")
    d = vol.mountpoint
    st = os.stat(d)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 7, 8)  # the top dir's owner and mode
    f = os.stat(os.path.join(d, "file"))
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime) == (0o640, 123, 456, 1_000_000)
    assert open(os.path.join(d, "file")).read() == "content\n"
    assert os.stat(os.path.join(d, "sub", "hard")).st_ino == f.st_ino  # hard links stay links
    assert os.readlink(os.path.join(d, "abs-link")) == "/etc/shadow"
    assert stat.S_ISFIFO(os.lstat(os.path.join(d, "fifo")).st_mode)
    null = os.lstat(os.path.join(d, "null"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert os.getxattr(os.path.join(d, "file"), "user.note") == b"kept"
    # not empty any more: never filled again
    with open(os.path.join(image, "data", "new"), "w") as fh:
        fh.write("later")
    assert not store.populate("vol", image, "/data")
    assert not os.path.exists(os.path.join(d, "new"))


def test_populate_resolves_inside_the_image(tmp_path: Any) -> None:
    image = str(tmp_path / "rootfs")
    _image_tree(image)
    os.symlink("/etc", os.path.join(image, "link-to-etc"))  # the image's /etc, not the host's
    os.symlink("../../../../../../etc", os.path.join(image, "climb"))
    store = VolumeStore(str(tmp_path / "volumes"))
    for name, path in (("one", "/link-to-etc"), ("two", "/climb"), ("three", "/../../etc")):
        vol, _ = store.create(name)
        assert store.populate(name, image, path)
        assert os.listdir(vol.mountpoint) == ["only-in-image"], path
    store.create("none")
    assert not store.populate("none", image, "/missing")
    assert not store.populate("none", image, "/data/file")  # not a directory
    assert os.listdir(store.data_dir("none")) == []


def test_copy_into_an_existing_directory_refuses_clashes(tmp_path: Any) -> None:
    image = str(tmp_path / "rootfs")
    _image_tree(image)
    dest = str(tmp_path / "dest")
    os.makedirs(os.path.join(dest, "file"))
    with pytest.raises(VolumeError, match="cannot copy /data"):
        copy_tree_in_root(image, "/data", dest)


def test_records_are_json(tmp_path: Any) -> None:
    store = VolumeStore(str(tmp_path / "volumes"))
    store.create("data", labels={"a": "1"})
    with open(os.path.join(store.root, "data", "volume.json")) as f:
        doc = json.load(f)
    assert doc["Name"] == "data" and doc["Labels"] == {"a": "1"} and doc["Anonymous"] is False
