"""Optional packages: which extra of rein-peft brings each, and the one check code needing one calls before any work.

    require("scipy", purpose="Mask2Former's loss (Hungarian matching)")

raises `MissingExtraError` (an `ImportError`) naming the package and the command that installs it, e.g.
`pip install "rein-peft[segmentation]"`, instead of a failure deep inside the work (transformers' own message,
after the data sets are written, never names the extra).
"""

from __future__ import annotations

import importlib

# import name -> the extra of pyproject.toml's [project.optional-dependencies] that installs it
EXTRA_OF = {
    "scipy": "segmentation",
    "datasets": "examples",
    "PIL": "examples",
    "matplotlib": "bench",
}
# import name -> the name pip knows it by, where they differ
DISTRIBUTION_OF = {"PIL": "Pillow"}


class MissingExtraError(ImportError):
    """An optional package that the requested work needs is not installed; the message says which extra brings it."""


def install_command(package: str) -> str:
    """`pip install "rein-peft[<extra>]"` for the extra that brings `package` (an import name of `EXTRA_OF`)."""
    return f'pip install "rein-peft[{EXTRA_OF[package]}]"'


def require(*packages: str, purpose: str) -> None:
    """Check that every one of `packages` (import names of `EXTRA_OF`) imports, before any work starts.

    Args:
        packages: Import names, e.g. "scipy", "datasets", "PIL".
        purpose: What needs them, for the message (e.g. "Mask2Former's loss").

    Raises:
        MissingExtraError: One of them does not import; names it, what needs it and the `pip install` command.
    """
    for package in packages:
        try:
            importlib.import_module(package)
        except ImportError as error:
            name = DISTRIBUTION_OF.get(package, package)
            raise MissingExtraError(
                f"{purpose} needs {name}, which is not installed. Install it with: {install_command(package)} "
                f"(or `pip install {name}`)."
            ) from error
