"""Image references parse and normalize as Docker's do."""

from __future__ import annotations

import pytest

from cocon.images.reference import Reference, ReferenceError

D = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "text, full, familiar",
    [
        ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
        ("team/app:v1", "docker.io/team/app:v1", "team/app:v1"),
        ("docker.io/library/debian:bookworm", "docker.io/library/debian:bookworm", "debian:bookworm"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
        ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("registry.example.org/x", "registry.example.org/x:latest", "registry.example.org/x:latest"),
        (f"busybox@{D}", f"docker.io/library/busybox@{D}", f"busybox@{D}"),
        (f"busybox:1@{D}", f"docker.io/library/busybox:1@{D}", f"busybox:1@{D}"),
        ("a__b/c-d.e_f", "docker.io/a__b/c-d.e_f:latest", "a__b/c-d.e_f:latest"),
    ],
)
def test_parse_and_normalize(text: str, full: str, familiar: str) -> None:
    ref = Reference.parse(text)
    assert str(ref) == full
    assert ref.familiar() == familiar
    assert Reference.parse(full) == ref


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "cannot be empty"),
        ("BusyBox", "lowercase"),
        ("busybox:", "invalid reference"),
        ("busy box", "invalid reference"),
        ("a/-b", "invalid reference"),
        ("busybox:" + "x" * 129, "invalid reference"),
        ("busybox@sha256:abc", "invalid reference"),
        ("busybox@sha256:" + "a" * 63 + "g", "invalid reference"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(ReferenceError, match=message):
        Reference.parse(text)


def test_with_tag_and_no_default_tag() -> None:
    ref = Reference.parse("busybox", default_tag=False)
    assert ref.tag is None and str(ref) == "docker.io/library/busybox"
    assert str(ref.with_tag("v2")) == "docker.io/library/busybox:v2"
    with pytest.raises(ReferenceError, match="invalid tag"):
        ref.with_tag("-bad")


# The distribution project's grammar as a regular expression (what this module used to compile): the
# hand-written parser must accept exactly what it accepts, with the same name, tag and digest.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[(?:[a-fA-F0-9:]+)\])(?::[0-9]+)?"
_GRAMMAR = (
    rf"(?P<name>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?"
)


def test_the_parser_accepts_exactly_the_grammar() -> None:
    import random
    import re

    from cocon.images import reference

    grammar = re.compile(_GRAMMAR)
    pieces = ["a", "b", "Z", "9", "_", "__", "-", "--", ".", ":", "/", "@", "[", "]", "::1", "localhost",
              "5000", "é", "٣", " ", "\n", "A", "sha256:" + "a" * 64, "sha256", "x" * 40, "v1.2", "[::1]",
              "localhost:5000"]  # fmt: skip
    rng = random.Random(7)
    accepted: list[tuple[str, str | None, str | None]] = []
    for i in range(60000):
        if i % 3 == 0:
            text = "".join(rng.choice("aZb9_-.:/@[]xé1٣ ") for _ in range(rng.randint(0, 14)))
        elif i % 3 == 1:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        else:  # digests: algorithm components and separators, then hex (or not quite)
            algorithm = "".join(
                rng.choice(["sha", "256", "A", "b2", "+", ".", "-", "_", "9"]) for _ in range(3)
            )
            encoded = "".join(rng.choice("0123456789abcdefABCDEFg") for _ in range(rng.choice([31, 32, 64])))
            text = rng.choice(["app", "a/b:1", "localhost:5000/x", ""]) + "@" + algorithm + ":" + encoded
        m = grammar.fullmatch(text)
        want = None if m is None else (m.group("name"), m.group("tag"), m.group("digest"))
        assert reference._split(text) == want, text
        if want is not None:
            accepted.append(want)
    # the random strings reach the interesting cases: tags, digests, domains with ports, IPv6
    assert len(accepted) > 2000 and sum(tag is not None for _, tag, _ in accepted) > 200
    assert sum(digest is not None for _, _, digest in accepted) > 20
    assert any(name.startswith("localhost:5000/") for name, _, _ in accepted)
    assert any(name.startswith("[::1]") for name, _, _ in accepted)


@pytest.mark.parametrize(
    "text, full",
    [
        ("[::1]:5000/app:1", "[::1]:5000/app:1"),
        ("[fe80::1]/a/b", "[fe80::1]/a/b:latest"),
        ("Registry.Example:443/app", "Registry.Example:443/app:latest"),
        ("app:ünï_cødé", "docker.io/library/app:ünï_cødé"),  # \w is Unicode, as the pattern's was
        (f"app@sha512:{'b' * 128}", f"docker.io/library/app@sha512:{'b' * 128}"),
    ],
)
def test_domains_tags_and_digests(text: str, full: str) -> None:
    assert str(Reference.parse(text)) == full


@pytest.mark.parametrize(
    "text", ["busybox\n", "busybox:1\n", "[::1]x5/app", "a:/b", "a/b:c/d", "app@", "@sha256:x"]
)
def test_odd_strings_are_refused(text: str) -> None:
    with pytest.raises(ReferenceError, match="invalid reference"):
        Reference.parse(text)
