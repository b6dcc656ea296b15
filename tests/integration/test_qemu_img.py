"""cocon.storage.qemu_img against the real qemu-img (and qemu-io to write and read guest data)."""

from __future__ import annotations

import os
import struct
import subprocess
from typing import Any

import pytest

from cocon.storage import qemu_img
from cocon.storage.qemu_img import DiskError
from cocon.storage.volumes import VolumeError, VolumeStore


def qemu_io(path: str, command: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", fmt, "-c", command, path], capture_output=True, text=True, check=True
    )


def reads(path: str, pattern: int, offset: int, length: int, fmt: str = "qcow2") -> bool:
    out = qemu_io(path, f"read -P {pattern:#x} {offset} {length}", fmt).stdout
    return "Pattern verification failed" not in out


def listing(d: Any) -> list[str]:
    return sorted(os.listdir(d))


def test_create_info_resize_convert(tmp_path: Any) -> None:
    disk = str(tmp_path / "a.qcow2")
    info = qemu_img.create(disk, "64M")
    assert (info.format, info.virtual_size, info.backing_file, info.snapshots) == (
        "qcow2",
        64 << 20,
        None,
        [],
    )
    assert info.actual_size < 1 << 20  # nothing allocated yet
    assert listing(tmp_path) == ["a.qcow2"]  # no temporary names left
    with pytest.raises(DiskError, match="already exists"):
        qemu_img.create(disk, "1G")
    assert qemu_img.info(disk).virtual_size == 64 << 20  # untouched
    qemu_io(disk, "write -P 0x5a 1M 64k")
    # grow only
    assert qemu_img.resize(disk, "128M").virtual_size == 128 << 20
    with pytest.raises(DiskError, match=r"cannot shrink .* from 128M to 32M"):
        qemu_img.resize(disk, "32M")
    assert qemu_img.resize(disk, 128 << 20).virtual_size == 128 << 20
    assert reads(disk, 0x5A, 1 << 20, 64 << 10)
    # convert: raw copy has the data; zeros take no space in a qcow2 copy
    raw = str(tmp_path / "a.raw")
    assert qemu_img.convert(disk, raw, "raw").format == "raw"
    assert reads(raw, 0x5A, 1 << 20, 64 << 10, fmt="raw") and reads(raw, 0, 0, 1 << 20, fmt="raw")
    back = qemu_img.convert(raw, str(tmp_path / "b.qcow2"), "qcow2")
    assert back.format == "qcow2" and back.actual_size < 2 << 20
    with pytest.raises(DiskError, match="already exists"):
        qemu_img.convert(raw, str(tmp_path / "b.qcow2"))
    with pytest.raises(DiskError, match="unsupported disk format 'vmdk'"):
        qemu_img.convert(raw, str(tmp_path / "c.vmdk"), "vmdk")
    assert listing(tmp_path) == ["a.qcow2", "a.raw", "b.qcow2"]
    assert qemu_img.check(disk).checked and not qemu_img.check(raw).checked


def test_overlay_keeps_writes_to_itself(tmp_path: Any) -> None:
    base = str(tmp_path / "base.qcow2")
    qemu_img.create(base, "16M")
    qemu_io(base, "write -P 0x11 0 64k")
    top = qemu_img.create(str(tmp_path / "top.qcow2"), None, backing=base)
    assert top.backing_file == base and top.virtual_size == 16 << 20
    qemu_io(top.path, "write -P 0x22 0 4k")
    assert reads(top.path, 0x22, 0, 4096) and reads(top.path, 0x11, 4096, 60 << 10)
    assert reads(base, 0x11, 0, 64 << 10)  # the base did not change
    with pytest.raises(DiskError, match="no size given"):
        qemu_img.create(str(tmp_path / "nosize.qcow2"), None)


