"""NNI adapter: NNI's usual flow with ClassAwarePruner (structured and unstructured), NNI's own ModelSpeedup on
current torch, masked == sped-up, config-file selection by name, scheduled pruners, the FN loop, errors, export."""
from __future__ import annotations

import copy
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import classaware_plugin.nni as cnni
from classaware_plugin import ClassAwarePruner
from classaware_plugin.core import ClassAwareError, FNConstrainedPruning, FNConstraint, evaluate, train
from classaware_plugin.export import export_onnx, export_torchscript, load_model, save_model

import nni  # noqa: E402  (after classaware_plugin.nni: quiet import)
from nni.compression.speedup import ModelSpeedup  # noqa: E402
from nni.compression.utils import TorchEvaluator  # noqa: E402


def _loader(n=32, size=32, classes=10):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.arange(n) % classes), batch_size=8)


def _evaluator(model, loader):
    def training_func(model, optimizers, training_step, lr_schedulers=None, max_steps=None, max_epochs=None):
        model.train()
        step = 0
        while True:
            for batch in loader:
                optimizers.zero_grad()
                loss = training_step(batch, model)
                loss.backward()
                optimizers.step()
                step += 1
                if max_steps is not None and step >= max_steps:
                    return
            if max_steps is None:
                return

    def training_step(batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=1e-3)
    return TorchEvaluator(training_func, optimizer, training_step)


def _masked_vs_speedup(model, pruner, masks, x):
    model.eval()
    with torch.no_grad():
        masked = model(x)
    pruner.unwrap_model()
    ModelSpeedup(model, x, masks).speedup_model()  # NNI's own call, working after `import classaware_plugin.nni`
    model.eval()
    with torch.no_grad():
        return (model(x) - masked).abs().max().item()


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_nni_flow_structured_masked_equals_sped_up(arch):
    model = getattr(torchvision.models, arch)(num_classes=10)
    loader = _loader()
    config_list = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
    pruner = ClassAwarePruner(model, config_list, _evaluator(model, loader), training_steps=2, important_classes=[3])
    _, masks = pruner.compress()
    before = sum(p.numel() for p in getattr(torchvision.models, arch)(num_classes=10).parameters())
    diff = _masked_vs_speedup(model, pruner, masks, torch.randn(4, 3, 32, 32))
    assert diff < 1e-4
    after = sum(p.numel() for p in model.parameters())
    assert after < 0.45 * before
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_round_to_leaves_filter_counts_that_are_multiples(arch):
    model = getattr(torchvision.models, arch)(num_classes=10)
    dense = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    config_list = [{"op_types": ["Conv2d"], "sparse_ratio": 0.3, "granularity": "out_channel"}]
    pruner = ClassAwarePruner(model, config_list, important_classes=[3], calib_loader=_loader(), round_to=8)
    _, masks = pruner.compress()
    diff = _masked_vs_speedup(model, pruner, masks, torch.randn(4, 3, 32, 32))
    assert diff < 1e-4
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = {n: w for n, w in widths.items() if w < dense[n]}
    assert len(pruned) > len(widths) // 2  # most layers were pruned (by 30% rounded down to a multiple of 8)
    assert all(w % 8 == 0 for w in pruned.values()), pruned
    assert all(w >= 0.6 * dense[n] - 8 for n, w in pruned.items())  # rounding takes at most 8 more than 30%


