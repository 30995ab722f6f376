"""How much of a pruning step's validation result is the luck of its fine-tuning, and what removes it cheaply.

Issue 31, item 4: the certified rule pays for noise between steps (a bound must hold whatever the luck of the last
fine-tuning), so consecutive attempts that land at 95.6%, 87.7% and 94.9% cost compression and retries. Measured here
directly: for each data set the CLI's dense model (its configuration, cached under ``results/cache/noise``), one
pruning step of 20% of the channels (the CLI's backend: Fisher score, channels rounded to 8), then that same pruned
model fine-tuned with 8 seeds under each variant of the CLI's fine-tuning (``pruning.finetune_schedule``,
``pruning.bn_batches``). Per variant: mean and spread over the seeds of the selection split's accuracy and
important-class FN, and the seconds per fine-tuning. Rows in ``noise.json``, a table in ``noise.md``.

    python -m benchmarks noise [--data digits fashion] [--threads 1]
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from classaware_plugin.backends import create_backend
from classaware_plugin.cli.config import load_config, score_config
from classaware_plugin.cli.job import Job, load_data, loaders
from classaware_plugin.core import evaluate
from classaware_plugin.export import atomic_write_text

from .harness import RESULTS

log = logging.getLogger("benchmarks")
CACHE = RESULTS / "cache" / "noise"
DATA = {
    "digits": [],  # the default job
    "fashion": ["data.name=fashion_mnist", "important_classes=[Shirt]", "data.keep_fraction=0.1",
                "data.train_limit=20000"],
}
"""Data set -> ``--set`` overrides of the default configuration."""
VARIANTS = {
    "constant": ["pruning.finetune_schedule=constant", "pruning.bn_batches=0"],
    "cosine": ["pruning.finetune_schedule=cosine", "pruning.bn_batches=0"],
    "constant_bn": ["pruning.finetune_schedule=constant", "pruning.bn_batches=50"],
    "cosine_bn": ["pruning.finetune_schedule=cosine", "pruning.bn_batches=50"],
}
SEEDS = tuple(range(8))


def measure(name: str) -> list[dict[str, Any]]:
    """Every variant and seed of data set ``name`` on one pruned model."""
    rows = []
    base = load_config(None, DATA[name])
    run_dir = CACHE / name
    run_dir.mkdir(parents=True, exist_ok=True)
    job = Job(base, run_dir, progress=False)
    bundle, important = load_data(base)
    dl = loaders(bundle, base)
    dense = job.dense_model(bundle, important, dl)  # cached in run_dir after the first time
    p = base["pruning"]
    pruned = copy.deepcopy(dense)
    backend = create_backend(p["backend"], pruned, score=p["score"], score_options=score_config(p),
                             important_classes=important, num_classes=bundle.num_classes, val_loader=dl["val"],
                             calib_loader=dl["calib"], finetune=None, example_inputs=torch.zeros(2, *bundle.input_shape),
                             calib_batches=p["calib_batches"], round_to=p["round_to"])
    backend.prune(0.2)
    macs = backend.measure()["macs_reduction"]
    c = important[0]
    for variant, sets in VARIANTS.items():
        cfg = load_config(None, DATA[name] + sets)
        for seed in SEEDS:
            model = copy.deepcopy(pruned)
            finetune = Job(cfg, run_dir, progress=False).finetuner(dense, bundle, important, dl, lambda s=seed: 1000 + s)
            t = time.time()
            finetune(model)
            seconds = time.time() - t
            ev = evaluate(model, dl["val"], important, bundle.num_classes)
            rows.append({"data": name, "variant": variant, "seed": seed, "accuracy": ev.accuracy, "fn": ev.fn[c],
                         "positives": ev.support[c], "auc": ev.auc[c], "seconds": seconds, "macs_reduction": macs})
            log.info("%s %s seed %d: accuracy %.4f, FN %d, %.1f s", name, variant, seed, ev.accuracy, ev.fn[c], seconds)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dict.fromkeys(r["data"] for r in rows):
        for variant in VARIANTS:
            rs = [r for r in rows if r["data"] == name and r["variant"] == variant]
            if not rs:
                continue
            acc, fn = np.array([r["accuracy"] for r in rs]), np.array([r["fn"] for r in rs], dtype=float)
            out[f"{name}/{variant}"] = {
                "seeds": len(rs), "positives": rs[0]["positives"], "macs_reduction": rs[0]["macs_reduction"],
                "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=1)),
                "accuracy_range": float(acc.max() - acc.min()), "fn_mean": float(fn.mean()),
                "fn_std": float(fn.std(ddof=1)), "fn_range": float(fn.max() - fn.min()),
                "auc_mean": float(np.mean([r["auc"] for r in rs])),
                "seconds_mean": float(np.mean([r["seconds"] for r in rs]))}
    return out


def table(summary: dict[str, Any]) -> str:
    # (seconds per fine-tuning are in noise.json; the committed run shared the machine, so they are not timings)
    lines = ["| data / fine-tuning | accuracy, mean (std, range) | important FN, mean (std, range) of positives | "
             "AUC |", "|---|---:|---:|---:|"]
    for key, s in summary.items():
        lines.append(f"| {key} | {100 * s['accuracy_mean']:.2f}% ({100 * s['accuracy_std']:.2f}, "
                     f"{100 * s['accuracy_range']:.2f}) | {s['fn_mean']:.1f} ({s['fn_std']:.1f}, {s['fn_range']:.0f}) "
                     f"of {s['positives']} | {s['auc_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def run(out: Path, names: tuple[str, ...]) -> None:
    path = out / "noise.json"
    done = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in done if r["data"] not in names]
    for name in names:
        rows += measure(name)
        summary = summarize(rows)
        atomic_write_text(path, json.dumps({"rows": rows, "summary": summary}, indent=1))
        atomic_write_text(out / "noise.md", table(summary))
