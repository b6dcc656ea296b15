"""Containerfile (Dockerfile) parsing, variable substitution and stage resolution, as Docker does it.

Pure code: no file system, no network. The rules are ported from Docker's BuildKit frontend
(`frontend/dockerfile/parser`, `instructions`, `shell/lex.go`, `dockerfile2llb`) so that a file
that builds with `docker build` parses and expands to the same words here.

Two steps, for the builder:

1. `parse(text, filename)` reads the file into a `Containerfile`: parser directives, the global ARGs
   (before the first FROM) and the stages, each a list of typed `Instruction`s whose words are *not*
   yet expanded (`$VAR` is still there). Syntax errors are `ContainerfileError`s that name the line.

2. `Containerfile.resolve(build_args, target)` walks the stages the target needs (itself, and every
   stage it reaches through `FROM <stage>`, `COPY --from=<stage|index>` or `RUN --mount=from=...`),
   in file order, and expands each instruction's words with the ARG and ENV values in force when the
   instruction is reached, exactly when BuildKit would. The builder executes what it returns.

`expand()` / `expand_words()` are the shell-like lexer on their own (quotes, escapes, `$VAR`,
`${VAR:-default}`, `${VAR:+alt}`, `${VAR-default}`, `${VAR+alt}`, `${VAR?err}`, `${VAR#pat}`,
`${VAR%pat}`, `${VAR/pat/repl}`); RUN, CMD and ENTRYPOINT are never expanded here: the shell does it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import platform as _platform
import re
import signal as _signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from cocon.images.build_errors import ContainerfileError, SubstitutionError

__all__ = [
    "DEFAULT_PATH",
    "PROXY_ARGS",
    "SUPPORTED_RUN_MOUNT_TYPES",
    "SUPPORTED_RUN_NETWORKS",
    "SUPPORTED_RUN_SECURITY",
    "Add",
    "Arg",
    "BaseImageConfig",
    "Cmd",
    "Containerfile",
    "ContainerfileError",
    "Copy",
    "Entrypoint",
    "Env",
    "Expose",
    "Healthcheck",
    "Heredoc",
    "Instruction",
    "Label",
    "Maintainer",
    "Onbuild",
    "ResolvedInstruction",
    "ResolvedStage",
    "Run",
    "RunMount",
    "Shell",
    "Stage",
    "StopSignal",
    "SubstitutionError",
    "User",
    "Volume",
    "Workdir",
    "default_platform_args",
    "expand",
    "expand_words",
    "parse",
    "parse_duration",
]

# The PATH BuildKit gives a stage whose image config has none (Linux).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Build args that need no ARG declaration: passed to RUN's environment only, never to the image.
PROXY_ARGS: tuple[str, ...] = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
)

# What cocon's builder runs today. `Run.unsupported` lists every use of a RUN feature outside these
# sets, so that the builder can refuse it with a clear message; widen them as the builder grows.
SUPPORTED_RUN_MOUNT_TYPES: frozenset[str] = frozenset()
SUPPORTED_RUN_NETWORKS: frozenset[str] = frozenset({"default", "none"})
SUPPORTED_RUN_SECURITY: frozenset[str] = frozenset({"sandbox"})

_PLATFORM_ARGS = (
    "BUILDPLATFORM",
    "BUILDOS",
    "BUILDARCH",
    "BUILDVARIANT",
    "TARGETPLATFORM",
    "TARGETOS",
    "TARGETARCH",
    "TARGETVARIANT",
)


# --------------------------------------------------------------------------------------------------
# The shell lexer (port of BuildKit's frontend/dockerfile/shell/lex.go)
# --------------------------------------------------------------------------------------------------

_EOF = ""
_SPECIAL_PARAMS = frozenset("@*#?-$!0")
_MODIFIERS = frozenset("+-?#%")
_REGEX_SPECIALS = frozenset("[]{}.+()|^$")
_QUOTES = frozenset("'\"")


def _is_space(ch: str) -> bool:
    """Go's unicode.IsSpace (Python's isspace also counts the ASCII separators \\x1c-\\x1f)."""
    return ch.isspace() and ch not in "\x1c\x1d\x1e\x1f"


def _is_name_char(ch: str) -> bool:
    return ch != _EOF and (ch.isalpha() or ch.isdecimal() or ch == "_")


def _trim_space(s: str) -> str:
    start, end = 0, len(s)
    while start < end and _is_space(s[start]):
        start += 1
    while end > start and _is_space(s[end - 1]):
        end -= 1
    return s[start:end]


def _ltrim_space(s: str) -> str:
    i = 0
    while i < len(s) and _is_space(s[i]):
        i += 1
    return s[i:]


def _go_quote(s: str) -> str:
    """Roughly Go's %q: a double-quoted string with backslash escapes."""
    return json.dumps(s, ensure_ascii=False)


class _LexError(Exception):
    pass


class _Words:
    """Word splitting as the lexer goes (BuildKit's wordsStruct)."""

    __slots__ = ("in_word", "word", "words")

    def __init__(self) -> None:
        self.word = ""
        self.words: list[str] = []
        self.in_word = False

    def add_char(self, ch: str) -> None:
        if _is_space(ch):
            if self.in_word and self.word:
                self.words.append(self.word)
                self.word = ""
                self.in_word = False
        else:
            self.add_raw_char(ch)

    def add_raw_char(self, ch: str) -> None:
        self.word += ch
        self.in_word = True

    def add_string(self, s: str) -> None:
        for ch in s:
            self.add_char(ch)

    def add_raw_string(self, s: str) -> None:
        self.word += s
        self.in_word = True

    def get_words(self) -> list[str]:
        if self.word:
            self.words.append(self.word)
            self.word = ""
            self.in_word = False
        return self.words


