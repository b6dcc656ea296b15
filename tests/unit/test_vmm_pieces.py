"""cocon.vmm without booting: QEMU command lines, asset digests, the cpio writer, the probe's cache."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest

from cocon.vmm.assets import Assets, Inputs, _Cpio, _module_name
from cocon.vmm.errors import QemuError
from cocon.vmm.kvm import CACHE_FILE, host_key, probe_kvm
from cocon.vmm.qemu import MachineConfig, Qemu, build_command, virtio_device


@pytest.fixture
def kernel(tmp_path: str) -> str:
    path = os.path.join(tmp_path, "vmlinuz")
    with open(path, "wb") as f:
        f.write(b"not really a kernel")
    return path


def _arg(cmd: list[str], option: str) -> str:
    return cmd[cmd.index(option) + 1]


def test_microvm_command_line(kernel: str) -> None:
    cmd = build_command(MachineConfig(kernel, kernel, cmdline="cocon.wait=1"), "/r/qmp.sock", "/r/con.log")
    assert cmd[0] == "qemu-system-x86_64"
    assert _arg(cmd, "-M").startswith("microvm")
    assert _arg(cmd, "-accel") == "tcg" and _arg(cmd, "-cpu") == "max"
    assert {"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"} <= set(cmd)
    assert _arg(cmd, "-nic") == "none"
    assert _arg(cmd, "-qmp") == "unix:/r/qmp.sock,server=on,wait=off"
    assert _arg(cmd, "-serial") == "file:/r/con.log"
    assert _arg(cmd, "-kernel") == kernel and _arg(cmd, "-initrd") == kernel
    assert _arg(cmd, "-append") == "console=ttyS0 panic=-1 quiet cocon.wait=1"
    assert _arg(cmd, "-m") == "256" and _arg(cmd, "-smp") == "1"


def test_q35_kvm_and_devices(kernel: str) -> None:
    config = MachineConfig(
        kernel,
        machine="q35",
        accel="kvm",
        memory_mib=512,
        cpus=2,
        extra_args=("-device", virtio_device("q35", "rng")),
    )
    cmd = build_command(config, "/q", "/c")
    assert _arg(cmd, "-M") == "q35" and _arg(cmd, "-cpu") == "host"
    assert "-initrd" not in cmd
    assert cmd[-2:] == ["-device", "virtio-rng-pci"]
    assert virtio_device("microvm", "blk") == "virtio-blk-device"
    assert (
        _arg(build_command(MachineConfig(kernel, accel="kvm", cpu="qemu64"), "/q", "/c"), "-cpu") == "qemu64"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"machine": "pc"}, "unknown machine type 'pc'"),
        ({"accel": "hvf"}, "unknown accelerator 'hvf'"),
        ({"memory_mib": 8}, "too little"),
        ({"cpus": 0}, "0 vCPUs"),
        ({"initrd": "/nonexistent/initrd"}, "build the guest assets"),
    ],
)
def test_bad_machine_configs_are_refused(kernel: str, change: dict[str, object], message: str) -> None:
    config = MachineConfig(kernel, **change)  # type: ignore[arg-type]
    with pytest.raises(QemuError, match=message):
        build_command(config, "/q", "/c")


def test_a_missing_qemu_binary_is_reported(kernel: str, tmp_path: str) -> None:
    vm = Qemu(MachineConfig(kernel, binary="/nonexistent/qemu-system-x86_64"), str(tmp_path))
    with pytest.raises(QemuError, match="install QEMU"):
        vm.start()
    assert vm.process is None


def test_a_too_long_socket_path_is_refused(kernel: str, tmp_path: str) -> None:
    vm = Qemu(MachineConfig(kernel), os.path.join(tmp_path, "x" * 120))
    with pytest.raises(QemuError, match="too long for a Unix socket"):
        vm.start()


def _inputs(**change: object) -> Inputs:
    fields: dict[str, object] = {
        "kernel_package": "linux-image-6.1.0-56-cloud-amd64",
        "kernel_version": "6.1.192-2",
        "busybox_package": "busybox-static",
        "busybox_version": "1:1.35.0-4",
        "modules": ("virtio_blk",),
        "init_sha256": "0" * 64,
    }
    fields.update(change)
    return Inputs(**fields)  # type: ignore[arg-type]


def test_the_digest_depends_on_every_input() -> None:
    base = _inputs()
    assert base.digest == _inputs().digest and len(base.digest) == 64
    changes: list[dict[str, object]] = [
        {"kernel_package": "linux-image-6.1.0-57-cloud-amd64"},
        {"kernel_version": "6.1.193-1"},
        {"busybox_version": "1:1.36"},
        {"modules": ("virtio_blk", "virtio_net")},
        {"init_sha256": "1" * 64},
        {"recipe_version": 999},
    ]
    digests = {_inputs(**c).digest for c in changes}
    assert len(digests) == len(changes) and base.digest not in digests


def _parse_cpio(data: bytes) -> list[tuple[str, int, bytes, int, int]]:
    entries: list[tuple[str, int, bytes, int, int]] = []
    pos = 0
    while True:
        assert pos % 4 == 0 and data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmajor, rminor, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        body = data[pos : pos + filesize]
        pos = (pos + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert pos == len(data)
            return entries
        entries.append((name, mode, body, rmajor, rminor))


def test_the_cpio_writer_makes_newc_archives(tmp_path: str) -> None:
    src = os.path.join(tmp_path, "tree")
    os.makedirs(os.path.join(src, "b"))
    with open(os.path.join(src, "b", "x.ko"), "wb") as f:
        f.write(b"12345")
    out = io.BytesIO()
    cpio = _Cpio(out)
    cpio.directory("bin")
    cpio.file("init", b"#!/bin/sh\n", 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.char_device("dev/console", 5, 1)
    cpio.tree(src, "lib")
    cpio.close()
    entries = {name: (mode, body, ma, mi) for name, mode, body, ma, mi in _parse_cpio(out.getvalue())}
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["init"][1] == b"#!/bin/sh\n" and stat.S_IMODE(entries["init"][0]) == 0o755
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2:] == (5, 1)
    assert entries["lib/b/x.ko"][1] == b"12345" and stat.S_ISDIR(entries["lib/b"][0])
    # the same input gives the same bytes (fixed owners and mtimes)
    again = io.BytesIO()
    second = _Cpio(again)
    second.tree(src, "lib")
    second.close()
    first = io.BytesIO()
    third = _Cpio(first)
    third.tree(src, "lib")
    third.close()
    assert first.getvalue() == again.getvalue()


def test_module_names() -> None:
    assert _module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"
    assert _module_name("kernel/fs/erofs/erofs.ko.xz") == "erofs"


def test_the_probe_uses_its_cache_without_booting(tmp_path: str) -> None:
    # The kernel is not a kernel: a probe that booted it would fail, not return "kvm".
    assets = Assets(
        kernel=os.path.join(tmp_path, "vmlinuz"),
        initrd=os.path.join(tmp_path, "initrd.img"),
        version="6.1.0-test",
        digest="0" * 64,
        directory=str(tmp_path),
    )
    entry = {"accel": "kvm", "reason": "cached", "seconds": 0.5, "kernel": "6.1.0-test", "cpu": "host"}
    with open(os.path.join(tmp_path, CACHE_FILE), "w") as f:
        json.dump({host_key(): entry}, f)
    probe = probe_kvm(assets)
    assert (probe.accel, probe.reason, probe.cached) == ("kvm", "cached", True)
