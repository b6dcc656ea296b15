"""NoCloud seeds for real: build one with make_seed, then read it back the ways a guest does: pycdlib
(ISO 9660, Joliet and Rock Ridge names), blkid on a read-only loop device (what cloud-init runs:
`blkid -t LABEL=CIDATA`), and a read-only iso9660 mount when the host kernel has isofs.

Some host kernels are built without ISO 9660 support (CONFIG_ISO9660_FS unset, no isofs module; this
machine's is one): there the host mount part cannot run. The last test therefore boots Debian's
generic guest kernel (from the VM tarball the set-up downloads, offline) with the seed as a virtio
disk: the guest finds it by label (busybox findfs LABEL=CIDATA) and mounts it as iso9660."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator

import pycdlib
import pytest
import yaml

from cocon.vmm.cloud_init import make_seed, network_config_static

USER_DATA = b"#cloud-config\npackages: [curl]\nruncmd:\n  - [sh, -c, 'echo seeded > /run/seeded']\n"
NETWORK = network_config_static(
    "52:54:00:12:34:56", ["10.0.2.15/24"], gateway4="10.0.2.2", nameservers=["10.0.2.3"], search=["lab"]
)


@pytest.fixture
def seed(tmp_path: str) -> str:
    return make_seed(
        os.path.join(str(tmp_path), "seed.iso"),
        user_data=USER_DATA,
        instance_id="iid-cocon-1",
        hostname="vm1",
        network_config=NETWORK,
        meta_data_extra={"public-keys": ["ssh-ed25519 AAAA test@cocon"]},
    )


def _read(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


def _check_with_pycdlib(iso: pycdlib.PyCdlib) -> None:
    assert iso.pvd.volume_identifier.decode().strip() == "CIDATA"
    assert iso.joliet_vd.volume_identifier.decode("utf-16_be").strip() == "CIDATA"  # blkid prefers this one
    assert iso.has_joliet() and iso.has_rock_ridge()
    rr = sorted(
        c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/") if c.rock_ridge and c.is_file()
    )
    assert rr == ["meta-data", "network-config", "user-data"]
    joliet = sorted(
        c.file_identifier().decode("utf-16_be") for c in iso.list_children(joliet_path="/") if c.is_file()
    )
    assert joliet == ["meta-data", "network-config", "user-data"]
    assert _read(iso, rr_path="/user-data") == USER_DATA
    assert _read(iso, joliet_path="/user-data") == USER_DATA
    assert _read(iso, iso_path="/USERDATA.;1") == USER_DATA
    meta = yaml.safe_load(_read(iso, rr_path="/meta-data"))
    assert meta == {
        "instance-id": "iid-cocon-1",
        "local-hostname": "vm1",
        "public-keys": ["ssh-ed25519 AAAA test@cocon"],
    }
    assert yaml.safe_load(_read(iso, rr_path="/network-config")) == NETWORK


def test_seed_reads_back_with_pycdlib(seed: str, tmp_path: str) -> None:
    assert os.listdir(str(tmp_path)) == ["seed.iso"]  # no temporary file left
    assert os.stat(seed).st_mode & 0o777 == 0o600
    assert os.path.getsize(seed) % 2048 == 0
    iso = pycdlib.PyCdlib()
    iso.open(seed)
    try:
        _check_with_pycdlib(iso)
    finally:
        iso.close()


def test_seed_without_network_config_and_replaced_atomically(tmp_path: str) -> None:
    out = os.path.join(str(tmp_path), "seed.iso")
    make_seed(out, user_data=b"#!/bin/sh\necho one\n", instance_id="a", hostname="one")
    inode = os.stat(out).st_ino
    make_seed(out, user_data=b"#!/bin/sh\necho two\n", instance_id="b", hostname="two.example.com")
    assert os.stat(out).st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert os.listdir(str(tmp_path)) == ["seed.iso"]
    iso = pycdlib.PyCdlib()
    iso.open(out)
    try:
        names = sorted(c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/") if c.is_file())
        assert names == ["meta-data", "user-data"]
        assert _read(iso, rr_path="/user-data") == b"#!/bin/sh\necho two\n"
        assert yaml.safe_load(_read(iso, rr_path="/meta-data")) == {
            "instance-id": "b",
            "local-hostname": "two.example.com",
        }
    finally:
        iso.close()


@contextlib.contextmanager
def _loop_device(path: str) -> Iterator[str]:
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", path], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False)


def _kernel_has_iso9660() -> bool:
    subprocess.run(["modprobe", "-q", "isofs"], check=False, capture_output=True)
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "iso9660" for line in f if line.strip())


def test_seed_label_seen_through_the_kernel(seed: str, tmp_path: str) -> None:
    # blkid on the file: LABEL=CIDATA, TYPE=iso9660
    probe = subprocess.run(
        ["blkid", "-p", "-o", "export", seed], check=True, capture_output=True, text=True
    ).stdout
    fields = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
    assert fields["TYPE"] == "iso9660" and fields["LABEL"] == "CIDATA"

    with _loop_device(seed) as dev:
        # what cloud-init does to find its seed: blkid -t LABEL=CIDATA over the block devices
        found = subprocess.run(
            ["blkid", "-p", "-t", "LABEL=CIDATA", "-o", "device", dev], capture_output=True, text=True
        )
        assert found.returncode == 0 and found.stdout.strip() == dev
        label = subprocess.run(
            ["blkid", "-p", "-s", "LABEL", "-o", "value", dev], check=True, capture_output=True, text=True
        ).stdout.strip()
        assert label == "CIDATA"
        # the ISO read back through the kernel's block device
        iso = pycdlib.PyCdlib()
        with open(dev, "rb") as f:
            iso.open_fp(f)
            try:
                _check_with_pycdlib(iso)
            finally:
                iso.close()

    if not _kernel_has_iso9660():
        return  # this host kernel cannot mount ISO 9660 at all (see the module docstring)
    mnt = os.path.join(str(tmp_path), "mnt")
    os.mkdir(mnt)
    subprocess.run(["mount", "-o", "loop,ro", "-t", "iso9660", seed, mnt], check=True)
    try:
        assert sorted(os.listdir(mnt)) == ["meta-data", "network-config", "user-data"]  # Rock Ridge names
        with open(os.path.join(mnt, "user-data"), "rb") as f:
            assert f.read() == USER_DATA
        with open(os.path.join(mnt, "meta-data"), "rb") as f:
            assert yaml.safe_load(f)["instance-id"] == "iid-cocon-1"
    finally:
        subprocess.run(["umount", mnt], check=False)


# --- a real guest kernel mounts the seed ---------------------------------------------------------------

VM_TARBALL = os.path.join(os.path.dirname(__file__), "..", "..", ".cache", "debootstrap-bookworm-vm.tgz")
GUEST_MODULES = ("virtio_pci", "virtio_blk", "isofs")
GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m.ko || echo "seed-test: insmod $m failed"; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; sleep 0.5; done
echo "seed-test: findfs $(findfs LABEL=CIDATA)"
if mount -t iso9660 -o ro /dev/vda /mnt; then
  echo "seed-test: names $(ls /mnt | tr '\\n' ' ')"
  echo "seed-test: user-data $(md5sum < /mnt/user-data)"
  sed 's/^/seed-test: meta-data /' /mnt/meta-data
fi
echo seed-test: done
poweroff -f
"""