class _Lexer:
    """BuildKit's shell.Lex: quotes, escapes and `$` substitution over one string."""

    def __init__(
        self,
        escape: str = "\\",
        *,
        raw_quotes: bool = False,
        raw_escapes: bool = False,
        skip_process_quotes: bool = False,
        skip_unset_env: bool = False,
        heredoc_words: bool = False,
    ) -> None:
        self.escape = escape
        self.raw_quotes = raw_quotes
        self.raw_escapes = raw_escapes
        self.skip_process_quotes = skip_process_quotes
        self.skip_unset_env = skip_unset_env
        self.heredoc_words = heredoc_words
        self._src = ""
        self._pos = 0
        self._env: Mapping[str, str] = {}
        self._raw_now = False

    def process(self, word: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
        """The word expanded as one string, and split into words (quotes keep spaces in a word)."""
        self._src, self._pos, self._env = word, 0, env
        try:
            return self._stop_on(_EOF, self.raw_escapes)
        except _LexError as e:
            raise SubstitutionError(f"failed to process {_go_quote(word)}: {e}") from None

    def _peek(self) -> str:
        return self._src[self._pos] if self._pos < len(self._src) else _EOF

    def _next(self) -> str:
        if self._pos < len(self._src):
            ch = self._src[self._pos]
            self._pos += 1
            return ch
        return _EOF

    def _stop_on(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        result: list[str] = []
        words = _Words()
        saved, self._raw_now = self._raw_now, raw_escapes
        try:
            while (ch := self._peek()) != _EOF:
                if stop != _EOF and ch == stop:
                    self._next()
                    return "".join(result), words.get_words()
                if ch == "$":
                    tmp = self._dollar()
                    result.append(tmp)
                    words.add_string(tmp)
                elif ch in _QUOTES and not self.skip_process_quotes:
                    tmp = self._single_quote() if ch == "'" else self._double_quote()
                    result.append(tmp)
                    words.add_raw_string(tmp)
                elif ch == "<" and self.heredoc_words:
                    tmp = self._possible_heredoc()
                    result.append(tmp)
                    words.add_raw_string(tmp)
                else:
                    ch = self._next()
                    if ch == self.escape:
                        if self._raw_now:
                            words.add_raw_char(ch)
                            result.append(ch)
                        ch = self._next()
                        if ch == _EOF:
                            break
                        words.add_raw_char(ch)
                    else:
                        words.add_char(ch)
                    result.append(ch)
            if stop != _EOF:
                raise _LexError(f"unexpected end of statement while looking for matching {stop}")
            return "".join(result), words.get_words()
        finally:
            self._raw_now = saved

    def _possible_heredoc(self) -> str:
        # `<<` and the blanks after it stay glued to the word that follows: `RUN <<  EOF`.
        self._next()
        if self._peek() != "<":
            return "<"
        self._next()
        space = ""
        while self._peek() in (" ", "\t"):
            space += self._next()
        return "<<" + space

    def _single_quote(self) -> str:
        result: list[str] = []
        ch = self._next()
        if self.raw_quotes:
            result.append(ch)
        while True:
            ch = self._next()
            if ch == _EOF:
                raise _LexError("unexpected end of statement while looking for matching single-quote")
            if ch == "'":
                if self.raw_quotes:
                    result.append(ch)
                return "".join(result)
            result.append(ch)

    def _double_quote(self) -> str:
        result: list[str] = []
        ch = self._next()
        if self.raw_quotes:
            result.append(ch)
        while True:
            peek = self._peek()
            if peek == _EOF:
                raise _LexError("unexpected end of statement while looking for matching double-quote")
            if peek == '"':
                ch = self._next()
                if self.raw_quotes:
                    result.append(ch)
                return "".join(result)
            if peek == "$":
                result.append(self._dollar())
                continue
            ch = self._next()
            if ch == self.escape:
                if self._raw_now:
                    result.append(ch)
                nxt = self._peek()
                if nxt == _EOF:
                    continue  # a lone escape at the end: the loop reports the missing quote
                if nxt in ('"', "$", self.escape):
                    ch = self._next()
            result.append(ch)

    def _lookup(self, name: str) -> str | None:
        return self._env.get(name)

    def _name(self) -> str:
        name = ""
        while (ch := self._peek()) != _EOF:
            if not name and ch.isdecimal():
                while self._peek() != _EOF and self._peek().isdecimal():
                    name += self._next()
                return name
            if not name and ch in _SPECIAL_PARAMS:
                return self._next()
            if not _is_name_char(ch):
                break
            name += self._next()
        return name

    def _dollar(self) -> str:
        self._next()
        if self._peek() != "{":
            name = self._name()
            if not name:
                return "$"
            value = self._lookup(name)
            if value is None:
                return "$" + name if self.skip_unset_env else ""
            return value
        self._next()
        peek = self._peek()
        if peek == _EOF:
            raise _LexError("syntax error: missing '}'")
        if peek in ("{", "}", ":"):
            raise _LexError("syntax error: bad substitution")
        name = self._name()
        ch = self._next()
        if ch == _EOF:
            raise _LexError("syntax error: missing '}'")
        chs = ch
        if ch == "}":
            value = self._lookup(name)
            if value is None:
                return "${" + name + "}" if self.skip_unset_env else ""
            return value
        null_is_unset = False
        if ch == ":":
            null_is_unset = True
            ch = self._next()
            chs += ch
        if null_is_unset or ch in _MODIFIERS:
            return self._modifier(name, ch, chs, null_is_unset)
        if ch == "/":
            return self._replace(name)
        raise _LexError(f"unsupported modifier ({chs}) in substitution")

    def _modifier(self, name: str, ch: str, chs: str, null_is_unset: bool) -> str:
        try:
            word, _ = self._stop_on("}", ch in ("#", "%"))
        except _LexError:
            if self._peek() == _EOF:
                raise _LexError("syntax error: missing '}'") from None
            raise
        value = self._lookup(name)
        if value is None and self.skip_unset_env:
            return "${" + name + chs + word + "}"
        is_set = value is not None
        value = value or ""
        if ch == "-":
            return word if not is_set or (null_is_unset and value == "") else value
        if ch == "+":
            return "" if not is_set or (null_is_unset and value == "") else word
        if ch == "?":
            if not is_set:
                raise _LexError(f"{name}: {word or 'is not allowed to be unset'}")
            if null_is_unset and value == "":
                raise _LexError(f"{name}: {word or 'is not allowed to be empty'}")
            return value
        if ch in ("#", "%"):
            greedy = word.startswith(ch)
            if greedy:
                word = word[1:]
            return _trim_suffix(word, value, greedy) if ch == "%" else _trim_prefix(word, value, greedy)
        raise _LexError(f"unsupported modifier ({chs}) in substitution")

    def _replace(self, name: str) -> str:
        replace_all = self._peek() == "/"
        if replace_all:
            self._next()
        try:
            pattern, _ = self._stop_on("/", True)
        except _LexError:
            if self._peek() == _EOF:
                raise _LexError("syntax error: missing '/' in ${}") from None
            raise
        try:
            replacement, _ = self._stop_on("}", True)
        except _LexError:
            if self._peek() == _EOF:
                raise _LexError("syntax error: missing '}'") from None
            raise
        value = self._lookup(name)
        if value is None and self.skip_unset_env:
            return "${" + name + "/" + pattern + "/" + replacement + "}"
        value = value or ""
        regex = _shell_pattern_regex(pattern, greedy=True, anchored=False)
        if replace_all:
            return _go_replace_all(regex, value, replacement)
        m = regex.search(value)
        if m:
            value = value[: m.start()] + replacement + value[m.end() :]
        return value


def _shell_pattern_regex(pattern: str, *, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A `${VAR#pattern}` / `${VAR/pattern/...}` glob (`*`, `?`, `\\` escapes) as a regex."""
    out = ["^"] if anchored else []
    star = ".*" if greedy else ".*?"
    i = 0
    while i < len(pattern):
        tok = pattern[i]
        i += 1
        if tok == "*":
            out.append(star)
            continue
        if tok == "?":
            out.append(".")
            continue
        if tok == "\\":
            nxt = pattern[i] if i < len(pattern) else _EOF
            if nxt in ("}", "/"):
                continue  # \} and \/ protect the ${} syntax; the escape is not part of the pattern
            i += 1
            if nxt not in ("*", "?", "\\"):
                raise _LexError(f"invalid pattern ({pattern}) in substitution: invalid escape '\\{nxt}'")
            out.append("\\" + nxt)
            continue
        if tok in _REGEX_SPECIALS:
            out.append("\\")
        out.append(tok)
    return re.compile("".join(out))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    m = _shell_pattern_regex(pattern, greedy=greedy, anchored=True).search(value)
    return value[m.end() :] if m else value


def _reverse_pattern(pattern: str) -> str:
    """Reverse a glob, keeping each escape before the character it escapes (a\\*c -> c\\*a)."""
    n = len(pattern)
    out = [""] * n
    i = 0
    while i < n:
        tok = pattern[i]
        j = n - 1 - i
        if tok == "\\" and i != n - 1:
            out[j - 1] = tok
            out[j] = pattern[i + 1]
            i += 2
        else:
            out[j] = tok
            i += 1
    return "".join(out)


def _trim_suffix(pattern: str, value: str, greedy: bool) -> str:
    # Regexes can't find the shortest rightmost match: reverse both and trim a prefix instead.
    return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]


def _go_template(template: str, match: re.Match[str]) -> str:
    """Go's Regexp.Expand for a regex without groups: `$$` is `$`, `$0`/`${0}` the match."""
    out: list[str] = []
    while True:
        before, sep, after = template.partition("$")
        if not sep:
            break
        out.append(before)
        template = after
        if template.startswith("$"):
            out.append("$")
            template = template[1:]
            continue
        s, brace = template, False
        if s.startswith("{"):
            brace, s = True, s[1:]
        i = 0
        while i < len(s) and _is_name_char(s[i]):
            i += 1
        if i == 0 or (brace and (i >= len(s) or s[i] != "}")):
            out.append("$")  # malformed: the $ stays as it is
            continue
        name = s[:i]
        template = s[i + 1 :] if brace else s[i:]
        if name == "0":
            out.append(match.group(0))
    out.append(template)
    return "".join(out)


def _go_replace_all(regex: re.Pattern[str], src: str, repl: str) -> str:
    """Go's Regexp.ReplaceAllString: an empty match right after a match is not replaced."""
    out: list[str] = []
    last_end = 0
    pos = 0
    while pos <= len(src):
        m = regex.search(src, pos)
        if m is None:
            break
        out.append(src[last_end : m.start()])
        if m.end() > last_end or m.start() == 0:
            out.append(_go_template(repl, m))
        last_end = m.end()
        pos = pos + 1 if pos + 1 > m.end() else m.end()
    out.append(src[last_end:])
    return "".join(out)


def expand(word: str, env: Mapping[str, str], *, escape: str = "\\") -> str:
    """Expand `word` as Docker does for ENV, LABEL, WORKDIR, COPY, ... (one word, quotes removed).

    Raises SubstitutionError for bad syntax, unterminated quotes and `${VAR?message}` errors.
    """
    return _Lexer(escape).process(word, env)[0]


def expand_words(word: str, env: Mapping[str, str], *, escape: str = "\\") -> list[str]:
    """Expand `word` and split it into words at unquoted blanks, as Docker does for EXPOSE."""
    return _Lexer(escape).process(word, env)[1]


def _expand_raw(text: str, env: Mapping[str, str]) -> str:
    """Heredoc content of COPY/ADD: only `$` substitution; quotes are content, not syntax."""
    return _Lexer("\\", skip_process_quotes=True).process(text, env)[0]


# --------------------------------------------------------------------------------------------------
# Durations (Go's time.ParseDuration)
# --------------------------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_INT64 = (1 << 63) - 1


def parse_duration(s: str) -> int:
    """Parse a Go duration ("300ms", "1h30m", "1.5s", "-2h45m") into nanoseconds."""
    orig = s
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"time: invalid duration {_go_quote(orig)}")
    total = 0
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise ValueError(f"time: invalid duration {_go_quote(orig)}")
        i = 0
        v = 0
        while i < len(s) and "0" <= s[i] <= "9":
            v = v * 10 + ord(s[i]) - 48
            if v > 1 << 63:
                raise ValueError(f"time: invalid duration {_go_quote(orig)}")
            i += 1
        pre = i > 0
        s = s[i:]
        frac, scale, post = 0, 1.0, False
        if s.startswith("."):
            s = s[1:]
            i = 0
            overflow = False
            while i < len(s) and "0" <= s[i] <= "9":
                if not overflow:
                    if frac > _MAX_INT64 // 10:
                        overflow = True
                    else:
                        frac = frac * 10 + ord(s[i]) - 48
                        scale *= 10
                i += 1
            post = i > 0
            s = s[i:]
        if not pre and not post:
            raise ValueError(f"time: invalid duration {_go_quote(orig)}")
        i = 0
        while i < len(s) and s[i] != "." and not ("0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise ValueError(f"time: missing unit in duration {_go_quote(orig)}")
        unit_name, s = s[:i], s[i:]
        unit = _DURATION_UNITS.get(unit_name)
        if unit is None:
            raise ValueError(f"time: unknown unit {_go_quote(unit_name)} in duration {_go_quote(orig)}")
        if v > (1 << 63) // unit:
            raise ValueError(f"time: invalid duration {_go_quote(orig)}")
        v *= unit
        if frac > 0:
            v += int(float(frac) * (float(unit) / scale))
            if v > 1 << 63:
                raise ValueError(f"time: invalid duration {_go_quote(orig)}")
        total += v
        if total > 1 << 63:
            raise ValueError(f"time: invalid duration {_go_quote(orig)}")
    if neg:
        return -total
    if total > _MAX_INT64:
        raise ValueError(f"time: invalid duration {_go_quote(orig)}")
    return total


# --------------------------------------------------------------------------------------------------
# The data model
# --------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Heredoc:
    """A here-document attached to RUN, COPY or ADD (`<<EOF`, `<<-EOF`, `<<'EOF'`, `3<<EOF`).

    `content` is the raw text between the opening line and the terminator (newlines kept, comments
    kept); `text` is what the file or script gets: leading tabs removed for `<<-`. `expand` is False
    when any part of the delimiter was quoted. In a resolved COPY/ADD, `content` is final (chomped and
    expanded) and `expand`/`chomp` are False.
    """

    name: str
    content: str = ""
    expand: bool = True
    chomp: bool = False
    fd: int | None = None

    @property
    def text(self) -> str:
        return _LEADING_TABS.sub("", self.content) if self.chomp else self.content


_LEADING_TABS = re.compile(r"(?m)^\t+")


@dataclass(kw_only=True)
class Instruction:
    """One instruction as written. Subclasses add the parsed, typed fields.

    `args` are the words Docker's parser produced (JSON-decoded for the exec form, the whole rest of
    the line for RUN/CMD/ENTRYPOINT's shell form, name/value alternating for ENV and LABEL), `flags`
    the `--name=value` words before them, `line`..`end_line` its place in the file (1-based, from
    the first line to the last, heredoc bodies included), `original` the logical line with
    continuations joined. `unsupported` lists features cocon's builder does not run (so far only RUN
    flags outside the SUPPORTED_RUN_* sets); a builder refuses an instruction where it is not empty.
    """

    keyword: str
    line: int
    end_line: int
    original: str
    args: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    json_form: bool = False
    heredocs: list[Heredoc] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class RunMount:
    """A `RUN --mount=...` (type bind, cache, tmpfs, secret or ssh) with its options."""

    type: str = "bind"
    target: str | None = None
    source: str | None = None
    from_: str | None = None
    readonly: bool | None = None
    options: dict[str, str] = field(default_factory=dict)
    spec: str = ""


@dataclass(kw_only=True)
class Run(Instruction):
    """RUN: `command` is the exec-form argv, or `[script]` in shell form (`prepend_shell`)."""

    command: list[str] = field(default_factory=list)
    prepend_shell: bool = True
    mounts: list[RunMount] = field(default_factory=list)
    network: str | None = None
    security: str | None = None
    devices: list[str] = field(default_factory=list)

    @property
    def single_heredoc(self) -> Heredoc | None:
        """The heredoc when the whole command is one (`RUN <<EOF`): BuildKit runs its text as the
        script, or as an executable file when it starts with `#!`."""
        if not self.prepend_shell or not self.heredocs or len(self.command) != 1:
            return None
        try:
            word = _heredoc_word(self.command[0])
        except _Fail:
            return None
        return self.heredocs[0] if word is not None else None

    def shell_script(self) -> str:
        """The string to hand to the shell (SHELL + [this]) for the shell form, heredocs included."""
        if not self.prepend_shell:
            raise ValueError("RUN is in exec form: run `command` as it is")
        script = " ".join(self.command)
        single = self.single_heredoc
        if single is not None:
            return single.text
        for doc in self.heredocs:
            script += "\n" + doc.content + doc.name
        return script


@dataclass(kw_only=True)
class Copy(Instruction):
    """COPY: `sources` from the context (or `from_` stage/image) to `dest`; heredoc files in
    `heredoc_sources`."""

    sources: list[str] = field(default_factory=list)
    heredoc_sources: list[Heredoc] = field(default_factory=list)
    dest: str = ""
    from_: str | None = None
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    parents: bool = False
    exclude: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Add(Instruction):
    """ADD: like COPY, plus URLs, archives, `--checksum` and `--keep-git-dir`."""

    sources: list[str] = field(default_factory=list)
    heredoc_sources: list[Heredoc] = field(default_factory=list)
    dest: str = ""
    chown: str | None = None
    chmod: str | None = None
    link: bool = False
    checksum: str | None = None
    keep_git_dir: bool = False
    unpack: bool | None = None
    exclude: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Env(Instruction):
    """ENV: (name, value) pairs, values still quoted and unexpanded until resolved."""

    pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass(kw_only=True)
class Arg(Instruction):
    """ARG: (name, default or None); in a resolved stage, (name, value in force or None)."""

    pairs: list[tuple[str, str | None]] = field(default_factory=list)


@dataclass(kw_only=True)
class Label(Instruction):
    pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass(kw_only=True)
class Workdir(Instruction):
    path: str = ""


@dataclass(kw_only=True)
class User(Instruction):
    user: str = ""


@dataclass(kw_only=True)
class Cmd(Instruction):
    """CMD: exec-form argv, or `[command]` in shell form (`prepend_shell`); `[]` clears it."""

    command: list[str] = field(default_factory=list)
    prepend_shell: bool = True


@dataclass(kw_only=True)
class Entrypoint(Instruction):
    command: list[str] = field(default_factory=list)
    prepend_shell: bool = True


@dataclass(kw_only=True)
class Expose(Instruction):
    """EXPOSE: the words as written; resolved, normalised "port/proto" (ranges expanded)."""

    ports: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Volume(Instruction):
    paths: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class StopSignal(Instruction):
    signal: str = ""


@dataclass(kw_only=True)
class Healthcheck(Instruction):
    """HEALTHCHECK: `test` as in the image config (["NONE"], ["CMD", ...] or ["CMD-SHELL", cmd]);
    durations in nanoseconds and retries, 0 when not given."""

    test: list[str] = field(default_factory=list)
    interval: int = 0
    timeout: int = 0
    start_period: int = 0
    start_interval: int = 0
    retries: int = 0


@dataclass(kw_only=True)
class Shell(Instruction):
    shell: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Onbuild(Instruction):
    """ONBUILD: `expression` is the trigger's text (heredoc bodies appended) as stored in the image
    config; `trigger` the same parsed, for checking and for stages built FROM this one."""

    expression: str = ""
    trigger: Instruction | None = None


@dataclass(kw_only=True)
class Maintainer(Instruction):
    """MAINTAINER (deprecated): sets the image's author field; no label is added."""

    maintainer: str = ""


@dataclass
class Stage:
    """A build stage: FROM and the instructions up to the next FROM.

    `name` is lower-cased like Docker's (`AS Builder` is stage "builder"); `base` and `platform` are
    the words after FROM as written (ARGs unexpanded).
    """

    name: str | None
    base: str
    platform: str | None
    instructions: list[Instruction]
    line: int
    end_line: int = 0
    original: str = ""


@dataclass(kw_only=True)
class BaseImageConfig:
    """What `resolve()` needs from a base image's config: its `Env` ("K=V") and `OnBuild` triggers."""

    env: Sequence[str] = ()
    onbuild: Sequence[str] = ()


@dataclass(kw_only=True)
class ResolvedInstruction:
    """An instruction of a resolved stage: `instruction` is a copy with its words expanded.

    `env` is the build environment when the instruction runs (image ENV, ENV and ARG values; what a
    RUN sees, without the proxy variables), `from_onbuild` marks triggers inherited from the base.
    `source_stage`/`source_image` say where COPY --from reads; `mount_stages` maps RUN --mount
    `from=` values that name stages to their index.
    """

    instruction: Instruction
    env: dict[str, str]
    from_onbuild: bool = False
    source_stage: int | None = None
    source_image: str | None = None
    mount_stages: dict[str, int] = field(default_factory=dict)


@dataclass(kw_only=True)
class ResolvedStage:
    """A stage the target needs, ready to execute.

    `base` is the expanded FROM word ("scratch", an image reference, or a stage name when
    `base_stage` is set); `env`/`config_env` are the build environment and the image config's Env
    after the last instruction; `args` the ARGs in scope with their values; `proxy_env` the proxy
    build args to add to every RUN's environment.
    """

    index: int
    name: str | None
    base: str
    base_stage: int | None
    platform: str | None
    line: int
    instructions: list[ResolvedInstruction]
    env: dict[str, str]
    config_env: dict[str, str]
    args: dict[str, str | None]
    proxy_env: dict[str, str]
    is_target: bool = False

    @property
    def display_name(self) -> str:
        return self.name or f"stage-{self.index}"


# --------------------------------------------------------------------------------------------------
# Lines to nodes (port of BuildKit's parser package)
# --------------------------------------------------------------------------------------------------

_WHITESPACE = re.compile(r"[\t\v\f\r ]+")
_DIRECTIVE = re.compile(r"#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*", re.ASCII)
_HEREDOC = re.compile(r"(\d*)<<(-?)\s*([^<]*)", re.ASCII)
_VALID_DIRECTIVES = frozenset({"escape", "syntax", "check"})
_HEREDOC_KEYWORDS = frozenset({"run", "copy", "add"})

_KEYWORDS = (
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
)


class _Fail(Exception):
    """An error inside one instruction; the caller adds the file, line and (if not set) keyword."""

    def __init__(self, message: str, keyword: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.keyword = keyword

    def __str__(self) -> str:
        return self.message


@dataclass
class _Node:
    keyword: str  # as written
    args: list[str]
    flags: list[str]
    json_form: bool
    original: str
    line: int = 0
    end_line: int = 0
    heredocs: list[Heredoc] = field(default_factory=list)
    child: _Node | None = None

    @property
    def can_contain_heredoc(self) -> bool:
        node: _Node = self
        if node.keyword.lower() == "onbuild" and node.child is not None:
            node = node.child
        return node.keyword.lower() in _HEREDOC_KEYWORDS and not node.json_form


class _Directives:
    def __init__(self) -> None:
        self.escape = "\\"
        self.continuation = re.compile("")
        self.values: dict[str, str] = {}
        self.done = False
        self._set_escape("\\")

    def _set_escape(self, token: str) -> None:
        if token not in ("`", "\\"):
            raise _Fail(f"invalid escape token '{token}' does not match ` or \\")
        self.escape = token
        e = re.escape(token)
        # The escape is a continuation when last on the line, unless itself escaped (`\\`).
        self.continuation = re.compile(rf"([^{e}]){e}[ \t]*$|^{e}[ \t]*$")

    def consider(self, line: str) -> None:
        if self.done:
            return
        m = _DIRECTIVE.fullmatch(line)
        if m is None or m.group(1).lower() not in _VALID_DIRECTIVES:
            self.done = True
            return
        key = m.group(1).lower()
        if key in self.values:
            raise _Fail(f"only one {key} parser directive can be used")
        self.values[key] = m.group(2)
        if key == "escape":
            self._set_escape(m.group(2))


def _is_comment(line: str) -> bool:
    return _ltrim_space(line.rstrip("\r\n")).startswith("#")


def _split_lines(text: str) -> list[str]:
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _parse_words(rest: str, escape: str) -> list[str]:
    """BuildKit's parseWords: split at blanks outside quotes, keeping quotes and escapes."""
    spaces, word, quoted = 0, 1, 2
    words: list[str] = []
    phase = spaces
    quote = ""
    blank_ok = False
    buf: list[str] = []
    n = len(rest)
    i = 0
    while i <= n:
        at_end = i == n
        ch = "" if at_end else rest[i]
        if phase == spaces:
            if at_end:
                break
            if _is_space(ch):
                i += 1
                continue
            phase = word
        if at_end:
            if blank_ok or buf:
                words.append("".join(buf))
            break
        if phase == word:
            if _is_space(ch):
                phase = spaces
                if blank_ok or buf:
                    words.append("".join(buf))
                buf = []
                blank_ok = False
                i += 1
                continue
            if ch in _QUOTES:
                quote, blank_ok, phase = ch, True, quoted
            if ch == escape:
                if i + 1 == n:
                    i += 1
                    continue  # an escape at the end of the line is dropped
                buf.append(ch)
                i += 1
                ch = rest[i]
            buf.append(ch)
            i += 1
            continue
        # quoted
        if ch == quote:
            phase = word
        if ch == escape and quote != "'":
            if i + 1 == n:
                phase = word
                i += 1
                continue
            buf.append(ch)
            i += 1
            ch = rest[i]
        buf.append(ch)
        i += 1
    return words


def _extract_flags(line: str) -> tuple[str, list[str]]:
    """BuildKit's extractBuilderFlags: the leading `--flag[=value]` words, quotes and escapes
    removed, and the rest of the line."""
    spaces, word_phase, quoted = 0, 1, 2
    words: list[str] = []
    phase = spaces
    word: list[str] = []
    quote = ""
    blank_ok = False
    n = len(line)
    pos = 0
    while pos <= n:
        at_end = pos == n
        ch = "" if at_end else line[pos]
        if phase == spaces:
            if at_end:
                break
            if _is_space(ch):
                pos += 1
                continue
            if ch != "-" or pos + 1 == n or line[pos + 1] != "-":
                return line[pos:], words
            phase = word_phase
        if at_end:
            w = "".join(word)
            if w != "--" and (blank_ok or w):
                words.append(w)
            break
        if phase == word_phase:
            if _is_space(ch):
                phase = spaces
                w = "".join(word)
                if w == "--":
                    return line[pos:], words
                if blank_ok or w:
                    words.append(w)
                word = []
                blank_ok = False
                pos += 1
                continue
            if ch in _QUOTES:
                quote, blank_ok, phase = ch, True, quoted
                pos += 1
                continue
            if ch == "\\":
                if pos + 1 == n:
                    pos += 1
                    continue
                pos += 1
                ch = line[pos]
            word.append(ch)
            pos += 1
            continue
        # quoted
        if ch == quote:
            phase = word_phase
            pos += 1
            continue
        if ch == "\\":
            if pos + 1 == n:
                phase = word_phase
                pos += 1
                continue
            pos += 1
            ch = line[pos]
        word.append(ch)
        pos += 1
    return "", words


def _parse_json(rest: str) -> list[str] | None:
    """The exec form: a JSON array of strings, or None when `rest` is not a JSON array."""
    rest = _ltrim_space(rest)
    if not rest.startswith("["):
        return None

    def no_constants(name: str) -> object:
        raise ValueError(name)

    try:
        value = json.loads(rest, parse_constant=no_constants)
    except ValueError:
        return None
    if not isinstance(value, list):
        return None
    out: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise _Fail("when using JSON array syntax, arrays must be comprised of strings only")
        out.append(item)
    return out


def _maybe_json(rest: str) -> tuple[list[str], bool]:
    if rest == "":
        return [], False
    words = _parse_json(rest)
    if words is not None:
        return words, True
    return [rest], False


def _split_whitespace(rest: str) -> list[str]:
    return [] if rest == "" else _WHITESPACE.split(rest)


def _maybe_json_list(rest: str) -> tuple[list[str], bool]:
    words = _parse_json(rest)
    if words is not None:
        return words, True
    return _split_whitespace(rest), False


def _name_val(rest: str, key: str, escape: str) -> list[str]:
    words = _parse_words(rest, escape)
    if not words:
        return []
    if "=" not in words[0]:
        # Legacy form: ENV name value...; the value is the rest of the line as written.
        parts = _WHITESPACE.split(rest, maxsplit=1)
        if len(parts) < 2:
            raise _Fail(f"{key} NAME VALUE must have two arguments (or use {key} NAME=VALUE ...)")
        return [parts[0], parts[1]]
    out: list[str] = []
    for w in words:
        if "=" not in w:
            raise _Fail(f"Syntax error - can't find = in {_go_quote(w)}. Must be of the form: name=value")
        k, v = w.split("=", 1)
        out += [k, v]
    return out


def _new_node(line: str, escape: str) -> _Node:
    trimmed = _trim_space(line)
    parts = _WHITESPACE.split(trimmed, maxsplit=1)
    keyword = parts[0]
    flags: list[str] = []
    rest = ""
    if len(parts) == 2:
        rest, flags = _extract_flags(parts[1])
    rest = _trim_space(rest)
    node = _Node(keyword=keyword, args=[], flags=flags, json_form=False, original=line)
    try:
        _dispatch_node(node, keyword.lower(), rest, escape)
    except _Fail as e:
        raise _Fail(e.message, e.keyword or keyword.upper()) from None
    return node


def _dispatch_node(node: _Node, kw: str, rest: str, escape: str) -> None:
    if kw in ("add", "copy", "volume"):
        node.args, node.json_form = _maybe_json_list(rest)
    elif kw in ("cmd", "entrypoint", "run", "shell"):
        node.args, node.json_form = _maybe_json(rest)
    elif kw == "arg":
        node.args = _parse_words(rest, escape)
    elif kw in ("env", "label"):
        node.args = _name_val(rest, kw.upper(), escape)
    elif kw in ("expose", "from"):
        node.args = _split_whitespace(rest)
    elif kw in ("maintainer", "stopsignal", "user", "workdir"):
        node.args = [rest] if rest else []
    elif kw == "healthcheck":
        sep = 0
        while sep < len(rest) and not _is_space(rest[sep]):
            sep += 1
        if sep == 0:
            return
        nxt = sep
        while nxt < len(rest) and _is_space(rest[nxt]):
            nxt += 1
        cmd, node.json_form = _maybe_json(rest[nxt:])
        node.args = [rest[:sep], *cmd]
    elif kw == "onbuild" and rest:
        child = _new_node(rest, escape)
        node.child = child
        node.args = [child.keyword, *child.args]


def _heredoc_word(word: str) -> Heredoc | None:
    """BuildKit's ParseHeredoc: `word` as a heredoc opener, or None; errors for bad quoting."""
    m = _HEREDOC.fullmatch(word)
    if m is None or not m.group(3):
        return None
    rest = m.group(3)
    lexer = _Lexer("\\", skip_unset_env=True)
    try:
        words = lexer.process(rest, {})[1]
        if len(words) != 1:
            return None
        lexer.raw_quotes = True
        raw = lexer.process(rest, {})[1]
    except SubstitutionError as e:
        raise _Fail(f"bad heredoc delimiter {word!r}: {e}") from None
    if len(raw) != len(words):
        raise _Fail(f"internal lexing of heredoc produced inconsistent results: {rest}")

    def quotes(s: str) -> int:
        return s.count("'") + s.count('"')

    return Heredoc(
        name=words[0],
        expand=quotes(words[0]) == quotes(raw[0]),
        chomp=m.group(2) == "-",
        fd=int(m.group(1)) if m.group(1) else None,
    )


def _heredocs_from_line(line: str) -> list[Heredoc]:
    lexer = _Lexer("\\", raw_quotes=True, raw_escapes=True, skip_unset_env=True, heredoc_words=True)
    try:
        words = lexer.process(line, {})[1]
    except SubstitutionError:
        return []
    docs: list[Heredoc] = []
    for word in words:
        doc = _heredoc_word(word)
        if doc is not None:
            docs.append(doc)
    return docs


@dataclass
class _ParsedFile:
    nodes: list[_Node]
    directives: dict[str, str]
    escape: str
    warnings: list[str]


def _parse_nodes(text: str, filename: str) -> _ParsedFile:
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _split_lines(text)
    d = _Directives()
    nodes: list[_Node] = []
    warnings: list[str] = []
    n = len(lines)
    i = 0
    current = 0

    def process(raw: str, strip_left: bool) -> str:
        token = raw.rstrip("\r\n")
        if strip_left:
            token = _ltrim_space(token)
        try:
            d.consider(token)
        except _Fail as e:
            raise ContainerfileError(filename, current + 1, None, str(e)) from None
        return "" if _is_comment(token) else token

    def continuation(token: str) -> tuple[str, bool]:
        if d.continuation.search(token):
            return d.continuation.sub(r"\1", token), False
        return token, True

    while i < n:
        token = process(lines[i], True)
        i += 1
        current += 1
        start = current
        line, end_of_line = continuation(token)
        if end_of_line and line == "":
            continue
        empty_continuation = False
        while not end_of_line and i < n:
            raw = lines[i]
            token = process(raw, False)
            i += 1
            current += 1
            if _is_comment(raw):
                continue
            if _ltrim_space(token) == "":
                empty_continuation = True
                continue
            part, end_of_line = continuation(token)
            line += part
        if empty_continuation:
            warnings.append(
                f"{filename}:{start}: empty continuation line (Docker warns; it will become an error)"
            )
        try:
            node = _new_node(line, d.escape)
            if node.can_contain_heredoc and "<<" in line:
                docs = _heredocs_from_line(line)
                for doc in docs:
                    body: list[str] = []
                    terminated = False
                    while i < n:
                        raw = lines[i]
                        i += 1
                        current += 1
                        candidate = raw.rstrip("\r\n")
                        if doc.chomp:
                            candidate = candidate.lstrip("\t")
                        if candidate == doc.name:
                            terminated = True
                            break
                        body.append(raw)
                    if not terminated:
                        raise _Fail(
                            f"unterminated heredoc: no line {doc.name!r} closes <<{doc.name} "
                            "before the end of the file",
                            node.keyword.upper(),
                        )
                    doc.content = "".join(body)
                node.heredocs = docs
        except _Fail as e:
            raise ContainerfileError(filename, start, e.keyword, e.message) from None
        node.line, node.end_line = start, current
        nodes.append(node)
    return _ParsedFile(nodes, d.values, d.escape, warnings)


# --------------------------------------------------------------------------------------------------
# Nodes to typed instructions (port of BuildKit's instructions package)
# --------------------------------------------------------------------------------------------------

_FlagKind = Literal["bool", "string", "strings"]


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _is_subsequence(short: str, long: str) -> bool:
    it = iter(long)
    return all(ch in it for ch in short)


def _suggest(value: str, options: Iterable[str], case_sensitive: bool = False) -> str | None:
    """The closest option: a small edit distance (1 for short words, else 2) or an abbreviation."""
    if not value:
        return None
    v = value if case_sensitive else value.lower()
    limit = 1 if len(v) <= 3 else 2
    best: tuple[int, str] | None = None
    for option in options:
        o = option if case_sensitive else option.lower()
        dist = _levenshtein(v, o)
        close = dist <= limit or (len(v) >= 3 and _is_subsequence(v, o))
        if close and (best is None or dist < best[0]):
            best = (dist, option)
    return best[1] if best else None


def _with_suggestion(message: str, value: str, options: Iterable[str], case_sensitive: bool = False) -> str:
    match = _suggest(value, options, case_sensitive)
    return f"{message} (did you mean {match}?)" if match else message


FlagValue = bool | str | list[str]


def _parse_flags(raw: Sequence[str], spec: Mapping[str, _FlagKind]) -> dict[str, FlagValue]:
    """BuildKit's BFlags.Parse: `--name`, `--name=value`; repeatable `strings` flags."""
    values: dict[str, FlagValue] = {}
    for arg in raw:
        if not arg.startswith("--"):
            raise _Fail(f"arg should start with -- : {arg}")
        if arg == "--":
            break
        name, eq, value = arg[2:].partition("=")
        kind = spec.get(name)
        if kind is None:
            raise _Fail(_with_suggestion(f"unknown flag: {name}", name, spec, True))
        if name in values and kind != "strings":
            raise _Fail(f"duplicate flag specified: {name}")
        if kind == "bool":
            if eq and value == "":
                raise _Fail(f"missing a value on flag: {name}")
            lower = value.lower()
            if lower not in ("", "true", "false"):
                raise _Fail(f"expecting boolean value for flag {name}, not: {value}")
            values[name] = lower != "false"
        elif not eq:
            raise _Fail(f"missing a value on flag: {name}")
        elif kind == "string":
            values[name] = value
        else:
            current = values.setdefault(name, [])
            assert isinstance(current, list)
            current.append(value)
    return values


def _flag_str(values: Mapping[str, FlagValue], name: str) -> str | None:
    v = values.get(name)
    return v if isinstance(v, str) else None


def _flag_bool(values: Mapping[str, FlagValue], name: str) -> bool:
    return values.get(name) is True


def _flag_list(values: Mapping[str, FlagValue], name: str) -> list[str]:
    v = values.get(name)
    return list(v) if isinstance(v, list) else []


_STAGE_NAME = re.compile(r"[a-z][a-z0-9_.-]*")
_MOUNT_TYPES = frozenset({"bind", "cache", "tmpfs", "secret", "ssh"})
_MOUNT_KEYS = {
    "type": "type",
    "from": "from",
    "source": "source",
    "src": "source",
    "target": "target",
    "dst": "target",
    "destination": "target",
    "readonly": "readonly",
    "ro": "readonly",
    "readwrite": "readwrite",
    "rw": "readwrite",
    "required": "required",
    "id": "id",
    "sharing": "sharing",
    "mode": "mode",
    "uid": "uid",
    "gid": "gid",
    "size": "size",
    "env": "env",
}


def _parse_bool(key: str, value: str) -> bool:
    lower = value.lower()
    if lower in ("1", "t", "true"):
        return True
    if lower in ("0", "f", "false"):
        return False
    raise _Fail(f"invalid value for {key}: {value}")


def _parse_mount(spec: str, expander: Callable[[str], str] | None) -> RunMount:
    """A `--mount=` value (CSV of key=value; BuildKit's parseMount), values expanded if asked."""
    try:
        fields = next(csv.reader([spec], strict=True), [])
    except csv.Error as e:
        raise _Fail(f"invalid --mount value {spec!r}: {e}") from None
    mount = RunMount(spec=spec)
    for item in fields:
        key, eq, value = item.partition("=")
        key = key.lower()
        if not eq:
            if key in ("readonly", "ro"):
                mount.readonly = True
            elif key in ("readwrite", "rw"):
                mount.readonly = False
            elif key == "required" and mount.type in ("secret", "ssh"):
                mount.options["required"] = "true"
            else:
                raise _Fail(f"invalid field '{item}' must be a key=value pair")
            continue
        canonical = _MOUNT_KEYS.get(key)
        if canonical is None:
            raise _Fail(_with_suggestion(f"unexpected key '{key}' in '{item}'", key, _MOUNT_KEYS))
        if expander is not None:
            value = expander(value)
        if canonical == "type":
            if value.lower() not in _MOUNT_TYPES:
                raise _Fail(f"unsupported mount type {_go_quote(value)}")
            mount.type = value.lower()
        elif canonical == "from":
            mount.from_ = value
        elif canonical == "source":
            mount.source = value
        elif canonical == "target":
            mount.target = value
        elif canonical == "readonly":
            mount.readonly = _parse_bool(key, value)
        elif canonical == "readwrite":
            mount.readonly = not _parse_bool(key, value)
        elif canonical == "sharing":
            if value.lower() not in ("shared", "private", "locked"):
                raise _Fail(f"unsupported sharing value {_go_quote(value)}")
            mount.options["sharing"] = value.lower()
        elif canonical == "mode":
            try:
                int(value, 8)
            except ValueError:
                raise _Fail(f"invalid value {value} for mode") from None
            mount.options["mode"] = value
        elif canonical in ("uid", "gid"):
            if not value.isdigit():
                raise _Fail(f"invalid value {value} for {canonical}")
            mount.options[canonical] = value
        else:
            mount.options[canonical] = value
    if mount.type in ("bind", "cache", "tmpfs") and not mount.target:
        raise _Fail(f"--mount=type={mount.type} needs a target= (the path to mount it at)")
    return mount


def _parse_port_spec(raw: str) -> list[str]:
    """EXPOSE's word to "port/proto" entries (BuildKit's parsePortSpec; ranges expanded)."""
    parts = raw.split(":")
    if len(parts) == 1:
        ip, host_port, container = "", "", parts[0]
    elif len(parts) == 2:
        ip, host_port, container = "", parts[0], parts[1]
    else:
        ip, host_port, container = ":".join(parts[:-2]), parts[-2], parts[-1]
    port, _, proto = container.partition("/")
    if port == "":
        raise _Fail(f"no port specified: {container}<empty>")
    proto = proto.lower() or "tcp"
    if proto not in ("tcp", "udp", "sctp"):
        raise _Fail("invalid proto: " + proto)
    if ip.startswith("["):
        ip = ip[1:].rstrip("]")
    if ip and not re.fullmatch(r"[0-9A-Fa-f:.%a-zA-Z]+", ip):
        raise _Fail("invalid IP address: " + ip)
    try:
        start, end = _port_range(port)
    except _Fail:
        raise _Fail("invalid containerPort: " + port) from None
    if host_port:
        try:
            hstart, hend = _port_range(host_port)
        except _Fail:
            raise _Fail("invalid hostPort: " + host_port) from None
        if end - start != hend - hstart and end != start:
            raise _Fail(f"invalid ranges specified for container and host Ports: {port} and {host_port}")
    return [f"{p}/{proto}" for p in range(start, end + 1)]


def _port_range(ports: str) -> tuple[int, int]:
    def number(s: str) -> int:
        if not s.isdigit() or not s.isascii() or int(s) > 65535:
            raise _Fail(f"invalid port {s}")
        return int(s)

    if ports == "":
        raise _Fail("empty string specified for ports")
    if "-" not in ports:
        p = number(ports)
        return p, p
    pieces = ports.split("-")
    if len(pieces) != 2:
        raise _Fail(f"invalid port range format: {ports}")
    start, end = number(pieces[0]), number(pieces[1])
    if end < start:
        raise _Fail("invalid range specified for port: " + ports)
    return start, end


def _signal_names() -> frozenset[str]:
    names = {name.removeprefix("SIG") for name in _signal.Signals.__members__}
    names |= {f"RTMIN+{i}" for i in range(1, 16)} | {f"RTMAX-{i}" for i in range(1, 15)}
    names |= {"RTMIN", "RTMAX", "IOT", "CLD", "POLL", "UNUSED", "STKFLT", "PWR"}
    return frozenset(names)


_SIGNALS = _signal_names()


def _check_signal(sig: str) -> None:
    if re.fullmatch(r"[+-]?[0-9]+", sig):
        if int(sig) == 0:
            raise _Fail(f"Invalid signal: {sig}")
        return
    if sig.upper().removeprefix("SIG") not in _SIGNALS:
        raise _Fail(f"Invalid signal: {sig} (use a name like SIGTERM or SIGQUIT, or a number)")


_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128})")


def _has_variables(word: str, escape: str) -> bool:
    try:
        return expand(word, {}, escape=escape) != word
    except SubstitutionError:
        return True


def _exactly_one(node: _Node) -> str:
    if len(node.args) != 1:
        raise _Fail("requires exactly one argument")
    return node.args[0]


def _kv_pairs(args: list[str]) -> list[tuple[str, str]]:
    if not args:
        raise _Fail("requires at least one argument")
    if len(args) % 2:
        raise _Fail("bad input, too many arguments")
    pairs: list[tuple[str, str]] = []
    for i in range(0, len(args), 2):
        if args[i] == "":
            raise _Fail("names can not be blank")
        pairs.append((args[i], args[i + 1]))
    return pairs


_I = TypeVar("_I", bound=Instruction)


class _Builder:
    """Turns nodes into typed instructions; one per file (holds the escape token and warnings)."""

    def __init__(self, filename: str, escape: str, warnings: list[str]) -> None:
        self.filename = filename
        self.escape = escape
        self.warnings = warnings

    def error(self, node: _Node, message: str, keyword: str | None = None) -> ContainerfileError:
        return ContainerfileError(self.filename, node.line, keyword or node.keyword.upper(), message)

    def instruction(self, node: _Node) -> Instruction:
        try:
            return self._instruction(node)
        except _Fail as e:
            raise self.error(node, str(e)) from None

    @staticmethod
    def _make(cls: type[_I], node: _Node, **fields: Any) -> _I:
        return cls(
            keyword=node.keyword.upper(),
            line=node.line,
            end_line=node.end_line,
            original=node.original,
            args=list(node.args),
            flags=list(node.flags),
            json_form=node.json_form,
            heredocs=node.heredocs,
            **fields,
        )

    def _instruction(self, node: _Node) -> Instruction:
        kw = node.keyword.upper()
        method = getattr(self, "_i_" + kw.lower(), None)
        if method is None or kw == "FROM":
            if kw == "FROM":
                raise _Fail("FROM cannot appear here")
            raise _Fail(_with_suggestion("unknown instruction", kw, _KEYWORDS))
        result = method(node)
        assert isinstance(result, Instruction)
        return result

    # Each _i_<keyword> builds one instruction type from its node.

    def _i_run(self, node: _Node) -> Run:
        flags = _parse_flags(
            node.flags, {"mount": "strings", "network": "string", "security": "string", "device": "strings"}
        )
        if not node.args:
            raise _Fail("requires at least one argument (a command to run)")
        mounts = [_parse_mount(spec, None) for spec in _flag_list(flags, "mount")]
        network = _flag_str(flags, "network")
        if network is not None and network.lower() not in ("default", "none", "host"):
            raise _Fail(f"unsupported network mode {_go_quote(network)} (use default, none or host)")
        security = _flag_str(flags, "security")
        if security is not None and security.lower() not in ("sandbox", "insecure"):
            raise _Fail(f"unsupported security mode {_go_quote(security)} (use sandbox or insecure)")
        devices = _flag_list(flags, "device")
        unsupported = [
            f"RUN --mount=type={m.type} is not supported by cocon build yet"
            for m in mounts
            if m.type not in SUPPORTED_RUN_MOUNT_TYPES
        ]
        if network is not None and network.lower() not in SUPPORTED_RUN_NETWORKS:
            unsupported.append(f"RUN --network={network} is not supported by cocon build yet")
        if security is not None and security.lower() not in SUPPORTED_RUN_SECURITY:
            unsupported.append(f"RUN --security={security} is not supported by cocon build yet")
        if devices:
            unsupported.append("RUN --device is not supported by cocon build yet")
        return self._make(
            Run,
            node,
            command=list(node.args),
            prepend_shell=not node.json_form,
            mounts=mounts,
            network=network.lower() if network is not None else None,
            security=security.lower() if security is not None else None,
            devices=devices,
            unsupported=unsupported,
        )

    def _sources(self, node: _Node, kw: str) -> tuple[list[str], list[Heredoc], str]:
        if len(node.args) < 2:
            raise _Fail(
                "requires at least two arguments, but only one was provided. "
                "Destination could not be determined"
            )
        *srcs, dest = node.args
        if not node.json_form and _heredoc_word(dest) is not None:
            raise _Fail("cannot accept a heredoc as a destination")
        by_name = {doc.name: doc for doc in node.heredocs}
        paths: list[str] = []
        contents: list[Heredoc] = []
        for src in srcs:
            doc = _heredoc_word(src) if not node.json_form else None
            if doc is None:
                paths.append(src)
                continue
            found = by_name.get(doc.name)
            content = found.content if found else ""
            contents.append(
                Heredoc(name=doc.name, content=content, expand=doc.expand, chomp=doc.chomp, fd=doc.fd)
            )
        return paths, contents, dest

    def _i_copy(self, node: _Node) -> Copy:
        if len(node.args) < 2:
            self._sources(node, "COPY")
        flags = _parse_flags(
            node.flags,
            {
                "chown": "string",
                "from": "string",
                "chmod": "string",
                "link": "bool",
                "parents": "bool",
                "exclude": "strings",
            },
        )
        paths, contents, dest = self._sources(node, "COPY")
        from_ = _flag_str(flags, "from")
        if from_ is not None and _has_variables(from_, self.escape):
            raise _Fail(
                "variable expansion is not supported for --from, define a new stage with FROM using "
                "ARG from global scope as a workaround"
            )
        return self._make(
            Copy,
            node,
            sources=paths,
            heredoc_sources=contents,
            dest=dest,
            from_=from_ or None,
            chown=_flag_str(flags, "chown"),
            chmod=_flag_str(flags, "chmod"),
            link=_flag_bool(flags, "link"),
            parents=_flag_bool(flags, "parents"),
            exclude=_flag_list(flags, "exclude"),
        )

    def _i_add(self, node: _Node) -> Add:
        if len(node.args) < 2:
            self._sources(node, "ADD")
        flags = _parse_flags(
            node.flags,
            {
                "chown": "string",
                "chmod": "string",
                "link": "bool",
                "checksum": "string",
                "keep-git-dir": "bool",
                "unpack": "bool",
                "exclude": "strings",
            },
        )
        paths, contents, dest = self._sources(node, "ADD")
        unpack = flags.get("unpack")
        return self._make(
            Add,
            node,
            sources=paths,
            heredoc_sources=contents,
            dest=dest,
            chown=_flag_str(flags, "chown"),
            chmod=_flag_str(flags, "chmod"),
            link=_flag_bool(flags, "link"),
            checksum=_flag_str(flags, "checksum"),
            keep_git_dir=_flag_bool(flags, "keep-git-dir"),
            unpack=unpack if isinstance(unpack, bool) else None,
            exclude=_flag_list(flags, "exclude"),
        )

    def _i_env(self, node: _Node) -> Env:
        _parse_flags(node.flags, {})
        return self._make(Env, node, pairs=_kv_pairs(node.args))

    def _i_label(self, node: _Node) -> Label:
        _parse_flags(node.flags, {})
        return self._make(Label, node, pairs=_kv_pairs(node.args))

    def _i_arg(self, node: _Node) -> Arg:
        _parse_flags(node.flags, {})
        if not node.args:
            raise _Fail("requires at least one argument")
        pairs: list[tuple[str, str | None]] = []
        for word in node.args:
            if "=" in word:
                key, value = word.split("=", 1)
                if key == "":
                    raise _Fail("names can not be blank")
                pairs.append((key, value))
            else:
                pairs.append((word, None))
        return self._make(Arg, node, pairs=pairs)

    def _i_workdir(self, node: _Node) -> Workdir:
        path = _exactly_one(node)
        _parse_flags(node.flags, {})
        return self._make(Workdir, node, path=path)

    def _i_user(self, node: _Node) -> User:
        user = _exactly_one(node)
        _parse_flags(node.flags, {})
        return self._make(User, node, user=user)

    def _i_maintainer(self, node: _Node) -> Maintainer:
        who = _exactly_one(node)
        _parse_flags(node.flags, {})
        self.warnings.append(
            f"{self.filename}:{node.line}: MAINTAINER is deprecated; "
            "use LABEL org.opencontainers.image.authors=... instead"
        )
        return self._make(Maintainer, node, maintainer=who)

    def _i_stopsignal(self, node: _Node) -> StopSignal:
        sig = _exactly_one(node)
        _parse_flags(node.flags, {})
        if not _has_variables(sig, self.escape):
            _check_signal(sig)
        return self._make(StopSignal, node, signal=sig)

    def _command(self, node: _Node, kw: str) -> list[str]:
        _parse_flags(node.flags, {})
        if not node.args and not node.json_form:
            raise _Fail(f"requires at least one argument (write {kw} [] to clear it)")
        if not node.json_form and re.fullmatch(r"\[.*\]", node.args[0], re.DOTALL):
            self.warnings.append(
                f"{self.filename}:{node.line}: {kw} looks like an exec-form JSON array but is not valid "
                "JSON (use double quotes); it runs in shell form, as Docker does"
            )
        return list(node.args)

    def _i_cmd(self, node: _Node) -> Cmd:
        command = self._command(node, "CMD")
        return self._make(Cmd, node, command=command, prepend_shell=not node.json_form)

    def _i_entrypoint(self, node: _Node) -> Entrypoint:
        command = self._command(node, "ENTRYPOINT")
        return self._make(Entrypoint, node, command=command, prepend_shell=not node.json_form)

    def _i_shell(self, node: _Node) -> Shell:
        _parse_flags(node.flags, {})
        if not node.args:
            raise _Fail("requires at least one argument")
        if not node.json_form:
            raise _Fail('requires the arguments to be in JSON form, e.g. SHELL ["/bin/bash", "-c"]')
        return self._make(Shell, node, shell=list(node.args))

    def _i_expose(self, node: _Node) -> Expose:
        if not node.args:
            raise _Fail("requires at least one argument")
        _parse_flags(node.flags, {})
        for word in node.args:
            if not _has_variables(word, self.escape):
                _parse_port_spec(word)
        return self._make(Expose, node, ports=list(node.args))

    def _i_volume(self, node: _Node) -> Volume:
        if not node.args:
            raise _Fail("requires at least one argument")
        _parse_flags(node.flags, {})
        paths: list[str] = []
        for v in node.args:
            v = _trim_space(v)
            if v == "":
                raise _Fail("VOLUME specified can not be an empty string")
            paths.append(v)
        return self._make(Volume, node, paths=paths)

    def _i_healthcheck(self, node: _Node) -> Healthcheck:
        if not node.args:
            raise _Fail("requires at least one argument")
        typ = node.args[0].upper()
        rest = node.args[1:]
        if typ == "NONE":
            if rest or node.flags:
                raise _Fail("NONE takes no arguments")
            return self._make(Healthcheck, node, test=["NONE"])
        flags = _parse_flags(
            node.flags,
            {
                "interval": "string",
                "timeout": "string",
                "start-period": "string",
                "start-interval": "string",
                "retries": "string",
            },
        )
        if typ != "CMD":
            raise _Fail(f"unknown type {_go_quote(typ)} (try CMD)")
        if not rest:
            raise _Fail("missing command after CMD")
        test = ["CMD", *rest] if node.json_form else ["CMD-SHELL", " ".join(rest)]

        def duration(name: str) -> int:
            value = _flag_str(flags, name)
            if not value:
                return 0
            try:
                d = parse_duration(value)
            except ValueError as e:
                raise _Fail(f"--{name}: {e}") from None
            if d != 0 and d < 1_000_000:
                raise _Fail(f"Interval {_go_quote(name)} cannot be less than 1ms")
            return d

        retries = 0
        raw_retries = _flag_str(flags, "retries")
        if raw_retries:
            if not re.fullmatch(r"[+-]?[0-9]+", raw_retries) or abs(int(raw_retries)) >= 1 << 31:
                raise _Fail(f"--retries must be a whole number (not {raw_retries!r})")
            retries = int(raw_retries)
            if retries < 1:
                raise _Fail(f"--retries must be at least 1 (not {retries})")
        return self._make(
            Healthcheck,
            node,
            test=test,
            interval=duration("interval"),
            timeout=duration("timeout"),
            start_period=duration("start-period"),
            start_interval=duration("start-interval"),
            retries=retries,
        )

    def _i_onbuild(self, node: _Node) -> Onbuild:
        if not node.args or node.child is None:
            raise _Fail("requires at least one argument")
        _parse_flags(node.flags, {})
        trigger_kw = node.child.keyword.upper()
        if trigger_kw == "ONBUILD":
            raise _Fail("Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed")
        if trigger_kw in ("MAINTAINER", "FROM"):
            raise _Fail(f"{trigger_kw} isn't allowed as an ONBUILD trigger")
        child = dataclasses.replace(
            node.child, line=node.line, end_line=node.end_line, heredocs=node.heredocs
        )
        try:
            trigger = self._instruction(child)
        except _Fail as e:
            raise self.error(node, str(e), f"ONBUILD {trigger_kw}") from None
        expression = re.sub(r"(?i)^\s*ONBUILD\s*", "", node.original)
        for doc in node.heredocs:
            expression += "\n" + doc.content + doc.name
        return self._make(Onbuild, node, expression=expression, trigger=trigger)

    def stage(self, node: _Node) -> Stage:
        try:
            flags = _parse_flags(node.flags, {"platform": "string"})
            args = node.args
            name: str | None = None
            if len(args) == 3 and args[1].lower() == "as":
                name = args[2].lower()
                if not _STAGE_NAME.fullmatch(name):
                    raise _Fail(
                        f"invalid name for build stage: {_go_quote(args[2])}, "
                        "name can't start with a number or contain symbols"
                    )
            elif len(args) != 1:
                raise _Fail("requires either one or three arguments (FROM image [AS name])")
        except _Fail as e:
            raise self.error(node, str(e)) from None
        return Stage(
            name=name,
            base=args[0],
            platform=_flag_str(flags, "platform"),
            instructions=[],
            line=node.line,
            end_line=node.end_line,
            original=node.original,
        )


def _parse_trigger(expression: str, line: int, filename: str, escape: str) -> Instruction:
    """An ONBUILD trigger from a base image's config, parsed as an instruction of the stage at `line`."""

    def fail(message: str) -> ContainerfileError:
        return ContainerfileError(
            filename, line, "FROM", f"ONBUILD trigger {expression!r} of the base image: {message}"
        )

    try:
        parsed = _parse_nodes(expression, filename)
    except ContainerfileError as e:
        raise fail(e.message) from None
    if len(parsed.nodes) != 1 or parsed.nodes[0].keyword.upper() in ("FROM", "ONBUILD", "MAINTAINER"):
        raise fail("not a single instruction that ONBUILD allows")
    node = parsed.nodes[0]
    node.line = node.end_line = line
    try:
        return _Builder(filename, escape, []).instruction(node)
    except ContainerfileError as e:
        raise fail(e.message) from None


# --------------------------------------------------------------------------------------------------
# The file, and its resolution for a build
# --------------------------------------------------------------------------------------------------

_ARCHES = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", ""),
    "i686": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
}


def default_platform_args(target_platform: str | None = None) -> dict[str, str]:
    """BuildKit's automatic platform ARGs (BUILDPLATFORM, TARGETARCH, ...) for this host, building
    for `target_platform` ("os/arch[/variant]") or for the host itself."""
    arch, variant = _ARCHES.get(_platform.machine().lower(), (_platform.machine().lower(), ""))
    build = f"linux/{arch}" + (f"/{variant}" if variant else "")
    target = target_platform or build
    t_os, _, t_rest = target.partition("/")
    t_arch, _, t_variant = t_rest.partition("/")
    return {
        "BUILDPLATFORM": build,
        "BUILDOS": "linux",
        "BUILDARCH": arch,
        "BUILDVARIANT": variant,
        "TARGETPLATFORM": target,
        "TARGETOS": t_os,
        "TARGETARCH": t_arch,
        "TARGETVARIANT": t_variant,
    }


_PLATFORM = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,2}")


