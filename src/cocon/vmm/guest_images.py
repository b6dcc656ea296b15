"""Test guests that cocon builds itself, for full-VM tests and the VM benchmark.

- `bootstrap_debian_vm(store, ...)`: an OCI image of a bootable Debian bookworm (systemd, Debian's
  generic kernel with an initramfs-tools initrd, systemd-networkd with DHCP on the ethernet NICs,
  systemd-resolved, cloud-init), made with `cocon.images.bootstrap.bootstrap_debian` (offline from the
  tarball of scripts/debian-vm-tarball.sh) plus one small layer of guest configuration; Cmd
  ["/sbin/init"], so `cocon run --isolation vm` boots systemd.
- `export_rootfs(store, image, dest)`: an image's layers applied into a directory.
- `make_bootable_disk(rootfs_dir, out_path)`: a qcow2 (or raw) disk that boots on its own through
  GRUB under BIOS (SeaBIOS) and UEFI (OVMF): GPT with a BIOS boot partition, an EFI system partition
  and an ext4 root labelled `cocon-root` holding the rootfs. Made without loop devices or mounts
  (mkfs.ext4 -d, mkfs.vfat/mtools at offsets, grub-mkimage), atomically.
- `make_boot_iso(out_path, kernel, initrd, cmdline)`: a BIOS+UEFI ISO (grub-mkrescue) booting a
  kernel and initrd; `make_marker_initramfs(out_path, marker)`: a busybox initramfs that prints a
  marker on the console and powers off, for testing such ISOs.

`progress(stage, done, total)` reports where a build is (`DISK_STAGES`, `ISO_STAGES`).
See docs/vm-guest-images.md.
"""

from __future__ import annotations

import calendar
import contextlib
import copy
import dataclasses
import gzip
import io
import os
import re
import shlex
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from cocon.images.bootstrap import bootstrap_debian, rfc3339
from cocon.images.busybox import BusyboxMissing, find_static_busybox
from cocon.images.errors import ImageError, LayerError
from cocon.images.layers import apply_layer, dir_to_layer, open_layer
from cocon.images.store import Image, ImageStore
from cocon.oci.image_spec import ContainerConfig, Descriptor, History, RootFS, encode_image_config
from cocon.vmm.errors import VmmError

Progress = Callable[[str, int, int], None]


class GuestImageError(VmmError):
    """A guest image, disk or ISO could not be made; the message says why and what to do."""


#: The packages of the Debian guest (debootstrap --include); scripts/debian-vm-tarball.sh downloads them.
VM_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "systemd-resolved",
    "linux-image-amd64",
    "initramfs-tools",
    "zstd",
    "kmod",
    "iproute2",
    "netbase",
    "procps",
    "cloud-init",
    "python3-cffi-backend",  # provides python3-cffi-backend-api-*: debootstrap resolves no virtual package
)
DEFAULT_VM_IMAGE = "debian-vm:bookworm"
#: The file system label of the root file system of cocon's VM disks (whole-disk images and these).
ROOT_LABEL = "cocon-root"
#: Modules the guest's initramfs must hold to find an ext4 root on virtio-blk.
REQUIRED_INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")
#: What the guest's /etc/initramfs-tools/modules lists (for an update-initramfs inside the guest).
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "ext4")
DEFAULT_CMDLINE = "ro console=ttyS0,115200"

DISK_STAGES: dict[str, str] = {
    "check": "Checking the root file system",
    "partition": "Partitioning the disk",
    "rootfs": "Writing the root file system",
    "esp": "Writing the EFI system partition",
    "grub": "Installing GRUB (BIOS and UEFI)",
    "convert": "Writing the disk image",
}
ISO_STAGES: dict[str, str] = {"stage": "Staging the ISO tree", "iso": "Writing the ISO (grub-mkrescue)"}

MiB = 1 << 20
SECTOR = 512
GRUB_DIR = "/usr/lib/grub"
# GPT partition type GUIDs
BIOS_BOOT_TYPE = "21686148-6E55-6F74-6E49-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# The layout (MiB): BIOS boot 1-2, ESP 2-66, root 66-(end-1) (the backup GPT needs the last sectors).
BIOS_BOOT_START = 1 * MiB
BIOS_BOOT_SIZE = 1 * MiB
ESP_START = 2 * MiB
ESP_SIZE = 64 * MiB
ROOT_START = ESP_START + ESP_SIZE
# boot.img (GRUB's MBR) fields, from grub-core/boot/i386/pc/boot.S
MBR_BPB = (0x03, 0x5A)
MBR_KERNEL_SECTOR = 0x5C
MBR_BOOT_DRIVE = 0x64
MBR_DRIVE_CHECK = 0x66
MBR_KEEP = (0x1B8, 0x1FE)  # disk signature and partition table (the protective MBR of the GPT)
CORE_SEGMENT = 0x820  # where diskboot loads the rest of core.img
GRUB_COMMON_MODULES = (
    "part_gpt", "part_msdos", "ext2", "fat", "iso9660", "search", "search_fs_uuid", "search_label",
    "normal", "configfile", "linux", "echo", "test", "serial", "terminal", "reboot", "halt", "gzio",
    "minicmd", "sleep",
)  # fmt: skip
GRUB_PC_MODULES = ("biosdisk",)
GRUB_EFI_MODULES = ("efi_gop", "efi_uga")

