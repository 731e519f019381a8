"""Checks of semantic-segmentation label maps against the model that is trained on them."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

# where transformers' segmentation configs keep the label their loss ignores (UperNet; DPT, BEiT, SegFormer;
# Mask2Former); models without one (EoMT) get theirs from the image processor, 255 by default
IGNORE_INDEX_ATTRIBUTES = ("loss_ignore_index", "semantic_loss_ignore_index", "ignore_value")
DEFAULT_IGNORE_INDEX = 255


def segmentation_ignore_index(config: PretrainedConfig) -> int:
    """The label that the model's segmentation loss ignores, read from its config (255 where it has none)."""
    for attribute in IGNORE_INDEX_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if value is not None:
            return int(value)
    return DEFAULT_IGNORE_INDEX


def check_label_maps(label_maps: torch.Tensor, config: PretrainedConfig) -> None:
    """Raise a clear error if label maps hold values the model cannot learn from.

    Every value must be a class id in `[0, config.num_labels)` or the model's ignore index. Anything else means the
    dataset and the model disagree on the number of classes or on the ignore index (a dataset that marks unlabelled
    pixels with 0, or with 255 after "reducing" its labels), which the losses would otherwise report as an
    out-of-bounds index deep inside `cross_entropy`, or not at all.

    Args:
        label_maps: Integer label maps of any shape, e.g. `[B, H, W]`.
        config: The segmentation model's config (`num_labels`, and the ignore index where the model has one).
    """
    if label_maps.is_floating_point():
        raise ValueError(
            f"Label maps must hold integer class ids, got dtype {label_maps.dtype}. Convert them with `.long()` "
            "(and resize them with nearest-neighbour interpolation, which keeps them integers)."
        )
    num_labels, ignore_index = config.num_labels, segmentation_ignore_index(config)
    values = torch.unique(label_maps)
    bad = values[((values < 0) | (values >= num_labels)) & (values != ignore_index)]
    if bad.numel():
        raise ValueError(
            f"The label maps hold values {bad.tolist()[:10]}, but the model has {num_labels} classes (0 to "
            f"{num_labels - 1}) and ignores {ignore_index}. Build the model with the dataset's number of classes "
            "(`num_labels`, `id2label`), and map unlabelled pixels to the ignore index (or set the model's ignore "
            "index to the dataset's)."
        )
