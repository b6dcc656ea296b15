"""cgroup v2 (the unified hierarchy), with device rules as an eBPF program."""

from __future__ import annotations

import _signal as signal  # the C module: `signal` wraps it in enums, costly to import
import os

from cocon._typing import TYPE_CHECKING
from cocon.runtime.cgroups import CgroupStats
from cocon.runtime.cgroups.common import (
    FIELD,
    ancestors,
    blkio_weight_to_io_weight,
    hugepage_file_size,
    io_max_lines,
    join,
    make_dirs,
    read_int,
    read_keyed,
    read_pids,
    read_text,
    remove_dirs,
    remove_if_empty,
    rmdir_tree,
    set_quota_and_burst,
    shares_to_weight,
    signal_all,
    swap_to_v2,
    tree_pids,
    try_read,
    v2_limit,
    wait_until,
    write_file,
)
from cocon.runtime.errors import CgroupError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cocon.oci.runtime_spec import CPU, BlockIO, DeviceCgroup, HugepageLimit, Memory, Resources

DEFAULT_MOUNT = "/sys/fs/cgroup"
FREEZE_TIMEOUT = 10.0
# Enabled for every container when the host offers them, so stats work without limits.
STATS_CONTROLLERS = ("cpu", "io", "memory", "pids")


def needed_controllers(resources: Resources | None) -> dict[str, str]:
    """Controllers `resources` needs, each with the spec field that asks for it."""
    need: dict[str, str] = {}
    if resources is None:
        return need
    mem = resources.memory
    if mem is not None and any(v is not None for v in (mem.limit, mem.reservation, mem.swap)):
        need["memory"] = f"{FIELD}.memory"
    cpu = resources.cpu
    if cpu is not None:
        if any(v is not None for v in (cpu.shares, cpu.quota, cpu.period, cpu.burst, cpu.idle)):
            need["cpu"] = f"{FIELD}.cpu"
        if cpu.cpus or cpu.mems:
            need["cpuset"] = f"{FIELD}.cpu.{'cpus' if cpu.cpus else 'mems'}"
    if resources.pids is not None:
        need["pids"] = f"{FIELD}.pids"
    bio = resources.block_io
    if bio is not None and any(
        v for v in (
            bio.weight, bio.leaf_weight, bio.weight_device, bio.throttle_read_bps_device,
            bio.throttle_write_bps_device, bio.throttle_read_iops_device, bio.throttle_write_iops_device,
        )
    ):  # fmt: skip
        need["io"] = f"{FIELD}.blockIO"
    if resources.hugepage_limits:
        need["hugetlb"] = f"{FIELD}.hugepageLimits"
    for key in resources.unified or {}:
        controller = key.split(".", 1)[0]
        if "." in key and controller not in ("cgroup", "") and controller not in need:
            need[controller] = f"{FIELD}.unified.{key}"
    return need


