from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from classaware_plugin.core import (
    ClassAwareError,
    Evaluation,
    FNConstrainedPruning,
    FNConstraint,
    NonFiniteLossError,
    NothingToPrune,
    PruningBackend,
    StepRecord,
)


def make_eval(fn: int, accuracy: float = 0.9, support: int = 50) -> Evaluation:
    cm = np.zeros((2, 2), dtype=int)
    return Evaluation(
        num_samples=100, accuracy=accuracy, fn={0: 0, 1: fn}, fp={0: fn, 1: 0}, recall={0: 1.0, 1: 1 - fn / 50},
        support={0: 50, 1: support}, auc={1: 0.9}, ap={1: 0.9}, confusion=cm, important_classes=[1],
    )


class ScriptedBackend(PruningBackend):
    """A backend whose 'model' is a tensor; each prune step scribbles on it; outcomes are scripted."""

    def __init__(self, outcomes, dense_fn=10, dense_acc=0.9, fail_at=None):
        self.weights = torch.randn(32, generator=torch.Generator().manual_seed(1))
        self.sparsity = 0.0
        self.outcomes = list(outcomes)
        self.dense = make_eval(dense_fn, dense_acc)
        self.pending = None
        self.calls = 0
        self.fail_at = fail_at
        self.accepted_states = []

    def prune(self, fraction):
        self.calls += 1
        if self.fail_at == self.calls:
            raise NothingToPrune()
        self.sparsity = self.sparsity + (1 - self.sparsity) * fraction
        self.weights = self.weights * torch.rand(32) + torch.randn(32)

    def finetune(self):
        if self.fail_at == -self.calls:
            raise NonFiniteLossError("nan")

    def evaluate(self):
        if self.calls == 0:
            return self.dense
        fn, acc = self.outcomes[(self.calls - 1) % len(self.outcomes)]
        return make_eval(fn, acc)

    def snapshot(self):
        return (self.weights.clone(), self.sparsity)

    def restore(self, state):
        self.weights, self.sparsity = state[0].clone(), state[1]

    def measure(self):
        return {"sparsity": self.sparsity}


def test_scripted_fn_sequence_stops_where_expected():
    # dense FN 10, abs_tol 2 -> budget 12. Outcomes: ok, ok, too many FN (retry), too many (retry), too many (stop).
    backend = ScriptedBackend([(11, 0.9), (12, 0.9), (13, 0.9), (20, 0.9), (14, 0.9)])
    loop = FNConstrainedPruning(backend, FNConstraint([1], abs_tol=2), target=0.99, target_key="sparsity",
                                step=0.5, max_halvings=2)
    res = loop.run()
    assert [r.decision for r in res.history] == ["accept", "accept", "retry", "retry", "stop"]
    assert [r.fraction for r in res.history] == [0.5, 0.5, 0.5, 0.25, 0.125]
    assert res.stop_reason == "no_compliant_step"
    assert res.final.fn[1] == 12
    assert backend.sparsity == pytest.approx(0.75)
    assert res.budget == {1: 12}


def test_accuracy_guard_rejects_a_trivial_fn_solution():
    backend = ScriptedBackend([(0, 0.5)])
    res = FNConstrainedPruning(backend, FNConstraint([1], max_accuracy_drop=0.05), target=0.9, target_key="sparsity",
                               max_halvings=0).run()
    assert res.history[0].decision == "stop"
    assert "accuracy fell" in res.history[0].violations[0]
    no_guard = ScriptedBackend([(0, 0.5)])
    res2 = FNConstrainedPruning(no_guard, FNConstraint([1], max_accuracy_drop=None), target=0.9,
                                target_key="sparsity", step=0.5).run()
    assert res2.stop_reason == "target_reached"


def test_rel_tol_budget_uses_ceil():
    assert FNConstraint([1], abs_tol=1, rel_tol=0.25).budget({1: 10}) == {1: 13}
    assert FNConstraint([1], abs_tol=4, rel_tol=0.25).budget({1: 10}) == {1: 14}


