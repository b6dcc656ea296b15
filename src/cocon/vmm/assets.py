"""Guest assets: the kernel, initramfs and utility root image cocon boots its VMs with, built from
Debian packages.

Layout under `<root>/assets/` (`root` is the caller's, normally `$COCON_ROOT`):

    debs/                     downloaded .deb files (apt-get download), kept as a cache
    <digest>/vmlinuz          the kernel from linux-image-<release>-amd64 (Debian's generic flavour)
    <digest>/vmlinux          the same kernel uncompressed (ELF, PVH boot): what Assets.kernel names
    <digest>/initrd.img       the initramfs cocon made (newc cpio, zstd-compressed)
    <digest>/guest.erofs      the read-only utility root: python3 + busybox + cocon's guest code
    <digest>/manifest.json    inputs, kernel release, sha256 of the three files
    <digest>/kvm-probe.json   the cached answer of cocon.vmm.kvm (per host and kernel)
    resolved.json             package versions apt-cache gave, until apt's lists change
    tmp/                      work directories of builds in progress
    .lock                     flock'ed while a build runs: two builders never race

`<digest>` is the sha256 of the build's inputs (`Inputs`): the resolved package names and versions
(kernel, busybox, and the closure of the utility image's packages), the module list, the sha256 of
the guest init script and of the cocon sources copied into the utility image, and `RECIPE_VERSION`
(bumped whenever the build code below changes what it produces). A new package in the Debian
archive, a changed init script, an edited guest agent or a changed recipe therefore gives a new
directory; old ones stay until `prune_assets` removes them.

A build works in `tmp/<random>/` and renames the finished directory into place, so a reader sees a
complete asset directory or none. `ensure_assets` checks the files against the manifest's sha256
and rebuilds a directory that does not match.

The initramfs holds busybox (from `busybox-static`, every applet linked into /bin), the kernel
modules in `DEFAULT_MODULES` with their dependencies (from the same kernel package; the modules
built into the kernel are skipped, see the package's config and modules.builtin), a modules.dep made
by the host's `depmod`, /dev/console, and `cocon/vmm/guest/init` as /init.

The utility image (`guest.erofs`, see `_make_utility`) is the root the init switch_roots into with
`cocon.agent=1`: the Debian packages `UTILITY_PACKAGES` with their dependency closure (resolved by
`apt-get -s` against an empty dpkg status, unpacked with `dpkg-deb -x`, no maintainer scripts),
busybox-static's applets where no package put a file, a minimal /etc, empty mount points, and
cocon's guest code (`GUEST_SOURCES`, copied from the running source tree), all byte-compiled with
the host's python of the same version (unchecked-hash .pyc: the image is read-only).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
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
RECIPE_VERSION = 4

#: Kernel modules the guest loads at boot (in this order), with their dependencies. In Debian's
#: generic kernel these are modules (the ones built in are skipped): virtio transports (mmio for
#: the microvm machine, pci for q35), block, console (virtio-serial, the host<->guest channel), net,
#: rng (entropy), overlay and erofs (root filesystems; crc32c_generic first: erofs needs libcrc32c,
#: which needs a crc32c implementation that modprobe does not pull in by itself), 9p over virtio
#: (container rootfs and volumes shared from the host), and the ACPI power button with evdev (the
#: init waits on it for QMP system_powerdown).
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    "overlay",
    "crc32c_generic",
    "erofs",
    "9pnet_virtio",
    "9p",
    "button",
    "evdev",
)
#: Modules in the initramfs that only a full VM's boot loads (`cocon.vm=` on the command line, see
#: guest/init): ext4 for the VM's root disk, qemu_fw_cfg for the run configuration QEMU hands in.
VM_MODULES: tuple[str, ...] = ("ext4", "qemu_fw_cfg")

#: Debian's generic kernel flavour: the cloud flavour has no 9p (CONFIG_NET_9P is not set).
KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: What the utility image is made of, with their dependencies.
UTILITY_PACKAGES: tuple[str, ...] = (
    "python3-minimal",
    "libpython3.11-stdlib",
    "libseccomp2",
    "python3-seccomp",
)
#: cocon's code in the utility image, relative to the cocon package: files, and directories whose
#: files are copied recursively (`*.py` only where the path ends in "/*.py"). Missing ones are
#: skipped (the guest agent may not exist yet in a given tree).
GUEST_SOURCES: tuple[str, ...] = (
    "__init__.py",
    "_linux.py",
    "_typing.py",
    "_fastjson.py",
    "_mountinfo.py",
    "_streams.py",
    "_units.py",
    "oci/",
    "runtime/",
    "vmm/__init__.py",
    "vmm/errors.py",
    "vmm/agent_protocol.py",
    "vmm/guest/*.py",
)
KERNEL_FILE = "vmlinuz"
#: The uncompressed kernel (ELF with a PVH entry note) that QEMU boots directly: under TCG the
#: guest no longer decompresses its 8 MB bzImage (xz) itself, which took ~2.3 s of a 3.8 s boot.
KERNEL_ELF_FILE = "vmlinux"
INITRD_FILE = "initrd.img"
UTILITY_FILE = "guest.erofs"
MANIFEST_FILE = "manifest.json"
#: Where cocon's guest code goes in the utility image (on the guest python's default sys.path).
GUEST_SITE = "usr/lib/python3/dist-packages"

#: The stages `progress(stage, done, total)` is called with, in order. `done`/`total` count
#: packages for "download" and "extract", steps otherwise.
STAGES = ("resolve", "download", "extract", "modules", "initramfs", "utility", "commit")

Progress = Callable[[str, int, int], None]


def _default_init() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", "init")


def _default_source() -> str:
    """The cocon package this code runs from (src/cocon in a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Recipe:
    """What to build the assets from. The defaults are what cocon boots; tests change them."""

    kernel_package: str = KERNEL_PACKAGE
    busybox_package: str = BUSYBOX_PACKAGE
    modules: tuple[str, ...] = DEFAULT_MODULES
    vm_modules: tuple[str, ...] = VM_MODULES
    #: Path of the guest init script; None: cocon's own (cocon/vmm/guest/init).
    init_script: str | None = None
    utility_packages: tuple[str, ...] = UTILITY_PACKAGES
    #: The cocon package directory whose GUEST_SOURCES go into the utility image; None: the running one.
    guest_source: str | None = None

    def init_path(self) -> str:
        return self.init_script if self.init_script is not None else _default_init()

    def source_path(self) -> str:
        return self.guest_source if self.guest_source is not None else _default_source()


@dataclass(frozen=True)
class Inputs:
    """Everything a build depends on; `digest` names the asset directory."""

    kernel_package: str  # the versioned package, e.g. linux-image-6.1.0-56-amd64
    kernel_version: str  # its Debian version, e.g. 6.1.192-2
    busybox_package: str
    busybox_version: str
    modules: tuple[str, ...]
    init_sha256: str
    #: The utility image's packages, dependencies included: (name, version), sorted by name.
    utility_packages: tuple[tuple[str, str], ...] = ()
    #: sha256 over the cocon sources copied into the utility image (`sources_sha256`).
    sources_sha256: str = ""
    recipe_version: int = RECIPE_VERSION

    def to_json(self) -> dict[str, object]:
        return {
            "kernel_package": self.kernel_package,
            "kernel_version": self.kernel_version,
            "busybox_package": self.busybox_package,
            "busybox_version": self.busybox_version,
            "modules": list(self.modules),
            "init_sha256": self.init_sha256,
            "utility_packages": [list(p) for p in self.utility_packages],
            "sources_sha256": self.sources_sha256,
            "recipe_version": self.recipe_version,
        }

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class Assets:
    """A built, verified asset directory."""

    kernel: str  # path of the kernel QEMU boots: the uncompressed ELF (vmlinux), else the bzImage
    initrd: str  # path of the initramfs
    version: str  # the kernel release (`uname -r` in the guest), e.g. 6.1.0-56-amd64
    digest: str
    directory: str
    packages: dict[str, str] = field(default_factory=dict)  # Debian package -> version
    modules: tuple[str, ...] = ()  # every module file in the initramfs, dependencies included
    #: The read-only utility root (erofs): give it to the guest as its first virtio disk (/dev/vda)
    #: and boot with `cocon.agent=1` (or `cocon.agent=selftest`).
    utility: str | None = None


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
    """The versioned image package a meta package (linux-image-amd64) depends on."""
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


def _apt_closure(packages: Iterable[str]) -> list[tuple[str, str]]:
    """(name, version) of `packages` and everything they depend on (no recommends), sorted by name.

    apt-get simulates an install against an empty dpkg status, so the host's installed packages
    do not matter; the `Inst` lines name every package of the closure once."""
    names = list(packages)
    text = _run(
        [
            "apt-get",
            "-s",
            "-q",
            "-o",
            "Dir::State::Status=/dev/null",
            "-o",
            "APT::Install-Recommends=false",
            "-o",
            "APT::Install-Suggests=false",
            "install",
            *names,
        ],
        f"cannot resolve the Debian packages {' '.join(names)} (run apt-get update?)",
    )
    closure: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("Inst "):
            continue
        words = line.split()
        # Inst NAME [OLDVERSION] (VERSION ARCHIVE [ARCH])
        version = next((w[1:] for w in words[2:] if w.startswith("(")), None)
        if version is None:
            raise AssetError(f"cannot read apt-get's simulated install line {line!r}")
        closure[words[1].split(":")[0]] = version
    missing = [n for n in names if n not in closure]
    if missing:
        raise AssetError(f"apt-get did not resolve {' '.join(missing)}: run apt-get update")
    return sorted(closure.items())


def guest_sources(source: str) -> list[str]:
    """The files of `GUEST_SOURCES` that exist under the cocon package directory `source`,
    relative to it, sorted (no __pycache__, no .pyc)."""
    found: set[str] = set()
    for entry in GUEST_SOURCES:
        if entry.endswith("/*.py"):
            directory = entry[: -len("/*.py")]
            try:
                names = os.listdir(os.path.join(source, directory))
            except FileNotFoundError:
                continue
            found.update(
                f"{directory}/{n}"
                for n in names
                if n.endswith(".py") and os.path.isfile(os.path.join(source, directory, n))
            )
        elif entry.endswith("/"):
            top = os.path.join(source, entry)
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if d != "__pycache__"]
                rel = os.path.relpath(dirpath, source)
                found.update(f"{rel}/{n}" for n in filenames if not n.endswith((".pyc", ".pyo")))
        elif os.path.isfile(os.path.join(source, entry)):
            found.add(entry)
    return sorted(found)


