"""Root disks of full VMs (`--isolation vm`): one cached base disk per OCI image, one copy-on-write
overlay per instance.

Layout under the root (the engine's is `$COCON_ROOT/disks`):

    images/<hex>.qcow2              the base disk of an image (read-only once built; shared)
    images/.<hex>.lock              flock(2): one build of an image at a time, across processes
    images/.build-<hex>-<random>/   a build in progress (removed when it ends, or by gc_images)
    instances/<id>/root.qcow2       an instance's overlay (backing file: its image's base)

A base disk is a whole-disk ext4 filesystem (no partition table, label `cocon-root`) made by
`mkfs.ext4 -d ROOTFS` on a sparse raw file, then converted to qcow2 so that unused space takes
nothing. It keeps ownership, modes, device nodes, symlinks, hard links and extended attributes of the
rootfs. The guest mounts it as `root=LABEL=cocon-root` (or /dev/vda) with no partition to find.

See docs/vm-disks.md.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import subprocess
from collections.abc import Callable

from cocon.storage import qemu_img
from cocon.storage.fsutil import remove_tree
from cocon.storage.qemu_img import DiskError

DEFAULT_SIZE = 8 << 30  # 8 GiB: virtual; an image's base takes what its files take
ROOT_LABEL = "cocon-root"
ROOT_DISK = "root.qcow2"
MIN_SIZE = 16 << 20  # ext4 with a journal needs a few MiB; below this nothing useful fits

_IMAGE_ID = re.compile(r"(?:sha256:)?(?P<hex>[0-9a-f]{12,128})")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_NO_SPACE = ("Could not allocate", "No space left", "not enough space", "Filesystem too small")

Progress = Callable[[str], None]


def image_key(image_id: str) -> str:
    """The hex part of an image ID (`sha256:<hex>` or `<hex>`); anything else is refused (it becomes
    a file name)."""
    m = _IMAGE_ID.fullmatch(image_id) if isinstance(image_id, str) else None
    if m is None:
        raise DiskError(
            f"invalid image ID {image_id!r}: expected a hex digest (sha256:<hex> or <hex>, lower case)"
        )
    return m["hex"]


def _base_key(image_id: str, size: int) -> str:
    """The file name (without .qcow2) of an image's base disk: its hex ID, `.SIZE` when not the default."""
    key = image_key(image_id)
    return key if size == DEFAULT_SIZE else f"{key}.{size}"


def validate_instance_id(instance_id: str) -> str:
    if not isinstance(instance_id, str) or _INSTANCE_ID.fullmatch(instance_id) is None:
        raise DiskError(
            f"invalid instance ID {instance_id!r}: use letters, digits, '_', '.', '-' (at most 128), "
            "starting with a letter or digit"
        )
    return instance_id


def qcow2_backing_file(path: str) -> str | None:
    """The backing file name recorded in a qcow2 header (None for none, or for a file that is not
    qcow2). Read directly, without qemu-img: works while a VM holds the image."""
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != qemu_img.QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if not offset or not size or size > 4096:
            return None
        f.seek(offset)
        return f.read(size).decode("utf-8", "surrogateescape")


