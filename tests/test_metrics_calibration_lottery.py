from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, confusion_matrix, recall_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classaware_plugin.core import (
    ClassAwareError,
    MaskSet,
    RewindSnapshot,
    calibrate,
    evaluate,
    evaluate_predictions,
    find_logit_shifts,
    train,
)


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    scores = rng.normal(size=(200, 4)) + np.eye(4)[y] * 1.0
    ev = evaluate_predictions(y, scores, [2, 3])
    pred = scores.argmax(1)
    cm = confusion_matrix(y, pred, labels=range(4))
    assert np.array_equal(ev.confusion, cm)
    assert ev.fn == {c: int(cm[c].sum() - cm[c, c]) for c in range(4)}
    assert ev.fp == {c: int(cm[:, c].sum() - cm[c, c]) for c in range(4)}
    assert list(ev.recall.values()) == pytest.approx(recall_score(y, pred, average=None))
    prob = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert ev.auc[2] == pytest.approx(roc_auc_score(y == 2, prob[:, 2]))
    assert ev.ap[3] == pytest.approx(average_precision_score(y == 3, prob[:, 3]))
    assert ev.accuracy == pytest.approx((pred == y).mean())


def test_auc_is_nan_without_positives_and_json_has_none():
    y = np.array([0, 0, 1, 1])
    ev = evaluate_predictions(y, np.random.default_rng(0).normal(size=(4, 3)), [2])
    assert np.isnan(ev.auc[2]) and ev.to_dict()["auc"] == {"2": None}


def test_metrics_bad_input():
    with pytest.raises(ClassAwareError, match="num_classes=3"):
        evaluate_predictions([0, 1], np.zeros((2, 2)), [1], num_classes=3)
    with pytest.raises(ClassAwareError, match="important_classes"):
        evaluate_predictions([0, 1], np.zeros((2, 2)), [5])


def test_logit_shift_is_the_smallest_that_meets_the_target():
    y = np.array([1, 1, 1, 1, 0, 0])
    # Class 1 missed by margins 0.5, 1.0, 2.0 on three positives; one positive correct.
    logits = np.array([[0.5, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.7, 0.0]])
    shifts = find_logit_shifts(y, logits, {1: 1})
    assert 1.0 < shifts[1] < 1.0 + 1e-4
    z = logits.copy()
    z[:, 1] += shifts[1]
    assert ((y == 1) & (z.argmax(1) != 1)).sum() == 1
    z2 = logits.copy()
    z2[:, 1] += 1.0 - 1e-3
    assert ((y == 1) & (z2.argmax(1) != 1)).sum() == 2
    assert find_logit_shifts(y, logits, {1: 3}) == {1: 0.0}


def test_calibration_folds_into_the_bias_and_reports_fp_cost():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = (x[:, 0] > 0.8).long()
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    train(model, loader, nn.CrossEntropyLoss(), epochs=3, lr=1e-2, progress=False)
    before = evaluate(model, loader, [1])
    assert before.fn[1] > 2
    bias_before = model[2].bias.detach().clone()
    cal = calibrate(model, loader, [1], target_fn={1: 2})
    after = evaluate(model, loader, [1])
    assert after.fn[1] <= 2 and cal.after.fn[1] == after.fn[1]
    assert after.fp[1] >= before.fp[1]
    assert float(model[2].bias.detach()[1] - bias_before[1]) == pytest.approx(cal.shifts[1], rel=1e-5)
    assert float(model[2].bias.detach()[0]) == float(bias_before[0])


def test_calibration_refuses_a_layer_that_is_not_the_output():
    model = nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=1))
    loader = DataLoader(TensorDataset(torch.randn(20, 3), torch.tensor([0, 1] * 10)), batch_size=10)
    bias = model[0].bias.detach().clone()
    with pytest.raises(ClassAwareError, match="not the model's output layer"):
        calibrate(model, loader, [1], target_fn={1: 0})
    assert torch.equal(model[0].bias, bias)


def test_masks_keep_pruned_weights_exactly_zero_under_adam_with_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    mask = torch.ones(4, 4)
    mask[0] = 0
    mask[:, 1] = 0
    masks = MaskSet({(model[0], "weight"): mask})
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=8)
    train(model, loader, nn.CrossEntropyLoss(), epochs=3, lr=0.1, weight_decay=0.1, masks=masks, progress=False)
    assert torch.all(model[0].weight[mask == 0] == 0)
    assert torch.all(model[0].weight[mask == 1] != 0)
    assert masks.sparsity() == pytest.approx(7 / 16)


