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

from ..core.validation import ClassAwareError, check_important_classes, check_loader, check_number
from ..core.channels import ChannelScores
from ..core.modelstate import infer_num_classes
from ..core.scores import DEFAULT_SCORE, Score, make_score, reduce_to_channels, score_class, validate_score
from ..core.statistics import ScoreMap, StaleStatisticsError, fingerprint, parameterised_modules

log = logging.getLogger(__name__)

_OUT = (function.prune_conv_out_channels, function.prune_linear_out_channels)
_DEPTHWISE = (function.prune_depthwise_conv_out_channels, function.prune_depthwise_conv_in_channels)
_IN = (function.prune_conv_in_channels, function.prune_linear_in_channels)
_NORM = (
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
    function.prune_groupnorm_out_channels,
)


class ClassAwareImportance(tp.importance.GroupMagnitudeImportance):
    """Class-dependent channel importance for Torch-Pruning.

    Args:
        important_classes: classes whose false negatives must be kept.
        score: a registered core score: ``'fisher'`` (class-conditional Fisher, default), ``'taylor_signed'``,
            ``'magnitude_increase'`` (the paper's ``|w_T| - |w_0|``; call :meth:`set_rewind_point`), ``'magnitude'``.
        omega: the score's weight of each important class (one value or ``{class: weight}``; ``None``: the score's
            default). The options below likewise: an option the score does not have is refused.
        rest_weight: the score's weight of the other classes.
        weighting: Fisher: ``'balanced'`` (each class bucket's mean) or ``'count'`` (every sample alike).
        loss: Fisher: ``'ce'`` or ``'margin'`` (the log-odds margin for the important classes' samples).
        normalization: ``taylor_signed``: ``'none'`` or ``'mean'``.
        model: drop-in mode, with ``dataloader``: statistics are refreshed automatically at every pruning step.
        dataloader: the calibration batches of drop-in mode (checked at once: not empty, ``(inputs, labels)``
            batches the model can take).
        max_batches: calibration batches per refresh (None = the whole loader).
        num_classes: the model's output width (inferred from one batch when omitted).
        group_reduction: Torch-Pruning's own option.
        normalizer: Torch-Pruning's own option (``'auto'`` is ``'mean'``, or ``None`` for the signed
            magnitude-increase score, whose mean can be negative).
        bias: include biases (BatchNorm shifts are always included).

    Example (one line changed in a Torch-Pruning script)::

        imp = ClassAwareImportance(important_classes=[3], model=model, dataloader=calib_loader)
        pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.5, ignored_layers=[model.fc])
        pruner.step()
    """

    def __init__(
        self,
        important_classes: Sequence[int],
        score: str = DEFAULT_SCORE,
        omega: float | Mapping[int, float] | None = None,
        rest_weight: float | None = None,
        weighting: str | None = None,
        loss: str | None = None,
        normalization: str | None = None,
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
        if model is not None:
            if not isinstance(model, nn.Module):
                raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
            check_loader("dataloader", dataloader, model, num_classes)
        self.score_kwargs = validate_score(score, check_important_classes(important_classes, num_classes), num_classes,
                                           omega=omega, rest_weight=rest_weight, weighting=weighting, loss=loss,
                                           normalization=normalization)
        if normalizer == "auto":
            normalizer = None if score_class(score).signed else "mean"
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, bias=bias)
        self.important_classes = check_important_classes(important_classes, num_classes)
        self.score_name = score
        self.model = model
        self.dataloader = dataloader
        self.max_batches = max_batches
        self.num_classes = num_classes
        self.progress = progress
        self.score: Score | None = None
        if num_classes is not None or not score_class(score).needs_data:
            self._build_score(num_classes)
        self._bound_model: nn.Module | None = model
        self._cache: ChannelScores | ScoreMap | None = None
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
        if not isinstance(model, nn.Module):
            raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
        if self.score is None:
            n = infer_num_classes(model, loader)
            check_important_classes(self.important_classes, n)
            self._build_score(n)
        assert self.score is not None
        self._bound_model = model
        self.score.collect(model, loader, max_batches=max_batches or self.max_batches, progress=self.progress,
                           granularity="channel")
        self._cache = None
        self.refreshes += 1
        return self

    def set_rewind_point(self, model: nn.Module) -> None:
        """For ``score='magnitude_increase'``: the weights ``w_0`` to compare against."""
        if self.score is None or not self.score.needs_rewind:
            raise ClassAwareError(f"set_rewind_point() is for score='magnitude_increase', not {self.score_name!r}.")
        self.score.set_rewind_point(model)
        self._bound_model = model
        self._cache = None

    def _scores(self) -> ChannelScores | ScoreMap:
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
        key = fingerprint(m for _, m in parameterised_modules(model))
        if self._cache is None or key != self._cache_key:
            channels = self.score.channel_scores(model)
            self._cache = channels if channels is not None else self.score.element_scores(model)
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
        scores = self._scores()
        if isinstance(scores, ChannelScores):
            return self._gate_importance(group, scores)
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
        return self._finish(group_imp, group_idxs)

    def _finish(self, group_imp: list[torch.Tensor], group_idxs: list[list[int]]) -> torch.Tensor:
        reduced = self._reduce(group_imp, group_idxs)
        if not bool((reduced != 0).any()):
            return reduced  # a group no sample depends on (dead channels): zeros, not TP's 0/0 = NaN under 'mean'
        return self._normalize(reduced, self.normalizer)

    def _gate_importance(self, group: Any, scores: ChannelScores) -> torch.Tensor | None:
        # Every gate whose channels the group removes counts once (a conv and its BatchNorm share one gate).
        group_imp: list[torch.Tensor] = []
        group_idxs: list[list[int]] = []
        seen: set[int] = set()
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            if not (fn in _OUT or fn in _DEPTHWISE or fn in _NORM):
                continue
            gate = scores.gate(layer)
            if gate is None or id(gate) in seen or gate not in scores.values:
                continue
            seen.add(id(gate))
            group_imp.append(scores.values[gate][list(idxs)].float())
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._finish(group_imp, group_idxs)

    def __repr__(self) -> str:
        return (
            f"ClassAwareImportance(important_classes={self.important_classes}, score={self.score_name!r}, "
            f"{', '.join(f'{k}={v!r}' for k, v in self.score_kwargs.items())}, group_reduction={self.group_reduction!r}, "
            f"normalizer={self.normalizer!r})"
        )
