#!/usr/bin/env python3
"""Full VMs (issue 7 §5), each part side by side with its floor in one run.

Boot time (part "boot"):

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

Live migration of a 512 MiB guest (part "migrate"), runs alternating:

1. cocon: two daemons as two hosts (tests/vm_helpers.two_hosts: the target in its own network
   namespace behind a veth pair, its API on TCP with a token). On the source
   `cocon run -d --isolation vm -m 512m busybox sh -c ...`: the command (run as root by cocon's init)
   mounts a 400 MiB tmpfs, writes 300 MiB of /dev/urandom into it (memory the migration must carry:
   random, so nothing compresses or is a zero page), prints "filled", then a counter once a second.
   Then `cocon vm migrate NAME --to tcp://... --format json`, and on the target the counter must go on
   past the last value seen on the source (the guest moved, it was not started again); removed there.
   Reported from cocon's JSON: DowntimeMs (QEMU's "downtime"), RamMs (QEMU's "total-time" of the RAM
   phase), TotalMs (the shim's whole migration: the root disk's copy over NBD, then the RAM), RamBytes,
   DiskBytes; and the CLI's wall time (also the target's preparation and the hand-over).
2. the floor: QEMU's own migration by hand, no cocon, no disk: two bare `qemu-system-x86_64` on this
   host's loopback, the same machine (q35, accelerator, -m 512, one vCPU, -cpu max), cocon's guest
   kernel and initramfs with `rdinit=/bin/sh`; the same workload typed into that shell on the serial
   console (after mounting devtmpfs: the initramfs has no /dev/urandom); the target started with
   `-incoming tcp:127.0.0.1:PORT`; on the source migrate-set-parameters as cocon sets them
   (downtime-limit 300 ms, no bandwidth cap), migrate, query-migrate until completed ("downtime",
   "total-time", ram.transferred); the target must be running and its counter go on.
Medians of each and ratios cocon / floor for the downtime and the RAM phase; cocon's disk copy is
reported on its own (TotalMs - RamMs, DiskBytes), the floor has none. QEMU's "downtime" is the
source's: from its pause to its last byte sent. The guest stays paused until the target runs it:
in the floor the target resumes on its own once it has loaded the state; under cocon only after the
source's mirrors are cancelled and the target's daemon is told to finish. Both sides also report
that whole pause (PauseMs: the downtime, then until the target runs the guest; cocon's from its
JSON, the floor's by polling the target's run state). DiskBytes is the mirror's progress, i.e. the disk's
virtual size (its unallocated parts are not sent as data). Goal (§5): downtime under
300 ms where KVM works; here it is measured under whatever accelerator cocon's probe gives (TCG on
this machine), which the summary states.

Everything is removed at the end, also on failure: the instances, the daemons (and the target's
network namespace), any QEMU whose command line names the bench's directories, the roots.
Environment: BENCH_PARTS (comma-separated, default "boot,migrate"), BENCH_RUNS (boot runs of each,
default 3), BENCH_MIGRATIONS (migrations of each, default 3).
Run as root:  .venv/bin/python bench/vm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from cli_helpers import COCON  # noqa: E402
from daemon_helpers import Daemon, start_daemon, stop_and_clean  # noqa: E402
from vm_helpers import DEBIAN_VM_IMAGE, VM_TARBALL, kill_processes, two_hosts  # noqa: E402

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


def boot_part(runs: int) -> None:
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
        print(f"ratio cocon / floor: {ours / floor:.2f} (target <= 1.1)", flush=True)
    finally:
        try:
            stop_and_clean(d)
        finally:
            kill_processes(work)
            kill_processes(d.run)
            shutil.rmtree(work, ignore_errors=True)


# --- live migration ---------------------------------------------------------------------------------

GUEST_MIB = 512
FILL_MIB = 300
#: The guest's workload under cocon: memory to carry (random, so no zero pages and nothing that
#: compresses), then a counter on the console that shows whether the guest went on or started again.
COCON_WORKLOAD = (
    "mkdir -p /fill && mount -t tmpfs -o size=400m tmpfs /fill && "
    f"dd if=/dev/urandom of=/fill/x bs=1M count={FILL_MIB} 2>/dev/null && echo filled; "
    "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done"
)
#: The same typed into the floor's shell (cocon's initramfs, rdinit=/bin/sh: no devtmpfs, no /mnt).
#: `fill""ed`: the terminal echoes the line, only the command's output says filled.
FLOOR_WORKLOAD = (
    "mount -t devtmpfs dev /dev; mkdir -p /mnt; mount -t tmpfs -o size=400m tmpfs /mnt; "
    f'dd if=/dev/urandom of=/mnt/x bs=1M count={FILL_MIB} 2>/dev/null; echo fill""ed; '
    "i=0; while :; do i=$((i+1)); echo tick $i; sleep 1; done"
)
FILLED = re.compile(r"^filled\r?$", re.M)
TICK = re.compile(r"^tick (\d+)\r?$", re.M)
MIGRATION_TIMEOUT = 900.0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} (waited {timeout:g} s)")
        time.sleep(0.5)


def filled_and_counting(console: str) -> bool:
    return bool(FILLED.search(console) and TICK.search(console))


def ticks_of(text: str) -> list[int]:
    return [int(n) for n in TICK.findall(text)]


def migrate_cocon(source: Daemon, target: Daemon, token: str, uri: str, name: str) -> dict[str, Any]:
    """One `cocon vm migrate` of a 512 MiB guest with 300 MiB written: cocon's JSON plus WallMs (the
    CLI's wall time), DiskVirtual (the root disk's virtual size), the counter before and after."""
    from cocon.storage.vm_disks import VmDisks

    try:
        cid = cocon(source, "run", "-d", "--name", name, "--isolation", "vm", "-m", f"{GUEST_MIB}m",
                    "busybox", "sh", "-c", COCON_WORKLOAD).strip()  # fmt: skip
        wait_until(lambda: filled_and_counting(cocon(source, "logs", name)),
                   f"{name} did not write its memory and start counting on the source")  # fmt: skip
        disk = VmDisks(os.path.join(source.root, "disks")).instance_path(cid)
        info = subprocess.run(["qemu-img", "info", "-U", "--output", "json", disk], capture_output=True,
                              text=True, check=True)  # fmt: skip
        before = ticks_of(cocon(source, "logs", name))[-1]
        started = time.monotonic()
        out = cocon(source, "vm", "migrate", name, "--to", uri, "--auth-token-file", token,
                    "--format", "json", timeout=MIGRATION_TIMEOUT)  # fmt: skip
        wall = time.monotonic() - started
        result: dict[str, Any] = json.loads(out)
        wait_until(
            lambda: any(n > before for n in ticks_of(cocon(target, "logs", name))),
            f"{name}'s counter did not go on on the target after the migration",
            timeout=120,
        )
        after = ticks_of(cocon(target, "logs", name))
        if after[0] <= before or FILLED.search(cocon(target, "logs", name)):
            raise RuntimeError(f"{name} started again on the target: ticks {before} there, {after} here")
        if cocon(source, "ps", "-a", "-q", "--filter", f"name={name}").strip():
            raise RuntimeError(f"{name} is still on the source after its migration")
        result.update(WallMs=round(wall * 1000), DiskVirtual=int(json.loads(info.stdout)["virtual-size"]),
                      Before=before, After=after[0])  # fmt: skip
        return result
    finally:
        for d in (source, target):
            subprocess.run([COCON, "rm", "-f", name], env=d.env, capture_output=True, timeout=120)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def floor_machine(assets: Any, accel: str, serial: str, incoming: str | None = None) -> Any:
    """cocon's VM machine without cocon: q35, the accelerator, 512 MiB, one vCPU (-cpu max under TCG),
    cocon's guest kernel and initramfs with a shell as init, the serial console on a Unix socket."""
    from cocon.vmm.qemu import MachineConfig

    return MachineConfig(
        assets.kernel, assets.initrd, cmdline="rdinit=/bin/sh", machine="q35", accel=accel,
        memory_mib=GUEST_MIB, cpus=1, serial_sockets=(serial,), incoming=incoming,
    )  # fmt: skip


