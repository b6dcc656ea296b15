"""`.dockerignore` matching: Docker's own patternmatcher/ignorefile tests, then walking a context."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from cocon.images.build_errors import BuildError
from cocon.images.dockerignore import (
    DockerIgnore,
    DockerIgnoreError,
    clean_path,
    read_patterns,
    walk_context,
)

# moby/patternmatcher TestMatches: (pattern, path, matched) — exact and parent matches both count.
PATTERN_CASES = [
    ("**", "file", True),
    ("**", "file/", True),
    ("**/", "file", True),
    ("**/", "file/", True),
    ("**", "dir/file", True),
    ("**/", "dir/file", True),
    ("**", "dir/file/", True),
    ("**/", "dir/file/", True),
    ("**/**", "dir/file", True),
    ("**/**", "dir/file/", True),
    ("dir/**", "dir/file", True),
    ("dir/**", "dir/file/", True),
    ("dir/**", "dir/dir2/file", True),
    ("dir/**", "dir/dir2/file/", True),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/*", "dir/dir2/file/", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**/dir2/**", "dir/dir2/dir3/file/", True),
    ("**file", "file", True),
    ("**file", "dir/file", True),
    ("**/file", "dir/file", True),
    ("**file", "dir/dir/file", True),
    ("**/file", "dir/dir/file", True),
    ("**/file*", "dir/dir/file", True),
    ("**/file*", "dir/dir/file.txt", True),
    ("**/file*txt", "dir/dir/file.txt", True),
    ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/file*.txt*", "dir/dir/file.txt", True),
    ("**/**/*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("**/*.txt", "file.txt", True),
    ("**/**/*.txt", "file.txt", True),
    ("a**/*.txt", "a/file.txt", True),
    ("a**/*.txt", "a/dir/file.txt", True),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a/*.txt", "a/file.txt", True),
    ("a/*.txt**", "a/file.txt", True),
    ("a[b-d]e", "ae", False),
    ("a[b-d]e", "ace", True),
    ("a[b-d]e", "aae", False),
    ("a[^b-d]e", "aze", True),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcdef", False),
    ("abc.def", "abc.def", True),
    ("abc.def", "abcZdef", False),
    ("abc?def", "abcZdef", True),
    ("abc?def", "abcdef", False),
    ("**/foo/bar", "foo/bar", True),
    ("**/foo/bar", "dir/foo/bar", True),
    ("**/foo/bar", "dir/dir2/foo/bar", True),
    ("abc/**", "abc", False),
    ("abc/**", "abc/def", True),
    ("abc/**", "abc/def/ghi", True),
    ("**/.foo", ".foo", True),
    ("**/.foo", "bar.foo", False),
    ("a(b)c/def", "a(b)c/def", True),
    ("a(b)c/def", "a(b)c/xyz", False),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    (
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        True,
    ),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    ("a\\\\", "a\\", True),
    ("a\\*b", "a*b", True),
]


@pytest.mark.parametrize(("pattern", "path", "matched"), PATTERN_CASES)
def test_patternmatcher_cases(pattern: str, path: str, matched: bool) -> None:
    assert DockerIgnore([pattern]).matches(path) is matched


MULTI_CASES = [
    (["**", "!util/docker/web"], "util/docker/web/foo", False),
    (["**", "!util/docker/web", "util/docker/web/foo"], "util/docker/web/foo", True),
    (
        ["**", "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl"],
        "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
        False,
    ),
    (["**", "!dist/*.whl"], "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
    # the fileutils tests: exceptions, last match wins, folders
    (["*"], "fileutils.go", True),
    (["*.go"], "fileutils.go", True),
    (["!fileutils.go", "*.go"], "fileutils.go", True),
    (["*.go", "!fileutils.go"], "fileutils.go", False),
    (["docs", "!docs/README.md"], "docs/README.md", False),
    (["docs/", "!docs/README.md"], "docs/README.md", False),
    (["docs/*", "!docs/README.md"], "docs/README.md", False),
    (["docs", "!docs/README.md"], "docs/other.md", True),
    ([], "/any/path/there", False),
    (["docs", "  !docs/README.md"], "docs/README.md", False),
    (["docs", "!docs/README.md  "], "docs/README.md", False),
    # a matched directory excludes all under it, however deep
    (["node_modules"], "node_modules/a/b/c.js", True),
    (["**/node_modules"], "web/node_modules/a/b/c.js", True),
    (["*/temp*"], "somedir/temporary.txt", True),
    (["*/*/temp*"], "somedir/subdir/temporary.txt", True),
    (["temp?"], "tempa", True),
    (["temp?"], "temp", False),
    # re-excluded after an exception
    (["*.md", "!README*.md", "README-secret.md"], "README-secret.md", True),
    (["*.md", "!README*.md", "README-secret.md"], "README-public.md", False),
    (["*.md", "README-secret.md", "!README*.md"], "README-secret.md", False),
]


@pytest.mark.parametrize(("patterns", "path", "matched"), MULTI_CASES)
def test_multiple_patterns(patterns: list[str], path: str, matched: bool) -> None:
    assert DockerIgnore(patterns).matches(path) is matched


# Go's filepath.Match tests as patternmatcher runs them: (pattern, path, matched, is_bad_pattern)
GO_MATCH_CASES = [
    ("abc", "abc", True, False),
    ("*", "abc", True, False),
    ("*c", "abc", True, False),
    ("a*", "a", True, False),
    ("a*", "abc", True, False),
    ("a*", "ab/c", True, False),
    ("a*/b", "abc/b", True, False),
    ("a*/b", "a/c/b", False, False),
    ("a*b*c*d*e*/f", "axbxcxdxe/f", True, False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/f", True, False),
    ("a*b*c*d*e*/f", "axbxcxdxe/xxx/f", False, False),
    ("a*b*c*d*e*/f", "axbxcxdxexxx/fff", False, False),
    ("a*b?c*x", "abxbbxdbxebxczzx", True, False),
    ("a*b?c*x", "abxbbxdbxebxczzy", False, False),
    ("ab[c]", "abc", True, False),
    ("ab[b-d]", "abc", True, False),
    ("ab[e-g]", "abc", False, False),
    ("ab[^c]", "abc", False, False),
    ("ab[^b-d]", "abc", False, False),
    ("ab[^e-g]", "abc", True, False),
    ("a\\*b", "a*b", True, False),
    ("a\\*b", "ab", False, False),
    ("a?b", "a☺b", True, False),
    ("a[^a]b", "a☺b", True, False),
    ("a???b", "a☺b", False, False),
    ("a[^a][^a][^a]b", "a☺b", False, False),
    ("[a-ζ]*", "\u03b1", True, False),
    ("*[a-ζ]", "A", False, False),
    ("a?b", "a/b", False, False),
    ("a*b", "a/b", False, False),
    ("[\\]a]", "]", True, False),
    ("[\\-]", "-", True, False),
    ("[x\\-]", "x", True, False),
    ("[x\\-]", "-", True, False),
    ("[x\\-]", "z", False, False),
    ("[\\-x]", "x", True, False),
    ("[\\-x]", "-", True, False),
    ("[\\-x]", "a", False, False),
    ("[]a]", "]", False, True),
    ("[-]", "-", False, True),
    ("[x-]", "x", False, True),
    ("[x-]", "-", False, True),
    ("[x-]", "z", False, True),
    ("[-x]", "x", False, True),
    ("[-x]", "-", False, True),
    ("[-x]", "a", False, True),
    ("\\", "a", False, True),
    ("[a-b-c]", "a", False, True),
    ("[", "a", False, True),
    ("[^", "a", False, True),
    ("[^bc", "a", False, True),
    ("a[", "a", False, True),
    ("a[", "ab", False, True),
    ("*x", "xxx", True, False),
]


@pytest.mark.parametrize(("pattern", "path", "matched", "bad"), GO_MATCH_CASES)
def test_go_filepath_match_cases(pattern: str, path: str, matched: bool, bad: bool) -> None:
    if bad:
        with pytest.raises(DockerIgnoreError, match="syntax error in pattern"):
            DockerIgnore([pattern])
    else:
        assert DockerIgnore([pattern]).matches(path) is matched


def test_read_all_like_docker() -> None:
    content = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! "
    assert read_patterns(content) == [
        "test1",
        "test2",
        "a/file/here",
        "lastfile",
        "!inverted/abs/path",
        "!",
        "!",
    ]


@pytest.mark.parametrize(
    ("text", "patterns"),
    [
        ("\ufeffa\r\nb\r\n", ["a", "b"]),
        ("  spaced  \n", ["spaced"]),
        ("a/./b/../c/\n", ["a/c"]),
        ("/\n", ["/"]),
        ("//x//y\n", ["x/y"]),
        (" # not a comment\n", ["# not a comment"]),
        ("#comment\n\n\n", []),
        ("!  ./x/\n", ["!x"]),
    ],
)
def test_read_patterns_cleaning(text: str, patterns: list[str]) -> None:
    assert read_patterns(text) == patterns


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("", "."),
        (".", "."),
        ("a/b/", "a/b"),
        ("a//b", "a/b"),
        ("./a", "a"),
        ("a/../..", ".."),
        ("/../a", "/a"),
        ("//a", "/a"),
        ("a/b/../../c/./d", "c/d"),
    ],
)
def test_clean_path_is_go_filepath_clean(path: str, cleaned: str) -> None:
    assert clean_path(path) == cleaned


def test_lone_exclamation_is_an_error_with_line() -> None:
    with pytest.raises(DockerIgnoreError, match=r'^\.dockerignore:3: illegal exclusion pattern: "!"'):
        DockerIgnore.parse("a\n\n!\n")


def test_bad_pattern_error_names_file_and_line() -> None:
    with pytest.raises(DockerIgnoreError, match=r"^ctx/\.dockerignore:2: syntax error in pattern '\[x'"):
        DockerIgnore.parse("ok\n[x\n", source="ctx/.dockerignore")


def test_pattern_that_go_regexp_rejects_is_an_error_at_parse_time() -> None:
    # filepath.Match accepts "[Local-Only]" (an l-O range) but the regexp does not compile.
    with pytest.raises(DockerIgnoreError, match="bad character range"):
        DockerIgnore.parse("[Local-Only]/\n")


def test_errors_are_build_errors() -> None:
    assert issubclass(DockerIgnoreError, BuildError)


def test_root_and_leading_slash_paths() -> None:
    ignore = DockerIgnore(["*.go"])
    assert not ignore.matches(".")
    assert not ignore.matches("/")
    assert ignore.matches("/main.go")
    assert ignore.matches("./main.go")
    assert not DockerIgnore().matches("anything")


def test_patterns_property_and_exceptions_flag() -> None:
    ignore = DockerIgnore.parse("docs/\n!docs/README.md\n/build\n")
    assert ignore.patterns == ["docs", "!docs/README.md", "build"]
    assert ignore.has_exceptions
    assert not DockerIgnore(["a"]).has_exceptions
    assert bool(ignore) and not bool(DockerIgnore())


def test_escaped_specials_and_literal_regex_characters() -> None:
    assert DockerIgnore(["\\[x\\]"]).matches("[x]")
    assert not DockerIgnore(["\\[x\\]"]).matches("x")
    assert DockerIgnore(["a+b"]).matches("a+b")
    assert not DockerIgnore(["a+b"]).matches("aab")
    assert DockerIgnore(["f\\?o"]).matches("f?o")
    assert not DockerIgnore(["f\\?o"]).matches("fxo")


def test_dockerignore_and_containerfile_can_be_excluded() -> None:
    ignore = DockerIgnore.parse(".dockerignore\nContainerfile\n")
    assert ignore.matches(".dockerignore") and ignore.matches("Containerfile")


# -- loading and walking a context --------------------------------------------------------------


def make_tree(root: Path, paths: list[str]) -> None:
    for p in paths:
        full = root / p
        if p.endswith("/"):
            full.mkdir(parents=True, exist_ok=True)
        else:
            full.parent.mkdir(parents=True, exist_ok=True)
            full.write_text(p)


def all_paths(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out)


def expected_walk(root: Path, ignore: DockerIgnore) -> set[str]:
    """Brute force: every included path, plus the directories that hold one."""
    included = {p for p in all_paths(root) if not ignore.matches(p)}
    for p in list(included):
        parts = p.split("/")
        included |= {"/".join(parts[:i]) for i in range(1, len(parts))}
    return included


TREE = [
    "Containerfile",
    ".dockerignore",
    "README.md",
    "docs/README.md",
    "docs/guide.md",
    "docs/img/logo.png",
    "src/main.go",
    "src/main_test.go",
    "src/vendor/lib/lib.go",
    "node_modules/a/index.js",
    "node_modules/a/package.json",
    "web/node_modules/b/index.js",
    "web/app.js",
    "build/out/bin",
    "build/keep/important.txt",
    "empty/",
    ".git/HEAD",
    ".git/objects/ab/cdef",
]


@pytest.mark.parametrize(
    "patterns",
    [
        [],
        ["node_modules", "**/node_modules", ".git"],
        ["*.md", "!README.md"],
        ["docs", "!docs/README.md"],
        ["build", "!build/keep/important.txt"],
        ["**", "!src/**/*.go", "src/**/*_test.go"],
        ["*", "!web"],
        ["src/*/lib"],
        ["**/*.js", "!web/*.js"],
        [".dockerignore", "Containerfile"],
    ],
)
def test_walk_context_matches_brute_force(tmp_path: Path, patterns: list[str]) -> None:
    make_tree(tmp_path, TREE)
    ignore = DockerIgnore(patterns)
    walked = list(ignore.walk_context(str(tmp_path)))
    assert len(walked) == len(set(walked))
    assert set(walked) == expected_walk(tmp_path, ignore)
    position = {p: i for i, p in enumerate(walked)}
    for p in walked:  # parents come before their children
        if "/" in p:
            assert position[p.rsplit("/", 1)[0]] < position[p]


def test_walk_context_random_patterns_agree_with_matches(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    pool = [
        "docs",
        "!docs/README.md",
        "**/*.go",
        "!**/main.go",
        "src",
        "!src/vendor",
        "*.md",
        "node_modules",
        "!node_modules/a/package.json",
        "build/*",
        "!build/keep",
        "**/index.js",
        ".git",
        "!.git/HEAD",
        "web/**",
        "*/img",
        "!*/img/logo.png",
        "e?pty",
    ]
    rng = random.Random(1234)
    for _ in range(200):
        patterns = rng.sample(pool, rng.randint(1, 6))
        ignore = DockerIgnore(patterns)
        assert set(ignore.walk_context(str(tmp_path))) == expected_walk(tmp_path, ignore), patterns


def test_walk_skips_excluded_directories_without_reading_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree(tmp_path, ["keep.txt", "secret/a.txt", "secret/deep/b.txt"])
    ignore = DockerIgnore(["secret"])
    assert not ignore.may_reinclude_under("secret")
    visited: list[str] = []
    real_scandir = os.scandir

    def spy(path: str) -> object:
        visited.append(os.path.relpath(path, tmp_path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    assert list(ignore.walk_context(str(tmp_path))) == ["keep.txt"]
    assert visited == ["."]


def test_walk_enters_excluded_directory_when_an_exception_may_match(tmp_path: Path) -> None:
    make_tree(tmp_path, ["secret/a.txt", "secret/public/b.txt", "secret/other/c.txt"])
    ignore = DockerIgnore(["secret", "!secret/public"])
    assert list(ignore.walk_context(str(tmp_path))) == ["secret", "secret/public", "secret/public/b.txt"]


@pytest.mark.parametrize(
    ("patterns", "directory", "may"),
    [
        (["docs"], "docs", False),
        (["docs", "!docs/README.md"], "docs", True),
        (["docs", "!docs/README.md"], "docs/sub", False),
        (["docs", "!*.md"], "docs", False),
        (["src", "!src/*/keep"], "src", True),
        (["src", "!src/*/keep"], "src/a", True),
        (["src", "!src/*/keep"], "src/a/b", False),
        (["src", "!**/keep"], "src/a/b", True),
        (["a", "!a"], "a", True),
    ],
)
def test_may_reinclude_under(patterns: list[str], directory: str, may: bool) -> None:
    assert DockerIgnore(patterns).may_reinclude_under(directory) is may


def test_walk_does_not_follow_symlinks(tmp_path: Path) -> None:
    make_tree(tmp_path, ["real/file"])
    os.symlink("real", tmp_path / "link")
    assert list(DockerIgnore().walk_context(str(tmp_path))) == ["link", "real", "real/file"]


def test_walk_context_reads_the_context_ignore_file(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.txt", "b.log", "logs/x.log", "Containerfile"])
    (tmp_path / ".dockerignore").write_text("*.log\nlogs\n.dockerignore\n")
    assert list(walk_context(str(tmp_path))) == ["Containerfile", "a.txt"]


def test_load_prefers_containerignore_and_containerfile_specific_files(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("a\n")
    assert DockerIgnore.load(str(tmp_path)).patterns == ["a"]
    (tmp_path / ".containerignore").write_text("b\n")
    loaded = DockerIgnore.load(str(tmp_path))
    assert loaded.patterns == ["b"] and loaded.source == str(tmp_path / ".containerignore")
    (tmp_path / "build.Containerfile.dockerignore").write_text("c\n")
    containerfile = str(tmp_path / "build.Containerfile")
    assert DockerIgnore.load(str(tmp_path), containerfile).patterns == ["c"]


def test_load_without_any_file_excludes_nothing(tmp_path: Path) -> None:
    ignore = DockerIgnore.load(str(tmp_path))
    assert ignore.patterns == [] and ignore.source is None


def test_load_reports_errors_with_the_file_name(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("ok\n!\n")
    with pytest.raises(DockerIgnoreError, match=r"\.dockerignore:2: illegal exclusion"):
        DockerIgnore.load(str(tmp_path))


def test_walk_context_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DockerIgnoreError, match="is not a directory"):
        list(DockerIgnore().walk_context(str(tmp_path / "nope")))


def test_exception_only_reincludes_through_ancestors_it_matched_on_the_way_down() -> None:
    # BuildKit walks the context with MatchesUsingParentResults: `!src/vendor` did not match
    # src/vendor while it was still included, so it cannot re-include a file below it that
    # `**/*.go` excludes. (patternmatcher's MatchesOrParentMatches would say otherwise.)
    ignore = DockerIgnore(["**/*.go", "!src/vendor"])
    assert ignore.matches("src/vendor/lib/lib.go")
    # ... whereas an exception for a directory that was excluded does re-include its content.
    assert not DockerIgnore(["src", "!src/vendor"]).matches("src/vendor/lib/lib.go")
