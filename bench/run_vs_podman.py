#!/usr/bin/env python3
"""`cocon run --rm IMAGE /bin/true` against `podman run --rm … IMAGE /bin/true` on the same busybox image.

Both tools get private state: cocon a temporary COCON_ROOT (and COCON_RUN on tmpfs, like /run/cocon),
podman a temporary --root/--runroot (the host's podman storage is untouched). The image is bootstrapped
by cocon, saved as an OCI archive and loaded into podman, so both run the same layer. podman uses runc,
no network, and the ulimits this host needs. Runs alternate, N each (default 30, at least 20), after
warm-up runs; prints both medians and the ratio cocon/podman (target <= 0.33).

`cocon` goes through the node daemon (started by the first command, as for a user), and the docker CLI
is timed beside it against the same daemon's socket (`docker run --rm`: create, attach, wait, start).

`--breakdown` also times the daemon's requests of one `run --rm` (medians of 8), to show where
cocon's time goes.

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
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from cli_helpers import stop_daemon  # noqa: E402


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
import sys, time
sys.path.insert(0, SRC)
from cocon.api.http_client import HTTPClient
from cocon.api.http_containers import _path
c = HTTPClient()
body = {"Image": "busybox", "Cmd": ["/bin/true"], "HostConfig": {"NetworkMode": "none", "AutoRemove": True}}
rows = []
for i in range(8):
    t = [time.perf_counter()]
    cid = c.container_create(body)["Id"]; t.append(time.perf_counter())
    att = c._hijack(_path(cid, "attach"), [("stream", "1"), ("stdout", "1"), ("stderr", "1")])
    t.append(time.perf_counter())
    wait = c.request("POST", _path(cid, "wait"), [("condition", "removed")]); t.append(time.perf_counter())
    c._start(cid); t.append(time.perf_counter())
    while att.resp.sock.recv(65536):
        pass
    t.append(time.perf_counter())
    wait.read(); t.append(time.perf_counter())
    rows.append([b - a for a, b in zip(t, t[1:])])
labels = ["create", "attach (upgrade)", "wait (headers)", "start (conmon + runtime create + start)",
          "output until the stream ends", "wait: exit code, clean-up, removal"]
for k, label in enumerate(labels):
    print(f"  {sorted(r[k] for r in rows)[len(rows) // 2] * 1000:7.2f} ms  {label}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per tool (default 30, at least 20)")
    parser.add_argument("--breakdown", action="store_true", help="also time cocon's phases in-process")
    args = parser.parse_args()
    podman, docker = shutil.which("podman"), shutil.which("docker")
    if podman is None or not shutil.which("runc"):
        raise SystemExit("podman and runc are needed: run `make setup`")
    if docker is None:
        raise SystemExit("the docker CLI is needed (a client only) for the side-by-side run")
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
            "cocon": [COCON, "run", "--rm", "--network", "none", "busybox", "/bin/true"],
            "docker": [docker, "-H", f"unix://{env['COCON_RUN']}/cocon.sock", "run", "--rm", "--network",
                       "none", "busybox", "/bin/true"],
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
        print(f"ratio docker-through-cocon/podman: {med['docker'] / med['podman']:.2f}")
        if args.breakdown:
            print("where the daemon's time goes (requests of one `run --rm`, medians of 8):")
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
        stop_daemon(env["COCON_RUN"])
        for d in (base, run_base):
            unmount_below(d)
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
