"""Importance scores, one class each, registered by name.

A score turns a model (and, when it needs data, calibration batches) into a :data:`ScoreMap`: one
non-negative-or-signed number per parameter element, larger = keep; a score that measures channels natively (the
default ``'fisher'``) also returns :class:`~classaware_plugin.core.channels.ChannelScores`. The adapters only map
channel scores onto their groups or masks, reduce element scores to channels (structured), or rank element scores
directly (unstructured).
"""
from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from .validation import ClassAwareError, Constraint, InstanceOf, check_choice, check_class_keys, check_params
from .channels import ChannelFisher, ChannelScores
from .lottery import RewindSnapshot
from .statistics import PARAMETERS as STATISTICS_PARAMETERS
from .statistics import (
    BucketStatistics,
    ClassSaliency,
    ScoreMap,
    StaleStatisticsError,
    WeightStatistics,
    parameterised_modules,
)

GRANULARITIES = ("channel", "element")

_REGISTRY: dict[str, type[Score]] = {}

DEFAULT_SCORE = "fisher"


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


def score_class(name: str) -> type[Score]:
    """The registered class of a score name (a clear error listing the names otherwise)."""
    check_choice("score", name, available_scores())
    return _REGISTRY[name]


def score_options(name: str, **given: Any) -> dict[str, Any]:
    """The options of score ``name`` among ``given``: ``None`` means "not given" and is dropped; a given option the
    score does not have is refused, naming the options it has."""
    cls = score_class(name)
    out = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(out) - set(cls.options))
    if unknown:
        raise ClassAwareError(
            f"The option {unknown[0]!r} does not apply to score={name!r} (its options: "
            f"{', '.join(cls.options) or 'none'}). Got {unknown[0]}={out[unknown[0]]!r}."
        )
    return out


def make_score(name: str, important_classes: Sequence[int] = (), num_classes: int | None = None, **options: Any) -> Score:
    """Build a registered score by name, e.g. ``make_score('fisher', important_classes=[3], num_classes=10)``.

    Options the score does not have are refused (see :func:`score_options`)."""
    check_choice("name", name, available_scores())
    cls = score_class(name)
    opts = score_options(name, **options)
    if cls.needs_data:
        if num_classes is None:
            raise ClassAwareError(f"score={name!r} needs 'num_classes' (the model's output width).")
        return cls(important_classes=important_classes, num_classes=num_classes, **opts)
    return cls(**opts)


def validate_score(name: str, important_classes: Sequence[int] = (), num_classes: int | None = None,
                   **options: Any) -> dict[str, Any]:
    """Check a score name and its options before any work (values included, e.g. a negative omega) against the
    score's declared :attr:`Score.PARAMETERS`, also when the number of classes is not known yet; a per-class omega
    must name important classes (when they are given). Returns the options that were given (``None`` dropped)."""
    opts = score_options(name, **options)
    check_params(score_class(name).PARAMETERS, opts)
    if important_classes:
        check_class_keys("omega", opts.get("omega"), important_classes)
    return opts


