"""A catalogue of user mistakes across the configuration, files, data, the Python API and the CLI.

Each must be refused with a ClassAwareError (or a subclass) whose message names the offending value, before any
work; none may end in a raw traceback or be accepted silently. Kept general: every case is a mistake a user can
make, not a reproduction of one code path.
"""
from __future__ import annotations

import contextlib
import io
import math
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classaware_plugin.cli.config import defaults, load_config
from classaware_plugin.cli.main import main
from classaware_plugin.core import ClassAwareError, FNConstraint, evaluate, make_score, train
from classaware_plugin.core.statistics import ClassSaliency
from classaware_plugin.data import load_dataset
from classaware_plugin.files import CheckpointError, UntrustedCheckpointError, load_checkpoint, load_model, load_object
from classaware_plugin.models import build_model

from .helpers import TinyNet, toy_loader


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do, made visible."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# ------------------------------------------------------------------------------------------------ configuration
CONFIG = [  # (--set override, a piece of the message: the value or the key it names)
    ("seed=-1", "-1"), ("seed=1.5", "1.5"), ("data.name=mnist", "mnist"), ("data.image_size=0", "0"),
    ("data.image_size=9999", "9999"), ("data.keep_fraction=.nan", "nan"), ("data.keep_fraction=1.5", "1.5"),
    ("data.keep_fraction=0", "0"), ("data.batch_size=0", "0"), ("data.channels=2", "2"),
    ("data.train_limit=5", "5"), ("data.name=image_folder", "data.path"),
    ("important_classes=[]", "[]"), ("important_classes=[3,3]", "[3, 3]"), ("important_classes=three", "three"),
    ("important_classes=[true]", "True"), ("important_classes=[1.5]", "1.5"),
    ("model.name=5", "5"), ("model.checkpoint=/nonexistent/dense.pt", "/nonexistent/dense.pt"),
    ("model.kwargs=[1]", "[1]"), ("training.epochs=-1", "-1"), ("training.lr=0", "0"),
    ("training.optimizer=rmsprop", "rmsprop"), ("training.class_weights=foo", "foo"),
    ("training.warmup_epochs=-2", "-2"), ("pruning.backend=tensorflow", "tensorflow"),
    ("pruning.granularity=channel", "channel"), ("pruning.score=l2", "l2"), ("pruning.omega=-5", "-5"),
    ("pruning.weighting=bogus", "bogus"), ("pruning.loss=hinge", "hinge"),
    ("pruning.normalization=mean", "normalization"), ("pruning.target_macs_reduction=1.0", "1.0"),
    ("pruning.target_sparsity=1.0", "1.0"), ("pruning.step=0", "0"), ("pruning.step=.inf", "inf"),
    ("pruning.max_steps=0", "0"), ("pruning.calib_batches=0", "0"), ("pruning.finetune_epochs=-1", "-1"),
    ("constraint.abs_tol=-1", "-1"), ("constraint.rel_tol=.nan", "nan"), ("constraint.max_accuracy_drop=2", "2"),
    ("calibration=maybe", "maybe"), ("constraint.operating_point=roc", "roc"), ("export.onnx=3", "3"), ("foo=1", "foo"), ("pruning.stepp=0.1", "stepp"),
    ("pruning.step", "pruning.step"), ("data=5", "5"), ("pruning.round_to=0", "0"),
    ("pruning.target_latency_reduction=0.5", "0.5"), ("pruning.latency_runtime=tensorrt", "tensorrt"),
    ("pruning.latency_batch_size=0", "0"), ("training.patience=0", "0"), ("pruning.finetune_patience=1.5", "1.5"),
    ("pruning.distill=1.5", "1.5"), ("pruning.distill_temperature=0", "distill_temperature"),
    ("pruning.allocation=best", "best"), ("pruning.search_candidates=0", "0"), ("pruning.search_objective=f1", "f1"),
]


@pytest.mark.parametrize("override,named", CONFIG, ids=[c[0] for c in CONFIG])
def test_a_bad_configuration_value_is_refused_by_name(override, named):
    with pytest.raises(ClassAwareError) as e:
        load_config(None, [override])
    assert named in str(e.value)


