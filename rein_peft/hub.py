"""Model cards of Rein adapters: PEFT's card, plus a `rein` tag and a usage snippet that starts with `import rein_peft`
(without that import PEFT cannot load the adapter)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from huggingface_hub import ModelCard
from peft import PeftModel

from .config import ReinConfig

REIN_TAGS = ("rein", "rein_peft")
USAGE_HEADING = "## How to use this Rein adapter"
USAGE_TEMPLATE = """{heading}

```python
import rein_peft  # registers Rein with PEFT; import it before loading the adapter
from peft import PeftModel
from transformers import {base_class}

base = {base_class}.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "<this adapter's repo id or folder>")
```
"""


def add_rein_to_model_card(card_path: str, base_class: str) -> None:
    """Add the Rein tags and usage snippet to the model card at `card_path` (once)."""
    card = ModelCard.load(card_path)
    card.data.tags = sorted(set(card.data.tags or []) | set(REIN_TAGS))
    if USAGE_HEADING not in card.text:
        base_model = card.data.base_model or "path/to/base-model"
        usage = USAGE_TEMPLATE.format(heading=USAGE_HEADING, base_class=base_class, base_model=base_model)
        card.text = usage + "\n" + card.text
    card.save(card_path)


def _is_rein(model: PeftModel) -> bool:
    return any(isinstance(config, ReinConfig) for config in model.peft_config.values())


def _with_rein_card(create_or_update_model_card: Callable) -> Callable:
    @functools.wraps(create_or_update_model_card)
    def wrapper(self: PeftModel, output_dir: str) -> None:
        create_or_update_model_card(self, output_dir)
        if _is_rein(self):
            add_rein_to_model_card(os.path.join(output_dir, "README.md"), type(self.get_base_model()).__name__)

    wrapper.adds_rein_card = True
    return wrapper


def _with_rein_card_on_upload(upload_modified_files: Callable) -> Callable:
    # transformers' push_to_hub writes its generic card over the one save_pretrained wrote (library_name
    # "transformers", no base_model) just before uploading: write the adapter's card again at that point
    @functools.wraps(upload_modified_files)
    def wrapper(self: PeftModel, working_dir: str, *args, **kwargs):
        if _is_rein(self):
            self.create_or_update_model_card(working_dir)
        return upload_modified_files(self, working_dir, *args, **kwargs)

    wrapper.adds_rein_card = True
    return wrapper


def register_model_card() -> None:
    """Make `PeftModel.save_pretrained` and `push_to_hub` write Rein's card additions (idempotent)."""
    if not getattr(PeftModel.create_or_update_model_card, "adds_rein_card", False):
        PeftModel.create_or_update_model_card = _with_rein_card(PeftModel.create_or_update_model_card)
    if not getattr(PeftModel._upload_modified_files, "adds_rein_card", False):
        PeftModel._upload_modified_files = _with_rein_card_on_upload(PeftModel._upload_modified_files)
