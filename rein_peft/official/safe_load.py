"""Read a pickled PyTorch checkpoint (`.pth`) safely, as mmengine writes them, without running any of its code.

mmengine's checkpoints hold, beside the weights, `meta` and `message_hub` entries with numpy scalars and arrays and
mmengine objects (`HistoryBuffer`). PyTorch's `torch.load(..., weights_only=True)` refuses them (`Unsupported global:
GLOBAL numpy._core.multiarray.scalar`), and `weights_only=False` would import and run whatever the file names.
`load_checkpoint` keeps `weights_only=True` (PyTorch's restricted unpickler, which also rebuilds the tensors from the
zip archive) and lets every global the file names that PyTorch does not allow load as an inert placeholder:

- Nothing the file names is imported. A placeholder is a class made here, named after the global, holding only the
  data the file gives it (`InertGlobal.args`, `InertGlobal.state`).
- Nothing the file names is called. Calling a placeholder (pickle's REDUCE: "call this with these arguments") is
  refused with `UnsafeCheckpointError`, except for `INERT_CALLS`, numpy's data reconstructors, whose calls are
  recorded instead of made (numpy itself is never imported or called). Creating an object of a placeholder class
  without calling it (pickle's NEWOBJ and BUILD, how mmengine's `HistoryBuffer` is saved) gives an inert instance.
- Modules PyTorch blocks (`os`, `sys`, `posix`, `nt`) stay blocked.

So `meta` and `message_hub` load as plain containers of placeholders, which nothing uses, and the tensors load as
PyTorch loads them.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

# numpy's reconstructors of scalars, arrays and dtypes (numpy 2 and numpy 1 module names): their calls are recorded,
# not made, since only the checkpoint's tensors are used
INERT_CALLS = frozenset(
    f"{module}.{name}"
    for module in ("numpy._core.multiarray", "numpy.core.multiarray")
    for name in ("scalar", "_reconstruct")
) | {"numpy.dtype", "numpy.ndarray"}


# PyTorch wraps its unpickler's refusals in advice (to load with `weights_only=False`) that rein_peft never follows
TORCH_ADVICE = re.compile(r"^(Weights only load failed|Check the documentation of torch\.load)")


class UnsafeCheckpointError(ValueError):
    """A checkpoint asks, while it is read, to call a function or class that is not allowed: reading stops there.
    (Not a `pickle.UnpicklingError`, which PyTorch would wrap in its advice to load with `weights_only=False`.)"""


class InertGlobal:
    """A stand-in for a global (class or function) that a checkpoint names and that is never imported.

    Attributes:
        args: The arguments the checkpoint passed when it created this object (a recorded `INERT_CALLS` call, or
            the class arguments of pickle's NEWOBJ), never used.
        state: The object's state as the checkpoint holds it (pickle's BUILD), or `None`.
    """

    global_name = ""  # "module.name" of the global this class stands for

    def __new__(cls, *args: Any) -> InertGlobal:
        instance = super().__new__(cls)
        instance.args, instance.state = args, None
        return instance

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.global_name}>"


class _RefuseCalls(type):
    """Metaclass of the placeholders: calling one (pickle's REDUCE) is what would run code, so it is refused."""

    def __call__(cls, *args: Any, **kwargs: Any) -> InertGlobal:
        if cls.global_name in INERT_CALLS:
            return cls.__new__(cls, *args)
        raise UnsafeCheckpointError(
            f"the file asks to call {cls.global_name}(...) while it is read, which could run any code"
        )


def _placeholder(global_name: str) -> type[InertGlobal]:
    module, _, name = global_name.rpartition(".")
    return _RefuseCalls(name, (InertGlobal,), {"global_name": global_name, "__module__": module or "?"})


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickle a checkpoint written by `torch.save` (mmengine's included) with `weights_only=True`, every global
    outside PyTorch's allow-list standing in as an inert `InertGlobal` placeholder (see the module docstring).

    Args:
        path: A `.pth` / `.pt` file in PyTorch's zip format (every `torch.save` since PyTorch 1.6). Files in the
            legacy format load with PyTorch's allow-list only.

    Returns:
        What the file holds: tensors and plain containers as `torch.load` gives them, placeholders for the rest.

    Raises:
        UnsafeCheckpointError: The file asks to call something outside the allow-list while it is read (the
            signature of a file that runs code when loaded), or names a module PyTorch blocks.
        FileNotFoundError: No file at `path`.
    """
    path = os.fspath(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except ValueError:  # a legacy (pre-zip) or TorchScript file: PyTorch's allow-list alone
        names = []
    placeholders = [(_placeholder(name), name) for name in sorted(names)]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # PyTorch's own refusals (a blocked module, an opcode it does not run)
        reasons = [part.strip() for part in str(error).split("\n\n") if part.strip() and not TORCH_ADVICE.match(part)]
        raise UnsafeCheckpointError(" ".join(reasons) or str(error)) from None
