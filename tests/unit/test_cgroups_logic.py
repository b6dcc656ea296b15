"""cocon.runtime.cgroups: path rules, conversions and mountinfo parsing (pure logic)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cocon.oci.runtime_spec import ThrottleDevice
from cocon.runtime.cgroups.common import (
    ancestors,
    blkio_weight_to_io_weight,
    io_max_lines,
    join,
    resolve_path,
    shares_to_weight,
    swap_to_v2,
)
from cocon.runtime.cgroups.mountinfo import Hierarchy, parse_cgroup_mounts, parse_mountinfo_line
from cocon.runtime.errors import CgroupError

# --- cgroupsPath ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "/cocon/abc"),
        ("", "/cocon/abc"),
        ("/machine/web", "/machine/web"),
        ("machine/web", "/machine/web"),  # relative: still relative to the hierarchy root
        ("//machine///web/", "/machine/web"),
        ("/a/./b", "/a/b"),
        ("/a:b:c", "/a:b:c"),  # absolute: a cgroupfs path even with colons
    ],
)
def test_resolve_path(given: str | None, expected: str) -> None:
    assert resolve_path(given, "abc") == expected


@pytest.mark.parametrize("bad", ["/a/../b", "..", "../x", "/", "//", "/a/b/.."])
def test_resolve_path_rejects(bad: str) -> None:
    with pytest.raises(CgroupError, match=r"linux\.cgroupsPath"):
        resolve_path(bad, "abc")


def test_resolve_path_systemd_form() -> None:
    with pytest.raises(CgroupError, match="--systemd-cgroup, which is not supported yet"):
        resolve_path("system.slice:cocon:abc", "abc")


@pytest.mark.parametrize("bad_id", ["", "a/b", ".."])
def test_resolve_path_bad_id(bad_id: str) -> None:
    with pytest.raises(CgroupError):
        resolve_path(None, bad_id)


def test_ancestors_and_join() -> None:
    assert ancestors("/a/b/c") == ["/a", "/a/b"]
    assert ancestors("/a") == []
    assert join("/sys/fs/cgroup/memory", "/cocon/x") == "/sys/fs/cgroup/memory/cocon/x"
    assert join("/sys/fs/cgroup/", "/cocon") == "/sys/fs/cgroup/cocon"
    assert join("/sys/fs/cgroup", "/") == "/sys/fs/cgroup"


# --- conversions ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shares", "weight"),
    [(2, 1), (1024, 39), (512, 20), (262144, 10000), (100, 4), (300000, 10000), (0, 0)],
)
def test_shares_to_weight(shares: int, weight: int) -> None:
    assert shares_to_weight(shares) == weight


@pytest.mark.parametrize(("blkio", "io"), [(10, 1), (1000, 10000), (500, 4950), (100, 910), (5, 1)])
def test_blkio_weight_to_io_weight(blkio: int, io: int) -> None:
    assert blkio_weight_to_io_weight(blkio) == io


def test_swap_to_v2() -> None:
    mib = 1 << 20
    assert swap_to_v2(None, None) is None
    assert swap_to_v2(None, 64 * mib) is None
    assert swap_to_v2(None, -1) == -1  # unlimited memory: unlimited swap
    assert swap_to_v2(-1, 64 * mib) == -1
    assert swap_to_v2(128 * mib, 64 * mib) == 64 * mib
    assert swap_to_v2(64 * mib, 64 * mib) == 0  # no swap at all
    with pytest.raises(CgroupError, match=r"memory\.swap: a swap limit needs a memory limit"):
        swap_to_v2(128 * mib, None)
    with pytest.raises(CgroupError, match=r"must be >= memory\.limit"):
        swap_to_v2(32 * mib, 64 * mib)


def test_io_max_lines() -> None:
    td = ThrottleDevice
    lines = io_max_lines(
        [td(major=8, minor=0, rate=1048576), td(major=254, minor=0, rate=0)],
        [td(major=8, minor=0, rate=2097152)],
        None,
        [td(major=8, minor=16, rate=100), td(major=8, minor=0, rate=50)],
    )
    assert lines == [
        "8:0 rbps=1048576 wbps=2097152 wiops=50",
        "254:0 rbps=max",
        "8:16 wiops=100",
    ]
    assert io_max_lines(None, None, None, None) == []


# --- mountinfo ------------------------------------------------------------------------------------------

V1_COMOUNTED = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
25 28 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/systemd rw,nosuid shared:5 - cgroup cgroup rw,xattr,name=systemd
27 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:6 - cgroup cgroup rw,cpu,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw,nosuid shared:7 - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/net_cls,net_prio rw shared:8 - cgroup cgroup rw,net_cls,net_prio
30 25 0:28 / /sys/fs/cgroup/pids rw shared:9 - cgroup cgroup rw,pids
31 25 0:29 / /sys/fs/cgroup/cpuset rw shared:10 - cgroup cgroup rw,cpuset,clone_children
32 25 0:26 / /mnt/again rw shared:7 - cgroup cgroup rw,memory
"""

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

