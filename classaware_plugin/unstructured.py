"""Unstructured pruning with ``torch.nn.utils.prune`` by the class-dependent score: plain PyTorch, neither
Torch-Pruning nor NNI is imported (a test checks it).

``ClassAwarePruningMethod`` is a ``BasePruningMethod``: it masks the elements with the smallest
importance scores. The class-dependent part is the scores, which come from the core
(:func:`class_aware_importance_scores`); :func:`global_class_aware_unstructured` and
:func:`class_aware_unstructured` wire them into ``prune.global_unstructured`` and per-layer pruning.
:class:`UnstructuredBackend` drives them under the FN controller: each step prunes a fraction of the weights that
remain, globally; fine-tuning keeps pruned weights at zero through prune's reparametrisation
(weight = weight_orig * mask).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .core.validation import ClassAwareError, check_number
from .core.backend import ModelBackend
from .core.controller import NothingToPrune
from .core.lottery import MaskSet
from .core.scores import Score


class ClassAwarePruningMethod(prune.BasePruningMethod):
    """Prune the ``amount`` (fraction or count) of elements with the lowest importance score.

    Used by ``prune.global_unstructured(params, pruning_method=ClassAwarePruningMethod,
    importance_scores=scores, amount=0.9)``; with ``importance_scores`` given, PyTorch hands the scores
    (not the weights) to :meth:`compute_mask`.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float | int) -> None:
        prune._validate_pruning_amount_init(amount)
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        n = t.nelement()
        k = prune._compute_nparams_toprune(self.amount, n)
        prune._validate_pruning_amount(k, n)
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        if k:
            # Already-pruned elements rank lowest, then the smallest scores.
            ranked = torch.where(default_mask.bool(), t.float(), torch.full_like(t, -float("inf"), dtype=torch.float))
            idx = torch.topk(ranked.view(-1), k=k, largest=False).indices
            mask.view(-1)[idx] = 0
        return mask

    @classmethod
    def apply(cls, module: nn.Module, name: str, amount: float | int, importance_scores: torch.Tensor | None = None):  # type: ignore[override]
        return super().apply(module, name, amount=amount, importance_scores=importance_scores)


def class_aware_importance_scores(
    score: Score, model: nn.Module, parameters: Sequence[tuple[nn.Module, str]]
) -> dict[tuple[nn.Module, str], torch.Tensor]:
    """Per ``(module, name)`` element scores from a core score, for ``torch.nn.utils.prune``.

    Works before and after ``prune`` reparametrises a tensor (``weight`` -> ``weight_orig`` * mask).
    """
    score.check_fresh()
    smap = score.element_scores(model)
    out = {}
    for module, name in parameters:
        s = smap.get(module, {})
        t = s.get(name, s.get(f"{name}_orig"))
        if t is None:
            raise ClassAwareError(f"No score for {type(module).__name__}.{name}; was it in the scored model?")
        out[(module, name)] = t.detach()
    return out


def default_parameters(model: nn.Module, skip_last: bool = True) -> list[tuple[nn.Module, str]]:
    """Every conv and linear weight (the last linear, the classifier, left out by default)."""
    params = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    if skip_last:
        linears = [i for i, (m, _) in enumerate(params) if isinstance(m, nn.Linear)]
        if linears:
            params.pop(linears[-1])
    return params


def _prepare(model: nn.Module, score: Score, amount: float, parameters: Sequence[tuple[nn.Module, str]] | None):
    check_number("amount", amount, low=0.0, high=1.0, high_open=True)
    params = list(parameters) if parameters is not None else default_parameters(model)
    return params, class_aware_importance_scores(score, model, params)


def global_class_aware_unstructured(
    model: nn.Module, score: Score, amount: float, parameters: Sequence[tuple[nn.Module, str]] | None = None
) -> None:
    """One global threshold over all ``parameters`` (``prune.global_unstructured``)."""
    params, scores = _prepare(model, score, amount, parameters)
    prune.global_unstructured(params, pruning_method=ClassAwarePruningMethod, importance_scores=scores, amount=amount)


def class_aware_unstructured(
    model: nn.Module, score: Score, amount: float, parameters: Sequence[tuple[nn.Module, str]] | None = None
) -> None:
    """The same fraction ``amount`` pruned in every tensor (per layer)."""
    params, scores = _prepare(model, score, amount, parameters)
    for module, name in params:
        ClassAwarePruningMethod.apply(module, name, amount=amount, importance_scores=scores[(module, name)])


