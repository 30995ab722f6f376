"""How many channels each layer keeps: a search of per-layer widths judged by the important class's own metric.

Issue 32. Which channels a score keeps makes no difference to the important class once fine-tuning runs; how many
each layer keeps might. EagleEye (Li et al., ECCV 2020) searches per-layer pruning ratios cheaply: sample candidates
that meet the compression target, prune a copy, re-estimate its BatchNorm statistics on training batches with the
weights frozen (adaptive BN), score it on a held-apart split, keep the best. This search is framework-agnostic: the
adapter gives it the prunable units and a way to prune a copy to given keep ratios (Torch-Pruning: a
``pruning_ratio_dict``; NNI: a per-module ``config_list``), and an objective: the important class's metric (default),
overall accuracy (the class-agnostic control), or measured latency under an FN bound.

Candidates: every unit draws a relative keep weight, and one scale shared by all units is found by bisection so
that the candidate meets the target (each keep ratio within ``[min_keep, 1]``): every candidate is feasible. After a
random half, candidates are mutations of the best ones so far (an evolutionary step). The search is seeded and can be
resumed from its :meth:`WidthSearch.state_dict`.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import nn

from .progress import progress_bar
from .validation import ClassAwareError, Constraint, Interval, check_params

log = logging.getLogger(__name__)

Allocation = dict[str, float]
"""Unit name -> the fraction of its channels kept."""


@dataclass(frozen=True)
class Unit:
    """A prunable unit (a layer, or a group of layers whose channels go together) and its number of channels;
    ``members``: the names of the layers whose output channels it prunes (the root first)."""

    name: str
    channels: int
    members: tuple[str, ...] = ()


@dataclass
class Candidate:
    """One evaluated allocation: its keep ratios, the cost reduction reached and the objective (higher is better)."""

    allocation: Allocation
    reduction: float
    score: float
    seconds: float
    origin: str  # "random" | "mutation"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SearchResult:
    best: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    seconds: float = 0.0


def important_class_objective(loader: Any, important_classes: Sequence[int],
                              target_fpr: Mapping[int, float]) -> Callable[[nn.Module], float]:
    """Minus the important classes' summed FN rate at their given false-positive rates (the dense model's), read on
    ``loader``'s ROC: the operating point a bias shift cannot game. Higher is better."""
    from .metrics import fn_at_fpr, predict

    def objective(model: nn.Module) -> float:
        labels, logits = predict(model, loader)
        rates = [fn_at_fpr((labels, logits), (labels, logits), c, target_fpr[c]).test_fn / max(int((labels == c).sum()), 1)
                 for c in important_classes]
        return -float(sum(rates))

    return objective


def important_class_auc_objective(loader: Any, important_classes: Sequence[int]) -> Callable[[nn.Module], float]:
    """The important classes' mean one-vs-rest ROC AUC (softmax score of the class) on ``loader``. Higher is better.

    A graded form of :func:`important_class_objective`: a candidate that, before any fine-tuning, misses every case
    at the dense model's false-positive rate (often so after a large cut) still ranks by how well it separates the
    class, where the FN rate ties at 1."""
    from scipy.special import softmax
    from sklearn.metrics import roc_auc_score

    from .metrics import predict

    def objective(model: nn.Module) -> float:
        labels, logits = predict(model, loader)
        prob = softmax(np.asarray(logits, dtype=np.float64), axis=1)
        for c in important_classes:
            if not 0 < int((labels == c).sum()) < len(labels):
                raise ClassAwareError(f"The 'loader' parameter must hold samples of important class {c} and of other "
                                      "classes for an AUC. It holds "
                                      f"{int((labels == c).sum())} of {len(labels)}.")
        return float(np.mean([roc_auc_score(labels == c, prob[:, c]) for c in important_classes]))

    return objective


def accuracy_objective(loader: Any) -> Callable[[nn.Module], float]:
    """Overall accuracy on ``loader``: the class-agnostic control (EagleEye's objective)."""
    from .metrics import predict

    def objective(model: nn.Module) -> float:
        labels, logits = predict(model, loader)
        return float((logits.argmax(1) == labels).mean())

    return objective


