from __future__ import annotations

import math

import pytest
import torch

from classaware_plugin.core import ClassAwareError, ClassDependentLoss, make_class_weights


def test_inverse_weights_by_hand():
    assert make_class_weights([3, 1], "inverse").tolist() == pytest.approx([0.5, 1.5])


def test_balanced_weights_follow_cui_et_al():
    beta = 0.999
    counts = [1000, 10]
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    mean = sum(raw) / 2
    assert make_class_weights(counts, "balanced", beta).tolist() == pytest.approx([r / mean for r in raw], rel=1e-5)


def test_loss_value_against_hand_computation():
    # Two classes, class 1 important; inverse weights [0.5, 1.5].
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 1])
    loss = ClassDependentLoss([1], class_counts=[3, 1], class_weights="inverse", rank_weight=2.0, margin=1.0)
    ce = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-1.0)), math.log(2.0)]
    w = [0.5, 1.5, 1.5]
    wce = sum(wi * c for wi, c in zip(w, ce)) / sum(w)
    # Binary: score of class 1 = logit1 - logit0: [-2, 1, 0]; positives {1, 0}, negative {-2}.
    rank = (max(0.0, 1 - (1 - -2)) ** 2 + max(0.0, 1 - (0 - -2)) ** 2) / 2  # both pairs satisfied -> 0
    assert float(loss(logits, target)) == pytest.approx(wce + 2.0 * rank, rel=1e-6)
    # A violated pair: positive score -1 vs negative score 0.5 -> hinge (1 - (-1.5))^2 = 6.25.
    logits2 = torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    target2 = torch.tensor([0, 1])
    l2 = ClassDependentLoss([1], class_weights=[1.0, 1.0], rank_weight=1.0)
    ce2 = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert float(l2(logits2, target2)) == pytest.approx(ce2 + 6.25, rel=1e-6)


def test_multiclass_score_is_log_odds():
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]])
    target = torch.tensor([2, 0])
    loss = ClassDependentLoss([2], class_weights="none", num_classes=3, rank_weight=1.0, margin=0.0)
    s_pos = 3.0 - math.log(math.exp(1) + math.exp(2))
    s_neg = 0.0 - math.log(math.exp(3) + math.exp(0))
    ce = torch.nn.functional.cross_entropy(logits, target).item()
    assert float(loss(logits, target)) == pytest.approx(ce + max(0.0, -(s_pos - s_neg)) ** 2, rel=1e-6)


def test_batch_without_positives_has_no_rank_term_and_no_nan():
    loss = ClassDependentLoss([1], class_counts=[10, 5], rank_weight=5.0)
    logits = torch.randn(4, 2, requires_grad=True)
    target = torch.zeros(4, dtype=torch.long)
    value = loss(logits, target)
    assert torch.isfinite(value)
    assert float(value.detach()) == pytest.approx(torch.nn.functional.cross_entropy(logits.detach(), target).item(), rel=1e-6)
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_warmup_uses_unit_weights():
    loss = ClassDependentLoss([1], class_counts=[90, 10], class_weights="inverse", rank_weight=0.0)
    logits, target = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 0, 0])
    loss.warmup = True
    assert float(loss(logits, target)) == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())
    loss.warmup = False
    assert float(loss(logits, target)) != pytest.approx(torch.nn.functional.cross_entropy(logits, target).item())