class CgroupV2:
    """A container cgroup in the unified hierarchy mounted at `mountpoint` (default /sys/fs/cgroup).

    `mountpoint` can name any cgroup2 mount, such as the `unified` mount of a hybrid host.
    """

    version = 2

    def __init__(self, path: str, mountpoint: str = DEFAULT_MOUNT) -> None:
        self.path = path
        self.mountpoint = mountpoint
        self.dir = join(mountpoint, path)

    def __repr__(self) -> str:
        return f"CgroupV2({self.path!r}, mountpoint={self.mountpoint!r})"

    # --- lifecycle ---

    def create(self, resources: Resources | None) -> None:
        me = os.getpid()  # a runtime that joined ahead (cgroups.prejoin) is in it already
        busy = [p for p in read_pids(os.path.join(self.dir, "cgroup.procs")) if p != me]
        if busy:
            raise CgroupError(
                f"linux.cgroupsPath: cgroup {self.path} already holds processes {busy}; use another "
                "cgroupsPath or delete the container that owns it"
            )
        made: list[str] = []
        try:
            make_dirs(self.dir, made)
            self._enable(needed_controllers(resources), STATS_CONTROLLERS)
            self._apply(resources)
        except BaseException:
            remove_dirs(made)
            raise

    def apply(self, resources: Resources | None) -> None:
        self._enable(needed_controllers(resources), ())
        self._apply(resources)

    def _enable(self, needed: dict[str, str], optional: Sequence[str]) -> None:
        """Enable controllers in each ancestor's cgroup.subtree_control, outermost first."""
        if not needed and not optional:
            return
        root_avail = set((try_read(os.path.join(self.mountpoint, "cgroup.controllers")) or "").split())
        for controller, asked_by in needed.items():
            if controller not in root_avail:
                raise CgroupError(
                    f"{asked_by}: the {controller} controller is not available in the cgroup v2 hierarchy at "
                    f"{self.mountpoint} (cgroup.controllers: {' '.join(sorted(root_avail)) or 'none'}); "
                    "remove the setting, or free the controller from cgroup v1"
                )
        wanted = [c for c in needed] + [c for c in optional if c in root_avail and c not in needed]
        for p in ["/", *ancestors(self.path)]:
            d = join(self.mountpoint, p)
            avail = set((try_read(os.path.join(d, "cgroup.controllers")) or "").split())
            enabled = set((try_read(os.path.join(d, "cgroup.subtree_control")) or "").split())
            for c in wanted:
                if c in enabled:
                    continue
                field = needed.get(c)
                if c not in avail:
                    if field is None:
                        continue
                    raise CgroupError(
                        f"{field}: the {c} controller is not available in {d}; enable it in its parent's "
                        "cgroup.subtree_control or remove the setting"
                    )
                try:
                    write_file(d, "cgroup.subtree_control", f"+{c}", field or "cgroup.subtree_control")
                except CgroupError as exc:
                    if field is None:
                        continue
                    if read_pids(os.path.join(d, "cgroup.procs")) and p != "/":
                        raise CgroupError(
                            f"{field}: cannot enable the {c} controller in {d}: it holds processes, and "
                            "cgroup v2 only delegates controllers from cgroups without processes; use a "
                            "cgroupsPath whose parents hold no processes"
                        ) from None
                    raise exc

    def _apply(self, resources: Resources | None) -> None:
        if resources is None:
            return
        if resources.memory is not None:
            self._apply_memory(resources.memory)
        if resources.cpu is not None:
            self._apply_cpu(resources.cpu)
        if resources.pids is not None:
            write_file(self.dir, "pids.max", v2_limit(resources.pids.limit), f"{FIELD}.pids.limit")
        if resources.block_io is not None:
            self._apply_io(resources.block_io)
        if resources.hugepage_limits:
            self._apply_hugetlb(resources.hugepage_limits)
        if resources.unified:
            self._apply_unified(resources.unified)
        if resources.devices is not None:
            self._apply_devices(resources.devices)

    def _apply_memory(self, mem: Memory) -> None:
        f = f"{FIELD}.memory"
        d = self.dir
        for name, value, hint in (
            ("kernel", mem.kernel, "kernel memory is always accounted in cgroup v2"),
            ("kernelTCP", mem.kernel_tcp, "kernel memory is always accounted in cgroup v2"),
            ("swappiness", mem.swappiness, "cgroup v2 has no per-cgroup swappiness"),
        ):
            if value is not None:
                raise CgroupError(f"{f}.{name}: not supported on cgroup v2 ({hint}); remove the setting")
        if mem.disable_oom_killer:
            raise CgroupError(
                f"{f}.disableOOMKiller: cgroup v2 cannot disable the OOM killer; remove the setting "
                "(or set it to false)"
            )
        swap = swap_to_v2(mem.swap, mem.limit)
        if swap is not None:
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                write_file(d, "memory.swap.max", v2_limit(swap), f"{f}.swap")
            elif swap != -1:
                raise CgroupError(
                    f"{f}.swap: this kernel has no swap accounting (memory.swap.max is missing; boot with "
                    "swapaccount=1); remove linux.resources.memory.swap or set it to -1"
                )
        if mem.limit is not None:
            if mem.check_before_update and mem.limit > 0:
                usage = read_int(os.path.join(d, "memory.current"))
                if usage is not None and usage > mem.limit:
                    raise CgroupError(
                        f"{f}.limit: {mem.limit} is below the current usage {usage} (checkBeforeUpdate); "
                        "raise it"
                    )
            write_file(d, "memory.max", v2_limit(mem.limit), f"{f}.limit")
        if mem.reservation is not None:
            write_file(d, "memory.low", v2_limit(mem.reservation), f"{f}.reservation")

    def _apply_cpu(self, cpu: CPU) -> None:
        f = f"{FIELD}.cpu"
        d = self.dir
        if cpu.realtime_period is not None or cpu.realtime_runtime is not None:
            which = "realtimePeriod" if cpu.realtime_period is not None else "realtimeRuntime"
            raise CgroupError(f"{f}.{which}: cgroup v2 has no realtime CPU limits; remove the setting")
        if cpu.shares is not None and cpu.shares > 0:
            write_file(d, "cpu.weight", str(shares_to_weight(cpu.shares)), f"{f}.shares")
        quota: str | None = None
        if (cpu.quota is not None and cpu.quota != 0) or (cpu.period is not None and cpu.period > 0):
            if cpu.quota is None or cpu.quota == 0:
                # Only the period changes: keep the quota in place.
                quota = (try_read(os.path.join(d, "cpu.max")) or "max").split()[0]
            else:
                quota = "max" if cpu.quota < 0 else str(cpu.quota)
            if cpu.period is not None and cpu.period > 0:
                quota += f" {cpu.period}"
        set_quota_and_burst(d, "cpu.max", quota, "cpu.max.burst", cpu.burst)
        if cpu.idle is not None:
            if not os.path.exists(os.path.join(d, "cpu.idle")):
                raise CgroupError(f"{f}.idle: this kernel has no cpu.idle (Linux 5.15+); remove it")
            write_file(d, "cpu.idle", str(cpu.idle), f"{f}.idle")
        if cpu.cpus:
            write_file(d, "cpuset.cpus", cpu.cpus, f"{f}.cpus")
        if cpu.mems:
            write_file(d, "cpuset.mems", cpu.mems, f"{f}.mems")

    def _apply_io(self, bio: BlockIO) -> None:
        f = f"{FIELD}.blockIO"
        d = self.dir
        bfq = os.path.exists(os.path.join(d, "io.bfq.weight"))
        iocost = os.path.exists(os.path.join(d, "io.weight"))
        if bio.leaf_weight is not None and bio.leaf_weight > 0:
            raise CgroupError(f"{f}.leafWeight: cgroup v2 has no leaf weights; remove the setting")
        if bio.weight is not None and bio.weight > 0:
            if bfq:
                write_file(d, "io.bfq.weight", str(bio.weight), f"{f}.weight")
            elif iocost:
                write_file(d, "io.weight", str(blkio_weight_to_io_weight(bio.weight)), f"{f}.weight")
            else:
                raise CgroupError(
                    f"{f}.weight: neither io.bfq.weight (BFQ) nor io.weight exists; load the BFQ I/O "
                    "scheduler (modprobe bfq) or remove the weight"
                )
        for i, wd in enumerate(bio.weight_device or ()):
            wf = f"{f}.weightDevice[{i}]"
            if wd.leaf_weight is not None and wd.leaf_weight > 0:
                raise CgroupError(f"{wf}.leafWeight: cgroup v2 has no leaf weights; remove the setting")
            if wd.weight is None or wd.weight <= 0:
                continue
            if bfq:
                write_file(d, "io.bfq.weight", f"{wd.major}:{wd.minor} {wd.weight}", f"{wf}.weight")
            elif iocost:
                value = f"{wd.major}:{wd.minor} {blkio_weight_to_io_weight(wd.weight)}"
                write_file(d, "io.weight", value, f"{wf}.weight")
            else:
                raise CgroupError(f"{wf}.weight: no io.bfq.weight or io.weight here; remove the setting")
        for line in io_max_lines(
            bio.throttle_read_bps_device,
            bio.throttle_write_bps_device,
            bio.throttle_read_iops_device,
            bio.throttle_write_iops_device,
        ):
            write_file(d, "io.max", line, f"{f}.throttle*Device ({line.split()[0]})")

    def _apply_hugetlb(self, limits: Sequence[HugepageLimit]) -> None:
        d = self.dir
        for i, hl in enumerate(limits):
            f = f"{FIELD}.hugepageLimits[{i}]"
            size = hugepage_file_size(hl.page_size)
            name = f"hugetlb.{size}.max"
            if not os.path.exists(os.path.join(d, name)):
                sizes = sorted({n.split(".")[1] for n in os.listdir(d) if n.startswith("hugetlb.")})
                raise CgroupError(
                    f"{f}.pageSize: {hl.page_size!r} is not a huge page size here; use one of {sizes}"
                )
            write_file(d, name, v2_limit(hl.limit), f"{f}.limit")
            rsvd = f"hugetlb.{size}.rsvd.max"
            if os.path.exists(os.path.join(d, rsvd)):
                write_file(d, rsvd, v2_limit(hl.limit), f"{f}.limit")

    def _apply_unified(self, unified: dict[str, str]) -> None:
        for key, value in unified.items():
            f = f"{FIELD}.unified.{key}"
            if not key or "/" in key or ".." in key or key.startswith(".") or "\0" in key:
                raise CgroupError(f"{f}: {key!r} is not a cgroup file name; keys are names like memory.high")
            if not os.path.exists(os.path.join(self.dir, key)):
                avail = try_read(os.path.join(self.dir, "cgroup.controllers")) or "none"
                raise CgroupError(
                    f"{f}: no such cgroup file in {self.dir} (enabled controllers: {avail}); check the "
                    "name or remove it"
                )
            write_file(self.dir, key, value, f)

    def _apply_devices(self, rules: Sequence[DeviceCgroup]) -> None:
        from cocon.runtime.cgroups.bpf import set_device_program
        from cocon.runtime.cgroups.devices import device_filter, encode_program, normalize_rules

        set_device_program(self.dir, encode_program(device_filter(normalize_rules(rules))))

    # --- processes ---

    def add(self, pid: int) -> None:
        try:
            write_file(self.dir, "cgroup.procs", str(pid), "linux.cgroupsPath")
        except CgroupError:
            if not os.path.exists(f"/proc/{pid}"):
                raise CgroupError(
                    f"cannot move process {pid} into cgroup {self.path}: it has exited"
                ) from None
            raise

    def enter(self) -> None:
        """Move the calling process into the cgroup (unless it was forked from a runtime that joined it
        ahead: cgroups.prejoin)."""
        from cocon.runtime.cgroups import prejoined

        if self.dir != prejoined():
            write_file(self.dir, "cgroup.procs", "0", "linux.cgroupsPath")

    def pids(self) -> list[int]:
        return sorted(tree_pids(self.dir))

    def _events(self) -> dict[str, int]:
        return read_keyed(os.path.join(self.dir, "cgroup.events"))

    def _set_frozen(self, frozen: bool) -> None:
        if not os.path.exists(os.path.join(self.dir, "cgroup.freeze")):
            raise CgroupError(f"cannot freeze cgroup {self.dir}: cgroup.freeze is missing (needs Linux 5.2+)")
        write_file(self.dir, "cgroup.freeze", "1" if frozen else "0", "cgroup.freeze")
        want = 1 if frozen else 0
        if not wait_until(lambda: self._events().get("frozen") == want, FREEZE_TIMEOUT):
            if frozen:
                write_file(self.dir, "cgroup.freeze", "0", "cgroup.freeze")
            state = "frozen" if frozen else "thawed (is a parent cgroup frozen?)"
            raise CgroupError(f"cgroup {self.path} did not become {state} within {FREEZE_TIMEOUT:.0f}s")

    def freeze(self) -> None:
        self._set_frozen(True)

    def thaw(self) -> None:
        self._set_frozen(False)

    def frozen(self) -> bool:
        return self._events().get("frozen") == 1

    def kill_all(self, sig: int) -> None:
        if sig == signal.SIGKILL and os.path.exists(os.path.join(self.dir, "cgroup.kill")):
            try:
                write_file(self.dir, "cgroup.kill", "1", "cgroup.kill")
                return
            except CgroupError:
                pass
        can_freeze = os.path.exists(os.path.join(self.dir, "cgroup.freeze"))
        was_frozen = can_freeze and self.frozen()
        if can_freeze and not was_frozen:
            try:
                self.freeze()
            except CgroupError:
                can_freeze = False
        try:
            signal_all(self.pids, sig, repeat=not can_freeze)
        finally:
            if can_freeze and (not was_frozen or sig == signal.SIGKILL):
                self.thaw()

    def destroy_if_empty(self) -> bool:
        return remove_if_empty([self.dir])

    def destroy(self) -> None:
        rmdir_tree(self.dir)

    # --- information ---

    def stats(self) -> CgroupStats:
        d = self.dir
        st = CgroupStats()
        usage_usec = read_keyed(os.path.join(d, "cpu.stat")).get("usage_usec")
        st.cpu_usage_ns = usage_usec * 1000 if usage_usec is not None else None
        st.memory_usage = read_int(os.path.join(d, "memory.current"))
        st.memory_limit = read_int(os.path.join(d, "memory.max"))
        st.memory_max_usage = read_int(os.path.join(d, "memory.peak"))
        if os.path.exists(os.path.join(d, "memory.events")):
            st.oom_kills = read_keyed(os.path.join(d, "memory.events")).get("oom_kill", 0)
        st.pids_current = read_int(os.path.join(d, "pids.current"))
        st.pids_limit = read_int(os.path.join(d, "pids.max"))
        st.blkio_read_bytes, st.blkio_write_bytes = _io_bytes(os.path.join(d, "io.stat"))
        return st

    def container_mounts(self) -> list[tuple[str, str]]:
        return [("", self.dir)]

    def hierarchies(self) -> list[tuple[str, str]]:
        return [("", "")]

    def to_state(self) -> dict[str, object]:
        return {"version": 2, "path": self.path, "mountpoint": self.mountpoint}

    @classmethod
    def from_state(cls, data: dict[str, object]) -> CgroupV2:
        path, mountpoint = data.get("path"), data.get("mountpoint", DEFAULT_MOUNT)
        if not isinstance(path, str) or not isinstance(mountpoint, str):
            raise CgroupError("cgroup state: bad v2 state (path, mountpoint); the state file is damaged")
        return cls(path, mountpoint)


def _io_bytes(path: str) -> tuple[int | None, int | None]:
    try:
        text = read_text(path)
    except OSError:
        return None, None
    rd = wr = 0
    for line in text.splitlines():
        for kv in line.split()[1:]:
            key, _, value = kv.partition("=")
            if value.isdigit():
                if key == "rbytes":
                    rd += int(value)
                elif key == "wbytes":
                    wr += int(value)
    return rd, wr