def latency_objective(latency: Callable[[nn.Module], float], fn_rate: Callable[[nn.Module], float],
                      max_fn_rate: float) -> Callable[[nn.Module], float]:
    """Minus the measured latency, among candidates whose important-class FN rate (``fn_rate(model)``, e.g. minus
    :func:`important_class_objective`) is within ``max_fn_rate``; the others score minus infinity."""

    def objective(model: nn.Module) -> float:
        return -float(latency(model)) if fn_rate(model) <= max_fn_rate else float("-inf")

    return objective


class WidthSearch:
    """Search per-unit keep ratios that reach ``target`` (a cost reduction, e.g. 3.0 for 3x fewer MACs).

    Args:
        units: the prunable units and their widths.
        prune: ``prune(allocation) -> model``: a pruned *copy* of the model at those keep ratios.
        reduction: ``reduction(model) -> float``: the cost reduction of a pruned copy (dense cost / its cost).
        objective: ``objective(model) -> float``: higher is better, evaluated after ``adapt`` (on a split the final
            certification does not use).
        adapt: ``adapt(model)``: e.g. adaptive BN (:func:`~classaware_plugin.core.training.recalibrate_batchnorm`).
        target: the cost reduction each candidate must reach (within ``tolerance``, relative).
        candidates: the budget of candidates evaluated.
        seconds: a time budget (``None``: none); the search stops at whichever budget runs out first.
        min_keep: no unit keeps less than this fraction of its channels.
        mutation: after this share of the budget, candidates are mutations of the best so far (0: random only).
        seed: the random stream of the candidates.

    Example:
        >>> search = WidthSearch(units, prune, reduction, objective, adapt, target=3.0)   # doctest: +SKIP
        >>> result = search.run()                                                       # doctest: +SKIP
        >>> result.best.allocation                                                      # doctest: +SKIP
    """

    PARAMETERS: ClassVar[dict[str, Constraint]] = {
        "target": Interval(1.0, low_open=True), "candidates": Interval(1, integer=True),
        "seconds": Interval(0.0, low_open=True, nullable=True), "min_keep": Interval(0.0, 1.0, low_open=True),
        "mutation": Interval(0.0, 1.0), "tolerance": Interval(0.0, 0.5, low_open=True),
        "seed": Interval(0, integer=True),
    }

    def __init__(self, units: Sequence[Unit], prune: Callable[[Allocation], nn.Module],
                 reduction: Callable[[nn.Module], float], objective: Callable[[nn.Module], float],
                 adapt: Callable[[nn.Module], None] | None, target: float, candidates: int = 40,
                 seconds: float | None = None, min_keep: float = 0.1, mutation: float = 0.5, tolerance: float = 0.03,
                 seed: int = 0, progress: bool = False) -> None:
        check_params(self.PARAMETERS, {"target": target, "candidates": candidates, "seconds": seconds,
                                       "min_keep": min_keep, "mutation": mutation, "tolerance": tolerance,
                                       "seed": seed})
        units = list(units)
        if not units or not all(isinstance(u, Unit) and u.channels >= 1 for u in units):
            raise ClassAwareError(f"The 'units' parameter must list at least one Unit with channels >= 1. Got {units!r}.")
        for name, fn in (("prune", prune), ("reduction", reduction), ("objective", objective)):
            if not callable(fn):
                raise ClassAwareError(f"The '{name}' parameter must be callable. Got {fn!r}.")
        self.units, self.prune, self.reduction, self.objective, self.adapt = units, prune, reduction, objective, adapt
        self.target, self.budget, self.seconds = float(target), int(candidates), seconds
        self.min_keep, self.mutation, self.tolerance, self.seed = float(min_keep), float(mutation), tolerance, seed
        self.progress = progress
        self.reset()

    def reset(self) -> None:
        self.candidates_: list[Candidate] = []
        self.rng_ = np.random.default_rng(self.seed)
        self.elapsed_ = 0.0

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the evaluated candidates, the random stream and the time spent."""
        return {"candidates": [c.to_dict() for c in self.candidates_], "rng": self.rng_.bit_generator.state,
                "elapsed": self.elapsed_}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.candidates_ = [Candidate(**c) for c in state["candidates"]]
        self.rng_.bit_generator.state = state["rng"]
        self.elapsed_ = float(state["elapsed"])

    # ----------------------------------------------------------------- candidates
    def _scaled(self, weights: np.ndarray) -> tuple[Allocation, nn.Module, float]:
        """The keep ratios ``clip(alpha * weights)`` whose pruned copy reaches the target, alpha by bisection."""
        lo, hi = 0.0, 1.0 / max(float(weights.min()), 1e-9)
        best: tuple[Allocation, nn.Module, float] | None = None
        for _ in range(12):
            alpha = (lo + hi) / 2
            allocation = {u.name: float(np.clip(alpha * w, self.min_keep, 1.0)) for u, w in zip(self.units, weights)}
            model = self.prune(allocation)
            r = float(self.reduction(model))
            if r >= self.target:
                lo, best = alpha, (allocation, model, r)  # reaches the target: keep more channels
                if r <= self.target * (1 + self.tolerance):
                    break
            else:
                hi = alpha
        if best is None:
            raise ClassAwareError(f"No allocation reaches a reduction of {self.target} with every unit keeping at least "
                                  f"{self.min_keep:.0%} of its channels: lower the target or min_keep.")
        return best

    def _weights(self) -> tuple[np.ndarray, str]:
        n = len(self.candidates_)
        if n < max(1, int(round(self.budget * (1 - self.mutation)))) or self.mutation == 0:
            return self.rng_.uniform(0.2, 1.0, len(self.units)), "random"
        top = sorted(self.candidates_, key=lambda c: c.score, reverse=True)[:max(2, len(self.candidates_) // 5)]
        parent = top[int(self.rng_.integers(len(top)))]
        base = np.array([parent.allocation[u.name] for u in self.units])
        noise = self.rng_.normal(0.0, 0.15, len(self.units))
        return np.clip(base * np.exp(noise), 1e-3, None), "mutation"

    def step(self) -> Candidate:
        """Draw, prune, adapt and evaluate one candidate."""
        t = time.time()
        weights, origin = self._weights()
        allocation, model, r = self._scaled(weights)
        if self.adapt is not None:
            self.adapt(model)
        score = float(self.objective(model))
        candidate = Candidate(allocation, r, score, time.time() - t, origin)
        self.candidates_.append(candidate)
        self.elapsed_ += candidate.seconds
        return candidate

    def run(self, on_candidate: Callable[[Candidate, WidthSearch], None] | None = None) -> SearchResult:
        """Evaluate candidates until the budget of candidates (or of seconds) runs out; the best is kept. Raises
        :class:`ClassAwareError` when every candidate scored minus infinity (none met a constrained objective's bound):
        there is no best to return."""
        bar = progress_bar(range(len(self.candidates_), self.budget), desc="width search", total=self.budget,
                           initial=len(self.candidates_), disable=not self.progress)
        for _ in bar:
            if self.seconds is not None and self.elapsed_ >= self.seconds:
                break
            c = self.step()
            if on_candidate is not None:
                on_candidate(c, self)
        if not self.candidates_:
            raise ClassAwareError("The width search evaluated no candidate (a time budget of 0?).")
        best = max(self.candidates_, key=lambda c: c.score)
        if best.score == float("-inf"):
            raise ClassAwareError(
                f"None of the {len(self.candidates_)} candidates met the objective's constraint (every score was "
                "minus infinity: with latency_objective, no candidate's FN rate was within max_fn_rate): allow a "
                "higher FN rate, aim at a smaller reduction, or evaluate more candidates.")
        log.info("width search: best of %d candidates scores %.4f at %.2fx", len(self.candidates_), best.score,
                 best.reduction)
        return SearchResult(copy.deepcopy(best), list(self.candidates_), self.elapsed_)
