"""cocon's own test guests for real: a bootable Debian image bootstrapped offline (the tarball of
scripts/debian-vm-tarball.sh), turned into a GPT disk that GRUB boots under SeaBIOS and OVMF, and a
grub-mkrescue ISO; each booted with a hand-written QEMU command line under TCG.

The image, its root file system and the disk are the session's (conftest's debian_vm_build). Every QEMU this file
starts has the test's tmp_path in its command line; it is killed when its boot ends (also on
failure) and `no_qemu_left` kills and fails on any still running. Boot and build times are printed
(run with -s to see them) and kept in TIMES."""

from __future__ import annotations

import os
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from cocon.images.busybox import make_rootfs
from cocon.images.store import Image, ImageStore
from cocon.vmm.guest_images import (
    DEFAULT_VM_IMAGE,
    ROOT_LABEL,
    BootableDisk,
    GuestImageError,
    find_kernel,
    initramfs_modules,
    make_boot_iso,
    make_bootable_disk,
    make_marker_initramfs,
)
from vm_helpers import kill_processes

pytestmark = pytest.mark.timeout(1500)

OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
BOOT_TIMEOUT = 300.0
LOGIN = re.compile(rb"\S+ login: ?$", re.MULTILINE)
TIMES: dict[str, float] = {}


def _note(what: str, seconds: float) -> None:
    TIMES[what] = seconds
    print(f"\n[guest-images] {what}: {seconds:.1f} s")


@dataclass
class Built:
    store: ImageStore
    image: Image
    rootfs: str
    disk: BootableDisk
    events: list[tuple[str, int, int]]


@pytest.fixture(scope="module")
def built(debian_vm_build: Any) -> Iterator[Built]:
    """The session's Debian guest (tests/vm_helpers.build_debian_vm: `cocon image bootstrap debian-vm`,
    which runs bootstrap_debian_vm, then export_rootfs and make_bootable_disk), read here."""
    store = ImageStore(debian_vm_build.root)
    try:
        image = store.resolve(DEFAULT_VM_IMAGE)
        yield Built(store, image, debian_vm_build.rootfs, debian_vm_build.bootable, debian_vm_build.events)
    finally:
        store.close()


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path: str) -> Iterator[None]:
    yield
    left = kill_processes(str(tmp_path))
    assert left == [], f"QEMU processes left behind: {left}"


# --- booting ------------------------------------------------------------------------------------------


