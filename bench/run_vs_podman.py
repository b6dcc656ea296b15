#!/usr/bin/env python3
"""`cocon run --rm IMAGE /bin/true` against `podman run --rm … IMAGE /bin/true` on the same busybox image.

Both tools get private state: cocon a temporary COCON_ROOT (and COCON_RUN on tmpfs, like /run/cocon),
podman a temporary --root/--runroot (the host's podman storage is untouched). The image is bootstrapped
by cocon, saved as an OCI archive and loaded into podman, so both run the same layer. podman uses runc,
no network, and the ulimits this host needs. Runs alternate, N each (default 30, at least 20), after
warm-up runs; prints both medians and the ratio cocon/podman (target <= 0.33).

`--breakdown` also runs one container in this process with timers around the engine's phases, to show
where cocon's time goes.

Run as root:  .venv/bin/python bench/run_vs_podman.py [--runs N] [--breakdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
COCON = os.path.join(BIN, "cocon")
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def sh(
    cmd: list[str], env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def time_run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return elapsed


def unmount_below(path: str) -> None:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p == real or p.startswith(real + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], check=False, capture_output=True)


BREAKDOWN = r"""
import os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, SRC)
sys.path.append("/usr/lib/python3/dist-packages")
marks = []
def mark(label, took=None):
    marks.append((label, time.perf_counter(), took))
from cocon.cli import run as runmod
from cocon.api.local import LocalClient
mark("imports: cli + api")
import cocon.engine.instances as I, cocon.isolation.container as IC
mark("imports: engine + container driver (_sqlite3, ctypes)")
import cocon.images.store as IS, cocon.snapshots.overlay as SO, cocon.isolation.spec
mark("imports: image store, snapshotter, runtime config")
import cocon.runtime.container
mark("imports: runtime")
def wrap(owner, name, label):
    f = getattr(owner, name)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            mark(label, time.perf_counter() - t)
    setattr(owner, name, timed)
for owner, name, label in [
    (IS.ImageStore, "resolve", "image lookup (images.db, manifest, config)"),
    (I.InstanceStore, "_conn", "open instances.db"), (I.InstanceStore, "insert", "record insert"),
    (SO.OverlaySnapshotter, "prepare", "snapshot prepare"), (SO.OverlaySnapshotter, "mount", "overlay mount"),
    (IC.ContainerDriver, "config_for", "runtime config (cocon.isolation.spec)"),
    (cocon.runtime.container.Runtime, "create", "runtime create (fork, namespaces, mounts, ...)"),
    (cocon.runtime.container.Runtime, "start", "runtime start"),
    (I.InstanceStore, "update", "record update"), (IC.ContainerDriver, "wait", "process runs (wait)"),
    (cocon.runtime.container.Runtime, "delete", "runtime delete (cgroup)"),
    (SO.OverlaySnapshotter, "remove", "unmount + delete snapshot"),
    (I.InstanceStore, "delete", "record delete"),
]:
    wrap(owner, name, label)
code = runmod.main(["--rm", "busybox", "/bin/true"])
mark("done")
for label, t, took in marks:
    extra = f"  ({took * 1000:5.2f} ms)" if took is not None else ""
    print(f"  {(t - t0) * 1000:7.2f} ms  {label}{extra}")
sys.stdout.flush()
os._exit(code)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per tool (default 30, at least 20)")
    parser.add_argument("--breakdown", action="store_true", help="also time cocon's phases in-process")
    args = parser.parse_args()
    podman = shutil.which("podman")
    if podman is None or not shutil.which("runc"):
        raise SystemExit("podman and runc are needed: run `make setup`")
    # what setup.sh does: byte-code for every module (PYTHONDONTWRITEBYTECODE may be set here)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.abspath(SRC)], check=True,
                   capture_output=True)  # fmt: skip
    base = tempfile.mkdtemp(prefix="cocon-bench-")
    run_base = tempfile.mkdtemp(prefix="cocon-bench-", dir="/run")
    env = dict(os.environ, COCON_ROOT=os.path.join(base, "cocon"), COCON_RUN=os.path.join(run_base, "cocon"))
    proot, prun = os.path.join(base, "podman-root"), os.path.join(run_base, "podman-run")
    pod = [
        podman,
        "--root",
        proot,
        "--runroot",
        prun,
        "--storage-driver",
        "overlay",
        "--cgroup-manager",
        "cgroupfs",
    ]
    try:
        sh([COCON, "image", "bootstrap", "busybox"], env)
        archive = os.path.join(base, "busybox.tar")
        sh([COCON, "save", "--format", "oci-archive", "-o", archive, "busybox"], env)
        sh([*pod, "load", "-i", archive])
        sh([*pod, "tag", "busybox:latest", "localhost/cocon-bench-busybox:latest"], check=False)
        images = sh([*pod, "images", "--format", "{{.ID}} {{.Repository}}:{{.Tag}}"]).stdout.split()
        podman_image = images[0] if images else "busybox"
        cocon_id = sh([COCON, "images", "-q", "--no-trunc"], env).stdout.split()[0]
        tools = {
            "cocon": [COCON, "run", "--rm", "busybox", "/bin/true"],
            "podman": [*pod, "run", "--rm", "--runtime", "runc", "--network", "none", "--ulimit",
                       "nofile=1024:1024", "--ulimit", "nproc=1024:1024", podman_image, "/bin/true"],
        }  # fmt: skip
        for cmd in tools.values():  # warm-up: page cache, .pyc files
            for _ in range(3):
                time_run(cmd, env)
        times: dict[str, list[float]] = {name: [] for name in tools}
        for _ in range(max(args.runs, 20)):
            for name, cmd in tools.items():
                times[name].append(time_run(cmd, env))
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        print(f"image: busybox {cocon_id[:19]} (the same layer in both), command /bin/true")
        print(f"runs per tool: {len(times['cocon'])}, alternating, after 3 warm-up runs each")
        for name in tools:
            print(f"{name:>7}: median {med[name]:7.2f} ms   (min {min(times[name]) * 1000:6.2f} ms)")
        print(f"ratio cocon/podman: {med['cocon'] / med['podman']:.2f}  (target <= 0.33)")
        if args.breakdown:
            print("where cocon's time goes (one run, in-process, after interpreter start-up):")
            code = BREAKDOWN.replace("SRC", repr(os.path.abspath(SRC)), 1)
            out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True)
            print(out.stdout, end="")
            if out.returncode != 0:
                print(out.stderr, end="")
            start = time.perf_counter()
            subprocess.run([sys.executable, "-S", "-c", "pass"], check=True)
            print(f"  interpreter start-up alone (python -S): {(time.perf_counter() - start) * 1000:.2f} ms")
    finally:
        subprocess.run([*pod, "rm", "-af"], capture_output=True, check=False)
        subprocess.run([*pod, "rmi", "-af"], capture_output=True, check=False)
        subprocess.run([*pod, "system", "reset", "-f"], capture_output=True, check=False)
        subprocess.run([COCON, "rm", "-f", *sh([COCON, "ps", "-aq"], env, check=False).stdout.split()],
                       env=env, capture_output=True, check=False)  # fmt: skip
        for d in (base, run_base):
            unmount_below(d)
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
