"""Exact snapshots of a model whose structure may change (structural pruning), restored in place; what a model
tells about itself."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .distributed import model_device
from .validation import ClassAwareError, check_batch, check_non_empty_loader, run_model


def snapshot_module(model: nn.Module) -> nn.Module:
    """A deep copy: weights, buffers, channel counts and every module attribute."""
    return copy.deepcopy(model)


def restore_module(model: nn.Module, snapshot: nn.Module) -> None:
    """Make ``model`` (the same Python object) exactly ``snapshot`` again, structure included.

    All of a module's state lives in its ``__dict__`` (parameters, buffers, sub-modules, attributes), so
    replacing it with a copy of the snapshot's restores weights and channel counts bit for bit while
    references to ``model`` held by the caller stay valid. The snapshot itself is left untouched.
    """
    fresh = copy.deepcopy(snapshot)
    model.__dict__.clear()
    model.__dict__.update(fresh.__dict__)


def infer_num_classes(model: nn.Module, batches: Iterable[Any]) -> int:
    """The model's output width, from one forward of two samples of the first batch (on the model's device). An empty
    loader, a batch that is not ``(inputs, labels)`` and inputs the model cannot take are refused by name."""
    check_non_empty_loader("loader", batches)
    first = next(iter(batches), None)
    if first is None:
        raise ClassAwareError("The 'loader' parameter must yield at least one batch. Got an empty loader.")
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise ClassAwareError(f"Calibration batch 1 must be (inputs, labels). Got a {type(first).__name__}.")
    check_batch(1, first[0], first[1], what="calibration batch")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = run_model(model, first[0][:2].to(model_device(model)), 1, what="calibration batch")
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ClassAwareError(f"The model must return logits of shape (batch, classes). Got "
                              f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}.")
    return int(out.shape[1])
