"""Image references: `name[:tag][@digest]`, normalized the way Docker does.

Grammar from the distribution project's `reference` package: a name is an optional domain (a host
name with an optional port, recognised by a `.` or `:` or being `localhost`) and slash-separated
path components of lowercase letters and digits joined by `.`, `_`, `__` or dashes; a tag is up to
128 of `[A-Za-z0-9_.-]` not starting with `.` or `-`; a digest is `algorithm:hex`.

Like Docker, `busybox` means `docker.io/library/busybox:latest`, and `familiar()` gives the short
form back. cocon never contacts that registry: the name is only an identity for local images.
"""

from __future__ import annotations

import re

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_IPV6 = r"\[(?:[a-fA-F0-9:]+)\]"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|{_IPV6})(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)
_NAME_MAX = 255


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
        m = _REFERENCE.match(text)
        if m is None:
            if text.lower() != text and _REFERENCE.match(text.lower()):
                raise ReferenceError(f"invalid reference {text!r}: repository names must be lowercase")
            raise ReferenceError(
                f"invalid reference {text!r}: use NAME[:TAG][@DIGEST], e.g. busybox:latest or "
                "localhost:5000/team/app@sha256:<64 hex digits>"
            )
        name = m.group("name")
        if len(name) > _NAME_MAX:
            raise ReferenceError(
                f"invalid reference {text!r}: the name is longer than {_NAME_MAX} characters"
            )
        domain, path = split_domain(name)
        digest = m.group("digest")
        if digest is not None:
            algorithm, _, hexpart = digest.partition(":")
            if algorithm == "sha256" and len(hexpart) != 64:
                raise ReferenceError(f"invalid reference {text!r}: a sha256 digest has 64 hex digits")
            digest = digest.lower() if algorithm == "sha256" else digest
        tag = m.group("tag")
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
        if not re.fullmatch(_TAG, tag):
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
