"""cocon.vmm without booting: QEMU command lines, asset digests, the cpio writer, the probe's cache."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import struct
import time

import pytest

from cocon.vmm.assets import (
    GUEST_SOURCES,
    Assets,
    Inputs,
    Recipe,
    _Cpio,
    _default_source,
    _module_name,
    _uncompressed_kernel,
    guest_sources,
    sources_sha256,
)
from cocon.vmm.errors import AssetError, QemuError
from cocon.vmm.kvm import CACHE_FILE, host_key, probe_kvm
from cocon.vmm.qemu import (
    AGENT_PORT,
    Disk,
    MachineConfig,
    Qemu,
    Share,
    build_command,
    host_tsc_khz,
    virtio_device,
)


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
    tsc = f" tsc_early_khz={host_tsc_khz()}" if host_tsc_khz() else ""
    assert _arg(cmd, "-append") == f"console=ttyS0 panic=-1 quiet cryptomgr.notests{tsc} cocon.wait=1"
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


def _all(cmd: list[str], option: str) -> list[str]:
    return [cmd[i + 1] for i, a in enumerate(cmd) if a == option]


def test_the_tsc_frequency_is_given_under_tcg_only(kernel: str) -> None:
    # On these hosts the kernel knows the TSC's frequency (a VM with tsc_known_freq).
    khz = host_tsc_khz()
    assert khz is not None and 500_000 < khz < 10_000_000
    assert f"tsc_early_khz={khz}" in _arg(build_command(MachineConfig(kernel), "/q", "/c"), "-append")
    kvm = build_command(MachineConfig(kernel, accel="kvm"), "/q", "/c")
    assert "tsc_early_khz" not in _arg(kvm, "-append")
    own = build_command(MachineConfig(kernel, cmdline="tsc_early_khz=1000000"), "/q", "/c")
    assert _arg(own, "-append").count("tsc_early_khz=") == 1


def test_disks_shares_and_the_agent_channel_on_microvm(kernel: str, tmp_path: str) -> None:
    tmp_path = os.fspath(tmp_path)
    utility = os.path.join(tmp_path, "guest.erofs")
    scratch = os.path.join(tmp_path, "scratch,1.img")  # a comma in a path is doubled for QEMU
    for path in (utility, scratch):
        with open(path, "wb") as f:
            f.truncate(1 << 20)
    rootfs = os.path.join(tmp_path, "rootfs")
    os.mkdir(rootfs)
    config = MachineConfig(
        kernel,
        disks=(Disk(utility), Disk(scratch, readonly=False)),
        shares=(Share(rootfs, "rootfs"), Share(tmp_path, "vol0", readonly=True)),
        agent_socket=os.path.join(tmp_path, "agent.sock"),
    )
    cmd = build_command(config, "/q", "/c")
    assert _all(cmd, "-drive") == [
        f"if=none,id=disk0,node-name=disk0-node,file={utility},format=raw,readonly=on",
        f"if=none,id=disk1,node-name=disk1-node,file={scratch.replace(',', ',,')},format=raw,readonly=off",
    ]
    assert _all(cmd, "-fsdev") == [
        f"local,id=fs0,path={rootfs},security_model=passthrough,multidevs=remap",
        f"local,id=fs1,path={tmp_path},security_model=passthrough,multidevs=remap,readonly=on",
    ]
    assert _all(cmd, "-chardev") == [
        f"socket,id=agent,path={tmp_path}/agent.sock,server=on,wait=off",
    ]
    assert _all(cmd, "-device") == [
        "virtio-blk-device,drive=disk0,id=disk0-dev",
        "virtio-blk-device,drive=disk1,id=disk1-dev",
        "virtio-9p-device,fsdev=fs0,mount_tag=rootfs",
        "virtio-9p-device,fsdev=fs1,mount_tag=vol0",
        "virtio-serial-device,id=agent-serial",
        f"virtserialport,bus=agent-serial.0,chardev=agent,name={AGENT_PORT}",
    ]
    assert AGENT_PORT == "org.cocon.agent.0"
    # the devices come after -append, before the caller's extra arguments
    assert cmd.index("-append") < cmd.index("-drive")


def test_q35_gets_pci_devices(kernel: str, tmp_path: str) -> None:
    tmp_path = os.fspath(tmp_path)
    config = MachineConfig(
        kernel,
        machine="q35",
        disks=(Disk(kernel),),
        shares=(Share(tmp_path, "t"),),
        agent_socket=os.path.join(tmp_path, "a.sock"),
        extra_args=("-device", "virtio-rng-pci"),
    )
    devices = _all(build_command(config, "/q", "/c"), "-device")
    assert devices[:3] == [
        "virtio-blk-pci,drive=disk0,id=disk0-dev",
        "virtio-9p-pci,fsdev=fs0,mount_tag=t",
        "virtio-serial-pci,id=agent-serial",
    ]
    assert devices[-1] == "virtio-rng-pci"
    assert (
        virtio_device("q35", "9p") == "virtio-9p-pci"
        and virtio_device("microvm", "serial") == "virtio-serial-device"
    )


def test_existing_callers_get_no_devices(kernel: str) -> None:
    cmd = build_command(MachineConfig(kernel), "/q", "/c")
    assert not {"-drive", "-fsdev", "-chardev", "-device"} & set(cmd)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"disks": (Disk("/nonexistent/guest.erofs"),)}, "the disk /nonexistent/guest.erofs cannot be used"),
        ({"disks": (Disk("/tmp"),)}, "neither a file nor a block device"),
        ({"shares": (Share("/nonexistent", "t"),)}, "shared directory /nonexistent does not exist"),
        ({"shares": (Share("/tmp", "bad tag"),)}, "mount tag 'bad tag'"),
        ({"shares": (Share("/tmp", "x" * 32),)}, "is not 1-31"),
        ({"shares": (Share("/tmp", "t"), Share("/", "t"))}, "two shares have the mount tag 't'"),
        ({"agent_socket": "/tmp/" + "s" * 110}, "too long for a Unix socket"),
        ({"agent_socket": "/nonexistent/agent.sock"}, "directory /nonexistent does not exist"),
        ({"agent_socket": "/tmp"}, "is a directory"),
    ],
)
def test_bad_devices_are_refused(kernel: str, change: dict[str, object], message: str) -> None:
    config = MachineConfig(kernel, **change)  # type: ignore[arg-type]
    with pytest.raises(QemuError, match=message):
        build_command(config, "/q", "/c")


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
        "kernel_package": "linux-image-6.1.0-56-amd64",
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
        {"kernel_package": "linux-image-6.1.0-57-amd64"},
        {"kernel_version": "6.1.193-1"},
        {"busybox_version": "1:1.36"},
        {"modules": ("virtio_blk", "virtio_net")},
        {"init_sha256": "1" * 64},
        {"utility_packages": (("python3-minimal", "3.11.2-1+b1"),)},
        {"sources_sha256": "2" * 64},
        {"recipe_version": 999},
    ]
    digests = {_inputs(**c).digest for c in changes}
    assert len(digests) == len(changes) and base.digest not in digests


def test_the_guest_sources_are_the_listed_ones() -> None:
    files = guest_sources(_default_source())
    assert {"__init__.py", "_linux.py", "_fastjson.py", "runtime/container.py", "oci/image_spec.py"} <= set(
        files
    )
    assert "vmm/errors.py" in files and "vmm/guest/__init__.py" in files
    assert any(f.startswith("oci/data/") and f.endswith(".json") for f in files), "oci's data files too"
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
    assert not any(f.startswith(("images/", "engine/", "cli/")) or f == "vmm/assets.py" for f in files)
    assert "vmm/guest/init" not in files, "the init goes into the initramfs, not the utility image"
    assert files == sorted(files)
    assert GUEST_SOURCES[0] == "__init__.py"


def test_the_sources_digest_follows_every_copied_file(tmp_path: str) -> None:
    tree = os.path.join(tmp_path, "cocon")
    shutil.copytree(_default_source(), tree, ignore=shutil.ignore_patterns("__pycache__"))
    started = time.monotonic()
    first = sources_sha256(tree)
    took = time.monotonic() - started
    assert took < 0.25, f"hashing the guest sources took {took:.3f} s"
    assert sources_sha256(tree) == first
    # A file the guest gets: the digest changes (so the assets are rebuilt).
    with open(os.path.join(tree, "runtime", "container.py"), "a") as f:
        f.write("# edited\n")
    edited = sources_sha256(tree)
    assert edited != first
    # A guest module that appears (the agent being written) changes it too ...
    with open(os.path.join(tree, "vmm", "guest", "extra.py"), "w") as f:
        f.write("X = 1\n")
    added = sources_sha256(tree)
    assert added != edited
    # ... a file the guest does not get does not.
    with open(os.path.join(tree, "images", "store.py"), "a") as f:
        f.write("# edited\n")
    os.makedirs(os.path.join(tree, "runtime", "__pycache__"), exist_ok=True)
    with open(os.path.join(tree, "runtime", "__pycache__", "x.cpython-311.pyc"), "wb") as f:
        f.write(b"junk")
    assert sources_sha256(tree) == added
    # The same content under another directory gives the same digest (names are relative).
    other = os.path.join(tmp_path, "other", "cocon")
    shutil.copytree(tree, other)
    assert sources_sha256(other) == added


def test_a_missing_listed_source_is_skipped(tmp_path: str) -> None:
    tree = os.path.join(tmp_path, "cocon")
    os.makedirs(os.path.join(tree, "vmm", "guest"))
    for rel in ("__init__.py", "vmm/__init__.py", "vmm/guest/__init__.py"):
        with open(os.path.join(tree, rel), "w") as f:
            f.write("")
    assert guest_sources(tree) == ["__init__.py", "vmm/__init__.py", "vmm/guest/__init__.py"]
    assert len(sources_sha256(tree)) == 64


def test_a_guest_source_that_is_not_cocon_is_refused(tmp_path: str) -> None:
    from cocon.vmm.assets import resolve_inputs

    with pytest.raises(AssetError, match="is not the cocon package"):
        resolve_inputs(Recipe(guest_source=str(tmp_path)))


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 3
    header = bytearray((setup_sects + 1) * 512)
    header[0x1F1] = setup_sects
    header[0x202:0x206] = b"HdrS"
    header[0x248:0x250] = struct.pack("<II", 100, len(payload))
    return bytes(header) + b"\0" * 100 + payload + b"trailer"


@pytest.mark.parametrize("compress", ["xz", "gzip", "zstd"])
def test_the_elf_kernel_is_taken_out_of_a_bzimage(tmp_path: str, compress: str) -> None:
    import gzip
    import lzma

    import zstandard

    elf = b"\x7fELF" + os.urandom(1000)
    packed = {
        "xz": lambda: lzma.compress(elf, format=lzma.FORMAT_XZ),
        "gzip": lambda: gzip.compress(elf),
        "zstd": lambda: zstandard.ZstdCompressor().compress(elf),
    }[compress]()
    image = os.path.join(tmp_path, "vmlinuz")
    with open(image, "wb") as f:
        f.write(_bzimage(packed))
    config = os.path.join(tmp_path, "config")
    with open(config, "w") as f:
        f.write("CONFIG_X86_64=y\nCONFIG_PVH=y\n")
    assert _uncompressed_kernel(image, config) == elf
    # no PVH entry: QEMU could not boot the ELF, so the bzImage stays what is booted
    with open(config, "w") as f:
        f.write("# CONFIG_PVH is not set\n")
    assert _uncompressed_kernel(image, config) is None
    assert _uncompressed_kernel(image, os.path.join(tmp_path, "missing")) is None


def test_a_bzimage_with_an_unknown_payload_stays_as_is(tmp_path: str) -> None:
    config = os.path.join(tmp_path, "config")
    with open(config, "w") as f:
        f.write("CONFIG_PVH=y\n")
    image = os.path.join(tmp_path, "vmlinuz")
    for data in (_bzimage(b"LZ4!" + b"x" * 50), b"not a kernel", _bzimage(b"\xfd7zXZ\x00broken")):
        with open(image, "wb") as f:
            f.write(data)
        assert _uncompressed_kernel(image, config) is None


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
