""".dockerignore matching, as Docker does it (moby/patternmatcher and its ignorefile reader).

A pattern file is read like Docker's `ignorefile.ReadAll`: one pattern a line, `#` at the start of a
line makes a comment, blanks around a pattern are dropped, a pattern is cleaned like Go's
`filepath.Clean` and a leading `/` is dropped (patterns are relative to the context). `!` makes an
exception. Matching follows patternmatcher's `MatchesUsingParentResults`, as BuildKit's context
transfer applies it while walking the context:

- `*` matches within one path component, `?` one character but `/`, `[a-z]`/`[^a-z]` a class, `\\`
  escapes the next character, and `**` any number of components (`**/x`, `x/**`, `a/**/b`);
- a pattern that matches a directory matches everything under it;
- patterns are tried in order and the last one that matches decides, so `!` exceptions re-include
  what earlier patterns excluded (and later patterns can exclude it again).

The .dockerignore and the Containerfile may themselves be excluded: that only keeps them out of
the context the build sees (COPY . .), the builder still reads them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence

from cocon.images.build_errors import DockerIgnoreError

__all__ = ["IGNORE_FILES", "DockerIgnore", "DockerIgnoreError", "clean_path", "read_patterns", "walk_context"]

# Files that hold ignore patterns, in the order a context directory is searched (Podman's name first).
IGNORE_FILES = (".containerignore", ".dockerignore")


def clean_path(path: str) -> str:
    """Go's filepath.Clean for `/`-separated paths: no `.`, no `x/..`, no repeated or trailing `/`."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    joined = "/".join(parts)
    if rooted:
        return "/" + joined
    return joined or "."


def _dirname(path: str) -> str:
    """Go's filepath.Dir."""
    head, sep, _ = path.rpartition("/")
    if not sep:
        return "."
    return clean_path(head or "/")


def _read_lines(text: str) -> list[tuple[int, str]]:
    """Docker's ignorefile.ReadAll, keeping each pattern's line number."""
    if text.startswith("\ufeff"):
        text = text[1:]
    out: list[tuple[int, str]] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        raw = raw.removesuffix("\r")
        if raw.startswith("#"):
            continue
        pattern = raw.strip()
        if pattern == "":
            continue
        invert = pattern[0] == "!"
        if invert:
            pattern = pattern[1:].strip()
        if pattern:
            pattern = clean_path(pattern)
            if len(pattern) > 1 and pattern[0] == "/":
                pattern = pattern[1:]
        if invert:
            pattern = "!" + pattern
        out.append((number, pattern))
    return out


def read_patterns(text: str) -> list[str]:
    """The patterns of a .dockerignore file, as Docker reads them (exceptions keep their `!`)."""
    return [p for _, p in _read_lines(text)]


class _BadPattern(Exception):
    pass


def _get_esc(chunk: str, i: int) -> int:
    if i >= len(chunk) or chunk[i] in ("-", "]"):
        raise _BadPattern
    if chunk[i] == "\\":
        i += 1
        if i >= len(chunk):
            raise _BadPattern
    i += 1
    if i >= len(chunk):
        raise _BadPattern
    return i


def _check_chunk(chunk: str) -> None:
    i = 0
    while i < len(chunk):
        ch = chunk[i]
        if ch == "[":
            i += 1
            if i < len(chunk) and chunk[i] == "^":
                i += 1
            ranges = 0
            while True:
                if i < len(chunk) and chunk[i] == "]" and ranges > 0:
                    i += 1
                    break
                i = _get_esc(chunk, i)
                if chunk[i] == "-":
                    i = _get_esc(chunk, i + 1)
                ranges += 1
        elif ch == "\\":
            i += 2
            if i > len(chunk):
                raise _BadPattern
        else:
            i += 1


def _check_syntax(pattern: str) -> None:
    """What `filepath.Match(pattern, ".")` rejects: unclosed `[`, `[]`, bad ranges, a trailing `\\`."""
    rest = pattern
    while rest:
        rest = rest.lstrip("*")
        in_range = False
        i = 0
        while i < len(rest):
            ch = rest[i]
            if ch == "\\":
                if i + 1 < len(rest):
                    i += 1
            elif ch == "[":
                in_range = True
            elif ch == "]":
                in_range = False
            elif ch == "*" and not in_range:
                break
            i += 1
        _check_chunk(rest[:i])
        rest = rest[i:]


_ESCAPED = frozenset(".+()|{}$")


