"""`qemu-img` (Debian's qemu-utils) behind typed functions: the one place cocon runs it.

Every failure of qemu-img becomes a `DiskError` carrying its stderr. Paths are always handed to
qemu-img absolute, so a file name with a colon (``nbd:…``, ``json:{…}``) is never read as one of
QEMU's protocol prefixes. Files are created atomically: qemu-img writes a temporary name in the
target's directory, which is then linked into place (never replacing an existing file) and removed.

Disks that users give (`inspect_user_disk`) are untrusted: the format is what qemu-img detects
(never the extension), only raw and qcow2 are accepted, a qcow2 must pass `qemu-img check` and may
not name a backing file (which could point anywhere on the host).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from cocon.storage.volumes import VolumeError

QEMU_IMG = "qemu-img"
FORMATS = ("raw", "qcow2")  # what cocon creates and accepts
MIN_RAW_SIZE = 512  # one sector: anything smaller is not a disk
QCOW2_MAGIC = b"QFI\xfb"

_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_SIZE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_SIZE = 1 << 60  # far above what anyone gives; catches typos such as 10000000T


class DiskError(VolumeError):
    """A disk image is missing, invalid, corrupt, or qemu-img failed; the message says what to do."""


@dataclass
class SnapshotInfo:
    """One internal snapshot of a qcow2 image."""

    id: str
    name: str
    vm_state_size: int  # bytes of saved machine state (0 for a disk-only snapshot)
    date: float  # seconds since the epoch


@dataclass
class DiskInfo:
    """What `qemu-img info` says about an image."""

    path: str
    format: str
    virtual_size: int  # bytes the guest sees
    actual_size: int  # bytes the image uses on the host
    backing_file: str | None
    snapshots: list[SnapshotInfo] = field(default_factory=list)
    data_file: str | None = None  # a qcow2's external data file (another host path)


@dataclass
class CheckResult:
    """What `qemu-img check` found (a format without checks, such as raw, reports nothing)."""

    path: str
    checked: bool  # False when the format has no consistency checks (raw)
    corruptions: int = 0
    leaks: int = 0  # leaked clusters: wasted space, harmless
    check_errors: int = 0


# --- sizes -------------------------------------------------------------------------------------------
def parse_size(text: str | int) -> int:
    """Bytes from "10G", "512M", "1T", "64k", "1.5G", "1048576" (binary multiples: K = 1024; an
    optional "B"/"iB" after the unit). Zero, negatives and anything else are refused."""
    if isinstance(text, bool):
        raise DiskError(f"invalid size {text!r}: give a number of bytes or a size such as 10G")
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.fullmatch(str(text).strip())
        if m is None:
            raise DiskError(
                f"invalid size {text!r}: give bytes or a number with K, M, G or T (binary multiples), "
                "e.g. 512M or 10G"
            )
        try:
            value = int(Decimal(m["num"]) * _UNITS[m["unit"].upper()])
        except InvalidOperation:  # pragma: no cover (the pattern admits only decimals)
            raise DiskError(f"invalid size {text!r}: e.g. 512M or 10G") from None
    if value <= 0:
        raise DiskError(f"invalid size {text!r}: a disk needs a size above zero, e.g. 10G")
    if value > MAX_SIZE:
        raise DiskError(f"invalid size {text!r}: at most {MAX_SIZE >> 40}T")
    return value


def format_size(n: int) -> str:
    """A short human form of `n` bytes (binary units), for messages."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:.1f}".rstrip("0").rstrip(".") + unit
    return f"{n}B"


