"""The YAML configuration of ``classaware-prune``: defaults, loading, and validation before any work."""
from __future__ import annotations

import copy
import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..backends import FRAMEWORKS, require_framework
from ..core.controller import FNConstrainedPruning, FNConstraint
from ..core.allocation import WidthSearch
from ..core.guarantee import FNGuarantee
from ..core.distributed import resolve_device
from ..core.loss import WEIGHT_SCHEMES, ClassDependentLoss
from ..core.scores import available_scores, score_class, score_options, validate_score
from ..core.training import TRAIN_PARAMETERS, Distillation, EarlyStopping
from ..core.validation import ClassAwareError, Constraint, InstanceOf, Interval, Options, check_class_keys
from ..data import DATASETS, IMAGE_SIZE
from ..models import MODELS
from ..speed import ROUND_TO_CONSTRAINT, LatencyProbe

BACKENDS = tuple(FRAMEWORKS)  # the structured backends; unstructured pruning is plain PyTorch
GRANULARITIES = ("structured", "unstructured")


def _nullable(c: Constraint) -> Constraint:
    return dataclasses.replace(c, nullable=True)


class ClassList:
    """``important_classes``: a non-empty list of distinct class indices or names (resolved against the data set)."""

    nullable = False

    def check(self, name: str, value: Any, what: str = "configuration key") -> Any:
        if not isinstance(value, list) or not value or not all(
                isinstance(c, (int, str)) and not isinstance(c, bool) for c in value):
            raise ClassAwareError(f"The {what} '{name}' must be a non-empty list of class indices or names. Got {value!r}.")
        if len(set(value)) != len(value):
            raise ClassAwareError(f"The {what} '{name}' must not repeat a class. Got {value!r}.")
        return value

    def describe(self) -> str:
        return "a non-empty list of class indices or names, e.g. `[3]` or `[Shirt]`"


class Device:
    """``device``: where the job runs (checked by resolving it)."""

    nullable = False

    def check(self, name: str, value: Any, what: str = "configuration key") -> Any:
        try:
            return resolve_device(value)
        except ClassAwareError as e:
            raise ClassAwareError(f"The {what} '{name}': {e}") from None

    def describe(self) -> str:
        return "`auto`, `cpu`, `cuda` or `cuda:N`"


class ModelName:
    """``model.name``: a registered model, or ``package.module:callable``."""

    nullable = False

    def check(self, name: str, value: Any, what: str = "configuration key") -> Any:
        if not isinstance(value, str) or (value not in MODELS and ":" not in value):
            raise ClassAwareError(f"The {what} '{name}' must be {self.describe()}. Got {value!r} instead.")
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(sorted(MODELS)) + ", or package.module:callable (your own builder)"


class ScoreOption:
    """An option of the chosen score (``pruning.omega``, ...): checked by the score itself in :func:`validate`
    (each score declares its own), described here by every score that has it."""

    nullable = True

    def __init__(self, option: str) -> None:
        self.option = option

    def check(self, name: str, value: Any, what: str = "configuration key") -> Any:
        return value

    def describe(self) -> str:
        by_score = [f"{n}: {score_class(n).PARAMETERS[self.option].describe()}" for n in available_scores()
                    if self.option in score_class(n).PARAMETERS]
        return "; ".join(by_score) + "; null = the score's default"


