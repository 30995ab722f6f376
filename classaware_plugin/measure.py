"""Counting what a model costs: parameters and MACs, in one place for every backend and the job.

MACs are counted by ``torch_pruning.utils.count_ops_and_params`` (Torch-Pruning is a base dependency: the CLI's
default backend); the library is imported on the first count, so importing this module loads no framework.
"""
from __future__ import annotations

import torch
from torch import nn


def count_params_macs(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(parameters, MACs) of one forward pass on ``example_inputs`` (moved to the model's device), by
    ``torch_pruning.utils.count_ops_and_params``."""
    from torch_pruning.utils import count_ops_and_params

    from .core.distributed import model_device

    macs, params = count_ops_and_params(model, example_inputs.to(model_device(model)))
    return int(params), int(macs)
