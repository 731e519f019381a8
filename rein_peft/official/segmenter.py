"""The official Rein segmenter in one call: DINOv2 + Rein + Mask2Former, as the official 512x512 config builds it.

`configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py` of w1oves/Rein (with `_base_/models/
rein_dinov2_mask2former.py`): DINOv2-L at patch 16 on 512x512 crops, Rein (100 low-rank tokens of rank 16, with query
linking) after all 24 layers, the refined outputs of layers 8, 12, 16 and 24 (1-based) without the final norm resized
by x4, x2, x1, x0.5, and a Mask2Former whose queries come from Rein's tokens. `official_segmenter_config` builds the
transformers config, `build_official_segmenter` the model with a backbone checkpoint and a training method, or with a
released Rein checkpoint (`checkpoint=`) to run it.

How transformers' Mask2Former is matched to mmdetection's (the official head):
- decoder layers: `num_decoder_layers` counts masked-attention layers as mmdetection's `num_layers` does (9);
  transformers' `decoder_layers` counts the prediction made from the queries before any layer too, as detectron2's
  `DEC_LAYERS` does, so `mask2former_decoder_fields` sets it to 9 + 1 = 10 (10 predictions, each with its auxiliary
  loss, as mmdetection's 1 + 9).
- widths: one `hidden_dim` (256) sets the decoder's, the pixel decoder's (`feature_size`) and the mask features'
  (`mask_feature_size`), which the official head keeps equal (its input projections are identities), and the
  feed-forward widths at the official ratios (8x in the decoder, 4x in the pixel decoder).
- pixel decoder: `encoder_layers=6` deformable layers on the 3 coarsest levels (strides 8, 16, 32), an FPN level at
  stride 4 (`common_stride`), GroupNorm 32, 256 wide, feed-forward 1024; the decoder's input projections are identities
  (`enforce_input_projection=False`, the official `enforce_decoder_input_project=False`).
- losses and matching: class / mask / dice weights 2.0 / 5.0 / 5.0 for both loss and Hungarian costs, no-object class
  weight 0.1, 12,544 points sampled with oversample ratio 3.0 and importance ratio 0.75; dice with eps 1 (naive dice).
- queries: with query linking, content queries = `rein_query_feat(q)` (the official `querys2feat`, trained with the
  head) and positional queries = q, the linked queries (see REIN.md).
- not matched: weight initialisation of the head (transformers' own, not mmdetection's), and the number of masks the
  losses are averaged over is not reduced across processes unless accelerate is set up (mmdetection reduces it).
"""

from __future__ import annotations

import os
import warnings

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Dinov2Config, Mask2FormerConfig, Mask2FormerForUniversalSegmentation

from ..tuners.rein.config import ReinConfig
from ..tuners.soma import initialize_soma, soma_config
from ..utils.compat import peft_deprecations_silenced
from ..utils.extras import require
from .convert import OFFICIAL_BACKBONE_PREFIX, OFFICIAL_MODULE_NAME, convert_official_checkpoint, read_checkpoint
from .pyramid import OFFICIAL_FEATURE_SCALES, PYRAMID_MODEL_TYPE, Dinov2PyramidBackbone, Dinov2PyramidConfig

# DINOv2-L at patch 16 on 512x512 crops: the official backbone (`_base_/models/rein_dinov2_mask2former.py`)
OFFICIAL_BACKBONE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 16,
    "image_size": 512,
    "layerscale_value": 1e-5,
}
# the layers whose refined outputs feed the decoder, as fractions of the depth: 8, 12, 16, 24 of 24 (out_indices 7,
# 11, 15, 23, 0-based), and the same fractions of a scaled-down copy's depth
OFFICIAL_LAYER_FRACTIONS = (1 / 3, 1 / 2, 2 / 3, 1)
# the decoder's width and its masked-attention layers (mmdetection's `num_layers`); the feed-forward widths as
# multiples of the width: 2048 in the decoder, 1024 in the pixel decoder
OFFICIAL_HIDDEN_DIM, OFFICIAL_DECODER_LAYERS = 256, 9
DECODER_FEEDFORWARD_RATIO, PIXEL_DECODER_FEEDFORWARD_RATIO = 8, 4
# fields that `mask2former_decoder_fields` derives (from the width, from the official layer count): no overrides
DERIVED_FIELDS = ("feature_size", "mask_feature_size", "decoder_layers")
OFFICIAL_DECODER = {
    "num_queries": 100,
    "encoder_layers": 6,
    "num_attention_heads": 8,
    "dropout": 0.0,
    "activation_function": "relu",
    "pre_norm": False,
    "enforce_input_projection": False,
    "ignore_value": 255,
    "class_weight": 2.0,
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "no_object_weight": 0.1,
    "train_num_points": 12544,
    "oversample_ratio": 3.0,
    "importance_sample_ratio": 0.75,
    "use_auxiliary_loss": True,
}
# Rein as the official config has it: LoRAReins(token_length=100, lora_dim=16, link_token_to_query=True)
OFFICIAL_REIN = {"lora_dim": 16, "link_token_to_query": True}
# PEFT's LoRA recipe for ViTs, the benchmark's "lora" method: r=16 on the backbone's query and value projections
LORA_RANK, LORA_DROPOUT = 16, 0.1
BACKBONE_MODULE = "model.pixel_level_module.encoder"
LORA_TARGETS = BACKBONE_MODULE.replace(".", r"\.") + r"\.encoder\.layer\.\d+\.attention\.(q_proj|v_proj)"
# what trains besides the backbone or its adapter: the pixel decoder, the transformer decoder and the class head
HEAD_MODULES = ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"]
METHODS = ("rein", "rein_full_rank", "frozen", "full", "lora", "soma")


