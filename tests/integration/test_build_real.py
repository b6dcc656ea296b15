"""`cocon build` for real: Containerfiles built on busybox (and debian:bookworm) with real overlay
snapshots, real RUN containers and the real build cache.

Each test gets its own image store, snapshotter and build state under tmp_path. The busybox image is
bootstrapped once per session and its blobs are copied into each test's store. Results are checked
the way a user would: the image's config and history, and its root file system unpacked from the
layer blobs into a separate snapshotter and mounted. After every test nothing may be left: no mount
under tmp_path, no active snapshot, no runtime state, bundle or scratch directory, no cgroup.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import signal
import stat
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import zstandard

from cocon import _linux as linux
from cocon.engine.build import (
    Builder,
    BuildEvent,
    BuildResult,
    StepCached,
    StepDone,
    StepFailed,
    StepOutput,
    StepStarted,
    print_events,
)
from cocon.images.bootstrap import bootstrap_busybox
from cocon.images.build_errors import BuildError, ContainerfileError
from cocon.images.store import Image, ImageNotFound, ImageStore
from cocon.snapshots import OverlaySnapshotter
from cocon.snapshots.unpack import unpack_image
from runtime_helpers import TEST_CGROUP_PARENT, leftover_cgroup_dirs

# --- fixtures ------------------------------------------------------------------------------------------


def mount_points_under(path: str) -> list[str]:
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


@pytest.fixture(scope="session")
def busybox_seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    store = ImageStore(str(tmp_path_factory.mktemp("busybox-seed") / "images"))
    bootstrap_busybox(store)
    yield store
    store.close()


def copy_image(src: ImageStore, image: Image, dst: ImageStore, name: str) -> Image:
    for desc in [image.manifest.config, *image.manifest.layers]:
        dst.content.put_file(src.content.path(desc.digest), expected=desc.digest)
    dst.content.put_file(src.content.path(image.manifest_digest), expected=image.manifest_digest)
    return dst.add_manifest(image.manifest_digest, names=[name])


@dataclass
class Env:
    root: str
    store: ImageStore
    snapshotter: OverlaySnapshotter
    builder: Builder
    events: list[BuildEvent] = field(default_factory=list)

    def context(self, files: dict[str, str | bytes], name: str = "ctx") -> str:
        ctx = os.path.join(self.root, name)
        os.makedirs(ctx, exist_ok=True)
        for rel, content in files.items():
            path = os.path.join(ctx, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        return ctx

    def build(self, ctx: str, **kw: Any) -> BuildResult:
        self.events.clear()
        kw.setdefault("on_event", self.events.append)
        return self.builder.build(ctx, **kw)

    def output(self) -> str:
        return b"".join(e.data for e in self.events if isinstance(e, StepOutput)).decode()

    def cached_steps(self) -> list[int]:
        return [e.step for e in self.events if isinstance(e, StepCached)]

    @contextmanager
    def rootfs(self, ref: str) -> Iterator[str]:
        """The image's root file system, unpacked from its layer blobs into a snapshotter of its own
        (so that what is checked is what the image holds), mounted read-only."""
        check = OverlaySnapshotter(os.path.join(self.root, "check-snapshots"))
        image = self.store.resolve(ref)
        chains = unpack_image(check, self.store.content, image)
        key = f"check-{uuid.uuid4().hex[:8]}"
        check.prepare(key, chains, readonly=True)
        try:
            yield check.mount(key)
        finally:
            check.remove(key)


@pytest.fixture
def env(tmp_path: os.PathLike[str], busybox_seed: ImageStore) -> Iterator[Env]:
    root = str(tmp_path)
    store = ImageStore(os.path.join(root, "images"))
    copy_image(busybox_seed, busybox_seed.resolve("busybox"), store, "busybox:latest")
    snapshotter = OverlaySnapshotter(os.path.join(root, "snapshots"))
    builder = Builder(
        store, snapshotter, state_dir=os.path.join(root, "build"), cgroup_parent=TEST_CGROUP_PARENT
    )
    e = Env(root, store, snapshotter, builder)
    try:
        yield e
        # nothing of any step may be left behind, whatever the test did
        assert snapshotter.list_active() == []
        for sub in ("runtime", "bundles", "tmp", "steps"):
            left = [n for n in os.listdir(os.path.join(root, "build", sub)) if not n.startswith(".")]
            assert left == [], f"build/{sub} has leftovers: {left}"
        assert leftover_cgroup_dirs(TEST_CGROUP_PARENT + "/build-*") == []
    finally:
        for key in snapshotter.list_active():
            snapshotter.remove(key)
        builder.close()
        store.close()


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


# --- a complete build ----------------------------------------------------------------------------------


def test_multi_stage_build_copies_from_a_stage_and_an_image(env: Env) -> None:
    ctx = env.context(
        {
            "src/tool.sh": "#!/bin/sh\necho tool says $1\n",
            "Containerfile": """\
