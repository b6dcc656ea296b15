"""cocon.storage.vm_disks with the real mkfs.ext4 and qemu-img: base disks built from a rootfs keep what
the image's files are (read back with debugfs), builds are atomic and shared between processes,
instance overlays keep their writes to themselves, and garbage collection spares what is in use."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from cocon.storage import qemu_img
from cocon.storage.qemu_img import DiskError
from cocon.storage.vm_disks import ROOT_LABEL, VmDisks, qcow2_backing_file

IMAGE = "sha256:" + "1f" * 32
OTHER = "sha256:" + "2e" * 32
THIRD = "3d" * 32
SMALL = 32 << 20


def make_rootfs(root: str) -> None:
    """A small root filesystem with what an image's files can be: owners, modes (setuid, sticky),
    device nodes, a fifo, symlinks, hard links, extended attributes (user, trusted, file caps)."""
    os.makedirs(root)
    for d in ("bin", "etc", "dev", "tmp", "home/user"):
        os.makedirs(os.path.join(root, d))
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    with open(os.path.join(root, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    with open(os.path.join(root, "bin/tool"), "wb") as f:
        f.write(b"\x7fELF" + b"x" * 5000)
    os.chmod(os.path.join(root, "bin/tool"), 0o4755)
    os.link(os.path.join(root, "bin/tool"), os.path.join(root, "bin/tool-alias"))
    os.symlink("tool", os.path.join(root, "bin/sym"))
    os.symlink("/etc/passwd", os.path.join(root, "etc/abs-link"))
    with open(os.path.join(root, "home/user/notes"), "w") as f:
        f.write("mine\n")
    os.chmod(os.path.join(root, "home/user/notes"), 0o600)
    os.chown(os.path.join(root, "home/user/notes"), 1000, 1000)
    os.chown(os.path.join(root, "home/user"), 1000, 1000)
    os.chmod(os.path.join(root, "home/user"), 0o750)
    os.mknod(os.path.join(root, "dev/null"), 0o20666, os.makedev(1, 3))
    os.mknod(os.path.join(root, "dev/sda"), 0o60660, os.makedev(8, 0))
    os.chown(os.path.join(root, "dev/sda"), 0, 6)
    os.chmod(os.path.join(root, "dev/null"), 0o666)  # mknod's mode went through the umask
    os.chmod(os.path.join(root, "dev/sda"), 0o660)
    os.mkfifo(os.path.join(root, "dev/initctl"), 0o600)
    os.setxattr(os.path.join(root, "etc/passwd"), "user.origin", b"cocon-test")
    os.setxattr(os.path.join(root, "etc/passwd"), "trusted.mark", b"t1")
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_bind_service, v2
    os.setxattr(os.path.join(root, "bin/tool"), "security.capability", cap)


def to_raw(qcow2: str, raw: str) -> str:
    if os.path.exists(raw):
        os.unlink(raw)
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", qcow2, raw], check=True)
    return raw


def debugfs(raw: str, request: str) -> str:
    p = subprocess.run(["debugfs", "-R", request, raw], capture_output=True, text=True, check=True)
    return p.stdout


def fs_stat(raw: str, path: str) -> dict[str, Any]:
    out = debugfs(raw, f"stat {path}")
    m = re.search(r"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)", out)
    assert m, f"{path} not in the filesystem: {out}"
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    links = re.search(r"Links: (\d+)", out)
    assert owner and links
    return {
        "inode": int(m[1]),
        "type": m[2],
        "mode": int(m[3], 8),
        "uid": int(owner[1]),
        "gid": int(owner[2]),
        "links": int(links[1]),
        "text": out,
    }


@pytest.fixture
def rootfs(tmp_path: Any) -> str:
    root = str(tmp_path / "rootfs")
    make_rootfs(root)
    return root


def leftovers(disks: VmDisks) -> list[str]:
    return sorted(n for n in os.listdir(disks.images_dir) if n.startswith(".build-") or ".tmp-" in n)


def test_base_disk_keeps_the_image_files(tmp_path: Any, rootfs: str) -> None:
    os.chmod(rootfs, 0o711)
    disks = VmDisks(str(tmp_path / "disks"))
    said: list[str] = []
    base = disks.image_base(IMAGE, rootfs, size=SMALL, progress=said.append)
    assert base == os.path.join(disks.root, "images", "1f" * 32 + f".{SMALL}.qcow2")  # a base per size
    assert said and "ext4" in said[0]
    info = qemu_img.info(base)
    assert (info.format, info.virtual_size, info.backing_file) == ("qcow2", SMALL, None)
    assert info.actual_size < SMALL // 2  # sparse: free space takes nothing
    assert leftovers(disks) == []
    raw = to_raw(base, str(tmp_path / "base.raw"))
    # a whole-disk ext4 (no partition table) with its label, clean
    blkid = subprocess.run(["blkid", "-p", "-o", "export", raw], capture_output=True, text=True).stdout
    assert "TYPE=ext4" in blkid and f"LABEL={ROOT_LABEL}" in blkid and "PTTYPE" not in blkid
    assert subprocess.run(["e2fsck", "-fn", raw], capture_output=True).returncode == 0
    top = fs_stat(raw, "/")
    assert (top["mode"] & 0o7777, top["uid"]) == (0o711, 0)
    assert fs_stat(raw, "/tmp")["mode"] & 0o7777 == 0o1777
    tool = fs_stat(raw, "/bin/tool")
    alias = fs_stat(raw, "/bin/tool-alias")
    assert tool["mode"] & 0o7777 == 0o4755 and tool["inode"] == alias["inode"] and tool["links"] == 2
    notes = fs_stat(raw, "/home/user/notes")
    assert (notes["uid"], notes["gid"], notes["mode"] & 0o7777) == (1000, 1000, 0o600)
    home = fs_stat(raw, "/home/user")
    assert (home["uid"], home["mode"] & 0o7777) == (1000, 0o750)
    assert 'Fast link dest: "tool"' in fs_stat(raw, "/bin/sym")["text"]
    assert 'Fast link dest: "/etc/passwd"' in fs_stat(raw, "/etc/abs-link")["text"]
    null = fs_stat(raw, "/dev/null")
    assert (
        null["type"] == "character special"
        and null["mode"] & 0o777 == 0o666
        and "Device major/minor number: 01:03" in null["text"]
    )
    sda = fs_stat(raw, "/dev/sda")
    assert sda["type"] == "block special" and (sda["gid"], sda["mode"] & 0o777) == (6, 0o660)
    assert fs_stat(raw, "/dev/initctl")["type"] == "FIFO"
    xattrs = debugfs(raw, "ea_list /etc/passwd")
    assert 'user.origin (10) = "cocon-test"' in xattrs and 'trusted.mark (2) = "t1"' in xattrs
    assert "security.capability (20) = 01 00 00 02 00 20" in debugfs(raw, "ea_list /bin/tool")
    assert debugfs(raw, "cat /home/user/notes") == "mine\n"


def test_base_is_built_once_and_ids_are_checked(tmp_path: Any, rootfs: str) -> None:
    disks = VmDisks(str(tmp_path / "disks"))
    assert disks.cached_image_base(IMAGE, SMALL) is None
    base = disks.image_base(IMAGE, rootfs, size=SMALL)
    assert disks.cached_image_base(IMAGE, SMALL) == base and disks.cached_image_base(IMAGE) is None
    st = os.stat(base)
    said: list[str] = []
    assert disks.image_base("1f" * 32, rootfs, size=SMALL, progress=said.append) == base
    assert said == [] and os.stat(base).st_mtime_ns == st.st_mtime_ns
    assert disks.list_images() == ["1f" * 32]
    for bad in ("../../etc/passwd", "sha256:../x", "latest", "sha256:" + "AB" * 32):
        with pytest.raises(DiskError, match="invalid image ID"):
            disks.image_base(bad, rootfs)
    with pytest.raises(DiskError, match="not a directory"):
        disks.image_base(OTHER, str(tmp_path / "missing"), size=SMALL)
    with pytest.raises(DiskError, match="invalid root disk size"):
        disks.image_base(OTHER, rootfs, size=1024)


def test_rootfs_too_large_for_the_disk(tmp_path: Any, rootfs: str) -> None:
    with open(os.path.join(rootfs, "big"), "wb") as f:
        f.write(os.urandom(20 << 20))
    disks = VmDisks(str(tmp_path / "disks"))
    with pytest.raises(DiskError, match=r"do not fit in a root disk of 16M .*--disk-size"):
        disks.image_base(IMAGE, rootfs, size=16 << 20)
    assert not os.path.exists(disks.image_path(IMAGE, 16 << 20)) and leftovers(disks) == []
    # a failure anywhere (here: the caller's progress callback) leaves nothing either

    def boom(_: str) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        disks.image_base(IMAGE, rootfs, size=64 << 20, progress=boom)
    assert not os.path.exists(disks.image_path(IMAGE, 64 << 20)) and leftovers(disks) == []
    assert disks.image_base(IMAGE, rootfs, size=64 << 20) == disks.image_path(IMAGE, 64 << 20)


BUILDER = """
import json, os, sys, time
from cocon.storage.vm_disks import VmDisks
root, rootfs, image, start = sys.argv[1:]
while not os.path.exists(start):
    time.sleep(0.002)