V2 = """\
23 27 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
24 23 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:8 - cgroup2 cgroup2 rw,nsdelegate
90 88 0:23 / /var/lib/x/cg\\040dir rw - cgroup2 cgroup2 rw
"""


def test_parse_v1_comounted() -> None:
    mounts = parse_cgroup_mounts(V1_COMOUNTED)
    assert mounts.mode == "v1"
    assert mounts.unified is None
    by_label = {h.label: h for h in mounts.v1}
    assert list(by_label) == ["systemd", "cpu,cpuacct", "memory", "net_cls,net_prio", "pids", "cpuset"]
    assert by_label["cpu,cpuacct"].controllers == ("cpu", "cpuacct")
    assert by_label["cpu,cpuacct"].mount_data == "cpu,cpuacct"
    assert by_label["systemd"].controllers == ()
    assert by_label["systemd"].name == "systemd"
    assert by_label["systemd"].mount_data == "none,name=systemd"
    assert by_label["cpuset"].controllers == ("cpuset",)  # clone_children is not a controller
    # The second mount of the memory hierarchy is ignored.
    assert by_label["memory"].mountpoint == "/sys/fs/cgroup/memory"


def test_parse_hybrid() -> None:
    mounts = parse_cgroup_mounts(HYBRID)
    assert mounts.mode == "hybrid"
    assert mounts.unified == "/sys/fs/cgroup/unified"
    assert [h.label for h in mounts.v1] == ["cpu", "cpuacct", "memory", "systemd"]


def test_parse_v2() -> None:
    mounts = parse_cgroup_mounts(V2)
    assert mounts.mode == "v2"
    assert mounts.unified == "/sys/fs/cgroup"
    assert mounts.v1 == ()


def test_parse_v2_elsewhere_and_escapes() -> None:
    text = V2.splitlines()[2]
    mounts = parse_cgroup_mounts(text)
    assert mounts.unified == "/var/lib/x/cg dir"
    entry = parse_mountinfo_line(text)
    assert entry is not None and entry.fstype == "cgroup2"


def test_only_named_v1_is_v2() -> None:
    text = V2.splitlines()[1] + "\n40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
    assert parse_cgroup_mounts(text).mode == "v2"


def test_no_cgroups() -> None:
    with pytest.raises(CgroupError, match="no cgroup filesystem"):
        _ = parse_cgroup_mounts("22 27 0:21 / /proc rw - proc proc rw\n").mode


def test_parse_ignores_garbage() -> None:
    assert parse_mountinfo_line("garbage") is None
    assert parse_mountinfo_line("x 1 2 3 4 5 - a") is None


def test_hierarchy_json_roundtrip() -> None:
    h = Hierarchy("/sys/fs/cgroup/cpu,cpuacct", ("cpu", "cpuacct"), None, "/")
    assert Hierarchy.from_json(h.to_json()) == h
    with pytest.raises(CgroupError):
        Hierarchy.from_json({"controllers": []})


def test_package_imports_cheaply() -> None:
    """Importing the package loads none of the drivers (cocon-runtime's hot path imports it)."""
    code = (
        "import sys; import cocon.runtime.cgroups; "
        "print(','.join(m for m in sys.modules if m.startswith('cocon.runtime.cgroups.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