FROM busybox AS build
WORKDIR /work
COPY src/tool.sh ./
RUN mkdir -p /out/bin && cp tool.sh /out/bin/tool && chmod 755 /out/bin/tool && echo built > /out/stamp

FROM scratch AS empty

FROM busybox
COPY --from=build /out/bin/tool /usr/local/bin/
COPY --from=build /out/stamp /opt/stamp
COPY --from=busybox /etc/passwd /opt/passwd.copy
RUN /usr/local/bin/tool hello > /opt/result
""",
        }
    )
    result = env.build(ctx, tags=["app:1", "app:latest"])
    assert [s.name for s in result.stages] == ["build", "stage-2"]  # the unused scratch stage is skipped
    image = env.store.resolve("app:1")
    assert image.id == result.image_id == env.store.resolve("app:latest").id
    assert result.names == ("docker.io/library/app:1", "docker.io/library/app:latest")
    # intermediate stages are cache entries, not images
    assert sorted(n for i in env.store.list() for n in i.repo_tags) == [
        "app:1",
        "app:latest",
        "busybox:latest",
    ]
    assert len(env.store.list()) == 2
    with env.rootfs("app:1") as rootfs:
        assert read(f"{rootfs}/opt/result") == "tool says hello\n"
        assert read(f"{rootfs}/opt/stamp") == "built\n"
        assert read(f"{rootfs}/opt/passwd.copy").startswith("root:x:0:0:")
        st = os.lstat(f"{rootfs}/usr/local/bin/tool")
        assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
        assert not os.path.exists(f"{rootfs}/work")  # only in the build stage
    starts = [e for e in env.events if isinstance(e, StepStarted)]
    assert [e.text for e in starts][:2] == ["STEP 1/9: FROM busybox AS build", "STEP 2/9: WORKDIR /work"]
    assert starts[-1].text == "STEP 9/9: RUN /usr/local/bin/tool hello > /opt/result"
    assert {e.stages for e in starts} == {2}


def test_run_writes_files_and_sees_env_arg_workdir_user(env: Env) -> None:
    ctx = env.context(
        {
            "Containerfile": """\
FROM busybox
ARG VERSION=1.0
ARG UNUSED_DEFAULT=x
ENV APP_HOME=/srv/app GREETING="hello world"
RUN echo "app:x:1000:1000:app:/home/app:/bin/sh" >> /etc/passwd && echo "app:x:1000:" >> /etc/group
USER app
WORKDIR $APP_HOME
RUN echo "v=$VERSION g=$GREETING pwd=$(pwd) uid=$(id -u) gid=$(id -g) home=$HOME proxy=$HTTP_PROXY host=$(hostname)" \\
    && echo "$VERSION" > version.txt
