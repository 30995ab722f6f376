"""Masks on disk (loadable with torch.load's default weights_only=True) and one-call speed-up."""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..export import atomic_save
from ..files import CheckpointError, load_object


def save_masks(masks: dict[str, dict[str, torch.Tensor]], path: str | os.PathLike[str]) -> None:
    """Plain nested dicts of tensors, written atomically."""
    atomic_save({m: {t: v.detach().cpu().clone() for t, v in d.items()} for m, d in masks.items()}, path)


def load_masks(path: str | os.PathLike[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Masks written by :func:`save_masks` (weights only; a file holding anything else is refused by name)."""
    masks = load_object(path, what="masks file")
    if not (isinstance(masks, dict) and all(
            isinstance(m, str) and isinstance(d, dict) and all(isinstance(v, torch.Tensor) for v in d.values())
            for m, d in masks.items())):
        raise CheckpointError(
            f"The masks file {str(path)!r} does not hold masks ({{module name: {{target: tensor}}}}, as save_masks "
            f"writes); it holds a {type(masks).__name__}."
        )
    return masks


def speedup(model: nn.Module, dummy_input: torch.Tensor, masks: dict[str, dict[str, Any]]) -> nn.Module:
    """NNI's ModelSpeedup with this package's fixes (which bake ``masks`` into the weights first) removes the
    pruned channels, in eval mode. Element-wise masks stay as zeros in the weights (NNI cannot shrink them)."""
    from nni.compression.speedup import ModelSpeedup

    was = model.training
    model.eval()
    ModelSpeedup(model, dummy_input, masks).speedup_model()
    model.train(was)
    return model
