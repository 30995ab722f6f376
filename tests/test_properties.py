"""Generated inputs over the public API and the configuration (issue 34).

The property, for every entry point: a call with arbitrary arguments (each drawn from values a user would pass, or
from values of the wrong type, shape, range or content: None, NaN, strings, negative sizes, tensors of odd shapes,
empty loaders, loaders whose batches the model cannot take, float or out-of-range labels, arbitrary YAML) either
succeeds or raises :class:`ClassAwareError` (or a subclass) whose message names one of the call's parameters. No other
exception may escape. Cases Hypothesis found are kept as ``@example`` regressions. The budget per entry point is
fixed (``max_examples``) so that CI stays within its time.
"""
from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classaware_plugin.cli.config import load_config
from classaware_plugin.core import (
    ClassAwareError, ClassDependentLoss, Distillation, EarlyStopping, FNConstraint, FNGuarantee, NonFiniteLossError,
    calibrate, evaluate, evaluate_predictions, find_logit_shifts, fn_at_fpr, fn_rate_upper_bound, make_class_weights,
    make_score, positives_needed, split_for_certification, train,
)
from classaware_plugin.core.training import recalibrate_batchnorm
from classaware_plugin.data import load_dataset
from classaware_plugin.export import save_model
from classaware_plugin.models import build_model

from .helpers import TinyNet

COUNTS: dict[str, int] = {}
"""Generated cases run per entry point (printed by ``pytest -s``; the closing note of issue 34 reports them)."""

@pytest.fixture(autouse=True, scope="module")
def _bounded_memory():
    """An input that makes a call allocate without bound (a billion classes) must fail here, not take the machine:
    the address space is capped at 6 GiB above what the process holds while these tests run."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    held = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmSize:"))
    cap = held + 6 * 1024**3
    if hard == resource.RLIM_INFINITY or cap < hard:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                        HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------- values
def _loader(x: torch.Tensor, y: torch.Tensor, bs: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def good_loader(n: int = 24, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return _loader(torch.randn(n, 1, 6, 6, generator=g), torch.arange(n) % 3)


BAD_LOADERS = {
    "empty": lambda: _loader(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)),
    "three_channels": lambda: _loader(torch.randn(8, 3, 6, 6), torch.arange(8) % 3),
    "flat_inputs": lambda: _loader(torch.randn(8, 36), torch.arange(8) % 3),
    "float_labels": lambda: _loader(torch.randn(8, 1, 6, 6), (torch.arange(8) % 3).float()),
    "labels_out_of_range": lambda: _loader(torch.randn(8, 1, 6, 6), torch.arange(8) % 3 + 5),
    "negative_labels": lambda: _loader(torch.randn(8, 1, 6, 6), -(torch.arange(8) % 3) - 1),
    "one_hot_labels": lambda: _loader(torch.randn(8, 1, 6, 6), torch.eye(3)[torch.arange(8) % 3].long()),
    "nan_inputs": lambda: _loader(torch.full((8, 1, 6, 6), math.nan), torch.arange(8) % 3),
    "list_of_strings": lambda: ["a", "b"],
    "list_of_tuples_of_lists": lambda: [([1.0, 2.0], [0, 1])],
    "a_tensor": lambda: torch.randn(4, 1, 6, 6),
}

tensors = st.builds(
    lambda shape, kind: {"float": torch.randn(shape), "long": torch.randint(-2, 12, shape),
                         "nan": torch.full(shape, math.nan), "bool": torch.ones(shape, dtype=torch.bool)}[kind],
    st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple), st.sampled_from(["float", "long", "nan", "bool"]))
junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**9), st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.printable, max_size=8), st.lists(st.integers(-3, 12), max_size=4),
    st.dictionaries(st.integers(-2, 12), st.floats(-1, 2), max_size=3), tensors,
    st.sampled_from(sorted(BAD_LOADERS)).map(lambda k: BAD_LOADERS[k]()),
)
"""Values of the wrong type, shape, range or content."""


small_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(-10, 10), st.sampled_from([math.nan, math.inf, -math.inf]),
    st.text(string.printable, max_size=8), st.lists(st.integers(-3, 12), max_size=4), tensors,
    st.sampled_from(sorted(BAD_LOADERS)).map(lambda k: BAD_LOADERS[k]()),
)
"""Junk without the huge numbers: for amounts of work (epochs, batches), where a huge valid number is just slow."""


def maybe(valid: st.SearchStrategy, bad: st.SearchStrategy = junk) -> st.SearchStrategy:
    """A valid value (three times in four, so that calls also get past their first check) or junk; Hypothesis
    shrinks towards the valid one."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else bad)


