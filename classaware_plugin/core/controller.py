"""The FN-constrained stopping rule (METHOD.md part B) as a loop over any pruning backend.

Step n: snapshot -> prune a fraction of what remains -> fine-tune -> evaluate on validation ->
accept if compliant, else restore the snapshot exactly and retry with half the step (a bounded number
of times) or stop. The state it leaves in the backend is compliant on the validation split, always.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from .validation import ClassAwareError, Constraint, Interval, Options, check_important_classes, check_params
from .backend import PruningBackend
from .distributed import check_consistent
from .calibration import find_logit_shifts
from .guarantee import Certificate, ClassBudget, FNGuarantee
from .metrics import Evaluation, evaluate_predictions

log = logging.getLogger(__name__)

Decision = Literal["accept", "retry", "stop", "rollback"]
"""accept: compliant, kept. retry: non-compliant, restored, a smaller step follows. stop: non-compliant,
restored, no smaller step is allowed, the run ends. rollback: the attempt failed (e.g. a non-finite
loss), restored, and the error is raised."""
DECISIONS: tuple[Decision, ...] = get_args(Decision)

StopReason = Literal["target_reached", "no_compliant_step", "step_budget", "nothing_left", "not_certified"]
STOP_REASONS: dict[StopReason, str] = {
    "target_reached": "the compression target was reached with every important class within its false-negative budget",
    "no_compliant_step": "no smaller pruning step kept the important classes within their false-negative budget "
                         "(the last compliant model is returned)",
    "step_budget": "the budget of pruning attempts ran out (the last compliant model is returned)",
    "nothing_left": "nothing was left to prune",
    "not_certified": "the next step's false-negative rate could not be certified on the held-out certification split, "
                     "and the certified rule stops at its first failure (the last certified model is returned)",
}
"""Why the loop stopped, in words (the report prints them)."""
assert tuple(STOP_REASONS) == get_args(StopReason)

JudgedAt = Literal["argmax", "calibrated"]
"""Where :class:`FNConstraint` judges a step (``core.metrics.OperatingPoint`` is a threshold's FN/FPR, another thing)."""
OPERATING_POINTS: tuple[JudgedAt, ...] = get_args(JudgedAt)

NOTHING_LEFT = "the backend has nothing left to prune"
TOO_SMALL = "the halved step removes no channel (channels go in whole blocks): no smaller step exists"


class NonFiniteLossError(RuntimeError):
    """Fine-tuning produced a NaN or infinite loss."""


class NothingToPrune(RuntimeError):
    """Raised by a backend's ``prune`` when no further unit can be removed."""


@dataclass(frozen=True)
class FNConstraint:
    """FN_c(pruned) <= FN_c(dense) + max(abs_tol, ceil(rel_tol * FN_c(dense))) for every important class c,
    and (unless ``max_accuracy_drop`` is None) accuracy(dense) - accuracy(pruned) <= max_accuracy_drop.

    The accuracy guard is on by default: an FN bound alone is met by predicting the important class
    everywhere.

    ``operating_point``: where a step's FN and accuracy are judged. ``'argmax'``: the model's own decisions.
    ``'calibrated'``: after the smallest non-negative shift of the important classes' logits that brings their FN
    within budget (:func:`~classaware_plugin.core.find_logit_shifts`), i.e. FN held at the price of false positives,
    and the accuracy guard judged with that shift. It is the rule for a model that will be calibrated
    (:func:`~classaware_plugin.core.calibrate`) before use: a step whose fine-tuning only moved the decision
    threshold is not rejected for it, one whose positives can no longer be told apart is.

    Example:
        >>> FNConstraint([3], abs_tol=1, rel_tol=0.1).budget({3: 25})
        {3: 28}
    """

    important_classes: Sequence[int]
    abs_tol: int = 0
    rel_tol: float = 0.0
    max_accuracy_drop: float | None = 0.02
    operating_point: JudgedAt = "argmax"

    PARAMETERS: ClassVar[dict[str, Constraint]] = {
        "abs_tol": Interval(0, integer=True), "rel_tol": Interval(0.0),
        "max_accuracy_drop": Interval(0.0, 1.0, nullable=True), "operating_point": Options(OPERATING_POINTS),
    }

    def __post_init__(self) -> None:
        object.__setattr__(self, "important_classes", check_important_classes(self.important_classes, None))
        check_params(self.PARAMETERS, {k: getattr(self, k) for k in self.PARAMETERS})

    def budget(self, dense_fn: dict[int, int]) -> dict[int, int]:
        """The largest FN allowed per important class."""
        return {
            c: int(dense_fn[c]) + max(int(self.abs_tol), math.ceil(self.rel_tol * int(dense_fn[c])))
            for c in self.important_classes
        }

    def violations(self, dense: Evaluation, current: Evaluation) -> list[str]:
        """Why ``current`` is not compliant (empty list: compliant)."""
        out = []
        for c, limit in self.budget(dense.fn).items():
            if current.fn[c] > limit:
                out.append(f"FN of class {c} is {current.fn[c]} > budget {limit}")
        if self.max_accuracy_drop is not None:
            drop = dense.accuracy - current.accuracy
            if drop > self.max_accuracy_drop + 1e-12:
                out.append(f"accuracy fell by {drop:.4f} > {self.max_accuracy_drop}")
        return out

    def judge(self, dense: Evaluation, labels: Any, logits: Any) -> tuple[Evaluation, list[str], dict[int, float]]:
        """A step's validation ``(labels, logits)`` judged at :attr:`operating_point`: its evaluation there, the
        violations, and the logit shifts applied (none at argmax)."""
        shifts: dict[int, float] = {}
        if self.operating_point == "calibrated":
            shifts = find_logit_shifts(labels, logits, self.budget(dense.fn))
            logits = logits.copy()
            for c, shift in shifts.items():
                logits[:, c] += shift
        ev = evaluate_predictions(labels, logits, self.important_classes)
        return ev, self.violations(dense, ev), shifts

    def check_evaluable(self, dense: Evaluation) -> None:
        """An important class without validation samples has no defined FN: refuse before any work."""
        for c in self.important_classes:
            if c not in dense.support:
                raise ClassAwareError(
                    f"Important class {c} is out of range for a model with {len(dense.support)} outputs."
                )
            if dense.support[c] == 0:
                raise ClassAwareError(
                    f"Important class {c} has no sample in the validation split, so its false negatives are "
                    "undefined. Use a larger validation split or a stratified one."
                )


@dataclass
class StepRecord:
    """One attempt of the loop."""

    step: int
    attempt: int
    fraction: float
    decision: Decision
    compliant: bool
    violations: list[str]
    measure: dict[str, float]
    fn: dict[int, int]
    fp: dict[int, int]
    accuracy: float
    auc: dict[int, float]
    shifts: dict[int, float] = field(default_factory=dict)  # the logit shifts of a 'calibrated' judgement
    # the certification of an attempt that passed the screen (certified rule): class -> Certificate.to_dict()
    certificate: dict[int, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shifts"] = {str(k): v for k, v in self.shifts.items()}
        d["certificate"] = {str(k): v for k, v in self.certificate.items()}
        d["fn"] = {str(k): v for k, v in self.fn.items()}
        d["fp"] = {str(k): v for k, v in self.fp.items()}
        d["auc"] = {str(k): (None if v != v else v) for k, v in self.auc.items()}
        d.update(self.measure)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in names}
        kw["fn"] = {int(k): v for k, v in d["fn"].items()}
        kw["fp"] = {int(k): v for k, v in d["fp"].items()}
        kw["auc"] = {int(k): (float("nan") if v is None else v) for k, v in d["auc"].items()}
        kw["shifts"] = {int(k): v for k, v in d.get("shifts", {}).items()}
        kw["certificate"] = {int(k): v for k, v in d.get("certificate", {}).items()}
        return cls(**kw)


@dataclass
class ControllerResult:
    """What :meth:`FNConstrainedPruning.run` returns. ``budget``: the count budget of an :class:`FNConstraint`, the
    certified rule's largest certifiable count per class; ``budgets``: the certified rule's per-class budgets;
    ``certificate``: the delivered model's certification (empty when no step was certified, or with the count rule).
    """

    stop_reason: StopReason
    history: list[StepRecord]
    dense: Evaluation
    final: Evaluation
    budget: dict[int, int]
    measure: dict[str, float] = field(default_factory=dict)
    budgets: dict[int, ClassBudget] = field(default_factory=dict)
    certificate: dict[int, Certificate] = field(default_factory=dict)

    @property
    def certified(self) -> bool:
        """Whether the delivered model carries a certificate (certified rule, at least one step accepted)."""
        return bool(self.certificate) and all(k.certified for k in self.certificate.values())


class FNConstrainedPruning:
    """Iterative pruning under an FN rule: :class:`~classaware_plugin.core.FNGuarantee` (certified: a bound that
    holds on new data, tested on the backend's certification split) or :class:`FNConstraint` (counts on validation).

    Args:
        backend: a :class:`PruningBackend` (with :meth:`~PruningBackend.predict_certification` for the certified rule).
        constraint: the FN rule and accuracy guard.
        target: value of ``measure()[target_key]`` at which to stop (e.g. 2.0 for a 2x MACs reduction).
        target_key: which measure the target refers to (``'macs_reduction'``, ``'sparsity'``, ...).
        step: fraction of what remains removed by the first step, in (0, 1).
        max_halvings: how many times a rejected step is halved and retried before stopping.
        max_steps: budget of attempts (accepted or not).
        on_record: called with each :class:`StepRecord` after its decision (checkpointing, logging).

    Example:
        >>> loop = FNConstrainedPruning(backend, FNGuarantee([3]), target=2.0)   # doctest: +SKIP
        >>> result = loop.run()                                                  # doctest: +SKIP
        >>> result.certificate[3].upper_bound <= result.certificate[3].max_fn_rate  # doctest: +SKIP
        True
    """

    PARAMETERS: ClassVar[dict[str, Constraint]] = {
        "target": Interval(0.0, low_open=True), "step": Interval(0.0, 1.0, low_open=True, high_open=True),
        "max_halvings": Interval(0, integer=True), "max_steps": Interval(1, integer=True),
    }

    def __init__(
        self,
        backend: PruningBackend,
        constraint: FNConstraint | FNGuarantee,
        target: float,
        target_key: str = "macs_reduction",
        step: float = 0.2,
        max_halvings: int = 3,
        max_steps: int = 50,
        on_record: Callable[[StepRecord, FNConstrainedPruning], None] | None = None,
    ) -> None:
        if not isinstance(backend, PruningBackend):
            raise ClassAwareError(
                "The 'backend' parameter must be a classaware_plugin.core.PruningBackend (subclass it, or ModelBackend "
                f"for a model pruned in place). Got {type(backend).__name__}."
            )
        if not isinstance(constraint, (FNConstraint, FNGuarantee)):
            raise ClassAwareError("The 'constraint' parameter must be an FNGuarantee (certified rule) or an FNConstraint "
                                  f"(count rule). Got {type(constraint).__name__}.")
        check_params(self.PARAMETERS, {"target": target, "step": step, "max_halvings": max_halvings,
                                       "max_steps": max_steps})
        self.backend = backend
        self.constraint = constraint
        self.target = float(target)
        self.target_key = target_key
        self.initial_step = float(step)
        self.max_halvings = int(max_halvings)
        self.max_steps = int(max_steps)
        self.on_record = on_record
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        self.history: list[StepRecord] = []
        self.step_size = self.initial_step
        self.halvings = 0
        self.accepted = 0
        self.dense_: Evaluation | None = None
        self.current_: Evaluation | None = None
        self.stop_reason_: StopReason | None = None
        self._stopping: StopReason | None = None  # set by an attempt that ended the run (decision 'stop')
        self.budgets_: dict[int, ClassBudget] = {}  # the certified rule's budgets (set by run)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs besides the backend's own state (the last compliant model)."""
        return {
            "history": [r.to_dict() for r in self.history],
            "step_size": self.step_size,
            "halvings": self.halvings,
            "accepted": self.accepted,
            "stop_reason": self.stop_reason_,
            "stopping": self._stopping,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [StepRecord.from_dict(d) for d in state["history"]]
        self.step_size = float(state["step_size"])
        self.halvings = int(state["halvings"])
        self.accepted = int(state["accepted"])
        self.stop_reason_ = state["stop_reason"]
        self._stopping = state.get("stopping")

    # ----------------------------------------------------------------- loop
    def _reached(self, measure: dict[str, float]) -> bool:
        if self.target_key not in measure:
            raise ClassAwareError(
                f"The backend's measure() has no {self.target_key!r}; it has {sorted(measure)}."
            )
        return measure[self.target_key] >= self.target - 1e-9

    def _record(
        self, decision: Decision, ev: Evaluation, fraction: float, violations: list[str], measure: dict[str, float],
        shifts: dict[int, float] | None = None, certificate: dict[int, Certificate] | None = None,
    ) -> StepRecord:
        rec = StepRecord(
            step=self.accepted + (0 if decision == "accept" else 1),
            attempt=len(self.history) + 1,
            fraction=fraction,
            decision=decision,
            compliant=not violations,
            violations=violations,
            measure=dict(measure),
            fn={c: ev.fn[c] for c in ev.fn},
            fp={c: ev.fp[c] for c in ev.fp},
            accuracy=ev.accuracy,
            auc=dict(ev.auc),
            shifts=dict(shifts or {}),
            certificate={c: k.to_dict() for c, k in (certificate or {}).items()},
        )
        self.history.append(rec)
        log.info(
            "attempt %d (step %.4f): %s; %s; FN %s; acc %.4f",
            rec.attempt, fraction, decision, ", ".join(violations) or "compliant",
            {c: rec.fn[c] for c in self.constraint.important_classes}, rec.accuracy,
        )
        if self.on_record is not None:
            self.on_record(rec, self)
        return rec

    def run(self, dense: Evaluation | None = None) -> ControllerResult:
        """Run until the target, no compliant smaller step, or the step budget; return the result.

        ``dense`` lets a resumed run pass the dense model's validation evaluation instead of measuring
        the (already pruned) backend again.
        """
        budget = self.prepare(dense)
        if not self.history:
            self.current_ = self.dense_
        while self.stop_reason_ is None:
            self.stop_reason_ = self._next_stop()
            if self.stop_reason_ is not None:
                break
            self._attempt()
        final = self.current_ if self.current_ is not None else self.backend.evaluate()
        log.info("stopped: %s after %d attempts", self.stop_reason_, len(self.history))
        return ControllerResult(self.stop_reason_, self.history, self.dense_, final, budget, self.backend.measure(),
                                dict(self.budgets_), self.certificate_)

    @property
    def certificate_(self) -> dict[int, Certificate]:
        """The certification of the model the loop holds now: that of the last accepted attempt (certified rule)."""
        last = next((r for r in reversed(self.history) if r.decision == "accept"), None)
        if last is None or not last.certificate:
            return {}
        return {c: Certificate(**{k: v for k, v in d.items() if k != "certified"}) for c, d in last.certificate.items()}

    def prepare(self, dense: Evaluation | None = None) -> dict[int, int]:
        """Measure the dense reference (or take ``dense``) and fix the budgets, before any pruning (:meth:`run` calls
        it; a caller that resumes after the loop calls it for :attr:`budgets_`). Returns the count budget per class
        (count rule) or the most certification misses that certify (certified rule)."""
        self.dense_ = dense if dense is not None else self.backend.evaluate()
        self.constraint.check_evaluable(self.dense_)
        if not isinstance(self.constraint, FNGuarantee):
            return self.constraint.budget(self.dense_.fn)
        # Only the certification split's labels are read here: its positives fix the budgets' counts.
        cert_labels = np.asarray(self.backend.predict_certification()[0])
        positives = {c: int((cert_labels == c).sum()) for c in self.constraint.important_classes}
        self.budgets_ = self.constraint.budgets(self.dense_.fn, self.dense_.support, positives)
        return {c: b.max_count for c, b in self.budgets_.items()}

    def _next_stop(self) -> StopReason | None:
        measure = self.backend.measure()
        if self._reached(measure):
            return "target_reached"
        if self._stopping is not None:
            return self._stopping
        if len(self.history) >= self.max_steps:
            return "step_budget"
        return None

    def _judge(self) -> tuple[Evaluation, list[str], dict[int, float]]:
        """The backend's current model judged on validation at the constraint's operating point."""
        assert self.dense_ is not None
        if isinstance(self.constraint, FNGuarantee):
            return self.constraint.judge(self.dense_, self.budgets_, *self.backend.predict())
        if self.constraint.operating_point == "argmax":
            ev = self.backend.evaluate()
            return ev, self.constraint.violations(self.dense_, ev), {}
        return self.constraint.judge(self.dense_, *self.backend.predict())

    def _certify(self, shifts: dict[int, float]) -> dict[int, Certificate]:
        """The certified rule's test of the backend's current model (with ``shifts``) on the certification split."""
        assert isinstance(self.constraint, FNGuarantee)
        return self.constraint.certify(self.budgets_, *self.backend.predict_certification(), shifts)

    def _attempt(self) -> None:
        fraction = min(self.step_size, self.backend.max_fraction(self.target_key, self.target))
        # Step 1: remember the last compliant state.
        state = self.backend.snapshot()
        last = self.current_ if self.current_ is not None else self.backend.evaluate()
        try:
            # Step 2: prune, fine-tune, evaluate on validation.
            self.backend.prune(fraction)
            check_consistent(self.backend.signature(), f"the model pruned in attempt {len(self.history) + 1}")
            self.backend.finetune()
            ev, violations, shifts = self._judge()
            # The certification split is looked at only by a step the selection split sends to it (certified rule).
            certificate = self._certify(shifts) if not violations and isinstance(self.constraint, FNGuarantee) else {}
            measure = self.backend.measure()
        except NothingToPrune:
            self.backend.restore(state)
            # After a rejected step, a halved one that removes nothing means no smaller step exists (channels go in
            # whole blocks, e.g. round_to): no compliant step. Otherwise the model has nothing left to prune.
            self._stopping = "no_compliant_step" if self.halvings else "nothing_left"
            self._record("stop", last, fraction, [TOO_SMALL if self.halvings else NOTHING_LEFT], self.backend.measure())
            return
        except BaseException:
            # A fault (non-finite loss, Ctrl-C, ...): restore the last compliant state, let the error through.
            self.backend.restore(state)
            self._record("rollback", last, fraction, ["the attempt raised an error"], self.backend.measure())
            raise
        failed = [f"class {c}: the upper bound of its FN rate is {k.upper_bound:.4f} > {k.max_fn_rate:.4f} ({k.fn} of "
                  f"{k.positives} certification positives missed)" for c, k in certificate.items() if not k.certified]
        if failed:
            # Fixed-sequence testing: the first step that fails certification ends the run.
            self.backend.restore(state)
            self.current_ = last
            self._stopping = "not_certified"
            self._record("stop", ev, fraction, failed, measure, shifts, certificate)
            return
        if not violations:
            self.accepted += 1
            self.halvings = 0
            self.current_ = ev
            # After a success, let a halved step grow back (doubling, up to the first step size).
            self.step_size = min(self.initial_step, max(self.step_size, fraction) * 2.0)
            self._record("accept", ev, fraction, [], measure, shifts, certificate)
            return
        # Step 3: non-compliant -> restore exactly, then retry with half the step or stop.
        self.backend.restore(state)
        self.current_ = last
        if self.halvings < self.max_halvings:
            self.halvings += 1
            self.step_size = fraction / 2.0
            self._record("retry", ev, fraction, violations, measure, shifts)
        else:
            self._stopping = "no_compliant_step"
            self._record("stop", ev, fraction, violations, measure, shifts)
