"""Semantic-segmentation evaluation as the official Rein configs do it: per-pixel class scores from any transformers
segmentation model (`semantic_scores` of its outputs; `whole_inference` and `slide_inference` of a model and images,
mmsegmentation's two test modes), the test-time resize (`keep_ratio_size`), and mean IoU (`evaluate_segmentation`).
Sizes are (height, width) throughout, as `torch` and transformers' image processors write them.

The mean IoU is `evaluate`'s "mean_iou" as a local module (`MEAN_IOU_METRIC`, rein_peft/mean_iou.py: the Hub's
cannot be downloaded offline), whose arithmetic is `intersection_and_union` and `iou_from_areas` below;
`evaluate_segmentation` sums the same per-image areas as it goes, instead of keeping every full-resolution map in
`evaluate`'s Arrow cache.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .segmentation import segmentation_ignore_index

# `evaluate`'s mean IoU as a local module (the Hub's "mean_iou" needs a download): rein_peft/mean_iou.py
MEAN_IOU_METRIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mean_iou.py")
# the official test-time sliding window (`test_cfg=dict(mode="slide", crop_size=(512, 512), stride=(341, 341))`)
SLIDE_CROP_SIZE, SLIDE_STRIDE = 512, 341


def semantic_scores(outputs, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-pixel class scores `[B, num_labels, h, w]` from a segmentation model's outputs.

    Per-pixel decoders (UperNet, DPT, BEiT, SegFormer): `outputs.logits`. Mask decoders (Mask2Former, MaskFormer,
    EoMT: class and mask logits per query): the standard semantic scores, as their image processors'
    `post_process_semantic_segmentation` and mmsegmentation compute them: `sum_q softmax(class logits)[q, k] *
    sigmoid(mask logits)[q]`, the no-object class left out.

    Args:
        outputs: The model's outputs.
        size: (height, width) to resize to, bilinearly (the mask logits before their sigmoid, as mmsegmentation
            does); `None` keeps the model's own resolution.
    """

    def resized(logits: torch.Tensor) -> torch.Tensor:
        if size is None or tuple(logits.shape[-2:]) == tuple(size):
            return logits
        return nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    if getattr(outputs, "masks_queries_logits", None) is not None:
        class_probs = outputs.class_queries_logits.softmax(-1)[..., :-1]  # [B, Q, K], without "no object"
        return torch.einsum("bqk,bqhw->bkhw", class_probs, resized(outputs.masks_queries_logits).sigmoid())
    logits = getattr(outputs, "logits", None)
    if logits is None or logits.ndim != 4:
        raise TypeError(
            f"{type(outputs).__name__} holds no per-pixel logits [B, K, h, w] nor mask and class logits per query; "
            "class scores come from semantic-segmentation models (UperNet, DPT, SegFormer, Mask2Former, EoMT, ...)."
        )
    return resized(logits)


def whole_inference(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Whole-image inference (mmsegmentation's `mode="whole"`): per-pixel class scores `[B, num_labels, H, W]` at the
    input's size from any transformers segmentation model (`semantic_scores` of its outputs, resized to the input).

    Args:
        model: A segmentation model (or a `PeftModel` around one), in eval mode.
        pixel_values: `[B, 3, H, W]` normalised images.
    """
    return semantic_scores(model(pixel_values=pixel_values), size=tuple(pixel_values.shape[-2:]))


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Where the crops along one side begin: every `stride`, the last one flush with the end (mmsegmentation's grid:
    `max(length - crop + stride - 1, 0) // stride + 1` crops)."""
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, length) - crop, 0) for index in range(count)]