def check(entry: str, fn: Callable[..., Any], kwargs: dict[str, Any], allowed: tuple[type, ...] = (),
          settings_of: tuple[str, ...] = ()) -> Any:
    """The property: ``fn(**kwargs)`` succeeds, or raises a ClassAwareError that names one of its parameters (for a
    method, or one of its object's ``settings_of``), or an ``allowed`` documented error."""
    COUNTS[entry] = COUNTS.get(entry, 0) + 1
    try:
        return fn(**kwargs)
    except ClassAwareError as e:
        message = str(e)
        named = [k for k in (*kwargs, *settings_of) if k in message]
        named += [k for k, v in kwargs.items() if isinstance(v, (str, Path)) and str(v) and str(v) in message]
        assert named, f"{entry}: the message names none of {sorted(kwargs)}: {message!r}"
    except allowed:
        pass
    return None


classes = st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True)
rates = st.floats(0.01, 0.99)


# ----------------------------------------------------------------------------- the rules
@settings(max_examples=150, **SETTINGS)
@given(important_classes=maybe(classes), abs_tol=maybe(st.integers(0, 5)), rel_tol=maybe(st.floats(0, 1)),
       max_accuracy_drop=maybe(st.none() | st.floats(0, 1)), operating_point=maybe(st.sampled_from(["argmax", "calibrated"])))
@example(important_classes=[1], abs_tol=0, rel_tol=float("nan"), max_accuracy_drop=None, operating_point="argmax")
@example(important_classes=torch.tensor(1.4457), abs_tol=None, rel_tol=None, max_accuracy_drop=None,
         operating_point="argmax")  # found: a 0-d tensor raised TypeError
def test_fn_constraint(**kw):
    check("FNConstraint", FNConstraint, kw)


@settings(max_examples=200, **SETTINGS)
@given(important_classes=maybe(classes), max_fn_rate=maybe(st.none() | rates | st.dictionaries(st.integers(0, 2), rates)),
       tolerance=maybe(st.none() | st.floats(0, 0.5)), delta=maybe(st.floats(0.001, 0.5)),
       dense=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 60), st.integers(0, 60)), min_size=3, max_size=3))
@example(important_classes=[0], max_fn_rate=None, tolerance=None, delta=0.1, dense=[(0, 0, 0)] * 3)
def test_fn_guarantee_and_its_budgets(important_classes, max_fn_rate, tolerance, delta, dense):
    g = check("FNGuarantee", FNGuarantee, dict(important_classes=important_classes, max_fn_rate=max_fn_rate,
                                               tolerance=tolerance, delta=delta))
    g = g or FNGuarantee([0, 2], delta=0.2)  # the budgets of a valid rule when these settings were refused
    fn = {c: min(k, n) for c, (k, n, _) in enumerate(dense)}
    budgets = check("FNGuarantee.budgets", g.budgets,
                    dict(dense_fn=fn, dense_positives={c: n for c, (_, n, _) in enumerate(dense)},
                         cert_positives={c: m for c, (_, _, m) in enumerate(dense)}),
                    settings_of=("max_fn_rate", "tolerance", "delta"))
    for b in (budgets or {}).values():  # a budget that is returned can be certified
        assert 0 < b.max_fn_rate < 1 and b.max_count >= 0 and b.screen_limit >= 0
        assert fn_rate_upper_bound(b.max_count, b.positives, b.delta) <= b.max_fn_rate + 1e-9


@settings(max_examples=200, **SETTINGS)
@given(fn=maybe(st.integers(0, 100)), positives=maybe(st.integers(0, 100)), delta=maybe(st.floats(0.001, 0.999)),
       rate=maybe(st.floats(0.001, 1.0)))
