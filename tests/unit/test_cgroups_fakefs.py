"""The v1 and v2 drivers against fake cgroup trees under tmp_path: which files get which values."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import cocon.runtime.cgroups as cgroups
from cocon.oci.runtime_spec import (
    CPU,
    BlockIO,
    DeviceCgroup,
    HugepageLimit,
    Memory,
    Pids,
    Resources,
    ThrottleDevice,
    WeightDevice,
)
from cocon.runtime.cgroups import common
from cocon.runtime.cgroups.mountinfo import CgroupMounts, Hierarchy, parse_cgroup_mounts
from cocon.runtime.cgroups.v1 import CgroupV1
from cocon.runtime.cgroups.v2 import CgroupV2, needed_controllers
from cocon.runtime.errors import CgroupError

MIB = 1 << 20

Writes = list[tuple[str, str, str]]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Writes]:
    """Record every cgroup file write as (directory relative to tmp_path, file, value)."""
    log: Writes = []
    real = common.write_file

    def recording(directory: str, name: str, value: str, field: str) -> None:
        log.append((os.path.relpath(directory, tmp_path), name, value))
        real(directory, name, value, field)

    for mod in ("common", "v1", "v2"):
        monkeypatch.setattr(f"cocon.runtime.cgroups.{mod}.write_file", recording)
    yield log


def make_tree(base: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content)


def read(base: Path, rel: str) -> str:
    return (base / rel).read_text()


# --- v2 -------------------------------------------------------------------------------------------------

V2_LEAF_FILES = [
    "cgroup.procs", "cgroup.events", "cgroup.freeze", "memory.max", "memory.low", "memory.swap.max",
    "memory.high", "cpu.weight", "cpu.max.burst", "cpu.idle", "cpuset.cpus", "cpuset.mems", "pids.max",
    "io.weight", "io.max", "hugetlb.2MB.max",
]  # fmt: skip


def v2_tree(root: Path, controllers: str = "cpu cpuset io memory pids hugetlb", leaf: bool = True) -> None:
    files = {}
    for d in ("", "cocon/"):
        files[f"{d}cgroup.controllers"] = controllers
        files[f"{d}cgroup.subtree_control"] = ""
        files[f"{d}cgroup.procs"] = ""
    if leaf:
        for name in V2_LEAF_FILES:
            files[f"cocon/abc/{name}"] = ""
        files["cocon/abc/cpu.max"] = "max 100000"
        files["cocon/abc/cgroup.events"] = "populated 0\nfrozen 0\n"
    make_tree(root, files)


FULL = Resources(
    memory=Memory(limit=64 * MIB, reservation=32 * MIB, swap=96 * MIB),
    cpu=CPU(shares=1024, quota=50000, period=100000, burst=1000, cpus="0-1", mems="0", idle=1),
    pids=Pids(limit=-1),
    block_io=BlockIO(
        weight=500,
        weight_device=[WeightDevice(major=8, minor=0, weight=100)],
        throttle_read_bps_device=[ThrottleDevice(major=8, minor=0, rate=1000)],
        throttle_write_iops_device=[
            ThrottleDevice(major=8, minor=0, rate=10),
            ThrottleDevice(major=8, minor=16, rate=5),
        ],
    ),
    hugepage_limits=[HugepageLimit(page_size="2MB", limit=4 * MIB)],
    unified={"memory.high": "60000000"},
)


def test_v2_values(tmp_path: Path, writes: Writes) -> None:
    v2_tree(tmp_path)
    cg = CgroupV2("/cocon/abc", str(tmp_path))
    cg.create(FULL)
    leaf = tmp_path / "cocon/abc"
    assert read(leaf, "memory.max") == str(64 * MIB)
    assert read(leaf, "memory.low") == str(32 * MIB)
    assert read(leaf, "memory.swap.max") == str(32 * MIB)
    assert read(leaf, "cpu.weight") == "39"
    assert read(leaf, "cpu.max") == "50000 100000"
    assert read(leaf, "cpu.max.burst") == "1000"
    assert read(leaf, "cpu.idle") == "1"
    assert read(leaf, "cpuset.cpus") == "0-1"
    assert read(leaf, "cpuset.mems") == "0"
    assert read(leaf, "pids.max") == "max"
    assert read(leaf, "hugetlb.2MB.max") == str(4 * MIB)
    assert read(leaf, "memory.high") == "60000000"
    leaf_writes = [(n, v) for d, n, v in writes if d == "cocon/abc"]
    assert ("io.weight", "4950") in leaf_writes  # 500 converted, no BFQ here
    assert ("io.weight", "8:0 910") in leaf_writes
    assert [v for n, v in leaf_writes if n == "io.max"] == ["8:0 rbps=1000 wiops=10", "8:16 wiops=5"]
    # Controllers enabled top-down in both ancestors, never in the leaf.
    enabled = [(d, v) for d, n, v in writes if n == "cgroup.subtree_control"]
    for d in (".", "cocon"):
        assert {v for dd, v in enabled if dd == d} == {
            "+memory",
            "+cpu",
            "+cpuset",
            "+pids",
            "+io",
            "+hugetlb",
        }
    assert enabled[0][0] == "."
    assert all(d != "cocon/abc" for d, _ in enabled)


def test_v2_bfq_weight_and_cpu_period_only(tmp_path: Path, writes: Writes) -> None:
    v2_tree(tmp_path)
    leaf = tmp_path / "cocon/abc"
    (leaf / "io.bfq.weight").write_text("")
    (leaf / "cpu.max").write_text("20000 100000")
    cg = CgroupV2("/cocon/abc", str(tmp_path))
    cg.apply(Resources(block_io=BlockIO(weight=500), cpu=CPU(period=50000)))
    assert read(leaf, "io.bfq.weight") == "500"
    assert read(leaf, "cpu.max") == "20000 50000"  # the quota is kept
    cg.apply(Resources(cpu=CPU(quota=-1)))
    assert read(leaf, "cpu.max") == "max"


def test_v2_needed_controllers() -> None:
    assert needed_controllers(None) == {}
    need = needed_controllers(
        Resources(memory=Memory(limit=MIB), unified={"io.latency": "x", "cgroup.type": "y"})
    )
    assert need == {"memory": "linux.resources.memory", "io": "linux.resources.unified.io.latency"}
    assert needed_controllers(Resources(devices=[DeviceCgroup(allow=False)])) == {}


def test_v2_missing_controller(tmp_path: Path, writes: Writes) -> None:
    v2_tree(tmp_path, controllers="cpu pids")
    cg = CgroupV2("/cocon/abc", str(tmp_path))
    with pytest.raises(
        CgroupError, match=r"linux\.resources\.memory: the memory controller is not available"
    ):
        cg.create(Resources(memory=Memory(limit=64 * MIB)))
    # Nothing asked for, nothing missing: the stats controllers present are enabled, the others skipped.
    cg.create(None)
    assert {v for d, n, v in writes if n == "cgroup.subtree_control"} == {"+cpu", "+pids"}


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (Resources(unified={"../x": "1"}), r"unified\.\.\./x: .* is not a cgroup file name"),
        (Resources(unified={"a/b": "1"}), "is not a cgroup file name"),
        (Resources(unified={"cpu.nosuchfile": "1"}), r"unified\.cpu\.nosuchfile: no such cgroup file"),
        (Resources(memory=Memory(swappiness=10)), r"memory\.swappiness: not supported on cgroup v2"),
        (Resources(memory=Memory(kernel=MIB)), r"memory\.kernel: not supported"),
        (Resources(memory=Memory(disable_oom_killer=True)), "disableOOMKiller"),
        (Resources(cpu=CPU(realtime_runtime=1000)), r"cpu\.realtimeRuntime: cgroup v2 has no realtime"),
        (Resources(block_io=BlockIO(leaf_weight=100)), r"blockIO\.leafWeight"),
        (Resources(hugepage_limits=[HugepageLimit(page_size="1GB", limit=1)]), r"pageSize: '1GB'.*\['2MB'\]"),
        (Resources(hugepage_limits=[HugepageLimit(page_size="../x", limit=1)]), r"hugepageLimits\.pageSize"),
    ],
)
def test_v2_refusals(tmp_path: Path, writes: Writes, resources: Resources, message: str) -> None:
    v2_tree(tmp_path)
    with pytest.raises(CgroupError, match=message):
        CgroupV2("/cocon/abc", str(tmp_path)).apply(resources)


def test_v2_swap_without_accounting(tmp_path: Path, writes: Writes) -> None:
    v2_tree(tmp_path)
    os.unlink(tmp_path / "cocon/abc/memory.swap.max")
    cg = CgroupV2("/cocon/abc", str(tmp_path))
    cg.apply(Resources(memory=Memory(limit=64 * MIB, swap=-1)))  # unlimited: nothing to do
    with pytest.raises(CgroupError, match=r"memory\.swap: this kernel has no swap accounting"):
        cg.apply(Resources(memory=Memory(limit=64 * MIB, swap=128 * MIB)))


def test_v2_create_failure_removes_what_it_made(tmp_path: Path, writes: Writes) -> None:
    v2_tree(tmp_path, leaf=False)
    cg = CgroupV2("/cocon/abc", str(tmp_path))
    # The fake leaf has no pids.max: writing it fails, and create removes abc but keeps /cocon.
    with pytest.raises(CgroupError, match=r"linux\.resources\.pids\.limit: cannot write"):
        cg.create(Resources(pids=Pids(limit=5)))
    assert not (tmp_path / "cocon/abc").exists()
    assert (tmp_path / "cocon").is_dir()


def test_v2_create_refuses_busy_leaf(tmp_path: Path, writes: Writes) -> None:
    v2_tree(tmp_path)
    (tmp_path / "cocon/abc/cgroup.procs").write_text("1234\n")
    with pytest.raises(CgroupError, match=r"already holds processes \[1234\]"):
        CgroupV2("/cocon/abc", str(tmp_path)).create(None)
    assert (tmp_path / "cocon/abc").is_dir()  # not ours to remove


def test_v2_stats_and_state(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    make_tree(
        tmp_path / "cocon/abc",
        {
            "cpu.stat": "usage_usec 1500\nuser_usec 1000\n",
            "memory.current": "4096",
            "memory.max": "max",
            "memory.peak": "8192",
            "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
            "pids.current": "3",
            "pids.max": "10",
            "io.stat": "8:0 rbytes=100 wbytes=200 rios=1 wios=2\n8:16 rbytes=1 wbytes=2\n",
        },
    )
    cg = CgroupV2("/cocon/abc", str(tmp_path))
    st = cg.stats()
    assert st == cgroups.CgroupStats(1_500_000, 4096, None, 8192, 1, 3, 10, 101, 202)
    again = cgroups.cgroup_from_state(cg.to_state())
    assert isinstance(again, CgroupV2)
    assert (again.path, again.mountpoint) == ("/cocon/abc", str(tmp_path))
    assert cg.container_mounts() == [("", str(tmp_path / "cocon/abc"))]
    assert cg.hierarchies() == [("", "")]


def test_v2_pids_include_descendants(tmp_path: Path) -> None:
    v2_tree(tmp_path)
    make_tree(tmp_path / "cocon/abc", {"cgroup.procs": "10\n11\n", "sub/cgroup.procs": "12\n"})
    assert CgroupV2("/cocon/abc", str(tmp_path)).pids() == [10, 11, 12]


# --- v1 -------------------------------------------------------------------------------------------------


def v1_tree(root: Path) -> list[Hierarchy]:
    files: dict[str, str] = {"cpuset/cpuset.cpus": "0-3", "cpuset/cpuset.mems": "0"}
    for d in ("cocon/", "cocon/abc/"):
        files.update(
            {
                f"cpu,cpuacct/{d}cgroup.procs": "",
                f"cpuset/{d}cpuset.cpus": "",
                f"cpuset/{d}cpuset.mems": "",
                f"cpuset/{d}cgroup.procs": "",
            }
        )
    for name in (
        "cpu.shares",
        "cpu.cfs_period_us",
        "cpu.cfs_quota_us",
        "cpu.rt_runtime_us",
        "cpu.rt_period_us",
    ):
        files[f"cpu,cpuacct/cocon/abc/{name}"] = ""
    for name in (
        "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.soft_limit_in_bytes",
        "memory.swappiness", "memory.oom_control", "cgroup.procs",
    ):  # fmt: skip
        files[f"memory/cocon/abc/{name}"] = ""
    files["memory/cocon/abc/memory.limit_in_bytes"] = "9223372036854771712"
    for name in (
        "blkio.bfq.weight",
        "blkio.bfq.weight_device",
        "blkio.throttle.read_bps_device",
        "cgroup.procs",
    ):
        files[f"blkio/cocon/abc/{name}"] = ""
    for name in ("devices.allow", "devices.deny", "devices.list", "cgroup.procs"):
        files[f"devices/cocon/abc/{name}"] = ""
    files["pids/cocon/abc/pids.max"] = ""
    files["pids/cocon/abc/cgroup.procs"] = ""
    files["systemd/cocon/abc/cgroup.procs"] = ""
    make_tree(root, files)
    return [
        Hierarchy(str(root / "cpu,cpuacct"), ("cpu", "cpuacct")),
        Hierarchy(str(root / "cpuset"), ("cpuset",)),
        Hierarchy(str(root / "memory"), ("memory",)),
        Hierarchy(str(root / "blkio"), ("blkio",)),
        Hierarchy(str(root / "devices"), ("devices",)),
        Hierarchy(str(root / "pids"), ("pids",)),
        Hierarchy(str(root / "systemd"), (), "systemd"),
    ]


V1_RESOURCES = Resources(
    memory=Memory(
        limit=64 * MIB, swap=128 * MIB, reservation=32 * MIB, swappiness=0, disable_oom_killer=True
    ),
    cpu=CPU(shares=512, quota=20000, period=50000, realtime_period=1000000, realtime_runtime=1000, cpus="1"),
    pids=Pids(limit=5),
    block_io=BlockIO(
        weight=300,
        weight_device=[WeightDevice(major=8, minor=0, weight=200)],
        throttle_read_bps_device=[ThrottleDevice(major=8, minor=0, rate=4096)],
    ),
    devices=[DeviceCgroup(allow=False), DeviceCgroup(allow=True, type="c", major=1, minor=3, access="rwm")],
)


def test_v1_values_and_order(tmp_path: Path, writes: Writes) -> None:
    cg = CgroupV1("/cocon/abc", v1_tree(tmp_path))
    cg.create(V1_RESOURCES)
    # cpuset: parent values copied into /cocon, then into /cocon/abc, before the requested cpus.
    cpuset = [(d, n, v) for d, n, v in writes if d.startswith("cpuset")]
    assert cpuset == [
        ("cpuset/cocon", "cpuset.cpus", "0-3"),
        ("cpuset/cocon", "cpuset.mems", "0"),
        ("cpuset/cocon/abc", "cpuset.cpus", "0-3"),
        ("cpuset/cocon/abc", "cpuset.mems", "0"),
        ("cpuset/cocon/abc", "cpuset.cpus", "1"),
    ]
    mem = [(n, v) for d, n, v in writes if d == "memory/cocon/abc"]
    # From unlimited: memory first (memory+swap, still unlimited, stays above it), then memory+swap.
    assert mem == [
        ("memory.limit_in_bytes", str(64 * MIB)),
        ("memory.memsw.limit_in_bytes", str(128 * MIB)),
        ("memory.soft_limit_in_bytes", str(32 * MIB)),
        ("memory.swappiness", "0"),
        ("memory.oom_control", "1"),
    ]
    cpu = [(n, v) for d, n, v in writes if d == "cpu,cpuacct/cocon/abc"]
    assert cpu == [
        ("cpu.shares", "512"),
        ("cpu.cfs_period_us", "50000"),  # period before quota
        ("cpu.cfs_quota_us", "20000"),
        ("cpu.rt_period_us", "1000000"),
        ("cpu.rt_runtime_us", "1000"),
    ]
    blkio = [(n, v) for d, n, v in writes if d == "blkio/cocon/abc"]
    assert blkio == [
        ("blkio.bfq.weight", "300"),  # no CFQ blkio.weight here
        ("blkio.bfq.weight_device", "8:0 200"),
        ("blkio.throttle.read_bps_device", "8:0 4096"),
    ]
    assert [(n, v) for d, n, v in writes if d == "devices/cocon/abc"] == [
        ("devices.deny", "a"),
        ("devices.allow", "c 1:3 rwm"),
    ]
    assert read(tmp_path, "pids/cocon/abc/pids.max") == "5"


def test_v1_shrinking_memory_writes_limit_first(tmp_path: Path, writes: Writes) -> None:
    cg = CgroupV1("/cocon/abc", v1_tree(tmp_path))
    (tmp_path / "memory/cocon/abc/memory.limit_in_bytes").write_text(str(512 * MIB))
    cg.apply(Resources(memory=Memory(limit=64 * MIB, swap=64 * MIB)))
    assert [n for _, n, _ in writes] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_v1_growing_memory_writes_memsw_first(tmp_path: Path, writes: Writes) -> None:
    cg = CgroupV1("/cocon/abc", v1_tree(tmp_path))
    (tmp_path / "memory/cocon/abc/memory.limit_in_bytes").write_text(str(64 * MIB))
    cg.apply(Resources(memory=Memory(limit=256 * MIB, swap=512 * MIB)))
    assert [n for _, n, _ in writes] == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]


@pytest.mark.parametrize(
    ("resources", "message"),
    [
        (Resources(unified={"memory.high": "1"}), r"linux\.resources\.unified: needs cgroup v2"),
        (
            Resources(hugepage_limits=[HugepageLimit(page_size="2MB", limit=1)]),
            "hugetlb cgroup controller is not",
        ),
        (Resources(memory=Memory(kernel_tcp=MIB)), r"memory\.kernelTCP: kernel memory limits are deprecated"),
        (Resources(memory=Memory(swappiness=101)), r"memory\.swappiness: 101 is not between"),
        (Resources(cpu=CPU(burst=10)), r"cpu\.burst: this kernel has no cpu\.cfs_burst_us"),
        (Resources(cpu=CPU(idle=1)), r"cpu\.idle: this kernel has no cpu\.idle"),
        (Resources(block_io=BlockIO(leaf_weight=10)), r"blockIO\.leafWeight"),
        (
            Resources(
                devices=[DeviceCgroup(allow=True, type="c"), DeviceCgroup(allow=False, type="c", major=1)]
            ),
            r"devices\[1\]: cgroup v1 cannot take back",
        ),
    ],
)
def test_v1_refusals(tmp_path: Path, writes: Writes, resources: Resources, message: str) -> None:
    cg = CgroupV1("/cocon/abc", v1_tree(tmp_path))
    with pytest.raises(CgroupError, match=message):
        cg.apply(resources)


def test_v1_swap_without_accounting(tmp_path: Path, writes: Writes) -> None:
    cg = CgroupV1("/cocon/abc", v1_tree(tmp_path))
    os.unlink(tmp_path / "memory/cocon/abc/memory.memsw.limit_in_bytes")
    cg.apply(Resources(memory=Memory(limit=-1)))  # unlimited needs no memsw
    with pytest.raises(CgroupError, match=r"memory\.swap: this kernel has no swap accounting"):
        cg.apply(Resources(memory=Memory(limit=64 * MIB, swap=128 * MIB)))


def test_v1_devices_skip_when_in_place(tmp_path: Path, writes: Writes) -> None:
    cg = CgroupV1("/cocon/abc", v1_tree(tmp_path))
    (tmp_path / "devices/cocon/abc/devices.list").write_text("c 1:3 rwm\n")
    cg.apply(Resources(devices=V1_RESOURCES.devices))
    assert writes == []


def test_v1_mounts_state_and_stats(tmp_path: Path) -> None:
    hier = v1_tree(tmp_path)
    cg = CgroupV1("/cocon/abc", hier, unified=str(tmp_path / "unified"))
    mounts = dict(cg.container_mounts())
    assert mounts["cpu,cpuacct"] == str(tmp_path / "cpu,cpuacct/cocon/abc")
    assert mounts["systemd"] == str(tmp_path / "systemd/cocon/abc")
    assert mounts["unified"] == str(tmp_path / "unified/cocon/abc")
    assert ("systemd", "none,name=systemd") in cg.hierarchies()
    assert ("cpu,cpuacct", "cpu,cpuacct") in cg.hierarchies()
    again = cgroups.cgroup_from_state(cg.to_state())
    assert isinstance(again, CgroupV1)
    assert again.to_state() == cg.to_state()
    make_tree(
        tmp_path,
        {
            "cpu,cpuacct/cocon/abc/cpuacct.usage": "12345",
            "memory/cocon/abc/memory.usage_in_bytes": "4096",
            "memory/cocon/abc/memory.max_usage_in_bytes": "8192",
            "memory/cocon/abc/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            "pids/cocon/abc/pids.current": "1",
            "pids/cocon/abc/pids.max": "max",
            "blkio/cocon/abc/blkio.throttle.io_service_bytes_recursive": (
                "8:0 Read 100\n8:0 Write 50\n8:0 Total 150\n8:16 Read 1\nTotal 151\n"
            ),
        },
    )
    st = cg.stats()
    assert st == cgroups.CgroupStats(12345, 4096, None, 8192, 2, 1, None, 101, 50)


def test_state_errors() -> None:
    with pytest.raises(CgroupError, match="unknown version"):
        cgroups.cgroup_from_state({"version": 3})
    with pytest.raises(CgroupError, match="damaged"):
        cgroups.cgroup_from_state({"version": 1, "path": 5})
    with pytest.raises(CgroupError, match="damaged"):
        cgroups.cgroup_from_state({"version": 2})


# --- open_cgroup ---------------------------------------------------------------------------------------


def test_open_cgroup_picks_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    hybrid = parse_cgroup_mounts(
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    pure = CgroupMounts(v1=(), unified="/sys/fs/cgroup")
    monkeypatch.setattr("cocon.runtime.cgroups.mountinfo.read_cgroup_mounts", lambda: hybrid)
    cg = cgroups.open_cgroup(None, "abc")
    assert isinstance(cg, CgroupV1) and cg.version == 1 and cg.path == "/cocon/abc"
    assert cg.container_mounts() == [
        ("cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct/cocon/abc"),
        ("unified", "/sys/fs/cgroup/unified/cocon/abc"),
    ]
    assert cgroups.cgroup_mode() == "hybrid"
    monkeypatch.setattr("cocon.runtime.cgroups.mountinfo.read_cgroup_mounts", lambda: pure)
    cg = cgroups.open_cgroup("machine/web", "abc")
    assert isinstance(cg, CgroupV2) and cg.version == 2 and cg.dir == "/sys/fs/cgroup/machine/web"
    assert cgroups.cgroup_mode() == "v2"
    with pytest.raises(CgroupError, match="systemd"):
        cgroups.open_cgroup("user.slice:cocon:abc", "abc")
