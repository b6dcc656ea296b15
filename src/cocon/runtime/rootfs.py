"""The container's filesystem: mounts into the rootfs, devices, pivot_root, masked and read-only paths.

Runs inside the container's init process, in its new mount namespace. Every mount destination is
resolved inside the rootfs by the kernel (openat2 with RESOLVE_IN_ROOT), created there if missing, and
mounted through the resulting file descriptor (/proc/self/fd/N), so a symlink planted in the image (or
swapped in by another container sharing a volume) cannot redirect a mount to the host (the
CVE-2021-30465 class).
"""

from __future__ import annotations

import errno
import os
import stat

from cocon import _linux as L
from cocon._typing import TYPE_CHECKING
from cocon.runtime.errors import RuntimeFailure

if TYPE_CHECKING:
    from typing import Any

    from cocon.oci.runtime_spec import Device, Mount, Spec
    from cocon.runtime.cgroups import Cgroup

# Mount options that are flags: name -> (clear, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, L.MS_RDONLY), "rw": (True, L.MS_RDONLY),
    "nosuid": (False, L.MS_NOSUID), "suid": (True, L.MS_NOSUID),
    "nodev": (False, L.MS_NODEV), "dev": (True, L.MS_NODEV),
    "noexec": (False, L.MS_NOEXEC), "exec": (True, L.MS_NOEXEC),
    "sync": (False, L.MS_SYNCHRONOUS), "async": (True, L.MS_SYNCHRONOUS),
    "dirsync": (False, L.MS_DIRSYNC), "remount": (False, L.MS_REMOUNT),
    "mand": (False, L.MS_MANDLOCK), "nomand": (True, L.MS_MANDLOCK),
    "atime": (True, L.MS_NOATIME), "noatime": (False, L.MS_NOATIME),
    "diratime": (True, L.MS_NODIRATIME), "nodiratime": (False, L.MS_NODIRATIME),
    "bind": (False, L.MS_BIND), "rbind": (False, L.MS_BIND | L.MS_REC),
    "relatime": (False, L.MS_RELATIME), "norelatime": (True, L.MS_RELATIME),
    "strictatime": (False, L.MS_STRICTATIME), "nostrictatime": (True, L.MS_STRICTATIME),
    "nosymfollow": (False, L.MS_NOSYMFOLLOW), "symfollow": (True, L.MS_NOSYMFOLLOW),
    "lazytime": (False, L.MS_LAZYTIME), "nolazytime": (True, L.MS_LAZYTIME),
}  # fmt: skip
PROPAGATION: dict[str, int] = {
    "private": L.MS_PRIVATE, "rprivate": L.MS_PRIVATE | L.MS_REC,
    "shared": L.MS_SHARED, "rshared": L.MS_SHARED | L.MS_REC,
    "slave": L.MS_SLAVE, "rslave": L.MS_SLAVE | L.MS_REC,
    "unbindable": L.MS_UNBINDABLE, "runbindable": L.MS_UNBINDABLE | L.MS_REC,
}  # fmt: skip
# Flags the kernel locks on a mount made in a less privileged user namespace: a remount must keep them.
_LOCKABLE = L.MS_RDONLY | L.MS_NOSUID | L.MS_NODEV | L.MS_NOEXEC
_STATVFS_TO_MS = {
    os.ST_RDONLY: L.MS_RDONLY, os.ST_NOSUID: L.MS_NOSUID, os.ST_NODEV: L.MS_NODEV, os.ST_NOEXEC: L.MS_NOEXEC,
}  # fmt: skip


class MountOptions:
    """A mount's option list split into flags, propagation, and filesystem data."""

    def __init__(self, options: list[str] | None) -> None:
        self.flags = 0
        self.propagation: list[int] = []
        data: list[str] = []
        for opt in options or ():
            if opt in _FLAGS:
                clear, flag = _FLAGS[opt]
                self.flags = self.flags & ~flag if clear else self.flags | flag
            elif opt in PROPAGATION:
                self.propagation.append(PROPAGATION[opt])
            elif opt in ("tmpcopyup", "idmap", "ridmap"):
                raise RuntimeFailure(f"mount option {opt!r} is not supported by cocon-runtime; remove it")
            else:
                data.append(opt)
        self.data = ",".join(data)

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & L.MS_BIND)


def mount_error(m: Mount, exc: OSError) -> RuntimeFailure:
    return RuntimeFailure(
        f"mounts: cannot mount {m.source or m.type!r} on {m.destination!r}: {exc.strerror or exc}"
    )


# --- safe paths inside the rootfs ---------------------------------------------------------------
_IN_ROOT = L.RESOLVE_IN_ROOT | L.RESOLVE_NO_MAGICLINKS


