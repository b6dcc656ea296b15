"""Containerfile parsing, substitution and stage resolution, checked against Docker's own test data
(BuildKit's shell/envVarTest, wordsTest and lex_test.go, parser and heredoc tests, testfiles)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping

import pytest

from cocon.images import containerfile as cfmod
from cocon.images.build_errors import BuildError, ContainerfileError, SubstitutionError
from cocon.images.containerfile import (
    DEFAULT_PATH,
    Add,
    Arg,
    BaseImageConfig,
    Cmd,
    Containerfile,
    Copy,
    Entrypoint,
    Env,
    Expose,
    Healthcheck,
    Instruction,
    Label,
    Maintainer,
    Onbuild,
    ResolvedStage,
    Run,
    Shell,
    StopSignal,
    User,
    Volume,
    Workdir,
    default_platform_args,
    expand,
    expand_words,
    parse,
    parse_duration,
)

PLATFORM = {
    "BUILDPLATFORM": "linux/amd64",
    "BUILDOS": "linux",
    "BUILDARCH": "amd64",
    "BUILDVARIANT": "",
    "TARGETPLATFORM": "linux/arm64",
    "TARGETOS": "linux",
    "TARGETARCH": "arm64",
    "TARGETVARIANT": "",
}


def resolve(
    text: str, build_args: Mapping[str, str] | None = None, target: str | None = None, **kw: object
) -> list[ResolvedStage]:
    return parse(text).resolve(build_args, target, platform_args=PLATFORM, **kw)  # type: ignore[arg-type]


def only(text: str) -> Instruction:
    """The single instruction after `FROM scratch`."""
    cf = parse("FROM scratch\n" + text)
    assert len(cf.stages[0].instructions) == 1
    return cf.stages[0].instructions[0]


def error_of(text: str, filename: str = "Containerfile") -> str:
    with pytest.raises(ContainerfileError) as info:
        parse(text, filename)
    return str(info.value)


# ============================================================================ the shell lexer

# BuildKit frontend/dockerfile/shell/envVarTest (the "A" and "U" lines), env as in lex_test.go.
ENV_VAR_TEST = r"""
hello                    |     hello
he'll'o                  |     hello
he'llo                   |     error
he\'llo                  |     he'llo
he\\'llo                 |     error
abc\tdef                 |     abctdef
"abc\tdef"               |     abc\tdef
"abc\\tdef"              |     abc\tdef
'abc\tdef'               |     abc\tdef
hello\                   |     hello
hello\\                  |     hello\
"hello                   |     error
"hello\"                 |     error
"hel'lo"                 |     hel'lo
'hello                   |     error
'hello\'                 |     hello\
'hello\there'            |     hello\there
'hello\\there'           |     hello\\there
"''"                     |     ''
$.                       |     $.
he$1x                    |     hex
he$.x                    |     he$.x
he$pwd.                  |     he.
he$PWD                   |     he/home
he\$PWD                  |     he$PWD
he\\$PWD                 |     he\/home
"he\$PWD"                |     he$PWD
"he\\$PWD"               |     he\/home
\${}                     |     ${}
\${}aaa                  |     ${}aaa
he\${}                   |     he${}
he\${}xx                 |     he${}xx
${}                      |     error
${}aaa                   |     error
he${}                    |     error
he${}xx                  |     error
he${hi}                  |     he
he${hi}xx                |     hexx
he${PWD}                 |     he/home
he${.}                   |     error
he${XXX:-000}xx          |     he000xx
he${PWD:-000}xx          |     he/homexx
he${XXX:-$PWD}xx         |     he/homexx
he${XXX:-${PWD:-yyy}}xx  |     he/homexx
he${XXX:-${YYY:-yyy}}xx  |     heyyyxx
he${XXX:YYY}             |     error
he${XXX?}                |     error
he${XXX:?}               |     error
he${PWD?}                |     he/home
he${PWD:?}               |     he/home
he${NULL?}               |     he
he${NULL:?}              |     error
he${XXX:+${PWD}}xx       |     hexx
he${PWD:+${XXX}}xx       |     hexx
he${PWD:+${SHELL}}xx     |     hebashxx
he${XXX:+000}xx          |     hexx
he${PWD:+000}xx          |     he000xx
'he${XX}'                |     he${XX}
"he${PWD}"               |     he/home
"he'$PWD'"               |     he'/home'
"$PWD"                   |     /home
'$PWD'                   |     $PWD
'\$PWD'                  |     \$PWD
'"hello"'                |     "hello"
he\$PWD                  |     he$PWD
"he\$PWD"                |     he$PWD
'he\$PWD'                |     he\$PWD
he${PWD                  |     error
he${PWD:=000}xx          |     error
he${PWD:+${PWD}:}xx      |     he/home:xx
he${XXX:-\$PWD:}xx       |     he$PWD:xx
he${XXX:-\${PWD}z}xx     |     he${PWDz}xx
안녕하세요                 |     안녕하세요
안'녕'하세요               |     안녕하세요
안'녕하세요                |     error
안녕\'하세요               |     안녕'하세요
안\\'녕하세요              |     error
안녕\t하세요               |     안녕t하세요
"안녕\t하세요"             |     안녕\t하세요
'안녕\t하세요              |     error
안녕하세요\                |     안녕하세요
안녕하세요\\               |     안녕하세요\
"안녕하세요                |     error
"안녕하세요\"              |     error
"안녕'하세요"              |     안녕'하세요
'안녕하세요'               |     안녕하세요
'안녕하세요\'              |     안녕하세요\
$KOREAN                  |     한국어
안녕$KOREAN              |     안녕한국어
"""
LEX_ENV = {"PWD": "/home", "SHELL": "bash", "KOREAN": "한국어", "NULL": ""}


def _table(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in text.strip().splitlines():
        source, expected = line.split("|")
        rows.append((source.strip(), expected.strip()))
    return rows


@pytest.mark.parametrize(("source", "expected"), _table(ENV_VAR_TEST))
def test_env_var_test(source: str, expected: str) -> None:
    if expected == "error":
        with pytest.raises(SubstitutionError):
            expand(source, LEX_ENV)
    else:
        assert expand(source, LEX_ENV) == expected


# BuildKit frontend/dockerfile/shell/wordsTest: ENV lines add to the environment as they come.
WORDS_TEST = [
    ("hello", {}, ["hello"]),
    ("hello${hi}bye", {}, ["hellobye"]),
    ("hello${hi}bye", {"hi": "hi"}, ["hellohibye"]),
    ("hello${space}bye", {"space": "abc  def"}, ["helloabc", "defbye"]),
    ('hello"${space}"bye', {"space": "abc  def"}, ["helloabc  defbye"]),
    ('hello "${space}"bye', {"space": "abc  def"}, ["hello", "abc  defbye"]),
    ("hello${leading}def", {"leading": "  ab c"}, ["hello", "ab", "cdef"]),
    ('hello"${leading}" def', {"leading": "  ab c"}, ["hello  ab c", "def"]),
    ('hello"${leading}"', {"leading": "  ab c"}, ["hello  ab c"]),
    ("hello${leading}", {"leading": "  ab c"}, ["hello", "ab", "c"]),
    ("hello${trailing}", {"trailing": "ab c   "}, ["helloab", "c"]),
    ("hello${trailing}d", {"trailing": "ab c   "}, ["helloab", "c", "d"]),
    ('hello"${trailing}"d', {"trailing": "ab c   "}, ["helloab c   d"]),
    ('hel"lo${trailing}"', {"trailing": "ab c   "}, ["helloab c   "]),
    ('hello" there  "', {}, ["hello there  "]),
    ("hello there", {}, ["hello", "there"]),
    ("hello\\ there", {}, ["hello there"]),
    ('hello" there', {}, None),
    ('hello\\" there', {}, ['hello"', "there"]),
    ('hello"\\\\there"', {}, ["hello\\there"]),
    ('hello"\\there"', {}, ["hello\\there"]),
    ("hello'\\\\there'", {}, ["hello\\\\there"]),
    ("hello'\\there'", {}, ["hello\\there"]),
    ("hello'$there'", {}, ["hello$there"]),
    ('"" a', {}, ["a"]),
]


@pytest.mark.parametrize(("source", "env", "words"), WORDS_TEST)
def test_words_test(source: str, env: dict[str, str], words: list[str] | None) -> None:
    if words is None:
        with pytest.raises(SubstitutionError):
            expand_words(source, env)
    else:
        assert expand_words(source, env) == words


# lex_test.go TestProcessWithMatches: modifiers, patterns and replacements.
PROCESS_WITH_MATCHES = [
    ("x", {"DUMMY": "dummy"}, "x"),
    ("x ${UNUSED}", {"DUMMY": "dummy"}, "x "),
    ("x ${FOO}", {"FOO": "y"}, "x y"),
    ("${FOO-aaa} ${BAR-bbb} ${BAZ-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx  ccc"),
    ("${FOO:-aaa} ${BAR:-bbb} ${BAZ:-ccc}", {"FOO": "xxx", "BAR": ""}, "xxx bbb ccc"),
    ("${FOO:-}", {"FOO": "xxx", "BAR": ""}, "xxx"),
    ("${FOO:-}", {}, ""),
    ("${FOO+aaa} ${BAR+bbb} ${BAZ+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa bbb "),
    ("${FOO:+aaa} ${BAR:+bbb} ${BAZ:+ccc}", {"FOO": "xxx", "BAR": ""}, "aaa  "),
    ("${FOO?aaa}", {"FOO": "xxx", "BAR": ""}, "xxx"),
    ("${BAR?bbb}", {"FOO": "xxx", "BAR": ""}, ""),
    ("${BAZ?ccc}", {"FOO": "xxx", "BAR": ""}, None),
    ("${FOO:?aaa}", {"FOO": "xxx", "BAR": ""}, "xxx"),
    ("${BAR:?bbb}", {"FOO": "xxx", "BAR": ""}, None),
    ("${BAZ:?ccc}", {"FOO": "xxx", "BAR": ""}, None),
    ("${BAZ:?}", {"FOO": "xxx", "BAR": ""}, None),
    ("${FOO=aaa}", {"FOO": "xxx", "BAR": ""}, None),
    ("${FOO=:aaa}", {"FOO": "xxx", "BAR": ""}, None),
    ("${FOO=}", {}, None),
    ("${FOO#()[]{\\}^$.\\*\\?|\\\\}", {"FOO": "()[]{}^$.*?|\\x"}, "x"),
    ("${FOO%%\\**}", {"FOO": "xx**"}, "xx"),
    ("${FOO#*x*y}", {"FOO": "xxyy"}, "y"),
    ("${FOO#*}", {"FOO": "xxyy"}, "xxyy"),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": "x"}, "xyy"),
    ("${FOO#$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy"),
    ("${FOO#}", {"FOO": "xxyy"}, "xxyy"),
    ("${FOO##*x}", {"FOO": "xxyy"}, "yy"),
    ("${FOO##}", {"FOO": "xxyy"}, "xxyy"),
    ("${FOO#?\\?}", {"FOO": "???y"}, "?y"),
    ("${ABC:-.}${FOO%x}${ABC:-.}", {"FOO": "xxyy"}, ".xxyy."),
    ("${FOO%%\\**\\*}", {"FOO": "a***yy*"}, "a"),
    ("${FOO%}", {"FOO": "xxyy"}, "xxyy"),
    ("${FOO%%$BAR}", {"FOO": "xxyy", "BAR": ""}, "xxyy"),
    (
        "${FOO/$NEEDLE/.} - ${FOO//$NEEDLE/.}",
        {"FOO": "/foo*/*/*.txt", "NEEDLE": "\\*/"},
        "/foo.*/*.txt - /foo..*.txt",
    ),
    (
        "${FOO/$NEEDLE/} - ${FOO//$NEEDLE/}",
        {"FOO": "/tmp/tmp/bar.txt", "NEEDLE": "/tmp"},
        "/tmp/bar.txt - /bar.txt",
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT} - ${FOO//$NEEDLE/$REPLACEMENT}",
        {"FOO": "/a/foo/b/c.txt", "NEEDLE": "/?/", "REPLACEMENT": "/"},
        "/foo/b/c.txt - /foo/c.txt",
    ),
    (
        "${FOO/$NEEDLE/$REPLACEMENT}",
        {"FOO": "http://google.de", "NEEDLE": "http://", "REPLACEMENT": "https://"},
        "https://google.de",
    ),
    ("${FOO//\\//\\/}", {"FOO": "/tmp/foo.txt"}, "\\/tmp\\/foo.txt"),
    ("${FOO/$BAR/ww}", {"FOO": "xxyy", "BAR": ""}, "wwxxyy"),
    ("${FOO//ww}", {"FOO": "xxyy"}, None),
    ("${FOO//}", {"FOO": "xxyy"}, None),
    ("${FOO///}", {"FOO": "xxyy"}, "xxyy"),
    ("${FOO///}", {}, ""),
    (
        "something-${VERSION}.${TARGETOS}-${TARGETARCH}${TARGETVARIANT:+-${TARGETVARIANT}}.tar.gz",
        {"VERSION": "v1.2.3", "TARGETOS": "linux", "TARGETARCH": "arm", "TARGETVARIANT": "v7"},
        "something-v1.2.3.linux-arm-v7.tar.gz",
    ),
    (
        "something-${VERSION}.${TARGETOS}-${TARGETARCH}${TARGETVARIANT:+-${TARGETVARIANT}}.tar.gz",
        {"VERSION": "v1.2.3", "TARGETOS": "linux", "TARGETARCH": "arm64"},
        "something-v1.2.3.linux-arm64.tar.gz",
    ),
    # Go's ReplaceAllString on the expanded replacement: `$$` is `$`, `$0` the match, other
    # references are empty (in the word itself the lexer already took `$$` and `$0` as variables)
    ("${FOO//o/$R}", {"FOO": "foo", "R": "$$"}, "f$$"),
    ("${FOO//o/$R}", {"FOO": "foo", "R": "<$0>"}, "f<o><o>"),
    ("${FOO//o/$R}", {"FOO": "foo", "R": "[$1${2}$x]"}, "f[][]"),
    ("${FOO//o/$R}", {"FOO": "foo", "R": "$ {"}, "f$ {$ {"),
    ("${FOO//o/<$0>}", {"FOO": "foo"}, "f<><>"),
    ("${FOO//*/x}", {"FOO": "abc"}, "x"),
    # special parameters are names of their own
    ("a$$b", {}, "ab"),
    ("a$?b", {"?": "q"}, "aqb"),
    ("${FOO#*.}|${FOO##*.}|${FOO%.*}|${FOO%%.*}", {"FOO": "a.b.c"}, "b.c|c|a.b|a"),
]


@pytest.mark.parametrize(("source", "env", "expected"), PROCESS_WITH_MATCHES)
def test_process_with_matches(source: str, env: dict[str, str], expected: str | None) -> None:
    if expected is None:
        with pytest.raises(SubstitutionError):
            expand(source, env)
    else:
        assert expand(source, env) == expected


def test_mandatory_env_vars_messages() -> None:
    no_empty = "${VAR:?message here$ARG}"
    no_unset = "${VAR?message here$ARG}"
    assert expand(no_empty, {"VAR": "plain", "ARG": "x"}) == "plain"
    for env in ({"VAR": "", "ARG": "x"}, {"ARG": "x"}):
        with pytest.raises(SubstitutionError, match="VAR: message herex"):
            expand(no_empty, env)
    assert expand(no_unset, {"VAR": "", "ARG": "x"}) == ""
    with pytest.raises(SubstitutionError, match="VAR: message herex"):
        expand(no_unset, {"ARG": "x"})
    with pytest.raises(SubstitutionError, match="VAR: is not allowed to be unset"):
        expand("${VAR?}", {})
    with pytest.raises(SubstitutionError, match="VAR: is not allowed to be empty"):
        expand("${VAR:?}", {"VAR": ""})


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("${", "missing '}'"),
        ("${FOO", "missing '}'"),
        ("${FOO:-x", "missing '}'"),
        ("${}", "bad substitution"),
        ("${:x}", "bad substitution"),
        ("${FOO/x", "missing '/' in ${}"),
        ("${FOO/x/y", "missing '}'"),
        ("${FOO=x}", "unsupported modifier (=) in substitution"),
        ("${FOO:=x}", "unsupported modifier (:=) in substitution"),
        ("'x", "matching single-quote"),
        ('"x', "matching double-quote"),
        ("${FOO#\\x}", "invalid escape"),
    ],
)
def test_substitution_error_messages(source: str, message: str) -> None:
    with pytest.raises(SubstitutionError, match=f'^failed to process ".*": .*{re.escape(message)}'):
        expand(source, {"FOO": "foo"})


def test_backtick_escape_token() -> None:
    assert expand("a`$b", {"b": "B"}, escape="`") == "a$b"
    assert expand("a\\$b", {"b": "B"}, escape="`") == "a\\B"
    assert expand('"a`"b"', {}, escape="`") == 'a"b'
    assert expand_words("a` b c", {}, escape="`") == ["a b", "c"]


def test_substitution_errors_are_build_errors() -> None:
    assert issubclass(SubstitutionError, BuildError)
    assert issubclass(ContainerfileError, BuildError)


# ============================================================================ durations

DURATIONS = [
    ("0", 0),
    ("5s", 5_000_000_000),
    ("30s", 30_000_000_000),
    ("1478s", 1478_000_000_000),
    ("-5s", -5_000_000_000),
    ("+5s", 5_000_000_000),
    ("-0", 0),
    ("+0", 0),
    ("5.0s", 5_000_000_000),
    ("5.6s", 5_600_000_000),
    ("5.s", 5_000_000_000),
    (".5s", 500_000_000),
    ("1.0s", 1_000_000_000),
    ("1.00s", 1_000_000_000),
    ("1.004s", 1_004_000_000),
    ("1.0040s", 1_004_000_000),
    ("100.00100s", 100_001_000_000),
    ("10ns", 10),
    ("11us", 11_000),
    ("12\u00b5s", 12_000),
    ("12\u03bcs", 12_000),
    ("13ms", 13_000_000),
    ("14s", 14_000_000_000),
    ("15m", 15 * 60_000_000_000),
    ("16h", 16 * 3600_000_000_000),
    ("3h30m", (3 * 60 + 30) * 60_000_000_000),
    ("10.5s4m", 4 * 60_000_000_000 + 10_500_000_000),
    ("-2m3.4s", -(2 * 60_000_000_000 + 3_400_000_000)),
    ("1h2m3s4ms5us6ns", 3723004005006),
    ("39h9m14.425s", 140954425000000),
    ("52763797000ns", 52763797000),
    ("0.3333333333333333333h", 20 * 60_000_000_000),
    ("9007199254740993ns", (1 << 53) + 1),
    ("9223372036854775807ns", (1 << 63) - 1),
    ("9223372036854775.807us", (1 << 63) - 1),
    ("9223372036s854ms775us807ns", (1 << 63) - 1),
    ("-9223372036854775808ns", -(1 << 63)),
    ("0.100000000000000000000h", 6 * 60_000_000_000),
    ("0.830103483285477580700h", 49 * 60_000_000_000 + 48_372_539_827),
]


@pytest.mark.parametrize(("text", "nanoseconds"), DURATIONS)
def test_parse_duration_like_go(text: str, nanoseconds: int) -> None:
    assert parse_duration(text) == nanoseconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "invalid duration"),
        ("3", "missing unit"),
        ("-", "invalid duration"),
        ("s", "invalid duration"),
        (".", "invalid duration"),
        ("-.", "invalid duration"),
        (".s", "invalid duration"),
        ("+.s", "invalid duration"),
        ("1d", "unknown unit"),
        ("1.1.1s", "missing unit"),
        ("9223372036854775808ns", "invalid duration"),
        ("9223372036854775.808us", "invalid duration"),
    ],
)
def test_parse_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(text)


# ============================================================================ lines and nodes


def nodes(text: str) -> list[tuple[str, list[str], list[str]]]:
    return [(n.keyword.lower(), n.flags, n.args) for n in cfmod._parse_nodes(text, "Containerfile").nodes]


DOCKER_TESTFILE = r"""# This file describes the standard way to build Docker, using docker
#
# Usage:
#

FROM	ubuntu:14.04
LABEL	maintainer	Tianon Gravi <admwiggin@gmail.com> (@tianon)

# Packaged dependencies
RUN	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -yq \
	apt-utils \
	aufs-tools \
	--no-install-recommends

ENV	PATH	/usr/local/go/bin:$PATH
ENV	DOCKER_CROSSPLATFORMS	\
	linux/386 linux/arm \
	darwin/amd64 darwin/386 \
	freebsd/amd64 freebsd/386 freebsd/arm
# (set an explicit GOARM of 5 for maximum compatibility)
ENV	GOARM	5
RUN	cd /usr/local/go/src && bash -xc 'for platform in $DOCKER_CROSSPLATFORMS; do GOOS=${platform%/*} GOARCH=${platform##*/} ./make.bash --no-clean 2>&1; done'
RUN	/bin/echo -e '[default]\naccess_key=$AWS_ACCESS_KEY\nsecret_key=$AWS_SECRET_KEY' > /.s3cfg
RUN groupadd -r docker
VOLUME	/var/lib/docker
WORKDIR	/go/src/github.com/docker/docker
ENV	DOCKER_BUILDTAGS	apparmor selinux
ENTRYPOINT	["hack/dind"]
COPY	.	/go/src/github.com/docker/docker
"""


def test_buildkit_docker_testfile() -> None:
    assert nodes(DOCKER_TESTFILE) == [
        ("from", [], ["ubuntu:14.04"]),
        ("label", [], ["maintainer", "Tianon Gravi <admwiggin@gmail.com> (@tianon)"]),
        (
            "run",
            [],
            [
                "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -yq \tapt-utils "
                "\taufs-tools \t--no-install-recommends"
            ],
        ),
        ("env", [], ["PATH", "/usr/local/go/bin:$PATH"]),
        (
            "env",
            [],
            [
                "DOCKER_CROSSPLATFORMS",
                "linux/386 linux/arm \tdarwin/amd64 darwin/386 \tfreebsd/amd64 freebsd/386 freebsd/arm",
            ],
        ),
        ("env", [], ["GOARM", "5"]),
        (
            "run",
            [],
            [
                "cd /usr/local/go/src && bash -xc 'for platform in $DOCKER_CROSSPLATFORMS; do GOOS=${platform%/*} "
                "GOARCH=${platform##*/} ./make.bash --no-clean 2>&1; done'"
            ],
        ),
        (
            "run",
            [],
            ["/bin/echo -e '[default]\\naccess_key=$AWS_ACCESS_KEY\\nsecret_key=$AWS_SECRET_KEY' > /.s3cfg"],
        ),
        ("run", [], ["groupadd -r docker"]),
        ("volume", [], ["/var/lib/docker"]),
        ("workdir", [], ["/go/src/github.com/docker/docker"]),
        ("env", [], ["DOCKER_BUILDTAGS", "apparmor selinux"]),
        ("entrypoint", [], ["hack/dind"]),
        ("copy", [], [".", "/go/src/github.com/docker/docker"]),
    ]


def test_buildkit_health_testfile() -> None:
    text = (
        "FROM debian\n"
        "ADD check.sh main.sh /app/\n"
        "CMD /app/main.sh\n"
        "HEALTHCHECK\n"
        "HEALTHCHECK --interval=5s --timeout=3s --retries=3 \\\n"
        "  CMD /app/check.sh --quiet\n"
        "HEALTHCHECK CMD\n"
        "HEALTHCHECK   CMD   a b\n"
        'HEALTHCHECK --timeout=3s CMD ["foo"]\n'
        "HEALTHCHECK CONNECT TCP 7000\n"
    )
    assert nodes(text) == [
        ("from", [], ["debian"]),
        ("add", [], ["check.sh", "main.sh", "/app/"]),
        ("cmd", [], ["/app/main.sh"]),
        ("healthcheck", [], []),
        ("healthcheck", ["--interval=5s", "--timeout=3s", "--retries=3"], ["CMD", "/app/check.sh --quiet"]),
        ("healthcheck", [], ["CMD"]),
        ("healthcheck", [], ["CMD", "a b"]),
        ("healthcheck", ["--timeout=3s"], ["CMD", "foo"]),
        ("healthcheck", [], ["CONNECT", "TCP 7000"]),
    ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("foo", ["foo"]),
        ("foo bar", ["foo", "bar"]),
        ("foo\\ bar", ["foo\\ bar"]),
        ("foo=bar", ["foo=bar"]),
        ("foo bar 'abc xyz'", ["foo", "bar", "'abc xyz'"]),
        ('foo bar "abc xyz"', ["foo", "bar", '"abc xyz"']),
        ("àöû", ["àöû"]),
        ('föo bàr "âbc xÿz"', ["föo", "bàr", '"âbc xÿz"']),
        ('a="b c" d', ['a="b c"', "d"]),
        ('a="b \\" c"', ['a="b \\" c"']),
        ("a='b \\' c", ["a='b \\'", "c"]),
        ('a="" b=', ['a=""', "b="]),
        ("end\\", ["end"]),
    ],
)
def test_parse_words(text: str, words: list[str]) -> None:
    assert cfmod._parse_words(text, "\\") == words


@pytest.mark.parametrize(
    ("line", "rest", "flags"),
    [
        ("--from=a b c", "b c", ["--from=a"]),
        ("--link --chown=1:1 a b", "a b", ["--link", "--chown=1:1"]),
        ('--mount="type=cache,target=/x" cmd', "cmd", ["--mount=type=cache,target=/x"]),
        ("--a='x y' rest", "rest", ["--a=x y"]),
        ("-- --not-a-flag x", " --not-a-flag x", []),
        ("--esc=a\\ b c", "c", ["--esc=a b"]),
        ("-x y", "-x y", []),
        ("--only", "", ["--only"]),
        ("plain", "plain", []),
    ],
)
def test_extract_builder_flags(line: str, rest: str, flags: list[str]) -> None:
    assert cfmod._extract_flags(line) == (rest, flags)


def test_keywords_are_case_insensitive_and_kept_upper_case() -> None:
    cf = parse("from alpine as Base\nrun echo hi\nCopy a b\n")
    assert cf.stages[0].name == "base"
    assert [i.keyword for i in cf.stages[0].instructions] == ["RUN", "COPY"]
    assert isinstance(cf.stages[0].instructions[1], Copy)


def test_line_numbers_cover_continuations_and_heredocs() -> None:
    text = (
        "# comment\n"  # 1
        "\n"  # 2
        "FROM a\n"  # 3
        "RUN one \\\n"  # 4
        "  # comment inside\n"  # 5
        "  two\n"  # 6
        "COPY <<EOF /x\n"  # 7
        "body\n"  # 8
        "EOF\n"  # 9
        "CMD x\n"  # 10
    )
    cf = parse(text)
    assert cf.stages[0].line == 3
    assert [(i.line, i.end_line) for i in cf.stages[0].instructions] == [(4, 6), (7, 9), (10, 10)]


def test_continuation_keeps_continued_lines_whitespace_and_drops_comments() -> None:
    ins = only("RUN echo a \\\n  # skipped\n    b \\\n\n  c\n")
    assert isinstance(ins, Run)
    assert ins.command == ["echo a     b   c"]


def test_empty_continuation_lines_warn_like_docker() -> None:
    text = (
        "FROM alpine:3.6\n\nRUN valid \\\n    continuation\n\n"
        "RUN something \\\n\n    following \\\n\n    more\n\n"
        "RUN another \\\n\n    thing\n\n"
        "RUN non-indented \\\n# this is a comment\n   after-comment\n\n"
        "RUN indented \\\n    # this is an indented comment\n    comment\n\t"
    )
    cf = parse(text)
    empties = [w for w in cf.warnings if "empty continuation line" in w]
    assert empties == [
        "Containerfile:6: empty continuation line (Docker warns; it will become an error)",
        "Containerfile:12: empty continuation line (Docker warns; it will become an error)",
    ]
    runs = cf.stages[0].instructions
    assert [r.args for r in runs] == [
        ["valid     continuation"],
        ["something     following     more"],
        ["another     thing"],
        ["non-indented    after-comment"],
        ["indented     comment"],
    ]


def test_escaped_escape_at_end_of_line_is_not_a_continuation() -> None:
    cf = parse("FROM a\nRUN echo \\\\\nRUN next\n")
    assert [i.args for i in cf.stages[0].instructions] == [["echo \\\\"], ["next"]]


def test_continuation_backslash_alone_on_a_line() -> None:
    cf = parse("FROM a\nRUN echo \\\n\\\nrest\n")
    assert cf.stages[0].instructions[0].args == ["echo rest"]


def test_trailing_continuation_at_end_of_file() -> None:
    cf = parse("FROM a\nRUN echo \\")
    assert cf.stages[0].instructions[0].args == ["echo"]


def test_crlf_line_endings_and_bom() -> None:
    cf = parse("\ufeff# escape=`\r\nFROM a\r\nRUN echo `\r\n  b\r\n")
    assert cf.escape == "`"
    assert cf.stages[0].instructions[0].args == ["echo   b"]


def test_escape_directive_backtick_for_windows_paths() -> None:
    text = "# escape=`\n\nFROM windowsservercore\nCOPY testfile.txt c:\\\nRUN dir c:\\\nWORKDIR c:\\foo `\n  \\bar\n"
    cf = parse(text)
    ins = cf.stages[0].instructions
    assert isinstance(ins[0], Copy) and ins[0].dest == "c:\\"
    assert isinstance(ins[1], Run) and ins[1].command == ["dir c:\\"]
    assert isinstance(ins[2], Workdir) and ins[2].path == "c:\\foo   \\bar"
    # with ` as escape, `\` is an ordinary character during expansion too
    stage = parse(text).resolve(platform_args=PLATFORM)[0]
    workdir = stage.instructions[2].instruction
    assert isinstance(workdir, Workdir) and workdir.path == "c:\\foo   \\bar"


@pytest.mark.parametrize(
    ("text", "directives", "escape"),
    [
        ("# syntax=docker/dockerfile:1\nFROM a\n", {"syntax": "docker/dockerfile:1"}, "\\"),
        ("#syntax = x/y \n# ESCAPE = `\nFROM a\n", {"syntax": "x/y", "escape": "`"}, "`"),
        ("# check=skip=all\n# escape=\\\nFROM a\n", {"check": "skip=all", "escape": "\\"}, "\\"),
        # directives must come first: a comment, a blank line or an instruction ends them
        ("# hello\n# escape=`\nFROM a\n", {}, "\\"),
        ("\n# escape=`\nFROM a\n", {}, "\\"),
        ("FROM a\n# escape=`\n", {}, "\\"),
        ("# unknown=x\n# escape=`\nFROM a\n", {}, "\\"),
    ],
)
def test_parser_directives(text: str, directives: dict[str, str], escape: str) -> None:
    cf = parse(text)
    assert cf.directives == directives
    assert cf.escape == escape
    assert cf.syntax == directives.get("syntax")


def test_json_forms() -> None:
    valid = {
        "[]": [],
        '[""]': [""],
        '["a"]': ["a"],
        '["a","b"]': ["a", "b"],
        '[ "a", "b" ]': ["a", "b"],
        '[\t"a",\t"b"\t]': ["a", "b"],
        '["abc 123", "♥", "☃", "\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0000"]': [
            "abc 123",
            "♥",
            "☃",
            '" \\ / \b \f \n \r \t \x00',
        ],
    }
    for text, words in valid.items():
        assert cfmod._parse_json(text) == words, text
    for text in (
        '["a",42,"b"]',
        '["a",123.456,"b"]',
        '["a",{},"b"]',
        '["a",["c"],"b"]',
        '["a",true,"b"]',
        '["a",null,"b"]',
    ):
        with pytest.raises(cfmod._Fail, match="arrays must be comprised of strings only"):
            cfmod._parse_json(text)
    for text in ("['a']", "[a]", '["a" "b"]', '["a"] x', "a", "[NaN]"):
        assert cfmod._parse_json(text) is None, text


# ============================================================================ heredocs

HEREDOC_FILE = """
FROM alpine:3.6

ENV NAME=me

RUN ls

RUN <<EMPTY
EMPTY

RUN 3<<EMPTY2
EMPTY2

RUN "<<NOHEREDOC"

RUN <<INDENT
\tfoo
\tbar
INDENT

RUN <<-UNINDENT
\tbaz
\tquux
UNINDENT

RUN <<-UNINDENT2
\tbaz
\tquux
\tUNINDENT2

RUN <<-EXPAND
\texpand $NAME
EXPAND

RUN <<-'NOEXPAND'
\tdon't expand $NAME
NOEXPAND

RUN <<COPY
echo hello world
echo foo bar
COPY

RUN <<COMMENT
# internal comment
echo hello world
echo foo bar # trailing comment
COMMENT

RUN --mount=type=cache,target=/foo <<MOUNT
echo hello
MOUNT

COPY <<FILE1 <<FILE2 /dest
content 1
FILE1
content 2
FILE2

COPY <<EOF /quotes
"foo"
'bar'
EOF

COPY <<X <<Y /dest
Y
X
X
Y

RUN <<COMPLEX python3
print('hello world')
COMPLEX

COPY <<file.txt /dest
hello world
file.txt

RUN <<eo'f'
echo foo
eof

RUN <<eo\\'f
echo foo
eo'f

RUN <<'e'o\\'f
echo foo
eo'f

RUN <<'one two'
echo bar
one two

RUN <<$EOF
$EOF

RUN <<  EOF
EOF

RUN <<  EOF  > foo
EOF
\t"""


def test_buildkit_heredoc_extraction() -> None:
    DocTuple = tuple[str, str, bool, bool, int | None]

    def doc(
        name: str, content: str, expand: bool = True, chomp: bool = False, fd: int | None = None
    ) -> DocTuple:
        return (name, content, expand, chomp, fd)

    expected: list[list[DocTuple]] = [
        [],  # ENV
        [],  # RUN ls
        [doc("EMPTY", "")],
        [doc("EMPTY2", "", fd=3)],
        [],  # RUN "<<NOHEREDOC"
        [doc("INDENT", "\tfoo\n\tbar\n")],
        [doc("UNINDENT", "\tbaz\n\tquux\n", chomp=True)],
        [doc("UNINDENT2", "\tbaz\n\tquux\n", chomp=True)],
        [doc("EXPAND", "\texpand $NAME\n", chomp=True)],
        [doc("NOEXPAND", "\tdon't expand $NAME\n", expand=False, chomp=True)],
        [doc("COPY", "echo hello world\necho foo bar\n")],
        [doc("COMMENT", "# internal comment\necho hello world\necho foo bar # trailing comment\n")],
        [doc("MOUNT", "echo hello\n")],
        [doc("FILE1", "content 1\n"), doc("FILE2", "content 2\n")],
        [doc("EOF", "\"foo\"\n'bar'\n")],
        [doc("X", "Y\n"), doc("Y", "X\n")],
        [doc("COMPLEX", "print('hello world')\n")],
        [doc("file.txt", "hello world\n")],
        [doc("eof", "echo foo\n", expand=False)],
        [doc("eo'f", "echo foo\n")],
        [doc("eo'f", "echo foo\n", expand=False)],
        [doc("one two", "echo bar\n", expand=False)],
        [doc("$EOF", "")],
        [doc("EOF", "")],
        [doc("EOF", "")],
    ]
    instructions = parse(HEREDOC_FILE).stages[0].instructions
    got = [[(d.name, d.content, d.expand, d.chomp, d.fd) for d in i.heredocs] for i in instructions]
    assert got == expected


def test_json_form_has_no_heredocs() -> None:
    cf = parse('FROM alpine:3.6\nRUN ["whoami"]\nRUN ["<<EOF"]\nRUN ["<<\'EOF\'"]\n')
    assert all(i.heredocs == [] for i in cf.stages[0].instructions)


@pytest.mark.parametrize(
    "word", ["<<EOF", "<<'EOF'", '<<"EOF"', "<<-EOF", "<<-'EOF'", '<<-"EOF"', '<<EO"F"', "<< EOF", "<<- EOF"]
)
def test_heredoc_word_valid(word: str) -> None:
    doc = cfmod._heredoc_word(word)
    assert doc is not None and doc.name == "EOF"


@pytest.mark.parametrize("word", ["<<'EOF", '<<"EOF', "<<EOF'", '<<EOF"'])
def test_heredoc_word_invalid(word: str) -> None:
    with pytest.raises(cfmod._Fail):
        cfmod._heredoc_word(word)


@pytest.mark.parametrize("word", ["", "EOF", "<<", "<<-", "<EOF", "<<<EOF", "<<EOF sh"])
def test_heredoc_word_not_a_heredoc(word: str) -> None:
    assert cfmod._heredoc_word(word) is None


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ("RUN <<EOF", ["EOF"]),
        ("RUN <<-EOF", ["EOF"]),
        ("RUN << -EOF", ["-EOF"]),
        ("RUN <<'EOF'", ["EOF"]),
        ("RUN 4<<EOF", ["EOF"]),
        ("RUN <<EOF <<EOF2", ["EOF", "EOF2"]),
        ("RUN cat <<EOF > /file", ["EOF"]),
        ("RUN '<<EOF'", []),
        ('RUN "<<EOF"', []),
        ("RUN echo it's <<EOF", []),  # the line does not lex: no heredoc, as in BuildKit
    ],
)
def test_heredocs_from_line(line: str, names: list[str]) -> None:
    assert [d.name for d in cfmod._heredocs_from_line(line)] == names


def test_heredoc_chomp_text() -> None:
    ins = only("RUN <<-EOT\n\thello\n\t\tworld\n\tEOT\n")
    assert ins.heredocs[0].content == "\thello\n\t\tworld\n"
    assert ins.heredocs[0].text == "hello\nworld\n"


def test_run_heredoc_scripts() -> None:
    simple = only("RUN <<EOF\nset -e\necho $HOME\nEOF\n")
    assert isinstance(simple, Run)
    assert simple.single_heredoc is simple.heredocs[0]
    assert simple.shell_script() == "set -e\necho $HOME\n"
    chomped = only("RUN <<-EOF\n\techo a\n\tEOF\n")
    assert isinstance(chomped, Run) and chomped.shell_script() == "echo a\n"
    complex_ = only("RUN python3 <<EOF\nprint(1)\nEOF\n")
    assert isinstance(complex_, Run) and complex_.single_heredoc is None
    assert complex_.shell_script() == "python3 <<EOF\nprint(1)\nEOF"
    two = only("RUN cat <<A <<-B\none\nA\n\ttwo\n\tB\n")
    assert isinstance(two, Run) and two.shell_script() == "cat <<A <<-B\none\nA\n\ttwo\nB"
    shebang = only("RUN <<EOF\n#!/usr/bin/env python3\nprint(1)\nEOF\n")
    assert isinstance(shebang, Run) and shebang.single_heredoc is not None
    assert shebang.single_heredoc.text.startswith("#!")
    plain = only("RUN echo hi")
    assert isinstance(plain, Run) and plain.shell_script() == "echo hi"
    exec_form = only('RUN ["echo", "hi"]')
    assert isinstance(exec_form, Run)
    with pytest.raises(ValueError, match="exec form"):
        exec_form.shell_script()


def test_copy_heredoc_sources() -> None:
    ins = only(
        "COPY --chmod=755 <<run.sh a.txt <<-'lit' /dest/\n#!/bin/sh\necho $X\nrun.sh\n\tkeep $X\n\tlit\n"
    )
    assert isinstance(ins, Copy)
    assert ins.sources == ["a.txt"]
    assert [(d.name, d.text, d.expand) for d in ins.heredoc_sources] == [
        ("run.sh", "#!/bin/sh\necho $X\n", True),
        ("lit", "keep $X\n", False),
    ]
    assert ins.dest == "/dest/" and ins.chmod == "755"


def test_heredoc_inside_onbuild() -> None:
    ins = only("ONBUILD RUN <<EOF\necho built\nEOF\n")
    assert isinstance(ins, Onbuild) and isinstance(ins.trigger, Run)
    assert ins.trigger.heredocs[0].content == "echo built\n"
    assert ins.expression == "RUN <<EOF\necho built\nEOF"


def test_heredoc_lines_are_not_instructions() -> None:
    cf = parse("FROM a\nRUN <<EOF\nFROM not-a-stage\nRUNN nothing\nEOF\n")
    assert len(cf.stages) == 1 and len(cf.stages[0].instructions) == 1


# ============================================================================ instructions


def test_from_forms() -> None:
    cf = parse("FROM scratch\nFROM --platform=linux/arm64 alpine:3.19 AS Build-1.x\nFROM build-1.x\n")
    assert [(s.name, s.base, s.platform, s.line) for s in cf.stages] == [
        (None, "scratch", None, 1),
        ("build-1.x", "alpine:3.19", "linux/arm64", 2),
        (None, "build-1.x", None, 3),
    ]
    assert cf.find_stage("BUILD-1.X") == 1 and cf.find_stage("nope") is None


def test_run_forms_and_flags() -> None:
    shell = only("RUN apt-get update && apt-get install -y curl")
    assert isinstance(shell, Run)
    assert (shell.command, shell.prepend_shell, shell.json_form) == (
        ["apt-get update && apt-get install -y curl"],
        True,
        False,
    )
    exec_ = only('RUN ["/bin/sh", "-c", "echo $HOME"]')
    assert (
        isinstance(exec_, Run)
        and exec_.command == ["/bin/sh", "-c", "echo $HOME"]
        and not exec_.prepend_shell
    )
    flagged = only(
        "RUN --mount=type=cache,target=/root/.cache,sharing=locked,id=pip "
        "--mount=type=secret,id=tok,required --mount=type=bind,from=deps,source=/out,target=/in,ro "
        "--network=none --security=sandbox pip install ."
    )
    assert isinstance(flagged, Run)
    assert flagged.command == ["pip install ."]
    cache, secret, bind = flagged.mounts
    assert (cache.type, cache.target, cache.options) == (
        "cache",
        "/root/.cache",
        {"sharing": "locked", "id": "pip"},
    )
    assert (secret.type, secret.options) == ("secret", {"id": "tok", "required": "true"})
    assert (bind.type, bind.from_, bind.source, bind.target, bind.readonly) == (
        "bind",
        "deps",
        "/out",
        "/in",
        True,
    )
    assert (flagged.network, flagged.security) == ("none", "sandbox")
    assert flagged.unsupported == [
        "RUN --mount=type=cache is not supported by cocon build yet",
        "RUN --mount=type=secret is not supported by cocon build yet",
        "RUN --mount=type=bind is not supported by cocon build yet",
    ]


@pytest.mark.parametrize(
    ("flags", "unsupported"),
    [
        ("--network=default", []),
        ("--network=none", []),
        ("--network=host", ["RUN --network=host is not supported by cocon build yet"]),
        ("--security=insecure", ["RUN --security=insecure is not supported by cocon build yet"]),
        ("--device=/dev/fuse", ["RUN --device is not supported by cocon build yet"]),
        (
            "--mount=type=tmpfs,target=/t,size=1m",
            ["RUN --mount=type=tmpfs is not supported by cocon build yet"],
        ),
        ("--mount=type=ssh", ["RUN --mount=type=ssh is not supported by cocon build yet"]),
    ],
)
def test_run_unsupported_features_are_marked(flags: str, unsupported: list[str]) -> None:
    ins = only(f"RUN {flags} true")
    assert ins.unsupported == unsupported


def test_copy_and_add_forms() -> None:
    copy = only(
        "COPY --from=build --chown=app:app --chmod=0644 --link --parents --exclude=*.tmp --exclude=x a b/ /dst/"
    )
    assert isinstance(copy, Copy)
    assert (
        copy.sources,
        copy.dest,
        copy.from_,
        copy.chown,
        copy.chmod,
        copy.link,
        copy.parents,
        copy.exclude,
    ) == (
        ["a", "b/"],
        "/dst/",
        "build",
        "app:app",
        "0644",
        True,
        True,
        ["*.tmp", "x"],
    )
    js = only('COPY ["with space.txt", "/other dir/"]')
    assert (
        isinstance(js, Copy)
        and js.sources == ["with space.txt"]
        and js.dest == "/other dir/"
        and js.json_form
    )
    link_false = only("COPY --link=false a b")
    assert isinstance(link_false, Copy) and not link_false.link
    add = only(
        "ADD --checksum=sha256:24454f830cdb571e2c4ad15481119c43b3cafd48dd869a9b2945d1036d1dc68d --keep-git-dir --unpack=false https://x/y.tgz /opt/"
    )
    assert isinstance(add, Add)
    assert add.checksum is not None and add.checksum.startswith("sha256:")
    assert (add.sources, add.dest, add.keep_git_dir, add.unpack) == (
        ["https://x/y.tgz"],
        "/opt/",
        True,
        False,
    )


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("ENV A B", [("A", "B")]),
        ("ENV A   hello   world  ", [("A", "hello   world")]),
        ('ENV A "quoted value"', [("A", '"quoted value"')]),
        ("ENV A=1", [("A", "1")]),
        ('ENV A=1 B="two words" C=three\\ words', [("A", "1"), ("B", '"two words"'), ("C", "three\\ words")]),
        ("ENV A= B=''", [("A", ""), ("B", "''")]),
        ("ENV A=b=c", [("A", "b=c")]),
        ('ENV A "b=c"', [("A", '"b=c"')]),
    ],
)
def test_env_forms(text: str, pairs: list[tuple[str, str]]) -> None:
    ins = only(text)
    assert isinstance(ins, Env) and ins.pairs == pairs


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("ARG A", [("A", None)]),
        ("ARG A=1", [("A", "1")]),
        ("ARG A= B C=3", [("A", ""), ("B", None), ("C", "3")]),
        ('ARG A="x y"', [("A", '"x y"')]),
    ],
)
def test_arg_forms(text: str, pairs: list[tuple[str, str | None]]) -> None:
    ins = only(text)
    assert isinstance(ins, Arg) and ins.pairs == pairs


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("LABEL version=1.0", [("version", "1.0")]),
        ('LABEL "com.example.vendor"="ACME Inc" a=b', [('"com.example.vendor"', '"ACME Inc"'), ("a", "b")]),
        ("LABEL maintainer Someone Else", [("maintainer", "Someone Else")]),
        ('LABEL description="multi \\\nline"', [("description", '"multi line"')]),
    ],
)
def test_label_forms(text: str, pairs: list[tuple[str, str]]) -> None:
    ins = only(text)
    assert isinstance(ins, Label) and ins.pairs == pairs


def test_simple_instructions() -> None:
    workdir = only("WORKDIR /path with/spaces")
    assert isinstance(workdir, Workdir) and workdir.path == "/path with/spaces"
    user = only("USER app:app")
    assert isinstance(user, User) and user.user == "app:app"
    sig = only("STOPSIGNAL SIGQUIT")
    assert isinstance(sig, StopSignal) and sig.signal == "SIGQUIT"
    for ok in ("9", "SIGRTMIN+3", "term", "KILL"):
        only(f"STOPSIGNAL {ok}")
    vol = only("VOLUME /a /b")
    assert isinstance(vol, Volume) and vol.paths == ["/a", "/b"]
    vol_json = only('VOLUME ["/data dir"]')
    assert isinstance(vol_json, Volume) and vol_json.paths == ["/data dir"]
    shell = only('SHELL ["powershell", "-command"]')
    assert isinstance(shell, Shell) and shell.shell == ["powershell", "-command"]
    maint = only("MAINTAINER Jane Doe <jane@example.com>")
    assert isinstance(maint, Maintainer) and maint.maintainer == "Jane Doe <jane@example.com>"


def test_maintainer_is_deprecated_with_a_warning() -> None:
    cf = parse("FROM a\nMAINTAINER someone\n")
    assert cf.warnings == [
        "Containerfile:2: MAINTAINER is deprecated; use LABEL org.opencontainers.image.authors=... instead"
    ]


def test_cmd_and_entrypoint_forms() -> None:
    cmd = only("CMD echo $HOME")
    assert isinstance(cmd, Cmd) and cmd.command == ["echo $HOME"] and cmd.prepend_shell
    cmd_json = only('CMD ["nginx", "-g", "daemon off;"]')
    assert (
        isinstance(cmd_json, Cmd)
        and cmd_json.command == ["nginx", "-g", "daemon off;"]
        and not cmd_json.prepend_shell
    )
    cleared = only("CMD []")
    assert isinstance(cleared, Cmd) and cleared.command == [] and not cleared.prepend_shell
    entry = only('ENTRYPOINT ["/entrypoint.sh"]')
    assert isinstance(entry, Entrypoint) and entry.command == ["/entrypoint.sh"] and not entry.prepend_shell
    entry_shell = only("ENTRYPOINT exec top -b")
    assert isinstance(entry_shell, Entrypoint) and entry_shell.command == ["exec top -b"]


def test_invalid_json_falls_back_to_shell_form_with_a_warning() -> None:
    cf = parse("FROM a\nCMD ['single', 'quotes']\n")
    cmd = cf.stages[0].instructions[0]
    assert isinstance(cmd, Cmd) and cmd.prepend_shell and cmd.command == ["['single', 'quotes']"]
    assert "not valid JSON" in cf.warnings[0] and cf.warnings[0].startswith("Containerfile:2: CMD")


def test_expose_forms() -> None:
    ins = only("EXPOSE 80 80/tcp 53/udp 8000-8002/TCP 132/sctp $PORT")
    assert isinstance(ins, Expose) and ins.ports == [
        "80",
        "80/tcp",
        "53/udp",
        "8000-8002/TCP",
        "132/sctp",
        "$PORT",
    ]
    stage = resolve("FROM a\nEXPOSE 80 80/tcp 53/udp 8000-8002/TCP 127.0.0.1:8080:80 1000-1001:2000-2001\n")[
        0
    ]
    expose = stage.instructions[0].instruction
    assert isinstance(expose, Expose)
    assert expose.ports == [
        "80/tcp",
        "80/tcp",
        "53/udp",
        "8000/tcp",
        "8001/tcp",
        "8002/tcp",
        "80/tcp",
        "2000/tcp",
        "2001/tcp",
    ]


@pytest.mark.parametrize(
    ("text", "test", "interval", "timeout", "start_period", "start_interval", "retries"),
    [
        ("HEALTHCHECK NONE", ["NONE"], 0, 0, 0, 0, 0),
        ("HEALTHCHECK none", ["NONE"], 0, 0, 0, 0, 0),
        (
            "HEALTHCHECK CMD curl -f http://localhost/",
            ["CMD-SHELL", "curl -f http://localhost/"],
            0,
            0,
            0,
            0,
            0,
        ),
        ('HEALTHCHECK CMD ["curl", "-f", "x"]', ["CMD", "curl", "-f", "x"], 0, 0, 0, 0, 0),
        (
            "HEALTHCHECK --interval=5m --timeout=3s --start-period=1m30s --start-interval=500ms --retries=5 CMD true",
            ["CMD-SHELL", "true"],
            300_000_000_000,
            3_000_000_000,
            90_000_000_000,
            500_000_000,
            5,
        ),
        ("HEALTHCHECK --interval=0s CMD true", ["CMD-SHELL", "true"], 0, 0, 0, 0, 0),
    ],
)
def test_healthcheck_forms(
    text: str,
    test: list[str],
    interval: int,
    timeout: int,
    start_period: int,
    start_interval: int,
    retries: int,
) -> None:
    ins = only(text)
    assert isinstance(ins, Healthcheck)
    assert (ins.test, ins.interval, ins.timeout, ins.start_period, ins.start_interval, ins.retries) == (
        test,
        interval,
        timeout,
        start_period,
        start_interval,
        retries,
    )


def test_onbuild_parses_the_trigger() -> None:
    ins = only("onbuild   COPY --from=x a b")
    assert isinstance(ins, Onbuild)
    assert ins.expression == "COPY --from=x a b"
    assert isinstance(ins.trigger, Copy) and ins.trigger.from_ == "x" and ins.trigger.line == 2


def test_global_args_and_stages() -> None:
    cf = parse("# syntax=x\nARG A=1 B\nARG C\nFROM scratch\nARG D\n")
    assert [a.pairs for a in cf.global_args] == [[("A", "1"), ("B", None)], [("C", None)]]
    assert cf.global_arg_defaults == {"A": "1", "B": None, "C": None}
    assert isinstance(cf.stages[0].instructions[0], Arg)


def test_duplicate_stage_names_warn_and_the_last_one_wins() -> None:
    cf = parse("FROM a AS x\nFROM b AS x\nFROM x\n")
    assert cf.warnings == [
        "Containerfile:2: duplicate stage name 'x' (first defined on line 1); later references use this one"
    ]
    assert cf.find_stage("x") == 1
    assert resolve("FROM a AS x\nFROM b AS x\nFROM x\n")[-1].base_stage == 1


# ============================================================================ errors (file:line: INSTRUCTION: message)

ERRORS = [
    ("FROMM alpine", "Containerfile:1: FROMM: unknown instruction (did you mean FROM?)"),
    ("FROM a\nRUNN echo", "Containerfile:2: RUNN: unknown instruction (did you mean RUN?)"),
    ("FROM a\nfoo bar", "Containerfile:2: FOO: unknown instruction"),
    ("FROM a\nCOPPY a b", "Containerfile:2: COPPY: unknown instruction (did you mean COPY?)"),
    (
        "RUN echo",
        "Containerfile:1: RUN: no build stage in current context: the file must start with FROM "
        "(only ARG and parser directives may come before it)",
    ),
    ("", "Containerfile: the Containerfile is empty: it needs at least a FROM"),
    ("# only\n\n", "Containerfile: file with no instructions: a Containerfile needs at least a FROM"),
    ("ARG A=1\n", "Containerfile: the Containerfile contains no stages to build: add a FROM instruction"),
    ("FROM", "Containerfile:1: FROM: requires either one or three arguments (FROM image [AS name])"),
    ("FROM a b", "Containerfile:1: FROM: requires either one or three arguments (FROM image [AS name])"),
    ("FROM a FROM b", "Containerfile:1: FROM: requires either one or three arguments (FROM image [AS name])"),
    (
        "FROM a AS 1st",
        'Containerfile:1: FROM: invalid name for build stage: "1st", name can\'t start with a number or contain symbols',
    ),
    (
        "FROM a AS x$y",
        'Containerfile:1: FROM: invalid name for build stage: "x$y", name can\'t start with a number or contain symbols',
    ),
    ("FROM --platfrom=x a", "Containerfile:1: FROM: unknown flag: platfrom (did you mean platform?)"),
    ("FROM a\nRUN", "Containerfile:2: RUN: requires at least one argument (a command to run)"),
    (
        "FROM a\nRUN --mnt=type=cache,target=/x echo",
        "Containerfile:2: RUN: unknown flag: mnt (did you mean mount?)",
    ),
    (
        "FROM a\nRUN --network=bogus x",
        'Containerfile:2: RUN: unsupported network mode "bogus" (use default, none or host)',
    ),
    (
        "FROM a\nRUN --security=x y",
        'Containerfile:2: RUN: unsupported security mode "x" (use sandbox or insecure)',
    ),
    ("FROM a\nRUN --mount=type=nfs,target=/x x", 'Containerfile:2: RUN: unsupported mount type "nfs"'),
    (
        "FROM a\nRUN --mount=type=bind x",
        "Containerfile:2: RUN: --mount=type=bind needs a target= (the path to mount it at)",
    ),
    ("FROM a\nRUN --mount=target=/x,bogus=1 x", "Containerfile:2: RUN: unexpected key 'bogus' in 'bogus=1'"),
    ("FROM a\nRUN --mount=target=/x,rw=maybe x", "Containerfile:2: RUN: invalid value for rw: maybe"),
    (
        "FROM a\nRUN --mount=target=/x,dangling x",
        "Containerfile:2: RUN: invalid field 'dangling' must be a key=value pair",
    ),
    (
        "FROM a\nRUN --mount=type=cache,target=/x,sharing=all x",
        'Containerfile:2: RUN: unsupported sharing value "all"',
    ),
    (
        "FROM a\nRUN --mount=type=cache,target=/x,mode=999 x",
        "Containerfile:2: RUN: invalid value 999 for mode",
    ),
    (
        "FROM a\nRUN --mount=type=cache,target=/x,uid=root x",
        "Containerfile:2: RUN: invalid value root for uid",
    ),
    (
        "FROM a\nRUN [1]",
        "Containerfile:2: RUN: when using JSON array syntax, arrays must be comprised of strings only",
    ),
    (
        "FROM a\nCOPY a",
        "Containerfile:2: COPY: requires at least two arguments, but only one was provided. "
        "Destination could not be determined",
    ),
    (
        "FROM a\nCOPY\t\n\t\tquux \\\n      bar",
        "Containerfile:2: COPY: requires at least two arguments, but only one was provided. "
        "Destination could not be determined",
    ),
    (
        "FROM a\nADD --chown=1 x",
        "Containerfile:2: ADD: requires at least two arguments, but only one was provided. "
        "Destination could not be determined",
    ),
    (
        "FROM a\nCOPY --from=$X a b",
        "Containerfile:2: COPY: variable expansion is not supported for --from, define a new stage with FROM "
        "using ARG from global scope as a workaround",
    ),
    (
        "FROM a\nCOPY --link=maybe a b",
        "Containerfile:2: COPY: expecting boolean value for flag link, not: maybe",
    ),
    ("FROM a\nCOPY --link= a b", "Containerfile:2: COPY: missing a value on flag: link"),
    ("FROM a\nCOPY --from a b c", "Containerfile:2: COPY: missing a value on flag: from"),
    ("FROM a\nCOPY --chown=1 --chown=2 a b", "Containerfile:2: COPY: duplicate flag specified: chown"),
    ("FROM a\nCOPY --checksum=x a b", "Containerfile:2: COPY: unknown flag: checksum"),
    ("FROM a\nCOPY a <<EOF\nx\nEOF", "Containerfile:2: COPY: cannot accept a heredoc as a destination"),
    ("FROM a\nENV", "Containerfile:2: ENV: requires at least one argument"),
    (
        "FROM a\nENV A",
        "Containerfile:2: ENV: ENV NAME VALUE must have two arguments (or use ENV NAME=VALUE ...)",
    ),
    (
        "FROM a\nENV A=1 B",
        'Containerfile:2: ENV: Syntax error - can\'t find = in "B". Must be of the form: name=value',
    ),
    ("FROM a\nENV =x", "Containerfile:2: ENV: names can not be blank"),
    ("FROM a\nENV --x=1 A=b", "Containerfile:2: ENV: unknown flag: x"),
    ("FROM a\nLABEL", "Containerfile:2: LABEL: requires at least one argument"),
    (
        "FROM a\nLABEL a=b c",
        'Containerfile:2: LABEL: Syntax error - can\'t find = in "c". Must be of the form: name=value',
    ),
    ("FROM a\nARG", "Containerfile:2: ARG: requires at least one argument"),
    ("FROM a\nARG =x", "Containerfile:2: ARG: names can not be blank"),
    ("FROM a\nWORKDIR", "Containerfile:2: WORKDIR: requires exactly one argument"),
    ("FROM a\nUSER", "Containerfile:2: USER: requires exactly one argument"),
    ("FROM a\nMAINTAINER", "Containerfile:2: MAINTAINER: requires exactly one argument"),
    ("FROM a\nMAINTAINER --boo joe@example.com", "Containerfile:2: MAINTAINER: unknown flag: boo"),
    ("FROM a\nSTOPSIGNAL", "Containerfile:2: STOPSIGNAL: requires exactly one argument"),
    (
        "FROM a\nSTOPSIGNAL SIGFOO",
        "Containerfile:2: STOPSIGNAL: Invalid signal: SIGFOO (use a name like SIGTERM or SIGQUIT, or a number)",
    ),
    ("FROM a\nSTOPSIGNAL 0", "Containerfile:2: STOPSIGNAL: Invalid signal: 0"),
    ("FROM a\nEXPOSE", "Containerfile:2: EXPOSE: requires at least one argument"),
    ("FROM a\nEXPOSE 80/xtp", "Containerfile:2: EXPOSE: invalid proto: xtp"),
    ("FROM a\nEXPOSE 99999", "Containerfile:2: EXPOSE: invalid containerPort: 99999"),
    ("FROM a\nEXPOSE 90-80", "Containerfile:2: EXPOSE: invalid containerPort: 90-80"),
    ("FROM a\nEXPOSE /tcp", "Containerfile:2: EXPOSE: no port specified: /tcp<empty>"),
    (
        "FROM a\nEXPOSE 1-2:3-5",
        "Containerfile:2: EXPOSE: invalid ranges specified for container and host Ports: 3-5 and 1-2",
    ),
    ("FROM a\nVOLUME", "Containerfile:2: VOLUME: requires at least one argument"),
    ('FROM a\nVOLUME ["/a", " "]', "Containerfile:2: VOLUME: VOLUME specified can not be an empty string"),
    ("FROM a\nHEALTHCHECK", "Containerfile:2: HEALTHCHECK: requires at least one argument"),
    ("FROM a\nHEALTHCHECK NONE x", "Containerfile:2: HEALTHCHECK: NONE takes no arguments"),
    ("FROM a\nHEALTHCHECK --interval=1s NONE", "Containerfile:2: HEALTHCHECK: NONE takes no arguments"),
    ("FROM a\nHEALTHCHECK CMD", "Containerfile:2: HEALTHCHECK: missing command after CMD"),
    (
        "FROM a\nHEALTHCHECK CONNECT TCP 7000",
        'Containerfile:2: HEALTHCHECK: unknown type "CONNECT" (try CMD)',
    ),
    (
        "FROM a\nHEALTHCHECK --interval=5 CMD x",
        'Containerfile:2: HEALTHCHECK: --interval: time: missing unit in duration "5"',
    ),
    (
        "FROM a\nHEALTHCHECK --timeout=5x CMD x",
        'Containerfile:2: HEALTHCHECK: --timeout: time: unknown unit "x" in duration "5x"',
    ),
    (
        "FROM a\nHEALTHCHECK --start-period=abc CMD x",
        'Containerfile:2: HEALTHCHECK: --start-period: time: invalid duration "abc"',
    ),
    (
        "FROM a\nHEALTHCHECK --interval=100us CMD x",
        'Containerfile:2: HEALTHCHECK: Interval "interval" cannot be less than 1ms',
    ),
    (
        "FROM a\nHEALTHCHECK --retries=0 CMD x",
        "Containerfile:2: HEALTHCHECK: --retries must be at least 1 (not 0)",
    ),
    (
        "FROM a\nHEALTHCHECK --retries=x CMD x",
        "Containerfile:2: HEALTHCHECK: --retries must be a whole number (not 'x')",
    ),
    (
        "FROM a\nHEALTHCHECK --intervl=1s CMD x",
        "Containerfile:2: HEALTHCHECK: unknown flag: intervl (did you mean interval?)",
    ),
    (
        "FROM a\nSHELL /bin/sh -c",
        'Containerfile:2: SHELL: requires the arguments to be in JSON form, e.g. SHELL ["/bin/bash", "-c"]',
    ),
    ("FROM a\nSHELL []", "Containerfile:2: SHELL: requires at least one argument"),
    ("FROM a\nSHELL", "Containerfile:2: SHELL: requires at least one argument"),
    ("FROM a\nCMD", "Containerfile:2: CMD: requires at least one argument (write CMD [] to clear it)"),
    (
        "FROM a\nENTRYPOINT",
        "Containerfile:2: ENTRYPOINT: requires at least one argument (write ENTRYPOINT [] to clear it)",
    ),
    (
        "FROM a\nCMD [1, 2]",
        "Containerfile:2: CMD: when using JSON array syntax, arrays must be comprised of strings only",
    ),
    ("FROM a\nONBUILD", "Containerfile:2: ONBUILD: requires at least one argument"),
    (
        "FROM a\nONBUILD ONBUILD RUN x",
        "Containerfile:2: ONBUILD: Chaining ONBUILD via `ONBUILD ONBUILD` isn't allowed",
    ),
    ("FROM a\nONBUILD FROM x", "Containerfile:2: ONBUILD: FROM isn't allowed as an ONBUILD trigger"),
    (
        "FROM a\nONBUILD MAINTAINER me",
        "Containerfile:2: ONBUILD: MAINTAINER isn't allowed as an ONBUILD trigger",
    ),
    ("FROM a\nONBUILD RUN --bad x", "Containerfile:2: ONBUILD RUN: unknown flag: bad"),
    ("FROM a\nONBUILD FOO x", "Containerfile:2: ONBUILD FOO: unknown instruction"),
    ("# escape=x\nFROM a", "Containerfile:1: invalid escape token 'x' does not match ` or \\"),
    ("# escape=`\n# escape=\\\nFROM a", "Containerfile:2: only one escape parser directive can be used"),
    ("# syntax=a\n# SYNTAX=b\nFROM a", "Containerfile:2: only one syntax parser directive can be used"),
    (
        "FROM a\nRUN <<EOF\necho",
        "Containerfile:2: RUN: unterminated heredoc: no line 'EOF' closes <<EOF before the end of the file",
    ),
    (
        "FROM a\nRUN <<A <<B\nA\n",
        "Containerfile:2: RUN: unterminated heredoc: no line 'B' closes <<B before the end of the file",
    ),
    (
        "FROM a\nCOPY <<'EOF /x\nEOF",
        'Containerfile:2: COPY: bad heredoc delimiter "<<\'EOF": failed to process "\'EOF": unexpected end of '
        "statement while looking for matching single-quote",
    ),
    # the first broken instruction in file order is the one reported
    ("FROM a\nRUN ok\nUSER\nWORKDIR", "Containerfile:3: USER: requires exactly one argument"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_error_messages(text: str, message: str) -> None:
    assert error_of(text) == message


def test_error_uses_the_file_name_and_keeps_its_parts() -> None:
    with pytest.raises(ContainerfileError) as info:
        parse("FROM a\n\nRUN --nope x\n", "build/Dockerfile.dev")
    err = info.value
    assert str(err) == "build/Dockerfile.dev:3: RUN: unknown flag: nope"
    assert (err.file, err.line, err.instruction, err.message) == (
        "build/Dockerfile.dev",
        3,
        "RUN",
        "unknown flag: nope",
    )
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.line == 3


# ============================================================================ resolution


def test_global_args_are_only_seen_by_from_unless_redeclared() -> None:
    text = (
        "ARG VERSION=3.19\n"
        "ARG BASE=alpine\n"
        "FROM ${BASE}:${VERSION}\n"
        "RUN echo $VERSION\n"
        "WORKDIR /v$VERSION\n"
        "ARG VERSION\n"
        "WORKDIR /v$VERSION\n"
    )
    (stage,) = resolve(text)
    assert stage.base == "alpine:3.19"
    ins = [r.instruction for r in stage.instructions]
    assert isinstance(ins[1], Workdir) and ins[1].path == "/v"
    assert isinstance(ins[3], Workdir) and ins[3].path == "/v3.19"
    assert "VERSION" not in stage.instructions[0].env
    assert stage.instructions[3].env["VERSION"] == "3.19"


def test_build_args_override_defaults_global_and_local() -> None:
    text = "ARG V=1\nFROM img:$V\nARG V\nARG L=local\nENV OUT=$V-$L\n"
    (stage,) = resolve(text, {"V": "9", "L": "cli"})
    assert stage.base == "img:9"
    env = stage.instructions[2].instruction
    assert isinstance(env, Env) and env.pairs == [("OUT", "9-cli")]
    assert stage.config_env["OUT"] == "9-cli"
    assert "V" not in stage.config_env  # ARGs are not part of the image config


def test_undeclared_build_args_are_ignored_and_reported_unused() -> None:
    text = "ARG G\nFROM a\nENV X=$UNDECLARED\nFROM b AS other\nARG O\n"
    (stage,) = resolve(text, {"UNDECLARED": "x"}, target=None)[:1]
    assert stage.index == 1  # the last stage is the default target
    (first,) = resolve("FROM a\nENV X=$UNDECLARED\n", {"UNDECLARED": "x"})
    env = first.instructions[0].instruction
    assert isinstance(env, Env) and env.pairs == [("X", "")]
    cf = parse(text)
    build_args = {
        "G": "1",
        "O": "2",
        "UNDECLARED": "3",
        "HTTP_PROXY": "p",
        "TARGETARCH": "x",
        "BUILDKIT_INLINE_CACHE": "1",
    }
    assert cf.unused_build_args(build_args) == ["UNDECLARED"]
    assert cf.unused_build_args({"O": "2"}, target=None) == []


def test_unused_build_args_depend_on_the_target() -> None:
    cf = parse("FROM a AS one\nARG ONE\nFROM b AS two\nARG TWO\n")
    assert cf.unused_build_args({"ONE": "1", "TWO": "2"}, target="one") == ["TWO"]
    assert cf.unused_build_args({"ONE": "1", "TWO": "2"}, target="two") == ["ONE"]


def test_arg_without_default_inherits_the_global_value() -> None:
    (stage,) = resolve("ARG G=global\nFROM a\nARG G\nARG TARGETARCH\nARG NOTHING\nRUN x\n")
    arg = stage.instructions[0].instruction
    assert isinstance(arg, Arg) and arg.pairs == [("G", "global")]
    assert stage.instructions[3].env["TARGETARCH"] == "arm64"
    assert "NOTHING" not in stage.instructions[3].env
    assert stage.args == {"G": "global", "TARGETARCH": "arm64", "NOTHING": None}


def test_platform_args_in_from_without_declaration() -> None:
    (stage,) = resolve("FROM --platform=$BUILDPLATFORM golang AS build\nARG TARGETOS TARGETARCH\nRUN x\n")
    assert stage.platform == "linux/amd64"
    assert stage.instructions[1].env["TARGETARCH"] == "arm64"
    (overridden,) = resolve("FROM --platform=$TARGETPLATFORM a\n", {"TARGETPLATFORM": "linux/riscv64"})
    assert overridden.platform == "linux/riscv64"


def test_default_platform_args_describe_this_host() -> None:
    args = default_platform_args()
    assert args["BUILDOS"] == "linux" and args["BUILDPLATFORM"].startswith("linux/")
    assert args["TARGETPLATFORM"] == args["BUILDPLATFORM"]
    cross = default_platform_args("linux/arm/v7")
    assert (cross["TARGETOS"], cross["TARGETARCH"], cross["TARGETVARIANT"]) == ("linux", "arm", "v7")


def test_proxy_args_reach_run_without_declaration() -> None:
    (stage,) = resolve(
        "FROM a\nRUN curl x\n", {"HTTP_PROXY": "http://proxy:3128", "no_proxy": "localhost", "OTHER": "x"}
    )
    assert stage.proxy_env == {"HTTP_PROXY": "http://proxy:3128", "no_proxy": "localhost"}
    assert "HTTP_PROXY" not in stage.instructions[0].env


def test_env_values_see_the_environment_before_the_instruction() -> None:
    (stage,) = resolve("FROM a\nENV abc=hello\nENV abc=bye def=$abc\nENV ghi=$abc\n")
    pairs = [r.instruction.pairs for r in stage.instructions if isinstance(r.instruction, Env)]
    assert pairs == [[("abc", "hello")], [("abc", "bye"), ("def", "hello")], [("ghi", "bye")]]


def test_env_and_arg_precedence_follows_buildkit_order() -> None:
    # ENV after ARG overrides it; an ARG declared after an ENV of the same name wins in the build env
    # (BuildKit adds ARG values to the build environment in order) but never reaches the image config.
    (stage,) = resolve("FROM a\nARG V=arg\nENV V=env\nRUN one\nARG V\nRUN two\n", {"V": "cli"})
    assert stage.instructions[2].env["V"] == "env"
    assert stage.instructions[4].env["V"] == "cli"
    assert stage.config_env["V"] == "env"


def test_arg_default_can_use_earlier_args_and_env() -> None:
    (stage,) = resolve('FROM a\nENV BASE=/opt\nARG DIR=$BASE/app\nARG FULL="${DIR:-x} y"\nRUN x\n')
    assert stage.instructions[3].env["FULL"] == "/opt/app y"


def test_words_of_each_expanded_instruction() -> None:
    text = (
        "FROM a\n"
        "ARG NAME=app U=1000 SIG=SIGINT P=8080 D=/data\n"
        "LABEL name=$NAME \"${NAME}.version\"='$NAME'\n"
        "WORKDIR /srv/$NAME\n"
        "USER ${U}:${U}\n"
        "STOPSIGNAL $SIG\n"
        "EXPOSE $P ${P}/udp\n"
        "VOLUME $D ${D}2\n"
        "COPY --chown=$U:$U --chmod=${MODE:-644} $NAME.conf /etc/$NAME/\n"
        "ADD --chown=$U src.tgz /opt/$NAME\n"
        "CMD echo $NAME\n"
        'ENTRYPOINT ["/bin/$NAME"]\n'
        "HEALTHCHECK CMD check $NAME\n"
        'SHELL ["/bin/$NAME"]\n'
        "RUN echo $NAME\n"
        "ONBUILD RUN echo $NAME\n"
    )
    (stage,) = resolve(text)
    by_kw = {r.instruction.keyword: r.instruction for r in stage.instructions}
    label = by_kw["LABEL"]
    assert isinstance(label, Label) and label.pairs == [("name", "app"), ("app.version", "$NAME")]
    assert isinstance(by_kw["WORKDIR"], Workdir) and by_kw["WORKDIR"].path == "/srv/app"
    assert isinstance(by_kw["USER"], User) and by_kw["USER"].user == "1000:1000"
    assert isinstance(by_kw["STOPSIGNAL"], StopSignal) and by_kw["STOPSIGNAL"].signal == "SIGINT"
    assert isinstance(by_kw["EXPOSE"], Expose) and by_kw["EXPOSE"].ports == ["8080/tcp", "8080/udp"]
    assert isinstance(by_kw["VOLUME"], Volume) and by_kw["VOLUME"].paths == ["/data", "/data2"]
    copy = by_kw["COPY"]
    assert isinstance(copy, Copy)
    assert (copy.chown, copy.chmod, copy.sources, copy.dest) == (
        "1000:1000",
        "644",
        ["app.conf"],
        "/etc/app/",
    )
    add = by_kw["ADD"]
    assert isinstance(add, Add) and (add.chown, add.dest) == ("1000", "/opt/app")
    # RUN, CMD, ENTRYPOINT, HEALTHCHECK, SHELL and ONBUILD are left to the shell / the child build
    assert isinstance(by_kw["CMD"], Cmd) and by_kw["CMD"].command == ["echo $NAME"]
    assert isinstance(by_kw["ENTRYPOINT"], Entrypoint) and by_kw["ENTRYPOINT"].command == ["/bin/$NAME"]
    assert isinstance(by_kw["HEALTHCHECK"], Healthcheck) and by_kw["HEALTHCHECK"].test == [
        "CMD-SHELL",
        "check $NAME",
    ]
    assert isinstance(by_kw["SHELL"], Shell) and by_kw["SHELL"].shell == ["/bin/$NAME"]
    assert isinstance(by_kw["RUN"], Run) and by_kw["RUN"].command == ["echo $NAME"]
    assert isinstance(by_kw["ONBUILD"], Onbuild) and by_kw["ONBUILD"].expression == "RUN echo $NAME"
    assert stage.instructions[-2].env["NAME"] == "app"  # RUN sees the ARG in its environment


def test_copy_paths_with_spaces_need_json_form_like_docker() -> None:
    (stage,) = resolve('FROM a\nARG F="my file"\nCOPY ["$F", "/x/$F"]\n')
    copy = stage.instructions[1].instruction
    assert isinstance(copy, Copy) and (copy.sources, copy.dest) == (["my file"], "/x/my file")
    with pytest.raises(
        ContainerfileError, match=r'^Containerfile:2: COPY: failed to process "\\"a": unexpected end'
    ):
        resolve('FROM a\nCOPY "a b" /x\n')


def test_heredoc_content_is_expanded_for_copy_unless_quoted() -> None:
    text = "FROM a\nARG WHO=world\nCOPY <<hello.txt <<'raw.txt' <<-tabs.txt /\nhello $WHO \"q\" 'q'\nhello.txt\n$WHO\nraw.txt\n\t$WHO\n\ttabs.txt\nRUN <<EOF\necho $WHO\nEOF\n"
    (stage,) = resolve(text)
    copy = stage.instructions[1].instruction
    assert isinstance(copy, Copy)
    assert [(d.name, d.content, d.expand, d.chomp) for d in copy.heredoc_sources] == [
        ("hello.txt", "hello world \"q\" 'q'\n", False, False),
        ("raw.txt", "$WHO\n", False, False),
        ("tabs.txt", "world\n", False, False),
    ]
    run = stage.instructions[2].instruction
    assert isinstance(run, Run) and run.shell_script() == "echo $WHO\n"  # the shell expands RUN's


def test_stopsignal_and_checksum_are_validated_after_expansion() -> None:
    with pytest.raises(ContainerfileError, match=r"^Containerfile:3: STOPSIGNAL: Invalid signal: NOPE"):
        resolve("FROM a\nARG S=NOPE\nSTOPSIGNAL $S\n")
    with pytest.raises(ContainerfileError, match=r"^Containerfile:2: ADD: invalid checksum digest format"):
        resolve("FROM a\nADD --checksum=sha256:abc http://x /y\n")
    with pytest.raises(ContainerfileError, match=r"^Containerfile:3: EXPOSE: invalid proto: bad"):
        resolve("FROM a\nARG P=80/bad\nEXPOSE $P\n")
    with pytest.raises(
        ContainerfileError, match=r"^Containerfile:2: VOLUME: VOLUME specified can not be an empty string"
    ):
        resolve("FROM a\nVOLUME $EMPTY\n")


def test_substitution_errors_name_the_line_and_instruction() -> None:
    with pytest.raises(
        ContainerfileError,
        match=r'^Containerfile:3: ENV: failed to process "\\"\$\{NEED:\?set NEED\}\\"": NEED: set NEED$',
    ):
        resolve('FROM a\nRUN x\nENV X="${NEED:?set NEED}"\n')
    with pytest.raises(ContainerfileError, match=r"^Containerfile:1: ARG: failed to process"):
        resolve("ARG V=${\nFROM a\n")
    with pytest.raises(ContainerfileError, match=r"^Containerfile:2: ARG: failed to process"):
        resolve("FROM a\nARG V=${\n")


def test_from_errors_at_resolution() -> None:
    with pytest.raises(
        ContainerfileError, match=r"^Containerfile:2: FROM: base name \(\$\{X\}\) should not be blank$"
    ):
        resolve("ARG X\nFROM ${X}\n")
    with pytest.raises(
        ContainerfileError, match=r"^Containerfile:1: FROM: empty platform value from expression \$\{P\}$"
    ):
        resolve("FROM --platform=${P} a\n")
    with pytest.raises(
        ContainerfileError, match=r"^Containerfile:1: FROM: failed to parse platform 'a/b/c/d'"
    ):
        resolve("FROM --platform=a/b/c/d a\n")


MULTI_STAGE = """\
ARG GO=1.22
FROM golang:${GO} AS deps
RUN go mod download

FROM deps AS build
COPY . .
RUN go build -o /out/app

FROM alpine AS unrelated
RUN echo never

FROM build AS test
RUN go test ./...

FROM scratch
COPY --from=build /out/app /app
COPY --from=nginx:1.25 /etc/nginx/nginx.conf /etc/nginx/
ENTRYPOINT ["/app"]
"""


def test_default_target_is_the_last_stage_and_pulls_its_dependencies() -> None:
    stages = resolve(MULTI_STAGE)
    assert [(s.index, s.name, s.base, s.base_stage, s.is_target) for s in stages] == [
        (0, "deps", "golang:1.22", None, False),
        (1, "build", "deps", 0, False),
        (4, None, "scratch", None, True),
    ]
    final = stages[-1]
    assert final.display_name == "stage-4"
    copies = [r for r in final.instructions if isinstance(r.instruction, Copy)]
    assert (copies[0].source_stage, copies[0].source_image) == (1, None)
    assert (copies[1].source_stage, copies[1].source_image) == (None, "nginx:1.25")


@pytest.mark.parametrize(
    ("target", "indexes"),
    [("deps", [0]), ("build", [0, 1]), ("BUILD", [0, 1]), ("unrelated", [2]), ("test", [0, 1, 3])],
)
def test_target_selects_stages(target: str, indexes: list[int]) -> None:
    stages = resolve(MULTI_STAGE, {"GO": "1.21"}, target=target)
    assert [s.index for s in stages] == indexes
    assert stages[0].base.startswith("golang:1.21") or target == "unrelated"
    assert stages[-1].is_target


def test_copy_from_index_and_run_mount_from_are_dependencies() -> None:
    text = "FROM a AS zero\nFROM b AS one\nFROM c AS two\nCOPY --from=0 /x /y\nRUN --mount=type=bind,from=one,target=/m ls /m\n"
    stages = resolve(text)
    assert [s.index for s in stages] == [0, 1, 2]
    run = stages[-1].instructions[1]
    assert run.mount_stages == {"one": 1}
    assert stages[-1].instructions[0].source_stage == 0


def test_child_stage_inherits_env_args_and_onbuild_triggers() -> None:
    text = "FROM a AS base\nARG A=1\nENV E=2\nONBUILD RUN echo $E\nONBUILD COPY --from=0 x y\nFROM base\nRUN use\n"
    _, child = resolve(text)
    assert child.base_stage == 0
    assert [(type(r.instruction).__name__, r.from_onbuild) for r in child.instructions] == [
        ("Run", True),
        ("Copy", True),
        ("Run", False),
    ]
    assert child.instructions[1].source_stage == 0
    assert child.instructions[2].env["A"] == "1" and child.instructions[2].env["E"] == "2"
    assert child.config_env == {"PATH": DEFAULT_PATH, "E": "2"}
    assert child.args == {"A": "1"}
    assert child.instructions[0].instruction.line == 6  # triggers are reported at the child's FROM


def test_base_image_config_feeds_env_and_onbuild() -> None:
    calls: list[tuple[str, str | None]] = []

    def base_image(ref: str, platform: str | None) -> BaseImageConfig | None:
        calls.append((ref, platform))
        if ref.startswith("golang"):
            return BaseImageConfig(env=["PATH=/go/bin:/usr/bin", "GOPATH=/go"], onbuild=["RUN echo onbuild"])
        return None

    text = "FROM scratch AS s\nFROM --platform=linux/amd64 golang:1.22 AS b\nWORKDIR $GOPATH/src\nFROM alpine\nCOPY --from=b /go/bin/x /x\n"
    stages = resolve(text, base_image=base_image)
    assert sorted(calls) == [("alpine", None), ("golang:1.22", "linux/amd64")]  # not scratch, once each
    golang = stages[0]
    assert [type(r.instruction).__name__ for r in golang.instructions] == ["Run", "Workdir"]
    assert golang.instructions[0].from_onbuild
    workdir = golang.instructions[1].instruction
    assert isinstance(workdir, Workdir) and workdir.path == "/go/src"
    assert golang.config_env == {"PATH": "/go/bin:/usr/bin", "GOPATH": "/go"}
    assert stages[1].config_env == {"PATH": DEFAULT_PATH}


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        (
            "FROM a AS x\nFROM b AS y\n",
            "z",
            'Containerfile: --target: target stage "z" could not be found (did you mean x?); stages: x, y',
        ),
        (
            "FROM a AS build\nFROM b\n",
            "buidl",
            'Containerfile: --target: target stage "buidl" could not be found (did you mean build?); stages: build',
        ),
        (
            "FROM a\nFROM b\n",
            "x",
            'Containerfile: --target: target stage "x" could not be found; no stage has a name (use FROM image AS name)',
        ),
        (
            "FROM a\nCOPY --from=5 x y\n",
            None,
            "Containerfile:2: COPY: invalid stage index 5 (stages are numbered 0 to 0)",
        ),
        (
            "FROM a\nCOPY --from=-1 x y\n",
            None,
            "Containerfile:2: COPY: invalid stage index -1 (stages are numbered 0 to 0)",
        ),
        (
            "FROM a AS me\nCOPY --from=me x y\n",
            None,
            "Containerfile:2: COPY: circular dependency detected on stage: me",
        ),
        (
            "FROM a\nCOPY --from=0 x y\n",
            None,
            "Containerfile:2: COPY: circular dependency detected on stage: stage-0",
        ),
        (
            "FROM a AS first\nCOPY --from=second x y\nFROM b AS second\n",
            "first",
            'Containerfile:2: COPY: cannot copy from stage "second", it needs to be defined before current stage "first"',
        ),
        (
            "FROM a AS first\nCOPY --from=1 x y\nFROM b AS second\n",
            "first",
            'Containerfile:2: COPY: cannot copy from stage "1", it needs to be defined before current stage "first"',
        ),
        (
            "FROM a AS first\nRUN --mount=from=second,target=/m x\nFROM b AS second\n",
            "first",
            'Containerfile:2: RUN: cannot mount from stage "second", it needs to be defined before current stage "first"',
        ),
    ],
)
def test_resolution_errors(text: str, target: str | None, message: str) -> None:
    with pytest.raises(ContainerfileError) as info:
        resolve(text, target=target)
    assert str(info.value) == message


def test_from_a_later_stage_name_is_an_image_like_docker() -> None:
    stages = resolve("FROM later AS first\nFROM b AS later\n", target="first")
    assert [(s.base, s.base_stage) for s in stages] == [("later", None)]


def test_stages_not_needed_are_not_checked() -> None:
    # stage 0 refers to a later stage, which only matters when stage 0 is built
    stages = resolve("FROM a\nCOPY --from=1 x y\nFROM b\n")
    assert [s.index for s in stages] == [1]


def test_resolve_does_not_change_the_parsed_file() -> None:
    cf = parse("ARG V=1\nFROM a:$V\nENV X=$V\nARG V\nENV Y=$V\n")
    cf.resolve({"V": "2"}, platform_args=PLATFORM)
    env = cf.stages[0].instructions[0]
    assert isinstance(env, Env) and env.pairs == [("X", "$V")]
    assert cf.stages[0].base == "a:$V"


def test_resolved_instruction_env_is_a_snapshot() -> None:
    (stage,) = resolve("FROM a\nENV A=1\nENV A=2\nRUN x\n")
    assert [r.env.get("A") for r in stage.instructions] == [None, "1", "2"]
    assert stage.env["A"] == "2"


def test_containerfile_type_and_exports() -> None:
    cf = parse("FROM a\n")
    assert isinstance(cf, Containerfile) and cf.filename == "Containerfile"
    assert set(cfmod.__all__) >= {"parse", "expand", "expand_words", "Containerfile", "ContainerfileError"}


@pytest.mark.parametrize(
    ("trigger", "message"),
    [
        ("RUN --bogus x", "unknown flag: bogus"),
        ("FROM x", "not a single instruction that ONBUILD allows"),
        ("RUN a\nRUN b", "not a single instruction that ONBUILD allows"),
        ("RUN <<EOF", "unterminated heredoc"),
    ],
)
def test_bad_onbuild_trigger_of_a_base_image(trigger: str, message: str) -> None:
    def base_image(ref: str, platform: str | None) -> BaseImageConfig:
        return BaseImageConfig(onbuild=[trigger])

    with pytest.raises(ContainerfileError) as info:
        resolve("FROM a\nFROM b\nRUN x\n", base_image=base_image)
    assert str(info.value).startswith(
        f"Containerfile:2: FROM: ONBUILD trigger {trigger!r} of the base image: "
    )
    assert message in str(info.value)


def test_base_image_onbuild_heredoc_trigger() -> None:
    def base_image(ref: str, platform: str | None) -> BaseImageConfig:
        return BaseImageConfig(onbuild=["COPY <<EOF /greeting\nhello $WHO\nEOF"])

    (stage,) = resolve("FROM a\n", base_image=base_image)
    copy = stage.instructions[0].instruction
    assert isinstance(copy, Copy) and copy.heredoc_sources[0].content == "hello \n"
    assert stage.instructions[0].from_onbuild