class _Pattern:
    """One cleaned pattern, compiled the way patternmatcher's Pattern.compile does."""

    __slots__ = ("dirs", "exclusion", "kind", "regex", "text")

    def __init__(self, text: str, exclusion: bool) -> None:
        self.text = text
        self.exclusion = exclusion
        self.dirs = text.split("/")
        self.regex: re.Pattern[str] | None = None
        self.kind = self._compile()

    def _compile(self) -> str:
        out = ["^"]
        kind = "exact"
        p = self.text
        i = 0
        token = 0
        while i < len(p):
            ch = p[i]
            i += 1
            if ch == "*":
                if i < len(p) and p[i] == "*":
                    i += 1
                    if i < len(p) and p[i] == "/":
                        i += 1  # `**/` is `**`
                    if i == len(p):
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            out.append(".*")
                            kind = "regexp"
                    else:
                        out.append("(.*/)?")
                        kind = "regexp"
                    if token == 0:
                        kind = "suffix"
                else:
                    out.append("[^/]*")
                    kind = "regexp"
            elif ch == "?":
                out.append("[^/]")
                kind = "regexp"
            elif ch in _ESCAPED:
                out.append("\\" + ch)
            elif ch == "\\":
                if i < len(p):
                    out.append(re.escape(p[i]))
                    i += 1
                    kind = "regexp"
                else:
                    out.append("\\\\")
            elif ch in ("[", "]"):
                out.append(ch)
                kind = "regexp"
            else:
                out.append(ch)
            token += 1
        if kind == "regexp":
            out.append(r"\Z")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                try:
                    self.regex = re.compile("".join(out))
                except re.error as e:
                    raise _BadPattern(str(e)) from None
        return kind

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            if path.endswith(suffix):
                return True
            return suffix.startswith("/") and path == suffix[1:]
        assert self.regex is not None
        return self.regex.match(path) is not None