def _official_layers(num_layers: int) -> list[int]:
    layers = [max(1, round(num_layers * fraction)) for fraction in OFFICIAL_LAYER_FRACTIONS]
    if len(set(layers)) != len(layers):
        raise ValueError(
            f"The official pyramid takes 4 distinct layers at 1/3, 1/2, 2/3 and all of the depth, but a backbone of "
            f"{num_layers} layers gives {layers}. Use at least 4 layers, or pass a Dinov2PyramidConfig with the "
            "out_features of your choice."
        )
    return layers


def _pyramid_config(backbone_config: Dinov2Config | str | os.PathLike | None) -> Dinov2PyramidConfig:
    """The official pyramid over a DINOv2 geometry; a `Dinov2PyramidConfig` is taken as it is."""
    if isinstance(backbone_config, Dinov2PyramidConfig):
        backbone_config.check_feature_scales()
        return backbone_config
    if backbone_config is None:
        geometry = OFFICIAL_BACKBONE
    elif isinstance(backbone_config, Dinov2Config):
        geometry = backbone_config.to_dict()
    else:
        geometry = Dinov2Config.from_pretrained(backbone_config).to_dict()
    pyramid = {
        "out_features": [f"stage{layer}" for layer in _official_layers(geometry["num_hidden_layers"])],
        "apply_layernorm": False,  # the official features: no final norm
        "reshape_hidden_states": True,
        "feature_scales": list(OFFICIAL_FEATURE_SCALES),
    }
    ignored = ("model_type", "out_indices", "stage_names", "transformers_version", *pyramid)
    return Dinov2PyramidConfig(**{key: value for key, value in geometry.items() if key not in ignored}, **pyramid)


def _patch_size(config: Dinov2Config) -> int:
    return config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]


def _feature_strides(config: Dinov2PyramidConfig) -> list[int]:
    """Stride of each pyramid level: patch / scale (4, 8, 16, 32 for patch 16)."""
    patch_size = _patch_size(config)
    strides = [patch_size / scale for scale in config.feature_scales]
    if any(stride != int(stride) for stride in strides):
        raise ValueError(
            f"With patch size {patch_size} the pyramid scales {config.feature_scales} give strides {strides}, not "
            "whole pixels. The official system uses DINOv2 with its patch embedding resized from 14 to 16: run "
            "`rein_peft.resize_patch_embedding(model, patch_size=16, image_size=512)` or `python -m "
            "rein_peft.resize_backbone <checkpoint> <output_dir> --patch-size 16 --image-size 512` first."
        )
    return [int(stride) for stride in strides]


def mask2former_decoder_fields(hidden_dim: int, num_decoder_layers: int) -> dict[str, int]:
    """The `Mask2FormerConfig` fields of a decoder `hidden_dim` wide with `num_decoder_layers` masked-attention layers
    (mmdetection's count): `hidden_dim`, `feature_size` and `mask_feature_size` all `hidden_dim` (the identity input
    projections need them equal), and transformers' `decoder_layers`, which counts the prediction before the first
    layer too: `num_decoder_layers + 1`.

    Args:
        hidden_dim: The decoder's width (256 in the official head).
        num_decoder_layers: Masked-attention layers (9 in the official head).
    """
    if hidden_dim < 1 or num_decoder_layers < 1:
        raise ValueError(
            f"hidden_dim and num_decoder_layers must be positive, got {hidden_dim} and {num_decoder_layers}."
        )
    return {
        "hidden_dim": hidden_dim,
        "feature_size": hidden_dim,
        "mask_feature_size": hidden_dim,
        "decoder_layers": num_decoder_layers + 1,
    }


