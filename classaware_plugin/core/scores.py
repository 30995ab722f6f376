"""Importance scores, one class each, registered by name.

A score turns a model (and, when it needs data, calibration batches) into a :data:`ScoreMap`:
one non-negative-or-signed number per parameter element, larger = keep. The adapters only reduce
these element scores to channels (structured) or rank them directly (unstructured).
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ._validation import ClassAwareError, check_choice
from .lottery import RewindSnapshot
from .saliency import NORMALIZATIONS, ClassSaliency, ScoreMap, StaleStatisticsError, parameterised_modules

_REGISTRY: dict[str, type[Score]] = {}


def register_score(name: str):
    """Class decorator that registers a :class:`Score` under ``name`` (warns on overwrite)."""

    def deco(cls: type[Score]) -> type[Score]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            import warnings

            warnings.warn(f"Score {name!r} was registered already; overwriting it with {cls.__name__}.", stacklevel=2)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_scores() -> list[str]:
    """Names accepted by :func:`make_score`."""
    return sorted(_REGISTRY)


def make_score(name: str, **kwargs: Any) -> Score:
    """Build a registered score by name, e.g. ``make_score('taylor', important_classes=[3], num_classes=10)``."""
    check_choice("score", name, available_scores())
    return _REGISTRY[name](**kwargs)


class Score(abc.ABC):
    """One importance score. Subclasses implement :meth:`element_scores`."""

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None, progress: bool = False) -> None:
        """Gather what the score needs from data (no-op for data-free scores)."""

    def check_fresh(self) -> None:
        """Raise when the gathered state no longer matches the model (no-op for data-free scores)."""

    @abc.abstractmethod
    def element_scores(self, model: nn.Module) -> ScoreMap:
        """One score per parameter element of every parameterised module, larger = keep."""


@register_score("taylor")
class ClassDependentTaylor(Score):
    """Class-dependent first-order Taylor score (the default).

    Args:
        important_classes: classes whose false negatives matter.
        num_classes: the model's output width.
        omega: weight of the important classes' saliency (a number, or one per important class).
        rest_weight: weight of the other classes' saliency; 0 scores by the important classes only.
        normalization: ``'none'`` (default, chosen by the benchmark ablation) keeps sums, so omega =
            rest_weight = 1 equals the class-agnostic Taylor score; ``'mean'`` divides each bucket by its sample
            count (a rare class counts as much as a frequent one at equal weight).
    """

    needs_data = True

    def __init__(
        self,
        important_classes: Sequence[int],
        num_classes: int,
        omega: float | Mapping[int, float] = 4.0,
        rest_weight: float = 1.0,
        normalization: str = "none",
    ) -> None:
        check_choice("normalization", normalization, NORMALIZATIONS)
        self.stats = ClassSaliency(important_classes, num_classes)
        self.omega = omega
        self.rest_weight = rest_weight
        self.normalization = normalization
        self.stats.bucket_weights(omega, rest_weight, normalization)  # validate now, before any work

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None, progress: bool = False) -> None:
        self.stats.collect(model, loader, max_batches=max_batches, progress=progress)

    def check_fresh(self) -> None:
        self.stats.check_fresh()

    def element_scores(self, model: nn.Module) -> ScoreMap:
        return self.stats.scores(self.omega, self.rest_weight, self.normalization)


@register_score("magnitude_increase")
class MagnitudeIncrease(Score):
    """The paper's score ``|w_T| - |w_0|`` against a rewind snapshot (class-dependent through training).

    Call :meth:`set_rewind_point` (or pass ``snapshot``) with the weights to compare against.
    """

    def __init__(self, snapshot: RewindSnapshot | None = None, **_: Any) -> None:
        self.snapshot = snapshot

    def set_rewind_point(self, model: nn.Module) -> None:
        self.snapshot = RewindSnapshot.capture(model)

    def check_fresh(self) -> None:
        if self.snapshot is None:
            raise ClassAwareError("The 'magnitude_increase' score needs a rewind point: call set_rewind_point(model).")

    def element_scores(self, model: nn.Module) -> ScoreMap:
        self.check_fresh()
        snapshot: RewindSnapshot = self.snapshot  # type: ignore[assignment]
        out: ScoreMap = {}
        for name, m in parameterised_modules(model):
            for n, p in m.named_parameters(recurse=False):
                w0 = snapshot.tensor(name, n)
                if w0.shape != p.shape:
                    raise StaleStatisticsError(
                        f"The rewind point of {name}.{n} has shape {tuple(w0.shape)} but the model now has "
                        f"{tuple(p.shape)}; set a new rewind point after structural pruning."
                    )
                out.setdefault(m, {})[n] = p.detach().abs() - w0.to(p.device).abs()
        return out


@register_score("magnitude")
class Magnitude(Score):
    """Class-agnostic ``|w|`` (a baseline, and the lottery ticket's criterion)."""

    def __init__(self, **_: Any) -> None:
        pass

    def element_scores(self, model: nn.Module) -> ScoreMap:
        return {m: {n: p.detach().abs() for n, p in m.named_parameters(recurse=False)} for _, m in parameterised_modules(model)}


def reduce_to_channels(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a tensor's element scores over every dimension but ``dim`` (one value per channel)."""
    if scores.ndim == 1:
        return scores
    return scores.transpose(0, dim).reshape(scores.shape[dim], -1).sum(1)
