"""Domain generalization in miniature: train a segmenter on one visual style, measure it on styles it never saw.

Rein's claim is about unseen domains: trained on synthetic GTAV, a frozen DINOv2 refined by Rein holds up on real
Cityscapes better than the same backbone fine-tuned in full. Neither those weights nor those data sets can be
downloaded here, so this script builds a faithful miniature and runs the same protocol on it:

1. A "foundation" backbone: a small ViT pretrained without labels by masked-image modelling
   (`ViTMAEForPreTraining`) on street-like scenes drawn in many random visual styles, then converted to a DINOv2
   checkpoint (same blocks, layer scale 1). It is built once and cached under `--cache_dir`, in a folder named by
   a hash of its recipe, with the recipe beside it.
2. A segmentation task (sky, building, road, vegetation, vehicle) whose scenes share layout and classes across
   styles: a flat-shaded "synthetic" source style to train on and six unseen target styles that differ from it the
   way real images differ from synthetic ones: texture, palette, sensor noise, blur, lighting, and all of them
   together ("real"). Each split is a `datasets.Dataset` of images and label maps, drawn from fixed seeds.
3. For each method, with the same decoder (UperNet over a `Dinov2Backbone` fed by 4 layers), steps, batches and
   optimiser (AdamW, poly schedule): the frozen backbone + decoder, PEFT LoRA, full fine-tuning, Rein full-rank and
   Rein with lora_dim=16. Reports mIoU (`evaluate`'s mean IoU) on held-out source images and on each target style,
   the mean over targets, trainable parameters and train time, over 3 seeds (mean and standard deviation), and,
   since every target style redraws the source's held-out scenes, how similar the features the decoder reads are
   for the same scene in the source and in a target style.
   mIoU and per-class IoU come from `rein_peft.evaluation.evaluate_segmentation` (the protocol's sliding window),
   and the first seed's predictions of a few scenes per split are drawn in a picture.
4. Before any method is compared, Rein's premise is checked and printed: for each unseen style, the cosine
   similarity of the frozen foundation's deepest features for the same scenes in the source and that style (the
   gate: at least 0.8 for every style), and, against collapse, the frozen backbone + decoder's source mIoU (at least
   85). The frozen method runs first; its first seed is that check.
5. Writes a JSON of every number (with `"premise"` and `"premise_gate"`, and the premise during pretraining), a PNG
   chart, a picture of the predictions and one of the styles (matplotlib, from the `bench` extra).

    python benchmarks/domain_generalization.py            # the miniature: about 30 minutes on 2 CPU cores
    python benchmarks/domain_generalization.py --quick    # a smoke run of the pipeline (seconds; numbers mean nothing)
    python benchmarks/domain_generalization.py --foundation mae+invariance   # a style-invariant foundation (below)
    python benchmarks/domain_generalization.py --foundation vicreg   # the foundation that has Rein's premise (below)
    python benchmarks/domain_generalization.py --segmenter official   # the official Rein segmenter (Mask2Former)
    python benchmarks/domain_generalization.py --backbone facebook/dinov2-small --device cuda \\
        --image_size 224 --source ./gtav --target cityscapes=./cityscapes --target bdd=./bdd100k --num_labels 19

`--backbone` takes any DINOv2 checkpoint (Hub name or folder) instead of the miniature one; `--source` and `--target`
take `datasets` folders written by `save_to_disk` or Hub datasets, with an `image` column and a `label` column of
label maps (ignore index 255); a dataset dict's "train" split is trained on and "validation" split (or the whole
dataset) is evaluated.

`--foundation mae+invariance` pretrains the miniature backbone on pairs of random styles of each scene, pulling the
encoder's tokens of the two together (still without labels, the way DINOv2's colour-jittered views teach it to ignore
colour): the investigation of why, with the plain MAE foundation, no method generalizes better than another. It
did not give a stronger foundation (docs/domain-generalization.md).

`--foundation vicreg` pretrains it self-supervised, still without labels, so that its frozen features hold across
styles (`pretrain_vicreg`: a whole scene and a masked crop of it in another random style, their patch tokens pulled
together, VICReg's variance and covariance terms against collapse): the miniature in which Rein's premise holds.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import datasets
import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image, ImageFilter
from torch import nn
from transformers import (
    AutoImageProcessor,
    BitImageProcessorPil,
    Dinov2Backbone,
    Dinov2Config,
    Dinov2Model,
    Mask2FormerConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    ViTMAEConfig,
    ViTMAEForPreTraining,
)

import rein_peft
from rein_peft import protocol
from rein_peft.compat import silence_peft_deprecations
from rein_peft.evaluation import evaluate_segmentation
from rein_peft.extras import require
from rein_peft.official import BACKBONE_MODULE, HEAD_MODULES, apply_method, mask_targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ("sky", "building", "road", "vegetation", "vehicle")
SKY, BUILDING, ROAD, VEGETATION, VEHICLE = range(len(CLASS_NAMES))

# --- scenes: one layout, drawn in any style --------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    labels: np.ndarray  # [H, W] class ids
    instances: np.ndarray  # [H, W] instance ids; instance k has class instance_classes[k]
    instance_classes: tuple[int, ...]


def draw_layout(rng: np.random.Generator, side: int) -> Layout:
    """A street: sky above a horizon, road below, buildings standing on the horizon, trees in front of them, and
    vehicles on the road that grow with nearness (lower in the image). Later shapes cover earlier ones."""
    rows, cols = np.mgrid[0:side, 0:side]
    instances = np.zeros((side, side), dtype=np.int32)
    classes = [SKY]
    horizon = int(rng.uniform(0.35, 0.55) * side)

    def paint(mask: np.ndarray, class_id: int) -> None:
        instances[mask] = len(classes)
        classes.append(class_id)

    paint(rows >= horizon, ROAD)
    for _ in range(int(rng.integers(2, 6))):
        width = int(rng.uniform(0.12, 0.35) * side)
        left = int(rng.integers(-width // 2, side - width // 2))
        top = int(rng.uniform(0.08, 0.8) * horizon)
        base = horizon + int(rng.integers(1, 4))
        paint((cols >= left) & (cols < left + width) & (rows >= top) & (rows < base), BUILDING)
    for _ in range(int(rng.integers(0, 4))):
        radius = rng.uniform(0.06, 0.14) * side
        center_col, center_row = rng.uniform(0, side), horizon - radius * rng.uniform(0.6, 1.2)
        crown = (cols - center_col) ** 2 + ((rows - center_row) / 1.2) ** 2 <= radius**2
        trunk = (np.abs(cols - center_col) <= max(1.0, radius / 5)) & (rows >= center_row) & (rows < horizon + 2)
        paint(crown | trunk, VEGETATION)
    bottoms = np.sort(rng.uniform(horizon + 0.12 * side, side + 0.05 * side, size=int(rng.integers(1, 5))))
    for bottom in bottoms:  # far (high) vehicles first: near ones cover them
        nearness = (bottom - horizon) / (side - horizon)
        width = (0.18 + 0.22 * nearness) * side * rng.uniform(0.8, 1.2)
        height = width * rng.uniform(0.4, 0.6)
        left = rng.uniform(-0.2 * width, side - 0.8 * width)
        body = (cols >= left) & (cols < left + width) & (rows >= bottom - height) & (rows < bottom)
        cabin = (cols >= left + 0.2 * width) & (cols < left + 0.75 * width) & (rows >= bottom - 1.5 * height)
        paint(body | (cabin & (rows < bottom - height)), VEHICLE)
    instance_classes = tuple(classes)
    return Layout(np.asarray(instance_classes)[instances].astype(np.uint8), instances, instance_classes)


@dataclass(frozen=True)
class Style:
    """How a layout is drawn. Colors are RGB in [0, 1], one per class (`None`: a random color per instance)."""

    colors: tuple[tuple[float, float, float] | None, ...]
    instance_jitter: float = 0.04  # per-instance color spread
    textures: tuple[str, ...] = ("flat",) * len(CLASS_NAMES)  # flat, stripes, checker, blotches, grain, gradient
    texture_strength: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shadow: float = 0.0  # a left-to-right lighting gradient of this depth
    blur: float = 0.0  # Gaussian blur radius, in pixels
    noise: float = 0.0  # sensor noise standard deviation


SYNTHETIC_COLORS = ((0.35, 0.6, 0.95), (0.62, 0.58, 0.52), (0.3, 0.3, 0.33), (0.2, 0.62, 0.22), (0.85, 0.12, 0.12))
REAL_COLORS = ((0.78, 0.8, 0.83), (0.55, 0.33, 0.27), (0.47, 0.46, 0.43), (0.3, 0.36, 0.16), None)
REAL_TEXTURES = ("gradient", "checker", "grain", "blotches", "stripes")
SOURCE_STYLE = "synthetic"
STYLES = {
    SOURCE_STYLE: Style(SYNTHETIC_COLORS),
    "texture": Style(SYNTHETIC_COLORS, textures=REAL_TEXTURES, texture_strength=0.22),
    "palette": Style(REAL_COLORS, instance_jitter=0.08),
    "noise": Style(SYNTHETIC_COLORS, noise=0.1),
    "blur": Style(SYNTHETIC_COLORS, blur=1.5),
    "lighting": Style(SYNTHETIC_COLORS, brightness=0.6, contrast=0.7, color_cast=(1.1, 0.9, 0.7), shadow=0.5),
    "real": Style(
        REAL_COLORS, 0.08, REAL_TEXTURES, 0.18, 0.8, 0.85, (1.05, 0.97, 0.9), shadow=0.3, blur=0.8, noise=0.04
    ),
}
TEXTURE_KINDS = ("flat", "stripes", "checker", "blotches", "grain", "gradient")


def texture_field(kind: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """A `[H, W]` pattern in about [-1, 1]."""
    rows, cols = np.mgrid[0:side, 0:side] / side
    if kind == "flat":
        return np.zeros((side, side))
    if kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.04, 0.15)
        return np.sin(2 * math.pi * (cols * math.cos(angle) + rows * math.sin(angle)) / period)
    if kind == "checker":
        period = rng.uniform(0.05, 0.15)
        return np.sign(np.sin(2 * math.pi * cols / period) * np.sin(2 * math.pi * rows / period))
    if kind == "blotches":  # smooth noise: a coarse random grid, upsampled
        coarse = Image.fromarray(rng.uniform(-1, 1, size=(6, 6)).astype(np.float32))
        return np.asarray(coarse.resize((side, side), Image.BICUBIC)).astype(np.float64)
    if kind == "grain":
        return rng.uniform(-1, 1, size=(side, side))
    if kind == "gradient":
        return 1 - 2 * rows
    raise ValueError(f"Unknown texture {kind!r}; use one of {TEXTURE_KINDS}.")


def render(layout: Layout, style: Style, rng: np.random.Generator) -> Image.Image:
    side = layout.labels.shape[0]
    palette = np.empty((len(layout.instance_classes), 3))
    for instance, class_id in enumerate(layout.instance_classes):
        base = style.colors[class_id]
        palette[instance] = rng.uniform(0.05, 0.95, size=3) if base is None else base
    palette += rng.normal(0, style.instance_jitter, size=palette.shape)
    pixels = palette[layout.instances]  # [H, W, 3]
    if style.texture_strength:
        for class_id, kind in enumerate(style.textures):
            mask = layout.labels == class_id
            if mask.any() and kind != "flat":
                tint = rng.uniform(0.5, 1.0, size=3)
                pixels[mask] += style.texture_strength * texture_field(kind, rng, side)[mask][:, None] * tint
    pixels = (pixels - 0.5) * style.contrast + 0.5
    lighting = style.brightness * (1 - style.shadow * np.linspace(0, 1, side)[None, :, None])
    if rng.random() < 0.5:
        lighting = lighting[:, ::-1]
    pixels = pixels * lighting * np.asarray(style.color_cast)
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    if style.blur:
        image = image.filter(ImageFilter.GaussianBlur(style.blur))
    if style.noise:
        noisy = np.asarray(image) / 255 + rng.normal(0, style.noise, size=(side, side, 3))
        image = Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8))
    return image


def random_style(rng: np.random.Generator) -> Style:
    """The foundation data: every image in a style of its own (colors, textures, lighting, blur, noise)."""
    return Style(
        colors=tuple(tuple(rng.uniform(0.05, 0.95, size=3)) if rng.random() < 0.8 else None for _ in CLASS_NAMES),
        instance_jitter=rng.uniform(0, 0.1),
        textures=tuple(str(rng.choice(TEXTURE_KINDS)) for _ in CLASS_NAMES),
        texture_strength=rng.uniform(0, 0.3),
        brightness=rng.uniform(0.5, 1.2),
        contrast=rng.uniform(0.6, 1.2),
        color_cast=tuple(rng.uniform(0.75, 1.25, size=3)),
        shadow=rng.uniform(0, 0.6),
        blur=float(rng.choice([0.0, rng.uniform(0.3, 1.8)])),
        noise=float(rng.choice([0.0, rng.uniform(0.01, 0.12)])),
    )


def scenes(style: Style | None, num_images: int, seed: int, side: int, variant: int = 0) -> datasets.Dataset:
    """`num_images` scenes in `style` (`None`: a random style per image) as a dataset of images and label maps. The
    layouts depend on `seed` alone: the same seed draws the same scenes in every style, and each `variant` draws
    other random styles (and texture, noise) for them."""
    layout_rng = np.random.default_rng([seed, 0])
    style_rng = np.random.default_rng([seed, 1] if variant == 0 else [seed, 1, variant])
    images, label_maps = [], []
    for _ in range(num_images):
        layout = draw_layout(layout_rng, side)
        images.append(render(layout, style or random_style(style_rng), style_rng))
        label_maps.append(Image.fromarray(layout.labels))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": label_maps}, features=features)


# --- the "foundation" backbone: masked-image modelling on scenes in random styles, stored as a DINOv2 checkpoint -----


@dataclass(frozen=True)
class BackboneRecipe:
    side: int = 64
    patch: int = 8
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    mlp: int = 512
    images: int = 20000  # scenes in random styles, drawn once
    steps: int = 4000
    batch: int = 64
    lr: float = 1.5e-3
    mask_ratio: float = 0.75
    seed: int = 0
    # > 0: each step also shows the same scenes in a second random style, and the encoder's last-layer tokens of the
    # two are pulled together (weight of 1 - cosine similarity): labels are never used, the pairs are like the
    # colour and blur augmentations that DINOv2's views differ by
    invariance: float = 0.0
    # "mae": masked-image modelling (above); "vicreg": variance-invariance-covariance across styles (`pretrain_vicreg`)
    objective: str = "mae"
    projector: int = 512  # vicreg: the expander's width
    crop_patches: int = 6  # vicreg: the second view's crop, in patches a side (the first view is the whole scene)
    weight_decay: float = 0.05

    def fingerprint(self) -> str:
        """A hash of the recipe and of the code that draws the scenes and trains, naming the cached checkpoint."""
        drawing = (draw_layout, render, random_style, texture_field, scenes)
        code = "".join(inspect.getsource(function) for function in drawing)
        code += inspect.getsource(pretrain_backbone) + inspect.getsource(mae_to_dinov2)
        if self.objective == "vicreg":
            code += "".join(inspect.getsource(part) for part in (pretrain_vicreg, variance_covariance, premise_of))
        return hashlib.sha256((json.dumps(asdict(self), sort_keys=True) + code).encode()).hexdigest()[:12]


def image_tensor(images: list[Image.Image]) -> torch.Tensor:
    """`[N, 3, H, W]` uint8."""
    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)


def pretrain_backbone(recipe: BackboneRecipe, processor: BitImageProcessorPil, log_every: int = 500) -> nn.Module:
    """`ViTMAEForPreTraining` (75% of patches masked, normalised-pixel loss) on `recipe.images` random-style scenes;
    with `recipe.invariance`, on pairs of styles of each scene, both masked alike, plus the cross-style term."""
    torch.manual_seed(recipe.seed)
    config = ViTMAEConfig(
        image_size=recipe.side,
        patch_size=recipe.patch,
        hidden_size=recipe.hidden,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        intermediate_size=recipe.mlp,
        decoder_hidden_size=64,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=256,
        mask_ratio=recipe.mask_ratio,
        norm_pix_loss=True,
    )
    model = ViTMAEForPreTraining(config)
    pool_seed = 1000 + recipe.seed  # other layouts than the task's (seeds 1 and 100)
    pool = image_tensor(scenes(None, recipe.images, pool_seed, recipe.side)["image"])
    if recipe.invariance:
        other_styles = image_tensor(scenes(None, recipe.images, pool_seed, recipe.side, variant=1)["image"])
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
    )
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / recipe.steps)))
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for step in range(recipe.steps):
        indices = torch.randint(len(pool), (recipe.batch,), generator=generator)
        flip = torch.rand(recipe.batch, generator=generator) < 0.5
        views = [pool[indices]] + ([other_styles[indices]] if recipe.invariance else [])
        pixel_values = []
        for view in views:
            view = view.float() / 255
            view[flip] = view[flip].flip(-1)
            pixel_values.append((view - mean) / std)
        if not recipe.invariance:
            loss = model(pixel_values=pixel_values[0]).loss
        else:
            noise = torch.rand(recipe.batch, (recipe.side // recipe.patch) ** 2)  # both views keep the same patches
            outputs = [model(pixel_values=view, noise=noise, output_hidden_states=True) for view in pixel_values]
            tokens = [output.hidden_states[-1] for output in outputs]  # [B, 1 + kept patches, C], before the norm
            # centred over the batch: a direction shared by every token (which alone made the uncentred term
            # vanish, all features collapsing onto it) cannot satisfy it
            tokens = [token - token.mean(dim=(0, 1), keepdim=True) for token in tokens]
            cross_style = 1 - nn.functional.cosine_similarity(*tokens, dim=-1).mean()
            loss = (outputs[0].loss + outputs[1].loss) / 2 + recipe.invariance * cross_style
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        if (step + 1) % log_every == 0:
            print(f"  pretraining step {step + 1}/{recipe.steps}: loss {loss.item():.3f}", flush=True)
    return model


def mae_to_dinov2(mae: ViTMAEForPreTraining) -> Dinov2Model:
    """The MAE encoder as a DINOv2 model: the same pre-norm blocks (layer scale 1, no mask token used), so that
    `Dinov2Backbone` and every DINOv2 code path load it like any DINOv2 checkpoint."""
    config = mae.config
    dinov2 = Dinov2Model(
        Dinov2Config(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            mlp_ratio=config.intermediate_size // config.hidden_size,  # the recipe keeps it a whole multiple
            image_size=config.image_size,
            patch_size=config.patch_size,
            layer_norm_eps=config.layer_norm_eps,
            layerscale_value=1.0,
        )
    )
    renames = {"vit.": "", "layers.": "encoder.layer.", "layernorm_before": "norm1", "layernorm_after": "norm2"}
    state = {}
    for name, tensor in mae.state_dict().items():
        if name.startswith("vit."):
            for old, new in renames.items():
                name = name.replace(old, new)
            state[name] = tensor
    missing, unexpected = dinov2.load_state_dict(state, strict=False)
    if unexpected or any("layer_scale" not in name and name != "embeddings.mask_token" for name in missing):
        raise RuntimeError(f"MAE -> DINOv2 conversion: unexpected {unexpected}, missing {missing}")
    return dinov2


def variance_covariance(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's two terms against collapse, over `[N, D]` embeddings: the hinge on each dimension's standard
    deviation (below 1 costs), and the squared off-diagonal covariances (redundant dimensions cost)."""
    centred = embeddings - embeddings.mean(dim=0)
    variance = nn.functional.relu(1 - torch.sqrt(centred.var(dim=0) + 1e-4)).mean()
    covariance = (centred.T @ centred) / (len(embeddings) - 1)  # [D, D]
    off_diagonal = covariance - torch.diag(torch.diagonal(covariance))
    return variance, off_diagonal.pow(2).sum() / embeddings.shape[1]


