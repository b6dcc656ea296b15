"""The build cache's keys: what invalidates a cached step and what does not; and its SQLite store.

Keys are computed exactly as the builder does: a Containerfile is parsed and resolved, each
instruction becomes an op (`config_op`, `run_op`, `copy_op`) and `step_key(parent, op)`. COPY sources
are real files in a temporary context, hashed with `SourceDigest` through the builder's own source
walker (`expand_sources`, `digest_items`).
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import sqlite3
import tarfile
from collections.abc import Iterator

import pytest
import zstandard

from cocon.engine.build_cache import (
    BuildCache,
    SourceDigest,
    config_op,
    copy_op,
    file_stat,
    instruction_doc,
    run_op,
    step_key,
)
from cocon.engine.build_copy import (
    CopyError,
    SourceRoot,
    archive_kind,
    clean_source,
    digest_items,
    expand_sources,
    glob_regex,
)
from cocon.images.containerfile import Copy, ResolvedInstruction, Run, parse
from cocon.images.dockerignore import DockerIgnore
from cocon.oci.image_spec import OCI_LAYER, Descriptor

PARENT = "sha256:" + "1" * 64
OTHER_PARENT = "sha256:" + "2" * 64


def resolved(text: str, build_args: dict[str, str] | None = None) -> list[ResolvedInstruction]:
    return parse(text).resolve(build_args or {})[-1].instructions


def run_key(text: str, build_args: dict[str, str] | None = None, parent: str = PARENT) -> str:
    """The key of the file's last RUN, as the builder computes it."""
    ri = [r for r in resolved(text, build_args) if isinstance(r.instruction, Run)][-1]
    ins = ri.instruction
    assert isinstance(ins, Run)
    argv = ["/bin/sh", "-c", ins.shell_script()] if ins.prepend_shell else ins.command
    return step_key(parent, run_op(ins, argv, ri.env, "host"))


# --- RUN and metadata steps ----------------------------------------------------------------------------


def test_same_instruction_same_key_and_the_parent_matters() -> None:
    text = "FROM busybox\nRUN echo hi\n"
    assert run_key(text) == run_key(text)
    assert run_key(text) != run_key(text, parent=OTHER_PARENT)
    assert run_key(text).startswith("sha256:") and len(run_key(text)) == 71


def test_position_comments_and_formatting_do_not_invalidate() -> None:
    base = run_key("FROM busybox\nRUN echo hi\n")
    assert run_key("# a comment\nFROM busybox\n\n\n# another\nRUN echo hi\n") == base
    assert run_key("from busybox\nrun echo hi\n") == base  # keywords are case-insensitive


def test_the_command_invalidates() -> None:
    assert run_key("FROM busybox\nRUN echo hi\n") != run_key("FROM busybox\nRUN echo hello\n")
    assert run_key("FROM busybox\nRUN echo hi\n") != run_key('FROM busybox\nRUN ["echo", "hi"]\n')
    assert run_key("FROM busybox\nRUN echo hi\n") != run_key("FROM busybox\nRUN --network=none echo hi\n")


def test_arg_values_in_force_invalidate_run() -> None:
    text = "FROM busybox\nARG V=1\nRUN echo build\n"
    assert run_key(text) == run_key(text, {"V": "1"})  # the same value
    assert run_key(text) != run_key(text, {"V": "2"})  # Docker: any ARG in scope, used or not
    assert run_key(text) == run_key(text, {"UNDECLARED": "x"})  # an undeclared build arg is ignored
    before = "FROM busybox\nRUN echo build\nARG V=1\n"
    assert run_key(before, {"V": "1"}) == run_key(before, {"V": "2"})  # declared after the RUN


def test_proxy_build_args_do_not_invalidate() -> None:
    text = "FROM busybox\nRUN echo build\n"
    assert run_key(text) == run_key(text, {"HTTP_PROXY": "http://proxy:3128", "no_proxy": "x"})


def test_env_changes_reach_run_through_its_environment() -> None:
    # ENV is also in the parent's config (so the parent ID changes too); the RUN key alone differs as well
    assert run_key("FROM busybox\nENV A=1\nRUN echo\n") != run_key("FROM busybox\nENV A=2\nRUN echo\n")


