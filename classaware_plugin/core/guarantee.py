"""The certified false-negative rule: a promise about new data, not a count on the data that chose the model.

The validation split is cut in two (stratified). The **selection** part chooses everything: the budget derived from
the dense model, early stopping in fine-tuning, the calibration's logit shift, the accuracy guard and whether a step
is worth certifying. The **certification** part chooses nothing: it only tests, in the order the steps are taken,
whether the exact (Clopper-Pearson) upper confidence bound of each important class's FN rate is within its budget.
The run stops at the first step that fails (fixed-sequence testing, as in Learn-then-Test, Angelopoulos et al.
2021), so the delivered model's guarantee holds although many steps were looked at:

    P(the delivered model's FN rate on new data exceeds its budget, for some important class) <= delta.

Why this is valid: the sequence of models the loop would take if every certification passed is a function of the
training and selection data alone (a step that fails on the selection split is retried with a smaller step without
looking at the certification split). The run tests those models in that fixed order and stops at the first failure,
which is exactly the fixed-sequence procedure: testing each at level ``delta`` controls the chance of certifying any
model whose rate exceeds its budget at ``delta``. With several important classes each is tested at
``delta / m`` (Bonferroni), so the statement holds for all of them at once. The bound is conditional on the number of
positives, which only the labels fix, so a budget that depends on that number (the widening below) stays valid.

A step is sent to certification only when the selection split predicts that it passes with probability at least
``1 - delta`` (a Jeffreys posterior for its FN rate, beta-binomial for the certification count): steps that would
fail by a wide margin are retried with a smaller step, and the run is not ended by a coin flip.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from .calibration import find_logit_shifts
from .metrics import Evaluation, evaluate_predictions
from .validation import (
    ClassAwareError, Constraint, Interval, Options, PerClass, check_class_keys, check_important_classes, check_loader,
    check_number, check_params,
)

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.05
"""The default budget is the dense model's FN rate plus this (5 points of recall), widened when the certification
split is too small for it (:meth:`FNGuarantee.budgets`)."""


def fn_rate_upper_bound(fn: int, positives: int, delta: float) -> float:
    """The exact one-sided (Clopper-Pearson) upper ``1 - delta`` confidence bound of a rate seen as ``fn`` of
    ``positives``: the largest rate under which ``fn`` or fewer misses have probability at least ``delta``.

    Example:
        >>> round(fn_rate_upper_bound(0, 22, 0.1), 4)   # 1 - 0.1 ** (1 / 22)
        0.0993
    """
    check_number("positives", positives, low=0, integer=True)
    check_number("fn", fn, low=0, high=positives, integer=True)
    check_number("delta", delta, low=0.0, high=0.5, low_open=True)
    if fn >= positives:
        return 1.0
    return float(stats.beta.ppf(1.0 - delta, fn + 1, positives - fn))


def positives_needed(max_fn_rate: float, delta: float) -> int:
    """The fewest positives with which a model that misses none of them is certified at ``max_fn_rate``:
    ``(1 - b)^n <= delta``, i.e. ``n >= ln(delta) / ln(1 - b)``.

    Example:
        >>> positives_needed(0.1, 0.1)
        22
    """
    check_number("max_fn_rate", max_fn_rate, low=0.0, high=1.0, low_open=True)
    check_number("delta", delta, low=0.0, high=0.5, low_open=True)
    if max_fn_rate >= 1.0:
        return 0
    n = math.ceil(math.log(delta) / math.log1p(-max_fn_rate) - 1e-9)
    while fn_rate_upper_bound(0, n, delta) > max_fn_rate:  # guard the float rounding of the closed form
        n += 1
    return n


def _largest(pred: Any, low: int, high: int) -> int:
    """The largest ``k`` in ``[low, high]`` with ``pred(k)`` for a predicate true up to some point, else ``low - 1``."""
    if high < low or not pred(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        if pred(mid):
            low = mid
        else:
            high = mid - 1
    return low


def largest_certified_count(positives: int, max_fn_rate: float, delta: float) -> int:
    """The most misses among ``positives`` whose upper bound is within ``max_fn_rate`` (-1: none is)."""
    return _largest(lambda k: fn_rate_upper_bound(k, positives, delta) <= max_fn_rate + 1e-12, 0, positives)


def pass_probability(fn: int, positives: int, cert_positives: int, max_count: int) -> float:
    """The probability that a model seen missing ``fn`` of ``positives`` (selection split) misses at most
    ``max_count`` of ``cert_positives`` (certification split): its FN rate under a Jeffreys posterior
    ``Beta(fn + 1/2, positives - fn + 1/2)``, the count then binomial (beta-binomial predictive)."""
    if max_count < 0:
        return 0.0
    if positives == 0:
        return 1.0 if max_count >= cert_positives else 0.0
    return float(stats.betabinom.cdf(max_count, cert_positives, fn + 0.5, positives - fn + 0.5))


@dataclass(frozen=True)
class ClassBudget:
    """One important class's budget and what it rests on."""

    max_fn_rate: float      # the promise: FN rate on new data at most this (recall at least 1 - this)
    delta: float            # the level this class is tested at (the rule's delta / number of important classes)
    derived: str            # how max_fn_rate was chosen, in words
    positives: int          # certification positives
    max_count: int          # most certification misses that certify (-1: none)
    screen_limit: int       # most selection misses with which a step is sent to certification (-1: none)
    selection_positives: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Certificate:
    """The test of one class on the certification split: ``certified`` when ``upper_bound <= max_fn_rate``."""

    max_fn_rate: float
    delta: float
    upper_bound: float
    positives: int
    fn: int

    @property
    def certified(self) -> bool:
        return self.upper_bound <= self.max_fn_rate + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "certified": self.certified}


