"""FN-constrained iterative structural pruning with Torch-Pruning.

Each step builds a fresh TP pruner on the current model with ``pruning_ratio = fraction`` (of the channels
that remain), refreshes the class-aware statistics, calls ``pruner.step()``, fine-tunes with a freshly built
optimiser, and evaluates on validation. A rejected step is undone exactly by restoring a deep copy of the
model in place; because every step has its own pruner there is no step counter or dependency-graph history
left behind to reset.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..core.validation import ClassAwareError, Interval, check_important_classes, check_loader, check_number
from ..core.calibration import last_linear
from ..core.distributed import model_device
from ..core.channels import rounded_channels
from ..core.controller import ControllerResult, FNConstrainedPruning, FNConstraint, NothingToPrune, StepRecord
from ..core.guarantee import FNGuarantee, split_for_certification
from ..core.loss import ClassDependentLoss
from ..core.lottery import RewindSnapshot
from ..core.backend import ModelBackend
from ..core.scores import score_class
from ..core.training import train
from ..measure import count_params_macs
from ..speed import ROUND_TO, ROUND_TO_CONSTRAINT
from .importance import ClassAwareImportance

log = logging.getLogger(__name__)

PrunerFactory = Callable[[nn.Module, Any, float], "tp.pruner.BasePruner"]


class RoundingMetaPruner(tp.pruner.MetaPruner):
    """TP's MetaPruner whose ``round_to`` rounds the kept channel count to the *nearest* multiple
    (:func:`~classaware_plugin.core.channels.rounded_channels`; ``round_down=True``: the multiple below, never
    below one block). TP's own rounds down and may round a layer to zero channels; rounding down makes any step,
    however small, take a whole block from every layer it touches: 16 -> 8 for a 2% step.

    Where TP would silently do nothing or remove everything, it refuses: a ``pruning_ratio`` (or a value of
    ``pruning_ratio_dict``) outside [0, 1), or a model in which every prunable layer is ignored."""

    def __init__(self, *args: Any, round_down: bool = False, **kwargs: Any) -> None:
        self.round_down = round_down
        ratio = Interval(0.0, 1.0, high_open=True)
        ratio.check("pruning_ratio", kwargs.get("pruning_ratio", args[4] if len(args) > 4 else 0.5))
        for value in (kwargs.get("pruning_ratio_dict") or {}).values():
            ratio.check("pruning_ratio_dict", value)
        super().__init__(*args, **kwargs)
        if next(iter(self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                            root_module_types=self.root_module_types)), None) is None:
            raise ClassAwareError("Nothing to prune: every layer Torch-Pruning could prune is in 'ignored_layers' (or the "
                                  "model has no convolution or linear layer besides them).")

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        kept = rounded_channels(current_channels, current_channels - n_pruned, round_to, down=self.round_down)
        return current_channels - kept


class TorchPruningBackend(ModelBackend):
    """Drives Torch-Pruning for :class:`~classaware_plugin.core.FNConstrainedPruning`.

    Args:
        model: the model to prune (pruned in place).
        example_inputs: a batch for TP's graph tracing and for MACs counting.
        importance: any TP importance; a :class:`ClassAwareImportance` gets its statistics refreshed
            from ``calib_loader`` before every step. Other data-driven TP estimators (Taylor) get one
            ``loss.backward()`` per calibration batch before the step, gradients zeroed after.
        val_loader: where steps are judged (the certified rule's selection split).
        cert_loader: the certified rule's certification split (:class:`~classaware_plugin.core.FNGuarantee`): held
            out from everything else, read only to test a step.
        finetune: ``finetune(model)`` called after every step; default: ``train()`` with ``loss_fn``.
        ignored_layers: layers TP must not prune (default: the last ``nn.Linear``, the classifier).
        round_to: every pruned layer keeps a multiple of this many channels (the nearest to what the step asks for,
            :class:`RoundingMetaPruner`), so that the pruned model runs fast; ``None`` keeps any count. Default
            :data:`~classaware_plugin.speed.ROUND_TO` (chosen by measurement: ``python -m benchmarks speed``).
        pruner_factory: ``factory(model, importance, ratio) -> pruner`` to use your own TP pruner settings
            (``round_to`` is then yours to pass).
        latency_probe: ``probe(model) -> latency reduction`` (e.g. :class:`~classaware_plugin.speed.LatencyProbe`):
            ``measure()`` then also reports ``latency_reduction``, a target the loop can stop at.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor,
        importance: Any,
        val_loader: Iterable[Any],
        important_classes: Sequence[int],
        calib_loader: Iterable[Any] | None = None,
        finetune: Callable[[nn.Module], None] | None = None,
        train_loader: Iterable[Any] | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        finetune_epochs: float = 1.0,
        lr: float = 1e-3,
        ignored_layers: Sequence[nn.Module] | None = None,
        global_pruning: bool = False,
        pruner_factory: PrunerFactory | None = None,
        calib_batches: int | None = None,
        progress: bool = False,
        round_to: int | None = ROUND_TO,
        latency_probe: Callable[[nn.Module], float] | None = None,
        cert_loader: Iterable[Any] | None = None,
        allocation: Mapping[str, float] | None = None,
    ) -> None:
        ROUND_TO_CONSTRAINT.check("round_to", round_to)
        self.importance = importance
        self.calib_loader = calib_loader if calib_loader is not None else train_loader
        self.calib_batches = calib_batches
        if finetune is None and train_loader is not None:
            if loss_fn is None:
                raise ClassAwareError("The 'loss_fn' parameter is required when fine-tuning on 'train_loader'.")

            def finetune(m: nn.Module) -> None:
                train(m, train_loader, loss_fn, epochs=finetune_epochs, lr=lr, progress=progress, desc="fine-tuning")

        super().__init__(model, val_loader, check_important_classes(important_classes, None), finetune,
                         example_inputs=example_inputs, counter=count_params_macs, latency_probe=latency_probe,
                         cert_loader=cert_loader)
        self.ignored_layers = list(ignored_layers) if ignored_layers is not None else None
        self.global_pruning = global_pruning
        self.pruner_factory = pruner_factory
        self.round_to = round_to
        for name, loader in (("calib_loader", self.calib_loader), ("cert_loader", cert_loader)):
            if loader is not None:
                check_loader(name, loader, model)
        # With a searched allocation (unit -> kept fraction of its dense width), every step takes each unit a share of
        # its remaining way there; the dense widths are state (a resumed backend is built on a pruned model).
        self.allocation = dict(allocation) if allocation is not None else None
        self.dense_widths = {n: _width(m) for n, m in model.named_modules() if n in (self.allocation or {})}
        if self.allocation is not None and set(self.dense_widths) != set(self.allocation):
            raise ClassAwareError(f"The 'allocation' names layers the model does not have: "
                                  f"{sorted(set(self.allocation) - set(self.dense_widths))[:5]}.")
        if pruner_factory is None:
            self._make_pruner(0.1, allocated=False)  # a model with nothing to prune is refused here, before any work

    # ----------------------------------------------------------------- backend interface
    def _make_pruner(self, ratio: float, fallback: bool = False, allocated: bool = True) -> Any:
        if self.pruner_factory is not None:
            return self.pruner_factory(self.model, self.importance, ratio)
        ignored = self.ignored_layers if self.ignored_layers is not None else [last_linear(self.model)]
        if self.allocation is not None and allocated:  # per-unit ratios towards the allocation (widths rounded there)
            return RoundingMetaPruner(
                self.model, self.example_inputs, importance=self.importance, pruning_ratio=0.0,
                pruning_ratio_dict=self._allocation_ratios(ratio), ignored_layers=ignored, round_to=None)
        return RoundingMetaPruner(
            self.model, self.example_inputs, importance=self.importance, pruning_ratio=ratio,
            global_pruning=self.global_pruning or fallback, ignored_layers=ignored, round_to=self.round_to,
            round_down=fallback,
        )

    def _allocation_ratios(self, fraction: float) -> dict[nn.Module, float]:
        """Each unit's share of the step: ``fraction`` of the channels on average, spread over the units in
        proportion to the way each has left to its allocated width, never below it; widths are rounded to
        ``round_to`` here (the final ones as the search's candidates were), and when rounding would leave every unit
        as it was, the unit with the longest way left loses one block."""
        assert self.allocation is not None
        modules = dict(self.model.named_modules())
        left = {}  # module -> (channels now, final channels)
        for name, keep in self.allocation.items():
            now = _width(modules[name])
            final = rounded_channels(self.dense_widths[name], keep * self.dense_widths[name], self.round_to)
            if now > final:
                left[modules[name]] = (now, final)
        if not left:
            raise NothingToPrune()
        scale = min(1.0, fraction / (sum(1 - f / n for n, f in left.values()) / len(self.allocation)))
        kept = {m: max(f, rounded_channels(n, n - (n - f) * scale, self.round_to)) for m, (n, f) in left.items()}
        if all(kept[m] == n for m, (n, _) in left.items()):
            m, (n, f) = max(left.items(), key=lambda kv: 1 - kv[1][1] / kv[1][0])
            kept[m] = max(f, n - (self.round_to or 1))
        # TP keeps int(channels * (1 - ratio)): half a channel of slack makes it keep exactly k
        return {m: (left[m][0] - k - 0.5) / left[m][0] for m, k in kept.items() if k < left[m][0]}

    def _prepare_importance(self) -> None:
        imp = self.importance
        if isinstance(imp, ClassAwareImportance):
            if imp.model is None:
                if self.calib_loader is None:
                    raise ClassAwareError("ClassAwareImportance needs 'calib_loader' (or train_loader) to score channels.")
                imp.collect(self.model, self.calib_loader, self.calib_batches)
            return
        if isinstance(imp, (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance)):
            if self.calib_loader is None:
                raise ClassAwareError(f"{type(imp).__name__} needs 'calib_loader' (or train_loader) for gradients.")
            accumulate_gradients(self.model, self.calib_loader, self.calib_batches)

    def _rewinds(self) -> bool:
        return isinstance(self.importance, ClassAwareImportance) and score_class(self.importance.score_name).needs_rewind

    def _count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def prune(self, fraction: float) -> None:
        before = self._count()
        self._prepare_importance()
        self._make_pruner(fraction).step()
        if self._count() == before and self.round_to and self.pruner_factory is None and self.allocation is None:
            # Rounded to the nearest block, a small step leaves every layer as it was. Then the same step is taken
            # globally with the kept counts rounded down: the least important channels decide which layers lose a
            # block, so the step is the finest rounding allows. (The model did not change: statistics still fresh.)
            self._make_pruner(fraction, fallback=True).step()
        self.model.zero_grad(set_to_none=True)
        if self._count() == before:
            raise NothingToPrune()
        if self._rewinds():
            # The magnitude-increase score compares with w_0 of the same shape: after a structural step the new
            # w_0 is the post-prune weights, so the next step scores |w_T| - |w_0| over the fine-tuning between.
            self.importance.set_rewind_point(self.model)

    def snapshot(self) -> Any:
        model = super().snapshot()
        return (model, self.importance.score.snapshot) if self._rewinds() else model

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"dense_widths": dict(self.dense_widths)} if self.allocation is not None else {}
        if self._rewinds():
            state["rewind_point"] = self.importance.score.snapshot.tensors
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self._rewinds() and state.get("rewind_point") is not None:
            self.importance.score.snapshot = RewindSnapshot(state["rewind_point"])
        if state.get("dense_widths"):
            self.dense_widths = dict(state["dense_widths"])

    def restore(self, state: Any) -> None:
        if self._rewinds():
            super().restore(state[0])
            self.importance.score.snapshot = state[1]
        else:
            super().restore(state)