USER root
SHELL ["/bin/sh", "-ec"]
LABEL org.example.version=$VERSION "other label"=yes
EXPOSE 8080 53/udp
VOLUME /data
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --retries=2 CMD wget -q -O- http://localhost/ || exit 1
ONBUILD RUN echo child
ENTRYPOINT ["/bin/echo"]
CMD exec form is not used here
""",
        }
    )
    result = env.build(
        ctx, tags=["cfg"], build_args={"VERSION": "2.5", "HTTP_PROXY": "http://proxy.invalid:3128"}
    )
    out = env.output()
    line = next(line for line in out.splitlines() if line.startswith("v="))
    assert line.startswith("v=2.5 g=hello world pwd=/srv/app uid=1000 gid=1000 home=/home/app ")
    assert "proxy=http://proxy.invalid:3128" in line
    host = line.rsplit("host=", 1)[1]
    assert host.startswith("build-")  # the step's container id
    config = env.store.resolve("cfg").config
    cc = config.config
    assert cc is not None
    assert cc.env == [
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "APP_HOME=/srv/app",
        "GREETING=hello world",
    ]  # ARGs and the proxy build arg are not part of the image
    assert cc.working_dir == "/srv/app"
    assert cc.user == "root"
    assert cc.shell == ["/bin/sh", "-ec"]
    assert cc.labels == {"org.example.version": "2.5", "other label": "yes"}
    assert cc.exposed_ports == {"8080/tcp": {}, "53/udp": {}}
    assert cc.volumes == {"/data": {}}
    assert cc.stop_signal == "SIGINT"
    assert cc.healthcheck is not None
    assert cc.healthcheck.test == ["CMD-SHELL", "wget -q -O- http://localhost/ || exit 1"]
    assert cc.healthcheck.interval == 30_000_000_000 and cc.healthcheck.retries == 2
    assert cc.on_build == ["RUN echo child"]
    assert cc.entrypoint == ["/bin/echo"]
    assert cc.cmd == ["/bin/sh", "-ec", "exec form is not used here"]  # shell form through SHELL
    history = [(h.created_by, h.empty_layer) for h in config.history or []][1:]  # [0]: busybox
    assert ("ENV APP_HOME=/srv/app GREETING=hello world", True) in history
    assert ("WORKDIR /srv/app", False) in history  # the directory was created
    run = [h for h, _ in history if h.startswith('RUN |2 VERSION=2.5 UNUSED_DEFAULT=x /bin/sh -c echo "v=')]
    assert len(run) == 1 and "proxy.invalid" not in run[0]
    assert config.created is not None and config.created == (config.history or [])[-1].created
    assert all(h.comment == "cocon build" for h in (config.history or [])[1:])
    assert len(config.rootfs.diff_ids) == 1 + sum(1 for _, empty in history if not empty)
    with env.rootfs("cfg") as rootfs:
        assert read(f"{rootfs}/srv/app/version.txt") == "2.5\n"
        st = os.stat(f"{rootfs}/srv/app")  # WORKDIR after USER: made for that user (BuildKit)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o755)
        st = os.stat(f"{rootfs}/srv/app/version.txt")
        assert (st.st_uid, st.st_gid) == (1000, 1000)
        assert read(f"{rootfs}/etc/passwd").endswith("app:x:1000:1000:app:/home/app:/bin/sh\n")
    assert result.warnings == ()


def test_onbuild_triggers_run_in_the_child_build(env: Env) -> None:
    base = env.context({"Containerfile": "FROM busybox\nONBUILD RUN echo triggered > /onbuild\n"}, "base")
    env.build(base, tags=["base-with-trigger"])
    child = env.context({"Containerfile": "FROM base-with-trigger\nRUN cat /onbuild\n"}, "child")
    env.build(child, tags=["child"])
    assert "triggered\n" in env.output()
    assert (env.store.resolve("child").config.config or object()).on_build is None  # consumed
    starts = [e.text for e in env.events if isinstance(e, StepStarted)]
    assert starts[1] == "STEP 2/3: RUN echo triggered > /onbuild (ONBUILD trigger of the base)"


def test_run_forms_heredocs_and_network_none(env: Env) -> None:
    ctx = env.context(
        {
            "Containerfile": """\
FROM busybox
RUN ["/bin/sh", "-c", "echo exec form > /exec"]
RUN <<EOF
echo heredoc line 1 > /heredoc
echo heredoc line 2 >> /heredoc
EOF
RUN <<EOF
#!/bin/sh
echo "script as $0" > /script-out
EOF
COPY <<EOF /etc/motd
hello from a heredoc
EOF
RUN --network=none ip link show | grep -c "^[0-9]*:" > /links
RUN cat /etc/hosts > /hosts-seen && echo "$(hostname)" > /hostname-seen
""",
        }
    )
    env.build(ctx, tags=["forms"])
    with env.rootfs("forms") as rootfs:
        assert read(f"{rootfs}/exec") == "exec form\n"
        assert read(f"{rootfs}/heredoc") == "heredoc line 1\nheredoc line 2\n"
        assert read(f"{rootfs}/script-out").startswith("script as /dev/pipes/EOF")
        assert not os.path.exists(f"{rootfs}/dev/pipes")
        assert read(f"{rootfs}/etc/motd") == "hello from a heredoc\n"
        assert read(f"{rootfs}/links").strip() == "1"  # only lo in an own network namespace
        hosts = read(f"{rootfs}/hosts-seen")  # RUN steps get a hosts file, as in Docker ...
        assert "127.0.0.1\tlocalhost" in hosts and read(f"{rootfs}/hostname-seen").strip() in hosts
        assert not os.path.lexists(f"{rootfs}/etc/hosts")  # ... which does not end up in the image
        host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert len(host_links.splitlines()) >= 1


# --- COPY and ADD --------------------------------------------------------------------------------------


def make_tar(
    files: dict[str, bytes], *, uid: int = 1234, extra: Callable[[tarfile.TarFile], None] | None = None
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o640
            info.uid = info.gid = uid
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        if extra is not None:
            extra(tar)
    return buf.getvalue()


def test_add_extracts_local_archives_and_copies_other_files(env: Env) -> None:
    plain = make_tar({"pkg/a.txt": b"plain\n", "pkg/sub/b.txt": b"b\n"})
    ctx = env.context(
        {
            "plain.tar": plain,
            "gz.tgz": gzip.compress(make_tar({"gz/file": b"gzip\n"})),
            "x.tar.xz": lzma.compress(make_tar({"xz/file": b"xz\n"})),
            "z.tar.zst": zstandard.ZstdCompressor().compress(make_tar({"zst/file": b"zstd\n"})),
            "notes.txt.gz": gzip.compress(b"not a tar\n"),
            "Containerfile": """\
