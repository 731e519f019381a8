"""Quantized frozen backbones: what may be quantized (the backbone's linear layers) and what must stay in floating
point (Rein's tensors and the modules that train beside them)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import MODULES_TO_SAVE, ORIGINAL_MODULE, is_adapter_key


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds quantized data: integer data (bitsandbytes' `Int8Params`, `Params4bit`), or a tensor
    subclass that wraps other tensors, as torchao's `Int8Tensor` wraps int8 data and scales while reporting a float
    dtype. FSDP2's `DTensor` shards wrap tensors too, but not quantized ones; the fake tensors of shape tracing wrap
    nothing."""
    if isinstance(tensor, DTensor):
        return False
    return not tensor.is_floating_point() or hasattr(type(tensor), "__tensor_flatten__")


def is_backbone_linear(module: nn.Module, name: str) -> bool:
    """`filter_fn` for torchao's `quantize_` on a model with a Rein adapter: the frozen backbone's `nn.Linear`
    layers. Not Rein's own linear maps, and not the modules in `modules_to_save` (neither PEFT's copies, which train,
    nor the original the copies of further adapters are made from): they stay in floating point.

    ```py
    >>> from torchao.quantization import Int8WeightOnlyConfig, quantize_
    >>> quantize_(peft_model, Int8WeightOnlyConfig(), filter_fn=rein_peft.is_backbone_linear)
    ```
    """
    return isinstance(module, nn.Linear) and not is_adapter_key(name) and ORIGINAL_MODULE not in name.split(".")


def refuse_quantized_modules_to_save(model: nn.Module, module_names: list[str] | None) -> None:
    """Refuse `modules_to_save` whose weights are quantized: PEFT gives each adapter a copy, which trains or holds the
    adapter's saved weights, and a quantized copy can do neither."""
    for name, module in model.named_modules():
        if not any(name.endswith(target) for target in module_names or []):  # PEFT's own matching: a plain suffix
            continue
        for tensor_name, tensor in module.named_parameters():
            if MODULES_TO_SAVE not in tensor_name.split(".") and is_quantized(tensor):
                short_name = name.rpartition(".")[2]
                raise ValueError(
                    f"'{name}' is in `modules_to_save`, so each adapter gets a copy of it that trains or holds the "
                    f"adapter's weights, but its '{tensor_name}' is quantized ({type(tensor).__name__}), and a "
                    "quantized copy can do neither. Keep it in floating point when quantizing: "
                    f"`TorchAoConfig(..., modules_to_not_convert=['{short_name}'])`, "
                    f"`BitsAndBytesConfig(..., llm_int8_skip_modules=['{short_name}'])`, or torchao's "
                    "`quantize_(peft_model, config, filter_fn=rein_peft.is_backbone_linear)` after `get_peft_model`."
                )
