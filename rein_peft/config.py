"""Configuration of a Rein adapter."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open

# the method prefix: every tensor of a Rein adapter lives under a `rein_*` attribute of the `ReinLayer`
REIN_PREFIX = "rein_"
# the parts of PEFT's `modules_to_save` wrapper in module and state-dict names: the per-adapter copies, which train,
# and the original module, which the copies are made from
MODULES_TO_SAVE = "modules_to_save"
ORIGINAL_MODULE = "original_module"


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
            meets a head of its own size (see `rein_peft.auto_loading`).
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
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.token_length < 2:
            raise ValueError(
                f"token_length must be at least 2 (token 0 takes part in the softmax but has no value), "
                f"got {self.token_length}."
            )
        if self.lora_dim is not None and self.lora_dim < 1:
            raise ValueError(f"lora_dim must be a positive int or None for full-rank tokens, got {self.lora_dim}.")
        if self.query_dims < 1:
            raise ValueError(f"query_dims must be positive, got {self.query_dims}.")
        if self.num_prefix_tokens is not None and self.num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0 or None (auto), got {self.num_prefix_tokens}.")
        if self.patch_size is not None and self.patch_size < 1:
            raise ValueError(f"patch_size must be positive or None (auto), got {self.patch_size}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern only has an effect together with layers_to_transform; set both.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load the config like any `PeftConfig`; for a local folder also check that its weights file is there and
        readable, so that `PeftModel.from_pretrained` fails naming the file before it changes the base model."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            check_adapter_weights_file(folder)
        return config


def check_adapter_weights_file(folder: str) -> None:
    """Raise a clear error if the adapter folder has no weights file or an unreadable safetensors file."""
    safetensors_file = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(safetensors_file):
        try:
            with safe_open(safetensors_file, framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as error:
            raise ValueError(
                f"The adapter weights file '{safetensors_file}' is corrupt or truncated ({error}). "
                "Save the adapter again or download it again."
            ) from error
    elif not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
        raise FileNotFoundError(
            f"The adapter folder '{folder}' has adapter_config.json but no weights file: expected "
            f"'{SAFETENSORS_WEIGHTS_NAME}' (or '{WEIGHTS_NAME}'). Was `save_pretrained` interrupted?"
        )