FROM busybox
ADD plain.tar /opt/
ADD gz.tgz x.tar.xz z.tar.zst /opt/
ADD --chown=7:8 plain.tar /owned/
ADD notes.txt.gz /opt/
COPY plain.tar /copied/
""",
        }
    )
    env.build(ctx, tags=["add"])
    with env.rootfs("add") as rootfs:
        assert read(f"{rootfs}/opt/pkg/a.txt") == "plain\n"
        assert read(f"{rootfs}/opt/pkg/sub/b.txt") == "b\n"
        st = os.stat(f"{rootfs}/opt/pkg/a.txt")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 1234, 0o640)  # the archive's owners
        assert int(st.st_mtime) == 1_600_000_000
        assert read(f"{rootfs}/opt/gz/file") == "gzip\n"
        assert read(f"{rootfs}/opt/xz/file") == "xz\n"
        assert read(f"{rootfs}/opt/zst/file") == "zstd\n"
        st = os.stat(f"{rootfs}/owned/pkg/a.txt")
        assert (st.st_uid, st.st_gid) == (7, 8)
        with open(f"{rootfs}/opt/notes.txt.gz", "rb") as f:  # compressed, but no tar: copied as is
            assert gzip.decompress(f.read()) == b"not a tar\n"
        with open(f"{rootfs}/copied/plain.tar", "rb") as f:  # COPY never extracts
            assert f.read() == plain


def test_add_refuses_an_archive_that_escapes_and_urls(env: Env) -> None:
    def escape(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("../../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))

    ctx = env.context(
        {
            "evil.tar": make_tar({"ok": b"ok"}, extra=escape),
            "Containerfile": "FROM busybox\nADD evil.tar /x/\n",
        }
    )
    with pytest.raises(StepFailed) as err:
        env.build(ctx)
    assert "Containerfile:2" in str(err.value) and "evil.tar" in str(err.value)
    assert not os.path.exists(os.path.join(env.root, "escaped"))
    assert not any(
        os.path.exists(os.path.join(d, "escaped")) for d in (env.root, os.path.dirname(env.root), "/")
    )
    url = env.context({"Containerfile": "FROM busybox\nADD https://example.invalid/file.tar.gz /x/\n"}, "url")
    with pytest.raises(StepFailed, match=r"no network access.*fetch the file into the build context"):
        env.build(url)


def test_copy_chown_chmod_globs_and_destination_rules(env: Env) -> None:
    ctx = env.context(
        {
            "a.txt": "a\n",
            "b.txt": "b\n",
            "c.md": "c\n",
            "x.txt": "class\n",
            "ab.dat": "ab\n",
            "dir/inner/deep.txt": "deep\n",
            "Containerfile": """\
