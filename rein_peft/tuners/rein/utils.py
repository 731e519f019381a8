"""What Rein's tuner needs of the model around it: whether a tensor is quantized, which `modules_to_save` cannot be
copied, and how to put a model back as it was when adding or loading an adapter fails."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import MODULES_TO_SAVE


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds quantized data: integer data (bitsandbytes' `Int8Params`, `Params4bit`), or a tensor
    subclass that wraps other tensors, as torchao's `Int8Tensor` wraps int8 data and scales while reporting a float
    dtype. FSDP2's `DTensor` shards wrap tensors too, but not quantized ones; the fake tensors of shape tracing wrap
    nothing."""
    if isinstance(tensor, DTensor):
        return False
    return not tensor.is_floating_point() or hasattr(type(tensor), "__tensor_flatten__")


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


def _module_state(module: nn.Module) -> dict[str, Any]:
    # the attribute dict, and one level below it the dicts that hold submodules, parameters, buffers and hooks
    # (`_modules`, `_parameters`, `_forward_hooks`, ...), which are changed in place
    return {name: dict(value) if isinstance(value, dict) else value for name, value in vars(module).items()}


@contextmanager
def unchanged_on_failure(*modules: nn.Module) -> Iterator[None]:
    """If the body raises, put every module below `modules` back as it was: its submodules, parameters, buffers,
    hooks and other attributes, and each parameter's `requires_grad`. Tensor values are not copied: nothing that
    adds or loads an adapter writes into the base model's tensors."""
    states = {id(module): (module, _module_state(module)) for root in modules for module in root.modules()}
    requires_grad = [(param, param.requires_grad) for root in modules for param in root.parameters()]
    try:
        yield
    except BaseException:
        for module, state in states.values():
            vars(module).clear()
            vars(module).update(state)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
