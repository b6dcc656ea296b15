"""cocon.images.layers on real files under tmp_path: applying (whiteouts, links, devices, xattrs,
compressions), hostile layers that must change nothing, and creating layers (reproducible, diff)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from cocon.images import layers
from cocon.images.errors import ImageError, LayerError, UnsafeLayer
from cocon.images.layers import apply_layer, create_layer, dir_to_layer, open_layer

MTIME = 1_600_000_000

# --- building test layers ----------------------------------------------------------------------------


def E(name: str, kind: str = "file", data: bytes = b"", **kw: Any) -> tuple[tarfile.TarInfo, bytes | None]:
    """One tar member: kind is file, dir, symlink, link, chr, blk, fifo."""
    ti = tarfile.TarInfo(name)
    ti.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "symlink": tarfile.SYMTYPE,
        "link": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "blk": tarfile.BLKTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    ti.mode = kw.pop("mode", 0o755 if kind == "dir" else 0o644)
    ti.mtime = kw.pop("mtime", MTIME)
    xattrs = kw.pop("xattrs", {})
    ti.pax_headers = {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
    for k, v in kw.items():
        setattr(ti, k, v)
    if kind == "file":
        ti.size = len(data)
        return ti, data
    return ti, None


def build(*entries: tuple[tarfile.TarInfo, bytes | None], compression: str | None = None) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    plain = raw.getvalue()
    if compression == "gzip":
        return gzip.compress(plain)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(plain)
    return plain


def diff_id(plain: bytes) -> str:
    return "sha256:" + hashlib.sha256(plain).hexdigest()


def apply_bytes(data: bytes, dest: Path | str, **kw: Any) -> layers.ApplyResult:
    return apply_layer(io.BytesIO(data), str(dest), **kw)


# --- looking at trees ----------------------------------------------------------------------------------


def listing(
    root: Path | str, *, times: bool | str = True, root_entry: bool = True
) -> dict[str, tuple[Any, ...]]:
    """Everything about a tree: type, mode, owner, size, times, link target, device, xattrs, content,
    and which paths share an inode."""
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
        out[rel] = (
            stat.S_IFMT(st.st_mode),
            stat.S_IMODE(st.st_mode),
            st.st_uid,
            st.st_gid,
            st.st_size if not stat.S_ISDIR(st.st_mode) else None,
            (st.st_mtime_ns // 10**9 if times == "s" else st.st_mtime_ns) if times else None,
            content,
            xattrs,
            link,
        )

    if root_entry:
        one(root, ".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            one(path, os.path.relpath(path, root))
    return out


def names(root: Path | str) -> set[str]:
    return {k for k in listing(root, root_entry=False)}


def no_leftovers(dest: Path) -> None:
    leftovers = [n for n in os.listdir(dest.parent) if "cocon-apply" in n]
    leftovers += [n for n in os.listdir(dest) if "cocon-apply" in n] if dest.is_dir() else []
    assert leftovers == []


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    """A destination with lower content to delete, replace and write through."""
    d = tmp_path / "rootfs"
    (d / "etc").mkdir(parents=True)
    (d / "etc" / "passwd").write_text("root:x:0:0\n")
    (d / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    (d / "var" / "lib" / "deep").mkdir(parents=True)
    (d / "var" / "lib" / "deep" / "file").write_text("deep")
    (d / "usr" / "lib").mkdir(parents=True)
    (d / "usr" / "lib" / "libc.so").write_text("libc")
    os.symlink("usr/lib", d / "lib")
    (d / "file-to-dir").write_text("x")
    (d / "dir-to-file").mkdir()
    (d / "dir-to-file" / "inner").write_text("x")
    (d / "link-to-file").symlink_to("etc/hosts")
    os.chmod(d / "etc", 0o751)
    os.utime(d / "etc", ns=(MTIME * 10**9, MTIME * 10**9))
    return d


# --- basics --------------------------------------------------------------------------------------------


def test_errors_are_one_family() -> None:
    assert issubclass(UnsafeLayer, LayerError) and issubclass(LayerError, ImageError)


def test_apply_files_dirs_symlinks_and_metadata(tmp_path: Path) -> None:
    data = build(
        E("etc/", "dir", mode=0o750, uid=5, gid=6, mtime=1_500_000_000),
        E("etc/motd", data=b"hello\n", mode=0o640, uid=7, gid=8),
        E("etc/link", "symlink", linkname="motd", uid=9, gid=10),
        E("bin/su", data=b"\x7fELF", mode=0o4755),
        E("tmp/", "dir", mode=0o1777),
        E("ro/", "dir", mode=0o555),
        E("ro/inside", data=b"x"),
    )
    dest = tmp_path / "dest"
    res = apply_bytes(data, dest)
    assert (
        res.entries == 7
        and res.diff_id == diff_id(data)
        and res.size == len(data)
        and res.compression is None
    )
    assert (dest / "etc" / "motd").read_bytes() == b"hello\n"
    st = os.lstat(dest / "etc")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o750, 5, 6, 1_500_000_000)
    st = os.lstat(dest / "etc" / "motd")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o640, 7, 8, MTIME)
    st = os.lstat(dest / "etc" / "link")
    assert stat.S_ISLNK(st.st_mode) and os.readlink(dest / "etc" / "link") == "motd"
    assert (st.st_uid, st.st_gid, st.st_mtime) == (9, 10, MTIME)
    assert stat.S_IMODE(os.stat(dest / "bin" / "su").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(dest / "bin").st_mode) == 0o755  # implicit parent
    assert stat.S_IMODE(os.stat(dest / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(dest / "ro").st_mode) == 0o555  # mode applied after its content
    assert os.stat(dest / "ro").st_mtime == MTIME
    no_leftovers(dest)


def test_devices_fifos_and_ownership(tmp_path: Path) -> None:
    data = build(
        E("dev/", "dir"),
        E("dev/null", "chr", devmajor=1, devminor=3, mode=0o666),
        E("dev/sda", "blk", devmajor=8, devminor=0, mode=0o660, gid=6),
        E("dev/fifo", "fifo", mode=0o620, uid=1000, gid=1000),
    )
    dest = tmp_path / "dest"
    apply_bytes(data, dest)
    st = os.lstat(dest / "dev" / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(dest / "dev" / "sda")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (8, 0)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 6)
    st = os.lstat(dest / "dev" / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        1000,
        1000,
        0o620,
    )


def test_hard_links_within_the_layer(tmp_path: Path) -> None:
    data = build(
        E("a/", "dir"),
        E("a/orig", data=b"shared", mode=0o600),
        E("b/twin", "link", linkname="a/orig"),
        E("a/sym", "symlink", linkname="orig"),
        E("a/symtwin", "link", linkname="./a/sym"),
    )
    dest = tmp_path / "dest"
    apply_bytes(data, dest)
    a, b = os.lstat(dest / "a" / "orig"), os.lstat(dest / "b" / "twin")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert os.lstat(dest / "a" / "symtwin").st_ino == os.lstat(dest / "a" / "sym").st_ino


def test_hard_link_to_a_file_not_in_the_layer_is_refused(lower: Path) -> None:
    before = listing(lower)
    with pytest.raises(LayerError, match="hard link"):
        apply_bytes(build(E("x", "link", linkname="etc/passwd")), lower)
    assert listing(lower) == before


def test_xattrs_kept_and_filtered(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_text("")
    os.setxattr(probe, "user.probe", b"1")  # the test file system must take user xattrs (ext4 does)
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    data = build(
        E("d/", "dir", xattrs={"user.dir": b"on a dir", "trusted.overlay.opaque": b"y"}),
        E(
            "d/f",
            data=b"x",
            mode=0o755,
            xattrs={
                "user.bin": b"\xff\x00\x80binary",
                "trusted.t": b"t",
                "security.capability": cap,
                "security.selinux": b"system_u:object_r:bin_t:s0",
                "trusted.overlay.redirect": b"/elsewhere",
            },
        ),
    )
    dest = tmp_path / "dest"
    apply_bytes(data, dest)
    f = dest / "d" / "f"
    assert os.getxattr(f, "user.bin") == b"\xff\x00\x80binary"
    assert os.getxattr(f, "trusted.t") == b"t"
    assert os.getxattr(f, "security.capability") == cap
    assert "security.selinux" not in os.listxattr(f)
    assert "trusted.overlay.redirect" not in os.listxattr(f)
    assert os.getxattr(dest / "d", "user.dir") == b"on a dir"
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "d")


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_compressions_detected_by_content_not_media_type(tmp_path: Path, compression: str | None) -> None:
    plain = build(E("f", data=b"content " * 1000), E("d/", "dir"))
    data = build(E("f", data=b"content " * 1000), E("d/", "dir"), compression=compression)
    wrong = "application/vnd.oci.image.layer.v1.tar+gzip" if compression != "gzip" else layers.MEDIA_TYPE_TAR
    res = apply_bytes(data, tmp_path / "dest", media_type=wrong, expected_diff_id=diff_id(plain))
    assert res.diff_id == diff_id(plain) and res.size == len(plain) and res.compression == compression
    assert (tmp_path / "dest" / "f").read_bytes() == b"content " * 1000
    # and from a path
    path = tmp_path / "layer.blob"
    path.write_bytes(data)
    assert apply_layer(str(path), str(tmp_path / "dest2")).diff_id == diff_id(plain)


def test_diff_id_covers_padding_after_the_end_marker(tmp_path: Path) -> None:
    plain = build(E("f", data=b"x")) + bytes(4096)
    assert apply_bytes(gzip.compress(plain), tmp_path / "d").diff_id == diff_id(plain)


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path: Path) -> None:
    plain = build(E("f", data=os.urandom(300_000)))
    half = len(plain) // 2
    z = zstandard.ZstdCompressor().compress(plain[:half]) + zstandard.ZstdCompressor().compress(plain[half:])
    g = gzip.compress(plain[:half]) + gzip.compress(plain[half:])
    assert apply_bytes(z, tmp_path / "z").diff_id == diff_id(plain)
    assert apply_bytes(g, tmp_path / "g").diff_id == diff_id(plain)


def test_empty_layer(tmp_path: Path) -> None:
    empty = bytes(1024)  # the well-known empty layer: just the end-of-archive marker
    res = apply_bytes(empty, tmp_path / "d")
    assert res.entries == 0 and res.diff_id == diff_id(empty)
    assert os.listdir(tmp_path / "d") == []


def test_open_layer_streams_members(tmp_path: Path) -> None:
    plain = build(E("a", data=b"1"), E("b/", "dir"))
    with open_layer(io.BytesIO(gzip.compress(plain))) as reader:
        assert reader.compression == "gzip"
        got = []
        for m in reader:
            f = reader.extractfile(m) if m.isreg() else None
            got.append((m.name, f.read() if f else None))
        assert got == [("a", b"1"), ("b", None)]
        assert reader.finish() == (diff_id(plain), len(plain))


def test_max_size(tmp_path: Path) -> None:
    data = gzip.compress(build(E("big", data=bytes(5_000_000))))
    with pytest.raises(LayerError, match="limit"):
        apply_bytes(data, tmp_path / "d", max_size=1_000_000)
    assert not (tmp_path / "d").exists()  # it was created for the layer, and removed again


# --- whiteouts -----------------------------------------------------------------------------------------


def test_whiteouts_delete_lower_files_and_dirs(lower: Path) -> None:
    apply_bytes(build(E("etc/.wh.passwd"), E(".wh.var"), E(".wh.not-there")), lower)
    assert not (lower / "etc" / "passwd").exists()
    assert (lower / "etc" / "hosts").exists()
    assert not (lower / "var").exists()
    assert not any(".wh." in n for n in names(lower))
    assert os.stat(lower / "etc").st_mode & 0o777 == 0o751  # an implicit parent keeps its metadata


def test_whiteout_applies_to_lower_only(lower: Path) -> None:
    """The same layer may delete the lower `etc/hosts` and add a new one."""
    apply_bytes(build(E("etc/hosts", data=b"new\n"), E("etc/.wh.hosts")), lower)
    assert (lower / "etc" / "hosts").read_bytes() == b"new\n"
    apply_bytes(build(E(".wh.var"), E("var/new", data=b"n")), lower)
    assert names(lower / "var") == {"new"}


def test_whiteout_of_a_symlink_removes_the_link_not_its_target(lower: Path) -> None:
    apply_bytes(build(E(".wh.lib")), lower)
    assert not os.path.lexists(lower / "lib")
    assert (lower / "usr" / "lib" / "libc.so").exists()


@pytest.mark.parametrize("opaque_first", [True, False])
def test_opaque_dir_keeps_same_layer_additions(lower: Path, opaque_first: bool) -> None:
    entries = [E("var/", "dir", mode=0o700), E("var/lib/", "dir"), E("var/lib/new", data=b"n")]
    entries.insert(1 if opaque_first else 3, E("var/.wh..wh..opq"))
    apply_bytes(build(*entries), lower)
    assert names(lower / "var") == {"lib", "lib/new"}
    assert stat.S_IMODE(os.stat(lower / "var").st_mode) == 0o700


def test_opaque_without_a_dir_entry(lower: Path) -> None:
    apply_bytes(build(E("etc/.wh..wh..opq"), E("etc/fresh", data=b"f")), lower)
    assert os.listdir(lower / "etc") == ["fresh"]
    assert stat.S_IMODE(os.stat(lower / "etc").st_mode) == 0o751


def test_whiteouts_below_a_missing_dir_create_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    apply_bytes(build(E("nothing/here/.wh.x"), E("nothing/.wh..wh..opq")), dest)
    assert os.listdir(dest) == []


def test_aufs_metadata_is_skipped(tmp_path: Path) -> None:
    apply_bytes(build(E(".wh..wh.plnk/", "dir"), E(".wh..wh.aufs"), E("f", data=b"1")), tmp_path / "d")
    assert os.listdir(tmp_path / "d") == ["f"]


# --- replacing lower entries -----------------------------------------------------------------------------


def test_replacements_like_docker(lower: Path) -> None:
    apply_bytes(
        build(
            E("file-to-dir/", "dir"),
            E("file-to-dir/in", data=b"i"),
            E("dir-to-file", data=b"now a file"),
            E("etc/passwd", "symlink", linkname="hosts"),
            E("link-to-file", data=b"regular now"),
            E("usr/lib", "symlink", linkname="/lib64"),
        ),
        lower,
    )
    assert (lower / "file-to-dir" / "in").read_bytes() == b"i"
    assert (lower / "dir-to-file").read_bytes() == b"now a file"
    assert os.readlink(lower / "etc" / "passwd") == "hosts"
    assert not os.path.islink(lower / "link-to-file")
    assert (lower / "link-to-file").read_bytes() == b"regular now"
    assert (lower / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"  # not written through
    assert os.readlink(lower / "usr" / "lib") == "/lib64"


def test_dir_entry_over_existing_dir_merges_and_sets_metadata(lower: Path) -> None:
    apply_bytes(
        build(E("etc/", "dir", mode=0o700, uid=3, gid=4, mtime=1_234_567_890), E("etc/new", data=b"n")), lower
    )
    assert names(lower / "etc") == {"passwd", "hosts", "new"}
    st = os.stat(lower / "etc")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o700, 3, 4, 1_234_567_890)


def test_lower_symlink_parent_is_followed_inside_the_root(lower: Path) -> None:
    """Debian's `lib -> usr/lib`: a layer's `lib/x` lands in `usr/lib/x`, as with Docker."""
    apply_bytes(build(E("lib/libnew.so", data=b"new")), lower)
    assert os.path.islink(lower / "lib")
    assert (lower / "usr" / "lib" / "libnew.so").read_bytes() == b"new"
    apply_bytes(build(E("lib/.wh.libc.so")), lower)
    assert not (lower / "usr" / "lib" / "libc.so").exists()


def test_repeated_member_last_one_wins(tmp_path: Path) -> None:
    apply_bytes(
        build(
            E("x/", "dir"), E("x/in", data=b"1"), E("x", data=b"file"), E("y", data=b"1"), E("y", data=b"2")
        ),
        tmp_path / "d",
    )
    assert (tmp_path / "d" / "x").read_bytes() == b"file"
    assert (tmp_path / "d" / "y").read_bytes() == b"2"


def test_root_entry_sets_the_root_metadata(tmp_path: Path) -> None:
    dest = tmp_path / "d"
    apply_bytes(build(E("./", "dir", mode=0o700, mtime=1_111_111_111), E("./f", data=b"1")), dest)
    st = os.stat(dest)
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o700, 1_111_111_111)
    assert os.listdir(dest) == ["f"]


# --- hostile layers: refused, and nothing changes ------------------------------------------------------


def refused(layer: bytes, dest: Path, exc: type[Exception], match: str, **kw: Any) -> None:
    before = listing(dest)
    outside_before = sorted(os.listdir(dest.parent))
    with pytest.raises(exc, match=match):
        apply_bytes(layer, dest, **kw)
    assert listing(dest) == before
    assert sorted(os.listdir(dest.parent)) == outside_before
    no_leftovers(dest)


def test_dotdot_escape_refused(lower: Path) -> None:
    refused(
        build(E("ok", data=b"1"), E("../escape", data=b"x")), lower, UnsafeLayer, r"'\.\./escape'.*climbs out"
    )
    refused(build(E("a/../../escape", data=b"x")), lower, UnsafeLayer, "climbs out")


def test_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    apply_bytes(build(E("a/../b", data=b"x")), tmp_path / "d")
    assert (tmp_path / "d" / "b").read_bytes() == b"x"


def test_absolute_name_refused(lower: Path) -> None:
    refused(build(E("/abs", data=b"x")), lower, UnsafeLayer, "'/abs'.*absolute")


def test_write_through_a_symlink_of_the_same_layer_refused(lower: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    layer = build(E("link", "symlink", linkname=str(outside)), E("link/file", data=b"pwned"))
    refused(layer, lower, UnsafeLayer, "'link/file'.*symlink in this same layer")
    assert os.listdir(outside) == []
    existed = os.path.lexists("/tmp/x/file")
    layer = build(E("link", "symlink", linkname="/tmp/x"), E("link/file", data=b"pwned"))
    refused(layer, lower, UnsafeLayer, "'link/file'.*symlink in this same layer")
    assert os.path.lexists("/tmp/x/file") == existed
    layer = build(E("up", "symlink", linkname="../.."), E("up/file", data=b"pwned"))
    refused(layer, lower, UnsafeLayer, "symlink in this same layer")
    layer = build(E("link", "symlink", linkname=str(outside)), E("link/.wh.x"))
    refused(layer, lower, UnsafeLayer, "symlink in this same layer")


def test_lower_symlinks_pointing_outside_never_lead_outside(lower: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "victim").write_text("keep")
    os.symlink(str(outside), lower / "abs")  # absolute: resolved inside the root, where it does not exist
    os.symlink("../../../../../../..", lower / "rel")  # climbs: stops at the root
    before_outside = listing(outside)
    with pytest.raises(LayerError, match="does not lead to a directory"):
        apply_bytes(build(E("abs/sub/file", data=b"pwned")), lower)
    assert listing(outside) == before_outside
    apply_bytes(build(E("rel/file", data=b"inside"), E("abs/.wh.victim")), lower)
    assert (lower / "file").read_bytes() == b"inside"
    assert listing(outside) == before_outside


def test_device_never_written_through_an_existing_symlink(lower: Path, tmp_path: Path) -> None:
    target = tmp_path / "host-file"
    target.write_text("host")
    os.symlink(str(target), lower / "null")
    apply_bytes(build(E("null", "chr", devmajor=1, devminor=3), E("etc/hosts", "fifo")), lower)
    assert stat.S_ISCHR(os.lstat(lower / "null").st_mode)
    assert target.read_text() == "host" and stat.S_ISREG(os.lstat(target).st_mode)


def test_hard_link_escapes_refused(lower: Path) -> None:
    refused(
        build(E("f", data=b"1"), E("h", "link", linkname="../../etc/passwd")),
        lower,
        UnsafeLayer,
        "climbs out",
    )
    refused(build(E("h", "link", linkname="/etc/passwd")), lower, UnsafeLayer, "absolute")
    refused(build(E("d/", "dir"), E("h", "link", linkname="d")), lower, LayerError, "directory")


def test_hostile_whiteout_names_refused(lower: Path) -> None:
    refused(build(E("etc/.wh..."), E("x", data=b"1")), lower, UnsafeLayer, r"whiteout.*'\.\.'")
    refused(
        build(
            E("etc/.wh.."),
        ),
        lower,
        UnsafeLayer,
        "whiteout",
    )
    refused(build(E("../.wh.etc")), lower, UnsafeLayer, "climbs out")
    refused(build(E("/.wh.etc")), lower, UnsafeLayer, "absolute")
    refused(build(E(".wh.x/y", data=b"1")), lower, LayerError, "whiteout name")


def test_wrong_diff_id_changes_nothing(lower: Path) -> None:
    layer = build(E(".wh.etc"), E("var/.wh..wh..opq"), E("new", data=b"n"), E("usr/", "dir", mode=0o700))
    refused(layer, lower, LayerError, "not the expected", expected_diff_id="sha256:" + "0" * 64)
    refused(
        gzip.compress(layer), lower, LayerError, "not the expected", expected_diff_id="sha256:" + "1" * 64
    )
    with pytest.raises(LayerError, match="form"):
        apply_bytes(layer, lower, expected_diff_id="md5:abc")


@pytest.mark.parametrize("compression", ["gzip", "zstd", None])
def test_truncated_layer_changes_nothing(lower: Path, compression: str | None) -> None:
    layer = build(
        E(".wh.etc"), E("big", data=os.urandom(100_000)), E("z", data=b"z"), compression=compression
    )
    if compression is None:
        with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
            last = tf.getmember("z").offset
        cuts = [len(layer) // 3, last + 100, last + 512 + 1]  # in data, in a header, in the last data
    else:
        cuts = [len(layer) // 3, len(layer) - 3]
    for cut in cuts:
        refused(layer[:cut], lower, LayerError, "truncated|corrupt|end")


def test_truncated_tar_at_a_header_boundary_is_caught(lower: Path) -> None:
    plain = build(E(".wh.etc"), E("f", data=b"x" * 512))
    cut = plain[: 512 * 3]  # whiteout header, f's header and data; no end-of-archive marker
    refused(cut, lower, LayerError, "end-of-archive|truncated")


def test_missing_end_marker_is_accepted_when_the_diff_id_checks(lower: Path, tmp_path: Path) -> None:
    """umoci 0.4.7 writes layers without the end-of-archive marker; Go's tar reader accepts them."""
    plain = build(E("f", data=b"x" * 512), E("g", data=b"hi\n"))
    for cut in (plain[: 512 * 2], plain[: 512 * 3 + 3]):  # no end marker; no padding either
        dest = tmp_path / f"dest{len(cut)}"
        dest.mkdir()
        diff_id = "sha256:" + hashlib.sha256(cut).hexdigest()
        assert apply_layer(io.BytesIO(cut), dest, expected_diff_id=diff_id).diff_id == diff_id
        assert (dest / "f").read_bytes() == b"x" * 512
        refused(cut, dest, LayerError, "end-of-archive|truncated")  # nothing to check it against
        refused(cut[:-1], dest, LayerError, "diff|truncated", expected_diff_id=diff_id)