def test_nni_flow_unstructured_sparsity_and_baking():
    model = torchvision.models.resnet18(num_classes=10)
    loader = _loader()
    pruner = ClassAwarePruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.7, "granularity": "default"}],
                              _evaluator(model, loader),
                              training_steps=2, important_classes=[3])
    _, masks = pruner.compress()
    pruner.unwrap_model()
    w = masks["layer1.0.conv1"]["weight"]
    assert w.shape == model.layer1[0].conv1.weight.shape
    assert float((w == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    cnni.bake_masks(model, masks)
    assert float((model.layer1[0].conv1.weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v3_small"])
def test_nni_own_speedup_works_on_current_torch(arch):
    from nni.compression.pruning import L1NormPruner

    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    config = cnni.prepare_config_list(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"}])
    pruner = L1NormPruner(model, config)
    _, masks = pruner.compress()
    x = torch.randn(1, 3, 32, 32)  # batch 1 is handled too
    diff = _masked_vs_speedup(model, pruner, masks, x)
    assert diff < 1e-4


def test_speedup_of_identity_modules_logs_no_error():
    """NNI has no replacement rule for nn.Identity and logged an ERROR per Identity at every speed-up."""
    from nni.compression.pruning import L1NormPruner

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Identity(), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    config = cnni.prepare_config_list(model, [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "out_channel"}])
    pruner = L1NormPruner(model, config)
    _, masks = pruner.compress()
    handler = Keep(level=logging.WARNING)
    logging.getLogger("nni").addHandler(handler)
    try:
        diff = _masked_vs_speedup(model, pruner, masks, torch.randn(2, 3, 8, 8))
    finally:
        logging.getLogger("nni").removeHandler(handler)
    assert model[0].out_channels == 4 and diff < 1e-5
    assert [r.getMessage() for r in records] == []


def test_masks_load_with_weights_only_true(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    pruner = ClassAwarePruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.3, "granularity": "out_channel"}],
                              important_classes=[3], calib_loader=_loader())
    _, masks = pruner.compress()
    cnni.save_masks(masks, tmp_path / "masks.pt")
    loaded = torch.load(tmp_path / "masks.pt")  # default weights_only=True
    assert loaded.keys() == masks.keys() and torch.equal(loaded["conv1"]["weight"], masks["conv1"]["weight"])


def test_import_is_silent():
    out = subprocess.run([sys.executable, "-c", "import classaware_plugin.nni"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


CONFIG = textwrap.dedent("""
    pruner:
      className: {name}
      classArgs: {args}
    configList:
      - {{opTypes: [Conv2d], sparseRatio: 0.5, granularity: out_channel, excludeOpNames: [conv1]}}
""")


@pytest.mark.parametrize("name, args", [("ClassAwarePruner", "{important_classes: [3], training_steps: 2}"),
                                        ("L1NormPruner", "{}"), ("TaylorPruner", "{training_steps: 2}")])
def test_pruner_chosen_by_name_from_a_config_file(tmp_path, name, args):
    path = tmp_path / "prune.yaml"
    path.write_text(CONFIG.format(name=name, args=args))
    model = torchvision.models.resnet18(num_classes=10)
    pruner = cnni.pruner_from_config(path, model, _evaluator(model, _loader()))
    assert type(pruner).__name__ == name
    _, masks = pruner.compress()
    assert "conv1" not in masks or bool(masks["conv1"]["weight"].all())  # excludeOpNames honoured
    assert any(float((m["weight"] == 0).float().mean()) > 0.3 for m in masks.values() if "weight" in m)


def test_scheduled_pruner_with_class_aware_sub_pruner_from_json(tmp_path):
    import json

    path = tmp_path / "agp.json"
    path.write_text(json.dumps({
        "pruner": {"className": "AGPPruner", "classArgs": {"intervalSteps": 2, "totalTimes": 2, "pruner": {
            "className": "ClassAwarePruner", "classArgs": {"importantClasses": [3], "trainingSteps": 1}}}},
        "configList": [{"opTypes": ["Conv2d"], "sparseRatio": 0.5, "granularity": "out_channel"}],
    }))
    model = torchvision.models.resnet18(num_classes=10)
    pruner = cnni.pruner_from_config(path, model, _evaluator(model, _loader(n=64)))
    assert type(pruner).__name__ == "AGPPruner"
    _, masks = pruner.compress(max_steps=6, max_epochs=None)
    ratio = float((masks["layer2.0.conv1"]["weight"] == 0).float().mean())
    # NNI's AGP builds the sub-pruner's k-th masks for the goal of update k-1: with totalTimes 2 the last masks
    # carry the goal after one update, (1 - (1 - 1/2)^3) * 0.5 = 0.4375 (NNI's own schedule, not ours).
    assert ratio == pytest.approx((1 - (1 - 1 / 2) ** 3) * 0.5, abs=0.01)


def test_registry_errors_and_entry_points(tmp_path, monkeypatch):
    with pytest.raises(ClassAwareError, match="Registered pruners: AGPPruner, ClassAwarePruner"):
        cnni.get_pruner_class("SuperPruner")
    # Another package registers a pruner through the entry-point group.
    pkg = tmp_path / "myprune"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from nni.compression.pruning import L1NormPruner\nclass MyPruner(L1NormPruner):\n    pass\n")
    dist = tmp_path / "myprune-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myprune\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[classaware_plugin.nni_pruners]\nMyPruner = myprune:MyPruner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from classaware_plugin.nni import registry

    monkeypatch.setattr(registry, "_LOADED", False)
    assert "MyPruner" in cnni.available_pruners()
    with pytest.raises(ClassAwareError, match="does not take \\['colour'\\]"):
        cnni.pruner_from_config({"pruner": {"className": "L1NormPruner", "classArgs": {"colour": 1}},
                                 "configList": [{"opTypes": ["Conv2d"], "sparseRatio": 0.5}]},
                                torchvision.models.resnet18())
    with pytest.raises(ClassAwareError, match="Unknown top-level key"):
        cnni.pruner_from_config({"prunr": {}}, torchvision.models.resnet18())


@pytest.mark.parametrize(
    "config, message",
    [
        ({"op_types": ["Conv2D"], "sparse_ratio": 0.5}, "matches no module of the model.*Did you mean \\['Conv2d'\\]"),
        ({"op_names": ["layer9.conv"], "sparse_ratio": 0.5}, "not a module of the model"),
        ({"op_types": ["Conv2d"], "sparse_ratio": 1.5}, "open range \\(0, 1\\). Got 1.5"),
        ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "global_group_id": 1, "max_sparse_ratio": 0.7}, "ignores max_sparse_ratio"),
        ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "sparsity": 0.5}, "unknown key"),
    ],
)
def test_nni_silent_failures_become_errors(config, message):
    with pytest.raises(ClassAwareError, match=message):
        ClassAwarePruner(torchvision.models.resnet18(), [config], important_classes=[3], calib_loader=_loader())


