"""cocon.oci.jsonobj: typed decoding with JSON-path errors, camelCase names, defaults left out."""

from __future__ import annotations

from typing import Any

import pytest

from cocon.oci.jsonobj import DecodeError, decode, encode, field, json_object, replace


@json_object()
class Inner:
    host_id: int = field(metadata={"json": "hostID"})
    tags: list[str] | None = None


@json_object()
class Outer:
    name: str
    inner: Inner | None = None
    items: list[Inner] = field(default_factory=list)
    labels: dict[str, str] | None = None
    enabled: bool = False


def test_decode_camel_and_renamed_fields() -> None:
    obj = decode(b'{"name": "x", "inner": {"hostID": 3, "tags": ["a"]}, "enabled": true, "extra": 1}', Outer)
    assert obj == Outer(name="x", inner=Inner(host_id=3, tags=["a"]), enabled=True)
    assert obj.items == []


@pytest.mark.parametrize(
    "doc, message",
    [
        (b'{"name": 1}', "Expected `str`, got `int` - at `$.name`"),
        (b'{"name": "x", "enabled": 1}', "Expected `bool`, got `int` - at `$.enabled`"),
        (b'{"name": "x", "inner": {"hostID": true}}', "Expected `int`, got `bool` - at `$.inner.hostID`"),
        (b'{"name": "x", "items": [{"hostID": 1}, {}]}', "missing required field `hostID` - at `$.items[1]`"),
        (b'{"name": "x", "labels": {"a": 2}}', "Expected `str`, got `int` - at `$.labels.a`"),
        (b'{"inner": null}', "missing required field `name` - at `$`"),
        (b"[1]", "Expected `object`, got `array` - at `$`"),
        (b"{oops", "not valid JSON"),
    ],
)
def test_decode_errors_name_the_path(doc: bytes, message: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(doc, Outer)
    assert message in str(info.value)


def test_encode_leaves_defaults_out_and_replace_copies() -> None:
    obj = Outer(name="x", inner=Inner(host_id=0))
    assert encode(obj) == b'{"name": "x", "inner": {"hostID": 0}}'
    changed = replace(obj, enabled=True)
    assert changed.enabled and not obj.enabled and changed.inner == obj.inner
    with pytest.raises(TypeError):
        Outer(nme="typo")  # type: ignore[call-arg]


def test_fastjson_matches_json_and_reports_errors_without_json_imported() -> None:
    import json
    import subprocess
    import sys

    from cocon import _fastjson

    doc = '{"a": [1, 2.5, "\\u00e9", null, true, false], "b": {"c": -1e3}}'
    assert _fastjson.loads(doc) == json.loads(doc)
    assert _fastjson.dumps(json.loads(doc)) == json.dumps(json.loads(doc))
    for bad in ("{", "[1] x", "", '{"a":}'):
        with pytest.raises(ValueError):
            _fastjson.loads(bad)
    # in a fresh interpreter `json` is not imported: errors must still be ValueErrors
    probe = "from cocon import _fastjson\ntry:\n    _fastjson.loads('{')\nexcept ValueError as e:\n    print('ValueError', e)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ValueError")


def test_lists_and_maps_of_scalars_are_copied_and_checked() -> None:
    doc = b'{"name": "x", "inner": {"hostID": 1, "tags": ["a", "b"]}, "labels": {"k": "v"}}'
    obj = decode(doc, Outer)
    assert obj.inner is not None and obj.inner.tags == ["a", "b"] and obj.labels == {"k": "v"}
    for bad, message in (
        (
            b'{"name": "x", "inner": {"hostID": 1, "tags": ["a", 2]}}',
            "Expected `str`, got `int` - at `$.inner.tags[1]`",
        ),
        (b'{"name": "x", "inner": {"hostID": 1.5}}', "Expected `int`, got `float` - at `$.inner.hostID`"),
        (b'{"name": null}', "Expected `str`, got `null` - at `$.name`"),
        (b'{"name": "x", "labels": {"a": "b", "c": null}}', "Expected `str`, got `null` - at `$.labels.c`"),
    ):
        with pytest.raises(DecodeError) as info:
            decode(bad, Outer)
        assert message in str(info.value)


def test_classes_are_read_on_first_use_once_even_from_threads() -> None:
    import threading

    @json_object()
    class Lazy:
        a: int
        b: list[str] = field(default_factory=list)
        c: str | None = None

    assert Lazy.__dict__["_json_fields"] is None  # nothing read at definition
    results: list[Any] = []
    start = threading.Barrier(8)

    def use() -> None:
        start.wait()
        results.append(decode(b'{"a": 1, "c": "x"}', Lazy))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [Lazy(a=1, c="x")] * 8 and results[0].b == []
    assert [f.attr for f in Lazy._json_fields] == ["a", "b", "c"]  # type: ignore[attr-defined]

    class Sub(Lazy):  # not decorated: the parent's fields
        pass

    assert encode(Sub(a=2)) == b'{"a": 2}' and repr(Sub(a=2)) == "Sub(a=2, b=[], c=None)"
