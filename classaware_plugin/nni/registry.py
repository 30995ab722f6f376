"""Pruners by name, and pruners from a config file in the shape of NNI experiment configs.

```yaml
pruner:
  className: ClassAwarePruner        # or any NNI built-in pruner: L1NormPruner, TaylorPruner, ...
  classArgs: {important_classes: [6], training_steps: 100}
configList:
  - {opTypes: [Conv2d], sparseRatio: 0.5, granularity: out_channel, excludeOpNames: [conv1]}
```
camelCase and snake_case keys are both accepted. Other packages register pruners through the entry-point
group ``classaware_plugin.nni_pruners`` (``name = "package.module:PrunerClass"``).
"""
from __future__ import annotations

import inspect
import json
import logging
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..core.validation import ClassAwareError
from .config import normalize_keys, prepare_config_list

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "classaware_plugin.nni_pruners"
_REGISTRY: dict[str, type] = {}
_LOADED = False
_SCHEDULED = ("LinearPruner", "AGPPruner")


def register_pruner(name: str, cls: type | None = None):
    """Register ``cls`` under ``name`` (usable as a decorator); warns when it replaces another class."""

    def deco(c: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not c:
            warnings.warn(f"NNI pruner {name!r} was registered already; overwriting it with {c.__name__}.", stacklevel=2)
        _REGISTRY[name] = c
        return c

    return deco(cls) if cls is not None else deco


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    from nni.compression import pruning

    for name in ("LevelPruner", "L1NormPruner", "L2NormPruner", "FPGMPruner", "SlimPruner", "TaylorPruner",
                 "LinearPruner", "AGPPruner", "MovementPruner"):
        if hasattr(pruning, name):
            _REGISTRY.setdefault(name, getattr(pruning, name))
    from .pruner import ClassAwarePruner

    _REGISTRY.setdefault("ClassAwarePruner", ClassAwarePruner)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            register_pruner(ep.name, ep.load())
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the others
            log.warning("could not load NNI pruner %r from entry point %s: %s", ep.name, ep.value, e)
    _LOADED = True


def available_pruners() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_pruner_class(name: str) -> type:
    _load()
    if name not in _REGISTRY:
        raise ClassAwareError(f"Unknown pruner {name!r}. Registered pruners: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def load_config_file(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A pruner config (YAML or JSON file, or a mapping) with its keys in snake_case: ``pruner`` (``class_name``,
    ``class_args``) and ``config_list``; refused, naming the file and the key, when it is not one."""
    if isinstance(config, dict):
        raw = config
    elif not isinstance(config, (str, Path)):
        raise ClassAwareError(f"The 'config' parameter must be a file path or a mapping. Got {type(config).__name__}.")
    else:
        path = Path(config)
        if not path.is_file():
            raise ClassAwareError(f"The pruner config file {str(path)!r} does not exist.")
        try:
            text = path.read_text()
            raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            raise ClassAwareError(f"The pruner config file {str(path)!r} is not valid "
                                  f"{'JSON' if path.suffix == '.json' else 'YAML'}: {' '.join(str(e).split())}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ClassAwareError(f"Cannot read the pruner config file {str(path)!r}: {e}") from None
    if not isinstance(raw, dict):
        raise ClassAwareError("A pruner config must be a mapping with 'pruner' and 'configList'.")
    cfg = normalize_keys(raw)
    unknown = sorted(set(cfg) - {"pruner", "config_list"})
    if unknown:
        raise ClassAwareError(f"Unknown top-level key(s) {unknown} in the pruner config. Allowed: pruner, configList.")
    return cfg


def _build(spec: dict[str, Any], model: nn.Module, config_list: list[dict[str, Any]] | None, evaluator: Any,
           extra: dict[str, Any] | None = None) -> Any:
    if not isinstance(spec, dict) or "class_name" not in spec:
        raise ClassAwareError("The 'pruner' entry needs 'className' (and optionally 'classArgs').")
    unknown = sorted(set(spec) - {"class_name", "class_args"})
    if unknown:
        raise ClassAwareError(f"Unknown key(s) {unknown} under 'pruner'. Allowed: className, classArgs.")
    cls = get_pruner_class(spec["class_name"])
    args = {**dict(spec.get("class_args") or {}), **(extra or {})}
    params = inspect.signature(cls.__init__).parameters
    if spec["class_name"] in _SCHEDULED:
        # Scheduled pruners wrap a sub-pruner: classArgs: {pruner: {className: ..., classArgs: ...}, intervalSteps, totalTimes}
        sub = args.pop("pruner", None)
        if sub is None:
            raise ClassAwareError(f"{spec['class_name']} needs classArgs.pruner: the sub-pruner to schedule.")
        args["pruner"] = _build(sub, model, config_list, evaluator, extra)
        for key in extra or {}:  # the extra arguments went to the sub-pruner
            args.pop(key, None)
        kwargs = {**args, "evaluator": evaluator}
    else:
        if config_list is None:
            raise ClassAwareError("The pruner config needs a 'configList'.")
        kwargs = {"model": model, "config_list": config_list, **args}
        if "evaluator" in params and evaluator is not None:
            kwargs["evaluator"] = evaluator
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    bad = sorted(k for k in kwargs if k not in params and not accepts_any)
    if bad:
        allowed = sorted(p for p in params if p != "self")
        raise ClassAwareError(f"{cls.__name__} does not take {bad}. Its arguments: {allowed}.")
    from ._compat import silenced

    with silenced():
        return cls(**kwargs)


def pruner_from_config(config: str | Path | dict[str, Any], model: nn.Module, evaluator: Any = None,
                       **pruner_args: Any) -> Any:
    """Build the pruner a YAML/JSON file (or dict) names, for ``model`` with NNI ``evaluator``. ``pruner_args`` are
    given to the pruner besides its ``classArgs`` (what a file cannot hold, e.g. ``calib_loader=``); they win over the
    file's.

    Example:
        >>> pruner = pruner_from_config("prune.yaml", model, evaluator)   # doctest: +SKIP
        >>> _, masks = pruner.compress()                                  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
    cfg = load_config_file(config)
    config_list = cfg.get("config_list")
    if config_list is not None:
        name = (cfg.get("pruner") or {}).get("class_name")
        inner = name
        if name in _SCHEDULED:
            inner = ((cfg["pruner"].get("class_args") or {}).get("pruner") or {}).get("class_name")
        if inner != "ClassAwarePruner":  # ours prepares its own config_list
            config_list = prepare_config_list(model, config_list)
    return _build(cfg.get("pruner"), model, config_list, evaluator, pruner_args)