KEYS: dict[str, Constraint] = {
    "seed": Interval(0, integer=True),
    "output_dir": InstanceOf((str,)),
    "device": Device(),
    "data.name": Options(tuple(sorted(DATASETS))),
    "data.path": InstanceOf((str,), nullable=True),
    "data.image_size": _nullable(IMAGE_SIZE),
    "data.channels": Options((1, 3)),
    "data.keep_fraction": Interval(0.0, 1.0, low_open=True),
    "data.train_limit": Interval(100, integer=True, nullable=True),
    "data.batch_size": Interval(1, integer=True),
    "important_classes": ClassList(),
    "model.name": ModelName(),
    "model.checkpoint": InstanceOf((str,), nullable=True),
    "model.kwargs": InstanceOf((dict,)),
    "training.epochs": TRAIN_PARAMETERS["epochs"], "training.lr": TRAIN_PARAMETERS["lr"],
    "training.optimizer": TRAIN_PARAMETERS["optimizer"], "training.schedule": TRAIN_PARAMETERS["schedule"],
    "training.class_weights": Options(WEIGHT_SCHEMES),
    "training.rank_weight": ClassDependentLoss.PARAMETERS["rank_weight"],
    "training.rank_max_fpr": ClassDependentLoss.PARAMETERS["rank_max_fpr"],
    "training.logit_adjustment": ClassDependentLoss.PARAMETERS["logit_adjustment"],
    "training.warmup_epochs": Interval(0, integer=True),
    "training.patience": _nullable(EarlyStopping.PARAMETERS["patience"]),
    "training.sync_batchnorm": InstanceOf((bool,)),
    "pruning.backend": Options(BACKENDS),
    "pruning.granularity": Options(GRANULARITIES),
    "pruning.score": Options(tuple(available_scores())),
    **{f"pruning.{k}": ScoreOption(k) for k in ("omega", "rest_weight", "weighting", "loss", "normalization")},
    "pruning.target_macs_reduction": Interval(1.0, low_open=True),
    "pruning.target_latency_reduction": Interval(1.0, low_open=True, nullable=True),
    "pruning.latency_runtime": LatencyProbe.PARAMETERS["runtime"],
    "pruning.latency_batch_size": LatencyProbe.PARAMETERS["batch_size"],
    "pruning.target_sparsity": Interval(0.0, 1.0, low_open=True, high_open=True),
    "pruning.round_to": ROUND_TO_CONSTRAINT,
    "pruning.allocation": Options(("uniform", "global", "search")),
    "pruning.search_objective": Options(("important", "important_auc", "accuracy")),
    "pruning.search_candidates": WidthSearch.PARAMETERS["candidates"],
    "pruning.search_batches": Interval(1, integer=True),
    "pruning.step": FNConstrainedPruning.PARAMETERS["step"],
    "pruning.max_halvings": FNConstrainedPruning.PARAMETERS["max_halvings"],
    "pruning.max_steps": FNConstrainedPruning.PARAMETERS["max_steps"],
    "pruning.finetune_epochs": TRAIN_PARAMETERS["epochs"],
    "pruning.finetune_patience": _nullable(EarlyStopping.PARAMETERS["patience"]),
    "pruning.finetune_schedule": TRAIN_PARAMETERS["schedule"],
    "pruning.bn_batches": Interval(0, integer=True),
    "pruning.distill": Distillation.PARAMETERS["weight"],
    "pruning.distill_temperature": Distillation.PARAMETERS["temperature"],
    "pruning.lr": TRAIN_PARAMETERS["lr"],
    "pruning.calib_batches": Interval(1, integer=True),
    "constraint.rule": Options(("certified", "count")),
    "constraint.max_fn_rate": FNGuarantee.PARAMETERS["max_fn_rate"],
    "constraint.tolerance": FNGuarantee.PARAMETERS["tolerance"],
    "constraint.delta": FNGuarantee.PARAMETERS["delta"],
    "constraint.certification_fraction": Interval(0.0, 1.0, low_open=True, high_open=True),
    "constraint.abs_tol": FNConstraint.PARAMETERS["abs_tol"], "constraint.rel_tol": FNConstraint.PARAMETERS["rel_tol"],
    "constraint.max_accuracy_drop": FNConstraint.PARAMETERS["max_accuracy_drop"],
    "constraint.operating_point": _nullable(FNConstraint.PARAMETERS["operating_point"]),
    "calibration": InstanceOf((bool,)),
    "export.onnx": InstanceOf((bool,)),
}
"""Every configuration key and what it may hold: the checks of :func:`validate` and the configuration reference
(docs) come from here, and where a value goes to a library parameter its constraint is that parameter's own, so the
rule lives once. (Which combinations are allowed is checked after, in :func:`validate`.)"""


def default_text() -> str:
    """The commented default configuration."""
    return resources.files("classaware_plugin.cli").joinpath("default.yaml").read_text()


def defaults() -> dict[str, Any]:
    return yaml.safe_load(default_text())


