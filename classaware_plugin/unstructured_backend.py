"""Unstructured (weight-level) pruning under the FN controller, with ``torch.nn.utils.prune`` masks.

Framework-neutral: plain PyTorch. Each step prunes a fraction of the weights that remain, globally, by a core
score; fine-tuning keeps pruned weights at zero through prune's reparametrisation (weight = weight_orig * mask).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .core.backend import ModelBackend
from .core.controller import NothingToPrune
from .core.scores import Score


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
    ) -> None:
        from .torch_pruning.unstructured import default_parameters

        super().__init__(model, val_loader, important_classes, finetune)
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
        from .torch_pruning.unstructured import ClassAwarePruningMethod, class_aware_importance_scores

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

    def max_fraction(self, key: str, target: float) -> float:
        m = self.measure()
        if key == "sparsity" and m["sparsity"] < target:
            needed = math.ceil(target * m["total"] - 1e-9) - m["zeros"]
            return min(0.99, max(needed, 1) / max(m["total"] - m["zeros"], 1))
        return 0.95