def test_metadata_keys_use_expanded_values() -> None:
    def env_key(build_args: dict[str, str]) -> str:
        ri = resolved("FROM busybox\nARG V=1\nENV X=$V\n", build_args)[-1]
        return step_key(PARENT, config_op(ri.instruction))

    assert env_key({}) == env_key({"V": "1"})
    assert env_key({}) != env_key({"V": "2"})
    cmd = resolved("FROM busybox\nCMD echo hi\n")[-1].instruction
    assert step_key(PARENT, config_op(cmd, resolved=["/bin/sh", "-c", "echo hi"])) != step_key(
        PARENT, config_op(cmd, resolved=["/bin/bash", "-c", "echo hi"])
    )  # a SHELL change before CMD


def test_instruction_doc_leaves_out_the_place_in_the_file() -> None:
    a = resolved("FROM busybox\nRUN echo hi\n")[0].instruction
    b = resolved("FROM busybox\n\n\nRUN echo hi\n")[0].instruction
    assert a.line != b.line
    assert instruction_doc(a) == instruction_doc(b)
    assert "line" not in instruction_doc(a) and "original" not in instruction_doc(a)
    assert instruction_doc(a)["class"] == "Run"


# --- COPY sources --------------------------------------------------------------------------------------


@pytest.fixture
def ctx(tmp_path: os.PathLike[str]) -> str:
    root = os.path.join(str(tmp_path), "ctx")
    os.makedirs(os.path.join(root, "dir/sub"))
    for rel, text in {"a.txt": "a", "b.txt": "b", "dir/one": "1", "dir/sub/two": "2", "secret": "s"}.items():
        with open(os.path.join(root, rel), "w") as f:
            f.write(text)
    os.symlink("a.txt", os.path.join(root, "dir/link"))
    return root


def copy_key(
    ctx: str,
    line: str = "COPY a.txt dir /dest/",
    *,
    ignore: str = "",
    keep_owner: bool = False,
    cache: BuildCache | None = None,
) -> str:
    ri = resolved(f"FROM busybox\n{line}\n")[-1]
    ins = ri.instruction
    assert isinstance(ins, Copy)
    included = frozenset(DockerIgnore.parse(ignore).walk_context(ctx)) if ignore else None
    root = SourceRoot(path=ctx, label="build context", included=included, keep_owner=keep_owner, cache=cache)
    try:
        items = expand_sources(root, ins.sources)
        digest = SourceDigest()
        digest_items(items, digest)
    finally:
        root.close()
    return step_key(PARENT, copy_op(ins, digest.hexdigest(), keep_owner))


def test_copy_mtime_and_atime_do_not_invalidate(ctx: str) -> None:
    key = copy_key(ctx)
    os.utime(os.path.join(ctx, "a.txt"), (1, 1))
    os.utime(os.path.join(ctx, "dir/sub"), (2, 2))
    os.utime(os.path.join(ctx, "dir/link"), (3, 3), follow_symlinks=False)
    assert copy_key(ctx) == key


def test_copy_content_mode_names_and_links_invalidate(ctx: str) -> None:
    key = copy_key(ctx)
    seen = {key}

    def changed() -> None:
        new = copy_key(ctx)
        assert new not in seen
        seen.add(new)

    with open(os.path.join(ctx, "dir/sub/two"), "w") as f:
        f.write("2!")
    changed()  # content deep in a copied directory
    os.chmod(os.path.join(ctx, "dir/one"), 0o600)
    changed()  # mode of a file
    os.chmod(os.path.join(ctx, "dir/sub"), 0o700)
    changed()  # mode of a directory
    os.rename(os.path.join(ctx, "dir/one"), os.path.join(ctx, "dir/uno"))
    changed()  # a name
    os.unlink(os.path.join(ctx, "dir/link"))
    os.symlink("b.txt", os.path.join(ctx, "dir/link"))
    changed()  # a link's target
    with open(os.path.join(ctx, "dir/new"), "w") as f:
        f.write("")
    changed()  # a new (even empty) file
    os.mkdir(os.path.join(ctx, "dir/emptydir"))
    changed()  # a new empty directory
    os.link(os.path.join(ctx, "dir/sub/two"), os.path.join(ctx, "dir/sub/three"))
    changed()  # a hard link (copied as one)
    os.unlink(os.path.join(ctx, "dir/sub/three"))
    with open(os.path.join(ctx, "dir/sub/three"), "w") as f:
        f.write("2!")
    changed()  # the same content as a separate file


