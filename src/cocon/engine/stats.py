"""`top` and `stats` of a running container, read from the kernel.

The container's cgroups are found from its init's `/proc/<pid>/cgroup` (cgroup v1, hybrid or v2):

| what | cgroup v2 | cgroup v1 |
|---|---|---|
| cpu      | `cpu.stat` usage_usec                 | `cpuacct/cpuacct.usage` (ns) |
| memory   | `memory.current`, `.max`, `.stat`     | `memory.usage_in_bytes`, `.limit_in_bytes`, `.stat` |
| pids     | `pids.current`, `pids.max`            | the same in `pids/` |
| block io | `io.stat` rbytes/wbytes               | `blkio.throttle.io_service_bytes` Read/Write |

Network counters come from `/proc/<pid>/net/dev`, which shows the container's network namespace.
CPU % is Docker's: the container's share of the host's CPU time between two samples, times the
number of CPUs; memory usage is Docker's too (usage minus inactive file cache).
"""

from __future__ import annotations

import os
import time

from cocon._typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SAMPLE_SECONDS = 0.2


def cgroup_dirs(pid: int) -> dict[str, str]:
    """Controller name → the process's cgroup directory ("" key: the v2 unified one)."""
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        _hier, controllers, path = line.split(":", 2)
        if controllers == "":
            base = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
            out[""] = base + path
        for c in controllers.split(","):
            if c.startswith("name="):
                continue
            for mount in (c, "cpu,cpuacct" if c in ("cpu", "cpuacct") else c):
                d = f"/sys/fs/cgroup/{mount}{path}"
                if os.path.isdir(d):
                    out[c] = d
                    break
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _int(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _kv(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def _find(dirs: dict[str, str], controller: str, name: str) -> str | None:
    for key in (controller, ""):
        d = dirs.get(key)
        if d and os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def cpu_usage_ns(dirs: dict[str, str]) -> int:
    v1 = _find(dirs, "cpuacct", "cpuacct.usage")
    if v1:
        return _int(_read(v1))
    v2 = _find(dirs, "cpu", "cpu.stat")
    return _kv(_read(v2)).get("usage_usec", 0) * 1000 if v2 else 0


def system_cpu_ns() -> int:
    fields = _read("/proc/stat").splitlines()[0].split()[1:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields) * 1_000_000_000 // ticks


def memory(dirs: dict[str, str]) -> dict[str, Any]:
    host_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v1 = _find(dirs, "memory", "memory.usage_in_bytes")
    if v1:
        d = os.path.dirname(v1)
        usage = _int(_read(v1))
        limit = _int(_read(os.path.join(d, "memory.limit_in_bytes")))
        stats = _kv(_read(os.path.join(d, "memory.stat")))
        inactive = stats.get("total_inactive_file", 0)
    else:
        cur = _find(dirs, "memory", "memory.current")
        if not cur:
            return {"usage": 0, "limit": host_total, "stats": {}}
        d = os.path.dirname(cur)
        usage = _int(_read(cur))
        text = _read(os.path.join(d, "memory.max")).strip()
        limit = int(text) if text.isdigit() else host_total
        stats = _kv(_read(os.path.join(d, "memory.stat")))
        inactive = stats.get("inactive_file", 0)
    return {"usage": usage, "limit": min(limit, host_total), "stats": stats, "inactive_file": inactive}


def pids(dirs: dict[str, str]) -> dict[str, int]:
    cur = _find(dirs, "pids", "pids.current")
    if not cur:
        return {}
    out = {"current": _int(_read(cur))}
    limit = _read(os.path.join(os.path.dirname(cur), "pids.max")).strip()
    if limit.isdigit():
        out["limit"] = int(limit)
    return out


def blkio(dirs: dict[str, str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    v1 = _find(dirs, "blkio", "blkio.throttle.io_service_bytes")
    if v1:
        for line in _read(v1).splitlines():
            parts = line.split()
            if len(parts) == 3 and ":" in parts[0]:
                major, minor = parts[0].split(":")
                out.append({"major": int(major), "minor": int(minor), "op": parts[1].lower(),
                            "value": int(parts[2])})  # fmt: skip
        return out
    v2 = _find(dirs, "io", "io.stat")
    for line in _read(v2).splitlines() if v2 else []:
        dev, *kvs = line.split()
        major, minor = dev.split(":")
        values = dict(kv.split("=", 1) for kv in kvs if "=" in kv)
        for key, op in (("rbytes", "read"), ("wbytes", "write")):
            if key in values:
                out.append({"major": int(major), "minor": int(minor), "op": op, "value": int(values[key])})
    return out


def networks(pid: int) -> dict[str, dict[str, int]]:
    out = {}
    for line in _read(f"/proc/{pid}/net/dev").splitlines()[2:]:
        name, _, rest = line.partition(":")
        v = [int(x) for x in rest.split()]
        if name.strip() == "lo" or len(v) < 16:
            continue
        keys = ("bytes", "packets", "errors", "dropped")
        out[name.strip()] = {
            **{f"rx_{k}": v[i] for i, k in enumerate(keys)},
            **{f"tx_{k}": v[8 + i] for i, k in enumerate(keys)},
        }
    return out


def stats(pid: int, container_id: str, name: str) -> dict[str, Any]:
    """Docker's stats document (`stream=false`), plus the CLI's computed columns."""
    dirs = cgroup_dirs(pid) if pid else {}
    pre_cpu, pre_sys = cpu_usage_ns(dirs), system_cpu_ns()
    time.sleep(SAMPLE_SECONDS if dirs else 0)
    cpu, sys_cpu = cpu_usage_ns(dirs), system_cpu_ns()
    mem: dict[str, Any] = memory(dirs) if dirs else {"usage": 0, "limit": 0, "stats": {}}
    used = max(0, mem["usage"] - mem.get("inactive_file", 0))
    return _document(
        container_id, name, (pre_cpu, pre_sys), (cpu, sys_cpu), mem, used,
        pids(dirs) if dirs else {}, blkio(dirs) if dirs else [], networks(pid) if pid else {},
    )  # fmt: skip


def guest_stats(
    sample: Callable[[], dict[str, Any]], pid: int, container_id: str, name: str
) -> dict[str, Any]:
    """Docker's stats document for a container inside a microVM: CPU, memory and pids from its cgroup
    in the guest (`sample()`: the guest agent's `stats`, taken twice), the network from the host's
    side of its NIC (the shim, `pid`, lives in the instance's network namespace)."""
    first, pre_sys = sample(), system_cpu_ns()
    time.sleep(SAMPLE_SECONDS)
    second, sys_cpu = sample(), system_cpu_ns()
    usage = int(second.get("memory_current") or 0)
    limit = second.get("memory_max")
    if not isinstance(limit, int) or limit <= 0:  # no --memory: what the guest has
        limit = int(second.get("mem_total") or 0)
    pids_doc = {"current": int(second.get("pids_current") or 0)}
    if isinstance(second.get("pids_max"), int):
        pids_doc["limit"] = int(second["pids_max"])
    return _document(
        container_id, name,
        (int(first.get("cpu_usage_usec") or 0) * 1000, pre_sys),
        (int(second.get("cpu_usage_usec") or 0) * 1000, sys_cpu),
        {"usage": usage, "limit": limit, "stats": {}}, usage, pids_doc, [], networks(pid) if pid else {},
    )  # fmt: skip


def _document(
    container_id: str, name: str, before: tuple[int, int], after: tuple[int, int], mem: dict[str, Any],
    used: int, pids_doc: dict[str, Any], io: list[dict[str, Any]], nets: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """The stats document from two CPU samples ((container ns, system ns) before and after), memory
    (usage, limit, stats; `used` without the inactive page cache), pids, block I/O and networks."""
    cpus = os.cpu_count() or 1
    (pre_cpu, pre_sys), (cpu, sys_cpu) = before, after
    d_cpu, d_sys = cpu - pre_cpu, sys_cpu - pre_sys
    return {
        "id": container_id,
        "name": f"/{name}",
        "read": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_stats": {"cpu_usage": {"total_usage": cpu}, "system_cpu_usage": sys_cpu, "online_cpus": cpus},
        "precpu_stats": {
            "cpu_usage": {"total_usage": pre_cpu},
            "system_cpu_usage": pre_sys,
            "online_cpus": cpus,
        },
        "memory_stats": {"usage": mem["usage"], "limit": mem["limit"], "stats": mem["stats"]},
        "pids_stats": pids_doc,
        "blkio_stats": {"io_service_bytes_recursive": io},
        "networks": nets,
        "CPUPerc": (d_cpu / d_sys * cpus * 100.0) if d_sys > 0 and d_cpu > 0 else 0.0,
        "MemUsage": used,
        "MemLimit": mem["limit"],
        "MemPerc": (used / mem["limit"] * 100.0) if mem["limit"] else 0.0,
        "NetInput": sum(n["rx_bytes"] for n in nets.values()),
        "NetOutput": sum(n["tx_bytes"] for n in nets.values()),
        "BlockInput": sum(e["value"] for e in io if e["op"] == "read"),
        "BlockOutput": sum(e["value"] for e in io if e["op"] == "write"),
    }


def top(pids_in: list[int], ps_args: str | None) -> dict[str, Any]:
    """`ps` (default `-ef`) of the host, filtered to the container's processes (Docker's way)."""
    import subprocess

    args = (ps_args or "-ef").split()
    proc = subprocess.run(["ps", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        from cocon.engine.errors import InvalidRequest

        raise InvalidRequest(f"ps {' '.join(args)} failed: {proc.stderr.strip()}")
    lines = proc.stdout.splitlines()
    titles = lines[0].split()
    if "PID" not in titles:
        from cocon.engine.errors import InvalidRequest

        raise InvalidRequest("the ps options must show the PID column (e.g. -ef or aux)")
    col = titles.index("PID")
    wanted = {str(p) for p in pids_in}
    rows = []
    for line in lines[1:]:
        fields = line.split(None, len(titles) - 1)
        if len(fields) > col and fields[col] in wanted:
            rows.append(fields)
    return {"Titles": titles, "Processes": rows}