@dataclass(frozen=True)
class FNGuarantee:
    """The certified FN rule: every important class's FN rate on new data stays within its budget, with probability
    at least ``1 - delta``; the accuracy guard (on the selection split) as in :class:`FNConstraint`.

    Args:
        important_classes: the classes whose false negatives are bounded.
        max_fn_rate: the budget, one rate or ``{class: rate}``; ``None`` derives it from the dense model: its FN
            rate on the selection split plus ``tolerance``.
        tolerance: added to the dense model's FN rate when ``max_fn_rate`` is None. ``None`` (default):
            :data:`DEFAULT_TOLERANCE`, widened when the certification split is too small for it, to the tightest
            budget at which a model as good as the dense one is predicted to certify with probability
            ``1 - delta`` (logged, and stated in the budget's ``derived``).
        delta: the risk level of the guarantee.
        max_accuracy_drop: accuracy guard on the selection split (``None``: off); it is not part of the guarantee.
        operating_point: ``'argmax'`` or ``'calibrated'`` (the smallest non-negative shift of the important classes'
            logits, chosen on the selection split, that brings them to the screen's limit; the shift is part of the
            certified model and must be folded into it: ``calibrate(model, loader, classes, shifts=...)``).

    Example:
        >>> g = FNGuarantee([3], max_fn_rate=0.2)
        >>> b = g.budgets(dense_fn={3: 2}, dense_positives={3: 60}, cert_positives={3: 60})
        >>> b[3].max_fn_rate, b[3].max_count
        (0.2, 7)
    """

    important_classes: Sequence[int]
    max_fn_rate: float | Mapping[int, float] | None = None
    tolerance: float | None = None
    delta: float = 0.1
    max_accuracy_drop: float | None = 0.02
    operating_point: str = "argmax"

    PARAMETERS: ClassVar[dict[str, Constraint]] = {
        "max_fn_rate": PerClass(Interval(0.0, 1.0, low_open=True), nullable=True),
        "tolerance": Interval(0.0, 1.0, nullable=True),
        # a risk level above one half would make the "upper" bound a lower one (below the observed rate)
        "delta": Interval(0.0, 0.5, low_open=True),
        "max_accuracy_drop": Interval(0.0, 1.0, nullable=True),
        "operating_point": Options(("argmax", "calibrated")),
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "important_classes", check_important_classes(self.important_classes, None))
        check_params(self.PARAMETERS, {k: getattr(self, k) for k in self.PARAMETERS})
        check_class_keys("max_fn_rate", self.max_fn_rate, self.important_classes)
        if isinstance(self.max_fn_rate, Mapping):
            missing = [c for c in self.important_classes if c not in self.max_fn_rate]
            if missing:
                raise ClassAwareError(f"The 'max_fn_rate' parameter has no rate for important classes {missing}.")
        if self.max_fn_rate is not None and self.tolerance is not None:
            raise ClassAwareError("Give 'max_fn_rate' (a stated budget) or 'tolerance' (dense FN rate + tolerance), "
                                  f"not both. Got max_fn_rate={self.max_fn_rate!r}, tolerance={self.tolerance!r}.")

    @property
    def class_delta(self) -> float:
        """The level each class is tested at: ``delta`` split evenly over the important classes (Bonferroni)."""
        return self.delta / len(self.important_classes)

    # ----------------------------------------------------------------- budgets
    def budgets(self, dense_fn: Mapping[int, int], dense_positives: Mapping[int, int],
                cert_positives: Mapping[int, int]) -> dict[int, ClassBudget]:
        """Each class's budget from the dense model's selection-split FN (``dense_fn`` of ``dense_positives``) and
        the certification split's positives. Raises :class:`ClassAwareError`, before any work, when a class cannot be
        certified at all (naming the positives it needs)."""
        for name, counts in (("dense_fn", dense_fn), ("dense_positives", dense_positives),
                             ("cert_positives", cert_positives)):
            if not isinstance(counts, Mapping):
                raise ClassAwareError(f"The '{name}' parameter must map each important class to a count. Got "
                                      f"{type(counts).__name__}.")
            for c in self.important_classes:
                check_number(name, counts.get(c), low=0, integer=True)
        out = {}
        for c in self.important_classes:
            n_sel, n_cert, k_dense = int(dense_positives[c]), int(cert_positives[c]), int(dense_fn[c])
            if k_dense > n_sel:
                raise ClassAwareError(f"The 'dense_fn' parameter gives class {c} {k_dense} misses of {n_sel} "
                                      "'dense_positives': more misses than cases.")
            if n_sel == 0 or n_cert == 0:
                raise ClassAwareError(
                    f"Important class {c} has {n_sel} positives in the selection split ('dense_positives') and {n_cert} "
                    "in the certification split ('cert_positives'); both need some. Give a larger validation split.")
            dense_rate = k_dense / n_sel
            if self.max_fn_rate is not None:
                rate = float(self.max_fn_rate[c] if isinstance(self.max_fn_rate, Mapping) else self.max_fn_rate)
                derived = "stated (max_fn_rate)"
            else:
                tol = DEFAULT_TOLERANCE if self.tolerance is None else float(self.tolerance)
                rate = min(1.0, dense_rate + tol)
                derived = (f"the dense model's FN rate on the selection split ({k_dense}/{n_sel} = {dense_rate:.3f}) "
                           f"+ tolerance {tol:g}")
                if self.tolerance is None:
                    widened = self._tightest_for(k_dense, n_sel, n_cert)
                    if widened > rate + 1e-12:
                        log.warning(
                            "class %d: %d certification positives cannot certify the dense FN rate + %g (%.3f); the "
                            "budget is widened to %.3f, the tightest at which a model as good as the dense one is "
                            "predicted to certify (set constraint.tolerance or max_fn_rate to choose it yourself; a "
                            "larger validation split makes it tighter)", c, n_cert, tol, rate, widened)
                        derived += (f", widened to {widened:.3f}: the tightest budget at which a model as good as the "
                                    f"dense one is predicted to certify with {n_cert} certification positives")
                        rate = widened
            if rate >= 1.0:
                raise ClassAwareError(
                    f"Important class {c}: a budget of {rate:.3f} ({derived}) promises nothing, since no model misses "
                    f"more than all cases. The dense model misses {k_dense} of its {n_sel} selection cases: train it "
                    "until it recognises the class, or state a max_fn_rate below 1.")
            out[c] = self._budget(c, rate, derived, n_sel, n_cert)
        return out

    def _budget(self, c: int, rate: float, derived: str, n_sel: int, n_cert: int) -> ClassBudget:
        d = self.class_delta
        if rate <= 0.0:
            raise ClassAwareError(
                f"Important class {c}: a budget of 0 ({derived}) cannot be certified from any finite number of "
                "positives. Give a tolerance or max_fn_rate above 0.")
        max_count = largest_certified_count(n_cert, rate, d)
        if max_count < 0:
            need = positives_needed(rate, d)
            raise ClassAwareError(
                f"Important class {c} cannot be certified at a max FN rate of {rate:.3f} (delta {d:g}): its "
                f"certification split has {n_cert} positives, and even a model that misses none of them has an upper "
                f"bound of {fn_rate_upper_bound(0, n_cert, d):.3f}. It needs at least {need} positives (more, to allow "
                "for misses). Give more validation data (or a larger constraint.certification_fraction), a larger "
                "max_fn_rate or tolerance, or a larger delta.")
        limit = self._screen_limit(n_sel, n_cert, max_count)
        if limit < 0:
            raise ClassAwareError(
                f"Important class {c} cannot be certified at a max FN rate of {rate:.3f} (delta {d:g}) with {n_sel} "
                f"selection and {n_cert} certification positives: even a model that misses none on the selection "
                f"split is predicted to certify with probability below {1 - self.delta:g}. Give more validation data, "
                "a larger max_fn_rate or tolerance, or a larger delta.")
        return ClassBudget(rate, d, derived, n_cert, max_count, limit, n_sel)

    def _screen_limit(self, n_sel: int, n_cert: int, max_count: int) -> int:
        target = 1.0 - self.delta
        return _largest(lambda k: pass_probability(k, n_sel, n_cert, max_count) >= target, 0, n_sel)

    def _tightest_for(self, k_dense: int, n_sel: int, n_cert: int) -> float:
        """The smallest budget (an upper bound value, where the certifiable count changes) whose screen lets a model
        with the dense model's selection count through."""
        d = self.class_delta
        for k in range(n_cert + 1):
            if self._screen_limit(n_sel, n_cert, k) >= k_dense:
                return fn_rate_upper_bound(k, n_cert, d)
        return 1.0

    # ----------------------------------------------------------------- decisions
    def check_evaluable(self, dense: Evaluation) -> None:
        """An important class without selection samples has no FN rate: refuse before any work."""
        for c in self.important_classes:
            if c not in dense.support:
                raise ClassAwareError(
                    f"Important class {c} is out of range for a model with {len(dense.support)} outputs.")

    def judge(self, dense: Evaluation, budgets: Mapping[int, ClassBudget], labels: Any,
              logits: Any) -> tuple[Evaluation, list[str], dict[int, float]]:
        """The screen, on the selection split's ``(labels, logits)``: its evaluation at the operating point, the
        reasons it is not worth certifying (empty: send it to certification), and the logit shifts applied."""
        shifts: dict[int, float] = {}
        if self.operating_point == "calibrated":
            shifts = find_logit_shifts(labels, logits, {c: b.screen_limit for c, b in budgets.items()})
            logits = shifted(logits, shifts)
        ev = evaluate_predictions(labels, logits, self.important_classes)
        out = [f"FN of class {c} is {ev.fn[c]} > {b.screen_limit} on the selection split (the most that is predicted "
               f"to certify at max FN rate {b.max_fn_rate:.3f})" for c, b in budgets.items() if ev.fn[c] > b.screen_limit]
        if self.max_accuracy_drop is not None:
            drop = dense.accuracy - ev.accuracy
            if drop > self.max_accuracy_drop + 1e-12:
                out.append(f"accuracy fell by {drop:.4f} > {self.max_accuracy_drop}")
        return ev, out, shifts

    def certify(self, budgets: Mapping[int, ClassBudget], labels: Any, logits: Any,
                shifts: Mapping[int, float] | None = None) -> dict[int, Certificate]:
        """Test a model on the certification split's ``(labels, logits)`` with its ``shifts`` applied."""
        y = np.asarray(labels)
        pred = shifted(np.asarray(logits), shifts or {}).argmax(1)
        out = {}
        for c, b in budgets.items():
            pos = y == c
            fn = int((pred[pos] != c).sum())
            out[c] = Certificate(b.max_fn_rate, b.delta, fn_rate_upper_bound(fn, int(pos.sum()), b.delta),
                                 int(pos.sum()), fn)
        return out