def test_failures_carry_stderr_and_missing_qemu_img(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    notimg = tmp_path / "dir"
    notimg.mkdir()
    with pytest.raises(DiskError, match=r"creating disk image .* failed: .*") as exc:
        qemu_img.create(str(notimg / "missing-dir" / "x.qcow2"), "1M")
    assert "No such file or directory" in str(exc.value)
    with pytest.raises(DiskError, match="does not exist"):
        qemu_img.info(str(tmp_path / "nothing.qcow2"))
    monkeypatch.setattr(qemu_img, "QEMU_IMG", "qemu-img-not-installed-here")
    with pytest.raises(DiskError, match=r"apt-get install qemu-utils"):
        qemu_img.create(str(tmp_path / "x.qcow2"), "1M")


# --- user disks ------------------------------------------------------------------------------------------
def test_user_disks_accepted(tmp_path: Any) -> None:
    raw = tmp_path / "disk.img"
    with open(raw, "wb") as f:
        f.truncate(8 << 20)
    # the extension says nothing: qemu-img decides
    q = str(tmp_path / "disk.raw")
    qemu_img.create(q, "32M")
    assert qemu_img.inspect_user_disk(str(raw)).format == "raw"
    info = qemu_img.inspect_user_disk(q)
    assert info.format == "qcow2" and info.virtual_size == 32 << 20


def test_user_disks_refused(tmp_path: Any) -> None:
    with pytest.raises(DiskError, match="does not exist"):
        qemu_img.inspect_user_disk(str(tmp_path / "missing.qcow2"))
    with pytest.raises(DiskError, match="is a directory"):
        qemu_img.inspect_user_disk(str(tmp_path))
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    with pytest.raises(DiskError, match="not a regular file"):
        qemu_img.inspect_user_disk(fifo)
    empty = tmp_path / "empty.qcow2"
    empty.write_bytes(b"")
    with pytest.raises(DiskError, match="empty file"):
        qemu_img.inspect_user_disk(str(empty))
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"#!/bin/sh\necho not a disk\n")
    with pytest.raises(DiskError, match="less than one disk sector"):
        qemu_img.inspect_user_disk(str(tiny))
    vmdk = str(tmp_path / "disk.qcow2")  # named qcow2, is vmdk
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", vmdk, "8M"], check=True)
    with pytest.raises(DiskError, match=r"is a vmdk image: .*qemu-img convert -O qcow2"):
        qemu_img.inspect_user_disk(vmdk)


def test_user_disk_with_backing_file_is_refused(tmp_path: Any) -> None:
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"s" * 4096)
    evil = str(tmp_path / "evil.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw", evil], check=True
    )
    with pytest.raises(DiskError, match=r"backing files are refused .*qemu-img convert -O qcow2 .* OUT"):
        qemu_img.inspect_user_disk(evil)
    # flattened as the message says, it is accepted and holds the data
    flat = str(tmp_path / "flat.qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", evil, flat], check=True)
    assert qemu_img.inspect_user_disk(flat).backing_file is None
    assert reads(flat, ord("s"), 0, 4096)
    # an external data file is another way to name a host path
    ext = str(tmp_path / "ext.qcow2")
    opts = f"data_file={secret},data_file_raw=on"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, ext, "4096"], check=True)
    with pytest.raises(DiskError, match=r"external data files are refused .*qemu-img convert -O qcow2"):
        qemu_img.inspect_user_disk(ext)


def test_corrupt_qcow2_is_refused(tmp_path: Any) -> None:
    disk = str(tmp_path / "damaged.qcow2")
    qemu_img.create(disk, "16M")
    qemu_io(disk, "write -P 0xab 0 1M")
    assert qemu_img.inspect_user_disk(disk).format == "qcow2"
    with open(disk, "r+b") as f:  # zero the refcount table's first entry (its offset is in the header)
        f.seek(48)
        (offset,) = struct.unpack(">Q", f.read(8))
        f.seek(offset)
        f.write(b"\0" * 8)
    with pytest.raises(DiskError, match=r"is corrupt \(\d+ corruptions.*qemu-img check -r all"):
        qemu_img.inspect_user_disk(disk)
    with pytest.raises(DiskError, match="is corrupt"):
        qemu_img.check(disk)
    # a header beyond repair: qemu-img cannot even open it
    broken = str(tmp_path / "broken.qcow2")
    qemu_img.create(broken, "16M")
    with open(broken, "r+b") as f:
        f.seek(20)
        f.write(struct.pack(">I", 40))  # cluster_bits 40: invalid
    with pytest.raises(
        DiskError, match=r"looks like a qcow2 image but cannot be opened.*qemu-img check -r all"
    ):
        qemu_img.inspect_user_disk(broken)


