#!/usr/bin/env python3
"""microVM start time and memory (issue 6 §5), side by side in one run:

1. the floor: bare `qemu-system-x86_64 -kernel` of cocon's guest kernel + initramfs without
   `cocon.agent=1` (its init prints `cocon-guest: ready` and powers off), with the shim's machine
   (microvm, accelerator, memory and vCPUs of a container without limits, the TSC word under TCG);
   timed from process start to QEMU's exit, no QMP connection;
2. `cocon run --rm --network none --isolation microvm busybox true`, cold: a daemon started with
   COCON_MICROVM_TEMPLATES=0; wall time of the CLI; ratio to the floor (target <= 1.3);
3. the same through a daemon without that variable (templates when the shim uses them); ratio to the
   cold start (target <= 0.25);
4. host memory of one idle microVM (cold and template daemon) and of BENCH_VMS idle microVMs
   (`cocon run -d … busybox sleep 3600`, template daemon): per VM, QEMU's RSS minus the guest memory
   the guest touched (the RSS of QEMU's guest RAM mapping, the one whose size is the guest memory),
   plus the shim's PSS plus conmon's PSS (target <= 30 MiB); and the drop of MemAvailable per VM;
5. `cocon run --rm --network none --isolation container busybox true` for context, and whether KVM
   or TCG was used (cocon.vmm.kvm.probe_kvm).

Both daemons run on private roots (COCON_ROOT under a temporary directory, COCON_RUN under /run);
the guest assets are built once into $COCON_ASSETS_ROOT (reused when set, else a directory of the
bench's own, removed at the end). Runs alternate (floor, cold, template, container) after one
warm-up run each (two for the template daemon: its first run may make the template).
Everything is removed at the end, also on Ctrl-C or failure: containers, daemons, any QEMU, shim
(`cocon-microvm-runtime`) or conmon whose command line names the bench's directories, the roots.

Environment: BENCH_RUNS (runs of each, default 5), BENCH_VMS (idle VMs, default 20), BENCH_SETTLE
(seconds the idle VMs get before they are measured, default 10), COCON_ASSETS_ROOT.

Run as root:  .venv/bin/python bench/microvm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "src")
sys.path.insert(0, SRC)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from cli_helpers import (  # noqa: E402
    COCON,
    kill_prestarted,
    new_root_with_busybox,
    reset_network,
    stop_daemon,
    unmount_all,
)
from daemon_helpers import wait_for_socket  # noqa: E402
from host_memory import drop_caches, mem_available, rollup  # noqa: E402

MiB = 1024 * 1024
BIN = os.path.dirname(COCON)
READY = "cocon-guest: ready"
RUN_TIMEOUT = 300.0  # one `cocon run` (a cold TCG boot on a busy host takes seconds, rarely a minute)
MICROVM = ["--network", "none", "--isolation", "microvm", "busybox"]


def env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        raise SystemExit(f"{name} must be a number, not {os.environ[name]!r}") from None


# --- daemons ---------------------------------------------------------------------------------------


@dataclass
class Daemon:
    name: str
    root: str
    run: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    ids: list[str] = field(default_factory=list)  # detached containers this bench started

    def cli(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self._cli(args, timeout)[0]

    def timed(self, *args: str) -> float:
        return self._cli(args, RUN_TIMEOUT)[1]

    def _cli(self, args: tuple[str, ...], timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
        """`cocon ARGS` and its wall time; RuntimeError when it fails."""
        start = time.perf_counter()
        proc = subprocess.run([COCON, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            message = proc.stderr.strip() or proc.stdout.strip()
            raise RuntimeError(
                f"[{self.name} daemon] cocon {' '.join(args)} exited {proc.returncode}: {message}"
            )
        return proc, elapsed

    def state_dir(self, cid: str) -> str:
        return os.path.join(self.run, "vm", cid[:12])


def start_daemon(
    name: str, base: str, run_base: str, assets_root: str, templates: bool, launcher: list[str]
) -> Daemon:
    root, run = os.path.join(base, name), os.path.join(run_base, name)
    new_root_with_busybox(root)
    os.makedirs(run, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "COCON_MICROVM_TEMPLATES"}
    env.update(COCON_ROOT=root, COCON_RUN=run, COCON_ASSETS_ROOT=assets_root)
    if not templates:
        env["COCON_MICROVM_TEMPLATES"] = "0"
    d = Daemon(name, root, run, env)
    with open(os.path.join(base, f"daemon-{name}.log"), "wb") as log:
        d.proc = subprocess.Popen(
            [*launcher, "daemon"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_for_socket(os.path.join(run, "cocon.sock"), d.proc, timeout=60)
    return d


# --- processes and memory --------------------------------------------------------------------------


def cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def processes_naming(dirs: list[str]) -> list[int]:
    """Processes (not this one) whose command line names one of `dirs`: QEMU, shims, conmon."""
    marks = [os.path.realpath(d).encode() for d in dirs] + [d.encode() for d in dirs]
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            argv = cmdline(int(entry))
            if any(m in a for a in argv for m in marks):
                found.append(int(entry))
    return found


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


_HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def qemu_maps(pid: int, memory_mib: int) -> dict[str, Any]:
    """QEMU's RSS by mapping kind (bytes): "guest" is the mapping whose size is the guest memory
    (anonymous, memfd, or a template's RAM file mapped privately; the smallest one from guest memory
    up to guest memory + 64 MiB if none is exact), i.e. the guest memory the guest touched; "code"
    anonymous executable mappings (TCG's translated code), "files" file-backed mappings (QEMU and its
    libraries), "anon" every other anonymous mapping (heap, stacks, device buffers); "backing" names
    the guest RAM's mapping."""
    maps: list[tuple[int, int, str, str, int]] = []  # size, rss, perms, backing, pss
    size = rss = pss = 0
    perms = backing = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if _HEADER.match(line):
                if size:
                    maps.append((size, rss, perms, backing, pss))
                parts = line.split(None, 5)
                perms, backing = parts[1], (parts[5].strip() if len(parts) > 5 else "")
                size = rss = pss = 0
            elif line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    if size:
        maps.append((size, rss, perms, backing, pss))
    want = memory_mib * MiB
    candidates = sorted((m for m in maps if want <= m[0] <= want + 64 * MiB), key=lambda m: m[0])
    if not candidates:
        raise RuntimeError(f"QEMU {pid} has no mapping of {memory_mib} MiB (its guest RAM)")
    guest = candidates[0]
    out: dict[str, Any] = {"guest": guest[1], "guest_pss": guest[4], "code": 0, "files": 0, "anon": 0,
                           "backing": guest[3] or "anonymous"}  # fmt: skip
    per_file: dict[str, int] = {}
    for m in maps:
        if m is guest:
            continue
        if m[3].startswith("/") and "(deleted)" not in m[3] and not m[3].startswith("/memfd:"):
            out["files"] += m[1]
            per_file[m[3]] = per_file.get(m[3], 0) + m[1]
        elif "x" in m[2]:
            out["code"] += m[1]
        else:
            out["anon"] += m[1]
    out["top_file"] = max(per_file.items(), key=lambda kv: kv[1], default=("-", 0))
    return out


