"""The official optimiser recipes of Rein and SoMA, for plain PyTorch loops and `transformers.Trainer`."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedModel

try:  # transformers' public home for it since 5.x; the older path warns of its removal
    from transformers.backbone_utils import BackboneMixin
except ImportError:  # pragma: no cover - transformers releases before the move
    from transformers.utils.backbone_utils import BackboneMixin

# token tables take no weight decay in the official recipe (nor do the scale, biases and norms: every 0/1-dim tensor)
TOKEN_STEMS = ("rein_tokens", "rein_tokens_a", "rein_tokens_b")
# transformers' names for the Mask2Former query and level embeddings, which take no weight decay in the official Rein
# and SoMA configs (`paramwise_cfg`: query_embed, query_feat, level_embed with decay_mult 0)
EMBEDDING_NAMES = ("level_embed", "queries_embedder", "queries_features")
# the layers whose parameters take no weight decay in SoMA's recipe (mmengine's `norm_decay_mult=0`)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def rein_parameter_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    no_decay_names: tuple[str, ...] = (),
    decay_vectors: bool = False,
) -> list[dict]:
    """Split the trainable parameters into a group with `weight_decay` and one without, as the official recipes do.

    Args:
        model: The model; only its trainable parameters are grouped.
        weight_decay: The decayed group's weight decay.
        no_decay_names: Parameters whose name contains one of these take no decay either (`EMBEDDING_NAMES`:
            Mask2Former's query and level embeddings).
        decay_vectors: False (Rein): only weight matrices take decay; Rein's tokens and scale, biases and norms
            (every 0/1-dim tensor) take none. True (SoMA): biases and other vectors take decay too; only the
            parameters of normalisation layers (`NORM_LAYERS`) and the token tables take none.

    Returns:
        `[{"params": decayed, "weight_decay": weight_decay}, {"params": the rest, "weight_decay": 0.0}]`.
    """
    norms = {
        id(param) for module in model.modules() if isinstance(module, NORM_LAYERS) for param in module.parameters()
    }
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_token_table = any(part in TOKEN_STEMS for part in name.split("."))
        is_named = any(key in name for key in no_decay_names)
        is_vector = id(param) in norms if decay_vectors else param.ndim <= 1
        (no_decay if is_token_table or is_named or is_vector else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained backbone of a transformers model (or of the `PeftModel` around one): its `BackboneMixin`
    submodule (the encoder of a segmenter or detector, e.g. Mask2Former's DINOv2), else its base model
    (`base_model_prefix`: the ViT under a classification head, or the model itself without a head).

    Raises:
        ValueError: For a model that is not a transformers model; pass the backbone module yourself.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = next((module for module in base.modules() if isinstance(module, BackboneMixin)), None)
    if backbone is not None:
        return backbone
    if isinstance(base, PreTrainedModel):  # the model itself when it has no head
        return base.base_model
    raise ValueError(
        f"Cannot tell the backbone of a {type(base).__name__}: it is not a transformers model (no BackboneMixin, no "
        "base_model_prefix). Pass backbone=<the pretrained module> (or backbone_lr_multiplier=1.0)."
    )


def backbone_lr_groups(
    groups: list[dict], lr: float, backbone: nn.Module | None = None, backbone_lr_multiplier: float = 1.0
) -> list[dict]:
    """Split each parameter group into the parameters of `backbone`, at `backbone_lr_multiplier` times `lr`, and the
    rest, at `lr`; empty groups are dropped. Without a backbone (or at multiplier 1) the groups stay as they are."""
    if backbone is None or backbone_lr_multiplier == 1.0:
        return [group for group in groups if group["params"]]
    in_backbone = {id(param) for param in backbone.parameters()}
    return [
        {**group, "params": params, "lr": lr * (backbone_lr_multiplier if inside else 1.0)}
        for group in groups
        for inside in (True, False)
        if (params := [param for param in group["params"] if (id(param) in in_backbone) == inside])
    ]


def create_rein_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the official Rein defaults (lr 1e-4, weight decay 0.05 on weight
    matrices only). With `Trainer`: `Trainer(..., optimizers=(create_rein_optimizer(model, lr, wd), None))`."""
    return torch.optim.AdamW(rein_parameter_groups(model, weight_decay), lr=lr, betas=betas)


def create_soma_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    backbone_lr_multiplier: float = 0.5,
    backbone: nn.Module | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW as SoMA's config sets it (`configs/sora/sora_dinov2-L_mask2former.py`): lr 1e-4, weight decay 0.05 on
    every trainable parameter except normalisation layers and Mask2Former's query and level embeddings (biases take
    decay, unlike Rein's recipe), the backbone's parameters (SoMA's LoRA factors and biases) at half the learning
    rate. Pair it with `PolyLRCosineWeightDecay`, SoMA's schedule:

    ```py
    optimizer = create_soma_optimizer(model)
    trainer = Trainer(..., optimizers=(optimizer, PolyLRCosineWeightDecay(optimizer, args.max_steps)))
    ```

    Args:
        model: The model (a `PeftModel` or a transformers model); only its trainable parameters are optimised.
        lr: The learning rate of everything outside the backbone.
        weight_decay: AdamW's weight decay on the decayed groups (the schedule anneals it).
        backbone_lr_multiplier: The backbone's learning rate, relative to `lr`.
        backbone: The pretrained backbone; default `backbone_of(model)` (the segmenter's DINOv2, a classifier's ViT).
        betas: AdamW's betas.
        eps: AdamW's epsilon.

    Raises:
        ValueError: `backbone` unset and the model's backbone cannot be told (`backbone_of`).
    """
    if backbone is None and backbone_lr_multiplier != 1.0:
        backbone = backbone_of(model)
    groups = rein_parameter_groups(model, weight_decay, no_decay_names=EMBEDDING_NAMES, decay_vectors=True)
    return torch.optim.AdamW(
        backbone_lr_groups(groups, lr, backbone, backbone_lr_multiplier), lr=lr, betas=betas, eps=eps
    )


class PolyLRCosineWeightDecay(torch.optim.lr_scheduler.LRScheduler):
    """SoMA's schedule, one step per optimiser step: the learning rate of each group decays polynomially to 0,
    `lr_t = lr_0 (1 - t / T) ** power`, and its weight decay follows a cosine from its initial value to
    `final_weight_decay`, `wd_t = final + (wd_0 - final) (1 + cos(pi t / T)) / 2` (mmengine's `PolyLR` and
    `CosineAnnealingParamScheduler(param_name="weight_decay")` in SoMA's config); after `T` steps both stay at
    their last values. Groups with no weight decay keep none (mmengine's scheduler would raise them towards
    `final_weight_decay`; SoMA's config means them to take none).

    It is an `LRScheduler` rather than a `TrainerCallback` so that it is one object `Trainer` takes as
    `optimizers=(optimizer, scheduler)`: Trainer steps it after every optimiser step (so gradient accumulation and
    skipped steps count right), saves and restores it with each checkpoint (`scheduler.pt`) on
    `resume_from_checkpoint`, logs its learning rate, and a plain loop uses it the same way.

    Args:
        optimizer: The optimiser (`create_soma_optimizer`); each group's `lr` and `weight_decay` are the starts.
        total_steps: T, the optimiser steps of the run (`TrainingArguments.max_steps`).
        power: The polynomial's power (0.9 in SoMA's config).
        final_weight_decay: The weight decay at step T (1e-5 in SoMA's config).
        last_epoch: The last step done, to resume (-1: a new run).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        power: float = 0.9,
        final_weight_decay: float = 1e-5,
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1 (the optimiser steps of the run), got {total_steps}.")
        self.total_steps, self.power, self.final_weight_decay = total_steps, power, final_weight_decay
        for group in optimizer.param_groups:  # the starts, kept in the groups as torch keeps `initial_lr`
            group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, last_epoch)

    def _progress(self) -> float:
        """t / T, held at 1 after the run's last step."""
        return min(self.last_epoch, self.total_steps) / self.total_steps

    def get_lr(self) -> list[float]:
        """The learning rate of each group at the current step."""
        factor = (1.0 - self._progress()) ** self.power
        return [base_lr * factor for base_lr in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Advance one step: set each group's learning rate and weight decay."""
        super().step(epoch)
        cosine = (1.0 + math.cos(math.pi * self._progress())) / 2.0
        for group in self.optimizer.param_groups:
            start = group["initial_weight_decay"]
            group["weight_decay"] = (
                self.final_weight_decay + (start - self.final_weight_decay) * cosine if start else 0.0
            )