def test_several_important_classes_average_their_rank_terms():
    logits = torch.randn(12, 4)
    target = torch.arange(12) % 4
    both = ClassDependentLoss([1, 3], class_weights="none", num_classes=4, rank_weight=1.0)
    one = ClassDependentLoss([1], class_weights="none", num_classes=4, rank_weight=1.0)
    three = ClassDependentLoss([3], class_weights="none", num_classes=4, rank_weight=1.0)
    ce = torch.nn.functional.cross_entropy(logits, target).item()
    expected = ce + ((float(one(logits, target)) - ce) + (float(three(logits, target)) - ce)) / 2
    assert float(both(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_logit_adjustment_by_hand_and_the_rank_term_sees_raw_logits():
    # Counts [3, 1]: prior [0.75, 0.25]; tau = 2 adds 2 * log(prior) to the logits the cross-entropy sees.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 1, 1])
    la = ClassDependentLoss([1], class_counts=[3, 1], class_weights="none", rank_weight=0.0, logit_adjustment=2.0)
    ce = torch.nn.functional.cross_entropy
    adjusted = logits + 2.0 * torch.log(torch.tensor([0.75, 0.25]))
    assert float(la(logits, target)) == pytest.approx(ce(adjusted, target).item(), rel=1e-6)
    # The rare class pays more when it is predicted at the same logit: the adjusted loss exceeds plain CE here.
    assert float(la(logits, target)) > ce(logits, target).item()
    # With the ranking term on, the term is the one of the unadjusted logits.
    ranked_la = ClassDependentLoss([1], class_counts=[3, 1], class_weights="none", rank_weight=1.0, margin=4.0,
                                   logit_adjustment=2.0)
    ranked = ClassDependentLoss([1], class_counts=[3, 1], class_weights="none", rank_weight=1.0, margin=4.0)
    rank_la = float(ranked_la(logits, target)) - ce(adjusted, target).item()
    rank_raw = float(ranked(logits, target)) - ce(logits, target).item()
    assert rank_raw > 0
    assert rank_la == pytest.approx(rank_raw, rel=1e-5)


def test_partial_auc_term_ranks_against_the_hardest_negatives_only():
    # Binary, class 1 important: scores = logit1 - logit0. Positives 2.0 and 0.5; negatives 1.8, -3.0, -4.0.
    scores = [2.0, 0.5, 1.8, -3.0, -4.0]
    logits = torch.tensor([[0.0, s] for s in scores])
    target = torch.tensor([1, 1, 0, 0, 0])
    ce = torch.nn.functional.cross_entropy(logits, target).item()
    full = ClassDependentLoss([1], class_weights="none", num_classes=2, rank_weight=1.0)
    hinge = lambda p, n: max(0.0, 1.0 - (p - n)) ** 2  # noqa: E731
    every_pair = sum(hinge(p, n) for p in (2.0, 0.5) for n in (1.8, -3.0, -4.0)) / 6
    assert float(full(logits, target)) == pytest.approx(ce + every_pair, rel=1e-6)
    # max_fpr 1/3 of 3 negatives: only the top-scoring negative (1.8) is ranked against.
    top = ClassDependentLoss([1], class_weights="none", num_classes=2, rank_weight=1.0, rank_max_fpr=1 / 3)
    top_pairs = (hinge(2.0, 1.8) + hinge(0.5, 1.8)) / 2
    assert float(top(logits, target)) == pytest.approx(ce + top_pairs, rel=1e-6)
    assert top_pairs > every_pair  # the easy negatives no longer dilute the violated pairs
    # A fraction below one negative still keeps one; the hardest is the one kept.
    tiny = ClassDependentLoss([1], class_weights="none", num_classes=2, rank_weight=1.0, rank_max_fpr=1e-6)
    assert float(tiny(logits, target)) == pytest.approx(ce + top_pairs, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(important_classes=[2], class_counts=[5, 5]), "important_classes"),
        (dict(important_classes=[1, 1], class_counts=[5, 5]), "must not repeat"),
        (dict(important_classes=[1], class_weights=[1.0, 2.0, 3.0], class_counts=[5, 5]), "class_counts"),
        (dict(important_classes=[1], class_counts=[0, 5]), "positive counts"),
        (dict(important_classes=[1], class_counts=[5, 5], rank_weight=-1.0), "rank_weight"),
        (dict(important_classes=[1], class_weights="focal", class_counts=[5, 5]), "'balanced', 'inverse', 'none'"),
        (dict(important_classes=[1]), "class_counts"),
        (dict(important_classes=[1], class_counts=[5, 5], logit_adjustment=-1.0), "logit_adjustment"),
        (dict(important_classes=[1], class_counts=[5, 5], rank_max_fpr=0.0), "rank_max_fpr"),
        (dict(important_classes=[1], class_counts=[5, 5], rank_max_fpr=1.5), "rank_max_fpr"),
        (dict(important_classes=[1], class_weights="none", num_classes=2, logit_adjustment=1.0),
         "'class_counts' parameter is required by logit_adjustment"),
        (dict(important_classes=[1], class_weights=[1.0, 1.0], class_counts=[0, 5], logit_adjustment=1.0),
         "positive counts for logit_adjustment"),
    ],
)
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(ClassAwareError, match=message):
        ClassDependentLoss(**kwargs)


def test_wrong_output_width_is_refused():
    loss = ClassDependentLoss([1], class_counts=[5, 5])
    with pytest.raises(ClassAwareError, match=r"\(batch, 2\)"):
        loss(torch.randn(3, 3), torch.tensor([0, 1, 2]))