@example(fn=1, positives=3, delta=0.75, rate=1.0)  # found: at delta > 1/2 the "upper" bound fell below 1/3
def test_the_bound_and_the_positives_it_needs(fn, positives, delta, rate):
    u = check("fn_rate_upper_bound", fn_rate_upper_bound, dict(fn=fn, positives=positives, delta=delta))
    if u is not None:
        assert 0 <= u <= 1 and (positives == 0 or u >= fn / positives - 1e-12)
    n = check("positives_needed", positives_needed, dict(max_fn_rate=rate, delta=delta))
    if n is not None and n > 0:
        assert fn_rate_upper_bound(0, n, delta) <= rate + 1e-9


# ----------------------------------------------------------------------------- loss, scores, metrics
@settings(max_examples=150, **SETTINGS)
@given(important_classes=maybe(classes), class_counts=maybe(st.lists(st.integers(1, 50), min_size=3, max_size=3)),
       class_weights=maybe(st.sampled_from(["balanced", "inverse", "none"])), rank_weight=maybe(st.floats(0, 5)),
       logits=maybe(st.just(torch.randn(6, 3))), target=maybe(st.just(torch.tensor([0, 1, 2, 0, 1, 2]))))
@example(important_classes=[1], class_counts=[5, 5, 5], class_weights="none", rank_weight=0.0,
         logits=torch.randn(6, 3), target=torch.tensor([0, 1, 2, 0, 1, 7]))
@example(important_classes=[1], class_counts=[5, 5, 5], class_weights="none", rank_weight=0.0,
         logits=torch.randn(6, 3), target=torch.tensor([0., 1., 2., 0., 1., 2.]))
def test_class_dependent_loss(important_classes, class_counts, class_weights, rank_weight, logits, target):
    loss = check("ClassDependentLoss", ClassDependentLoss, dict(important_classes=important_classes,
                 class_counts=class_counts, class_weights=class_weights, rank_weight=rank_weight))
    loss = loss or ClassDependentLoss([1], class_counts=[5, 3, 9])  # a valid loss when these settings were refused
    value = check("ClassDependentLoss.__call__", loss, dict(logits=logits, target=target))
    assert value is None or bool(torch.isfinite(value))


@settings(max_examples=100, **SETTINGS)
@given(class_counts=maybe(st.lists(st.integers(0, 50), min_size=1, max_size=4)),
       scheme=maybe(st.sampled_from(["balanced", "inverse", "none"])), beta=maybe(st.floats(0.5, 0.99999)))
def test_make_class_weights(**kw):
    w = check("make_class_weights", make_class_weights, kw)
    assert w is None or bool(torch.isfinite(w).all())


@settings(max_examples=100, **SETTINGS)
@given(name=maybe(st.sampled_from(["fisher", "taylor_signed", "magnitude", "magnitude_increase"])),
       important_classes=maybe(classes), num_classes=maybe(st.none() | st.integers(1, 5)),
       omega=maybe(st.none() | st.floats(0, 5)), weighting=maybe(st.none() | st.sampled_from(["balanced", "count"])))
def test_make_score(name, important_classes, num_classes, omega, weighting):
    options = {k: v for k, v in (("omega", omega), ("weighting", weighting)) if v is not None}
    check("make_score", make_score, dict(name=name, important_classes=important_classes, num_classes=num_classes,
                                         **options))


@settings(max_examples=150, **SETTINGS)
@given(y_true=maybe(st.lists(st.integers(0, 2), min_size=1, max_size=12)), important_classes=maybe(classes),
       num_classes=maybe(st.none() | st.integers(1, 4)), seed=st.integers(0, 9))
def test_evaluate_predictions(y_true, important_classes, num_classes, seed):
    n = len(y_true) if isinstance(y_true, list) else 4
    scores = np.random.default_rng(seed).normal(size=(n, 3))
    check("evaluate_predictions", evaluate_predictions, dict(y_true=y_true, scores=scores,
                                                             important_classes=important_classes, num_classes=num_classes))


@settings(max_examples=100, **SETTINGS)
@given(c=maybe(st.integers(0, 2)), target_fpr=maybe(st.floats(0, 1)), target_fn=maybe(st.integers(0, 10)),
       seed=st.integers(0, 9))
def test_fn_at_fpr_and_logit_shifts(c, target_fpr, target_fn, seed):
    rng = np.random.default_rng(seed)
    y, z = np.arange(30) % 3, rng.normal(size=(30, 3))
    check("fn_at_fpr", fn_at_fpr, dict(val=(y, z), test=(y, z), c=c, target_fpr=target_fpr))
    if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 3:
        check("find_logit_shifts", find_logit_shifts, dict(y=y, logits=z, target_fn={c: target_fn}))