said = []
def progress(text):
    said.append(text)
    time.sleep(0.3)  # hold the build lock long enough for the other process to arrive
path = VmDisks(root).image_base(image, rootfs, size=32 << 20, progress=progress)
print(json.dumps({"path": path, "built": bool(said)}))
"""


def test_concurrent_builds_share_one_base(tmp_path: Any, rootfs: str) -> None:
    root = str(tmp_path / "disks")
    start = str(tmp_path / "go")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, root, rootfs, IMAGE, start], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    try:
        time.sleep(0.2)
        open(start, "w").close()
        results = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs)
    assert results[0]["path"] == results[1]["path"] == VmDisks(root).image_path(IMAGE, 32 << 20)
    assert sorted(r["built"] for r in results) == [False, True]  # one built, the other waited and reused
    assert qemu_img.check(results[0]["path"]).corruptions == 0
    assert leftovers(VmDisks(root)) == []


def test_instance_overlays(tmp_path: Any, rootfs: str) -> None:
    disks = VmDisks(str(tmp_path / "disks"))
    base = disks.image_base(IMAGE, rootfs, size=SMALL)
    base_bytes = open(base, "rb").read()
    a = disks.instance_disk("aaaa01", base)
    b = disks.instance_disk("bbbb02", base, size=64 << 20)
    assert a == os.path.join(disks.root, "instances", "aaaa01", "root.qcow2")
    ia, ib = qemu_img.info(a), qemu_img.info(b)
    assert (ia.backing_file, ia.virtual_size) == (base, SMALL)
    assert (ib.backing_file, ib.virtual_size) == (base, 64 << 20)
    assert qcow2_backing_file(a) == base
    with pytest.raises(DiskError, match=r"smaller than the image's root disk .*--disk-size 32M"):
        disks.instance_disk("cccc03", base, size=16 << 20)
    assert disks.list_instances() == [
        "aaaa01",
        "bbbb02",
    ]  # the refused one made nothing
    # write a file into A's filesystem (through its overlay), as a running guest would
    raw = to_raw(a, str(tmp_path / "a.raw"))
    subprocess.run(["debugfs", "-w", "-R", "mkdir /root-was-here", raw], check=True, capture_output=True)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", raw, a], check=True)
    os.unlink(raw)
    assert "root-was-here" in debugfs(to_raw(a, str(tmp_path / "a2.raw")), "ls /")
    assert "root-was-here" not in debugfs(to_raw(b, str(tmp_path / "b.raw")), "ls /")
    assert open(base, "rb").read() == base_bytes  # the shared base is untouched
    # an existing overlay is returned as it is: the VM's disk persists across stop and start
    mtime = os.stat(a).st_mtime_ns
    assert disks.instance_disk("aaaa01", base, size=128 << 20) == a
    assert os.stat(a).st_mtime_ns == mtime and qemu_img.info(a).virtual_size == SMALL
    assert "root-was-here" in debugfs(to_raw(a, str(tmp_path / "a3.raw")), "ls /")
    for bad in ("../x", "a/b", ""):
        with pytest.raises(DiskError, match="invalid instance ID"):
            disks.instance_disk(bad, base)
    disks.remove_instance("aaaa01")
    disks.remove_instance("aaaa01")  # absent: no error
    assert "aaaa01" not in disks.list_instances() and os.path.exists(base)


def test_gc_images_spares_what_is_in_use(tmp_path: Any, rootfs: str) -> None:
    disks = VmDisks(str(tmp_path / "disks"))
    used = disks.image_base(IMAGE, rootfs, size=SMALL)
    other = disks.image_base(OTHER, rootfs, size=SMALL)
    third = disks.image_base(THIRD, rootfs, size=SMALL)
    disks.instance_disk("vm1", other)  # OTHER's image is gone, but vm1's overlay still needs its base
    stale = os.path.join(disks.images_dir, f".build-{'1f' * 32}-deadbeef")
    os.mkdir(stale)  # what a killed build left
    assert disks.gc_images({IMAGE}) == [THIRD]
    assert os.path.exists(used) and os.path.exists(other) and not os.path.exists(third)
    assert not os.path.exists(stale)
    assert disks.gc_images({IMAGE}) == []
    disks.remove_instance("vm1")
    assert disks.gc_images({IMAGE}) == ["2e" * 32]
    assert disks.list_images() == ["1f" * 32]
    assert disks.gc_images(set()) == ["1f" * 32] and disks.list_images() == []
    assert sorted(os.listdir(disks.images_dir)) == []