@dataclass(kw_only=True)
class Containerfile:
    """A parsed Containerfile: directives, global ARGs and stages, words not yet expanded."""

    filename: str
    stages: list[Stage]
    global_args: list[Arg] = field(default_factory=list)
    escape: str = "\\"
    directives: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def syntax(self) -> str | None:
        """The `# syntax=` directive (cocon does not load external frontends; it is recorded only)."""
        return self.directives.get("syntax")

    @property
    def global_arg_defaults(self) -> dict[str, str | None]:
        """The ARGs before the first FROM with their defaults as written (None: no default)."""
        return {k: v for arg in self.global_args for k, v in arg.pairs}

    def find_stage(self, name: str) -> int | None:
        """The index of the stage called `name` (case-insensitive; the last one if repeated)."""
        found = None
        for i, stage in enumerate(self.stages):
            if stage.name is not None and stage.name == name.lower():
                found = i
        return found

    def resolve(
        self,
        build_args: Mapping[str, str] | None = None,
        target: str | None = None,
        *,
        base_image: Callable[[str, str | None], BaseImageConfig | None] | None = None,
        platform_args: Mapping[str, str] | None = None,
    ) -> list[ResolvedStage]:
        """The stages `target` (default: the last stage) needs, in file order, words expanded.

        `build_args` are `--build-arg` values: they override the defaults of declared ARGs (global
        or in a stage); undeclared ones are ignored, except the proxy variables (`proxy_env`) and the
        platform ARGs. `base_image(ref, platform)` may return a base image's config so that its ENV
        takes part in expansion and its ONBUILD triggers run (it is called only for stages the
        target needs, never for `scratch` or stage bases); without it images count as having no ENV.
        `platform_args` replace `default_platform_args()`.
        """
        return _Resolver(self, build_args or {}, base_image, platform_args).run(target)

    def unused_build_args(self, build_args: Mapping[str, str], target: str | None = None) -> list[str]:
        """Build args no ARG of the target's stages (or the global scope) declares: Docker warns
        "One or more build-args [...] were not consumed"."""
        resolver = _Resolver(self, build_args, None, None)
        selected = resolver.select(resolver.target_index(target))
        used = set(PROXY_ARGS) | set(_PLATFORM_ARGS) | {"SOURCE_DATE_EPOCH"}
        used |= {k for arg in self.global_args for k, _ in arg.pairs}
        for i in selected:
            for ins, _ in resolver.stage_instructions(i):
                if isinstance(ins, Arg):
                    used |= {k for k, _ in ins.pairs}
        return sorted(k for k in build_args if k not in used and not k.startswith("BUILDKIT_"))


