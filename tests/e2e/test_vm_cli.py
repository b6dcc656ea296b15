"""`cocon vm`: full VMs from any disk or ISO, through the real CLI and daemon and real QEMU (TCG here).

The guest is a Debian that cocon builds (tests/vm_helpers.build_debian_vm: debootstrap with a kernel
and systemd, made into a GPT disk with GRUB for BIOS and UEFI), copied per test; the ISO is made with
grub-mkrescue. What a user checks: it boots through its own boot loader under both firmwares to a
login on the serial console, the console is interactive and detaches with Ctrl-], the guest gets its
address on cocon's network by DHCP, a stop is an ACPI shutdown (exit 0) and the disk persists, and
bad input is refused with nothing left behind (a cloud-init seed is applied: tests/e2e/test_vm_migrate.py)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import COCON, read_until
from daemon_helpers import Daemon, start_daemon, stop_and_clean
from vm_helpers import kill_processes

BOOT_TIMEOUT = 300  # a Debian with systemd under TCG on a busy 2-core machine


def assets_root(d: Daemon) -> str:
    return os.path.join(os.path.dirname(d.root), "assets")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = str(tmp_path_factory.mktemp("vmcli"))
    d = start_daemon(base, env={"COCON_ASSETS_ROOT": os.path.join(base, "assets")})
    assert os.path.dirname(d.root) == base
    try:
        yield d
    finally:
        code, log = stop_and_clean(d)
        left = kill_processes(d.run) + kill_processes(d.run, b"python")
        assert left == [], f"VM processes left behind: {left}"
        assert code == 0 and "Traceback" not in log, log


def cocon(
    d: Daemon, *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([COCON, *args], env=d.env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc
    return proc


@pytest.fixture
def disk(debian_vm: tuple[str, str], tmp_path: Any) -> str:
    path = str(tmp_path / "guest.qcow2")
    shutil.copyfile(debian_vm[1], path)
    return path


@pytest.fixture
def vms(daemon: Daemon) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        cocon(daemon, "rm", "-f", name, check=False)


def wait_for_log(d: Daemon, name: str, text: str, timeout: float = BOOT_TIMEOUT, times: int = 1) -> str:
    """The logs once they show `text` (`times` times: a VM's log keeps its earlier boots)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = cocon(d, "logs", name, check=False).stdout
        if logs.count(text) >= times:
            return logs
        assert time.monotonic() < deadline, f"{name}'s console never showed {text!r}:\n{logs[-3000:]}"
        time.sleep(2)


def wait_exited(d: Daemon, name: str, timeout: float = 120) -> int:
    out = cocon(d, "wait", name, timeout=timeout).stdout
    return int(out.strip())


def test_bios_boot_console_network_stop_and_persistence(daemon: Daemon, disk: str, vms: list[str]) -> None:
    vms.append("deb-bios")
    cocon(daemon, "vm", "create", "deb-bios", "--disk", disk, "--memory", "768M")
    cocon(daemon, "vm", "start", "deb-bios")
    logs = wait_for_log(daemon, "deb-bios", "login:")
    assert "SeaBIOS" in logs  # the firmware, then GRUB, then the guest's own kernel and systemd
    listing = cocon(daemon, "vm", "ls", "--format", "json").stdout
    assert '"Name":"deb-bios"' in listing.replace(" ", "") and '"State":"running"' in listing.replace(" ", "")

    # the serial console: log in, write a file, read the address DHCP gave, detach with Ctrl-]
    master, slave = os.openpty()
    proc = subprocess.Popen([COCON, "vm", "console", "deb-bios"], stdin=slave, stdout=slave, stderr=slave,
                            env=daemon.env, start_new_session=True)  # fmt: skip
    os.close(slave)
    try:
        read_until(master, b"Connected to the console", timeout=30)
        prompt = b""
        for _ in range(20):  # Enter until getty answers (the CLI's raw mode drops what came before it)
            os.write(master, b"\r")
            try:
                prompt += read_until(master, b"login:", timeout=3)
                break
            except AssertionError:
                continue
        assert b"login:" in prompt
        os.write(master, b"root\r")
        read_until(master, b"#", timeout=120)
        os.write(
            master, b"echo pet-$((6*7)) > /root/mark; sync; cat /root/mark; ip -4 -o addr show scope global\r"
        )
        inspect = cocon(daemon, "inspect", "deb-bios").stdout
        address = inspect.split('"IPAddress": "', 1)[1].split('"', 1)[0]
        assert address
        out = read_until(master, f"inet {address}/".encode(), timeout=60)  # DHCP gave cocon's IPAM address
        assert b"pet-42\n" in out.replace(b"\r", b"")
        os.write(master, b"\x1d")  # Ctrl-]: detach, the VM keeps running
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    ping = cocon(daemon, "run", "--rm", "busybox", "ping", "-c", "2", "-W", "3", address, check=False)
    assert ping.returncode == 0, ping

    started = time.monotonic()
    cocon(daemon, "vm", "stop", "deb-bios", timeout=180)  # the ACPI power button: systemd shuts down
    assert wait_exited(daemon, "deb-bios") == 0
    assert time.monotonic() - started < 60
    assert "reboot: Power down" in cocon(daemon, "logs", "deb-bios").stdout

    # a pet: the disk keeps what the guest wrote
    logins = cocon(daemon, "logs", "deb-bios").stdout.count("login:")
    cocon(daemon, "vm", "start", "deb-bios")
    wait_for_log(daemon, "deb-bios", "login:", times=logins + 1)
    cocon(daemon, "vm", "stop", "deb-bios", timeout=180)
    assert wait_exited(daemon, "deb-bios") == 0
    # read the file back from the disk, with the VM off: the root filesystem is the third partition
    from cocon.vmm.guest_images import ROOT_START

    raw = disk + ".root"
    try:
        subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"if={disk}", f"of={raw}", "bs=1M",
                        f"skip={ROOT_START >> 20}"], check=True, capture_output=True)  # fmt: skip
        part = subprocess.run(["debugfs", "-R", "cat /root/mark", raw], capture_output=True, text=True)
        assert "pet-42" in part.stdout, part
    finally:
        if os.path.exists(raw):
            os.unlink(raw)


