"""The official Rein segmenter in one call: DINOv2 + Rein + Mask2Former, as the official 512x512 config builds it.

`configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py` of w1oves/Rein (with `_base_/models/
rein_dinov2_mask2former.py`): DINOv2-L at patch 16 on 512x512 crops, Rein (100 low-rank tokens of rank 16, with query
linking) after all 24 layers, the refined outputs of layers 8, 12, 16 and 24 (1-based) without the final norm resized
by x4, x2, x1, x0.5, and a Mask2Former whose queries come from Rein's tokens. `official_segmenter_config` builds the
transformers config, `build_official_segmenter` the model with a backbone checkpoint and a training method, or with a
released Rein checkpoint (`checkpoint=`) to run it.

How transformers' Mask2Former is matched to mmdetection's (the official head):
- decoder layers: transformers' `decoder_layers` counts the prediction made from the queries before any layer, as
  detectron2's `DEC_LAYERS` does; `decoder_layers=10` builds the official 9 masked-attention layers (and 10
  predictions, each with its auxiliary loss, as mmdetection's 1 + 9).
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

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Dinov2Config, Mask2FormerConfig, Mask2FormerForUniversalSegmentation

from .compat import peft_deprecations_silenced
from .config import ReinConfig
from .convert import OFFICIAL_BACKBONE_PREFIX, OFFICIAL_MODULE_NAME, convert_official_checkpoint, read_checkpoint
from .evaluation import semantic_scores as semantic_logits  # noqa: F401  (the class scores of its outputs)
from .extras import require
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
OFFICIAL_DECODER = {
    "num_queries": 100,
    "hidden_dim": 256,
    "mask_feature_size": 256,
    "feature_size": 256,
    "encoder_layers": 6,
    "encoder_feedforward_dim": 1024,
    "decoder_layers": 10,  # 9 masked-attention layers: transformers counts the initial prediction too
    "dim_feedforward": 2048,
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
METHODS = ("rein", "rein_full_rank", "frozen", "full", "lora")


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


def official_segmenter_config(
    backbone_config: Dinov2Config | str | os.PathLike | None = None, num_labels: int = 19, **overrides
) -> Mask2FormerConfig:
    """The config of the official Rein segmenter: Mask2Former over a `Dinov2PyramidBackbone`.

    Args:
        backbone_config: The DINOv2 geometry: `None` for DINOv2-L at patch 16 on 512x512 images (the official
            backbone); a `Dinov2Config` or a checkpoint name or folder, whose sizes are kept (a scaled-down copy for
            tests); the pyramid is added: the outputs of the layers at 1/3, 1/2, 2/3 and all of the depth (8, 12, 16
            and 24 of 24) without final norm, resized by x4, x2, x1 and x0.5. A `Dinov2PyramidConfig` is used as it is.
        num_labels: Classes (19 Cityscapes train ids in the official configs; 255 is ignored).
        overrides: `Mask2FormerConfig` fields that replace the official ones (e.g. smaller `hidden_dim`,
            `train_num_points` for a scaled-down copy, `id2label`).

    Returns:
        A `Mask2FormerConfig` with 100 queries, hidden 256, 9 masked-attention decoder layers, a 6-layer deformable
        pixel decoder on 3 levels and the official loss weights (see the module docstring for how each is matched).
    """
    backbone = _pyramid_config(backbone_config)
    strides = _feature_strides(backbone)
    settings = {**OFFICIAL_DECODER, "feature_strides": strides, "common_stride": min(strides), **overrides}
    return Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, **settings)


def apply_method(model: Mask2FormerForUniversalSegmentation, method: str) -> nn.Module:
    """Make `model` train as `method` does: "rein" (the official Rein, a `PeftModel`), "rein_full_rank" (the same with
    full-rank tokens, the official `Reins`), "frozen" (the backbone frozen, the decoder trains), "full" (everything
    trains) or "lora" (PEFT LoRA r=16 on the backbone's query and value projections, a `PeftModel`). The head
    (`HEAD_MODULES`) trains in every method."""
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
            "lora" (PEFT LoRA r=16 on query/value, and the head). Leave it unset with `checkpoint`.
        config: The segmenter's config; default `official_segmenter_config(backbone, num_labels)`. Pass a scaled-down
            one for tests.
        checkpoint: A released checkpoint of the official Rein code (`iter_40000_published.pth`: Rein and the
            Mask2Former head, mmengine's file read safely) converted onto the segmenter with
            `convert_official_checkpoint`: the adapter and the head are the checkpoint's, as trained.

    Returns:
        A `PeftModel` for "rein", "rein_full_rank", "lora" and a `checkpoint`, else the
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
