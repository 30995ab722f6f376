"""classaware-plugin: class-dependent pruning for Torch-Pruning and NNI.

The core is always importable. ``ClassAwareImportance`` (needs torch-pruning) and ``ClassAwarePruner``
(needs nni) are imported lazily, so either framework is optional for users of the other.
"""
from __future__ import annotations

from typing import Any

from .core import *  # noqa: F403
from .core import __all__ as _core_all

__version__ = "0.1.0"

_LAZY = {
    "ClassAwareImportance": "classaware_plugin.torch_pruning",
    "ClassAwarePruningMethod": "classaware_plugin.unstructured",
    "ClassAwarePruner": "classaware_plugin.nni",
}

__all__ = [*_core_all, *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'classaware_plugin' has no attribute {name!r}")
