"""Accuracy as an `evaluate` module that loads from this folder, so the examples run offline
(`evaluate.load("accuracy")` fetches the same metric from the Hub)."""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the references.",
            citation="",
            inputs_description="predictions and references: lists of class indices.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return {"accuracy": float(np.mean(np.asarray(predictions) == np.asarray(references)))}
