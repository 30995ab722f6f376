"""Torch-Pruning's own save path: ``tp.state_dict`` (weights *and* the pruned module attributes such as channel
counts) loaded into a freshly built, unpruned model of the same architecture in another process.

``tp.state_dict`` holds module ``__dict__`` copies, so loading needs ``torch.load(weights_only=False)``: only load
files you trust. (The whole-module path is ``classaware_plugin.export.save_model`` / ``load_model``.)
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from ..export import atomic_save


def save_pruned_state(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``tp.state_dict(model)`` atomically."""
    atomic_save(tp.state_dict(model), path)


def load_pruned_state(build: Callable[[], nn.Module] | nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Build the dense architecture (``build()`` or a given instance) and load the pruned state into it."""
    model = build() if callable(build) and not isinstance(build, nn.Module) else build
    state = torch.load(path, map_location="cpu", weights_only=False)
    tp.load_state_dict(model, state_dict=state)
    return model.eval()
