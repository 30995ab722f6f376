"""Per-class statistics for importance scores: the data contract between the core and the adapters.

Samples are split into *buckets*: each important class, plus one bucket for all other classes. A statistics
object accumulates, per bucket, a sum over calibration samples or batches and the bucket's sample count; a score
combines the buckets as ``sum_b factor_b * S_b`` with ``factor_b`` from :meth:`BucketStatistics.bucket_weights`:

- ``'balanced'``: ``omega_b / n_b`` (the bucket's mean): a rare class weighs by omega, not by its sample count;
- ``'count'``: ``omega_b / N``: with every omega 1 this is the class-agnostic statistic of the calibration set;
- ``'sum'``: ``omega_b`` (raw sums; the same ranking as ``'count'``).

Weight-level statistics (this module, :class:`WeightStatistics`): per batch and bucket the Taylor term
``w * g_b`` of every trainable tensor element, ``g_b`` the gradient of the bucket's summed loss, squared before it
is accumulated (``squared=True``, the Fisher form; the default) or signed (:class:`ClassSaliency`, the project's first
score, kept for the ablation). Why squares: at a trained model the gradient over the data is about zero, so signed
contributions summed over batches cancel (the important classes' part is about minus the rest's), while
``E[(w g)^2] = (w E[g])^2 + w^2 Var(g)`` keeps the Fisher term. Channel-level statistics are in :mod:`.channels`.

Statistics are keyed by module object, not parameter object (Torch-Pruning replaces parameters when it prunes). A
fingerprint of the tracked parameters (shape and in-place version counter) is kept, so a score asked for after the
model changed raises :class:`StaleStatisticsError` instead of silently using old numbers.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .validation import (
    ClassAwareError, Constraint, Interval, Options, PerClass, check_batch, check_class_keys, check_important_classes,
    check_loader, check_num_classes, check_number, check_params, run_model,
)
from . import distributed
from .progress import progress_bar

REST = -1
"""Bucket key of all non-important classes."""

WEIGHTINGS = ("balanced", "count", "sum")
LOSSES = ("ce", "margin")
NORMALIZATIONS = ("none", "mean")
PARAMETERS: dict[str, Constraint] = {
    "omega": PerClass(Interval(0.0)), "rest_weight": Interval(0.0), "weighting": Options(WEIGHTINGS),
    "loss": Options(LOSSES), "normalization": Options(NORMALIZATIONS),
}
"""What the statistics' settings may be (bucket weights, per-sample loss, normalisation); the scores declare their
options from these entries."""
"""The signed score's names for the weightings ``'sum'`` and ``'balanced'``."""

ScoreMap = dict[nn.Module, dict[str, torch.Tensor]]
"""Per module, per parameter name (``'weight'``, ``'bias'``): one score per element, larger = keep."""


class StaleStatisticsError(RuntimeError):
    """Raised when statistics are used after the model changed since they were collected."""


def parameterised_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own at least one trainable parameter, with their qualified names."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def fingerprint(modules: Iterable[nn.Module]) -> tuple:
    """Identity, shapes and in-place version counters of the modules' trainable parameters: it changes when a model
    is pruned or trained, so statistics can tell that they are stale."""
    return tuple(
        (id(m), n, tuple(p.shape), p._version)
        for m in modules
        for n, p in m.named_parameters(recurse=False)
        if p.requires_grad
    )


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, important: Sequence[int], loss: str = "ce") -> torch.Tensor:
    """Per-sample loss: cross-entropy, or (``loss='margin'``) for the important classes' samples the negative
    log-odds margin ``-(z_c - logsumexp_{j != c} z_j)`` and cross-entropy for the others.

    Example:
        >>> per_sample_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), [0], "margin")
        tensor([-2.])
    """
    ce = F.cross_entropy(logits, targets, reduction="none")
    if loss == "ce":
        return ce
    pos = torch.zeros_like(targets, dtype=torch.bool)
    for c in important:
        pos |= targets == c
    z = logits.float()
    own = z.gather(1, targets[:, None]).squeeze(1)
    others = z.scatter(1, targets[:, None], float("-inf")).logsumexp(1)
    return torch.where(pos, others - own, ce)


def bucket_masks(targets: torch.Tensor, important: Sequence[int]) -> dict[int, torch.Tensor]:
    """A boolean mask per bucket (each important class, then :data:`REST`)."""
    rest = torch.ones_like(targets, dtype=torch.bool)
    masks = {}
    for c in important:
        masks[c] = targets == c
        rest &= ~masks[c]
    masks[REST] = rest
    return masks