FROM busybox
RUN echo "web:x:33:33:web:/var/www:/bin/sh" >> /etc/passwd && echo "www:x:82:" >> /etc/group
COPY --chown=web:www *.txt /data/
COPY --chown=web a.txt /data/by-name
COPY --chown=4321 a.txt /data/by-number
COPY --chmod=600 c.md /data/secret.md
COPY a.txt /data/renamed.txt
COPY dir /data/dir-contents
COPY dir/ /data/existing/
COPY [xy].txt /data/class-glob
COPY a?.dat /data/question/
WORKDIR /data
COPY c.md relative/
COPY --exclude=*.txt a* /data/excluded/
COPY --exclude=**/hard.txt dir /data/excluded-dir/
""",
        }
    )
    os.chmod(os.path.join(ctx, "dir"), 0o750)
    os.link(os.path.join(ctx, "dir/inner/deep.txt"), os.path.join(ctx, "dir/inner/hard.txt"))
    env.build(ctx, tags=["copies"])
    with env.rootfs("copies") as rootfs:
        d = f"{rootfs}/data"
        for name in ("a.txt", "b.txt", "x.txt"):
            st = os.stat(f"{d}/{name}")
            assert (st.st_uid, st.st_gid) == (33, 82), name
        assert not os.path.exists(f"{d}/c.md")  # not matched by *.txt
        st = os.stat(f"{d}/by-name")
        assert (st.st_uid, st.st_gid) == (33, 33)  # no group given: the user's primary group
        st = os.stat(f"{d}/by-number")
        assert (st.st_uid, st.st_gid) == (4321, 4321)
        st = os.stat(f"{d}/secret.md")
        assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
        assert read(f"{d}/renamed.txt") == "a\n"
        assert read(f"{d}/dir-contents/inner/deep.txt") == "deep\n"  # a directory's content, not itself
        deep, hard = (os.stat(f"{d}/dir-contents/inner/{n}") for n in ("deep.txt", "hard.txt"))
        assert deep.st_ino == hard.st_ino and deep.st_nlink == 2  # hard links stay hard links
        assert stat.S_IMODE(os.stat(f"{d}/dir-contents").st_mode) == 0o750  # made: takes the source's mode
        assert read(f"{d}/existing/inner/deep.txt") == "deep\n"
        assert read(f"{d}/class-glob") == "class\n"
        assert os.listdir(f"{d}/question") == ["ab.dat"]
        assert read(f"{d}/relative/c.md") == "c\n"  # relative to WORKDIR
        assert os.listdir(f"{d}/excluded") == ["ab.dat"]
        assert sorted(os.listdir(f"{d}/excluded-dir/inner")) == ["deep.txt"]


def test_copy_several_sources_needs_a_directory(env: Env) -> None:
    ctx = env.context({"a.txt": "a", "b.txt": "b", "Containerfile": "FROM busybox\nCOPY *.txt /notadir\n"})
    with pytest.raises(StepFailed, match=r"Containerfile:2.*must be a directory and end with a /"):
        env.build(ctx)
    nothing = env.context({"Containerfile": "FROM busybox\nCOPY *.nope /x/\n"}, "none")
    with pytest.raises(StepFailed, match=r"no files in the build context match"):
        env.build(nothing)


def test_dockerignore_is_respected(env: Env) -> None:
    ctx = env.context(
        {
            ".dockerignore": "secret.txt\n*.log\nbuild/\n!build/keep.bin\n",
            "secret.txt": "password",
            "app.log": "log",
            "main.py": "print(1)",
            "build/drop.o": "o",
            "build/keep.bin": "keep",
            "sub/debug.log": "not matched: *.log is only the top level",
            "Containerfile": "FROM busybox\nCOPY . /ctx/\n",
        }
    )
    env.build(ctx, tags=["ignored"])
    with env.rootfs("ignored") as rootfs:
        found = sorted(
            os.path.relpath(os.path.join(dp, f), f"{rootfs}/ctx")
            for dp, _, fs in os.walk(f"{rootfs}/ctx")
            for f in fs
        )
    assert found == [".dockerignore", "Containerfile", "build/keep.bin", "main.py", "sub/debug.log"]
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write("FROM busybox\nCOPY secret.txt /s\n")
    with pytest.raises(StepFailed, match=r"'secret.txt': excluded by .dockerignore"):
        env.build(ctx)


def test_context_escapes_are_refused(env: Env) -> None:
    outside = os.path.join(env.root, "outside.txt")
    with open(outside, "w") as f:
        f.write("outside")
    ctx = env.context({"in.txt": "inside", "Containerfile": "FROM busybox\nCOPY ../outside.txt /x\n"})
    with pytest.raises(StepFailed, match=r"Containerfile:2.*leads outside the build context"):
        env.build(ctx)
    os.symlink(outside, os.path.join(ctx, "link-out"))
    os.symlink("/etc", os.path.join(ctx, "etc-link"))
    os.symlink("in.txt", os.path.join(ctx, "link-in"))
    for source in ("link-out", "etc-link/passwd", "a/../../outside.txt"):
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write(f"FROM busybox\nCOPY {source} /x\n")
        with pytest.raises(StepFailed) as err:
            env.build(ctx)
        message = str(err.value)
        assert "Containerfile:2" in message
        assert "symbolic link" in message or "outside the build context" in message or "not found" in message
    # absolute sources start at the context; links inside a copied directory are copied as links
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write("FROM busybox\nCOPY /in.txt /abs.txt\nCOPY link-in /followed.txt\nCOPY . /all/\n")
    env.build(ctx, tags=["links"])
    with env.rootfs("links") as rootfs:
        assert read(f"{rootfs}/abs.txt") == "inside"
        assert read(f"{rootfs}/followed.txt") == "inside"
        assert os.readlink(f"{rootfs}/all/link-out") == outside  # kept as a link, not followed
        assert os.readlink(f"{rootfs}/all/etc-link") == "/etc"
        assert not os.path.exists(f"{rootfs}/all/outside.txt")


# --- layers --------------------------------------------------------------------------------------------


def layer_members(store: ImageStore, ref: str) -> list[list[str]]:
    image = store.resolve(ref)
    out = []
    for desc in image.manifest.layers:
        with store.content.open(desc.digest) as f, tarfile.open(fileobj=f) as tar:
            out.append([m.name for m in tar.getmembers()])
    return out


def test_whiteouts_remove_lower_files_and_empty_steps_add_no_layer(env: Env) -> None:
    ctx = env.context(
        {
            "Containerfile": """\
