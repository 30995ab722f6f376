"""Torch-Pruning adapter: ``ClassAwareImportance`` and FN-constrained iterative structured pruning.

Importing this module needs ``torch-pruning``; the rest of the package does not. The unstructured helpers
(``torch.nn.utils.prune``, plain PyTorch) live in :mod:`classaware_plugin.unstructured` and are re-exported here.
"""
from __future__ import annotations

try:
    import torch_pruning as _tp  # noqa: F401
except ImportError as _e:
    raise ImportError(f"classaware_plugin.torch_pruning needs Torch-Pruning ({_e}): pip install torch-pruning") from _e

from .importance import ClassAwareImportance  # noqa: E402
from .io import load_pruned_state, save_pruned_state
from .iterative import (
    RoundingMetaPruner, TorchPruningBackend, accumulate_gradients, prune_with_fn_constraint,
)
from ..measure import count_params_macs
from ..unstructured import (
    ClassAwarePruningMethod,
    class_aware_importance_scores,
    class_aware_unstructured,
    global_class_aware_unstructured,
    make_permanent,
    masks_of,
    sparsity,
)

__all__ = [
    "ClassAwareImportance", "ClassAwarePruningMethod", "RoundingMetaPruner", "TorchPruningBackend", "accumulate_gradients",
    "class_aware_importance_scores", "class_aware_unstructured", "count_params_macs",
    "global_class_aware_unstructured", "load_pruned_state", "make_permanent", "masks_of", "prune_with_fn_constraint", "save_pruned_state", "sparsity",
]
