"""Base images made on this machine: busybox from busybox-static, debian:bookworm from debootstrap,
unpacked into real overlay snapshots and run in real containers; and debootstrap failures cleaned up
(leftover mounts, symlinks out of the work directory, interrupted runs).

debian:bookworm comes from the `debian_image` session fixture (tests/integration/conftest.py): it is
bootstrapped once, offline, from the package tarball `make test`'s set-up downloads. Every test here
stays on this machine (failing mirrors are on 127.0.0.1).
"""

from __future__ import annotations

import calendar
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cocon import _linux as linux
from cocon._mountinfo import mounts_under as mounts_below
from cocon.images import bootstrap as bootstrap_mod
from cocon.images.bootstrap import STAGES, bootstrap, bootstrap_busybox, bootstrap_debian
from cocon.images.errors import ImageError
from cocon.images.store import Image, ImageStore
from cocon.oci.image_spec import host_platform
from cocon.oci.runtime_spec import encode_config
from cocon.runtime.container import Runtime
from cocon.runtime.defaults import default_spec
from cocon.snapshots import OverlaySnapshotter
from cocon.snapshots.unpack import unpack_image
from runtime_helpers import TEST_CGROUP_PARENT, leftover_cgroup_dirs

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEAD_MIRROR = "http://127.0.0.1:9/debian"  # loopback, nothing listens: fails at once


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path: os.PathLike[str]) -> Iterator[None]:
    yield
    left = mounts_below(str(tmp_path))
    for mp in left:
        try:
            linux.umount2(mp, linux.MNT_DETACH)
        except OSError:
            pass
    assert left == [], f"mounts left under {tmp_path}: {left}"


@pytest.fixture
def store(tmp_path: os.PathLike[str]) -> Iterator[ImageStore]:
    s = ImageStore(os.path.join(str(tmp_path), "images"))
    yield s
    s.close()


@pytest.fixture
def snapshotter(tmp_path: os.PathLike[str]) -> Iterator[OverlaySnapshotter]:
    s = OverlaySnapshotter(os.path.join(str(tmp_path), "snapshots"))
    yield s
    for key in s.list_active():
        s.remove(key)


def work_dirs(store: ImageStore) -> list[str]:
    path = os.path.join(store.root, "tmp")
    return os.listdir(path) if os.path.isdir(path) else []


def mounted_rootfs(snapshotter: OverlaySnapshotter, store: ImageStore, image: Image, key: str) -> str:
    chains = unpack_image(snapshotter, store.content, image)
    snapshotter.prepare(key, chains)
    return snapshotter.mount(key)


# --- busybox ---------------------------------------------------------------------------------------------