# ----------------------------------------------------------------------------- training and evaluation
@settings(max_examples=60, **SETTINGS)
@given(loader=maybe(st.builds(good_loader)), epochs=maybe(st.floats(0, 1), small_junk), lr=maybe(st.floats(1e-4, 1e-1)),
       optimizer=maybe(st.sampled_from(["adam", "sgd"])), schedule=maybe(st.sampled_from(["constant", "cosine"])))
@example(loader=BAD_LOADERS["labels_out_of_range"](), epochs=0.5, lr=1e-3, optimizer="adam", schedule="constant")
@example(loader=BAD_LOADERS["three_channels"](), epochs=0.5, lr=1e-3, optimizer="adam", schedule="constant")
def test_train(**kw):
    check("train", train, dict(model=TinyNet(), loss_fn=nn.CrossEntropyLoss(), progress=False, **kw),
          allowed=(NonFiniteLossError,))


@settings(max_examples=80, **SETTINGS)
@given(loader=maybe(st.builds(good_loader)), important_classes=maybe(classes),
       target_fn=maybe(st.dictionaries(st.integers(0, 2), st.integers(0, 10), min_size=1, max_size=3)))
def test_evaluate_and_calibrate(loader, important_classes, target_fn):
    check("evaluate", evaluate, dict(model=TinyNet().eval(), loader=loader, important_classes=important_classes))
    check("calibrate", calibrate, dict(model=TinyNet().eval(), loader=loader, important_classes=important_classes,
                                       target_fn=target_fn))


@settings(max_examples=60, **SETTINGS)
@given(loader=maybe(st.builds(good_loader)), patience=maybe(st.integers(1, 3)), weight=maybe(st.floats(0, 1)),
       temperature=maybe(st.floats(0.1, 10)), batches=maybe(st.integers(1, 4), small_junk),
       fraction=maybe(st.floats(0.1, 0.9)))
def test_early_stopping_distillation_batchnorm_and_the_split(loader, patience, weight, temperature, batches, fraction):
    check("EarlyStopping", EarlyStopping, dict(loader=loader, patience=patience))
    check("Distillation", Distillation, dict(teacher=TinyNet(), weight=weight, temperature=temperature))
    check("recalibrate_batchnorm", recalibrate_batchnorm, dict(model=TinyNet(), loader=loader, batches=batches))
    check("split_for_certification", split_for_certification, dict(loader=loader, fraction=fraction))


# ----------------------------------------------------------------------------- the adapters and the loop
@settings(max_examples=40, **SETTINGS)
@given(important_classes=maybe(classes), score=maybe(st.sampled_from(["fisher", "taylor_signed", "magnitude"])),
       omega=maybe(st.none() | st.floats(0, 4)), dataloader=maybe(st.builds(good_loader)),
       max_batches=maybe(st.none() | st.integers(1, 3), small_junk), pruning_ratio=maybe(st.floats(0.1, 0.8)))
@example(important_classes=[1], score="fisher", omega=None, dataloader=BAD_LOADERS["empty"](), max_batches=None,
         pruning_ratio=0.5)  # found by the catalogue of issue 34: an empty loader raised StopIteration
@example(important_classes=[1], score="fisher", omega=None, dataloader=BAD_LOADERS["three_channels"](),
         max_batches=None, pruning_ratio=0.5)
@example(important_classes=[1], score="fisher", omega=None, dataloader=good_loader(), max_batches=None,
         pruning_ratio=1.0)
def test_the_torch_pruning_drop_in_and_our_pruner(important_classes, score, omega, dataloader, max_batches,
                                                  pruning_ratio):
    """ClassAwareImportance in Torch-Pruning's flow, through our RoundingMetaPruner (TP's MetaPruner keeps its own
    behaviour: it is not ours to refuse its ratios)."""
    from classaware_plugin import ClassAwareImportance
    from classaware_plugin.torch_pruning import RoundingMetaPruner

    model = TinyNet()
    imp = check("ClassAwareImportance", ClassAwareImportance, dict(
        important_classes=important_classes, score=score, omega=omega, model=model, dataloader=dataloader,
        max_batches=max_batches))
    if imp is not None:
        pruner = check("RoundingMetaPruner", RoundingMetaPruner, dict(
            model=model, example_inputs=torch.randn(1, 1, 6, 6), importance=imp, pruning_ratio=pruning_ratio,
            ignored_layers=[model.fc]))
        if pruner is not None:
            check("RoundingMetaPruner.step", pruner.step, {}, settings_of=("dataloader", "loader", "batch"))


