"""Named volumes: directories that outlive the containers that mount them (Docker's `local` driver).

Layout under the store's root (the engine's is `$COCON_ROOT/volumes`):

    <name>/_data          what containers see at the mount's destination (a directory volume)
    <name>/disk.qcow2     the disk of a disk volume (`--type disk --size 10G`), instead of `_data`
    <name>/volume.json    {"Name", "CreatedAt", "Labels", "Anonymous", "Type", "Size"}
    .tmp-<random>/        a volume being created (renamed to <name> when complete)
    .trash-<random>/      a volume being deleted (out of sight first, then removed)
    .lock                 flock(2): serialises create and remove between processes

A volume appears complete (record and `_data` or `disk.qcow2`) or not at all: it is built in a
temporary directory and renamed into place. Which containers use a volume is the engine's
knowledge, not the store's: `remove` and `prune` take an `in_use` function, as the image store does.

`populate` copies what an image has at a path into an empty volume, the way Docker fills a new
volume from the image: the source is resolved inside the container's root filesystem (a symlink in
the image can never make it copy host files), and ownership, modes, times, symlinks, device nodes and
hard links are kept.

A disk volume is a qcow2 image that VMs attach as a block device (cocon.storage.qemu_img makes it);
containers cannot mount it and nothing copies files into it. A record without "Type" (made before
disk volumes existed) is a directory volume.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import os
import stat
import time

from cocon import _fastjson
from cocon._mountinfo import mounts_under
from cocon._typing import TYPE_CHECKING, record
from cocon.storage.fsutil import disk_usage, remove_tree

if TYPE_CHECKING:
    from collections.abc import Callable

RECORD = "volume.json"
DATA = "_data"
DISK = "disk.qcow2"
TYPES = ("dir", "disk")
DRIVER_OPTS = ("type", "size")
_NAME_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_NAME_REST = _NAME_FIRST + "_.-"


class VolumeError(Exception):
    """Base of every error of cocon.storage; the message says what is wrong and what to do."""


class VolumeNotFound(VolumeError):
    """No volume has that name."""


class VolumeInUse(VolumeError):
    """A container uses the volume."""


@record
class Volume:
    """One volume as stored."""

    name: str
    mountpoint: str  # the `_data` directory; for a disk volume its disk image
    created: str  # RFC 3339, UTC
    labels: dict[str, str]
    anonymous: bool
    type: str = "dir"  # "dir" or "disk"
    size: int | None = None  # bytes of a disk volume's disk (None for a directory volume)

    @property
    def disk_path(self) -> str | None:
        """The qcow2 image of a disk volume (None for a directory volume)."""
        return self.mountpoint if self.type == "disk" else None

    def to_docker(self) -> dict[str, object]:
        """The shape of Docker's `GET /volumes/{name}`."""
        options: dict[str, str] = {}
        if self.type == "disk":
            options = {"type": "disk", "size": str(self.size)}
        return {
            "CreatedAt": self.created,
            "Driver": "local",
            "Labels": dict(self.labels),
            "Mountpoint": self.mountpoint,
            "Name": self.name,
            "Options": options,
            "Scope": "local",
        }