def parse(text: str, filename: str = "Containerfile") -> Containerfile:
    """Parse a Containerfile. Raises ContainerfileError (`FILE:LINE: INSTRUCTION: message`)."""
    if text == "":
        raise ContainerfileError(filename, None, None, "the Containerfile is empty: it needs at least a FROM")
    parsed = _parse_nodes(text, filename)
    if not parsed.nodes:
        raise ContainerfileError(
            filename, None, None, "file with no instructions: a Containerfile needs at least a FROM"
        )
    builder = _Builder(filename, parsed.escape, parsed.warnings)
    stages: list[Stage] = []
    global_args: list[Arg] = []
    # Typed conversion reports the first broken instruction in file order, like Docker.
    for node in parsed.nodes:
        if node.keyword.lower() == "from":
            stages.append(builder.stage(node))
            continue
        ins = builder.instruction(node)
        if not stages:
            if isinstance(ins, Arg):
                global_args.append(ins)
                continue
            raise ContainerfileError(
                filename,
                node.line,
                ins.keyword,
                "no build stage in current context: the file must start with FROM "
                "(only ARG and parser directives may come before it)",
            )
        stages[-1].instructions.append(ins)
    if not stages:
        raise ContainerfileError(
            filename, None, None, "the Containerfile contains no stages to build: add a FROM instruction"
        )
    seen: dict[str, int] = {}
    for stage in stages:
        if stage.name is not None:
            if stage.name in seen:
                parsed.warnings.append(
                    f"{filename}:{stage.line}: duplicate stage name {stage.name!r} (first defined on line "
                    f"{seen[stage.name]}); later references use this one"
                )
            seen[stage.name] = stage.line
    return Containerfile(
        filename=filename,
        stages=stages,
        global_args=global_args,
        escape=parsed.escape,
        directives=parsed.directives,
        warnings=parsed.warnings,
    )


