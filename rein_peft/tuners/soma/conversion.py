"""A trained SoMA adapter saved as a plain LoRA adapter of the original, unmodified model (PEFT's PiSSA conversion).

SoMA trains on the residual W_res = W - s B0 A0 (`initialize_soma`); after training the layer computes
W_res + s B A = W + s (B A - B0 A0). The difference is a LoRA of rank 2r on the original W:

    A' = [A; A0]   `[2r, in]`,   B' = [B, -B0]   `[out, 2r]`,   B' A' = B A - B0 A0,

saved with rank 2r and an alpha that keeps the scaling (2 alpha; sqrt(2) alpha with rsLoRA), beside the trained biases
and `modules_to_save` as PEFT saves them. `PeftModel.from_pretrained(original_model, folder)` loads it with nothing
but PEFT. (PEFT's own `save_pretrained(path_initial_model_for_weight_conversion=...)` keeps only the LoRA factors,
so the trained biases and modules_to_save that SoMA saves would be lost; hence this function.)
"""

from __future__ import annotations

import copy
import math
import os

import torch
from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from .initialization import INITIAL_FACTORS, soma_lora_layers


def save_soma_adapter(peft_model: PeftModel, save_directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Save the SoMA adapter `adapter_name` of `peft_model` (initialised with `initialize_soma` in this process, then
    trained) so that it loads into the original model, the one before `initialize_soma` replaced its weights by the
    residuals, with plain `PeftModel.from_pretrained(original_model, save_directory)` and gives the trained model's
    outputs.

    `save_directory` gets PEFT's two files: `adapter_config.json`, SoMA's `LoraConfig` with rank 2r and lora_alpha
    2 alpha (the same scaling) and `init_lora_weights=True`, and `adapter_model.safetensors`: per adapted linear
    `lora_A.weight` `[2r, in]` = [A; A0] and `lora_B.weight` `[out, 2r]` = [B, -B0] (trained and initial factors), the
    trained biases of the adapted linears (`bias="lora_only"`) and the `modules_to_save`, in float32 for a float32
    model. For DINOv2-L with SoMA's recipe that is 9,437,184 factor values and 147,456 biases, 38.3 MB (plus the
    head).

    `peft_model.save_pretrained` still saves the adapter as trained (rank r, for the residual weights: it fits only
    a model initialised with `initialize_soma`, e.g. to resume training).

    Args:
        peft_model: The trained `PeftModel`.
        save_directory: The folder to write (created if needed); the adapter goes there whatever its name.
        adapter_name: The SoMA adapter to save.

    Raises:
        ValueError: The adapter is not a LoRA adapter initialised with `initialize_soma` in this process.
    """
    layers = []
    for name, module in soma_lora_layers(peft_model, adapter_name, initialised=True):
        layers.append((name, *getattr(module, INITIAL_FACTORS)[adapter_name]))
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    state_dict = {
        key: value.detach().to("cpu")
        for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()
    }
    for name, initial_a, initial_b in layers:
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        state_dict[key_a] = torch.cat([state_dict[key_a], initial_a.to("cpu", state_dict[key_a].dtype)], dim=0)
        state_dict[key_b] = torch.cat([state_dict[key_b], -initial_b.to("cpu", state_dict[key_b].dtype)], dim=1)
    # rank 2r at the same scaling: alpha / r -> 2 alpha / 2r; alpha / sqrt(r) -> sqrt(2) alpha / sqrt(2r) with rsLoRA
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    config.r *= 2
    config.lora_alpha *= alpha_factor
    config.rank_pattern = {key: 2 * rank for key, rank in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {key: alpha_factor * alpha for key, alpha in (config.alpha_pattern or {}).items()}
    config.init_lora_weights = True
    config.inference_mode = True
    base_model = peft_model.get_base_model()
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(base_model, "name_or_path", None) or None
    os.makedirs(save_directory, exist_ok=True)
    save_file(
        {key: value.contiguous() for key, value in state_dict.items()},
        os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    auto_mapping = None
    if config.task_type is None:  # as PEFT's save_pretrained: lets AutoPeftModel rebuild the base class
        auto_mapping = {"base_model_class": type(base_model).__name__, "parent_library": type(base_model).__module__}
    config.save_pretrained(save_directory, auto_mapping_dict=auto_mapping)
