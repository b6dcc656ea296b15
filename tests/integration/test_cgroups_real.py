"""cocon.runtime.cgroups against this machine's real cgroup filesystems (v1, hybrid or v2).

Every test uses unique cgroup names (/cocon-test-<uuid>) and removes its processes and directories in
the fixture's teardown, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cocon.oci.runtime_spec import CPU, BlockIO, DeviceCgroup, Memory, Pids, Resources, ThrottleDevice
from cocon.runtime.cgroups import cgroup_from_state, open_cgroup
from cocon.runtime.cgroups.mountinfo import read_cgroup_mounts
from cocon.runtime.cgroups.v1 import CgroupV1
from cocon.runtime.cgroups.v2 import CgroupV2
from cocon.runtime.errors import CgroupError

if TYPE_CHECKING:
    from cocon.runtime.cgroups import Cgroup


MIB = 1 << 20
ONLY_NULL = [
    DeviceCgroup(allow=False, access="rwm"),
    DeviceCgroup(allow=True, type="c", major=1, minor=3, access="rwm"),
]
OPEN_DEVICES = r"""
import errno, os
for path in ("/dev/null", "/dev/zero"):
    try:
        os.close(os.open(path, os.O_RDONLY))
        print(path, "ok")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""


def unique(prefix: str = "/cocon-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Lab:
    """Makes cgroups and processes for one test and removes them all afterwards."""

    def __init__(self) -> None:
        self.cgroups: list[Cgroup] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.extra_dirs: list[str] = []

    def open(self, path: str | None = None) -> Cgroup:
        cg = open_cgroup(path or unique(), "unused")
        self.cgroups.append(cg)
        return cg

    def v2_at(self, mountpoint: str, path: str | None = None) -> CgroupV2:
        cg = CgroupV2(path or unique(), mountpoint)
        self.cgroups.append(cg)
        return cg

    def spawn(self, cg: Cgroup, argv: list[str]) -> subprocess.Popen[str]:
        """Start `argv` inside `cg`: a shell waits on stdin until it has been moved, then execs argv."""
        proc = subprocess.Popen(
            ["sh", "-c", 'read _ && exec "$@"', "sh", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        cg.add(proc.pid)
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.stdin = None
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)
        for cg in reversed(self.cgroups):
            with contextlib.suppress(Exception):
                if cg.frozen():
                    cg.thaw()
            with contextlib.suppress(Exception):
                cg.kill_all(signal.SIGKILL)
            with contextlib.suppress(Exception):
                cg.destroy()
            for _, d in cg.container_mounts():
                _rmdir_all(d)
        for d in self.extra_dirs:
            _rmdir_all(d)


def _rmdir_all(d: str) -> None:
    if not os.path.isdir(d):
        return
    for dirpath, _, _ in os.walk(d, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.cleanup()


def cg_file(cg: Cgroup, v1_controller: str, name: str) -> str:
    if isinstance(cg, CgroupV1):
        d = cg.dir(v1_controller)
        assert d is not None, f"{v1_controller} is not mounted"
    else:
        assert isinstance(cg, CgroupV2)
        d = cg.dir
    return os.path.join(d, name)


def read(cg: Cgroup, v1_controller: str, name: str) -> str:
    return Path(cg_file(cg, v1_controller, name)).read_text().strip()


def a_block_device() -> tuple[int, int]:
    names = sorted(os.listdir("/sys/block"), key=lambda n: n.startswith(("loop", "ram", "zram")))
    major, minor = Path(f"/sys/block/{names[0]}/dev").read_text().split(":")
    return int(major), int(minor)


def bfq() -> bool:
    """Whether the BFQ I/O scheduler (and so blkio.bfq.weight) is available."""
    return any("bfq" in Path(f"/sys/block/{n}/queue/scheduler").read_text() for n in os.listdir("/sys/block"))


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


# --- limits ---------------------------------------------------------------------------------------------


def test_limits_are_written(lab: Lab) -> None:
    major, minor = a_block_device()
    cg = lab.open()
    throttle = [ThrottleDevice(major=major, minor=minor, rate=MIB)]
    res = Resources(
        memory=Memory(limit=64 * MIB, reservation=32 * MIB),
        cpu=CPU(shares=512, quota=50000, period=100000, cpus="0", mems="0"),
        pids=Pids(limit=10),
        # A v1 weight needs the BFQ (or old CFQ) scheduler.
        block_io=BlockIO(
            weight=300 if isinstance(cg, CgroupV1) and bfq() else None, throttle_read_bps_device=throttle
        ),
        devices=ONLY_NULL,
    )
    cg.create(res)
    for _, d in cg.container_mounts():
        assert os.path.isdir(d)
    if isinstance(cg, CgroupV1):
        assert read(cg, "memory", "memory.limit_in_bytes") == str(64 * MIB)
        assert read(cg, "memory", "memory.soft_limit_in_bytes") == str(32 * MIB)
        assert read(cg, "cpu", "cpu.shares") == "512"
        assert read(cg, "cpu", "cpu.cfs_quota_us") == "50000"
        assert read(cg, "cpu", "cpu.cfs_period_us") == "100000"
        assert read(cg, "cpuset", "cpuset.cpus") == "0"
        assert read(cg, "cpuset", "cpuset.mems") == "0"
        assert read(cg, "pids", "pids.max") == "10"
        if bfq():
            weight_file = next(
                n for n in ("blkio.weight", "blkio.bfq.weight") if os.path.exists(cg_file(cg, "blkio", n))
            )
            assert read(cg, "blkio", weight_file).split()[-1] == "300"
        assert read(cg, "blkio", "blkio.throttle.read_bps_device") == f"{major}:{minor} {MIB}"
        assert read(cg, "devices", "devices.list") == "c 1:3 rwm"
    else:
        assert read(cg, "", "memory.max") == str(64 * MIB)
        assert read(cg, "", "memory.low") == str(32 * MIB)
        assert read(cg, "", "cpu.weight") == "20"
        assert read(cg, "", "cpu.max") == "50000 100000"
        assert read(cg, "", "cpuset.cpus") == "0"
        assert read(cg, "", "pids.max") == "10"
        assert f"{major}:{minor} rbps={MIB}" in read(cg, "", "io.max")
    st = cg.stats()
    assert st.memory_limit == 64 * MIB
    assert st.pids_limit == 10
    # update: raise the limits
    cg.apply(Resources(memory=Memory(limit=128 * MIB), pids=Pids(limit=-1)))
    assert cg.stats().memory_limit == 128 * MIB
    assert cg.stats().pids_limit is None
    cg.destroy()
    for _, d in cg.container_mounts():
        assert not os.path.exists(d)


def test_create_failure_removes_directories(lab: Lab) -> None:
    cg = lab.open()
    with pytest.raises(CgroupError, match=r"linux\.resources\.cpu\.cpus: cannot write '4096'"):
        cg.create(Resources(pids=Pids(limit=10), cpu=CPU(cpus="4096")))
    for _, d in cg.container_mounts():
        assert not os.path.exists(d), d


def test_existing_parent_nested_path_and_busy_leaf(lab: Lab) -> None:
    parent = unique()
    cg = lab.open(f"{parent}/inner")
    # podman/conmon may have made the parent already (here: in one hierarchy only).
    pre = cg.container_mounts()[0][1]
    os.makedirs(os.path.dirname(pre))
    for _, d in cg.container_mounts():
        lab.extra_dirs.append(os.path.dirname(d))
    cg.create(Resources(cpu=CPU(cpus="0")))
    if isinstance(cg, CgroupV1) and cg.dir("cpuset") is not None:
        parent_dir = os.path.dirname(cg_file(cg, "cpuset", "x"))
        assert Path(parent_dir, "..", "cpuset.cpus").read_text().strip() != ""
        assert read(cg, "cpuset", "cpuset.cpus") == "0"
    proc = lab.spawn(cg, ["sleep", "60"])
    again = open_cgroup(f"{parent}/inner", "unused")
    with pytest.raises(CgroupError, match="already holds processes"):
        again.create(None)
    cg.kill_all(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    cg.destroy()
    cg.destroy()  # missing directories are fine
    for _, d in cg.container_mounts():
        assert not os.path.exists(d)
        assert os.path.isdir(os.path.dirname(d))  # the shared parent stays


# --- processes ------------------------------------------------------------------------------------------


def test_processes_freeze_thaw_kill_destroy(lab: Lab, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    cg = lab.open()
    cg.create(None)
    loop = f"i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.02; done"
    proc = lab.spawn(cg, ["sh", "-c", loop])
    assert wait_for(lambda: counter.exists() and counter.read_text().strip() not in ("", "1"))
    assert proc.pid in cg.pids()
    # the loop forks `sleep` all the time: compare what does not change
    assert proc.pid in cgroup_from_state(json.loads(json.dumps(cg.to_state()))).pids()

    cg.freeze()
    assert cg.frozen()
    if isinstance(cg, CgroupV1):
        assert read(cg, "freezer", "freezer.state") == "FROZEN"
    before = counter.read_text()
    time.sleep(0.3)
    assert counter.read_text() == before, "a frozen process kept running"
    state = Path(f"/proc/{proc.pid}/status").read_text().split("State:")[1].split()[0]
    assert state != "R"

    cg.thaw()
    assert not cg.frozen()
    assert wait_for(lambda: counter.read_text() != before), "the process did not resume after thaw"

    # Kill a paused container: kill_all thaws it so SIGKILL takes effect.
    cg.freeze()
    cg.kill_all(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert wait_for(lambda: cg.pids() == [])
    cg.destroy()
    for _, d in cg.container_mounts():
        assert not os.path.exists(d)


@pytest.mark.parametrize("where", ["host", "cgroup2"])
def test_enter_moves_the_calling_process_into_every_hierarchy(lab: Lab, where: str) -> None:
    unified = read_cgroup_mounts().unified
    assert unified is not None, "this test needs a cgroup2 mount (v2 or hybrid hosts)"
    cg: Cgroup = lab.open() if where == "host" else lab.v2_at(unified)
    cg.create(None)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # single-threaded, as enter() requires
        code = 1
        try:
            os.close(r)
            cg.enter()
            with open("/proc/self/cgroup", "rb") as f:
                os.write(w, f.read())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        lines = f.read().decode().splitlines()  # "ID:CONTROLLERS:PATH"
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert sum(line.split(":", 2)[2] == cg.path for line in lines) == len(cg.container_mounts()), lines


def test_destroy_if_empty_leaves_a_busy_cgroup_alone(lab: Lab) -> None:
    cg = lab.open()
    cg.create(None)
    sleeper = lab.spawn(cg, ["sleep", "60"])
    assert not cg.destroy_if_empty()
    assert all(os.path.isdir(d) for _, d in cg.container_mounts())
    sleeper.kill()
    sleeper.wait(timeout=10)
    assert wait_for(lambda: cg.pids() == [])
    assert cg.destroy_if_empty()
    assert not any(os.path.exists(d) for _, d in cg.container_mounts())
    assert cg.destroy_if_empty()  # gone already


def test_attach_warm_up_thread_is_gone_after_wait() -> None:
    import threading

    from cocon.runtime import cgroups

    threads = threading.active_count()
    early = cgroups.start_attach_warm_up(early=True)
    assert cgroups.start_attach_warm_up() is early  # the next caller takes the early one
    fresh = cgroups.start_attach_warm_up()
    assert fresh is not early
    for wait in (early, fresh, early):
        wait()
    assert threading.active_count() == threads
    # An early warm-up nobody took is let go by its own wait.
    unused = cgroups.start_attach_warm_up(early=True)
    unused()
    assert cgroups.start_attach_warm_up() is not unused


def test_a_forked_child_never_writes_through_its_parents_warm_up(tmp_path: Path) -> None:
    """The child inherits the early warm-up; once it has closed that fd and reused the number for a
    file of its own (a bundle's config.json), waiting on the warm-up must not write a pid into it."""
    from cocon.runtime import cgroups

    early = cgroups.start_attach_warm_up(early=True)
    target = tmp_path / "config.json"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in range(3, 256):  # the child closes what it inherited, as spawners do
                try:
                    os.close(fd)
                except OSError:
                    pass
            with open(target, "w") as f:  # takes the lowest free fd: the warm-up's old number
                f.write("{}")
                f.flush()
                cgroups.start_attach_warm_up()()  # inherited early warm-up: must be left alone
                early()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    early()
    assert os.waitstatus_to_exitcode(status) == 0
    assert target.read_text() == "{}"


def test_kill_all_with_sigterm(lab: Lab) -> None:
    cg = lab.open()
    cg.create(None)
    procs = [lab.spawn(cg, ["sleep", "60"]) for _ in range(3)]
    assert wait_for(lambda: len(cg.pids()) == 3)
    cg.kill_all(signal.SIGTERM)
    assert [p.wait(timeout=10) for p in procs] == [-signal.SIGTERM] * 3
    assert not cg.frozen()
    cg.destroy()


def test_pids_limit_stops_the_sixth_process(lab: Lab) -> None:
    cg = lab.open()
    cg.create(Resources(pids=Pids(limit=5)))
    # The shell plus four sleeps make five; the fifth sleep (the sixth process) cannot be forked.
    proc = lab.spawn(cg, ["sh", "-c", "for i in 1 2 3 4 5 6; do sleep 60 >/dev/null 2>&1 & done; wait"])
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "fork" in err.lower()
    assert len(cg.pids()) == 4
    st = cg.stats()
    assert st.pids_limit == 5 and st.pids_current == 4
    events = Path(cg_file(cg, "pids", "pids.events")).read_text()
    assert int(events.split("max")[1].split()[0]) >= 1


def test_memory_limit_oom_kills(lab: Lab) -> None:
    cg = lab.open()
    cg.create(Resources(memory=Memory(limit=32 * MIB, swap=32 * MIB)))
    proc = lab.spawn(cg, [sys.executable, "-S", "-c", "b = b'x' * (100 << 20); print(len(b))"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out
    st = cg.stats()
    assert st.oom_kills is not None and st.oom_kills >= 1
    assert st.memory_limit == 32 * MIB


def test_device_rules(lab: Lab) -> None:
    cg = lab.open()
    cg.create(Resources(devices=ONLY_NULL))
    proc = lab.spawn(cg, [sys.executable, "-S", "-c", OPEN_DEVICES])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["/dev/null ok", "/dev/zero EPERM"]


# --- the cgroup2 mount, whatever the mode (hybrid: the empty "unified" mount) --------------------------


def test_v2_device_program_on_the_cgroup2_mount(lab: Lab) -> None:
    mountpoint = read_cgroup_mounts().unified
    # every supported host has one: the whole /sys/fs/cgroup (v2) or the hybrid layout's "unified"
    assert mountpoint is not None, "this test needs a cgroup2 mount (v2 or hybrid hosts)"
    cg = lab.v2_at(mountpoint)
    cg.create(Resources(devices=ONLY_NULL))
    assert os.path.isdir(cg.dir)
    proc = lab.spawn(cg, [sys.executable, "-S", "-c", OPEN_DEVICES])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["/dev/null ok", "/dev/zero EPERM"]
    assert proc.pid not in cg.pids()  # it has exited

    # Update: allow everything; the new program replaces the old one.
    from cocon.runtime.cgroups.bpf import query_device_programs

    cg.apply(Resources(devices=[DeviceCgroup(allow=True, access="rwm")]))
    fd = os.open(cg.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert len(query_device_programs(fd)) == 1
    finally:
        os.close(fd)
    proc = lab.spawn(cg, [sys.executable, "-S", "-c", OPEN_DEVICES])
    out, _ = proc.communicate(timeout=30)
    assert out.split("\n")[:2] == ["/dev/null ok", "/dev/zero ok"]

    sleeper = lab.spawn(cg, ["sleep", "60"])
    assert cg.pids() == [sleeper.pid]
    cg.freeze()
    assert cg.frozen()
    cg.thaw()
    cg.kill_all(signal.SIGKILL)
    assert sleeper.wait(timeout=10) == -signal.SIGKILL
    cg.destroy()
    assert not os.path.exists(cg.dir)
