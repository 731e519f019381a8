"""The foundation: a small ViT pretrained without labels on scenes in random styles so that its frozen features hold
across styles (Rein's premise), saved as a DINOv2 checkpoint and cached under a name that hashes its recipe and the
code that makes it."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from .evaluation import feature_similarity, style_similarities
from .world import SOURCE_STYLE, STYLES, draw_layout, random_style, render, scenes, texture_field

FOLDER_PREFIX = "vicreg-vit-"  # the cached foundation's folder: this, then the recipe's fingerprint
RECIPE_FILE = "recipe.json"  # beside the weights, written last: its presence marks a complete build


@dataclass(frozen=True)
class BackboneRecipe:
    """Everything that decides the foundation's weights: its shape, its data and its VICReg pretraining."""

    side: int = 64
    patch: int = 8
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    mlp: int = 512
    images: int = 20000  # scenes in random styles, drawn once (twice: a second random style of each)
    steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    mask_ratio: float = 0.3  # of the crop's patches
    seed: int = 0
    projector: int = 512  # the expander's width
    crop_patches: int = 6  # the second view's crop, in patches a side (the first view is the whole scene)
    weight_decay: float = 0.05

    def fingerprint(self) -> str:
        """A hash of the recipe and of the code that draws the scenes and trains, naming the cached checkpoint."""
        code = (draw_layout, render, random_style, texture_field, scenes, image_tensor)
        code += (pretrain_vicreg, variance_covariance, feature_similarity, style_similarities)
        source = "".join(inspect.getsource(part) for part in code)
        return hashlib.sha256((json.dumps(asdict(self), sort_keys=True) + source).encode()).hexdigest()[:12]


FOUNDATIONS = {"vicreg": BackboneRecipe()}  # by --foundation: 1,000 steps of 64 scenes
# --quick: the foundation's recipe at a tiny size (numbers mean nothing; the pipeline runs in seconds)
QUICK_SIZES = {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "images": 64, "steps": 4, "batch": 16}


def foundation_recipe(name: str, quick: bool = False, official: bool = False) -> BackboneRecipe:
    """The recipe of foundation `name` (a key of `FOUNDATIONS`), at `QUICK_SIZES` when `quick`; the official
    segmenter's pyramid takes 4 distinct layers, so a quick one for it gets 4."""
    recipe = FOUNDATIONS[name]
    if quick:
        recipe = replace(recipe, **{**QUICK_SIZES, **({"layers": 4} if official else {})})
    return recipe


def image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """`[N, 3, H, W]` uint8."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def variance_covariance(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's two terms against collapse, over `[N, D]` embeddings: the hinge on each dimension's standard
    deviation (below 1 costs), and the squared off-diagonal covariances (redundant dimensions cost)."""
    centred = embeddings - embeddings.mean(dim=0)
    variance = nn.functional.relu(1 - torch.sqrt(centred.var(dim=0) + 1e-4)).mean()
    covariance = (centred.T @ centred) / (len(embeddings) - 1)  # [D, D]
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return variance, off_diagonal.pow(2).sum() / embeddings.shape[1]


