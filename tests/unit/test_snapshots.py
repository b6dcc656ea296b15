"""cocon.snapshots without mounting: chain ids, layer commits and their races, records, whiteout helpers."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from collections.abc import Callable

import pytest

from cocon.snapshots import (
    OverlaySnapshotter,
    SnapshotError,
    chain_ids,
    is_opaque,
    is_whiteout,
    overlay_opaque,
    overlay_whiteout,
)

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def fill_with(files: dict[str, str]) -> Callable[[str], None]:
    def fill(d: str) -> None:
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(d, name)), exist_ok=True)
            write(os.path.join(d, name), text)

    return fill


@pytest.fixture
def snap(tmp_path: os.PathLike[str]) -> OverlaySnapshotter:
    return OverlaySnapshotter(os.path.join(str(tmp_path), "snapshots"))


# --- chain ids ---------------------------------------------------------------------------------
def test_chain_ids_known_values() -> None:
    # Computed with `printf '%s %s' "$A" "$B" | sha256sum` and so on.
    c1 = "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c"
    c2 = "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588"
    assert chain_ids([A, B, C]) == [A, c1, c2]
    assert chain_ids([A]) == [A]
    assert chain_ids([]) == []


def test_chain_ids_recomputed_independently() -> None:
    diffs = [digest(i) for i in range(5)]
    expect = [diffs[0]]
    for d in diffs[1:]:
        expect.append("sha256:" + hashlib.sha256((expect[-1] + " " + d).encode()).hexdigest())
    assert chain_ids(diffs) == expect
    # The same diff twice in a stack still gives distinct chain ids.
    same = chain_ids([A, A, A])
    assert len(set(same)) == 3


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "a" * 32, "sha256:" + "A" * 64, "a" * 64, ""])
def test_chain_ids_rejects_bad_digests(bad: str) -> None:
    with pytest.raises(SnapshotError, match="invalid diff id"):
        chain_ids([A, bad])


def test_chain_ids_rejects_a_bare_string() -> None:
    with pytest.raises(SnapshotError):
        chain_ids(A)


# --- layers ------------------------------------------------------------------------------------
def test_add_layer_commits_content_and_link(snap: OverlaySnapshotter) -> None:
    path = snap.add_layer(A, fill_with({"etc/hostname": "box\n"}))
    assert path == snap.layer_dir(A) == os.path.join(snap.root, "layers", "a" * 64, "fs")
    assert snap.has_layer(A) and not snap.has_layer(B)
    with open(os.path.join(path, "etc/hostname")) as f:
        assert f.read() == "box\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    link = os.path.join(snap.root, "l", snap.short_id(A))
    assert os.readlink(link) == "../layers/" + "a" * 64 + "/fs"
    assert os.path.samefile(link, path)
    assert snap.list_layers() == [A]
    assert os.listdir(os.path.join(snap.root, "tmp")) == []


def test_add_layer_existing_does_not_call_fill(snap: OverlaySnapshotter) -> None:
    snap.add_layer(A, fill_with({"x": "1"}))
    calls: list[str] = []
    assert snap.add_layer(A, calls.append) == snap.layer_dir(A)
    assert calls == []


def test_failed_fill_leaves_nothing(snap: OverlaySnapshotter) -> None:
    class Boom(Exception):
        pass

    def fill(d: str) -> None:
        os.makedirs(os.path.join(d, "usr/lib"))
        write(os.path.join(d, "usr/lib/half"), "x" * 10000)
        overlay_whiteout(d, "gone")
        raise Boom("tar ended early")

    with pytest.raises(Boom, match="tar ended early"):
        snap.add_layer(A, fill)
    assert not snap.has_layer(A)
    for sub in ("layers", "l", "tmp", "active"):
        assert os.listdir(os.path.join(snap.root, sub)) == [], sub


def test_concurrent_add_layer_one_wins(snap: OverlaySnapshotter, tmp_path: os.PathLike[str]) -> None:
    """Two processes fill the same layer at the same time: one rename wins, the other copy goes."""
    rendezvous = os.path.join(str(tmp_path), "rendezvous")
    os.mkdir(rendezvous)
    pids = []
    for who in ("first", "second"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:

                def fill(d: str, who: str = who) -> None:
                    write(os.path.join(d, "who"), who)
                    write(os.path.join(rendezvous, who), "")
                    deadline = time.monotonic() + 20
                    while len(os.listdir(rendezvous)) < 2 and time.monotonic() < deadline:
                        time.sleep(0.01)

                path = OverlaySnapshotter(snap.root).add_layer(A, fill)
                code = 0 if path == snap.layer_dir(A) else 2
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert sorted(os.listdir(rendezvous)) == ["first", "second"]  # both really filled
    assert os.listdir(os.path.join(snap.root, "layers")) == ["a" * 64]
    assert os.listdir(os.path.join(snap.root, "tmp")) == []
    assert os.listdir(os.path.join(snap.root, "l")) == [snap.short_id(A)]
    with open(os.path.join(snap.layer_dir(A), "who")) as f:
        assert f.read() in ("first", "second")
    assert sorted(os.listdir(snap.layer_dir(A))) == ["who"]


def test_remove_layer_refused_while_used(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([A, B])
    for c in ids:
        snap.add_layer(c, fill_with({c[7:15]: "x"}))
    snap.prepare("user1", ids)
    snap.prepare("user2", ids[:1], readonly=True)
    with pytest.raises(SnapshotError, match=r"in use by active snapshot.*user1.*user2"):
        snap.remove_layer(ids[0])
    with pytest.raises(SnapshotError, match="user1"):
        snap.remove_layer(ids[1])
    snap.remove("user1")
    snap.remove_layer(ids[1])
    assert not snap.has_layer(ids[1])
    assert not os.path.lexists(os.path.join(snap.root, "l", snap.short_id(ids[1])))
    with pytest.raises(SnapshotError, match="user2"):
        snap.remove_layer(ids[0])
    snap.remove("user2")
    snap.remove_layer(ids[0])
    snap.remove_layer(ids[0])  # idempotent
    assert snap.list_layers() == []
    assert os.listdir(os.path.join(snap.root, "tmp")) == []


def test_gc_layers(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([A, B, C])
    for c in ids:
        snap.add_layer(c, fill_with({"f": c}))
    snap.prepare("uses-0", ids[:1])
    # A leftover of a process that died while filling a layer.
    stale = os.path.join(snap.root, "tmp", "999999999-layer-abc")
    os.makedirs(os.path.join(stale, "fs"))
    assert snap.gc_layers(keep=[ids[2]]) == [ids[1]]
    assert snap.list_layers() == sorted([ids[0], ids[2]])
    assert not os.path.exists(stale)
    assert sorted(os.listdir(os.path.join(snap.root, "l"))) == sorted(
        snap.short_id(c) for c in (ids[0], ids[2])
    )
    snap.remove("uses-0")
    assert snap.gc_layers(keep=[]) == sorted([ids[0], ids[2]])
    assert os.listdir(os.path.join(snap.root, "layers")) == []


# --- snapshots ---------------------------------------------------------------------------------
def test_prepare_layout_record_and_options(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([A, B, C])
    for c in ids:
        snap.add_layer(c, fill_with({"f": c}))
    s = snap.prepare("ctr-1", ids)
    active = os.path.join(snap.root, "active", "ctr-1")
    assert sorted(os.listdir(active)) == ["merged", "snapshot.json", "upper", "work"]
    with open(os.path.join(active, "snapshot.json")) as f:
        record = json.load(f)
    assert record["parents"] == ids and record["readonly"] is False and record["key"] == "ctr-1"
    assert s.path == os.path.join(active, "merged") and s.upper == snap.upper_dir("ctr-1")
    fstype, source, options = s.mount_source_options()
    assert (fstype, source, s.kind, s.mount_cwd) == ("overlay", "overlay", "overlay", None)
    opts = options.split(",")
    lowers = next(o for o in opts if o.startswith("lowerdir="))[len("lowerdir=") :].split(":")
    assert lowers == [snap.layer_dir(c) for c in reversed(ids)]  # top layer first
    assert f"upperdir={active}/upper" in opts and f"workdir={active}/work" in opts
    assert "index=off" in opts and "redirect_dir=off" in opts and "metacopy=off" in opts
    assert "userxattr" not in opts  # not in a user namespace here
    assert snap.snapshot("ctr-1") == s
    assert snap.list_active() == ["ctr-1"]


def test_prepare_kinds(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([A, B])
    for c in ids:
        snap.add_layer(c, fill_with({"f": c}))
    plain = snap.prepare("plain", [])
    assert plain.mount_source_options() == ("bind", plain.upper, "rbind,rw")
    view1 = snap.prepare("view1", ids[:1], readonly=True)
    assert view1.mount_source_options() == ("bind", snap.layer_dir(ids[0]), "rbind,ro")
    view2 = snap.prepare("view2", ids, readonly=True)
    assert view2.kind == "overlay" and "upperdir=" not in view2.options and "workdir=" not in view2.options
    rw1 = snap.prepare("rw1", ids[:1])
    assert rw1.kind == "overlay" and f"lowerdir={snap.layer_dir(ids[0])}," in rw1.options


def test_long_lowerdir_uses_short_relative_links(snap: OverlaySnapshotter) -> None:
    ids = chain_ids([digest(i) for i in range(60)])
    for c in ids:
        snap.add_layer(c, fill_with({}))
    s = snap.prepare("deep", ids)
    assert s.mount_cwd == snap.root
    assert len(s.options) < 4096
    opts = s.options.split(",")
    lowers = opts[0][len("lowerdir=") :].split(":")
    assert lowers == [f"l/{snap.short_id(c)}" for c in reversed(ids)]
    for rel, c in zip(lowers, reversed(ids), strict=True):
        assert os.path.samefile(os.path.join(snap.root, rel), snap.layer_dir(c))
    assert "upperdir=active/deep/upper" in opts and "workdir=active/deep/work" in opts


def test_prepare_errors(snap: OverlaySnapshotter) -> None:
    snap.add_layer(A, fill_with({}))
    with pytest.raises(SnapshotError, match="missing layer"):
        snap.prepare("k", [A, B])
    with pytest.raises(SnapshotError, match="twice"):
        snap.prepare("k", [A, A])
    with pytest.raises(SnapshotError, match="invalid snapshot key"):
        snap.prepare("../escape", [A])
    with pytest.raises(SnapshotError, match="invalid parent chain id"):
        snap.prepare("k", ["latest"])
    snap.prepare("k", [A])
    with pytest.raises(SnapshotError, match="already exists"):
        snap.prepare("k", [A])
    with pytest.raises(SnapshotError, match="no active snapshot"):
        snap.upper_dir("nope")
    with pytest.raises(SnapshotError, match="no active snapshot"):
        snap.mount("nope")
    assert snap.list_active() == ["k"]
    assert os.listdir(os.path.join(snap.root, "tmp")) == []


def test_remove_is_idempotent_and_usage(snap: OverlaySnapshotter) -> None:
    snap.prepare("k", [])
    empty = snap.usage("k")
    write(os.path.join(snap.upper_dir("k"), "big"), "x" * 100_000)
    os.link(os.path.join(snap.upper_dir("k"), "big"), os.path.join(snap.upper_dir("k"), "again"))
    used = snap.usage("k")
    assert 100_000 <= used - empty < 200_000  # the hard link counts once
    snap.remove("k")
    snap.remove("k")
    snap.unmount("k")
    assert snap.list_active() == []
    assert os.listdir(os.path.join(snap.root, "active")) == []
    assert os.listdir(os.path.join(snap.root, "tmp")) == []


# --- overlay-format helpers ----------------------------------------------------------------------
def test_overlay_whiteout(tmp_path: os.PathLike[str]) -> None:
    d = str(tmp_path)
    overlay_whiteout(d, "gone")
    st = os.lstat(os.path.join(d, "gone"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and is_whiteout(st)
    write(os.path.join(d, "file"), "x")
    overlay_whiteout(d, "file")  # replaces a file of that name
    assert is_whiteout(os.lstat(os.path.join(d, "file")))
    os.mkdir(os.path.join(d, "sub"))
    fd = os.open(os.path.join(d, "sub"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        overlay_whiteout(fd, "by-fd")
    finally:
        os.close(fd)
    assert is_whiteout(os.lstat(os.path.join(d, "sub", "by-fd")))
    with pytest.raises(SnapshotError, match="directory"):
        overlay_whiteout(d, "sub")
    for bad in ("", "..", "a/b"):
        with pytest.raises(SnapshotError, match="invalid whiteout name"):
            overlay_whiteout(d, bad)
    assert not is_whiteout(os.lstat(os.path.join(d, "sub")))


def test_overlay_opaque(tmp_path: os.PathLike[str]) -> None:
    d = os.path.join(str(tmp_path), "dir")
    os.mkdir(d)
    assert not is_opaque(d)
    overlay_opaque(d)
    assert os.getxattr(d, "trusted.overlay.opaque") == b"y"
    assert is_opaque(d)
    write(os.path.join(str(tmp_path), "f"), "")
    with pytest.raises(SnapshotError, match="not a directory"):
        overlay_opaque(os.path.join(str(tmp_path), "f"))
    with pytest.raises(SnapshotError, match="No such file"):
        overlay_opaque(os.path.join(str(tmp_path), "missing"))


def test_feature_options() -> None:
    from cocon.snapshots.probe import escape_option_path, overlay_feature_options

    assert overlay_feature_options(False) == ("index=off", "redirect_dir=off", "metacopy=off")
    assert overlay_feature_options(True)[-1] == "userxattr"  # only asked for inside a user namespace
    assert escape_option_path("/a,b:c\\d") == "/a\\,b\\:c\\\\d"


def test_corrupt_record_stops_layer_deletion(snap: OverlaySnapshotter) -> None:
    snap.add_layer(A, fill_with({}))
    snap.prepare("broken", [A])
    write(os.path.join(snap.root, "active", "broken", "snapshot.json"), "{not json")
    with pytest.raises(SnapshotError, match="corrupt"):
        snap.gc_layers(keep=[])
    with pytest.raises(SnapshotError, match="corrupt"):
        snap.remove_layer(A)
    assert snap.has_layer(A)
    snap.remove("broken")  # removing the snapshot itself still works
    assert snap.gc_layers(keep=[]) == [A]


# --- the pieces written by hand (no base64, re, shutil or tempfile at import) -----------------------
def test_short_ids_are_base32_of_the_digest() -> None:
    import base64

    for n in range(200):
        chain = digest(n)
        want = base64.b32encode(bytes.fromhex(chain[7:])).decode()[:20]
        assert OverlaySnapshotter.short_id(chain) == want
    assert OverlaySnapshotter.short_id("sha512:" + "f" * 128) == "7" * 20


@pytest.mark.parametrize("key", ["a", "Z9", "c_1.2+x-y", "k" * 128, "0" + "-" * 127])
def test_valid_snapshot_keys(key: str) -> None:
    from cocon.snapshots.overlay import validate_key

    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["", "-a", ".a", "_a", "a/b", "..", "a b", "é", "k" * 129, "a\n", 5])
def test_invalid_snapshot_keys(key: str) -> None:
    from cocon.snapshots.overlay import validate_key

    with pytest.raises(SnapshotError, match="invalid snapshot key"):
        validate_key(key)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value, ok",
    [("sha256:" + "a" * 64, True), ("sha512:" + "0" * 128, True), ("sha256:" + "A" * 64, False),
     ("sha256:" + "a" * 63, False), ("sha512:" + "a" * 64, False), ("md5:" + "a" * 32, False),
     ("sha256:" + "a" * 63 + "\n", False), ("sha256" + "a" * 65, False), (None, False)],
)  # fmt: skip
def test_digests_are_canonical(value: str, ok: bool) -> None:
    from cocon.snapshots.chain import is_digest, validate_digest

    assert is_digest(value) is ok
    if not ok:
        with pytest.raises(SnapshotError, match="invalid digest"):
            validate_digest(value)


def test_remove_tree_goes_deeper_than_recursion_and_never_follows_links(tmp_path: os.PathLike[str]) -> None:
    import sys

    from cocon.snapshots.overlay import remove_tree

    outside = os.path.join(str(tmp_path), "outside")
    os.mkdir(outside)
    write(os.path.join(outside, "keep"), "x")
    top = path = os.path.join(str(tmp_path), "tree")
    os.mkdir(top)
    for _ in range(sys.getrecursionlimit() + 50):
        path = os.path.join(path, "d")
        os.mkdir(path)
    write(os.path.join(path, "deep"), "x")
    os.symlink(outside, os.path.join(top, "link"))
    os.symlink(os.path.join(outside, "keep"), os.path.join(path, "file-link"))
    os.mkfifo(os.path.join(top, "fifo"))
    remove_tree(top)
    assert not os.path.lexists(top) and os.listdir(outside) == ["keep"]
    remove_tree(top)  # a missing path is not an error
    write(os.path.join(str(tmp_path), "plain"), "x")
    remove_tree(os.path.join(str(tmp_path), "plain"))  # nor a file
    assert sorted(os.listdir(str(tmp_path))) == ["outside"]


def test_mountinfo_escapes(tmp_path: os.PathLike[str]) -> None:
    from cocon import _mountinfo as mounts

    for path in ["/a b", "/tab\there", "/new\nline", "/back\\slash", "/back\\134literal", "/é"]:
        escaped = mounts._escape(path)
        assert b" " not in escaped and b"\t" not in escaped and b"\n" not in escaped
        assert mounts._unescape(escaped) == path
    assert mounts._unescape(b"/a\\040b\\") == "/a b\\"  # a trailing backslash stays
    assert mounts.is_mountpoint("/proc") and not mounts.is_mountpoint(str(tmp_path))
    assert "/proc" in mounts.mounts_under("/proc")[-1:]
    assert mounts.mounts_under(os.path.join(str(tmp_path), "nothing-here")) == []


def test_the_package_loads_its_parts_on_use() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, cocon.snapshots as s\n"
        "assert 'cocon.snapshots.overlay' not in sys.modules\n"
        "assert s.chain_ids([]) == [] and 'cocon.snapshots.overlay' not in sys.modules\n"
        "assert s.OverlaySnapshotter.__module__ == 'cocon.snapshots.overlay'\n"
        "try:\n    s.nothing\nexcept AttributeError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "has no attribute 'nothing'" in out
