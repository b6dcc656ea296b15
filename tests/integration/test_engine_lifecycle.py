"""Detached containers under conmon, in-process (cocon.engine.supervisor, logs, monitor, health):
real conmon, real cocon-runtime, real overlay snapshots and cgroups. Live restore is checked with a
fresh process (the `cocon` command) after the engine that started the containers is closed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))

from cli_helpers import (
    COCON,
    cgroup_dirs,
    kill_prestarted,
    mounts_under,
    new_root_with_busybox,
    remove_cgroup,
    reset_network,
    stop_daemon,
    unmount_all,
)
from cocon.engine.engine import Engine
from cocon.engine.errors import Conflict, NotFound
from cocon.engine.logs import log_files, read_logs
from cocon.engine.monitor import Monitor
from cocon.engine.supervisor import Supervisor


def conmon_pids(run: str) -> list[int]:
    """conmon processes whose command line names `run` (ours)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"conmon") and any(run.encode() in a for a in argv) and alive(int(name)):
            pids.append(int(name))
    return pids


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Env:
    def __init__(self, root: str, run: str) -> None:
        self.root, self.run = root, run
        self.engine = Engine(root, run)
        self.sup = Supervisor(self.engine)
        self.ids: set[str] = set()

    def cgroups(self) -> list[str]:
        """The cgroups of this test's containers (other tests may run at the same time)."""
        return sorted(d for d in cgroup_dirs() if os.path.basename(d.rstrip("/")) in self.ids)

    def reopen(self) -> None:
        self.engine.close()
        self.engine = Engine(self.root, self.run)
        self.sup = Supervisor(self.engine)

    def cocon(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, COCON_ROOT=self.root, COCON_RUN=self.run)
        proc = subprocess.run([COCON, *args], env=env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"cocon {args} exited {proc.returncode}: {proc.stderr}")
        return proc

    def detach(self, *cmd: str, **body: Any) -> str:
        name = body.pop("name", None)
        cid = str(self.sup.run({"Image": "busybox", "Cmd": list(cmd), **body}, name)["Id"])
        self.ids.add(cid)
        return cid

    def logs(self, cid: str, **kw: Any) -> list[tuple[str, bytes]]:
        return [(s, line) for s, _t, _st, line in read_logs(log_files(self.sup.log_path(cid)), **kw)]


@pytest.fixture
def env(tmp_path: Any) -> Iterator[Env]:
    root = os.path.join(str(tmp_path), "root")
    run = tempfile.mkdtemp(prefix="cocon-test-run-", dir="/run")
    new_root_with_busybox(root)
    e = Env(root, run)
    try:
        yield e
        stop_daemon(run)  # one that `cocon` commands of the test started, with its pre-started runtime
        e.reopen()
        for rec in e.engine.instances.list():
            e.ids.add(rec.id)
            e.sup.remove(rec.id, force=True, volumes=True)
        deadline = time.monotonic() + 10  # conmon ends after its exit command
        while conmon_pids(run) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conmon_pids(run) == [], "conmon processes left behind"
        active = os.path.join(root, "snapshots", "overlayfs", "active")
        assert not os.path.isdir(active) or os.listdir(active) == [], "snapshots left behind"
        assert mounts_under(root) == [] and mounts_under(run) == [], "mounts left behind"
        assert e.cgroups() == [], "cgroups left behind"
        for sub in ("runtime", "instances", "exits", "locks"):
            d = os.path.join(run, sub)
            assert not os.path.isdir(d) or [n for n in os.listdir(d) if not n.startswith(".")] == [], sub
        containers = os.path.join(root, "containers")
        assert not os.path.isdir(containers) or os.listdir(containers) == [], "logs left behind"
    finally:
        stop_daemon(run)
        kill_prestarted(run)
        for pid in conmon_pids(run):
            os.kill(pid, signal.SIGKILL)
        try:
            for rec in e.engine.instances.list():
                try:
                    e.sup.remove(rec.id, force=True, volumes=True)
                except Exception:
                    pass
        finally:
            e.engine.close()
            unmount_all(run)
            unmount_all(root)
            reset_network(root, run)
            for d in e.cgroups():
                remove_cgroup(d)
            shutil.rmtree(run, ignore_errors=True)


def test_detached_output_exit_code_and_logs(env: Env) -> None:
    cid = env.detach("sh", "-c", "echo out1; echo err1 >&2; printf 'no newline'; exit 3")
    assert env.sup.wait(cid) == 3
    rec = env.engine.instances.get(cid)
    assert (rec.status, rec.exit_code, rec.pid) == ("exited", 3, 0)
    assert rec.finished is not None and rec.started is not None and rec.finished >= rec.started
    lines = env.logs(cid)
    assert ("stdout", b"out1\n") in lines and ("stderr", b"err1\n") in lines
    assert ("stdout", b"no newline") in lines  # as written: the process ended without a newline
    assert env.logs(cid, stderr=False) == [("stdout", b"out1\n"), ("stdout", b"no newline")]
    assert env.logs(cid, tail=1)[0][1] == b"no newline"
    assert env.logs(cid, since=time.time() + 5) == []
    # nothing of the run is left but the record, the snapshot and the log
    assert not os.path.exists(env.sup.bundle(cid)) and not os.path.exists(env.sup.exit_file(cid))
    assert env.engine.containers.inspect(cid)["State"]["ExitCode"] == 3


