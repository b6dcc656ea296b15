"""Guest assets: the kernel and initramfs cocon boots its VMs with, built from Debian packages.

Layout under `<root>/assets/` (`root` is the caller's, normally `$COCON_ROOT`):

    debs/                     downloaded .deb files (apt-get download), kept as a cache
    <digest>/vmlinuz          the kernel from linux-image-<release>-cloud-amd64
    <digest>/initrd.img       the initramfs cocon made (newc cpio, zstd-compressed)
    <digest>/manifest.json    inputs, kernel release, sha256 of both files
    <digest>/kvm-probe.json   the cached answer of cocon.vmm.kvm (per host and kernel)
    resolved.json             package versions apt-cache gave, until apt's lists change
    tmp/                      work directories of builds in progress
    .lock                     flock'ed while a build runs: two builders never race

`<digest>` is the sha256 of the build's inputs (`Inputs`): the resolved package names and versions,
the module list, the sha256 of the guest init script and `RECIPE_VERSION` (bumped whenever the build
code below changes what it produces). A new kernel in the Debian archive, a changed init script or a
changed recipe therefore gives a new directory; old ones stay until `prune_assets` removes them.

A build works in `tmp/<random>/` and renames the finished directory into place, so a reader sees a
complete asset directory or none. `ensure_assets` checks the files against the manifest's sha256
(about 10 MB, a few milliseconds) and rebuilds a directory that does not match.

The initramfs holds busybox (from `busybox-static`, every applet linked into /bin), the kernel
modules in `DEFAULT_MODULES` with their dependencies (from the same kernel package; the modules
built into the kernel are skipped, see the package's config and modules.builtin), a modules.dep made
by the host's `depmod`, /dev/console, and `cocon/vmm/guest/init` as /init.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from cocon.vmm.errors import AssetError

__all__ = [
    "DEFAULT_MODULES",
    "RECIPE_VERSION",
    "STAGES",
    "Assets",
    "AssetsStatus",
    "Inputs",
    "Progress",
    "Recipe",
    "assets_dir",
    "assets_status",
    "ensure_assets",
    "prune_assets",
    "resolve_inputs",
]

#: Bump when the build below changes what it produces for the same packages and init script.
RECIPE_VERSION = 1

#: Kernel modules the guest loads at boot (in this order), with their dependencies. In Debian's
#: cloud kernel these are modules, not built in: virtio transports (mmio for the microvm machine,
#: pci for q35), block, console (virtio-serial, the host<->guest channel), net, rng (entropy),
#: overlay and erofs (container root filesystems), and the ACPI power button with evdev (the init
#: waits on it for QMP system_powerdown). ext4 is built in; 9p is not in this kernel at all
#: (CONFIG_NET_9P is not set), so a rootfs reaches the guest as a block device (or virtio-fs).
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "overlay",
    "erofs",
    "button",
    "evdev",
)

KERNEL_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
MANIFEST_FILE = "manifest.json"

#: The stages `progress(stage, done, total)` is called with, in order. `done`/`total` count bytes
#: for "download" and steps otherwise.
STAGES = ("resolve", "download", "extract", "modules", "initramfs", "commit")

Progress = Callable[[str, int, int], None]


def _default_init() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", "init")


@dataclass(frozen=True)
class Recipe:
    """What to build the assets from. The defaults are what cocon boots; tests change them."""

    kernel_package: str = KERNEL_PACKAGE
    busybox_package: str = BUSYBOX_PACKAGE
    modules: tuple[str, ...] = DEFAULT_MODULES
    #: Path of the guest init script; None: cocon's own (cocon/vmm/guest/init).
    init_script: str | None = None

    def init_path(self) -> str:
        return self.init_script if self.init_script is not None else _default_init()


@dataclass(frozen=True)
class Inputs:
    """Everything a build depends on; `digest` names the asset directory."""

    kernel_package: str  # the versioned package, e.g. linux-image-6.1.0-56-cloud-amd64
    kernel_version: str  # its Debian version, e.g. 6.1.192-2
    busybox_package: str
    busybox_version: str
    modules: tuple[str, ...]
    init_sha256: str
    recipe_version: int = RECIPE_VERSION

    def to_json(self) -> dict[str, object]:
        return {
            "kernel_package": self.kernel_package,
            "kernel_version": self.kernel_version,
            "busybox_package": self.busybox_package,
            "busybox_version": self.busybox_version,
            "modules": list(self.modules),
            "init_sha256": self.init_sha256,
            "recipe_version": self.recipe_version,
        }

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class Assets:
    """A built, verified asset directory."""

    kernel: str  # path of the kernel image (bzImage)
    initrd: str  # path of the initramfs
    version: str  # the kernel release (`uname -r` in the guest), e.g. 6.1.0-56-cloud-amd64
    digest: str
    directory: str
    packages: dict[str, str] = field(default_factory=dict)  # Debian package -> version
    modules: tuple[str, ...] = ()  # every module file in the initramfs, dependencies included


@dataclass(frozen=True)
class AssetsStatus:
    """What `assets_status` found. `state` is one of:
    "ready" (built and verified), "missing" (not built yet), "corrupt" (built but a file does not
    match its manifest: `ensure_assets` rebuilds it), "unknown" (the package versions could not be
    resolved, see `error`; `assets` is then the newest verified build, if any)."""

    state: str
    digest: str | None
    assets: Assets | None
    inputs: Inputs | None
    built: list[str]  # digests of every asset directory present
    error: str | None = None


def assets_dir(root: str) -> str:
    return os.path.join(root, "assets")


# --- resolving package versions -------------------------------------------------------------------


def _run(cmd: list[str], what: str, *, cwd: str | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise AssetError(f"{what}: {cmd[0]} is not installed; install it (apt-get install -y ...)") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise AssetError(f"{what}: `{' '.join(cmd)}` failed ({done.returncode}): {' / '.join(detail)}")
    return done.stdout


def _apt_show(package: str) -> dict[str, str]:
    text = _run(
        ["apt-cache", "show", "--no-all-versions", package],
        f"cannot look up the Debian package {package} (run apt-get update?)",
    )
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line or line[0].isspace() or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key, value.strip())
    if "Version" not in fields:
        raise AssetError(f"apt-cache knows no version of {package}: run apt-get update")
    return fields


def _kernel_package(meta: str) -> tuple[str, str]:
    """The versioned image package a meta package (linux-image-cloud-amd64) depends on."""
    fields = _apt_show(meta)
    if meta.startswith("linux-image-") and "Depends" in fields:
        for alternative in fields["Depends"].split(","):
            name = alternative.split("|")[0].split("(")[0].strip()
            if name.startswith("linux-image-"):
                return name, _apt_show(name)["Version"]
    return meta, fields["Version"]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _apt_stamp() -> str:
    """Changes whenever apt's view of the archive may have changed (apt-get update, sources)."""
    parts = []
    for path in ("/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin", "/etc/apt/sources.list.d"):
        try:
            parts.append(f"{path}:{os.stat(path).st_mtime_ns}")
        except OSError:
            parts.append(f"{path}:-")
    return "|".join(parts)