@torch.no_grad()
def slide_inference(
    model: nn.Module, pixel_values: torch.Tensor, crop_size: int = SLIDE_CROP_SIZE, stride: int = SLIDE_STRIDE
) -> torch.Tensor:
    """Sliding-window inference, as the official Rein configs test: `crop_size` crops every `stride` pixels (the
    last flush with the border; a side shorter than the crop is taken whole), each crop's per-pixel class scores
    (`whole_inference`) added in place, and every pixel divided by the number of crops that cover it.

    Args:
        model: A transformers segmentation model (UperNet, DPT, Mask2Former, EoMT, ...; or a `PeftModel`), in eval
            mode.
        pixel_values: `[B, 3, H, W]` normalised images, already at the test size.
        crop_size: The side of the square crops.
        stride: The step between crops; `stride <= crop_size`, so that every pixel is covered.

    Returns:
        `[B, num_labels, H, W]` class scores.
    """
    if not 0 < stride <= crop_size:
        raise ValueError(f"stride must be in (0, crop_size={crop_size}] so that crops cover the image, got {stride}.")
    batch, _, height, width = pixel_values.shape
    scores, counts = None, pixel_values.new_zeros(1, 1, height, width)
    for top in _window_starts(height, crop_size, stride):
        for left in _window_starts(width, crop_size, stride):
            window = (slice(None), slice(None), slice(top, top + crop_size), slice(left, left + crop_size))
            crop_scores = whole_inference(model, pixel_values[window])  # [B, K, h, w]
            if scores is None:
                scores = pixel_values.new_zeros(batch, crop_scores.shape[1], height, width)
            scores[window] += crop_scores
            counts[window] += 1
    return scores / counts


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """The size (height, width) an image is resized to at test time: mmcv's `Resize(scale, keep_ratio=True)`, the
    largest size with the image's aspect ratio whose long side is at most `max(scale)` and short side at most
    `min(scale)` (a 1024x2048 Cityscapes image at scale (512, 1024): (512, 1024)).

    Args:
        height: The image's height.
        width: The image's width.
        scale: The test scale, (height, width) like the image and the result (mmsegmentation's configs write it
            (width, height): reverse it); only its long and short sides count, so either order gives the same size.

    Returns:
        (height, width).
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def intersection_and_union(
    prediction: np.ndarray, reference: np.ndarray, num_labels: int, ignore_index: int
) -> np.ndarray:
    """Per-class pixel areas of one label map, `[3, num_labels]` int64: intersection, predicted area, reference area,
    over the pixels whose reference is not `ignore_index`. Summed over a data set, `iou_from_areas` turns them into
    the mean IoU.

    Args:
        prediction: Integer class ids, any shape.
        reference: Integer class ids (or `ignore_index`), the same shape.
        num_labels: The number of classes.
        ignore_index: The reference label left out.
    """
    prediction, reference = np.asarray(prediction).ravel(), np.asarray(reference).ravel()
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction and reference differ in size: {prediction.shape} and {reference.shape}.")
    kept = reference != ignore_index
    prediction, reference = prediction[kept].astype(np.int64), reference[kept].astype(np.int64)
    return np.stack(
        [
            np.bincount(reference[prediction == reference], minlength=num_labels)[:num_labels],
            np.bincount(prediction, minlength=num_labels)[:num_labels],
            np.bincount(reference, minlength=num_labels)[:num_labels],
        ]
    )


def iou_from_areas(areas: np.ndarray) -> dict:
    """Mean IoU, mean and overall accuracy, per-class IoU and accuracy from summed `intersection_and_union` areas.
    Classes in neither predictions nor references have NaN IoU and do not count in the mean (as mmsegmentation's
    `IoUMetric` and the Hub's mean_iou)."""
    intersection, predicted_area, reference_area = areas
    union = predicted_area + reference_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / reference_area
    return {
        "mean_iou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan"),
        "overall_accuracy": float(intersection.sum() / max(reference_area.sum(), 1)),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


def _progress(iterable: Iterable, total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, mininterval=5, disable=None)


def evaluate_segmentation(
    model: nn.Module,
    dataset,
    image_mean: tuple[float, float, float],
    image_std: tuple[float, float, float],
    test_size: tuple[int, int] | None = None,
    crop_size: int = SLIDE_CROP_SIZE,
    stride: int = SLIDE_STRIDE,
    device: str | torch.device | None = None,
    description: str = "evaluating",
    predictions_of: Iterable[int] = (),
) -> dict:
    """Mean IoU of `model` on a data set of images and label maps, as the official configs evaluate: each image
    resized to `test_size` (keeping its aspect ratio), sliding-window class scores, resized bilinearly back to the
    label map's own size and compared there (the labels are never resized).

    Args:
        model: A segmentation model (or `PeftModel`); its config gives the classes and the ignore index.
        dataset: A `datasets.Dataset` with an `image` column and a `label` column of label maps (`load_dg_dataset`).
        image_mean: The per-channel mean the model was trained with, in [0, 1] (the image processor's).
        image_std: The per-channel standard deviation, in [0, 1].
        test_size: (height, width) scale of `keep_ratio_size`; `None`: the images as they are.
        crop_size: The sliding window's crop.
        stride: The sliding window's stride.
        device: Where the model runs (default: where its parameters are).
        description: The progress bar's label.
        predictions_of: Indices of images whose (image, label, prediction) to return, for pictures.

    Returns:
        `{"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy",
        "num_images", "predictions"}`, the per-class lists with `None` for classes absent from both the labels and
        the predictions (which do not count in the mean).
    """
    from PIL import Image

    model.eval()
    device = device or next(model.parameters()).device
    config = model.config
    mean = torch.tensor(image_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(image_std, device=device).view(1, 3, 1, 1)
    num_labels, ignore_index = config.num_labels, segmentation_ignore_index(config)
    areas, wanted, kept = np.zeros((3, num_labels), dtype=np.int64), set(predictions_of), {}
    for index in _progress(range(len(dataset)), len(dataset), description):
        example = dataset[index]
        image, label = example["image"].convert("RGB"), np.asarray(example["label"])
        if test_size is not None:
            height, width = keep_ratio_size(image.height, image.width, test_size)
            image = image.resize((width, height), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float() / 255
        scores = slide_inference(model, (pixels - mean) / std, crop_size, stride)
        scores = nn.functional.interpolate(scores, size=label.shape, mode="bilinear", align_corners=False)
        prediction = scores.argmax(1)[0].cpu().numpy()
        areas += intersection_and_union(prediction, label, num_labels, ignore_index)
        if index in wanted:
            kept[index] = (example["image"], label, prediction)
    result = iou_from_areas(areas)
    return {
        "mean_iou": float(result["mean_iou"]),
        "mean_accuracy": float(result["mean_accuracy"]),
        "overall_accuracy": float(result["overall_accuracy"]),
        "per_category_iou": [None if math.isnan(value) else float(value) for value in result["per_category_iou"]],
        "per_category_accuracy": [
            None if math.isnan(value) else float(value) for value in result["per_category_accuracy"]
        ],
        "num_images": len(dataset),
        "predictions": kept,
    }
