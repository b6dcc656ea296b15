"""The host's memory as the benches read it: MemAvailable, a process's smaps_rollup (Rss, Pss, ...)
and dropping the page cache between measurements."""

from __future__ import annotations

import os


def mem_available() -> int:
    """MemAvailable in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup in bytes by field ({} when the process is gone)."""
    out: dict[str, int] = {}
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
    """Write back and drop the page cache, so MemAvailable compares like with like."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass
