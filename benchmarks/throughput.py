"""Samples per second of the statistics pass and of fine-tuning with 1, 2, ... processes (torch.distributed).

``python -m benchmarks throughput [--nproc 1 2] [--models resnet8 resnet18] [--device auto]`` starts, for every
process count, ``torch.distributed.run --standalone --nproc-per-node N -m benchmarks.throughput --worker ...``: each
process takes its share of the same data (:func:`classaware_plugin.core.distributed.shard_loader`: per-process batch
64 / N, global batch 64) and measures, after one warm-up pass:

- the statistics pass: ``ChannelFisher.collect`` over 16 global batches (4 for ResNet-18; the sums all-reduced at
  the end);
- fine-tuning: one epoch of ``train`` (DistributedDataParallel when N > 1) over 32 global batches (4 for ResNet-18).

Samples per second = global samples / the slowest rank's time. On the CPU every process gets ``cores // N``
threads, so a process count never buys more cores than the machine has; on a machine with GPUs (``--device auto``
picks CUDA) each process takes one GPU and the same command measures the multi-GPU scaling. The inputs are random
tensors of the model's input size (throughput does not depend on pixel values). Written to
``results/throughput.json`` and ``results/throughput.md`` (run it alone on the machine).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

log = logging.getLogger("benchmarks")
MODELS = {  # name -> (architecture, input, kwargs, statistics batches, training batches); fewer for the slow model
    "resnet8": ("cifar_resnet", (1, 28, 28), {"depth": 8, "width": 32}, 16, 32),
    "resnet18": ("resnet18", (3, 64, 64), {}, 4, 4),
}
BATCH = 64


def _loaders(shape: tuple[int, ...], stat_batches: int, train_batches: int,
             seed: int = 0) -> tuple[DataLoader, DataLoader]:
    from classaware_plugin.core.distributed import shard_loader

    g = torch.Generator().manual_seed(seed)
    n = BATCH * max(stat_batches, train_batches)
    ds = TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    stats = DataLoader(TensorDataset(*ds[: BATCH * stat_batches]), batch_size=BATCH)
    train = DataLoader(TensorDataset(*ds[: BATCH * train_batches]), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    return shard_loader(stats), shard_loader(train, train=True)


def _slowest(seconds: float) -> float:
    """The longest of the ranks' times (every rank passes its own)."""
    from classaware_plugin.core.distributed import all_gather_objects

    return float(max(all_gather_objects(seconds)))


def worker(models: list[str], device_spec: str, out: Path) -> None:
    """One process of a measurement (started by torchrun)."""
    import torch.distributed as dist

    from classaware_plugin.core import ClassDependentLoss, train
    from classaware_plugin.core.channels import ChannelFisher
    from classaware_plugin.core.distributed import barrier, init_from_env, is_main, resolve_device, world_size
    from classaware_plugin.models import build_model

    device = resolve_device(device_spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        init_from_env(device)
    rows = []
    for name in models:
        arch, shape, kw, stat_batches, train_batches = MODELS[name]
        torch.manual_seed(0)
        model = build_model(arch, 10, shape, **kw).to(device)
        stats_dl, train_dl = _loaders(shape, stat_batches, train_batches)
        loss = ClassDependentLoss([3], class_counts=[100] * 10, rank_weight=1.0)
        row: dict[str, Any] = {"model": name, "input": list(shape), "processes": world_size(), "device": device.type,
                               "threads": torch.get_num_threads(), "global_batch": BATCH}
        for what, run, samples in (
            ("statistics", lambda: ChannelFisher([3], 10).collect(model, stats_dl), BATCH * stat_batches),
            ("finetuning", lambda: train(model, train_dl, loss, epochs=1, lr=1e-4, progress=False),
             BATCH * train_batches),
        ):
            run()  # warm-up
            barrier()
            t = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = _slowest(time.perf_counter() - t)
            row[f"{what}_samples_per_s"] = samples / seconds
            row[f"{what}_s"] = seconds
        rows.append(row)
    if is_main():
        out.write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def run(out_dir: Path, nprocs: tuple[int, ...], models: tuple[str, ...], device: str = "auto") -> list[dict[str, Any]]:
    """Measure every process count (each in fresh processes) and write the table."""
    from classaware_plugin.export import atomic_write_text

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in nprocs:
            result = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   "-m", "benchmarks.throughput", "--worker", "--device", device, "--result", str(result),
                   "--models", *models]
            log.info("throughput with %d process(es): %s", n, " ".join(cmd[2:]))
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            rows += json.loads(result.read_text())
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["processes"] == min(nprocs))
        for what in ("statistics", "finetuning"):
            r[f"{what}_scaling"] = r[f"{what}_samples_per_s"] / base[f"{what}_samples_per_s"]
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "throughput.json", json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=1))
    atomic_write_text(out_dir / "throughput.md", table(rows, os.cpu_count()))
    return rows


def table(rows: list[dict[str, Any]], cores: int | None) -> str:
    out = [f"Samples per second, global batch {BATCH}, {cores} CPU cores on this machine "
           "(`python -m benchmarks throughput`; scaling = against the fewest processes measured).", "",
           "| model | input | processes | device | threads each | statistics pass samples/s (scaling) | "
           "fine-tuning samples/s (scaling) |", "|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['processes']} | {r['device']} | "
                   f"{r['threads']} | {r['statistics_samples_per_s']:.0f} ({r['statistics_scaling']:.2f}x) | "
                   f"{r['finetuning_samples_per_s']:.0f} ({r['finetuning_scaling']:.2f}x) |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    worker(a.models, a.device, a.result)