def sources_sha256(source: str, files: Iterable[str] | None = None) -> str:
    """sha256 over the names and contents of the guest sources (`guest_sources(source)`).
    Hashing their content (~1 MB) takes a few milliseconds: an edit is always seen."""
    digest = hashlib.sha256()
    for rel in guest_sources(source) if files is None else files:
        try:
            with open(os.path.join(source, rel), "rb") as f:
                data = f.read()
        except OSError as exc:
            raise AssetError(
                f"cannot read the guest source {os.path.join(source, rel)}: {exc.strerror}"
            ) from exc
        digest.update(b"%s\0%d\0" % (rel.encode(), len(data)))
        digest.update(data)
    return digest.hexdigest()


def _resolve_versions(recipe: Recipe, cache_dir: str | None) -> dict[str, object]:
    """{"kernel": [package, version], "busybox": version, "utility": [[name, version], ...]}."""
    request = " ".join(
        [recipe.kernel_package, recipe.busybox_package, *recipe.utility_packages, _apt_stamp()]
    )
    cache_file = os.path.join(cache_dir, "resolved.json") if cache_dir is not None else None
    if cache_file is not None:
        try:
            with open(cache_file, "rb") as f:
                cached = json.load(f)
            if cached.get("request") == request and {"kernel", "busybox", "utility"} <= set(cached):
                return dict(cached)
        except (OSError, ValueError, AttributeError):
            pass
    kernel_pkg, kernel_ver = _kernel_package(recipe.kernel_package)
    resolved: dict[str, object] = {
        "request": request,
        "kernel": [kernel_pkg, kernel_ver],
        "busybox": _apt_show(recipe.busybox_package)["Version"],
        "utility": [list(p) for p in _apt_closure(recipe.utility_packages)]
        if recipe.utility_packages
        else [],
    }
    if cache_file is not None and cache_dir is not None:
        try:
            fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".resolved-")
            with os.fdopen(fd, "w") as f:
                json.dump(resolved, f)
            os.rename(tmp, cache_file)
        except OSError:
            pass
    return resolved