def _width(module: nn.Module) -> int:
    """The output channels of a unit's root layer."""
    return int(getattr(module, "out_channels", getattr(module, "out_features", 0)))


def accumulate_gradients(model: nn.Module, loader: Iterable[Any], max_batches: int | None = None) -> None:
    """``loss.backward()`` over calibration batches (for TP's built-in gradient-based estimators)."""
    check_loader("loader", loader, model)
    model.zero_grad(set_to_none=True)
    was = model.training
    model.eval()
    device = model_device(model)
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.train(was)


def prune_with_fn_constraint(
    model: nn.Module,
    example_inputs: torch.Tensor,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    important_classes: Sequence[int],
    target_macs_reduction: float | None = 2.0,
    target_params: int | None = None,
    importance: Any | None = None,
    constraint: FNConstraint | FNGuarantee | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    finetune: Callable[[nn.Module], None] | None = None,
    finetune_epochs: float = 1.0,
    lr: float = 1e-3,
    step: float = 0.2,
    max_halvings: int = 3,
    max_steps: int = 30,
    calib_batches: int | None = 8,
    global_pruning: bool = False,
    ignored_layers: Sequence[nn.Module] | None = None,
    on_record: Callable[[StepRecord, FNConstrainedPruning], None] | None = None,
    progress: bool = False,
    round_to: int | None = ROUND_TO,
    cert_loader: Iterable[Any] | None = None,
) -> tuple[nn.Module, ControllerResult]:
    """Prune ``model`` structurally with Torch-Pruning until a MACs reduction (or parameter count) is reached
    while the important classes keep their false negatives. Returns ``(model, result)``.

    The rule is ``constraint``: by default :class:`~classaware_plugin.core.FNGuarantee` (the certified rule: each
    important class's FN rate on new data within its budget, with probability at least ``1 - delta``;
    ``result.certificate`` holds the delivered model's bound), or :class:`FNConstraint` (counts on validation). The
    certified rule tests on ``cert_loader``, data that nothing else may see; without it ``val_loader``'s data set is
    cut in two (stratified, :func:`~classaware_plugin.core.guarantee.split_for_certification`) and steps are judged
    on the first half. Pass ``cert_loader`` yourself when your ``finetune`` reads validation data (early stopping):
    it must not read the certification half. With ``operating_point='calibrated'`` the delivered model needs the
    shift it was certified with: ``calibrate(model, val_loader, classes, shifts=result.history[-k].shifts)`` of the
    last accepted attempt.

    Example:
        >>> model, result = prune_with_fn_constraint(model, torch.randn(2, 3, 32, 32), train_dl, val_dl,
        ...                                           important_classes=[3], target_macs_reduction=2.0)  # doctest: +SKIP
        >>> result.stop_reason, [r.decision for r in result.history]                                     # doctest: +SKIP
    """
    important = check_important_classes(important_classes, None)
    if not isinstance(model, nn.Module):
        raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
    for name, loader in (("train_loader", train_loader), ("val_loader", val_loader), ("cert_loader", cert_loader)):
        if loader is not None or name != "cert_loader":
            check_loader(name, loader, model)
    if (target_macs_reduction is None) == (target_params is None):
        raise ClassAwareError("Give exactly one of 'target_macs_reduction' and 'target_params'.")
    if target_macs_reduction is not None:
        check_number("target_macs_reduction", target_macs_reduction, low=1.0, low_open=True)
    if loss_fn is None and finetune is None:
        counts = _class_counts(train_loader)
        loss_fn = ClassDependentLoss(important, class_counts=counts) if min(counts) > 0 else nn.CrossEntropyLoss()
    importance = importance or ClassAwareImportance(important)
    constraint = constraint if constraint is not None else FNGuarantee(important)
    if isinstance(constraint, FNGuarantee) and cert_loader is None:
        val_loader, cert_loader = split_for_certification(val_loader)
        log.info("certified rule: half of the validation data (stratified) is held out for certification")
    backend = TorchPruningBackend(
        model, example_inputs, importance, val_loader, important, calib_loader=train_loader, finetune=finetune,
        train_loader=train_loader, loss_fn=loss_fn, finetune_epochs=finetune_epochs, lr=lr,
        ignored_layers=ignored_layers, global_pruning=global_pruning, calib_batches=calib_batches, progress=progress,
        round_to=round_to, cert_loader=cert_loader,
    )
    if target_params is not None:
        check_number("target_params", target_params, low=1, integer=True)
        target, key = backend.dense_params / target_params, "params_reduction"
    else:
        target, key = float(target_macs_reduction), "macs_reduction"  # type: ignore[arg-type]
    loop = FNConstrainedPruning(
        backend, constraint, target=target, target_key=key, step=step,
        max_halvings=max_halvings, max_steps=max_steps, on_record=on_record,
    )
    return model, loop.run()


def _class_counts(loader: Iterable[Any]) -> list[int]:
    ds = getattr(loader, "dataset", None)
    from ..data import labels_of

    if ds is not None:
        try:
            y = labels_of(ds)
            return torch.bincount(torch.as_tensor(y)).tolist()
        except ClassAwareError:
            pass
    ys = torch.cat([torch.as_tensor(b[1]) for b in loader])
    return torch.bincount(ys).tolist()
