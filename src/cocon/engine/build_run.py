"""RUN steps of `cocon build`: one container per step, on cocon's in-process runtime.

The step's rootfs is a mounted overlay snapshot. The container gets Docker's defaults from
`cocon.isolation.spec` (capabilities, seccomp profile, masked paths, a private /dev, /proc, /sys), the
build environment, WORKDIR and USER, and the host's network namespace (`RUN --network=none`: its own,
empty one) until cocon has networks. Its hostname is the step's container id. stdin is /dev/null, and
stdout and stderr are two pipes read here, so output reaches the caller as it comes.

Why a forked helper: a container inherits the runtime's file descriptors 0-2 when `create` forks its
init, and those are per process. The helper (a fork of this process, not a new interpreter) points
0-2 at /dev/null and the pipes and calls `Runtime.run`, so the builder's own stdio (and other threads
of a daemon) are never touched. Cancelling (an exception or Ctrl-C in the builder while it waits)
kills the helper and force-deletes the container: its processes, cgroup and state go.

Mount points the runtime creates in a rootfs that lacks them (`/proc`, `/dev`, `/sys`) are removed
after the step, so they do not end up in the layer (buildah does the same).
"""

from __future__ import annotations

import errno
import os
import selectors
import shutil
import signal
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cocon.images.build_errors import BuildError
from cocon.isolation.spec import ContainerRequest, ResolvedProcess, SpecError, container_spec, default_mounts
from cocon.oci.runtime_spec import Mount, encode_config

OutputCallback = Callable[[str, bytes], None]  # ("stdout" | "stderr", data)

_ERROR_EXIT = 125


class RunError(BuildError):
    """A RUN container could not be set up or run (not: the command failed, see the builder)."""


@dataclass
class RunResult:
    status: int  # the command's exit status (128+N for signal N)
    copied_up: dict[str, DirMeta]  # for `drop_copied_up` once the snapshot is unmounted


@dataclass
class RunRequest:
    container_id: str
    rootfs: str  # mounted, absolute
    args: list[str]
    env: list[str]  # K=V
    cwd: str
    user: str
    network: str = "host"  # "host" or "none"
    mounts: list[Mount] = field(default_factory=list)
    cgroups_path: str | None = None
    etc_files: bool = True  # /etc/hosts and /etc/resolv.conf, as Docker gives RUN steps


def _etc_mounts(rootfs: str, bundle: str, hostname: str, network: str) -> list[Mount]:
    """Per-step copies of /etc/hosts and /etc/resolv.conf bound over the image's (writes do not last).
    Only where /etc is a plain directory and the file is absent or a regular file: the runtime would
    create a missing target through a symbolic link somewhere else in the rootfs."""
    etc = os.path.join(rootfs, "etc")
    try:
        if not stat.S_ISDIR(os.lstat(etc).st_mode):
            return []
    except FileNotFoundError:
        return []
    files = {
        "hosts": f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    }
    if network != "none":
        try:
            with open("/etc/resolv.conf") as f:
                files["resolv.conf"] = f.read()
        except OSError:
            pass
    mounts: list[Mount] = []
    for name, text in files.items():
        try:
            st = os.lstat(os.path.join(etc, name))
            if not stat.S_ISREG(st.st_mode):
                continue
        except FileNotFoundError:
            pass
        path = os.path.join(bundle, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o644)
        mounts.append(Mount(destination=f"/etc/{name}", type="bind", source=path, options=["rbind", "rw"]))
    return mounts


DirMeta = tuple[int, int, int]  # mode, uid, gid


def _missing_mount_points(rootfs: str, destinations: Sequence[str]) -> tuple[list[str], dict[str, DirMeta]]:
    """For each mount destination, the first path component the rootfs does not have (the runtime
    will create it), to be removed after the step; and the existing directories it goes in, with their
    metadata: creating an entry copies them up into the upper dir (see `drop_copied_up`)."""
    missing: list[str] = []
    parents: dict[str, DirMeta] = {}
    for dest in destinations:
        parts = [p for p in dest.split("/") if p]
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            try:
                st = os.lstat(os.path.join(rootfs, rel))
            except FileNotFoundError:
                if rel not in missing:
                    missing.append(rel)
                for j in range(1, i):
                    prel = "/".join(parts[:j])
                    pst = os.lstat(os.path.join(rootfs, prel))
                    parents[prel] = (pst.st_mode, pst.st_uid, pst.st_gid)
                break
            if not stat.S_ISDIR(st.st_mode):
                break  # a link or file: the runtime resolves it; nothing is created here
    return missing, parents


def drop_copied_up(upper: str, parents: dict[str, DirMeta]) -> None:
    """After the snapshot is unmounted: remove from the upper dir the directories that were copied
    up only because a mount point was made (and removed) in them: still empty, same mode and owner,
    not opaque. What the step itself changed in them stays."""
    for rel in sorted(parents, key=lambda r: r.count("/"), reverse=True):
        path = os.path.join(upper, rel)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or (st.st_mode, st.st_uid, st.st_gid) != parents[rel]:
                continue
            if os.listdir(path) or any(n.endswith("overlay.opaque") for n in os.listxattr(path)):
                continue
            os.rmdir(path)
        except OSError:
            continue


