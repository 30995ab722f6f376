"""NNI adapter. ``import classaware_plugin.nni`` makes NNI 3.0 work on current torch (see ``_compat``),
silences its import noise, and provides ``ClassAwarePruner``, the pruner registry and config-file loading.
Importing it needs ``nni``; the rest of the package does not."""
from __future__ import annotations

try:
    import nni as _nni  # noqa: F401
except ImportError as _e:
    raise ImportError(f"classaware_plugin.nni needs NNI ({_e}): pip install 'classaware-plugin[nni]'") from _e

from ._compat import apply as _apply, bake_masks  # noqa: E402

_apply()

from .config import normalize_keys, prepare_config_list, validate_config_list  # noqa: E402
from .io import load_masks, save_masks, speedup  # noqa: E402
from .pruner import ClassAwarePruner, plain_masks  # noqa: E402
from .registry import (  # noqa: E402
    available_pruners, get_pruner_class, load_config_file, pruner_from_config, register_pruner,
)

__all__ = [
    "ClassAwarePruner", "available_pruners", "bake_masks", "get_pruner_class", "load_config_file", "load_masks",
    "normalize_keys",
    "plain_masks", "prepare_config_list", "pruner_from_config", "register_pruner", "save_masks", "speedup",
    "validate_config_list",
]
