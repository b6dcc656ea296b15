"""The guest agent run on the host (`python -m cocon.vmm.guest.agent --fd N` over a socketpair),
driven by the real AgentClient, running real containers with cocon's runtime from a busybox rootfs.

The agent runs in its own UTS and mount namespaces (unshare), so set_hostname and mount do not touch
the host. Every test deletes its containers; the fixture also checks that no cgroup, runtime state
or agent process is left behind.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from cocon.oci.runtime_spec import Memory, Pids, Resources, Spec, encode_config
from cocon.runtime.container import Runtime
from cocon.runtime.defaults import default_spec
from cocon.vmm import agent_protocol as P
from cocon.vmm.agent_client import AgentClient, AgentError
from runtime_helpers import TEST_CGROUP_PARENT, leftover_cgroup_dirs, unique_id

TIMEOUT = 30.0


class AgentRun:
    """One agent process and a client; records every output, EOF, exit and other event in order."""

    def __init__(self, tmp: str, rootfs: str, *, pid1: bool = False, net: bool = False) -> None:
        self.tmp = tmp
        self.rootfs = rootfs
        self.state_dir = os.path.join(tmp, "agent-state")
        ours, theirs = socket.socketpair()
        self.stderr_path = os.path.join(tmp, "agent.stderr")
        self.stderr = open(self.stderr_path, "wb")  # closed in close()
        # Own UTS and mount namespaces (set_hostname and mount stay in them); with pid1, also its own
        # pid namespace with the agent as its PID 1 (--no-prepare: mount nothing on this host).
        ns = ["--pid", "--fork", "--mount-proc"] if pid1 else []
        ns += ["--net"] if net else []
        extra = ["--no-prepare"] if pid1 else []
        self.proc = subprocess.Popen(
            ["unshare", *ns, "--uts", "--mount", "--propagation", "private", "--",
             sys.executable, "-m", "cocon.vmm.guest.agent", "--fd", str(theirs.fileno()),
             "--state-dir", self.state_dir, *extra],
            pass_fds=[theirs.fileno()],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )  # fmt: skip
        theirs.close()
        self.sock = ours
        self.client = AgentClient(ours)
        self.log: list[tuple[Any, ...]] = []
        self.events: list[dict[str, Any]] = []
        self.closed = False
        self.client.on_output = lambda n, s, d: self.log.append(("data", n, s, d))
        self.client.on_eof = lambda n, s: self.log.append(("eof", n, s))
        self.client.on_exit = lambda n, c: self.log.append(("exit", n, c))
        self.client.on_event = self.events.append
        self.client.on_closed = self._closed
        self.ids: list[str] = []
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()
        assert ready == b"cocon-agent: ready 1\n"

    def _closed(self) -> None:
        self.closed = True

    # -- helpers ----------------------------------------------------------------------------------
    def spec(self, *args: str, edit: Callable[[Spec], None] | None = None) -> tuple[str, dict[str, Any]]:
        cid = unique_id("agent")
        spec = default_spec(args=list(args), terminal=False)
        assert spec.root is not None and spec.linux is not None
        spec.root.path = self.rootfs
        spec.linux.cgroups_path = f"{TEST_CGROUP_PARENT}/{cid}"
        if edit is not None:
            edit(spec)
        self.ids.append(cid)
        config: dict[str, Any] = json.loads(encode_config(spec))
        return cid, config

    def run(
        self, *args: str, stdin: bool = False, terminal: bool = False, start: bool = True, **kw: Any
    ) -> str:
        cid, config = self.spec(*args, **kw)
        reply = self.client.request("create", timeout=TIMEOUT, container_id=cid, config=config,
                                    terminal=terminal, stdin=stdin)  # fmt: skip
        assert reply["pid"] > 0
        if start:
            self.client.request("start", container_id=cid)
        return cid

    def pump_until(self, done: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out; log so far: {self.log} events {self.events}"
            self.client.on_writable()
            self.client.on_readable()
            if not done():
                time.sleep(0.005)

    def exit_code(self, number: int, timeout: float = TIMEOUT) -> int:
        self.pump_until(lambda: any(e[0] == "exit" and e[1] == number for e in self.log), timeout)
        code: int = next(e[2] for e in self.log if e[0] == "exit" and e[1] == number)
        return code

    def output(self, number: int, stream: int) -> bytes:
        return b"".join(e[3] for e in self.log if e[0] == "data" and e[1] == number and e[2] == stream)

    def entries_of(self, number: int) -> list[tuple[Any, ...]]:
        return [e for e in self.log if e[1] == number]

    def send_raw(self, data: bytes) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(data)
        self.sock.setblocking(False)

    def control_reply(self, request_id: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next reply with this id that reached no pending request (raw requests' replies)."""

        def find() -> dict[str, Any] | None:
            for e in self.events:
                reply = e.get("reply")
                if isinstance(reply, dict) and reply.get("id") == request_id:
                    return reply
            return None

        self.pump_until(lambda: find() is not None, timeout)
        found = find()
        assert found is not None
        self.events.clear()
        return found

    # -- tear-down --------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            if not self.closed and self.proc.poll() is None:
                for cid in self.ids:
                    try:
                        self.client.request("delete", timeout=TIMEOUT, container_id=cid)
                    except AgentError:
                        pass
        finally:
            self.client.close()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            self.stderr.close()
            with open(self.stderr_path, errors="replace") as f:
                print(f"agent stderr:\n{f.read()}")  # shown by pytest when the test fails
            rt = Runtime(os.path.join(self.state_dir, "runtime"))
            for cid in self.ids:
                rt.delete(cid, force=True)  # a no-op unless the agent failed to
            for cid in self.ids:
                assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") == [], f"cgroup of {cid} left"
            assert rt.list_states() == []


