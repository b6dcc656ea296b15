"""Typed JSON objects for the runtime's hot path: declared like dataclasses, decoded and checked from
JSON with errors that give the JSON path, encoded back with default values left out.

Why not msgspec here: `cocon-runtime create` runs once per container, and importing msgspec (with
typing, inspect, dataclasses behind it) costs more than decoding a config.json takes. This module
uses only the interpreter and the C-accelerated `json`. Type checkers see each class as a keyword-only
dataclass (the `TYPE_CHECKING` branch); at run time `json_object` reads the class's annotations (strings,
thanks to `from __future__ import annotations`) into a small decoding table.

Supported annotations: str, int, bool, float, object, a json_object class, `list[T]`, `dict[str, T]`,
and `T | None`. JSON names are the camelCase of the attribute, or `field(metadata={"json": NAME})`.
"""

from __future__ import annotations

import sys

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING

__all__ = ["DecodeError", "decode", "encode", "field", "json_object", "replace", "to_builtins"]


class DecodeError(ValueError):
    """The document is not JSON, or a value does not have the declared type (message gives the path)."""


_MISSING: Any = object()


class _Field:
    __slots__ = ("attr", "default", "factory", "json_name", "kind")

    def __init__(self, attr: str, json_name: str, kind: Any, default: Any, factory: Any) -> None:
        self.attr = attr
        self.json_name = json_name
        self.kind = kind
        self.default = default
        self.factory = factory


class _FieldSpec:
    __slots__ = ("default", "default_factory", "metadata")

    def __init__(self, default: Any, default_factory: Any, metadata: dict[str, str] | None) -> None:
        self.default = default
        self.default_factory = default_factory
        self.metadata = metadata or {}


if TYPE_CHECKING:
    from collections.abc import Callable
    from dataclasses import field as field
    from typing import Any, TypeVar, dataclass_transform

    _T = TypeVar("_T")

    @dataclass_transform(kw_only_default=True, field_specifiers=(field,))
    def json_object(*, omit_defaults: bool = True) -> Callable[[type[_T]], type[_T]]: ...

else:

    def field(*, default: Any = _MISSING, default_factory: Any = _MISSING, metadata: Any = None) -> Any:
        return _FieldSpec(default, default_factory, metadata)

    def json_object(*, omit_defaults: bool = True) -> Any:
        def wrap(cls: type) -> type:
            _register(cls, omit_defaults)
            return cls

        return wrap


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
}  # fmt: skip


def _parse_kind(text: str) -> Any:
    """'list[Foo] | None' -> ("optional", ("list", ("obj", "Foo")))."""
    text = text.strip()
    if text.endswith("| None"):
        return ("optional", _parse_kind(text[: -len("| None")]))
    if text.startswith("list[") and text.endswith("]"):
        return ("list", _parse_kind(text[5:-1]))
    if text.startswith("dict[str,") and text.endswith("]"):
        return ("dict", _parse_kind(text[9:-1]))
    if text in _SCALARS:
        return ("scalar", text)
    return ("obj", text)  # resolved lazily: classes may refer to ones defined later


def _register(cls: Any, omit_defaults: bool) -> None:
    module = sys.modules[cls.__module__]
    fields = []
    for attr, annotation in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
        if attr.startswith("_"):
            continue
        raw = cls.__dict__.get(attr, _MISSING)
        default, factory, json_name = raw, _MISSING, _camel(attr)
        if isinstance(raw, _FieldSpec):
            default, factory = raw.default, raw.default_factory
            json_name = raw.metadata.get("json", json_name)
        if attr in cls.__dict__:
            delattr(cls, attr)
        fields.append(_Field(attr, json_name, _parse_kind(annotation), default, factory))
    cls._json_fields = tuple(fields)
    cls._json_omit_defaults = omit_defaults
    cls._json_module = module
    cls.__init__ = _init
    cls.__eq__ = _eq
    cls.__repr__ = _repr
    cls.__hash__ = None


