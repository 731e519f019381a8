"""torchao: what of a model with a Rein adapter may be quantized (the frozen backbone's linear layers) and what must
stay in floating point (Rein's tensors and the modules that train beside them). The tuner's own checks of quantized
weights are in `rein_peft.tuners.rein.utils`."""

from __future__ import annotations

from torch import nn

from ..tuners.rein.config import ORIGINAL_MODULE, is_adapter_key


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
