"""Torch-Pruning adapter: ``ClassAwareImportance``, FN-constrained iterative pruning, unstructured pruning.

Importing this module needs ``torch-pruning``; the rest of the package does not.
"""
from __future__ import annotations

from .importance import ClassAwareImportance
from .io import load_pruned_state, save_pruned_state
from .iterative import (
    RoundingMetaPruner, TorchPruningBackend, accumulate_gradients, count_params_macs, prune_with_fn_constraint,
)
from .unstructured import (
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
