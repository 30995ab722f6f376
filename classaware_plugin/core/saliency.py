"""Per-class first-order Taylor statistics: the data contract between the core and the adapters.

For every module that owns parameters (conv, depthwise and grouped conv, linear, BatchNorm, ...)
and every one of its parameter tensors, :class:`ClassSaliency` accumulates, per *bucket*, the
signed first-order Taylor contribution ``theta * dL_b/dtheta``. The buckets are each important class
plus one bucket for all other classes, so a batch costs one forward and at most
``len(important_classes) + 1`` backward passes. ``L_b`` is the *summed* cross-entropy of the
bucket's samples, so the buckets add up to the loss of the whole batch.

The class-dependent score of a tensor element is ``|sum_b omega_b * P_b / nu_b|`` where ``P_b`` is
the accumulated contribution of bucket ``b``, ``omega_b`` its class weight and ``nu_b`` its
normalisation: 1 for ``normalization='none'`` (then omega = 1 for every class gives exactly the
class-agnostic Taylor score ``|theta * dL/dtheta|`` of the calibration set) or the bucket's sample
count for ``'mean'`` (a rare class then counts as much as a frequent one at equal omega).

Statistics are keyed by module object, not parameter object (Torch-Pruning replaces parameters when
it prunes). A fingerprint of the tracked parameters (shape and in-place version counter) is kept, so a
score asked for after the model changed raises :class:`StaleStatisticsError` instead of silently
using old numbers.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import ClassAwareError, check_choice, check_important_classes, check_non_empty_loader, check_number
from .progress import progress_bar

REST = -1
"""Bucket key of all non-important classes."""

NORMALIZATIONS = ("none", "mean")

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


def _fingerprint(modules: Iterable[nn.Module]) -> tuple:
    return tuple(
        (id(m), n, tuple(p.shape), p._version)
        for m in modules
        for n, p in m.named_parameters(recurse=False)
        if p.requires_grad
    )


class ClassSaliency:
    """Accumulates per-bucket Taylor contributions over calibration batches.

    Args:
        important_classes: the classes that get a bucket of their own.
        num_classes: the model's output width (checked on the first batch).
        loss_fn: per-sample loss ``loss_fn(logits, target) -> (batch,)``; default cross-entropy.

    Example:
        >>> stats = ClassSaliency(important_classes=[3], num_classes=10)
        >>> stats.collect(model, loader)                       # doctest: +SKIP
        >>> scores = stats.scores(omega=4.0)                   # doctest: +SKIP
    """

    def __init__(
        self,
        important_classes: Sequence[int],
        num_classes: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        check_number("num_classes", num_classes, low=2, integer=True)
        self.important_classes = check_important_classes(important_classes, num_classes)
        self.num_classes = int(num_classes)
        self.loss_fn = loss_fn
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

    def collect(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        max_batches: int | None = None,
        progress: bool = False,
    ) -> ClassSaliency:
        """Reset, then accumulate statistics over ``loader`` (batches of ``(inputs, targets)``).

        The model is put in eval mode for the pass (BatchNorm statistics are not touched) and
        restored to its previous mode after; ``.grad`` of the parameters is left untouched.
        """
        check_non_empty_loader("loader", loader)
        if max_batches is not None:
            check_number("max_batches", max_batches, low=1, integer=True)
        self.reset()
        was_training = model.training
        model.eval()
        try:
            total = None if max_batches is None else max_batches
            for i, batch in enumerate(progress_bar(loader, desc="class-aware scoring", total=total, disable=not progress)):
                if max_batches is not None and i >= max_batches:
                    break
                self.update(model, batch[0], batch[1])
        finally:
            model.train(was_training)
        if not self.is_collected:
            raise ClassAwareError("The 'loader' parameter must yield at least one batch. Got an empty loader.")
        return self

    def update(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch (one forward, one backward per bucket present in the batch)."""
        if not self.modules_:
            self.modules_ = parameterised_modules(model)
        elif self.fingerprint_ != _fingerprint(m for _, m in self.modules_):
            raise StaleStatisticsError(
                "The model changed during collection; call reset() (or collect()) to start again."
            )
        device = next(model.parameters()).device
        inputs, targets = inputs.to(device), targets.to(device).long()
        tracked = [(m, n, p) for _, m in self.modules_ for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        params = [p for _, _, p in tracked]
        with torch.enable_grad():
            logits = model(inputs)
            if logits.ndim != 2 or logits.shape[1] != self.num_classes:
                raise ClassAwareError(
                    f"The model output must have shape (batch, {self.num_classes}) to match num_classes="
                    f"{self.num_classes}. Got {tuple(logits.shape)}."
                )
            per_sample = (
                F.cross_entropy(logits, targets, reduction="none")
                if self.loss_fn is None
                else self.loss_fn(logits, targets)
            )
            rest = torch.ones_like(targets, dtype=torch.bool)
            masks = {}
            for c in self.important_classes:
                masks[c] = targets == c
                rest &= ~masks[c]
            masks[REST] = rest
            present = [b for b in self.buckets if bool(masks[b].any())]
            for k, b in enumerate(present):
                grads = torch.autograd.grad(
                    per_sample[masks[b]].sum(), params, retain_graph=k < len(present) - 1, allow_unused=True
                )
                store = self.sums_[b]
                for (m, n, p), g in zip(tracked, grads):
                    if g is None:
                        continue
                    contrib = (p.detach() * g).float()
                    slot = store.setdefault(m, {})
                    if n in slot:
                        slot[n] += contrib
                    else:
                        slot[n] = contrib
                self.counts_[b] += int(masks[b].sum())
        self.batches_ += 1
        self.fingerprint_ = _fingerprint(m for _, m in self.modules_)

    # ----------------------------------------------------------------- scores
    def check_fresh(self) -> None:
        """Raise :class:`StaleStatisticsError` when nothing was collected or the model changed since."""
        if not self.is_collected:
            raise StaleStatisticsError("No statistics collected yet: call collect(model, loader) first.")
        if self.fingerprint_ != _fingerprint(m for _, m in self.modules_):
            raise StaleStatisticsError(
                "The model changed (pruned or trained) since the statistics were collected; "
                "call collect(model, loader) again before scoring."
            )

    def bucket_weights(
        self,
        omega: float | Mapping[int, float] = 1.0,
        rest_weight: float = 1.0,
        normalization: str = "none",
    ) -> dict[int, float]:
        """The factor ``omega_b / nu_b`` applied to each bucket's contribution."""
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_number("rest_weight", rest_weight, low=0.0)
        if isinstance(omega, Mapping):
            unknown = sorted(set(omega) - set(self.important_classes))
            if unknown:
                raise ClassAwareError(
                    f"The 'omega' parameter names classes {unknown} that are not important classes "
                    f"{self.important_classes}."
                )
            omegas = {c: float(check_number("omega", omega.get(c, 1.0), low=0.0)) for c in self.important_classes}
        else:
            check_number("omega", omega, low=0.0)
            omegas = {c: float(omega) for c in self.important_classes}
        omegas[REST] = float(rest_weight)
        if normalization == "mean":
            return {b: (omegas[b] / self.counts_[b] if self.counts_[b] else 0.0) for b in self.buckets}
        return omegas

    def contributions(
        self,
        omega: float | Mapping[int, float] = 1.0,
        rest_weight: float = 1.0,
        normalization: str = "none",
    ) -> ScoreMap:
        """Signed combined contributions ``sum_b omega_b * P_b / nu_b`` per module and tensor name."""
        self.check_fresh()
        weights = self.bucket_weights(omega, rest_weight, normalization)
        out: ScoreMap = {}
        for b, w in weights.items():
            for m, tensors in self.sums_[b].items():
                slot = out.setdefault(m, {})
                for n, t in tensors.items():
                    slot[n] = slot[n] + w * t if n in slot else w * t
        return out

    def scores(
        self,
        omega: float | Mapping[int, float] = 1.0,
        rest_weight: float = 1.0,
        normalization: str = "none",
    ) -> ScoreMap:
        """Element scores ``|contribution|`` per module and tensor name (larger = more needed)."""
        return {
            m: {n: t.abs() for n, t in tensors.items()}
            for m, tensors in self.contributions(omega, rest_weight, normalization).items()
        }

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Statistics keyed by qualified module names (portable across processes)."""
        names = {id(m): n for n, m in self.modules_}
        return {
            "important_classes": list(self.important_classes),
            "num_classes": self.num_classes,
            "counts": {str(b): c for b, c in self.counts_.items()},
            "batches": self.batches_,
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
        self.modules_ = parameterised_modules(model)
        by_name = dict(self.modules_)
        for b_str, store in state["sums"].items():
            b = int(b_str)
            for name, tensors in store.items():
                if name not in by_name:
                    raise ClassAwareError(f"The saved statistics name module {name!r}, which the model does not have.")
                self.sums_[b][by_name[name]] = {n: t.clone() for n, t in tensors.items()}
        self.counts_ = {int(b): int(c) for b, c in state["counts"].items()}
        self.batches_ = int(state["batches"])
        self.fingerprint_ = _fingerprint(m for _, m in self.modules_)
