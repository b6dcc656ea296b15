"""cocon.images.layers against real kernels objects: an overlayfs upper directory made by a real
overlay mount, a destination that is itself a mount point (tmpfs), and the busybox root file system."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cocon.images.errors import LayerError, UnsafeLayer
from cocon.images.layers import apply_layer, create_layer, dir_to_layer

MTIME = 1_600_000_000


def listing(
    root: Path | str, *, seconds: bool = False, root_entry: bool = True, dir_times: bool = True
) -> dict[str, tuple[Any, ...]]:
    root = str(root)
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[tuple[int, int], str] = {}

    def one(path: str, rel: str) -> None:
        st = os.lstat(path)
        try:
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False)
                )
            )
        except OSError:
            xattrs = ()
        content: Any = None
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                content = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            content = (os.major(st.st_rdev), os.minor(st.st_rdev))
        link = None
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            link = inodes.setdefault((st.st_dev, st.st_ino), rel)
        mtime: int | None = st.st_mtime_ns // 10**9 if seconds else st.st_mtime_ns
        if stat.S_ISDIR(st.st_mode) and not dir_times:
            mtime = None
        out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                    None if stat.S_ISDIR(st.st_mode) else st.st_size, mtime, content, xattrs, link)  # fmt: skip

    if root_entry:
        one(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            one(path, os.path.relpath(path, root))
    return out


def E(name: str, kind: str = "file", data: bytes = b"", **kw: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE}[kind]
    ti.mode = kw.pop("mode", 0o755 if kind == "dir" else 0o644)
    ti.mtime = kw.pop("mtime", MTIME)
    ti.pax_headers = {"SCHILY.xattr." + k: v.decode() for k, v in kw.pop("xattrs", {}).items()}
    for k, v in kw.items():
        setattr(ti, k, v)
    if kind == "file":
        ti.size = len(data)
        return ti, data
    return ti, None


def build(*entries: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return raw.getvalue()


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False, capture_output=True)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs mount point under tmp_path, unmounted afterwards."""
    path = tmp_path / "tmpfs"
    path.mkdir()
    mount("-t", "tmpfs", "-o", "mode=0755,size=64m", "cocon-test-layers", str(path))
    try:
        yield path
    finally:
        umount(path)
        assert not is_mounted(path)


def user_xattrs_work(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return False
        raise
    finally:
        probe.unlink()


@pytest.fixture
def xattr_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system takes user.* xattrs: tmp_path's, or a tmpfs mounted for it."""
    if user_xattrs_work(tmp_path):
        yield tmp_path
        return
    path = tmp_path / "xattr-tmpfs"
    path.mkdir()
    mount("-t", "tmpfs", "-o", "size=64m", "cocon-test-xattrs", str(path))
    try:
        if not user_xattrs_work(path):
            pytest.fail("neither the test file system nor tmpfs takes user.* xattrs on this kernel")
        yield path
    finally:
        umount(path)


# --- a real overlayfs upper directory ----------------------------------------------------------------


def test_create_layer_from_a_real_overlay_upper(tmp_path: Path) -> None:
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "keep").write_text("keep")
    (lower / "gone").write_text("gone")
    (lower / "olddir" / "sub").mkdir(parents=True)
    (lower / "olddir" / "a").write_text("a")
    (lower / "olddir" / "sub" / "b").write_text("b")
    (lower / "dir2").mkdir()
    (lower / "dir2" / "x").write_text("x")
    (lower / "etc").mkdir()
    (lower / "etc" / "conf").write_text("conf")
    opts = f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=off,metacopy=off,index=off"
    mount("-t", "overlay", "-o", opts, "cocon-test-overlay", str(merged))
    try:
        (merged / "gone").unlink()  # a whiteout (0:0 character device) in upper
        subprocess.run(["rm", "-rf", str(merged / "olddir")], check=True)
        (merged / "olddir").mkdir(mode=0o700)  # replaced directory: opaque in upper
        (merged / "olddir" / "new").write_text("new")
        subprocess.run(["rm", "-rf", str(merged / "dir2")], check=True)
        (merged / "added").write_text("added")
        os.chmod(merged / "keep", 0o600)  # copy-up of metadata
        (merged / "etc" / "conf").write_text("changed")
        os.link(merged / "added", merged / "added-link")
        os.setxattr(merged / "added", "user.k", b"v")
        expected = listing(merged, seconds=True, root_entry=False)
    finally:
        umount(merged)
    assert not is_mounted(merged)
    assert stat.S_ISCHR(os.lstat(upper / "gone").st_mode) and os.lstat(upper / "gone").st_rdev == 0
    assert os.getxattr(upper / "olddir", "trusted.overlay.opaque") == b"y"

    out = io.BytesIO()
    info = create_layer(str(upper), out, compression="gzip", mtime=None)
    plain = gzip.decompress(out.getvalue())
    assert info.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        members = {m.name: m for m in tf.getmembers()}
    assert members[".wh.gone"].isreg() and members[".wh.gone"].size == 0
    assert members[".wh.dir2"].isreg()
    assert "olddir/.wh..wh..opq" in members and members["olddir"].isdir()
    assert members["added-link"].islnk() and members["added-link"].linkname == "added"
    assert "gone" not in members and "dir2" not in members
    assert not any("overlay" in k for m in members.values() for k in m.pax_headers)

    # applying the layer onto a copy of lower gives what the overlay showed
    dst = tmp_path / "dst"
    subprocess.run(["cp", "-a", str(lower), str(dst)], check=True)
    apply_layer(io.BytesIO(out.getvalue()), str(dst), expected_diff_id=info.diff_id)
    assert listing(dst, seconds=True, root_entry=False) == expected


