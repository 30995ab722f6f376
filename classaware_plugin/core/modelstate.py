"""Exact snapshots of a model whose structure may change (structural pruning), restored in place; what a model
tells about itself."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


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
    """The model's output width, from one forward of two samples of the first batch (on the model's device)."""
    x = next(iter(batches))[0]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2].to(next(model.parameters()).device))
    finally:
        model.train(was)
    return int(out.shape[1])
