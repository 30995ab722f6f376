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
from ..core.guarantee import FNGuarantee
from ..core.distributed import resolve_device
from ..core.loss import WEIGHT_SCHEMES, ClassDependentLoss
from ..core.scores import available_scores, score_class, score_options, validate_score
from ..core.training import TRAIN_PARAMETERS, Distillation, EarlyStopping
from ..core.validation import ClassAwareError, Constraint, check_choice, check_class_keys, check_number
from ..data import DATASETS
from ..speed import ROUND_TO_CONSTRAINT, LatencyProbe

BACKENDS = tuple(FRAMEWORKS)  # the structured backends; unstructured pruning is plain PyTorch
GRANULARITIES = ("structured", "unstructured")


def _nullable(c: Constraint) -> Constraint:
    return dataclasses.replace(c, nullable=True)


FROM_LIBRARY: dict[str, Constraint] = {
    "training.epochs": TRAIN_PARAMETERS["epochs"], "training.lr": TRAIN_PARAMETERS["lr"],
    "training.optimizer": TRAIN_PARAMETERS["optimizer"], "training.schedule": TRAIN_PARAMETERS["schedule"],
    "training.patience": _nullable(EarlyStopping.PARAMETERS["patience"]),
    "training.rank_weight": ClassDependentLoss.PARAMETERS["rank_weight"],
    "training.logit_adjustment": ClassDependentLoss.PARAMETERS["logit_adjustment"],
    "training.rank_max_fpr": ClassDependentLoss.PARAMETERS["rank_max_fpr"],
    "pruning.step": FNConstrainedPruning.PARAMETERS["step"],
    "pruning.max_halvings": FNConstrainedPruning.PARAMETERS["max_halvings"],
    "pruning.max_steps": FNConstrainedPruning.PARAMETERS["max_steps"],
    "pruning.finetune_epochs": TRAIN_PARAMETERS["epochs"], "pruning.lr": TRAIN_PARAMETERS["lr"],
    "pruning.finetune_patience": _nullable(EarlyStopping.PARAMETERS["patience"]),
    "pruning.finetune_schedule": TRAIN_PARAMETERS["schedule"],
    "pruning.distill": Distillation.PARAMETERS["weight"],
    "pruning.distill_temperature": Distillation.PARAMETERS["temperature"],
    "pruning.round_to": ROUND_TO_CONSTRAINT,
    "pruning.latency_runtime": LatencyProbe.PARAMETERS["runtime"],
    "pruning.latency_batch_size": LatencyProbe.PARAMETERS["batch_size"],
    "constraint.abs_tol": FNConstraint.PARAMETERS["abs_tol"], "constraint.rel_tol": FNConstraint.PARAMETERS["rel_tol"],
    "constraint.max_fn_rate": FNGuarantee.PARAMETERS["max_fn_rate"],
    "constraint.tolerance": FNGuarantee.PARAMETERS["tolerance"], "constraint.delta": FNGuarantee.PARAMETERS["delta"],
    "constraint.max_accuracy_drop": FNConstraint.PARAMETERS["max_accuracy_drop"],
    "constraint.operating_point": _nullable(FNConstraint.PARAMETERS["operating_point"]),
}
"""Configuration keys whose value goes to a library parameter: checked by that parameter's declared constraint
(the rule lives once, in the library), the message naming the key."""


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


def _num(name: str, value: Any, **kw: Any) -> None:
    check_number(name, value, what="configuration key", **kw)


def _choice(name: str, value: Any, choices: Any) -> None:
    check_choice(name, value, list(choices), what="configuration key")