FROM busybox
RUN mkdir -p /tree/sub && echo x > /tree/sub/file && echo keep > /tree/keep
RUN rm /etc/hostname && rm -r /tree/sub && rm -rf /home
RUN true
RUN rm -rf /tree && mkdir /tree && echo new > /tree/only
""",
        }
    )
    env.build(ctx, tags=["wh"])
    image = env.store.resolve("wh")
    history = (image.config.history or [])[1:]
    assert [h.empty_layer for h in history] == [False, False, True, False]  # `RUN true` changed nothing
    assert len(image.manifest.layers) == 4
    layers = layer_members(env.store, "wh")
    assert "etc/.wh.hostname" in layers[2] and "tree/.wh.sub" in layers[2] and ".wh.home" in layers[2]
    assert "tree/.wh..wh..opq" in layers[3]
    for layer in layers[1:]:  # no mount points of the RUN containers in any layer
        assert not {"proc", "sys", "dev", "etc/hosts", "etc/resolv.conf"} & set(layer)
    with env.rootfs("wh") as rootfs:
        assert not os.path.lexists(f"{rootfs}/etc/hostname")
        assert not os.path.lexists(f"{rootfs}/home")
        assert os.listdir(f"{rootfs}/tree") == ["only"]
        assert os.path.exists(f"{rootfs}/etc/passwd")


# --- the cache -----------------------------------------------------------------------------------------


def test_unchanged_rebuild_is_fully_cached_and_fast(env: Env) -> None:
    ctx = env.context(
        {
            "a.txt": "a",
            "Containerfile": """\
FROM busybox
ARG V=1
ENV A=b
WORKDIR /app
COPY a.txt .
RUN echo $V > v && sleep 0.2
CMD ["cat", "/app/v"]
""",
        }
    )
    first = env.build(ctx, tags=["cached"])
    assert first.cached_steps == 2  # FROM and ARG run nothing
    started = time.monotonic()
    second = env.build(ctx, tags=["cached"])
    elapsed = time.monotonic() - started
    assert second.image_id == first.image_id
    assert second.cached_steps == second.steps == 7
    assert env.cached_steps() == [3, 4, 5, 6, 7]
    assert elapsed < 0.5, f"cached rebuild took {elapsed:.3f}s"
    assert not any(isinstance(e, StepOutput) for e in env.events)
    # --no-cache runs every step again (and refreshes the cache with the new results)
    third = env.build(ctx, tags=["cached"], no_cache=True)
    assert third.cached_steps == 2 and third.image_id != first.image_id
    assert env.build(ctx, tags=["cached"]).image_id == third.image_id
    # a different build arg invalidates the RUN (and what follows), not the steps before it
    env.build(ctx, tags=["cached"], build_args={"V": "2"})
    assert env.cached_steps() == [3, 4, 5]


def test_a_changed_copy_source_invalidates_from_that_step_on(env: Env) -> None:
    ctx = env.context(
        {
            "conf/app.conf": "v1\n",
            "other.txt": "same\n",
            "Containerfile": """\
