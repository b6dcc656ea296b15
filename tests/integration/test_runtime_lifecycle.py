"""cocon-runtime's lifecycle (create, start, state, kill, pause, exec, delete), hooks, terminals and
bad input, each checked the way a user or podman would."""

from __future__ import annotations

import array
import json
import os
import socket
import threading
import time

import pytest

from cocon.oci.runtime_spec import Hook, Hooks, Spec
from runtime_helpers import BundleFactory, RuntimeCLI, host_mounts_mentioning, leftover_cgroup_dirs


def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_create_start_kill_delete(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    b = bundle("sleep", "1000")
    pid_file = os.path.join(str(tmp_path), "pid")
    runtime("create", "--bundle", b.path, "--pid-file", pid_file, b.id)
    st = runtime.state(b.id)
    assert st["status"] == "created"
    assert st["id"] == b.id and st["bundle"] == b.path
    with open(pid_file) as f:
        assert int(f.read()) == st["pid"]
    # the init waits for start: it has not run `sleep` yet
    with open(f"/proc/{st['pid']}/cmdline", "rb") as f:
        assert b"sleep" not in f.read()
    runtime("start", b.id)
    st = runtime.state(b.id)
    assert st["status"] == "running"
    wait_for(lambda: b"sleep" in open(f"/proc/{st['pid']}/cmdline", "rb").read())
    listing = json.loads(runtime("list", "--format", "json").stdout)
    assert [c["id"] for c in listing] == [b.id]
    assert b.id in runtime("list").stdout
    runtime("kill", b.id, "KILL")
    wait_for(lambda: runtime.state(b.id)["status"] == "stopped")
    assert runtime.state(b.id)["pid"] == 0
    runtime("delete", b.id)
    assert runtime("state", b.id, check=False).returncode == 1
    assert leftover_cgroup_dirs(b.cgroups_path) == []


def test_wrong_transitions_are_refused(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    b = bundle("sleep", "1000")
    runtime("create", "--bundle", b.path, b.id)
    again = runtime("create", "--bundle", b.path, b.id, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert runtime("resume", b.id, check=False).returncode == 1
    runtime("start", b.id)
    twice = runtime("start", b.id, check=False)
    assert twice.returncode == 1 and "running" in twice.stderr
    busy = runtime("delete", b.id, check=False)
    assert busy.returncode == 1 and "--force" in busy.stderr
    assert runtime.state(b.id)["status"] == "running"  # nothing changed
    runtime("delete", "--force", b.id)
    missing = runtime("state", b.id, check=False)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert runtime("kill", "no-such-container", check=False).returncode == 1
    assert runtime("delete", "--force", "no-such-container").returncode == 0


def test_pause_resume_and_ps(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    b = bundle("sh", "-c", "sleep 1000 & sleep 1000 & wait")
    runtime("run", "--detach", "--bundle", b.path, b.id)
    wait_for(lambda: len(json.loads(runtime("ps", "--format", "json", b.id).stdout)) == 3)
    pids = json.loads(runtime("ps", "--format", "json", b.id).stdout)
    table = runtime("ps", b.id).stdout
    assert "PID" in table.splitlines()[0] and "sleep 1000" in table
    runtime("pause", b.id)
    assert runtime.state(b.id)["status"] == "paused"
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            state_line = next(line for line in f if line.startswith("State:"))
        assert "(stopped)" in state_line or "D" in state_line.split()[1] or "S" in state_line.split()[1]
    runtime("resume", b.id)
    assert runtime.state(b.id)["status"] == "running"
    runtime("kill", "--all", b.id, "TERM")
    wait_for(lambda: runtime.state(b.id)["status"] == "stopped")
    runtime("delete", b.id)


def test_exec_joins_the_container(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    b = bundle("sleep", "1000")
    runtime("run", "--detach", "--bundle", b.path, b.id)
    out = runtime("exec", "--env", "EXTRA=1", "--user", "1000:1000", "--cwd", "/tmp", b.id,
                  "sh", "-c", "echo $$ $EXTRA $(id -u) $(pwd); cat /proc/1/cmdline | tr '\\0' ' '").stdout  # fmt: skip
    first, second = out.splitlines()[:2]
    pid, extra, uid, cwd = first.split()
    assert int(pid) > 1 and extra == "1" and uid == "1000" and cwd == "/tmp"
    assert second.strip() == "sleep 1000"
    failing = runtime("exec", b.id, "sh", "-c", "exit 3", check=False)
    assert failing.returncode == 3
    missing = runtime("exec", b.id, "no-such-program", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    # a process.json
    proc_file = os.path.join(b.path, "process.json")
    with open(proc_file, "w") as f:
        json.dump(
            {"args": ["sh", "-c", "echo from-json; exit 4"], "cwd": "/", "user": {"uid": 0, "gid": 0}}, f
        )
    res = runtime("exec", "--process", proc_file, b.id, check=False)
    assert res.returncode == 4 and "from-json" in res.stdout
    # exec'd processes are in the container's cgroup
    detached_pid = os.path.join(b.path, "exec.pid")
    runtime("exec", "--detach", "--pid-file", detached_pid, b.id, "sleep", "999")
    with open(detached_pid) as f:
        epid = int(f.read())
    assert epid in json.loads(runtime("ps", "--format", "json", b.id).stdout)


def hook_spec(record_dir: str) -> dict[str, list[Hook]]:
    hooks = {}
    for kind in (
        "prestart",
        "create_runtime",
        "create_container",
        "start_container",
        "poststart",
        "poststop",
    ):
        script = f"cat > {record_dir}/{kind}.json; echo $0 > {record_dir}/{kind}.arg0"
        # startContainer runs the container's busybox sh, which needs argv[0] to name the applet
        arg0 = "sh" if kind == "start_container" else "hook-" + kind
        hooks[kind] = [Hook(path="/bin/sh", args=[arg0, "-c", script], env=["HOOK=1"])]
    return hooks


def test_hooks_receive_the_state(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    record = os.path.join(str(tmp_path), "hooks")
    os.makedirs(record)
    hooks = hook_spec(record)
    # startContainer hooks run inside the container: give it the record directory at the same path
    from cocon.oci.runtime_spec import Mount

    def edit(spec: Spec) -> None:
        spec.hooks = Hooks(**hooks)
        spec.mounts = [
            *(spec.mounts or []),
            Mount(destination=record, type="bind", source=record, options=["rbind"]),
        ]
        # the hook runs /bin/sh -c inside the container with the container's restrictions

    b = bundle("true", edit=edit)
    runtime("create", "--bundle", b.path, b.id)
    for kind in ("prestart", "create_runtime", "create_container"):
        with open(os.path.join(record, f"{kind}.json")) as f:
            st = json.load(f)
        assert st["id"] == b.id and st["status"] == "creating" and st["pid"] > 0 and st["bundle"] == b.path
    with open(os.path.join(record, "prestart.arg0")) as f:
        assert f.read().strip() == "hook-prestart"
    runtime("start", b.id)
    # startContainer runs in the container before its process; poststart in the runtime after `start`
    wait_for(lambda: runtime.state(b.id)["status"] == "stopped")
    with open(os.path.join(record, "start_container.json")) as f:
        assert json.load(f)["status"] == "created"
    with open(os.path.join(record, "poststart.json")) as f:
        assert json.load(f)["status"] == "running"
    runtime("delete", b.id)
    with open(os.path.join(record, "poststop.json")) as f:
        assert json.load(f)["status"] == "stopped"


def test_failing_hook_leaves_nothing(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        spec.hooks = Hooks(
            create_runtime=[Hook(path="/bin/sh", args=["sh", "-c", "echo broken >&2; exit 3"])]
        )

    b = bundle("true", edit=edit)
    res = runtime("create", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1
    assert "createRuntime" in res.stderr and "exit status 3" in res.stderr and "broken" in res.stderr
    assert not os.path.exists(os.path.join(runtime.root, b.id))
    assert leftover_cgroup_dirs(b.cgroups_path) == []


def test_hook_timeout(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        spec.hooks = Hooks(prestart=[Hook(path="/bin/sleep", args=["sleep", "30"], timeout=1)])

    b = bundle("true", edit=edit)
    start = time.monotonic()
    res = runtime("create", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1 and "timed out" in res.stderr
    assert time.monotonic() - start < 15


def receive_pty(sock_path: str, result: dict[str, object]) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            fds = array.array("i")
            msg, anc, _, _ = conn.recvmsg(1024, socket.CMSG_SPACE(fds.itemsize))
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            result["name"] = msg.decode()
            result["fd"] = fds[0]
        server.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def read_until(fd: int, needle: bytes, timeout: float = 10.0) -> bytes:
    import select

    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_console_socket_gets_a_working_pty(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    sock_path = os.path.join(str(tmp_path), "console.sock")
    result: dict[str, object] = {}
    t = receive_pty(sock_path, result)
    b = bundle("sh", terminal=True)
    runtime("create", "--bundle", b.path, "--console-socket", sock_path, b.id)
    t.join(5)
    master = result["fd"]
    assert isinstance(master, int)
    try:
        runtime("start", b.id)
        os.write(master, b"tty; echo marker-$((6*7))\n")
        out = read_until(master, b"marker-42")
        assert b"marker-42" in out
        assert b"/dev/pts/0" in out
        os.write(master, b"exit 5\n")
        wait_for(lambda: runtime.state(b.id)["status"] == "stopped")
    finally:
        os.close(master)


def test_exec_tty_through_console_socket(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    b = bundle("sleep", "1000")
    runtime("run", "--detach", "--bundle", b.path, b.id)
    sock_path = os.path.join(str(tmp_path), "exec-console.sock")
    result: dict[str, object] = {}
    t = receive_pty(sock_path, result)
    runtime("exec", "--tty", "--detach", "--console-socket", sock_path, b.id, "sh")
    t.join(5)
    master = result["fd"]
    assert isinstance(master, int)
    try:
        os.write(master, b"test -t 0 && echo is-a-tty-$((1+1))\n")
        assert b"is-a-tty-2" in read_until(master, b"is-a-tty-2")
        os.write(master, b"exit\n")
    finally:
        os.close(master)


# --- bad input: a clear message, exit 1, and nothing left behind ------------------------------------
def assert_nothing_left(runtime: RuntimeCLI, cid: str, cgroups_path: str) -> None:
    assert not os.path.exists(os.path.join(runtime.root, cid))
    assert leftover_cgroup_dirs(cgroups_path) == []
    assert host_mounts_mentioning(cid) == []


@pytest.mark.parametrize(
    "config, message",
    [
        (b"{not json", "not valid JSON"),
        (
            b'{"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"cwd": "/", "args": "sh"}}',
            "$.process.args",
        ),
        (b'{"ociVersion": "1.0.2", "process": {"cwd": "/", "args": ["sh"]}}', "root.path"),
        (
            b'{"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"cwd": "/", "args": []}}',
            "process.args",
        ),
        (
            b'{"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["sh"]}}',
            "field `cwd` - at `$.process`",
        ),
    ],
)
def test_malformed_config(runtime: RuntimeCLI, bundle: BundleFactory, config: bytes, message: str) -> None:
    b = bundle("true")
    with open(os.path.join(b.path, "config.json"), "wb") as f:
        f.write(config)
    res = runtime("create", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1
    assert message in res.stderr
    assert_nothing_left(runtime, b.id, b.cgroups_path)


def test_missing_rootfs(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.root is not None
        spec.root.path = "/nonexistent/rootfs"

    b = bundle("true", edit=edit)
    res = runtime("run", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1 and "root.path" in res.stderr and "does not exist" in res.stderr
    assert_nothing_left(runtime, b.id, b.cgroups_path)


def test_rlimit_above_hard_limit(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    import resource

    from cocon.oci.runtime_spec import Rlimit

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def edit(spec: Spec) -> None:
        assert spec.process is not None
        spec.process.rlimits = [Rlimit(type="RLIMIT_NOFILE", soft=1024, hard=hard * 4)]

    b = bundle("true", edit=edit)
    res = runtime("create", "--bundle", b.path, b.id, check=False)
    with open("/proc/self/status") as f:
        can_raise = any(line.startswith("CapEff:") and int(line.split()[1], 16) >> 24 & 1 for line in f)
    if can_raise:  # hosts that grant CAP_SYS_RESOURCE may raise it: then it must simply work
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 1
    assert "process.rlimits[0]" in res.stderr and "RLIMIT_NOFILE" in res.stderr
    assert_nothing_left(runtime, b.id, b.cgroups_path)


def test_unknown_capability_and_invalid_id(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    from cocon.oci.runtime_spec import Capabilities

    def edit(spec: Spec) -> None:
        assert spec.process is not None
        spec.process.capabilities = Capabilities(bounding=["CAP_NOT_A_THING"])

    b = bundle("true", edit=edit)
    res = runtime("run", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1 and "CAP_NOT_A_THING" in res.stderr
    assert_nothing_left(runtime, b.id, b.cgroups_path)
    bad = runtime("create", "--bundle", b.path, "../escape", check=False)
    assert bad.returncode == 1 and "invalid container id" in bad.stderr


def test_missing_executable_is_reported_at_create(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    b = bundle("/no/such/binary")
    res = runtime("create", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1 and "/no/such/binary" in res.stderr
    assert_nothing_left(runtime, b.id, b.cgroups_path)


def test_log_file_in_json(runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]) -> None:
    log = os.path.join(str(tmp_path), "runtime.log")
    res = runtime("--log", log, "--log-format", "json", "start", "no-such-container", check=False)
    assert res.returncode == 1
    with open(log) as f:
        entry = json.loads(f.readline())
    assert entry["level"] == "error" and "does not exist" in entry["msg"] and entry["time"]


def test_spec_and_features(runtime: RuntimeCLI, tmp_path: os.PathLike[str]) -> None:
    import shutil
    import subprocess

    bundle_dir = os.path.join(str(tmp_path), "fresh")
    os.makedirs(bundle_dir)
    runtime("spec", "--bundle", bundle_dir)
    with open(os.path.join(bundle_dir, "config.json")) as f:
        spec = json.load(f)
    assert spec["process"]["noNewPrivileges"] is True and spec["linux"]["seccomp"]["defaultAction"]
    assert spec["root"] == {"path": "rootfs", "readonly": True}
    again = runtime("spec", "--bundle", bundle_dir, check=False)
    assert again.returncode == 1 and "exists already" in again.stderr
    # runc reads the starter config too: its `spec` validation accepts it
    runc = shutil.which("runc")
    assert runc is not None
    os.makedirs(os.path.join(bundle_dir, "rootfs"))
    check = subprocess.run([runc, "--root", os.path.join(str(tmp_path), "runc"), "create", "--bundle", bundle_dir,
                            "probe"], capture_output=True, text=True, check=False)  # fmt: skip
    # the rootfs is empty, so runc gets as far as exec'ing `sh`: the config itself was accepted
    assert "config" not in check.stderr.lower() or "sh" in check.stderr, check.stderr
    subprocess.run([runc, "--root", os.path.join(str(tmp_path), "runc"), "delete", "--force", "probe"],
                   capture_output=True, check=False)  # fmt: skip
    features = json.loads(runtime("features").stdout)
    assert features["ociVersionMax"] == "1.2.0"
    assert "CAP_SYS_ADMIN" in features["linux"]["capabilities"]
    assert features["linux"]["cgroup"]["v2"] is True