def test_copy_owners_count_only_where_the_copy_keeps_them(ctx: str) -> None:
    context_key = copy_key(ctx)
    kept_key = copy_key(ctx, keep_owner=True)
    os.chown(os.path.join(ctx, "a.txt"), 1234, 1234)
    assert copy_key(ctx) == context_key  # context files become 0:0 (or --chown): their owner is irrelevant
    assert copy_key(ctx, keep_owner=True) != kept_key  # COPY --from keeps owners


def test_copy_flags_and_destination_invalidate(ctx: str) -> None:
    key = copy_key(ctx)
    assert copy_key(ctx, "COPY a.txt dir /other/") != key
    assert copy_key(ctx, "COPY --chown=1:1 a.txt dir /dest/") != key
    assert copy_key(ctx, "COPY --chmod=600 a.txt dir /dest/") != key
    assert copy_key(ctx, "COPY dir a.txt /dest/") != key  # order of the sources


def test_files_outside_the_copy_or_ignored_do_not_invalidate(ctx: str) -> None:
    key = copy_key(ctx, ignore="dir/sub\n")
    with open(os.path.join(ctx, "b.txt"), "w") as f:
        f.write("not copied")
    with open(os.path.join(ctx, "dir/sub/two"), "w") as f:
        f.write("ignored")
    assert copy_key(ctx, ignore="dir/sub\n") == key
    with open(os.path.join(ctx, "dir/one"), "w") as f:
        f.write("copied")
    assert copy_key(ctx, ignore="dir/sub\n") != key


def test_wildcards_match_like_docker(ctx: str) -> None:
    key = copy_key(ctx, "COPY *.txt /dest/")
    with open(os.path.join(ctx, "c.txt"), "w") as f:
        f.write("c")
    assert copy_key(ctx, "COPY *.txt /dest/") != key  # a new match
    with open(os.path.join(ctx, "c.md"), "w") as f:
        f.write("c")
    assert copy_key(ctx, "COPY *.txt /dest/") == copy_key(ctx, "COPY *.txt /dest/")
    regex = glob_regex("*.txt")
    assert regex.fullmatch("a.txt") and regex.fullmatch(".hidden.txt") and not regex.fullmatch("a.txt.bak")
    assert glob_regex("?.txt").fullmatch("a.txt") and not glob_regex("?.txt").fullmatch("ab.txt")
    assert glob_regex("[a-c]x").fullmatch("bx") and not glob_regex("[a-c]x").fullmatch("dx")
    assert glob_regex("[^a]x").fullmatch("bx") and not glob_regex("[^a]x").fullmatch("ax")
    assert glob_regex("\\*").fullmatch("*") and not glob_regex("\\*").fullmatch("a")
    assert glob_regex("[]]").fullmatch("]")
    for bad in ("[", "[a", "a\\", "[z-a]"):
        with pytest.raises(CopyError, match="syntax error in pattern"):
            glob_regex(bad)


def test_sources_cannot_leave_the_context(ctx: str) -> None:
    assert clean_source("/a/./b/../c") == ["a", "c"]
    with pytest.raises(CopyError, match="leads outside the build context"):
        clean_source("../x")
    with pytest.raises(CopyError, match="leads outside the build context"):
        clean_source("a/../../x")
    os.symlink("/etc", os.path.join(ctx, "etc-link"))
    with pytest.raises(CopyError, match="symbolic link"):
        copy_key(ctx, "COPY etc-link/passwd /x")  # resolved inside the context: not there
    with pytest.raises(CopyError, match=r"excluded by \.dockerignore"):
        copy_key(ctx, "COPY secret /x", ignore="secret\n")