@dataclass
class _StageState:
    env: dict[str, str]
    config_env: dict[str, str]
    args: dict[str, str | None]


class _Resolver:
    def __init__(
        self,
        cf: Containerfile,
        build_args: Mapping[str, str],
        base_image: Callable[[str, str | None], BaseImageConfig | None] | None,
        platform_args: Mapping[str, str] | None,
    ) -> None:
        self.cf = cf
        self.build_args = dict(build_args)
        self.base_image = base_image
        builtins = dict(default_platform_args() if platform_args is None else platform_args)
        for key in builtins:
            if key in self.build_args:
                builtins[key] = self.build_args[key]
        self.global_env = builtins
        for arg in cf.global_args:
            for key, default in arg.pairs:
                if key in self.build_args:
                    self.global_env[key] = self.build_args[key]
                elif default is not None:
                    self.global_env[key] = self.expand(default, self.global_env, arg)
        self.bases: list[tuple[str, int | None, str | None]] = []
        for i, stage in enumerate(cf.stages):
            self.bases.append(self._base(i, stage))
        self._image_configs: dict[int, BaseImageConfig | None] = {}
        self._triggers: dict[int, list[Instruction]] = {}

    # -- expansion -----------------------------------------------------------------------------

    def fail(self, ins: Instruction | Stage, message: str) -> ContainerfileError:
        keyword = ins.keyword if isinstance(ins, Instruction) else "FROM"
        return ContainerfileError(self.cf.filename, ins.line, keyword, message)

    def expand(self, word: str, env: Mapping[str, str], ins: Instruction | Stage) -> str:
        try:
            return expand(word, env, escape=self.cf.escape)
        except SubstitutionError as e:
            raise self.fail(ins, str(e)) from None

    def _base(self, i: int, stage: Stage) -> tuple[str, int | None, str | None]:
        base = self.expand(stage.base, self.global_env, stage)
        if base == "":
            raise self.fail(stage, f"base name ({stage.base}) should not be blank")
        base_stage = None
        for j in range(i):
            if self.cf.stages[j].name == base.lower():
                base_stage = j
        plat: str | None = None
        if stage.platform is not None:
            plat = self.expand(stage.platform, self.global_env, stage)
            if plat == "":
                raise self.fail(stage, f"empty platform value from expression {stage.platform}")
            if not _PLATFORM.fullmatch(plat):
                raise self.fail(
                    stage,
                    f"failed to parse platform {plat!r}: expected os[/arch[/variant]], e.g. linux/amd64",
                )
            plat = plat.lower()
        return base, base_stage, plat

    # -- stage selection -------------------------------------------------------------------------

    def target_index(self, target: str | None) -> int:
        if target is None:
            return len(self.cf.stages) - 1
        found = self.cf.find_stage(target)
        if found is None:
            names = [s.name for s in self.cf.stages if s.name]
            message = f"target stage {_go_quote(target)} could not be found"
            message = _with_suggestion(message, target, names)
            if names:
                message += f"; stages: {', '.join(names)}"
            else:
                message += "; no stage has a name (use FROM image AS name)"
            raise ContainerfileError(self.cf.filename, None, "--target", message)
        return found

    def _image_config(self, i: int) -> BaseImageConfig | None:
        if i not in self._image_configs:
            base, base_stage, plat = self.bases[i]
            config = None
            if base_stage is None and base != "scratch" and self.base_image is not None:
                config = self.base_image(base, plat)
            self._image_configs[i] = config
        return self._image_configs[i]

    def triggers(self, i: int) -> list[Instruction]:
        """ONBUILD triggers a stage runs first: its base stage's ONBUILDs, or its base image's."""
        if i not in self._triggers:
            stage = self.cf.stages[i]
            base_stage = self.bases[i][1]
            found: list[Instruction] = []
            if base_stage is not None:
                for ins in self.cf.stages[base_stage].instructions:
                    if isinstance(ins, Onbuild) and ins.trigger is not None:
                        found.append(dataclasses.replace(ins.trigger, line=stage.line, end_line=stage.line))
            else:
                config = self._image_config(i)
                for expression in config.onbuild if config else ():
                    found.append(_parse_trigger(expression, stage.line, self.cf.filename, self.cf.escape))
            self._triggers[i] = found
        return self._triggers[i]

    def stage_instructions(self, i: int) -> list[tuple[Instruction, bool]]:
        out = [(t, True) for t in self.triggers(i)]
        out += [(ins, False) for ins in self.cf.stages[i].instructions]
        return out

    def ref(self, value: str, ins: Instruction) -> int | str:
        """A `--from`/`from=` value: a stage index (by name or number), or else an image reference."""
        if re.fullmatch(r"[+-]?[0-9]+", value):
            index = int(value)
            if index < 0 or index >= len(self.cf.stages):
                last = len(self.cf.stages) - 1
                raise self.fail(ins, f"invalid stage index {index} (stages are numbered 0 to {last})")
            return index
        found = self.cf.find_stage(value)
        return value if found is None else found

    def deps(self, i: int) -> list[int]:
        out: list[int] = []
        base_stage = self.bases[i][1]
        if base_stage is not None:
            out.append(base_stage)
        for ins, _ in self.stage_instructions(i):
            for value in self._from_values(ins):
                ref = self.ref(value, ins)
                if isinstance(ref, int):
                    out.append(ref)
        return out

    @staticmethod
    def _from_values(ins: Instruction) -> list[str]:
        if isinstance(ins, Copy) and ins.from_:
            return [ins.from_]
        if isinstance(ins, Run):
            return [m.from_ for m in ins.mounts if m.from_]
        return []

    def select(self, target: int) -> list[int]:
        selected = {target}
        todo = [target]
        while todo:
            i = todo.pop()
            for dep in self.deps(i):
                if dep not in selected:
                    selected.add(dep)
                    todo.append(dep)
        return sorted(selected)

    # -- dispatch ------------------------------------------------------------------------------

    def run(self, target: str | None) -> list[ResolvedStage]:
        target_index = self.target_index(target)
        selected = self.select(target_index)
        proxy_env = {k: self.build_args[k] for k in PROXY_ARGS if k in self.build_args}
        states: dict[int, _StageState] = {}
        out: list[ResolvedStage] = []
        for i in selected:
            stage = self.cf.stages[i]
            base, base_stage, plat = self.bases[i]
            if base_stage is not None:
                parent = states[base_stage]
                state = _StageState(dict(parent.env), dict(parent.config_env), dict(parent.args))
            else:
                config = self._image_config(i)
                config_env: dict[str, str] = {}
                for item in config.env if config else ():
                    key, _, value = item.partition("=")
                    config_env[key] = value
                config_env.setdefault("PATH", DEFAULT_PATH)
                state = _StageState(dict(config_env), config_env, {})
            resolved = [
                self.dispatch(i, ins, state, from_onbuild) for ins, from_onbuild in self.stage_instructions(i)
            ]
            states[i] = state
            out.append(
                ResolvedStage(
                    index=i,
                    name=stage.name,
                    base=base,
                    base_stage=base_stage,
                    platform=plat,
                    line=stage.line,
                    instructions=resolved,
                    env=dict(state.env),
                    config_env=dict(state.config_env),
                    args=dict(state.args),
                    proxy_env=dict(proxy_env),
                    is_target=i == target_index,
                )
            )
        return out

    def _stage_dep(self, i: int, value: str, ins: Instruction) -> int | str:
        ref = self.ref(value, ins)
        if isinstance(ref, int):
            index = ref
            here = self.cf.stages[i].name or f"stage-{i}"
            if index == i:
                raise self.fail(ins, f"circular dependency detected on stage: {here}")
            if index > i:
                verb = "mount" if isinstance(ins, Run) else "copy"
                raise self.fail(
                    ins,
                    f"cannot {verb} from stage {_go_quote(value)}, it needs to be defined before current "
                    f"stage {_go_quote(here)}",
                )
        return ref

    def dispatch(
        self, i: int, ins: Instruction, state: _StageState, from_onbuild: bool
    ) -> ResolvedInstruction:
        env = dict(state.env)

        def x(word: str) -> str:
            return self.expand(word, env, ins)

        def x_opt(word: str | None) -> str | None:
            return None if word is None else x(word)

        result = ResolvedInstruction(instruction=ins, env=env, from_onbuild=from_onbuild)
        new: Instruction = ins
        if isinstance(ins, Env):
            pairs = [(x(k), x(v)) for k, v in ins.pairs]
            for k, v in pairs:
                state.env[k] = v
                state.config_env[k] = v
            new = dataclasses.replace(ins, pairs=pairs)
        elif isinstance(ins, Arg):
            values: list[tuple[str, str | None]] = []
            for key, default in ins.pairs:
                value: str | None
                if key in self.build_args:
                    value = self.build_args[key]
                elif default is None:
                    value = self.global_env.get(key)
                else:
                    value = self.expand(default, state.env, ins)
                if value is not None:
                    state.env[key] = value
                state.args[key] = value
                values.append((key, value))
            new = dataclasses.replace(ins, pairs=values)
        elif isinstance(ins, Label):
            new = dataclasses.replace(ins, pairs=[(x(k), x(v)) for k, v in ins.pairs])
        elif isinstance(ins, Workdir):
            new = dataclasses.replace(ins, path=x(ins.path))
        elif isinstance(ins, User):
            new = dataclasses.replace(ins, user=x(ins.user))
        elif isinstance(ins, StopSignal):
            sig = x(ins.signal)
            try:
                _check_signal(sig)
            except _Fail as e:
                raise self.fail(ins, str(e)) from None
            new = dataclasses.replace(ins, signal=sig)
        elif isinstance(ins, Volume):
            paths = [x(p) for p in ins.paths]
            if "" in paths:
                raise self.fail(ins, "VOLUME specified can not be an empty string")
            new = dataclasses.replace(ins, paths=paths)
        elif isinstance(ins, Expose):
            ports: list[str] = []
            for word in ins.ports:
                try:
                    words = expand_words(word, env, escape=self.cf.escape)
                except SubstitutionError as e:
                    raise self.fail(ins, str(e)) from None
                for w in words:
                    try:
                        ports += _parse_port_spec(w)
                    except _Fail as e:
                        raise self.fail(ins, str(e)) from None
            new = dataclasses.replace(ins, ports=ports)
        elif isinstance(ins, Copy):
            if ins.from_:
                ref = self._stage_dep(i, ins.from_, ins)
                if isinstance(ref, int):
                    result.source_stage = ref
                else:
                    result.source_image = ref
            new = dataclasses.replace(
                ins,
                sources=[x(s) for s in ins.sources],
                heredoc_sources=self._heredoc_files(ins.heredoc_sources, env, ins),
                dest=x(ins.dest),
                chown=x_opt(ins.chown),
                chmod=x_opt(ins.chmod),
            )
        elif isinstance(ins, Add):
            checksum = x_opt(ins.checksum)
            if checksum is not None and not _DIGEST.fullmatch(checksum):
                raise self.fail(
                    ins, f"invalid checksum digest format {checksum!r} (want sha256:<64 hex digits>)"
                )
            new = dataclasses.replace(
                ins,
                sources=[x(s) for s in ins.sources],
                heredoc_sources=self._heredoc_files(ins.heredoc_sources, env, ins),
                dest=x(ins.dest),
                chown=x_opt(ins.chown),
                chmod=x_opt(ins.chmod),
                checksum=checksum,
            )
        elif isinstance(ins, Run) and ins.mounts:
            mounts: list[RunMount] = []
            for m in ins.mounts:
                try:
                    mount = _parse_mount(m.spec, x)
                except _Fail as e:
                    raise self.fail(ins, str(e)) from None
                if m.from_:
                    ref = self._stage_dep(i, m.from_, ins)
                    if isinstance(ref, int):
                        result.mount_stages[m.from_] = ref
                mounts.append(mount)
            new = dataclasses.replace(ins, mounts=mounts)
        result.instruction = new
        return result

    def _heredoc_files(self, docs: list[Heredoc], env: Mapping[str, str], ins: Instruction) -> list[Heredoc]:
        out: list[Heredoc] = []
        for doc in docs:
            text = doc.text
            if doc.expand:
                try:
                    text = _expand_raw(text, env)
                except SubstitutionError as e:
                    raise self.fail(ins, str(e)) from None
            out.append(Heredoc(name=doc.name, content=text, expand=False, chomp=False, fd=doc.fd))
        return out