def resolve_inputs(recipe: Recipe | None = None, *, cache_dir: str | None = None) -> Inputs:
    """The inputs a build would use now: package versions from apt's lists (no network access).

    apt-cache takes ~0.4 s a call; with `cache_dir` the resolved versions are kept in
    `cache_dir`/resolved.json until apt's lists change."""
    recipe = recipe or Recipe()
    init = recipe.init_path()
    try:
        init_sha = _sha256_file(init)
    except OSError as exc:
        raise AssetError(f"cannot read the guest init script {init}: {exc.strerror}") from exc
    request = f"{recipe.kernel_package} {recipe.busybox_package} {_apt_stamp()}"
    cache_file = os.path.join(cache_dir, "resolved.json") if cache_dir is not None else None
    versions: list[str] | None = None
    if cache_file is not None:
        try:
            with open(cache_file, "rb") as f:
                cached = json.load(f)
            if cached.get("request") == request and len(cached.get("versions", [])) == 3:
                versions = [str(v) for v in cached["versions"]]
        except (OSError, ValueError, AttributeError):
            pass
    if versions is None:
        kernel_pkg, kernel_ver = _kernel_package(recipe.kernel_package)
        versions = [kernel_pkg, kernel_ver, _apt_show(recipe.busybox_package)["Version"]]
        if cache_file is not None:
            try:
                fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".resolved-")
                with os.fdopen(fd, "w") as f:
                    json.dump({"request": request, "versions": versions}, f)
                os.rename(tmp, cache_file)
            except OSError:
                pass
    return Inputs(
        kernel_package=versions[0],
        kernel_version=versions[1],
        busybox_package=recipe.busybox_package,
        busybox_version=versions[2],
        modules=tuple(recipe.modules),
        init_sha256=init_sha,
    )