def test_a_calibrated_operating_point_without_calibration_is_refused():
    with pytest.raises(ClassAwareError, match="operating_point=calibrated .* calibration: false"):
        load_config(None, ["calibration=false", "constraint.operating_point=calibrated"])
    from classaware_plugin.cli.config import operating_point

    assert operating_point(load_config(None, ["calibration=false"])) == "argmax"  # null follows calibration
    assert operating_point(load_config(None, [])) == "calibrated"


def _config_file(tmp: Path, kind: str) -> Path:
    p = tmp / "config.yaml"
    if kind == "missing":
        return tmp / "nope.yaml"
    if kind == "directory":
        return tmp
    p.write_bytes({"syntax": b"pruning: {step: [0.1\n", "list": b"- 1\n- 2\n", "binary": b"\xff\xfe\x00\x81",
                   "unknown_section": b"prunning: {step: 0.1}\n"}[kind])
    return p


@pytest.mark.parametrize("kind", ["missing", "directory", "syntax", "list", "binary", "unknown_section"])
def test_a_bad_configuration_file_is_refused_naming_the_file(tmp_path, kind):
    path = _config_file(tmp_path, kind)
    with pytest.raises(ClassAwareError) as e:
        load_config(path)
    assert (str(path) in str(e.value)) or (kind == "unknown_section" and "prunning" in str(e.value))


# ------------------------------------------------------------------------------------------------ files
def _real_model_file(tmp: Path) -> Path:
    p = tmp / "real.pt"
    torch.save(TinyNet(), p)
    return p


def _file(tmp: Path, kind: str) -> Path:
    p = tmp / f"{kind}.pt"
    if kind == "random_bytes":
        p.write_bytes(bytes(range(256)) * 8)
    elif kind == "truncated":
        data = _real_model_file(tmp).read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        p.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "zip_not_torch":
        with zipfile.ZipFile(p, "w") as z:
            z.writestr("hello.txt", "hi")
    elif kind == "directory":
        p.mkdir()
    elif kind == "missing":
        pass
    elif kind == "state_dict":
        torch.save(TinyNet().state_dict(), p)
    elif kind == "other_architecture":
        torch.save(nn.Linear(3, 2).state_dict(), p)
    elif kind == "wider":
        wide = TinyNet(num_classes=5)
        torch.save(wide.state_dict(), p)
    elif kind == "no_weights":
        torch.save({"epoch": 3, "lr": 0.1}, p)
    elif kind == "tensor":
        torch.save(torch.zeros(3), p)
    elif kind == "payload":
        torch.save({"stage": "pruning", "model": Payload(tmp / "PWNED")}, p)
    return p


MODEL_FILES = ["random_bytes", "truncated", "text", "empty", "zip_not_torch", "directory", "missing", "state_dict",
               "no_weights", "tensor", "payload"]


@pytest.mark.parametrize("kind", MODEL_FILES)
def test_load_model_refuses_what_is_not_a_whole_module(tmp_path, kind):
    path = _file(tmp_path, kind)
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    assert str(path) in str(e.value)
    assert isinstance(e.value, UntrustedCheckpointError) == (kind == "payload")  # never "trust it" for junk
    assert not (tmp_path / "PWNED").exists()


CHECKPOINTS = ["other_architecture", "wider", "no_weights", "tensor", "truncated", "payload"]


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_load_checkpoint_names_the_file_and_the_mismatch(tmp_path, kind):
    path = _file(tmp_path, kind)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, TinyNet)
    assert str(path) in str(e.value)
    if kind == "wider":
        assert "fc.weight" in str(e.value) and "(5, 4)" in str(e.value) and "(3, 4)" in str(e.value)
    if kind == "no_weights":
        assert "epoch" in str(e.value)


def test_a_state_dict_checkpoint_loads_into_the_built_architecture(tmp_path):
    path = _file(tmp_path, "state_dict")
    nested = tmp_path / "nested.pt"
    torch.save({"epoch": 7, "state_dict": torch.load(path)}, nested)
    for p in (path, nested):
        assert isinstance(load_checkpoint(p, TinyNet), TinyNet)


