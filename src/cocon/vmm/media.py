"""File-level checks of install media and disks a user hands to a full VM (`--iso`, `--disk`), in pure
Python, before QEMU is started: a wrong path or a wrong file should be a clear error at `vm create`,
not a firmware screen saying "no bootable device".

- `check_iso(path)`: an existing, readable regular file (or block device) that is an ISO 9660 image:
  the standard identifier `CD001` of the first volume descriptor at byte 32769 (sector 16 + 1). ISO
  hybrids (bootable from a CD and a USB stick: the usual installer and live ISOs) and ISO 9660/UDF
  bridge images pass; UDF-only images do not.
- `check_disk(path)`: an existing, readable, writable regular file (or block device): its format
  (`qcow2` by its magic, else `raw`) and virtual size. A qcow2 image naming a backing file is refused:
  QEMU would open that host path, which the image's author chose.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from cocon.vmm.errors import VmmError

__all__ = ["ISO_SECTOR", "DiskInfo", "IsoInfo", "MediaError", "check_disk", "check_iso"]

ISO_SECTOR = 2048
_FIRST_DESCRIPTOR = 16 * ISO_SECTOR  # the volume descriptor set starts at sector 16
_MAX_DESCRIPTORS = 64
_QCOW2_MAGIC = b"QFI\xfb"


class MediaError(VmmError):
    """An install medium or disk given by the user is missing, unreadable or not what it must be."""


@dataclass(frozen=True)
class IsoInfo:
    path: str  # absolute
    size: int  # bytes
    volume_id: str  # the primary volume descriptor's volume identifier (e.g. "Debian 12.8.0 amd64 n")
    block_device: bool


@dataclass(frozen=True)
class DiskInfo:
    path: str  # absolute
    format: str  # "qcow2" or "raw"
    virtual_size: int  # bytes the guest sees
    block_device: bool


def _open_checked(path: str, what: str, hint: str, *, write: bool = False) -> tuple[int, os.stat_result]:
    """Open `path` (following symlinks) after the common checks; return the descriptor and its stat."""
    a = "an" if what[0] in "AEIOU" else "a"
    if not path:
        raise MediaError(f"no {what} given: {hint}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"{path} does not exist: {hint}") from None
    except PermissionError:
        raise MediaError(
            f"{path} cannot be reached (permission denied on a directory above it): {hint}"
        ) from None
    except OSError as e:
        raise MediaError(f"{path} cannot be checked: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MediaError(f"{path} is a directory, not {a} {what}: {hint}")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise MediaError(f"{path} is not a regular file or block device, so not {a} {what}: {hint}")
    try:
        fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    except PermissionError:
        access = "readable and writable" if write else "readable"
        raise MediaError(f"{path} is not {access}: fix its permissions") from None
    except OSError as e:
        raise MediaError(f"{path} cannot be opened: {e.strerror or e}") from None
    return fd, st


def _size(fd: int, st: os.stat_result) -> int:
    return os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size


def check_iso(path: str) -> IsoInfo:
    """Check that `path` is an ISO 9660 image (installer or live ISO); raise MediaError saying why not."""
    hint = "give an installer or live ISO"
    fd, st = _open_checked(path, "ISO image", hint)
    try:
        size = _size(fd, st)
        if size == 0:
            raise MediaError(f"{path} is empty (0 bytes), not an ISO 9660 image: {hint}")
        volume_id: str | None = None
        for n in range(_MAX_DESCRIPTORS):
            sector = os.pread(fd, ISO_SECTOR, _FIRST_DESCRIPTOR + n * ISO_SECTOR)
            if len(sector) < 7 or sector[1:6] != b"CD001":
                if n == 0:
                    raise MediaError(f"{path} is not an ISO 9660 image (no CD001 signature): {hint}")
                break  # the set ended without a terminator: accept what was found
            kind = sector[0]
            if kind == 1 and volume_id is None:  # the primary volume descriptor
                volume_id = sector[40:72].decode("ascii", "replace").strip()
            if kind == 255:  # the set terminator
                break
    except OSError as e:
        raise MediaError(f"{path} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if volume_id is None:
        raise MediaError(f"{path} is not an ISO 9660 image (no primary volume descriptor): {hint}")
    return IsoInfo(os.path.abspath(path), size, volume_id, stat.S_ISBLK(st.st_mode))


def check_disk(path: str) -> DiskInfo:
    """Check that `path` is a usable VM disk (qcow2 without a backing file, or raw): raise MediaError
    saying why not. Raw disks must not be empty."""
    hint = "give a qcow2 or raw disk image (create one with `qemu-img create -f qcow2 FILE 10G`)"
    fd, st = _open_checked(path, "disk image", hint, write=True)
    try:
        size = _size(fd, st)
        header = os.pread(fd, 104, 0)
    except OSError as e:
        raise MediaError(f"{path} cannot be read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    block = stat.S_ISBLK(st.st_mode)
    if header[:4] != _QCOW2_MAGIC:
        if size == 0:
            raise MediaError(f"{path} is empty (0 bytes): {hint}")
        return DiskInfo(os.path.abspath(path), "raw", size, block)
    if len(header) < 72:
        raise MediaError(f"{path} starts like a qcow2 image but its header is truncated: {hint}")
    version, backing_offset, backing_size = struct.unpack_from(">IQI", header, 4)
    (virtual_size,) = struct.unpack_from(">Q", header, 24)
    if version not in (2, 3):
        raise MediaError(
            f"{path} is a qcow2 image of unsupported version {version}: convert it with qemu-img"
        )
    if backing_offset:
        raise MediaError(
            f"{path} is a qcow2 image with a backing file "
            f"({backing_size} byte name at offset {backing_offset}): "
            f"make it standalone first: qemu-img convert -O qcow2 {path} NEW.qcow2"
        )
    return DiskInfo(os.path.abspath(path), "qcow2", virtual_size, block)
