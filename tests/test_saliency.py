from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from classaware_plugin.core import ClassAwareError, ClassSaliency, StaleStatisticsError, make_score
from classaware_plugin.core.statistics import REST

from .helpers import TinyNet, toy_loader


def _agnostic_taylor(model, loader):
    model.eval()
    model.zero_grad()
    for x, y in loader:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    out = {m: {n: (p.detach() * p.grad).abs() for n, p in m.named_parameters(recurse=False)} for m in model.modules() if list(m.parameters(recurse=False))}
    model.zero_grad()
    return out


def test_unit_omega_equals_class_agnostic_taylor():
    model, loader = TinyNet(), toy_loader()
    stats = ClassSaliency([1], num_classes=3).collect(model, loader)
    ours = stats.scores(omega=1.0, rest_weight=1.0, normalization="none")
    ref = _agnostic_taylor(model, loader)
    assert set(ours) == set(ref)
    for m in ref:
        for n in ref[m]:
            torch.testing.assert_close(ours[m][n], ref[m][n], rtol=1e-4, atol=1e-7)


def test_important_only_differs_from_agnostic_and_scales_with_omega():
    model, loader = TinyNet(), toy_loader()
    stats = ClassSaliency([1], num_classes=3).collect(model, loader)
    only = stats.contributions(omega=1.0, rest_weight=0.0)
    double = stats.contributions(omega=2.0, rest_weight=0.0)
    for m in only:
        for n in only[m]:
            torch.testing.assert_close(double[m][n], 2 * only[m][n])
    agn = stats.scores(omega=1.0)
    assert not torch.allclose(agn[model.fc]["weight"], only[model.fc]["weight"].abs())


def test_mean_normalisation_divides_by_bucket_counts():
    model, loader = TinyNet(), toy_loader(n=48)
    stats = ClassSaliency([1], num_classes=3).collect(model, loader)
    assert stats.counts_ == {1: 16, REST: 32}
    w = stats.bucket_weights(omega=4.0, rest_weight=1.0, weighting="balanced")
    assert w == pytest.approx({1: 4.0 / 16, REST: 1.0 / 32})


def test_depthwise_conv_and_batchnorm_are_scored():
    model = TinyNet()
    stats = ClassSaliency([1], num_classes=3).collect(model, toy_loader())
    scores = stats.scores()
    assert scores[model.dw]["weight"].shape == model.dw.weight.shape
    assert set(scores[model.bn]) == {"weight", "bias"}
    assert scores[model.dw]["weight"].sum() > 0


def test_at_most_one_backward_per_important_class_plus_rest(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    model, loader = TinyNet(), toy_loader(n=48, batch_size=16)
    ClassSaliency([1, 2], num_classes=3).collect(model, loader)
    assert len(calls) <= 3 * len(loader)


def test_user_gradients_and_bn_statistics_are_untouched():
    model = TinyNet()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = model.bn.running_mean.clone()
    ClassSaliency([1], num_classes=3).collect(model, toy_loader())
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight))
    assert torch.equal(model.bn.running_mean, before)


def test_stale_after_training_step_or_shape_change():
    model = TinyNet()
    stats = ClassSaliency([1], num_classes=3).collect(model, toy_loader())
    stats.check_fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = next(iter(toy_loader()))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(StaleStatisticsError, match="collect"):
        stats.scores()
    stats.collect(model, toy_loader())
    model.fc.weight = torch.nn.Parameter(model.fc.weight[:, :2].detach().clone())
    with pytest.raises(StaleStatisticsError):
        stats.scores()


def test_state_dict_round_trip_gives_the_same_scores():
    model = TinyNet()
    stats = ClassSaliency([1], num_classes=3).collect(model, toy_loader())
    fresh = ClassSaliency([1], num_classes=3)
    fresh.load_state_dict(stats.state_dict(), model)
    a, b = stats.scores(omega=3.0), fresh.scores(omega=3.0)
    for m in a:
        for n in a[m]:
            assert torch.equal(a[m][n], b[m][n])


def test_bad_inputs_named():
    with pytest.raises(ClassAwareError, match="important_classes"):
        ClassSaliency([3], num_classes=3)
    stats = ClassSaliency([1], num_classes=3)
    with pytest.raises(ClassAwareError, match="empty loader"):
        stats.collect(TinyNet(), [])
    with pytest.raises(ClassAwareError, match=r"\(batch, 4\)"):
        ClassSaliency([1], num_classes=4).collect(TinyNet(), toy_loader())
    stats.collect(TinyNet(), toy_loader())
    with pytest.raises(ClassAwareError, match="not important classes"):
        stats.bucket_weights(omega={2: 3.0})
    with pytest.raises(ClassAwareError, match="normalization"):
        stats.contributions(normalization="l2")
    with pytest.raises(ClassAwareError, match="weighting"):
        stats.bucket_weights(weighting="l2")


def test_score_registry():
    from classaware_plugin.core import available_scores

    assert {"fisher", "taylor_signed", "magnitude_increase", "magnitude"} <= set(available_scores())
    with pytest.raises(ClassAwareError, match="'fisher', 'magnitude', 'magnitude_increase', 'taylor_signed'"):
        make_score("snip")


def test_score_options_are_declared_by_the_score():
    with pytest.raises(ClassAwareError, match="'normalization' does not apply to score='magnitude'.*Got normalization='bogus'"):
        make_score("magnitude", normalization="bogus")
    with pytest.raises(ClassAwareError, match="'normalization' does not apply to score='fisher'.*omega, rest_weight"):
        make_score("fisher", important_classes=[1], num_classes=3, normalization="mean")
    with pytest.raises(ClassAwareError, match="omega"):
        make_score("fisher", important_classes=[1], num_classes=3, omega=-5.0)
    with pytest.raises(ClassAwareError, match="num_classes"):
        make_score("fisher", important_classes=[1], omega=2.0)