def test_the_payload_is_real_and_runs_only_when_trusted(tmp_path):
    """The refusal above is not vacuous: trusted, the same file does create its file."""
    path = _file(tmp_path, "payload")
    with pytest.raises(UntrustedCheckpointError) as e:
        load_object(path)
    assert "io.open" in str(e.value) and "--trust-checkpoint" in str(e.value)
    assert not (tmp_path / "PWNED").exists()
    load_object(path, trusted=True)
    assert (tmp_path / "PWNED").exists()


def test_own_model_classes_load_when_their_package_is_allowed(tmp_path):
    path = tmp_path / "mine.pt"
    torch.save(TinyNet(), path)  # tests.helpers.TinyNet: not a trusted package
    with pytest.raises(UntrustedCheckpointError, match="tests.helpers.TinyNet"):
        load_model(path)
    assert isinstance(load_model(path, allow_modules=("tests.",)), TinyNet)


def _pruning_state_file(tmp: Path, kind: str) -> Path:
    p = _file(tmp, kind)
    return p


@pytest.mark.parametrize("kind", ["state_dict", "random_bytes", "payload"])
def test_load_pruned_state_refuses_a_file_that_is_not_a_tp_state(tmp_path, kind):
    from classaware_plugin.torch_pruning import load_pruned_state

    path = _pruning_state_file(tmp_path, kind)
    with pytest.raises(CheckpointError) as e:
        load_pruned_state(TinyNet, path)
    assert str(path) in str(e.value) and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("kind", ["state_dict", "text", "payload"])
def test_load_masks_refuses_a_file_that_is_not_masks(tmp_path, kind):
    from classaware_plugin.nni import load_masks

    path = _file(tmp_path, kind)
    with pytest.raises(CheckpointError) as e:
        load_masks(path)
    assert str(path) in str(e.value) and not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------------ models and data
def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _nan_batch_loader() -> DataLoader:
    x = torch.randn(24, 1, 6, 6)
    x[17, 0, 2, 2] = float("nan")  # in the third batch of 8
    return _loader(x, torch.arange(24) % 3)


def _collect(loader: Any, model: nn.Module | None = None) -> None:
    ClassSaliency([1], 3).collect(model or TinyNet(), loader)


