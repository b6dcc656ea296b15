"""Can this host mount overlayfs with its upper/work dirs under a given root, and with which options.

`overlay_supported(root)` mounts a tiny overlay under `root` once per root (per process) and checks
that writing through it and deleting through it work (a deletion must leave a 0:0 whiteout in the
upper dir, the format the snapshotter's layers use). `overlay_unsupported_reason(root)` gives the
explanation when it does not.
"""

from __future__ import annotations

import errno
import os

from cocon import _linux as linux
from cocon.snapshots.errors import SnapshotError, errtext
from cocon.snapshots.mounts import filesystem_of, mounts_under, unmount_all
from cocon.snapshots.whiteout import in_user_namespace, is_whiteout

OVERLAY_PARAMETERS = "/sys/module/overlay/parameters"
OVERLAY_MAX_STACK = 500  # the kernel's OVL_MAX_STACK: most lower layers one overlay mount may have

_probe_cache: dict[str, str | None] = {}
_feature_cache: dict[bool | None, tuple[str, ...]] = {}


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = os.uname().release.split(".")
        return (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)) >= (major, minor)
    except (IndexError, ValueError):
        return False


def overlay_feature_options(userxattr: bool | None = None) -> tuple[str, ...]:
    """The feature options every overlay mount of the snapshotter carries.

    - `index=off`, as containerd and docker set it: with the inode index on, an upper dir records
      file handles of its lower layers and refuses later mounts over re-created (e.g. re-pulled)
      layer directories, and an upper or work dir in use by another mount makes the mount fail.
    - `redirect_dir=off` and `metacopy=off`: the upper dir must be a self-contained diff (the build
      diffs it into a new layer). A renamed directory would otherwise be a redirect xattr pointing
      into a lower layer, and a chmod/chown a metadata-only copy without the data. With them off a
      directory rename across layers fails with EXDEV, which `mv` and friends handle by copying.
      Docker leaves the kernel defaults and falls back to a slow "naive" diff when they are on; we
      set them explicitly instead.
    - `userxattr` only inside a user namespace (overlay then keeps its xattrs in `user.overlay.*`
      because `trusted.*` is not available there).

    An option is only given when the kernel knows it (module parameter present, or a kernel new
    enough: index 4.13, redirect_dir 4.10, metacopy 4.19, userxattr 5.11). Worked out once per process.
    """
    cached = _feature_cache.get(userxattr)
    if cached is None:
        cached = _feature_cache[userxattr] = _feature_options(userxattr)
    return cached


def _feature_options(userxattr: bool | None) -> tuple[str, ...]:
    if userxattr is None:
        userxattr = in_user_namespace()
    opts: list[str] = []
    for name, since in (("index", (4, 13)), ("redirect_dir", (4, 10)), ("metacopy", (4, 19))):
        if os.path.exists(os.path.join(OVERLAY_PARAMETERS, name)) or _kernel_at_least(*since):
            opts.append(f"{name}=off")
    if userxattr and _kernel_at_least(5, 11):
        opts.append("userxattr")
    return tuple(opts)


def overlay_volatile_supported() -> bool:
    """Whether overlay knows the `volatile` mount option (Linux 5.10+)."""
    return _kernel_at_least(5, 10)


def escape_option_path(path: str) -> str:
    """Escape a path for overlay mount data: `\\`, `,` and `:` are preceded by a backslash."""
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def overlay_supported(root: str) -> bool:
    """True when an overlay with upper and work dirs under `root` mounts and works (probed once)."""
    return overlay_unsupported_reason(root) is None


def overlay_unsupported_reason(root: str) -> str | None:
    """None when overlay works under `root`; otherwise why not and what to do (probed once per root)."""
    try:
        os.makedirs(root, 0o700, exist_ok=True)
    except OSError as e:
        return f"cannot create {root}: {errtext(e)}"
    real = os.path.realpath(root)
    if real not in _probe_cache:
        _probe_cache[real] = _probe(real)
    return _probe_cache[real]


def _explain(e: OSError, root: str, data: str) -> str:
    fs = filesystem_of(root)
    fstype = fs.fstype if fs else "an unknown filesystem"
    if e.errno == errno.ENODEV:
        return "this kernel has no overlay filesystem: load it with `modprobe overlay` (CONFIG_OVERLAY_FS)"
    if e.errno == errno.EPERM:
        return (
            "mounting overlayfs needs CAP_SYS_ADMIN: run as root (or, in a user namespace, on Linux 5.11+ "
            "where overlay mounts with `userxattr`)"
        )
    if fstype == "overlay":
        return (
            f"{root} is itself on overlayfs, which cannot hold the upper and work dirs of another overlay "
            f"({errtext(e)}): mount a tmpfs (`mount -t tmpfs tmpfs {root}`) or a loop-mounted ext4/xfs "
            "image there, or point COCON_ROOT at a directory on a real filesystem"
        )
    return (
        f"the kernel refused an overlay with its upper and work dirs on {fstype} at {root} ({errtext(e)}); "
        "the upper filesystem needs d_type (xfs: ftype=1), trusted.* xattrs and RENAME_WHITEOUT; "
        f"`dmesg | grep overlayfs` shows the kernel's reason (options were {data!r})"
    )


def _probe(root: str) -> str | None:
    import shutil
    import tempfile

    try:
        base = tempfile.mkdtemp(prefix=".overlay-probe-", dir=root)
    except OSError as e:
        return f"cannot create a probe directory in {root}: {errtext(e)}"
    try:
        lower, upper, work, merged = (os.path.join(base, n) for n in ("lower", "upper", "work", "merged"))
        for d in (lower, upper, work, merged):
            os.mkdir(d)
        with open(os.path.join(lower, "gone"), "w") as f:
            f.write("lower\n")
        data = ",".join(
            [
                f"lowerdir={escape_option_path(lower)}",
                f"upperdir={escape_option_path(upper)}",
                f"workdir={escape_option_path(work)}",
                *overlay_feature_options(),
            ]
        )
        try:
            linux.mount("overlay", merged, "overlay", 0, data)
        except OSError as e:
            return _explain(e, root, data)
        try:
            os.unlink(os.path.join(merged, "gone"))
            with open(os.path.join(merged, "new"), "w") as f:
                f.write("upper\n")
        except OSError as e:
            return f"an overlay mounted under {root} but writing through it failed: {errtext(e)}"
        finally:
            unmount_all(merged, what="overlay probe")
        if not is_whiteout(os.lstat(os.path.join(upper, "gone"))):
            return f"deleting through an overlay under {root} did not leave a 0:0 whiteout in the upper dir"
        if not os.path.isfile(os.path.join(upper, "new")):
            return f"a file written through an overlay under {root} did not land in the upper dir"
        return None
    except SnapshotError as e:
        return str(e)
    except OSError as e:
        return f"probing overlay under {root} failed: {errtext(e)}"
    finally:
        if not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
