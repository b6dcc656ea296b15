"""Helpers for tests of the `cocon` command and the engine: private roots with a busybox image, the
real `cocon` launcher as a subprocess, and checks that nothing is left behind (mounts, cgroups,
snapshots, runtime state), also after a failing test."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cocon.images.bootstrap import bootstrap_busybox
from cocon.images.store import ImageStore

BIN_DIR = os.path.dirname(sys.executable)
COCON = os.path.join(BIN_DIR, "cocon")


def cgroup_dirs() -> set[str]:
    """Every container cgroup cocon made (its default parent /cocon), in any hierarchy."""
    return set(glob.glob("/sys/fs/cgroup/*/cocon/*/")) | set(glob.glob("/sys/fs/cgroup/cocon/*/"))


def leaked_cgroups(before: set[str]) -> list[str]:
    """Container cgroups made since `before` that are empty and stay (a second look after a moment):
    what a test left. A live container of a test running beside this one is not empty, and one
    being torn down is gone a moment later, so parallel runs do not count as leaks."""
    import time

    new = cgroup_dirs() - before
    if not new:
        return []
    time.sleep(1.0)
    return sorted(d for d in new & cgroup_dirs() if _cgroup_empty(d))


def _cgroup_empty(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return not f.read().strip()
    except OSError:
        return False


def mounts_under(path: str) -> list[str]:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if p == real or p.startswith(real + "/")]


def unmount_all(path: str) -> None:
    for p in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", p], check=False, capture_output=True)


def remove_cgroup(path: str) -> None:
    """rmdir a cgroup and its children (killing what is left in them)."""
    for root, dirs, _files in os.walk(path, topdown=False):
        for d in dirs:
            _rmdir_cgroup(os.path.join(root, d))
    _rmdir_cgroup(path)


def _rmdir_cgroup(path: str) -> None:
    procs = os.path.join(path, "cgroup.procs")
    try:
        with open(procs) as f:
            for pid in f.read().split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass
    except OSError:
        pass
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            import time

            time.sleep(0.01)


_TEMPLATE: dict[str, str] = {}


def busybox_template() -> str:
    """A root holding only busybox:latest (bootstrapped once per session; copied, never used)."""
    if "root" not in _TEMPLATE:
        root = tempfile.mkdtemp(prefix="cocon-test-template-")
        atexit.register(shutil.rmtree, root, True)
        store = ImageStore(root)
        bootstrap_busybox(store)
        store.close()
        _TEMPLATE["root"] = root
    return _TEMPLATE["root"]


def new_root_with_busybox(root: str) -> None:
    """`root` gets a copy of the template's images (the image store database and its blobs)."""
    template = busybox_template()
    os.makedirs(root, exist_ok=True)
    shutil.copytree(os.path.join(template, "content"), os.path.join(root, "content"))
    for name in os.listdir(template):
        if name.startswith("images.db"):
            shutil.copy2(os.path.join(template, name), os.path.join(root, name))