def _newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (name, mode, data) entries (the initramfs format)."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
        out.write(b"070701" + b"".join(b"%08x" % v for v in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4) + data + b"\0" * (-len(data) % 4))
    return out.getvalue()


@pytest.fixture(scope="module")
def guest_kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(vmlinuz, initramfs) from Debian's generic kernel in the VM tarball (offline): busybox and
    the modules to read an ISO 9660 virtio disk; /init mounts /dev/vda and prints what it sees."""
    assert os.path.isfile(VM_TARBALL), f"{VM_TARBALL} is missing: run `make setup` (or make test)"
    work = str(tmp_path_factory.mktemp("guest-kernel"))
    pattern = "var/cache/apt/archives/linux-image-[0-9]*-amd64_*.deb"
    subprocess.run(["tar", "-xzf", VM_TARBALL, "-C", work, "--wildcards", pattern], check=True)
    debs = os.listdir(os.path.join(work, "var/cache/apt/archives"))
    assert len(debs) == 1, debs
    deb = os.path.join(work, "var/cache/apt/archives", debs[0])
    tree = os.path.join(work, "tree")
    os.mkdir(tree)
    fsys = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", deb], stdout=subprocess.PIPE)
    wanted = [
        "./boot/vmlinuz-*",
        "./lib/modules/*/kernel/fs/isofs/*",
        "./lib/modules/*/kernel/drivers/cdrom/*",
    ]
    wanted += [
        "./lib/modules/*/kernel/drivers/block/virtio_blk.ko",
        "./lib/modules/*/kernel/drivers/virtio/*",
    ]
    subprocess.run(["tar", "-x", "-C", tree, "--wildcards", *wanted], stdin=fsys.stdout, check=True)
    assert fsys.wait() == 0
    os.unlink(deb)
    (vmlinuz,) = (os.path.join(tree, "boot", n) for n in os.listdir(os.path.join(tree, "boot")))
    files = {
        name[:-3]: os.path.join(d, name)
        for d, _, names in os.walk(os.path.join(tree, "lib"))
        for name in names
        if name.endswith(".ko")
    }
    order: list[str] = []

    def add(module: str) -> None:
        if module in order:
            return
        assert module in files, f"module {module} is not in the kernel package's extracted files"
        depends = subprocess.run(
            ["modinfo", "-F", "depends", files[module]], check=True, capture_output=True, text=True
        ).stdout.strip()
        for dep in filter(None, depends.split(",")):
            add(dep)
        order.append(module)

    for module in GUEST_MODULES:
        add(module)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "proc", "sys", "mnt", "mods")
    ]
    with open("/bin/busybox", "rb") as f:  # busybox-static
        entries.append(("bin/busybox", 0o100755, f.read()))
    entries.append(("init", 0o100755, GUEST_INIT.encode()))
    entries.append(("mods/order", 0o100644, "\n".join(order).encode()))
    for module in order:
        with open(files[module], "rb") as f:
            entries.append((f"mods/{module}.ko", 0o100644, f.read()))
    initrd = os.path.join(work, "initrd.cpio")
    with open(initrd, "wb") as f:
        f.write(_newc(entries))
    yield vmlinuz, initrd
    shutil.rmtree(work, ignore_errors=True)


def test_guest_kernel_finds_and_mounts_the_seed(
    seed: str, tmp_path: str, guest_kernel: tuple[str, str]
) -> None:
    """What a guest does at boot: find the disk labelled CIDATA, mount it as iso9660, read the files."""
    vmlinuz, initrd = guest_kernel
    log = os.path.join(str(tmp_path), "console.log")
    argv = [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256", "-nographic", "-nodefaults",
        "-serial", f"file:{log}", "-no-reboot", "-kernel", vmlinuz, "-initrd", initrd,
        "-append", "console=ttyS0 quiet panic=-1",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    with open(log, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    # (the first line follows SeaBIOS' escape sequences on the same line)
    lines = [line[line.index("seed-test: ") :].strip() for line in text.splitlines() if "seed-test: " in line]
    assert "seed-test: done" in lines, f"the guest did not finish: {text[-3000:]!r} {err[-1000:]!r}"
    assert not [line for line in lines if "failed" in line], lines
    assert "seed-test: findfs /dev/vda" in lines  # the label CIDATA, as the guest sees it
    assert "seed-test: names meta-data network-config user-data" in lines  # Rock Ridge names
    assert f"seed-test: user-data {hashlib.md5(USER_DATA).hexdigest()}  -" in lines
    assert "seed-test: meta-data instance-id: iid-cocon-1" in lines
    assert "seed-test: meta-data local-hostname: vm1" in lines