class BucketStatistics:
    """Per-bucket sums and sample counts; subclasses implement :meth:`update` for one batch.

    Args:
        important_classes: the classes that get a bucket of their own (not every class).
        num_classes: the model's output width (checked on the first batch).
        loss: per-sample loss, ``'ce'`` or ``'margin'`` (see :func:`per_sample_loss`).
    """

    def __init__(self, important_classes: Sequence[int], num_classes: int, loss: str = "ce") -> None:
        check_num_classes(num_classes)
        self.important_classes = check_important_classes(important_classes, num_classes)
        if len(self.important_classes) >= int(num_classes):
            raise ClassAwareError(
                f"The 'important_classes' parameter names every one of the {num_classes} classes "
                f"({self.important_classes}); leave at least one out, or nothing is protected relative to the rest."
            )
        self.num_classes = int(num_classes)
        check_params(PARAMETERS, {"loss": loss})
        self.loss = loss
        self.reset()

    # ----------------------------------------------------------------- lifecycle
    @property
    def buckets(self) -> list[int]:
        return [*self.important_classes, REST]

    def reset(self) -> None:
        """Forget everything collected."""
        self.sums_: dict[int, dict[nn.Module, dict[str, torch.Tensor]]] = {b: {} for b in self.buckets}
        self.counts_: dict[int, int] = {b: 0 for b in self.buckets}
        self.modules_: list[tuple[str, nn.Module]] = []
        self.fingerprint_: tuple | None = None
        self.batches_ = 0

    @property
    def is_collected(self) -> bool:
        return self.batches_ > 0

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None,
                progress: bool = False) -> BucketStatistics:
        """Reset, then accumulate over ``loader`` (batches of ``(inputs, targets)``).

        The model is put in eval mode for the pass (BatchNorm statistics are not touched, samples are independent)
        and restored to its previous mode after; ``.grad`` of the parameters is left untouched.
        """
        if not isinstance(model, nn.Module):
            raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
        check_loader("loader", loader, model, self.num_classes)
        if max_batches is not None:
            check_number("max_batches", max_batches, low=1, integer=True)
        self.reset()
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(progress_bar(loader, desc="class-aware scoring", total=max_batches,
                                                   disable=not progress)):
                if max_batches is not None and i >= max_batches:
                    break
                self.update(model, batch[0], batch[1])
        finally:
            model.train(was_training)
        if distributed.is_distributed():
            self._all_reduce(model)
        if not self.is_collected:
            raise ClassAwareError("The 'loader' parameter must yield at least one batch. Got an empty loader.")
        return self

    def _all_reduce(self, model: nn.Module) -> None:
        """Sum the sums, counts and batch counts of every process (torch.distributed): each rank then holds the
        statistics of the union of the ranks' samples. A rank that saw no sample of a bucket takes part with
        zeros; every rank needs at least one batch."""
        by_name = dict(self.modules_)
        names = {id(m): n for n, m in self.modules_}
        mine = sorted((b, names[id(m)], t, tuple(v.shape), str(v.dtype)) for b, store in self.sums_.items()
                      for m, ts in store.items() for t, v in ts.items())
        gathered = distributed.all_gather_objects(([n for n, _ in self.modules_], mine, self.batches_))
        idle = [r for r, (_, _, batches) in enumerate(gathered) if not batches]
        if idle:
            raise ClassAwareError(
                f"Rank(s) {idle} of the {len(gathered)} processes got no calibration batch: the calibration set has "
                "fewer batches than there are processes. Give it more batches or run fewer processes.")
        modules = gathered[0][0]
        if [n for n, _ in self.modules_] != modules:
            raise distributed.RanksDivergedError("The processes' statistics track different modules; every rank must "
                                                 "score the same model.")
        layout = sorted(set().union(*(set(lay) for _, lay, _ in gathered)))
        device = next((t.device for store in self.sums_.values() for ts in store.values() for t in ts.values()),
                      distributed.model_device(model))
        local = [self.sums_[b].get(by_name[m], {}).get(t, torch.zeros(shape, device=device,
                                                                       dtype=getattr(torch, dtype.split(".")[-1])))
                 for b, m, t, shape, dtype in layout]
        counts = torch.tensor([self.counts_[b] for b in self.buckets] + [self.batches_])
        *summed, totals = distributed.all_reduce_sum([*local, counts])
        for (b, m, t, _, _), v in zip(layout, summed):
            self.sums_[b].setdefault(by_name[m], {})[t] = v
        *bucket_counts, self.batches_ = (int(c) for c in totals)
        self.counts_ = dict(zip(self.buckets, bucket_counts))
        self.fingerprint_ = fingerprint(m for _, m in self.modules_)

    def update(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch."""
        raise NotImplementedError

    # ----------------------------------------------------------------- helpers for update()
    def _begin(self, modules: Any) -> None:
        """On the first batch, remember the tracked ``(name, module)`` pairs (a list, or a callable that makes it);
        later, refuse a model that changed meanwhile."""
        if not self.modules_:
            self.modules_ = list(modules() if callable(modules) else modules)
        elif self.fingerprint_ != fingerprint(m for _, m in self.modules_):
            raise StaleStatisticsError("The model changed during collection; call reset() (or collect()) to start again.")

    def _batch(self, inputs: Any, targets: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on ``device`` with long labels, after refusing bad labels or non-finite inputs by batch number."""
        check_batch(self.batches_ + 1, inputs, targets, self.num_classes, what="calibration batch")
        return inputs.to(device), targets.to(device).long()

    def _loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = run_model(model, inputs, self.batches_ + 1, what="calibration batch")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ClassAwareError(
                f"The model output must have shape (batch, {self.num_classes}) to match num_classes={self.num_classes}. "
                f"Got {tuple(logits.shape)}."
            )
        loss = per_sample_loss(logits, targets, self.important_classes, self.loss)
        if not bool(torch.isfinite(loss).all()):
            raise ClassAwareError(
                f"The per-sample loss of calibration batch {self.batches_ + 1} is not finite (NaN or inf in the inputs, "
                "or a diverged model); scores computed from it would be meaningless."
            )
        return loss

    def _add(self, bucket: int, module: nn.Module, name: str, value: torch.Tensor) -> None:
        slot = self.sums_[bucket].setdefault(module, {})
        slot[name] = slot[name] + value if name in slot else value

    def _end(self, masks: Mapping[int, torch.Tensor]) -> None:
        for b, mask in masks.items():
            self.counts_[b] += int(mask.sum())
        self.batches_ += 1
        self.fingerprint_ = fingerprint(m for _, m in self.modules_)

    # ----------------------------------------------------------------- scores
    def check_fresh(self) -> None:
        """Raise :class:`StaleStatisticsError` when nothing was collected or the model changed since."""
        if not self.is_collected:
            raise StaleStatisticsError("No statistics collected yet: call collect(model, loader) first.")
        if self.fingerprint_ != fingerprint(m for _, m in self.modules_):
            raise StaleStatisticsError(
                "The model changed (pruned or trained) since the statistics were collected; "
                "call collect(model, loader) again before scoring."
            )

    def bucket_weights(self, omega: float | Mapping[int, float] = 1.0, rest_weight: float = 1.0,
                       weighting: str = "balanced") -> dict[int, float]:
        """The factor applied to each bucket's sum (see the module docstring)."""
        check_params(PARAMETERS, {"weighting": weighting, "rest_weight": rest_weight})
        check_class_keys("omega", omega, self.important_classes)
        check_params(PARAMETERS, {"omega": omega})
        if isinstance(omega, Mapping):
            omegas = {c: float(omega.get(c, 1.0)) for c in self.important_classes}
        else:
            omegas = {c: float(omega) for c in self.important_classes}
        omegas[REST] = float(rest_weight)
        if weighting == "sum":
            return omegas
        if weighting == "count":
            total = sum(self.counts_.values())
            return {b: omegas[b] / total if total else 0.0 for b in self.buckets}
        return {b: omegas[b] / self.counts_[b] if self.counts_[b] else 0.0 for b in self.buckets}

    def combined(self, omega: float | Mapping[int, float] = 1.0, rest_weight: float = 1.0,
                 weighting: str = "balanced") -> ScoreMap:
        """``sum_b factor_b * S_b`` per module and tensor name."""
        self.check_fresh()
        out: ScoreMap = {}
        for b, w in self.bucket_weights(omega, rest_weight, weighting).items():
            for m, tensors in self.sums_[b].items():
                slot = out.setdefault(m, {})
                for n, t in tensors.items():
                    slot[n] = slot[n] + w * t if n in slot else w * t
        return out

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Statistics keyed by qualified module names (portable across processes)."""
        names = {id(m): n for n, m in self.modules_}
        return {
            "important_classes": list(self.important_classes),
            "num_classes": self.num_classes,
            "loss": self.loss,
            "counts": {str(b): c for b, c in self.counts_.items()},
            "batches": self.batches_,
            "modules": [n for n, _ in self.modules_],
            "sums": {
                str(b): {names[id(m)]: {n: t.clone() for n, t in tensors.items()} for m, tensors in store.items()}
                for b, store in self.sums_.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        """Restore statistics saved by :meth:`state_dict` onto ``model``'s modules."""
        if list(state["important_classes"]) != self.important_classes or state["num_classes"] != self.num_classes:
            raise ClassAwareError(
                f"The saved statistics are for important_classes={state['important_classes']} and "
                f"num_classes={state['num_classes']}, not {self.important_classes} and {self.num_classes}."
            )
        self.reset()
        by_name = dict(model.named_modules())
        missing = [n for n in state.get("modules", []) if n not in by_name]
        missing += [n for store in state["sums"].values() for n in store if n not in by_name]
        if missing:
            raise ClassAwareError(f"The saved statistics name module {missing[0]!r}, which the model does not have.")
        self.modules_ = [(n, by_name[n]) for n in state.get("modules", [])] or parameterised_modules(model)
        for b_str, store in state["sums"].items():
            for name, tensors in store.items():
                self.sums_[int(b_str)][by_name[name]] = {n: t.clone() for n, t in tensors.items()}
        self.counts_ = {int(b): int(c) for b, c in state["counts"].items()}
        self.batches_ = int(state["batches"])
        self.fingerprint_ = fingerprint(m for _, m in self.modules_)


class WeightStatistics(BucketStatistics):
    """Per-bucket Taylor terms ``w * g_b`` of every trainable tensor element, per batch; squared before they are
    summed unless ``squared=False``. One forward and one backward per bucket present in a batch.

    Example:
        >>> stats = WeightStatistics(important_classes=[3], num_classes=10)
        >>> stats.collect(model, loader)                                  # doctest: +SKIP
        >>> stats.combined(omega=1.0)[model.fc]["weight"]                 # doctest: +SKIP
    """

    def __init__(self, important_classes: Sequence[int], num_classes: int, loss: str = "ce", squared: bool = True) -> None:
        self.squared = bool(squared)
        super().__init__(important_classes, num_classes, loss)

    def update(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch (one forward, one backward per bucket present in the batch)."""
        self._begin(lambda: parameterised_modules(model))
        device = distributed.model_device(model)
        inputs, targets = self._batch(inputs, targets, device)
        tracked = [(m, n, p) for _, m in self.modules_ for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        masks = bucket_masks(targets, self.important_classes)
        present = [b for b, mask in masks.items() if bool(mask.any())]
        with torch.enable_grad():
            loss = self._loss(model, inputs, targets)
            for k, b in enumerate(present):
                grads = torch.autograd.grad(loss[masks[b]].sum(), [p for _, _, p in tracked],
                                            retain_graph=k < len(present) - 1, allow_unused=True)
                for (m, n, p), g in zip(tracked, grads):
                    if g is not None:
                        term = (p.detach() * g).float()
                        self._add(b, m, n, term.pow(2) if self.squared else term)
        self._end(masks)


class ClassSaliency(WeightStatistics):
    """The signed per-bucket Taylor contributions (the project's first score, ``'taylor_signed'``).

    The class-dependent score of an element is ``|sum_b omega_b * P_b / nu_b|`` with ``nu_b = 1``
    (``normalization='none'``: omega = 1 gives exactly the class-agnostic Taylor score ``|theta * dL/dtheta|``) or
    the bucket's sample count (``'mean'``). Signed sums over batches cancel at a trained model (see the module
    docstring); the Fisher scores square first.
    """

    def __init__(self, important_classes: Sequence[int], num_classes: int, loss: str = "ce") -> None:
        super().__init__(important_classes, num_classes, loss, squared=False)

    def contributions(self, omega: float | Mapping[int, float] = 1.0, rest_weight: float = 1.0,
                      normalization: str = "none") -> ScoreMap:
        """Signed combined contributions ``sum_b omega_b * P_b / nu_b`` per module and tensor name."""
        check_params(PARAMETERS, {"normalization": normalization})
        return self.combined(omega, rest_weight, "sum" if normalization == "none" else "balanced")

    def scores(self, omega: float | Mapping[int, float] = 1.0, rest_weight: float = 1.0,
               normalization: str = "none") -> ScoreMap:
        """Element scores ``|contribution|`` per module and tensor name (larger = more needed)."""
        return {m: {n: t.abs() for n, t in tensors.items()}
                for m, tensors in self.contributions(omega, rest_weight, normalization).items()}