def masks_of(model: nn.Module) -> MaskSet:
    """The masks ``torch.nn.utils.prune`` holds, as a core :class:`MaskSet` on the reparametrised tensors."""
    masks = MaskSet()
    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                masks.set(m, f"{hook._tensor_name}_orig", getattr(m, f"{hook._tensor_name}_mask"))
    return masks


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` everywhere: bake the masks into plain weights (zeros stay zeros)."""
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)


def sparsity(model: nn.Module, parameters: Iterable[tuple[nn.Module, str]] | None = None) -> float:
    """Fraction of exactly-zero elements over ``parameters`` (default: conv and linear weights but the classifier)."""
    params = list(parameters) if parameters is not None else default_parameters(model)
    total = sum(getattr(m, n).numel() for m, n in params)
    zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in params)
    return zeros / total if total else 0.0


class UnstructuredBackend(ModelBackend):
    """``prune(fraction)``: global unstructured pruning of ``fraction`` of the remaining weights by ``score``."""

    def __init__(
        self,
        model: nn.Module,
        score: Score,
        val_loader: Iterable[Any],
        important_classes: Sequence[int],
        calib_loader: Iterable[Any] | None,
        finetune: Callable[[nn.Module], None] | None,
        calib_batches: int | None = 8,
        parameters: Sequence[tuple[str, str]] | None = None,
        macs: int | None = None,
        cert_loader: Iterable[Any] | None = None,
    ) -> None:
        super().__init__(model, val_loader, important_classes, finetune, cert_loader=cert_loader)
        self.score = score
        self.calib_loader = calib_loader
        self.calib_batches = calib_batches
        names = {id(m): n for n, m in model.named_modules()}
        self.param_names = list(parameters) if parameters is not None else [
            (names[id(m)], n) for m, n in default_parameters(model)
        ]
        self.macs = macs

    def _params(self) -> list[tuple[nn.Module, str]]:
        modules = dict(self.model.named_modules())
        return [(modules[m], n) for m, n in self.param_names]

    def prune(self, fraction: float) -> None:
        params = self._params()
        m = self.measure()
        before = m["zeros"]
        remaining = m["total"] - before
        # An exact count, rounded up: prune's own rounding of a fraction can stop one weight short of a target.
        count = min(remaining, max(1, math.ceil(fraction * remaining - 1e-9)))
        if self.score.needs_data:
            self.score.collect(self.model, self.calib_loader, max_batches=self.calib_batches)  # type: ignore[arg-type]
        scores = class_aware_importance_scores(self.score, self.model, params)
        prune.global_unstructured(params, pruning_method=ClassAwarePruningMethod, importance_scores=scores, amount=int(count))
        if self.measure()["zeros"] == before:
            raise NothingToPrune()

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        params = self._params()
        total = sum(getattr(m, n).numel() for m, n in params)
        zeros = sum(int((getattr(m, n) == 0).sum()) for m, n in params)
        all_params = sum(p.numel() for n, p in self.model.named_parameters() if not n.endswith("_orig"))
        all_params += sum(getattr(m, n).numel() for m, n in params if hasattr(m, f"{n}_orig"))
        out = {"sparsity": zeros / total if total else 0.0, "zeros": zeros, "total": total, "params": all_params - zeros}
        if self.macs is not None:
            out["macs"] = self.macs
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"macs": self.macs}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.macs = state.get("macs", self.macs)

    def finalize(self) -> nn.Module:
        """Bake the masks into plain weights (:func:`make_permanent`): the zeros stay, the reparametrisation goes."""
        make_permanent(self.model)
        return self.model

    def max_fraction(self, key: str, target: float) -> float:
        m = self.measure()
        if key == "sparsity" and m["sparsity"] < target:
            needed = math.ceil(target * m["total"] - 1e-9) - m["zeros"]
            return min(0.99, max(needed, 1) / max(m["total"] - m["zeros"], 1))
        return 0.95


__all__ = [
    "ClassAwarePruningMethod", "UnstructuredBackend", "class_aware_importance_scores", "class_aware_unstructured", "default_parameters",
    "global_class_aware_unstructured", "make_permanent", "masks_of", "sparsity",
]