@dataclass
class VmMemory:
    qemu_rss: int
    maps: dict[str, Any]  # qemu_maps()
    qemu_pss: int
    shim_pss: int
    conmon_pss: int
    restored: bool  # QEMU runs with -incoming: restored from a template

    @property
    def guest(self) -> int:  # RSS of the guest RAM mapping: memory the guest touched
        return int(self.maps["guest"])

    @property
    def overhead(self) -> int:
        return self.qemu_rss - self.guest + self.shim_pss + self.conmon_pss

    @property
    def overhead_pss(self) -> int:  # shared pages (libraries, page cache) divided among their users
        return self.qemu_pss - int(self.maps["guest_pss"]) + self.shim_pss + self.conmon_pss


def vm_memory(d: Daemon, cid: str, memory_mib: int) -> VmMemory:
    with open(os.path.join(d.state_dir(cid), "state.json")) as f:
        doc = json.load(f)
    shim, qemu = int(doc["pid"]), int(doc["qemu_pid"])
    conmon = parent_of(shim)
    argv = cmdline(conmon)
    if not (argv and argv[0].endswith(b"conmon")):
        raise RuntimeError(
            f"the shim {shim} of {cid[:12]} is not conmon's child (parent {conmon}: {argv[:1]})"
        )
    maps = qemu_maps(qemu, memory_mib)
    q = rollup(qemu)
    restored = b"-incoming" in cmdline(qemu)
    return VmMemory(q["Rss"], maps, q["Pss"], rollup(shim)["Pss"], rollup(conmon)["Pss"], restored)


