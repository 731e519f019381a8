"""The segmentation protocol that rein_peft's examples, benchmarks and users share: segmenter configs over a DINOv2
backbone, data preparation, the batch collator, the official optimiser and the mean IoU of a prepared data set.

The domain-generalization pieces are `rein_peft.official.dg_data` (the data sets and the training augmentations)
and `rein_peft.official.evaluation` (sliding-window evaluation); `examples/reproduce_domain_generalization.py` runs
them all.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import Dinov2Config, Mask2FormerConfig, PretrainedConfig, UperNetConfig

from ..integrations.training import EMBEDDING_NAMES, backbone_lr_groups, rein_parameter_groups
from .evaluation import intersection_and_union, iou_from_areas, whole_inference
from .segmentation import check_label_maps, segmentation_ignore_index
from .segmenter import mask2former_decoder_fields, mask_targets

DECODERS = ("upernet", "mask2former")
# the decoder trained beside the frozen backbone, and where the backbone sits, in each segmenter
DECODER_MODULES = {
    "upernet": ["decode_head"],
    "mask2former": ["model.pixel_level_module.decoder", "model.transformer_module", "class_predictor"],
}
BACKBONE_MODULE = {"upernet": "backbone", "mask2former": "model.pixel_level_module.encoder"}
# configs whose models take one binary mask per class present (`mask_labels`, `class_labels`) instead of label maps
MASK_CLASSIFICATION_MODEL_TYPES = ("mask2former", "maskformer", "eomt", "eomt_dinov3")


def dinov2_feature_layers(num_layers: int, num_features: int = 4) -> list[int]:
    """`num_features` evenly spaced layers (1-based, distinct) whose outputs feed the decoder: 3, 6, 9, 12 of 12."""
    return sorted({max(1, round(num_layers * (index + 1) / num_features)) for index in range(num_features)})


def dinov2_backbone_config(backbone_path: str, out_indices: list[int] | None = None) -> Dinov2Config:
    """A `Dinov2Backbone` config shaped like the checkpoint, handing the decoder the refined outputs of `out_indices`
    (1-based; default 4 evenly spaced layers) as feature maps, without the final norm (as the official features).

    Args:
        backbone_path: A DINOv2 checkpoint (Hub name or folder).
        out_indices: Layers (1-based) whose outputs feed the decoder.
    """
    num_layers = Dinov2Config.from_pretrained(backbone_path).num_hidden_layers
    layers = out_indices or dinov2_feature_layers(num_layers)
    return Dinov2Config.from_pretrained(
        backbone_path,
        out_features=[f"stage{layer}" for layer in layers],  # stage k: the output of layer k
        apply_layernorm=False,
        reshape_hidden_states=True,
    )


def mask2former_sizes(hidden_size: int = 64) -> dict:
    """The `Mask2FormerConfig` sizes of the small Mask2Former that `segmenter_config` builds: `hidden_size` wide,
    2 pixel-decoder and 2 masked-attention decoder layers (transformers' `decoder_layers=3`), 4 heads."""
    return {
        **mask2former_decoder_fields(hidden_size, num_decoder_layers=2),
        "encoder_layers": 2,
        "dim_feedforward": 2 * hidden_size,
        "encoder_feedforward_dim": 2 * hidden_size,
        "num_attention_heads": 4,
    }


def segmenter_config(
    decoder: str,
    backbone_config: PretrainedConfig,
    num_labels: int,
    class_names: list[str] | None = None,
    hidden_size: int = 64,
    num_queries: int = 16,
) -> PretrainedConfig:
    """A small UperNet or Mask2Former over a backbone: the examples' and the miniature benchmark's segmenter (the
    official Rein segmenter is `rein_peft.official_segmenter_config`).

    Args:
        decoder: `upernet` or `mask2former`.
        backbone_config: The backbone's config (`dinov2_backbone_config`).
        num_labels: Classes (without the ignore index).
        class_names: Their names (default `class 0`, `class 1`, ...).
        hidden_size: The decoder's width.
        num_queries: Mask2Former's queries.
    """
    names = class_names or [f"class {index}" for index in range(num_labels)]
    labels = {"num_labels": num_labels, "id2label": dict(enumerate(names))}
    if decoder == "upernet":
        return UperNetConfig(
            backbone_config=backbone_config,
            hidden_size=hidden_size,
            pool_scales=[1, 2, 4],
            use_auxiliary_head=False,
            **labels,
        )
    if decoder == "mask2former":
        return Mask2FormerConfig(
            backbone_config=backbone_config,
            num_queries=num_queries,
            common_stride=4,
            **mask2former_sizes(hidden_size),
            **labels,
        )
    raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")


def resize_transform(
    processor,
    side: int,
    config: PretrainedConfig,
    image_column: str = "image",
    label_column: str = "label",
    return_tensors: str = "pt",
):
    """A batch transform (for `Dataset.map(batched=True)` or `with_transform`) that reads images and label maps as
    model inputs: images resized to `side` x `side` and normalised by the backbone's image processor, label maps
    resized with nearest neighbour (which keeps them class ids) and checked against the model's classes.

    Args:
        processor: The backbone's image processor (its normalisation is used, not its resizing).
        side: The side images are resized to.
        config: The segmenter's config (classes and ignore index, for `check_label_maps`).
        image_column: The column of images.
        label_column: The column of label maps (images).
        return_tensors: `"pt"` (torch tensors, for `with_transform`) or `"np"` (numpy arrays, for `map`, which writes
            them under fixed-shape features: `datasets.Array3D((3, side, side), "float32")` for `pixel_values` and
            `datasets.Array2D((side, side), "int64")` for `labels`; stored as the nested lists `map` infers instead,
            batches read ~10x slower in the torch format).
    """
    from PIL import Image

    if return_tensors not in ("pt", "np"):
        raise ValueError(f'return_tensors must be "pt" or "np", got {return_tensors!r}.')

    def transform(batch: dict) -> dict:
        images = [image.convert("RGB").resize((side, side), Image.BILINEAR) for image in batch[image_column]]
        pixel_values = processor(images=images, do_resize=False, do_center_crop=False, return_tensors="pt")
        labels = torch.from_numpy(
            np.stack([np.asarray(label.resize((side, side), Image.NEAREST)) for label in batch[label_column]])
        ).long()
        check_label_maps(labels, config)
        inputs = {"pixel_values": pixel_values["pixel_values"], "labels": labels}
        return inputs if return_tensors == "pt" else {name: tensor.numpy() for name, tensor in inputs.items()}

    return transform


def segmentation_collator(config: PretrainedConfig):
    """A collator stacking `pixel_values` and `labels`; for mask-classification models (Mask2Former, MaskFormer,
    EoMT) the label maps become one binary mask per class present (`mask_labels`, `class_labels`).

    Args:
        config: The segmenter's config (its model type, and its ignore index).
    """
    ignore_index = segmentation_ignore_index(config)
    masks_per_class = config.model_type in MASK_CLASSIFICATION_MODEL_TYPES

    def collate(examples: list[dict]) -> dict:
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
        labels = torch.stack([torch.as_tensor(example["labels"]) for example in examples])
        if not masks_per_class:
            return {"pixel_values": pixel_values, "labels": labels}
        return {"pixel_values": pixel_values, **mask_targets(labels, ignore_index)}

    return collate


def official_optimizer(
    model: nn.Module,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    backbone: nn.Module | None = None,
    backbone_lr_multiplier: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW as the official configs set it: weight decay on weight matrices only (none on Rein's tokens and scale,
    norms, biases, or the decoder's query and level embeddings); with `backbone`, its parameters get
    `backbone_lr_multiplier` times the learning rate (0.1 in the official full fine-tuning).

    Args:
        model: The model; only its trainable parameters are optimised.
        lr: The learning rate.
        weight_decay: AdamW's weight decay on the decayed group.
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        backbone: The pretrained backbone module, for `backbone_lr_multiplier`.
        backbone_lr_multiplier: Its learning rate, relative to `lr`.
    """
    groups = rein_parameter_groups(model, weight_decay, no_decay_names=EMBEDDING_NAMES)
    groups = backbone_lr_groups(groups, lr, backbone, backbone_lr_multiplier)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


@torch.no_grad()
def dataset_mean_iou(
    model: nn.Module, dataset, batch_size: int = 50, device: str | torch.device | None = None
) -> float:
    """Mean IoU of `model` on a prepared data set (`pixel_values`, `labels` of one size, e.g. `resize_transform`'s),
    its class scores (`rein_peft.whole_inference`) resized to the labels.

    Args:
        model: A segmentation model (or `PeftModel`); its config gives the classes and the ignore index.
        dataset: Rows of `pixel_values` `[3, H, W]` and `labels` `[h, w]` (torch format or transform).
        batch_size: Images per forward pass.
        device: Where the model runs (default: where its parameters are).
    """
    model.eval()
    device = device or next(model.parameters()).device
    num_labels, ignore_index = model.config.num_labels, segmentation_ignore_index(model.config)
    areas = np.zeros((3, num_labels), dtype=np.int64)
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        labels = batch["labels"]
        logits = whole_inference(model, batch["pixel_values"].to(device))
        logits = nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        for prediction, label in zip(logits.argmax(1).cpu().numpy(), labels.numpy(), strict=True):
            areas += intersection_and_union(prediction, label, num_labels, ignore_index)
    return iou_from_areas(areas)["mean_iou"]