class Guest:
    """A QEMU started by hand, its serial port on a Unix socket that the test reads (and writes)."""

    def __init__(self, workdir: str, machine_args: list[str]) -> None:
        self.workdir = workdir
        self.sock_path = os.path.join(workdir, "serial.sock")
        self.log_path = os.path.join(workdir, "qemu.log")
        self.output = b""
        self.started = time.monotonic()
        cmd = [
            "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "1024", "-nographic",
            "-monitor", "none", "-no-reboot",
            "-chardev", f"socket,id=serial0,path={self.sock_path},server=on,wait=on",
            "-serial", "chardev:serial0",
            *machine_args,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock.connect(self.sock_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise AssertionError(f"QEMU did not open its serial socket: {self._log_tail()}") from None
                time.sleep(0.1)

    def _log_tail(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read()[-2000:].decode("utf-8", "replace")

    def expect(self, pattern: re.Pattern[bytes], timeout: float = BOOT_TIMEOUT, since: int = 0) -> float:
        """Wait until the serial output (from offset `since`) matches; the seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while not pattern.search(self.output, since):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {pattern.pattern!r} on the serial console in {timeout:.0f} s; it said:\n"
                    f"{self.output[-3000:].decode('utf-8', 'replace')}\nQEMU: {self._log_tail()}"
                )
            ready, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if ready:
                data = self.sock.recv(65536)
                if not data:
                    raise AssertionError(
                        f"QEMU closed the serial port (exit status {self.proc.wait(10)}) before "
                        f"{pattern.pattern!r}; it said:\n{self.output[-3000:].decode('utf-8', 'replace')}\n"
                        f"QEMU: {self._log_tail()}"
                    )
                self.output += data
        return time.monotonic() - self.started

    def send(self, text: str) -> int:
        """Type `text`; the output offset before it (for expect's `since`)."""
        mark = len(self.output)
        self.sock.sendall(text.encode())
        return mark

    def wait_exit(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.5)
            if ready:
                self.output += self.sock.recv(65536)
        code = self.proc.poll()
        assert code is not None, f"QEMU did not exit in {timeout:.0f} s after the guest powered off"
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self.sock.close()
        with open(os.path.join(self.workdir, f"serial-{self.proc.pid}.log"), "wb") as f:
            f.write(self.output)  # for a look afterwards (pytest keeps the last runs' tmp_path)


@pytest.fixture
def guests(tmp_path: str) -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.close()


def _uefi_args(workdir: str) -> list[str]:
    vars_copy = os.path.join(workdir, "OVMF_VARS.fd")
    shutil.copyfile(OVMF_VARS, vars_copy)
    return [
        "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,file={vars_copy}",
    ]  # fmt: skip


def _disk_args(disk: BootableDisk) -> list[str]:
    # snapshot=on: every boot starts from the disk as built, and the built disk is not written
    return ["-drive", f"file={disk.path},if=virtio,format=qcow2,snapshot=on"]


# --- the image ----------------------------------------------------------------------------------------


def test_the_image_is_a_bootable_debian_with_systemd_as_cmd(built: Built) -> None:
    image, rootfs = built.image, built.rootfs
    assert built.store.resolve(DEFAULT_VM_IMAGE).id == image.id
    assert image.config.config is not None and image.config.config.cmd == ["/sbin/init"]
    assert len(image.manifest.layers) == 2, "debootstrap's layer and the guest configuration layer"
    kernel = find_kernel(rootfs)
    assert kernel.release.endswith("-amd64") and "cloud" not in kernel.release
    assert kernel == built.disk.kernel
    modules = initramfs_modules(os.path.join(rootfs, kernel.initrd))
    assert {"virtio_pci", "virtio_blk", "ext4", "virtio_net"} <= modules
    assert os.path.realpath(os.path.join(rootfs, "sbin/init")).endswith("/systemd")
    for path in ("usr/bin/cloud-init", "lib/systemd/systemd-networkd", "lib/systemd/systemd-resolved"):
        assert os.path.exists(os.path.join(rootfs, path)), path
    with open(os.path.join(rootfs, "etc/fstab")) as f:
        assert f"LABEL={ROOT_LABEL} / ext4" in f.read()
    with open(os.path.join(rootfs, "etc/systemd/network/50-cocon-dhcp.network")) as f:
        network = f.read()
    assert "Name=en* eth*" in network and "DHCP=yes" in network
    getty = os.path.join(rootfs, "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service")
    assert os.readlink(getty) == "/lib/systemd/system/serial-getty@.service"
    assert os.readlink(os.path.join(rootfs, "etc/systemd/system/apt-daily.timer")) == "/dev/null"
    with open(os.path.join(rootfs, "etc/shadow")) as f:
        root_entry = next(line for line in f if line.startswith("root:"))
    assert root_entry.split(":")[1] == "", "root's password is empty: log in at the console"
    st = os.stat(os.path.join(rootfs, "etc/shadow"))
    assert (st.st_mode & 0o777, st.st_uid) == (0o640, 0)
    assert not os.path.exists(os.path.join(rootfs, "etc/hostname")), "the host name comes from DHCP/kernel"


def test_the_disk_is_a_gpt_qcow2_with_an_esp_and_a_labelled_root(built: Built, tmp_path: str) -> None:
    disk = built.disk
    assert [e for e in built.events if e[1] == e[2]][-1] == ("convert", 1, 1)
    assert not [n for n in os.listdir(os.path.dirname(disk.path)) if n.startswith(".")], "no temporary left"
    info = subprocess.run(["qemu-img", "info", disk.path], capture_output=True, text=True, check=True).stdout
    assert "file format: qcow2" in info
    raw = os.path.join(tmp_path, "disk.raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", disk.path, raw], check=True)
    table = subprocess.run(["sfdisk", "--dump", raw], capture_output=True, text=True, check=True).stdout
    assert "label: gpt" in table
    assert "type=21686148-6E55-6F74-6E49-656564454649" in table  # BIOS boot
    assert "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B" in table  # EFI system
    with open(raw, "rb") as f:
        assert f.read(512)[510:] == b"\x55\xaa"
    root = f"{raw}?offset={66 << 20}"
    blkid = subprocess.run(["dumpe2fs", "-h", root], capture_output=True, text=True, check=True).stdout
    assert f"Filesystem volume name:   {ROOT_LABEL}" in blkid and disk.root_uuid in blkid
    cfg = subprocess.run(
        ["debugfs", "-R", "cat boot/grub/grub.cfg", root], capture_output=True, text=True
    ).stdout
    assert f"root=UUID={disk.root_uuid} ro console=ttyS0,115200" in cfg and "set timeout=0" in cfg
    esp = subprocess.run(
        ["mdir", "-b", "-i", f"{raw}@@{2 << 20}", "::/EFI/BOOT"],
        capture_output=True, text=True, check=True, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"},
    ).stdout  # fmt: skip
    assert "BOOTX64.EFI" in esp


# --- boots ---------------------------------------------------------------------------------------------


# Booting the disk under BIOS and UEFI to a login (and DHCP, a writable root) is what
# tests/e2e/test_vm_cli.py does through `cocon vm`, with this module's make_bootable_disk.


def test_the_iso_boots_its_kernel_under_bios_and_uefi(
    built: Built, tmp_path: str, guests: list[Guest]
) -> None:
    kernel = os.path.join(built.rootfs, built.disk.kernel.vmlinuz)
    initrd = make_marker_initramfs(os.path.join(tmp_path, "marker.img"), "cocon-iso: booted")
    started = time.monotonic()
    iso = make_boot_iso(os.path.join(tmp_path, "boot.iso"), kernel, initrd, "cocon.test=42")
    _note("make_boot_iso", time.monotonic() - started)
    assert sorted(os.listdir(tmp_path)) == ["boot.iso", "marker.img"], "no temporary left"
    marker = re.compile(rb"cocon-iso: booted")
    for firmware, extra in (("BIOS", []), ("UEFI", _uefi_args(str(tmp_path)))):
        guest = Guest(str(tmp_path), [*extra, "-cdrom", iso, "-nic", "none"])
        guests.append(guest)
        seconds = guest.expect(marker)
        _note(f"{firmware} ISO boot to the marker", seconds)
        started_by_ovmf = re.search(rb"efi: EFI v[0-9.]+ by EDK II", guest.output) is not None
        assert started_by_ovmf == (firmware == "UEFI"), guest.output[-3000:]
        guest.expect(re.compile(rb"cmdline: .*cocon\.test=42.*console=ttyS0,115200"), timeout=60)
        assert guest.wait_exit() == 0, "the guest powered off and QEMU exited"
        guest.close()


# --- bad input ----------------------------------------------------------------------------------------


def _loops_naming(marker: str) -> list[str]:
    out = subprocess.run(
        ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if marker in line]


def test_a_rootfs_without_a_kernel_is_a_clear_error_and_leaves_nothing(tmp_path: str) -> None:
    rootfs = os.path.join(tmp_path, "rootfs")
    os.mkdir(rootfs)
    make_rootfs(rootfs)
    out = os.path.join(tmp_path, "out", "disk.qcow2")
    os.mkdir(os.path.dirname(out))
    with pytest.raises(
        GuestImageError, match=r"has no kernel \(no boot/vmlinuz-\*\).*install linux-image-amd64"
    ):
        make_bootable_disk(rootfs, out)
    # a kernel without its initrd, a kernel behind a symlink: refused as well
    os.makedirs(os.path.join(rootfs, "boot"), exist_ok=True)
    with open(os.path.join(rootfs, "boot", "vmlinuz-6.1.0-99-amd64"), "wb") as f:
        f.write(b"not really a kernel")
    with pytest.raises(
        GuestImageError, match=r"no boot/initrd\.img-6\.1\.0-99-amd64: install initramfs-tools"
    ):
        make_bootable_disk(rootfs, out)
    os.symlink("/etc/hostname", os.path.join(rootfs, "boot", "initrd.img-6.1.0-99-amd64"))
    with pytest.raises(GuestImageError, match=r"no boot/initrd\.img"):
        make_bootable_disk(rootfs, out)
    # a bad size and a bad command line fail before anything is written
    os.unlink(os.path.join(rootfs, "boot", "initrd.img-6.1.0-99-amd64"))
    with open(os.path.join(rootfs, "boot", "initrd.img-6.1.0-99-amd64"), "wb") as f:
        f.write(b"not really an initrd")
    with pytest.raises(GuestImageError, match="too small"):
        make_bootable_disk(rootfs, out, size="70M")
    with pytest.raises(GuestImageError, match="cannot go on the kernel command line"):
        make_bootable_disk(rootfs, out, cmdline="ro init='/bin/sh'")
    with pytest.raises(GuestImageError, match="leave root= out"):
        make_bootable_disk(rootfs, out, cmdline="root=/dev/sda1 ro")
    assert os.listdir(os.path.dirname(out)) == [], "no output and no temporary file"
    assert _loops_naming(str(tmp_path)) == []


def test_a_failure_half_way_leaves_nothing(tmp_path: str) -> None:
    """The disk is partitioned, then mkfs.ext4 runs out of inodes (12000 empty files in a 43 MiB
    root): the disk is never renamed into place and the work files go."""
    rootfs = os.path.join(tmp_path, "rootfs")
    os.mkdir(rootfs)
    make_rootfs(rootfs)
    os.makedirs(os.path.join(rootfs, "boot"))
    for name in ("vmlinuz-6.1.0-99-amd64", "initrd.img-6.1.0-99-amd64"):
        with open(os.path.join(rootfs, "boot", name), "wb") as f:
            f.write(b"x")
    many = os.path.join(rootfs, "many")
    os.mkdir(many)
    for i in range(12000):
        os.close(os.open(os.path.join(many, str(i)), os.O_CREAT | os.O_WRONLY, 0o644))
    out = os.path.join(tmp_path, "out", "disk.raw")
    os.mkdir(os.path.dirname(out))
    with pytest.raises(GuestImageError, match=r"writing .* into the disk's ext4 root failed"):
        make_bootable_disk(rootfs, out, size="110M", format="raw")
    assert os.listdir(os.path.dirname(out)) == []
    assert _loops_naming(str(tmp_path)) == []


def test_iso_and_initramfs_inputs_are_checked(tmp_path: str) -> None:
    with pytest.raises(GuestImageError, match=r"the kernel .* is not a file"):
        make_boot_iso(os.path.join(tmp_path, "x.iso"), os.path.join(tmp_path, "nope"), "/etc/hostname")
    with pytest.raises(GuestImageError, match="cannot go on the kernel command line"):
        make_boot_iso(os.path.join(tmp_path, "x.iso"), "/etc/hostname", "/etc/hostname", "a;reboot")
    with pytest.raises(GuestImageError, match="one printable line"):
        make_marker_initramfs(os.path.join(tmp_path, "m.img"), "it's")
    with pytest.raises(GuestImageError, match="is not a directory: create it first"):
        make_marker_initramfs(os.path.join(tmp_path, "no", "m.img"), "ok")
    assert os.listdir(tmp_path) == []