def pretrain_vicreg(
    recipe: BackboneRecipe, processor: BitImageProcessorPil, log_every: int = 125
) -> tuple[Dinov2Model, list[dict]]:
    """Self-supervised, without labels: VICReg's objective on patch tokens. One view is a whole scene in a random
    style; the other is a crop of the same scene drawn in another random style, with some patches masked. Each
    patch of the crop is pulled (mean squared error, weight 25) towards the same place in the whole view, through a
    shared expander; the variance hinge (weight 25) and the covariance term (weight 1) keep the embeddings from
    collapsing. The crop's position embeddings are interpolated to its own grid, so a patch's place in the scene
    cannot stand in for its content.

    Returns the backbone and the premise (`style_similarities`, on 100 scenes outside the pretraining pool and the
    task) every `log_every` steps: how the invariance grows with pretraining compute."""
    torch.manual_seed(recipe.seed)
    config = Dinov2Config(
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        mlp_ratio=recipe.mlp // recipe.hidden,
        image_size=recipe.side,
        patch_size=recipe.patch,
        layerscale_value=1.0,
    )
    backbone = Dinov2Model(config)
    expander = nn.Sequential(
        nn.Linear(recipe.hidden, recipe.projector),
        nn.LayerNorm(recipe.projector),
        nn.GELU(),
        nn.Linear(recipe.projector, recipe.projector),
    )
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    def normalised(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    pool_seed = 1000 + recipe.seed  # other layouts than the task's (seeds 1 and 100)
    pools = [image_tensor(scenes(None, recipe.images, pool_seed, recipe.side, variant)["image"]) for variant in (0, 1)]
    probe = {
        name: normalised(image_tensor(scenes(style, 100, 200, recipe.side)["image"])) for name, style in STYLES.items()
    }
    probe_source = probe.pop(SOURCE_STYLE)
    parameters = [*backbone.parameters(), *expander.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    grid, crop, patch = recipe.side // recipe.patch, recipe.crop_patches, recipe.patch
    curve = []
    for step in range(recipe.steps):
        indices = torch.randint(len(pools[0]), (recipe.batch,), generator=generator)
        flip = torch.rand(recipe.batch, generator=generator) < 0.5
        whole, other = (normalised(pool[indices]) for pool in pools)  # the same scenes in two styles, [B, 3, S, S]
        whole[flip], other[flip] = whole[flip].flip(-1), other[flip].flip(-1)
        top, left = torch.randint(grid - crop + 1, (2,), generator=generator).tolist()
        cropped = other[..., top * patch : (top + crop) * patch, left * patch : (left + crop) * patch]
        masked = torch.rand(recipe.batch, crop * crop, generator=generator) < recipe.mask_ratio
        backbone.train()
        whole_tokens = backbone(pixel_values=whole).last_hidden_state[:, 1:]  # [B, grid², C]
        whole_tokens = whole_tokens.unflatten(1, (grid, grid))[:, top : top + crop, left : left + crop].flatten(1, 2)
        crop_tokens = backbone(pixel_values=cropped, bool_masked_pos=masked).last_hidden_state[:, 1:]  # [B, crop², C]
        embeddings = [expander(tokens.flatten(0, 1)) for tokens in (whole_tokens, crop_tokens)]  # [B * crop², D]
        invariance = nn.functional.mse_loss(*embeddings)
        variance, covariance = (sum(terms) / 2 for terms in zip(*map(variance_covariance, embeddings), strict=True))
        loss = 25 * invariance + 25 * variance + covariance
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, 3.0)
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            premise = style_similarities(backbone, probe_source, probe)
            curve.append({"step": step + 1, "loss": loss.item(), "premise": premise})
            print(
                f"  pretraining step {step + 1}/{recipe.steps}: loss {loss.item():.3f} (invariance "
                f"{invariance.item():.3f}, variance {variance.item():.3f}), premise "
                + " ".join(f"{name} {value:.2f}" for name, value in premise.items()),
                flush=True,
            )
    return backbone, curve


def build_backbone(recipe: BackboneRecipe, cache_dir: str) -> str:
    """The folder of the pretrained foundation (a DINOv2 checkpoint with its image processor), built on first use
    and then read from `cache_dir`."""
    folder = os.path.join(cache_dir, FOLDER_PREFIX + recipe.fingerprint())
    if os.path.isfile(os.path.join(folder, RECIPE_FILE)):
        return folder
    print(f"building the foundation backbone (once, cached in {folder})", flush=True)
    start = time.perf_counter()
    processor = BitImageProcessorPil(size={"height": recipe.side, "width": recipe.side}, do_center_crop=False)
    backbone, curve = pretrain_vicreg(recipe, processor)
    backbone.save_pretrained(folder)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, RECIPE_FILE), "w") as file:  # written last: its presence marks a complete build
        json.dump({**asdict(recipe), "seconds": time.perf_counter() - start, "premise_curve": curve}, file, indent=2)
    return folder


def pretraining_record(folder: str) -> dict:
    """What the cached build recorded: its seconds and its premise curve."""
    with open(os.path.join(folder, RECIPE_FILE)) as file:
        built = json.load(file)
    return {"seconds": built["seconds"], "premise_curve": built["premise_curve"]}
