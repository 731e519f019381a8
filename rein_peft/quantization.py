"""Quantized frozen backbones: what may be quantized (the backbone's linear layers) and what must stay in floating
point (Rein's tensors and the modules that train beside them)."""

from __future__ import annotations

import torch
from torch import nn

from .sharding import MODULES_TO_SAVE_KEY, REIN_KEY


def is_plain_float(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an ordinary floating-point tensor (or parameter): not int8/int4 data and not a quantized
    tensor subclass such as torchao's `Int8Tensor` or bitsandbytes' `Params4bit`, which report a float dtype."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point()


def is_backbone_linear(module: nn.Module, name: str) -> bool:
    """`filter_fn` for torchao's `quantize_` on a model with a Rein adapter: the frozen backbone's `nn.Linear`
    layers, not Rein's own linear maps nor the trained copies of `modules_to_save`, which must stay in floating point.

    ```py
    >>> from torchao.quantization import Int8WeightOnlyConfig, quantize_
    >>> quantize_(peft_model, Int8WeightOnlyConfig(), filter_fn=rein_peft.is_backbone_linear)
    ```
    """
    return isinstance(module, nn.Linear) and REIN_KEY not in name and MODULES_TO_SAVE_KEY not in name


def refuse_quantized_modules_to_save(model: nn.Module, module_names: list[str] | None) -> None:
    """Refuse `modules_to_save` whose weights are quantized: PEFT trains a copy of each, and quantized tensors cannot
    be trained (nor hold the trained weights of a saved adapter)."""
    for name, module in model.named_modules():
        if not any(name == target or name.endswith(f".{target}") for target in module_names or []):
            continue
        for tensor_name, tensor in module.named_parameters():
            if MODULES_TO_SAVE_KEY.strip(".") not in tensor_name.split(".") and not is_plain_float(tensor):
                short_name = name.rpartition(".")[2]
                raise ValueError(
                    f"'{name}' is in `modules_to_save`, so a copy of it is trained, but its '{tensor_name}' is "
                    f"quantized ({type(tensor).__name__}), and quantized tensors cannot be trained. Keep it in "
                    f"floating point when quantizing: `TorchAoConfig(..., modules_to_not_convert=['{short_name}'])`, "
                    f"`BitsAndBytesConfig(..., llm_int8_skip_modules=['{short_name}'])`, or torchao's "
                    "`quantize_(peft_model, config, filter_fn=rein_peft.is_backbone_linear)` after `get_peft_model`."
                )