def open_in_root(rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    """Open `path` as seen from inside the rootfs: symlinks and `..` never leave it."""
    return L.openat2(rootfd, path.lstrip("/") or ".", flags, _IN_ROOT)


def make_in_root(rootfd: int, path: str, *, directory: bool, _depth: int = 0) -> int:
    """Create `path` (and its parents) inside the rootfs if missing; return an O_PATH fd to it.

    A dangling symlink on the way is followed inside the rootfs, and what it points to is created
    there, as runc's securejoin does: never outside.
    """
    if _depth > 40:
        raise RuntimeFailure(f"cannot create {path!r} in the rootfs: too many levels of symbolic links")
    try:
        return open_in_root(rootfd, path)
    except FileNotFoundError:
        pass
    parent, name = os.path.split(os.path.normpath("/" + path))
    pfd = make_in_root(rootfd, parent, directory=True, _depth=_depth + 1)
    try:
        if not stat.S_ISDIR(os.fstat(pfd).st_mode):
            raise RuntimeFailure(f"cannot create {path!r} in the rootfs: {parent!r} is not a directory")
        try:
            if directory:
                os.mkdir(name, 0o755, dir_fd=pfd)
            else:
                os.close(
                    os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644, dir_fd=pfd)
                )
        except FileExistsError:
            if stat.S_ISLNK(os.lstat(name, dir_fd=pfd).st_mode):
                target = os.path.join(parent, os.readlink(name, dir_fd=pfd))
                return make_in_root(rootfd, os.path.normpath(target), directory=directory, _depth=_depth + 1)
        return L.openat2(pfd, name, os.O_PATH, _IN_ROOT)
    finally:
        os.close(pfd)


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


class _PathFd:
    """`with` an O_PATH fd opened inside the rootfs: gives the fd (`as_path`: /proc/self/fd/N, which
    mount(2) follows to it), closes it on exit. A class rather than @contextmanager: contextlib is
    not imported on the hot path."""

    def __init__(self, fd: int, *, as_path: bool) -> None:
        self.fd = fd
        self.as_path = as_path

    def __enter__(self) -> Any:
        return fd_path(self.fd) if self.as_path else self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def target_in_root(rootfd: int, destination: str, *, directory: bool) -> _PathFd:
    """The destination created inside the rootfs if missing, as a /proc/self/fd path to mount on."""
    return _PathFd(make_in_root(rootfd, destination, directory=directory), as_path=True)


def locked_flags(path: str) -> int:
    """The ro/nosuid/nodev/noexec flags of the mount holding `path` (kept on a bind remount)."""
    st = os.statvfs(path)
    return sum(ms for sv, ms in _STATVFS_TO_MS.items() if st.f_flag & sv)