def _init(self: Any, **kwargs: Any) -> None:
    for f in self._json_fields:
        if f.attr in kwargs:
            value = kwargs.pop(f.attr)
        elif f.factory is not _MISSING:
            value = f.factory()
        elif f.default is not _MISSING:
            value = f.default
        else:
            raise TypeError(f"{type(self).__name__}() missing required argument {f.attr!r}")
        object.__setattr__(self, f.attr, value)
    if kwargs:
        raise TypeError(f"{type(self).__name__}() got unexpected arguments {sorted(kwargs)}")


def _eq(self: Any, other: Any) -> bool:
    if type(other) is not type(self):
        result: bool = NotImplemented
        return result
    return all(getattr(self, f.attr) == getattr(other, f.attr) for f in self._json_fields)


def _repr(self: Any) -> str:
    args = ", ".join(f"{f.attr}={getattr(self, f.attr)!r}" for f in self._json_fields)
    return f"{type(self).__name__}({args})"


def replace(obj: Any, **changes: Any) -> Any:
    """A copy of `obj` with some attributes changed."""
    values = {f.attr: getattr(obj, f.attr) for f in obj._json_fields}
    values.update(changes)
    return type(obj)(**values)


_JSON_TYPE = {str: "str", int: "int", float: "float", bool: "bool", list: "array", dict: "object"}


def _type_error(expected: str, value: Any, path: str) -> DecodeError:
    got = "null" if value is None else _JSON_TYPE.get(type(value), type(value).__name__)
    return DecodeError(f"Expected `{expected}`, got `{got}` - at `{path}`")


def _convert(kind: Any, value: Any, path: str, module: Any) -> Any:
    tag, arg = kind
    if tag == "optional":
        return None if value is None else _convert(arg, value, path, module)
    if tag == "scalar":
        types = _SCALARS[arg]
        if not isinstance(value, types) or (arg in ("int", "float") and isinstance(value, bool)):
            raise _type_error(arg, value, path)
        return value
    if tag == "list":
        if not isinstance(value, list):
            raise _type_error("array", value, path)
        return [_convert(arg, item, f"{path}[{i}]", module) for i, item in enumerate(value)]
    if tag == "dict":
        if not isinstance(value, dict):
            raise _type_error("object", value, path)
        return {k: _convert(arg, v, f"{path}.{k}", module) for k, v in value.items()}
    cls = getattr(module, arg)
    return _from_dict(cls, value, path)


def _from_dict(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _type_error("object", value, path)
    obj = object.__new__(cls)
    module = cls._json_module
    for f in cls._json_fields:
        if f.json_name in value:
            converted = _convert(f.kind, value[f.json_name], f"{path}.{f.json_name}", module)
        elif f.factory is not _MISSING:
            converted = f.factory()
        elif f.default is not _MISSING:
            converted = f.default
        else:
            raise DecodeError(f"Object missing required field `{f.json_name}` - at `{path}`")
        object.__setattr__(obj, f.attr, converted)
    return obj


def decode(data: bytes | str, cls: type[Any]) -> Any:
    """Decode a JSON document into an instance of `cls`, checking every type on the way."""
    try:
        value = _fastjson.loads(data)
    except ValueError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    return _from_dict(cls, value, "$")


def to_builtins(obj: Any) -> Any:
    """Plain JSON-able data, leaving out attributes that equal their defaults (unless the class says
    otherwise)."""
    if isinstance(obj, list):
        return [to_builtins(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_builtins(v) for k, v in obj.items()}
    fields = getattr(obj, "_json_fields", None)
    if fields is None:
        return obj
    out: dict[str, Any] = {}
    for f in fields:
        value = getattr(obj, f.attr)
        if obj._json_omit_defaults:
            default = f.factory() if f.factory is not _MISSING else f.default
            if default is not _MISSING and value == default:
                continue
        out[f.json_name] = to_builtins(value)
    return out


def encode(obj: Any, indent: int | None = None) -> bytes:
    if indent is None:
        return _fastjson.dumps(to_builtins(obj)).encode()
    import json

    return json.dumps(to_builtins(obj), indent=indent).encode()
