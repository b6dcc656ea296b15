"""Container root filesystems for `cocon run`'s hot path: overlay snapshots without importing
`cocon.snapshots`.

`cocon.snapshots` (dataclasses, `re`, `tempfile`, `shutil`, `json`, …) costs about 20 ms to import,
more than a container's whole start-up. The common case — an image whose layers are unpacked,
a writable overlay whose `lowerdir` list fits in one page — is done here, in the snapshotter's own
on-disk format (docs/snapshots.md, "Layout on disk"), under the same `flock`:

- `prepare` builds `tmp/<pid>-active-<random>/{upper,work,merged,snapshot.json}` and renames it to
  `active/<key>` (so `OverlaySnapshotter` sees, mounts, lists and removes these snapshots as its own);
- `mount` mounts the overlay with the snapshotter's options (`index=off`, `redirect_dir=off`,
  `metacopy=off`, `userxattr` in a user namespace) at `active/<key>/merged`, plus `volatile` for a
  container that is removed when it exits (no sync of the upper filesystem at unmount);
- `remove` unmounts, renames `active/<key>` into `tmp/` and deletes it, after checking that nothing
  is mounted under it.

Everything else (no layers, a read-only snapshot, a `lowerdir` list that needs the short links) returns
None from `prepare`, and the caller uses `OverlaySnapshotter`. A test checks that the snapshotter
reads what this module writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from cocon import _fastjson
from cocon import _linux as linux

_PAGE = 4096
_features: str | None = None


class RootfsError(Exception):
    """A snapshot could not be prepared, mounted or removed; the message says what to do."""


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            lines = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return lines != [["0", "0", "4294967295"]]


def feature_options() -> str:
    """The snapshotter's feature options (cocon.snapshots.probe.overlay_feature_options), joined."""
    global _features
    if _features is None:
        opts = []
        for name, since in (("index", (4, 13)), ("redirect_dir", (4, 10)), ("metacopy", (4, 19))):
            if os.path.exists(f"/sys/module/overlay/parameters/{name}") or _kernel_at_least(*since):
                opts.append(f"{name}=off")
        if _in_user_namespace() and _kernel_at_least(5, 11):
            opts.append("userxattr")
        _features = ",".join(opts)
    return _features


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def _hex(chain_id: str) -> str:
    return chain_id.partition(":")[2]


def mount_data(root: str, key: str, parents: tuple[str, ...] | list[str]) -> str | None:
    """The overlay mount data of a writable snapshot, or None when it does not fit in one page."""
    active = f"{root}/active/{key}"
    lowers = ":".join(_escape(f"{root}/layers/{_hex(p)}/fs") for p in reversed(parents))
    data = f"lowerdir={lowers},upperdir={_escape(active + '/upper')},workdir={_escape(active + '/work')}"
    features = feature_options()
    if features:
        data += "," + features
    return data if len(data.encode()) + 1 <= _PAGE else None