# --- setting up the rootfs, before pivot_root ------------------------------------------------------
class RootfsSetup:
    def __init__(
        self,
        spec: Spec,
        rootfs: str,
        bundle: str,
        cgroup: Cgroup | None,
        *,
        userns: bool,
        cgroupns: bool,
    ) -> None:
        self.spec = spec
        self.rootfs = rootfs
        self.bundle = bundle
        self.cgroup = cgroup
        self.userns = userns
        self.cgroupns = cgroupns
        self.rootfd = -1
        self.dev_is_tmpfs = False

    def prepare(self) -> None:
        """Everything before pivot_root: propagation, the rootfs bind, mounts and devices."""
        linux = self.spec.linux
        propagation = (linux.rootfs_propagation if linux else None) or "rprivate"
        # Mounts are made private (or the configured propagation) before anything else, so nothing
        # done below propagates back to the host.
        L.mount(None, "/", None, PROPAGATION[propagation] | L.MS_REC)
        self._make_parent_private(self.rootfs)
        L.mount(self.rootfs, self.rootfs, None, L.MS_BIND | L.MS_REC)
        self.rootfd = os.open(self.rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        for m in self.spec.mounts or ():
            self.mount(m)
        if self.dev_is_tmpfs:
            self.default_devices()
        for d in (linux.devices if linux else None) or ():
            self.create_device(d)

    def _make_parent_private(self, path: str) -> None:
        # pivot_root refuses a new root whose parent mount is shared: find the mount holding `path`.
        mountpoint = path
        while mountpoint != "/" and not os.path.ismount(mountpoint):
            mountpoint = os.path.dirname(mountpoint)
        L.mount(None, mountpoint, None, L.MS_PRIVATE)

    def mount(self, m: Mount) -> None:
        opts = MountOptions(m.options)
        try:
            if opts.is_bind or m.type == "bind":
                self._bind(m, opts)
            elif m.type == "cgroup" or m.type == "cgroup2":
                self._cgroup(m, opts)
            else:
                self._mount_fs(m, opts)
        except OSError as exc:
            raise mount_error(m, exc) from None

    def _at(self, destination: str, *, directory: bool = True) -> _PathFd:
        """The destination, resolved afresh: after a mount, the old fd still names what is under it."""
        return target_in_root(self.rootfd, destination, directory=directory)

    def _bind(self, m: Mount, opts: MountOptions) -> None:
        source = m.source or ""
        if not source:
            raise RuntimeFailure(f"mounts: bind mount on {m.destination!r} has no source")
        if not os.path.isabs(source):
            source = os.path.join(self.bundle, source)
        try:
            is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        except FileNotFoundError:
            raise RuntimeFailure(
                f"mounts: bind source {source!r} for {m.destination!r} does not exist"
            ) from None
        with self._at(m.destination, directory=is_dir) as target:
            L.mount(source, target, None, L.MS_BIND | (opts.flags & L.MS_REC))
        self._remount_and_propagate(m.destination, opts, bind=True)

    def _remount_and_propagate(self, destination: str, opts: MountOptions, *, bind: bool) -> None:
        extra = opts.flags & ~(L.MS_BIND | L.MS_REC | L.MS_REMOUNT)
        if bind and extra:
            with self._at(destination) as target:
                L.mount(None, target, None, L.MS_BIND | L.MS_REMOUNT | extra | locked_flags(target))
        for prop in opts.propagation:
            with self._at(destination) as target:
                L.mount(None, target, None, prop)

    def _mount_fs(self, m: Mount, opts: MountOptions) -> None:
        fstype = m.type or "none"
        if m.destination == "/dev" and fstype in ("tmpfs", "devtmpfs"):
            self.dev_is_tmpfs = True
        with self._at(m.destination) as target:
            try:
                L.mount(m.source or fstype, target, fstype, opts.flags, opts.data)
            except PermissionError:
                # In a user namespace the kernel refuses some filesystems (sysfs without a network
                # namespace of the user namespace, mqueue of the host's ipc namespace): bind the
                # host's instance read-only as runc does.
                if not self.userns or fstype not in ("sysfs", "mqueue"):
                    raise
                host = "/sys" if fstype == "sysfs" else "/dev/mqueue"
                L.mount(host, target, None, L.MS_BIND | L.MS_REC)
                with self._at(m.destination) as again:
                    L.mount(None, again, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | locked_flags(again))
        self._remount_and_propagate(m.destination, opts, bind=False)

    def _cgroup(self, m: Mount, opts: MountOptions) -> None:
        if self.cgroup is None:
            return
        flags = opts.flags & ~(L.MS_BIND | L.MS_REC | L.MS_REMOUNT)
        dest = m.destination
        if self.cgroup.version == 2:
            if self.cgroupns:
                with self._at(dest) as target:
                    L.mount("cgroup2", target, "cgroup2", flags)
            else:
                (_, host), *_ = self.cgroup.container_mounts()
                self._bind_readonly_as(host, dest, flags)
            return
        # cgroup v1: a tmpfs holding one directory per hierarchy, each the container's own cgroup.
        with self._at(dest) as target:
            L.mount("tmpfs", target, "tmpfs", flags & ~L.MS_RDONLY, "mode=755")
        if self.cgroupns:
            for name, subsystems in self.cgroup.hierarchies():
                with self._at(f"{dest}/{name}") as sub:
                    L.mount("cgroup", sub, "cgroup", flags, subsystems)
        else:
            for name, host in self.cgroup.container_mounts():
                self._bind_readonly_as(host, f"{dest}/{name}", flags)
        with _dir_fd(self.rootfd, dest) as dfd:
            for name, linked in _comounted_links(self.cgroup.hierarchies()):
                try:
                    os.symlink(linked, name, dir_fd=dfd)
                except FileExistsError:
                    pass
        if flags & L.MS_RDONLY:
            with self._at(dest) as target:
                L.mount(None, target, None, L.MS_REMOUNT | flags, "mode=755")

    def _bind_readonly_as(self, host: str, destination: str, flags: int) -> None:
        with self._at(destination) as target:
            L.mount(host, target, None, L.MS_BIND | L.MS_REC)
        with self._at(destination) as target:
            L.mount(None, target, None, L.MS_BIND | L.MS_REMOUNT | flags | locked_flags(target))

    # -- devices --------------------------------------------------------------------------------
    def default_devices(self) -> None:
        """The runtime-spec's default devices and /dev symlinks, on a /dev tmpfs."""
        for name, major, minor in _DEFAULT_DEVICES:
            self._make_node(f"/dev/{name}", stat.S_IFCHR | 0o666, major, minor, 0, 0)
        for src, dst in _DEV_SYMLINKS:
            with _dir_fd(self.rootfd, "/dev") as dfd:
                try:
                    os.symlink(src, dst, dir_fd=dfd)
                except FileExistsError:
                    pass

    def create_device(self, d: Device) -> None:
        kinds = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}
        mode = kinds[d.type] | (d.file_mode if d.file_mode is not None else 0o666)
        self._make_node(d.path, mode, d.major or 0, d.minor or 0, d.uid or 0, d.gid or 0)

    def _make_node(self, path: str, mode: int, major: int, minor: int, uid: int, gid: int) -> None:
        parent, name = os.path.split(path)
        with _dir_fd(self.rootfd, parent, create=True) as dfd:
            try:
                os.unlink(name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            if self.userns and not stat.S_ISFIFO(mode):
                # mknod is not allowed in a user namespace: bind the host's node instead.
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644, dir_fd=dfd))
                fd = L.openat2(dfd, name, os.O_PATH, _IN_ROOT)
                try:
                    host = _host_device_path(mode, major, minor, path)
                    L.mount(host, fd_path(fd), None, L.MS_BIND)
                finally:
                    os.close(fd)
                return
            os.mknod(name, mode, os.makedev(major, minor), dir_fd=dfd)
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd)
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)

    def bind_console(self, pty_slave: str) -> None:
        """/dev/console is the container's terminal, as runc sets it up."""
        with self._at("/dev/console", directory=False) as target:
            L.mount(pty_slave, target, None, L.MS_BIND)

    def close(self) -> None:
        if self.rootfd >= 0:
            os.close(self.rootfd)
            self.rootfd = -1


