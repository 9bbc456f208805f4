"""Old public names that still work for one release, with a `DeprecationWarning` naming the new one."""

from __future__ import annotations

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


def renamed_argument(old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of a renamed keyword argument: the old one's, with a warning, when the caller still passes it."""
    if old_value is None:
        return new_value
    warnings.warn(f"argument {old}= is renamed {new}=; the old name goes in the next release", DeprecationWarning,
                  stacklevel=3)
    return old_value


def renamed_attribute(old: str, new: str) -> None:
    """Warn that the attribute or method `old` is now `new` (the caller then serves it)."""
    warnings.warn(f"{old} is renamed {new}; the old name goes in the next release", DeprecationWarning, stacklevel=3)
