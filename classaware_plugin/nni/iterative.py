"""FN-constrained iterative structured pruning with NNI: masks are the state, speed-up at the end.

Step n raises the sparse ratio of the config_list to ``r + (1 - r) * fraction``, runs ``ClassAwarePruner`` on
calibration batches, bakes the masks into the weights (pruned filters and their BatchNorm become exactly 0, so
they also score lowest at the next step) and fine-tunes with the masks held at zero. A rejected step restores
the model copy, the masks and the ratio. ``finalize()`` runs NNI's ModelSpeedup on the last compliant state.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.backend import ModelBackend
from ..core.controller import NothingToPrune
from ..measure import count_params_macs
from ._compat import bake_masks, silenced
from .allocation import config_list_for, prunable_units
from .io import speedup
from .pruner import ClassAwarePruner


class NNIBackend(ModelBackend):
    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        val_loader: Iterable[Any],
        important_classes: Sequence[int],
        calib_loader: Iterable[Any],
        finetune: Callable[[nn.Module], None] | None,
        config_list: list[dict[str, Any]] | None = None,
        pruner_kwargs: dict[str, Any] | None = None,
        calib_batches: int | None = None,
        latency_probe: Callable[[nn.Module], float] | None = None,
        cert_loader: Iterable[Any] | None = None,
        allocation: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(model, val_loader, important_classes, finetune, example_inputs=example_inputs,
                         counter=count_params_macs, latency_probe=latency_probe, cert_loader=cert_loader)
        # with a searched allocation (unit -> kept fraction), every step takes each unit a share of the way to it
        self.allocation = dict(allocation) if allocation is not None else None
        self.units = prunable_units(model) if allocation is not None else []
        self.calib_loader = calib_loader
        self.config_list = config_list or [{"op_types": ["Conv2d"], "granularity": "out_channel"}]
        self.pruner_kwargs = dict(pruner_kwargs or {})
        self.calib_batches = calib_batches
        self.masks: dict[str, dict[str, torch.Tensor]] = {}
        self.ratio = 0.0

    # ----------------------------------------------------------------- backend interface
    def prune(self, fraction: float) -> None:
        ratio = self.ratio + (1.0 - self.ratio) * fraction
        if ratio >= 0.999:
            raise NothingToPrune()
        if self.allocation is not None:  # the ratio is the progress towards the allocated widths
            config = config_list_for(self.units, self.allocation, ratio)
        else:
            config = [dict(c, sparse_ratio=float(ratio)) for c in self.config_list]
        pruner = ClassAwarePruner(self.model, config, important_classes=self.important_classes,
                                  calib_loader=self.calib_loader, max_batches=self.calib_batches, **self.pruner_kwargs)
        _, masks = pruner.compress()
        with silenced():
            pruner.unwrap_model()
        bake_masks(self.model, masks)
        self.masks, self.ratio = masks, ratio

    def finetune(self) -> None:
        if self._finetune is None:
            return
        modules = dict(self.model.named_modules())
        handles = []
        for name, targets in self.masks.items():
            module = modules[name]

            def hold(mod: nn.Module, _inputs: Any, targets: dict[str, torch.Tensor] = targets) -> None:
                with torch.no_grad():
                    for t, mask in targets.items():
                        getattr(mod, t).mul_(mask)

            handles.append(module.register_forward_pre_hook(hold))
        try:
            super().finetune()
        finally:
            for h in handles:
                h.remove()
            bake_masks(self.model, self.masks)

    def snapshot(self) -> Any:
        return super().snapshot(), copy.deepcopy(self.masks), self.ratio

    def restore(self, state: Any) -> None:
        super().restore(state[0])
        self.masks, self.ratio = copy.deepcopy(state[1]), state[2]
        self.invalidate()

    def extra_state(self) -> dict[str, Any]:
        return {"masks": copy.deepcopy(self.masks), "ratio": self.ratio}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.masks, self.ratio = copy.deepcopy(state.get("masks", {})), float(state.get("ratio", 0.0))

    def measured_model(self) -> nn.Module:
        """The model NNI's speed-up would produce from the current masks (a copy; the masks stay the state)."""
        return speedup(copy.deepcopy(self.model), self.example_inputs, self.masks) if self.masks else self.model

    def measure_key(self) -> Any:
        return self.ratio  # the architecture follows from the masks, which follow from the ratio

    def extra_measures(self) -> dict[str, float]:
        return {"sparse_ratio": self.ratio}

    def finalize(self) -> nn.Module:
        """Remove the pruned channels for real (NNI ModelSpeedup, fixed for current torch)."""
        if self.masks:
            speedup(self.model, self.example_inputs, self.masks)
        return self.model
