"""`cocon run` imports the image store, the snapshotter and the runtime-config builder themselves: none
of them may pull in a module that costs more to import than the work they do (docs/run.md, "Speed")."""

from __future__ import annotations

import os
import subprocess
import sys

import cocon

SRC = os.path.dirname(os.path.dirname(os.path.abspath(cocon.__file__)))

HOT = [
    "cocon.images.store",
    "cocon.snapshots.overlay",
    "cocon.isolation.spec",
    "cocon.isolation.container",
    "cocon.oci.image_spec",
    "cocon.oci.seccomp_profiles",
    "cocon.content",
    "cocon.engine.engine",
    "cocon.engine.containers",
]
# each of these costs from one to several milliseconds (re with enum and sre_compile, dataclasses
# with inspect and ast, hashlib with OpenSSL, shutil with fnmatch and the compressors, …)
HEAVY = [
    "re", "dataclasses", "typing", "inspect", "hashlib", "_hashlib", "shutil", "tempfile", "json",
    "contextlib", "threading", "secrets", "base64", "logging", "tarfile", "gzip", "zlib", "zstandard",
    "sqlite3", "datetime", "random", "importlib", "enum", "ast",
]  # fmt: skip


def test_the_hot_path_modules_import_nothing_heavy() -> None:
    probe = (
        "import sys\n"
        f"sys.path.insert(0, {SRC!r})\n"
        f"for name in {HOT!r}:\n"
        "    __import__(name)\n"
        f"print(' '.join(sorted(set({HEAVY!r}) & set(sys.modules))))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_the_snapshots_package_alone_is_light() -> None:
    probe = f"import sys\nsys.path.insert(0, {SRC!r})\nimport cocon.snapshots\nprint(*sorted(sys.modules))\n"
    out = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True, check=True)
    assert [m for m in out.stdout.split() if m.startswith("cocon.")] == ["cocon._typing", "cocon.snapshots"]


def test_records_behave_like_dataclasses() -> None:
    """cocon._typing.record gives each class an __init__ without compiling code for it (compiling one
    per class cost every `cocon run` about a millisecond): the same behaviour as a dataclass's."""
    import dataclasses

    import pytest

    from cocon._typing import record

    @record(frozen=True)
    class Frozen:
        key: str
        parents: tuple[str, ...]
        note: str = "n"
        extra: tuple[int, ...] = ()

    @dataclasses.dataclass(frozen=True)
    class Twin:
        key: str
        parents: tuple[str, ...]
        note: str = "n"
        extra: tuple[int, ...] = ()

    for args, kwargs in [
        (("k", ("p",)), {}),
        (("k",), {"parents": (), "extra": (1,)}),
        ((), {"key": "a", "parents": ("b",), "note": "x"}),
    ]:
        a, b = Frozen(*args, **kwargs), Twin(*args, **kwargs)
        assert repr(a).partition("(")[2] == repr(b).partition("(")[2] and a == Frozen(*args, **kwargs)
        assert hash(a) == hash(Frozen(*args, **kwargs)) and list(a.__dataclass_fields__) == [
            "key",
            "parents",
            "note",
            "extra",
        ]
    with pytest.raises(AttributeError, match="frozen"):
        Frozen("k", ()).key = "x"  # type: ignore[misc]
    for bad_args, bad_kwargs in [
        ((), {}),
        (("k", (), "n", (), 5), {}),
        (("k", ()), {"nope": 1}),
        (("k", ()), {"key": "k"}),
    ]:
        with pytest.raises(TypeError):
            Frozen(*bad_args, **bad_kwargs)
        with pytest.raises(TypeError):
            Twin(*bad_args, **bad_kwargs)

    @record
    class Mutable:
        n: int

    m = Mutable(1)
    m.n = 2
    assert m == Mutable(2) and m != Frozen("k", ()) and Mutable.__hash__ is None

    @record
    class Empty:
        pass

    assert Empty() == Empty() and repr(Empty()) == "Empty()"
    with pytest.raises(TypeError, match="non-default field 'b' follows"):

        @record
        class Bad:
            a: int = 1
            b: int