def resolve_inputs(recipe: Recipe | None = None, *, cache_dir: str | None = None) -> Inputs:
    """The inputs a build would use now: package versions from apt's lists (no network access),
    the hashes of the init script and of the guest sources.

    apt takes ~0.4 s per package lookup and ~1 s for the utility closure; with `cache_dir` the
    resolved versions are kept in `cache_dir`/resolved.json until apt's lists change."""
    recipe = recipe or Recipe()
    init = recipe.init_path()
    try:
        init_sha = _sha256_file(init)
    except OSError as exc:
        raise AssetError(f"cannot read the guest init script {init}: {exc.strerror}") from exc
    source = recipe.source_path()
    if not os.path.isfile(os.path.join(source, "__init__.py")):
        raise AssetError(f"{source} is not the cocon package (no __init__.py): give Recipe(guest_source=...)")
    sources_sha = sources_sha256(source)
    resolved = _resolve_versions(recipe, cache_dir)
    kernel = resolved["kernel"]
    utility = resolved["utility"]
    assert isinstance(kernel, list) and isinstance(utility, list)
    return Inputs(
        kernel_package=str(kernel[0]),
        kernel_version=str(kernel[1]),
        busybox_package=recipe.busybox_package,
        busybox_version=str(resolved["busybox"]),
        modules=tuple(recipe.modules) + tuple(f"vm:{m}" for m in recipe.vm_modules),
        init_sha256=init_sha,
        utility_packages=tuple((str(n), str(v)) for n, v in utility),
        sources_sha256=sources_sha,
    )