def validate_name(name: str) -> str:
    """Docker's rule: `[a-zA-Z0-9][a-zA-Z0-9_.-]+` (at least two characters)."""
    if (
        not isinstance(name, str)
        or len(name) < 2
        or len(name) > 255
        or name[0] not in _NAME_FIRST
        or any(c not in _NAME_REST for c in name)
    ):
        raise VolumeError(
            f"invalid volume name {name!r}: use at least two of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


def is_volume_name(text: str) -> bool:
    """True when `text` (the source part of `-v SRC:DST`) names a volume rather than a host path."""
    try:
        validate_name(text)
    except VolumeError:
        return False
    return True


def anonymous_name() -> str:
    return os.urandom(32).hex()


def parse_driver_opts(opts: dict[str, str] | None) -> tuple[str | None, int | None]:
    """(type, size in bytes) from the driver options of `POST /volumes/create` (`type`: dir or disk;
    `size`: e.g. 10G, required for a disk). Unknown keys or values are refused."""
    opts = opts or {}
    unknown = sorted(set(opts) - set(DRIVER_OPTS))
    if unknown:
        raise VolumeError(
            f"unsupported volume driver option(s) {', '.join(unknown)}: cocon's local driver takes "
            "type=dir|disk and size=SIZE (for type=disk); other driver options are not supported"
        )
    kind = opts.get("type") or None
    if kind is not None and kind not in TYPES:
        raise VolumeError(
            f"unknown volume type {kind!r}: use type=dir (a directory) or type=disk (a qcow2 disk for "
            "VMs); other driver options are not supported (no tmpfs, nfs, bind devices)"
        )
    size: int | None = None
    if opts.get("size"):
        from cocon.storage.qemu_img import parse_size

        size = parse_size(opts["size"])
    return kind, size


class VolumeStore:
    """Volumes under `root`."""

    def __init__(self, root: str) -> None:
        self.root = root

    # --- paths and locking -----------------------------------------------------------------------
    def _dir(self, name: str) -> str:
        return os.path.join(self.root, validate_name(name))

    def data_dir(self, name: str) -> str:
        return os.path.join(self._dir(name), DATA)

    def _lock(self) -> int:
        try:
            os.makedirs(self.root, 0o700, exist_ok=True)
            fd = os.open(os.path.join(self.root, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise VolumeError(f"cannot open the volume store {self.root}: {exc.strerror}") from None
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    # --- reading ---------------------------------------------------------------------------------
    def _load(self, name: str) -> Volume:
        home = self._dir(name)
        try:
            with open(os.path.join(home, RECORD), "rb") as f:
                raw = _fastjson.loads(f.read())
        except FileNotFoundError:
            raise VolumeNotFound(
                f"no volume named {name!r}: create it with `cocon volume create {name}` "
                "(or let `cocon run -v NAME:/path` create it)"
            ) from None
        except (OSError, ValueError) as exc:
            raise VolumeError(
                f"the record of volume {name} ({home}/{RECORD}) cannot be read: {exc}; "
                f"remove the volume with `cocon volume rm -f {name}`"
            ) from None
        labels = raw.get("Labels") or {}
        kind = str(raw.get("Type") or "dir")
        size = raw.get("Size")
        return Volume(
            name=name,
            mountpoint=os.path.join(home, DISK if kind == "disk" else DATA),
            created=str(raw.get("CreatedAt", "")),
            labels={str(k): str(v) for k, v in labels.items()},
            anonymous=bool(raw.get("Anonymous", False)),
            type=kind,
            size=int(size) if kind == "disk" and isinstance(size, int) else None,
        )

    def get(self, name: str) -> Volume:
        return self._load(name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self._dir(name), RECORD))

    def list(self) -> list[Volume]:
        """Every volume, sorted by name (records that cannot be read are skipped)."""
        try:
            names = sorted(n for n in os.listdir(self.root) if not n.startswith("."))
        except FileNotFoundError:
            return []
        found: list[Volume] = []
        for name in names:
            try:
                found.append(self._load(name))
            except VolumeError:
                continue
        return found

    # --- creating --------------------------------------------------------------------------------
    def create(
        self,
        name: str | None = None,
        *,
        labels: dict[str, str] | None = None,
        anonymous: bool = False,
        type: str | None = None,
        size: int | None = None,
    ) -> tuple[Volume, bool]:
        """Create a volume (a random 64-hex name when `name` is None); (volume, True if it is new).
        `type`: "dir" (the default for a new volume) or "disk" (a qcow2 disk of `size` bytes, for VMs;
        `size` is required then).

        Creating a volume that exists returns it unchanged, as `docker volume create` does (an
        explicit `type` that differs from the existing volume's is an error)."""
        if type is not None and type not in TYPES:
            raise VolumeError(
                f"unknown volume type {type!r}: use dir (a directory) or disk (a qcow2 disk for VMs)"
            )
        if type == "disk" and size is None:
            raise VolumeError("a disk volume needs a size: give --size, e.g. --size 10G")
        if type != "disk" and size is not None:
            raise VolumeError("--size applies to disk volumes only: add --type disk")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise VolumeError(f"invalid disk volume size {size!r}: give a size such as 10G")
        if name is None:
            name = anonymous_name()
            anonymous = True
        validate_name(name)
        lock = self._lock()
        try:
            if self.exists(name):
                vol = self._load(name)
                if type is not None and vol.type != type:
                    raise VolumeError(
                        f"volume {name} already exists as a {vol.type} volume: remove it first "
                        f"(`cocon volume rm {name}`) or choose another name"
                    )
                return vol, False
            temp = os.path.join(self.root, f".tmp-{os.urandom(8).hex()}")
            try:
                os.mkdir(temp, 0o700)
                doc: dict[str, object] = {
                    "Name": name,
                    "CreatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "Labels": dict(labels or {}),
                    "Anonymous": anonymous,
                }
                if type == "disk":
                    from cocon.storage import qemu_img

                    qemu_img.create(os.path.join(temp, DISK), size, fmt="qcow2")
                    doc["Type"], doc["Size"] = "disk", size
                else:
                    os.mkdir(os.path.join(temp, DATA), 0o755)
                    os.chmod(os.path.join(temp, DATA), 0o755)
                with open(os.path.join(temp, RECORD), "w") as f:
                    f.write(_fastjson.dumps(doc))
                os.rename(temp, self._dir(name))
            except OSError as exc:
                _remove_tree(temp)
                raise VolumeError(f"cannot create volume {name} in {self.root}: {exc.strerror}") from None
            except VolumeError:
                _remove_tree(temp)
                raise
            return self._load(name), True
        finally:
            os.close(lock)

    # --- removing --------------------------------------------------------------------------------
    def remove(self, name: str, *, force: bool = False, in_use: Callable[[str], bool] | None = None) -> None:
        """Delete a volume and its data. Refused while `in_use(name)` says a container uses it; `force`
        only makes a missing volume not an error (as `docker volume rm -f`)."""
        lock = self._lock()
        try:
            if not os.path.lexists(self._dir(name)):
                if force:
                    return
                raise VolumeNotFound(f"no volume named {name!r}: `cocon volume ls` lists them")
            if in_use is not None and in_use(name):
                raise VolumeInUse(
                    f"volume {name} is in use by a container: remove the container first (`cocon rm`)"
                )
            home = self._dir(name)
            _refuse_if_mounted(home)
            trash = os.path.join(self.root, f".trash-{os.urandom(8).hex()}")
            try:
                os.rename(home, trash)
            except OSError as exc:
                raise VolumeError(f"cannot remove volume {name}: {exc.strerror}") from None
        finally:
            os.close(lock)
        _remove_tree(trash)

    def prune(
        self, *, all: bool = False, in_use: Callable[[str], bool] | None = None
    ) -> builtins.list[tuple[str, int]]:
        """Delete unused anonymous volumes (`all`: every unused volume), as `docker volume prune`;
        returns (name, bytes freed) for each."""
        removed: builtins.list[tuple[str, int]] = []
        for vol in self.list():
            if not (all or vol.anonymous):
                continue
            if in_use is not None and in_use(vol.name):
                continue
            size = disk_usage(vol.mountpoint)
            try:
                self.remove(vol.name, in_use=in_use)
            except VolumeNotFound:
                continue
            except VolumeInUse:
                continue
            removed.append((vol.name, size))
        return removed

    def clean_leftovers(self) -> None:
        """Delete what interrupted creates and removes left behind (`.tmp-*`, `.trash-*`)."""
        lock = self._lock()
        try:
            names = [n for n in os.listdir(self.root) if n.startswith((".tmp-", ".trash-"))]
        finally:
            os.close(lock)
        for n in names:
            _remove_tree(os.path.join(self.root, n))

    # --- filling ---------------------------------------------------------------------------------
    def _refuse_disk(self, name: str, what: str) -> None:
        vol = self._load(name)
        if vol.type == "disk":
            raise VolumeError(
                f"volume {name} is a disk volume: {what}; disk volumes attach to VMs only "
                "(use a directory volume to share files with containers)"
            )

    def is_empty(self, name: str) -> bool:
        self._refuse_disk(name, "it has no directory to look into")
        try:
            with os.scandir(self.data_dir(name)) as it:
                return next(it, None) is None
        except FileNotFoundError:
            raise VolumeNotFound(
                f"volume {name} has no data directory: remove it and create it again"
            ) from None

    def populate(self, name: str, rootfs: str, path: str) -> bool:
        """Copy what `rootfs` (a container's root, e.g. a mounted snapshot) has at `path` into the
        volume if the volume is empty, as Docker does for a new volume. Returns True if anything was
        copied. `path` is resolved inside `rootfs`; a missing path or a non-directory copies nothing."""
        self._refuse_disk(name, "files from the image cannot be copied into it")
        if not self.is_empty(name):
            return False
        return copy_tree_in_root(rootfs, path, self.data_dir(name))


# --- helpers ---------------------------------------------------------------------------------------
def _refuse_if_mounted(path: str) -> None:
    left = mounts_under(path)
    if left:
        raise VolumeError(
            f"{', '.join(left)} is mounted under {path}: unmount it first (is a container still using it?)"
        )


def _remove_tree(path: str) -> None:
    """Delete a directory tree that nothing is mounted under (checked first); never follows symlinks."""
    if not os.path.lexists(path):
        return
    _refuse_if_mounted(path)
    try:
        remove_tree(path)
    except OSError as exc:
        raise VolumeError(f"cannot delete {path}: {exc.strerror}; delete it by hand") from None


_SKIP_XATTRS = ("trusted.overlay.", "user.overlay.")


def _copy_meta(st: os.stat_result, name: str, dir_fd: int, *, is_link: bool = False) -> None:
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    if not is_link:
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    try:
        names = os.listxattr(src_fd)
    except OSError:
        return
    for n in names:
        if n.startswith(_SKIP_XATTRS):
            continue
        try:
            os.setxattr(dst_fd, n, os.getxattr(src_fd, n))
        except OSError:
            pass  # e.g. security.* the target filesystem refuses: not fatal, as with cp -a


def _copy_data(src: int, dst: int, size: int) -> None:
    remaining = size
    try:
        while remaining > 0:
            n = os.copy_file_range(src, dst, min(remaining, 1 << 30))
            if n == 0:
                return
            remaining -= n
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        while chunk := os.read(src, 1 << 20):
            os.write(dst, chunk)


def _copy_file(src_dir: int, dst_dir: int, name: str, st: os.stat_result) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_dir)  # fmt: skip
        try:
            _copy_data(src, dst, st.st_size)
            _copy_xattrs(src, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    _copy_meta(st, name, dst_dir)


def _copy_dir(src_fd: int, dst_fd: int, dst_root: int, rel: str, links: dict[tuple[int, int], str]) -> None:
    with os.scandir(src_fd) as it:
        names = [e.name for e in it]
    for name in names:
        st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
        mode = st.st_mode
        child_rel = f"{rel}/{name}" if rel else name
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            sub_src = os.open(
                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd
            )
            try:
                sub_dst = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                  dir_fd=dst_fd)  # fmt: skip
                try:
                    _copy_dir(sub_src, sub_dst, dst_root, child_rel, links)
                    _copy_xattrs(sub_src, sub_dst)
                finally:
                    os.close(sub_dst)
            finally:
                os.close(sub_src)
            _copy_meta(st, name, dst_fd)
            continue
        if st.st_nlink > 1:
            first = links.get((st.st_dev, st.st_ino))
            if first is not None:
                os.link(first, name, src_dir_fd=dst_root, dst_dir_fd=dst_fd, follow_symlinks=False)
                continue
            links[(st.st_dev, st.st_ino)] = child_rel
        if stat.S_ISREG(mode):
            _copy_file(src_fd, dst_fd, name, st)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
            _copy_meta(st, name, dst_fd, is_link=True)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
            os.mknod(name, mode, st.st_rdev, dir_fd=dst_fd)
            _copy_meta(st, name, dst_fd)
        # sockets are not copied (they mean nothing without their process), as in Docker


def copy_tree_in_root(rootfs: str, path: str, dest: str) -> bool:
    """Copy the directory `path` of the tree `rootfs` (resolved as if `rootfs` were `/`) into the
    existing directory `dest`; the top directory's owner and mode go to `dest`. False if `path` is
    missing or not a directory."""
    from cocon import _linux

    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            src = _linux.openat2(
                root_fd,
                path,
                os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                _linux.RESOLVE_IN_ROOT | _linux.RESOLVE_NO_MAGICLINKS,
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            raise VolumeError(f"cannot read {path} in the image to fill a volume: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    try:
        dst = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            try:
                _copy_dir(src, dst, dst, "", {})
                st = os.fstat(src)
                os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                _copy_xattrs(src, dst)
            except OSError as exc:
                raise VolumeError(
                    f"cannot copy {path} from the image into the volume at {dest}: {exc.strerror}"
                    + (f" ({exc.filename})" if exc.filename else "")
                ) from None
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return True