def start_idle(d: Daemon, timeout: float = RUN_TIMEOUT) -> str:
    """`cocon run -d` of an idle microVM; its id once its shim says `running` and QEMU is there."""
    cid = d.cli("run", "-d", *MICROVM, "sleep", "3600").stdout.strip().splitlines()[-1]
    d.ids.append(cid)
    deadline = time.monotonic() + timeout
    path = os.path.join(d.state_dir(cid), "state.json")
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                doc = json.load(f)
            if doc.get("status") == "running" and os.path.exists(f"/proc/{doc.get('qemu_pid')}"):
                return cid
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"[{d.name} daemon] microVM {cid[:12]} is not running after {timeout:g} s")


def remove_containers(d: Daemon) -> None:
    if d.proc is None or d.proc.poll() is not None:
        return
    try:
        ids = d.cli("ps", "-aq", "--no-trunc", timeout=60).stdout.split()
        if ids:
            d.cli("rm", "-f", *ids, timeout=180)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"  clean-up: {exc}", file=sys.stderr)


# --- measurements ----------------------------------------------------------------------------------


def floor_run(command: list[str], work: str) -> float:
    """One bare QEMU boot to power-off: seconds from process start to exit."""
    os.makedirs(work)
    start = time.perf_counter()
    proc = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=RUN_TIMEOUT,
    )
    elapsed = time.perf_counter() - start
    with open(os.path.join(work, "console.log"), errors="replace") as f:
        console = f.read()
    if proc.returncode != 0 or READY not in console:
        raise RuntimeError(
            f"the bare QEMU boot failed (status {proc.returncode}): {proc.stderr.decode(errors='replace')}"
            f"{console[-500:]}"
        )
    shutil.rmtree(work, ignore_errors=True)
    return elapsed


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def show_times(label: str, values: list[float], extra: str = "") -> None:
    print(
        f"  {label:<47} median {med(values):7.3f} s  (min {min(values):6.3f}, max {max(values):6.3f}){extra}"
    )


def show_memory(label: str, vms: list[VmMemory]) -> None:
    n = len(vms)

    def avg(attr: str) -> float:
        return float(sum(getattr(v, attr) for v in vms)) / n / MiB

    def part(key: str) -> float:
        return float(sum(v.maps[key] for v in vms)) / n / MiB

    over = [v.overhead / MiB for v in vms]
    restored = sum(v.restored for v in vms)
    print(f"  {label}: {restored} of {n} restored from a template")
    backing = str(vms[0].maps["backing"])
    if backing.startswith("/"):
        backing = "RAM file " + os.path.basename(os.path.dirname(backing))[:12] + "…/ram, private"
    print(f"    QEMU RSS {avg('qemu_rss'):7.1f} MiB, of which guest RAM touched {avg('guest'):6.1f} MiB "
          f"({backing}); QEMU PSS {avg('qemu_pss'):6.1f} MiB")  # fmt: skip
    name, size = vms[0].maps["top_file"]
    print(f"    QEMU RSS beyond guest RAM: anonymous executable (TCG code cache) {part('code'):5.1f} MiB, "
          f"other anonymous {part('anon'):5.1f} MiB,\n      files {part('files'):5.1f} MiB "
          f"(the most: {os.path.basename(name)} {size / MiB:.1f} MiB)")  # fmt: skip
    print(f"    QEMU beyond guest RAM {(avg('qemu_rss') - avg('guest')):6.1f} MiB + shim PSS "
          f"{avg('shim_pss'):5.1f} MiB + conmon PSS {avg('conmon_pss'):5.1f} MiB")  # fmt: skip
    spread = f" (min {min(over):.1f}, max {max(over):.1f})" if n > 1 else ""
    verdict = "met" if statistics.mean(over) <= 30 else "NOT met"
    print(f"    overhead per microVM beyond guest memory: {statistics.mean(over):6.1f} MiB{spread}"
          f"  (target <= 30 MiB: {verdict})")  # fmt: skip
    pss = statistics.mean(v.overhead_pss / MiB for v in vms)
    print(f"    the same with QEMU's PSS instead of its RSS (shared pages divided among VMs): {pss:6.1f} MiB")


def count_templates(path: str) -> str:
    from cocon.vmm.template import TemplateStore

    try:
        return f"{len(TemplateStore(path).templates())} (in {path}/templates)"
    except Exception as exc:
        return f"unknown ({exc})"


