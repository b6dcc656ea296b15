#!/usr/bin/env python3
"""The `make run` demo: a container from the host's busybox-static, run by cocon-runtime.

Builds an OCI bundle in a temporary directory, runs it with limits, and prints what the process
sees from inside: its pid, hostname, user, capabilities, seccomp, limits and mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid

from cocon.images.busybox import make_rootfs
from cocon.oci.runtime_spec import CPU, Memory, Pids, Resources, Rlimit, encode_config
from cocon.runtime.defaults import default_spec

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
echo "root filesystem:    $(awk '$2 == "/" {print $4}' /proc/mounts | cut -d, -f1)"
echo "mounts:"
awk '{print "  " $2 " (" $3 ")"}' /proc/mounts
"""


def main() -> int:
    runtime = os.path.join(os.path.dirname(sys.executable), "cocon-runtime")
    base = tempfile.mkdtemp(prefix="cocon-demo-")
    cid = f"demo-{uuid.uuid4().hex[:8]}"
    try:
        bundle = os.path.join(base, "bundle")
        make_rootfs(os.path.join(bundle, "rootfs"))
        spec = default_spec(args=["sh", "-c", INSIDE], terminal=False)
        assert spec.process is not None and spec.linux is not None
        spec.hostname = "cocon-demo"
        spec.process.rlimits = [Rlimit(type="RLIMIT_NOFILE", soft=512, hard=1024)]
        spec.linux.resources = Resources(
            memory=Memory(limit=128 * 1024 * 1024), pids=Pids(limit=64), cpu=CPU(quota=50000, period=100000)
        )
        with open(os.path.join(bundle, "config.json"), "wb") as f:
            f.write(encode_config(spec))
        print(f"== cocon-runtime run {cid}  (bundle: busybox-static, 128 MiB, 64 pids, half a CPU)")
        state = os.path.join(base, "state")
        proc = subprocess.run([runtime, "--root", state, "run", "--bundle", bundle, cid], check=False)
        print(f"== exit status {proc.returncode}")
        return proc.returncode
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