class VmDisks:
    """Base disks of images and overlays of instances under `root`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.images_dir = os.path.join(self.root, "images")
        self.instances_dir = os.path.join(self.root, "instances")

    # --- paths ---------------------------------------------------------------------------------------
    def image_path(self, image_id: str, size: int = DEFAULT_SIZE) -> str:
        return os.path.join(self.images_dir, f"{_base_key(image_id, size)}.qcow2")

    def instance_dir(self, instance_id: str) -> str:
        return os.path.join(self.instances_dir, validate_instance_id(instance_id))

    def instance_path(self, instance_id: str) -> str:
        return os.path.join(self.instance_dir(instance_id), ROOT_DISK)

    def _makedirs(self, path: str) -> None:
        try:
            os.makedirs(path, 0o700, exist_ok=True)
        except OSError as exc:
            raise DiskError(f"cannot create {path}: {exc.strerror}") from None

    # --- locking ---------------------------------------------------------------------------------------
    def _lock_path(self, key: str) -> str:
        return os.path.join(self.images_dir, f".{key}.lock")

    def _lock(self, key: str, *, wait: bool = True) -> int | None:
        """flock the image's lock file (exclusive); None if `wait` is false and another holds it. The
        lock file is checked to be still the one at its path after locking (gc removes lock files)."""
        path = self._lock_path(key)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise DiskError(f"cannot open the lock {path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # removed (by gc) while we waited: lock the new one

    # --- base disks of images --------------------------------------------------------------------------
    def cached_image_base(self, image_id: str, size: int = DEFAULT_SIZE) -> str | None:
        """The base disk of `image_id` (of `size`) if it is built, else None (no rootfs needed to ask)."""
        path = self.image_path(image_id, size)
        return path if os.path.isfile(path) else None

    def image_base(
        self, image_id: str, rootfs_dir: str, *, size: int = DEFAULT_SIZE, progress: Progress | None = None
    ) -> str:
        """The base disk of image `image_id` (its unpacked root filesystem is `rootfs_dir`): built on
        first use, then reused; one per size (a filesystem of that size: a VM with a larger root disk
        needs no resize in its guest). Concurrent callers (other processes too) wait for one build."""
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
            image_key(image_id)  # a bad ID is the first thing to say
            raise DiskError(
                f"invalid root disk size {size!r}: give at least {qemu_img.format_size(MIN_SIZE)}, "
                "e.g. --disk-size 8G"
            )
        key = _base_key(image_id, size)
        final = os.path.join(self.images_dir, f"{key}.qcow2")
        if os.path.isfile(final):
            return final
        if not os.path.isdir(rootfs_dir):
            raise DiskError(f"the root filesystem {rootfs_dir} of image {image_id} is not a directory")
        self._makedirs(self.images_dir)
        lock = self._lock(key)
        assert lock is not None
        try:
            if os.path.isfile(final):
                return final  # another process built it while we waited
            build = os.path.join(self.images_dir, f".build-{key}-{os.urandom(6).hex()}")
            try:
                os.mkdir(build, 0o700)
                self._build(image_id, rootfs_dir, size, build, final, progress)
            except OSError as exc:
                raise DiskError(f"cannot build the root disk of image {image_id}: {exc.strerror}") from None
            finally:
                remove_tree(build)
            return final
        finally:
            os.close(lock)

    def _build(
        self, image_id: str, rootfs: str, size: int, build: str, final: str, progress: Progress | None
    ) -> None:
        raw = os.path.join(build, "root.raw")
        with open(raw, "wb") as f:
            f.truncate(size)  # sparse: only what mkfs writes takes space
        if progress:
            progress(f"making an ext4 filesystem of {qemu_img.format_size(size)} from the image's files")
        st = os.stat(rootfs)
        _tool(
            ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-E", f"root_owner={st.st_uid}:{st.st_gid}",
             "-d", rootfs, raw],
            f"making the root filesystem of image {image_id}",
            too_small=size,
        )  # fmt: skip
        # mkfs gives the root directory 0755; keep the image's mode of `/`
        mode = st.st_mode & 0o7777
        if mode != 0o755:
            _tool(
                ["debugfs", "-w", "-R", f"set_inode_field / mode 0{0o040000 | mode:o}", raw],
                f"setting the mode of / in the root filesystem of image {image_id}",
            )
        if progress:
            progress("converting the root filesystem to qcow2")
        temp = os.path.join(build, "root.qcow2")
        qemu_img.convert(raw, temp, "qcow2")
        os.chmod(temp, 0o444)  # shared by every instance of the image: nothing writes it
        fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)
        dfd = os.open(self.images_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def list_images(self) -> list[str]:
        """The hex IDs of the images that have a base disk."""
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        keys = (n[: -len(".qcow2")] for n in names if n.endswith(".qcow2") and not n.startswith("."))
        return sorted({key.split(".")[0] for key in keys})  # one per image, whatever its sizes

    # --- instance overlays -----------------------------------------------------------------------------
    def instance_disk(self, instance_id: str, base: str, *, size: int | None = None) -> str:
        """The root disk of an instance: a qcow2 overlay of `base` (made once; an existing one is
        returned as it is, so a VM keeps its disk across stop and start). With `size` larger than the
        base, the overlay's virtual size is `size` (the guest grows its filesystem)."""
        path = self.instance_path(instance_id)
        if os.path.exists(path):
            return path
        base = os.path.abspath(base)
        base_info = qemu_img.info(base, force_share=True)
        if base_info.format != "qcow2":
            raise DiskError(f"the base disk {base} is {base_info.format}, not qcow2: build it again")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise DiskError(f"invalid disk size {size!r}: give a size such as 20G")
            if size < base_info.virtual_size:
                raise DiskError(
                    f"a disk of {qemu_img.format_size(size)} is smaller than the image's root disk "
                    f"({qemu_img.format_size(base_info.virtual_size)}): give --disk-size "
                    f"{qemu_img.format_size(base_info.virtual_size)} or more"
                )
        self._makedirs(self.instance_dir(instance_id))
        try:
            qemu_img.create(
                path, size or base_info.virtual_size, fmt="qcow2", backing=base, backing_fmt="qcow2"
            )
        except DiskError:
            if os.path.exists(path):  # made by a concurrent call for the same instance
                return path
            raise
        return path

    def remove_instance(self, instance_id: str) -> None:
        """Delete an instance's disks (no error if it has none)."""
        d = self.instance_dir(instance_id)
        try:
            remove_tree(d)
        except OSError as exc:
            raise DiskError(f"cannot delete {d}: {exc.strerror}; delete it by hand") from None

    def list_instances(self) -> list[str]:
        """IDs of the instances that have a disk directory."""
        try:
            with os.scandir(self.instances_dir) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    # --- garbage collection ----------------------------------------------------------------------------
    def _referenced_bases(self) -> set[str] | None:
        """Real paths of the bases that instance overlays name as backing files (None when an overlay
        cannot be read: then nothing may be removed)."""
        found: set[str] = set()
        for iid in self.list_instances():
            d = os.path.join(self.instances_dir, iid)
            try:
                names = os.listdir(d)
            except OSError:
                return None
            for name in names:
                p = os.path.join(d, name)
                try:
                    backing = qcow2_backing_file(p)
                except IsADirectoryError:
                    continue
                except OSError:
                    return None
                if backing:
                    found.add(os.path.realpath(os.path.join(d, backing)))
        return found

    def gc_images(self, in_use: set[str]) -> list[str]:
        """Remove the base disks of images not in `in_use` (image IDs) that no instance overlay still
        uses as its backing file; returns the hex IDs removed. Builds in progress are left alone; what
        interrupted builds left is removed."""
        keep = {image_key(i) for i in in_use}
        referenced = self._referenced_bases()
        if referenced is None:
            return []  # an overlay cannot be read: removing a base could break it
        removed: list[str] = []
        try:
            names = os.listdir(self.images_dir)
        except FileNotFoundError:
            return []
        keys = {n[:-6] for n in names if n.endswith(".qcow2") and not n.startswith(".")}
        builds = {n.split("-")[1] for n in names if n.startswith(".build-") and n.count("-") >= 2}
        for key in sorted(keys | builds):
            lock = self._lock(key, wait=False)
            if lock is None:
                continue  # being built now
            try:
                for n in names:
                    if n.startswith(f".build-{key}-"):
                        remove_tree(os.path.join(self.images_dir, n))
                path = os.path.join(self.images_dir, f"{key}.qcow2")
                if key not in keys:  # only what a killed build left: its lock goes too
                    os.unlink(self._lock_path(key))
                    continue
                if key.split(".")[0] in keep or os.path.realpath(path) in referenced:
                    continue
                os.unlink(path)
                os.unlink(self._lock_path(key))
                if key.split(".")[0] not in removed:
                    removed.append(key.split(".")[0])
            except OSError as exc:
                raise DiskError(f"cannot remove the base disk of image {key}: {exc.strerror}") from None
            finally:
                os.close(lock)
        return removed


def _tool(argv: list[str], what: str, *, too_small: int | None = None) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    except FileNotFoundError:
        raise DiskError(f"{argv[0]} is not installed: install it with `apt-get install e2fsprogs`") from None
    except OSError as exc:
        raise DiskError(f"{what}: cannot run {argv[0]}: {os.strerror(exc.errno or errno.EIO)}") from None
    if proc.returncode != 0:
        err = " ".join((proc.stderr or proc.stdout).split())[:800]
        if too_small is not None and any(s in err for s in _NO_SPACE):
            raise DiskError(
                f"the image's files do not fit in a root disk of {qemu_img.format_size(too_small)} "
                f"({err}): give a larger one with --disk-size, e.g. --disk-size "
                f"{qemu_img.format_size(too_small * 2)}"
            )
        raise DiskError(f"{what} failed: {err}")
