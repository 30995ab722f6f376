"""Cost of one scoring pass: ClassAwareImportance (default Fisher score) against Torch-Pruning's GroupTaylorImportance.

Both score every group of the same model on the same calibration batches, in one process, interleaved, repeated;
the median of each is kept. TP's pass is what a TP user runs: ``loss.backward()`` on every batch (gradients
accumulated), then the estimator on every group. Ours: one forward and one backward per batch (activation gradients
of the channel gates only), then the estimator on every group. Written to ``results/scoring.json`` with
``ratio_to_tp_taylor`` (ours / TP) per model.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
import torchvision
from torch import nn

from classaware_plugin.export import atomic_write_text
from classaware_plugin.torch_pruning import ClassAwareImportance, accumulate_gradients

log = logging.getLogger("benchmarks")
MODELS = ("resnet18", "mobilenet_v2", "resnet50")


def _groups(model: nn.Module, example: torch.Tensor) -> list[Any]:
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    return list(DG.get_all_groups(ignored_layers=[head], root_module_types=[nn.Conv2d, nn.Linear]))


def _ours(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], groups: list[Any]) -> float:
    t = time.perf_counter()
    imp = ClassAwareImportance(important_classes=[3], num_classes=10).collect(model, batches)
    for g in groups:
        imp(g)
    return time.perf_counter() - t


def _tp_taylor(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], groups: list[Any]) -> float:
    t = time.perf_counter()
    imp = tp.importance.GroupTaylorImportance()
    accumulate_gradients(model, batches)
    for g in groups:
        imp(g)
    elapsed = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    return elapsed


def measure(name: str, batch_size: int = 64, size: int = 64, batches: int = 2, repeats: int = 5) -> dict[str, Any]:
    """Median seconds of one scoring pass of each estimator on ``batches`` batches of ``batch_size`` images."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).eval()
    data = [(torch.randn(batch_size, 3, size, size), torch.randint(0, 10, (batch_size,))) for _ in range(batches)]
    groups = _groups(model, data[0][0][:1])
    _ours(model, data[:1], groups), _tp_taylor(model, data[:1], groups)  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):  # interleaved, so load on the machine affects both alike
        ours.append(_ours(model, data, groups))
        theirs.append(_tp_taylor(model, data, groups))
    o, t = statistics.median(ours), statistics.median(theirs)
    return {"model": name, "batch_size": batch_size, "input": [3, size, size], "batches": batches, "repeats": repeats,
            "groups": len(groups), "ours_seconds": o, "tp_taylor_seconds": t, "ratio_to_tp_taylor": o / t,
            "ours_all": ours, "tp_taylor_all": theirs, "threads": torch.get_num_threads()}


def run(out: Path, models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    rows = []
    for name in models:
        row = measure(name)
        log.info("%s: ours %.2f s, TP Taylor %.2f s, ratio %.3f", name, row["ours_seconds"], row["tp_taylor_seconds"],
                 row["ratio_to_tp_taylor"])
        rows.append(row)
    result = {"torch": torch.__version__, "torch_pruning": getattr(tp, "__version__", "?"), "rows": rows}
    atomic_write_text(out / "scoring.json", json.dumps(result, indent=1))
    return result