def shifted(logits: Any, shifts: Mapping[int, float]) -> np.ndarray:
    """``logits`` with ``shifts[c]`` added to column ``c`` (a copy)."""
    z = np.array(logits, dtype=np.float64, copy=True)
    for c, s in shifts.items():
        z[:, c] += s
    return z


def guarantee_sentence(certificates: Mapping[int, Certificate], names: Sequence[str], delta: float) -> str:
    """The guarantee in one sentence a user can check on their own data."""
    parts = [f"{names[c]}: at most {100 * k.max_fn_rate:.1f}% missed (it missed {k.fn} of {k.positives} held-out "
             f"cases that chose nothing; upper bound {100 * k.upper_bound:.1f}%)" for c, k in certificates.items()]
    return (f"With probability at least {1 - delta:.0%}, on new data drawn like the validation data the pruned model "
            f"misses no more than this share of each important class's cases: {'; '.join(parts)}. To check it, count "
            "the misses of the important classes on your own labelled cases.")


def certification_indices(labels: Any, fraction: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (selection, certification), stratified: of every class, a seeded ``fraction``
    (rounded, at least one sample of a class with two or more) goes to certification.

    Example:
        >>> sel, cert = certification_indices([0, 0, 1, 1, 1, 1], 0.5)
        >>> sorted(cert.tolist()) == sorted(set(range(6)) - set(sel.tolist())), len(cert)
        (True, 3)
    """
    check_number("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    cert = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        cert.append(idx[:k])
    cert_idx = np.sort(np.concatenate(cert)) if cert else np.zeros(0, dtype=int)
    sel_idx = np.setdiff1d(np.arange(len(y)), cert_idx)
    return sel_idx, cert_idx


def split_for_certification(loader: Any, fraction: float = 0.5, seed: int = 0) -> tuple[Any, Any]:
    """A validation ``DataLoader`` cut into (selection, certification) loaders over a stratified split of its data
    set (:func:`certification_indices`), with the same batch size and collate function.

    The certified rule needs data that chose nothing: give it the second loader only (``cert_loader=``) and use the
    first for everything else (early stopping, calibration, your own checks)."""
    from torch.utils.data import DataLoader, Subset

    from ..data import labels_of

    check_loader("loader", loader)
    if not isinstance(loader, DataLoader):
        raise ClassAwareError(
            f"The certified rule cuts the validation loader's data set in two, which needs a torch DataLoader; got a "
            f"{type(loader).__name__}. Pass cert_loader= (held-out validation data) yourself.")
    sel, cert = certification_indices(labels_of(loader.dataset), fraction, seed)

    def part(idx: np.ndarray) -> DataLoader:
        return DataLoader(Subset(loader.dataset, idx.tolist()), batch_size=loader.batch_size,
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers)

    return part(sel), part(cert)
