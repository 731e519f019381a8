"""Saving an adapter from a model sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`, or accelerate's FSDP
plugin with `fsdp_version: 2`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..tuners.rein.config import is_adapter_key


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Rein tensors and `modules_to_save` copies of every adapter of `model`, whole (not sharded), on every rank.

    FSDP2 keeps each rank's shard of a parameter as a `DTensor`, which `save_pretrained` cannot write; this gathers
    only the adapter (a few MB), not the frozen backbone. A collective: call it on every rank, then save on one:

    ```py
    >>> state_dict = rein_peft.gather_adapter_state_dict(model)
    >>> if torch.distributed.get_rank() == 0:
    ...     model.save_pretrained("adapter", state_dict=state_dict)
    ```

    On a model that is not sharded it returns the same tensors, so the same code runs on one process.
    """
    gathered = {}
    for key, tensor in model.state_dict().items():  # the same order on every rank, as the collective needs
        if not is_adapter_key(key):
            continue
        gathered[key] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return gathered