def test_step_budget_and_nothing_left():
    backend = ScriptedBackend([(10, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.999, target_key="sparsity", step=0.1,
                               max_steps=3).run()
    assert res.stop_reason == "step_budget" and len(res.history) == 3
    backend = ScriptedBackend([(10, 0.9)], fail_at=2)
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.999, target_key="sparsity", step=0.1).run()
    assert res.stop_reason == "nothing_left"


def test_a_halved_step_that_removes_nothing_means_no_compliant_step():
    # Rejected (FN 20 > 10), then the halved step removes nothing (channels go in whole blocks): not "nothing left".
    backend = ScriptedBackend([(20, 0.9)], fail_at=2)
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.999, target_key="sparsity", step=0.1).run()
    assert [r.decision for r in res.history] == ["retry", "stop"]
    assert res.stop_reason == "no_compliant_step" and "whole blocks" in res.history[-1].violations[0]


def test_non_finite_loss_restores_and_raises():
    backend = ScriptedBackend([(10, 0.9)], fail_at=-2)
    loop = FNConstrainedPruning(backend, FNConstraint([1]), target=0.999, target_key="sparsity", step=0.5)
    backend_state_after_first = {}

    def remember(rec, _):
        if rec.decision == "accept":
            backend_state_after_first["w"] = backend.weights.clone()

    loop.on_record = remember
    with pytest.raises(NonFiniteLossError):
        loop.run()
    assert loop.history[-1].decision == "rollback"
    assert torch.equal(backend.weights, backend_state_after_first["w"])


def test_important_class_without_validation_samples_is_refused():
    backend = ScriptedBackend([(0, 0.9)])
    backend.dense = make_eval(0, support=0)
    with pytest.raises(ClassAwareError, match="no sample in the validation split"):
        FNConstrainedPruning(backend, FNConstraint([1]), target=0.5, target_key="sparsity").run()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(abs_tol=-1), "abs_tol"),
        (dict(rel_tol=-0.1), "rel_tol"),
        (dict(max_accuracy_drop=1.5), "max_accuracy_drop"),
        (dict(important_classes=[1, 1]), "must not repeat"),
    ],
)
def test_constraint_bad_input(kwargs, message):
    kw = dict(important_classes=[1]) | kwargs
    with pytest.raises(ClassAwareError, match=message):
        FNConstraint(**kw)


@pytest.mark.parametrize("kwargs, message", [(dict(step=1.0), "step"), (dict(target=0), "target"),
                                             (dict(max_halvings=-1), "max_halvings"), (dict(max_steps=0), "max_steps")])
def test_controller_bad_input(kwargs, message):
    kw = dict(target=0.5, target_key="sparsity") | kwargs
    with pytest.raises(ClassAwareError, match=message):
        FNConstrainedPruning(ScriptedBackend([(0, 0.9)]), FNConstraint([1]), **kw)


def test_state_dict_resume_reaches_the_same_history():
    outcomes = [(11, 0.9), (13, 0.9), (12, 0.9), (15, 0.9), (10, 0.9), (16, 0.9), (17, 0.9)]
    full = ScriptedBackend(outcomes)
    ref = FNConstrainedPruning(full, FNConstraint([1], abs_tol=2), target=0.99, target_key="sparsity", step=0.4,
                               max_halvings=1).run()
    # Interrupted after 3 attempts, then resumed from the saved controller and backend state.
    part = ScriptedBackend(outcomes)
    saved = {}

    def checkpoint(rec, loop):
        saved["loop"] = copy.deepcopy(loop.state_dict())
        saved["backend"] = (part.snapshot(), part.calls)
        if len(loop.history) == 3:
            raise KeyboardInterrupt

    loop = FNConstrainedPruning(part, FNConstraint([1], abs_tol=2), target=0.99, target_key="sparsity", step=0.4,
                                max_halvings=1, on_record=checkpoint)
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    resumed_backend = ScriptedBackend(outcomes)
    resumed_backend.restore(saved["backend"][0])
    resumed_backend.calls = saved["backend"][1]
    loop2 = FNConstrainedPruning(resumed_backend, FNConstraint([1], abs_tol=2), target=0.99, target_key="sparsity",
                                 step=0.4, max_halvings=1)
    loop2.load_state_dict(saved["loop"])
    res = loop2.run(dense=full.dense)
    assert [r.to_dict() for r in res.history] == [r.to_dict() for r in ref.history]


