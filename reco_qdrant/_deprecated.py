"""Old public names that still work for one release, with a `DeprecationWarning` naming the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any


def renamed(module: str, names: dict[str, tuple[str, Any]]) -> Callable[[str], Any]:
    """A module `__getattr__` that serves each old name in `names` ({old: (new, object)}) with a warning."""

    def __getattr__(name: str) -> Any:
        if name in names:
            new, obj = names[name]
            warnings.warn(f"{module}.{name} is renamed {new}; the old name goes in the next release",
                          DeprecationWarning, stacklevel=2)
            return obj
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def renamed_argument(old: str, old_value: Any, new: str, new_value: Any, default: Any = None) -> Any:
    """The value of a renamed keyword argument: the old one's, with a warning, when the caller still passes it (and
    not the new one too: `new_value` is then still its `default`)."""
    if old_value is None:
        return new_value
    if new_value is not default and new_value != default:
        raise TypeError(f"both {old}= and {new}= given; {old}= is the old name of {new}=: give {new}= only")
    warnings.warn(f"argument {old}= is renamed {new}=; the old name goes in the next release", DeprecationWarning,
                  stacklevel=3)
    return old_value


def renamed_attribute(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that the attribute, method or setting `old` is now `new` (the caller then serves it); `stacklevel` points
    the warning at the user's line (3: the caller of the property or method that calls this)."""
    warnings.warn(f"{old} is renamed {new}; the old name goes in the next release", DeprecationWarning,
                  stacklevel=stacklevel)


def renamed_property(owner: str, old: str, new: str) -> property:
    """A read-only class attribute `old` that serves attribute `new` with a warning (`owner`: the class's name)."""

    def get(self: Any) -> Any:
        renamed_attribute(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)

    return property(get, doc=f"Deprecated name of `{new}` (one release).")


def renamed_fields(renames: dict[str, str]) -> Callable[[type], type]:
    """A class decorator (over `@dataclass`): the constructor takes each old field name in `renames` ({old: new}) for
    one release, with a warning; the old and the new name together are refused."""

    def wrap(cls: type) -> type:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{cls.__name__}: both {old}= and {new}= given; {old}= is the old name of "
                                        f"{new}=: give {new}= only")
                    warnings.warn(f"{cls.__name__}({old}=...) is renamed {new}=; the old name goes in the next "
                                  "release", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return wrap
