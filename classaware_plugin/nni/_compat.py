"""Make NNI 3.0 usable on current torch, quietly. Applied once by ``import classaware_plugin.nni``.

1. Import noise: NNI registers pytree nodes torch already has and uses deprecated torch APIs at import time;
   those warnings are suppressed during the import, and NNI's loggers are set to ERROR (they print a
   coloured line per replaced module during speed-up).
2. ``ModelSpeedup`` on torch >= 2.2: NNI's ``concrete_trace`` fails (torch renamed ``_TensorBase`` and
   changed ``fx.Node.is_impure``). When no ``graph_module`` is passed, ``torch.fx.symbolic_trace`` is used
   instead (version-guarded, logged once). A dummy input of batch size 1 is repeated to batch 2 (NNI's
   shape propagation fails at BatchNorm after average pooling with batch 1).
3. ``speedup_model()`` leaves every module it replaced in train mode; the modules' modes are restored.
4. ModelSpeedup keeps the raw weights of masked elements inside channels it keeps (the union of a residual
   group's masks, unstructured masks), so masked and sped-up outputs differ; masks are baked into the
   weights first (ResNet-18 masked vs sped-up: 1.08 -> 4e-7 max abs difference).
5. ``nn.Identity`` (torchvision's replaced heads and pools, ResNet shortcuts) has no replacement rule, so every
   speed-up logged a misleading ERROR for it; it is registered as "no replacement needed", like ReLU.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)
_PATCHED = False
_WARNED: set[str] = set()


def _once(key: str, msg: str, *args: object) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.info(msg, *args)


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def quiet_nni_loggers() -> None:
    for name in ("nni", "nni.compression", "nni.common", "nni.runtime"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("nni") and isinstance(lg, logging.Logger):
            lg.setLevel(logging.ERROR)


def import_nni_quietly() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import nni  # noqa: F401
        import nni.compression.pruning  # noqa: F401
        import nni.compression.speedup  # noqa: F401
    quiet_nni_loggers()


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """NNI prints to stdout (e.g. ``print(prune_axis, prune_type)`` in its dependency analysis) and warns freely."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    quiet_nni_loggers()


@torch.no_grad()
def bake_masks(model: torch.nn.Module, masks: dict) -> None:
    """Multiply every masked parameter by its mask in place (weights of pruned elements become exactly 0)."""
    modules = dict(model.named_modules())
    for module_name, targets in masks.items():
        module = modules.get(module_name)
        if module is None:
            continue
        for target_name, mask in targets.items():
            param = getattr(module, target_name, None)
            if isinstance(param, torch.Tensor) and param.shape == mask.shape:
                param.mul_(mask.to(param.dtype))


def _batch_two(dummy_input):  # type: ignore[no-untyped-def]
    if isinstance(dummy_input, torch.Tensor) and dummy_input.ndim > 0 and dummy_input.shape[0] == 1:
        _once("batch1", "ModelSpeedup: repeating a batch-1 dummy input to batch 2 (NNI's shape propagation needs >= 2)")
        return dummy_input.repeat(2, *([1] * (dummy_input.ndim - 1)))
    return dummy_input


def patch_model_speedup() -> None:
    from nni.compression.speedup import model_speedup

    cls = model_speedup.ModelSpeedup
    if getattr(cls.__init__, "_classaware_patched", False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, model, dummy_input, masks_or_file=None, *args, graph_module=None, **kwargs):  # type: ignore[no-untyped-def]
        dummy_input = _batch_two(dummy_input)
        if graph_module is None and _torch_at_least(2, 2):
            # NNI's concrete_trace patches torch globally while it runs and fails part-way on torch >= 2.2,
            # so it is not attempted there: torch.fx.symbolic_trace serves torchvision CNNs.
            _once("trace", "ModelSpeedup on torch %s: tracing with torch.fx.symbolic_trace instead of NNI's "
                  "concrete_trace (broken since torch 2.2)", torch.__version__)
            try:
                graph_module = torch.fx.symbolic_trace(model)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(
                    f"torch.fx.symbolic_trace could not trace {type(model).__name__} ({e}); trace it yourself and "
                    "pass ModelSpeedup(..., graph_module=...)."
                ) from e
        if isinstance(masks_or_file, dict):
            # NNI keeps the weights of a masked element inside a channel it keeps (residual unions, unstructured
            # masks), so the sped-up model would disagree with the masked one: bake the masks in first.
            bake_masks(model, masks_or_file)
        with silenced():
            original(self, model, dummy_input, masks_or_file, *args, graph_module=graph_module, **kwargs)

    __init__._classaware_patched = True  # type: ignore[attr-defined]
    cls.__init__ = __init__

    original_speedup = cls.speedup_model

    @functools.wraps(original_speedup)
    def speedup_model(self):  # type: ignore[no-untyped-def]
        # NNI leaves the modules it replaces in train mode whatever the model's mode was: BatchNorm then uses
        # batch statistics and the sped-up model disagrees with the masked one. Restore each module's mode.
        modes = {name: m.training for name, m in self.bound_model.named_modules()}
        with silenced():
            out = original_speedup(self)
        model = out if isinstance(out, torch.nn.Module) else self.bound_model
        top = modes.get("", model.training)
        for name, m in model.named_modules():
            m.training = modes.get(name, top)
        quiet_nni_loggers()
        return out

    cls.speedup_model = speedup_model

    from nni.compression.speedup import replacement

    replacement.replace_module.setdefault("Identity", replacement.no_replace)


def apply() -> None:
    """Idempotent: quiet import, then the ModelSpeedup fix."""
    global _PATCHED
    if _PATCHED:
        return
    import_nni_quietly()
    patch_model_speedup()
    _PATCHED = True
