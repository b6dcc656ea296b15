"""Base images made on this machine, without a registry: busybox and Debian.

- `bootstrap_busybox`: one layer from the host's `busybox-static` (a link per applet, the files the
  Docker Hub image has), reproducible: the binary's mtime is the image's `created` and clamps every
  time in the layer, so bootstrapping twice gives the same image ID.
- `bootstrap_debian`: `debootstrap --variant=minbase SUITE DIR MIRROR` in a temporary directory
  under the store, cleaned the way Debian's official images are, as one zstd layer. The mirror
  comes from the host's apt configuration (or `mirror=`): nothing here names a package host.
  The downloaded .debs are kept in `<store root>/cache/debootstrap/<suite>` for the next time.
- `bootstrap(store, "busybox" | "debian[:SUITE]", **kw)`: dispatch by name.

`progress(stage, done, total)` reports where a bootstrap is (`STAGES` names the stages; `total` is 0
while it is unknown). See docs/bootstrap.md.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import fcntl
import fnmatch
import io
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cocon import _linux as linux
from cocon._mountinfo import mounts_under
from cocon.content import Writer
from cocon.images.busybox import BusyboxMissing, find_static_busybox, make_rootfs
from cocon.images.errors import ImageError
from cocon.images.layers import Compression, LayerInfo, dir_to_layer
from cocon.images.store import Image, ImageStore, normalize_name
from cocon.oci.image_spec import (
    ContainerConfig,
    Descriptor,
    History,
    ImageConfig,
    RootFS,
    encode_image_config,
    host_platform,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

#: The stages `progress(stage, done, total)` is called with, in the order they happen.
STAGES: dict[str, str] = {
    "rootfs": "Making the root file system",
    "index": "Reading the package index",
    "download": "Downloading packages",
    "extract": "Extracting packages",
    "install": "Installing packages",
    "configure": "Configuring packages",
    "clean": "Cleaning the root file system",
    "layer": "Writing the layer",
    "commit": "Recording the image",
}

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEBIAN_VARIANTS = ("minbase", "buildd", "default")
SUPPORTED = ("busybox", "debian[:SUITE]")

#: The debootstrap command; tests point it at a stand-in.
DEBOOTSTRAP = "debootstrap"
DEBOOTSTRAP_SCRIPTS = "/usr/share/debootstrap/scripts"
APT_ETC = "/etc/apt"

# Debian's release names and aliases: an apt source with one of these suites is the main archive.
DEBIAN_SUITES = frozenset(
    {
        "stable", "testing", "unstable", "oldstable", "oldoldstable", "experimental", "sid",
        "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke",
    }
)  # fmt: skip
MIRROR_SCHEMES = ("http", "https", "ftp", "file")

_SUITE_RE = re.compile(r"[a-z][a-z0-9.-]{0,63}")
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_MIRROR_RE = re.compile(r"(http|https|ftp)://[^\s/]+(/\S*)?|file:/\S*")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
UMOUNT_NOFOLLOW = 8  # umount2(2): do not follow a symlink in the last component
_LOG_TAIL = 15
_PASSTHROUGH_ENV = ("http_proxy", "https_proxy", "ftp_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                    "FTP_PROXY", "NO_PROXY", "SOURCE_DATE_EPOCH")  # fmt: skip


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


# --- dispatch ------------------------------------------------------------------------------------------


def bootstrap(store: ImageStore, what: str, **kw: Any) -> Image:
    """Make the base image `what`: "busybox", "debian" or "debian:SUITE" (keywords go to
    `bootstrap_busybox` / `bootstrap_debian`)."""
    kind, sep, arg = what.strip().partition(":")
    if kind == "busybox" and not sep:
        return bootstrap_busybox(store, **kw)
    if kind == "debian":
        if sep and not arg:
            raise ImageError(f"{what!r}: name the suite after the colon, e.g. debian:bookworm")
        suite = kw.pop("suite", None) or arg or "bookworm"
        if arg and suite != arg:
            raise ImageError(f"{what!r} and suite={suite!r} disagree: give the suite once")
        kw.setdefault("name", f"debian:{suite}")
        return bootstrap_debian(store, suite=suite, **kw)
    raise ImageError(
        f"cannot bootstrap {what!r}: the base images cocon can make here are {', '.join(SUPPORTED)} "
        "(e.g. 'busybox', 'debian:bookworm'); get others with cocon load or cocon image import"
    )


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"bootstrapping {what} needs root (file owners, device nodes, chroot): run as root")


def _check_name(name: str) -> str:
    normalize_name(name)  # raises ImageError for a bad reference, before any slow work
    return name


@contextlib.contextmanager
def _work_dir(store: ImageStore, prefix: str) -> Iterator[str]:
    """A work directory under `<store root>/tmp` (the store's file system), removed afterwards in
    every case; when the clean-up itself fails during another error, that error goes on with a note."""
    parent = os.path.join(os.path.abspath(store.root), "tmp")
    os.makedirs(parent, mode=0o700, exist_ok=True)
    work = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield work
    except BaseException as exc:
        try:
            remove_work_dir(work)
        except ImageError as cleanup:
            exc.add_note(f"Cleaning up failed too: {cleanup}")
        raise
    remove_work_dir(work)


# --- writing the image ---------------------------------------------------------------------------------


class _BlobSink(io.RawIOBase):
    """A content-store Writer as a raw binary file, so that dir_to_layer streams into the store."""

    def __init__(self, writer: Writer) -> None:
        super().__init__()
        self._writer = writer

    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        return self._writer.write(memoryview(data))


def _commit_image(
    store: ImageStore,
    rootfs: str,
    *,
    name: str,
    epoch: int,
    compression: Compression,
    cmd: list[str],
    created_by: str,
    progress: Progress | None,
) -> tuple[Image, LayerInfo]:
    """Archive `rootfs` (times clamped to `epoch`) into a layer blob, then record the image."""
    _report(progress, "layer", 0, 1)
    with store.content.lease():
        with store.content.writer() as w:
            buffered = io.BufferedWriter(_BlobSink(w), buffer_size=1 << 20)
            info = dir_to_layer(rootfs, buffered, compression, mtime=epoch)
            buffered.flush()
            w.commit()
        _report(progress, "layer", 1, 1)
        _report(progress, "commit", 0, 1)
        platform = host_platform()
        created = rfc3339(epoch)
        config = ImageConfig(
            created=created,
            architecture=platform.architecture,
            os=platform.os,
            variant=platform.variant,
            config=ContainerConfig(env=[f"PATH={DEFAULT_PATH}"], cmd=cmd),
            rootfs=RootFS(type="layers", diff_ids=[info.diff_id]),
            history=[History(created=created, created_by=created_by)],
        )
        layer = Descriptor(media_type=info.media_type, digest=info.digest, size=info.size)
        image = store.commit(encode_image_config(config), [layer], names=[name])
    _report(progress, "commit", 1, 1)
    return image, info


# --- busybox -------------------------------------------------------------------------------------------

# The files the Docker Hub busybox image has (buildroot's skeleton, root's password locked).
BUSYBOX_PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
"""
BUSYBOX_GROUP = """\
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
utmp:x:43:
plugdev:x:46:
staff:x:50:
lock:x:54:
netdev:x:82:
users:x:100:
nogroup:x:65534:
"""
BUSYBOX_SHADOW = "".join(f"{line.split(':')[0]}:*:::::::\n" for line in BUSYBOX_PASSWD.splitlines())
# path, mode, uid, gid (buildroot's device_table.txt plus the users' home directories)
BUSYBOX_DIRS: tuple[tuple[str, int, int, int], ...] = (
    ("root", 0o700, 0, 0),
    ("tmp", 0o1777, 0, 0),
    ("home", 0o755, 0, 0),
    ("var/spool/mail", 0o755, 0, 0),
    ("var/www", 0o755, 33, 33),
    ("etc/network/if-up.d", 0o755, 0, 0),
    ("etc/network/if-pre-up.d", 0o755, 0, 0),
    ("etc/network/if-down.d", 0o755, 0, 0),
    ("etc/network/if-post-down.d", 0o755, 0, 0),
)


def busybox_version(busybox: str) -> str:
    """ "1.35.0" from the banner `BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) multi-call binary.`"""
    try:
        out = subprocess.run([busybox], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"cannot run {busybox}: {exc}; reinstall busybox-static") from None
    m = re.search(r"BusyBox v(\S+)", out)
    if m is None:
        raise ImageError(f"{busybox} does not print a BusyBox version banner: reinstall busybox-static")
    return m.group(1)


def make_busybox_rootfs(dest: str, busybox: str) -> None:
    """make_rootfs (busybox, applet links, top-level directories) plus the users, groups and
    directories of the Docker Hub image."""
    make_rootfs(dest, busybox)
    for rel, mode, uid, gid in BUSYBOX_DIRS:
        path = os.path.join(dest, rel)
        os.makedirs(path, exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
    for rel, text, mode in (
        ("etc/passwd", BUSYBOX_PASSWD, 0o644),
        ("etc/group", BUSYBOX_GROUP, 0o644),
        ("etc/shadow", BUSYBOX_SHADOW, 0o600),
    ):
        path = os.path.join(dest, rel)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)


def bootstrap_busybox(
    store: ImageStore,
    name: str = "busybox:latest",
    *,
    progress: Progress | None = None,
    compression: Compression = "gzip",
) -> Image:
    """The `busybox` image from the host's busybox-static: one layer, `Cmd ["sh"]`. Reproducible:
    `created` and every time in the layer are the binary's mtime, so the same binary gives the same
    image ID. gzip by default: the layer is about 1 MB, and every client reads gzip."""
    _check_name(name)
    _require_root("busybox")
    try:
        busybox = find_static_busybox()
    except BusyboxMissing as exc:
        raise ImageError(f"{exc} (apt-get install busybox-static), then bootstrap again") from None
    version = busybox_version(busybox)
    epoch = int(os.stat(busybox).st_mtime)
    with _work_dir(store, "bootstrap-busybox-") as work:
        _report(progress, "rootfs", 0, 1)
        rootfs = os.path.join(work, "rootfs")
        os.mkdir(rootfs, 0o755)
        try:
            make_busybox_rootfs(rootfs, busybox)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ImageError(f"cannot make the busybox root file system in {rootfs}: {exc}") from None
        _report(progress, "rootfs", 1, 1)
        image, _ = _commit_image(
            store,
            rootfs,
            name=name,
            epoch=epoch,
            compression=compression,
            cmd=["sh"],
            created_by=f"cocon image bootstrap busybox (busybox {version})",
            progress=progress,
        )
        return image


# --- apt sources: where the Debian mirror is ------------------------------------------------------------


@dataclass(frozen=True)
class AptSource:
    """One `deb` URI of the host's apt configuration, with the suites and components it serves."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str  # "file:line", for messages


def parse_one_line_sources(text: str, origin: str = "sources.list") -> list[AptSource]:
    """The one-line format: `deb [opt=val ...] URI SUITE [COMPONENT...]`; `#` starts a comment;
    `deb-src` lines are skipped, as are lines apt would refuse."""
    found: list[AptSource] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind != "deb":
            continue
        rest = rest.strip()
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                log.debug("%s:%d: '[' without ']': skipped", origin, n)
                continue
            options = rest[1:end].split()
            if any(o.lower() in ("enabled=no", "enabled=false") for o in options):
                continue
            rest = rest[end + 1 :]
        words = rest.split()
        if len(words) < 2:
            continue
        found.append(AptSource(words[0], (words[1],), tuple(words[2:]), f"{origin}:{n}"))
    return found


def parse_deb822_sources(text: str, origin: str = "debian.sources") -> list[AptSource]:
    """The deb822 format of `*.sources`: paragraphs of `Types:`, `URIs:`, `Suites:`, `Components:`
    (and `Enabled: no`), continuation lines indented, `#` lines ignored; only `Types: deb`."""
    found: list[AptSource] = []
    fields: dict[str, str] = {}
    start = 0
    key: str | None = None

    def flush() -> None:
        if not fields:
            return
        types = fields.get("types", "").split()
        enabled = fields.get("enabled", "yes").strip().lower() not in ("no", "false", "0")
        if "deb" in types and enabled:
            suites = tuple(fields.get("suites", "").split())
            components = tuple(fields.get("components", "").split())
            for uri in fields.get("uris", "").split():
                if suites:
                    found.append(AptSource(uri, suites, components, f"{origin}:{start}"))
        fields.clear()

    for n, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("#"):
            continue
        if not raw.strip():
            flush()
            key = None
            continue
        if raw[0] in " \t":
            if key is not None:
                fields[key] += " " + raw.strip()
            continue
        name, colon, value = raw.partition(":")
        if not colon:
            log.debug("%s:%d: not a 'Field: value' line: skipped", origin, n)
            continue
        if not fields:
            start = n
        key = name.strip().lower()
        fields[key] = value.strip()
    flush()
    return found


def _source_files(etc_apt: str) -> list[str]:
    """sources.list, then sources.list.d/*.list and *.sources in apt's (alphanumeric) order."""
    files = [os.path.join(etc_apt, "sources.list")]
    directory = os.path.join(etc_apt, "sources.list.d")
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    for name in names:
        if re.fullmatch(r"[A-Za-z0-9_.-]+\.(list|sources)", name):
            files.append(os.path.join(directory, name))
    return files


def read_apt_sources(etc_apt: str = APT_ETC) -> list[AptSource]:
    """Every enabled `deb` source of the apt configuration under `etc_apt`, in apt's order."""
    found: list[AptSource] = []
    for path in _source_files(etc_apt):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        parse = parse_deb822_sources if path.endswith(".sources") else parse_one_line_sources
        found.extend(parse(text, path))
    return found


def _usable_uri(uri: str) -> bool:
    return uri.partition(":")[0] in MIRROR_SCHEMES


def choose_mirror(sources: Sequence[AptSource], suite: str) -> AptSource | None:
    """The first source that serves `suite`; else the first one of Debian's main archive (a source
    with a plain Debian release name or alias as a suite: not -security, -updates, -backports)."""
    usable = [s for s in sources if _usable_uri(s.uri)]
    for source in usable:
        if suite in source.suites:
            return source
    for source in usable:
        if any(s in DEBIAN_SUITES for s in source.suites):
            return source
    return None


def find_apt_mirror(suite: str, etc_apt: str = APT_ETC) -> str:
    """The mirror URI for debootstrap, from the host's apt configuration."""
    source = choose_mirror(read_apt_sources(etc_apt), suite)
    if source is None:
        raise ImageError(
            f"no Debian mirror for suite {suite!r} in the apt configuration ({etc_apt}/sources.list, "
            f"{etc_apt}/sources.list.d/*.list and *.sources): pass one with --mirror "
            "(mirror= in Python), e.g. --mirror http://MIRROR-HOST/debian"
        )
    log.debug("Debian mirror %s from %s", source.uri, source.origin)
    return source.uri.rstrip("/")


# --- debootstrap's output as progress -----------------------------------------------------------------

_PKG_FETCH = re.compile(r"(Retrieving|Validating) (\S+) (\S+)")
_INDEX_FETCH = re.compile(r"(Retrieving|Validating) (\S+)")
_INDEX_STEPS = ("Checking Release signature", "Valid Release signature", "Resolving dependencies",
                "Checking component", "Found additional")  # fmt: skip
_PER_PACKAGE = {
    "Extracting": "extract",
    "Unpacking": "install",
    "Configuring": "configure",
}
_PER_PACKAGE_RE = re.compile(r"(Extracting|Unpacking|Configuring) (\S+)\.\.\.")


class DebootstrapProgress:
    """Turns debootstrap's `I:` lines into (stage, done, total) events.

    - `index`: the Release and Packages files, dependency resolution (total unknown: 0);
    - `download`: one `Validating NAME VERSION` per package, cached or fetched (`Retrieving` comes
      only for a download). The total is unknown until the downloads end; `expected` (the count of
      the last run) stands in for it, and grows if it was too small;
    - `extract`, `install` (Unpacking NAME...), `configure`: per package, out of the packages
      downloaded. `Base system installed successfully.` completes `configure`.
    """

    def __init__(self, expected: int = 0) -> None:
        self.expected = expected
        self.stage: str | None = None
        self.packages: list[str] = []  # downloaded (validated), in order
        self._index_steps = 0
        self._done: dict[str, set[str]] = {"extract": set(), "install": set(), "configure": set()}

    def feed(self, line: str) -> tuple[str, int, int] | None:
        if not line.startswith("I: "):
            return None
        msg = line[3:].strip()
        m = _PKG_FETCH.fullmatch(msg)
        if m is not None:
            if m.group(1) == "Validating" and m.group(2) not in self.packages:
                self.packages.append(m.group(2))
            done = len(self.packages)
            total = max(self.expected, done) if self.expected else 0
            return self._event("download", done, total)
        if _INDEX_FETCH.fullmatch(msg) or msg.startswith(_INDEX_STEPS):
            self._index_steps += 1
            return self._event("index", self._index_steps, 0)
        m = _PER_PACKAGE_RE.fullmatch(msg)
        if m is not None:
            stage = _PER_PACKAGE[m.group(1)]
            seen = self._done[stage]
            seen.add(m.group(2))
            return self._event(stage, len(seen), max(len(self.packages), len(seen)))
        if msg.startswith("Installing core packages"):
            return self._event("install", len(self._done["install"]), len(self.packages))
        if msg.startswith("Base system installed successfully"):
            total = max(len(self.packages), len(self._done["configure"]))
            return self._event("configure", total, total)
        return None

    def _event(self, stage: str, done: int, total: int) -> tuple[str, int, int]:
        self.stage = stage
        return stage, done, total


# --- careful clean-up of work directories -------------------------------------------------------------


def unmount_below(path: str) -> None:
    """Unmount everything mounted at or below `path` (debootstrap leaves proc, sys, devpts … when it
    fails), deepest first. The mount points come from mountinfo; one whose path now resolves
    elsewhere (a symlink put on the way) is refused, and the last component is never followed."""
    for _ in range(64):
        points = mounts_under(path)
        if not points:
            return
        for mp in points:
            if os.path.realpath(mp) != mp:
                raise ImageError(
                    f"{mp} is mounted but its path now goes through a symlink: refusing to unmount it; "
                    f"unmount it by hand, then remove {path}"
                )
            try:
                linux.umount2(mp, UMOUNT_NOFOLLOW)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    try:
                        linux.umount2(mp, UMOUNT_NOFOLLOW | linux.MNT_DETACH)
                    except OSError as exc2:
                        raise ImageError(f"cannot detach {mp}: {exc2.strerror}; unmount it by hand") from None
                elif exc.errno not in (errno.EINVAL, errno.ENOENT):
                    raise ImageError(
                        f"cannot unmount {mp}: {exc.strerror}; unmount it by hand, then remove {path}"
                    ) from None
    raise ImageError(f"{path} still has mounts after 64 rounds of unmounting: see /proc/self/mountinfo")


def remove_work_dir(path: str) -> None:
    """Unmount what is mounted inside `path`, then delete it. shutil.rmtree walks with descriptors
    and never follows a symlink, so nothing outside `path` is touched; nothing is deleted while a
    mount is left inside it."""
    if not os.path.lexists(path):
        return
    unmount_below(path)
    left = mounts_under(path)
    if left:
        raise ImageError(f"{', '.join(left)} still mounted: unmount by hand, then remove {path}")
    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux always has the fd version
        raise ImageError(f"this Python cannot delete {path} safely: remove it by hand")
    shutil.rmtree(path)


# --- Debian ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _dir_fd(root_fd: int, rel: str) -> Iterator[int | None]:
    """The directory `rel` below `root_fd`, opened one component at a time without following a
    symlink; None when it is missing or not a real directory."""
    fd = os.dup(root_fd)
    try:
        for part in [p for p in rel.split("/") if p]:
            try:
                nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    os.close(fd)
                    fd = -1
                    break
                raise
            os.close(fd)
            fd = nfd
        yield fd if fd >= 0 else None
    finally:
        if fd >= 0:
            os.close(fd)


def _remove_files(root_fd: int, rel_dir: str, patterns: Sequence[str], removed: list[str]) -> None:
    """Delete the non-directories in `rel_dir` whose names match one of `patterns`."""
    with _dir_fd(root_fd, rel_dir) as fd:
        if fd is None:
            return
        for name in sorted(os.listdir(fd)):
            if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                continue
            os.unlink(name, dir_fd=fd)
            removed.append(f"{rel_dir}/{name}")


def _read_file(root_fd: int, rel: str) -> bytes | None:
    d, _, name = rel.rpartition("/")
    with _dir_fd(root_fd, d) as fd:
        if fd is None:
            return None
        try:
            f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                return None
            raise
        try:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                return None
            with os.fdopen(os.dup(f), "rb") as fobj:
                return fobj.read()
        finally:
            os.close(f)


def _rewrite_file(root_fd: int, rel: str, data: bytes) -> bool:
    """Replace a regular file's content in place (mode and owner stay); False if it is not one."""
    d, _, name = rel.rpartition("/")
    with _dir_fd(root_fd, d) as fd:
        if fd is None:
            return False
        try:
            f = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                return False
            raise
        try:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                return False
            os.ftruncate(f, 0)
            view = memoryview(data)
            while view:
                view = view[os.write(f, view) :]
            return True
        finally:
            os.close(f)


def _release_epoch(root_fd: int) -> int | None:
    """The `Date:` of the suite's Release file that debootstrap fetched: when the archive was in the
    state the image was made from."""
    with _dir_fd(root_fd, "var/lib/apt/lists") as fd:
        names = sorted(os.listdir(fd)) if fd is not None else []
    for name in names:
        if not name.endswith(("_InRelease", "_Release")):
            continue
        data = _read_file(root_fd, f"var/lib/apt/lists/{name}") or b""
        for line in data.decode("utf-8", "replace").splitlines():
            if line.startswith("Date:"):
                try:
                    return int(email.utils.parsedate_to_datetime(line[5:].strip()).timestamp())
                except (TypeError, ValueError):
                    break
    return None


def clean_debian_rootfs(rootfs: str, epoch: int) -> list[str]:
    """What Debian's official images (debuerreotype) drop or reset; returns what was changed.

    - apt's downloaded state: `var/cache/apt/archives/*.deb` (debootstrap copies its cache there),
      `var/cache/apt/*.bin`, `var/lib/apt/lists/*` (partial/ and lock dirs stay): `apt-get update`
      fetches fresh lists in a container;
    - logs with times in them: `var/log/{dpkg,bootstrap,alternatives}.log`, `var/log/apt/{history,
      term}.log`; every other file in var/log is truncated (it keeps its mode and owner);
    - `var/cache/ldconfig/aux-cache` (times and inode numbers), `run/mount/utab`;
    - the host's `etc/resolv.conf` and `etc/hostname`, which debootstrap copies in: the runtime
      provides both in a container;
    - everything in `dev/` (device nodes debootstrap made; the runtime mounts its own /dev);
    - `etc/machine-id` emptied if it exists (systemd's "not yet set"), `var/lib/dbus/machine-id`
      removed if it is a file;
    - the "last password change" days of `etc/shadow` and `etc/shadow-` clamped to `epoch`."""
    changed: list[str] = []
    root_fd = os.open(rootfs, _DIR_FLAGS)
    try:
        _remove_files(root_fd, "var/cache/apt/archives", ["*.deb", "lock"], changed)
        _remove_files(root_fd, "var/cache/apt", ["*.bin"], changed)
        _remove_files(root_fd, "var/lib/apt/lists", ["*"], changed)
        _remove_files(root_fd, "var/log", ["dpkg.log", "bootstrap.log", "alternatives.log"], changed)
        _remove_files(root_fd, "var/log/apt", ["history.log", "term.log", "eipp.log.xz"], changed)
        _remove_files(root_fd, "var/cache/ldconfig", ["aux-cache"], changed)
        _remove_files(root_fd, "run/mount", ["utab"], changed)
        _remove_files(root_fd, "etc", ["resolv.conf", "hostname"], changed)
        _remove_files(root_fd, "var/lib/dbus", ["machine-id"], changed)
        with _dir_fd(root_fd, "var/log") as fd:
            for name in sorted(os.listdir(fd)) if fd is not None else []:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                    _rewrite_file(root_fd, f"var/log/{name}", b"")
                    changed.append(f"var/log/{name} (truncated)")
        with _dir_fd(root_fd, "dev") as fd:
            for name in sorted(os.listdir(fd)) if fd is not None else []:
                if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    shutil.rmtree(name, dir_fd=fd)
                else:
                    os.unlink(name, dir_fd=fd)
                changed.append(f"dev/{name}")
        if _read_file(root_fd, "etc/machine-id") and _rewrite_file(root_fd, "etc/machine-id", b""):
            changed.append("etc/machine-id (emptied)")
        days = epoch // 86400
        for rel in ("etc/shadow", "etc/shadow-"):
            data = _read_file(root_fd, rel)
            if data is None:
                continue
            clamped = _clamp_shadow(data, days)
            if clamped != data and _rewrite_file(root_fd, rel, clamped):
                changed.append(f"{rel} (last change clamped)")
        with contextlib.suppress(OSError):
            with _dir_fd(root_fd, "run") as fd:
                if fd is not None:
                    os.rmdir("mount", dir_fd=fd)  # only if empty, as debuerreotype does
    finally:
        os.close(root_fd)
    return changed


def _clamp_shadow(data: bytes, days: int) -> bytes:
    """Field 3 of shadow(5) (days since the epoch of the last change) no later than `days`."""
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        fields = line.split(b":")
        if len(fields) > 2 and fields[2].isdigit() and int(fields[2]) > days:
            fields[2] = str(days).encode()
            lines[i] = b":".join(fields)
    return b"\n".join(lines)


def _check_debian_args(suite: str, variant: str, include: Sequence[str], mirror: str | None) -> None:
    if not _SUITE_RE.fullmatch(suite):
        raise ImageError(f"{suite!r} is not a suite name: give one such as bookworm, trixie or stable")
    if variant not in DEBIAN_VARIANTS:
        raise ImageError(f"variant {variant!r} is not supported: use one of {', '.join(DEBIAN_VARIANTS)}")
    for package in include:
        if not _PACKAGE_RE.fullmatch(package):
            raise ImageError(f"{package!r} is not a Debian package name")
    if mirror is not None and not _MIRROR_RE.fullmatch(mirror):
        raise ImageError(
            f"{mirror!r} is not a mirror URL: give http://HOST/PATH, https://…, ftp://… or file:/PATH"
        )
    if os.path.isdir(DEBOOTSTRAP_SCRIPTS) and not os.path.exists(os.path.join(DEBOOTSTRAP_SCRIPTS, suite)):
        known = sorted(n for n in os.listdir(DEBOOTSTRAP_SCRIPTS) if n in DEBIAN_SUITES)
        raise ImageError(
            f"debootstrap does not know the suite {suite!r}: Debian suites it knows are {', '.join(known)} "
            "(a newer debootstrap knows newer suites)"
        )


def _debootstrap_env() -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    for key in _PASSTHROUGH_ENV:  # wget honours the proxy variables
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop debootstrap and everything it started (it runs in its own session)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_logged(
    cmd: list[str], log_file: io.BufferedWriter, parser: DebootstrapProgress, progress: Progress | None
) -> int:
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_debootstrap_env(),
            start_new_session=True,
        )
    except OSError as exc:
        raise ImageError(f"cannot run {cmd[0]}: {exc.strerror}; install debootstrap") from None
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            log_file.write(raw)
            log_file.flush()
            event = parser.feed(raw.decode("utf-8", "replace"))
            if event is not None:
                _report(progress, *event)
        return proc.wait()
    except BaseException:
        _kill_group(proc)
        log_file.write(b"cocon: interrupted; debootstrap was stopped\n")
        raise
    finally:
        if proc.stdout is not None:
            proc.stdout.close()


def _tail(path: str, n: int = _LOG_TAIL) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        lines = deque(f, maxlen=n)
        return "".join("  " + ln.decode("utf-8", "replace").rstrip() + "\n" for ln in lines)
    return ""


def _read_hint(path: str) -> int:
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        return sum(1 for line in f if line.strip())
    return 0


def _write_hint(path: str, packages: Sequence[str]) -> None:
    with contextlib.suppress(OSError):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write("".join(f"{p}\n" for p in packages))
        os.replace(tmp, path)


def _source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value.isdigit() else None


def _mirror_or_none(suite: str) -> str | None:
    try:
        return find_apt_mirror(suite)
    except ImageError:
        return None


def bootstrap_debian(
    store: ImageStore,
    name: str = "debian:bookworm",
    *,
    suite: str = "bookworm",
    variant: str = "minbase",
    mirror: str | None = None,
    include: Sequence[str] = (),
    progress: Progress | None = None,
    compression: Compression = "zstd",
    tarball: str | None = None,
) -> Image:
    """A Debian image made with debootstrap: one layer, `Cmd ["bash"]`.

    With `tarball` (made by `debootstrap --make-tarball`, as `make test`'s set-up does), the packages
    come from that file and debootstrap runs in an empty network namespace: nothing is downloaded.

    The mirror is `mirror`, else the host's apt configuration's (`find_apt_mirror`). debootstrap's
    output goes to `<store root>/logs/bootstrap-debian-<suite>.log`; a failure raises ImageError with
    its last lines and that path. The .debs stay in `<store root>/cache/debootstrap/<suite>` for the
    next run. Times are clamped to $SOURCE_DATE_EPOCH, else to the Date of the suite's Release file,
    so the same archive state and cache give the same layer (see docs/bootstrap.md)."""
    _check_name(name)
    if isinstance(include, str):
        raise ImageError("include must be a list of package names, not one string")
    include = list(include)
    _check_debian_args(suite, variant, include, mirror)
    _require_root("Debian")
    debootstrap = shutil.which(DEBOOTSTRAP, path=DEFAULT_PATH) or shutil.which(DEBOOTSTRAP)
    if debootstrap is None:
        raise ImageError("debootstrap is not installed: apt-get install debootstrap, then bootstrap again")
    if tarball is not None:
        tarball = os.path.abspath(tarball)
        if not os.path.isfile(tarball):
            raise ImageError(
                f"{tarball}: no such debootstrap tarball; make one with debootstrap --make-tarball"
            )
        mirror = mirror.rstrip("/") if mirror else _mirror_or_none(suite)  # only for the image's sources.list
    else:
        mirror = mirror.rstrip("/") if mirror else find_apt_mirror(suite)
    _check_debian_args(suite, variant, include, mirror)

    root = os.path.abspath(store.root)
    cache_root = os.path.join(root, "cache", "debootstrap")
    cache = os.path.join(cache_root, suite)
    logs = os.path.join(root, "logs")
    for d in (cache, logs):
        os.makedirs(d, mode=0o755, exist_ok=True)
    log_path = os.path.join(logs, f"bootstrap-debian-{suite}.log")
    hint_path = os.path.join(cache_root, f"{suite}-{variant}.packages")

    # With a tarball nothing needs the network, so debootstrap gets none (util-linux's unshare).
    cmd = ["unshare", "--net", "--", debootstrap] if tarball else [debootstrap]
    if variant != "default":
        cmd.append(f"--variant={variant}")
    cmd.append(f"--unpack-tarball={tarball}" if tarball else f"--cache-dir={cache}")
    if include:
        cmd.append(f"--include={','.join(include)}")

    # One bootstrap per suite at a time: they would share (and corrupt) the cache and the log.
    lock_fd = os.open(os.path.join(cache_root, f"{suite}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        with _work_dir(store, f"bootstrap-debian-{suite}-") as work:
            target = os.path.join(work, "rootfs")
            full = [*cmd, suite, target, *([mirror] if mirror else [])]
            parser = DebootstrapProgress(_read_hint(hint_path))
            started = time.monotonic()
            with open(log_path, "wb") as log_file:
                log_file.write(f"# {shlex.join(full)}\n".encode())
                status = _run_logged(full, log_file, parser, progress)
                if status != 0:
                    _append_target_log(log_file, target)
            if status != 0:
                where = f" while {STAGES[parser.stage].lower()}" if parser.stage else ""
                raise ImageError(
                    f"debootstrap failed (exit status {status}){where}; the last lines of its log:\n"
                    f"{_tail(log_path)}The full log is {log_path}. Check the mirror ({mirror}) and the "
                    "suite, or pass another mirror with --mirror."
                )
            log.info("debootstrap %s took %.1f s", suite, time.monotonic() - started)
            _write_hint(hint_path, parser.packages)
            unmount_below(target)
            if mounts_under(target):
                raise ImageError(f"{target} still has mounts after debootstrap: unmount them by hand")

            _report(progress, "clean", 0, 1)
            root_fd = os.open(target, _DIR_FLAGS)
            try:
                version = (_read_file(root_fd, "etc/debian_version") or b"").decode("utf-8", "replace")
                epoch = _source_date_epoch()
                if epoch is None:
                    epoch = _release_epoch(root_fd) or int(time.time())
            finally:
                os.close(root_fd)
            clean_debian_rootfs(target, epoch)
            _report(progress, "clean", 1, 1)

            what = ["debootstrap", *([f"--variant={variant}"] if variant != "default" else [])]
            what += [f"--include={','.join(include)}"] if include else []
            release = f": Debian {version.strip()}" if version.strip() else ""
            image, info = _commit_image(
                store,
                target,
                name=name,
                epoch=epoch,
                compression=compression,
                cmd=["bash"],
                created_by=f"cocon image bootstrap debian ({shlex.join([*what, suite])}{release})",
                progress=progress,
            )
            log.info(
                "debian:%s: layer of %d bytes (%d uncompressed)", suite, info.size, info.uncompressed_size
            )
            return image
    finally:
        os.close(lock_fd)


def _append_target_log(log_file: io.BufferedWriter, target: str) -> None:
    """debootstrap's own log (what dpkg said) is inside the target, which is about to go."""
    try:
        root_fd = os.open(target, _DIR_FLAGS)
    except OSError:
        return
    try:
        data = _read_file(root_fd, "debootstrap/debootstrap.log")
    finally:
        os.close(root_fd)
    if data:
        log_file.write(b"\n# ---- debootstrap/debootstrap.log from the target ----\n")
        log_file.write(data)


__all__ = [
    "DEBIAN_SUITES",
    "STAGES",
    "AptSource",
    "DebootstrapProgress",
    "Progress",
    "bootstrap",
    "bootstrap_busybox",
    "bootstrap_debian",
    "choose_mirror",
    "clean_debian_rootfs",
    "find_apt_mirror",
    "parse_deb822_sources",
    "parse_one_line_sources",
    "read_apt_sources",
    "remove_work_dir",
]
