"""``ClassAwareImportance``: a Torch-Pruning importance estimator driven by the core's class-dependent score.

It reduces the core's element scores to one score per root channel of a Torch-Pruning group, over every
coupled tensor: conv and linear output filters and input slices, depthwise convs (which TP's own
estimators skip), BatchNorm scale *and* shift, LayerNorm/GroupNorm. ``group_reduction`` and
``normalizer`` are TP's own (inherited from ``GroupMagnitudeImportance``), so ``global_pruning=True`` and
``pruning_ratio_dict`` behave as with TP's estimators.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from ..core._validation import ClassAwareError, check_important_classes, check_number
from ..core.saliency import ScoreMap, StaleStatisticsError, _fingerprint, parameterised_modules
from ..core.scores import Score, make_score, reduce_to_channels

log = logging.getLogger(__name__)

_OUT = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_DEPTHWISE = (function.prune_depthwise_conv_out_channels, function.prune_depthwise_conv_in_channels)
_IN = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_NORM = (
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
    function.prune_groupnorm_out_channels,
)
_SIGNED_SCORES = ("magnitude_increase",)


def _infer_num_classes(model: nn.Module, loader: Iterable[Any]) -> int:
    x = next(iter(loader))[0]
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x[:2].to(next(model.parameters()).device))
    model.train(was)
    return int(out.shape[1])


class ClassAwareImportance(tp.importance.GroupMagnitudeImportance):
    """Class-dependent channel importance for Torch-Pruning.

    Args:
        important_classes: classes whose false negatives must be kept.
        score: a registered core score: ``'taylor'`` (class-dependent Taylor, default),
            ``'magnitude_increase'`` (the paper's ``|w_T| - |w_0|``; call :meth:`set_rewind_point`), ``'magnitude'``.
        omega, rest_weight, normalization: the class-dependent Taylor options (see ``ClassDependentTaylor``).
        model, dataloader: drop-in mode: statistics are refreshed automatically at every pruning step.
        max_batches: calibration batches per refresh (None = the whole loader).
        num_classes: the model's output width (inferred from one batch when omitted).
        group_reduction, normalizer: Torch-Pruning's own options (``normalizer='auto'`` is ``'mean'``, or
            ``None`` for the signed magnitude-increase score, whose mean can be negative).
        bias: include biases (BatchNorm shifts are always included).

    Example (one line changed in a Torch-Pruning script)::

        imp = ClassAwareImportance(important_classes=[3], model=model, dataloader=calib_loader)
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner.step()
    """

    def __init__(
        self,
        important_classes: Sequence[int],
        score: str = "taylor",
        omega: float | Mapping[int, float] = 4.0,
        rest_weight: float = 1.0,
        normalization: str = "none",
        model: nn.Module | None = None,
        dataloader: Iterable[Any] | None = None,
        max_batches: int | None = None,
        num_classes: int | None = None,
        group_reduction: str = "mean",
        normalizer: str | None = "auto",
        bias: bool = True,
        progress: bool = False,
    ) -> None:
        if (model is None) != (dataloader is None):
            raise ClassAwareError(
                "The 'model' and 'dataloader' parameters go together (drop-in mode); got only "
                f"{'model' if model is not None else 'dataloader'}."
            )
        if max_batches is not None:
            check_number("max_batches", max_batches, low=1, integer=True)
        if normalizer == "auto":
            normalizer = None if score in _SIGNED_SCORES else "mean"
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, bias=bias)
        self.important_classes = check_important_classes(important_classes, num_classes)
        self.score_name = score
        self.score_kwargs = dict(omega=omega, rest_weight=rest_weight, normalization=normalization)
        self.model = model
        self.dataloader = dataloader
        self.max_batches = max_batches
        self.num_classes = num_classes
        self.progress = progress
        self.score: Score | None = None
        if num_classes is not None or score != "taylor":
            self._build_score(num_classes)
        self._bound_model: nn.Module | None = model
        self._cache: ScoreMap | None = None
        self._cache_key: Any = None
        self.refreshes = 0

    # ----------------------------------------------------------------- statistics
    def _build_score(self, num_classes: int | None) -> None:
        self.score = make_score(
            self.score_name, important_classes=self.important_classes, num_classes=num_classes, **self.score_kwargs
        )
        self.num_classes = num_classes

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> ClassAwareImportance:
        """Gather class-dependent statistics on ``loader``; call before each ``pruner.step()`` (explicit mode)."""
        if self.score is None or (self.score_name == "taylor" and self.num_classes is None):
            n = _infer_num_classes(model, loader)
            check_important_classes(self.important_classes, n)
            self._build_score(n)
        assert self.score is not None
        self._bound_model = model
        self.score.collect(model, loader, max_batches=max_batches or self.max_batches, progress=self.progress)
        self._cache = None
        self.refreshes += 1
        return self

    def set_rewind_point(self, model: nn.Module) -> None:
        """For ``score='magnitude_increase'``: the weights ``w_0`` to compare against."""
        if self.score is None or not hasattr(self.score, "set_rewind_point"):
            raise ClassAwareError(f"set_rewind_point() is for score='magnitude_increase', not {self.score_name!r}.")
        self.score.set_rewind_point(model)  # type: ignore[attr-defined]
        self._bound_model = model
        self._cache = None

    def _element_scores(self) -> ScoreMap:
        if self.score is None or (self.score.needs_data and not self._is_fresh()):
            if self.model is None:
                if self.score is None:
                    raise StaleStatisticsError(
                        "No statistics collected yet: call imp.collect(model, loader) before pruner.step(), or "
                        "construct ClassAwareImportance(..., model=model, dataloader=loader) for automatic refresh."
                    )
                self.score.check_fresh()  # raises with the precise reason
            else:
                log.debug("refreshing class-aware statistics")
                self.collect(self.model, self.dataloader)  # type: ignore[arg-type]
        assert self.score is not None
        self.score.check_fresh()
        model = self._bound_model
        if model is None:
            raise ClassAwareError(
                f"score={self.score_name!r} needs the model: pass model= and dataloader=, or call collect(model, loader)."
            )
        key = _fingerprint(m for _, m in parameterised_modules(model))
        if self._cache is None or key != self._cache_key:
            self._cache = self.score.element_scores(model)
            self._cache_key = key
        return self._cache

    def _is_fresh(self) -> bool:
        try:
            self.score.check_fresh()  # type: ignore[union-attr]
            return True
        except StaleStatisticsError:
            return False

    # ----------------------------------------------------------------- TP interface
    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        scores = self._element_scores()
        group_imp: list[torch.Tensor] = []
        group_idxs: list[list[int]] = []
        for i, (dep, idxs) in enumerate(group):
            layer, fn, root_idxs = dep.target.module, dep.handler, group[i].root_idxs
            s = scores.get(layer)
            if s is None:
                continue
            idxs = list(idxs)
            local: list[torch.Tensor] = []
            transposed = getattr(layer, "transposed", False)
            if fn in _OUT or fn in _DEPTHWISE:
                local.append(reduce_to_channels(s["weight"], 1 if transposed else 0)[idxs])
                if self.bias and "bias" in s:
                    local.append(s["bias"][idxs])
            elif fn in _IN:
                ch = reduce_to_channels(s["weight"], 0 if transposed else 1)
                groups = getattr(layer, "groups", 1)
                if fn == function.prune_conv_in_channels and groups not in (1, layer.in_channels):
                    ch = ch.repeat(groups)
                local.append(ch[idxs])
            elif fn in _NORM:
                for name in ("weight", "bias"):
                    if name in s:
                        local.append(s[name][idxs])
            else:
                continue
            for t in local:
                group_imp.append(t.float())
                group_idxs.append(root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)

    def __repr__(self) -> str:
        return (
            f"ClassAwareImportance(important_classes={self.important_classes}, score={self.score_name!r}, "
            f"{', '.join(f'{k}={v!r}' for k, v in self.score_kwargs.items())}, group_reduction={self.group_reduction!r}, "
            f"normalizer={self.normalizer!r})"
        )