_TOOLS = {
    "sfdisk": "fdisk",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "mformat": "mtools",
    "grub-mkimage": "grub-common (grub-pc-bin and grub-efi-amd64-bin for the platforms)",
    "grub-mkrescue": "grub-common and xorriso",
    "xorriso": "xorriso",
    "qemu-img": "qemu-utils",
}
_TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KERNEL_RE = re.compile(r"vmlinuz-([0-9][A-Za-z0-9.+_~-]*)")
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _tool(name: str) -> str:
    path = shutil.which(name, path=_TOOL_PATH) or shutil.which(name)
    if path is None:
        raise GuestImageError(f"{name} is not installed: apt-get install {_TOOLS.get(name, name)}")
    return path


def _run(cmd: Sequence[str], what: str, *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    full = [_tool(cmd[0]), *cmd[1:]]
    run_env = {"PATH": _TOOL_PATH, "LC_ALL": "C", **(env or {})}
    try:
        done = subprocess.run(
            full, capture_output=True, text=True, env=run_env, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise GuestImageError(f"{what}: {cmd[0]} did not finish in {timeout:.0f} s") from None
    except OSError as exc:
        raise GuestImageError(f"{what}: cannot run {cmd[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        tail = "\n".join("  " + ln for ln in (done.stderr or done.stdout).strip().splitlines()[-12:])
        raise GuestImageError(
            f"{what} failed: {shlex.join(full)} exited with status {done.returncode}:\n{tail}"
        )
    return done.stdout


def parse_size(size: int | str) -> int:
    """Bytes from an int or a text such as "2G", "1536M", "4GiB" (powers of 1024)."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.fullmatch(size)
        if m is None:
            raise GuestImageError(f"{size!r} is not a size: give bytes or a number with K, M, G or T")
        value = int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))
    if value <= 0:
        raise GuestImageError(f"the size must be positive, not {size!r}")
    return value


# --- the kernel in a root file system -----------------------------------------------------------------


@dataclass(frozen=True)
class GuestKernel:
    """A kernel and its initrd inside a root file system (paths relative to it)."""

    release: str  # "6.1.0-28-amd64"
    vmlinuz: str  # "boot/vmlinuz-6.1.0-28-amd64"
    initrd: str  # "boot/initrd.img-6.1.0-28-amd64"


def _version_key(release: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.+~_-]", release)]


def find_kernel(rootfs_dir: str) -> GuestKernel:
    """The newest `boot/vmlinuz-RELEASE` of `rootfs_dir` that has a `boot/initrd.img-RELEASE` (both
    regular files: a symlink is not followed out of the root file system)."""
    boot = os.path.join(rootfs_dir, "boot")
    try:
        st = os.lstat(boot)
        names = os.listdir(boot) if stat.S_ISDIR(st.st_mode) else []
    except FileNotFoundError:
        names = []
    except OSError as exc:
        raise GuestImageError(f"cannot read {boot}: {exc.strerror}") from None

    def regular(name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(os.path.join(boot, name)).st_mode)
        except OSError:
            return False

    releases = [m.group(1) for n in names if (m := _KERNEL_RE.fullmatch(n)) and regular(n)]
    with_initrd = [r for r in releases if regular(f"initrd.img-{r}")]
    if not with_initrd:
        if releases:
            raise GuestImageError(
                f"{rootfs_dir} has a kernel (boot/vmlinuz-{releases[0]}) but no "
                f"boot/initrd.img-{releases[0]}: install initramfs-tools in it and run "
                "update-initramfs -c -k all"
            )
        raise GuestImageError(
            f"{rootfs_dir} has no kernel (no boot/vmlinuz-*): a bootable disk needs one; install "
            "linux-image-amd64 and initramfs-tools in the root file system (bootstrap_debian_vm does)"
        )
    release = max(with_initrd, key=_version_key)
    return GuestKernel(release, f"boot/vmlinuz-{release}", f"boot/initrd.img-{release}")


# --- initramfs contents -------------------------------------------------------------------------------


def _decompress(data: bytes) -> bytes:
    if data[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        out = io.BytesIO()
        zstandard.ZstdDecompressor().copy_stream(io.BytesIO(data), out)
        return out.getvalue()
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        import lzma

        return lzma.decompress(data)
    raise GuestImageError(
        "the initramfs is compressed in a format this reader does not know (zstd, gzip, xz)"
    )


def initramfs_names(path: str) -> set[str]:
    """The file names in an initramfs: uncompressed cpio (newc) archives (early microcode) followed by
    a zstd, gzip or xz compressed one, as initramfs-tools writes them."""
    with open(path, "rb") as f:
        data = f.read()
    names: set[str] = set()
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:  # padding between archives
            pos += 1
        if pos >= len(data):
            break
        if data[pos : pos + 6] != b"070701":
            data, pos = _decompress(data[pos:]), 0
            continue
        while True:
            if data[pos : pos + 6] != b"070701":
                raise GuestImageError(f"{path}: a corrupt cpio archive at offset {pos}")
            fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
            filesize, namesize = fields[6], fields[11]
            name = data[pos + 110 : pos + 110 + namesize - 1].decode("utf-8", "replace")
            pos = (pos + 110 + namesize + 3) & ~3
            pos = (pos + filesize + 3) & ~3
            if name == "TRAILER!!!":
                break
            names.add(name.removeprefix("./"))
    return names


def initramfs_modules(path: str) -> set[str]:
    """The kernel module names (`virtio_blk`, `ext4`) an initramfs carries."""
    found = set()
    for name in initramfs_names(path):
        base = name.rsplit("/", 1)[-1]
        m = re.fullmatch(r"(.+)\.ko(\.(xz|zst|gz))?", base)
        if m is not None:
            found.add(m.group(1).replace("-", "_"))
    return found


# --- the Debian guest image ---------------------------------------------------------------------------

NETWORK_FILE = """\
# cocon test guest: DHCP on every ethernet NIC (the first one is the one QEMU gives the guest).
[Match]
Name=en* eth*

[Network]
DHCP=yes

[DHCPv4]
UseHostname=yes
"""
FSTAB = f"""\
# cocon test guest: the root file system is labelled {ROOT_LABEL} (whole-disk and partitioned disks alike)
LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1
"""
ISSUE = "Debian GNU/Linux 12 (cocon test guest) \\n \\l\nIPv4: \\4\n\n"
INITRAMFS_CONF = "# cocon test guest: every block and file system driver (Debian's default)\nMODULES=most\n"
# systemctl enable systemd-networkd systemd-resolved serial-getty@ttyS0, as symlinks (nothing runs in the
# image); systemd-networkd-wait-online is left out: nothing in the guest waits for the network.
_SYSTEMD = "/lib/systemd/system"
UNIT_LINKS = {
    "dbus-org.freedesktop.network1.service": "systemd-networkd.service",
    "multi-user.target.wants/systemd-networkd.service": "systemd-networkd.service",
    "sockets.target.wants/systemd-networkd.socket": "systemd-networkd.socket",
    "sysinit.target.wants/systemd-network-generator.service": "systemd-network-generator.service",
    "dbus-org.freedesktop.resolve1.service": "systemd-resolved.service",
    "sysinit.target.wants/systemd-resolved.service": "systemd-resolved.service",
    "getty.target.wants/serial-getty@ttyS0.service": "serial-getty@.service",
}  # below /etc/systemd/system -> below /lib/systemd/system
# Masked (-> /dev/null): a test guest neither fetches package lists nor upgrades on its own (no traffic
# and no CPU spent behind a test's or a benchmark's back).
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer")


@dataclass
class _BaseFacts:
    shadow: bytes | None = None
    shadow_member: tarfile.TarInfo | None = None
    kernels: set[str] = dataclasses.field(default_factory=set)
    initrds: set[str] = dataclasses.field(default_factory=set)
    units: set[str] = dataclasses.field(default_factory=set)


def _read_base(store: ImageStore, image: Image) -> _BaseFacts:
    facts = _BaseFacts()
    for layer in image.manifest.layers:
        reader = open_layer(store.content.path(layer.digest), layer.media_type)
        try:
            for member in reader:
                name = os.path.normpath(member.name.removeprefix("./"))
                if name == "etc/shadow" and member.isfile():
                    f = reader.tar.extractfile(member)
                    facts.shadow = f.read() if f is not None else None
                    facts.shadow_member = member
                elif name.startswith("boot/") and member.isfile():
                    base = name[5:]
                    if m := _KERNEL_RE.fullmatch(base):
                        facts.kernels.add(m.group(1))
                    elif base.startswith("initrd.img-"):
                        facts.initrds.add(base.removeprefix("initrd.img-"))
                elif name.startswith(("lib/systemd/system/", "usr/lib/systemd/system/")):
                    facts.units.add(name.rsplit("/", 1)[1])
            reader.finish()
        finally:
            reader.close()
    return facts


def _shadow_with_empty_root(shadow: bytes) -> bytes:
    lines = shadow.split(b"\n")
    for i, line in enumerate(lines):
        fields = line.split(b":")
        if fields[0] == b"root" and len(fields) > 2:
            fields[1] = b""
            lines[i] = b":".join(fields)
            return b"\n".join(lines)
    raise GuestImageError("the image's /etc/shadow has no root entry: bootstrap the image again")


def _write(
    root: str, rel: str, data: str | bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)
) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chown(path, *owner)
    os.chmod(path, mode)


def _guest_layer_tree(root: str, facts: _BaseFacts, *, root_login: bool) -> None:
    """The guest configuration layer's files, in the empty directory `root`."""
    os.chmod(root, 0o755)
    _write(root, "etc/fstab", FSTAB)
    _write(root, "etc/systemd/network/50-cocon-dhcp.network", NETWORK_FILE)
    _write(root, "etc/issue", ISSUE)
    _write(root, "etc/initramfs-tools/conf.d/cocon.conf", INITRAMFS_CONF)
    _write(root, "etc/initramfs-tools/modules", "".join(f"{m}\n" for m in INITRAMFS_MODULES))
    if root_login:
        if facts.shadow is None or facts.shadow_member is None:
            raise GuestImageError("the image has no /etc/shadow: bootstrap it again")
        member = facts.shadow_member
        _write(
            root,
            "etc/shadow",
            _shadow_with_empty_root(facts.shadow),
            member.mode & 0o7777,
            (member.uid, member.gid),
        )
    for rel, unit in UNIT_LINKS.items():
        if unit not in facts.units:
            raise GuestImageError(
                f"the image has no {unit}: bootstrap it with the packages of VM_PACKAGES (systemd, "
                "systemd-resolved)"
            )
        path = os.path.join(root, "etc/systemd/system", rel)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.symlink(f"{_SYSTEMD}/{unit}", path)
    for unit in MASKED_UNITS:
        os.symlink("/dev/null", os.path.join(root, "etc/systemd/system", unit))


def bootstrap_debian_vm(
    store: ImageStore,
    name: str = DEFAULT_VM_IMAGE,
    *,
    suite: str = "bookworm",
    tarball: str | None = None,
    mirror: str | None = None,
    root_login: bool = True,
    progress: Progress | None = None,
) -> Image:
    """A bootable Debian image: `bootstrap_debian` with VM_PACKAGES (offline from `tarball`, made by
    scripts/debian-vm-tarball.sh), then one layer of guest configuration, Cmd ["/sbin/init"]:

    - /etc/fstab mounts LABEL=cocon-root on / (read-write); /etc/hostname is absent: the host name
      comes from the kernel (`systemd.hostname=`) or DHCP, else it is `localhost`;
    - systemd-networkd with DHCP on every en*/eth* NIC, systemd-resolved for DNS;
    - serial-getty@ttyS0 enabled (systemd also starts a getty on the kernel's console=);
    - apt's daily timers masked: the guest does not fetch or upgrade packages on its own;
    - root's password is empty (`root_login`; log in as root at the `login:` prompt, no password),
      or locked as Debian's images have it with `root_login=False`;
    - the initrd (MODULES=most) carries virtio_pci, virtio_blk and ext4; that is checked.

    `progress` gets bootstrap_debian's stages, then ("guest", done, 2)."""
    base = bootstrap_debian(
        store, name, suite=suite, include=VM_PACKAGES, tarball=tarball, mirror=mirror, progress=progress
    )
    _report(progress, "guest", 0, 2)
    facts = _read_base(store, base)
    releases = sorted(facts.kernels & facts.initrds, key=_version_key)
    if not releases:
        raise GuestImageError(
            f"the bootstrapped image has no boot/vmlinuz-* with its boot/initrd.img-* (kernels: "
            f"{sorted(facts.kernels) or 'none'}): check that linux-image-amd64 and initramfs-tools installed"
        )
    with tempfile.TemporaryDirectory(prefix="guest-layer-", dir=_store_tmp(store)) as work:
        _check_initrd(store, base, f"boot/initrd.img-{releases[-1]}", work)
        tree = os.path.join(work, "tree")
        os.mkdir(tree)
        _guest_layer_tree(tree, facts, root_login=root_login)
        epoch = _created_epoch(base)
        buf = io.BytesIO()
        info = dir_to_layer(tree, buf, "gzip", mtime=epoch)
    _report(progress, "guest", 1, 2)
    with store.content.lease():
        store.content.put(buf.getvalue(), info.digest)
        new_config = copy.deepcopy(base.config)
        container = new_config.config or ContainerConfig()
        container.cmd = ["/sbin/init"]
        container.entrypoint = None
        new_config.config = container
        new_config.rootfs = RootFS(type="layers", diff_ids=[*new_config.rootfs.diff_ids, info.diff_id])
        what = "password empty" if root_login else "locked"
        new_config.history = [
            *(new_config.history or []),
            History(
                created=rfc3339(epoch),
                created_by="cocon vm guest setup (fstab LABEL=cocon-root, systemd-networkd DHCP, "
                f"serial-getty@ttyS0, root {what})",
            ),
        ]
        layers = [
            *base.manifest.layers,
            Descriptor(media_type=info.media_type, digest=info.digest, size=info.size),
        ]
        image = store.commit(encode_image_config(new_config), layers, names=[name])
    _report(progress, "guest", 2, 2)
    return image


def _store_tmp(store: ImageStore) -> str:
    parent = os.path.join(os.path.abspath(store.root), "tmp")
    os.makedirs(parent, mode=0o700, exist_ok=True)
    return parent


def _created_epoch(image: Image) -> int:
    created = image.config.created
    if created:
        with contextlib.suppress(ValueError):
            return calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S"))
    return int(time.time())


def _check_initrd(store: ImageStore, image: Image, rel: str, work: str) -> None:
    """The initrd `rel` of the image carries REQUIRED_INITRAMFS_MODULES."""
    path = os.path.join(work, "initrd")
    for layer in reversed(image.manifest.layers):
        reader = open_layer(store.content.path(layer.digest), layer.media_type)
        try:
            for member in reader:
                if os.path.normpath(member.name.removeprefix("./")) == rel and member.isfile():
                    src = reader.tar.extractfile(member)
                    if src is not None:
                        with open(path, "wb") as out:
                            shutil.copyfileobj(src, out)
                    break
        finally:
            reader.close()
        if os.path.exists(path):
            break
    if not os.path.isfile(path):
        raise GuestImageError(f"the image has no /{rel} as a regular file: bootstrap it again")
    modules = initramfs_modules(path)
    missing = [m for m in REQUIRED_INITRAMFS_MODULES if m not in modules]
    if missing:
        raise GuestImageError(
            f"the image's /{rel} lacks the modules {', '.join(missing)}: the guest could not find its "
            "root disk; set MODULES=most in /etc/initramfs-tools/initramfs.conf and bootstrap again"
        )


def export_rootfs(store: ImageStore, image: Image, dest: str) -> None:
    """Apply the image's layers, lowest first, into the empty directory `dest` (made if missing)."""
    os.makedirs(dest, mode=0o755, exist_ok=True)
    if os.listdir(dest):
        raise GuestImageError(f"{dest} is not empty: export the image into a new directory")
    for layer, diff_id in zip(image.manifest.layers, image.config.rootfs.diff_ids, strict=True):
        try:
            apply_layer(store.content.path(layer.digest), dest, media_type=layer.media_type,
                        expected_diff_id=diff_id)  # fmt: skip
        except (LayerError, ImageError) as exc:
            raise GuestImageError(f"cannot unpack {image.short_id} into {dest}: {exc}") from None


# --- atomic output -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_output(out_path: str) -> Iterator[tuple[str, str]]:
    """(work directory, temporary output path) next to `out_path`; on success the caller's file at the
    temporary path is fsynced and renamed to `out_path`; on any failure both are removed."""
    out_path = os.path.abspath(out_path)
    parent = os.path.dirname(out_path)
    if not os.path.isdir(parent):
        raise GuestImageError(f"{parent} is not a directory: create it first")
    if os.path.isdir(out_path):
        raise GuestImageError(f"{out_path} is a directory: give a file name for the output")
    base = os.path.basename(out_path)
    work = tempfile.mkdtemp(prefix=f".{base}.", suffix=".work", dir=parent)
    tmp_out = os.path.join(parent, f".{base}.{os.getpid()}.{uuidlib.uuid4().hex[:8]}.tmp")
    try:
        yield work, tmp_out
        fd = os.open(tmp_out, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_out, out_path)
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_out)
        shutil.rmtree(work, ignore_errors=True)


# --- the bootable disk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootableDisk:
    path: str
    format: str  # "qcow2" | "raw"
    size: int  # virtual size in bytes
    root_uuid: str  # the ext4 root's UUID (root=UUID=... on the kernel command line)
    esp_uuid: str  # the FAT volume id of the EFI system partition, "ABCD-1234"
    kernel: GuestKernel
    cmdline: str


def _tree_usage(root: str) -> tuple[int, int]:
    """(bytes allocated, entries) below `root`, without following symlinks or crossing mounts."""
    used = 0
    entries = 0
    dev = os.lstat(root).st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            entries += 1
            used += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_dev == dev]
    return used, entries


def _default_size(used: int, entries: int) -> int:
    root = int(used * 1.3) + entries * 4096 // 8 + 512 * MiB  # metadata, journal and room to work
    total = ROOT_START + root + MiB
    return -(-total // (64 * MiB)) * (64 * MiB)


GRUB_CFG = """\
# Written by cocon (cocon.vmm.guest_images.make_bootable_disk); regenerate the disk rather than edit.
if [ "$grub_platform" = "pc" ]; then
    serial --unit=0 --speed=115200
    terminal_input serial console
    terminal_output serial console
fi
set timeout=0
set default=0
menuentry 'Debian GNU/Linux {release} (cocon)' {{
    search --no-floppy --fs-uuid --set=root {uuid}
    echo 'cocon-grub: loading Linux {release}'
    linux /{vmlinuz} {cmdline}
    initrd /{initrd}
}}
"""
EARLY_CFG = """\
search --no-floppy --fs-uuid --set=root {uuid}
set prefix=($root)/boot/grub
"""


def _grub_modules(platform: str) -> list[str]:
    extra = GRUB_PC_MODULES if platform == "i386-pc" else GRUB_EFI_MODULES
    directory = os.path.join(GRUB_DIR, platform)
    package = "grub-pc-bin" if platform == "i386-pc" else "grub-efi-amd64-bin"
    if not os.path.isdir(directory):
        raise GuestImageError(f"{directory} is missing: apt-get install {package}")
    return [m for m in (*GRUB_COMMON_MODULES, *extra) if os.path.exists(os.path.join(directory, f"{m}.mod"))]


def _check_cmdline_word(word: str) -> str:
    if not word or any(c in word for c in "'\"\\$;\n\r\t{}") or not word.isprintable():
        raise GuestImageError(
            f"{word!r} cannot go on the kernel command line here: give plain words (no quotes, $, ;, braces)"
        )
    return word


def _write_core(raw_fd: int, core: bytes) -> None:
    """core.img into the BIOS boot partition, with diskboot's block list pointing at its sectors
    (what grub-bios-setup does for a GPT disk with a BIOS boot partition)."""
    start = BIOS_BOOT_START // SECTOR
    nsec = -(-len(core) // SECTOR)
    if nsec * SECTOR > BIOS_BOOT_SIZE:
        raise GuestImageError(
            f"GRUB's core.img ({len(core)} bytes) does not fit the 1 MiB BIOS boot partition"
        )
    img = bytearray(core.ljust(nsec * SECTOR, b"\0"))
    first = SECTOR - 12  # struct grub_boot_blocklist {u64 start; u16 len; u16 segment} at the end of sector 0
    struct.pack_into("<QHH", img, first, start + 1, nsec - 1, CORE_SEGMENT)
    struct.pack_into("<QHH", img, first - 12, 0, 0, 0)  # terminator
    os.pwrite(raw_fd, bytes(img), BIOS_BOOT_START)


def _write_mbr(raw_fd: int, boot_img: bytes) -> None:
    if len(boot_img) != SECTOR:
        raise GuestImageError(f"{GRUB_DIR}/i386-pc/boot.img is not one sector: reinstall grub-pc-bin")
    old = os.pread(raw_fd, SECTOR, 0)
    mbr = bytearray(boot_img)
    mbr[MBR_BPB[0] : MBR_BPB[1]] = old[MBR_BPB[0] : MBR_BPB[1]]
    mbr[MBR_KEEP[0] : MBR_KEEP[1]] = old[MBR_KEEP[0] : MBR_KEEP[1]]
    struct.pack_into("<Q", mbr, MBR_KERNEL_SECTOR, BIOS_BOOT_START // SECTOR)
    mbr[MBR_BOOT_DRIVE] = 0xFF  # the drive the BIOS booted from
    mbr[MBR_DRIVE_CHECK : MBR_DRIVE_CHECK + 2] = b"\x90\x90"  # a hard disk: no floppy check
    mbr[0x1FE:0x200] = b"\x55\xaa"
    os.pwrite(raw_fd, bytes(mbr), 0)


def make_bootable_disk(
    rootfs_dir: str,
    out_path: str,
    *,
    size: int | str | None = None,
    format: str = "qcow2",
    cmdline: str = DEFAULT_CMDLINE,
    progress: Progress | None = None,
) -> BootableDisk:
    """A disk that boots `rootfs_dir` on its own through GRUB under BIOS and UEFI.

    GPT: a 1 MiB BIOS boot partition (GRUB's core.img), a 64 MiB EFI system partition (FAT,
    /EFI/BOOT/BOOTX64.EFI: the removable-media path, no NVRAM entry needed) and an ext4 root
    labelled `cocon-root` with the whole tree copied in (owners, modes, xattrs, hard links). Both GRUB
    images carry every module they need and find the root by UUID; /boot/grub/grub.cfg on the root
    boots the newest boot/vmlinuz-* with its initrd, `root=UUID=<uuid> <cmdline>`, timeout 0.

    `size` (bytes or "4G") defaults to the tree's size plus room; `format` is "qcow2" or "raw". The
    disk is written next to `out_path` and renamed into place: nothing half-made is left on failure.
    Needs no loop device and no mount."""
    if format not in ("qcow2", "raw"):
        raise GuestImageError(f"format {format!r} is not supported: use qcow2 or raw")
    words = [_check_cmdline_word(w) for w in cmdline.split()]
    if any(w.startswith("root=") for w in words):
        raise GuestImageError("leave root= out of cmdline: the disk's root UUID goes there")
    rootfs_dir = os.path.abspath(rootfs_dir)
    _report(progress, "check", 0, 1)
    if not os.path.isdir(rootfs_dir):
        raise GuestImageError(f"{rootfs_dir} is not a directory: give the root file system's directory")
    kernel = find_kernel(rootfs_dir)
    tools = ["sfdisk", "mkfs.ext4", "debugfs", "mkfs.vfat", "mmd", "mcopy", "grub-mkimage"]
    tools += ["qemu-img"] if format == "qcow2" else []
    for tool in tools:
        _tool(tool)
    pc_modules = _grub_modules("i386-pc")
    efi_modules = _grub_modules("x86_64-efi")
    used, entries = _tree_usage(rootfs_dir)
    total = parse_size(size) if size is not None else _default_size(used, entries)
    total = -(-total // MiB) * MiB
    root_size = total - ROOT_START - MiB
    if root_size < used + used // 10 + 32 * MiB:  # ext4 metadata and journal, a little room
        raise GuestImageError(
            f"{total // MiB} MiB is too small for {rootfs_dir} ({used // MiB} MiB of files): give at least "
            f"{_default_size(used, entries) // MiB}M, or leave size out"
        )
    _report(progress, "check", 1, 1)

    root_uuid = str(uuidlib.uuid4())
    esp_serial = uuidlib.uuid4().hex[:8].upper()
    esp_uuid = f"{esp_serial[:4]}-{esp_serial[4:]}"
    full_cmdline = " ".join([f"root=UUID={root_uuid}", *words])
    with _atomic_output(out_path) as (work, tmp_out):
        raw = tmp_out if format == "raw" else os.path.join(work, "disk.raw")
        with open(raw, "wb") as f:
            f.truncate(total)

        _report(progress, "partition", 0, 1)
        parts = (
            (BIOS_BOOT_START, BIOS_BOOT_SIZE, BIOS_BOOT_TYPE, "bios-boot"),
            (ESP_START, ESP_SIZE, ESP_TYPE, "esp"),
            (ROOT_START, root_size, LINUX_TYPE, ROOT_LABEL),
        )
        layout = "label: gpt\n" + "".join(
            f"start={s // SECTOR}, size={n // SECTOR}, type={t}, name={name}\n" for s, n, t, name in parts
        )
        _sfdisk(raw, layout)
        _report(progress, "partition", 1, 1)

        _report(progress, "rootfs", 0, 1)
        block = 4096
        _run(
            ["mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", str(block), "-L", ROOT_LABEL, "-U", root_uuid,
             "-E", f"offset={ROOT_START}", "-d", rootfs_dir, raw, str(root_size // block)],
            f"writing {rootfs_dir} into the disk's ext4 root",
        )  # fmt: skip
        grub_cfg = GRUB_CFG.format(
            release=kernel.release,
            uuid=root_uuid,
            vmlinuz=kernel.vmlinuz,
            initrd=kernel.initrd,
            cmdline=full_cmdline,
        )
        _put_in_ext4(raw, ROOT_START, "boot/grub/grub.cfg", grub_cfg.encode(), work)
        _report(progress, "rootfs", 1, 1)

        _report(progress, "esp", 0, 1)
        early = os.path.join(work, "early.cfg")
        with open(early, "w") as f:
            f.write(EARLY_CFG.format(uuid=root_uuid))
        efi = os.path.join(work, "BOOTX64.EFI")
        _run(
            ["grub-mkimage", "-O", "x86_64-efi", "-p", "/boot/grub", "-c", early, "-o", efi, *efi_modules],
            "making GRUB's EFI image",
        )
        _run(
            ["mkfs.vfat", "-F", "32", "-s", "1", "-n", "COCON-ESP", "-i", esp_serial,
             f"--offset={ESP_START // SECTOR}", raw, str(ESP_SIZE // 1024)],
            "making the EFI system partition",
        )  # fmt: skip
        esp = f"{raw}@@{ESP_START}"
        mtools_env = {"MTOOLS_SKIP_CHECK": "1"}
        _run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], "making /EFI/BOOT on the ESP", env=mtools_env)
        _run(["mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI"], "copying BOOTX64.EFI", env=mtools_env)
        _report(progress, "esp", 1, 1)

        _report(progress, "grub", 0, 1)
        core = os.path.join(work, "core.img")
        _run(
            ["grub-mkimage", "-O", "i386-pc", "-p", "/boot/grub", "-c", early, "-o", core, *pc_modules],
            "making GRUB's BIOS image",
        )
        with open(core, "rb") as f:
            core_img = f.read()
        with open(os.path.join(GRUB_DIR, "i386-pc", "boot.img"), "rb") as f:
            boot_img = f.read()
        fd = os.open(raw, os.O_RDWR | os.O_CLOEXEC)
        try:
            _write_core(fd, core_img)
            _write_mbr(fd, boot_img)
        finally:
            os.close(fd)
        _report(progress, "grub", 1, 1)

        _report(progress, "convert", 0, 1)
        if format == "qcow2":
            _run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp_out],
                "converting the disk to qcow2",
            )
        _report(progress, "convert", 1, 1)
    return BootableDisk(
        path=os.path.abspath(out_path),
        format=format,
        size=total,
        root_uuid=root_uuid,
        esp_uuid=esp_uuid,
        kernel=kernel,
        cmdline=full_cmdline,
    )


def _sfdisk(raw: str, layout: str) -> None:
    cmd = [_tool("sfdisk"), "--no-reread", "--no-tell-kernel", "-q", raw]
    try:
        done = subprocess.run(cmd, input=layout, capture_output=True, text=True, timeout=120,
                              env={"PATH": _TOOL_PATH, "LC_ALL": "C"})  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestImageError(f"cannot partition the disk: {exc}") from None
    if done.returncode != 0:
        raise GuestImageError(f"sfdisk could not partition the disk: {done.stderr.strip()}")


def _put_in_ext4(raw: str, offset: int, rel: str, data: bytes, work: str) -> None:
    """Write the file `rel` (root:root 0644, parent directories made) into the ext4 at `offset` of
    `raw` with debugfs, replacing what is there, then read it back."""
    local = os.path.join(work, "debugfs-file")
    with open(local, "wb") as f:
        f.write(data)
    os.chmod(local, 0o644)
    image = f"{raw}?offset={offset}"
    parts = rel.split("/")
    script = [f"mkdir {'/'.join(parts[: i + 1])}" for i in range(len(parts) - 1)]
    script += [
        f"rm {rel}",
        f"write {local} {rel}",
        f"set_inode_field {rel} uid 0",
        f"set_inode_field {rel} gid 0",
    ]
    cmds = os.path.join(work, "debugfs-cmds")
    with open(cmds, "w") as f:
        f.write("".join(line + "\n" for line in script))
    _run(["debugfs", "-w", "-f", cmds, image], f"writing /{rel} into the disk's root")
    back = _run(["debugfs", "-R", f"cat {rel}", image], f"reading /{rel} back")
    if back.encode() != data:
        raise GuestImageError(f"/{rel} on the disk's root is not what was written: is {raw} writable?")


# --- the ISO --------------------------------------------------------------------------------------------

ISO_GRUB_CFG = """\
# Written by cocon (cocon.vmm.guest_images.make_boot_iso)
if [ "$grub_platform" = "pc" ]; then
    serial --unit=0 --speed=115200
    terminal_input serial console
    terminal_output serial console
fi
set timeout=0
set default=0
menuentry 'cocon boot ISO' {{
    echo 'cocon-grub: loading the ISO kernel'
    linux /boot/vmlinuz {cmdline}
    initrd /boot/initrd.img
}}
"""


def make_boot_iso(
    out_path: str,
    kernel: str,
    initrd: str,
    cmdline: str = "console=ttyS0,115200",
    *,
    label: str = "COCON_BOOT",
    progress: Progress | None = None,
) -> str:
    """A bootable ISO (grub-mkrescue: El Torito for BIOS, an EFI image for UEFI, also bootable as a
    disk) whose GRUB boots `kernel` with `initrd` and `cmdline` (plain words; `console=ttyS0,115200`
    is added when it names no console=), GRUB's own menu on the serial port too. Written atomically."""
    words = [_check_cmdline_word(w) for w in cmdline.split()]
    if not any(w.startswith("console=") for w in words):
        words.append("console=ttyS0,115200")
    if not re.fullmatch(r"[A-Z0-9_]{1,32}", label):
        raise GuestImageError(f"{label!r} is not an ISO volume label: up to 32 of A-Z, 0-9 and _")
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if not os.path.isfile(path):
            raise GuestImageError(f"the {what} {path} is not a file: give the path of a Linux {what}")
    _tool("grub-mkrescue")
    _tool("xorriso")
    _tool("mformat")
    for platform in ("i386-pc", "x86_64-efi"):
        _grub_modules(platform)
    with _atomic_output(out_path) as (work, tmp_out):
        _report(progress, "stage", 0, 1)
        tree = os.path.join(work, "iso")
        os.makedirs(os.path.join(tree, "boot", "grub"))
        shutil.copyfile(kernel, os.path.join(tree, "boot", "vmlinuz"))
        shutil.copyfile(initrd, os.path.join(tree, "boot", "initrd.img"))
        with open(os.path.join(tree, "boot", "grub", "grub.cfg"), "w") as f:
            f.write(ISO_GRUB_CFG.format(cmdline=" ".join(words)))
        _report(progress, "stage", 1, 1)
        _report(progress, "iso", 0, 1)
        _run(["grub-mkrescue", "-o", tmp_out, tree, "--", "-volid", label], "making the ISO")
        _report(progress, "iso", 1, 1)
    return os.path.abspath(out_path)


class _Cpio:
    """A newc cpio archive, written entry by entry (the kernel's initramfs format)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self.buf += b"070701" + b"".join(b"%08x" % v for v in fields) + encoded
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


MARKER_INIT = """\
#!/bin/sh
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sysfs /sys
echo '{marker}'
echo "cocon-iso: kernel $(busybox uname -r), cmdline: $(busybox cat /proc/cmdline)"
busybox sync
busybox poweroff -f
busybox reboot -f
"""


def make_marker_initramfs(out_path: str, marker: str, *, busybox: str | None = None) -> str:
    """A gzip initramfs with the host's static busybox whose /init prints `marker` (one line of
    printable text, no quote) and the kernel command line on the console, then powers off."""
    if not marker.isprintable() or "'" in marker or not marker:
        raise GuestImageError(f"{marker!r}: give the marker as one printable line without a single quote")
    try:
        busybox = busybox or find_static_busybox()
    except BusyboxMissing as exc:
        raise GuestImageError(f"{exc}, then try again") from None
    with open(busybox, "rb") as f:
        binary = f.read()
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        cpio.directory(d)
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", binary, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", MARKER_INIT.format(marker=marker).encode(), 0o755)
    data = gzip.compress(cpio.finish(), mtime=0)
    with _atomic_output(out_path) as (_work, tmp_out):
        with open(tmp_out, "wb") as f:
            f.write(data)
    return os.path.abspath(out_path)


__all__ = [
    "DEFAULT_VM_IMAGE",
    "DISK_STAGES",
    "ISO_STAGES",
    "ROOT_LABEL",
    "VM_PACKAGES",
    "BootableDisk",
    "GuestImageError",
    "GuestKernel",
    "bootstrap_debian_vm",
    "export_rootfs",
    "find_kernel",
    "initramfs_modules",
    "initramfs_names",
    "make_boot_iso",
    "make_bootable_disk",
    "make_marker_initramfs",
    "parse_size",
]