# --- reading and verifying built assets -----------------------------------------------------------


VERIFIED_FILE = ".verified"


def _file_stamp(directory: str, files: dict[str, str]) -> str:
    """What the files are on disk (inode, size, mtime and ctime in ns): any write, replacement or
    chmod changes it."""
    parts = []
    for name in sorted(files):
        st = os.stat(os.path.join(directory, name))
        parts.append(f"{name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return "\n".join(parts)


def _verified_before(directory: str, stamp: str) -> bool:
    """The files were hashed against the manifest and have not changed since (a microVM start then
    costs a few stat calls, not hashing ~130 MB)."""
    try:
        with open(os.path.join(directory, VERIFIED_FILE)) as f:
            return f.read() == stamp
    except OSError:
        return False


def _remember_verified(directory: str, stamp: str) -> None:
    tmp = os.path.join(directory, f"{VERIFIED_FILE}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(stamp)
        os.replace(tmp, os.path.join(directory, VERIFIED_FILE))
    except OSError:
        pass  # a read-only directory: verified again next time


def _load(directory: str, digest: str) -> Assets:
    """The assets in `directory`, verified against its manifest; AssetError if anything is off."""
    try:
        with open(os.path.join(directory, MANIFEST_FILE), "rb") as f:
            manifest = json.load(f)
        files = manifest["files"]
        for name in (KERNEL_FILE, INITRD_FILE):
            if name not in files:
                raise AssetError(f"the manifest in {directory} lists no {name}")
        stamp = _file_stamp(directory, files)
        if not _verified_before(directory, stamp):
            for name, sha in files.items():
                if _sha256_file(os.path.join(directory, name)) != sha:
                    raise AssetError(f"{os.path.join(directory, name)} does not match its manifest")
            _remember_verified(directory, stamp)
        if manifest["digest"] != digest:
            raise AssetError(f"{directory} holds the assets of {manifest['digest']}, not {digest}")
        kernel = KERNEL_ELF_FILE if KERNEL_ELF_FILE in files else KERNEL_FILE
        return Assets(
            kernel=os.path.join(directory, kernel),
            initrd=os.path.join(directory, INITRD_FILE),
            version=str(manifest["kernel_release"]),
            digest=digest,
            directory=directory,
            packages=dict(manifest["packages"]),
            modules=tuple(manifest["modules"]),
            utility=os.path.join(directory, UTILITY_FILE) if UTILITY_FILE in files else None,
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
    name = name.split(":")[0]
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
        cpio.file("etc/cocon/modules-vm", "".join(f"{m}\n" for m in recipe.vm_modules).encode())
        cpio.directory("lib")
        cpio.directory("lib/modules")
        cpio.tree(moddir, f"lib/modules/{release}")
        cpio.close()
    with open(raw, "rb") as f:
        data = f.read()
    # zstd: the kernel unpacks it fastest of the formats it supports (CONFIG_RD_ZSTD=y).
    return zstandard.ZstdCompressor(level=19).compress(data), modules


#: Compression of the utility image: "lz4" or None. None: under TCG, python's start and
#: `import cocon.runtime.container` took no longer from an uncompressed image (median 0.64 s vs
#: 0.76 s with lz4, within the noise of a busy host), and decompressing costs guest CPU, which is
#: what TCG is short of; the image is 56 MB instead of 36 MB (see docs/vmm.md).
UTILITY_COMPRESSION: str | None = None


def _uncompressed_kernel(bzimage: str, config: str) -> bytes | None:
    """The ELF kernel inside a bzImage, if QEMU can boot it directly (PVH entry: CONFIG_PVH=y and a
    payload compressed with xz, gzip or zstd); else None (QEMU then boots the bzImage)."""
    import gzip
    import lzma
    import struct

    try:
        with open(config) as f:
            if "CONFIG_PVH=y\n" not in f.read():
                return None
    except OSError:
        return None
    with open(bzimage, "rb") as f:
        data = f.read()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(b"\x1f\x8b"):
            elf = gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
        elif payload.startswith(b"\x28\xb5\x2f\xfd"):
            import zstandard

            elf = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        else:
            return None
    except (lzma.LZMAError, OSError, EOFError, ValueError):
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def _guest_python(tree: str) -> str:
    """The guest's python version ("3.11") from the unpacked packages."""
    versions = sorted(
        n[len("python") :]
        for n in os.listdir(os.path.join(tree, "usr", "bin"))
        if n.startswith("python3.") and n[len("python3.") :].isdigit()
    )
    if len(versions) != 1:
        raise AssetError(f"the utility packages hold {len(versions)} python3.X interpreters, expected one")
    return versions[0]


def _host_python(version: str) -> str:
    """A python of the guest's version on the host, to byte-compile for the guest."""
    for candidate in (f"/usr/bin/python{version}", shutil.which(f"python{version}")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssetError(
        f"the guest's python is {version} and the host has no python{version} to byte-compile with: "
        f"install it (apt-get install -y python{version})"
    )


def _make_utility(
    work: str, tree: str, busybox: str, source: str, files: list[str], progress: Progress | None
) -> str:
    """Build the utility root image from `tree` (the unpacked packages); its path (in `work`)."""
    steps = 4
    _report(progress, "utility", 0, steps)
    # Not needed by python or busybox: documentation, translations, glibc's iconv modules (~9 MB).
    for unwanted in (
        "usr/share/doc",
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "usr/share/locale",
        "usr/lib/x86_64-linux-gnu/gconv",
    ):
        shutil.rmtree(os.path.join(tree, unwanted), ignore_errors=True)
    _report(progress, "utility", 1, steps)

    # busybox applets where no package put a file (tar, dpkg... keep theirs)
    for d in ("bin", "sbin", "usr/bin", "usr/sbin"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    if not os.path.lexists(os.path.join(tree, "bin", "busybox")):
        shutil.copyfile(busybox, os.path.join(tree, "bin", "busybox"))
        os.chmod(os.path.join(tree, "bin", "busybox"), 0o755)
    for applet in _busybox_applets(busybox):
        target = os.path.join(tree, applet)
        if applet != "bin/busybox" and not os.path.lexists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink("../" * applet.count("/") + "bin/busybox", target)
    version = _guest_python(tree)
    if not os.path.lexists(os.path.join(tree, "usr", "bin", "python3")):
        os.symlink(f"python{version}", os.path.join(tree, "usr", "bin", "python3"))
    etc = os.path.join(tree, "etc")
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\n")
    with open(os.path.join(etc, "group"), "w") as f:
        f.write("root:x:0:\n")
    for mountpoint, mode in (
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("mnt", 0o755),
        ("root", 0o700),
    ):
        path = os.path.join(tree, mountpoint)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
    site = os.path.join(tree, GUEST_SITE)
    for rel in files:
        target = os.path.join(site, "cocon", rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(source, rel), target)
    _report(progress, "utility", 2, steps)

    # Byte-compile everything (stdlib and cocon): the image is read-only, so a guest python could
    # never cache what it compiles. unchecked-hash: the .pyc is used without looking at the source.
    _run(
        [
            _host_python(version),
            "-I",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            tree,
            "-p",
            "/",
            "-x",
            r"/(test|tests|idle_test|lib2to3/tests)/",
            os.path.join(tree, "usr", "lib", f"python{version}"),
            site,
        ],
        "cannot byte-compile the utility image's python code",
    )
    _report(progress, "utility", 3, steps)

    image = os.path.join(work, UTILITY_FILE)
    _run(
        [
            "mkfs.erofs",
            "--quiet",
            *([f"-z{UTILITY_COMPRESSION}"] if UTILITY_COMPRESSION else []),
            "-x-1",  # no extended attributes (the host's security labels stay out)
            "--all-root",
            "-T0",
            "-U",
            "00000000-0000-4000-8000-000000000000",
            image,
            tree,
        ],
        "cannot make the utility image (apt-get install -y erofs-utils)",
    )
    _report(progress, "utility", 4, steps)
    return image


def _build(base: str, inputs: Inputs, recipe: Recipe, progress: Progress | None) -> str:
    """Build into tmp/ and rename into `base`/<digest>; the finished directory's path."""
    source = recipe.source_path()
    files = guest_sources(source)
    if sources_sha256(source, files) != inputs.sources_sha256:
        raise AssetError(f"the guest sources under {source} changed during the build: build again")
    debs = _download(
        base,
        [
            (inputs.kernel_package, inputs.kernel_version),
            (inputs.busybox_package, inputs.busybox_version),
            *inputs.utility_packages,
        ],
        progress,
    )
    tmp = os.path.join(base, "tmp")
    os.makedirs(tmp, exist_ok=True)
    work = tempfile.mkdtemp(dir=tmp, prefix="build-")
    try:
        utility_debs = [debs[n] for n, _ in inputs.utility_packages]
        steps = 2 + len(utility_debs)
        _report(progress, "extract", 0, steps)
        kernel_tree = os.path.join(work, "kernel")
        utility_tree = os.path.join(work, "utility")
        for d in (kernel_tree, utility_tree):
            os.mkdir(d)
        # The kernel package is the big one (70 MB of xz, ~2-5 s): it unpacks in the background
        # while the small packages unpack here.
        kernel_deb = debs[inputs.kernel_package]
        unpacking = subprocess.Popen(
            ["dpkg-deb", "-x", kernel_deb, kernel_tree],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            busybox_tree = os.path.join(work, "busybox")
            _extract(debs[inputs.busybox_package], busybox_tree)
            _report(progress, "extract", 1, steps)
            for n, deb in enumerate(utility_debs):
                _extract(deb, utility_tree)
                _report(progress, "extract", 2 + n, steps)
        except BaseException:
            unpacking.kill()
            raise
        finally:
            _, err = unpacking.communicate()
        if unpacking.returncode != 0:
            detail = " / ".join(err.decode(errors="replace").strip().splitlines()[-3:])
            raise AssetError(f"cannot unpack {os.path.basename(kernel_deb)}: dpkg-deb failed: {detail}")
        _report(progress, "extract", steps, steps)
        release = _kernel_release(kernel_tree)
        vmlinuz = os.path.join(kernel_tree, "boot", f"vmlinuz-{release}")
        if not os.path.isfile(vmlinuz):
            raise AssetError(f"{inputs.kernel_package} has no /boot/vmlinuz-{release}")
        busybox = os.path.join(busybox_tree, "bin", "busybox")
        if not os.path.isfile(busybox):
            raise AssetError(f"{inputs.busybox_package} has no /bin/busybox")

        _report(progress, "modules", 0, 1)
        wanted = [m.removeprefix("vm:") for m in inputs.modules]
        modules, builtin = _module_closure(kernel_tree, release, wanted)
        _report(progress, "modules", 1, 1)
        _report(progress, "initramfs", 0, 1)
        initrd, modules = _make_initramfs(work, kernel_tree, release, busybox, modules, recipe)
        _report(progress, "initramfs", 1, 1)
        # the kernel tree is big (all modules of the generic kernel): gone before the next step
        shutil.rmtree(os.path.join(kernel_tree, "lib"), ignore_errors=True)

        utility: str | None = None
        if inputs.utility_packages:
            utility = _make_utility(work, utility_tree, busybox, source, files, progress)

        _report(progress, "commit", 0, 1)
        out = os.path.join(work, "out")
        os.mkdir(out)
        shutil.copyfile(vmlinuz, os.path.join(out, KERNEL_FILE))
        with open(os.path.join(out, INITRD_FILE), "wb") as f:
            f.write(initrd)
        names = [KERNEL_FILE, INITRD_FILE]
        elf = _uncompressed_kernel(vmlinuz, os.path.join(kernel_tree, "boot", f"config-{release}"))
        if elf is not None:
            with open(os.path.join(out, KERNEL_ELF_FILE), "wb") as f:
                f.write(elf)
            names.append(KERNEL_ELF_FILE)
        if utility is not None:
            os.rename(utility, os.path.join(out, UTILITY_FILE))
            names.append(UTILITY_FILE)
        manifest = {
            "digest": inputs.digest,
            "inputs": inputs.to_json(),
            "kernel_release": release,
            "packages": {
                inputs.kernel_package: inputs.kernel_version,
                inputs.busybox_package: inputs.busybox_version,
                **dict(inputs.utility_packages),
            },
            "modules": modules,
            "builtin_modules": builtin,
            "guest_sources": files,
            "files": {name: _sha256_file(os.path.join(out, name)) for name in names},
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
