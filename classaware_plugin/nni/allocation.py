"""Per-layer widths for NNI: an allocation of the width search as a per-module ``config_list``.

Units are the layers NNI prunes together: each set of convolutions whose outputs are summed (residual groups, found
by :func:`~classaware_plugin.nni.config.residual_groups`) and every other convolution, the classifier excluded.

    >>> units = prunable_units(model)                                           # doctest: +SKIP
    >>> config_list = config_list_for(units, result.best.allocation)             # doctest: +SKIP
    >>> ClassAwarePruner(model, config_list, important_classes=[3], calib_loader=calib).compress()  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..core.allocation import Unit
from ..core.validation import ClassAwareError, check_number
from .config import residual_groups, trace


def prunable_units(model: nn.Module, ignored: Sequence[str] = ()) -> list[Unit]:
    """The convolution units of ``model`` (a residual group is one unit, named by its first member), with the
    number of filters each has; ``ignored`` names layers to leave alone."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in ignored}
    grouped: set[str] = set()
    units = []
    for group in residual_groups(trace(model)):
        members = sorted(n for n in group if n in convs)
        if members:
            units.append(Unit(members[0], convs[members[0]].out_channels, tuple(members)))
            grouped.update(members)
    units += [Unit(n, m.out_channels, (n,)) for n, m in convs.items()
              if n not in grouped and m.groups == 1]  # depthwise convolutions follow their producer
    if not units:
        raise ClassAwareError("Nothing to prune: the model has no convolution NNI could prune.")
    return units


def config_list_for(units: Sequence[Unit], allocation: Mapping[str, float], progress: float = 1.0) -> list[dict[str, Any]]:
    """NNI's ``config_list`` that takes every unit ``progress`` of the way to its allocated width: one entry per
    unit (``op_names``: its members) with ``sparse_ratio = progress * (1 - keep)``, filters pruned."""
    check_number("progress", progress, low=0.0, high=1.0)
    names = {u.name for u in units}
    unknown = sorted(set(allocation) - names)
    if unknown:
        raise ClassAwareError(f"The allocation names units the model does not have: {unknown[:5]}.")
    out = []
    for u in units:
        ratio = progress * (1.0 - float(allocation.get(u.name, 1.0)))
        if ratio > 0:
            out.append({"op_names": list(u.members or (u.name,)), "sparse_ratio": min(ratio, 0.99),
                        "granularity": "out_channel"})
    return out


def prune_to_allocation(model: nn.Module, example_inputs: Any, units: Sequence[Unit], allocation: Mapping[str, float],
                        progress: float = 1.0) -> nn.Module:
    """Prune ``model`` in place to ``allocation`` (``progress`` of the way) with NNI's L1NormPruner, masks baked and
    the filters removed by ModelSpeedup; returns it."""
    from . import plain_masks, prepare_config_list, speedup
    from .registry import get_pruner_class

    config = config_list_for(units, allocation, progress)
    if not config:
        return model
    model.eval()
    pruner = get_pruner_class("L1NormPruner")(model, prepare_config_list(model, config))
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return speedup(model, example_inputs, plain_masks(masks))


def width_search(model: nn.Module, example_inputs: Any, target: float, objective: Any, adapt_loader: Any = None,
                 adapt_batches: int = 50, **search_kwargs: Any) -> Any:
    """The width search (:class:`~classaware_plugin.core.allocation.WidthSearch`) with NNI, ready to ``run()``:
    candidates pruned from copies by L1 norm and sped up, BatchNorm statistics re-estimated on ``adapt_loader``,
    judged by ``objective``."""
    import copy
    import itertools

    from ..core.allocation import WidthSearch
    from ..core.training import recalibrate_batchnorm
    from ..measure import count_params_macs

    units = prunable_units(model)
    dense_macs = count_params_macs(model, example_inputs)[1]

    batches = list(itertools.islice(adapt_loader, adapt_batches)) if adapt_loader is not None else []

    def adapt(pruned: nn.Module) -> None:  # the same batches for every candidate (see the Torch-Pruning search)
        if batches:
            recalibrate_batchnorm(pruned, batches, len(batches))

    return WidthSearch(units, lambda a: prune_to_allocation(copy.deepcopy(model), example_inputs, units, a),
                       lambda m: dense_macs / max(count_params_macs(m, example_inputs)[1], 1), objective, adapt, target,
                       **search_kwargs)
