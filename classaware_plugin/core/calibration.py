"""Decision calibration (METHOD.md part C): the smallest non-negative shift of the important classes'
logits that brings validation FN back to the dense level, folded into the last layer's bias."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .validation import ClassAwareError, check_important_classes, check_number
from .metrics import Evaluation, _predictions, evaluate_predictions, predict


@dataclass
class Calibration:
    """Per important class: the logit shift, and validation FN/FP before and after it."""

    shifts: dict[int, float]
    before: Evaluation
    after: Evaluation

    def to_dict(self) -> dict[str, Any]:
        return {
            "shifts": {str(c): s for c, s in self.shifts.items()},
            "fn_before": {str(c): self.before.fn[c] for c in self.shifts},
            "fn_after": {str(c): self.after.fn[c] for c in self.shifts},
            "fp_before": {str(c): self.before.fp[c] for c in self.shifts},
            "fp_after": {str(c): self.after.fp[c] for c in self.shifts},
            "accuracy_before": self.before.accuracy,
            "accuracy_after": self.after.accuracy,
        }


def _fn(y: np.ndarray, logits: np.ndarray, c: int) -> int:
    return int(((y == c) & (logits.argmax(1) != c)).sum())


def find_logit_shifts(
    y: np.ndarray, logits: np.ndarray, target_fn: Mapping[int, int], max_rounds: int = 10
) -> dict[int, float]:
    """Smallest non-negative per-class shifts with FN_c <= target_fn[c], by coordinate passes.

    For one class the answer is exact: the k-th smallest margin a missed positive needs, k = FN - target.
    With several classes each is solved with the others fixed, repeated until nothing changes.
    """
    y, logits = _predictions("y and logits", (y, logits))
    if not isinstance(target_fn, Mapping):
        raise ClassAwareError(f"The 'target_fn' parameter must map classes to FN counts. Got {type(target_fn).__name__}.")
    for c, target in target_fn.items():
        check_number("target_fn class", c, low=0, high=logits.shape[1] - 1, integer=True)
        check_number("target_fn", target, low=0, integer=True)
    shifts = {c: 0.0 for c in target_fn}
    for _ in range(max_rounds):
        changed = False
        for c, target in target_fn.items():
            z = logits.copy()
            for other, s in shifts.items():
                if other != c:
                    z[:, other] += s
            z[:, c] += shifts[c]
            excess = _fn(y, z, c) - int(target)
            if excess <= 0:
                continue
            pos = y == c
            others = np.delete(z[pos], c, axis=1).max(1)
            need = others - z[pos, c]
            need = np.sort(need[need >= 0])
            gap = float(need[excess - 1])
            # Step just past the tie so argmax picks class c.
            shifts[c] += float(np.nextafter(np.float32(gap), np.float32(np.inf))) + 1e-6 * max(1.0, abs(gap))
            changed = True
        if not changed:
            break
    return shifts


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in module order (its classifier for usual architectures)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ClassAwareError("Decision calibration needs the model's last layer to be an nn.Linear; found none.")
    return linears[-1]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    loader: Iterable[Any],
    important_classes: Sequence[int],
    target_fn: Mapping[int, int] | None = None,
    layer: nn.Linear | None = None,
    shifts: Mapping[int, float] | None = None,
) -> Calibration:
    """Shift the important classes' logits so validation FN <= ``target_fn`` and fold it into the bias; or, given
    ``shifts`` instead (e.g. those a certified step was tested with), fold exactly those.

    The shift is checked: the model's logits after folding must equal the logits before plus the
    shift (otherwise ``layer`` is not the output layer and an error is raised, leaving the model as it was).
    """
    important = check_important_classes(important_classes, None)
    if (target_fn is None) == (shifts is None):
        raise ClassAwareError("Give calibrate() exactly one of 'target_fn' (FN to reach) and 'shifts' (shifts to fold).")
    name, given = ("target_fn", target_fn) if target_fn is not None else ("shifts", shifts)
    if not isinstance(given, Mapping):
        raise ClassAwareError(f"The '{name}' parameter must map each important class to a value. Got {given!r}.")
    missing = [c for c in important if c not in given]
    if missing:
        raise ClassAwareError(f"The '{name}' parameter has no entry for important classes {missing}.")
    for c in important:
        check_number(name, given[c], low=0, integer=name == "target_fn")
    y, logits = predict(model, loader)
    before = evaluate_predictions(y, logits, important)
    if shifts is not None:
        shifts = {c: float(shifts[c]) for c in important}
    else:
        shifts = find_logit_shifts(y, logits, {c: int(target_fn[c]) for c in important})  # type: ignore[index]
    layer = layer or last_linear(model)
    if layer.out_features != logits.shape[1]:
        raise ClassAwareError(
            f"The layer to calibrate has {layer.out_features} outputs but the model has {logits.shape[1]}."
        )
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros(layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype))
    delta = torch.zeros_like(layer.bias)
    for c, s in shifts.items():
        delta[c] = s
    original = layer.bias.detach().clone()
    layer.bias.add_(delta)
    y2, logits2 = predict(model, loader)
    expected = logits + delta.cpu().numpy()[None, :]
    if not np.allclose(logits2, expected, atol=1e-4, rtol=1e-4):
        layer.bias.copy_(original)
        raise ClassAwareError("The chosen layer is not the model's output layer: its bias does not shift the logits.")
    return Calibration(shifts=shifts, before=before, after=evaluate_predictions(y2, logits2, important))
