"""The width search (issue 32): feasible candidates, the best kept, seeded and resumable; the Torch-Pruning and NNI
translations of an allocation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from classaware_plugin.core import ClassAwareError
from classaware_plugin.core.allocation import (Unit, WidthSearch, accuracy_objective, important_class_auc_objective,
                                               important_class_objective, latency_objective)

from .helpers import toy_loader

UNITS = [Unit("a", 10), Unit("b", 20), Unit("c", 40)]
COST = {"a": 1.0, "b": 2.0, "c": 4.0}


class _Negate(nn.Module):
    def forward(self, x):
        return -x


class Pruned(nn.Module):
    """Stands for a pruned copy: it remembers the allocation it was pruned to."""

    def __init__(self, allocation):
        super().__init__()
        self.allocation = dict(allocation)


def reduction(model):  # cost in proportion to the channels kept, weighted per unit
    return sum(COST.values()) / sum(COST[k] * v for k, v in model.allocation.items())


def objective(model):  # best when unit 'a' keeps 80% of its channels
    return -abs(model.allocation["a"] - 0.8)


def search(**kw):
    return WidthSearch(UNITS, Pruned, reduction, objective, None, target=2.0, **kw)


def test_every_candidate_reaches_the_target_and_the_best_is_kept():
    result = search(candidates=30, seed=1).run()
    assert len(result.candidates) == 30
    assert all(2.0 <= c.reduction <= 2.0 * 1.03 + 1e-9 for c in result.candidates)
    assert all(0.1 - 1e-12 <= v <= 1.0 for c in result.candidates for v in c.allocation.values())
    assert result.best.score == max(c.score for c in result.candidates)
    assert {c.origin for c in result.candidates} == {"random", "mutation"}
    # the mutations search around the best: their best is at least as good as the random half's
    best = {o: max(c.score for c in result.candidates if c.origin == o) for o in ("random", "mutation")}
    assert best["mutation"] >= best["random"]


def test_the_search_is_seeded_and_resumes_exactly():
    straight = search(candidates=12, seed=3).run()
    first = search(candidates=12, seed=3)

    def killed_after_five(candidate, s):
        if len(s.candidates_) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.run(on_candidate=killed_after_five)
    state = first.state_dict()
    resumed = search(candidates=12, seed=3)
    resumed.load_state_dict(state)
    again = resumed.run()
    assert [c.allocation for c in again.candidates] == [c.allocation for c in straight.candidates]
    assert search(candidates=12, seed=4).run().candidates[0].allocation != straight.candidates[0].allocation


def test_an_unreachable_target_and_bad_settings_are_refused():
    with pytest.raises(ClassAwareError, match="No allocation reaches"):
        WidthSearch(UNITS, Pruned, reduction, objective, None, target=50.0, candidates=1).run()
    with pytest.raises(ClassAwareError, match="'target'"):
        WidthSearch(UNITS, Pruned, reduction, objective, None, target=1.0)
    with pytest.raises(ClassAwareError, match="'units'"):
        WidthSearch([], Pruned, reduction, objective, None, target=2.0)
    with pytest.raises(ClassAwareError, match="'objective'"):
        WidthSearch(UNITS, Pruned, reduction, "accuracy", None, target=2.0)


def test_the_latency_objective_keeps_the_fastest_candidate_within_the_fn_bound_and_refuses_when_none_is():
    latency = lambda m: 1.0 / reduction(m)  # noqa: E731  (a candidate past the target runs faster)
    fn_rate = lambda m: m.allocation["a"]  # noqa: E731  (the narrower unit 'a', the worse the important class)
    result = WidthSearch(UNITS, Pruned, reduction, latency_objective(latency, fn_rate, 0.5), None, target=2.0,
                         candidates=20, seed=0).run()
    feasible = [c for c in result.candidates if c.allocation["a"] <= 0.5]
    assert feasible and len(feasible) < 20  # the bound binds: some candidates are out, some in
    assert result.best.allocation["a"] <= 0.5
    assert result.best.score == max(-1.0 / c.reduction for c in feasible)
    with pytest.raises(ClassAwareError, match="None of the 5 candidates met"):
        WidthSearch(UNITS, Pruned, reduction, latency_objective(latency, fn_rate, 0.0), None, target=2.0,
                    candidates=5, seed=0).run()


def test_the_objectives_read_the_loader_they_are_given():
    from .helpers import TinyNet

    model = TinyNet().eval()
    acc = accuracy_objective(toy_loader())(model)
    assert 0.0 <= acc <= 1.0


def test_the_auc_objective_is_graded_where_the_fn_rate_at_the_dense_fpr_ties():
    from torch.utils.data import DataLoader, TensorDataset

    y = torch.arange(3).repeat(20)
    x = torch.nn.functional.one_hot(y, 3).float() + 0.1 * torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    auc = important_class_auc_objective(loader, [1])
    fn_rate = important_class_objective(loader, [1], {1: 0.0})
    perfect, weak = nn.Identity(), nn.Linear(3, 3, bias=False)
    with torch.no_grad():  # class 1's logit: a little of the true signal, mostly class 0's
        weak.weight.copy_(torch.tensor([[1.0, 0, 0], [1.0, 0.3, 0], [0, 0, 1.0]]))
    assert auc(perfect) == 1.0 and fn_rate(perfect) == 0.0
    assert 0.5 < auc(weak) < 1.0  # still separates class 1 from class 2, not from class 0
    assert auc(nn.Sequential(nn.Identity(), _Negate())) < 0.1  # reversed scores rank last
    only_others = DataLoader(TensorDataset(x[y != 1], y[y != 1]), batch_size=16)
    with pytest.raises(ClassAwareError, match="important class 1"):
        important_class_auc_objective(only_others, [1])(perfect)


# ----------------------------------------------------------------------------- Torch-Pruning
def test_torch_pruning_units_ratio_dict_and_pruning_to_an_allocation():
    from classaware_plugin.models import build_model
    from classaware_plugin.torch_pruning.allocation import prunable_units, prune_to_allocation, ratio_dict

    model = build_model("cifar_resnet", 10, (1, 16, 16), width=16)
    ex = torch.zeros(2, 1, 16, 16)
    units = prunable_units(model, ex)
    assert {u.name for u in units} == {"conv1", "layers.0.conv1", "layers.1.conv1", "layers.2.conv1",
                                       "layers.1.shortcut.0", "layers.2.shortcut.0"}
    tied = next(u for u in units if u.name == "conv1")
    assert tied.channels == 16 and set(tied.members) == {"conv1", "layers.0.conv2"}  # the residual sum
    allocation = {u.name: 0.5 for u in units}
    assert set(ratio_dict(model, allocation).values()) == {0.5}
    with pytest.raises(ClassAwareError, match="does not have"):
        ratio_dict(model, {"nope": 0.5})
    prune_to_allocation(model, ex, allocation, round_to=8)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert widths["conv1"] == widths["layers.0.conv2"] == 8 and widths["layers.2.conv1"] == 32
    assert model(ex).shape == (2, 10)


def test_the_loop_moves_every_unit_to_its_width_and_never_below(digits_tiny):
    from classaware_plugin.core import FNConstrainedPruning, FNConstraint
    from classaware_plugin.models import build_model
    from classaware_plugin.torch_pruning import ClassAwareImportance, TorchPruningBackend
    from classaware_plugin.torch_pruning.allocation import prunable_units

    torch.manual_seed(0)
    model = build_model("cifar_resnet", 10, (1, 16, 16), width=16)
    ex = torch.zeros(2, 1, 16, 16)
    allocation = {u.name: (0.25 if i % 2 else 1.0) for i, u in enumerate(prunable_units(model, ex))}
    backend = TorchPruningBackend(model, ex, ClassAwareImportance([3]), digits_tiny, [3], calib_loader=digits_tiny,
                                  allocation=allocation, round_to=8)
    loop = FNConstrainedPruning(backend, FNConstraint([3], abs_tol=1000, max_accuracy_drop=None), target=50.0,
                                step=0.3, max_steps=20)
    result = loop.run()
    assert result.stop_reason == "nothing_left"  # every unit reached its allocated width
    modules = dict(model.named_modules())
    for name, keep in allocation.items():
        assert modules[name].out_channels == max(8, round(keep * backend.dense_widths[name] / 8) * 8), name
    assert backend.extra_state()["dense_widths"] == backend.dense_widths


@pytest.fixture(scope="module")
def digits_tiny():
    from classaware_plugin.data import load_digits

    return load_digits(important=[3], image_size=16).loaders(64)[1]


# ----------------------------------------------------------------------------- NNI
def test_nni_units_and_config_list():
    import classaware_plugin.nni  # noqa: F401
    from classaware_plugin.models import build_model
    from classaware_plugin.nni.allocation import config_list_for, prunable_units, prune_to_allocation

    model = build_model("cifar_resnet", 10, (1, 16, 16), width=16)
    units = prunable_units(model)
    tied = next(u for u in units if "conv1" in u.members)
    assert set(tied.members) == {"conv1", "layers.0.conv2"}
    allocation = {u.name: 0.5 for u in units}
    config = config_list_for(units, allocation, progress=0.5)
    assert all(c["sparse_ratio"] == 0.25 and c["granularity"] == "out_channel" for c in config)
    assert sorted(n for c in config for n in c["op_names"]) == sorted(n for u in units for n in u.members)
    with pytest.raises(ClassAwareError, match="units the model does not have"):
        config_list_for(units, {"nope": 0.5})
    prune_to_allocation(model, torch.zeros(2, 1, 16, 16), units, allocation)
    assert model.conv1.out_channels == model.layers[0].conv2.out_channels == 8
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
