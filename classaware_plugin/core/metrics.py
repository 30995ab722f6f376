"""One evaluation pass: per-class FN, FP, recall; AUC-ROC and average precision of the important
classes (one-vs-rest); accuracy. All counts and curves come from scikit-learn."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, recall_score, roc_auc_score
from torch import nn

from ._validation import ClassAwareError, check_important_classes, check_non_empty_loader


@dataclass
class Evaluation:
    """Metrics of one split. Dictionaries are keyed by class index."""

    num_samples: int
    accuracy: float
    fn: dict[int, int]
    fp: dict[int, int]
    recall: dict[int, float]
    support: dict[int, int]
    auc: dict[int, float]
    ap: dict[int, float]
    confusion: np.ndarray = field(repr=False)
    important_classes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (class keys as strings, NaN as None)."""

        def clean(d: dict[int, Any]) -> dict[str, Any]:
            return {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}

        return {
            "num_samples": self.num_samples,
            "accuracy": self.accuracy,
            "fn": clean(self.fn),
            "fp": clean(self.fp),
            "recall": clean(self.recall),
            "support": clean(self.support),
            "auc": clean(self.auc),
            "ap": clean(self.ap),
            "confusion": self.confusion.tolist(),
            "important_classes": list(self.important_classes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evaluation:
        """The inverse of :meth:`to_dict` (class keys back to int, None back to NaN)."""

        def ints(x: dict[str, Any]) -> dict[int, Any]:
            return {int(k): (float("nan") if v is None else v) for k, v in x.items()}

        return cls(
            num_samples=d["num_samples"], accuracy=d["accuracy"], fn=ints(d["fn"]), fp=ints(d["fp"]),
            recall=ints(d["recall"]), support=ints(d["support"]), auc=ints(d["auc"]), ap=ints(d["ap"]),
            confusion=np.asarray(d["confusion"]), important_classes=list(d["important_classes"]),
        )


def evaluate_predictions(
    y_true: Sequence[int] | np.ndarray,
    scores: np.ndarray,
    important_classes: Sequence[int],
    num_classes: int | None = None,
) -> Evaluation:
    """Metrics from labels and per-class scores (logits or probabilities, shape ``(n, classes)``).

    The prediction is ``argmax(scores)``; AUC and AP of an important class use its softmax
    probability one-vs-rest and are NaN when the split has no positive or no negative of that class.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or len(y) != s.shape[0]:
        raise ClassAwareError(f"Scores must have shape (n, classes) with n = {len(y)} labels. Got {s.shape}.")
    k = s.shape[1] if num_classes is None else int(num_classes)
    if s.shape[1] != k:
        raise ClassAwareError(f"The model output width {s.shape[1]} does not match num_classes={k}.")
    important = check_important_classes(important_classes, k)
    if len(y) == 0:
        raise ClassAwareError("Cannot evaluate an empty split.")
    labels = list(range(k))
    pred = s.argmax(1)
    cm = confusion_matrix(y, pred, labels=labels)
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    shifted = s - s.max(1, keepdims=True)
    prob = np.exp(shifted) / np.exp(shifted).sum(1, keepdims=True)
    auc: dict[int, float] = {}
    ap: dict[int, float] = {}
    for c in important:
        pos = y == c
        if pos.all() or not pos.any():
            auc[c] = ap[c] = float("nan")
        else:
            auc[c] = float(roc_auc_score(pos, prob[:, c]))
            ap[c] = float(average_precision_score(pos, prob[:, c]))
    return Evaluation(
        num_samples=int(len(y)),
        accuracy=float(accuracy_score(y, pred)),
        fn={c: int(cm[c].sum() - cm[c, c]) for c in labels},
        fp={c: int(cm[:, c].sum() - cm[c, c]) for c in labels},
        recall={c: float(recall[c]) for c in labels},
        support={c: int(cm[c].sum()) for c in labels},
        auc=auc,
        ap=ap,
        confusion=cm,
        important_classes=important,
    )


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits over a loader, in eval mode (the model's mode is restored after)."""
    check_non_empty_loader("loader", loader)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ys, outs = [], []
    try:
        for batch in loader:
            outs.append(model(batch[0].to(device)).float().cpu())
            ys.append(torch.as_tensor(batch[1]).cpu())
    finally:
        model.train(was_training)
    if not ys:
        raise ClassAwareError("The 'loader' parameter must yield at least one batch. Got an empty loader.")
    return torch.cat(ys).numpy(), torch.cat(outs).numpy()


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    important_classes: Sequence[int],
    num_classes: int | None = None,
) -> Evaluation:
    """Run ``model`` over ``loader`` once and compute :class:`Evaluation`."""
    y, logits = predict(model, loader)
    return evaluate_predictions(y, logits, important_classes, num_classes)