def premise_of(backbone: Dinov2Model, style_images: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each target style, the mean cosine similarity over patches of the last layer's outputs (before the final
    norm: the deepest features the decoder reads) for the same scenes in the source style and in that style.
    `style_images` holds normalised `[N, 3, H, W]` pixels per style, the source's first."""
    backbone.eval()
    with torch.no_grad():
        features = {
            name: backbone(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
            for name, pixels in style_images.items()
        }  # [N, patches, C]
    source, *targets = features
    return {
        name: nn.functional.cosine_similarity(features[source], features[name], dim=-1).mean().item()
        for name in targets
    }


def pretrain_vicreg(
    recipe: BackboneRecipe, processor: BitImageProcessorPil, log_every: int = 125
) -> tuple[Dinov2Model, list[dict]]:
    """Self-supervised, without labels: VICReg's objective on patch tokens. One view is a whole scene in a random
    style; the other is a crop of the same scene drawn in another random style, with some patches masked. Each
    patch of the crop is pulled (mean squared error, weight 25) towards the same place in the whole view, through a
    shared expander; the variance hinge (weight 25) and the covariance term (weight 1) keep the embeddings from
    collapsing. The crop's position embeddings are interpolated to its own grid, so a patch's place in the scene
    cannot stand in for its content.

    Returns the backbone and the premise (`premise_of`, on 100 scenes outside the pretraining pool and the task)
    every `log_every` steps: how the invariance grows with pretraining compute."""
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
            premise = premise_of(backbone, probe)
            curve.append({"step": step + 1, "loss": loss.item(), "premise": premise})
            print(
                f"  pretraining step {step + 1}/{recipe.steps}: loss {loss.item():.3f} (invariance "
                f"{invariance.item():.3f}, variance {variance.item():.3f}), premise "
                + " ".join(f"{name} {value:.2f}" for name, value in premise.items()),
                flush=True,
            )
    return backbone, curve


def build_backbone(recipe: BackboneRecipe, cache_dir: str) -> str:
    """The folder of the pretrained miniature backbone (a DINOv2 checkpoint with its image processor), built on first
    use and then read from `cache_dir`."""
    folder = os.path.join(cache_dir, f"{recipe.objective}-vit-{recipe.fingerprint()}")
    if os.path.isfile(os.path.join(folder, "recipe.json")):
        return folder
    print(f"building the foundation backbone (once, cached in {folder})", flush=True)
    start = time.perf_counter()
    processor = BitImageProcessorPil(size={"height": recipe.side, "width": recipe.side}, do_center_crop=False)
    if recipe.objective == "vicreg":
        backbone, curve = pretrain_vicreg(recipe, processor)
    else:
        backbone, curve = mae_to_dinov2(pretrain_backbone(recipe, processor)), []
    backbone.save_pretrained(folder)
    processor.save_pretrained(folder)
    with open(os.path.join(folder, "recipe.json"), "w") as file:  # written last: its presence marks a complete build
        json.dump({**asdict(recipe), "seconds": time.perf_counter() - start, "premise_curve": curve}, file, indent=2)
    return folder


# --- the task: data, models, training, evaluation --------------------------------------------------------------------

METHODS = ("frozen", "lora", "full", "rein", "rein_lora16")
METHOD_NAMES = {
    "frozen": "frozen backbone + decoder",
    "lora": "PEFT LoRA (r=16, q/v)",
    "full": "full fine-tuning",
    "rein": "Rein (full-rank tokens)",
    "rein_lora16": "Rein (lora_dim=16)",
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
}
MINIATURE_OFFICIAL_DECODER = {
    "encoder_layers": 2,
    "num_decoder_layers": 3,
    "num_queries": 16,
    "train_num_points": 1024,
}


@dataclass
class Task:
    """What is trained on and measured: a train split, a held-out source split, and one split per target style."""

    train: datasets.Dataset
    source: datasets.Dataset
    targets: dict[str, datasets.Dataset]
    num_labels: int
    class_names: list[str] = field(default_factory=list)
    paired: bool = False  # each target holds the source's held-out scenes, in order, drawn in another style


def miniature_task(train_images: int, eval_images: int, side: int) -> Task:
    # the held-out scenes are the same layouts in every style: only the style differs between source and targets
    targets = {name: scenes(style, eval_images, 100, side) for name, style in STYLES.items()}
    source = targets.pop(SOURCE_STYLE)
    train = scenes(STYLES[SOURCE_STYLE], train_images, 1, side)
    return Task(train, source, targets, len(CLASS_NAMES), list(CLASS_NAMES), paired=True)


def load_any_dataset(path_or_name: str) -> datasets.Dataset | datasets.DatasetDict:
    if os.path.isdir(path_or_name):  # written by `save_to_disk`
        return datasets.load_from_disk(path_or_name)
    return datasets.load_dataset(path_or_name)


def split_of(dataset: datasets.Dataset | datasets.DatasetDict, name: str, where: str) -> datasets.Dataset:
    if isinstance(dataset, datasets.Dataset):
        return dataset
    if name in dataset:
        return dataset[name]
    if len(dataset) == 1:
        return next(iter(dataset.values()))
    raise SystemExit(f"{where} has no {name!r} split (splits: {list(dataset)}); save that split alone or rename it.")


def user_task(args: argparse.Namespace) -> Task:
    source = load_any_dataset(args.source)
    if isinstance(source, datasets.DatasetDict) and "validation" in source:
        train, held_out = split_of(source, "train", args.source), source["validation"]
    else:
        parts = split_of(source, "train", args.source).train_test_split(test_size=0.1, seed=0)
        train, held_out = parts["train"], parts["test"]
    targets = {}
    for spec in args.target:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--target takes NAME=DATASET (e.g. cityscapes=./cityscapes), got {spec!r}.")
        targets[name] = split_of(load_any_dataset(path), "validation", path)
    if args.num_labels is None:
        raise SystemExit("--num_labels is required with --source (the number of classes, without the ignore index).")
    return Task(train, held_out, targets, args.num_labels, [f"class {index}" for index in range(args.num_labels)])


def pixel_batches(dataset: datasets.Dataset, processor, side: int, config: UperNetConfig) -> datasets.Dataset:
    """The dataset read as model inputs (`rein_peft.protocol.resize_transform`): images resized to `side` and
    normalised by the backbone's processor, label maps resized with nearest neighbour and checked."""
    return dataset.with_transform(protocol.resize_transform(processor, side, config))


def segmenter_config(
    backbone_path: str, task: Task, decoder_channels: int, official: bool = False, miniature: bool = True
) -> UperNetConfig | Mask2FormerConfig:
    """UperNet over a `Dinov2Backbone` shaped like the checkpoint, fed by the outputs of 4 evenly spaced layers
    without the final norm, as the official Rein features are taken; or (`official`) the official Rein segmenter,
    its decoder `decoder_channels` wide and shallower on the `miniature` backbone."""
    if official:
        # one width; the feed-forward widths follow at the official ratios (8x in the decoder, 4x in the pixel decoder)
        scaled_down = {**MINIATURE_OFFICIAL_DECODER, "hidden_dim": decoder_channels} if miniature else {}
        labels = {"id2label": dict(enumerate(task.class_names))} if task.class_names else {}
        return rein_peft.official_segmenter_config(backbone_path, task.num_labels, **labels, **scaled_down)
    backbone_config = protocol.dinov2_backbone_config(backbone_path)
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


@torch.no_grad()
def feature_similarity(
    model: nn.Module, source: datasets.Dataset, target: datasets.Dataset, device: str, batch_size: int = 50
) -> float:
    """Mean cosine similarity, over patches, between the deepest features the decoder reads for the same scenes drawn
    in the source style and in a target style: 1.0 means that the backbone, as trained, does not see the style."""
    backbone = backbone_of(model)
    backbone.eval()
    similarities = []
    for start in range(0, len(source), batch_size):
        features = [
            backbone(pixel_values=split[start : start + batch_size]["pixel_values"].to(device)).feature_maps[-1]
            for split in (source, target)
        ]  # two [B, C, h, w]
        similarities.append(nn.functional.cosine_similarity(*features, dim=1).flatten())
    return torch.cat(similarities).mean().item()


# --- the benchmark ---------------------------------------------------------------------------------------------------

REAL_IMAGE_SIZE = 224  # for a checkpoint named by --backbone, unless --image_size says otherwise
QUICK = {"train_images": 64, "eval_images": 16, "steps": 4, "batch_size": 8, "seeds": [0], "pictures": 2}
# Rein's premise, as the gate checks it before the methods are compared: the frozen foundation's deepest features of
# the same scenes in the source and every target style at least this similar, and (no collapse) the frozen backbone
# plus decoder at least this good on the source
PREMISE_MIN_COSINE, PREMISE_MIN_SOURCE_MIOU = 0.8, 0.85
QUICK_RECIPE = BackboneRecipe(hidden=32, layers=2, heads=2, mlp=64, images=64, steps=4, batch=16)
# the investigation of the default's outcome: a foundation whose features are pulled towards style invariance, from 32
# scenes in 2 styles a step (the default's 64 images a step)
FOUNDATIONS = {
    "mae": BackboneRecipe(),
    "mae+invariance": BackboneRecipe(batch=32, invariance=1.0),
    # Rein's premise, made here: invariance across styles without labels (`pretrain_vicreg`), 1,000 steps of 64 scenes
    "vicreg": BackboneRecipe(objective="vicreg", steps=1000, lr=1e-3, mask_ratio=0.3),
}


@dataclass(frozen=True)
class Evaluation:
    """The protocol's evaluation (`rein_peft.evaluation.evaluate_segmentation`): images resized to `side` (keeping
    their aspect ratio; the miniature's are already `side`), sliding-window class scores over crops of `side` every
    two thirds of it (the official 512 / 341), mIoU and per-class IoU against the label maps at their own size."""

    processor: BitImageProcessorPil
    side: int
    resize: bool
    device: str

    def __call__(self, model: nn.Module, split: datasets.Dataset, pictures: int = 0) -> dict:
        return evaluate_segmentation(
            model,
            split,
            self.processor.image_mean,
            self.processor.image_std,
            test_size=(self.side, self.side) if self.resize else None,
            crop_size=self.side,
            stride=max(1, 2 * self.side // 3),
            device=self.device,
            predictions_of=range(pictures),
        )


def run_one(
    method: str,
    seed: int,
    config: UperNetConfig,
    backbone_path: str,
    task: Task,
    data: dict,
    evaluation: Evaluation,
    args: argparse.Namespace,
) -> dict:
    """Trains `method` from `seed` and evaluates it; the first `args.pictures` predictions of every split are under
    `"predictions"` (images, label maps and predicted maps, for the pictures; not written to the JSON)."""
    model = prepare(segmenter(config, backbone_path, seed), method, seed).to(args.device)
    trainable = {name: param.numel() for name, param in model.named_parameters() if param.requires_grad}
    decoder = HEAD_MODULES if isinstance(config, Mask2FormerConfig) else [DECODER]
    seconds = train(model, method, data["train"], args, seed)
    scores = {"source": evaluation(model, task.source, args.pictures)}
    scores.update({name: evaluation(model, split, args.pictures) for name, split in task.targets.items()})
    targets = {name: scores[name]["mean_iou"] for name in task.targets}
    similarity = {}
    if task.paired:
        for name, split in data["targets"].items():
            similarity[name] = feature_similarity(model, data["source"], split, args.device)
    return {
        "method": method,
        "seed": seed,
        "trainable_params": sum(trainable.values()),
        "trainable_backbone_params": sum(
            count for name, count in trainable.items() if not any(module in name for module in decoder)
        ),
        "train_seconds": seconds,
        "source_miou": scores["source"]["mean_iou"],
        "target_miou": targets,
        "target_mean_miou": statistics.fmean(targets.values()) if targets else float("nan"),
        # per class, in `class_names` order; None: a class neither in the labels nor in the predictions
        "per_class_iou": {name: score["per_category_iou"] for name, score in scores.items()},
        "feature_similarity": similarity,
        "predictions": {name: score["predictions"] for name, score in scores.items()},
    }


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[dict], methods: list[str], target_names: list[str]) -> dict:
    """Mean and standard deviation over seeds of every figure, per method."""
    summary = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        summary[method] = {
            "trainable_params": mine[0]["trainable_params"],
            "trainable_backbone_params": mine[0]["trainable_backbone_params"],
            "train_seconds": spread([run["train_seconds"] for run in mine]),
            "source_miou": spread([run["source_miou"] for run in mine]),
            "target_miou": {name: spread([run["target_miou"][name] for run in mine]) for name in target_names},
            "target_mean_miou": spread([run["target_mean_miou"] for run in mine]),
            "feature_similarity": {
                name: spread([run["feature_similarity"][name] for run in mine])
                for name in mine[0]["feature_similarity"]
            },
            # per class (`class_names` order): IoU on the source, and its mean over the target styles
            "source_per_class_iou": _per_class_spread([[run["per_class_iou"]["source"]] for run in mine]),
            "target_per_class_iou": _per_class_spread(
                [[run["per_class_iou"][name] for name in target_names] for run in mine]
            ),
        }
    return summary


def _per_class_spread(per_run: list[list[list[float | None]]]) -> list[dict | None]:
    """Per class, the spread over runs of each run's mean over its splits (a class absent from a split is left out;
    `None` where it is absent from every split)."""
    classes = []
    for class_index in range(len(per_run[0][0])):
        means = []
        for splits in per_run:
            values = [split[class_index] for split in splits if split[class_index] is not None]
            if values:
                means.append(statistics.fmean(values))
        classes.append(spread(means) if means else None)
    return classes


def print_table(result: dict) -> None:
    """The results as Markdown tables: mIoU per method, and (for paired styles) the feature similarity."""
    targets, summary = result["target_names"], result["summary"]
    if result["premise"]:
        print_premise(result["premise"], result["premise_gate"], result["premise_other_scenes"])
    print(f"\nmIoU (%) trained on {result['source_name']!r}, mean ± std over seeds {result['settings']['seeds']}\n")
    _markdown_row(["method", "trainable (backbone)", "source", *targets, "target mean", "train s"])
    _markdown_row(["---"] * (len(targets) + 5))
    for method, row in summary.items():
        cells = [METHOD_NAMES[method], f"{row['trainable_params']:,} ({row['trainable_backbone_params']:,})"]
        cells += [_percent(row["source_miou"]), *(_percent(row["target_miou"][name]) for name in targets)]
        _markdown_row([*cells, _percent(row["target_mean_miou"]), f"{row['train_seconds']['mean']:.0f}"])
    if any(row["feature_similarity"] for row in summary.values()):
        print("\ncosine similarity of the deepest decoder input, same scenes in source vs target style (mean)\n")
        _markdown_row(["method", *targets])
        _markdown_row(["---"] * (len(targets) + 1))
        for method, row in summary.items():
            similarity = row["feature_similarity"]
            _markdown_row([METHOD_NAMES[method], *(f"{similarity[name]['mean']:.3f}" for name in targets)])
    print("\nIoU (%) per class, mean over the target styles (the source in brackets)\n")
    _markdown_row(["method", *result["class_names"]])
    _markdown_row(["---"] * (len(result["class_names"]) + 1))
    for method, row in summary.items():
        cells = [
            f"{_percent(target)} ({100 * source['mean']:.1f})" if target and source else "-"
            for target, source in zip(row["target_per_class_iou"], row["source_per_class_iou"], strict=True)
        ]
        _markdown_row([METHOD_NAMES[method], *cells])


def print_premise(premise: dict[str, float], gate: dict, other_scenes: float) -> None:
    """The frozen foundation's cosine similarities, and whether they and the frozen source mIoU pass the gate."""
    print("\npremise: the frozen foundation's deepest features, same scenes in source vs target style (cosine)\n")
    _markdown_row([*premise, "other scenes, same style"])
    _markdown_row(["---"] * (len(premise) + 1))
    _markdown_row([*(f"{value:.3f}" for value in premise.values()), f"{other_scenes:.3f}"])
    source = gate["frozen_source_miou"]
    print(
        f"\ngate: every style >= {gate['min_cosine']} ({'met' if gate['cosine_met'] else 'NOT met'}, lowest "
        f"{min(premise.values()):.3f}); frozen backbone + decoder >= {100 * gate['min_source_miou']:.0f} mIoU on the "
        + (
            f"source ({'met' if gate['source_miou_met'] else 'NOT met'}, {100 * source:.1f})"
            if source is not None
            else "source (not measured: the frozen method was not run)"
        ),
        flush=True,
    )


def _markdown_row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |")


def _percent(figure: dict) -> str:
    return f"{100 * figure['mean']:.1f} ± {100 * figure['std']:.1f}"


LABEL_COLORS = np.array([[70, 130, 240], [150, 140, 120], [80, 80, 80], [40, 160, 40], [220, 30, 30]], np.uint8)


def preview_styles(path: str, num_scenes: int = 6, side: int = 64) -> None:
    """One row per style of the same held-out scenes, and their label maps below."""
    rows = []
    for style in STYLES.values():
        rows.append(np.concatenate([np.asarray(image) for image in scenes(style, num_scenes, 100, side)["image"]], 1))
    labels = scenes(STYLES[SOURCE_STYLE], num_scenes, 100, side)["label"]
    rows.append(np.concatenate([LABEL_COLORS[np.asarray(label)] for label in labels], 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def prediction_picture(pictures: dict[str, dict[str, dict]], path: str, tile: int = 64) -> None:
    """The first seed's predictions: a row per split (the source, then each target), and for each pictured scene
    its image, its label map, then each method's prediction (columns in the order of `pictures`)."""

    def colored(label_map: np.ndarray) -> np.ndarray:  # classes past the palette cycle through it; ignored: black
        label_map = np.asarray(label_map).astype(np.int64)
        pixels = LABEL_COLORS[label_map % len(LABEL_COLORS)]
        pixels[label_map == 255] = 0
        return np.asarray(Image.fromarray(pixels).resize((tile, tile), Image.NEAREST))

    rows = []
    for split, examples in next(iter(pictures.values())).items():
        tiles = []
        for index, (image, label, _) in sorted(examples.items()):
            tiles.append(np.asarray(image.convert("RGB").resize((tile, tile), Image.BILINEAR)))
            tiles += [colored(label), *(colored(pictures[method][split][index][2]) for method in pictures)]
            tiles.append(np.full((tile, tile // 4, 3), 255, np.uint8))  # a gap between scenes
        rows.append(np.concatenate(tiles, 1))
    grid = Image.fromarray(np.concatenate(rows, 0))
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["source", *result["target_names"], "target mean"]
    premise, curve = result["premise"], (result["pretraining"] or {}).get("premise_curve", [])
    panels = 1 + bool(premise) + bool(curve)
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=(2 + 1.3 * len(columns) + 4 * (panels - 1), 4.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [3] + [1.2] * (panels - 1)},
    )
    axis = axes[0, 0]
    width = 0.8 / len(result["summary"])
    for index, (method, row) in enumerate(result["summary"].items()):
        figures = [row["source_miou"], *(row["target_miou"][name] for name in result["target_names"])]
        figures.append(row["target_mean_miou"])
        positions = np.arange(len(columns)) + (index - (len(result["summary"]) - 1) / 2) * width
        axis.bar(
            positions,
            [100 * figure["mean"] for figure in figures],
            width,
            yerr=[100 * figure["std"] for figure in figures],
            capsize=2,
            label=f"{METHOD_NAMES[method]} ({row['trainable_backbone_params']:,} backbone params)",
        )
    axis.set_xticks(np.arange(len(columns)), columns)
    axis.set_ylabel("mIoU (%)")
    axis.set_title(f"Trained on '{result['source_name']}', evaluated on unseen styles ({result['backbone']})")
    axis.legend(fontsize=7, loc="lower left")
    if premise:  # the frozen foundation's cosine similarities, and the gate
        axis = axes[0, 1]
        axis.bar(list(premise), list(premise.values()), color="gray")
        axis.axhline(result["premise_gate"]["min_cosine"], color="black", linestyle="--", linewidth=1)
        axis.set_ylim(0, 1)
        axis.set_title("premise: frozen features, source vs style (cosine)", fontsize=9)
        axis.tick_params(axis="x", labelrotation=45)
    if curve:  # how it grew with pretraining
        axis = axes[0, -1]
        for name in curve[0]["premise"]:
            axis.plot(
                [point["step"] for point in curve], [point["premise"][name] for point in curve], "o-", label=name
            )
        axis.axhline(result["premise_gate"]["min_cosine"], color="black", linestyle="--", linewidth=1)
        axis.set_xlabel("pretraining step")
        axis.set_ylim(0, 1)
        axis.set_title("premise during pretraining (other scenes)", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> tuple[dict, dict]:
    """The benchmark: the results (the JSON's), and the first seed's predictions per method and split (pictures)."""
    recipe = QUICK_RECIPE if args.quick else FOUNDATIONS[args.foundation]
    if args.quick:  # the foundation's objective, on the quick recipe's sizes
        foundation = FOUNDATIONS[args.foundation]
        recipe = replace(recipe, invariance=foundation.invariance, objective=foundation.objective)
    if args.quick and args.segmenter == "official":  # the official pyramid takes 4 distinct layers
        recipe = replace(recipe, layers=4)
    if args.backbone is None:
        backbone_path = build_backbone(recipe, args.cache_dir)
        backbone_name = f"{args.foundation}-pretrained miniature ViT ({recipe.layers} layers, width {recipe.hidden})"
    else:
        backbone_path = backbone_name = args.backbone
    side = args.image_size or (recipe.side if args.backbone is None else REAL_IMAGE_SIZE)
    if args.source is None:
        task, source_name = miniature_task(args.train_images, args.eval_images, side), SOURCE_STYLE
    else:
        task, source_name = user_task(args), args.source
    processor = AutoImageProcessor.from_pretrained(backbone_path)
    config = segmenter_config(
        backbone_path, task, args.decoder_channels, args.segmenter == "official", miniature=args.backbone is None
    )
    data = {
        "train": pixel_batches(task.train, processor, side, config),
        "source": pixel_batches(task.source, processor, side, config),
        "targets": {name: pixel_batches(split, processor, side, config) for name, split in task.targets.items()},
    }
    evaluation = Evaluation(processor, side, resize=args.source is not None, device=args.device)
    premise, other_scenes = {}, None
    if task.paired:  # the frozen foundation, before any method is trained: the same for every seed
        foundation = segmenter(config, backbone_path, args.seeds[0]).to(args.device)
        premise = {
            name: feature_similarity(foundation, data["source"], split, args.device)
            for name, split in data["targets"].items()
        }
        # what the similarity is between different scenes in the same style (each source scene against the next):
        # a similarity of the same scene across styles far above it is about the scene, not about being a street
        rolled = data["source"].select([*range(1, len(data["source"])), 0])
        other_scenes = feature_similarity(foundation, data["source"], rolled, args.device)
    gate = {
        "min_cosine": PREMISE_MIN_COSINE,
        "cosine_met": bool(premise) and min(premise.values()) >= PREMISE_MIN_COSINE,
    }
    gate.update({"min_source_miou": PREMISE_MIN_SOURCE_MIOU, "frozen_source_miou": None, "source_miou_met": None})
    if premise and "frozen" not in args.methods:  # no frozen run to complete the gate: the similarities alone, first
        print_premise(premise, gate, other_scenes)
    runs, pictures = [], {}
    for seed in args.seeds:
        for method in args.methods:
            print(f"{METHOD_NAMES[method]}, seed {seed}", flush=True)
            runs.append(run_one(method, seed, config, backbone_path, task, data, evaluation, args))
            predictions = runs[-1].pop("predictions")
            if seed == args.seeds[0]:
                pictures[method] = predictions
            print(
                f"  source {100 * runs[-1]['source_miou']:.1f}, unseen styles {100 * runs[-1]['target_mean_miou']:.1f}"
                f" ({runs[-1]['train_seconds']:.0f} s)",
                flush=True,
            )
            if premise and method == "frozen" and seed == args.seeds[0]:  # the gate's second half, then the rest
                gate["frozen_source_miou"] = runs[-1]["source_miou"]
                gate["source_miou_met"] = runs[-1]["source_miou"] >= PREMISE_MIN_SOURCE_MIOU
                print_premise(premise, gate, other_scenes)
    pretraining = None
    if args.backbone is None:
        with open(os.path.join(backbone_path, "recipe.json")) as file:
            built = json.load(file)
        pretraining = {"seconds": built["seconds"], "premise_curve": built.get("premise_curve", [])}
    result = {
        "backbone": backbone_name,
        "backbone_recipe": asdict(recipe) if args.backbone is None else None,
        "pretraining": pretraining,
        "premise": premise,
        "premise_gate": gate,
        "premise_other_scenes": other_scenes,
        "class_names": task.class_names,
        "source_name": source_name,
        "target_names": list(task.targets),
        "settings": {key: value for key, value in vars(args).items() if key not in ("output", "cache_dir")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "runs": runs,
        "summary": summarize(runs, args.methods, list(task.targets)),
    }
    return result, pictures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny backbone and task, to check the pipeline")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3, help="of the decoder and the adapters")
    parser.add_argument("--backbone_lr_multiplier", type=float, default=0.1, help="full fine-tuning's backbone lr")
    parser.add_argument("--weight_decay", type=float, default=0.05)
    parser.add_argument("--decoder_channels", type=int, default=64, help="UperNet's (miniature: any decoder's) width")
    parser.add_argument(
        "--segmenter", choices=SEGMENTERS, default="upernet", help="UperNet, or the official Rein segmenter"
    )
    parser.add_argument("--train_images", type=int, default=2000, help="miniature source images to train on")
    parser.add_argument("--eval_images", type=int, default=200, help="miniature images per evaluated style")
    parser.add_argument("--foundation", choices=FOUNDATIONS, default="mae", help="the miniature backbone's recipe")
    parser.add_argument("--backbone", help="a DINOv2 checkpoint (Hub name or folder) instead of the miniature one")
    parser.add_argument("--image_size", type=int, help="side images are resized to (default: the miniature's 64)")
    parser.add_argument("--source", help="dataset to train on (folder from save_to_disk, or Hub name)")
    parser.add_argument("--target", action="append", default=[], help="NAME=DATASET to evaluate on (repeatable)")
    parser.add_argument("--num_labels", type=int, help="classes of --source and --target datasets")
    parser.add_argument("--pictures", type=int, default=3, help="scenes per split in the prediction picture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "rein_peft"))
    parser.add_argument("--output", default=os.path.join(REPO, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.target and args.source is None:
        parser.error("--target needs --source: the dataset to train on")
    require("matplotlib", purpose="The charts and pictures")  # before hours of measuring
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()  # `datasets` cannot hash the transform; it only means no caching
    warnings.filterwarnings("ignore", message="Cannot (locate reference|pickle)")  # dill, while it tries
    silence_peft_deprecations()  # PEFT 0.21 asks transformers 5 for is_gradient_checkpointing
    result, pictures = run(args)
    print_table(result)
    os.makedirs(args.output, exist_ok=True)
    foundation = "" if args.backbone or args.foundation == "mae" else "_" + args.foundation.replace("mae+", "")
    foundation += "_official" if args.segmenter == "official" else ""
    stem = os.path.join(args.output, "domain_generalization" + foundation + ("_quick" if args.quick else ""))
    with open(stem + ".json", "w") as file:
        json.dump(result, file, indent=2)
    plot(result, stem + ".png")
    prediction_picture(pictures, stem + "_predictions.png")
    print(f"\nwrote {stem}.json, {stem}.png and {stem}_predictions.png")
    if args.source is None:
        preview_styles(stem + "_styles.png")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