@settings(max_examples=30, **SETTINGS)
@given(important_classes=maybe(classes), config_list=maybe(st.sampled_from([
    [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}],
    [{"op_types": ["Conv2d"], "sparse_ratio": 0.3}], [{"op_names": ["conv"], "sparse_ratio": 0.5}]])),
    calib_loader=maybe(st.builds(good_loader)), max_batches=maybe(st.none() | st.integers(1, 3), small_junk))
@example(important_classes=[1], config_list=[{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
         calib_loader=BAD_LOADERS["empty"](), max_batches=None)
def test_the_nni_pruner(important_classes, config_list, calib_loader, max_batches):
    import classaware_plugin.nni  # noqa: F401 - NNI's fixes for current torch
    from classaware_plugin import ClassAwarePruner

    pruner = check("ClassAwarePruner", ClassAwarePruner, dict(
        model=TinyNet(), config_list=config_list, important_classes=important_classes, calib_loader=calib_loader,
        max_batches=max_batches))
    if pruner is not None:
        check("ClassAwarePruner.compress", pruner.compress, {}, settings_of=("calib_loader", "loader", "batch"))


@settings(max_examples=30, **SETTINGS)
@given(train_loader=maybe(st.builds(good_loader)), val_loader=maybe(st.builds(good_loader, st.just(48))),
       important_classes=maybe(classes), target_macs_reduction=maybe(st.floats(1.1, 3.0)),
       step=maybe(st.floats(0.1, 0.5)), max_steps=maybe(st.integers(1, 2), small_junk),
       finetune_epochs=maybe(st.floats(0, 0.5), small_junk))
@example(train_loader=BAD_LOADERS["empty"](), val_loader=good_loader(48), important_classes=[1],
         target_macs_reduction=1.5, step=0.2, max_steps=1, finetune_epochs=0.1)  # found: min() of an empty sequence
def test_prune_with_fn_constraint(**kw):
    from classaware_plugin.torch_pruning import prune_with_fn_constraint

    check("prune_with_fn_constraint", prune_with_fn_constraint,
          dict(model=TinyNet(), example_inputs=torch.randn(2, 1, 6, 6), constraint=FNConstraint([1], abs_tol=100),
               round_to=None, **kw), allowed=(NonFiniteLossError,))


@settings(max_examples=12, **SETTINGS)
@given(model=maybe(st.builds(TinyNet)), example_inputs=maybe(st.just(torch.randn(2, 1, 6, 6))),
       exporter=maybe(st.sampled_from(["auto", "legacy"])))
@example(model=TinyNet(), example_inputs=torch.randn(2, 3, 6, 6), exporter="auto")  # found: a raw RuntimeError
def test_export_onnx(tmp_path_factory, model, example_inputs, exporter):
    from classaware_plugin.export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    check("export_onnx", export_onnx, dict(model=model, example_inputs=example_inputs, path=path, exporter=exporter))


# ----------------------------------------------------------------------------- models, data, files
@settings(max_examples=80, **SETTINGS)
@given(name=maybe(st.sampled_from(["cifar_resnet", "mlp", "mobilenet_v2", "resnet18"])),
       num_classes=maybe(st.integers(1, 12)), input_shape=maybe(st.sampled_from([(3, 16, 16), (1, 8, 8), (30,)])),
       width=maybe(st.integers(1, 16)))
def test_build_model(name, num_classes, input_shape, width):
    kwargs = {"width": width} if name == "cifar_resnet" else {}
    COUNTS["build_model"] = COUNTS.get("build_model", 0) + 1
    try:
        build_model(name, num_classes, input_shape, **kwargs)
    except ClassAwareError as e:
        assert any(k in str(e) for k in ("name", "model", "num_classes", "input_shape", "width", str(name))), str(e)


@settings(max_examples=60, **SETTINGS)
@given(name=maybe(st.sampled_from(["digits", "breast_cancer"])), keep_fraction=maybe(st.floats(0.05, 1.0)),
       seed=maybe(st.integers(0, 5)), important=maybe(st.lists(st.integers(0, 9), min_size=1, max_size=2, unique=True)),
       image_size=maybe(st.none() | st.integers(4, 32)), extra=st.sampled_from([{}, {"foo": 1}, {"train_limit": 0}]))
@example(name="digits", keep_fraction=1.0, seed=0, important=[3], image_size=0, extra={})
@example(name="digits", keep_fraction=1.0, seed=0, important=[3], image_size=None, extra={"foo": 1})
@example(name="digits", keep_fraction=0.5, seed=0, important=None, image_size=None, extra={})  # found: None crashed
def test_load_dataset(name, keep_fraction, seed, important, image_size, extra):
    kw = dict(keep_fraction=keep_fraction, seed=seed, important=important, **extra)
    if name == "digits":
        kw["image_size"] = image_size
    COUNTS["load_dataset"] = COUNTS.get("load_dataset", 0) + 1
    try:
        load_dataset(name, **kw)
    except ClassAwareError as e:
        assert any(k in str(e) for k in (*kw, "dataset", str(name))), str(e)


@settings(max_examples=40, **SETTINGS)
@given(model=maybe(st.builds(TinyNet)), where=st.sampled_from(["file", "dir", "unwritable", "nested"]))
@example(model="not a module", where="file")
def test_save_model(tmp_path_factory, model, where):
    base = tmp_path_factory.mktemp("save")
    path = {"file": base / "m.pt", "dir": base, "unwritable": Path("/proc/nonexistent/m.pt"),
            "nested": base / "a" / "b" / "m.pt"}[where]
    check("save_model", save_model, dict(model=model, path=path))


# ----------------------------------------------------------------------------- the configuration
yaml_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True)
                           | st.text(string.ascii_letters + "_.", max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.text(string.ascii_letters + "_", max_size=8), inner, max_size=3), max_leaves=8)
