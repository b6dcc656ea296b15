"""cgroup v1 (and hybrid: v1 controllers plus a controller-less cgroup2 mount that is only joined)."""

from __future__ import annotations

import _signal as signal  # the C module: `signal` wraps it in enums, costly to import
import os
import time

from cocon._typing import TYPE_CHECKING
from cocon.runtime.cgroups import CgroupStats
from cocon.runtime.cgroups.common import (
    FIELD,
    ancestors,
    hugepage_file_size,
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
    signal_all,
    tree_pids,
    try_read,
    write_file,
)
from cocon.runtime.cgroups.devices import emulate_v1, normalize_rules
from cocon.runtime.cgroups.mountinfo import Hierarchy
from cocon.runtime.errors import CgroupError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cocon.oci.runtime_spec import CPU, BlockIO, DeviceCgroup, HugepageLimit, Memory, Resources

# memory.limit_in_bytes reads this (PAGE_COUNTER_MAX * page size, rounded) when unlimited.
_UNLIMITED = 1 << 62
FREEZE_TIMEOUT = 10.0


class CgroupV1:
    """A container cgroup in every v1 hierarchy (plus the cgroup2 `unified` mount in hybrid mode)."""

    version = 1

    def __init__(self, path: str, hierarchies: Sequence[Hierarchy], unified: str | None = None) -> None:
        self.path = path
        self._hierarchies = tuple(hierarchies)
        self.unified = unified
        self._by_controller: dict[str, Hierarchy] = {}
        for h in self._hierarchies:
            for c in h.controllers:
                self._by_controller.setdefault(c, h)

    def __repr__(self) -> str:
        return f"CgroupV1({self.path!r}, mode={'hybrid' if self.unified else 'v1'})"

    # --- where things are ---

    def dir(self, controller: str) -> str | None:
        """This cgroup's directory in the hierarchy holding `controller`, or None if it is not mounted."""
        h = self._by_controller.get(controller)
        return join(h.mountpoint, self.path) if h else None

    def _need(self, controller: str, field: str) -> str:
        d = self.dir(controller)
        if d is None:
            raise CgroupError(
                f"{field}: the {controller} cgroup controller is not mounted on this host (no v1 hierarchy "
                f"carries it); mount it (mount -t cgroup -o {controller} cgroup /sys/fs/cgroup/{controller}) "
                "or remove the setting"
            )
        return d

    def _leaf_dirs(self) -> list[str]:
        dirs = [join(h.mountpoint, self.path) for h in self._hierarchies]
        if self.unified is not None:
            dirs.append(join(self.unified, self.path))
        return dirs

    # --- lifecycle ---

    def create(self, resources: Resources | None) -> None:
        me = os.getpid()  # a runtime that joined ahead (cgroups.prejoin) is in it already
        busy = sorted(
            p for d in self._leaf_dirs() for p in read_pids(os.path.join(d, "cgroup.procs")) if p != me
        )
        if busy:
            raise CgroupError(
                f"linux.cgroupsPath: cgroup {self.path} already holds processes {busy}; use another "
                "cgroupsPath or delete the container that owns it"
            )
        made: list[str] = []
        try:
            for h in self._hierarchies:
                make_dirs(join(h.mountpoint, self.path), made)
                if "cpuset" in h.controllers:
                    self._init_cpuset(h.mountpoint)
            if self.unified is not None:
                make_dirs(join(self.unified, self.path), made)
            self.apply(resources)
        except BaseException:
            remove_dirs(made)
            raise

    def _init_cpuset(self, mountpoint: str) -> None:
        """New cpuset cgroups start with empty cpus/mems: copy the parent's down, outermost first."""
        for p in [*ancestors(self.path), self.path]:
            d = join(mountpoint, p)
            parent = os.path.dirname(d)
            for name in ("cpuset.cpus", "cpuset.mems"):
                if try_read(os.path.join(d, name)) == "":
                    value = try_read(os.path.join(parent, name)) or ""
                    write_file(d, name, value, f"{FIELD}.cpu.{name[7:]} (copying the parent's {name})")

    def apply(self, resources: Resources | None) -> None:
        if resources is None:
            return
        if resources.unified:
            raise CgroupError(
                f"{FIELD}.unified: needs cgroup v2, and this host uses cgroup v1 for its controllers; "
                "remove linux.resources.unified or boot with systemd.unified_cgroup_hierarchy=1"
            )
        if resources.memory is not None:
            self._apply_memory(resources.memory)
        if resources.cpu is not None:
            self._apply_cpu(resources.cpu)
        if resources.pids is not None:
            d = self._need("pids", f"{FIELD}.pids.limit")
            limit = resources.pids.limit
            write_file(d, "pids.max", str(limit) if limit > 0 else "max", f"{FIELD}.pids.limit")
        if resources.block_io is not None:
            self._apply_blkio(resources.block_io)
        if resources.hugepage_limits:
            self._apply_hugetlb(resources.hugepage_limits)
        if resources.devices is not None:
            self._apply_devices(resources.devices)

    def _apply_memory(self, mem: Memory) -> None:
        f = f"{FIELD}.memory"
        if mem.kernel is not None or mem.kernel_tcp is not None:
            which = "kernel" if mem.kernel is not None else "kernelTCP"
            raise CgroupError(
                f"{f}.{which}: kernel memory limits are deprecated and not supported; remove the setting"
            )
        wants = [
            mem.limit,
            mem.reservation,
            mem.swap,
            mem.swappiness,
            mem.disable_oom_killer,
        ]
        if all(w is None for w in wants):
            return
        d = self._need("memory", f)
        limit, swap = mem.limit, mem.swap
        has_memsw = os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes"))
        if swap is None and limit == -1 and has_memsw:
            swap = -1  # unlimited memory: unlimited memory+swap too
        if swap is not None and not has_memsw:
            if swap == -1:
                swap = None  # nothing to lift
            else:
                raise CgroupError(
                    f"{f}.swap: this kernel has no swap accounting (memory.memsw.limit_in_bytes is missing; "
                    "boot with swapaccount=1); remove linux.resources.memory.swap or set it to -1"
                )
        if mem.check_before_update and limit is not None and limit > 0:
            usage = read_int(os.path.join(d, "memory.usage_in_bytes"))
            if usage is not None and usage > limit:
                raise CgroupError(
                    f"{f}.limit: {limit} is below the current usage {usage} (checkBeforeUpdate); raise it"
                )
        if limit is not None and swap is not None:
            current = read_int(os.path.join(d, "memory.limit_in_bytes")) or 0
            # memory+swap must stay >= memory at every step: raise memsw first when growing.
            if swap == -1 or current < swap:
                self._write_memsw(d, swap)
                self._write_limit(d, limit)
            else:
                self._write_limit(d, limit)
                self._write_memsw(d, swap)
        elif limit is not None:
            self._write_limit(d, limit)
        elif swap is not None:
            self._write_memsw(d, swap)
        if mem.reservation is not None:
            write_file(d, "memory.soft_limit_in_bytes", str(mem.reservation), f"{f}.reservation")
        if mem.swappiness is not None:
            if not 0 <= mem.swappiness <= 100:
                raise CgroupError(f"{f}.swappiness: {mem.swappiness} is not between 0 and 100")
            write_file(d, "memory.swappiness", str(mem.swappiness), f"{f}.swappiness")
        if mem.disable_oom_killer is not None:
            write_file(
                d, "memory.oom_control", "1" if mem.disable_oom_killer else "0", f"{f}.disableOOMKiller"
            )

    @staticmethod
    def _write_limit(d: str, limit: int) -> None:
        try:
            write_file(d, "memory.limit_in_bytes", str(limit), f"{FIELD}.memory.limit")
        except CgroupError:
            usage = read_int(os.path.join(d, "memory.usage_in_bytes"))
            if usage is not None and 0 < limit < usage:
                raise CgroupError(
                    f"{FIELD}.memory.limit: {limit} bytes is below the current usage of {usage} bytes and "
                    "the kernel could not reclaim enough; give a higher limit"
                ) from None
            raise

    @staticmethod
    def _write_memsw(d: str, swap: int) -> None:
        write_file(d, "memory.memsw.limit_in_bytes", str(swap), f"{FIELD}.memory.swap")

    def _apply_cpu(self, cpu: CPU) -> None:
        f = f"{FIELD}.cpu"
        if any(
            v is not None
            for v in (cpu.shares, cpu.quota, cpu.period, cpu.burst, cpu.realtime_period, cpu.realtime_runtime)
        ) or (cpu.idle is not None):
            d = self._need("cpu", f)
            if cpu.shares is not None and cpu.shares > 0:
                write_file(d, "cpu.shares", str(cpu.shares), f"{f}.shares")
            if cpu.period is not None and cpu.period > 0:
                write_file(d, "cpu.cfs_period_us", str(cpu.period), f"{f}.period")
            quota = str(cpu.quota) if cpu.quota is not None and cpu.quota != 0 else None
            set_quota_and_burst(d, "cpu.cfs_quota_us", quota, "cpu.cfs_burst_us", cpu.burst)
            if cpu.realtime_period is not None and cpu.realtime_period > 0:
                write_file(d, "cpu.rt_period_us", str(cpu.realtime_period), f"{f}.realtimePeriod")
            if cpu.realtime_runtime is not None and cpu.realtime_runtime != 0:
                write_file(d, "cpu.rt_runtime_us", str(cpu.realtime_runtime), f"{f}.realtimeRuntime")
            if cpu.idle is not None:
                if not os.path.exists(os.path.join(d, "cpu.idle")):
                    raise CgroupError(f"{f}.idle: this kernel has no cpu.idle (Linux 5.15+); remove it")
                write_file(d, "cpu.idle", str(cpu.idle), f"{f}.idle")
        if cpu.cpus or cpu.mems:
            d = self._need("cpuset", f"{f}.cpus")
            if cpu.cpus:
                write_file(d, "cpuset.cpus", cpu.cpus, f"{f}.cpus")
            if cpu.mems:
                write_file(d, "cpuset.mems", cpu.mems, f"{f}.mems")

    def _apply_blkio(self, bio: BlockIO) -> None:
        f = f"{FIELD}.blockIO"
        throttles = (
            ("blkio.throttle.read_bps_device", bio.throttle_read_bps_device, "throttleReadBpsDevice"),
            ("blkio.throttle.write_bps_device", bio.throttle_write_bps_device, "throttleWriteBpsDevice"),
            ("blkio.throttle.read_iops_device", bio.throttle_read_iops_device, "throttleReadIOPSDevice"),
            ("blkio.throttle.write_iops_device", bio.throttle_write_iops_device, "throttleWriteIOPSDevice"),
        )
        unset = bio.weight is None and bio.leaf_weight is None and not bio.weight_device
        if unset and not any(devs for _, devs, _ in throttles):
            return
        d = self._need("blkio", f)

        def first(*names: str) -> str | None:
            return next((n for n in names if os.path.exists(os.path.join(d, n))), None)

        if bio.weight is not None and bio.weight > 0:
            name = first("blkio.weight", "blkio.bfq.weight")
            if name is None:
                raise CgroupError(
                    f"{f}.weight: neither blkio.weight (CFQ) nor blkio.bfq.weight (BFQ) exists; load the BFQ "
                    "I/O scheduler (modprobe bfq) or remove the weight"
                )
            write_file(d, name, str(bio.weight), f"{f}.weight")
        if bio.leaf_weight is not None and bio.leaf_weight > 0:
            if not os.path.exists(os.path.join(d, "blkio.leaf_weight")):
                raise CgroupError(f"{f}.leafWeight: this kernel has no blkio.leaf_weight (CFQ); remove it")
            write_file(d, "blkio.leaf_weight", str(bio.leaf_weight), f"{f}.leafWeight")
        for i, wd in enumerate(bio.weight_device or ()):
            wf = f"{f}.weightDevice[{i}]"
            if wd.weight is not None and wd.weight > 0:
                name = first("blkio.weight_device", "blkio.bfq.weight_device", "blkio.bfq.weight")
                if name is None:
                    raise CgroupError(f"{wf}.weight: no per-device weight file (CFQ or BFQ); remove it")
                write_file(d, name, f"{wd.major}:{wd.minor} {wd.weight}", f"{wf}.weight")
            if wd.leaf_weight is not None and wd.leaf_weight > 0:
                if not os.path.exists(os.path.join(d, "blkio.leaf_weight_device")):
                    raise CgroupError(
                        f"{wf}.leafWeight: this kernel has no blkio.leaf_weight_device; remove it"
                    )
                write_file(d, "blkio.leaf_weight_device", f"{wd.major}:{wd.minor} {wd.leaf_weight}", wf)
        for name, devs, json_name in throttles:
            for i, td in enumerate(devs or ()):
                write_file(d, name, f"{td.major}:{td.minor} {td.rate}", f"{f}.{json_name}[{i}]")

    def _apply_hugetlb(self, limits: Sequence[HugepageLimit]) -> None:
        d = self._need("hugetlb", f"{FIELD}.hugepageLimits")
        for i, hl in enumerate(limits):
            f = f"{FIELD}.hugepageLimits[{i}]"
            size = hugepage_file_size(hl.page_size)
            name = f"hugetlb.{size}.limit_in_bytes"
            if not os.path.exists(os.path.join(d, name)):
                sizes = sorted({n.split(".")[1] for n in os.listdir(d) if n.endswith(".limit_in_bytes")})
                raise CgroupError(
                    f"{f}.pageSize: {hl.page_size!r} is not a huge page size here; use one of {sizes}"
                )
            write_file(d, name, str(hl.limit), f"{f}.limit")
            rsvd = f"hugetlb.{size}.rsvd.limit_in_bytes"
            if os.path.exists(os.path.join(d, rsvd)):
                write_file(d, rsvd, str(hl.limit), f"{f}.limit")

    def _apply_devices(self, rules: Sequence[DeviceCgroup]) -> None:
        d = self._need("devices", FIELD)
        state = emulate_v1(normalize_rules(rules))
        if not state.default_allow:
            current = try_read(os.path.join(d, "devices.list"))
            wanted = [v for _, v in state.writes()[1:]]
            if current is not None and sorted(current.splitlines()) == sorted(wanted):
                return  # already in place: skip the reset, which briefly denies everything
        for name, value in state.writes():
            try:
                write_file(d, name, value, FIELD)
            except CgroupError:
                if value == "a" and any(os.path.isdir(os.path.join(d, e)) for e in os.listdir(d)):
                    raise CgroupError(
                        f"{FIELD}: cannot reset the device rules of {d}: it has child cgroups, and cgroup v1 "
                        "only resets a cgroup without children; keep the device rules unchanged in updates"
                    ) from None
                raise

    # --- processes ---

    def add(self, pid: int) -> None:
        for d in self._leaf_dirs():
            try:
                write_file(d, "cgroup.procs", str(pid), "linux.cgroupsPath")
            except CgroupError:
                if not os.path.exists(f"/proc/{pid}"):
                    raise CgroupError(
                        f"cannot move process {pid} into cgroup {self.path}: it has exited"
                    ) from None
                raise

    def enter(self) -> None:
        """Move the calling process, which must be single-threaded (a forked child), into the cgroup.

        In each v1 hierarchy it writes "0" (itself) to `tasks`: the kernel moves the calling thread,
        here the whole process, without the global lock a `cgroup.procs` write takes (and the RCU
        grace period its first use waits for; see start_attach_warm_up). Hybrid's cgroup2 mount has
        no such path and is joined through `cgroup.procs`.
        """
        for h in self._hierarchies:
            write_file(join(h.mountpoint, self.path), "tasks", "0", "linux.cgroupsPath")
        if self.unified is not None:
            from cocon.runtime.cgroups import prejoined

            target = join(self.unified, self.path)
            if target != prejoined():  # forked from a runtime that joined it ahead: in it already
                write_file(target, "cgroup.procs", "0", "linux.cgroupsPath")

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for d in self._leaf_dirs():
            pids |= tree_pids(d)
        return sorted(pids)

    def _freezer(self) -> str:
        d = self.dir("freezer")
        if d is None:
            raise CgroupError(
                "cannot freeze: the freezer cgroup controller is not mounted on this host; mount it "
                "(mount -t cgroup -o freezer cgroup /sys/fs/cgroup/freezer)"
            )
        return d

    def _set_freezer(self, state: str) -> None:
        d = self._freezer()
        deadline = time.monotonic() + FREEZE_TIMEOUT
        delay = 0.0005
        while True:
            write_file(d, "freezer.state", state, "freezer.state")
            if (try_read(os.path.join(d, "freezer.state")) or "") == state:
                return
            if time.monotonic() > deadline:
                if state == "FROZEN":
                    write_file(d, "freezer.state", "THAWED", "freezer.state")
                raise CgroupError(
                    f"cgroup {self.path} did not reach {state} within {FREEZE_TIMEOUT:.0f}s (a process may "
                    "be stuck in uninterruptible sleep); try again"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def freeze(self) -> None:
        self._set_freezer("FROZEN")

    def thaw(self) -> None:
        self._set_freezer("THAWED")

    def frozen(self) -> bool:
        d = self.dir("freezer")
        return d is not None and try_read(os.path.join(d, "freezer.state")) == "FROZEN"

    def kill_all(self, sig: int) -> None:
        can_freeze = self.dir("freezer") is not None and os.path.isdir(self._freezer())
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
        return remove_if_empty(self._leaf_dirs())

    def destroy(self) -> None:
        errors: list[CgroupError] = []
        for d in self._leaf_dirs():
            try:
                rmdir_tree(d)
            except CgroupError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- information ---

    def stats(self) -> CgroupStats:
        st = CgroupStats()
        if (d := self.dir("cpuacct")) is not None:
            st.cpu_usage_ns = read_int(os.path.join(d, "cpuacct.usage"))
        if (d := self.dir("memory")) is not None:
            st.memory_usage = read_int(os.path.join(d, "memory.usage_in_bytes"))
            limit = read_int(os.path.join(d, "memory.limit_in_bytes"))
            st.memory_limit = limit if limit is not None and limit < _UNLIMITED else None
            st.memory_max_usage = read_int(os.path.join(d, "memory.max_usage_in_bytes"))
            st.oom_kills = read_keyed(os.path.join(d, "memory.oom_control")).get("oom_kill")
        if (d := self.dir("pids")) is not None:
            st.pids_current = read_int(os.path.join(d, "pids.current"))
            st.pids_limit = read_int(os.path.join(d, "pids.max"))
        if (d := self.dir("blkio")) is not None:
            rd, wr = _blkio_bytes(os.path.join(d, "blkio.throttle.io_service_bytes_recursive"))
            st.blkio_read_bytes, st.blkio_write_bytes = rd, wr
        return st

    def container_mounts(self) -> list[tuple[str, str]]:
        mounts = [(h.label, join(h.mountpoint, self.path)) for h in self._hierarchies]
        if self.unified is not None:
            mounts.append(("unified", join(self.unified, self.path)))
        return mounts

    def hierarchies(self) -> list[tuple[str, str]]:
        return [(h.label, h.mount_data) for h in self._hierarchies]

    def to_state(self) -> dict[str, object]:
        return {
            "version": 1,
            "path": self.path,
            "hierarchies": [h.to_json() for h in self._hierarchies],
            "unified": self.unified,
        }

    @classmethod
    def from_state(cls, data: dict[str, object]) -> CgroupV1:
        path, hier, unified = data.get("path"), data.get("hierarchies"), data.get("unified")
        if (
            not isinstance(path, str)
            or not isinstance(hier, list)
            or not (unified is None or isinstance(unified, str))
        ):
            raise CgroupError(
                "cgroup state: bad v1 state (path, hierarchies, unified); the state file is damaged"
            )
        return cls(path, [Hierarchy.from_json(h) for h in hier], unified)


def _blkio_bytes(path: str) -> tuple[int | None, int | None]:
    try:
        text = read_text(path)
    except OSError:
        return None, None
    rd = wr = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].isdigit():
            if parts[1] == "Read":
                rd += int(parts[2])
            elif parts[1] == "Write":
                wr += int(parts[2])
    return rd, wr