API: list[tuple[str, Callable[[], Any], str]] = [
    ("model_unknown_kwarg", lambda: build_model("cifar_resnet", 10, (1, 8, 8), depth2=8), "depth2"),
    ("model_bad_depth", lambda: build_model("cifar_resnet", 10, (1, 8, 8), depth=9), "9"),
    ("model_unknown_name", lambda: build_model("resnet8", 10, (1, 8, 8)), "resnet8"),
    ("model_bad_import", lambda: build_model("os:no_such_model", 10, (1, 8, 8)), "os:no_such_model"),
    ("model_sets_num_classes", lambda: build_model("mlp", 3, (4,), num_classes=5), "num_classes"),
    ("model_one_class", lambda: build_model("mlp", 1, (4,)), "1"),
    ("score_unknown", lambda: make_score("bogus", important_classes=[1], num_classes=3), "bogus"),
    ("score_negative_omega", lambda: make_score("fisher", important_classes=[1], num_classes=3, omega=-5.0), "-5"),
    ("score_all_important", lambda: make_score("fisher", important_classes=[0, 1, 2], num_classes=3), "[0, 1, 2]"),
    ("score_class_out_of_range", lambda: make_score("fisher", important_classes=[7], num_classes=3), "7"),
    ("score_class_as_string", lambda: make_score("fisher", important_classes=["3"], num_classes=10), "'3'"),
    ("score_option_not_its_own", lambda: make_score("magnitude", important_classes=[1], num_classes=3, omega=2.0),
     "omega"),
    ("train_negative_epochs", lambda: train(TinyNet(), toy_loader(), nn.CrossEntropyLoss(), epochs=-1), "-1"),
    ("train_zero_lr", lambda: train(TinyNet(), toy_loader(), nn.CrossEntropyLoss(), lr=0.0), "0.0"),
    ("train_bad_schedule", lambda: train(TinyNet(), toy_loader(), nn.CrossEntropyLoss(), schedule="linear"),
     "linear"),
    ("train_bad_optimizer", lambda: train(TinyNet(), toy_loader(), nn.CrossEntropyLoss(), optimizer="rmsprop"),
     "rmsprop"),
    ("train_empty_loader", lambda: train(TinyNet(), [], nn.CrossEntropyLoss()), "loader"),
    ("collect_empty_loader", lambda: _collect([]), "empty"),
    ("collect_nan_batch", lambda: _collect(_nan_batch_loader()), "batch 3"),
    ("collect_label_out_of_range", lambda: _collect(_loader(torch.randn(8, 1, 6, 6), torch.full((8,), 5))), "5"),
    ("collect_float_labels", lambda: _collect(_loader(torch.randn(8, 1, 6, 6), torch.rand(8) * 2)), "float"),
    ("collect_one_hot_labels", lambda: _collect(_loader(torch.randn(8, 1, 6, 6), torch.eye(3)[torch.arange(8) % 3])),
     "(8, 3)"),
    ("collect_wrong_channels", lambda: _collect(_loader(torch.randn(8, 3, 6, 6), torch.arange(8) % 3)), "3"),
    ("evaluate_label_out_of_range",
     lambda: evaluate(TinyNet(), _loader(torch.randn(8, 1, 6, 6), torch.full((8,), 4)), [1], 3), "4"),
    ("evaluate_nan_inputs", lambda: evaluate(TinyNet(), _nan_batch_loader(), [1], 3), "Batch 3"),
    ("constraint_negative_tol", lambda: FNConstraint([1], abs_tol=-1), "-1"),
    ("constraint_nan_rel_tol", lambda: FNConstraint([1], rel_tol=math.nan), "nan"),
    ("data_unknown_set", lambda: load_dataset("mnist"), "mnist"),
    ("data_class_not_in_set", lambda: load_dataset("digits", important=[15]), "15"),
    ("data_nan_keep_fraction", lambda: load_dataset("digits", important=[3], keep_fraction=math.nan), "nan"),
    ("data_fashion_missing_path",
     lambda: load_dataset("fashion_mnist", root="/nonexistent/fashion", important=[6]), "/nonexistent/fashion"),
    ("data_folder_missing", lambda: load_dataset("image_folder", root="/nonexistent/images", important=[0]),
     "/nonexistent/images"),
    ("importance_all_important", lambda: _tp().ClassAwareImportance([0, 1, 2], num_classes=3), "[0, 1, 2]"),
    ("importance_option_of_another_score",
     lambda: _tp().ClassAwareImportance([3], score="magnitude", omega=-5.0), "omega"),
    ("importance_negative_omega_no_num_classes", lambda: _tp().ClassAwareImportance([3], omega=-5.0), "-5"),
    ("importance_class_as_string", lambda: _tp().ClassAwareImportance(["3"]), "'3'"),
    ("nni_missing_sparse_ratio", lambda: _nni_pruner({"op_types": ["Conv2d"]}), "sparse_ratio"),
    ("nni_granularity_typo",
     lambda: _nni_pruner({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channels"}),
     "out_channels"),
    ("nni_full_sparse_ratio", lambda: _nni_pruner({"op_types": ["Conv2d"], "sparse_ratio": 1.0}), "1.0"),
]


def _tp():
    import classaware_plugin.torch_pruning as tp_adapter

    return tp_adapter


def _nni_pruner(config: dict[str, Any]) -> Any:
    from classaware_plugin.nni import ClassAwarePruner

    return ClassAwarePruner(TinyNet(), [config], important_classes=[1], num_classes=3, calib_loader=toy_loader())


@pytest.mark.parametrize("make,named", [c[1:] for c in API], ids=[c[0] for c in API])
def test_a_bad_argument_is_refused_by_name(make, named):
    with pytest.raises(ClassAwareError) as e:
        make()
    assert named in str(e.value)


# ------------------------------------------------------------------------------------------------ the CLI
def _run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = int(e.code or 0)
    return code, err.getvalue()


def _run_dir(tmp: Path, planted: str | None = None) -> Path:
    """A run directory as the job leaves it before pruning, with one file replaced by a payload."""
    d = tmp / "run"
    d.mkdir()
    (d / ".classaware-run").write_text("")
    cfg = defaults()
    cfg["output_dir"] = str(d)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if planted == "state.pt":  # a genuine dense model, so that the job gets as far as the state
        bundle = load_dataset(cfg["data"]["name"], important=cfg["important_classes"], image_size=cfg["data"]["image_size"])
        torch.save(build_model(cfg["model"]["name"], bundle.num_classes, bundle.input_shape, **cfg["model"]["kwargs"]),
                   d / "dense.pt")
    if planted:
        torch.save({"stage": "pruning", "model": Payload(tmp / "PWNED"), "controller": None}, d / planted)
    return d


def _cli_case(name: str, tmp: Path) -> tuple[list[str], str, int]:
    """argv, a piece of the one-line error, and the exit status."""
    if name == "resume_not_a_run_dir":
        return ["run", "--resume", str(tmp)], str(tmp), 2
    if name == "resume_with_set":
        return ["run", "--resume", str(_run_dir(tmp)), "--set", "seed=3"], "--set", 2
    if name == "out_is_a_file":
        (tmp / "f.txt").write_text("x")
        return ["run", "--out", str(tmp / "f.txt")], str(tmp / "f.txt"), 2
    if name == "force_on_user_data":
        (tmp / "precious.csv").write_text("1,2\n")
        return ["run", "--out", str(tmp), "--force"], str(tmp), 2
    if name == "evaluate_missing_model":
        return ["evaluate", str(tmp / "nope.pt")], str(tmp / "nope.pt"), 2
    if name == "evaluate_missing_config":
        return ["evaluate", str(_real_model_file(tmp)), "--config", str(tmp / "c.yaml")], str(tmp / "c.yaml"), 2
    if name == "evaluate_payload":
        return ["evaluate", str(_file(tmp, "payload"))], "--trust-checkpoint", 2
    if name == "run_checkpoint_payload":
        return ["run", "--quiet", "--out", str(tmp / "out"), "--set", f"model.checkpoint={_file(tmp, 'payload')}"], \
            "--trust-checkpoint", 2
    if name in ("resume_planted_state", "resume_planted_dense", "resume_planted_dense_training"):
        planted = {"resume_planted_state": "state.pt", "resume_planted_dense": "dense.pt",
                   "resume_planted_dense_training": "dense_training.pt"}[name]
        return ["run", "--quiet", "--resume", str(_run_dir(tmp, planted))], planted, 2
    raise AssertionError(name)


CLI = ["resume_not_a_run_dir", "resume_with_set", "out_is_a_file", "force_on_user_data", "evaluate_missing_model",
       "evaluate_missing_config", "evaluate_payload", "run_checkpoint_payload", "resume_planted_state",
       "resume_planted_dense", "resume_planted_dense_training"]


@pytest.mark.parametrize("name", CLI)
def test_the_cli_prints_one_error_line_and_no_traceback(tmp_path, name):
    argv, named, status = _cli_case(name, tmp_path)
    code, err = _run_cli(argv)
    assert code == status, err
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "PWNED").exists()  # no payload ran on any load path


@pytest.mark.parametrize("sets,message", [
    (["pruning.allocation=search", "pruning.granularity=unstructured"], "needs pruning.granularity: structured"),
    (["pruning.allocation=global", "pruning.backend=nni"], "allocation: search or uniform"),
    (["pruning.allocation=search", "pruning.target_latency_reduction=1.5"], "target_macs_reduction"),
])
def test_a_width_allocation_the_setting_cannot_use_is_refused(sets, message):
    with pytest.raises(ClassAwareError, match=message):
        load_config(None, sets)