def test_corrupt_header_in_the_middle_is_caught(lower: Path) -> None:
    plain = bytearray(build(E(".wh.etc"), E("f", data=b"x"), E("g", data=b"y")))
    with tarfile.open(fileobj=io.BytesIO(bytes(plain))) as tf:
        g = tf.getmember("g").offset
    plain[g + 148 : g + 156] = b"garbage!"  # break a later header's checksum
    refused(bytes(plain), lower, LayerError, "corrupt")


def test_garbage_and_empty_input(lower: Path) -> None:
    refused(b"this is not a tar archive at all" * 40, lower, LayerError, "tar|corrupt")
    refused(b"", lower, LayerError, "tar|empty")
    refused(b"\x1f\x8bgarbage", lower, LayerError, "truncated|gzip")


def test_names_too_long_refused(lower: Path) -> None:
    refused(build(E("a" * 300, data=b"1")), lower, LayerError, "longer than 255")
    refused(build(E("/".join(["abcdefgh"] * 600), data=b"1")), lower, LayerError, "longer than 4095")
    refused(build(E("a/" * 300 + "f", data=b"1")), lower, LayerError, "deeper")


def test_parent_that_is_a_file_refused(lower: Path) -> None:
    refused(build(E("etc/passwd/x", data=b"1")), lower, LayerError, "non-directory")
    refused(build(E("f", data=b"1"), E("f/x", data=b"1")), lower, LayerError, "not a directory")