def test_the_certified_rule_drives_nni_and_its_certificate_survives_the_speed_up(digits, dense_digits_model):
    """NNI's iterative backend under FNGuarantee at the calibrated operating point: after ModelSpeedup and the
    certified shift folded into the classifier bias, the delivered model misses on the certification split exactly
    what its certificate says."""
    from classaware_plugin.core import FNGuarantee, calibrate, predict, split_for_certification
    from classaware_plugin.nni.iterative import NNIBackend

    model = copy.deepcopy(dense_digits_model)
    train_dl, val_dl, _ = digits.loaders(64, seed=0)
    selection, cert = split_for_certification(val_dl)
    loss = torch.nn.CrossEntropyLoss()
    backend = NNIBackend(model, torch.zeros(2, *digits.input_shape), selection, [3], train_dl,
                         finetune=lambda m: train(m, train_dl, loss, epochs=0.5, lr=1e-3, progress=False),
                         calib_batches=2, cert_loader=cert)
    rule = FNGuarantee([3], operating_point="calibrated", max_accuracy_drop=0.06)
    result = FNConstrainedPruning(backend, rule, target=1.3, step=0.1, max_steps=4).run()
    accepted = [r for r in result.history if r.decision == "accept"]
    assert accepted, [(r.decision, r.violations) for r in result.history]  # the check below needs a certified model
    backend.finalize()
    calibrate(model, selection, [3], shifts=accepted[-1].shifts)
    y, z = predict(model, cert)
    assert int(((y == 3) & (z.argmax(1) != 3)).sum()) == result.certificate[3].fn and result.certified
    assert result.measure["macs_reduction"] > 1.0


def test_fn_constrained_loop_with_nni_rolls_back_and_exports(tmp_path, digits, dense_digits_model):
    from classaware_plugin.nni.iterative import NNIBackend

    model = copy.deepcopy(dense_digits_model)
    train_dl, val_dl, _ = digits.loaders(64, seed=0)
    loss = torch.nn.CrossEntropyLoss()
    backend = NNIBackend(model, torch.zeros(2, *digits.input_shape), val_dl, [3], train_dl,
                         finetune=lambda m: train(m, train_dl, loss, epochs=0.5, lr=1e-3, progress=False),
                         calib_batches=2)
    constraint = FNConstraint([3], abs_tol=0, max_accuracy_drop=0.02)
    result = FNConstrainedPruning(backend, constraint, target=3.0, step=0.6, max_halvings=1, max_steps=4).run()
    decisions = [r.decision for r in result.history]
    assert any(d in ("retry", "stop") for d in decisions), decisions
    assert not constraint.violations(result.dense, evaluate(model, val_dl, [3]))
    backend.finalize()
    assert not constraint.violations(result.dense, evaluate(model, val_dl, [3]))  # speed-up changes nothing
    x = torch.randn(4, *digits.input_shape)
    assert export_onnx(model, x, tmp_path / "m.onnx") < 1e-4
    assert export_torchscript(model, x, tmp_path / "m.ts") < 1e-5
    save_model(model, tmp_path / "m.pt")
    assert torch.equal(load_model(tmp_path / "m.pt")(x), model.eval()(x))
