"""Build a pruning backend by name, as timm's ``create_model``: the one place that knows which framework each
backend needs, and what to install when it is missing.

    >>> backend = create_backend("torch-pruning", model, score="fisher", important_classes=[3], num_classes=10,
    ...                          example_inputs=torch.zeros(2, 3, 32, 32), val_loader=val, calib_loader=calib,
    ...                          finetune=my_finetune)                                   # doctest: +SKIP
    >>> FNConstrainedPruning(backend, FNConstraint([3]), target=2.0).run()               # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from .core.validation import ClassAwareError, check_choice
from .core.backend import PruningBackend
from .core.scores import make_score, score_class
from .measure import count_params_macs

BackendName = Literal["torch-pruning", "nni", "unstructured"]
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
FRAMEWORKS: dict[str, tuple[str, str]] = {
    "torch-pruning": ("torch_pruning", "pip install torch-pruning"),
    "nni": ("nni", "pip install 'classaware-plugin[nni]'"),
}
"""backend -> (the module it imports, how to install it). The unstructured backend is plain PyTorch."""


def require_framework(backend: str) -> None:
    """Raise a :class:`ClassAwareError` naming what to install when ``backend``'s framework cannot be imported."""
    if backend not in FRAMEWORKS:
        return
    module, install = FRAMEWORKS[backend]
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ClassAwareError(
            f"The {backend} backend needs the '{module}' package, which cannot be imported ({e}). Install it: {install}"
        ) from None


def create_backend(
    name: BackendName,
    model: nn.Module,
    *,
    score: str,
    important_classes: Sequence[int],
    num_classes: int,
    val_loader: Iterable[Any],
    calib_loader: Iterable[Any] | None,
    finetune: Callable[[nn.Module], None] | None,
    example_inputs: torch.Tensor,
    score_options: Mapping[str, Any] | None = None,
    calib_batches: int | None = 8,
    round_to: int | None = None,
    latency_probe: Callable[[nn.Module], float] | None = None,
    rewind_model: Callable[[], nn.Module] | None = None,
    cert_loader: Iterable[Any] | None = None,
    allocation: Mapping[str, float] | None = None,
    global_pruning: bool = False,
) -> PruningBackend:
    """A backend for :class:`~classaware_plugin.core.FNConstrainedPruning` that prunes ``model`` in place.

    ``"torch-pruning"`` and ``"nni"`` remove channels (every prunable layer; the classifier is kept), scored by
    ``score`` (:func:`~classaware_plugin.core.make_score` names and ``score_options``), ``round_to`` channels at a
    time; ``"unstructured"`` zeroes single weights with ``torch.nn.utils.prune``. ``rewind_model()`` gives the
    initial weights for scores that need them (``needs_rewind``, e.g. ``magnitude_increase``). ``cert_loader``: the
    certified rule's held-out split (:class:`~classaware_plugin.core.FNGuarantee`). ``allocation`` (structured: unit ->
    kept fraction, from :func:`width_search`) makes every step move each unit towards its width; ``global_pruning``
    (Torch-Pruning) ranks channels across layers instead of taking the same fraction of each.
    """
    check_choice("backend", name, BACKENDS)
    require_framework(name)
    options = dict(score_options or {})
    needs_rewind = score_class(score).needs_rewind
    if needs_rewind and rewind_model is None:
        raise ClassAwareError(f"The score {score!r} needs the initial weights: pass rewind_model=.")
    if name == "unstructured" and (allocation is not None or global_pruning):
        raise ClassAwareError("Per-layer widths (allocation, global pruning) are for structured pruning; unstructured "
                              "pruning ranks single weights globally.")
    if name == "nni" and global_pruning:
        raise ClassAwareError("Global pruning is offered with the torch-pruning backend; with nni use a searched "
                              "allocation or the uniform one.")
    if name == "unstructured":
        from .unstructured import UnstructuredBackend

        s = make_score(score, important_classes=important_classes, num_classes=num_classes, **options)
        if needs_rewind:
            s.set_rewind_point(rewind_model())  # type: ignore[misc]
        return UnstructuredBackend(model, s, val_loader, important_classes, calib_loader, finetune,
                                   calib_batches=calib_batches, macs=count_params_macs(model, example_inputs)[1],
                                   cert_loader=cert_loader)
    if name == "nni":
        if needs_rewind:
            raise ClassAwareError(f"The score {score!r} is not available with the nni backend; use fisher.")
        from .nni.iterative import NNIBackend

        return NNIBackend(model, example_inputs, val_loader, important_classes, calib_loader, finetune,  # type: ignore[arg-type]
                          pruner_kwargs={"score": score, "round_to": round_to, **options}, calib_batches=calib_batches,
                          latency_probe=latency_probe, cert_loader=cert_loader, allocation=allocation)
    from .torch_pruning import ClassAwareImportance, TorchPruningBackend

    imp = ClassAwareImportance(important_classes, score=score, num_classes=num_classes, **options)
    if needs_rewind:
        imp.set_rewind_point(rewind_model())  # type: ignore[misc]
    return TorchPruningBackend(model, example_inputs, imp, val_loader, important_classes, calib_loader=calib_loader,
                               finetune=finetune, calib_batches=calib_batches, round_to=round_to,
                               latency_probe=latency_probe, cert_loader=cert_loader, allocation=allocation,
                               global_pruning=global_pruning)


def width_search(name: BackendName, model: nn.Module, example_inputs: torch.Tensor, target: float,
                 objective: Callable[[nn.Module], float], adapt_loader: Iterable[Any] | None, adapt_batches: int = 50,
                 round_to: int | None = None, **search_kwargs: Any) -> Any:
    """The width search (:class:`~classaware_plugin.core.allocation.WidthSearch`, not yet run) with the framework of
    backend ``name``: its units, candidates pruned from copies by magnitude (Torch-Pruning) or L1 norm (NNI)."""
    check_choice("backend", name, ("torch-pruning", "nni"))
    require_framework(name)
    if name == "nni":
        from .nni.allocation import width_search as nni_search

        return nni_search(model, example_inputs, target, objective, adapt_loader, adapt_batches, **search_kwargs)
    from .torch_pruning.allocation import width_search as tp_search

    return tp_search(model, example_inputs, target, objective, adapt_loader, adapt_batches, round_to=round_to,
                     **search_kwargs)