class _Lock:
    def __init__(self, root: str) -> None:
        self.fd = os.open(f"{root}/lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)


def layers_present(root: str, parents: tuple[str, ...] | list[str]) -> bool:
    return all(os.path.isdir(f"{root}/layers/{_hex(p)}/fs") for p in parents)


def prepare(root: str, key: str, parents: tuple[str, ...] | list[str]) -> bool:
    """Create the writable snapshot `key` over `parents` (ChainIDs, lowest first) in the snapshotter
    rooted at `root` (an absolute, resolved path). False when this case is left to OverlaySnapshotter
    (no parents, a missing layer, mount data longer than a page)."""
    if not parents or mount_data(root, key, parents) is None:
        return False
    lock = _Lock(root)
    try:
        active = f"{root}/active/{key}"
        if os.path.lexists(active):
            raise RootfsError(f"snapshot {key} already exists: remove it first or use another key")
        if not layers_present(root, parents):
            return False
        temp = f"{root}/tmp/{os.getpid()}-active-{os.urandom(6).hex()}"
        try:
            os.mkdir(temp, 0o700)
            for name, mode in (("upper", 0o755), ("work", 0o711), ("merged", 0o755)):
                os.mkdir(f"{temp}/{name}")
                os.chmod(f"{temp}/{name}", mode)
            with open(f"{temp}/snapshot.json", "w") as f:
                f.write(
                    _fastjson.dumps(
                        {
                            "key": key,
                            "parents": list(parents),
                            "readonly": False,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        }
                    )
                )
            os.rename(temp, active)
        except OSError as exc:
            _rmtree(temp)
            raise RootfsError(f"cannot create snapshot {key} in {root}: {exc.strerror}") from None
        return True
    finally:
        lock.release()


def mount(root: str, key: str, parents: tuple[str, ...] | list[str], *, volatile: bool = False) -> str:
    """Mount the writable snapshot `key` at `active/<key>/merged` (nothing to do if mounted).

    `volatile` (Linux 5.10+) for a snapshot that is deleted when its container exits (`--rm`):
    overlay then skips syncing the upper filesystem, which otherwise happens at every unmount and
    flushes everything dirty on the filesystem that holds it. After a crash such an upper dir cannot
    be mounted again, which does not matter for a snapshot nobody mounts again."""
    merged = f"{root}/active/{key}/merged"
    data = mount_data(root, key, parents)
    if data is None:
        raise RootfsError(f"snapshot {key}: its layers need the snapshotter's short links to mount")
    if volatile and _kernel_at_least(5, 10) and len(data) + len(",volatile") + 1 <= _PAGE:
        data += ",volatile"
    lock = _Lock(root)
    try:
        if not os.path.isdir(merged):
            raise RootfsError(f"no snapshot {key} in {root}: the container's root filesystem is gone")
        if os.path.ismount(merged):
            return merged
        try:
            linux.mount("overlay", merged, "overlay", 0, data)
        except OSError as exc:
            raise RootfsError(
                f"cannot mount the root filesystem of {key} at {merged}: {exc.strerror}"
                + (
                    "; is the layer store on overlayfs or missing d_type/xattr support? "
                    "`dmesg | grep overlayfs` has the kernel's reason"
                    if exc.errno in (errno.EINVAL, errno.ENODEV)
                    else ""
                )
            ) from None
        return merged
    finally:
        lock.release()


def _unmount(path: str) -> None:
    for _ in range(16):
        if not os.path.ismount(path):
            return
        try:
            linux.umount2(path, 0)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                linux.umount2(path, linux.MNT_DETACH)
            elif exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            else:
                raise RootfsError(f"cannot unmount {path}: {exc.strerror}") from None
    raise RootfsError(f"{path} is still mounted after 16 unmounts: check /proc/self/mountinfo")


def unmount(root: str, key: str) -> None:
    """Unmount the snapshot's merged dir (plain umount; MNT_DETACH only if busy). Idempotent."""
    merged = f"{root}/active/{key}/merged"
    lock = _Lock(root)
    try:
        if os.path.isdir(merged):
            _unmount(merged)
    finally:
        lock.release()


def _mounted_under(path: str) -> bool:
    prefix = path.rstrip("/") + "/"
    esc = prefix.replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011").replace("\n", "\\012")
    needle = (" " + esc).encode()
    with open("/proc/self/mountinfo", "rb") as f:
        data = f.read()
    return needle in data or (" " + esc.rstrip("/") + " ").encode() in data


def remove(root: str, key: str) -> None:
    """Unmount and delete the snapshot `key` with its upper dir. Idempotent."""
    active = f"{root}/active/{key}"
    lock = _Lock(root)
    try:
        if not os.path.lexists(active):
            return
        merged = f"{active}/merged"
        if os.path.isdir(merged):
            _unmount(merged)
        if _mounted_under(active):
            raise RootfsError(
                f"cannot remove snapshot {key}: something is still mounted under {active}; unmount it first"
            )
        trash = f"{root}/tmp/{os.getpid()}-rm-{os.urandom(6).hex()}"
        try:
            os.rename(active, trash)
        except OSError as exc:
            raise RootfsError(f"cannot remove snapshot {key}: {exc.strerror}") from None
    finally:
        lock.release()
    _rmtree(trash)


def _rmtree(path: str) -> None:
    from cocon.storage.fsutil import remove_tree

    try:
        remove_tree(path)
    except OSError as exc:
        raise RootfsError(
            f"cannot delete {path}: {exc.strerror}; delete it by hand (the snapshotter's gc retries "
            "after this process exits)"
        ) from None
