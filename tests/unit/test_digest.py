"""cocon.oci.digest: strict parsing of sha256/sha512 digests, hashing, and the errors' messages."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from cocon.oci.digest import Digest, DigestError, Hasher, as_digest, digest_of, sha256_of
from cocon.oci.errors import OCIError

HEX256 = hashlib.sha256(b"hello").hexdigest()
HEX512 = hashlib.sha512(b"hello").hexdigest()


def test_parse_sha256() -> None:
    d = Digest.parse(f"sha256:{HEX256}")
    assert d.algorithm == "sha256"
    assert d.hex == HEX256
    assert str(d) == f"sha256:{HEX256}"
    assert d.short == HEX256[:12]
    assert repr(d) == f"Digest('sha256:{HEX256}')"


def test_parse_sha512() -> None:
    d = Digest.parse(f"sha512:{HEX512}")
    assert (d.algorithm, d.hex) == ("sha512", HEX512)
    assert Digest("sha512", HEX512) == d


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "is not a digest: expected '<algorithm>:<hex>'"),
        (HEX256, "is not a digest: expected '<algorithm>:<hex>'"),
        ("sha256:", "is not a digest"),
        (f":{HEX256}", "is not a digest"),
        (f"sha256:{HEX256[:-1]}", "expected 64 hex digits after 'sha256:', got 63"),
        (f"sha256:{HEX256}0", "expected 64 hex digits after 'sha256:', got 65"),
        (f"sha512:{HEX256}", "expected 128 hex digits after 'sha512:', got 64"),
        (f"sha256:{HEX256.upper()}", "is not a hex digit (hex digits must be lowercase)"),
        (f"sha256:{HEX256[:-1]}g", "'g' is not a hex digit"),
        (f"sha256: {HEX256[1:]}", "' ' is not a hex digit"),
        (f"md5:{HEX256[:32]}", "unsupported digest algorithm 'md5' (supported: sha256, sha512)"),
        (f"blake3:{HEX256}", "unsupported digest algorithm 'blake3'"),
        (f"SHA256:{HEX256}", "the algorithm 'SHA256' is malformed"),
        (f"sha256+:{HEX256}", "the algorithm 'sha256+' is malformed"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(DigestError) as info:
        Digest.parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, OCIError)


def test_parse_rejects_non_string() -> None:
    with pytest.raises(DigestError, match="a digest is a string like 'sha256:<64 hex digits>', not a bytes"):
        Digest.parse(b"sha256:00")  # type: ignore[arg-type]


def test_constructor_validates() -> None:
    with pytest.raises(DigestError, match="expected 64 hex digits"):
        Digest("sha256", "abc")


def test_equality_hash_order_and_immutability() -> None:
    a = Digest.parse(f"sha256:{HEX256}")
    b = Digest("sha256", HEX256)
    c = sha256_of(b"other")
    assert a == b and hash(a) == hash(b) and len({a, b, c}) == 2
    assert a != str(a)  # a Digest is not its string
    assert sorted([a, c]) == sorted([c, a])
    assert sorted([a, c])[0] == min(a, c, key=str)
    with pytest.raises(AttributeError):
        a.hex = "0"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(a)) == a


def test_as_digest() -> None:
    d = sha256_of(b"x")
    assert as_digest(d) is d
    assert as_digest(str(d)) == d
    with pytest.raises(DigestError):
        as_digest("nope")


def test_sha256_of_and_hasher() -> None:
    assert sha256_of(b"hello") == Digest("sha256", HEX256)
    h = Hasher()
    for chunk in (b"he", bytearray(b"l"), memoryview(b"lo")):
        h.update(chunk)
    assert h.size == 5
    assert h.digest() == sha256_of(b"hello")
    h512 = Hasher("sha512")
    h512.update(b"hello")
    assert h512.digest() == Digest("sha512", HEX512) == digest_of(b"hello", "sha512")
    assert h512.algorithm == "sha512"


def test_hasher_counts_bytes_of_wide_memoryviews() -> None:
    import array

    h = Hasher()
    h.update(memoryview(array.array("I", [1, 2, 3])))
    assert h.size == 12


def test_hasher_unsupported_algorithm() -> None:
    with pytest.raises(DigestError, match="unsupported digest algorithm 'md5'"):
        Hasher("md5")


@pytest.mark.parametrize(
    "algorithm, ok",
    [("sha256", True), ("a+b.c_d-e", True), ("x1", True), ("", False), ("+a", False), ("a+", False),
     ("a++b", False), ("a+.b", False), ("A", False), ("a b", False), ("é", False)],
)  # fmt: skip
def test_algorithm_grammar(algorithm: str, ok: bool) -> None:
    from cocon.oci.digest import _algorithm_ok

    assert _algorithm_ok(algorithm) is ok


def test_sha256_hex_small_and_large() -> None:
    from cocon.oci.digest import is_lower_hex, sha256_hex

    for data in (b"", b"abc", b"x" * 65536, b"y" * 65537, bytearray(b"z" * 10), memoryview(b"w" * 100_000)):
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert is_lower_hex("0123456789abcdef") and is_lower_hex("")
    assert not is_lower_hex("0A") and not is_lower_hex("g") and not is_lower_hex("٣")