def test_remembered_file_digests_are_used_only_while_the_file_is_unchanged(
    ctx: str, tmp_path: os.PathLike[str]
) -> None:
    cache = BuildCache(os.path.join(str(tmp_path), "state"))
    path = os.path.join(ctx, "a.txt")
    fake = "sha256:" + "f" * 64
    cache.save_file_digests([(path, file_stat(os.lstat(path)), fake)])
    root = SourceRoot(path=ctx, label="build context", cache=cache)
    root.open()
    try:
        assert root.file_digest("a.txt", os.lstat(path)) == fake  # not read again
        with open(path, "w") as f:
            f.write("changed")
        assert root.file_digest("a.txt", os.lstat(path)) != fake  # size/ctime differ: hashed again
    finally:
        root.close()
    # a freshly written file is hashed, not remembered (its ctime is too recent to trust)
    assert cache.file_digests(ctx)[path][1] == fake
    cache.close()


# --- the database --------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: os.PathLike[str]) -> Iterator[BuildCache]:
    c = BuildCache(os.path.join(str(tmp_path), "state"))
    yield c
    c.close()


def layer(n: int) -> Descriptor:
    return Descriptor(media_type=OCI_LAYER, digest="sha256:" + f"{n:x}" * 64, size=n)


def test_put_get_replace_and_roots(cache: BuildCache) -> None:
    assert cache.get("k1") is None
    entry = cache.put("k1", b'{"config":1}', [layer(1), layer(2)])
    got = cache.get("k1")
    assert got is not None and got.config == b'{"config":1}' and got.layers == (layer(1), layer(2))
    assert got.image_id == entry.image_id and entry.image_id.startswith("sha256:")
    cache.put("k1", b'{"config":2}', [layer(3)])  # a --no-cache rebuild replaces the result
    got = cache.get("k1")
    assert got is not None and got.config == b'{"config":2}'
    cache.put("k2", b"{}", [layer(1)])
    assert cache.roots() == sorted({layer(1).digest, layer(3).digest})
    assert len(cache) == 2
    cache.remove("k2")
    assert cache.roots() == [layer(3).digest]


def test_prune_by_age(cache: BuildCache) -> None:
    cache.put("old", b"{}", [layer(1)])
    cache.put("new", b"{}", [layer(2)])
    db = sqlite3.connect(cache.path)
    db.execute("UPDATE steps SET used = 0 WHERE key = 'old'")
    db.commit()
    db.close()
    assert cache.prune(unused_for=3600) == 1
    assert cache.get("old") is None and cache.get("new") is not None
    assert cache.prune() == 1 and len(cache) == 0


def test_a_damaged_row_is_a_miss(cache: BuildCache) -> None:
    cache.put("k", b"{}", [layer(1)])
    db = sqlite3.connect(cache.path)
    db.execute("UPDATE steps SET layers = 'not json' WHERE key = 'k'")
    db.commit()
    db.close()
    assert cache.get("k") is None
    assert len(cache) == 0


# --- ADD's archive detection ---------------------------------------------------------------------------


def test_archives_are_detected_by_content(tmp_path: os.PathLike[str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    tar_bytes = buf.getvalue()
    files = {
        "plain.bin": tar_bytes,
        "g.bin": gzip.compress(tar_bytes),
        "x.bin": lzma.compress(tar_bytes),
        "b.bin": bz2.compress(tar_bytes),
        "z.bin": zstandard.ZstdCompressor().compress(tar_bytes),
        "text.gz": gzip.compress(b"just text" * 100),
        "zeros.tar": b"\0" * 1024,
        "random": os.urandom(2048),
    }
    root_dir = str(tmp_path)
    for name, data in files.items():
        with open(os.path.join(root_dir, name), "wb") as f:
            f.write(data)
    root = SourceRoot(path=root_dir, label="build context")
    root.open()
    try:
        kinds = {name: archive_kind(root, name) for name in files}
    finally:
        root.close()
    assert kinds == {
        "plain.bin": "tar",
        "g.bin": "gzip",
        "x.bin": "xz",
        "b.bin": "bzip2",
        "z.bin": "zstd",
        "text.gz": None,
        "zeros.tar": None,
        "random": None,
    }