# --- a destination that is a mount point: staging inside it -----------------------------------------


def test_apply_onto_a_mount_point(tmpfs: Path) -> None:
    (tmpfs / "old").mkdir()
    (tmpfs / "old" / "f").write_text("f")
    os.utime(tmpfs, ns=(MTIME * 10**9, MTIME * 10**9))
    before = listing(tmpfs)
    layer = build(E(".wh..wh..opq"), E("new/", "dir"), E("new/f", data=b"n"))
    with pytest.raises(LayerError, match="not the expected"):
        apply_layer(io.BytesIO(layer), str(tmpfs), expected_diff_id="sha256:" + "0" * 64)
    assert listing(tmpfs) == before  # the root's own times included
    with pytest.raises(UnsafeLayer):
        apply_layer(io.BytesIO(build(E("new/f", data=b"n"), E("../x", data=b"x"))), str(tmpfs))
    assert listing(tmpfs) == before

    apply_layer(io.BytesIO(layer), str(tmpfs))  # an opaque root must spare the staging directory
    assert sorted(os.listdir(tmpfs)) == ["new"]
    assert (tmpfs / "new" / "f").read_bytes() == b"n"


def test_apply_without_root_changes_keeps_the_root_times(tmpfs: Path) -> None:
    (tmpfs / "d").mkdir()
    os.utime(tmpfs, ns=(MTIME * 10**9, MTIME * 10**9))
    apply_layer(io.BytesIO(build(E("d/f", data=b"1"))), str(tmpfs))
    assert os.stat(tmpfs).st_mtime == MTIME
    assert os.listdir(tmpfs) == ["d"]


# --- whole trees: busybox, and everything a layer can carry --------------------------------------------


def test_busybox_rootfs_round_trip(busybox_rootfs: str, tmp_path: Path) -> None:
    out = io.BytesIO()
    info = dir_to_layer(busybox_rootfs, out, "zstd")
    dst = tmp_path / "rootfs"
    res = apply_layer(io.BytesIO(out.getvalue()), str(dst), expected_diff_id=info.diff_id)
    assert res.entries == info.entries > 100
    assert listing(dst, seconds=True, root_entry=False) == listing(
        busybox_rootfs, seconds=True, root_entry=False
    )
    assert (
        subprocess.run(
            ["chroot", str(dst), "/bin/sh", "-c", "echo ok"], capture_output=True, text=True
        ).stdout
        == "ok\n"
    )