@pytest.fixture
def agent(tmp_path: os.PathLike[str], busybox_rootfs: str) -> Iterator[AgentRun]:
    run = AgentRun(str(tmp_path), busybox_rootfs)
    try:
        yield run
    finally:
        run.close()
    assert run.proc.returncode == 0, f"agent exited {run.proc.returncode}"


def exit_is_last(run: AgentRun, number: int) -> None:
    """The exit event of `number` follows all of its output and its EOFs."""
    entries = run.entries_of(number)
    assert entries[-1][0] == "exit", entries
    assert all(e[0] != "exit" for e in entries[:-1]), entries


# --- tests ----------------------------------------------------------------------------------------
def test_hello_and_version_mismatch(agent: AgentRun) -> None:
    reply = agent.client.hello()
    assert reply["version"] == P.PROTOCOL_VERSION == 1
    assert reply["kernel"] == os.uname().release
    assert reply["pid"] == agent.proc.pid
    with pytest.raises(AgentError, match=r"speaks agent protocol version 99.*same cocon version") as info:
        agent.client.request("hello", version=99)
    assert info.value.exit_code == 125
    assert agent.client.hello()["ok"] is True


def test_output_streams_and_exit_after_output(agent: AgentRun) -> None:
    agent.run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert agent.exit_code(0) == 3
    assert agent.output(0, P.STDOUT) == b"out\n"
    assert agent.output(0, P.STDERR) == b"err\n"
    assert ("eof", 0, P.STDOUT) in agent.log and ("eof", 0, P.STDERR) in agent.log
    exit_is_last(agent, 0)


def test_large_output_arrives_whole_before_exit(agent: AgentRun) -> None:
    agent.run("sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; exit 4")
    assert agent.exit_code(0) == 4
    assert agent.output(0, P.STDOUT) == b"x" * 3_000_000
    exit_is_last(agent, 0)


def test_stdin_relay_until_eof(agent: AgentRun) -> None:
    agent.run("cat", stdin=True)
    agent.client.send_stdin(0, b"hello ")
    agent.client.send_stdin(0, b"agent\n" * 20000)
    agent.client.close_stdin(0)
    assert agent.exit_code(0) == 0
    assert agent.output(0, P.STDOUT) == b"hello " + b"agent\n" * 20000
    exit_is_last(agent, 0)


def test_no_stdin_means_dev_null(agent: AgentRun) -> None:
    agent.run("sh", "-c", "cat; echo done")
    assert agent.exit_code(0) == 0
    assert agent.output(0, P.STDOUT) == b"done\n"