# --- reading and verifying built assets -----------------------------------------------------------


def _load(directory: str, digest: str) -> Assets:
    """The assets in `directory`, verified against its manifest; AssetError if anything is off."""
    try:
        with open(os.path.join(directory, MANIFEST_FILE), "rb") as f:
            manifest = json.load(f)
        files = manifest["files"]
        for name in (KERNEL_FILE, INITRD_FILE):
            if _sha256_file(os.path.join(directory, name)) != files[name]:
                raise AssetError(f"{os.path.join(directory, name)} does not match its manifest")
        if manifest["digest"] != digest:
            raise AssetError(f"{directory} holds the assets of {manifest['digest']}, not {digest}")
        return Assets(
            kernel=os.path.join(directory, KERNEL_FILE),
            initrd=os.path.join(directory, INITRD_FILE),
            version=str(manifest["kernel_release"]),
            digest=digest,
            directory=directory,
            packages=dict(manifest["packages"]),
            modules=tuple(manifest["modules"]),
        )
    except AssetError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"the assets in {directory} are incomplete or corrupt ({exc})") from exc


def _built(base: str) -> list[str]:
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if len(n) == 64 and all(c in "0123456789abcdef" for c in n))


def _newest_valid(base: str) -> Assets | None:
    candidates = sorted(_built(base), key=lambda d: os.stat(os.path.join(base, d)).st_mtime_ns, reverse=True)
    for digest in candidates:
        try:
            return _load(os.path.join(base, digest), digest)
        except AssetError:
            continue
    return None


def assets_status(root: str, recipe: Recipe | None = None) -> AssetsStatus:
    """What is built and whether it is current, without building or downloading anything."""
    base = assets_dir(root)
    built = _built(base)
    try:
        inputs = resolve_inputs(recipe, cache_dir=base if os.path.isdir(base) else None)
    except AssetError as exc:
        return AssetsStatus("unknown", None, _newest_valid(base), None, built, str(exc))
    digest = inputs.digest
    directory = os.path.join(base, digest)
    if not os.path.isdir(directory):
        return AssetsStatus("missing", digest, None, inputs, built)
    try:
        return AssetsStatus("ready", digest, _load(directory, digest), inputs, built)
    except AssetError as exc:
        return AssetsStatus("corrupt", digest, None, inputs, built, str(exc))


# --- building -------------------------------------------------------------------------------------


def _report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _download(base: str, packages: list[tuple[str, str]], progress: Progress | None) -> dict[str, str]:
    """The .deb of each (name, version), from the cache under `base`/debs or apt-get download."""
    cache = os.path.join(base, "debs")
    os.makedirs(cache, exist_ok=True)
    found: dict[str, str] = {}
    missing: list[tuple[str, str]] = []
    for name, version in packages:
        path = _cached_deb(cache, name, version)
        if path is None:
            missing.append((name, version))
        else:
            found[name] = path
    _report(progress, "download", len(found), len(packages))
    if missing:
        # Download into a private directory first: a half-downloaded .deb never sits in the cache.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as work:
            _run(
                [
                    "apt-get",
                    "-q",
                    "-o",
                    "APT::Sandbox::User=root",
                    "download",
                    *(f"{name}={version}" for name, version in missing),
                ],
                "cannot download the guest packages from the Debian archive",
                cwd=work,
            )
            for name, version in missing:
                path = _cached_deb(work, name, version)
                if path is None:
                    raise AssetError(f"apt-get download did not produce {name} {version}")
                target = os.path.join(cache, os.path.basename(path))
                os.rename(path, target)
                found[name] = target
                _report(progress, "download", len(found), len(packages))
    return found


def _cached_deb(directory: str, name: str, version: str) -> str | None:
    # apt names files NAME_VERSION_ARCH.deb with ':' of the epoch written as %3a.
    quoted = version.replace(":", "%3a")
    for entry in os.listdir(directory):
        if entry.startswith(f"{name}_{quoted}_") and entry.endswith(".deb"):
            return os.path.join(directory, entry)
    return None


def _extract(deb: str, target: str) -> None:
    os.makedirs(target, exist_ok=True)
    _run(["dpkg-deb", "-x", deb, target], f"cannot unpack {os.path.basename(deb)}")


def _kernel_release(kernel_tree: str) -> str:
    modules = os.path.join(kernel_tree, "lib", "modules")
    try:
        releases = os.listdir(modules)
    except FileNotFoundError as exc:
        raise AssetError(f"the kernel package has no /lib/modules ({modules})") from exc
    if len(releases) != 1:
        raise AssetError(f"the kernel package has {len(releases)} module trees, expected one: {releases}")
    return releases[0]


