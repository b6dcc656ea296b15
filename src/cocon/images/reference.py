"""Image references: `name[:tag][@digest]`, normalized the way Docker does.

Grammar from the distribution project's `reference` package: a name is an optional domain (a host
name with an optional port, recognised by a `.` or `:` or being `localhost`) and slash-separated
path components of lowercase letters and digits joined by `.`, `_`, `__` or dashes; a tag is up to
128 of `[A-Za-z0-9_.-]` not starting with `.` or `-`; a digest is `algorithm:hex`.

Like Docker, `busybox` means `docker.io/library/busybox:latest`, and `familiar()` gives the short
form back. cocon never contacts that registry: the name is only an identity for local images.
"""

from __future__ import annotations

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
_NAME_MAX = 255
_TAG_MAX = 128

# The grammar, checked by hand below rather than with a regular expression: `re` (and compiling the
# pattern) costs more than `cocon run` spends on everything else before it starts the container.
#   name       [domain "/"] component ("/" component)*
#   domain     (label ("." label)* | "[" [a-fA-F0-9:]+ "]") [":" [0-9]+]
#   label      [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
#   component  [a-z0-9]+ (("." | "_" | "__" | "-"+) [a-z0-9]+)*
#   tag        [\w][\w.-]{0,127}      (\w as Python's: letters, digits, "_")
#   digest     [A-Za-z][A-Za-z0-9]* ([-_+.][A-Za-z][A-Za-z0-9]*)* ":" [0-9a-fA-F]{32,}
_DIGITS = frozenset("0123456789")
_LOWER_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_ALPHA = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ALNUM = _ALPHA | _DIGITS
_LABEL_CHARS = _ALNUM | {"-"}
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:")
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGEST_SEPARATORS = frozenset("-_+.")


def _is_component(part: str) -> bool:
    if _LOWER_ALNUM.issuperset(part):
        return bool(part)
    if part[0] not in _LOWER_ALNUM or part[-1] not in _LOWER_ALNUM:
        return False
    i, n = 0, len(part)
    while i < n:
        if part[i] in _LOWER_ALNUM:
            i += 1
            continue
        j = i
        while part[j] not in _LOWER_ALNUM:  # ends before the last character, which is alphanumeric
            j += 1
        separator = part[i:j]
        if separator not in (".", "_", "__") and separator.strip("-"):
            return False
        i = j
    return True


def _is_label(label: str) -> bool:
    return bool(label) and label[0] in _ALNUM and label[-1] in _ALNUM and _LABEL_CHARS.issuperset(label)


def _is_domain(domain: str) -> bool:
    if domain.startswith("["):
        address, bracket, port = domain[1:].partition("]")
        if not bracket or not address or not _IPV6_CHARS.issuperset(address):
            return False
        if not port:
            return True
        if port[0] != ":":
            return False
        colon, digits = ":", port[1:]
    else:
        host, colon, digits = domain.partition(":")
        if not all(_is_label(label) for label in host.split(".")):
            return False
    return not colon or (bool(digits) and _DIGITS.issuperset(digits))


def _is_name(name: str) -> bool:
    components = name.split("/")
    if all(_is_component(c) for c in components[1:]):
        return _is_component(components[0]) or (len(components) > 1 and _is_domain(components[0]))
    return False


def _is_tag_char(c: str) -> bool:
    return c.isalnum() or c in "_.-"


def _is_tag(tag: str) -> bool:
    if not 0 < len(tag) <= _TAG_MAX or not (tag[0].isalnum() or tag[0] == "_"):
        return False
    return tag.isalnum() or all(_is_tag_char(c) for c in tag)


def _is_digest(digest: str) -> bool:
    algorithm, colon, encoded = digest.partition(":")
    if not colon or len(encoded) < 32 or not _HEX.issuperset(encoded):
        return False
    start = True  # a component starts: a letter is needed
    for c in algorithm:
        if c in _ALPHA:
            start = False
        elif c in _DIGITS or c in _DIGEST_SEPARATORS:
            if start:
                return False
            start = c in _DIGEST_SEPARATORS
        else:
            return False
    return not start


def _split(text: str) -> tuple[str, str | None, str | None] | None:
    """(name, tag, digest) of `text` when it follows the grammar, else None."""
    rest, at, digest = text.partition("@")
    if at and not _is_digest(digest):
        return None
    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):  # after every "/": not a domain's port, so a tag
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _is_tag(tag):
            return None
    if not _is_name(rest):
        return None
    return rest, tag, digest if at else None


class ReferenceError(ValueError):
    """A string that is not a valid image reference."""


class Reference:
    """A normalized image reference: `domain/path`, an optional tag and an optional digest."""

    __slots__ = ("digest", "domain", "path", "tag")

    def __init__(self, domain: str, path: str, tag: str | None = None, digest: str | None = None) -> None:
        self.domain = domain
        self.path = path
        self.tag = tag
        self.digest = digest

    @classmethod
    def parse(cls, text: str, *, default_tag: bool = True) -> Reference:
        """Parse and normalize; without tag or digest the tag is `latest` (unless default_tag=False)."""
        if not text:
            raise ReferenceError("an image reference cannot be empty")
        parts = _split(text)
        if parts is None:
            if text.lower() != text and _split(text.lower()) is not None:
                raise ReferenceError(f"invalid reference {text!r}: repository names must be lowercase")
            raise ReferenceError(
                f"invalid reference {text!r}: use NAME[:TAG][@DIGEST], e.g. busybox:latest or "
                "localhost:5000/team/app@sha256:<64 hex digits>"
            )
        name, tag, digest = parts
        if len(name) > _NAME_MAX:
            raise ReferenceError(
                f"invalid reference {text!r}: the name is longer than {_NAME_MAX} characters"
            )
        domain, path = split_domain(name)
        if digest is not None:
            algorithm, _, hexpart = digest.partition(":")
            if algorithm == "sha256" and len(hexpart) != 64:
                raise ReferenceError(f"invalid reference {text!r}: a sha256 digest has 64 hex digits")
            digest = digest.lower() if algorithm == "sha256" else digest
        if tag is None and digest is None and default_tag:
            tag = DEFAULT_TAG
        return cls(domain, path, tag, digest)

    @property
    def name(self) -> str:
        """The full repository name, e.g. docker.io/library/busybox."""
        return f"{self.domain}/{self.path}"

    def familiar_name(self) -> str:
        """The short repository name users type, e.g. busybox or team/app or localhost:5000/app."""
        if self.domain == DEFAULT_DOMAIN:
            return self.path.removeprefix(OFFICIAL_REPO_PREFIX)
        return self.name

    def familiar(self) -> str:
        return self.familiar_name() + self._suffix()

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def with_tag(self, tag: str) -> Reference:
        if not _is_tag(tag):
            raise ReferenceError(f"invalid tag {tag!r}: use up to 128 letters, digits, '_', '.', '-'")
        return Reference(self.domain, self.path, tag, None)

    def __str__(self) -> str:
        return self.name + self._suffix()

    def __repr__(self) -> str:
        return f"Reference({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))


def split_domain(name: str) -> tuple[str, str]:
    """Docker's rule: the first component is a domain if it has a `.` or `:` or is `localhost`."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    return domain, path