class Score(abc.ABC):
    """One importance score. Subclasses implement :meth:`element_scores` (and, when they score channels natively,
    :meth:`channel_scores`) and declare what they need as class attributes, so that no adapter checks names."""

    name: ClassVar[str] = ""
    PARAMETERS: ClassVar[dict[str, Constraint]] = {}
    """The constructor's keyword options besides ``important_classes`` and ``num_classes``, with what each may be:
    checked by :func:`validate_score` before any work, and by the constructor."""
    options: ClassVar[tuple[str, ...]] = ()
    """The names of :attr:`PARAMETERS` (set for every subclass)."""
    needs_data: ClassVar[bool] = False
    """:meth:`collect` must run on calibration batches before scoring."""
    needs_rewind: ClassVar[bool] = False
    """:meth:`set_rewind_point` must be called with the weights to compare against."""
    signed: ClassVar[bool] = False
    """Scores can be negative (mean-normalisation is then meaningless)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.options = tuple(cls.PARAMETERS)

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None, progress: bool = False,
                granularity: str = "element") -> None:
        """Gather what the score needs from data (no-op for data-free scores). ``granularity`` is ``'channel'``
        (structured pruning) or ``'element'`` (unstructured): a score may gather different statistics for each."""

    def check_fresh(self) -> None:
        """Raise when the gathered state no longer matches the model (no-op for data-free scores)."""

    def set_rewind_point(self, model: nn.Module) -> None:
        """For scores with ``needs_rewind``: the weights to compare against."""
        raise ClassAwareError(f"score={self.name!r} has no rewind point; set_rewind_point() is for scores that compare "
                              "with earlier weights (magnitude_increase).")

    @abc.abstractmethod
    def element_scores(self, model: nn.Module) -> ScoreMap:
        """One score per parameter element of every parameterised module, larger = keep."""

    def channel_scores(self, model: nn.Module) -> ChannelScores | None:
        """Native channel scores (``None``: the adapters reduce :meth:`element_scores` over coupled tensors)."""
        return None


@register_score("fisher")
class ClassConditionalFisher(Score):
    """Class-conditional Fisher score (the default).

    Structured (``collect(..., granularity='channel')``): per-sample channel-gate values after each channel's norm
    layer, ``I_k = sum_b omega_b * mean_{n in b} s_{n,k}^2`` (:class:`~classaware_plugin.core.channels.ChannelFisher`).
    Unstructured (``'element'``): per batch and bucket ``(w * g_b)^2`` summed over batches
    (:class:`~classaware_plugin.core.statistics.WeightStatistics`).

    Args:
        important_classes: classes whose false negatives matter.
        num_classes: the model's output width.
        omega: weight of each important class's bucket (a number, or one per important class).
        rest_weight: weight of the other classes' bucket; 0 scores by the important classes only.
        weighting: ``'balanced'`` (default: each bucket's mean, so a rare class weighs by omega, not by its count) or
            ``'count'`` (every sample alike: omega = rest_weight = 1 is the class-agnostic Fisher score).
        loss: ``'ce'`` (default) or ``'margin'`` for the important classes' samples (see ``per_sample_loss``).
    """

    PARAMETERS = {k: STATISTICS_PARAMETERS[k] for k in ("omega", "rest_weight", "weighting", "loss")}
    needs_data = True

    def __init__(
        self,
        important_classes: Sequence[int],
        num_classes: int,
        omega: float | Mapping[int, float] = 1.0,
        rest_weight: float = 1.0,
        weighting: str = "balanced",
        loss: str = "ce",
    ) -> None:
        self.channels = ChannelFisher(important_classes, num_classes, loss)
        self.weights = WeightStatistics(important_classes, num_classes, loss, squared=True)
        self.omega, self.rest_weight, self.weighting = omega, rest_weight, weighting
        self.channels.bucket_weights(omega, rest_weight, weighting)  # validate now, before any work
        self._active: BucketStatistics | None = None

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None, progress: bool = False,
                granularity: str = "element") -> None:
        check_choice("granularity", granularity, GRANULARITIES)
        self._active = self.channels if granularity == "channel" else self.weights
        self._active.collect(model, loader, max_batches=max_batches, progress=progress)

    def check_fresh(self) -> None:
        if self._active is None:
            raise StaleStatisticsError("No statistics collected yet: call collect(model, loader) first.")
        self._active.check_fresh()

    def _weights(self) -> tuple[Any, float, str]:
        return self.omega, self.rest_weight, self.weighting

    def element_scores(self, model: nn.Module) -> ScoreMap:
        if self._active is not self.weights:
            raise StaleStatisticsError("No weight-level statistics: call collect(model, loader, granularity='element').")
        return self.weights.combined(*self._weights())

    def channel_scores(self, model: nn.Module) -> ChannelScores | None:
        if self._active is not self.channels:
            return None
        return self.channels.scores(*self._weights())


@register_score("taylor_signed")
class ClassDependentTaylor(Score):
    """The project's first score: signed per-bucket Taylor contributions, combined, then ``|.|`` (kept for the
    ablation; its signed sums cancel at a trained model, see :mod:`~classaware_plugin.core.statistics`).

    Args:
        important_classes: classes whose false negatives matter.
        num_classes: the model's output width.
        omega: weight of the important classes' saliency (a number, or one per important class).
        rest_weight: weight of the other classes' saliency; 0 scores by the important classes only.
        normalization: ``'none'`` keeps sums, so omega = rest_weight = 1 equals the class-agnostic Taylor score;
            ``'mean'`` divides each bucket by its sample count.
    """

    PARAMETERS = {k: STATISTICS_PARAMETERS[k] for k in ("omega", "rest_weight", "normalization")}
    needs_data = True

    def __init__(
        self,
        important_classes: Sequence[int],
        num_classes: int,
        omega: float | Mapping[int, float] = 4.0,
        rest_weight: float = 1.0,
        normalization: str = "none",
    ) -> None:
        check_params(self.PARAMETERS, {"normalization": normalization})
        self.stats = ClassSaliency(important_classes, num_classes)
        self.omega = omega
        self.rest_weight = rest_weight
        self.normalization = normalization
        self.stats.bucket_weights(omega, rest_weight)  # validate now, before any work

    def collect(self, model: nn.Module, loader: Iterable[Any], max_batches: int | None = None, progress: bool = False,
                granularity: str = "element") -> None:
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

    PARAMETERS = {"snapshot": InstanceOf((RewindSnapshot,), nullable=True)}
    needs_rewind = True
    signed = True

    def __init__(self, snapshot: RewindSnapshot | None = None) -> None:
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

    def element_scores(self, model: nn.Module) -> ScoreMap:
        return {m: {n: p.detach().abs() for n, p in m.named_parameters(recurse=False)} for _, m in parameterised_modules(model)}


def reduce_to_channels(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum a tensor's element scores over every dimension but ``dim`` (one value per channel)."""
    if scores.ndim == 1:
        return scores
    return scores.transpose(0, dim).reshape(scores.shape[dim], -1).sum(1)
