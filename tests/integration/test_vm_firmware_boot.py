"""The firmware resolve_firmware picks really comes up under QEMU (q35, TCG, no disk): OVMF reaches its
boot manager (`BdsDxe` on the serial console) and SeaBIOS prints its banner and finds nothing to boot.

Every QEMU started here has the test's tmp_path in its command line; it is killed in a `finally`
and the autouse fixture fails the test if one is still running."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from cocon.vmm.firmware import resolve_firmware
from vm_helpers import kill_processes

TIMEOUT = 120.0  # TCG on a busy 2-core machine


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path: str) -> Iterator[None]:
    yield
    left = kill_processes(str(tmp_path))
    assert left == [], f"QEMU processes left behind: {left}"


def _boot_until(tmp_path: str, firmware_args: tuple[str, ...], markers: tuple[str, ...]) -> str:
    """Start QEMU with `firmware_args`, wait until every marker is on the serial console, kill QEMU;
    return the console text."""
    log = os.path.join(tmp_path, "serial.log")
    argv = [
        "qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "256", "-nographic", "-nodefaults",
        "-serial", f"file:{log}", "-no-reboot", "-name", "firmware-test",
        *firmware_args,
        "-pidfile", os.path.join(tmp_path, "qemu.pid"),
    ]  # fmt: skip
    stderr_path = os.path.join(tmp_path, "qemu.stderr")
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    text = ""
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if os.path.exists(log):
                with open(log, "rb") as f:
                    text = f.read().decode("utf-8", "replace")
            if all(m in text for m in markers):
                return text
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        with open(stderr_path, "rb") as f:
            err = f.read().decode("utf-8", "replace")
        pytest.fail(
            f"firmware did not print {markers} within {TIMEOUT:.0f} s (QEMU exit status {proc.poll()}); "
            f"stderr: {err[-2000:]!r}; console: {text[-2000:]!r}"
        )
    finally:
        proc.kill()
        proc.wait()


def test_ovmf_boots(tmp_path: str) -> None:
    vars_dir = os.path.join(str(tmp_path), "vm")
    spec = resolve_firmware("uefi", vars_dir)
    assert spec.machine == "q35"
    text = _boot_until(str(tmp_path), spec.args, ("BdsDxe",))
    # OVMF's boot manager ran: it tries its boot options (here, with no disk, the UEFI shell or a
    # "failed to load" message) on the serial console
    assert "BdsDxe: " in text
    assert "Boot0" in text
    # the per-VM variable store is still there, the size of the template, for the next start
    assert spec.vars is not None
    assert os.path.getsize(spec.vars) == os.path.getsize("/usr/share/OVMF/OVMF_VARS_4M.fd")
    assert resolve_firmware("uefi", vars_dir) == spec


def test_seabios_boots(tmp_path: str) -> None:
    spec = resolve_firmware("bios", os.path.join(str(tmp_path), "vm"))
    assert spec.args == ()
    # SeaBIOS writes its console to the serial port as well as to the debug port (0x402)
    debug = os.path.join(str(tmp_path), "debugcon.log")
    args = (
        *spec.args,
        "-chardev",
        f"file,id=dbg,path={debug}",
        "-device",
        "isa-debugcon,iobase=0x402,chardev=dbg",
    )
    text = _boot_until(str(tmp_path), args, ("SeaBIOS (version", "No bootable device"))
    assert "Booting from Hard Disk" in text
    with open(debug, "rb") as f:
        assert b"SeaBIOS (version" in f.read()
