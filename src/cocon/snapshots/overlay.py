"""The overlayfs snapshotter: image layers unpacked once, container root filesystems as overlays.

Layout under `root` (see docs/snapshots.md):

    layers/<hex>/fs          a layer's content, in overlay format (its own changes only)
    layers/<hex>/chainid     the layer's full ChainID
    l/<short>                -> ../layers/<hex>/fs, short names for long lowerdir lists
    active/<key>/upper       the snapshot's writable layer (empty and unused when read-only)
    active/<key>/work        overlay's work dir
    active/<key>/merged      where the snapshot is mounted
    active/<key>/snapshot.json   {"key", "parents", "readonly", "created"}
    tmp/<pid>-…              layers being filled, and directories being deleted
    lock                     flock(2) serialising metadata changes between processes

Every change becomes visible through one rename(2): a layer appears complete or not at all, and a
snapshot exists with its record or not at all.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from _thread import RLock

from cocon import _fastjson
from cocon import _linux as linux
from cocon._typing import TYPE_CHECKING, record
from cocon.snapshots.chain import digest_hex, validate_digest
from cocon.snapshots.errors import SnapshotError, errtext
from cocon.snapshots.mounts import is_mountpoint, mount_from, mounts_under, unmount_all
from cocon.snapshots.probe import (
    OVERLAY_MAX_STACK,
    escape_option_path,
    overlay_feature_options,
    overlay_unsupported_reason,
    overlay_volatile_supported,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import TracebackType

RECORD = "snapshot.json"
CHAINID_FILE = "chainid"
SHORT_ID_LEN = 20  # base32 characters of the chain id's digest: 100 bits
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648's alphabet
_KEY_FIRST = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_KEY_CHARS = _KEY_FIRST | frozenset("_.+-")


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not (
        0 < len(key) <= 128 and key[0] in _KEY_FIRST and _KEY_CHARS.issuperset(key)
    ):
        raise SnapshotError(
            f"invalid snapshot key {key!r}: use 1 to 128 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )
    return key


@record(frozen=True)
class Snapshot:
    """An active snapshot: how to mount it and where.

    `kind` is "overlay" or "bind". For a bind snapshot `mount_source_options()` is
    ("bind", <dir>, "rbind,rw" | "rbind,ro"), in the runtime-spec style. For an overlay it is
    ("overlay", "overlay", <mount data>); when `mount_cwd` is set the paths in the data are relative
    to it (the absolute list did not fit in the one page mount(2) accepts), and mount(2) must be
    called with that working directory, e.g. from a forked child.
    """

    key: str
    parents: tuple[str, ...]
    readonly: bool
    kind: str
    path: str
    upper: str
    fstype: str
    source: str
    options: str
    mount_cwd: str | None = None

    def mount_source_options(self) -> tuple[str, str, str]:
        return (self.fstype, self.source, self.options)


@record(frozen=True)
class _Record:
    key: str
    parents: tuple[str, ...]
    readonly: bool


class OverlaySnapshotter:
    """Layers keyed by ChainID under `root/layers`, active snapshots under `root/active`."""

    def __init__(self, root: str) -> None:
        try:
            os.makedirs(root, 0o700, exist_ok=True)
            self.root = os.path.realpath(root)
            for sub in ("layers", "l", "active", "tmp"):
                os.makedirs(os.path.join(self.root, sub), 0o700, exist_ok=True)
        except OSError as e:
            raise SnapshotError(f"cannot create the snapshot root {root}: {errtext(e)}") from e
        self._thread_lock = RLock()  # threading.RLock, without importing threading
        self._lock_fd = -1
        self._lock_depth = 0

    # --- paths ---------------------------------------------------------------------------------
    def _layer_home(self, chain_id: str) -> str:
        return os.path.join(self.root, "layers", digest_hex(chain_id))

    def layer_dir(self, chain_id: str) -> str:
        """Where the layer's content lives: `<root>/layers/<hex>/fs`."""
        return os.path.join(self._layer_home(chain_id), "fs")

    @staticmethod
    def short_id(chain_id: str) -> str:
        """The name of the layer's link in `<root>/l/`: the first 20 base32 characters (RFC 4648) of
        its digest's bytes."""
        hexpart = digest_hex(chain_id)
        bits = int(hexpart[:26], 16) >> 4  # the first 104 bits, then the first 100
        return "".join(_BASE32[(bits >> (5 * i)) & 31] for i in range(SHORT_ID_LEN - 1, -1, -1))

    def _link(self, chain_id: str) -> str:
        return os.path.join(self.root, "l", self.short_id(chain_id))

    def _active(self, key: str) -> str:
        return os.path.join(self.root, "active", validate_key(key))

    # --- locking -------------------------------------------------------------------------------
    def _locked(self) -> _Locked:
        """Exclusive across processes (flock) and threads (RLock); re-entrant within a thread."""
        return _Locked(self)

    def _lock(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._lock_depth == 0:
                fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._lock_fd = fd
            self._lock_depth += 1
        except BaseException:
            self._thread_lock.release()
            raise

    def _unlock(self) -> None:
        try:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                fd, self._lock_fd = self._lock_fd, -1
                os.close(fd)
        finally:
            self._thread_lock.release()

    def _make_temp(self, kind: str) -> str:
        """A new empty directory `tmp/<pid>-<kind>-<random>` (mode 0700): the pid lets gc_layers
        delete what a process that died left behind."""
        base = os.path.join(self.root, "tmp")
        for _ in range(100):
            path = os.path.join(base, f"{os.getpid()}-{kind}-{os.urandom(6).hex()}")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            return path
        raise FileExistsError(errno.EEXIST, "no free temporary name", base)

    def _trash(self, path: str) -> str:
        """Move `path` into tmp/ (atomically out of sight) and return its new name."""
        base = os.path.join(self.root, "tmp")
        for _ in range(100):
            target = os.path.join(base, f"{os.getpid()}-rm-{os.urandom(6).hex()}")
            if os.path.lexists(target):
                continue
            os.rename(path, target)
            return target
        raise FileExistsError(errno.EEXIST, "no free temporary name", base)

    # --- layers --------------------------------------------------------------------------------
    def has_layer(self, chain_id: str) -> bool:
        return os.path.isdir(self.layer_dir(chain_id))

    def list_layers(self) -> list[str]:
        """ChainIDs of the committed layers."""
        found = []
        for name in os.listdir(os.path.join(self.root, "layers")):
            home = os.path.join(self.root, "layers", name)
            try:
                with open(os.path.join(home, CHAINID_FILE)) as f:
                    chain_id = f.read().strip()
            except OSError:
                chain_id = ("sha256:" if len(name) == 64 else "sha512:") + name
            try:
                if digest_hex(chain_id) == name:
                    found.append(chain_id)
            except SnapshotError:
                continue
        return sorted(found)

    def add_layer(self, chain_id: str, fill: Callable[[str], None], *, sync: bool = False) -> str:
        """Create the layer `chain_id` by calling `fill(dir)` on an empty temporary directory.

        `fill` applies the layer's diff onto nothing and must leave overlay-format content: deleted
        paths as 0:0 character devices (`overlay_whiteout`), opaque directories with the overlay
        opaque xattr (`overlay_opaque`). The directory is then renamed into place, so the layer
        appears complete or not at all. If the layer exists already, `fill` is not called. When two
        callers add the same layer at once, both fill, one rename wins and the other's copy is
        discarded; both return the same path. If `fill` raises, its directory is deleted and the
        exception propagates unchanged. `sync=True` flushes the filesystem (syncfs) before the rename.
        """
        validate_digest(chain_id, "chain id")
        final = self._layer_home(chain_id)
        if self.has_layer(chain_id):
            self._ensure_link(chain_id)
            return self.layer_dir(chain_id)
        try:
            temp = self._make_temp("layer")
        except OSError as e:
            raise SnapshotError(
                f"cannot create a temporary layer directory in {self.root}: {errtext(e)}"
            ) from e
        committed = False
        try:
            fs = os.path.join(temp, "fs")
            os.mkdir(fs)
            os.chmod(fs, 0o755)
            fill(fs)
            with open(os.path.join(temp, CHAINID_FILE), "w") as f:
                f.write(chain_id + "\n")
            if sync:
                _syncfs(temp)
            try:
                os.rename(temp, final)
                committed = True
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not self.has_layer(chain_id):
                    raise SnapshotError(f"cannot commit layer {chain_id} to {final}: {errtext(e)}") from e
                # Another process committed the same layer first: keep theirs, drop ours.
        finally:
            if not committed:
                _rmtree(temp, f"temporary directory of layer {chain_id}")
        self._ensure_link(chain_id)
        return self.layer_dir(chain_id)

    def _ensure_link(self, chain_id: str) -> None:
        link = self._link(chain_id)
        target = os.path.join("..", "layers", digest_hex(chain_id), "fs")
        try:
            os.symlink(target, link)
        except FileExistsError:
            try:
                current = os.readlink(link)
            except OSError as e:
                raise SnapshotError(f"{link} exists but is not a symlink: remove it") from e
            if current != target:
                if not os.path.exists(link):  # dangling: its layer is gone, the name is free
                    try:
                        os.unlink(link)
                    except FileNotFoundError:
                        pass
                    self._ensure_link(chain_id)
                    return
                raise SnapshotError(
                    f"short layer name {os.path.basename(link)} of {chain_id} is taken by {current}: "
                    "two layers share a 100-bit digest prefix; remove one of them"
                ) from None
        except OSError as e:
            raise SnapshotError(f"cannot create the layer link {link}: {errtext(e)}") from e

    def remove_layer(self, chain_id: str) -> None:
        """Delete a layer; refused while an active snapshot has it as a parent. Idempotent."""
        validate_digest(chain_id, "chain id")
        with self._locked():
            users = [r.key for r in self._records() if chain_id in r.parents]
            if users:
                raise SnapshotError(
                    f"layer {chain_id} is in use by active snapshot(s) {', '.join(users)}: remove them first"
                )
            trash = self._take_layer(chain_id)
        if trash:
            _rmtree(trash, f"layer {chain_id}")

    def _take_layer(self, chain_id: str) -> str | None:
        """Under the lock: move the layer out of layers/ and drop its link; the trash path or None."""
        home = self._layer_home(chain_id)
        trash = None
        if os.path.lexists(home):
            try:
                trash = self._trash(home)
            except OSError as e:
                raise SnapshotError(f"cannot remove layer {chain_id}: {errtext(e)}") from e
        link = self._link(chain_id)
        try:
            if os.readlink(link) == os.path.join("..", "layers", digest_hex(chain_id), "fs"):
                os.unlink(link)
        except OSError:
            pass
        return trash

    def gc_layers(self, keep: Iterable[str]) -> list[str]:
        """Delete every layer neither in `keep` nor used by an active snapshot; return their ids.

        Also deletes leftovers of processes that died mid-operation (tmp/) and dangling links.
        """
        keep_set = {validate_digest(k, "chain id") for k in keep}
        trash: list[str] = []
        removed: list[str] = []
        with self._locked():
            used = {p for r in self._records() for p in r.parents}
            for chain_id in self.list_layers():
                if chain_id in keep_set or chain_id in used:
                    continue
                t = self._take_layer(chain_id)
                if t:
                    trash.append(t)
                removed.append(chain_id)
            links = os.path.join(self.root, "l")
            for name in os.listdir(links):
                path = os.path.join(links, name)
                if os.path.islink(path) and not os.path.exists(path):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            tmp = os.path.join(self.root, "tmp")
            for name in os.listdir(tmp):
                pid = name.split("-", 1)[0]
                if pid.isdigit() and not _pid_alive(int(pid)):
                    trash.append(os.path.join(tmp, name))
        for t in trash:
            _rmtree(t, "leftover directory")
        return sorted(removed)

    # --- snapshots -----------------------------------------------------------------------------
    def prepare(self, key: str, parents: Sequence[str], *, readonly: bool = False) -> Snapshot:
        """Create the active snapshot `key` over `parents` (ChainIDs, lowest layer first).

        No parents: a plain directory (the upper dir), bind-mounted. One parent and read-only: a
        read-only bind of that layer. Otherwise an overlay. The snapshot is not mounted: call
        `mount(key)`, or mount `mount_source_options()` yourself.
        """
        validate_key(key)
        if isinstance(parents, str):
            raise SnapshotError("parents must be a sequence of chain ids, not a single string")
        parents = tuple(validate_digest(p, "parent chain id") for p in parents)
        if len(set(parents)) != len(parents):
            raise SnapshotError(f"snapshot {key}: a layer appears twice in its parents {list(parents)}")
        if len(parents) > OVERLAY_MAX_STACK:
            raise SnapshotError(
                f"snapshot {key}: {len(parents)} layers exceed overlayfs's limit of {OVERLAY_MAX_STACK}; "
                "squash the image"
            )
        record = _Record(key, parents, readonly)
        active = self._active(key)
        with self._locked():
            if os.path.lexists(active):
                raise SnapshotError(f"snapshot {key} already exists: remove it first or use another key")
            missing = [p for p in parents if not self.has_layer(p)]
            if missing:
                raise SnapshotError(f"snapshot {key}: missing layer(s) {', '.join(missing)}: add them first")
            for p in parents:
                self._ensure_link(p)
            snap = self._describe(record)  # fails early when the mount data cannot fit
            try:
                temp = self._make_temp("active")
            except OSError as e:
                raise SnapshotError(f"cannot create snapshot {key} in {self.root}: {errtext(e)}") from e
            committed = False
            try:
                for name, mode in (("upper", 0o755), ("work", 0o711), ("merged", 0o755)):
                    os.mkdir(os.path.join(temp, name))
                    os.chmod(os.path.join(temp, name), mode)
                with open(os.path.join(temp, RECORD), "w") as f:
                    f.write(
                        _fastjson.dumps(
                            {
                                "key": key,
                                "parents": list(parents),
                                "readonly": readonly,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            }
                        )
                    )
                os.rename(temp, active)
                committed = True
            except OSError as e:
                raise SnapshotError(f"cannot create snapshot {key} in {active}: {errtext(e)}") from e
            finally:
                if not committed:
                    _rmtree(temp, f"temporary directory of snapshot {key}")
        return snap

    def _read_record(self, key: str) -> _Record:
        path = os.path.join(self._active(key), RECORD)
        try:
            with open(path, "rb") as f:
                raw = _fastjson.loads(f.read())
        except FileNotFoundError:
            raise SnapshotError(f"no active snapshot {key!r}: prepare it first") from None
        except (OSError, ValueError) as e:
            raise SnapshotError(f"cannot read the record of snapshot {key} ({path}): {e}") from e
        try:
            parents = tuple(validate_digest(p, "parent chain id") for p in raw["parents"])
            if raw["key"] != key:
                raise ValueError(f"it names key {raw['key']!r}")
            return _Record(key, parents, bool(raw["readonly"]))
        except (KeyError, TypeError, ValueError, SnapshotError) as e:
            raise SnapshotError(f"the record of snapshot {key} ({path}) is corrupt: {e}") from e

    def _records(self) -> list[_Record]:
        """Every active snapshot's record. A corrupt one raises: its parents could be any layer, so
        deleting layers must stop until that snapshot is removed."""
        return [self._read_record(key) for key in self.list_active()]

    def _describe(self, record: _Record) -> Snapshot:
        active = self._active(record.key)
        upper, work, merged = (os.path.join(active, n) for n in ("upper", "work", "merged"))
        parents = record.parents

        def make(kind: str, fstype: str, source: str, options: str, cwd: str | None = None) -> Snapshot:
            return Snapshot(
                key=record.key,
                parents=parents,
                readonly=record.readonly,
                kind=kind,
                path=merged,
                upper=upper,
                fstype=fstype,
                source=source,
                options=options,
                mount_cwd=cwd,
            )

        if not parents:
            return make("bind", "bind", upper, "rbind,ro" if record.readonly else "rbind,rw")
        if len(parents) == 1 and record.readonly:
            return make("bind", "bind", self.layer_dir(parents[0]), "rbind,ro")

        def data(lowers: list[str], up: str, wk: str) -> str:
            parts = ["lowerdir=" + ":".join(escape_option_path(p) for p in lowers)]
            if not record.readonly:
                parts += [f"upperdir={escape_option_path(up)}", f"workdir={escape_option_path(wk)}"]
            return ",".join([*parts, *overlay_feature_options()])

        top_first = list(reversed(parents))  # overlay lists the top layer first
        page = os.sysconf("SC_PAGE_SIZE")
        options = data([self.layer_dir(p) for p in top_first], upper, work)
        if len(options.encode()) + 1 <= page:
            return make("overlay", "overlay", "overlay", options)
        # Docker's trick: short relative names (l/<short> -> layer fs), mounted from the root.
        rel = os.path.join("active", record.key)
        options = data(
            [os.path.join("l", self.short_id(p)) for p in top_first],
            os.path.join(rel, "upper"),
            os.path.join(rel, "work"),
        )
        if len(options.encode()) + 1 > page:
            raise SnapshotError(
                f"snapshot {record.key}: {len(parents)} layers do not fit in one overlay mount even with "
                f"short names ({len(options)} bytes of options, {page - 1} allowed); squash the image"
            )
        return make("overlay", "overlay", "overlay", options, cwd=self.root)

    def snapshot(self, key: str) -> Snapshot:
        """The description of the active snapshot `key` (mounted or not)."""
        return self._describe(self._read_record(key))

    def list_active(self) -> list[str]:
        """Keys of the active snapshots."""
        base = os.path.join(self.root, "active")
        return sorted(n for n in os.listdir(base) if os.path.isfile(os.path.join(base, n, RECORD)))

    def mount(self, key: str, *, volatile: bool = False) -> str:
        """Mount the snapshot at its merged dir (nothing to do if it is mounted); return that path.

        `volatile` (overlay's option, Linux 5.10+; ignored where the kernel lacks it, and for bind
        snapshots) is for a snapshot that is removed once its container exits (`--rm`): overlay
        then skips syncing the upper filesystem, which otherwise happens at every unmount and
        flushes everything dirty on the filesystem that holds it. After a crash such an upper dir
        cannot be mounted again, which does not matter for a snapshot nobody mounts again."""
        with self._locked():
            snap = self.snapshot(key)
            if is_mountpoint(snap.path):
                return snap.path
            options = snap.options
            if (
                volatile
                and snap.kind == "overlay"
                and not snap.readonly
                and overlay_volatile_supported()
                and len(options.encode()) + len(",volatile") + 1 <= os.sysconf("SC_PAGE_SIZE")
            ):
                options += ",volatile"
            try:
                if snap.kind == "bind":
                    linux.mount(snap.source, snap.path, None, linux.MS_BIND | linux.MS_REC)
                    if snap.readonly:
                        try:
                            linux.mount(
                                None,
                                snap.path,
                                None,
                                linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | _locked_flags(snap.path),
                            )
                        except OSError:
                            linux.umount2(snap.path, linux.MNT_DETACH)
                            raise
                else:
                    flags = linux.MS_RDONLY if snap.readonly else 0
                    if snap.mount_cwd:
                        for p in snap.parents:  # repair links lost to a crash or a manual clean-up
                            self._ensure_link(p)
                        mount_from(snap.mount_cwd, snap.source, snap.path, snap.fstype, flags, options)
                    else:
                        linux.mount(snap.source, snap.path, snap.fstype, flags, options)
            except OSError as e:
                reason = None
                if snap.kind == "overlay" and e.errno in (errno.EINVAL, errno.ENODEV, errno.EPERM):
                    reason = overlay_unsupported_reason(self.root)
                raise SnapshotError(
                    f"cannot mount snapshot {key} at {snap.path}: {errtext(e)}"
                    + (f": {reason}" if reason else "")
                ) from e
            return snap.path

    def unmount(self, key: str) -> None:
        """Unmount the snapshot's merged dir: a plain unmount, MNT_DETACH only if busy. Idempotent."""
        merged = os.path.join(self._active(key), "merged")
        with self._locked():
            if os.path.isdir(merged):
                unmount_all(merged, what=f"snapshot {key}")

    def remove(self, key: str) -> None:
        """Unmount the snapshot if needed and delete it with its upper dir. Idempotent."""
        active = self._active(key)
        with self._locked():
            if not os.path.lexists(active):
                return
            merged = os.path.join(active, "merged")
            if os.path.isdir(merged):
                unmount_all(merged, what=f"snapshot {key}")
            left = mounts_under(active)
            if left:
                raise SnapshotError(
                    f"cannot remove snapshot {key}: {', '.join(left)} still mounted under it; "
                    "unmount them first"
                )
            try:
                trash = self._trash(active)
            except OSError as e:
                raise SnapshotError(f"cannot remove snapshot {key}: {errtext(e)}") from e
        _rmtree(trash, f"snapshot {key}", checked=True)

    def upper_dir(self, key: str) -> str:
        """The snapshot's upper dir: what a build step changed (empty for read-only snapshots)."""
        self._read_record(key)
        return os.path.join(self._active(key), "upper")

    def usage(self, key: str) -> int:
        """Bytes of disk the snapshot's upper dir uses (allocated blocks, hard links counted once)."""
        return disk_usage(self.upper_dir(key))


def disk_usage(path: str) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [path]
    while stack:
        current = stack.pop()
        st = os.lstat(current)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(current) as it:
                stack.extend(entry.path for entry in it)
    return total


def _locked_flags(path: str) -> int:
    """Flags a read-only bind remount must keep (the kernel refuses to drop locked ones)."""
    f = os.statvfs(path).f_flag
    return (
        (linux.MS_NOSUID if f & os.ST_NOSUID else 0)
        | (linux.MS_NODEV if f & os.ST_NODEV else 0)
        | (linux.MS_NOEXEC if f & os.ST_NOEXEC else 0)
    )


class _Locked:
    """The `with` block of OverlaySnapshotter._locked()."""

    __slots__ = ("_snapshotter",)

    def __init__(self, snapshotter: OverlaySnapshotter) -> None:
        self._snapshotter = snapshotter

    def __enter__(self) -> None:
        self._snapshotter._lock()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._snapshotter._unlock()


def remove_tree(path: str) -> None:
    """`rm -rf path` without following symlinks, depth-first without recursion (a layer may nest
    directories deeper than Python's recursion limit). A missing path is not an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    stack = [(path, False)]
    while stack:
        current, emptied = stack.pop()
        if emptied:
            try:
                os.rmdir(current)
            except FileNotFoundError:
                pass
            continue
        stack.append((current, True))
        try:
            with os.scandir(current) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, False))
                    else:
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            pass
        except FileNotFoundError:
            continue


def _rmtree(path: str, what: str, *, checked: bool = False) -> None:
    """Delete a directory moved into tmp/; refused while something is mounted under it (`checked`:
    the caller has just made sure of that, under the lock, before moving it there)."""
    if not checked and mounts_under(path):
        raise SnapshotError(f"not deleting {what} at {path}: something is mounted under it; unmount it first")
    try:
        remove_tree(path)
    except OSError as e:
        raise SnapshotError(
            f"cannot delete {what} at {path}: {errtext(e)}; delete it by hand (gc_layers retries after this "
            "process exits)"
        ) from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _syncfs(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        linux.check(int(linux.libc.syncfs(fd)), "syncfs", path)
    finally:
        os.close(fd)
