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
- starts/s: N / the time to start them one after the other (create + conmon + runtime create/start),
  in-process as the daemon will do it.

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
from cocon.engine.engine import Engine  # noqa: E402
from cocon.engine.stats import cgroup_dirs, memory  # noqa: E402
from cocon.engine.supervisor import Supervisor  # noqa: E402

MiB = 1024 * 1024


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rollup(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass


def bench(n: int) -> None:
    root = tempfile.mkdtemp(prefix="cocon-density-")
    run = tempfile.mkdtemp(prefix="cocon-density-run-", dir="/run")
    new_root_with_busybox(os.path.join(root, "r"))
    engine = Engine(os.path.join(root, "r"), run)
    sup = Supervisor(engine)
    ids: list[str] = []
    try:
        # one container first: image unpacked, config template cached, code paths warm
        warm = sup.run({"Image": "busybox", "Cmd": ["sleep", "100000"]})["Id"]
        sup.remove(warm, force=True)
        time.sleep(0.5)
        drop_caches()
        before = mem_available()
        t = time.monotonic()
        for _ in range(n):
            ids.append(sup.run({"Image": "busybox", "Cmd": ["sleep", "100000"]})["Id"])
        took = time.monotonic() - t
        time.sleep(2)
        drop_caches()
        after = mem_available()
        recs = [r for r in (engine.instances.get(i) for i in ids) if sup.status(r) == "running"]
        if len(recs) < n:
            print(f"  only {len(recs)} of {n} containers still run: measuring those", file=sys.stderr)
        n = len(recs) or 1
        conmons = [rollup(r.supervisor) for r in recs]
        workload = sum(memory(cgroup_dirs(r.pid))["usage"] for r in recs)
        rss = sum(c.get("Rss", 0) for c in conmons) / n / MiB
        pss = sum(c.get("Pss", 0) for c in conmons) / n / MiB
        uss = sum(c.get("Private_Clean", 0) + c.get("Private_Dirty", 0) for c in conmons) / n / MiB
        host = (before - after - workload) / n / MiB
        print(f"N={len(ids)}: {len(ids) / took:.1f} starts/s ({took:.1f} s)")
        print(f"  conmon per container: RSS {rss:.2f} MiB, PSS {pss:.2f} MiB, USS {uss:.2f} MiB")
        print(f"  workload (container cgroups) per container: {workload / n / MiB:.2f} MiB")
        print(f"  host memory per container beyond the workload: {host:.2f} MiB (MemAvailable drop)")
    finally:
        t = time.monotonic()
        for i in ids:
            try:
                sup.remove(i, force=True)
            except Exception as exc:
                print(f"cannot remove {i[:12]}: {exc}", file=sys.stderr)
        print(f"  removed in {time.monotonic() - t:.1f} s")
        engine.close()
        time.sleep(1)
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