def test_uefi_boot(daemon: Daemon, disk: str, vms: list[str]) -> None:
    vms.append("deb-uefi")
    cocon(daemon, "vm", "create", "deb-uefi", "--disk", disk, "--firmware", "uefi")
    cocon(daemon, "vm", "start", "deb-uefi")
    logs = wait_for_log(daemon, "deb-uefi", "login:")
    assert "EFI" in logs  # OVMF booted GRUB's BOOTX64.EFI, which booted the guest
    row = [line for line in cocon(daemon, "vm", "ls").stdout.splitlines() if line.startswith("deb-uefi")]
    assert row and "uefi" in row[0] and "running" in row[0]
    cocon(daemon, "vm", "rm", "-f", "deb-uefi")
    assert os.path.exists(disk)  # the user's disk stays unless --delete-disk
    vms.remove("deb-uefi")


def test_iso_boot(daemon: Daemon, tmp_path: Any, vms: list[str]) -> None:
    """A grub-mkrescue ISO (BIOS) boots from the CD-ROM on a new, empty disk."""
    from cocon.vmm.assets import ensure_assets
    from cocon.vmm.guest_images import make_boot_iso, make_marker_initramfs

    assets = ensure_assets(assets_root(daemon))
    initrd = make_marker_initramfs(str(tmp_path / "marker.img"), "cocon-iso-marker: booted")
    bzimage = os.path.join(assets.directory, "vmlinuz")  # GRUB boots the compressed kernel
    iso = make_boot_iso(str(tmp_path / "live.iso"), bzimage, initrd, "console=ttyS0")
    new_disk = str(tmp_path / "empty.qcow2")
    vms.append("live")
    cocon(daemon, "vm", "create", "live", "--disk", new_disk, "--disk-size", "1G", "--iso", str(iso))
    assert os.path.exists(new_disk)
    cocon(daemon, "vm", "start", "live")
    wait_for_log(daemon, "live", "cocon-iso-marker: booted", timeout=180)
    assert wait_exited(daemon, "live") == 0  # the marker's init powers the machine off
    cocon(daemon, "vm", "rm", "--delete-disk", "live")
    vms.remove("live")
    assert not os.path.exists(new_disk)


def test_bad_input_is_refused_and_leaves_nothing(daemon: Daemon, tmp_path: Any, disk: str) -> None:
    missing = str(tmp_path / "nope.qcow2")
    p = cocon(daemon, "vm", "create", "bad1", "--disk", missing, check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr and "--disk-size" in p.stderr
    corrupt = tmp_path / "corrupt.qcow2"
    with open(disk, "rb") as f:
        corrupt.write_bytes(f.read(1 << 20)[:4096] + b"\xff" * (1 << 16))
    p = cocon(daemon, "vm", "create", "bad2", "--disk", str(corrupt), check=False)
    assert p.returncode != 0 and "qcow2" in p.stderr.lower(), p
    backed = str(tmp_path / "backed.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "qcow2", backed], check=True)
    p = cocon(daemon, "vm", "create", "bad3", "--disk", backed, check=False)
    assert p.returncode != 0 and "backing file" in p.stderr, p
    not_iso = tmp_path / "not.iso"
    not_iso.write_bytes(b"this is no ISO" * 5000)
    new_disk = str(tmp_path / "new.qcow2")
    p = cocon(daemon, "vm", "create", "bad4", "--disk", new_disk, "--disk-size", "1G", "--iso", str(not_iso),
              check=False)  # fmt: skip
    assert p.returncode != 0 and "not an ISO 9660 image" in p.stderr, p
    assert not os.path.exists(new_disk)  # nothing half-made
    bad_yaml = tmp_path / "user-data"
    bad_yaml.write_text("#cloud-config\nruncmd: [unclosed\n")
    p = cocon(daemon, "vm", "create", "bad5", "--disk", disk, "--cloud-init", str(bad_yaml), check=False)
    assert p.returncode != 0 and "YAML" in p.stderr, p
    p = cocon(daemon, "vm", "create", "bad6", "--disk", disk, "--firmware", "coreboot", check=False)
    assert p.returncode != 0 and "uefi" in p.stderr
    listing = cocon(daemon, "vm", "ls", "-a", "-q").stdout.split()
    assert not any(name.startswith("bad") for name in listing), listing


def test_api_create_and_remove(daemon: Daemon, disk: str) -> None:
    """The native API: POST /cocon/v1/vms with a base64 seed, GET lists it, DELETE removes it."""
    client = daemon.client()
    seed = base64.b64encode(b"#cloud-config\nhostname: api-vm\n").decode()
    created = client.call("POST", "/cocon/v1/vms", doc={"Name": "api-vm", "Disk": disk, "Cpus": 1,
                                                       "Memory": "512M", "CloudInit": seed})  # fmt: skip
    try:
        listing = client.call("GET", "/cocon/v1/vms")
        (vm,) = [v for v in listing if v["Name"] == "api-vm"]
        assert vm["Id"] == created["Id"] and vm["State"] == "created" and vm["MemoryMiB"] == 512
        assert vm["Disk"] == disk
    finally:
        client.call("DELETE", "/cocon/v1/vms/api-vm", [("force", "1")])
    assert all(v["Name"] != "api-vm" for v in client.call("GET", "/cocon/v1/vms"))
    assert os.path.exists(disk)
