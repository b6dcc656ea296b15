"""cocon.vmm.firmware with fake firmware directories, and cocon.vmm.media on real files: an ISO made
by make_seed, a non-ISO file, an empty file, a directory, a missing path, qcow2 and raw disks."""

from __future__ import annotations

import os
import struct
import subprocess

import pytest

from cocon.vmm.cloud_init import make_seed
from cocon.vmm.errors import VmmError
from cocon.vmm.firmware import (
    OVMF_CODE,
    OVMF_VARS,
    SEABIOS_BIN,
    VARS_FILE,
    Firmware,
    FirmwareError,
    parse_firmware,
    resolve_firmware,
)
from cocon.vmm.media import MediaError, check_disk, check_iso

# --- firmware -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_ovmf(tmp_path: str) -> str:
    d = os.path.join(str(tmp_path), "OVMF")
    os.mkdir(d)
    with open(os.path.join(d, OVMF_CODE), "wb") as f:
        f.write(b"C" * 4096)
    with open(os.path.join(d, OVMF_VARS), "wb") as f:
        f.write(b"V" * 1024)
    return d


@pytest.fixture
def fake_seabios(tmp_path: str) -> str:
    d = os.path.join(str(tmp_path), "seabios")
    os.mkdir(d)
    with open(os.path.join(d, SEABIOS_BIN), "wb") as f:
        f.write(b"B" * 512)
    return d


def test_parse_firmware() -> None:
    assert parse_firmware("bios") is Firmware.BIOS
    assert parse_firmware(" UEFI ") is Firmware.UEFI
    assert parse_firmware(Firmware.UEFI) is Firmware.UEFI
    with pytest.raises(FirmwareError, match=r"unknown firmware 'efi': use one of bios, uefi") as info:
        parse_firmware("efi")
    assert isinstance(info.value, VmmError)


def test_bios_is_qemus_default(tmp_path: str, fake_seabios: str) -> None:
    spec = resolve_firmware("bios", os.path.join(str(tmp_path), "vm"), seabios_dir=fake_seabios)
    assert spec.kind is Firmware.BIOS and spec.args == () and spec.vars is None
    assert spec.code == os.path.join(fake_seabios, SEABIOS_BIN)
    assert not os.path.exists(os.path.join(str(tmp_path), "vm"))  # bios needs no per-VM state


def test_bios_missing(tmp_path: str) -> None:
    with pytest.raises(FirmwareError, match=r"firmware bios is not installed .*: apt-get install seabios"):
        resolve_firmware("bios", str(tmp_path), seabios_dir=os.path.join(str(tmp_path), "none"))


