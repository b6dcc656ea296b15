#!/usr/bin/env python3
"""Full-VM boot time (issue 7 §5), side by side in one run:

1. `cocon run -d --isolation vm debian-vm:bookworm` (Debian with its own kernel and systemd, booted
   by cocon: the image's kernel and initrd, its root disk an overlay of the image's base disk, a NIC
   on cocon's default network answered by the shim's DHCP): from the CLI's start to the `login:`
   prompt on the serial console (`cocon logs`);
2. the floor: a hand-written `qemu-system-x86_64` booting the same disk (a fresh overlay of the same
   base disk), the same kernel and initrd and command line, the same machine (q35, accelerator,
   memory, one vCPU), a virtio NIC on QEMU's own isolated user network (its DHCP answers): from
   process start to `login:` on the serial console;
ratio cocon / floor (target <= 1.1). Runs alternate after one warm-up each (the warm-up of cocon
builds the image's base disk).

Live-migration downtime and total time (also §5) are not measured yet: `cocon vm migrate` is not
built yet (docs/vm.md).

Everything is removed at the end, also on failure: the instances, the daemon, any QEMU whose command
line names the bench's directories, the root.
Environment: BENCH_RUNS (runs of each, default 3). Run as root:  .venv/bin/python bench/vm.py
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from cli_helpers import COCON  # noqa: E402
from daemon_helpers import Daemon, start_daemon, stop_and_clean  # noqa: E402
from vm_helpers import DEBIAN_VM_IMAGE, VM_TARBALL, kill_processes  # noqa: E402

LOGIN = "login:"
TIMEOUT = 600.0


def cocon(d: Daemon, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run([COCON, *args], env=d.env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"cocon {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def boot_cocon(d: Daemon, name: str, keep_boot_files: str | None = None) -> float:
    """Seconds to the login prompt; `keep_boot_files`: copy the kernel and initrd cocon took out of
    the image there (for the floor) before the instance goes."""
    started = time.monotonic()
    cid = cocon(d, "run", "-d", "--name", name, "--isolation", "vm", DEBIAN_VM_IMAGE).strip()
    while LOGIN not in cocon(d, "logs", name):
        if time.monotonic() - started > TIMEOUT:
            raise RuntimeError(f"{name} did not reach {LOGIN!r}")
        time.sleep(0.05)
    seconds = time.monotonic() - started
    if keep_boot_files:
        for file in ("vmlinuz", "initrd.img"):
            shutil.copyfile(
                os.path.join(d.root, "disks", "instances", cid, file), os.path.join(keep_boot_files, file)
            )
    cocon(d, "rm", "-f", name)
    return seconds


def floor_command(d: Daemon, work: str, machine: dict[str, object], base: str) -> list[str]:
    """The hand-written command line: cocon's machine for this image, without cocon."""
    disk = os.path.join(work, "floor.qcow2")
    if os.path.exists(disk):
        os.unlink(disk)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", disk], check=True)
    from cocon.vmm.qemu import host_tsc_khz

    cmdline = "root=LABEL=cocon-root rw console=ttyS0 panic=-1 quiet cryptomgr.notests"
    khz = host_tsc_khz()
    if machine["accel"] == "tcg" and khz:
        cmdline += f" tsc_early_khz={khz}"
    return [
        "qemu-system-x86_64", "-M", "q35", "-accel", str(machine["accel"]), "-cpu", "max", "-m", "1024",
        "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"file:{os.path.join(work, 'floor-console.log')}",
        "-kernel", str(machine["kernel"]), "-initrd", str(machine["initrd"]), "-append", cmdline,
        "-drive", f"if=none,id=root,file={disk},format=qcow2", "-device", "virtio-blk-pci,drive=root",
        "-nic", "user,model=virtio-net-pci,restrict=on",
    ]  # fmt: skip


def boot_floor(argv: list[str], work: str) -> float:
    log = os.path.join(work, "floor-console.log")
    if os.path.exists(log):
        os.unlink(log)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while True:
            try:
                with open(log, errors="replace") as f:
                    if LOGIN in f.read():
                        return time.monotonic() - started
            except FileNotFoundError:
                pass
            if proc.poll() is not None or time.monotonic() - started > TIMEOUT:
                raise RuntimeError("the floor's QEMU did not reach the login prompt")
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    if os.geteuid() != 0:
        print("bench/vm.py runs VMs and daemons: run it as root", file=sys.stderr)
        return 1
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    work = tempfile.mkdtemp(prefix="cocon-bench-vm-")
    d = start_daemon(work, env={"COCON_ASSETS_ROOT": os.path.join(work, "assets")})
    try:
        print("bootstrapping debian-vm:bookworm (offline, from the set-up's tarball) ...", flush=True)
        cocon(d, "image", "bootstrap", "debian-vm", "--tarball", VM_TARBALL)
        print("warm-up (cocon builds the image's base disk) ...", flush=True)
        boot = os.path.join(work, "boot")
        os.makedirs(boot)
        warm = boot_cocon(d, "bench-warm", keep_boot_files=boot)
        from cocon.images.store import ImageStore
        from cocon.storage.vm_disks import VmDisks
        from cocon.vmm.assets import ensure_assets
        from cocon.vmm.kvm import probe_kvm

        image = ImageStore(d.root).resolve(DEBIAN_VM_IMAGE)
        base = VmDisks(os.path.join(d.root, "disks")).cached_image_base(image.id)
        assert base, "the warm-up did not build the base disk"
        kernel, initrd = os.path.join(boot, "vmlinuz"), os.path.join(boot, "initrd.img")
        accel = probe_kvm(ensure_assets(os.path.join(work, "assets"))).accel
        argv = floor_command(d, work, {"accel": accel, "kernel": kernel, "initrd": initrd}, base)
        boot_floor(argv, work)  # warm-up
        cocon_times, floor_times = [], []
        for n in range(runs):
            floor_argv = floor_command(d, work, {"accel": accel, "kernel": kernel, "initrd": initrd}, base)
            floor_times.append(boot_floor(floor_argv, work))
            cocon_times.append(boot_cocon(d, f"bench-{n}"))
            print(
                f"run {n + 1}/{runs}: floor {floor_times[-1]:.2f} s, cocon {cocon_times[-1]:.2f} s",
                flush=True,
            )
        floor, ours = statistics.median(floor_times), statistics.median(cocon_times)
        print(f"\naccelerator: {accel}; warm-up (incl. building the base disk): {warm:.2f} s")
        print(
            f"boot to login: floor (hand-written qemu) {floor:.2f} s, cocon run --isolation vm {ours:.2f} s"
        )
        print(f"ratio cocon / floor: {ours / floor:.2f} (target <= 1.1)")
        print("live migration: not measured (cocon vm migrate is not built yet)")
        return 0
    finally:
        try:
            stop_and_clean(d)
        finally:
            kill_processes(work)
            kill_processes(d.run)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