def _merge(base: dict[str, Any], over: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        where = f"{path}{key}"
        if key not in base:
            allowed = ", ".join(sorted(base))
            raise ClassAwareError(f"Unknown configuration key '{where}'. Allowed keys{' in ' + path[:-1] if path else ''}: {allowed}.")
        if isinstance(base[key], dict) and key != "kwargs":
            if not isinstance(value, dict):
                raise ClassAwareError(f"The configuration key '{where}' must be a mapping. Got {value!r}.")
            out[key] = _merge(base[key], value, where + ".")
        else:
            out[key] = value
    return out


def _set_dotted(cfg: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ClassAwareError(f"--set takes key=value (e.g. pruning.step=0.1). Got {assignment!r}.")
    key, _, raw = assignment.partition("=")
    node = cfg
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Defaults, overlaid with the YAML file and ``key=value`` overrides, validated."""
    user: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ClassAwareError(f"The configuration file {str(p)!r} does not exist.")
        if not p.is_file():
            raise ClassAwareError(f"The configuration file {str(p)!r} is a directory; give the path of a YAML file.")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ClassAwareError(f"The configuration file {str(p)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ClassAwareError(f"Cannot read the configuration file {str(p)!r}: {e}") from None
        if not isinstance(user, dict):
            raise ClassAwareError(f"The configuration file {str(p)!r} must hold a mapping at the top level.")
    for assignment in overrides or []:
        _set_dotted(user, assignment)
    cfg = _merge(defaults(), user)
    validate(cfg)
    return cfg


def _value(cfg: dict[str, Any], key: str) -> Any:
    section, _, name = key.rpartition(".")
    return cfg[section][name] if section else cfg[name]


def validate(cfg: dict[str, Any]) -> None:
    """Check every value against :data:`KEYS`, then the combinations; the message names the key, what is allowed and
    what was given."""
    for key, constraint in KEYS.items():
        constraint.check(key, _value(cfg, key), what="configuration key")
    d, m, t, p, c = cfg["data"], cfg["model"], cfg["training"], cfg["pruning"], cfg["constraint"]
    if d["name"] == "image_folder" and not d["path"]:
        raise ClassAwareError("The configuration key 'data.path' must name the ImageFolder root for data.name=image_folder.")
    if m["checkpoint"] is not None and not Path(m["checkpoint"]).is_file():
        raise ClassAwareError(f"The configuration key 'model.checkpoint' names {m['checkpoint']!r}, which does not exist.")
    if t["sync_batchnorm"] and resolve_device(cfg["device"]).type != "cuda":
        raise ClassAwareError(f"training.sync_batchnorm=true needs CUDA (torch.nn.SyncBatchNorm runs on GPUs only); "
                              f"device {cfg['device']!r} is not. Set training.sync_batchnorm: false.")
    if p["granularity"] == "structured":
        try:
            require_framework(p["backend"])
        except ClassAwareError as e:
            raise ClassAwareError(f"pruning.backend={p['backend']}: {e}") from None
    needs_rewind = score_class(p["score"]).needs_rewind
    if p["backend"] == "nni" and needs_rewind and p["granularity"] == "structured":
        raise ClassAwareError(f"pruning.score={p['score']} is not available with pruning.backend=nni; use fisher.")
    if needs_rewind and m["checkpoint"]:
        raise ClassAwareError(
            f"pruning.score={p['score']} needs the initial weights, so it cannot start from model.checkpoint."
        )
    try:  # the score's own options: refused when the score has no such option, then checked by the score itself
        validate_score(p["score"], **{k: p.get(k) for k in SCORE_OPTIONS})
    except ClassAwareError as e:
        raise ClassAwareError(f"In the configuration section 'pruning': {e}") from None
    if p["allocation"] != "uniform" and p["granularity"] != "structured":
        raise ClassAwareError(f"pruning.allocation={p['allocation']} chooses per-layer widths, which needs "
                              "pruning.granularity: structured (unstructured pruning ranks single weights globally).")
    if p["allocation"] == "global" and p["backend"] != "torch-pruning":
        raise ClassAwareError("pruning.allocation=global ranks channels across layers with Torch-Pruning; with "
                              "pruning.backend=nni use allocation: search or uniform.")
    if p["allocation"] == "search" and p["target_latency_reduction"] is not None:
        raise ClassAwareError("pruning.allocation=search searches widths for a MACs target; give "
                              "pruning.target_macs_reduction instead of target_latency_reduction.")
    if p["target_latency_reduction"] is not None and p["granularity"] != "structured":
        raise ClassAwareError(
            f"pruning.target_latency_reduction={p['target_latency_reduction']} needs pruning.granularity: "
            "structured (zeroed weights do not run faster); use pruning.target_sparsity for unstructured pruning."
        )
    if c["operating_point"] == "calibrated" and not cfg["calibration"]:
        raise ClassAwareError(
            "constraint.operating_point=calibrated judges every step after the logit shift that calibration folds into "
            "the model at the end; with calibration: false the model would keep its uncalibrated decisions. Set "
            "constraint.operating_point: argmax, or calibration: true."
        )
    other_rule = "count" if c["rule"] == "certified" else "certified"
    stray = [k for k in RULE_KEYS[other_rule] if c[k] != defaults()["constraint"][k]]
    if stray:
        raise ClassAwareError(
            f"constraint.{stray[0]}={c[stray[0]]!r} belongs to constraint.rule={other_rule}, but the rule is "
            f"{c['rule']!r}. Set constraint.rule: {other_rule} (the count rule reproduces the results of "
            "configurations written before the certified rule), or remove the key.")
    if isinstance(c["max_fn_rate"], dict):
        check_class_keys("constraint.max_fn_rate", c["max_fn_rate"], cfg["important_classes"])
    if c["max_fn_rate"] is not None and c["tolerance"] is not None:
        raise ClassAwareError("Give constraint.max_fn_rate (a stated budget) or constraint.tolerance (dense FN rate + "
                              f"tolerance), not both. Got {c['max_fn_rate']!r} and {c['tolerance']!r}.")
    if c["rule"] == "certified" and cfg["calibration"] and c["operating_point"] == "argmax":
        raise ClassAwareError(
            "constraint.rule=certified certifies each model as it is judged; with operating_point=argmax the final "
            "calibration would then fold an uncertified shift into it. Set constraint.operating_point: calibrated "
            "(or null: the shift is chosen on the selection split and certified with the step), or calibration: false.")


RULE_KEYS = {"certified": ("max_fn_rate", "tolerance", "delta", "certification_fraction"), "count": ("abs_tol", "rel_tol")}
"""The 'constraint' keys that only one rule reads (a value other than the default under the other rule is refused)."""

SCORE_OPTIONS = ("omega", "rest_weight", "weighting", "loss", "normalization")
"""Keys of the 'pruning' section that are options of the score (null: the score's default)."""


def score_config(pruning: dict[str, Any]) -> dict[str, Any]:
    """The score options set in the 'pruning' section (refused, naming the option, when the score has no such option)."""
    return score_options(pruning["score"], **{k: pruning.get(k) for k in SCORE_OPTIONS})


def operating_point(cfg: dict[str, Any]) -> str:
    """Where the FN rule judges a step: the configured point, else calibrated when the run calibrates."""
    point = cfg["constraint"]["operating_point"]
    return point if point is not None else ("calibrated" if cfg["calibration"] else "argmax")


def make_constraint(cfg: dict[str, Any], important: list[int]) -> FNConstraint | FNGuarantee:
    """The run's FN rule from the 'constraint' section; ``important`` are the important classes resolved to indices
    (a ``max_fn_rate`` mapping names them as ``important_classes`` does)."""
    c = cfg["constraint"]
    common = dict(max_accuracy_drop=c["max_accuracy_drop"], operating_point=operating_point(cfg))
    if c["rule"] == "count":
        return FNConstraint(important, abs_tol=c["abs_tol"], rel_tol=c["rel_tol"], **common)
    rate = c["max_fn_rate"]
    if isinstance(rate, dict):
        as_given = dict(zip(cfg["important_classes"], important))
        rate = {as_given[k]: v for k, v in rate.items()}
    return FNGuarantee(important, max_fn_rate=rate, tolerance=c["tolerance"], delta=c["delta"], **common)
