"""Error analysis of a run's test predictions (the paper's section 5): the numbers.

Everything here is plain numpy on `predictions.npz`; `fastcifar/figures.py` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Analysis:
    confusion: np.ndarray  # int64 (C, C): rows are true classes, columns predictions
    accuracy: float
    precision: np.ndarray  # float (C,)
    recall: np.ndarray
    f1: np.ndarray
    errors_per_class: np.ndarray  # int64 (C,): misclassified test images of each true class
    confused_pairs: list[tuple[int, int, int]]  # (true, predicted, count), most first

    def to_dict(self, classes) -> dict:
        return {
            "accuracy": self.accuracy,
            "confusion": self.confusion.tolist(),
            "per_class": {
                name: {
                    "precision": float(self.precision[i]),
                    "recall": float(self.recall[i]),
                    "f1": float(self.f1[i]),
                    "errors": int(self.errors_per_class[i]),
                }
                for i, name in enumerate(classes)
            },
            "confused_pairs": [
                {"true": classes[t], "predicted": classes[p], "count": c}
                for t, p, c in self.confused_pairs
            ],
        }


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(
        classes, classes
    )


def without_diagonal(confusion: np.ndarray) -> np.ndarray:
    """The confusion matrix with the correct predictions zeroed (the paper's figure 11)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    return off


def row_normalized(confusion: np.ndarray) -> np.ndarray:
    totals = confusion.sum(1, keepdims=True)
    return confusion / np.maximum(totals, 1)


def analyze_predictions(probs: np.ndarray, labels: np.ndarray, top_pairs: int = 6) -> Analysis:
    classes = probs.shape[1]
    predicted = probs.argmax(1)
    confusion = confusion_matrix(labels, predicted, classes)
    true_positive = np.diag(confusion).astype(float)
    predicted_count = confusion.sum(0)
    actual_count = confusion.sum(1)
    precision = np.divide(
        true_positive, predicted_count, out=np.zeros(classes), where=predicted_count > 0
    )
    recall = np.divide(true_positive, actual_count, out=np.zeros(classes), where=actual_count > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(classes), where=denom > 0)
    off = without_diagonal(confusion)
    order = np.argsort(off, axis=None, kind="stable")[::-1][:top_pairs]
    pairs = [
        (int(i // classes), int(i % classes), int(off.flat[i])) for i in order if off.flat[i] > 0
    ]
    return Analysis(
        confusion=confusion,
        accuracy=float(true_positive.sum() / max(len(labels), 1)),
        precision=precision,
        recall=recall,
        f1=f1,
        errors_per_class=off.sum(1),
        confused_pairs=pairs,
    )


def misclassified(
    probs: np.ndarray, labels: np.ndarray, true_class: int, predicted_class: int, limit: int
) -> list[tuple[int, float]]:
    """(test index, confidence) of images of `true_class` predicted as `predicted_class`,
    most confident mistakes first."""
    predicted = probs.argmax(1)
    rows = np.flatnonzero((labels == true_class) & (predicted == predicted_class))
    confidence = probs[rows, predicted_class]
    order = np.argsort(-confidence, kind="stable")[:limit]
    return [(int(rows[i]), float(confidence[i])) for i in order]
