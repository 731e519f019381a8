"""Configuration of a Rein adapter."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

# the method prefix: every tensor of a Rein adapter lives under a `rein_*` attribute of the `ReinLayer`
REIN_PREFIX = "rein_"
# the parts of PEFT's `modules_to_save` wrapper in module and state-dict names: the per-adapter copies, which train,
# and the original module, which the copies are made from
MODULES_TO_SAVE = "modules_to_save"
ORIGINAL_MODULE = "original_module"


# the checked kinds of ReinConfig's fields (see `_check_field`)
INT, FLOAT, BOOL, NAMES, INDICES = "int", "float", "bool", "names", "indices"
# field -> (kind, None allowed, smallest value): every field of ReinConfig's own, and PEFT's `inference_mode`
FIELD_RULES = {
    "token_length": (INT, False, 2),
    "lora_dim": (INT, True, 1),
    "scale_init": (FLOAT, False, None),
    "use_softmax": (BOOL, False, None),
    "zero_mlp_delta_f": (BOOL, False, None),
    "link_token_to_query": (BOOL, False, None),
    "query_dims": (INT, False, 1),
    "refine_query_tokens": (BOOL, False, None),
    "num_prefix_tokens": (INT, True, 0),
    "batch_first": (BOOL, True, None),
    "patch_size": (INT, True, 1),
    "target_modules": (NAMES, True, None),
    "layers_to_transform": (INDICES, True, 0),
    "layers_pattern": (NAMES, True, None),
    "modules_to_save": (NAMES, True, None),
    "frozen_modules_follow_train": (BOOL, False, None),
    "inference_mode": (BOOL, False, None),
}
FIELD_KINDS = {
    INT: "an int",
    FLOAT: "a finite number",
    BOOL: "true or false (a bool, not a string)",
    NAMES: "a module name, a regex or a list of names",
    INDICES: "a layer index or a list of them",
}

# why a field has its smallest value, where that is not plain
FIELD_NOTES = {
    "token_length": " (token 0 takes part in the softmax but has no value)",
    "lora_dim": " (None: full-rank tokens)",
    "num_prefix_tokens": " (None: derived from the model)",
    "patch_size": " (None: derived from the model)",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(name: str, value: Any) -> None:
    """Raise a `TypeError` / `ValueError` naming `name` if `value` is not of its kind or below its smallest value."""
    kind, optional, minimum = FIELD_RULES[name]
    if value is None:
        if optional:
            return
        raise TypeError(f"ReinConfig field '{name}' must be {FIELD_KINDS[kind]}, got None.")
    if kind == INT:
        valid = _is_int(value)
    elif kind == FLOAT:
        valid = (_is_int(value) or isinstance(value, float)) and math.isfinite(value)
    elif kind == BOOL:
        valid = isinstance(value, bool)
    elif kind == NAMES:
        valid = isinstance(value, str) or (
            isinstance(value, (list, tuple, set)) and all(isinstance(item, str) for item in value)
        )
    else:
        valid = _is_int(value) or (isinstance(value, (list, tuple)) and all(_is_int(item) for item in value))
    if not valid:
        raise TypeError(
            f"ReinConfig field '{name}' must be {FIELD_KINDS[kind]}"
            + (" or None" if optional else "")
            + f", got {value!r} ({type(value).__name__})."
        )
    values = value if isinstance(value, (list, tuple)) else [value]
    if minimum is not None and any(item < minimum for item in values):
        raise ValueError(
            f"ReinConfig field '{name}' must be at least {minimum}{FIELD_NOTES.get(name, '')}, got {value!r}."
        )


def is_adapter_key(name: str) -> bool:
    """Whether a module, parameter or state-dict name belongs to an adapter: a Rein tensor or a `modules_to_save`
    copy."""
    return any(part.startswith(REIN_PREFIX) or part == MODULES_TO_SAVE for part in name.split("."))


class ReinPeftType(str, enum.Enum):
    """PEFT's `PeftType` is a closed enum, so Rein registers a `str`-valued enum of its own.

    Being a `str`, `ReinPeftType.REIN == "REIN"`: the value written to `adapter_config.json` finds the same entries
    in PEFT's mapping dicts when the adapter is loaded in a fresh process.
    """

    REIN = "REIN"


@dataclass
class ReinConfig(PeftConfig):
    """Configuration of a Rein adapter ("Stronger, Fewer, & Superior", CVPR 2024).

    Rein freezes a vision transformer and refines the output of every targeted encoder layer with `token_length`
    learnable tokens per layer and two linear maps shared by all layers. Defaults follow the official code.

    Args:
        token_length: Number of learnable tokens M per layer. Token 0 takes part in the softmax but has no value.
        lora_dim: `None` for full-rank tokens `[L, M, C]`; an int r for low-rank tokens `A[l] @ B[l]` with
            `A: [L, M, r]` and `B: [L, r, C]` ("LoRA Rein").
        scale_init: Initial value of the learnable scale of the refinement.
        use_softmax: `True`: softmax over scaled dot products; `False`: raw dot products.
        zero_mlp_delta_f: Start `delta_f` at zero and use the constant scale 1.0, so the adapter starts as an
            identity.
        link_token_to_query: Also build the linking layers (`transform`, `merge`) that turn the tokens into `[M, Q]`
            object queries for a mask decoder, as the official Rein head does. In a model with such a decoder
            (Mask2Former, EoMT) they replace its learnable queries (Mask2Former: content queries = a linear map of
            them, positional queries = them); `token_length` must then equal its number of queries. Elsewhere read them
            with `ReinModel.get_queries()`.
        query_dims: Q, the width of the linked queries (the decoder's query width when they replace its queries).
        refine_query_tokens: Tokens that the model inserts in front of the sequence between encoder layers (EoMT's
            queries, before its last blocks) are, like prefix tokens, not patch features: by default they pass through
            untouched. `True` refines them as well.
        num_prefix_tokens: Tokens at the start of the sequence that are passed through untouched (CLS, registers,
            distillation token). `None`: derived from the model's embeddings.
        batch_first: Layout of the layers' hidden states. `None`: derived from the layers (`batch_first` attributes
            of torch attention modules), batch-first otherwise, as in every transformers model.
        patch_size: Patch size used only for the token initialisation. `None`: taken from the patch embedding or
            the model config.
        target_modules: Encoder layers to refine: a list of module names (or name suffixes) or a regex. `None`:
            every layer of the vision encoder, found automatically.
        layers_to_transform: Indices of the layers to adapt (e.g. `[8, 9, 10, 11]`). With automatic targets they
            index the encoder's layer list (on a staged backbone, ConvNeXt, ResNet, Swin: its stages, each adapted
            over all its blocks); with `target_modules` they follow PEFT's `layers_pattern` rules.
        layers_pattern: Name of the layer list, used with `layers_to_transform` and explicit `target_modules`.
        modules_to_save: Extra modules to train and save with the adapter, typically the task head
            (`["classifier"]`).
        frozen_modules_follow_train: `False` (official behaviour): in `train()` mode the frozen base model stays in
            eval mode (no dropout, no drop-path) and only the adapter and `modules_to_save` train. `True`: the frozen
            modules follow `train()`.
        id2label: The labels (id -> name) of the model the adapter was added to, filled in from its config when
            `modules_to_save` holds a task head. An adapter folder loaded alone (transformers' auto classes,
            `pipeline(model=folder)`, `AutoPeftModel`) builds its base model with these labels, so that the saved head
            meets a head of its own size (see `rein_peft.integrations.auto_loading`).
    """

    token_length: int = field(default=100, metadata={"help": "Learnable tokens per layer (M)."})
    lora_dim: int | None = field(default=None, metadata={"help": "Rank of low-rank tokens; None: full rank."})
    scale_init: float = field(default=1e-3, metadata={"help": "Initial value of the learnable scale."})
    use_softmax: bool = field(default=True, metadata={"help": "Softmax over the scaled token similarities."})
    zero_mlp_delta_f: bool = field(default=False, metadata={"help": "Zero-init delta_f and use scale 1.0."})
    link_token_to_query: bool = field(default=False, metadata={"help": "Build the token-to-query linking layers."})
    query_dims: int = field(default=256, metadata={"help": "Width Q of the linked queries."})
    refine_query_tokens: bool = field(
        default=False, metadata={"help": "Also refine tokens the model inserts inside its encoder (EoMT's queries)."}
    )
    num_prefix_tokens: int | None = field(default=None, metadata={"help": "Prefix tokens; None: auto."})
    batch_first: bool | None = field(default=None, metadata={"help": "Hidden-state layout; None: auto."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size for token init; None: auto."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Encoder layers to refine; None: every layer of the vision encoder."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Encoder layers to adapt (stages, on a staged backbone)."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Layer-list name used with layers_to_transform and target_modules."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved besides the adapter, e.g. ['classifier']."}
    )
    frozen_modules_follow_train: bool = field(
        default=False, metadata={"help": "Let the frozen base model follow train() (default: stays in eval mode)."}
    )
    id2label: dict[str, str] | None = field(
        default=None, metadata={"help": "Labels of the model the adapter was added to; None: filled in from it."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ReinPeftType.REIN
        for name in FIELD_RULES:
            _check_field(name, getattr(self, name))
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the config like any `PeftConfig`, every field checked (an error names the field and the file); for a
        local folder also check that its weights file is there and readable, so that `PeftModel.from_pretrained`
        fails naming the file before it changes the base model."""
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ValueError) as error:
            if "ReinConfig field" not in str(error):
                raise
            source = os.path.join(str(pretrained_model_name_or_path), subfolder or "", CONFIG_NAME)
            raise type(error)(f"{source}: {error} Correct it in that file.") from error
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            check_adapter_weights_file(folder)
        return config


