"""Typing helpers that cost nothing at import, for the runtime's hot path.

`TYPE_CHECKING`: false at run time, true for type checkers (mypy treats the name specially), without
importing `typing`.

`record`: dataclass semantics without importing `dataclasses` at run time.

`dataclasses` pulls in `inspect` (and `ast`, `dis`, `tokenize`, …), which costs cocon-runtime's
create path more than the work it does. Type checkers see `record` as `dataclasses.dataclass`; at run
time it builds `__init__` (positional or keyword, annotation order, defaults), `__eq__`, `__repr__`,
and for `frozen=True` immutability and `__hash__`. No `field()`, no mutable defaults.
"""

from __future__ import annotations

__all__ = ["TYPE_CHECKING", "record"]

TYPE_CHECKING = False

if TYPE_CHECKING:
    from dataclasses import dataclass as record
else:

    def _frozen_setattr(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r} of frozen {type(self).__name__}")

    def record(cls=None, /, *, frozen=False):
        def wrap(cls):
            annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect is what we avoid)
            names = [n for n in annotations if not str(annotations[n]).startswith("ClassVar")]
            defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
            params = ", ".join(f"{n}=_d_{n}" if n in defaults else n for n in names)
            body = "".join(f"    _set(self, {n!r}, {n})\n" for n in names) or "    pass\n"
            scope = {f"_d_{n}": v for n, v in defaults.items()}
            scope["_set"] = object.__setattr__
            exec(f"def __init__(self, {params}):\n{body}", scope)
            fields = tuple(names)

            def __eq__(self, other):
                if type(other) is not type(self):
                    return NotImplemented
                return all(getattr(self, n) == getattr(other, n) for n in fields)

            def __repr__(self):
                return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in fields)})"

            cls.__init__ = scope["__init__"]
            cls.__eq__ = __eq__
            cls.__repr__ = __repr__
            cls.__dataclass_fields__ = dict.fromkeys(fields)  # what tests may introspect
            if frozen:
                cls.__setattr__ = _frozen_setattr
                cls.__hash__ = lambda self: hash(tuple(getattr(self, n) for n in fields))
            else:
                cls.__hash__ = None
            return cls

        return wrap if cls is None else wrap(cls)