def _module_closure(kernel_tree: str, release: str, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
    """(module files to copy, in dependency order; wanted modules that are built into the kernel)."""
    moddir = os.path.join(kernel_tree, "lib", "modules", release)
    _run(["depmod", "-b", kernel_tree, release], "depmod failed on the kernel package's modules")
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.strip().partition(":")
            deps[path] = rest.split()
            by_name[_module_name(path)] = path
    builtin: set[str] = set()
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            builtin = {_module_name(line.strip()) for line in f if line.strip()}
    except FileNotFoundError:
        pass
    ordered: list[str] = []
    skipped: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps.get(path, []):
            visit(dep)
        ordered.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key in builtin:
            skipped.append(name)
        else:
            raise AssetError(
                f"the kernel package {release} has no module {name} (neither a module nor built in): "
                "remove it from the module list"
            )
    return ordered, skipped


def _module_name(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


class _Cpio:
    """A writer of newc ("070701") cpio archives, the format the kernel unpacks into its rootfs.

    Entries get fixed owners (root) and mtimes (0), so the same inputs make the same archive."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.ino = 1
        self.written = 0

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._write(header + encoded)
        self._pad()
        self._write(data)
        self._pad()
        self.ino += 1

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.written += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self.written % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def tree(self, source: str, prefix: str) -> None:
        """Every directory and regular file under `source`, as `prefix`/..., sorted."""
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            rel = os.path.relpath(dirpath, source)
            here = prefix if rel == "." else f"{prefix}/{rel}"
            self.directory(here)
            for name in sorted(filenames):
                with open(os.path.join(dirpath, name), "rb") as f:
                    self.file(f"{here}/{name}", f.read())

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


def _busybox_applets(busybox: str) -> list[str]:
    listing = _run([busybox, "--list-full"], "cannot list the busybox applets")
    applets = []
    for line in listing.splitlines():
        path = line.strip()
        # Everything goes to /bin and /sbin (the init's PATH); usr/* links point there too.
        if path and ".." not in path and not path.startswith("/"):
            applets.append(path)
    return applets


def _make_initramfs(
    work: str, kernel_tree: str, release: str, busybox: str, modules: list[str], recipe: Recipe
) -> tuple[bytes, list[str]]:
    """The compressed initramfs, and the list of module files it holds."""
    import zstandard

    staging = os.path.join(work, "modroot")
    moddir = os.path.join(staging, "lib", "modules", release)
    os.makedirs(moddir)
    source = os.path.join(kernel_tree, "lib", "modules", release)
    for rel in modules:
        target = os.path.join(moddir, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(source, rel), target)
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if os.path.exists(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(moddir, name))
    _run(["depmod", "-b", staging, release], "depmod failed on the initramfs' modules")

    raw = os.path.join(work, "initrd.cpio")
    with open(raw, "wb") as out:
        cpio = _Cpio(out)
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "tmp", "etc"):
            cpio.directory(d)
        cpio.directory("etc/cocon")
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, 0o666)
        with open(busybox, "rb") as f:
            cpio.file("bin/busybox", f.read(), 0o755)
        for applet in _busybox_applets(busybox):
            if applet != "bin/busybox":
                depth = applet.count("/")
                cpio.symlink(applet, "../" * depth + "bin/busybox")
        with open(recipe.init_path(), "rb") as f:
            cpio.file("init", f.read(), 0o755)
        cpio.file("etc/cocon/modules", "".join(f"{m}\n" for m in recipe.modules).encode())
        cpio.directory("lib")
        cpio.directory("lib/modules")
        cpio.tree(moddir, f"lib/modules/{release}")
        cpio.close()
    with open(raw, "rb") as f:
        data = f.read()
    # zstd: the kernel unpacks it fastest of the formats it supports (CONFIG_RD_ZSTD=y).
    return zstandard.ZstdCompressor(level=19).compress(data), modules


def _build(base: str, inputs: Inputs, recipe: Recipe, progress: Progress | None) -> str:
    """Build into tmp/ and rename into `base`/<digest>; the finished directory's path."""
    debs = _download(
        base,
        [
            (inputs.kernel_package, inputs.kernel_version),
            (inputs.busybox_package, inputs.busybox_version),
        ],
        progress,
    )
    tmp = os.path.join(base, "tmp")
    os.makedirs(tmp, exist_ok=True)
    work = tempfile.mkdtemp(dir=tmp, prefix="build-")
    try:
        _report(progress, "extract", 0, 2)
        kernel_tree = os.path.join(work, "kernel")
        _extract(debs[inputs.kernel_package], kernel_tree)
        _report(progress, "extract", 1, 2)
        busybox_tree = os.path.join(work, "busybox")
        _extract(debs[inputs.busybox_package], busybox_tree)
        _report(progress, "extract", 2, 2)
        release = _kernel_release(kernel_tree)
        vmlinuz = os.path.join(kernel_tree, "boot", f"vmlinuz-{release}")
        if not os.path.isfile(vmlinuz):
            raise AssetError(f"{inputs.kernel_package} has no /boot/vmlinuz-{release}")
        busybox = os.path.join(busybox_tree, "bin", "busybox")
        if not os.path.isfile(busybox):
            raise AssetError(f"{inputs.busybox_package} has no /bin/busybox")

        _report(progress, "modules", 0, 1)
        modules, builtin = _module_closure(kernel_tree, release, inputs.modules)
        _report(progress, "modules", 1, 1)
        _report(progress, "initramfs", 0, 1)
        initrd, modules = _make_initramfs(work, kernel_tree, release, busybox, modules, recipe)
        _report(progress, "initramfs", 1, 1)

        _report(progress, "commit", 0, 1)
        out = os.path.join(work, "out")
        os.mkdir(out)
        shutil.copyfile(vmlinuz, os.path.join(out, KERNEL_FILE))
        with open(os.path.join(out, INITRD_FILE), "wb") as f:
            f.write(initrd)
        manifest = {
            "digest": inputs.digest,
            "inputs": inputs.to_json(),
            "kernel_release": release,
            "packages": {
                inputs.kernel_package: inputs.kernel_version,
                inputs.busybox_package: inputs.busybox_version,
            },
            "modules": modules,
            "builtin_modules": builtin,
            "files": {name: _sha256_file(os.path.join(out, name)) for name in (KERNEL_FILE, INITRD_FILE)},
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(os.path.join(out, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        for name in os.listdir(out):
            fd = os.open(os.path.join(out, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        final = os.path.join(base, inputs.digest)
        os.rename(out, final)
        _fsync_dir(base)
        _report(progress, "commit", 1, 1)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(base: str, directory: str) -> None:
    """Move a bad asset directory out of the way (atomically), then delete it."""
    tmp = os.path.join(base, "tmp")
    os.makedirs(tmp, exist_ok=True)
    doomed = tempfile.mkdtemp(dir=tmp, prefix="discard-")
    os.rename(directory, os.path.join(doomed, "assets"))
    shutil.rmtree(doomed, ignore_errors=True)


def ensure_assets(
    root: str, progress: Progress | None = None, *, recipe: Recipe | None = None, rebuild: bool = False
) -> Assets:
    """The current guest assets under `root`/assets, built first if missing, stale or corrupt.

    `progress(stage, done, total)` is called with the `STAGES` as a build goes (nothing is reported
    when the assets are already there). `rebuild=True` builds them again even if they verify.
    Raises AssetError (with what to do) when the packages cannot be resolved or downloaded."""
    recipe = recipe or Recipe()
    base = assets_dir(root)
    os.makedirs(base, exist_ok=True)
    inputs = resolve_inputs(recipe, cache_dir=base)
    digest = inputs.digest
    directory = os.path.join(base, digest)
    if not rebuild and os.path.isdir(directory):
        try:
            return _load(directory, digest)
        except AssetError:
            pass  # rebuilt below, under the lock
    with open(os.path.join(base, ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # Another builder may have finished while this one waited for the lock.
            if os.path.isdir(directory):
                if not rebuild:
                    try:
                        return _load(directory, digest)
                    except AssetError:
                        pass
                _discard(base, directory)
            _report(progress, "resolve", 1, 1)
            _build(base, inputs, recipe, progress)
            return _load(directory, digest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prune_assets(root: str, keep: Iterable[str] = ()) -> list[str]:
    """Delete every asset directory but the `keep` digests (and the download cache); the deleted."""
    base = assets_dir(root)
    kept = set(keep)
    removed: list[str] = []
    if not os.path.isdir(base):
        return removed
    with open(os.path.join(base, ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for digest in _built(base):
            if digest not in kept:
                _discard(base, os.path.join(base, digest))
                removed.append(digest)
    return removed