def test_exec_and_signals(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    reply = agent.client.request(
        "exec", container_id=cid, process_number=1,
        process={"args": ["sh", "-c", "echo from-exec; echo e >&2; exit 5"], "cwd": "/", "env": ["PATH=/bin"]},
    )  # fmt: skip
    assert reply["pid"] > 0
    assert agent.exit_code(1) == 5
    assert agent.output(1, P.STDOUT) == b"from-exec\n"
    assert agent.output(1, P.STDERR) == b"e\n"
    exit_is_last(agent, 1)
    # SIGTERM to an exec'd sleep: killed by signal 15
    agent.client.request("exec", container_id=cid, process_number=2,
                         process={"args": ["sleep", "100"], "cwd": "/"})  # fmt: skip
    agent.client.request("signal", process_number=2, signal="SIGTERM")
    assert agent.exit_code(2) == 143
    # The init (pid 1 of its namespace ignores SIGTERM without a handler, as in Docker): SIGKILL
    agent.client.request("signal", process_number=0, signal=9)
    assert agent.exit_code(0) == 137
    with pytest.raises(AgentError, match="no running process number 0"):
        agent.client.request("signal", process_number=0, signal="TERM")


def test_exec_errors(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    with pytest.raises(AgentError, match="executable file not found") as info:
        agent.client.request("exec", container_id=cid, process_number=1,
                             process={"args": ["no-such-command"], "cwd": "/"})  # fmt: skip
    assert info.value.exit_code == 127
    with pytest.raises(AgentError, match="not an executable") as info:
        agent.client.request("exec", container_id=cid, process_number=1,
                             process={"args": ["/etc/passwd"], "cwd": "/"})  # fmt: skip
    assert info.value.exit_code == 126
    with pytest.raises(AgentError, match="process_number must be > 0"):
        agent.client.request(
            "exec", container_id=cid, process_number=0, process={"args": ["true"], "cwd": "/"}
        )
    with pytest.raises(AgentError, match="does not exist") as info:
        agent.client.request(
            "exec", container_id="nope", process_number=3, process={"args": ["true"], "cwd": "/"}
        )
    assert info.value.exit_code == 125
    with pytest.raises(AgentError, match="process number 0 is in use"):
        agent.client.request("create", container_id=unique_id(), config=agent.spec("true")[1])
    # the failed number is free again
    agent.client.request("exec", container_id=cid, process_number=1, process={"args": ["true"], "cwd": "/"})
    assert agent.exit_code(1) == 0
    assert not [e for e in agent.log if e[1] == 0]  # the init is untouched


def test_create_of_missing_program(agent: AgentRun) -> None:
    cid, config = agent.spec("no-such-program")
    with pytest.raises(AgentError, match="executable file not found") as info:
        agent.client.request("create", container_id=cid, config=config)
    assert info.value.exit_code == 127
    assert not os.path.exists(os.path.join(agent.state_dir, "bundles", cid))


def test_terminal_and_resize(agent: AgentRun) -> None:
    cid = agent.run("sh", terminal=True, stdin=True, start=False)
    agent.client.request("resize", process_number=0, rows=30, cols=90)
    agent.client.request("start", container_id=cid)
    agent.client.send_stdin(0, b"stty size; exit 7\n")
    assert agent.exit_code(0) == 7
    out = agent.output(0, P.STDOUT)
    assert b"30 90" in out
    assert agent.output(0, P.STDERR) == b""  # a terminal has one output stream
    exit_is_last(agent, 0)


def test_exec_terminal_and_resize(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    agent.client.request("exec", container_id=cid, process_number=4, terminal=True, stdin=True,
                         process={"args": ["sh", "-c", "stty size; read x; stty size; cat"], "cwd": "/",
                                  "env": ["PATH=/bin:/usr/bin"], "consoleSize": {"height": 40, "width": 123}})  # fmt: skip
    agent.pump_until(lambda: b"40 123" in agent.output(4, P.STDOUT))
    agent.client.request("resize", process_number=4, rows=50, cols=60)
    agent.client.send_stdin(4, b"go\n")
    agent.pump_until(lambda: b"50 60" in agent.output(4, P.STDOUT))
    agent.client.close_stdin(4)  # ^D on the terminal ends cat
    assert agent.exit_code(4) == 0
    exit_is_last(agent, 4)
    with pytest.raises(AgentError, match="has no terminal"):
        agent.client.request("resize", process_number=0, rows=10, cols=10)


def test_stats(agent: AgentRun) -> None:
    def limits(spec: Spec) -> None:
        assert spec.linux is not None
        spec.linux.resources = Resources(memory=Memory(limit=64 << 20), pids=Pids(limit=32))

    cid = agent.run("sh", "-c", "sleep 100 & sleep 100 & wait", edit=limits)
    agent.pump_until(lambda: (agent.client.request("stats", container_id=cid)["pids_current"] or 0) >= 3)
    stats = agent.client.request("stats", container_id=cid)
    assert stats["pids_current"] == 3
    assert stats["pids_max"] == 32
    assert stats["memory_max"] == 64 << 20
    assert 0 < stats["memory_current"] < 64 << 20
    assert isinstance(stats["cpu_usage_usec"], int) and stats["cpu_usage_usec"] > 0
    assert 0 < stats["mem_available"] < stats["mem_total"]
    with pytest.raises(AgentError, match="does not exist"):
        agent.client.request("stats", container_id="nope")
    top = agent.client.request("ps", container_id=cid)
    assert top["titles"][:3] == ["UID", "PID", "PPID"]
    commands = [row[-1] for row in top["processes"]]
    assert commands.count("sleep 100") == 2 and any(c.startswith("sh -c") for c in commands), top


def test_bad_frames_and_requests_get_errors(agent: AgentRun) -> None:
    c = agent.client
    # frames the agent cannot use: error events, the agent goes on
    agent.send_raw(P.HEADER.pack(3, 9, 0, 0) + b"abc")  # unknown kind
    agent.send_raw(P.HEADER.pack(0, P.EOF, 7, 1))  # bad stream
    agent.pump_until(lambda: len(agent.events) >= 2)
    assert "unknown kind 9" in agent.events[0]["error"]
    assert "stream 7" in agent.events[1]["error"]
    agent.events.clear()
    # control frames that are not requests
    agent.send_raw(P.HEADER.pack(5, P.CONTROL, 0, 0) + b"{nope")
    assert "not valid JSON" in agent.control_reply(None)["error"]
    agent.send_raw(P.HEADER.pack(2, P.CONTROL, 0, 0) + b"[]")
    assert "not an object" in agent.control_reply(None)["error"]
    agent.send_raw(P.encode_control({"op": "hello", "version": 1}))
    assert 'integer "id"' in agent.control_reply(None)["error"]
    agent.send_raw(P.encode_control({"id": 9999, "op": "explode"}))
    reply = agent.control_reply(9999)
    assert reply["ok"] is False and "unknown op 'explode'" in reply["error"] and reply["exit_code"] == 125
    # wrong argument types
    for op, args, message in [
        ("hello", {}, "'version' is missing"),
        ("hello", {"version": "1"}, "'version' must be int"),
        ("create", {"container_id": "x", "config": "{}"}, "'config' must be dict"),
        ("create", {"container_id": "../x", "config": {}}, "x"),
        ("create", {"container_id": "x", "config": {"process": {}}}, "root.path must be an absolute path"),
        ("signal", {"process_number": True, "signal": 9}, "must be an integer, not a boolean"),
        ("signal", {"process_number": 5, "signal": "SIGNOPE"}, "unknown signal"),
        ("resize", {"process_number": 0, "rows": 0, "cols": 10}, "out of range"),
        ("mount", {"source": "x", "target": "relative", "fstype": "tmpfs"}, "absolute path"),
        ("reseed", {"entropy": "***"}, "base64"),
        ("set_clock", {"unix_ns": -5}, "out of range"),
        ("set_hostname", {"hostname": "has space"}, "not a valid host name"),
        ("start", {"container_id": "nope"}, "does not exist"),
    ]:
        with pytest.raises(AgentError, match=message):
            c.request(op, **cast("dict[str, Any]", args))
    # an oversized announced length breaks the stream; the agent resets its decoder and still answers
    agent.send_raw(P.HEADER.pack(P.MAX_PAYLOAD + 1, P.DATA, 1, 0))
    agent.pump_until(lambda: any("more than the limit" in e.get("error", "") for e in agent.events))
    assert c.hello()["version"] == 1


def test_delete_running_container(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    state_dir = os.path.join(agent.state_dir, "runtime", cid)
    bundle = os.path.join(agent.state_dir, "bundles", cid)
    assert os.path.isdir(state_dir) and os.path.isfile(os.path.join(bundle, "config.json"))
    assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") != []
    agent.client.request("delete", container_id=cid)
    assert agent.exit_code(0) == 137
    assert not os.path.exists(state_dir) and not os.path.exists(bundle)
    assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") == []
    agent.client.request("delete", container_id=cid)  # deleting again is fine


def test_mount_hostname_reseed_clock(agent: AgentRun) -> None:
    target = os.path.join(agent.tmp, "mnt", "deep")
    agent.client.request(
        "mount", source="cocon-test", target=target, fstype="tmpfs", options="size=1m,mode=0700"
    )
    with open(f"/proc/{agent.proc.pid}/mountinfo") as f:
        lines = [line for line in f if f" {target} " in line]
    assert lines and "tmpfs" in lines[0] and "size=1024k" in lines[0]
    with open("/proc/self/mountinfo") as f:
        assert f" {target} " not in f.read()  # the agent's own mount namespace in this test
    with pytest.raises(AgentError, match=r"mount cocon-test .nofs. on .* failed"):
        agent.client.request("mount", source="cocon-test", target=target, fstype="nofs", options="")

    agent.client.request("set_hostname", hostname="guest-7")
    out = subprocess.run(
        ["nsenter", "-t", str(agent.proc.pid), "-u", "hostname"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "guest-7"
    assert socket.gethostname() != "guest-7"

    assert agent.client.request("reseed", entropy=base64.b64encode(os.urandom(64)).decode())["bytes"] == 64
    with pytest.raises(AgentError, match="16 to 4096 bytes"):
        agent.client.request("reseed", entropy=base64.b64encode(b"short").decode())
    # set_clock is not called for real here: it would set the host's clock (CLOCK_REALTIME has no
    # namespace); only its validation is checked.
    with pytest.raises(AgentError, match="'unix_ns' must be int"):
        agent.client.request("set_clock", unix_ns="now")


def test_async_requests_and_events_interleave(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    replies: list[dict[str, Any]] = []
    for n in (1, 2, 3):
        agent.client.request_async("exec", replies.append, container_id=cid, process_number=n,
                                   process={"args": ["sh", "-c", f"echo {n}; exit {n}"], "cwd": "/"})  # fmt: skip
    agent.client.request_async("exec", replies.append, container_id=cid, process_number=4,
                               process={"args": ["missing"], "cwd": "/"})  # fmt: skip
    agent.pump_until(lambda: len(replies) == 4)
    assert [r["ok"] for r in replies] == [True, True, True, False]
    assert replies[3]["exit_code"] == 127
    for n in (1, 2, 3):
        assert agent.exit_code(n) == n
        assert agent.output(n, P.STDOUT) == f"{n}\n".encode()
        exit_is_last(agent, n)


def test_shutdown_deletes_containers_and_ends_agent(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    assert agent.client.request("shutdown")["ok"] is True
    assert agent.proc.wait(TIMEOUT) == 0
    agent.pump_until(lambda: agent.closed)
    assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") == []
    assert not os.path.exists(os.path.join(agent.state_dir, "runtime", cid))
    with pytest.raises(AgentError, match="closed"):
        agent.client.hello()


def test_closing_the_channel_ends_agent_and_containers(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    agent.client.close()
    assert agent.proc.wait(TIMEOUT) == 0
    assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") == []


def test_sigterm_to_agent_cleans_up(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(TIMEOUT) == 0
    assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") == []


def test_exit_when_a_background_child_keeps_the_pipes(agent: AgentRun) -> None:
    cid = agent.run("sleep", "100")
    t0 = time.monotonic()
    agent.client.request("exec", container_id=cid, process_number=1,
                         process={"args": ["sh", "-c", "sleep 30 & echo hi; exit 2"], "cwd": "/"})  # fmt: skip
    assert agent.exit_code(1) == 2
    assert 1.5 < time.monotonic() - t0 < 10  # after the agent's grace period (2 s), not the sleep's 30
    assert agent.output(1, P.STDOUT) == b"hi\n"
    exit_is_last(agent, 1)


@pytest.fixture
def pid1_agent(tmp_path: os.PathLike[str], busybox_rootfs: str) -> Iterator[AgentRun]:
    run = AgentRun(str(tmp_path), busybox_rootfs, pid1=True)
    try:
        yield run
    finally:
        run.close()


def test_agent_as_pid1_runs_containers_and_powers_off(pid1_agent: AgentRun) -> None:
    agent = pid1_agent
    assert agent.client.hello()["pid"] == 1
    cid = agent.run("sh", "-c", "echo as-pid1; sleep 100")
    agent.client.request("exec", container_id=cid, process_number=1,
                         process={"args": ["sh", "-c", "exit 6"], "cwd": "/"})  # fmt: skip
    assert agent.exit_code(1) == 6
    agent.pump_until(lambda: agent.output(0, P.STDOUT) == b"as-pid1\n")
    assert agent.client.request("shutdown")["ok"] is True
    # reboot(RB_POWER_OFF) in a pid namespace ends its init with SIGINT, which unshare passes on
    assert agent.proc.wait(TIMEOUT) == -signal.SIGINT
    assert leftover_cgroup_dirs(f"{TEST_CGROUP_PARENT}/{cid}") == []
    with open(os.path.join(agent.tmp, "agent.stderr")) as f:
        assert "powering off" in f.read()


@pytest.fixture
def net_agent(tmp_path: os.PathLike[str], busybox_rootfs: str) -> Iterator[AgentRun]:
    run = AgentRun(str(tmp_path), busybox_rootfs, net=True)
    try:
        yield run
    finally:
        run.close()


def test_network_configures_the_nic_by_mac(net_agent: AgentRun) -> None:
    agent = net_agent

    def ip(*args: str) -> Any:
        out = subprocess.run(["nsenter", "-t", str(agent.proc.pid), "-n", "ip", *args],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return json.loads(out) if "-j" in args else out

    ip("link", "add", "eth0", "address", "02:42:0a:4d:00:02", "type", "veth", "peer", "name", "peer0")
    ip("link", "set", "peer0", "up")
    reply = agent.client.request(
        "network", mac="02:42:0A:4D:00:02", mtu=1400, addresses=["10.77.0.2/24", "fd77::2/64"],
        routes=[{"destination": "default", "gateway": "10.77.0.1"},
                {"destination": "default", "gateway": "fd77::1"}],
    )  # fmt: skip
    assert reply["interface"] == "eth0"
    (link,) = ip("-j", "addr", "show", "eth0")
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    assert {(a["local"], a["prefixlen"]) for a in link["addr_info"] if a.get("scope") == "global"} == {
        ("10.77.0.2", 24),
        ("fd77::2", 64),
    }
    assert [r["gateway"] for r in ip("-4", "-j", "route", "show", "default")] == ["10.77.0.1"]
    assert [r["gateway"] for r in ip("-6", "-j", "route", "show", "default")] == ["fd77::1"]
    assert "UP" in ip("-j", "link", "show", "lo")[0]["flags"]
    # again: nothing changes, no error (a restored VM may repeat it)
    agent.client.request("network", mac="02:42:0a:4d:00:02", mtu=1400, addresses=["10.77.0.2/24"],
                         routes=[{"destination": "default", "gateway": "10.77.0.1"}])  # fmt: skip
    with pytest.raises(AgentError, match="no interface with MAC 02:00:00:00:00:09"):
        agent.client.request("network", mac="02:00:00:00:00:09", addresses=[], routes=[])
    with pytest.raises(AgentError, match="not an IP address"):
        agent.client.request("network", mac="02:42:0a:4d:00:02", addresses=["10.77.0.300/24"], routes=[])
    with pytest.raises(AgentError, match=r"cannot add route via 10\.99\.0\.1: Network is unreachable"):
        agent.client.request("network", mac="02:42:0a:4d:00:02",
                             routes=[{"destination": "default", "gateway": "10.99.0.1"}])  # fmt: skip