@settings(max_examples=60, deadline=None)
@given(
    outcomes=st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0.5, 0.88, 0.9])), min_size=1, max_size=12),
    abs_tol=st.integers(0, 3),
    max_halvings=st.integers(0, 3),
    max_steps=st.integers(1, 15),
)
def test_property_returns_the_last_compliant_state_bit_for_bit(outcomes, abs_tol, max_halvings, max_steps):
    backend = ScriptedBackend(outcomes)
    constraint = FNConstraint([1], abs_tol=abs_tol, max_accuracy_drop=0.05)
    last_compliant = {"w": backend.weights.clone(), "fn": backend.dense.fn[1]}

    def track(rec, _):
        if rec.decision == "accept":
            last_compliant["w"] = backend.weights.clone()
            last_compliant["fn"] = rec.fn[1]

    res = FNConstrainedPruning(backend, constraint, target=0.999, target_key="sparsity", step=0.3,
                               max_halvings=max_halvings, max_steps=max_steps, on_record=track).run()
    assert torch.equal(backend.weights, last_compliant["w"])
    assert not constraint.violations(res.dense, res.final)
    assert res.final.fn[1] == last_compliant["fn"]
    assert res.stop_reason in ("target_reached", "no_compliant_step", "step_budget")
    for rec in res.history:
        assert rec.compliant == (rec.decision == "accept")


def test_rounded_channels_keeps_the_nearest_multiple_within_the_layer():
    from classaware_plugin.core.channels import rounded_channels

    assert rounded_channels(64, 64 * 0.95, 8) == 64   # a 5% step leaves a 64-channel layer alone
    assert rounded_channels(64, 57.6, 8) == 56        # 10%: one block of 8
    assert rounded_channels(64, 51.2, 8) == 48        # 20%: nearest multiple
    assert rounded_channels(16, 11.2, 8) == 8 and rounded_channels(16, 12.8, 8) == 16
    assert rounded_channels(16, 2.0, 8) == 8          # never below one block
    assert rounded_channels(5, 2.5, 8) == 5           # a layer narrower than a block is left alone
    assert rounded_channels(22, 21.0, 8) == 22        # never above the layer's width
    assert rounded_channels(64, 40.7, None) == 40 and rounded_channels(64, 40.7, 1) == 40
    assert rounded_channels(64, 62.0, 8, down=True) == 56 and rounded_channels(16, 7.0, 8, down=True) == 8


