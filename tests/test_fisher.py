"""The class-conditional Fisher statistics, checked against per-sample computations done by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classaware_plugin.core import ChannelFisher, ClassAwareError, WeightStatistics, make_score
from classaware_plugin.core.channels import find_gates
from classaware_plugin.core.statistics import REST, per_sample_loss

from .helpers import TinyNet, toy_loader


def _per_sample_gate_values(model: nn.Module, loader, gates: list[nn.Module], loss: str = "ce", important=(1,)):
    """s_{n,k} = sum_hw a * dl_n/da for every sample, one sample at a time (no batching assumption)."""
    model.eval()
    out: dict[nn.Module, list[torch.Tensor]] = {g: [] for g in gates}
    labels = []
    for x, y in loader:
        for i in range(len(y)):
            acts = {}

            def keep(m, _, o):
                o.retain_grad()
                acts[m] = o

            hs = [g.register_forward_hook(keep) for g in gates]
            logits = model(x[i : i + 1])
            for h in hs:
                h.remove()
            per_sample_loss(logits, y[i : i + 1], list(important), loss).sum().backward()
            for g in gates:
                a = acts[g]
                s = (a * a.grad).reshape(1, a.shape[1], -1).sum(-1) if a.ndim > 2 else a * a.grad
                out[g].append(s[0].detach())
            model.zero_grad()
            labels.append(int(y[i]))
    return {g: torch.stack(v) for g, v in out.items()}, torch.tensor(labels)


def test_gates_sit_after_the_norm_that_follows_a_conv():
    model = TinyNet()
    gates, gate_of = find_gates(model, torch.zeros(2, 1, 6, 6))
    assert [m for _, m in gates] == [model.bn, model.bn2, model.fc]
    assert gate_of[model.conv] is model.bn and gate_of[model.dw] is model.bn2 and gate_of[model.fc] is model.fc
    assert gate_of[model.bn] is model.bn


def test_per_sample_statistics_are_exact_in_one_backward():
    model, loader = TinyNet(), toy_loader()
    stats = ChannelFisher([1], num_classes=3).collect(model, loader)
    s, y = _per_sample_gate_values(model, loader, [model.bn, model.bn2, model.fc])
    assert stats.counts_ == {1: 16, REST: 32}
    for g in (model.bn, model.bn2, model.fc):
        torch.testing.assert_close(stats.sums_[1][g]["channel"], s[g][y == 1].pow(2).sum(0), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(stats.sums_[REST][g]["channel"], s[g][y != 1].pow(2).sum(0), rtol=1e-4, atol=1e-9)


def test_count_weighting_with_unit_omega_is_the_class_agnostic_fisher_score():
    model, loader = TinyNet(), toy_loader()
    stats = ChannelFisher([1], num_classes=3).collect(model, loader)
    s, _ = _per_sample_gate_values(model, loader, [model.bn, model.bn2])
    scores = stats.scores(omega=1.0, rest_weight=1.0, weighting="count")
    for g in (model.bn, model.bn2):
        torch.testing.assert_close(scores.values[g], s[g].pow(2).mean(0), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(scores.for_module(model.conv), scores.values[model.bn])


def test_balanced_weighting_is_a_weighted_sum_of_bucket_means():
    model, loader = TinyNet(), toy_loader(n=48)
    stats = ChannelFisher([1], num_classes=3).collect(model, loader)
    assert stats.bucket_weights(omega=3.0, weighting="balanced") == pytest.approx({1: 3.0 / 16, REST: 1.0 / 32})
    s, y = _per_sample_gate_values(model, loader, [model.bn])
    expected = 3.0 * s[model.bn][y == 1].pow(2).mean(0) + s[model.bn][y != 1].pow(2).mean(0)
    torch.testing.assert_close(stats.scores(omega=3.0).values[model.bn], expected, rtol=1e-4, atol=1e-9)


def test_margin_loss_changes_only_the_important_samples():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    ce = F.cross_entropy(logits, y, reduction="none")
    m = per_sample_loss(logits, y, [1], "margin")
    assert m[0] == pytest.approx(float(ce[0]))
    assert m[1] == pytest.approx(math.log(2.0) - 1.0)  # -(z_1 - logsumexp(z_0, z_2))
    model, loader = TinyNet(), toy_loader()
    stats = ChannelFisher([1], num_classes=3, loss="margin").collect(model, loader)
    s, y = _per_sample_gate_values(model, loader, [model.bn], loss="margin")
    torch.testing.assert_close(stats.sums_[1][model.bn]["channel"], s[model.bn][y == 1].pow(2).sum(0), rtol=1e-4, atol=1e-9)


class InplaceNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)), inplace=True)
        x = F.relu(self.bn2(self.dw(x)), inplace=True)
        return self.fc(x.mean((2, 3)))


def test_inplace_activation_after_the_gate_changes_nothing():
    a, b = TinyNet(), InplaceNet()
    b.load_state_dict(a.state_dict())
    sa = ChannelFisher([1], num_classes=3).collect(a, toy_loader()).scores()
    sb = ChannelFisher([1], num_classes=3).collect(b, toy_loader()).scores()
    torch.testing.assert_close(sa.values[a.bn], sb.values[b.bn])
    torch.testing.assert_close(sa.values[a.bn2], sb.values[b.bn2])


def test_weight_fisher_squares_each_batch_bucket_term():
    model = TinyNet()
    loader = toy_loader(n=16, batch_size=16)
    stats = WeightStatistics([1], num_classes=3).collect(model, loader)
    x, y = next(iter(loader))
    model.eval()
    loss = F.cross_entropy(model(x), y, reduction="none")
    g1 = torch.autograd.grad(loss[y == 1].sum(), model.fc.weight, retain_graph=True)[0]
    g0 = torch.autograd.grad(loss[y != 1].sum(), model.fc.weight)[0]
    w = model.fc.weight.detach()
    torch.testing.assert_close(stats.sums_[1][model.fc]["weight"], (w * g1).pow(2))
    torch.testing.assert_close(stats.sums_[REST][model.fc]["weight"], (w * g0).pow(2))
    assert (stats.combined()[model.fc]["weight"] >= 0).all()


def test_statistics_state_dict_round_trip():
    model = TinyNet()
    stats = ChannelFisher([1], num_classes=3).collect(model, toy_loader())
    fresh = ChannelFisher([1], num_classes=3)
    fresh.load_state_dict(stats.state_dict(), model)
    torch.testing.assert_close(fresh.scores().for_module(model.dw), stats.scores().for_module(model.dw))
    assert fresh.counts_ == stats.counts_


def test_refused_inputs_name_the_value():
    with pytest.raises(ClassAwareError, match=r"names every one of the 3 classes \(\[0, 1, 2\]\)"):
        ChannelFisher([0, 1, 2], num_classes=3)
    with pytest.raises(ClassAwareError, match="'loss' parameter"):
        ChannelFisher([1], num_classes=3, loss="hinge")
    x = torch.randn(8, 1, 6, 6)
    x[3, 0, 0, 0] = float("nan")
    with pytest.raises(ClassAwareError, match="'loader' parameter: Batch 1 has NaN or inf in its inputs"):
        ChannelFisher([1], num_classes=3).collect(TinyNet(), [(x, torch.arange(8) % 3)])
    with pytest.raises(ClassAwareError, match=r"labels outside \[0, 3\): \[3, 4, 5\]"):
        ChannelFisher([1], num_classes=3).collect(TinyNet(), [(torch.randn(8, 1, 6, 6), torch.arange(8) % 6)])


def test_fisher_score_collects_what_the_granularity_needs():
    model = TinyNet()
    score = make_score("fisher", important_classes=[1], num_classes=3)
    score.collect(model, toy_loader(), granularity="channel")
    assert score.channel_scores(model) is not None
    with pytest.raises(Exception, match="granularity='element'"):
        score.element_scores(model)
    score.collect(model, toy_loader())
    assert score.channel_scores(model) is None
    assert score.element_scores(model)[model.conv]["weight"].shape == model.conv.weight.shape


def test_reduce_to_channels_sums_over_every_other_dimension():
    from classaware_plugin.core import reduce_to_channels

    # channel 0: many small scores (sum 4, max 1); channel 1: one large (sum 3, max 3): sums and maxima disagree
    scores = torch.zeros(2, 4, 1, 1)
    scores[0] = 1.0
    scores[1, 0] = 3.0
    assert torch.equal(reduce_to_channels(scores, 0), torch.tensor([4.0, 3.0]))
    assert torch.equal(reduce_to_channels(scores.transpose(0, 1), 1), torch.tensor([4.0, 3.0]))
    assert torch.equal(reduce_to_channels(torch.tensor([2.0, 5.0]), 0), torch.tensor([2.0, 5.0]))


def test_the_fisher_score_defaults_loss_and_squares_are_what_it_says():
    from classaware_plugin.core import ChannelFisher, StaleStatisticsError

    torch.manual_seed(0)
    model, loader = TinyNet(), toy_loader()
    default = make_score("fisher", important_classes=[1], num_classes=3)
    with pytest.raises(StaleStatisticsError, match=r"^No statistics collected yet: call collect\(model, loader\) first\.$"):
        default.check_fresh()
    default.collect(model, loader)  # element granularity: (w * g_b)^2 per batch, with omega 1 and rest weight 1
    explicit = WeightStatistics([1], 3, squared=True).collect(model, loader).combined(1.0, 1.0, "balanced")
    for m, tensors in default.element_scores(model).items():
        for n, t in tensors.items():
            assert torch.allclose(t, explicit[m][n]) and bool((t >= 0).all())
    margin = make_score("fisher", important_classes=[1], num_classes=3, loss="margin")
    margin.collect(model, loader, granularity="channel")
    ce = make_score("fisher", important_classes=[1], num_classes=3)
    ce.collect(model, loader, granularity="channel")
    same = ChannelFisher([1], 3, loss="margin").collect(model, loader).scores(1.0, 1.0, "balanced")
    layer = model.conv1 if hasattr(model, "conv1") else next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.allclose(margin.channel_scores(model).for_module(layer), same.for_module(layer))
    assert not torch.allclose(margin.channel_scores(model).for_module(layer), ce.channel_scores(model).for_module(layer))
    with pytest.raises(StaleStatisticsError, match="granularity='element'"):
        ce.element_scores(model)


def test_registering_a_score_twice_warns_only_for_a_different_class():
    import warnings

    from classaware_plugin.core import available_scores, register_score
    from classaware_plugin.core.scores import Score, score_class

    class Mine(Score):
        def element_scores(self, model):
            return {}

    try:
        register_score("test_mine")(Mine)
        assert score_class("test_mine") is Mine and Mine.name == "test_mine" and "test_mine" in available_scores()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            register_score("test_mine")(Mine)  # the same class again: silent

        class Other(Mine):
            pass

        with pytest.warns(UserWarning, match="^Score 'test_mine' was registered already; overwriting it with Other.$"):
            register_score("test_mine")(Other)
        assert score_class("test_mine") is Other
    finally:
        from classaware_plugin.core import scores as _scores

        _scores._REGISTRY.pop("test_mine", None)


@pytest.mark.parametrize("important,num_classes", [([2], 3), ([1], 4)])
def test_statistics_of_other_classes_are_refused_naming_both(important, num_classes):
    torch.manual_seed(0)
    model, loader = TinyNet(), toy_loader()
    state = WeightStatistics([1], 3).collect(model, loader).state_dict()
    assert state["loss"] == "ce" and state["modules"]
    with pytest.raises(ClassAwareError, match=rf"^The saved statistics are for important_classes=\[1\] and "
                                              rf"num_classes=3, not \[{important[0]}\] and {num_classes}\.$"):
        WeightStatistics(important, num_classes).load_state_dict(state, model)


def test_statistics_naming_a_module_the_model_lacks_are_refused():
    torch.manual_seed(0)
    model, loader = TinyNet(), toy_loader()
    state = WeightStatistics([1], 3).collect(model, loader).state_dict()
    state = {**state, "modules": ["nope", *state["modules"]]}
    with pytest.raises(ClassAwareError, match=r"^The saved statistics name module 'nope', which the model does not have\.$"):
        WeightStatistics([1], 3).load_state_dict(state, model)
    state = WeightStatistics([1], 3).collect(model, loader).state_dict()
    first = next(iter(state["sums"]))
    state["sums"][first] = {"ghost": {}, **state["sums"][first]}
    with pytest.raises(ClassAwareError, match="'ghost'"):
        WeightStatistics([1], 3).load_state_dict(state, model)


def test_scores_messages_name_what_to_do():
    from classaware_plugin.core import StaleStatisticsError
    from classaware_plugin.core.scores import score_class

    torch.manual_seed(0)
    model = TinyNet()
    with pytest.raises(ClassAwareError, match=r"^The 'magnitude_increase' score needs a rewind point: call "
                                              r"set_rewind_point\(model\)\.$"):
        make_score("magnitude_increase").check_fresh()
    inc = make_score("magnitude_increase")
    inc.set_rewind_point(model)
    name, first = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    shape = tuple(first.weight.shape)
    first.weight = nn.Parameter(torch.randn(shape[0] - 1, *shape[1:]))
    with pytest.raises(StaleStatisticsError, match=rf"^The rewind point of {name}\.weight has shape \({shape[0]}, "
                                                   rf".* but the model now has \({shape[0] - 1}, .*; set a new rewind"):
        inc.element_scores(model)
    fisher = make_score("fisher", important_classes=[1], num_classes=3)
    fisher.collect(TinyNet(), toy_loader(), granularity="channel")
    with pytest.raises(StaleStatisticsError, match=r"^No weight-level statistics: call collect\(model, loader, "
                                                   r"granularity='element'\)\.$"):
        fisher.element_scores(model)
    with pytest.raises(ClassAwareError, match=r"^The 'score' parameter must be one of .* Got 'l2' instead\.$"):
        score_class("l2")
    with pytest.raises(ClassAwareError, match=r"^The 'granularity' parameter must be one of"):
        fisher.collect(model, toy_loader(), granularity="row")


@pytest.mark.parametrize("name", ["fisher", "taylor_signed"])
def test_collect_honours_max_batches(name):
    torch.manual_seed(0)
    model = TinyNet()
    loader = toy_loader(n=48, batch_size=16)
    first_only = [next(iter(loader))]
    a = make_score(name, important_classes=[1], num_classes=3)
    a.collect(model, loader, max_batches=1)
    b = make_score(name, important_classes=[1], num_classes=3)
    b.collect(model, first_only)
    c = make_score(name, important_classes=[1], num_classes=3)
    c.collect(model, loader)
    sa, sb, sc = (s.element_scores(model)[model.dw]["weight"] for s in (a, b, c))
    assert torch.allclose(sa, sb) and not torch.allclose(sa, sc)


def test_the_signed_score_defaults_are_omega_4_and_rest_1():
    torch.manual_seed(0)
    model, loader = TinyNet(), toy_loader()
    default = make_score("taylor_signed", important_classes=[1], num_classes=3)
    explicit = make_score("taylor_signed", important_classes=[1], num_classes=3, omega=4.0, rest_weight=1.0,
                          normalization="none")
    other = make_score("taylor_signed", important_classes=[1], num_classes=3, omega=4.0, rest_weight=1.0,
                       normalization="mean")
    for s in (default, explicit, other):
        s.collect(model, loader)
    d, e, o = (s.element_scores(model)[model.dw]["weight"] for s in (default, explicit, other))
    assert torch.equal(d, e) and not torch.allclose(d, o)


def test_score_options_are_checked_from_declared_constraints_without_building_a_score(monkeypatch):
    from classaware_plugin.core.scores import ClassConditionalFisher, validate_score

    def boom(self, *a, **k):
        raise AssertionError("validate_score built a score")

    monkeypatch.setattr(ClassConditionalFisher, "__init__", boom)
    assert validate_score("fisher", [1], omega={1: 2.0}, weighting="count") == {"omega": {1: 2.0}, "weighting": "count"}
    with pytest.raises(ClassAwareError, match="'rest_weight' parameter must be a number in the range"):
        validate_score("fisher", [1], rest_weight=-1.0)
    with pytest.raises(ClassAwareError, match=r"names classes \[2\] that are not important classes \[1\]"):
        validate_score("fisher", [1], omega={2: 1.0})
    assert ClassConditionalFisher.options == tuple(ClassConditionalFisher.PARAMETERS)