def bench(base: str, run_base: str, daemons: list[Daemon]) -> None:
    from cocon.isolation.microvm import machine_size
    from cocon.vmm.assets import ensure_assets
    from cocon.vmm.kvm import probe_kvm
    from cocon.vmm.qemu import MachineConfig, build_command

    runs, n_vms = env_int("BENCH_RUNS", 5), env_int("BENCH_VMS", 20)
    settle = float(os.environ.get("BENCH_SETTLE", "10"))
    own_assets = not os.environ.get("COCON_ASSETS_ROOT")
    assets_root = os.environ.get("COCON_ASSETS_ROOT") or os.path.join(base, "assets-root")
    os.makedirs(assets_root, exist_ok=True)
    t = time.monotonic()
    assets = ensure_assets(assets_root)
    built = time.monotonic() - t
    probe = probe_kvm(assets)
    memory, cpus = machine_size({})
    # build_command gives every TCG guest (the shim's and this one alike) the TSC word it needs
    config = MachineConfig(
        assets.kernel, assets.initrd, machine="microvm", accel=probe.accel,
        memory_mib=memory, cpus=cpus,
    )  # fmt: skip
    floor_dir = os.path.join(base, "floor")

    def floor_once(i: int) -> float:
        work = os.path.join(floor_dir, str(i))
        qmp, console = os.path.join(work, "qmp.sock"), os.path.join(work, "console.log")
        return floor_run(build_command(config, qmp, console), work)

    print(f"accelerator: {probe.accel} ({probe.reason}{', cached' if probe.cached else ''})")
    print(
        f"guest: kernel {assets.version}, assets {assets.digest[:12]} in {assets_root}"
        f"{' (built by this run' if own_assets else ' (given by COCON_ASSETS_ROOT'}, ready in {built:.1f} s)"
    )
    probe_cmd = build_command(config, os.path.join(base, "q.sock"), os.path.join(base, "c.log"))
    print(f"machine: microvm, {memory} MiB, {cpus} vCPU; floor's kernel command line: "
          f"{probe_cmd[probe_cmd.index('-append') + 1]}")  # fmt: skip
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start "
          f"(shared machine: numbers are noisy)")  # fmt: skip

    cold = start_daemon("cold", base, run_base, assets_root, False, [COCON])
    daemons.append(cold)
    tpl = start_daemon("tpl", base, run_base, assets_root, True, [COCON])
    daemons.append(tpl)
    run_cmd = ("run", "--rm", *MICROVM, "true")
    ctr_cmd = ("run", "--rm", "--network", "none", "--isolation", "container", "busybox", "true")

    # warm-up: page cache, .pyc files, the image unpacked; the template daemon may make its template
    t = time.monotonic()
    warm = [floor_once(-1), cold.timed(*run_cmd), tpl.timed(*run_cmd), tpl.timed(*run_cmd),
            tpl.timed(*ctr_cmd)]  # fmt: skip
    print(f"warm-up ({time.monotonic() - t:.0f} s): floor {warm[0]:.2f} s, cold {warm[1]:.2f} s, "
          f"template daemon {warm[2]:.2f} s then {warm[3]:.2f} s, container {warm[4]:.2f} s")  # fmt: skip

    times: dict[str, list[float]] = {"floor": [], "cold": [], "template": [], "container": []}
    for i in range(runs):
        times["floor"].append(floor_once(i))
        times["cold"].append(cold.timed(*run_cmd))
        times["template"].append(tpl.timed(*run_cmd))
        times["container"].append(tpl.timed(*ctr_cmd))
    m = {k: med(v) for k, v in times.items()}
    print(f"\nstart to exit, {runs} runs each, alternating (load average now {os.getloadavg()[0]:.2f}):")
    show_times("floor: bare qemu -kernel, init powers off", times["floor"])
    show_times("cocon run --isolation microvm, cold", times["cold"],
               f"  ratio to floor {m['cold'] / m['floor']:.2f} (target <= 1.3)")  # fmt: skip
    show_times("cocon run --isolation microvm, template daemon", times["template"],
               f"  ratio to cold {m['template'] / m['cold']:.2f} (target <= 0.25), "
               f"to floor {m['template'] / m['floor']:.2f}")  # fmt: skip
    show_times("cocon run --isolation container", times["container"],
               f"  microVM cold/container {m['cold'] / m['container']:.1f}x, "
               f"template/container {m['template'] / m['container']:.1f}x")  # fmt: skip
    if m["template"] >= m["cold"] * 0.9:
        print("  note: the template daemon's runs are not faster than cold ones: no template was used")
    print(f"  templates stored: {count_templates(os.path.join(assets_root, 'assets'))}")

    # memory: one idle microVM of each daemon, then n_vms idle ones of the template daemon
    print(f"\nhost memory of idle microVMs (`sleep 3600`, guest memory {memory} MiB; settle {settle:g} s; "
          f"MemAvailable after drop_caches):")  # fmt: skip
    cid = start_idle(cold)
    time.sleep(settle)
    show_memory("1 idle microVM, cold daemon", [vm_memory(cold, cid, memory)])
    cold.cli("rm", "-f", cid)
    cold.ids.remove(cid)
    time.sleep(1)
    drop_caches()
    before = mem_available()
    t = time.monotonic()
    ids = [start_idle(tpl)]
    first = time.monotonic() - t
    time.sleep(settle)
    show_memory("1 idle microVM, template daemon", [vm_memory(tpl, ids[0], memory)])
    for k in range(1, n_vms):
        ids.append(start_idle(tpl))
        if (k + 1) % 5 == 0:
            print(f"    ... {k + 1} running ({time.monotonic() - t:.0f} s)", flush=True)
    took = time.monotonic() - t
    time.sleep(settle)
    drop_caches()
    after = mem_available()
    vms = [vm_memory(tpl, c, memory) for c in ids]
    show_memory(f"{n_vms} idle microVMs, template daemon (per VM)", vms)
    drop = before - after
    print(f"    MemAvailable drop per microVM (guest memory included): {drop / n_vms / MiB:6.1f} MiB"
          f"; total {drop / MiB:.0f} MiB")  # fmt: skip
    print(f"    started one after another in {took:.0f} s ({took / n_vms:.1f} s each, first {first:.1f} s)"
          f"; load average now {os.getloadavg()[0]:.2f}")  # fmt: skip