def test_stop_sends_stop_signal_then_kill(env: Env) -> None:
    trap = env.detach("sh", "-c", "trap 'echo got USR1; exit 7' USR1; while true; do sleep 0.05; done",
                   StopSignal="SIGUSR1")  # fmt: skip
    stubborn = env.detach("sleep", "1000")  # PID 1 without a handler: SIGTERM does nothing
    time.sleep(0.3)
    t = time.monotonic()
    env.sup.stop(trap, timeout=10)
    assert time.monotonic() - t < 5
    assert env.engine.instances.get(trap).exit_code == 7
    assert ("stdout", b"got USR1\n") in env.logs(trap)
    t = time.monotonic()
    env.sup.stop(stubborn, timeout=1)
    took = time.monotonic() - t
    assert 0.9 < took < 6, took
    rec = env.engine.instances.get(stubborn)
    assert (rec.status, rec.exit_code) == ("exited", 137)
    env.sup.stop(stubborn)  # stopping a stopped one is fine


def test_kill_restart_start_and_remove(env: Env) -> None:
    cid = env.detach("sh", "-c", "trap 'exit 9' HUP; echo started; while true; do sleep 0.05; done")
    time.sleep(0.3)
    pid1 = env.engine.instances.get(cid).pid
    env.sup.kill(cid, signal.SIGHUP)
    assert env.sup.wait(cid) == 9
    with pytest.raises(Conflict):
        env.sup.kill(cid, signal.SIGTERM)
    env.sup.start(cid)
    assert env.sup.status(env.engine.instances.get(cid)) == "running"
    with pytest.raises(Conflict):
        env.sup.start(cid)
    env.sup.restart(cid, timeout=5)
    rec = env.engine.instances.get(cid)
    assert rec.status == "running" and rec.pid not in (0, pid1)
    time.sleep(0.3)
    assert [line for s, line in env.logs(cid)].count(b"started\n") == 3  # one log across starts
    with pytest.raises(Conflict):
        env.sup.remove(cid)
    conmon = rec.supervisor
    env.sup.remove(cid, force=True)
    with pytest.raises(NotFound):
        env.engine.instances.get(cid)
    assert not os.path.exists(env.sup.log_dir(cid))
    time.sleep(0.2)
    assert not alive(conmon)


def test_autoremove_detached(env: Env) -> None:
    cid = env.detach("sh", "-c", "exit 2", HostConfig={"AutoRemove": True})
    assert env.sup.wait(cid, "removed") in (0, 2)
    with pytest.raises(NotFound):
        env.engine.instances.get(cid)


