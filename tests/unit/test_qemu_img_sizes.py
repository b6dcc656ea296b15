"""Pure pieces of the VM disk code: sizes, names and IDs, driver options of disk volumes, reading a
qcow2 header's backing file (cocon.storage.qemu_img, cocon.storage.vm_disks, cocon.storage.volumes)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from cocon.storage.qemu_img import DiskError, format_size, parse_size, validate_snapshot_name
from cocon.storage.vm_disks import image_key, qcow2_backing_file, validate_instance_id
from cocon.storage.volumes import Volume, VolumeError, parse_driver_opts


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1 << 20),
        ("512", 512),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("10G", 10 << 30),
        ("10GB", 10 << 30),
        ("10GiB", 10 << 30),
        ("1T", 1 << 40),
        ("1.5G", 3 << 29),
        (" 2G ", 2 << 30),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["0", "0G", "-1", "-5G", "", "G", "10X", "ten", "1.2.3G", "10 G B", "0x10", True, 0, -3]
)
def test_parse_size_refuses(bad: Any) -> None:
    with pytest.raises(DiskError, match="size"):
        parse_size(bad)


def test_parse_size_refuses_absurd_sizes() -> None:
    with pytest.raises(DiskError, match="at most"):
        parse_size("99999999T")


def test_disk_error_is_a_storage_error() -> None:
    assert issubclass(DiskError, VolumeError)


def test_format_size() -> None:
    assert format_size(10 << 30) == "10G"
    assert format_size(3 << 29) == "1.5G"
    assert format_size(512 << 20) == "512M"
    assert format_size(100) == "100B"


def test_snapshot_names() -> None:
    for good in ("a", "before-upgrade", "v1.2_x", "A" * 63):
        assert validate_snapshot_name(good) == good
    for bad in ("", "-a", ".a", "a b", "a/b", "A" * 64, "ü", "a\n"):
        with pytest.raises(DiskError, match="invalid snapshot name"):
            validate_snapshot_name(bad)


def test_image_keys_and_instance_ids() -> None:
    hex64 = "ab" * 32
    assert image_key(f"sha256:{hex64}") == hex64
    assert image_key(hex64) == hex64
    for bad in ("../etc", f"sha256:{hex64}/..", "sha512:" + hex64, hex64.upper(), "abc", "", f"{hex64}\n"):
        with pytest.raises(DiskError, match="invalid image ID"):
            image_key(bad)
    assert validate_instance_id("c0ffee" * 10) == "c0ffee" * 10
    for bad in ("", ".", "..", "../x", "a/b", "-a", "x" * 129):
        with pytest.raises(DiskError, match="invalid instance ID"):
            validate_instance_id(bad)


def test_driver_opts() -> None:
    assert parse_driver_opts(None) == (None, None)
    assert parse_driver_opts({}) == (None, None)
    assert parse_driver_opts({"type": "disk", "size": "10G"}) == ("disk", 10 << 30)
    assert parse_driver_opts({"type": "dir"}) == ("dir", None)
    with pytest.raises(VolumeError, match=r"unsupported volume driver option\(s\) device, o"):
        parse_driver_opts({"o": "bind", "device": "/x", "type": "disk"})
    with pytest.raises(VolumeError, match="unknown volume type 'tmpfs'"):
        parse_driver_opts({"type": "tmpfs"})
    with pytest.raises(DiskError, match="invalid size"):
        parse_driver_opts({"type": "disk", "size": "lots"})


def test_disk_volume_to_docker() -> None:
    vol = Volume(name="d1", mountpoint="/v/d1/disk.qcow2", created="t", labels={}, anonymous=False,
                 type="disk", size=10 << 30)  # fmt: skip
    doc = vol.to_docker()
    assert doc["Options"] == {"type": "disk", "size": str(10 << 30)}
    assert vol.disk_path == "/v/d1/disk.qcow2"
    plain = Volume(name="d2", mountpoint="/v/d2/_data", created="t", labels={}, anonymous=False)
    assert plain.type == "dir" and plain.size is None and plain.disk_path is None
    assert plain.to_docker()["Options"] == {}


def test_backing_file_from_a_qcow2_header(tmp_path: Any) -> None:
    name = b"/var/lib/cocon/disks/images/abc.qcow2"
    header = bytearray(512)
    header[:4] = b"QFI\xfb"
    header[4:8] = struct.pack(">I", 3)
    header[8:20] = struct.pack(">QI", 400, len(name))
    header[400 : 400 + len(name)] = name
    p = tmp_path / "overlay.qcow2"
    p.write_bytes(bytes(header))
    assert qcow2_backing_file(str(p)) == name.decode()
    header[8:20] = struct.pack(">QI", 0, 0)
    p.write_bytes(bytes(header))
    assert qcow2_backing_file(str(p)) is None
    p.write_bytes(b"not a qcow2 image at all")
    assert qcow2_backing_file(str(p)) is None