def test_magnitude_increase_is_abs_difference():
    model = TinyNet()
    score = make_score("magnitude_increase")
    score.set_rewind_point(model)
    with torch.no_grad():
        model.fc.weight.mul_(2.0)
    s = score.element_scores(model)
    torch.testing.assert_close(s[model.fc]["weight"], model.fc.weight.abs() / 2)
    torch.testing.assert_close(s[model.conv]["weight"], torch.zeros_like(model.conv.weight))


@pytest.mark.parametrize("name", __import__("classaware_plugin.core", fromlist=["available_scores"]).available_scores())
def test_every_registered_score_meets_the_contract(name):
    """One score per element of every parameterised module, finite, shaped like the parameter."""
    model = TinyNet()
    score = make_score(name, important_classes=[1], num_classes=3)
    if score.needs_rewind:
        score.set_rewind_point(TinyNet())
    if score.needs_data:
        score.collect(model, toy_loader())
    score.check_fresh()
    scores = score.element_scores(model)
    for module in (model.conv, model.bn, model.dw, model.bn2, model.fc):
        for pname, p in module.named_parameters(recurse=False):
            assert scores[module][pname].shape == p.shape
            assert torch.isfinite(scores[module][pname]).all()


@pytest.mark.parametrize("name", __import__("classaware_plugin.core", fromlist=["available_scores"]).available_scores())
def test_every_channel_score_covers_every_channel_module(name):
    """A score with native channel scores gives one finite, non-negative value per output channel of every conv,
    norm and linear layer (through its gate); the others return None and are reduced from element scores."""
    model = TinyNet()
    score = make_score(name, important_classes=[1], num_classes=3)
    if score.needs_rewind:
        score.set_rewind_point(TinyNet())
    if score.needs_data:
        score.collect(model, toy_loader(), granularity="channel")
    channels = score.channel_scores(model)
    if channels is None:
        return
    for module in (model.conv, model.bn, model.dw, model.bn2, model.fc):
        v = channels.for_module(module)
        width = module.out_features if isinstance(module, torch.nn.Linear) else getattr(module, "out_channels", None) or module.num_features
        assert v.shape == (width,)
        assert torch.isfinite(v).all() and (v >= 0).all()


def test_adapters_refuse_bad_score_options_before_the_number_of_classes_is_known():
    from classaware_plugin.torch_pruning import ClassAwareImportance

    with pytest.raises(ClassAwareError, match="omega"):
        ClassAwareImportance([3], omega=-5.0)
    with pytest.raises(ClassAwareError, match="'normalization' does not apply to score='magnitude'"):
        ClassAwareImportance([3], score="magnitude", omega=None, normalization="bogus")


def test_bucket_weights_per_weighting_with_per_class_omega_and_empty_buckets():
    from classaware_plugin.core import ChannelFisher

    stats = ChannelFisher(important_classes=[1, 2], num_classes=4)
    stats.counts_ = {1: 2, 2: 0, REST: 6}
    # omega for class 1 only (class 2 takes 1.0); class 2 has no sample: its balanced weight is 0, not a division
    assert stats.bucket_weights({1: 3.0}, rest_weight=0.5, weighting="balanced") == {1: 1.5, 2: 0.0, REST: 0.5 / 6}
    assert stats.bucket_weights({1: 3.0}, rest_weight=0.5, weighting="count") == {1: 3 / 8, 2: 1 / 8, REST: 0.5 / 8}
    assert stats.bucket_weights({1: 3.0}, rest_weight=0.5, weighting="sum") == {1: 3.0, 2: 1.0, REST: 0.5}
    assert stats.bucket_weights(0.5) == {1: 0.25, 2: 0.0, REST: 1 / 6}  # an omega below 1 is allowed
    assert stats.bucket_weights({2: 0.0}, weighting="sum") == {1: 1.0, 2: 0.0, REST: 1.0}
    stats.counts_ = {1: 0, 2: 0, REST: 0}
    assert stats.bucket_weights(2.0, weighting="count") == {1: 0.0, 2: 0.0, REST: 0.0}


@pytest.mark.parametrize("kwargs,named", [
    ({"rest_weight": -1.0}, "'rest_weight'"), ({"omega": -1.0}, "'omega'"), ({"omega": {1: -1.0}}, "'omega'"),
    ({"omega": {3: 1.0}}, r"classes \[3\] that are not important"), ({"weighting": "bogus"}, "'weighting'"),
])
def test_bucket_weights_refuse_bad_values_by_name(kwargs, named):
    from classaware_plugin.core import ChannelFisher

    stats = ChannelFisher(important_classes=[1, 2], num_classes=4)
    stats.counts_ = {1: 2, 2: 1, REST: 6}
    with pytest.raises(ClassAwareError, match=named):
        stats.bucket_weights(**kwargs)


@pytest.mark.parametrize("kind", ["channel", "weight"])
def test_stale_statistics_messages_say_what_to_do(kind):
    from classaware_plugin.core import ChannelFisher, WeightStatistics

    torch.manual_seed(0)
    model = TinyNet()
    stats = ChannelFisher([1], num_classes=3) if kind == "channel" else WeightStatistics([1], num_classes=3)
    with pytest.raises(StaleStatisticsError, match=r"^No statistics collected yet: call collect\(model, loader\) first\.$"):
        stats.check_fresh()
    stats.collect(model, toy_loader())
    stats.check_fresh()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a training step's worth of change
    with pytest.raises(StaleStatisticsError, match=r"^The model changed \(pruned or trained\) since the statistics were "
                                                   r"collected; call collect\(model, loader\) again before scoring\.$"):
        stats.check_fresh()