def test_failure_during_commit_is_rolled_back(lower: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after dest has started to change: the journal puts everything back."""
    layer = build(
        E("etc/", "dir", mode=0o700, xattrs={"user.a": b"1"}),
        E("etc/.wh.passwd"),
        E("etc/hosts", data=b"replaced"),
        E("var/.wh..wh..opq"),
        E("var/new", data=b"n"),
        E("dir-to-file", data=b"f"),
        E("lib/viasymlink", data=b"s"),
        E("zzz-new/", "dir"),
        E("zzz-new/f", data=b"f"),
    )
    before = listing(lower)
    real = layers._Committer._move_in
    calls = {"n": 0}

    def failing(self: Any, *a: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device (simulated)")
        real(self, *a)

    monkeypatch.setattr(layers._Committer, "_move_in", failing)
    with pytest.raises(LayerError, match=r"simulated.*nothing was changed"):
        apply_bytes(layer, lower)
    assert calls["n"] == 5
    assert listing(lower) == before
    no_leftovers(lower)
    monkeypatch.setattr(layers._Committer, "_move_in", real)
    apply_bytes(layer, lower)  # and the same layer applies fine afterwards
    assert (lower / "etc" / "hosts").read_bytes() == b"replaced"


# --- creating layers -----------------------------------------------------------------------------------


def copy_tree(src: Path, dst: Path) -> None:
    """A full copy with devices, fifos, owners, xattrs and exact times (cp -a)."""
    import subprocess

    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def make_tree(root: Path) -> None:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_bytes(b"\x7fELF tool")
    os.chmod(root / "bin" / "tool", 0o4755)
    os.link(root / "bin" / "tool", root / "bin" / "tool-alias")
    (root / "bin" / "sh").symlink_to("tool")
    (root / "etc").mkdir()
    (root / "etc" / "conf").write_text("a=1\n")
    os.chown(root / "etc" / "conf", 100, 101)
    os.setxattr(root / "etc" / "conf", "user.note", b"\x00\xffnote")
    os.setxattr(root / "etc", "trusted.t", b"dir xattr")
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "fifo", 0o600)
    (root / "empty").mkdir(mode=0o700)
    (root / "etc" / "ünïcödé").write_text("u")
    (root / ("long" * 40)).write_text("long name")


@pytest.mark.parametrize("compression", ["gzip", "zstd", None])
def test_dir_to_layer_round_trip(tmp_path: Path, compression: Any) -> None:
    src = tmp_path / "src"
    make_tree(src)
    out = io.BytesIO()
    info = dir_to_layer(str(src), out, compression)
    blob = out.getvalue()
    assert info.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and info.size == len(blob)
    assert info.media_type == layers.MEDIA_TYPES[compression]
    res = apply_bytes(blob, tmp_path / "dst", expected_diff_id=info.diff_id)
    assert res.size == info.uncompressed_size and res.entries == info.entries
    # created layers keep whole seconds
    assert listing(tmp_path / "dst", root_entry=False, times="s") == listing(src, root_entry=False, times="s")


def test_created_layers_are_reproducible_pax_and_sorted(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src)
    a, b = io.BytesIO(), io.BytesIO()
    ia = dir_to_layer(str(src), a, "gzip", mtime=1_000_000_000)
    os.utime(src / "etc" / "conf")  # now: later than the clamp, so no change in the layer
    ib = dir_to_layer(str(src), b, "gzip", mtime=1_000_000_000)
    assert a.getvalue() == b.getvalue() and ia == ib
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a.getvalue()))) as tf:
        members = tf.getmembers()
    got = [m.name for m in members]
    assert got[:4] == ["bin", "bin/sh", "bin/tool", "bin/tool-alias"]
    assert got == sorted(got, key=lambda n: [os.fsencode(c) for c in n.split("/")])
    assert all(m.mtime <= 1_000_000_000 for m in members)
    alias = next(m for m in members if m.name == "bin/tool-alias")
    assert alias.type == tarfile.LNKTYPE and alias.linkname == "bin/tool"
    conf = next(m for m in members if m.name == "etc/conf")
    assert conf.pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == b"\x00\xffnote"
    assert (conf.uid, conf.gid, conf.uname, conf.gname) == (100, 101, "", "")
    raw = gzip.decompress(a.getvalue())
    assert b"ustar\x0000" in raw[:512] or b"PaxHeader" in raw  # POSIX ustar/PAX headers


def test_create_layer_diff_mode_round_trip(tmp_path: Path) -> None:
    base, upper = tmp_path / "base", tmp_path / "upper"
    make_tree(base)
    (base / "gone").mkdir()
    (base / "gone" / "x").write_text("x")
    (base / "stays").mkdir()
    (base / "stays" / "deep").mkdir()
    (base / "stays" / "deep" / "old").write_text("old")
    copy_tree(base, upper)
    shutil.rmtree(upper / "gone")
    (upper / "stays" / "deep" / "old").write_text("changed")
    (upper / "stays" / "deep" / "new").write_text("new")
    (upper / "etc" / "conf").unlink()
    (upper / "etc" / "conf").mkdir()  # file -> dir
    os.chmod(upper / "bin" / "tool", 0o755)  # metadata only
    out = io.BytesIO()
    info = create_layer(str(upper), out, compression=None, base=str(base))
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        got = [m.name for m in tf.getmembers()]
    assert ".wh.gone" in got and "stays/deep/old" in got and "stays/deep/new" in got
    assert "stays" in got and "stays/deep" in got  # parents of changes
    assert "null" not in got and "bin/sh" not in got  # unchanged
    dst = tmp_path / "dst"
    copy_tree(base, dst)
    apply_bytes(out.getvalue(), dst, expected_diff_id=info.diff_id)
    want = listing(upper, root_entry=False, times="s")
    have = listing(dst, root_entry=False, times="s")
    assert have.keys() == want.keys()
    for k in want:  # everything but which paths share an inode
        assert have[k][:8] == want[k][:8], k


def test_create_layer_refuses_whiteout_names_in_the_tree(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".wh.sneaky").write_text("")
    with pytest.raises(LayerError, match=r"\.wh\."):
        dir_to_layer(str(tmp_path / "src"), io.BytesIO())


def test_create_layer_refuses_unknown_compression(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="compression"):
        dir_to_layer(str(tmp_path), io.BytesIO(), "bzip2")  # type: ignore[arg-type]


def entries_of(blob: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return [(m.name, m.type) for m in tf.getmembers()]


def test_overlay_upper_conversion_without_a_mount(tmp_path: Path) -> None:
    """The overlay whiteout formats, made by hand (the integration test uses a real overlay)."""
    upper = tmp_path / "upper"
    (upper / "opq").mkdir(parents=True)
    os.setxattr(upper / "opq", "trusted.overlay.opaque", b"y")
    (upper / "opq" / "kept").write_text("k")
    os.mknod(upper / "deleted", stat.S_IFCHR | 0o600, 0)
    os.setxattr(upper / "opq" / "kept", "trusted.overlay.origin", b"\x00x")
    out = io.BytesIO()
    create_layer(str(upper), out, compression=None)
    got = entries_of(out.getvalue())
    assert got == [
        (".wh.deleted", tarfile.REGTYPE),
        ("opq", tarfile.DIRTYPE),
        ("opq/.wh..wh..opq", tarfile.REGTYPE),
        ("opq/kept", tarfile.REGTYPE),
    ]
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        assert all("overlay" not in k for m in tf.getmembers() for k in m.pax_headers)
    os.setxattr(upper / "opq", "trusted.overlay.redirect", b"/x")
    with pytest.raises(LayerError, match="redirect_dir=off"):
        create_layer(str(upper), io.BytesIO())


def test_layer_errors_name_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(LayerError, match="cannot open layer"):
        apply_layer(str(tmp_path / "missing.tar"), str(tmp_path / "d"))
    (tmp_path / "file").write_text("")
    with pytest.raises(LayerError, match="destination"):
        apply_bytes(build(E("f", data=b"1")), tmp_path / "file")


# --- overlay format: a layer unpacked into its own directory, for overlayfs ----------------------------


def test_overlay_format_whiteouts_and_opaque(tmp_path: Path) -> None:
    layer = build(
        E("etc/.wh.passwd"),
        E(".wh.var"),
        E("opq/", "dir", mode=0o700),
        E("opq/.wh..wh..opq"),
        E("opq/kept", data=b"k"),
        E(".wh.redone"),
        E("redone/", "dir"),
        E("redone/f", data=b"f"),
        E(".wh.again"),
        E("again", data=b"file now"),
        E("deep/er/.wh.x"),
    )
    dest = tmp_path / "layer"
    dest.mkdir()
    apply_bytes(layer, dest, whiteouts="overlay")

    def whiteout(p: Path) -> bool:
        st = os.lstat(p)
        return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and stat.S_IMODE(st.st_mode) == 0

    assert (
        whiteout(dest / "etc" / "passwd") and whiteout(dest / "var") and whiteout(dest / "deep" / "er" / "x")
    )
    assert os.getxattr(dest / "opq", "trusted.overlay.opaque") == b"y"
    assert stat.S_IMODE(os.stat(dest / "opq").st_mode) == 0o700
    assert os.getxattr(dest / "redone", "trusted.overlay.opaque") == b"y"  # deleted and re-added
    assert (dest / "again").read_bytes() == b"file now"
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "etc")
    assert not any(".wh." in n for n in names(dest))

    dest2 = tmp_path / "layer2"
    apply_bytes(
        build(E(".wh..wh..opq"), E("f", data=b"1")),
        dest2,
        whiteouts="overlay",
        opaque_xattr="user.overlay.opaque",
    )
    assert os.getxattr(dest2, "user.overlay.opaque") == b"y"
    with pytest.raises(LayerError, match="opaque"):
        apply_bytes(layer, tmp_path / "x", whiteouts="overlay", opaque_xattr="user.evil")


def test_huge_extended_header_refused(lower: Path) -> None:
    """A PAX header claiming 1 GiB must not be read into memory."""
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type = tarfile.XHDTYPE
    hdr.size = 1 << 30
    head = hdr.tobuf(tarfile.USTAR_FORMAT)
    refused(head + bytes(4096), lower, LayerError, "extended header")