FROM busybox
RUN echo early > /early
COPY other.txt /other.txt
COPY conf /etc/app/
RUN cat /etc/app/app.conf > /seen
""",
        }
    )
    env.build(ctx, tags=["inv"])
    conf = os.path.join(ctx, "conf", "app.conf")
    os.utime(conf, (1_000_000_000, 1_000_000_000))  # only the mtime changes: still cached (as Docker)
    env.build(ctx, tags=["inv"])
    assert env.cached_steps() == [2, 3, 4, 5]
    with open(conf, "w") as f:
        f.write("v2\n")
    env.build(ctx, tags=["inv"])
    assert env.cached_steps() == [2, 3]  # the COPY and the RUN after it run again
    with env.rootfs("inv") as rootfs:
        assert read(f"{rootfs}/seen") == "v2\n"
    os.chmod(conf, 0o600)  # a mode is part of what is copied
    env.build(ctx, tags=["inv"])
    assert env.cached_steps() == [2, 3]
    with open(os.path.join(ctx, "conf", "new-file"), "w") as f:  # so is a new file in a copied directory
        f.write("n")
    env.build(ctx, tags=["inv"])
    assert env.cached_steps() == [2, 3]
    with open(os.path.join(ctx, "unrelated.txt"), "w") as f:  # a file no step copies changes nothing
        f.write("u")
    env.build(ctx, tags=["inv"])
    assert env.cached_steps() == [2, 3, 4, 5]


def test_gc_keeps_the_cache_blobs_until_the_cache_is_pruned(env: Env) -> None:
    ctx = env.context({"Containerfile": "FROM busybox\nRUN echo one > /one\nRUN echo two > /two\n"})
    env.build(ctx, tags=["gc"])
    env.store.remove("gc")
    env.builder.gc()  # the image is gone, its layers stay for the cache
    env.build(ctx, tags=["gc"])
    assert env.cached_steps() == [2, 3]
    env.store.remove("gc")
    assert env.builder.prune_cache() == 2
    removed = env.builder.gc()
    assert len(removed) >= 2
    env.build(ctx, tags=["gc"])
    assert env.cached_steps() == []


# --- failures ------------------------------------------------------------------------------------------


def test_a_failing_run_reports_and_leaves_nothing(env: Env) -> None:
    ctx = env.context(
        {
            "Containerfile": """\
FROM busybox
RUN echo fine > /fine
RUN echo to stdout; echo to stderr >&2; exit 3
RUN echo never
""",
        }
    )
    before = {i.id for i in env.store.list()}
    with pytest.raises(StepFailed) as err:
        env.build(ctx, tags=["broken:1"])
    e = err.value
    assert isinstance(e, BuildError)
    assert e.exit_code == 3 and e.step == 3
    assert str(e) == (
        "Containerfile:3: step 3/4 `RUN echo to stdout; echo to stderr >&2; exit 3` failed: "
        "the command exited with status 3"
    )
    assert b"to stdout\n" in e.output and b"to stderr\n" in e.output
    streams = {(ev.stream, ev.data) for ev in env.events if isinstance(ev, StepOutput)}
    assert ("stdout", b"to stdout\n") in streams and ("stderr", b"to stderr\n") in streams
    assert not any(isinstance(ev, StepStarted) and "never" in ev.instruction for ev in env.events)
    with pytest.raises(ImageNotFound):
        env.store.resolve("broken:1")
    assert {i.id for i in env.store.list()} == before
    # leftovers (mounts, snapshots, runtime state, cgroups) are checked by the fixtures; the steps
    # before the failure are cached for the next try
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write("FROM busybox\nRUN echo fine > /fine\nRUN true\n")
    env.build(ctx, tags=["broken:1"])
    assert env.cached_steps() == [2]


def test_interrupting_a_run_cleans_up(env: Env) -> None:
    # The token makes the step's shell (the container's init) findable in `ps` even when other builds
    # run on this machine: once it is gone, its pid namespace (and the sleep in it) is gone too.
    token = f"interrupted-{uuid.uuid4().hex[:8]}"
    ctx = env.context({"Containerfile": f"FROM busybox\nRUN echo started; sleep 30; echo {token}\n"})

    def on_event(event: BuildEvent) -> None:
        if isinstance(event, StepOutput) and b"started" in event.data:
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        env.builder.build(ctx, tags=["interrupted"], on_event=on_event)
    assert time.monotonic() - started < 10
    with pytest.raises(ImageNotFound):
        env.store.resolve("interrupted")
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert token not in out


def test_a_killed_build_is_cleaned_up_by_the_next_one(env: Env) -> None:
    token = f"killed-{uuid.uuid4().hex[:8]}"  # see test_interrupting_a_run_cleans_up
    ctx = env.context({"Containerfile": f"FROM busybox\nRUN echo started; sleep 30; echo {token}\n"})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a build process that dies in the middle of its RUN step (SIGKILL: no clean-up)
        try:
            os.close(r)
            store = ImageStore(env.store.root)
            builder = Builder(store, OverlaySnapshotter(env.snapshotter.root),
                              state_dir=os.path.join(env.root, "build"), cgroup_parent=TEST_CGROUP_PARENT)  # fmt: skip

            def on_event(event: BuildEvent) -> None:
                if isinstance(event, StepOutput) and b"started" in event.data:
                    os.write(w, b"x")
                    os.kill(os.getpid(), signal.SIGKILL)

            builder.build(ctx, on_event=on_event)
        finally:
            os._exit(1)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert len(env.snapshotter.list_active()) == 1  # the dead build's step is still there
    assert token in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    cleaned = env.builder.recover()
    assert cleaned == env.snapshotter.list_active() or len(cleaned) == 1
    assert env.snapshotter.list_active() == []
    assert token not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert env.builder.recover() == []


def test_syntax_errors_name_the_file_and_line(env: Env) -> None:
    ctx = env.context({"Containerfile": "FROM busybox\n\nRUNN echo typo\n"})
    with pytest.raises(ContainerfileError) as err:
        env.build(ctx)
    assert str(err.value) == "Containerfile:3: RUNN: unknown instruction (did you mean RUN?)"
    other = env.context({"build/app.Dockerfile": "FROM busybox\nCOPY onlyone\n"}, "other")
    with pytest.raises(ContainerfileError, match=r"^build/app.Dockerfile:2: COPY: requires at least two"):
        env.build(other, dockerfile="build/app.Dockerfile")
    with pytest.raises(BuildError, match=r"Containerfile: FROM nosuchimage: no image 'nosuchimage' here"):
        env.build(env.context({"Containerfile": "FROM nosuchimage\n"}, "missing"))
    with pytest.raises(
        BuildError, match=r"FROM --platform=linux/s390x: cocon build runs every step on this machine"
    ):
        env.build(env.context({"Containerfile": "FROM --platform=linux/s390x busybox\nRUN true\n"}, "plat"))
    with pytest.raises(BuildError, match=r"RUN --mount=type=cache is not supported"):
        env.build(
            env.context({"Containerfile": "FROM busybox\nRUN --mount=type=cache,target=/c true\n"}, "mnt")
        )


def test_target_stops_at_that_stage(env: Env) -> None:
    ctx = env.context(
        {
            "Containerfile": """\
