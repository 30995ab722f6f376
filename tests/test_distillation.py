"""Distillation from the dense model during fine-tuning (core.Distillation through core.train)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classaware_plugin.core import ClassAwareError, Distillation, train


def _data() -> tuple[torch.Tensor, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = torch.randint(0, 3, (128,), generator=g)  # labels unrelated to the teacher: only distillation can match it
    return x, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        teacher[3].weight.mul_(3.0)  # confident outputs, far from a fresh student's
    return teacher.eval()


def _kl(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(teacher(x), 1), reduction="batchmean",
                              log_target=True))


def test_pure_distillation_pulls_the_student_to_the_teacher_and_leaves_the_teacher_alone():
    x, loader = _data()
    teacher = _teacher()
    before_teacher = copy.deepcopy(teacher.state_dict())
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    start = _kl(teacher, student, x)
    train(student, loader, nn.CrossEntropyLoss(), epochs=30, lr=0.01, progress=False,
          distillation=Distillation(teacher, weight=1.0, temperature=2.0))
    assert _kl(teacher, student, x) < 0.2 * start
    # The same training without distillation fits the random labels instead and stays far from the teacher.
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    train(plain, loader, nn.CrossEntropyLoss(), epochs=30, lr=0.01, progress=False)
    assert _kl(teacher, plain, x) > 2 * _kl(teacher, student, x)
    for k, v in teacher.state_dict().items():  # BatchNorm statistics included: the teacher ran in eval mode
        assert torch.equal(v, before_teacher[k]), k
    assert not teacher.training


def test_weight_zero_is_plain_training_and_the_blend_is_what_the_docstring_says():
    x, loader = _data()
    teacher = _teacher()
    torch.manual_seed(1)
    a = nn.Linear(6, 3)
    b = copy.deepcopy(a)
    torch.manual_seed(2)
    train(a, loader, nn.CrossEntropyLoss(), epochs=2, lr=0.01, progress=False)
    torch.manual_seed(2)
    loader.generator.manual_seed(1)
    train(b, loader, nn.CrossEntropyLoss(), epochs=2, lr=0.01, progress=False,
          distillation=Distillation(teacher, weight=0.0))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    d = Distillation(teacher, weight=0.25, temperature=3.0)
    z = a(x)
    hard = torch.tensor(0.7)
    soft = F.kl_div(F.log_softmax(z / 3, 1), F.softmax(teacher(x) / 3, 1), reduction="batchmean") * 9
    assert torch.allclose(d(hard, z, x), 0.75 * hard + 0.25 * soft, atol=1e-5)


@pytest.mark.parametrize("kwargs, name", [({"weight": -0.1}, "weight"), ({"weight": 1.01}, "weight"),
                                          ({"temperature": 0.0}, "temperature")])
def test_bad_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(ClassAwareError, match=f"'{name}'"):
        Distillation(nn.Linear(2, 2), **kwargs)
