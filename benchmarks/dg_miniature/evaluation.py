"""The evaluation: mIoU and per-class IoU through the protocol's sliding window, how similar a backbone's features
are for the same scenes in two styles (Rein's premise, and what each method does to it), the premise's gate, and
the figures' mean and spread over seeds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import datasets
import torch
from torch import nn
from transformers import BitImageProcessorPil

from rein_peft.official.evaluation import evaluate_segmentation

# Rein's premise, as the gate checks it before the methods are compared: the frozen foundation's deepest features of
# the same scenes in the source and every target style at least this similar, and (no collapse; the `street`
# setting's bar, `settings.Setting.min_frozen_source_miou`) the frozen backbone plus decoder at least this good on the
# source
PREMISE_MIN_COSINE, PREMISE_MIN_SOURCE_MIOU = 0.8, 0.85
# room in-domain (the `shapes` setting's gate): full fine-tuning at least this far above the frozen backbone +
# decoder on the source, so that adapting the backbone has something to add, as in the paper's regime
ROOM_MIN_GAP = 0.10
ROOM_METHODS = ("frozen", "full")  # the two runs (first seed) that the room gate compares


@dataclass(frozen=True)
class Evaluation:
    """The protocol's evaluation (`rein_peft.evaluate_segmentation`): images resized to `side` (keeping
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


@torch.no_grad()
def feature_similarity(backbone: nn.Module, source: torch.Tensor, target: torch.Tensor, batch_size: int = 50) -> float:
    """Mean cosine similarity, over patches, of the last layer's outputs before the final norm (the deepest features
    the decoder reads) for the same scenes drawn in two styles: 1.0 means that the backbone does not see the style.

    Args:
        backbone: A DINOv2 model or backbone: the bare `Dinov2Model` during pretraining, a segmenter's backbone
            (`methods.backbone_of`, with its adapter) after training.
        source: Normalised `[N, 3, H, W]` pixels of the scenes in one style.
        target: The same scenes, in the same order, in another style.
        batch_size: Scenes per forward pass.
    """
    backbone.eval()
    device = next(backbone.parameters()).device
    similarities = []
    for start in range(0, len(source), batch_size):
        tokens = [
            backbone(
                pixel_values=pixels[start : start + batch_size].to(device), output_hidden_states=True
            ).hidden_states[-1][:, 1:]  # [B, patches, C], without the class token (the decoder reads the patches)
            for pixels in (source, target)
        ]
        similarities.append(nn.functional.cosine_similarity(*tokens, dim=-1).flatten())
    return torch.cat(similarities).mean().item()


def style_similarities(
    backbone: nn.Module, source: torch.Tensor, targets: dict[str, torch.Tensor]
) -> dict[str, float]:
    """`feature_similarity` between the source's scenes and the same scenes in each target style (by name)."""
    return {name: feature_similarity(backbone, source, pixels) for name, pixels in targets.items()}


def premise_gate(
    premise: dict[str, float],
    frozen_source_miou: float | None = None,
    min_source_miou: float | None = PREMISE_MIN_SOURCE_MIOU,
) -> dict:
    """Whether Rein's premise holds: every style's similarity at least `PREMISE_MIN_COSINE`, and the frozen backbone +
    decoder's source mIoU (`None`: not measured yet, or the frozen method not run) at least `min_source_miou`
    (`None`: no such bar, `"source_miou_met"` is then `None` too).
    """
    measured = frozen_source_miou is not None and min_source_miou is not None
    return {
        "min_cosine": PREMISE_MIN_COSINE,
        "cosine_met": bool(premise) and min(premise.values()) >= PREMISE_MIN_COSINE,
        "min_source_miou": min_source_miou,
        "frozen_source_miou": frozen_source_miou,
        "source_miou_met": frozen_source_miou >= min_source_miou if measured else None,
    }


def room_gate(premise: dict[str, float], frozen_source_miou: float | None, full_source_miou: float | None) -> dict:
    """Whether the source task leaves adapting room in-domain: full fine-tuning's source mIoU at least `ROOM_MIN_GAP`
    above the frozen backbone + decoder's (first seed; `None`: that run not made), with Rein's premise still holding
    (every style's similarity at least `PREMISE_MIN_COSINE`). `"met"` is `None` while either run is missing."""
    measured = frozen_source_miou is not None and full_source_miou is not None
    gap = full_source_miou - frozen_source_miou if measured else None
    cosine_met = bool(premise) and min(premise.values()) >= PREMISE_MIN_COSINE
    return {
        "min_gap": ROOM_MIN_GAP,
        "frozen_source_miou": frozen_source_miou,
        "full_source_miou": full_source_miou,
        "gap": gap,
        "min_cosine": PREMISE_MIN_COSINE,
        "lowest_cosine": min(premise.values()) if premise else None,
        "met": (gap >= ROOM_MIN_GAP and cosine_met) if measured else None,
    }


def spread(values: list[float]) -> dict:
    """The mean and (sample) standard deviation of `values`; 0 for a single value."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(runs: list[dict], methods: list[str], target_names: list[str]) -> dict:
    """Mean and standard deviation over seeds of every figure, per method."""
    summary = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method]
        summary[method] = {
            "seeds": [run["seed"] for run in mine],
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