def test_rewind_restores_initial_weights_then_masks():
    model = nn.Sequential(nn.Linear(4, 2))
    snap = RewindSnapshot.capture(model)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    mask = torch.ones(2, 4)
    mask[1, 2] = 0
    masks = MaskSet({(model[0], "weight"): mask})
    snap.rewind(model, masks)
    assert torch.equal(model[0].weight, w0 * mask)
    state = masks.state_dict(model)
    again = MaskSet.from_state_dict(model, state)
    assert torch.equal(again.masks[(model[0], "weight")], mask.bool())


def test_training_stops_on_non_finite_loss():
    from classaware_plugin.core import NonFiniteLossError

    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")  # a diverged model: the inputs are fine, the loss is not
    loader = DataLoader(TensorDataset(torch.ones(4, 2), torch.tensor([0, 1, 0, 1])), batch_size=2)
    with pytest.raises(NonFiniteLossError, match="nan"):
        train(model, loader, nn.CrossEntropyLoss(), progress=False)
    nan_inputs = DataLoader(TensorDataset(torch.tensor([[float("nan"), 0.0]] * 4), torch.tensor([0, 1, 0, 1])), batch_size=2)
    with pytest.raises(ClassAwareError, match="'loader' parameter: Batch 1 has NaN or inf in its inputs"):
        train(nn.Linear(2, 2), nan_inputs, nn.CrossEntropyLoss(), progress=False)


def test_logit_shifts_for_two_classes_are_each_the_smallest_that_meets_its_target():
    # class 1 and class 2 important; each positive needs a known margin; the other class's shift matters
    y = np.array([1, 1, 1, 2, 2, 0, 0])
    z = np.zeros((7, 3))
    z[0] = [1.0, 0.5, 0.0]  # class-1 positive, needs 0.5
    z[1] = [1.0, -1.0, 0.0]  # needs 2.0
    z[2] = [0.0, 1.0, 0.0]  # already right
    z[3] = [1.0, 0.0, 0.7]  # class-2 positive, needs 0.3
    z[4] = [2.0, 0.0, 0.0]  # needs 2.0
    z[5] = [3.0, 0.0, 0.0]
    z[6] = [3.0, 0.0, 0.0]
    shifts = find_logit_shifts(y, z, {1: 1, 2: 1})
    assert 0.5 < shifts[1] < 0.5 + 1e-5 and 0.3 < shifts[2] < 0.3 + 1e-5
    shifted = z + np.array([0.0, shifts[1], shifts[2]])
    assert ((y == 1) & (shifted.argmax(1) != 1)).sum() == 1 and ((y == 2) & (shifted.argmax(1) != 2)).sum() == 1
    assert find_logit_shifts(y, z, {1: 2, 2: 2}) == {1: 0.0, 2: 0.0}  # targets already met: no shift


def test_logit_shifts_account_for_the_other_class_shift():
    # A class-2 positive whose runner-up is class 1: once class 1 is shifted up, class 2 needs more.
    y = np.array([1, 2])
    z = np.array([[0.0, -1.0, -5.0], [0.0, 0.5, 0.6]])  # class-1 positive needs 1.0; class-2 positive is right at 0
    shifts = find_logit_shifts(y, z, {1: 0, 2: 0})
    assert 1.0 < shifts[1] < 1.0 + 1e-5
    assert 0.9 < shifts[2] < 0.9 + 1e-5  # 0.5 + 1.0 - 0.6: the shift of class 1 is taken into account
    shifted = z + np.array([0.0, shifts[1], shifts[2]])
    assert list(shifted.argmax(1)) == [1, 2]


def test_calibration_to_dict_reports_before_and_after():
    from classaware_plugin.core import Calibration

    before = evaluate_predictions(np.array([1, 1, 0]), np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), [1])
    after = evaluate_predictions(np.array([1, 1, 0]), np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]), [1])
    d = Calibration(shifts={1: 1.5}, before=before, after=after).to_dict()
    assert d == {"shifts": {"1": 1.5}, "fn_before": {"1": 1}, "fn_after": {"1": 0}, "fp_before": {"1": 0},
                 "fp_after": {"1": 1}, "accuracy_before": 2 / 3, "accuracy_after": 2 / 3}


def test_last_linear_is_the_last_linear_and_its_absence_is_named():
    from classaware_plugin.core.calibration import last_linear

    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 4))
    assert last_linear(model) is model[2]
    with pytest.raises(ClassAwareError, match="needs the model's last layer to be an nn.Linear; found none"):
        last_linear(nn.Sequential(nn.Conv2d(1, 1, 1)))
