"""cocon-runtime against real namespaces, mounts and cgroups: what a process sees from inside."""

from __future__ import annotations

import os
import re

from cocon.oci.runtime_spec import Capabilities, Device, IDMapping, Mount, Namespace, Rlimit, Spec, TimeOffset
from runtime_helpers import BundleFactory, RuntimeCLI


def run_in(runtime: RuntimeCLI, bundle: BundleFactory, script: str, **kw: object) -> tuple[int, str, str]:
    b = bundle("sh", "-c", script, **kw)
    proc = runtime("run", "--bundle", b.path, b.id, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def status_field(text: str, name: str) -> str:
    m = re.search(rf"^{name}:\s*(\S+)", text, re.M)
    assert m, f"{name} not in {text!r}"
    return m.group(1)


def test_exit_status_is_returned(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    code, _, _ = run_in(runtime, bundle, "exit 7")
    assert code == 7


def test_killed_by_signal_gives_128_plus_signal(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    import subprocess
    import time

    from runtime_helpers import COCON_RUNTIME

    b = bundle("sleep", "1000")
    fg = subprocess.Popen([COCON_RUNTIME, "--root", runtime.root, "run", "--bundle", b.path, b.id])
    try:
        deadline = time.monotonic() + 10
        while (
            runtime("state", b.id, check=False).returncode != 0 or runtime.state(b.id)["status"] != "running"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        runtime("kill", b.id, "KILL")
        assert fg.wait(10) == 128 + 9
    finally:
        fg.kill()
        fg.wait()


def test_pid_1_hostname_env_cwd(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.process is not None
        spec.hostname = "inside"
        spec.process.env = [*(spec.process.env or []), "GREETING=hello world"]
        spec.process.cwd = "/tmp"

    code, out, err = run_in(runtime, bundle, 'echo "$$ $(hostname) $GREETING $(pwd)"', edit=edit)
    assert code == 0, err
    assert out.strip() == "1 inside hello world /tmp"


def test_mount_table_and_readonly_root(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    code, out, err = run_in(
        runtime, bundle, "cat /proc/self/mounts; touch /newfile 2>&1 || echo ROOT-IS-RO; ls /proc/1/root/"
    )
    assert code == 0, err
    mounts = {f[1]: f for f in (line.split() for line in out.splitlines()) if len(f) == 6}
    assert mounts["/"][3].startswith("ro"), out
    for path in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"):
        assert path in mounts, f"{path} not mounted: {out}"
    assert "ROOT-IS-RO" in out
    # the host's mounts are not visible
    assert "/boot" not in mounts and "/work" not in mounts


def test_capabilities_seccomp_and_no_new_privs(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    code, out, err = run_in(runtime, bundle, "cat /proc/self/status")
    assert code == 0, err
    # CAP_AUDIT_WRITE (29), CAP_KILL (5), CAP_NET_BIND_SERVICE (10): runc's spec set
    expected = (1 << 29) | (1 << 5) | (1 << 10)
    for field_name in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status_field(out, field_name), 16) == expected, field_name
    assert int(status_field(out, "CapInh"), 16) == 0
    assert status_field(out, "Seccomp") == "2"
    assert status_field(out, "NoNewPrivs") == "1"


def test_seccomp_blocks_what_docker_blocks(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    # creating a user namespace needs no capability: only the seccomp profile stands in the way
    probe = "unshare -U true 2>&1 && echo ALLOWED || echo REFUSED"
    code, out, err = run_in(runtime, bundle, probe)
    assert code == 0, err
    assert "REFUSED" in out

    def unconfined(spec: Spec) -> None:
        assert spec.linux is not None
        spec.linux.seccomp = None

    code, out, err = run_in(runtime, bundle, probe, edit=unconfined)
    assert code == 0, err
    assert "ALLOWED" in out


def test_masked_and_readonly_paths(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    code, out, err = run_in(
        runtime,
        bundle,
        "wc -c < /proc/keys; ls /sys/firmware | wc -l; echo 1 > /proc/sys/kernel/domainname 2>&1 || echo RO-SYS",
    )
    assert code == 0, err
    lines = out.split()
    assert os.path.getsize("/proc/keys") > 0 or open("/proc/keys").read()  # the host's is not empty
    assert lines[0] == "0" and lines[1] == "0"
    assert "RO-SYS" in out


def test_user_and_groups(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.process is not None
        spec.process.user.uid = 1000
        spec.process.user.gid = 1001
        spec.process.user.additional_gids = [1002, 1003]
        spec.process.user.umask = 0o077

    code, out, err = run_in(runtime, bundle, "id -u; id -g; id -G; umask", edit=edit)
    assert code == 0, err
    uid, gid, groups, umask = out.split("\n")[:4]
    assert (uid, gid) == ("1000", "1001")
    assert set(groups.split()) >= {"1002", "1003"}
    assert umask == "0077"


def test_rlimits_applied(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.process is not None
        spec.process.rlimits = [Rlimit(type="RLIMIT_NOFILE", soft=512, hard=1024),
                                Rlimit(type="RLIMIT_CORE", soft=0, hard=0)]  # fmt: skip

    code, out, err = run_in(runtime, bundle, "ulimit -n; ulimit -Hn; ulimit -c", edit=edit)
    assert code == 0, err
    assert out.split() == ["512", "1024", "0"]


def test_memory_limit_ends_in_oom_kill(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        from cocon.oci.runtime_spec import Memory, Resources

        assert spec.linux is not None
        spec.linux.resources = Resources(memory=Memory(limit=32 * 1024 * 1024, swap=32 * 1024 * 1024))

    # a shell variable that grows past the limit: the kernel's OOM killer ends the container
    code, _, _ = run_in(
        runtime, bundle, "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived", edit=edit
    )
    assert code == 137


def test_pids_limit_makes_fork_fail(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        from cocon.oci.runtime_spec import Pids, Resources

        assert spec.linux is not None
        spec.linux.resources = Resources(pids=Pids(limit=5))

    _, out, _ = run_in(
        runtime,
        bundle,
        "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done 2>&1; echo started; kill $(jobs -p)",
        edit=edit,
    )
    assert "can't fork" in out.lower() or "resource temporarily unavailable" in out.lower(), out


def test_cgroup_limits_visible_inside(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        from cocon.oci.runtime_spec import CPU, Memory, Pids, Resources

        assert spec.linux is not None
        spec.linux.resources = Resources(memory=Memory(limit=64 * 1024 * 1024), pids=Pids(limit=42),
                                         cpu=CPU(quota=50000, period=100000))  # fmt: skip

    script = (
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/pids/pids.max "
        "/sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max"
    )
    code, out, err = run_in(runtime, bundle, script, edit=edit)
    assert code == 0, err
    assert out.split()[:3] == [str(64 * 1024 * 1024), "42", "50000"]


def test_user_namespace_with_mappings(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    import shutil
    import tempfile

    from cocon.images.busybox import make_rootfs

    # the container's root is host uid 100000: its rootfs must be reachable and owned by it,
    # as podman arranges for user namespaces
    base = tempfile.mkdtemp(prefix="cocon-userns-")
    os.chmod(base, 0o755)
    rootfs = os.path.join(base, "rootfs")
    make_rootfs(rootfs)
    for d, dirs, files in os.walk(rootfs):
        for name in [d, *(os.path.join(d, f) for f in files + dirs)]:
            os.lchown(name, 100000, 100000)

    def edit(spec: Spec) -> None:
        assert spec.linux is not None and spec.linux.namespaces is not None and spec.root is not None
        spec.root.path = rootfs
        spec.linux.namespaces.append(Namespace(type="user"))
        spec.linux.uid_mappings = [IDMapping(container_id=0, host_id=100000, size=65536)]
        spec.linux.gid_mappings = [IDMapping(container_id=0, host_id=100000, size=65536)]
        # sysfs cannot be mounted from a user namespace that does not own the network namespace
        spec.mounts = [m for m in spec.mounts or [] if m.destination != "/sys/fs/cgroup"]

    try:
        code, out, err = run_in(runtime, bundle, "id -u; cat /proc/self/uid_map", edit=edit)
    finally:
        shutil.rmtree(base)
    assert code == 0, err
    lines = out.split("\n")
    assert lines[0] == "0"
    assert lines[1].split() == ["0", "100000", "65536"]


def test_join_existing_network_namespace(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    import subprocess
    import uuid

    name = f"cocon-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        path = f"/run/netns/{name}"

        def edit(spec: Spec) -> None:
            assert spec.linux is not None and spec.linux.namespaces is not None
            spec.linux.namespaces = [n for n in spec.linux.namespaces if n.type != "network"]
            spec.linux.namespaces.append(Namespace(type="network", path=path))

        code, out, err = run_in(runtime, bundle, "stat -L -c %i /proc/self/ns/net", edit=edit)
        assert code == 0, err
        assert int(out) == os.stat(path).st_ino
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_time_namespace_offsets(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.linux is not None and spec.linux.namespaces is not None
        spec.linux.namespaces.append(Namespace(type="time"))
        spec.linux.time_offsets = {
            "boottime": TimeOffset(secs=10 * 86400),
            "monotonic": TimeOffset(secs=86400),
        }

    code, out, err = run_in(runtime, bundle, "cut -d. -f1 /proc/uptime", edit=edit)
    assert code == 0, err
    assert int(out.strip()) >= 10 * 86400


def test_sysctl_in_own_network_namespace(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.linux is not None
        spec.linux.sysctl = {"net.ipv4.ip_forward": "1", "kernel.shmmax": "123456789"}

    code, out, err = run_in(
        runtime, bundle, "cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/shmmax", edit=edit
    )
    assert code == 0, err
    assert out.split() == ["1", "123456789"]
    with open("/proc/sys/kernel/shmmax") as f:
        assert f.read().strip() != "123456789"


def test_devices_from_config(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.linux is not None
        spec.linux.devices = [
            Device(type="c", path="/dev/mynull", major=1, minor=3, file_mode=0o600, uid=0, gid=0)
        ]

    code, out, err = run_in(
        runtime, bundle, "stat -c '%t:%T %a %F' /dev/mynull; echo x > /dev/mynull && echo W", edit=edit
    )
    assert code == 0, err
    assert out.split("\n")[0] == "1:3 600 character special file"
    assert "W" in out


def test_device_cgroup_allows_only_default_devices(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.process is not None and spec.process.capabilities is not None
        caps = ["CAP_MKNOD"]
        spec.process.capabilities = Capabilities(bounding=caps, effective=caps, permitted=caps)

    script = (
        "mknod /dev/disk b 8 0 2>&1 || echo DISK-DENIED; "
        "mknod /dev/null2 c 1 3 && echo NULL-ALLOWED; head -c 3 /dev/zero | wc -c"
    )
    code, out, err = run_in(runtime, bundle, script, edit=edit)
    assert code == 0, err
    assert "DISK-DENIED" in out and "NULL-ALLOWED" in out
    assert out.split()[-1] == "3"


def test_default_devices_only(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    code, out, err = run_in(runtime, bundle, "ls /dev")
    assert code == 0, err
    names = set(out.split())
    assert {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd"} <= names
    assert "sda" not in names and "vda" not in names and "kmsg" not in names


def test_bind_mounts_ro_and_rw(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    host = os.path.join(str(tmp_path), "shared")
    os.makedirs(host)
    with open(os.path.join(host, "hello"), "w") as f:
        f.write("from host\n")

    def edit(spec: Spec) -> None:
        spec.mounts = [*(spec.mounts or []),
                       Mount(destination="/data", type="bind", source=host, options=["rbind", "rw"]),
                       Mount(destination="/ro", type="bind", source=host, options=["bind", "ro"])]  # fmt: skip

    code, out, err = run_in(
        runtime,
        bundle,
        "cat /data/hello; echo written > /data/out; echo x > /ro/x 2>&1 || echo RO",
        edit=edit,
    )
    assert code == 0, err
    assert "from host" in out and "RO" in out
    with open(os.path.join(host, "out")) as f:
        assert f.read() == "written\n"


def test_capability_sets_from_config(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.process is not None
        caps = ["CAP_CHOWN", "CAP_NET_RAW"]
        spec.process.capabilities = Capabilities(bounding=caps, effective=caps, permitted=caps, inheritable=caps,
                                                 ambient=["CAP_NET_RAW"])  # fmt: skip
        spec.process.user.uid = 1000

    code, out, err = run_in(runtime, bundle, "cat /proc/self/status", edit=edit)
    assert code == 0, err
    # a non-root user keeps only the ambient set across execve
    assert int(status_field(out, "CapAmb"), 16) == 1 << 13
    assert int(status_field(out, "CapEff"), 16) == 1 << 13
    assert int(status_field(out, "CapBnd"), 16) == (1 << 0) | (1 << 13)


def test_domainname_oom_score_adj_and_cgroup_namespace(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    def edit(spec: Spec) -> None:
        assert spec.process is not None
        spec.domainname = "example.test"
        spec.process.oom_score_adj = 500

    code, out, err = run_in(
        runtime,
        bundle,
        "cat /proc/sys/kernel/domainname /proc/self/oom_score_adj /proc/self/cgroup",
        edit=edit,
    )
    assert code == 0, err
    lines = out.split("\n")
    assert lines[0] == "example.test" and lines[1] == "500"
    # in its own cgroup namespace the container sees its cgroup as the root of every hierarchy
    cgroup_lines = [line for line in lines[2:] if line]
    assert cgroup_lines and all(line.endswith(":/") for line in cgroup_lines), cgroup_lines


def test_preserve_fds_passes_extra_descriptors(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    import tempfile

    from runtime_helpers import COCON_RUNTIME

    b = bundle("sh", "-c", "echo through-fd-3 >&3; ls /proc/self/fd | wc -l")
    read_end, write_end = os.pipe()
    out = tempfile.TemporaryFile()
    try:
        # the pipe's write end becomes fd 3 of cocon-runtime, then of the container
        cmd = [COCON_RUNTIME, "--root", runtime.root, "run", "--preserve-fds", "1", "--bundle", b.path, b.id]
        pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, write_end, 3), (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
        ])  # fmt: skip
        os.close(write_end)
        write_end = -1
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.read(read_end, 100) == b"through-fd-3\n"
        out.seek(0)
        # 0, 1, 2, 3 and the one ls opens: nothing else of the runtime leaks in
        assert out.read().decode().strip() == "5"
    finally:
        os.close(read_end)
        out.close()
        if write_end >= 0:
            os.close(write_end)


def test_preserve_fds_must_be_open(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    b = bundle("true")
    res = runtime("run", "--preserve-fds", "3", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 1 and "--preserve-fds 3: fd 3 is not open" in res.stderr