class DockerIgnore:
    """A compiled list of .dockerignore patterns.

    `DockerIgnore(patterns)` takes patterns as Docker's PatternMatcher does (each trimmed and
    cleaned, `!` for exceptions); `DockerIgnore.parse(text)` reads a whole file first;
    `DockerIgnore.load(context)` finds and reads the context's ignore file.
    """

    def __init__(self, patterns: Iterable[str] = (), *, source: str | None = None) -> None:
        self.source = source
        self._patterns: list[_Pattern] = []
        self._components: dict[str, _Pattern] = {}
        for number, raw in enumerate(patterns, 1):
            self._add(raw, number if source is None else None)

    def _error(self, line: int | None, message: str) -> DockerIgnoreError:
        where = self.source or ".dockerignore"
        if line is not None:
            where += f":{line}"
        return DockerIgnoreError(f"{where}: {message}")

    def _add(self, raw: str, line: int | None) -> None:
        p = raw.strip()
        if p == "":
            return
        p = clean_path(p)
        exclusion = p.startswith("!")
        if exclusion:
            if len(p) == 1:
                raise self._error(
                    line, 'illegal exclusion pattern: "!" (write !PATTERN to re-include what PATTERN matches)'
                )
            p = p[1:]
        try:
            _check_syntax(p)
            self._patterns.append(_Pattern(p, exclusion))
        except _BadPattern as e:
            detail = f" ({e})" if str(e) else ""
            raise self._error(
                line,
                f"syntax error in pattern {raw.strip()!r}{detail}: check its [...] classes and trailing \\",
            ) from None

    @classmethod
    def parse(cls, text: str, *, source: str = ".dockerignore") -> DockerIgnore:
        """Read a .dockerignore file's text (comments, blanks, leading `/`, `!` exceptions)."""
        ignore = cls(source=source)
        for line, pattern in _read_lines(text):
            ignore._add(pattern, line)
        return ignore

    @classmethod
    def load(cls, context: str, containerfile: str | None = None) -> DockerIgnore:
        """The ignore file for a build: `<containerfile>.containerignore` or `.dockerignore` beside
        the Containerfile (as BuildKit allows) first, else `.containerignore` or `.dockerignore` at
        the root of the context; no file means nothing is excluded."""
        candidates: list[str] = []
        if containerfile is not None:
            candidates += [containerfile + ".containerignore", containerfile + ".dockerignore"]
        candidates += [os.path.join(context, name) for name in IGNORE_FILES]
        for path in candidates:
            try:
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    text = f.read()
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise DockerIgnoreError(f"cannot read {path}: {e.strerror}") from None
            return cls.parse(text, source=path)
        return cls(source=None)

    @property
    def patterns(self) -> list[str]:
        """The cleaned patterns, exceptions with their `!`."""
        return [("!" if p.exclusion else "") + p.text for p in self._patterns]

    @property
    def has_exceptions(self) -> bool:
        return any(p.exclusion for p in self._patterns)

    def __bool__(self) -> bool:
        return bool(self._patterns)

    def __repr__(self) -> str:
        return f"DockerIgnore({self.patterns!r})"

    def matches(self, relative_path: str) -> bool:
        """True if the path (relative to the context, `/`-separated) is excluded from the context.

        Evaluated the way BuildKit's context transfer (fsutil) does while it walks: each directory
        on the way down, then the path, each using its parent's per-pattern results
        (patternmatcher's MatchesUsingParentResults).
        """
        path = clean_path(relative_path.lstrip("/"))
        if path == "." or not self._patterns:
            return False
        parts = path.split("/")
        matched = False
        info: list[bool] | None = None
        for k in range(1, len(parts) + 1):
            matched, info = self._matches_with_parent("/".join(parts[:k]), info)
        return matched

    def _matches_with_parent(self, path: str, parent: Sequence[bool] | None) -> tuple[bool, list[bool]]:
        """patternmatcher's MatchesUsingParentResults: the parent directory's per-pattern results
        spare checking every ancestor again (None: no results, check the ancestors)."""
        matched = False
        info = [False] * len(self._patterns)
        for i, pattern in enumerate(self._patterns):
            hit = parent[i] if parent is not None else False
            if not hit:
                if pattern.exclusion != matched:
                    continue
                hit = pattern.match(path)
                if not hit and parent is None:
                    dir_path = _dirname(path)
                    if dir_path != ".":
                        dirs = dir_path.split("/")
                        hit = any(pattern.match("/".join(dirs[: k + 1])) for k in range(len(dirs)))
            info[i] = hit
            if hit:
                matched = not pattern.exclusion
        return matched, info

    def _component(self, text: str) -> _Pattern:
        compiled = self._components.get(text)
        if compiled is None:
            try:
                compiled = _Pattern(text, False)
            except _BadPattern:
                compiled = _Pattern("**", False)  # cannot tell: assume it may match
            self._components[text] = compiled
        return compiled

    def may_reinclude_under(self, directory: str) -> bool:
        """Whether an exception (`!`) pattern could match something inside an excluded directory,
        so that a walk must still look inside it. Errs on the side of looking."""
        parts = clean_path(directory).split("/")
        for pattern in self._patterns:
            if not pattern.exclusion:
                continue
            if any("**" in d for d in pattern.dirs):
                return True
            depth = min(len(pattern.dirs), len(parts))
            if all(self._component(pattern.dirs[k]).match(parts[k]) for k in range(depth)):
                return True
        return False

    def walk_context(self, root: str) -> Iterator[str]:
        """The context's paths that are not excluded, relative and `/`-separated, parents first and
        names sorted. Excluded directories are not entered unless an exception could re-include
        something inside them; then the directory is yielded (before its first included entry) only
        if something inside it is. Symbolic links are yielded, not followed."""
        if not os.path.isdir(root):
            raise DockerIgnoreError(f"build context {root!r} is not a directory")
        yield from self._walk(root, "", None, [])

    def _walk(self, root: str, rel_dir: str, parent: list[bool] | None, pending: list[str]) -> Iterator[str]:
        directory = os.path.join(root, rel_dir) if rel_dir else root
        try:
            with os.scandir(directory) as it:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in it)
        except OSError as e:
            raise DockerIgnoreError(f"cannot read {directory}: {e.strerror}") from None
        for name, is_dir in entries:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            excluded, info = self._matches_with_parent(rel, parent)
            if not excluded:
                yield from pending
                pending.clear()
                yield rel
                if is_dir:
                    yield from self._walk(root, rel, info, pending)
            elif is_dir and self.may_reinclude_under(rel):
                pending.append(rel)
                yield from self._walk(root, rel, info, pending)
                if pending and pending[-1] == rel:
                    pending.pop()


def walk_context(root: str, ignore: DockerIgnore | None = None) -> Iterator[str]:
    """The included paths of a build context; `ignore` defaults to the context's own ignore file."""
    if ignore is None:
        ignore = DockerIgnore.load(root)
    return ignore.walk_context(root)
