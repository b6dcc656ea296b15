"""Hostile containers: each security property of cocon-runtime proved from inside (or against) one."""

from __future__ import annotations

import os
import subprocess

from cocon.images.busybox import make_rootfs
from cocon.oci.runtime_spec import Mount, Spec
from runtime_helpers import BundleFactory, RuntimeCLI, host_mounts_mentioning


def private_rootfs(tmp_path: os.PathLike[str]) -> str:
    path = os.path.join(str(tmp_path), "hostile-rootfs")
    make_rootfs(path)
    return path


def test_symlinked_mount_destination_stays_inside_rootfs(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    """CVE-2021-30465 class: a symlink in the image must not redirect a mount onto the host."""
    host_target = os.path.join(str(tmp_path), "host-target")
    os.makedirs(host_target)
    rootfs = private_rootfs(tmp_path)
    os.symlink(host_target, os.path.join(rootfs, "abs-escape"))  # absolute link to a host path
    os.symlink("../../../../../../../../" + host_target.lstrip("/"), os.path.join(rootfs, "rel-escape"))

    def edit(spec: Spec) -> None:
        assert spec.root is not None
        spec.root.path = rootfs
        spec.root.readonly = False
        spec.mounts = [*(spec.mounts or []),
                       Mount(destination="/abs-escape/a", type="tmpfs", source="tmpfs"),
                       Mount(destination="/rel-escape/b", type="tmpfs", source="tmpfs")]  # fmt: skip

    b = bundle("sh", "-c", "grep -c ' tmpfs ' /proc/self/mounts; echo inside > /abs-escape/a/f", edit=edit)
    res = runtime("run", "--bundle", b.path, b.id, check=False)
    assert res.returncode == 0, res.stderr
    # nothing was created or mounted at the host path the links point to
    assert os.listdir(host_target) == []
    assert host_mounts_mentioning(host_target) == []
    # the links were resolved inside the rootfs instead
    assert os.path.isdir(os.path.join(rootfs, host_target.lstrip("/"), "a"))


def test_setup_process_is_not_reachable_through_proc(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    """CVE-2019-5736 class: while the runtime's interpreter sets the container up (here: the init
    waiting for `start`), processes in the container cannot open its /proc/PID/exe or memory."""
    b = bundle("true")
    runtime("create", "--bundle", b.path, b.id)
    probe = (
        "readlink /proc/self/exe; "  # control: our own exe is readable
        "readlink /proc/1/exe || echo EXE-DENIED; "
        "cat /proc/1/exe > /dev/null || echo OPEN-DENIED; "
        "head -c1 /proc/1/mem > /dev/null || echo MEM-DENIED; "
        "readlink /proc/1/fd/0 || echo FD-DENIED; "
        "cat /proc/1/environ > /dev/null || echo ENV-DENIED"
    )
    res = runtime("exec", b.id, "sh", "-c", probe, check=False)
    out = res.stdout + res.stderr
    assert "/bin/busybox" in res.stdout
    for marker in ("EXE-DENIED", "OPEN-DENIED", "MEM-DENIED", "FD-DENIED", "ENV-DENIED"):
        assert marker in out, f"{marker} missing: {out}"
    assert "python" not in res.stdout


def test_pivot_root_leaves_no_host_root_in_the_namespace(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    """With pivot_root (never chroot) the old root is detached: the container's mount namespace,
    entered from the host, holds only the container's mounts."""
    b = bundle("sleep", "1000")
    runtime("run", "--detach", "--bundle", b.path, b.id)
    pid = runtime.state(b.id)["pid"]
    out = subprocess.run(["nsenter", "-m", "-p", "-t", str(pid), "cat", "/proc/self/mountinfo"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    mount_points = [line.split()[4] for line in out.splitlines()]
    assert mount_points[0] == "/" or "/" in mount_points
    assert all(not p.startswith(("/work", "/home", "/boot", "/run/cocon")) for p in mount_points), (
        mount_points
    )
    assert b.path not in out
    assert len(mount_points) < 40


def test_mounts_do_not_propagate_to_the_host(runtime: RuntimeCLI, bundle: BundleFactory) -> None:
    with open("/proc/self/mountinfo") as f:
        before = f.read().count("\n")
    b = bundle("sh", "-c", "true")
    runtime("run", "--bundle", b.path, b.id)
    with open("/proc/self/mountinfo") as f:
        after = f.read().count("\n")
    assert after == before
    assert host_mounts_mentioning(b.id) == []


def test_no_new_privs_blocks_setuid(
    runtime: RuntimeCLI, bundle: BundleFactory, tmp_path: os.PathLike[str]
) -> None:
    rootfs = private_rootfs(tmp_path)
    # a setuid-root program that prints its effective uid (busybox drops setuid privileges itself,
    # so it cannot serve)
    os.makedirs(os.path.join(rootfs, "suid"))
    suid = os.path.join(rootfs, "suid", "id")
    source = os.path.join(str(tmp_path), "euid.c")
    with open(source, "w") as f:
        f.write(
            '#include <stdio.h>\n#include <unistd.h>\nint main(void){printf("%d\\n", geteuid());return 0;}\n'
        )
    subprocess.run(["gcc", "-static", "-O2", "-o", suid, source], check=True)
    os.chmod(suid, 0o4755)

    def run_as_user(no_new_privs: bool) -> str:
        def edit(spec: Spec) -> None:
            assert spec.root is not None and spec.process is not None
            spec.root.path = rootfs
            spec.process.user.uid = 1000
            spec.process.user.gid = 1000
            spec.process.no_new_privileges = no_new_privs
            # without no_new_privs, loading seccomp needs privileges the user does not keep
            if not no_new_privs:
                assert spec.linux is not None
                spec.linux.seccomp = None

        b = bundle("/suid/id", edit=edit)
        res = runtime("run", "--bundle", b.path, b.id, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    # control: without no_new_privs the setuid bit works, so the check below means something
    assert run_as_user(no_new_privs=False) == "0"
    assert run_as_user(no_new_privs=True) == "1000"
