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