# --- snapshots -------------------------------------------------------------------------------------------
def test_snapshots(tmp_path: Any) -> None:
    disk = str(tmp_path / "vm.qcow2")
    qemu_img.create(disk, "16M")
    qemu_io(disk, "write -P 0x01 0 64k")
    snap = qemu_img.snapshot_create(disk, "before")
    assert snap.name == "before" and snap.vm_state_size == 0 and snap.date > 1.7e9
    with pytest.raises(DiskError, match="already has a snapshot named 'before'"):
        qemu_img.snapshot_create(disk, "before")
    with pytest.raises(DiskError, match="invalid snapshot name"):
        qemu_img.snapshot_create(disk, "../x")
    qemu_io(disk, "write -P 0x02 0 64k")
    qemu_img.snapshot_create(disk, "after")
    assert [s.name for s in qemu_img.snapshot_list(disk)] == ["before", "after"]
    assert [s.name for s in qemu_img.info(disk).snapshots] == ["before", "after"]
    qemu_img.snapshot_apply(disk, "before")
    assert reads(disk, 0x01, 0, 64 << 10)
    qemu_img.snapshot_apply(disk, "after")
    assert reads(disk, 0x02, 0, 64 << 10)
    with pytest.raises(DiskError, match=r"has no snapshot named 'nope' \(it has: before, after\)"):
        qemu_img.snapshot_apply(disk, "nope")
    qemu_img.snapshot_delete(disk, "before")
    assert [s.name for s in qemu_img.snapshot_list(disk, force_share=True)] == ["after"]
    with pytest.raises(DiskError, match="has no snapshot named 'before'"):
        qemu_img.snapshot_delete(disk, "before")
    with pytest.raises(DiskError, match="internal snapshots"):
        qemu_img.resize(disk, "32M")
    raw = str(tmp_path / "vm.raw")
    qemu_img.convert(disk, raw, "raw")
    with pytest.raises(DiskError, match="snapshots need qcow2"):
        qemu_img.snapshot_create(raw, "x")


# --- disk volumes in the volume store ---------------------------------------------------------------------
def test_volume_store_disk_volumes(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    store = VolumeStore(str(tmp_path / "volumes"))
    vol, new = store.create("vmdisk", type="disk", size=32 << 20, labels={"k": "v"})
    assert new and (vol.type, vol.size, vol.labels) == ("disk", 32 << 20, {"k": "v"})
    assert vol.disk_path == vol.mountpoint == str(tmp_path / "volumes" / "vmdisk" / "disk.qcow2")
    assert qemu_img.info(vol.mountpoint).virtual_size == 32 << 20
    assert store.get("vmdisk") == vol and [v.name for v in store.list()] == ["vmdisk"]
    again, new = store.create("vmdisk")  # no type asked: the existing volume, whatever it is
    assert not new and again == vol
    with pytest.raises(VolumeError, match="already exists as a disk volume"):
        store.create("vmdisk", type="dir")
    with pytest.raises(VolumeError, match="disk volumes attach to VMs only"):
        store.populate("vmdisk", str(tmp_path), "/etc")
    with pytest.raises(VolumeError, match="disk volumes attach to VMs only"):
        store.is_empty("vmdisk")
    with pytest.raises(VolumeError, match="needs a size"):
        store.create("nosize", type="disk")
    with pytest.raises(VolumeError, match="disk volumes only"):
        store.create("dirsize", size=1 << 20)
    with pytest.raises(VolumeError, match="unknown volume type"):
        store.create("weird", type="block")
    # qemu-img failing half-way leaves nothing behind
    monkeypatch.setattr(qemu_img, "QEMU_IMG", "qemu-img-not-installed-here")
    with pytest.raises(DiskError, match="apt-get install qemu-utils"):
        store.create("broken", type="disk", size=1 << 20)
    assert sorted(os.listdir(store.root)) == [".lock", "vmdisk"]
    assert [size > 0 for _, size in store.prune(all=True)] == [True]
    assert sorted(os.listdir(store.root)) == [".lock"]