def _remove_created(rootfs: str, rels: Sequence[str]) -> None:
    """Remove mount points the runtime created: empty files, and directories holding nothing but
    empty directories (anything else was written by the step and stays)."""
    for rel in rels:
        path = os.path.join(rootfs, rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(path)
        elif stat.S_ISDIR(st.st_mode) and _only_empty_dirs(path):
            shutil.rmtree(path, ignore_errors=True)


def _only_empty_dirs(path: str) -> bool:
    return all(not filenames for _, _, filenames in os.walk(path))


def _preload_runtime() -> None:
    """Import what the helper's Runtime.run needs before forking (cheaper than in every child)."""
    import cocon.runtime.capabilities
    import cocon.runtime.cgroups
    import cocon.runtime.container
    import cocon.runtime.hooks
    import cocon.runtime.process
    import cocon.runtime.rootfs
    import cocon.runtime.seccomp_bpf
    import cocon.runtime.spawn  # noqa: F401


def _helper(runtime_root: str, cid: str, bundle: str, out_w: int, err_w: int, status_w: int) -> None:
    """The forked helper: stdio to /dev/null and the pipes, run the container, report, exit."""
    code = _ERROR_EXIT
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in {null, out_w, err_w}:
            if fd > 2:
                os.close(fd)
        from cocon.runtime.container import Runtime

        status = Runtime(runtime_root).run(cid, bundle)
        os.write(status_w, f"exit {status}".encode())
        code = 0
    except BaseException as exc:
        try:
            os.write(status_w, f"error {exc}".encode(errors="replace")[:60000])
        except OSError:
            pass
    finally:
        os._exit(code)


def force_delete(runtime_root: str, cid: str) -> None:
    """Kill and forget the container `cid` (idempotent), whatever state it is in."""
    from cocon.runtime.container import Runtime
    from cocon.runtime.errors import RuntimeFailure

    try:
        Runtime(runtime_root).delete(cid, force=True)
    except RuntimeFailure:
        pass
    # a helper killed in the middle of `create` can leave a state directory the runtime cannot read
    shutil.rmtree(os.path.join(runtime_root, cid), ignore_errors=True)


def run_container(
    req: RunRequest, *, runtime_root: str, bundle_root: str, on_output: OutputCallback
) -> RunResult:
    """Run the step's command to its end."""
    bundle = os.path.join(bundle_root, req.container_id)
    os.makedirs(bundle, 0o700)
    missing: list[str] = []
    parents: dict[str, DirMeta] = {}
    try:
        mounts = list(req.mounts)
        if req.etc_files:
            mounts += _etc_mounts(req.rootfs, bundle, req.container_id, req.network)
        missing, parents = _missing_mount_points(
            req.rootfs, [m.destination for m in [*default_mounts(), *mounts]]
        )
        proc = ResolvedProcess(args=list(req.args), env=list(req.env), cwd=req.cwd, user=req.user)
        creq = ContainerRequest(
            hostname=req.container_id,
            network="none" if req.network == "none" else "host",
            mounts=mounts,
            cgroups_path=req.cgroups_path,
        )
        try:
            spec = container_spec(req.rootfs, proc, creq)
        except SpecError as exc:
            raise RunError(str(exc)) from None
        with open(os.path.join(bundle, "config.json"), "wb") as f:
            f.write(encode_config(spec))
        os.makedirs(runtime_root, 0o700, exist_ok=True)
        return RunResult(_run_helper(req.container_id, bundle, runtime_root, on_output), parents)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
        _remove_created(req.rootfs, missing)


def _run_helper(cid: str, bundle: str, runtime_root: str, on_output: OutputCallback) -> int:
    _preload_runtime()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w, status_r, status_w):
            os.close(fd)
        raise
    if pid == 0:  # the helper
        os.close(out_r)
        os.close(err_r)
        os.close(status_r)
        _helper(runtime_root, cid, bundle, out_w, err_w, status_w)
    os.close(out_w)
    os.close(err_w)
    os.close(status_w)
    reaped = False
    try:
        _pump({out_r: "stdout", err_r: "stderr"}, on_output)
        report = b""
        while True:
            chunk = os.read(status_r, 65536)
            if not chunk:
                break
            report += chunk
        os.waitpid(pid, 0)
        reaped = True
    except BaseException:
        # Cancelled (Ctrl-C, an error in on_output): stop the helper, then whatever it started.
        if not reaped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        force_delete(runtime_root, cid)
        raise
    finally:
        for fd in (out_r, err_r, status_r):
            os.close(fd)
    force_delete(runtime_root, cid)  # normally gone already; never leave a container behind
    text = report.decode(errors="replace")
    if text.startswith("exit "):
        return int(text[5:])
    message = text[6:] if text.startswith("error ") else "the helper process died"
    raise RunError(f"cannot run the step's container: {message}")


def _pump(fds: dict[int, str], on_output: OutputCallback) -> None:
    sel = selectors.DefaultSelector()
    try:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        open_fds = set(fds)
        while open_fds:
            for key, _ in sel.select():
                fd = int(key.fd)
                try:
                    data = os.read(fd, 65536)
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                if not data:
                    sel.unregister(fd)
                    open_fds.discard(fd)
                    continue
                on_output(fds[fd], data)
    finally:
        sel.close()
