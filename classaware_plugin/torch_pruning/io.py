"""Torch-Pruning's own save path: ``tp.state_dict`` (weights *and* the pruned module attributes such as channel
counts) loaded into a freshly built, unpruned model of the same architecture in another process.

``tp.state_dict`` holds module ``__dict__`` copies; they are read with ``weights_only=True`` and the module classes of
PyTorch, torchvision and this package (:mod:`classaware_plugin.files`); anything else needs ``trusted=True``.
(The whole-module path is ``classaware_plugin.export.save_model`` / ``load_model``.)
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch_pruning as tp
from torch import nn

from ..export import atomic_save
from ..files import CheckpointError, load_object


def save_pruned_state(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``tp.state_dict(model)`` atomically."""
    atomic_save(tp.state_dict(model), path)


def load_pruned_state(build: Callable[[], nn.Module] | nn.Module, path: str | os.PathLike[str], *,
                      trusted: bool = False, allow_modules: Iterable[str] = ()) -> nn.Module:
    """Build the dense architecture (``build()`` or a given instance) and load the pruned state into it."""
    state = load_object(path, what="Torch-Pruning state", trusted=trusted, allow_modules=allow_modules)
    if not (isinstance(state, dict) and "full_state_dict" in state and "attributions" in state):
        raise CheckpointError(
            f"The Torch-Pruning state {str(path)!r} does not hold tp.state_dict's 'full_state_dict' and 'attributions'"
            " (write it with save_pruned_state). A plain state_dict or whole module loads with classaware_plugin.files."
        )
    model = build() if callable(build) and not isinstance(build, nn.Module) else build
    try:
        tp.load_state_dict(model, state_dict=state)
    except (KeyError, RuntimeError, AttributeError) as e:
        raise CheckpointError(
            f"The Torch-Pruning state {str(path)!r} does not fit the model {type(model).__name__} "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); build the architecture it was pruned from."
        ) from None
    return model.eval()
