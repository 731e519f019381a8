"""Known noise from the libraries rein_peft builds on, silenced only where rein_peft itself causes it."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# PEFT 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5 deprecates (for
# `is_activation_checkpointing`) with a FutureWarning on every PeftModel built; nothing for a user to act on
GRADIENT_CHECKPOINTING_DEPRECATION = re.escape("`is_gradient_checkpointing` is deprecated")


@contextmanager
def peft_deprecations_silenced() -> Iterator[None]:
    """Within the block, PEFT's known deprecation warning from transformers (`is_gradient_checkpointing`) is not
    shown; every other warning is."""
    with warnings.catch_warnings():
        silence_peft_deprecations()
        yield


def silence_peft_deprecations() -> None:
    """Hide PEFT's known deprecation warning from transformers (`is_gradient_checkpointing`) from here on, for a
    program that builds PeftModels throughout (the examples)."""
    warnings.filterwarnings("ignore", message=GRADIENT_CHECKPOINTING_DEPRECATION, category=FutureWarning)
