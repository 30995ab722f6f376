"""Do pruned models run faster where they are deployed? Dense against TP-pruned models at 2x and 3x fewer MACs, with
channel counts left as they fall (``round_to=None``) or rounded to multiples of 4, 8 or 16, in PyTorch and in
onnxruntime, at batch 1 and 64, each pair measured interleaved (:func:`classaware_plugin.speed.speedup`).

Pruning here is the TP backend's RoundingMetaPruner (TP's MetaPruner, kept counts rounded to the nearest multiple),
local, with TP's magnitude importance (which channels go does not change
the speed, only how many); the pruning ratio is found by bisection so that the MACs reduction is as close as it
gets to the target from above. Written to ``results/speed.json`` and ``results/speed.md``; resumable (finished
rows are kept).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
import torchvision
from torch import nn

from classaware_plugin.export import atomic_write_text
from classaware_plugin.models import build_model
from classaware_plugin.speed import speedup
from classaware_plugin.torch_pruning import RoundingMetaPruner, count_params_macs

log = logging.getLogger("benchmarks")

MODELS: dict[str, tuple[Any, tuple[int, int, int]]] = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64)),
    # the benchmark suites' ResNet-8 (stages of 16/32/64 channels) and the one classaware-prune builds by default
    # (cli/default.yaml: width 32, stages of 32/64/128)
    "resnet8": (lambda: build_model("cifar_resnet", 10, (1, 28, 28), depth=8, width=16), (1, 28, 28)),
    "resnet8_w32": (lambda: build_model("cifar_resnet", 10, (1, 28, 28), depth=8, width=32), (1, 28, 28)),
}
TARGETS = (2.0, 3.0)
ROUND_TO = (None, 4, 8, 16)
BATCHES = (1, 64)


def prune_to(model: nn.Module, shape: tuple[int, ...], target: float, round_to: int | None) -> tuple[nn.Module, float]:
    """A copy of ``model`` pruned (one TP step, uniform local ratio) to the smallest MACs reduction >= ``target``."""
    example = torch.zeros(1, *shape)
    dense_macs = count_params_macs(model, example)[1]
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    def pruned(ratio: float) -> tuple[nn.Module, float]:
        m = copy.deepcopy(model)
        RoundingMetaPruner(m, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                             ignored_layers=[head], round_to=round_to).step()
        return m, dense_macs / count_params_macs(m, example)[1]

    lo, hi = 0.0, 0.95
    best = pruned(hi)
    for _ in range(14):
        mid = (lo + hi) / 2
        m, r = pruned(mid)
        if r >= target:
            hi, best = mid, (m, r)
        else:
            lo = mid
    return best[0].eval(), best[1]


def run(out: Path, models: tuple[str, ...] = tuple(MODELS), repeats: int = 15) -> list[dict[str, Any]]:
    path = out / "speed.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["model"], r["target"], r["round_to"]) for r in rows}
    for name in models:
        build, shape = MODELS[name]
        torch.manual_seed(0)
        dense = build().eval()
        for target in TARGETS:
            for rt in ROUND_TO:
                if (name, target, rt) in done:
                    continue
                model, reached = prune_to(dense, shape, target, rt)
                row: dict[str, Any] = {"model": name, "input": list(shape), "target": target, "round_to": rt,
                                       "macs_reduction": reached, "threads": torch.get_num_threads()}
                for b in BATCHES:
                    for runtime, v in speedup(dense, model, shape, batch_size=b, repeats=repeats).items():
                        row[f"{runtime}_b{b}"] = v
                log.info("%s %.0fx round_to=%s: MACs %.2fx, onnxruntime b64 %.2fx, torch b64 %.2fx", name, target, rt,
                         reached, row["onnxruntime_b64"]["speedup"], row["torch_b64"]["speedup"])
                rows.append(row)
                atomic_write_text(path, json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    atomic_write_text(out / "speed.md", table(rows))
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Speed of pruned models (this machine: 2 cores, CPU)",
        "",
        "Speed-up = dense latency / pruned latency (median of interleaved repeats); efficiency = onnxruntime batch-64",
        "speed-up / MACs reduction. `python -m benchmarks speed` (benchmarks/speed.py).",
        "",
        "| model | target | round_to | MACs reduction | onnxruntime b64 | onnxruntime b1 | torch b64 | torch b1 | efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} {'x'.join(map(str, r['input'][1:]))} | {r['target']:.0f}x | {r['round_to'] or '-'} | "
            f"{r['macs_reduction']:.2f}x | {r['onnxruntime_b64']['speedup']:.2f}x | {r['onnxruntime_b1']['speedup']:.2f}x | "
            f"{r['torch_b64']['speedup']:.2f}x | {r['torch_b1']['speedup']:.2f}x | "
            f"{r['onnxruntime_b64']['speedup'] / r['macs_reduction']:.2f} |"
        )
    return "\n".join(lines) + "\n"
