"""Typed JSON objects for the runtime's hot path: declared like dataclasses, decoded and checked from
JSON with errors that give the JSON path, encoded back with default values left out.

Why not msgspec here: `cocon-runtime create` runs once per container, and importing msgspec (with
typing, inspect, dataclasses behind it) costs more than decoding a config.json takes. This module
uses only the interpreter and the C-accelerated `json`. Type checkers see each class as a keyword-only
dataclass (the `TYPE_CHECKING` branch); at run time the class's annotations (strings, thanks to
`from __future__ import annotations`) are read into a small decoding table when the class is first
used (constructed or decoded), so that importing a module of many classes costs little. Decoding
takes a list or map of scalars whose items all have the right type as it is, without a JSON path per
item (the path is only worked out for an error).

Supported annotations: str, int, bool, float, object, a json_object class, `list[T]`, `dict[str, T]`,
and `T | None`. JSON names are the camelCase of the attribute, or `field(metadata={"json": NAME})`.
"""

from __future__ import annotations

import sys
from _thread import allocate_lock

from cocon import _fastjson
from cocon._typing import TYPE_CHECKING

__all__ = ["DecodeError", "decode", "encode", "field", "json_object", "replace", "to_builtins"]


class DecodeError(ValueError):
    """The document is not JSON, or a value does not have the declared type (message gives the path)."""


_MISSING: Any = object()


class _Field:
    __slots__ = ("attr", "default", "factory", "fast", "json_name", "kind")

    def __init__(self, attr: str, json_name: str, kind: Any, default: Any, factory: Any) -> None:
        self.attr = attr
        self.json_name = json_name
        self.kind = kind
        self.default = default
        self.factory = factory
        # the exact JSON types a value may have to be taken as it is (None: call _convert)
        self.fast: frozenset[type] | None = _fast_types(kind)


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
        def wrap(cls: Any) -> Any:
            # The decoding table is made on first use (_fields): a module of many classes (the runtime
            # config's) costs less to import, and classes a program never uses cost nothing more.
            cls._json_fields = None
            cls._json_omit_defaults = omit_defaults
            cls.__init__ = _init
            cls.__eq__ = _eq
            cls.__repr__ = _repr
            cls.__hash__ = None
            return cls

        return wrap


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


_SCALARS: dict[str, tuple[type, ...]] = {
    "str": (str,), "int": (int,), "bool": (bool,), "float": (int, float), "object": (object,),
}  # fmt: skip
# What the decoder produces for each scalar kind, by exact type: checked with one set lookup per value
# (bool is not an int here, as in _convert). "object" takes anything and has no entry.
_EXACT: dict[str, frozenset[type]] = {
    "str": frozenset({str}), "int": frozenset({int}), "bool": frozenset({bool}),
    "float": frozenset({int, float}),
}  # fmt: skip
_NONE_TYPE = type(None)


def _fast_types(kind: Any) -> frozenset[type] | None:
    tag, arg = kind
    if tag == "scalar":
        return _EXACT.get(arg)
    if tag == "optional" and arg[0] == "scalar" and arg[1] in _EXACT:
        return _EXACT[arg[1]] | {_NONE_TYPE}
    return None


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


_register_lock = allocate_lock()


def _fields(cls: Any) -> tuple[_Field, ...]:
    """The class's fields, reading its annotations the first time (under a lock: the class
    attributes that hold defaults are removed while reading them)."""
    fields: tuple[_Field, ...] | None = cls._json_fields
    if fields is None:
        owner = next(c for c in cls.__mro__ if "_json_fields" in c.__dict__)
        with _register_lock:
            fields = owner._json_fields
            if fields is None:
                fields = _register(owner)
    return fields


def _register(cls: Any) -> tuple[_Field, ...]:
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
    cls._json_module = module
    cls._json_fields = table = tuple(fields)
    return table


def _init(self: Any, **kwargs: Any) -> None:
    for f in _fields(type(self)):
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
        exact = _EXACT.get(arg[1]) if arg[0] == "scalar" else None
        if exact is not None and all(type(item) in exact for item in value):
            return list(value)  # the common case, without a path string per item
        return [_convert(arg, item, f"{path}[{i}]", module) for i, item in enumerate(value)]
    if tag == "dict":
        if not isinstance(value, dict):
            raise _type_error("object", value, path)
        exact = _EXACT.get(arg[1]) if arg[0] == "scalar" else None
        if exact is not None and all(type(v) in exact for v in value.values()):
            return dict(value)
        return {k: _convert(arg, v, f"{path}.{k}", module) for k, v in value.items()}
    cls = getattr(module, arg)
    return _from_dict(cls, value, path)


def _from_dict(cls: Any, value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise _type_error("object", value, path)
    obj = object.__new__(cls)
    fields = _fields(cls)
    module = cls._json_module
    for f in fields:
        if f.json_name in value:
            raw = value[f.json_name]
            if f.fast is not None and type(raw) in f.fast:
                converted = raw
            else:
                converted = _convert(f.kind, raw, f"{path}.{f.json_name}", module)
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
