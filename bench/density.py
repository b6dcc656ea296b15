#!/usr/bin/env python3
"""Density: start N idle detached containers (`sleep` in busybox), measure the host memory each one
costs beyond its own workload, and the start rate.

For every container cocon leaves one conmon process (its supervisor) and some bookkeeping (an
SQLite row, a bundle and an exit-file directory on tmpfs, a log file). Printed:

- conmon per container: RSS (counts shared library pages in every process), PSS (shared pages
  divided among the processes that map them) and USS (private pages), from smaps_rollup;
- host: the drop of MemAvailable per container, minus the containers' own cgroup memory (the
  workload), i.e. what the platform adds (conmon, kernel objects: namespaces, cgroups, overlay mount,
  tmpfs files);
- the daemon: how much its RSS grew per container (its records and caches);
- starts/s: N / the time to start them one after the other through the daemon's API (create +
  start: conmon + runtime create/start, the pre-started pair when one is ready).

Run as root:  .venv/bin/python bench/density.py [-n 100] [-n 500]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from cli_helpers import new_root_with_busybox, unmount_all  # noqa: E402
from cocon.api.http_client import HTTPClient  # noqa: E402
from cocon.engine.stats import cgroup_dirs, memory  # noqa: E402
from daemon_helpers import conmons_of  # noqa: E402
from host_memory import drop_caches, mem_available, rollup  # noqa: E402

MiB = 1024 * 1024


def daemon_pid(run: str) -> int:
    with open(os.path.join(run, "cocon.pid")) as f:
        return int(f.read().split()[0])


def bench(n: int) -> None:
    root = tempfile.mkdtemp(prefix="cocon-density-")
    run = tempfile.mkdtemp(prefix="cocon-density-run-", dir="/run")
    new_root_with_busybox(os.path.join(root, "r"))
    os.environ["COCON_ROOT"], os.environ["COCON_RUN"] = os.path.join(root, "r"), run
    client = HTTPClient(os.path.join(run, "cocon.sock"), autostart=True)  # starts the daemon
    body = {"Image": "busybox", "Cmd": ["sleep", "100000"], "HostConfig": {"NetworkMode": "none"}}
    ids: list[str] = []
    try:
        # one container first: daemon up, image unpacked, config template cached, code paths warm
        warm = client.container_run_detached(body)["Id"]
        client.container_remove(warm, force=True)
        time.sleep(1.0)
        drop_caches()
        daemon_before = rollup(daemon_pid(run))
        before = mem_available()
        t = time.monotonic()
        for _ in range(n):
            ids.append(client.container_run_detached(body)["Id"])
        took = time.monotonic() - t
        time.sleep(2)
        drop_caches()
        after = mem_available()
        daemon_after = rollup(daemon_pid(run))
        pids = [client.container_inspect(i)["State"]["Pid"] for i in ids]
        pids = [p for p in pids if p]
        if len(pids) < n:
            print(f"  only {len(pids)} of {n} containers still run: measuring those", file=sys.stderr)
        n = len(pids) or 1
        conmons = [rollup(p) for p in conmons_of(run)]
        workload = sum(memory(cgroup_dirs(p))["usage"] for p in pids)
        rss = sum(c.get("Rss", 0) for c in conmons) / n / MiB
        pss = sum(c.get("Pss", 0) for c in conmons) / n / MiB
        uss = sum(c.get("Private_Clean", 0) + c.get("Private_Dirty", 0) for c in conmons) / n / MiB
        daemon_growth = (daemon_after.get("Rss", 0) - daemon_before.get("Rss", 0)) / n / MiB
        host = (before - after - workload) / n / MiB
        print(f"N={len(ids)}: {len(ids) / took:.1f} starts/s ({took:.1f} s, through the daemon's API)")
        print(f"  conmon per container: RSS {rss:.2f} MiB, PSS {pss:.2f} MiB, USS {uss:.2f} MiB")
        print(f"  daemon RSS growth per container: {daemon_growth:.3f} MiB")
        print(f"  workload (container cgroups) per container: {workload / n / MiB:.2f} MiB")
        print(f"  host memory per container beyond the workload: {host:.2f} MiB (MemAvailable drop)")
    finally:
        t = time.monotonic()
        for i in ids:
            try:
                client.container_remove(i, force=True)
            except Exception as exc:
                print(f"cannot remove {i[:12]}: {exc}", file=sys.stderr)
        print(f"  removed in {time.monotonic() - t:.1f} s")
        try:
            os.kill(daemon_pid(run), 15)
            time.sleep(2)
        except OSError:
            pass
        unmount_all(run)
        unmount_all(root)
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, action="append", help="containers to start (repeatable; default 100)")
    args = p.parse_args()
    for n in args.n or [100]:
        bench(n)


if __name__ == "__main__":
    main()
