"""SoMA's initialisation of PEFT LoRA factors from the minor singular components of the frozen weights, in place.

Per adapted linear with weight W `[out, in]` (computed in float32): the full SVD W = U S Vh; with the r smallest
singular values S_r (and their columns U_r `[out, r]`, rows Vh_r `[r, in]`) and the LoRA scaling s (alpha / r),

    A = diag(sqrt(S_r / s)) Vh_r   `[r, in]`,   B = U_r diag(sqrt(S_r / s))   `[out, r]`,

and the frozen weight becomes the residual W - s B A, so that the model's output is unchanged at initialisation and
training starts from the directions the pretrained weights use least (SoMA's `sora_init` with `first_eigen=False`).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

# the factors each LoRA layer had right after `initialize_soma`, per adapter: what `save_soma_adapter` subtracts
INITIAL_FACTORS = "soma_initial_factors"


def minor_singular_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SoMA's LoRA factors of one weight `[out, in]`: A `[rank, in]` and B `[out, rank]` in float32, from the `rank`
    smallest singular values, with s B A equal to that part of the weight."""
    weight = weight.detach().to(torch.float32)
    left, singular, right = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in]; descending
    root = torch.sqrt(singular[-rank:] / scaling)  # [rank]
    return root[:, None] * right[-rank:], left[:, -rank:] * root[None, :]


def soma_lora_layers(
    peft_model: nn.Module, adapter_name: str, initialised: bool = False
) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer of `adapter_name`, after checking that SoMA's initialisation is defined for it and that it
    has (`initialised=True`) or has not yet had it."""
    configs = getattr(peft_model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(
            f"{type(peft_model).__name__} has no adapter {adapter_name!r} (it has {sorted(configs)}): SoMA "
            "initialises a LoRA adapter of a PeftModel made with "
            "`get_peft_model(model, rein_peft.soma_config(model))`."
        )
    config = configs[adapter_name]
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"Adapter {adapter_name!r} is a {type(config).__name__}, not a LoraConfig: SoMA initialises LoRA factors. "
            "Build the adapter with `rein_peft.soma_config(model)`."
        )
    if config.use_dora:
        raise ValueError(
            f"Adapter {adapter_name!r} uses DoRA, whose magnitude was computed from the weight before SoMA would "
            "replace it with the residual; SoMA is defined for plain LoRA: set use_dora=False."
        )
    layers = [
        (name, module)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]
    if not layers:
        raise ValueError(f"Adapter {adapter_name!r} adapts no module: nothing for SoMA to initialise.")
    for name, module in layers:
        base = module.get_base_layer()
        plain_weight = type(base) is nn.Linear and type(base.weight.data) is torch.Tensor  # no quantized tensor
        if not plain_weight or not base.weight.is_floating_point() or getattr(module, "fan_in_fan_out", False):
            raise ValueError(
                f"'{name}' wraps a {type(base).__name__} with a {type(base.weight.data).__name__} weight of "
                f"{base.weight.dtype}: SoMA's initialisation is defined for nn.Linear weights "
                "[out, in] in float32, float16 or bfloat16 (not quantized, not Conv1D); leave it out of "
                "target_modules."
            )
        rank = module.r[adapter_name]
        if rank > min(base.weight.shape):
            raise ValueError(
                f"'{name}' has rank {rank} but its weight is {tuple(base.weight.shape)}: the rank must be at most "
                f"{min(base.weight.shape)}."
            )
        done = adapter_name in getattr(module, INITIAL_FACTORS, {})
        if done and not initialised:
            raise ValueError(
                f"Adapter {adapter_name!r} is already initialised by SoMA ('{name}' holds the residual weight): a "
                "second SVD would read the residual. Call initialize_soma once, right after get_peft_model."
            )
        if initialised and not done:
            raise ValueError(
                f"Adapter {adapter_name!r} was not initialised with `rein_peft.initialize_soma` in this process "
                f"('{name}' has no initial factors), so the factors it started from are unknown. Save it with "
                "`save_pretrained` (it then loads only into a model initialised the same way), or build the model "
                "with soma_config + get_peft_model + initialize_soma and load the trained adapter into it first."
            )
        if module.merged:
            raise ValueError(f"'{name}' has adapters merged into its weight: unmerge them before initialize_soma.")
    return layers


@torch.no_grad()
def initialize_soma(peft_model: PeftModel, adapter_name: str = "default") -> None:
    """Initialise the LoRA adapter `adapter_name` of `peft_model` as SoMA does, in place: for every adapted linear
    with weight W, full SVD in float32, A and B from the r smallest singular triplets scaled by sqrt(S_r / s) (s the
    LoRA scaling, alpha / r), and W replaced by the residual W - s B A. The model's outputs are unchanged (up to
    float32 rounding, or the weight's own dtype). Call it once, right after `get_peft_model(model,
    rein_peft.soma_config(model))` and before training; it records the initial factors that `save_soma_adapter`
    needs to save an adapter for the unmodified model. Every layer is checked before any is changed.

    Args:
        peft_model: A `PeftModel` (or a model with PEFT LoRA layers and a `peft_config`).
        adapter_name: The LoRA adapter to initialise.

    Raises:
        ValueError: For a missing adapter, one that is not LoRA or uses DoRA, layers that are not `nn.Linear`, a
            rank above a weight's smaller side, merged layers, or an adapter already initialised.
    """
    for _, module in soma_lora_layers(peft_model, adapter_name):
        base = module.get_base_layer()
        lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        scaling = module.scaling[adapter_name]
        factor_a, factor_b = minor_singular_factors(base.weight, module.r[adapter_name], scaling)
        residual = base.weight.to(torch.float32) - scaling * (factor_b @ factor_a)  # [out, in]
        lora_a.copy_(factor_a)
        lora_b.copy_(factor_b)
        base.weight.copy_(residual)
        initial = getattr(module, INITIAL_FACTORS, {})
        initial[adapter_name] = (lora_a.detach().clone(), lora_b.detach().clone())
        setattr(module, INITIAL_FACTORS, initial)
