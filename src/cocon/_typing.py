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

    _set = object.__setattr__

    def _make_init(names, defaults):
        """`__init__(self, a, b=…)` for these field names: positional or keyword, defaults for the
        last ones. A closure rather than code compiled per class (which cost ~50 us per class at import,
        more than a millisecond for `cocon run`)."""
        count = len(names)
        first_default = next((i for i, n in enumerate(names) if n in defaults), count)
        for n in names[first_default:]:
            if n not in defaults:
                raise TypeError(f"non-default field {n!r} follows a field with a default")

        def __init__(self, *args, **kwargs):
            given = len(args)
            if given > count:
                raise TypeError(
                    f"__init__() takes {count + 1} positional arguments but {given + 1} were given"
                )
            for name, value in zip(names, args, strict=False):
                _set(self, name, value)
            if given < count or kwargs:
                for name in names[given:]:
                    if name in kwargs:
                        _set(self, name, kwargs.pop(name))
                    elif name in defaults:
                        _set(self, name, defaults[name])
                    else:
                        raise TypeError(f"__init__() missing required argument: {name!r}")
                for name in kwargs:
                    if name in names:
                        raise TypeError(f"__init__() got multiple values for argument {name!r}")
                    raise TypeError(f"__init__() got an unexpected keyword argument {name!r}")

        return __init__

    def record(cls=None, /, *, frozen=False):
        def wrap(cls):
            annotations = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect is what we avoid)
            names = [n for n in annotations if not str(annotations[n]).startswith("ClassVar")]
            defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
            fields = tuple(names)

            def __eq__(self, other):
                if type(other) is not type(self):
                    return NotImplemented
                return all(getattr(self, n) == getattr(other, n) for n in fields)

            def __repr__(self):
                return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in fields)})"

            cls.__init__ = _make_init(fields, defaults)
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