# --- clean-up --------------------------------------------------------------------------------------


def clean_up(base: str, run_base: str, daemons: list[Daemon]) -> None:
    for d in daemons:
        remove_containers(d)
    for d in daemons:
        stop_daemon(d.run)
        if d.proc is not None:
            try:
                d.proc.wait(30)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
    for _ in range(3):  # QEMU, shims and conmon of these roots (the floor's QEMU included)
        pids = processes_naming([base, run_base])
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            break
        time.sleep(0.5)
    for d in daemons:
        kill_prestarted(d.run)
    for d in daemons:
        for cid in d.ids:  # cgroups of the detached containers, if any were left
            for path in (f"/sys/fs/cgroup/cocon/{cid}", f"/sys/fs/cgroup/cocon/{cid[:12]}"):
                try:
                    os.rmdir(path)
                except OSError:
                    pass
    for path in (run_base, base):
        unmount_all(path)
    for d in daemons:
        try:
            reset_network(d.root, d.run)
        except Exception as exc:
            print(f"  clean-up: network of {d.name}: {exc}", file=sys.stderr)
    for path in (run_base, base):
        shutil.rmtree(path, ignore_errors=True)
    left = processes_naming([base, run_base])
    if left:
        print(f"  clean-up: processes left: {left}", file=sys.stderr)


def _terminate(signum: int, frame: FrameType | None) -> Any:
    raise KeyboardInterrupt


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    # what setup.sh does: byte-code for every module (PYTHONDONTWRITEBYTECODE may be set here)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.abspath(SRC)], check=True,
                   capture_output=True)  # fmt: skip
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)
    base = tempfile.mkdtemp(prefix="cocon-bench-microvm-")
    run_base = tempfile.mkdtemp(prefix="cocon-bmvm-", dir="/run")  # short: QEMU's socket paths
    daemons: list[Daemon] = []
    code = 0
    try:
        bench(base, run_base, daemons)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        code = 130
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
        for d in daemons:
            print(f"  {d.name} daemon log: {os.path.join(base, f'daemon-{d.name}.log')} (removed now)",
                  file=sys.stderr)  # fmt: skip
            try:
                with open(os.path.join(base, f"daemon-{d.name}.log"), errors="replace") as f:
                    print("    " + "\n    ".join(f.read().splitlines()[-15:]), file=sys.stderr)
            except OSError:
                pass
        code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not stop the clean-up
            signal.signal(sig, signal.SIG_IGN)
        t = time.monotonic()
        clean_up(base, run_base, daemons)
        print(f"cleaned up in {time.monotonic() - t:.1f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
