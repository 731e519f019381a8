"""Old spellings of renamed public functions: they keep working for a while, with a `FutureWarning` naming the new
name, and are not part of the documented API."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def deprecated_aliases(module_name: str, aliases: dict[str, Callable]) -> Callable[[str], Any]:
    """A module `__getattr__` (PEP 562) that answers each old name in `aliases` with its new function, warning that
    the old spelling goes away; every other missing name raises `AttributeError` as usual.

    Args:
        module_name: The module's `__name__`, for the messages.
        aliases: Old name -> the function that replaces it (exported at the top level, `rein_peft.<its name>`).
    """

    def __getattr__(name: str) -> Any:
        if name not in aliases:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        new = aliases[name]
        warnings.warn(
            f"`{module_name}.{name}` is deprecated and will be removed: use `rein_peft.{new.__name__}`, which takes "
            "the same arguments.",
            FutureWarning,
            stacklevel=2,
        )
        return new

    return __getattr__