def test_start_failure_is_recorded(env: Env) -> None:
    cid = env.engine.containers.create({"Image": "busybox", "Cmd": ["/no/such/thing"]})["Id"]
    env.ids.add(cid)
    from cocon.engine.errors import StartFailed

    with pytest.raises(StartFailed) as info:
        env.sup.start(cid)
    assert info.value.exit_code == 127
    rec = env.engine.instances.get(cid)
    assert rec.status == "created" and rec.exit_code == 127 and "no/such/thing" in rec.error
    deadline = time.monotonic() + 5
    while conmon_pids(env.run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert conmon_pids(env.run) == []


def test_exec_in_detached_container(env: Env) -> None:
    cid = env.detach("sleep", "1000")
    args = env.sup.exec_args(cid, ["sh", "-c", "id -u; pwd; echo $FOO; exit 5"], user="nobody",
                             workdir="/tmp", env=["FOO=bar"])  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 5
    assert proc.stdout.split() == ["65534", "/tmp", "bar"]
    with pytest.raises(Exception, match="unable to find user"):
        env.sup.exec_args(cid, ["true"], user="nosuchuser")


def test_live_restore_in_a_fresh_process(env: Env) -> None:
    """Containers go on while no engine exists; a new process finds them and the exit code of one
    that ended meanwhile (recorded by conmon's exit command)."""
    long = env.detach("sleep", "1000", name="long")
    short = env.detach("sh", "-c", "sleep 0.5; exit 5", name="short")
    conmon_short = env.engine.instances.get(short).supervisor
    env.engine.close()  # the engine "daemon" is gone
    time.sleep(1.5)
    ps = [json.loads(line) for line in env.cocon("ps", "-a", "--format", "json").stdout.splitlines()]
    states = {c["Names"]: c["State"] for c in ps}
    assert states["long"] == "running"
    assert states["short"] == "exited"
    assert "Exited (5)" in next(c["Status"] for c in ps if c["Names"] == "short")
    assert not alive(conmon_short)
    env.reopen()
    assert env.sup.status(env.engine.instances.get(long)) == "running"
    assert env.cocon("wait", "short").stdout.strip() == "5"
    env.cocon("stop", "-t", "1", "long")
    assert env.engine.instances.get(long).exit_code == 137


def test_reconcile_without_exit_command(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COCON_CONMON_EXIT_COMMAND", "0")
    cid = env.detach("sh", "-c", "exit 4")
    time.sleep(0.5)
    env.reopen()
    assert env.engine.instances.get(cid).status == "running"  # nobody collected it yet
    assert env.sup.reconcile() == [cid]
    rec = env.engine.instances.get(cid)
    assert (rec.status, rec.exit_code) == ("exited", 4)
    # a conmon killed with its container: the code is lost, the record says 255
    cid2 = env.detach("sleep", "1000")
    rec2 = env.engine.instances.get(cid2)
    os.kill(rec2.supervisor, signal.SIGKILL)
    os.kill(rec2.pid, signal.SIGKILL)
    time.sleep(0.3)
    env.reopen()
    assert env.sup.reconcile() == [cid2]
    assert env.engine.instances.get(cid2).exit_code == 255


def test_restart_policies_and_backoff(env: Env) -> None:
    cid = env.detach("sh", "-c", "echo run; exit 1", HostConfig={"RestartPolicy": {"Name": "on-failure",
                                                                              "MaximumRetryCount": 2}})  # fmt: skip
    monitor = Monitor(env.engine, interval=0.05)
    monitor.start_thread()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            rec = env.engine.instances.get(cid)
            if rec.config.get("RestartCount") == 2 and rec.status == "exited":
                break
            time.sleep(0.05)
        time.sleep(0.5)
        rec = env.engine.instances.get(cid)
        assert rec.status == "exited" and rec.config["RestartCount"] == 2
        assert [line for s, line in env.logs(cid)] == [b"run\n"] * 3
        ok = env.detach("true", HostConfig={"RestartPolicy": {"Name": "on-failure"}})
        time.sleep(0.5)
        assert env.engine.instances.get(ok).config.get("RestartCount", 0) == 0
        always = env.detach("sh", "-c", "sleep 0.2", HostConfig={"RestartPolicy": {"Name": "always"}})
        time.sleep(1.5)
        assert env.engine.instances.get(always).config.get("RestartCount", 0) >= 2
        env.sup.stop(always, timeout=1)
        count = env.engine.instances.get(always).config.get("RestartCount")
        time.sleep(0.5)
        rec = env.engine.instances.get(always)
        assert rec.status == "exited" and rec.config.get("RestartCount") == count  # stopped by the user
    finally:
        monitor.stop()
    # a daemon restart starts `always` containers again, not `unless-stopped` ones
    unless = env.detach("sleep", "1000", HostConfig={"RestartPolicy": {"Name": "unless-stopped"}})
    env.sup.stop(unless, timeout=0)
    env.reopen()
    monitor = Monitor(env.engine)
    started = monitor.restore()
    assert always in started and unless not in started
    assert env.sup.status(env.engine.instances.get(always)) == "running"


def test_health_checks(env: Env) -> None:
    ns = 1_000_000_000
    cid = env.detach("sh", "-c", "sleep 1000",
                  Healthcheck={"Test": ["CMD-SHELL", "test -e /tmp/ok"], "Interval": ns // 10,
                               "Timeout": 5 * ns, "Retries": 2})  # fmt: skip
    monitor = Monitor(env.engine, interval=0.05)
    monitor.start_thread()
    try:

        def health() -> str:
            return str((env.engine.instances.get(cid).config.get("Health") or {}).get("Status"))

        deadline = time.monotonic() + 10
        while health() != "unhealthy" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health() == "unhealthy"
        subprocess.run(env.sup.exec_args(cid, ["touch", "/tmp/ok"]), check=True)
        deadline = time.monotonic() + 10
        while health() != "healthy" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health() == "healthy"
    finally:
        monitor.stop()
    none = env.detach("sleep", "1000", Healthcheck={"Test": ["NONE"]})
    from cocon.engine.health import effective

    assert effective(env.sup, env.engine.instances.get(none)) is None


def test_log_rotation_by_the_monitor(env: Env) -> None:
    """max-size with max-file > 1: the monitor rotates, conmon reopens; `logs` reads every file."""
    cid = env.detach("sh", "-c", "i=0; while [ $i -lt 400 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); "
                     "usleep 5000; done; sleep 1000",
                     HostConfig={"LogConfig": {"Type": "k8s-file", "Config": {"max-size": "4k", "max-file": "3"}}})  # fmt: skip
    monitor = Monitor(env.engine, interval=0.05)
    monitor.start_thread()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            lines = [line for _s, line in env.logs(cid)]
            if lines and lines[-1] == b"line-399-xxxxxxxxxxxxxxxxxxxxxxxx\n":
                break
            time.sleep(0.1)
    finally:
        monitor.stop()
    files = log_files(env.sup.log_path(cid))
    assert [os.path.basename(f) for f in files] == ["container.log.2", "container.log.1", "container.log"]
    lines = [line for _s, line in env.logs(cid)]
    assert lines[-1] == b"line-399-xxxxxxxxxxxxxxxxxxxxxxxx\n"
    numbers = [int(line.split(b"-")[1]) for line in lines]
    assert numbers == list(range(numbers[0], 400)) and numbers[0] > 0  # the oldest were dropped, no gap