def test_a_halved_step_grows_back_after_a_success_but_not_past_the_first_step():
    # reject at 0.5 -> retry at 0.25 (accepted) -> the step doubles back to 0.5, and stays there (capped)
    backend = ScriptedBackend([(20, 0.9), (10, 0.9), (10, 0.9), (10, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.95, target_key="sparsity", step=0.5,
                               max_halvings=2, max_steps=4).run()
    assert [r.decision for r in res.history] == ["retry", "accept", "accept", "accept"]
    assert [r.fraction for r in res.history] == [0.5, 0.25, 0.5, 0.5]


@pytest.mark.parametrize("target,attempts", [(0.5, 1), (0.5 + 1e-6, 2)])
def test_the_loop_stops_exactly_at_the_target(target, attempts):
    # One step of 0.5 gives sparsity 0.5 exactly: a target of 0.5 is reached; one a hair above is not.
    backend = ScriptedBackend([(10, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=target, target_key="sparsity", step=0.5).run()
    assert res.stop_reason == "target_reached" and len(res.history) == attempts


def test_the_stop_reason_comes_from_what_happened_not_from_the_message():
    # A backend with nothing left on the very first step: nothing_left; after a rejected step a halved step that
    # removes nothing: no_compliant_step. Both are recorded as 'stop' with the reason kept over a resume.
    backend = ScriptedBackend([(10, 0.9)], fail_at=1)
    loop = FNConstrainedPruning(backend, FNConstraint([1]), target=0.9, target_key="sparsity")
    assert loop.run().stop_reason == "nothing_left"
    backend = ScriptedBackend([(20, 0.9)], fail_at=2)
    loop = FNConstrainedPruning(backend, FNConstraint([1]), target=0.9, target_key="sparsity")
    assert loop.run().stop_reason == "no_compliant_step"
    again = FNConstrainedPruning(ScriptedBackend([(10, 0.9)]), FNConstraint([1]), target=0.9, target_key="sparsity")
    again.load_state_dict({**loop.state_dict(), "stop_reason": None})
    assert again.run(dense=loop.dense_).stop_reason == "no_compliant_step"


def test_a_backend_must_subclass_the_contract():
    class Duck:
        def prune(self, fraction): ...

    with pytest.raises(ClassAwareError, match="must be a classaware_plugin.core.PruningBackend.*Duck"):
        FNConstrainedPruning(Duck(), FNConstraint([1]), target=2.0)


class LogitBackend(PruningBackend):
    """Scripted validation logits per attempt: class 1 important, 10 positives among 100 samples."""

    def __init__(self, logits_per_attempt):
        self.y = np.array([1] * 10 + [0] * 90)
        self.script = logits_per_attempt
        self.calls = 0
        self.sparsity = 0.0

    def _logits(self):
        return self.script[min(self.calls, len(self.script) - 1)]

    def prune(self, fraction):
        self.calls += 1
        self.sparsity += (1 - self.sparsity) * fraction

    def finetune(self):
        pass

    def predict(self):
        return self.y, self._logits()

    def evaluate(self):
        from classaware_plugin.core import evaluate_predictions

        return evaluate_predictions(self.y, self._logits(), [1])

    def snapshot(self):
        return self.calls, self.sparsity

    def restore(self, state):
        self.sparsity = state[1]

    def measure(self):
        return {"sparsity": self.sparsity}


def _logits(pos_margin, neg_margin):
    """Column 1 minus column 0: positives at ``pos_margin`` (a list of 10), negatives at ``neg_margin`` (90)."""
    z = np.zeros((100, 2))
    z[:10, 1] = pos_margin
    z[10:, 1] = neg_margin
    return z


def test_the_calibrated_operating_point_accepts_a_moved_threshold_and_rejects_lost_separation():
    dense = _logits([1.0] * 9 + [-1.0], [-2.0] * 90)  # 1 FN, no FP
    moved = _logits([-0.5] * 9 + [-1.0], [-2.0] * 90)  # every positive below 0 (10 FN), still above every negative
    mixed = _logits([-0.5] * 9 + [-1.0], [-2.0] * 80 + [-0.1] * 10)  # 10 negatives now above the positives

    def run(point, script):
        loop = FNConstrainedPruning(LogitBackend([dense, *script]), FNConstraint([1], operating_point=point),
                                    target=0.5, target_key="sparsity", step=0.5, max_halvings=0)
        return loop.run()

    argmax = run("argmax", [moved])
    assert argmax.history[0].decision == "stop" and "FN of class 1 is 10 > budget 1" in argmax.history[0].violations[0]
    calibrated = run("calibrated", [moved])
    rec = calibrated.history[0]
    assert rec.decision == "accept" and rec.fn[1] == 1 and rec.fp[1] == 0 and 0.5 < rec.shifts[1] < 1.0
    assert calibrated.stop_reason == "target_reached"
    lost = run("calibrated", [mixed]).history[0]  # FN back to 1 only by taking 10 negatives along: accuracy -10%
    assert lost.decision == "stop" and lost.fn[1] == 1 and lost.fp[1] == 10
    assert any("accuracy fell" in v for v in lost.violations)
    again = StepRecord.from_dict(rec.to_dict())
    assert again.shifts == rec.shifts


def test_the_operating_point_must_be_known():
    with pytest.raises(ClassAwareError, match="operating_point.*'roc'"):
        FNConstraint([1], operating_point="roc")


def test_every_record_carries_its_step_fraction_measure_and_evaluation():
    # budget 12: accept (11), retry (20), accept (12), accept (11 again) reaches the target
    backend = ScriptedBackend([(11, 0.9), (20, 0.8), (12, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1], abs_tol=2), target=0.8, target_key="sparsity", step=0.5,
                               max_halvings=2).run()
    assert [(r.step, r.attempt, r.decision) for r in res.history] == [(1, 1, "accept"), (2, 2, "retry"),
                                                                      (2, 3, "accept"), (3, 4, "accept")]
    assert [r.fraction for r in res.history] == [0.5, 0.5, 0.25, 0.5]
    assert [r.measure["sparsity"] for r in res.history] == [0.5, 0.75, 0.625, 0.8125]  # a retry's: before restore
    assert [r.fn[1] for r in res.history] == [11, 20, 12, 11] and res.history[1].accuracy == 0.8
    assert res.history[1].violations == ["FN of class 1 is 20 > budget 12", "accuracy fell by 0.1000 > 0.02"]
    assert all(r.shifts == {} for r in res.history)  # argmax: no shift
    assert res.final.fn[1] == 11 and res.measure == {"sparsity": 0.8125} and res.stop_reason == "target_reached"
    d = res.history[1].to_dict()
    assert d["sparsity"] == 0.75 and d["fn"] == {"0": 0, "1": 20} and d["auc"] == {"1": 0.9}
    back = StepRecord.from_dict(d)
    assert back == res.history[1]


def test_a_twice_halved_step_doubles_back_once_per_success():
    # reject 0.5, reject 0.25, accept 0.125 -> 0.25 next (doubled once), then 0.5 (capped at the first step)
    backend = ScriptedBackend([(20, 0.9), (20, 0.9), (10, 0.9), (10, 0.9), (10, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.99, target_key="sparsity", step=0.5,
                               max_halvings=3, max_steps=5).run()
    assert [r.fraction for r in res.history] == [0.5, 0.25, 0.125, 0.25, 0.5]


def test_an_accuracy_drop_exactly_at_the_guard_is_allowed():
    backend = ScriptedBackend([(10, 0.88)])  # dense 0.9: a drop of 0.02 (0.020000000000000018 in floats)
    res = FNConstrainedPruning(backend, FNConstraint([1], max_accuracy_drop=0.02), target=0.5, target_key="sparsity",
                               step=0.5).run()
    assert res.history[0].decision == "accept"
    tighter = FNConstrainedPruning(ScriptedBackend([(10, 0.8799)]), FNConstraint([1], max_accuracy_drop=0.02),
                                   target=0.5, target_key="sparsity", step=0.5, max_halvings=0).run()
    assert tighter.history[0].decision == "stop"


def test_the_step_limit_is_asked_with_the_target_and_caps_the_step():
    class Limited(ScriptedBackend):
        asked = []

        def max_fraction(self, key, target):
            self.asked.append((key, target))
            return 0.1

    backend = Limited([(10, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.3, target_key="sparsity", step=0.5,
                               max_steps=1).run()
    assert backend.asked == [("sparsity", 0.3)] and res.history[0].fraction == 0.1


def test_stop_and_rollback_records_keep_the_fraction_tried():
    backend = ScriptedBackend([(10, 0.9)], fail_at=1)
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.9, target_key="sparsity", step=0.4).run()
    assert res.history[0].fraction == 0.4 and res.history[0].violations == ["the backend has nothing left to prune"]
    assert res.final is backend.dense or res.final.fn == backend.dense.fn
    broken = ScriptedBackend([(10, 0.9)], fail_at=-1)
    loop = FNConstrainedPruning(broken, FNConstraint([1]), target=0.9, target_key="sparsity", step=0.4)
    with pytest.raises(NonFiniteLossError):
        loop.run()
    assert loop.history[0].decision == "rollback" and loop.history[0].fraction == 0.4
    assert loop.history[0].violations == ["the attempt raised an error"] and broken.sparsity == 0.0


def test_the_result_is_the_last_accepted_evaluation_not_a_new_one():
    class Counting(ScriptedBackend):
        evaluations = 0

        def evaluate(self):
            self.evaluations += 1
            return super().evaluate()

    backend = Counting([(10, 0.9)])
    res = FNConstrainedPruning(backend, FNConstraint([1]), target=0.5, target_key="sparsity", step=0.5).run()
    assert backend.evaluations == 2  # the dense model, then the one accepted step: nothing re-evaluated at the end
    assert res.final.fn[1] == 10


def test_state_dict_round_trip_restores_the_stop_reason_and_counters():
    backend = ScriptedBackend([(10, 0.9), (20, 0.9)])
    loop = FNConstrainedPruning(backend, FNConstraint([1]), target=0.9, target_key="sparsity", step=0.5,
                                max_halvings=1)
    loop.run()
    again = FNConstrainedPruning(ScriptedBackend([(10, 0.9)]), FNConstraint([1]), target=0.9, target_key="sparsity")
    again.load_state_dict(loop.state_dict())
    assert (again.stop_reason_, again.accepted, again.halvings, again.step_size) == (
        loop.stop_reason_, loop.accepted, loop.halvings, loop.step_size)
    assert again.stop_reason_ is not None and again.accepted == loop.accepted > 0
    again.reset()
    assert (again.accepted, again.halvings, again.history, again.stop_reason_) == (0, 0, [], None)
