"""``ClassAwarePruner``: NNI's data-driven pruner template (collect data -> metrics -> sparsity) with the core's
class-dependent score.

Labels come through the evaluator: the training loss is patched to capture each training batch (inputs and
labels) during the first ``training_steps`` optimiser steps, exactly where NNI's ``TaylorPruner`` collects
gradients; when the last of them is done, the core's statistics are computed on those batches and the masks
generated. Without an evaluator, pass ``calib_loader`` and call ``compress()``.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
from torch import nn

from ..core.modelstate import infer_num_classes
from ..core.scores import DEFAULT_SCORE, Score, make_score, score_class, validate_score
from ..core.validation import ClassAwareError, check_important_classes, check_loader, check_number
from ..speed import ROUND_TO_CONSTRAINT
from ._compat import apply as _apply_compat
from ._compat import silenced

_apply_compat()

from nni.compression.base.wrapper import ModuleWrapper  # noqa: E402
from nni.compression.pruning import TaylorPruner  # noqa: E402
from nni.compression.pruning.tools import generate_sparsity, is_active_target, norm_metrics  # noqa: E402

from .config import prepare_config_list  # noqa: E402

log = logging.getLogger(__name__)

Batch = Any


def default_batch_to_xy(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ClassAwareError(
        "ClassAwarePruner reads (inputs, labels) from each training batch; this batch is a "
        f"{type(batch).__name__}. Pass batch_to_xy=lambda batch: (inputs, labels)."
    )


class ClassAwarePruner(TaylorPruner):
    """Class-dependent pruning for NNI.

    Args:
        model: the model to prune, as for NNI's ``TaylorPruner``.
        config_list: as for NNI; camelCase keys accepted. ``granularity`` 'default' (or absent) is element-wise
            (unstructured), 'out_channel' prunes filters. It is checked (unknown op types/names, ``sparse_ratio``
            outside (0, 1), global mode with ``max_sparse_ratio``); for ``granularity='out_channel'`` residual
            dependency groups and BatchNorm alignment are added automatically.
        evaluator: NNI's evaluator (its training loss is patched to capture batches), or None with ``calib_loader``.
        training_steps: how many training batches the evaluator's loop feeds the statistics.
        important_classes: classes whose false negatives must be kept.
        score: ``'fisher'`` (class-conditional Fisher, default), ``'taylor_signed'``, ``'magnitude'``. With
            ``granularity='out_channel'`` the Fisher score measures each filter's output channel after its BatchNorm;
            element-wise it scores weights by ``(w * g)^2`` per bucket.
        omega: the score's weight of each important class (``None``: its default). This and the options below are
            the score's own: an option the score does not have is refused.
        rest_weight: the score's weight of the other classes.
        weighting: Fisher: ``'balanced'`` or ``'count'``.
        loss: Fisher: ``'ce'`` or ``'margin'``.
        normalization: ``taylor_signed``: ``'none'`` or ``'mean'``.
        num_classes: the model's output width (inferred from one batch when omitted).
        calib_loader: batches for the statistics when no evaluator is given.
        max_batches: at most this many batches feed the statistics.
        batch_to_xy: how to read (inputs, labels) from a training batch.
        round_to: with ``granularity='out_channel'``, every pruned layer keeps a multiple of this many filters (the
            multiple nearest to what ``sparse_ratio`` asks for, at least one; entries are split per module for it),
            so that the sped-up model runs fast. ``None`` (default) keeps NNI's meaning of ``sparse_ratio`` exactly.

    Example:
        >>> pruner = ClassAwarePruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5,
        ...                                     "granularity": "out_channel"}], evaluator, training_steps=20,
        ...                           important_classes=[6])                          # doctest: +SKIP
        >>> _, masks = pruner.compress(); pruner.unwrap_model()                       # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: list[dict[str, Any]],
        evaluator: Any = None,
        training_steps: int = 1,
        important_classes: Sequence[int] = (),
        score: str = DEFAULT_SCORE,
        omega: float | Mapping[int, float] | None = None,
        rest_weight: float | None = None,
        weighting: str | None = None,
        loss: str | None = None,
        normalization: str | None = None,
        num_classes: int | None = None,
        calib_loader: Iterable[Batch] | None = None,
        max_batches: int | None = None,
        batch_to_xy: Callable[[Batch], tuple[torch.Tensor, torch.Tensor]] = default_batch_to_xy,
        align_batchnorm: bool = True,
        dependency_groups: bool = True,
        existed_wrappers: dict[str, ModuleWrapper] | None = None,
        round_to: int | None = None,
    ) -> None:
        important = check_important_classes(important_classes, num_classes)
        check_number("training_steps", training_steps, low=1, integer=True)
        score_kwargs = validate_score(score, important, num_classes, omega=omega, rest_weight=rest_weight,
                                      weighting=weighting, loss=loss, normalization=normalization)
        if score_class(score).needs_rewind:
            raise ClassAwareError(f"score={score!r} is not available in ClassAwarePruner (it needs a rewind point); "
                                  "use 'fisher'.")
        if evaluator is None and calib_loader is None:
            raise ClassAwareError("ClassAwarePruner needs an 'evaluator' (NNI's flow) or a 'calib_loader'.")
        if not isinstance(model, nn.Module):
            raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
        if calib_loader is not None and batch_to_xy is default_batch_to_xy:  # a custom batch layout is the user's
            check_loader("calib_loader", calib_loader, model, num_classes)
        if max_batches is not None:
            check_number("max_batches", max_batches, low=1, integer=True)
        ROUND_TO_CONSTRAINT.check("round_to", round_to)
        if existed_wrappers is None:
            config_list = prepare_config_list(model, config_list, align_batchnorm, dependency_groups, round_to)
        with silenced():
            super().__init__(model, config_list, evaluator, training_steps, existed_wrappers=existed_wrappers)
        self.important_classes = important
        self.num_classes = num_classes
        self.score_name = score
        self.score_kwargs = score_kwargs  # the real score is built when the number of classes is known
        self.calib_loader = calib_loader
        self.max_batches = max_batches
        self.batch_to_xy = batch_to_xy
        self._batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._channel_level = False

    def _set_default_sparse_granularity(self, target_space: Any) -> None:
        # granularity 'default' (or absent) means element-wise, as for NNI's LevelPruner; 'out_channel' = filters.
        return None

    # ----------------------------------------------------------------- NNI's three steps
    def _make_score(self, loader: Iterable[Batch]) -> Score:
        n = self.num_classes
        if n is None:
            n = infer_num_classes(self.bound_model, loader)
            check_important_classes(self.important_classes, n)
        return make_score(self.score_name, important_classes=self.important_classes, num_classes=n, **self.score_kwargs)

    def _collect_data(self) -> dict[str, dict[str, torch.Tensor]]:
        # Step 1: class-dependent element scores from the captured training batches (or the calibration loader).
        loader: Iterable[Batch] = self._batches if self._batches else (self.calib_loader or [])
        if not self._batches and self.calib_loader is None:
            raise ClassAwareError("No batch reached ClassAwarePruner: did the evaluator's training loop run?")
        score = self._make_score(loader)
        active = [space for spaces in self._target_spaces.values() for space in spaces.values() if is_active_target(space)]
        granularity = "channel" if all(s.granularity == "out_channel" or s.align for s in active) else "element"
        if score.needs_data:
            score.collect(self.bound_model, loader, max_batches=self.max_batches, granularity=granularity)
        self._batches = []
        channels = score.channel_scores(self.bound_model) if granularity == "channel" else None
        self._channel_level = channels is not None
        data: dict[str, dict[str, torch.Tensor]] = {}
        if channels is not None:
            # Each output channel's score broadcast over its block; _calculate_metrics takes the block mean back.
            modules = dict(self.bound_model.named_modules())
            for name, spaces in self._target_spaces.items():
                v = channels.for_module(modules[name])
                for target_name, space in spaces.items():
                    if v is not None and is_active_target(space) and space.target is not None:
                        t = space.target
                        data.setdefault(name, {})[target_name] = v.to(t.device).view(-1, *[1] * (t.ndim - 1)).expand_as(t)
            return data
        scores = score.element_scores(self.bound_model)
        for owner, tensors in scores.items():
            if not isinstance(owner, ModuleWrapper):
                continue
            spaces = self._target_spaces.get(owner.name, {})
            for target_name, value in tensors.items():
                space = spaces.get(target_name)
                if space is not None and is_active_target(space):
                    data.setdefault(owner.name, {})[target_name] = value
        return data

    def _calculate_metrics(self, data: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        # Step 2: element scores summed per NNI block (a filter for 'out_channel'), smaller = pruned; channel scores
        # (broadcast over their block) are the block mean.
        if not self._channel_level:
            return norm_metrics(p=1, data=data, target_spaces=self._target_spaces)
        metrics: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensors in data.items():
            for target_name, value in tensors.items():
                scaler = self._target_spaces[name][target_name]._scaler
                metrics.setdefault(name, {})[target_name] = (
                    value if scaler is None else scaler.shrink(value, lambda t: t.mean(dim=-1), keepdim=True))
        return metrics

    def _generate_sparsity(self, metrics: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        # Step 3: NNI's own threshold -> dependency group -> global group -> sparse ratio -> align.
        return generate_sparsity(metrics, self._target_spaces)

    def _register_hooks(self, evaluator: Any) -> None:
        def capture(loss: torch.Tensor, batch: Batch) -> torch.Tensor:
            if self._current_step < self.training_steps:
                x, y = self.batch_to_xy(batch)
                self._batches.append((x.detach(), y.detach()))
            return loss

        evaluator.patch_loss(capture)

    def generate_masks(self) -> dict[str, dict[str, torch.Tensor]]:
        with silenced():
            masks = super().generate_masks()
        return plain_masks(masks)

    def get_masks(self) -> dict[str, dict[str, torch.Tensor]]:
        """Masks as plain dicts (``torch.load(weights_only=True)`` accepts them; NNI's defaultdict it refuses)."""
        return plain_masks(super().get_masks())

    def compress(self, max_steps: int | None = None, max_epochs: int | None = None):  # type: ignore[override]
        if self.evaluator is None:
            masks = self.generate_masks()
            self.update_masks(masks)
            return self.bound_model, self.get_masks()
        with silenced():
            model, masks = super().compress(max_steps, max_epochs)
        return model, plain_masks(masks)


def plain_masks(masks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    return {str(m): {str(t): v.detach().clone() for t, v in targets.items() if v is not None} for m, targets in masks.items()}