def connect_unix(path: str, timeout: float = 30.0) -> socket.socket:
    """A connection to a serial port's socket, read (and dropped: QEMU's log has it) by a thread until
    it closes: QEMU writes the console a byte at a time, and unread, each byte holds a socket buffer of
    its own, so a few hundred bytes fill the socket and the guest's console stalls."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)

    def drain() -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    threading.Thread(target=drain, name="serial-drain", daemon=True).start()
    return sock


def migrate_floor(assets: Any, accel: str, work: str) -> dict[str, Any]:
    """QEMU's own migration of the same guest and workload between two bare QEMUs on loopback:
    DowntimeMs, PauseMs (the downtime, then until the target runs: polled), RamMs (total-time),
    RamBytes, and the counter before and after."""
    from cocon.vmm.migration import DOWNTIME_LIMIT_MS, MAX_BANDWIDTH
    from cocon.vmm.qemu import Qemu

    os.makedirs(work)
    src_dir, dst_dir = os.path.join(work, "src"), os.path.join(work, "dst")
    port = free_port()
    src = Qemu(floor_machine(assets, accel, os.path.join(src_dir, "serial.sock")), src_dir)
    dst = Qemu(
        floor_machine(assets, accel, os.path.join(dst_dir, "serial.sock"), f"tcp:127.0.0.1:{port}"), dst_dir
    )
    sockets: list[socket.socket] = []
    try:
        src.start(timeout=30)
        sockets.append(connect_unix(os.path.join(src_dir, "serial.sock")))
        src.wait_for_console("# ", timeout=300)  # the shell's prompt
        sockets[0].sendall(FLOOR_WORKLOAD.encode() + b"\n")
        wait_until(lambda: filled_and_counting(src.console()),
                   "the floor's guest did not write its memory and start counting")  # fmt: skip
        dst.start(timeout=30)
        sockets.append(connect_unix(os.path.join(dst_dir, "serial.sock")))  # the console goes on
        limits = {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH}  # as cocon sets them
        src.qmp("migrate-set-parameters", limits)
        before = ticks_of(src.console())[-1]
        src.qmp("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while True:
            info = src.qmp("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"the floor's migration ended {info.get('status')}: {info}")
            time.sleep(0.005)
        completed = time.monotonic()
        while dst.status() != "running":  # the target resumes on its own once it has loaded the state
            if time.monotonic() - completed > 60:
                raise RuntimeError("the floor's target does not run")
            time.sleep(0.002)
        handover_ms = int((time.monotonic() - completed) * 1000)
        wait_until(lambda: any(n > before for n in ticks_of(dst.console())),
                   "the floor's counter did not go on on the target", timeout=120)  # fmt: skip
        after = ticks_of(dst.console())
        if after[0] <= before:
            raise RuntimeError(f"the floor's guest started again: ticks {before} there, {after} here")
        return {
            "DowntimeMs": int(info.get("downtime") or 0), "RamMs": int(info.get("total-time") or 0),
            "PauseMs": int(info.get("downtime") or 0) + handover_ms,
            "RamBytes": int((info.get("ram") or {}).get("transferred") or 0), "Before": before,
            "After": after[0],
        }  # fmt: skip
    finally:
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # ends its drain thread
            except OSError:
                pass
            sock.close()
        for vm in (src, dst):
            vm.kill()
        kill_processes(work)


def ratio(ours: float, floor: float) -> str:
    return f"{ours / floor:.2f}" if floor else "n/a (floor 0)"


def migrate_part(runs: int) -> None:
    work = tempfile.mkdtemp(prefix="cocon-bench-vmmig-")
    assets_root = os.path.join(work, "assets")
    try:
        with two_hosts(os.path.join(work, "hosts"), {"COCON_ASSETS_ROOT": assets_root}) as hosts:
            source, target, token, uri = hosts
            from cocon.vmm.assets import ensure_assets
            from cocon.vmm.kvm import probe_kvm

            assets = ensure_assets(assets_root)
            accel = probe_kvm(assets).accel
            print(f"\nlive migration of a {GUEST_MIB} MiB guest ({FILL_MIB} MiB of it written), "
                  f"accelerator {accel}, {runs} run(s) of each ...", flush=True)  # fmt: skip
            floors: list[dict[str, Any]] = []
            ours: list[dict[str, Any]] = []
            for n in range(runs):
                floors.append(migrate_floor(assets, accel, os.path.join(work, f"floor-{n}")))
                ours.append(migrate_cocon(source, target, token, uri, f"bench-mig-{n}"))
                f, o = floors[-1], ours[-1]
                print(
                    f"run {n + 1}/{runs}: floor downtime {f['DowntimeMs']} ms, pause {f['PauseMs']} ms, "
                    f"RAM {f['RamMs'] / 1000:.2f} s "
                    f"({f['RamBytes'] / 2**20:.0f} MiB), ticks {f['Before']} -> {f['After']}; cocon downtime "
                    f"{o['DowntimeMs']} ms, pause {o['PauseMs']} ms, RAM {o['RamMs'] / 1000:.2f} s "
                    f"({o['RamBytes'] / 2**20:.0f} MiB), "
                    f"total {o['TotalMs'] / 1000:.2f} s (disk "
                    f"{(o['TotalMs'] - o['RamMs']) / 1000:.2f} s, {o['DiskBytes'] / 2**20:.0f} MiB of mirror "
                    f"progress), CLI {o['WallMs'] / 1000:.2f} s, ticks {o['Before']} -> {o['After']}",
                    flush=True,
                )

            def median(rows: list[dict[str, Any]], key: str) -> float:
                return float(statistics.median(r[key] for r in rows))

            fd, od = median(floors, "DowntimeMs"), median(ours, "DowntimeMs")
            fp, op = median(floors, "PauseMs"), median(ours, "PauseMs")
            fr, orr = median(floors, "RamMs") / 1000, median(ours, "RamMs") / 1000
            total, wall = median(ours, "TotalMs") / 1000, median(ours, "WallMs") / 1000
            disk_s = statistics.median((r["TotalMs"] - r["RamMs"]) / 1000 for r in ours)
            disk_mib = median(ours, "DiskBytes") / 2**20
            virtual = ours[0]["DiskVirtual"] / 2**30
            fsent, osent = median(floors, "RamBytes") / 2**20, median(ours, "RamBytes") / 2**20
            print(
                f"\nlive migration of a {GUEST_MIB} MiB guest ({FILL_MIB} MiB of it written), accelerator "
                f"{accel}, medians of {runs}:\n"
                f"  downtime (QEMU's): floor {fd:.0f} ms, cocon {od:.0f} ms (ratio {ratio(od, fd)})\n"
                f"  the guest's whole pause (downtime + hand-over until the target runs it): "
                f"floor {fp:.0f} ms, "
                f"cocon {op:.0f} ms (ratio {ratio(op, fp)})\n"
                f"  RAM phase: floor {fr:.2f} s, cocon {orr:.2f} s (ratio {ratio(orr, fr)}); RAM sent: "
                f"floor {fsent:.0f} MiB, cocon {osent:.0f} MiB\n"
                f"  cocon total incl. the root disk copy ({virtual:.1f} GiB virtual, mostly unallocated; "
                f"{disk_mib:.0f} MiB of mirror progress in {disk_s:.2f} s): {total:.2f} s; the CLI's wall "
                f"time (with the target's preparation and the hand-over): {wall:.2f} s\n"
                f"  goal: downtime < 300 ms under KVM — measured here under {accel.upper()}",
                flush=True,
            )
    finally:
        kill_processes(work)
        shutil.rmtree(work, ignore_errors=True)


PARTS = ("boot", "migrate")


def main() -> int:
    if os.geteuid() != 0:
        print("bench/vm.py runs VMs and daemons: run it as root", file=sys.stderr)
        return 1
    parts = [p.strip() for p in os.environ.get("BENCH_PARTS", ",".join(PARTS)).split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        print(f"BENCH_PARTS: unknown part(s) {', '.join(unknown) or '(none given)'}: use {','.join(PARTS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if "boot" in parts:
        boot_part(int(os.environ.get("BENCH_RUNS", "3")))
    if "migrate" in parts:
        migrate_part(int(os.environ.get("BENCH_MIGRATIONS", "3")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
