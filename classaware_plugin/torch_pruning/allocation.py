"""Per-layer widths for Torch-Pruning: the units of a model, an allocation as a ``pruning_ratio_dict``, and the width
search (:class:`~classaware_plugin.core.allocation.WidthSearch`) driven by Torch-Pruning.

    >>> units = prunable_units(model, example_inputs, ignored_layers=[model.fc])                 # doctest: +SKIP
    >>> result = search_widths(model, example_inputs, target=3.0, objective=objective,
    ...                        adapt_loader=train_loader, ignored_layers=[model.fc])             # doctest: +SKIP
    >>> pruner = tp.pruner.MetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.0,
    ...     pruning_ratio_dict=ratio_dict(model, result.best.allocation), ignored_layers=[model.fc])  # doctest: +SKIP
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..core.allocation import Allocation, SearchResult, Unit, WidthSearch
from ..core.calibration import last_linear
from ..core.training import recalibrate_batchnorm
from ..core.validation import ClassAwareError
from ..measure import count_params_macs
from ..speed import ROUND_TO
from .iterative import RoundingMetaPruner

ROOTS = (nn.Conv2d, nn.Linear)


def prunable_units(model: nn.Module, example_inputs: torch.Tensor,
                   ignored_layers: Sequence[nn.Module] | None = None) -> list[Unit]:
    """The groups Torch-Pruning would prune (rooted at a convolution or linear layer; the classifier and
    ``ignored_layers`` excluded), each with its width and the layers whose output channels it removes."""
    ignored = list(ignored_layers) if ignored_layers is not None else [last_linear(model)]
    graph = tp.DependencyGraph().build_dependency(model, example_inputs)
    names = {m: n for n, m in model.named_modules()}
    outs = (tp.pruner.function.prune_conv_out_channels, tp.pruner.function.prune_linear_out_channels,
            tp.pruner.function.prune_depthwise_conv_out_channels)
    units = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(ROOTS)):
        root = group[0].dep.target.module
        members = [names[d.target.module] for d, _ in group if d.handler in outs and d.target.module in names]
        units.append(Unit(names[root], int(graph.get_out_channels(root)), tuple(dict.fromkeys(members))))
    if not units:
        raise ClassAwareError("Nothing to prune: every layer Torch-Pruning could prune is ignored.")
    return units


def ratio_dict(model: nn.Module, allocation: Allocation) -> dict[nn.Module, float]:
    """An allocation (unit name -> kept fraction) as Torch-Pruning's ``pruning_ratio_dict`` (module -> pruned
    fraction) for ``model``."""
    modules = dict(model.named_modules())
    unknown = sorted(set(allocation) - set(modules))
    if unknown:
        raise ClassAwareError(f"The allocation names layers the model does not have: {unknown[:5]}.")
    return {modules[name]: float(1.0 - keep) for name, keep in allocation.items()}


def prune_to_allocation(model: nn.Module, example_inputs: torch.Tensor, allocation: Allocation,
                        importance: Any = None, ignored_layers: Sequence[nn.Module] | None = None,
                        round_to: int | None = ROUND_TO) -> nn.Module:
    """Prune ``model`` in place so that every unit keeps about its fraction of ``allocation`` (channels chosen by
    ``importance``; default Torch-Pruning's L2 magnitude, which needs no data); returns it."""
    ignored = list(ignored_layers) if ignored_layers is not None else [last_linear(model)]
    imp = importance if importance is not None else tp.importance.GroupMagnitudeImportance(p=2)
    RoundingMetaPruner(model, example_inputs, importance=imp, pruning_ratio=0.0,
                       pruning_ratio_dict=ratio_dict(model, allocation), ignored_layers=ignored,
                       round_to=round_to).step()
    return model


def width_search(model: nn.Module, example_inputs: torch.Tensor, target: float, objective: Callable[[nn.Module], float],
                 adapt_loader: Iterable[Any] | None = None, adapt_batches: int = 50,
                 ignored_layers: Sequence[nn.Module] | None = None, round_to: int | None = ROUND_TO,
                 **search_kwargs: Any) -> WidthSearch:
    """The width search on ``model`` (left as it is) for ``target``x fewer MACs, ready to ``run()`` (or to
    ``load_state_dict`` a saved one first): candidates pruned from copies by magnitude, BatchNorm statistics
    re-estimated on the first ``adapt_batches`` batches of ``adapt_loader``, the same for every candidate (adaptive
    BN), judged by ``objective`` (e.g.
    :func:`~classaware_plugin.core.allocation.important_class_objective` on the selection split). ``search_kwargs``
    go to :class:`~classaware_plugin.core.allocation.WidthSearch`."""
    units = prunable_units(model, example_inputs, ignored_layers)
    names = {m: n for n, m in model.named_modules()}
    ignored_names = [names[m] for m in (ignored_layers if ignored_layers is not None else [last_linear(model)])]
    dense_macs = count_params_macs(model, example_inputs)[1]

    def prune(allocation: Allocation) -> nn.Module:
        clone = copy.deepcopy(model)
        modules = dict(clone.named_modules())
        return prune_to_allocation(clone, example_inputs, allocation, ignored_layers=[modules[n] for n in ignored_names],
                                   round_to=round_to)

    def reduction(pruned: nn.Module) -> float:
        return dense_macs / max(count_params_macs(pruned, example_inputs)[1], 1)

    # every candidate's BatchNorm statistics come from the same batches: a fair comparison, and a resumed search
    # re-estimates them exactly as an uninterrupted one
    batches = list(itertools.islice(adapt_loader, adapt_batches)) if adapt_loader is not None else []

    def adapt(pruned: nn.Module) -> None:
        if batches:
            recalibrate_batchnorm(pruned, batches, len(batches))

    return WidthSearch(units, prune, reduction, objective, adapt, target, **search_kwargs)


def search_widths(model: nn.Module, example_inputs: torch.Tensor, target: float, objective: Callable[[nn.Module], float],
                  **kwargs: Any) -> SearchResult:
    """:func:`width_search`, run: the best allocation and every candidate."""
    return width_search(model, example_inputs, target, objective, **kwargs).run()