def validate(cfg: dict[str, Any]) -> None:
    """Check every value; the message names the key, what is allowed and what was given."""
    _num("seed", cfg["seed"], low=0, integer=True)
    try:
        device = resolve_device(cfg["device"])
    except ClassAwareError as e:
        raise ClassAwareError(f"The configuration key 'device': {e}") from None
    d = cfg["data"]
    _choice("data.name", d["name"], sorted(DATASETS))
    if d["name"] == "image_folder" and not d["path"]:
        raise ClassAwareError("The configuration key 'data.path' must name the ImageFolder root for data.name=image_folder.")
    if d["image_size"] is not None:
        _num("data.image_size", d["image_size"], low=4, high=512, integer=True)
    _choice("data.channels", d["channels"], [1, 3])
    _num("data.keep_fraction", d["keep_fraction"], low=0.0, high=1.0, low_open=True)
    if d["train_limit"] is not None:
        _num("data.train_limit", d["train_limit"], low=100, integer=True)
    _num("data.batch_size", d["batch_size"], low=1, integer=True)
    ic = cfg["important_classes"]
    if not isinstance(ic, list) or not ic or not all(isinstance(c, (int, str)) and not isinstance(c, bool) for c in ic):
        raise ClassAwareError(
            f"The configuration key 'important_classes' must be a non-empty list of class indices or names. Got {ic!r}."
        )
    if len(set(ic)) != len(ic):
        raise ClassAwareError(f"The configuration key 'important_classes' must not repeat a class. Got {ic!r}.")
    for key, value in (("data.path", d["path"]), ("model.checkpoint", cfg["model"]["checkpoint"]),
                       ("output_dir", cfg["output_dir"])):
        if value is not None and not isinstance(value, str) or (key == "output_dir" and not value):
            raise ClassAwareError(f"The configuration key '{key}' must be a path (a string). Got {value!r}.")
    m = cfg["model"]
    if not isinstance(m["name"], str):
        raise ClassAwareError(f"The configuration key 'model.name' must be a string. Got {m['name']!r}.")
    if m["checkpoint"] is not None and not Path(m["checkpoint"]).is_file():
        raise ClassAwareError(f"The configuration key 'model.checkpoint' names {m['checkpoint']!r}, which does not exist.")
    if not isinstance(m["kwargs"], dict):
        raise ClassAwareError(f"The configuration key 'model.kwargs' must be a mapping. Got {m['kwargs']!r}.")
    t = cfg["training"]
    _choice("training.class_weights", t["class_weights"], WEIGHT_SCHEMES)
    _num("training.warmup_epochs", t["warmup_epochs"], low=0, integer=True)
    if not isinstance(t["sync_batchnorm"], bool):
        raise ClassAwareError(f"The configuration key 'training.sync_batchnorm' must be true or false. Got {t['sync_batchnorm']!r}.")
    if t["sync_batchnorm"] and device.type != "cuda":
        raise ClassAwareError(f"training.sync_batchnorm=true needs CUDA (torch.nn.SyncBatchNorm runs on GPUs only); "
                              f"device {cfg['device']!r} is {device}. Set training.sync_batchnorm: false.")
    p = cfg["pruning"]
    _choice("pruning.backend", p["backend"], BACKENDS)
    _choice("pruning.granularity", p["granularity"], GRANULARITIES)
    if p["granularity"] == "structured":
        try:
            require_framework(p["backend"])
        except ClassAwareError as e:
            raise ClassAwareError(f"pruning.backend={p['backend']}: {e}") from None
    _choice("pruning.score", p["score"], available_scores())
    needs_rewind = score_class(p["score"]).needs_rewind
    if p["backend"] == "nni" and needs_rewind and p["granularity"] == "structured":
        raise ClassAwareError(f"pruning.score={p['score']} is not available with pruning.backend=nni; use fisher.")
    if needs_rewind and cfg["model"]["checkpoint"]:
        raise ClassAwareError(
            f"pruning.score={p['score']} needs the initial weights, so it cannot start from model.checkpoint."
        )
    try:  # the score's own options: refused when the score has no such option, then checked by the score itself
        validate_score(p["score"], **{k: p.get(k) for k in SCORE_OPTIONS})
    except ClassAwareError as e:
        raise ClassAwareError(f"In the configuration section 'pruning': {e}") from None
    _num("pruning.target_macs_reduction", p["target_macs_reduction"], low=1.0, low_open=True)
    if p["target_latency_reduction"] is not None:
        _num("pruning.target_latency_reduction", p["target_latency_reduction"], low=1.0, low_open=True)
        if p["granularity"] != "structured":
            raise ClassAwareError(
                f"pruning.target_latency_reduction={p['target_latency_reduction']} needs pruning.granularity: "
                "structured (zeroed weights do not run faster); use pruning.target_sparsity for unstructured pruning."
            )
    _num("pruning.target_sparsity", p["target_sparsity"], low=0.0, high=1.0, low_open=True, high_open=True)
    _num("pruning.calib_batches", p["calib_batches"], low=1, integer=True)
    _num("pruning.bn_batches", p["bn_batches"], low=0, integer=True)
    c = cfg["constraint"]
    if not isinstance(cfg["calibration"], bool):
        raise ClassAwareError(f"The configuration key 'calibration' must be true or false. Got {cfg['calibration']!r}.")
    for key, constraint in FROM_LIBRARY.items():
        section, _, name = key.partition(".")
        constraint.check(key, cfg[section][name], what="configuration key")
    if c["operating_point"] == "calibrated" and not cfg["calibration"]:
        raise ClassAwareError(
            "constraint.operating_point=calibrated judges every step after the logit shift that calibration folds into "
            "the model at the end; with calibration: false the model would keep its uncalibrated decisions. Set "
            "constraint.operating_point: argmax, or calibration: true."
        )
    _choice("constraint.rule", c["rule"], RULES)
    _num("constraint.certification_fraction", c["certification_fraction"], low=0.0, high=1.0, low_open=True,
         high_open=True)
    other_rule = "count" if c["rule"] == "certified" else "certified"
    stray = [k for k in RULE_KEYS[other_rule] if c[k] != defaults()["constraint"][k]]
    if stray:
        raise ClassAwareError(
            f"constraint.{stray[0]}={c[stray[0]]!r} belongs to constraint.rule={other_rule}, but the rule is "
            f"{c['rule']!r}. Set constraint.rule: {other_rule} (the count rule reproduces the results of "
            "configurations written before the certified rule), or remove the key.")
    if isinstance(c["max_fn_rate"], dict):
        check_class_keys("constraint.max_fn_rate", c["max_fn_rate"], ic)
    if c["max_fn_rate"] is not None and c["tolerance"] is not None:
        raise ClassAwareError("Give constraint.max_fn_rate (a stated budget) or constraint.tolerance (dense FN rate + "
                              f"tolerance), not both. Got {c['max_fn_rate']!r} and {c['tolerance']!r}.")
    if c["rule"] == "certified" and cfg["calibration"] and c["operating_point"] == "argmax":
        raise ClassAwareError(
            "constraint.rule=certified certifies each model as it is judged; with operating_point=argmax the final "
            "calibration would then fold an uncertified shift into it. Set constraint.operating_point: calibrated "
            "(or null: the shift is chosen on the selection split and certified with the step), or calibration: false.")
    if not isinstance(cfg["export"]["onnx"], bool):
        raise ClassAwareError(f"The configuration key 'export.onnx' must be true or false. Got {cfg['export']['onnx']!r}.")


RULES = ("certified", "count")
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