def _derived_overrides(overrides: dict, hidden_dim: int, num_decoder_layers: int | None) -> int:
    """The official layer count, after taking the old spellings out of `overrides`: `decoder_layers` (transformers'
    count, one more) and `feature_size` / `mask_feature_size` (which must equal `hidden_dim`), with a warning."""
    old = {key: overrides.pop(key) for key in DERIVED_FIELDS if key in overrides}
    for key in ("feature_size", "mask_feature_size"):
        if key in old and old[key] != hidden_dim:
            raise ValueError(
                f"{key}={old[key]} differs from hidden_dim={hidden_dim}; the official head keeps them equal. Pass "
                f"the one width as hidden_dim={old[key]} and leave {key} out."
            )
    if "decoder_layers" in old:
        if num_decoder_layers is not None and num_decoder_layers != old["decoder_layers"] - 1:
            raise ValueError(
                f"decoder_layers={old['decoder_layers']} (transformers' count: {old['decoder_layers'] - 1} layers) "
                f"contradicts num_decoder_layers={num_decoder_layers}; pass num_decoder_layers alone."
            )
        num_decoder_layers = old["decoder_layers"] - 1
    if old:
        new = f"hidden_dim={hidden_dim}, num_decoder_layers={num_decoder_layers}"
        warnings.warn(
            f"official_segmenter_config derives {sorted(old)} from hidden_dim and num_decoder_layers (the official "
            f"count of masked-attention layers, transformers' decoder_layers minus one): pass {new} instead.",
            FutureWarning,
            stacklevel=3,
        )
    return OFFICIAL_DECODER_LAYERS if num_decoder_layers is None else num_decoder_layers


def official_segmenter_config(
    backbone_config: Dinov2Config | str | os.PathLike | None = None,
    num_labels: int = 19,
    hidden_dim: int = OFFICIAL_HIDDEN_DIM,
    num_decoder_layers: int | None = None,
    **overrides,
) -> Mask2FormerConfig:
    """The config of the official Rein segmenter: Mask2Former over a `Dinov2PyramidBackbone`.

    Args:
        backbone_config: The DINOv2 geometry: `None` for DINOv2-L at patch 16 on 512x512 images (the official
            backbone); a `Dinov2Config` or a checkpoint name or folder, whose sizes are kept (a scaled-down copy for
            tests); the pyramid is added: the outputs of the layers at 1/3, 1/2, 2/3 and all of the depth (8, 12, 16
            and 24 of 24) without final norm, resized by x4, x2, x1 and x0.5. A `Dinov2PyramidConfig` is used as it is.
        num_labels: Classes (19 Cityscapes train ids in the official configs; 255 is ignored).
        hidden_dim: The decoder's one width: the transformer decoder's, the pixel decoder's and the mask features'
            (256), and the feed-forward widths at the official ratios (8x and 4x; override them to change that).
        num_decoder_layers: Masked-attention decoder layers, counted as the official config does (mmdetection's
            `num_layers`, default 9); the config's `decoder_layers` is transformers' count, one more.
        overrides: Other `Mask2FormerConfig` fields that replace the official ones (e.g. `encoder_layers`,
            `num_queries`, `train_num_points` for a scaled-down copy, `id2label`).

    Returns:
        A `Mask2FormerConfig` with 100 queries, hidden 256, 9 masked-attention decoder layers, a 6-layer deformable
        pixel decoder on 3 levels and the official loss weights (see the module docstring for how each is matched).

    Example:
        ```py
        >>> config = rein_peft.official_segmenter_config(hidden_dim=64, num_decoder_layers=3)  # a scaled-down head
        >>> config.feature_size, config.mask_feature_size, config.dim_feedforward, config.decoder_layers
        (64, 64, 512, 4)
        ```
    """
    num_decoder_layers = _derived_overrides(overrides, hidden_dim, num_decoder_layers)
    backbone = _pyramid_config(backbone_config)
    strides = _feature_strides(backbone)
    settings = {
        **OFFICIAL_DECODER,
        **mask2former_decoder_fields(hidden_dim, num_decoder_layers),
        "dim_feedforward": DECODER_FEEDFORWARD_RATIO * hidden_dim,
        "encoder_feedforward_dim": PIXEL_DECODER_FEEDFORWARD_RATIO * hidden_dim,
        "feature_strides": strides,
        "common_stride": min(strides),
        **overrides,
    }
    return Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, **settings)


