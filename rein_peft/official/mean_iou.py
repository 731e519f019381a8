"""Mean intersection-over-union for semantic segmentation, as a local `evaluate` module (the Hub's "mean_iou" cannot
be downloaded offline): `evaluate.load(rein_peft.evaluation.MEAN_IOU_METRIC)`. Same output keys as the Hub's metric;
the arithmetic is `rein_peft.official.evaluation`'s, which the data-set evaluation streams."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from rein_peft.official.evaluation import intersection_and_union, iou_from_areas


class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Mean IoU, mean and overall pixel accuracy, and per-class IoU and accuracy.",
            citation="",
            inputs_description="predictions and references: integer label maps of the same shape.",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int) -> dict:
        """Classes that appear in neither prediction nor reference get NaN IoU and do not count in the mean."""
        areas = np.zeros((3, num_labels), dtype=np.int64)
        for prediction, reference in zip(predictions, references, strict=True):
            areas += intersection_and_union(prediction, reference, num_labels, ignore_index)
        return iou_from_areas(areas)
