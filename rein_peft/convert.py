"""Convert a checkpoint of the official Rein code (w1oves/Rein) into a rein_peft adapter."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from .config import ReinConfig
from .rollback import unchanged_on_failure

# official tensor name (after "reins.") -> rein_peft tensor name
OFFICIAL_TO_REIN_PEFT = {
    "learnable_tokens": "rein_tokens",
    "learnable_tokens_a": "rein_tokens_a",
    "learnable_tokens_b": "rein_tokens_b",
    "scale": "rein_scale",
    "mlp_token2feat.weight": "rein_token2feat.weight",
    "mlp_token2feat.bias": "rein_token2feat.bias",
    "mlp_delta_f.weight": "rein_delta_f.weight",
    "mlp_delta_f.bias": "rein_delta_f.bias",
    "transform.weight": "rein_transform.weight",
    "transform.bias": "rein_transform.bias",
    "merge.weight": "rein_merge.weight",
    "merge.bias": "rein_merge.bias",
}
OFFICIAL_MODULE_NAME = "reins"


def _load_official_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping):
        state_dict = dict(checkpoint)
    elif str(checkpoint).endswith(".safetensors"):
        state_dict = load_file(os.fspath(checkpoint))
    else:
        state_dict = torch.load(os.fspath(checkpoint), map_location="cpu", weights_only=True)
    # mmengine checkpoints keep the weights under "state_dict", next to "meta" and optimizer state
    state_dict = state_dict.get("state_dict", state_dict)
    tensors = {}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        if OFFICIAL_MODULE_NAME in parts:  # a whole segmentor: "backbone.reins.learnable_tokens"
            official_name = ".".join(parts[parts.index(OFFICIAL_MODULE_NAME) + 1 :])
            if official_name not in OFFICIAL_TO_REIN_PEFT:
                raise ValueError(f"Unknown Rein tensor '{key}' in the official checkpoint.")
            tensors[official_name] = tensor
        elif key in OFFICIAL_TO_REIN_PEFT:  # the Reins module's own state dict
            tensors[key] = tensor
    if not tensors:
        raise ValueError(
            f"The checkpoint has no '{OFFICIAL_MODULE_NAME}.*' tensors; is it a checkpoint of the official Rein code?"
        )
    return tensors


def config_from_official(tensors: Mapping[str, torch.Tensor], **config_kwargs: Any) -> ReinConfig:
    """The `ReinConfig` that an official checkpoint's tensors imply; `config_kwargs` add to or override it
    (`use_softmax` cannot be read from the tensors)."""
    low_rank = "learnable_tokens_a" in tensors
    tokens = tensors["learnable_tokens_a" if low_rank else "learnable_tokens"]  # [L, M, r] or [L, M, C]
    inferred = {
        "token_length": tokens.shape[1],
        "lora_dim": tokens.shape[2] if low_rank else None,
        # the official zero_mlp_delta_f variant replaces the scale parameter with the constant 1.0
        "zero_mlp_delta_f": "scale" not in tensors,
        "link_token_to_query": "transform.weight" in tensors,
    }
    if "transform.weight" in tensors:
        inferred["query_dims"] = tensors["transform.weight"].shape[0]
    return ReinConfig(**{**inferred, **config_kwargs})


def convert_official_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    base_model: nn.Module,
    output_dir: str | os.PathLike | None = None,
    adapter_name: str = "default",
    **config_kwargs: Any,
) -> PeftModel:
    """Turn the `reins.*` tensors of an official Rein checkpoint into a rein_peft adapter on `base_model`.

    Args:
        checkpoint: Path of an official checkpoint (`.pth` from mmengine, or `.safetensors`), or a state dict: the
            segmentor's (`backbone.reins.*` keys) or the `Reins` module's own (`learnable_tokens`, `scale`, ...).
            Full-rank (`Reins`) and low-rank (`LoRAReins`) tokens, with or without `transform` / `merge`.
        base_model: The transformers backbone the checkpoint was trained on (for the official DINOv2-L checkpoints:
            a `Dinov2Model` or `Dinov2Backbone` with patch size 16), wrapped in place.
        output_dir: If given, the adapter is also saved there with `save_pretrained`.
        adapter_name: Name of the adapter in the returned `PeftModel`.
        config_kwargs: Extra `ReinConfig` fields, e.g. `use_softmax=False` or `modules_to_save`.

    Returns:
        The `PeftModel` carrying the converted adapter. The 0-dim official `scale` becomes shape `[1]`.
    """
    tensors = _load_official_state_dict(checkpoint)
    config = config_from_official(tensors, **config_kwargs)
    adapter_state_dict = {
        OFFICIAL_TO_REIN_PEFT[name]: tensor.reshape(1) if name == "scale" else tensor
        for name, tensor in tensors.items()
    }
    with unchanged_on_failure(base_model):  # a checkpoint for another backbone leaves `base_model` as it was
        peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
        set_peft_model_state_dict(peft_model, adapter_state_dict, adapter_name=adapter_name)
    if output_dir is not None:
        peft_model.save_pretrained(output_dir, selected_adapters=[adapter_name])
    return peft_model
