"""The certified FN rule: the exact bound, the budgets, the split, and its validity where the truth is known."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from scipy import stats

from classaware_plugin.core import (
    ClassAwareError, FNConstrainedPruning, FNConstraint, FNGuarantee, NothingToPrune, PruningBackend,
    evaluate_predictions,
)
from classaware_plugin.core.guarantee import (
    certification_indices, fn_rate_upper_bound, largest_certified_count, pass_probability, positives_needed,
)


# ----------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("n", [1, 7, 18, 300])
def test_the_bound_of_no_miss_is_the_closed_form(n):
    assert fn_rate_upper_bound(0, n, 0.1) == pytest.approx(1 - 0.1 ** (1 / n), rel=1e-9)
    assert fn_rate_upper_bound(n, n, 0.1) == 1.0


@pytest.mark.parametrize("n,p", [(20, 0.05), (50, 0.3), (300, 0.5), (300, 0.02)])
def test_the_bound_covers_the_true_rate_at_least_one_minus_delta_exactly(n, p):
    """Summed over every count the binomial can give: the chance that the bound falls below the true rate is at
    most delta (Clopper-Pearson is exact, i.e. conservative)."""
    for delta in (0.05, 0.1, 0.3):
        below = sum(stats.binom.pmf(k, n, p) for k in range(n + 1) if fn_rate_upper_bound(k, n, delta) < p)
        assert below <= delta + 1e-12


def test_positives_needed_is_the_smallest_count_that_certifies_a_model_without_misses():
    for b, d in [(0.1, 0.1), (0.05, 0.1), (0.2, 0.01), (0.5, 0.3)]:
        n = positives_needed(b, d)
        assert fn_rate_upper_bound(0, n, d) <= b < fn_rate_upper_bound(0, n - 1, d)
        assert n == math.ceil(math.log(d) / math.log(1 - b))


def test_the_largest_certified_count_is_the_last_count_within_the_budget():
    k = largest_certified_count(60, 0.2, 0.1)
    assert fn_rate_upper_bound(k, 60, 0.1) <= 0.2 < fn_rate_upper_bound(k + 1, 60, 0.1)
    assert largest_certified_count(18, 0.1, 0.1) == -1


def test_pass_probability_falls_with_the_selection_count():
    probs = [pass_probability(k, 100, 100, 20) for k in range(0, 45, 5)]
    assert probs == sorted(probs, reverse=True) and probs[0] > 0.99 and probs[-1] < 0.01
    assert pass_probability(0, 100, 100, -1) == 0.0


# ----------------------------------------------------------------------------- budgets
def test_a_stated_budget_is_kept_and_its_counts_follow_from_the_positives():
    b = FNGuarantee([3], max_fn_rate=0.2).budgets({3: 9}, {3: 60}, {3: 60})[3]
    assert b.max_fn_rate == 0.2 and b.derived.startswith("stated")
    assert b.max_count == largest_certified_count(60, 0.2, 0.1)
    assert pass_probability(b.screen_limit, 60, 60, b.max_count) >= 0.9 > pass_probability(b.screen_limit + 1, 60, 60,
                                                                                          b.max_count)


def test_the_default_budget_is_dense_plus_the_tolerance_when_the_data_allow_it():
    b = FNGuarantee([1], delta=0.1).budgets({1: 300}, {1: 1000}, {1: 1000})[1]
    assert b.max_fn_rate == pytest.approx(0.35) and "widened" not in b.derived
    b = FNGuarantee([1], tolerance=0.02).budgets({1: 300}, {1: 1000}, {1: 1000})[1]
    assert b.max_fn_rate == pytest.approx(0.32)


def test_too_few_positives_widen_the_default_budget_and_say_so(caplog):
    with caplog.at_level(logging.WARNING):
        b = FNGuarantee([3]).budgets({3: 1}, {3: 18}, {3: 18})[3]
    assert "widened" in b.derived and b.max_fn_rate > 1 / 18 + 0.05
    assert "cannot certify" in caplog.text and "18 certification positives" in caplog.text
    # the widened budget lets a model with the dense model's selection count through the screen
    assert b.screen_limit >= 1


def test_a_budget_the_positives_cannot_certify_is_refused_with_the_positives_it_needs():
    with pytest.raises(ClassAwareError, match=r"18 positives.*at least 22 positives"):
        FNGuarantee([3], max_fn_rate=0.1).budgets({3: 0}, {3: 18}, {3: 18})
    with pytest.raises(ClassAwareError, match="tolerance"):
        FNGuarantee([3], tolerance=0.01).budgets({3: 0}, {3: 18}, {3: 18})


def test_several_classes_share_delta():
    g = FNGuarantee([1, 2], max_fn_rate={1: 0.3, 2: 0.4}, delta=0.1)
    b = g.budgets({1: 0, 2: 0}, {1: 100, 2: 100}, {1: 100, 2: 100})
    assert b[1].delta == b[2].delta == pytest.approx(0.05) and b[2].max_fn_rate == 0.4


@pytest.mark.parametrize("kwargs,message", [
    ({"delta": 0.0}, "'delta'"), ({"delta": 1.0}, "'delta'"), ({"max_fn_rate": 1.5}, "'max_fn_rate'"),
    ({"max_fn_rate": {4: 0.1}}, "names classes"), ({"max_fn_rate": 0.1, "tolerance": 0.1}, "not both"),
    ({"tolerance": -0.1}, "'tolerance'"), ({"operating_point": "median"}, "'operating_point'"),
])
def test_bad_settings_are_refused_naming_the_parameter(kwargs, message):
    with pytest.raises(ClassAwareError, match=message):
        FNGuarantee([3], **kwargs)


def test_the_certification_split_is_stratified_disjoint_and_seeded():
    y = np.repeat(np.arange(4), [10, 11, 1, 40])
    sel, cert = certification_indices(y, 0.5, seed=3)
    assert len(np.intersect1d(sel, cert)) == 0 and len(sel) + len(cert) == len(y)
    assert [int((y[cert] == c).sum()) for c in range(4)] == [5, 6, 0, 20]  # a single sample stays in selection
    assert np.array_equal(cert, certification_indices(y, 0.5, seed=3)[1])
    assert not np.array_equal(cert, certification_indices(y, 0.5, seed=4)[1])


# ----------------------------------------------------------------------------- validity where the truth is known
class SyntheticBackend(PruningBackend):
    """A 'model' whose only property is its true FN rate on class 1, rising with compression: ``0.1 + 0.3 * s``.
    Every pruned model is a fresh draw of which validation positives it misses (a fixed model evaluated twice gives
    the same predictions). The selection and certification splits have 200 positives each; the count rule reads both
    as one validation split, as the CLI does."""

    POS, NEG = 200, 50

    def __init__(self, rng: np.random.Generator, split: bool) -> None:
        self.rng, self.split, self.s = rng, split, 0.0
        half = np.r_[np.ones(self.POS, int), np.zeros(self.NEG, int)]
        self.labels = {"sel": half, "cert": half}
        self.missed = self._draw()

    def rate(self, s: float | None = None) -> float:
        return 0.1 + 0.3 * (self.s if s is None else s)

    def _draw(self) -> dict[str, np.ndarray]:
        return {k: self.rng.random(self.POS) < self.rate() for k in ("sel", "cert")}

    def _logits(self, part: str) -> np.ndarray:
        y = self.labels[part]
        z = np.zeros((len(y), 2))
        z[y == 0, 0] = 1.0
        hit = np.zeros(len(y), bool)
        hit[: self.POS] = ~self.missed[part]
        z[hit, 1] = 1.0
        z[(y == 1) & ~hit, 0] = 1.0
        return z

    def predict(self):
        parts = ("sel",) if self.split else ("sel", "cert")
        return (np.concatenate([self.labels[p] for p in parts]), np.concatenate([self._logits(p) for p in parts]))

    def predict_certification(self):
        return self.labels["cert"], self._logits("cert")

    def evaluate(self):
        return evaluate_predictions(*self.predict(), [1])

    def prune(self, fraction):
        if self.s > 0.99:
            raise NothingToPrune()
        self.s += (1 - self.s) * fraction
        self.missed = self._draw()

    def finetune(self):
        pass

    def snapshot(self):
        return self.s, self.missed

    def restore(self, state):
        self.s, self.missed = state

    def measure(self):
        return {"sparsity": self.s}


def test_the_certified_rule_keeps_its_promise_where_the_count_rule_does_not():
    """1,000 draws: the certified rule delivers a model whose true FN rate exceeds its budget in at most delta of
    them; the count rule with the same nominal budget (dense validation FN + 10% of the positives) exceeds it far
    more often, because it keeps the last of many steps whose count was lucky."""
    draws, delta, budget = 1000, 0.1, 0.2
    certified_bad = count_bad = 0
    for i in range(draws):
        backend = SyntheticBackend(np.random.default_rng(i), split=True)
        rule = FNGuarantee([1], max_fn_rate=budget, delta=delta, max_accuracy_drop=None)
        FNConstrainedPruning(backend, rule, target=0.99, target_key="sparsity", step=0.2, max_steps=30).run()
        certified_bad += backend.rate() > budget

        backend = SyntheticBackend(np.random.default_rng(i), split=False)
        dense_fn = int(backend.missed["sel"].sum() + backend.missed["cert"].sum())
        tol = int(0.1 * 2 * SyntheticBackend.POS)
        rule = FNConstraint([1], abs_tol=tol, max_accuracy_drop=None)
        FNConstrainedPruning(backend, rule, target=0.99, target_key="sparsity", step=0.2, max_steps=30).run()
        count_bad += backend.rate() > (dense_fn + tol) / (2 * SyntheticBackend.POS)
    assert certified_bad / draws <= delta, certified_bad
    assert count_bad / draws > delta, count_bad
