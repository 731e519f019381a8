"""The official Rein optimiser recipe, for plain PyTorch loops and `transformers.Trainer`."""

from __future__ import annotations

import torch
from torch import nn

# token tables take no weight decay in the official recipe (nor do the scale, biases and norms: every 0/1-dim tensor)
TOKEN_STEMS = ("rein_tokens", "rein_tokens_a", "rein_tokens_b")


def rein_parameter_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Split the trainable parameters into a group with `weight_decay` (weight matrices) and one without (tokens,
    scale, biases, norms), as the official Rein recipe does."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_token_table = any(part in TOKEN_STEMS for part in name.split("."))
        (no_decay if is_token_table or param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_rein_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the official Rein defaults (lr 1e-4, weight decay 0.05 on weight
    matrices only). With `Trainer`: `Trainer(..., optimizers=(create_rein_optimizer(model, lr, wd), None))`."""
    return torch.optim.AdamW(rein_parameter_groups(model, weight_decay), lr=lr, betas=betas)