def apply_method(model: Mask2FormerForUniversalSegmentation, method: str) -> nn.Module:
    """Make `model` train as `method` does: "rein" (the official Rein, a `PeftModel`), "rein_full_rank" (the same with
    full-rank tokens, the official `Reins`), "frozen" (the backbone frozen, the decoder trains), "full" (everything
    trains), "lora" (PEFT LoRA r=16 on the backbone's query and value projections, a `PeftModel`) or "soma" (SoMA's
    recipe, `rein_peft.soma_config`: PEFT LoRA r=16, alpha 16 on every attention and MLP linear of the backbone's
    blocks after the first third, 8 to 23 of 24, and their biases, initialised from the minor singular components by
    `rein_peft.initialize_soma`; a `PeftModel`). The head (`HEAD_MODULES`) trains in every method."""
    if method == "full":
        return model
    if method == "frozen":
        model.get_submodule(BACKBONE_MODULE).requires_grad_(False)
        return model
    if method == "lora":
        config = LoraConfig(
            r=LORA_RANK,
            lora_alpha=LORA_RANK,
            lora_dropout=LORA_DROPOUT,
            target_modules=LORA_TARGETS,
            modules_to_save=HEAD_MODULES,
        )
        with peft_deprecations_silenced():
            return get_peft_model(model, config)
    if method == "soma":
        with peft_deprecations_silenced():
            peft_model = get_peft_model(model, soma_config(model, modules_to_save=HEAD_MODULES))
        initialize_soma(peft_model)
        return peft_model
    if method in ("rein", "rein_full_rank"):
        rein = {**OFFICIAL_REIN, "lora_dim": None} if method == "rein_full_rank" else OFFICIAL_REIN
        config = ReinConfig(
            **rein,
            token_length=model.config.num_queries,  # the tokens become the decoder's queries: one each
            query_dims=model.config.hidden_dim,
            modules_to_save=HEAD_MODULES,
        )
        with peft_deprecations_silenced():
            return get_peft_model(model, config)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def build_official_segmenter(
    backbone: str | os.PathLike | None = None,
    num_labels: int = 19,
    method: str | None = None,
    config: Mask2FormerConfig | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> nn.Module:
    """Build the official Rein segmenter (or a baseline with the same segmenter) ready to train, or a released Rein
    checkpoint on it, ready to run.

    Example:
        ```py
        >>> import rein_peft
        >>> rein_peft.resize_patch_embedding("facebook/dinov2-large").save_pretrained("dinov2-large-p16")
        >>> model = rein_peft.build_official_segmenter("dinov2-large-p16", num_labels=19)
        >>> model.print_trainable_parameters()  # Rein's 2,990,081 + the head
        >>> released = rein_peft.build_official_segmenter("dinov2-large-p16", checkpoint="iter_40000_published.pth")
        ```

    Args:
        backbone: A DINOv2 checkpoint at patch 16 (name or folder; convert the official DINOv2 file with
            `convert_dinov2_checkpoint` / `python -m rein_peft.convert_dinov2`, or resize a transformers DINOv2 with
            `resize_patch_embedding` / `python -m rein_peft.resize_backbone`), whose weights are loaded into the
            pyramid backbone. `None`: random weights (for shape checks and timing), or the checkpoint's own DINOv2
            weights if `checkpoint` has them.
        num_labels: Classes of the dataset (19 for Cityscapes train ids); with `config`, the config's count is used.
        method: How the segmenter trains (default "rein"): "rein" (Rein with 100 low-rank tokens of rank 16 after
            every layer, its tokens linked to the decoder's queries, the head trained with it), "rein_full_rank" (the
            same with full-rank tokens), "frozen" (frozen backbone, the decoder trains), "full" (everything trains) or
            "lora" (PEFT LoRA r=16 on query/value, and the head) or "soma" (SoMA: LoRA r=16 on every attention and
            MLP linear of blocks 8 to 23 of 24 and their biases, initialised from the minor singular components,
            and the head; save it with `rein_peft.save_soma_adapter`). Leave it unset with `checkpoint`.
        config: The segmenter's config; default `official_segmenter_config(backbone, num_labels)`. Pass a scaled-down
            one for tests.
        checkpoint: A released checkpoint of the official Rein code (`iter_40000_published.pth`: Rein and the
            Mask2Former head, mmengine's file read safely) converted onto the segmenter with
            `convert_official_checkpoint`: the adapter and the head are the checkpoint's, as trained.

    Returns:
        A `PeftModel` for "rein", "rein_full_rank", "lora", "soma" and a `checkpoint`, else the
        `Mask2FormerForUniversalSegmentation`.

    Raises:
        MissingExtraError: scipy is missing (`pip install "rein-peft[segmentation]"`), checked before any work.
        ValueError: For an unknown method, a method with a checkpoint, a backbone checkpoint that does not fit, or
            a released checkpoint without DINOv2 weights and no `backbone` (`OfficialCheckpointError` for one that
            does not fit the segmenter).
    """
    if checkpoint is not None and method is not None:
        raise ValueError(
            f"A released checkpoint brings the adapter it was trained with; method={method!r} would build another. "
            "Leave method unset to run the checkpoint, or leave checkpoint unset to train with a method."
        )
    method = "rein" if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    require("scipy", purpose="The official segmenter's Mask2Former (its loss matches predictions to labels)")
    state_dict = read_checkpoint(checkpoint) if checkpoint is not None else None
    if state_dict is not None and backbone is None:
        dinov2 = [key for key in state_dict if key.startswith(OFFICIAL_BACKBONE_PREFIX)]
        if all(OFFICIAL_MODULE_NAME in key.split(".") for key in dinov2):
            raise ValueError(
                f"The checkpoint '{checkpoint}' holds no DINOv2 weights (the released checkpoints keep Rein and the "
                "head only), so the segmenter needs backbone=: the official DINOv2 at patch 16, e.g. from "
                "`python -m rein_peft.convert_dinov2 dinov2_vitl14_pretrain.pth dinov2-large-p16 --patch-size 16`."
            )
    if backbone is not None:
        model_type = Dinov2Config.get_config_dict(backbone)[0].get("model_type")
        if model_type not in (Dinov2Config.model_type, PYRAMID_MODEL_TYPE):
            raise ValueError(
                f"The checkpoint '{backbone}' is a {model_type!r} model; the official segmenter's backbone is a "
                "plain DINOv2 (model_type 'dinov2', no register tokens)."
            )
    if config is None:
        config = official_segmenter_config(backbone, num_labels=num_labels)
    elif not isinstance(config.backbone_config, Dinov2PyramidConfig):
        raise ValueError(
            f"The official segmenter's backbone is a Dinov2PyramidConfig, got {type(config.backbone_config).__name__}."
            " Build the config with `rein_peft.official_segmenter_config(...)`."
        )
    if backbone is not None:
        checkpoint_patch = _patch_size(Dinov2Config.from_pretrained(backbone))
        backbone_patch = _patch_size(config.backbone_config)
        if checkpoint_patch != backbone_patch:
            raise ValueError(
                f"The checkpoint '{backbone}' has patch size {checkpoint_patch} but the segmenter's backbone "
                f"{backbone_patch}. Resize it first: `python -m rein_peft.resize_backbone {backbone} <output_dir> "
                f"--patch-size {backbone_patch} --image-size {config.backbone_config.image_size}`."
            )
    model = Mask2FormerForUniversalSegmentation(config)
    if backbone is not None:
        pretrained, report = Dinov2PyramidBackbone.from_pretrained(
            backbone, config=config.backbone_config, output_loading_info=True
        )
        if report["missing_keys"] or report["mismatched_keys"]:
            raise ValueError(
                f"The checkpoint '{backbone}' does not fill the pyramid backbone: missing "
                f"{sorted(report['missing_keys'])[:5]}, mismatched {list(report['mismatched_keys'])[:5]}. Is it a "
                "DINOv2 checkpoint of the backbone's size?"
            )
        model.get_submodule(BACKBONE_MODULE).load_state_dict(pretrained.state_dict())
    if state_dict is not None:
        return convert_official_checkpoint(state_dict, model)
    return apply_method(model, method)


# --- training and evaluating it on semantic label maps ---------------------------------------------------------------


def mask_targets(label_maps: torch.Tensor, ignore_index: int) -> dict[str, list[torch.Tensor]]:
    """Mask2Former's targets from semantic label maps `[B, H, W]`: per image, one binary mask `[K_i, H, W]` for each
    class present (the ignored pixels in none) and those classes `[K_i]`, as mmsegmentation's Mask2Former head makes
    them."""
    classes = [label_map[label_map != ignore_index].unique() for label_map in label_maps]
    masks = [
        (label_map[None] == present[:, None, None]).float()
        for label_map, present in zip(label_maps, classes, strict=True)
    ]
    return {"mask_labels": masks, "class_labels": classes}