_DEFAULT_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9),
                    ("tty", 5, 0))  # fmt: skip
_DEV_SYMLINKS = (("/proc/self/fd", "fd"), ("/proc/self/fd/0", "stdin"), ("/proc/self/fd/1", "stdout"),
                 ("/proc/self/fd/2", "stderr"), ("pts/ptmx", "ptmx"))  # fmt: skip


def _comounted_links(hierarchies: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """For a co-mounted hierarchy like `cpu,cpuacct`, links `cpu` and `cpuacct` to it."""
    links: list[tuple[str, str]] = []
    for name, _ in hierarchies:
        if "," in name:
            links.extend((part, name) for part in name.split(","))
    return links


def _host_device_path(mode: int, major: int, minor: int, path: str) -> str:
    if os.path.exists(path):
        st = os.stat(path)
        if st.st_rdev == os.makedev(major, minor):
            return path
    raise RuntimeFailure(
        f"linux.devices: {path} ({major}:{minor}) cannot be created in a user namespace and the host has "
        "no such node to bind"
    )


def _dir_fd(rootfd: int, path: str, create: bool = False) -> _PathFd:
    """A directory inside the rootfs as an O_PATH fd, which works as dir_fd for *at() calls."""
    fd = make_in_root(rootfd, path, directory=True) if create else open_in_root(rootfd, path)
    return _PathFd(fd, as_path=False)


# --- pivot_root and what follows it --------------------------------------------------------------
def pivot_root(rootfs: str) -> None:
    """Make `rootfs` the root and detach the old one, never chroot (runc's fd-based sequence)."""
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        L.pivot_root(".", ".")
        os.fchdir(old)
        L.mount(None, ".", None, L.MS_SLAVE | L.MS_REC)
        L.umount2(".", L.MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old)
        os.close(new)


def write_sysctls(sysctl: dict[str, str]) -> None:
    for key, value in sysctl.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            raise RuntimeFailure(f"linux.sysctl.{key}: cannot set to {value!r}: {exc.strerror}") from None


def mask_paths(paths: list[str]) -> None:
    """Hide paths: /dev/null over files, an empty read-only tmpfs over directories."""
    for path in paths:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                L.mount("tmpfs", path, "tmpfs", L.MS_RDONLY)
            else:
                L.mount("/dev/null", path, None, L.MS_BIND)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise RuntimeFailure(f"linux.maskedPaths: cannot mask {path}: {exc.strerror}") from None


def readonly_paths(paths: list[str]) -> None:
    for path in paths:
        try:
            L.mount(path, path, None, L.MS_BIND | L.MS_REC)
            L.mount(None, path, None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | L.MS_REC | locked_flags(path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                continue
            raise RuntimeFailure(
                f"linux.readonlyPaths: cannot make {path} read-only: {exc.strerror}"
            ) from None


def readonly_root() -> None:
    L.mount(None, "/", None, L.MS_BIND | L.MS_REMOUNT | L.MS_RDONLY | locked_flags("/"))


def finish_propagation(name: str | None) -> None:
    if name:
        L.mount(None, "/", None, PROPAGATION[name])
