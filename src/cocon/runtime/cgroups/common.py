"""Helpers shared by the v1 and v2 drivers: path rules, cgroupfs file access, value conversions."""

from __future__ import annotations

import errno
import os
import time

from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import CgroupError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from cocon.oci.runtime_spec import ThrottleDevice

DEFAULT_PARENT = "/cocon"
FIELD = "linux.resources"


# --- cgroupsPath --------------------------------------------------------------------------------------


def resolve_path(cgroups_path: str | None, container_id: str) -> str:
    """Turn `linux.cgroupsPath` into a normalized hierarchy path like "/cocon/abc".

    None or "" gives "/cocon/<id>". Absolute and relative paths are both taken relative to the root of
    each hierarchy ("a/b" means "/a/b"). The systemd form "slice:prefix:name" is refused, as are ".."
    components and the root itself.
    """
    if not cgroups_path:
        if not container_id or "/" in container_id or container_id in (".", "..") or "\0" in container_id:
            raise CgroupError(
                f"container id {container_id!r} cannot name a cgroup; use letters, digits, '-', '_' or '.'"
            )
        return f"{DEFAULT_PARENT}/{container_id}"
    if not cgroups_path.startswith("/") and cgroups_path.count(":") == 2:
        raise CgroupError(
            f"linux.cgroupsPath: {cgroups_path!r} is a systemd cgroup path; systemd cgroup paths need "
            "--systemd-cgroup, which is not supported yet; pass a cgroupfs path like /machine/NAME"
        )
    if "\0" in cgroups_path or "\n" in cgroups_path:
        raise CgroupError(f"linux.cgroupsPath: {cgroups_path!r} contains a NUL or newline; remove it")
    parts = [p for p in cgroups_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CgroupError(
            f"linux.cgroupsPath: {cgroups_path!r} contains '..'; give a path without '..' components"
        )
    if not parts:
        raise CgroupError(
            f"linux.cgroupsPath: {cgroups_path!r} is the root cgroup; give a sub-path like /machine/NAME"
        )
    return "/" + "/".join(parts)


def join(base: str, path: str) -> str:
    """`base` + normalized hierarchy `path` ("/a/b")."""
    return base.rstrip("/") + path if path != "/" else base


def ancestors(path: str) -> list[str]:
    """The proper ancestors of a hierarchy path, outermost first: "/a/b/c" -> ["/a", "/a/b"]."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


# --- files ----------------------------------------------------------------------------------------------


def read_text(path: str) -> str:
    with open(path, "rb") as f:  # decoded here: a text-mode ascii file imports a codec module
        return f.read().decode("ascii", "replace")


def try_read(path: str) -> str | None:
    try:
        return read_text(path).strip()
    except OSError:
        return None


_HINTS = {
    errno.ENOENT: "the kernel does not offer this file (controller or feature missing); remove the setting",
    errno.EINVAL: "the kernel rejected the value; check its range and format",
    errno.EBUSY: "the cgroup is busy (current usage is above the new limit, or it has children)",
    errno.EPERM: "permission denied by the kernel (the parent cgroup's limits, or a missing capability)",
    errno.EACCES: "permission denied; run as root",
    errno.ENOSPC: "no space: the parent's limits or the cgroup depth/descendant limits are exhausted",
    errno.EOPNOTSUPP: "the kernel does not support this setting",
}


def write_file(directory: str, name: str, value: str, field: str) -> None:
    """Write `value` to `directory/name`; failure becomes CgroupError naming the spec `field`."""
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise _write_error(path, value, field, exc) from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise _write_error(path, value, field, exc) from None
    finally:
        os.close(fd)


def _write_error(path: str, value: str, field: str, exc: OSError) -> CgroupError:
    err = exc.errno or 0
    hint = _HINTS.get(err, "see the kernel log (dmesg) for details")
    return CgroupError(f"{field}: cannot write {value!r} to {path}: {os.strerror(err)}; {hint}")


def read_int(path: str) -> int | None:
    """An integer file; None when missing, unreadable or "max"."""
    text = try_read(path)
    if text is None or text == "max" or not text:
        return None
    try:
        return int(text.split()[0])
    except ValueError:
        return None


def read_keyed(path: str) -> dict[str, int]:
    """A flat keyed file ("key value" per line), like memory.stat or cgroup.events."""
    out: dict[str, int] = {}
    text = try_read(path)
    if not text:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def read_pids(procs_file: str) -> list[int]:
    text = try_read(procs_file)
    if not text:
        return []
    return [int(x) for x in text.split() if x.isdigit()]


def walk_dirs(top: str) -> Iterator[str]:
    """`top` and every directory below it, children before parents (the order rmdir needs)."""
    if not os.path.isdir(top):
        return
    for dirpath, _dirnames, _files in os.walk(top, topdown=False):
        yield dirpath


def tree_pids(top: str) -> set[int]:
    pids: set[int] = set()
    for d in walk_dirs(top):
        pids.update(read_pids(os.path.join(d, "cgroup.procs")))
    return pids


def make_dirs(directory: str, made: list[str]) -> None:
    """mkdir -p, recording each directory it created in `made` (outermost first)."""
    missing: list[str] = []
    d = directory
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            continue
        except OSError as exc:
            raise CgroupError(
                f"linux.cgroupsPath: cannot create cgroup {d}: {exc.strerror}; check that the cgroup "
                "filesystem is writable (running as root?) and the path is valid"
            ) from None
        made.append(d)


def remove_dirs(dirs: Sequence[str]) -> None:
    """Best-effort cleanup of directories made by a failed create, innermost first."""
    for d in reversed(dirs):
        for sub in list(walk_dirs(d)):
            try:
                os.rmdir(sub)
            except OSError:
                pass


def remove_if_empty(dirs: Sequence[str]) -> bool:
    """rmdir each directory (a missing one is fine); False at the first one still busy (processes or
    child cgroups in it), which stays in place with the rest."""
    for d in dirs:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise CgroupError(f"cannot remove cgroup {d}: {exc.strerror}") from None
    return True


def rmdir_tree(top: str, timeout: float = 5.0) -> None:
    """Remove `top` and its descendants, retrying on EBUSY while processes exit. Missing is fine."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        busy: str | None = None
        for d in walk_dirs(top):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    busy = d
                    continue
                raise CgroupError(f"cannot remove cgroup {d}: {exc.strerror}") from None
        if busy is None:
            return
        if time.monotonic() > deadline:
            left = sorted(tree_pids(top))
            raise CgroupError(
                f"cannot remove cgroup {busy}: still busy after {timeout:.0f}s (processes {left or 'none'}); "
                "kill the processes in it (cocon-runtime kill --all ID KILL) and try again"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    """Poll `check` with backoff until it returns True or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# --- conversions --------------------------------------------------------------------------------------


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) to v2 cpu.weight (1..10000), as runc and crun convert."""
    if shares <= 0:
        return 0
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_weight_to_io_weight(weight: int) -> int:
    """cgroup v1 blkio.weight (10..1000) to v2 io.weight (1..10000)."""
    if weight <= 0:
        return 0
    weight = min(max(weight, 10), 1000)
    return 1 + (weight - 10) * 9999 // 990


def swap_to_v2(swap: int | None, limit: int | None) -> int | None:
    """OCI memory.swap (memory+swap) to v2 memory.swap.max (swap alone); -1 means "max", None unset."""
    if swap is None:
        # Unlimited memory with swap unset: unlimited swap too, as on v1.
        return -1 if limit == -1 else None
    if swap == -1:
        return -1
    if swap == 0:
        return None
    if limit is None or limit <= 0:
        raise CgroupError(
            f"{FIELD}.memory.swap: a swap limit needs a memory limit; set linux.resources.memory.limit too"
        )
    if swap < limit:
        raise CgroupError(f"{FIELD}.memory.swap: memory+swap ({swap}) must be >= memory.limit ({limit})")
    return swap - limit


def v2_limit(value: int) -> str:
    """A byte/count limit as v2 writes it: negative means "max"."""
    return "max" if value < 0 else str(value)


def io_max_lines(
    read_bps: Sequence[ThrottleDevice] | None,
    write_bps: Sequence[ThrottleDevice] | None,
    read_iops: Sequence[ThrottleDevice] | None,
    write_iops: Sequence[ThrottleDevice] | None,
) -> list[str]:
    """One io.max line per device, "MAJ:MIN rbps=.. wbps=.. riops=.. wiops=..", in first-seen order.

    Only the keys given are written (others keep their value); a rate of 0 means no limit ("max").
    """
    per_dev: dict[tuple[int, int], dict[str, str]] = {}
    for key, devs in (("rbps", read_bps), ("wbps", write_bps), ("riops", read_iops), ("wiops", write_iops)):
        for d in devs or ():
            per_dev.setdefault((d.major, d.minor), {})[key] = str(d.rate) if d.rate > 0 else "max"
    lines = []
    for (major, minor), kv in per_dev.items():
        order = [k for k in ("rbps", "wbps", "riops", "wiops") if k in kv]
        lines.append(f"{major}:{minor} " + " ".join(f"{k}={kv[k]}" for k in order))
    return lines


def hugepage_file_size(page_size: str) -> str:
    """Validate an OCI hugepage size ("2MB", "1GB") for use in a file name."""
    if not page_size or "/" in page_size or ".." in page_size or not page_size[0].isdigit():
        raise CgroupError(f"{FIELD}.hugepageLimits.pageSize: {page_size!r} is not a size like 2MB or 1GB")
    return page_size


def set_quota_and_burst(
    d: str, quota_file: str, quota: str | None, burst_file: str, burst: int | None
) -> None:
    """Write a CPU quota and burst in an order the kernel accepts (burst must stay <= quota)."""
    f = f"{FIELD}.cpu"
    if burst is not None and not os.path.exists(os.path.join(d, burst_file)):
        raise CgroupError(f"{f}.burst: this kernel has no {burst_file} (Linux 5.14+); remove it")
    burst_done = False
    if burst is not None:
        try:
            write_file(d, burst_file, str(burst), f"{f}.burst")
            burst_done = True
        except CgroupError:
            if quota is None:
                raise
    if quota is not None:
        write_file(d, quota_file, quota, f"{f}.quota")
    if burst is not None and not burst_done:
        write_file(d, burst_file, str(burst), f"{f}.burst")


def signal_all(pids: Callable[[], list[int]], sig: int, repeat: bool) -> None:
    """Signal every process `pids()` lists; with `repeat`, again while new processes show up."""
    seen: set[int] = set()
    for _ in range(10 if repeat else 1):
        new = [p for p in pids() if p not in seen]
        if not new:
            return
        for pid in new:
            seen.add(pid)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot send signal {sig} to process {pid}: {exc.strerror}") from None
