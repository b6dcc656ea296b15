#!/usr/bin/env python3
"""cocon-runtime against runc: the same bundle running /bin/true, alternating, N runs each.

Prints both medians and the ratio cocon-runtime / runc (target: <= 1.0). Run as root:
    .venv/bin/python bench/runtime_vs_runc.py [--runs N]
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
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from cocon.images.busybox import make_rootfs
from cocon.oci.runtime_spec import encode_config
from cocon.runtime.defaults import default_spec

COCON_RUNTIME = os.path.join(os.path.dirname(sys.executable), "cocon-runtime")
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def make_bundle(base: str) -> str:
    bundle = os.path.join(base, "bundle")
    make_rootfs(os.path.join(bundle, "rootfs"))
    spec = default_spec(args=["/bin/true"], terminal=False)
    assert spec.linux is not None
    spec.linux.cgroups_path = None  # each tool uses its default per-container cgroup
    with open(os.path.join(bundle, "config.json"), "wb") as f:
        f.write(encode_config(spec))
    return bundle


def compile_sources() -> None:
    """Byte-compile cocon as scripts/setup.sh does. With PYTHONDONTWRITEBYTECODE set (as it is on these
    machines) a module edited since set-up would otherwise be compiled again by every run (~13 ms for
    the runtime's), which measures the compiler, not the runtime as installed."""
    import compileall

    compileall.compile_dir(SRC, quiet=1)  # a module that does not compile is reported, and fails its runs


def time_run(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per tool (default 30, at least 20)")
    args = parser.parse_args()
    runc = shutil.which("runc")
    if runc is None:
        raise SystemExit("runc is not installed: run `make setup`")
    compile_sources()
    base = tempfile.mkdtemp(prefix="cocon-bench-")
    try:
        bundle = make_bundle(base)
        tools = {
            "cocon-runtime": lambda i: [COCON_RUNTIME, "--root", f"{base}/cocon-state", "run", "--bundle",
                                        bundle, f"bench-{uuid.uuid4().hex[:8]}"],
            "runc": lambda i: [runc, "--root", f"{base}/runc-state", "run", "--bundle", bundle,
                               f"bench-{uuid.uuid4().hex[:8]}"],
        }  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in tools}
        for cmd in tools.values():  # warm-up: page cache
            for i in range(3):
                time_run(cmd(i))
        for i in range(max(args.runs, 20)):
            for name, cmd in tools.items():
                times[name].append(time_run(cmd(i)))
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        print(f"runs per tool: {len(times['runc'])}, alternating, bundle running /bin/true")
        for name in tools:
            print(f"{name:>14}: median {med[name]:7.2f} ms   (min {min(times[name]) * 1000:6.2f} ms)")
        print(f"ratio cocon-runtime/runc: {med['cocon-runtime'] / med['runc']:.2f}  (target <= 1.0)")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
