"""cocon.snapshots on real overlayfs: merged views, whiteouts, opaque dirs, 60 layers, read-only views.

Every test works under its own tmp_path; a fixture unmounts whatever a test leaves mounted there
(even when it fails) and then fails the test if anything was left.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator

import pytest

from cocon import _linux as linux
from cocon.snapshots import (
    OverlaySnapshotter,
    SnapshotError,
    chain_ids,
    is_whiteout,
    overlay_opaque,
    overlay_supported,
    overlay_unsupported_reason,
    overlay_whiteout,
)
from cocon.snapshots.mounts import mount_from


def mount_points_under(path: str) -> list[str]:
    """Read /proc/self/mountinfo directly (independently of the code under test)."""
    real = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split(b" ")[4].decode().replace("\\040", " ").replace("\\134", "\\")
            if mp == real or mp.startswith(real + "/"):
                found.append(mp)
    return found


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path: os.PathLike[str]) -> Iterator[None]:
    yield
    left = mount_points_under(str(tmp_path))
    for mp in sorted(left, key=len, reverse=True):
        try:
            linux.umount2(mp, linux.MNT_DETACH)
        except OSError:
            pass
    assert left == [], f"mounts left under {tmp_path}: {left}"


@pytest.fixture
def snap(tmp_path: os.PathLike[str]) -> Iterator[OverlaySnapshotter]:
    s = OverlaySnapshotter(os.path.join(str(tmp_path), "snapshots"))
    yield s
    for key in s.list_active():
        s.remove(key)


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(f"layer {n}".encode()).hexdigest()


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def one_file(name: str, text: str = "") -> Callable[[str], None]:
    """A layer fill that writes one file."""

    def fill(d: str) -> None:
        write(f"{d}/{name}", text)

    return fill


def files_under(root: str) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def test_overlay_is_supported_here(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "probe")
    assert overlay_supported(root), overlay_unsupported_reason(root)
    assert os.listdir(root) == []  # the probe cleans up after itself


def test_three_layers_merged_view(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(0), digest(1), digest(2)])

    def base(d: str) -> None:
        write(f"{d}/etc/os-release", "base\n")
        write(f"{d}/bin/tool", "v1\n")
        write(f"{d}/old/doomed", "bye\n")
        write(f"{d}/cache/a", "a\n")
        write(f"{d}/cache/b", "b\n")
        write(f"{d}/keep/x", "x\n")

    def middle(d: str) -> None:
        os.makedirs(f"{d}/old")
        overlay_whiteout(f"{d}/old", "doomed")  # .wh.doomed
        os.makedirs(f"{d}/cache")
        overlay_opaque(f"{d}/cache")  # .wh..wh..opq
        write(f"{d}/cache/fresh", "fresh\n")
        write(f"{d}/bin/tool", "v2\n")

    def top(d: str) -> None:
        overlay_whiteout(d, "keep")  # a whole directory deleted
        write(f"{d}/etc/motd", "hello\n")

    for c, fill in zip(ids, (base, middle, top), strict=True):
        snap.add_layer(c, fill)

    s = snap.prepare("ctr", ids)
    try:
        merged = snap.mount("ctr")
        assert merged == s.path
        assert files_under(merged) == {
            "etc",
            "etc/os-release",
            "etc/motd",
            "bin",
            "bin/tool",
            "old",
            "cache",
            "cache/fresh",
        }
        assert read(f"{merged}/bin/tool") == "v2\n"
        assert read(f"{merged}/etc/os-release") == "base\n"
        assert os.listdir(f"{merged}/old") == []
        assert os.listdir(f"{merged}/cache") == ["fresh"]  # the opaque dir hides a and b
        assert not os.path.lexists(f"{merged}/keep")

        # Mounting again changes nothing (one mount, not two stacked).
        assert snap.mount("ctr") == merged
        assert mount_points_under(merged) == [merged]

        # Writes go to the upper dir; the layers stay as they were.
        write(f"{merged}/etc/os-release", "changed\n")
        write(f"{merged}/new/file", "new\n")
        os.unlink(f"{merged}/bin/tool")
        upper = snap.upper_dir("ctr")
        assert read(f"{upper}/etc/os-release") == "changed\n"
        assert read(f"{upper}/new/file") == "new\n"
        assert is_whiteout(os.lstat(f"{upper}/bin/tool"))
        assert read(f"{snap.layer_dir(ids[0])}/etc/os-release") == "base\n"
        assert read(f"{snap.layer_dir(ids[1])}/bin/tool") == "v2\n"
        assert snap.usage("ctr") > 0

        # Unmount keeps the upper dir; mounting again shows the same view.
        snap.unmount("ctr")
        snap.unmount("ctr")
        assert mount_points_under(merged) == []
        assert os.listdir(merged) == []
        snap.mount("ctr")
        assert read(f"{merged}/etc/os-release") == "changed\n"
        assert not os.path.lexists(f"{merged}/bin/tool")
    finally:
        snap.remove("ctr")
    assert mount_points_under(snap.root) == []
    assert snap.list_active() == []
    assert not os.path.exists(os.path.join(snap.root, "active", "ctr"))
    assert os.listdir(os.path.join(snap.root, "tmp")) == []


def test_sixty_layers(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(i) for i in range(60)])
    for i, c in enumerate(ids):

        def fill(d: str, i: int = i) -> None:
            write(f"{d}/layer", f"{i}\n")
            write(f"{d}/files/{i}", "")
            if i % 2:  # odd layers delete the previous layer's file
                overlay_whiteout(f"{d}/files", str(i - 1))

        snap.add_layer(c, fill)
    s = snap.prepare("deep", ids)
    # The absolute lowerdir list would not fit in a page: the short links are used.
    assert sum(len(snap.layer_dir(c)) + 1 for c in ids) > 4096
    assert s.mount_cwd == snap.root
    try:
        merged = snap.mount("deep")
        assert read(f"{merged}/layer") == "59\n"
        expect = {str(i) for i in range(60)} - {str(i - 1) for i in range(1, 60, 2)}
        assert set(os.listdir(f"{merged}/files")) == expect
        write(f"{merged}/layer", "top\n")
        assert read(f"{snap.upper_dir('deep')}/layer") == "top\n"
    finally:
        snap.remove("deep")


def test_readonly_snapshots_cannot_be_written(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(0), digest(1)])
    for c in ids:
        snap.add_layer(c, one_file(c[7:15], c))
    try:
        for key, parents in (("view-overlay", ids), ("view-bind", ids[:1])):
            s = snap.prepare(key, parents, readonly=True)
            merged = snap.mount(key)
            assert s.kind == ("overlay" if len(parents) > 1 else "bind")
            assert set(os.listdir(merged)) == {c[7:15] for c in parents}
            attempts: list[tuple[Callable[..., object], str]] = [
                (lambda p: write(p, "x"), f"{merged}/new"),
                (os.unlink, f"{merged}/{parents[0][7:15]}"),
                (os.mkdir, f"{merged}/dir"),
            ]
            for call, path in attempts:
                with pytest.raises(OSError) as info:
                    call(path)
                assert info.value.errno == errno.EROFS, path
            assert os.listdir(snap.upper_dir(key)) == []
        assert sorted(os.listdir(snap.layer_dir(ids[0]))) == [ids[0][7:15]]
    finally:
        snap.remove("view-overlay")
        snap.remove("view-bind")


def test_plain_directory_snapshot(snap: OverlaySnapshotter) -> None:
    s = snap.prepare("scratch", [])
    try:
        merged = snap.mount("scratch")
        write(f"{merged}/hello", "hi\n")
        assert read(f"{s.upper}/hello") == "hi\n"
    finally:
        snap.remove("scratch")


def test_remove_layer_refused_while_mounted(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(0), digest(1)])
    for c in ids:
        snap.add_layer(c, one_file("f", "x"))
    snap.prepare("ctr", ids)
    snap.mount("ctr")
    with pytest.raises(SnapshotError, match="in use by active snapshot"):
        snap.remove_layer(ids[0])
    assert snap.gc_layers(keep=[]) == []
    snap.remove("ctr")
    snap.remove_layer(ids[0])
    assert snap.gc_layers(keep=[]) == [ids[1]]
    assert snap.list_layers() == []


def test_remove_detaches_a_busy_mount(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(0), digest(1)])
    for c in ids:
        snap.add_layer(c, one_file("f", "x"))
    snap.prepare("busy", ids)
    merged = snap.mount("busy")
    held = open(f"{merged}/f")  # kept open: the mount is busy
    try:
        snap.remove("busy")
        assert mount_points_under(snap.root) == []
        assert held.read() == "x"  # the detached mount lives on while it is in use
    finally:
        held.close()
        snap.remove("busy")


def test_caller_can_mount_from_the_description(snap: OverlaySnapshotter, tmp_path: os.PathLike[str]) -> None:
    """A runtime can mount mount_source_options() itself (here at another target)."""
    short = chain_ids([digest(0), digest(1)])
    deep = chain_ids([digest(i) for i in range(60)])
    for c in {*short, *deep}:
        snap.add_layer(c, one_file(c[7:15]))
    for key, parents in (("short", short), ("deep", deep)):
        s = snap.prepare(key, parents)
        target = os.path.join(str(tmp_path), f"target-{key}")
        os.mkdir(target)
        fstype, source, options = s.mount_source_options()
        try:
            if s.mount_cwd:
                mount_from(s.mount_cwd, source, target, fstype, 0, options)
            else:
                linux.mount(source, target, fstype, 0, options)
            assert set(os.listdir(target)) == {c[7:15] for c in parents}
        finally:
            linux.umount2(target)


def test_root_with_option_separators_in_its_path(tmp_path: os.PathLike[str]) -> None:
    root = os.path.join(str(tmp_path), "odd,name:with\\separators")
    s = OverlaySnapshotter(root)
    ids = chain_ids([digest(0), digest(1)])
    for c in ids:
        s.add_layer(c, one_file(c[7:15]))
    s.prepare("ctr", ids)
    try:
        merged = s.mount("ctr")
        assert set(os.listdir(merged)) == {c[7:15] for c in ids}
        assert s.mount("ctr") == merged
        assert len(mount_points_under(merged)) == 1
    finally:
        s.remove("ctr")


def test_unsupported_on_overlayfs_is_explained(tmp_path: os.PathLike[str]) -> None:
    base = str(tmp_path)
    for d in ("lower", "upper", "work", "merged"):
        os.mkdir(os.path.join(base, d))
    linux.mount(
        "overlay",
        f"{base}/merged",
        "overlay",
        0,
        f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work",
    )
    try:
        root = f"{base}/merged/cocon"
        ok = overlay_supported(root)
        reason = overlay_unsupported_reason(root)
        if ok:  # some kernels accept an overlay upper on overlayfs; nothing to explain then
            assert reason is None
        else:
            assert reason is not None and "overlayfs" in reason and "tmpfs" in reason
            snap = OverlaySnapshotter(root)
            ids = chain_ids([digest(0), digest(1)])
            for c in ids:
                snap.add_layer(c, one_file("f", "x"))
            snap.prepare("ctr", ids)
            with pytest.raises(SnapshotError, match=r"cannot mount snapshot ctr.*overlayfs"):
                snap.mount("ctr")
            snap.remove("ctr")
        assert mount_points_under(f"{base}/merged") == [f"{base}/merged"]
    finally:
        linux.umount2(f"{base}/merged")


def test_mount_errors_are_snapshot_errors(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(i) for i in range(60)])
    for c in ids:
        snap.add_layer(c, one_file(c[7:15]))
    snap.prepare("deep", ids)
    # A lost short link is recreated on mount.
    os.unlink(os.path.join(snap.root, "l", snap.short_id(ids[5])))
    snap.mount("deep")
    snap.remove("deep")
    # A layer deleted behind the snapshotter's back: the forked mount's errno comes back.
    snap.prepare("deep", ids)
    shutil.rmtree(snap.layer_dir(ids[7]))
    with pytest.raises(SnapshotError, match=r"cannot mount snapshot deep.*No such file"):
        snap.mount("deep")
    snap.remove("deep")


def test_fill_that_fails_after_whiteouts_leaves_nothing(snap: OverlaySnapshotter) -> None:
    def fill(d: str) -> None:
        overlay_whiteout(d, "x")
        os.mkdir(f"{d}/o")
        overlay_opaque(f"{d}/o")
        raise RuntimeError("digest mismatch")

    with pytest.raises(RuntimeError, match="digest mismatch"):
        snap.add_layer(digest(0), fill)
    assert os.listdir(os.path.join(snap.root, "layers")) == []
    assert os.listdir(os.path.join(snap.root, "tmp")) == []


def super_options(mount_point: str) -> list[str]:
    """The filesystem options mountinfo shows for the mount at `mount_point` (read independently)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mount_point:
                return fields[fields.index("-", 6) + 3].split(",")
    raise AssertionError(f"{mount_point} is not mounted")