def test_uefi_args_and_persistent_vars(tmp_path: str, fake_ovmf: str) -> None:
    vars_dir = os.path.join(str(tmp_path), "vm", "firmware")
    spec = resolve_firmware("uefi", vars_dir, ovmf_dir=fake_ovmf)
    vars_path = os.path.join(vars_dir, VARS_FILE)
    assert spec.kind is Firmware.UEFI and spec.machine == "q35"
    assert spec.code == os.path.join(fake_ovmf, OVMF_CODE) and spec.vars == vars_path
    assert spec.args == (
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={fake_ovmf}/{OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={vars_path}",
    )
    assert spec.qemu_args() == list(spec.args)
    assert os.stat(vars_dir).st_mode & 0o777 == 0o700
    with open(vars_path, "rb") as f:
        assert f.read() == b"V" * 1024  # a copy of the template
    assert sorted(os.listdir(vars_dir)) == [VARS_FILE]
    # the guest writes variables; a later start keeps them
    with open(vars_path, "r+b") as f:
        f.write(b"written by the guest")
    again = resolve_firmware(Firmware.UEFI, vars_dir, ovmf_dir=fake_ovmf)
    assert again == spec
    with open(vars_path, "rb") as f:
        assert f.read(20) == b"written by the guest"


def test_uefi_commas_in_paths_are_escaped(tmp_path: str, fake_ovmf: str) -> None:
    vars_dir = os.path.join(str(tmp_path), "a,b")
    spec = resolve_firmware("uefi", vars_dir, ovmf_dir=fake_ovmf)
    assert spec.args[3].endswith("file=" + os.path.join(str(tmp_path), "a,,b", VARS_FILE))
    assert spec.vars == os.path.join(vars_dir, VARS_FILE)


def test_uefi_missing(tmp_path: str, fake_ovmf: str) -> None:
    expected = "firmware uefi is not installed .*: apt-get install ovmf"
    with pytest.raises(FirmwareError, match=expected):
        resolve_firmware("uefi", str(tmp_path), ovmf_dir=os.path.join(str(tmp_path), "none"))
    os.unlink(os.path.join(fake_ovmf, OVMF_VARS))
    with pytest.raises(FirmwareError, match=expected):
        resolve_firmware("uefi", os.path.join(str(tmp_path), "vm"), ovmf_dir=fake_ovmf)
    assert not os.path.exists(os.path.join(str(tmp_path), "vm"))


def test_uefi_damaged_vars(tmp_path: str, fake_ovmf: str) -> None:
    vars_dir = os.path.join(str(tmp_path), "vm")
    os.mkdir(vars_dir)
    with open(os.path.join(vars_dir, VARS_FILE), "wb") as f:
        f.write(b"short")
    with pytest.raises(FirmwareError, match=r"is 5 bytes, not 1024 .* remove it to reset"):
        resolve_firmware("uefi", vars_dir, ovmf_dir=fake_ovmf)
    os.unlink(os.path.join(vars_dir, VARS_FILE))
    os.mkdir(os.path.join(vars_dir, VARS_FILE))
    with pytest.raises(FirmwareError, match="not a regular file"):
        resolve_firmware("uefi", vars_dir, ovmf_dir=fake_ovmf)


def test_unknown_kind(tmp_path: str) -> None:
    with pytest.raises(FirmwareError, match="use one of bios, uefi"):
        resolve_firmware("coreboot", str(tmp_path))


def test_the_installed_firmware(tmp_path: str) -> None:
    """Debian's seabios and ovmf packages (scripts/apt-packages.txt) are where the defaults point."""
    assert resolve_firmware("bios", "/nonexistent-unused").code == "/usr/share/seabios/bios-256k.bin"
    spec = resolve_firmware("uefi", str(tmp_path))
    assert spec.code == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert spec.vars is not None
    assert os.path.getsize(spec.vars) == os.path.getsize("/usr/share/OVMF/OVMF_VARS_4M.fd")


# --- media --------------------------------------------------------------------------------------------


@pytest.fixture
def iso(tmp_path: str) -> str:
    return make_seed(
        os.path.join(str(tmp_path), "real.iso"), user_data=b"#!/bin/sh\n", instance_id="i", hostname="h"
    )


def test_check_iso_accepts_a_real_iso(iso: str) -> None:
    info = check_iso(iso)
    assert info.path == iso and info.volume_id == "CIDATA" and not info.block_device
    assert info.size == os.path.getsize(iso)


def test_check_iso_through_a_symlink(iso: str, tmp_path: str) -> None:
    link = os.path.join(str(tmp_path), "link.iso")
    os.symlink(iso, link)
    assert check_iso(link).volume_id == "CIDATA"


def test_check_iso_accepts_a_block_device(iso: str) -> None:
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", iso], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        info = check_iso(dev)
        assert info.block_device and info.volume_id == "CIDATA" and info.size == os.path.getsize(iso)
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def test_check_iso_refuses_other_files(tmp_path: str, iso: str) -> None:
    d = str(tmp_path)
    not_iso = os.path.join(d, "disk.img")
    with open(not_iso, "wb") as f:
        f.write(os.urandom(64 * 1024))
    with pytest.raises(MediaError) as info:
        check_iso(not_iso)
    assert str(info.value) == (
        f"{not_iso} is not an ISO 9660 image (no CD001 signature): give an installer or live ISO"
    )
    assert isinstance(info.value, VmmError)

    short = os.path.join(d, "short.iso")
    with open(iso, "rb") as src, open(short, "wb") as f:
        f.write(src.read(32768 + 3))  # cut inside the signature
    with pytest.raises(MediaError, match="no CD001 signature"):
        check_iso(short)

    udf_only = os.path.join(d, "udf.iso")
    with open(udf_only, "wb") as f:
        f.write(b"\0" * 32768 + b"\0BEA01\x01" + b"\0" * 2041 + b"\0NSR02\x01" + b"\0" * 4096)
    with pytest.raises(MediaError, match="no CD001 signature"):
        check_iso(udf_only)

    no_pvd = os.path.join(d, "nopvd.iso")
    with open(no_pvd, "wb") as f:
        f.write(b"\0" * 32768 + b"\xffCD001\x01" + b"\0" * 2041)
    with pytest.raises(MediaError, match="no primary volume descriptor"):
        check_iso(no_pvd)

    empty = os.path.join(d, "empty.iso")
    open(empty, "wb").close()
    with pytest.raises(MediaError, match=r"is empty \(0 bytes\), not an ISO 9660 image: give an installer"):
        check_iso(empty)

    with pytest.raises(MediaError, match=r"is a directory, not an ISO image: give an installer or live ISO"):
        check_iso(d)

    missing = os.path.join(d, "nope.iso")
    with pytest.raises(MediaError, match=r"nope.iso does not exist: give an installer or live ISO"):
        check_iso(missing)

    with pytest.raises(MediaError, match="not a regular file or block device"):
        check_iso("/dev/null")

    with pytest.raises(MediaError, match="no ISO image given"):
        check_iso("")


def test_check_disk(tmp_path: str, iso: str) -> None:
    d = str(tmp_path)
    qcow2 = os.path.join(d, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow2, "1G"], check=True)
    info = check_disk(qcow2)
    assert info.format == "qcow2" and info.virtual_size == 1 << 30 and not info.block_device

    raw = os.path.join(d, "disk.raw")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, "64M"], check=True)
    info = check_disk(raw)
    assert info.format == "raw" and info.virtual_size == 64 << 20

    overlay = os.path.join(d, "overlay.qcow2")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", qcow2, overlay], check=True
    )
    with pytest.raises(MediaError, match=r"with a backing file .* qemu-img convert -O qcow2"):
        check_disk(overlay)

    old = os.path.join(d, "v1.qcow2")
    with open(old, "wb") as f:
        f.write(b"QFI\xfb" + struct.pack(">I", 1) + b"\0" * 200)
    with pytest.raises(MediaError, match="unsupported version 1"):
        check_disk(old)

    empty = os.path.join(d, "empty.raw")
    open(empty, "wb").close()
    with pytest.raises(MediaError, match="is empty"):
        check_disk(empty)
    with pytest.raises(MediaError, match="does not exist"):
        check_disk(os.path.join(d, "missing.qcow2"))
    with pytest.raises(MediaError, match="is a directory"):
        check_disk(d)
