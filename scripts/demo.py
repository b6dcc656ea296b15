#!/usr/bin/env python3
"""The `make run` demo: the `cocon` command from a base image to a built image running with a volume.

In a private COCON_ROOT/COCON_RUN (removed afterwards): bootstrap busybox from the host's
busybox-static, run it with limits and print what the process sees from inside (its pid, hostname,
user, capabilities, seccomp, limits, mounts), build a small image from a Containerfile, run it twice
with a named volume that keeps a counter, list images and volumes, and show one node daemon (which
the first `cocon` command started) serving a detached container to both `cocon ps` and the docker CLI.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

COCON = os.path.join(os.path.dirname(sys.executable), "cocon")

INSIDE = r"""
echo "pid of this shell:  $$"
echo "hostname:           $(hostname)"
echo "user:               $(id)"
grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status | sed 's/^/status /'
echo "open files limit:   $(ulimit -n)"
if [ -d /sys/fs/cgroup/memory ]; then
  echo "memory limit:       $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes) bytes"
  echo "pids limit:         $(cat /sys/fs/cgroup/pids/pids.max)"
  cpu=/sys/fs/cgroup/cpu
  echo "cpu quota/period:   $(cat $cpu/cpu.cfs_quota_us)/$(cat $cpu/cpu.cfs_period_us)"
else
  echo "memory limit:       $(cat /sys/fs/cgroup/memory.max) bytes"
  echo "pids limit:         $(cat /sys/fs/cgroup/pids.max)"
  echo "cpu max:            $(cat /sys/fs/cgroup/cpu.max)"
fi
echo "processes visible:  $(ls -d /proc/[0-9]* | wc -l)"
echo "root filesystem:    $(awk '$2 == "/" {print $3}' /proc/mounts)"
echo "mounts:"
awk '{print "  " $2 " (" $3 ")"}' /proc/mounts
"""

CONTAINERFILE = (
    "FROM busybox\n"
    "COPY greeting.txt /etc/greeting\n"
    'RUN echo "built on $(date -u +%Y-%m-%d) by cocon build" >> /etc/greeting\n'
    "WORKDIR /data\n"
    'CMD ["sh", "-c", "cat /etc/greeting; n=$(cat count 2>/dev/null || echo 0); echo $((n+1)) > count; '
    'echo \\"this volume has seen $((n+1)) run(s)\\""]\n'
)


def cocon(env: dict[str, str], *args: str, shown: str | None = None) -> None:
    print(f"\n$ cocon {shown or shlex.join(args)}", flush=True)
    code = subprocess.run([COCON, *args], env=env, check=False).returncode
    if code != 0:
        raise SystemExit(f"cocon {args[0]} failed with exit status {code}")


def stop_daemon(run: str) -> None:
    """SIGTERM to the daemon the demo's first command started, and wait for it to go."""
    import time

    try:
        with open(os.path.join(run, "cocon.pid")) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 15)
    except (OSError, ValueError, IndexError):
        return
    for _ in range(400):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)


def unmount_below(path: str) -> None:
    """Unmount whatever an interrupted demo left mounted under `path`, deepest first."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in sorted((p for p in points if p == real or p.startswith(real + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], capture_output=True, check=False)


def main() -> int:
    base = tempfile.mkdtemp(prefix="cocon-demo-")
    run = tempfile.mkdtemp(prefix="cocon-demo-", dir="/run")
    env = dict(os.environ, COCON_ROOT=os.path.join(base, "root"), COCON_RUN=run)
    print(f"== a private cocon state: COCON_ROOT={env['COCON_ROOT']} COCON_RUN={run}")
    try:
        cocon(env, "image", "bootstrap", "busybox")
        cocon(env, "images")
        cocon(env, "run", "--rm", "--hostname", "cocon-demo", "--memory", "128m", "--pids-limit", "64",
              "--cpus", "0.5", "busybox", "sh", "-c", INSIDE,
              shown="run --rm --hostname cocon-demo --memory 128m --pids-limit 64 --cpus 0.5 busybox sh -c "
                    "'<print what this process sees>'")  # fmt: skip
        # the same image at another isolation level: its own VM and kernel (the first run builds the
        # guest assets and a template; later ones start from the template)
        cocon(env, "run", "--rm", "busybox", "uname", "-r")
        cocon(env, "run", "--rm", "--isolation", "microvm", "busybox", "uname", "-r")
        # and as a full VM: the image made into a disk of its own, booted by QEMU (docs/vm.md)
        cocon(env, "run", "--rm", "--isolation", "vm", "busybox", "sh", "-c", "uname -r; mount | grep ' / '")
        cocon(env, "info")
        ctx = os.path.join(base, "context")
        os.makedirs(ctx)
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write(CONTAINERFILE)
        with open(os.path.join(ctx, "greeting.txt"), "w") as f:
            f.write("hello from a cocon-built image\n")
        print(f"\n== {ctx}/Containerfile:\n{CONTAINERFILE}", end="")
        cocon(env, "build", "-t", "demo-app:1", ctx)
        cocon(env, "run", "--rm", "-v", "demo-data:/data", "demo-app:1")
        cocon(env, "run", "--rm", "-v", "demo-data:/data", "demo-app:1")
        cocon(env, "images")
        cocon(env, "volume", "ls")
        cocon(env, "image", "history", "demo-app:1")
        cocon(env, "run", "-d", "--name", "demo-bg", "busybox", "sh", "-c", "echo started; sleep 600")
        cocon(env, "ps")
        docker = shutil.which("docker")
        if docker is not None:
            sock = f"unix://{run}/cocon.sock"
            print(f"\n$ docker -H {sock} ps   # the docker CLI, same daemon", flush=True)
            subprocess.run([docker, "-H", sock, "ps"], check=False)
        cocon(env, "logs", "demo-bg")
        cocon(env, "rm", "-f", "demo-bg")
        return 0
    finally:
        subprocess.run([COCON, "rm", "-f", "demo-bg"], env=env, capture_output=True, check=False)
        subprocess.run([COCON, "volume", "rm", "-f", "demo-data"], env=env, capture_output=True, check=False)
        stop_daemon(run)
        for d in (run, base):
            unmount_below(d)
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