FROM busybox AS base
RUN echo base > /base
FROM base AS test
RUN exit 1
FROM base AS release
LABEL stage=release
""",
        }
    )
    result = env.build(ctx, tags=["rel"], target="release")
    assert [s.name for s in result.stages] == ["base", "release"]
    assert (env.store.resolve("rel").config.config or object()).labels == {"stage": "release"}
    env.build(ctx, tags=["base-only"], target="base")
    with env.rootfs("base-only") as rootfs:
        assert read(f"{rootfs}/base") == "base\n"
    with pytest.raises(
        ContainerfileError, match=r"target stage \"relase\" could not be found \(did you mean release\?\)"
    ):
        env.build(ctx, target="relase")


def test_printer_shows_steps_cache_hits_and_output(env: Env) -> None:
    ctx = env.context({"Containerfile": "FROM busybox\nRUN echo printed\n"})
    buf = io.StringIO()
    env.builder.build(ctx, tags=["printed"], on_event=print_events(buf))
    env.builder.build(ctx, tags=["printed"], on_event=print_events(buf))
    lines = buf.getvalue().splitlines()
    assert lines[0] == "STEP 1/2: FROM busybox"
    assert lines[2] == "STEP 2/2: RUN echo printed"
    assert lines[3] == "printed"
    assert lines[5] == "Successfully tagged printed:latest"
    assert any(line.startswith("--> Using cache ") for line in lines[7:])
    done = [e for e in env.events if isinstance(e, StepDone)]
    assert done == []  # the printer was the only listener


# --- Debian --------------------------------------------------------------------------------------------


def test_debian_build(env: Env, debian_image: Any) -> None:
    copy_image(debian_image.store, debian_image.image, env.store, "debian:bookworm")
    ctx = env.context(
        {
            "Containerfile": """\
FROM debian:bookworm
RUN dpkg-query -W -f '${Package} ${Version}\\n' apt dpkg > /packages && apt-get --version | head -n1 > /apt-version
""",
        }
    )
    env.build(ctx, tags=["deb"])
    image = env.store.resolve("deb")
    assert len(image.manifest.layers) == len(debian_image.image.manifest.layers) + 1
    # the files are in the step's layer (read from the blob: unpacking Debian twice is slow)
    with env.store.content.open(image.manifest.layers[-1].digest) as f, tarfile.open(fileobj=f) as tar:
        files = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert set(files) == {"packages", "apt-version"}
    packages = files["packages"].split("\n")
    assert packages[0].startswith("apt ") and packages[1].startswith("dpkg ")
    assert files["apt-version"].startswith("apt ")
