"""The compared methods, each with the same decoder, steps, batches and optimiser: the frozen backbone + decoder,
PEFT LoRA, full fine-tuning, Rein with full-rank tokens, Rein with lora_dim=16 and SoMA; the segmenters they train in
(UperNet over a `Dinov2Backbone`, or the official Rein segmenter) and the training loop."""

from __future__ import annotations

import argparse
import time

import datasets
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import Dinov2Backbone, Dinov2Config, Mask2FormerConfig, UperNetConfig, UperNetForSemanticSegmentation

import rein_peft
from rein_peft.official import protocol
from rein_peft.official.segmenter import BACKBONE_MODULE, apply_method, mask_targets

from .task import Task

METHODS = ("frozen", "lora", "full", "rein", "rein_lora16", "soma")
METHOD_NAMES = {
    "frozen": "frozen backbone + decoder",
    "lora": "PEFT LoRA (r=16, q/v)",
    "full": "full fine-tuning",
    "rein": "Rein (full-rank tokens)",
    "rein_lora16": "Rein (lora_dim=16)",
    "soma": "SoMA (LoRA r=16, minor components)",
}
DECODER = "decode_head"
# --segmenter official: rein_peft.build_official_segmenter (Mask2Former over the x4/x2/x1/x0.5 pyramid, queries
# linked to Rein's tokens), each method as rein_peft names it; on the miniature backbone its decoder is scaled down
SEGMENTERS = ("upernet", "official")
OFFICIAL_METHODS = {
    "frozen": "frozen",
    "lora": "lora",
    "full": "full",
    "rein": "rein_full_rank",
    "rein_lora16": "rein",
    "soma": "soma",
}
MINIATURE_OFFICIAL_DECODER = {
    "encoder_layers": 2,
    "num_decoder_layers": 3,
    "num_queries": 16,
    "train_num_points": 1024,
}


def segmenter_config(
    backbone_path: str,
    task: Task,
    decoder_channels: int,
    official: bool = False,
    miniature: bool = True,
    deepest_layer_only: bool = False,
) -> UperNetConfig | Mask2FormerConfig:
    """UperNet over a `Dinov2Backbone` shaped like the checkpoint, fed by the outputs of 4 evenly spaced layers (or
    of the deepest alone) without the final norm, as the official Rein features are taken; or (`official`) the
    official Rein segmenter, its decoder `decoder_channels` wide and shallower on the `miniature` backbone."""
    if official and deepest_layer_only:
        raise SystemExit(
            "The official segmenter reads its fixed pyramid of 4 layers; this setting needs --segmenter "
            "upernet (its decoder reads the deepest layer only)."
        )
    if official:
        widths = {"hidden_dim": decoder_channels}  # the feed-forward widths follow at the official ratios
        scaled_down = {**MINIATURE_OFFICIAL_DECODER, **widths} if miniature else {}
        labels = {"id2label": dict(enumerate(task.class_names))} if task.class_names else {}
        return rein_peft.official_segmenter_config(backbone_path, task.num_labels, **labels, **scaled_down)
    deepest = [Dinov2Config.from_pretrained(backbone_path).num_hidden_layers] if deepest_layer_only else None
    backbone_config = protocol.dinov2_backbone_config(backbone_path, out_indices=deepest)
    return protocol.segmenter_config(
        "upernet", backbone_config, task.num_labels, task.class_names, hidden_size=decoder_channels
    )


def segmenter(config: UperNetConfig, backbone_path: str, seed: int) -> UperNetForSemanticSegmentation:
    """The segmenter with the decoder initialised from `seed` and the checkpoint's backbone weights."""
    torch.manual_seed(seed)
    if isinstance(config, Mask2FormerConfig):
        return rein_peft.build_official_segmenter(backbone_path, config.num_labels, method="full", config=config)
    model = UperNetForSemanticSegmentation(config)
    backbone = Dinov2Backbone.from_pretrained(backbone_path, config=config.backbone_config)
    model.backbone.load_state_dict(backbone.state_dict())
    return model


def prepare(model: UperNetForSemanticSegmentation, method: str, seed: int) -> nn.Module:
    """The model as `method` trains it: what is trainable, and the adapter (created from `seed`) where there is one."""
    torch.manual_seed(seed)
    if isinstance(model.config, Mask2FormerConfig):
        return apply_method(model, OFFICIAL_METHODS[method])
    if method == "full":
        return model
    if method == "frozen":
        model.backbone.requires_grad_(False)
        return model
    if method == "lora":  # PEFT's recipe for ViTs: r=16 on the attention's query and value projections
        config = LoraConfig(
            r=16,
            lora_alpha=16,
            lora_dropout=0.1,
            target_modules=r"backbone\.encoder\.layer\.\d+\.attention\.(q_proj|v_proj)",
            modules_to_save=[DECODER],
        )
        return get_peft_model(model, config)
    if method == "soma":  # SoMA's recipe: r=16 on every linear of the blocks after the first third, and their biases
        soma = get_peft_model(model, rein_peft.soma_config(model, modules_to_save=[DECODER]))
        rein_peft.initialize_soma(soma)  # the minor singular components; the frozen weights become the residuals
        return soma
    lora_dim = 16 if method == "rein_lora16" else None
    return get_peft_model(model, rein_peft.ReinConfig(lora_dim=lora_dim, modules_to_save=[DECODER]))


def optimizer_for(model: nn.Module, method: str, args: argparse.Namespace) -> torch.optim.AdamW:
    """Rein's optimiser recipe (AdamW, no decay on tokens, scales, biases and norms) for every method; full
    fine-tuning gives the pretrained backbone `args.backbone_lr_multiplier` times the learning rate."""
    backbone = backbone_of(model) if method == "full" else None
    return protocol.official_optimizer(
        model, args.lr, args.weight_decay, backbone=backbone, backbone_lr_multiplier=args.backbone_lr_multiplier
    )


def train(model: nn.Module, method: str, data: datasets.Dataset, args: argparse.Namespace, seed: int) -> float:
    """`args.steps` AdamW steps with a poly schedule (power 0.9) on random horizontally flipped batches; the
    batches depend on `seed` only, so every method sees the same ones. Returns the seconds taken."""
    optimizer = optimizer_for(model, method, args)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=args.steps, power=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        indices = torch.randint(len(data), (args.batch_size,), generator=generator).tolist()
        batch = data[indices]
        flip = torch.rand(args.batch_size, generator=generator) < 0.5
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        pixel_values[flip], labels[flip] = pixel_values[flip].flip(-1), labels[flip].flip(-1)
        loss = model(pixel_values=pixel_values.to(args.device), **targets(labels.to(args.device), model.config)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % max(1, args.steps // 4) == 0:
            print(f"    step {step + 1}/{args.steps}: loss {loss.item():.3f}", flush=True)
    return time.perf_counter() - start


def targets(labels: torch.Tensor, config: UperNetConfig | Mask2FormerConfig) -> dict:
    """The loss's targets: the label maps, or for Mask2Former one binary mask per class present."""
    if isinstance(config, Mask2FormerConfig):
        return mask_targets(labels, rein_peft.segmentation_ignore_index(config))
    return {"labels": labels}


def backbone_of(model: nn.Module) -> nn.Module:
    """The segmenter's DINOv2 backbone (a `PeftModel`'s, with its adapter)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.backbone if hasattr(base, "backbone") else base.get_submodule(BACKBONE_MODULE)
