"""One evaluation pass: per-class FN, FP, recall; AUC-ROC and average precision of the important
classes (one-vs-rest); accuracy. All counts and curves come from scikit-learn."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, average_precision_score, confusion_matrix, recall_score, roc_auc_score, roc_curve
from torch import nn

from . import distributed
from .validation import (
    ClassAwareError, check_batch, check_important_classes, check_loader, check_num_classes, check_number, run_model,
)


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
    y, s = _as_array("y_true", y_true, 1), _as_array("scores", scores, 2)
    if not np.issubdtype(y.dtype, np.integer):
        raise ClassAwareError(f"The 'y_true' parameter must hold integer class indices. Got dtype {y.dtype}.")
    if len(y) != s.shape[0]:
        raise ClassAwareError(f"The 'scores' parameter must have one row per label of 'y_true' ({len(y)}). Got shape "
                              f"{s.shape}.")
    k = s.shape[1] if num_classes is None else check_num_classes(num_classes)
    if s.shape[1] != k:
        raise ClassAwareError(f"The 'scores' parameter has {s.shape[1]} columns, but num_classes={k}.")
    important = check_important_classes(important_classes, k)
    if len(y) == 0:
        raise ClassAwareError("The 'y_true' parameter is empty: there is nothing to evaluate.")
    if y.min() < 0 or y.max() >= k:
        raise ClassAwareError(f"The 'y_true' parameter holds labels outside [0, {k}) for a {k}-class model: "
                              f"{sorted(set(y[(y < 0) | (y >= k)].tolist()))[:5]}.")
    if not np.isfinite(s).all():
        raise ClassAwareError("The 'scores' parameter (the model's outputs) holds NaN or inf; no metric can be computed "
                              "from them.")
    labels = list(range(k))
    pred = s.argmax(1)
    cm = confusion_matrix(y, pred, labels=labels)
    recall = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    prob = softmax(s)
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


def _predictions(name: str, value: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` as :func:`predict` gives them, checked: one row of logits per label."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ClassAwareError(f"The '{name}' parameter must be (labels, logits) as predict() returns them. Got "
                              f"{type(value).__name__}.")
    y, z = _as_array(name, value[0], 1), _as_array(name, value[1], 2)
    if len(y) != len(z) or not np.issubdtype(y.dtype, np.integer) or not np.isfinite(z).all():
        raise ClassAwareError(f"The '{name}' parameter must be (labels, logits): integer labels and one finite row of "
                              f"logits per label. Got {y.dtype} labels of shape {y.shape}, logits of shape {z.shape}.")
    return y, z


def _as_array(name: str, value: Any, ndim: int) -> np.ndarray:
    """``value`` as a numeric numpy array of ``ndim`` dimensions (a tensor is moved to the CPU), or an error naming
    the parameter."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ClassAwareError(f"The '{name}' parameter must be a {ndim}-D array of numbers: {e}") from None
    if a.ndim != ndim or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ClassAwareError(f"The '{name}' parameter must be a {ndim}-D array of numbers. Got dtype {a.dtype}, shape "
                              f"{a.shape}.")
    return a.astype(np.float64) if ndim == 2 else a


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of logits, computed stably."""
    shifted = scores - scores.max(1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(1, keepdims=True)


def fpr_of(ev: Evaluation, c: int) -> float:
    """False-positive rate of class ``c`` at argmax: FP / (samples not of class ``c``)."""
    negatives = ev.num_samples - ev.support[c]
    return ev.fp[c] / negatives if negatives else float("nan")


@dataclass
class OperatingPoint:
    """FN of an important class at a fixed false-positive rate (one-vs-rest on its softmax probability).

    The threshold is chosen on validation (the largest FPR not above the target), then applied to test, so two
    models are compared at the same FP budget instead of at argmax, where a bias shift trades FN for FP freely.
    """

    target_fpr: float
    threshold: float
    val_fpr: float
    test_fn: int
    test_fpr: float

    def to_dict(self) -> dict[str, float]:
        return {"target_fpr": self.target_fpr, "threshold": self.threshold, "val_fpr": self.val_fpr,
                "test_fn": self.test_fn, "test_fpr": self.test_fpr}


def fn_at_fpr(val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], c: int,
              target_fpr: float) -> OperatingPoint:
    """FN of class ``c`` on test at the lowest threshold (the highest recall) whose validation FPR is not above
    ``target_fpr``.

    ``val`` and ``test`` are ``(labels, logits)`` as :func:`predict` returns them.

    Example:
        >>> y = np.array([0, 0, 1, 1]); z = np.array([[2., 0.], [0., 1.], [0., 3.], [1., 0.]])
        >>> fn_at_fpr((y, z), (y, z), c=1, target_fpr=0.5).test_fn   # threshold 0.27: one FP, both positives found
        0
    """
    check_number("target_fpr", target_fpr, low=0.0, high=1.0)
    (yv, zv), (yt, zt) = (_predictions(name, p) for name, p in (("val", val), ("test", test)))
    check_number("c", c, low=0, high=zv.shape[1] - 1, integer=True)
    pos_v = yv == c
    if pos_v.all() or not pos_v.any():
        raise ClassAwareError(f"The validation split needs positives and negatives of class {c} to choose a threshold.")
    fpr, _, thresholds = roc_curve(pos_v, softmax(zv)[:, c], drop_intermediate=False)
    i = int(np.nonzero(fpr <= target_fpr + 1e-12)[0][-1])
    thr = float(thresholds[i])
    pt = softmax(zt)[:, c]
    pos_t = yt == c
    neg_t = max(int((~pos_t).sum()), 1)
    return OperatingPoint(float(target_fpr), thr, float(fpr[i]), int((pt[pos_t] < thr).sum()),
                          float((pt[~pos_t] >= thr).sum() / neg_t))


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits over a loader, in eval mode (the model's mode is restored after). Under torch.distributed,
    those of every rank's loader (each rank passing its share, :func:`~.distributed.shard_loader`)."""
    if not isinstance(model, nn.Module):
        raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
    check_loader("loader", loader, model)
    was_training = model.training
    model.eval()
    device = distributed.model_device(model)
    ys, outs = [], []
    try:
        for i, batch in enumerate(loader, start=1):
            x, y = batch[0], batch[1]
            check_batch(i, x, y)
            outs.append(run_model(model, x.to(device), i).float().cpu())
            ys.append(y.cpu())
    finally:
        model.train(was_training)
    if not ys:
        raise ClassAwareError("The 'loader' parameter must yield at least one batch. Got an empty loader.")
    # Under torch.distributed each rank predicted its share: every rank gets all of them (rank order).
    return (distributed.all_gather_cat(torch.cat(ys)).numpy(), distributed.all_gather_cat(torch.cat(outs)).numpy())


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    important_classes: Sequence[int],
    num_classes: int | None = None,
) -> Evaluation:
    """Run ``model`` over ``loader`` once and compute :class:`Evaluation`."""
    y, logits = predict(model, loader)
    return evaluate_predictions(y, logits, important_classes, num_classes)