def test_busybox_image_unpacks_to_a_working_rootfs(
    store: ImageStore, snapshotter: OverlaySnapshotter, tmp_path: os.PathLike[str]
) -> None:
    events: list[tuple[str, int, int]] = []
    image = bootstrap(store, "busybox", progress=lambda *e: events.append(e))

    assert image.names == ("docker.io/library/busybox:latest",)
    assert store.resolve("busybox").id == image.id
    cfg = image.config
    assert cfg.config is not None
    assert cfg.config.cmd == ["sh"]
    assert cfg.config.env == [PATH_ENV]
    platform = host_platform()
    assert (cfg.os, cfg.architecture) == (platform.os, platform.architecture)
    busybox = "/bin/busybox" if os.path.isfile("/bin/busybox") else "/usr/bin/busybox"
    mtime = int(os.stat(busybox).st_mtime)
    assert cfg.created == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    assert cfg.history is not None and len(cfg.history) == 1
    assert cfg.history[0].created_by is not None
    assert cfg.history[0].created_by.startswith("cocon image bootstrap busybox (busybox 1.")
    assert len(image.manifest.layers) == 1 and len(image.diff_ids) == 1
    assert [e[0] for e in events] == ["rootfs", "rootfs", "layer", "layer", "commit", "commit"]
    assert set(STAGES) >= {e[0] for e in events}

    merged = mounted_rootfs(snapshotter, store, image, "bb")
    sh = os.path.join(merged, "bin/sh")
    assert os.path.lexists(sh) and os.readlink(sh) == "/bin/busybox"
    st = os.stat(os.path.join(merged, "bin/busybox"))
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o111
    with open(os.path.join(merged, "etc/passwd")) as f:
        assert f.readline() == "root:x:0:0:root:/root:/bin/sh\n"
    assert stat.S_IMODE(os.stat(os.path.join(merged, "tmp")).st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(os.path.join(merged, "etc/shadow")).st_mode) == 0o600
    www = os.stat(os.path.join(merged, "var/www"))
    assert (www.st_uid, www.st_gid) == (33, 33)
    # every time in the layer is clamped to the binary's mtime
    assert os.lstat(sh).st_mtime == mtime
    # and the shell works from there
    out = subprocess.run(["chroot", merged, "/bin/sh", "-c", "echo hello from $0; id -u"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hello", "from", "/bin/sh", "0"]

    again = bootstrap_busybox(store, "busybox:again")
    assert again.id == image.id, "bootstrapping busybox twice gave two different images"
    assert store.resolve("busybox:latest").id == image.id
    assert work_dirs(store) == []


# --- debian ----------------------------------------------------------------------------------------------


def test_debian_image_has_the_right_config(debian_image: Any) -> None:
    image = debian_image.image
    assert image.names == ("docker.io/library/debian:bookworm",)
    cfg = image.config
    assert cfg.config is not None and cfg.config.cmd == ["bash"] and cfg.config.env == [PATH_ENV]
    assert cfg.history is not None and cfg.history[0].created_by is not None
    assert "debootstrap --variant=minbase bookworm" in cfg.history[0].created_by
    assert "Debian 12." in cfg.history[0].created_by
    assert [d.media_type for d in image.manifest.layers] == ["application/vnd.oci.image.layer.v1.tar+zstd"]
    assert 20_000_000 < image.size < 80_000_000, image.size
    # progress went through debootstrap's stages in order, ending complete
    stages = [e[0] for e in debian_image.events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["extract", "install", "configure", "clean", "layer", "commit"]  # from the tarball
    last = {e[0]: e for e in debian_image.events}
    packages = last["extract"][2]
    assert 60 < packages < 200
    for stage in ("extract", "install", "configure"):
        assert last[stage][1:] == (packages, packages), last[stage]
    log = os.path.join(debian_image.store.root, "logs", "bootstrap-debian-bookworm.log")
    with open(log) as f:
        assert "Base system installed successfully" in f.read()


def test_debian_rootfs_contents_and_cleaning(debian_image: Any, snapshotter: OverlaySnapshotter) -> None:
    merged = mounted_rootfs(snapshotter, debian_image.store, debian_image.image, "deb-files")
    assert os.access(os.path.join(merged, "usr/bin/apt-get"), os.X_OK)
    with open(os.path.join(merged, "etc/debian_version")) as f:
        assert f.read().startswith("12")
    assert os.readlink(os.path.join(merged, "bin")) == "usr/bin"  # merged /usr
    # cleaned like Debian's official images
    assert sorted(os.listdir(os.path.join(merged, "var/lib/apt/lists"))) == ["partial"]
    assert [n for n in os.listdir(os.path.join(merged, "var/cache/apt/archives")) if n.endswith(".deb")] == []
    assert os.listdir(os.path.join(merged, "dev")) == []
    for gone in ("etc/resolv.conf", "etc/hostname", "var/log/dpkg.log", "var/cache/ldconfig/aux-cache"):
        assert not os.path.lexists(os.path.join(merged, gone)), gone
    for name in os.listdir(os.path.join(merged, "var/log")):
        path = os.path.join(merged, "var/log", name)
        if os.path.isfile(path):
            assert os.path.getsize(path) == 0, name
    # no time in the layer is later than the image's `created`
    created = debian_image.image.config.created
    assert created is not None
    epoch = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    newest = max(
        os.lstat(os.path.join(d, n)).st_mtime for d, dirs, files in os.walk(os.path.join(merged, "etc"))
        for n in dirs + files
    )  # fmt: skip
    assert newest <= epoch


def test_debian_image_runs_in_a_container(
    debian_image: Any,
    snapshotter: OverlaySnapshotter,
    tmp_path: os.PathLike[str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    merged = mounted_rootfs(snapshotter, debian_image.store, debian_image.image, "deb-run")
    cid = f"boot-{uuid.uuid4().hex[:10]}"
    bundle = os.path.join(str(tmp_path), "bundle")
    os.mkdir(bundle)
    spec = default_spec(args=["/bin/sh", "-c", "cat /etc/debian_version; id -u"], terminal=False)
    assert spec.root is not None and spec.linux is not None
    spec.root.path = merged
    spec.linux.cgroups_path = f"{TEST_CGROUP_PARENT}/{cid}"
    with open(os.path.join(bundle, "config.json"), "wb") as f:
        f.write(encode_config(spec))
    runtime = Runtime(root=os.path.join(str(tmp_path), "state"))
    try:
        capfd.readouterr()
        status = runtime.run(cid, bundle)  # in the foreground: the container writes to our stdout
        out = capfd.readouterr().out
    finally:
        runtime.delete(cid, force=True)
        linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)  # run() made this process a subreaper
    assert status == 0, out
    version, uid = out.split()
    assert version.startswith("12.") and uid == "0"
    assert runtime.list_states() == []
    assert leftover_cgroup_dirs(spec.linux.cgroups_path) == []


# --- failures: nothing left behind ------------------------------------------------------------------------


def test_unreachable_mirror_fails_with_the_log(store: ImageStore) -> None:
    with pytest.raises(ImageError) as err:
        bootstrap_debian(store, "debian:dead", mirror=DEAD_MIRROR)
    message = str(err.value)
    log = os.path.join(store.root, "logs", "bootstrap-debian-bookworm.log")
    assert "debootstrap failed (exit status 1)" in message
    assert f"The full log is {log}" in message
    assert "127.0.0.1:9" in message  # debootstrap's own error line, from the log's tail
    assert "--mirror" in message
    with open(log) as f:
        assert DEAD_MIRROR in f.readline()
    assert work_dirs(store) == []
    assert not store.exists("debian:dead")


FAKE_FAILING = """\
#!/bin/sh
# A stand-in for debootstrap that fails the way a second stage can: with mounts left in the target
# (proc, and /dev bind-mounted from the host as debootstrap does in LXC), and symlinks pointing out.
eval "target=\\${{$(($# - 1))}}"   # the target is the second-to-last argument
mkdir -p "$target/proc" "$target/debootstrap" "$target/dev"
echo "I: Retrieving InRelease "
echo "I: Validating base-files 12.4"
echo "I: Extracting base-files..."
mount -t tmpfs fake-proc "$target/proc"
mkdir "$target/proc/sub"
mount -t tmpfs fake-sub "$target/proc/sub"
echo data > "$target/proc/sub/file"
mount --bind "{outside}" "$target/dev"
ln -s "{outside}" "$target/escape"
ln -s "{outside}/keep" "$target/keep-link"
echo "dpkg: error processing package base-files (--configure)" > "$target/debootstrap/debootstrap.log"
echo "W: Failure trying to run: chroot $target dpkg --configure base-files" >&2
exit 1
"""


def test_failed_debootstrap_leaves_no_mounts_and_nothing_outside_is_touched(
    store: ImageStore, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = os.path.join(str(tmp_path), "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "keep"), "w") as f:
        f.write("precious\n")
    fake = os.path.join(str(tmp_path), "fake-debootstrap")
    with open(fake, "w") as f:
        f.write(FAKE_FAILING.format(outside=outside))
    os.chmod(fake, 0o755)
    monkeypatch.setattr(bootstrap_mod, "DEBOOTSTRAP", fake)
    events: list[tuple[str, int, int]] = []

    with pytest.raises(ImageError) as err:
        bootstrap_debian(store, mirror=DEAD_MIRROR, progress=lambda *e: events.append(e))

    message = str(err.value)
    assert "while extracting packages" in message
    assert "W: Failure trying to run: chroot" in message
    assert "dpkg: error processing package base-files" in message  # debootstrap.log, saved from the target
    assert ("download", 1, 0) in events and ("extract", 1, 1) in events
    assert mounts_below(store.root) == []
    assert work_dirs(store) == []
    assert os.listdir(outside) == ["keep"]
    with open(os.path.join(outside, "keep")) as f:
        assert f.read() == "precious\n"


FAKE_SLOW = """\
#!/bin/sh
echo $$ > "{pidfile}"
echo "I: Retrieving InRelease "
exec sleep 120
"""


def test_interrupted_bootstrap_stops_debootstrap_and_cleans_up(
    store: ImageStore, tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = os.path.join(str(tmp_path), "pid")
    fake = os.path.join(str(tmp_path), "fake-debootstrap")
    with open(fake, "w") as f:
        f.write(FAKE_SLOW.format(pidfile=pidfile))
    os.chmod(fake, 0o755)
    monkeypatch.setattr(bootstrap_mod, "DEBOOTSTRAP", fake)

    class Cancelled(Exception):
        pass

    def cancel(stage: str, done: int, total: int) -> None:
        raise Cancelled

    started = time.monotonic()
    with pytest.raises(Cancelled):
        bootstrap_debian(store, mirror=DEAD_MIRROR, progress=cancel)
    assert time.monotonic() - started < 15
    with open(pidfile) as f:
        pid = int(f.read())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert work_dirs(store) == []
    log = os.path.join(store.root, "logs", "bootstrap-debian-bookworm.log")
    with open(log) as f:
        assert "interrupted" in f.read()