def test_full_fidelity_round_trip(xattr_dir: Path) -> None:
    src = xattr_dir / "src"
    (src / "dev").mkdir(parents=True)
    os.mknod(src / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "dev" / "loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.mkfifo(src / "dev" / "initctl", 0o600)
    os.chown(src / "dev" / "loop0", 0, 6)
    (src / "usr" / "bin").mkdir(parents=True)
    ping = src / "usr" / "bin" / "ping"
    ping.write_bytes(b"\x7fELF ping")
    os.chown(ping, 0, 0)
    os.chmod(ping, 0o4755)
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    os.setxattr(ping, "security.capability", cap)
    os.setxattr(ping, "user.mime", b"application/x-executable")
    os.setxattr(src / "usr", "trusted.dir", b"\x00\x01")
    os.link(ping, src / "usr" / "bin" / "ping6")
    (src / "usr" / "bin" / "sh").symlink_to("/bin/busybox")
    (src / "tmp").mkdir(mode=0o1777)
    os.chmod(src / "tmp", 0o1777)
    (src / "home" / "user").mkdir(parents=True)
    os.chown(src / "home" / "user", 1000, 1000)
    os.chmod(src / "home" / "user", 0o700)
    (src / "usr" / "bin" / "sgid").write_text("")
    os.chmod(src / "usr" / "bin" / "sgid", 0o2755)
    out = io.BytesIO()
    info = dir_to_layer(str(src), out, "gzip")
    dst = xattr_dir / "dst"
    apply_layer(io.BytesIO(out.getvalue()), str(dst), expected_diff_id=info.diff_id)
    want = listing(src, seconds=True, root_entry=False)
    assert listing(dst, seconds=True, root_entry=False) == want
    assert dict(want["usr/bin/ping"][7])["security.capability"] == cap  # setuid and a capability survived


def test_overlay_format_layers_mount_like_applied_layers(tmp_path: Path) -> None:
    """Three layers unpacked in overlay format and mounted as overlay lowers read exactly like the
    same layers applied one after the other onto one directory."""
    l1 = build(
        E("etc/", "dir"),
        E("etc/passwd", data=b"root"),
        E("etc/hosts", data=b"hosts"),
        E("var/", "dir"),
        E("var/lib/", "dir"),
        E("var/lib/a", data=b"a"),
        E("var/lib/b", data=b"b"),
        E("opt/", "dir"),
        E("opt/x", data=b"x"),
    )
    l2 = build(
        E("etc/.wh.hosts"),
        E("var/", "dir", mode=0o700),
        E("var/.wh..wh..opq"),
        E("var/new", data=b"new"),
        E(".wh.opt"),
        E("opt/", "dir"),
        E("opt/y", data=b"y"),
    )
    l3 = build(E("var/.wh.new"), E("etc/hosts", data=b"back"))
    flat = tmp_path / "flat"
    for layer in (l1, l2, l3):
        apply_layer(io.BytesIO(layer), str(flat))
    dirs: list[str] = []
    for i, layer in enumerate((l1, l2, l3)):
        d = tmp_path / f"layer{i}"
        apply_layer(io.BytesIO(layer), str(d), whiteouts="overlay", parents=dirs[::-1])
        dirs.append(str(d))
    # layer 3 names var/ only as the parent of a whiteout: it copied var's metadata from layer 2
    assert stat.S_IMODE(os.stat(tmp_path / "layer2" / "var").st_mode) == 0o700
    merged = tmp_path / "merged"
    merged.mkdir()
    mount("-t", "overlay", "-o", "lowerdir=" + ":".join(reversed(dirs)), "cocon-test-overlay-ro", str(merged))
    try:
        seen = listing(merged, root_entry=False, dir_times=False)
    finally:
        umount(merged)
    assert not is_mounted(merged)
    # Directory times differ where a layer only implies a directory: applying bumps them, the
    # overlay format copies them from below. Everything else must match.
    assert seen == listing(flat, root_entry=False, dir_times=False)
    assert sorted(os.listdir(flat / "var")) == [] and sorted(os.listdir(flat / "opt")) == ["y"]


def test_whiteout_of_a_mount_point_rolls_back(tmp_path: Path) -> None:
    """The commit fails half-way (EBUSY renaming a mount point): everything done so far is undone."""
    dest = tmp_path / "dest"
    (dest / "a").mkdir(parents=True)
    (dest / "a" / "f").write_text("f")
    (dest / "mnt").mkdir()
    mount("-t", "tmpfs", "cocon-test-busy", str(dest / "mnt"))
    try:
        before = listing(dest)
        layer = build(E(".wh.a"), E("new", data=b"n"), E(".wh.mnt"), E("zz/", "dir"), E("zz/f", data=b"z"))
        with pytest.raises(LayerError, match=r"busy.*unmount it first.*left as it was"):
            apply_layer(io.BytesIO(layer), str(dest))
        assert listing(dest) == before
        assert [n for n in os.listdir(tmp_path) if "cocon-apply" in n] == []
    finally:
        umount(dest / "mnt")
    assert not is_mounted(dest / "mnt")