KEYS = sorted(f"{s}.{k}" for s, v in load_config().items() if isinstance(v, dict) for k in v)


@settings(max_examples=250, **SETTINGS)
@given(assignments=st.lists(st.tuples(st.sampled_from(KEYS), yaml_values), max_size=3))
def test_the_configuration_refuses_every_bad_value_by_name(assignments):
    """Any keys set to any YAML values: a valid configuration, or a ClassAwareError naming a key or its value."""
    overrides = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                 for k, v in assignments]
    COUNTS["load_config"] = COUNTS.get("load_config", 0) + 1
    try:
        load_config(None, overrides)
    except ClassAwareError as e:
        keys = {k for k, _ in assignments} | {k.rpartition(".")[2] for k, _ in assignments}
        assert any(k in str(e) for k in keys) or any(str(v) in str(e) for _, v in assignments), str(e)


@settings(max_examples=150, **SETTINGS)
@given(text=st.text(string.printable, max_size=60) | yaml_values.map(lambda v: yaml.safe_dump(v)))
@example(text="pruner: {className: [\n")
@example(text="seed: 0\nconstraint: 5\n")
def test_arbitrary_yaml_files(tmp_path_factory, text):
    """The CLI's configuration file and the NNI pruner config file, written with arbitrary text."""
    import classaware_plugin.nni as cnni

    path = tmp_path_factory.mktemp("yaml") / "config.yaml"
    path.write_text(text)
    COUNTS["load_config(file)"] = COUNTS.get("load_config(file)", 0) + 1
    try:
        load_config(path)
    except ClassAwareError as e:
        assert "config" in str(e) or "key" in str(e), str(e)
    # its errors name the entry of the file that is wrong
    check("pruner_from_config", cnni.pruner_from_config, dict(config=path, model=TinyNet()),
          settings_of=("pruner", "className", "classArgs", "configList", "config_list"))


def test_report_the_generated_cases(capsys):
    """Runs last in this file: prints how many generated cases each entry point ran (``pytest -s`` shows it)."""
    with capsys.disabled():
        print(f"\ngenerated cases: {sum(COUNTS.values())} over {len(COUNTS)} entry points: "
              + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())))
    assert sum(COUNTS.values()) >= 1000 or not COUNTS  # the file's budget ran (empty when run alone)