@dataclass
class CoconEnv:
    """A private COCON_ROOT and COCON_RUN; calling it runs the real `cocon` command in them."""

    root: str
    run: str
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, COCON_ROOT=self.root, COCON_RUN=self.run, **self.extra_env)

    def __call__(
        self, *args: str, check: bool = True, input: str | bytes | None = None, timeout: float = 60, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        text = not isinstance(input, bytes)
        proc = subprocess.run(
            [COCON, *args], env=self.env, capture_output=True, text=text, input=input, timeout=timeout, **kw
        )
        if not text:
            proc.stdout = proc.stdout.decode(errors="replace")
            proc.stderr = proc.stderr.decode(errors="replace")
        if check and proc.returncode != 0:
            raise AssertionError(
                f"cocon {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def leftovers(self) -> list[str]:
        """What is left that should not be: mounts, active snapshots, runtime states, bundles. Stops
        the daemon first (the next command starts it again): its pre-started runtime is no leak."""
        self.stop_daemon()
        found = [f"mount {m}" for m in mounts_under(self.root) + mounts_under(self.run)]
        active = os.path.join(self.root, "snapshots", "overlayfs", "active")
        if os.path.isdir(active):
            found += [f"snapshot {n}" for n in os.listdir(active)]
        for sub in ("runtime", "instances"):
            d = os.path.join(self.run, sub)
            if os.path.isdir(d):
                found += [f"{sub} {n}" for n in os.listdir(d) if not n.startswith(".")]
        return found

    def stop_daemon(self) -> None:
        """Stop the daemon the first command started (SIGTERM; SIGKILL after 20 s)."""
        stop_daemon(self.run)

    def force_cleanup(self) -> None:
        """Remove every container through cocon, stop the daemon, then unmount whatever is left."""
        if os.path.exists(os.path.join(self.run, "cocon.sock")):
            ids = self("ps", "-aq", "--no-trunc", check=False).stdout.split()
            if ids:
                self("rm", "-f", *ids, check=False)
        self.stop_daemon()
        kill_prestarted(self.run)
        unmount_all(self.run)
        unmount_all(self.root)
        reset_network(self.root, self.run)  # the default network the daemon kept


def kill_prestarted(run_dir: str) -> None:
    """SIGKILL the pre-started conmon/runtime pairs of `run_dir` that a killed daemon left waiting
    (a clean stop cancels them; cocon.engine.prestart)."""
    import signal

    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--await" in argv and any(run_dir.encode() in a for a in argv):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not argv[0].endswith(b"conmon"):  # the cgroup2 directory it joined ahead
                from cocon.engine.prestart import remove_prejoined_cgroup

                fifo = argv[argv.index(b"--await") + 1].decode()
                remove_prejoined_cgroup(os.path.basename(os.path.dirname(fifo)))


def stop_daemon(run_dir: str, timeout: float = 20.0) -> None:
    """SIGTERM to the daemon of `run_dir` (its pid file), SIGKILL if it is still there after `timeout`."""
    import signal
    import time

    try:
        with open(os.path.join(run_dir, "cocon.pid")) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except OSError:
        return True


def reset_network(root: str, run: str) -> None:
    """Everything cocon's networking made for this root (bridges, veths, its nftables table), as
    cocon.engine.netattach names them: removed (after the daemon stopped and netns were unmounted)."""
    if not os.path.exists(os.path.join(root, "networks.db")):
        return
    from cocon.engine.netattach import names_for
    from cocon.network import NetworkStack

    table, bridge = names_for(run)
    os.makedirs(run, exist_ok=True)
    NetworkStack(os.path.join(root, "networks.db"), os.path.join(run, "network"), table=table,
                 default_bridge=bridge, upstreams=()).reset()  # fmt: skip


def cocon_env_fixture(tmp_path: Any) -> Iterator[CoconEnv]:
    """For a fixture: a private root with busybox:latest; afterwards every container is removed and
    the test fails if it left mounts, snapshots, runtime state or cgroups behind."""
    before = cgroup_dirs()
    root = os.path.join(str(tmp_path), "root")
    run = tempfile.mkdtemp(prefix="cocon-test-run-", dir="/run")
    new_root_with_busybox(root)
    env = CoconEnv(root=root, run=run)
    try:
        yield env
        env.stop_daemon()  # its pre-started runtime goes with it; what remains is a leak
        left = env.leftovers()
        leaked = leaked_cgroups(before)
        assert left == [], f"left behind: {left}"
        assert leaked == [], f"cgroups left behind: {leaked}"
    finally:
        env.force_cleanup()
        for d in leaked_cgroups(before):
            remove_cgroup(d)
        unmount_all(run)
        reset_network(root, run)
        shutil.rmtree(run, ignore_errors=True)


def read_until(fd: int, needle: bytes, timeout: float = 20) -> bytes:
    """Read from `fd` (a pty master) until `needle` shows up; fails after `timeout` seconds."""
    import select
    import time

    data = b""
    deadline = time.monotonic() + timeout
    while needle not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {needle!r}; got {data!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    return data