def test_volatile_mounts(snap: OverlaySnapshotter) -> None:
    from cocon.snapshots.probe import overlay_volatile_supported

    ids = chain_ids([digest(0), digest(1)])
    for c in ids:
        snap.add_layer(c, one_file(c[7:15], "x"))
    snap.prepare("gone-soon", ids)
    snap.prepare("kept", ids)
    snap.prepare("bind", [])
    snap.prepare("ro", ids[:1], readonly=True)
    try:
        volatile = super_options(snap.mount("gone-soon", volatile=True))
        is_volatile = {"volatile", "fsync=volatile"}.intersection
        assert bool(is_volatile(volatile)) == overlay_volatile_supported()
        assert any(o.startswith("upperdir=") for o in volatile)
        assert snap.mount("gone-soon", volatile=True) == snap.snapshot("gone-soon").path  # mounted: no-op
        assert not is_volatile(super_options(snap.mount("kept")))
        for key in ("bind", "ro"):  # not overlays: nothing to sync, the option is not given
            merged = snap.mount(key, volatile=True)
            assert os.path.ismount(merged) or mount_points_under(merged) == [merged]
        write(f"{snap.snapshot('gone-soon').path}/new", "y")
        snap.unmount("gone-soon")
        snap.unmount("gone-soon")  # idempotent
        assert mount_points_under(snap.snapshot("gone-soon").path) == []
    finally:
        for key in ("gone-soon", "kept", "bind", "ro"):
            snap.remove(key)
    assert mount_points_under(snap.root) == [] and snap.list_active() == []
    assert os.listdir(os.path.join(snap.root, "tmp")) == []