def _check_readable(path: str) -> None:
    """Raise a `PermissionError` naming `path` if it exists (as a name) but cannot be opened and read as a file."""
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as error:
        raise PermissionError(
            f"The adapter weights file '{path}' exists but cannot be read ({error.strerror or error}): "
            "check that it is a file and that this user may read it (safetensors writes it with mode 0600, "
            "readable by its owner only; `chmod a+r` it for others)."
        ) from error


def check_adapter_weights_file(folder: str) -> None:
    """Raise a clear error if the adapter folder has no weights file, an unreadable one (not a file, no permission)
    or a corrupt safetensors file."""
    safetensors_file, pickle_file = (os.path.join(folder, name) for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME))
    if os.path.lexists(safetensors_file):
        _check_readable(safetensors_file)
        try:
            with safe_open(safetensors_file, framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"The adapter weights file '{safetensors_file}' is corrupt or truncated ({error}). "
                "Save the adapter again or download it again."
            ) from error
    elif os.path.lexists(pickle_file):
        _check_readable(pickle_file)
    else:
        raise FileNotFoundError(
            f"The adapter folder '{folder}' has adapter_config.json but no weights file: expected "
            f"'{SAFETENSORS_WEIGHTS_NAME}' (or '{WEIGHTS_NAME}'). Was `save_pretrained` interrupted?"
        )