def validate_snapshot_name(name: str) -> str:
    if not isinstance(name, str) or _SNAPSHOT_NAME.fullmatch(name) is None:
        raise DiskError(
            f"invalid snapshot name {name!r}: use 1 to 63 of letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    return name


# --- running qemu-img ----------------------------------------------------------------------------
def _run(args: Sequence[str], what: str, *, ok: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            [QEMU_IMG, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        raise DiskError("qemu-img is not installed: install it with `apt-get install qemu-utils`") from None
    if proc.returncode not in ok:
        err = _short(proc.stderr or proc.stdout) or f"exit status {proc.returncode}"
        hint = ""
        if "lock" in err:
            hint = " (a running VM uses the image: stop it first)"
        raise DiskError(f"{what} failed: {err}{hint}")
    return proc


def _short(text: str, lines: int = 4) -> str:
    """The first lines of qemu-img's stderr (a corrupt image can produce thousands)."""
    all_lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    shown = "; ".join(all_lines[:lines])[:800]
    return shown + (f" (and {len(all_lines) - lines} more lines)" if len(all_lines) > lines else "")


def _abs(path: str) -> str:
    return os.path.abspath(os.fspath(path))


def _temp_beside(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}.tmp-{os.urandom(6).hex()}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _publish(temp: str, path: str) -> None:
    """Put the complete `temp` at `path` (never replacing a file there) and make it durable."""
    fd = os.open(temp, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
    except FileExistsError:
        raise DiskError(f"{path} already exists: remove it first or choose another path") from None
    except OSError as exc:
        raise DiskError(f"cannot create {path}: {exc.strerror}") from None
    finally:
        _unlink(temp)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _parse_info(path: str, doc: dict[str, object]) -> DiskInfo:
    snaps: list[SnapshotInfo] = []
    raw_snaps = doc.get("snapshots")
    for s in raw_snaps if isinstance(raw_snaps, list) else []:
        if not isinstance(s, dict):
            continue
        snaps.append(
            SnapshotInfo(
                id=str(s.get("id", "")),
                name=str(s.get("name", "")),
                vm_state_size=int(s.get("vm-state-size", 0) or 0),
                date=float(s.get("date-sec", 0) or 0) + float(s.get("date-nsec", 0) or 0) / 1e9,
            )
        )
    backing = doc.get("full-backing-filename") or doc.get("backing-filename")
    specific = doc.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    data_file = data.get("data-file") if isinstance(data, dict) else None
    return DiskInfo(
        path=path,
        format=str(doc.get("format", "")),
        virtual_size=int(str(doc.get("virtual-size", 0) or 0)),
        actual_size=int(str(doc.get("actual-size", 0) or 0)),
        backing_file=str(backing) if backing else None,
        snapshots=snaps,
        data_file=str(data_file) if data_file else None,
    )


def info(path: str, *, force_share: bool = False) -> DiskInfo:
    """`qemu-img info --output=json` (the backing chain is not opened). `force_share` (-U) reads an
    image that a running QEMU holds."""
    path = _abs(path)
    if not os.path.exists(path):
        raise DiskError(f"disk image {path} does not exist")
    args = ["info", "--output=json"] + (["-U"] if force_share else []) + [path]
    proc = _run(args, f"reading disk image {path}")
    try:
        doc = json.loads(proc.stdout)
    except ValueError:
        raise DiskError(f"qemu-img info gave no JSON for {path}: {proc.stdout[:200]!r}") from None
    if not isinstance(doc, dict):
        raise DiskError(f"qemu-img info gave unexpected output for {path}")
    return _parse_info(path, doc)


def check(path: str, *, force_share: bool = False) -> CheckResult:
    """`qemu-img check`: a corrupt image raises DiskError (suggesting `qemu-img check -r all`);
    leaked clusters are reported, not raised."""
    path = _abs(path)
    args = ["check", "--output=json"] + (["-U"] if force_share else []) + [path]
    proc = _run(args, f"checking disk image {path}", ok=(0, 1, 2, 3, 63))
    if proc.returncode == 63:  # the format has no checks (raw)
        return CheckResult(path=path, checked=False)
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        doc = {}
    result = CheckResult(
        path=path,
        checked=True,
        corruptions=int(doc.get("corruptions", 0) or 0),
        leaks=int(doc.get("leaks", 0) or 0),
        check_errors=int(doc.get("check-errors", 0) or 0),
    )
    if proc.returncode == 1 and not doc:
        raise DiskError(f"checking disk image {path} failed: {_short(proc.stderr) or 'no output'}")
    if proc.returncode in (1, 2) or result.corruptions or result.check_errors:
        detail = _short(proc.stderr, 2)
        raise DiskError(
            f"disk image {path} is corrupt ({result.corruptions} corruptions, {result.check_errors} "
            f"check errors{': ' + detail if detail else ''}): repair a copy with "
            f"`qemu-img check -r all {path}` or use another image"
        )
    return result


# --- user disks ----------------------------------------------------------------------------------
def inspect_user_disk(path: str) -> DiskInfo:
    """Validate a disk image a user gives (untrusted) and describe it: it exists, is a regular file
    or a block device, qemu-img detects raw or qcow2 in it, a qcow2 passes `qemu-img check` and has
    no backing file nor external data file, and it is not obviously something else (empty, or under
    one sector)."""
    path = _abs(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DiskError(f"disk image {path} does not exist: give the path of a raw or qcow2 file") from None
    except OSError as exc:
        raise DiskError(f"cannot read disk image {path}: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise DiskError(f"{path} is {kind}: a disk must be a raw or qcow2 image file or a block device")
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise DiskError(f"{path} is an empty file, not a disk image: give a raw or qcow2 image")
    magic = b""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise DiskError(f"cannot read disk image {path}: {exc.strerror}") from None
    try:
        disk = info(path)
    except DiskError as exc:
        if magic == QCOW2_MAGIC:
            raise DiskError(
                f"{path} looks like a qcow2 image but cannot be opened, it may be corrupt ({exc}): "
                f"try `qemu-img check -r all {path}` on a copy, or use another image"
            ) from None
        raise
    if disk.format not in FORMATS:
        raise DiskError(
            f"{path} is a {disk.format or 'unknown'} image: cocon takes raw or qcow2 disks; convert it "
            f"with `qemu-img convert -O qcow2 {path} OUT.qcow2`"
        )
    size = st.st_size if stat.S_ISREG(st.st_mode) else disk.virtual_size  # qemu rounds up to a sector
    if disk.format == "raw" and size < MIN_RAW_SIZE:
        raise DiskError(
            f"{path} holds only {size} bytes, less than one disk sector: it is not a disk "
            "image; give a raw or qcow2 image"
        )
    if disk.format == "qcow2":
        if disk.backing_file:
            raise DiskError(
                f"{path} is a qcow2 overlay of {disk.backing_file}: backing files are refused (they may "
                f"point anywhere on the host); flatten it first with `qemu-img convert -O qcow2 {path} OUT`"
            )
        if disk.data_file:
            raise DiskError(
                f"{path} keeps its data in an external file ({disk.data_file}): external data files are "
                f"refused (they may point anywhere on the host); make a self-contained copy with "
                f"`qemu-img convert -O qcow2 {path} OUT`"
            )
        check(path)
    return disk


# --- creating and changing images ----------------------------------------------------------------
def create(
    path: str,
    size: int | str | None,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> DiskInfo:
    """A new image at `path` of `size` bytes (None: the backing file's size); with `backing`, a
    copy-on-write overlay of it. Written under a temporary name and linked into place."""
    if fmt not in FORMATS:
        raise DiskError(f"unsupported disk format {fmt!r}: use raw or qcow2")
    path = _abs(path)
    if os.path.lexists(path):
        raise DiskError(f"{path} already exists: remove it first or choose another path")
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        if fmt != "qcow2":
            raise DiskError("only a qcow2 image can have a backing file")
        backing = _abs(backing)
        if backing_fmt is None:
            backing_fmt = info(backing, force_share=True).format
        if backing_fmt not in FORMATS:
            raise DiskError(f"unsupported backing format {backing_fmt!r}: use raw or qcow2")
        args += ["-b", backing, "-F", backing_fmt]
    elif size is None:
        raise DiskError(f"no size given for the new disk {path}: give one, e.g. 10G")
    temp = _temp_beside(path)
    args.append(temp)
    if size is not None:
        args.append(str(parse_size(size)))
    try:
        _run(args, f"creating disk image {path}")
        _publish(temp, path)
    finally:
        _unlink(temp)
    return info(path)


def resize(path: str, size: int | str) -> DiskInfo:
    """Grow the image to `size` bytes (shrinking could cut off data: refused). The filesystem inside
    is not grown: the guest does that (resize2fs, growpart)."""
    path = _abs(path)
    new = parse_size(size)
    disk = info(path)
    if new < disk.virtual_size:
        raise DiskError(
            f"cannot shrink {path} from {format_size(disk.virtual_size)} to {format_size(new)}: "
            "shrinking could cut off data; give a size at least as large as the current one"
        )
    if new == disk.virtual_size:
        return disk
    if disk.snapshots and disk.format == "qcow2":
        raise DiskError(
            f"cannot resize {path}: it has internal snapshots ({', '.join(s.name for s in disk.snapshots)}); "
            "delete them first"
        )
    _run(["resize", "-q", "-f", disk.format, path, str(new)], f"resizing disk image {path}")
    return info(path)


def convert(src: str, dst: str, fmt: str = "qcow2") -> DiskInfo:
    """Copy `src` (its format detected) into a new image `dst` of format `fmt`; zeros take no space.
    The result is self-contained (a backing chain is flattened)."""
    if fmt not in FORMATS:
        raise DiskError(f"unsupported disk format {fmt!r}: use raw or qcow2")
    src, dst = _abs(src), _abs(dst)
    if os.path.lexists(dst):
        raise DiskError(f"{dst} already exists: remove it first or choose another path")
    src_fmt = info(src).format
    temp = _temp_beside(dst)
    try:
        _run(["convert", "-q", "-f", src_fmt, "-O", fmt, src, temp], f"converting {src} to {fmt}")
        _publish(temp, dst)
    finally:
        _unlink(temp)
    return info(dst)


# --- internal snapshots (offline: the VM must not run) ------------------------------------------
def _qcow2(path: str, force_share: bool = False) -> DiskInfo:
    disk = info(path, force_share=force_share)
    if disk.format != "qcow2":
        raise DiskError(
            f"{disk.path} is a {disk.format} image: snapshots need qcow2; convert it with "
            f"`qemu-img convert -O qcow2 {disk.path} OUT.qcow2`"
        )
    return disk


def snapshot_list(path: str, force_share: bool = False) -> list[SnapshotInfo]:
    """The image's internal snapshots, oldest first."""
    return _qcow2(path, force_share).snapshots


def snapshot_create(path: str, name: str) -> SnapshotInfo:
    validate_snapshot_name(name)
    disk = _qcow2(path)
    if any(s.name == name for s in disk.snapshots):
        raise DiskError(
            f"{disk.path} already has a snapshot named {name!r}: choose another name or delete it first"
        )
    _run(["snapshot", "-q", "-c", name, disk.path], f"creating snapshot {name} of {disk.path}")
    for s in snapshot_list(disk.path):
        if s.name == name:
            return s
    raise DiskError(f"snapshot {name} of {disk.path} was not recorded by qemu-img")  # pragma: no cover


def _existing(disk: DiskInfo, name: str) -> None:
    validate_snapshot_name(name)
    if not any(s.name == name for s in disk.snapshots):
        have = ", ".join(s.name for s in disk.snapshots) or "none"
        raise DiskError(f"{disk.path} has no snapshot named {name!r} (it has: {have})")


def snapshot_apply(path: str, name: str) -> None:
    """Revert the image to snapshot `name` (what was written since is lost)."""
    validate_snapshot_name(name)
    disk = _qcow2(path)
    _existing(disk, name)
    _run(["snapshot", "-q", "-a", name, disk.path], f"restoring snapshot {name} of {disk.path}")


def snapshot_delete(path: str, name: str) -> None:
    validate_snapshot_name(name)
    disk = _qcow2(path)
    _existing(disk, name)
    _run(["snapshot", "-q", "-d", name, disk.path], f"deleting snapshot {name} of {disk.path}")
