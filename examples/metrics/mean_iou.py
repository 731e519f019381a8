"""Mean intersection-over-union for semantic segmentation, as a local `evaluate` module (the Hub's "mean_iou" cannot
be downloaded offline). Same output keys as the Hub's metric."""

from __future__ import annotations

import datasets
import evaluate
import numpy as np


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
        intersection = np.zeros(num_labels, dtype=np.int64)
        predicted_area = np.zeros(num_labels, dtype=np.int64)
        reference_area = np.zeros(num_labels, dtype=np.int64)
        for prediction, reference in zip(predictions, references, strict=True):
            prediction, reference = np.asarray(prediction).ravel(), np.asarray(reference).ravel()
            kept = reference != ignore_index
            prediction, reference = prediction[kept], reference[kept]
            intersection += np.bincount(reference[prediction == reference], minlength=num_labels)[:num_labels]
            predicted_area += np.bincount(prediction, minlength=num_labels)[:num_labels]
            reference_area += np.bincount(reference, minlength=num_labels)[:num_labels]
        union = predicted_area + reference_area - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersection / union
            accuracy = intersection / reference_area
        return {
            "mean_iou": float(np.nanmean(iou)),
            "mean_accuracy": float(np.nanmean(accuracy)),
            "overall_accuracy": float(intersection.sum() / max(reference_area.sum(), 1)),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
