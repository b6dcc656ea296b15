"""podman is the judge: the same podman commands with `--runtime cocon-runtime` and with runc.

podman runs with its own storage and run roots under a temporary directory, cgroupfs as the cgroup
manager, and the ulimits these hosts need (`--ulimit nofile=1024:1024 --ulimit nproc=1024:1024`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from cocon.images.busybox import make_rootfs
from runtime_helpers import COCON_RUNTIME

IMAGE = "localhost/cocon-busybox:e2e"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
RUNTIMES = {"cocon-runtime": COCON_RUNTIME, "runc": shutil.which("runc") or "runc"}


class Podman:
    def __init__(self, base: str) -> None:
        self.base = base
        self.global_args = [
            "podman", "--root", f"{base}/storage", "--runroot", f"{base}/run",
            "--cgroup-manager", "cgroupfs", "--events-backend", "file",
        ]  # fmt: skip

    def __call__(self, *args: str, runtime: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.global_args, "--runtime", RUNTIMES[runtime], *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    base = tempfile.mkdtemp(prefix="cocon-podman-")
    pm = Podman(base)
    try:
        rootfs = os.path.join(base, "rootfs")
        make_rootfs(rootfs)
        tar_path = os.path.join(base, "rootfs.tar")
        with tarfile.open(tar_path, "w") as tar:
            tar.add(rootfs, arcname=".")
        subprocess.run([*pm.global_args, "import", tar_path, IMAGE], check=True, capture_output=True)
        yield pm
    finally:
        subprocess.run([*pm.global_args, "rm", "--all", "--force"], capture_output=True, check=False)
        subprocess.run([*pm.global_args, "system", "reset", "--force"], capture_output=True, check=False)
        subprocess.run(["umount", "-R", f"{base}/storage"], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("runtime", ["runc", "cocon-runtime"])
def test_run_rm_output_and_exit_code(podman: Podman, runtime: str) -> None:
    res = podman("run", "--rm", *ULIMITS, IMAGE, "sh", "-c", "echo hello; grep Seccomp: /proc/self/status; exit 3",
                 runtime=runtime, check=False)  # fmt: skip
    assert res.returncode == 3, res.stderr
    assert res.stdout.split("\n")[0] == "hello"
    assert "Seccomp:\t2" in res.stdout
    assert podman("ps", "-a", "-q", runtime=runtime).stdout.strip() == ""


@pytest.mark.parametrize("runtime", ["runc", "cocon-runtime"])
def test_tty_through_conmon(podman: Podman, runtime: str) -> None:
    res = podman("run", "--rm", "-t", *ULIMITS, IMAGE, "tty", runtime=runtime)
    assert res.stdout.strip() == "/dev/pts/0"


@pytest.mark.parametrize("runtime", ["runc", "cocon-runtime"])
def test_detached_exec_logs_stop(podman: Podman, runtime: str) -> None:
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    podman(
        "run",
        "-d",
        "--name",
        name,
        *ULIMITS,
        IMAGE,
        "sh",
        "-c",
        "echo started; exec sleep 1000",
        runtime=runtime,
    )
    try:
        assert (
            podman("exec", name, "sh", "-c", "echo in-$((40+2))", runtime=runtime).stdout.strip() == "in-42"
        )
        assert podman("exec", "-t", name, "tty", runtime=runtime).stdout.strip().startswith("/dev/pts/")
        failing = podman("exec", name, "sh", "-c", "exit 5", runtime=runtime, check=False)
        assert failing.returncode == 5
        podman("pause", name, runtime=runtime)
        status = podman("inspect", "--format", "{{.State.Status}}", name, runtime=runtime).stdout.strip()
        assert status == "paused"
        podman("unpause", name, runtime=runtime)
        assert podman("logs", name, runtime=runtime).stdout.strip() == "started"
        podman("stop", "-t", "5", name, runtime=runtime)
        status = podman("inspect", "--format", "{{.State.Status}}", name, runtime=runtime).stdout.strip()
        assert status == "exited"
    finally:
        podman("rm", "--force", name, runtime=runtime, check=False)
