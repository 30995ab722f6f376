"""Wall time of the main job on a real folder of images: ``classaware-prune run`` with default settings on a
10,000-image ImageFolder made from Fashion-MNIST (1,000 PNGs per class from the training split, 28x28), Shirt
important (kept at 20% in training by the default ``keep_fraction``), with the Torch-Pruning and the NNI backends.

Each job runs in its own process, one after the other (time it alone on the machine). Written to
``results/jobtime.json`` and ``results/jobtime.md``; a backend already measured is kept (resumable).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from classaware_plugin.data import FASHION_MNIST_CLASSES, fashion_mnist_arrays
from classaware_plugin.export import atomic_write_text

log = logging.getLogger("benchmarks")
PER_CLASS = 1000
BACKENDS = ("torch-pruning", "nni")


def make_image_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """``root/<class name>/<i>.png``: the first ``per_class`` training images of each class (written once)."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    x, y, _, _ = fashion_mnist_arrays(download=False)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        folder = root / name.replace("/", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.flatnonzero(y == c)[:per_class]):
            Image.fromarray(x[idx]).save(folder / f"{i:05d}.png")
    done.write_text("")
    return root


def _commit() -> str | None:
    """The code measured: the repository's HEAD commit (None outside a git checkout)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
    except OSError:  # no git on the machine
        return None
    return proc.stdout.strip() or None


def run(out: Path, backends: tuple[str, ...] = BACKENDS, nproc: int = 1) -> list[dict[str, Any]]:
    """Time the job per backend (``nproc`` > 1: ``classaware-prune run --nproc``) and add a row; every earlier row is
    kept, and a backend already timed at this commit (with ``nproc`` processes) is not timed again."""
    path = out / "jobtime.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"] if path.exists() else []
    commit = _commit()
    folder = make_image_folder(Path(os.environ.get("CLASSAWARE_DATA", Path.home() / ".cache" / "classaware"))
                               / "fashion_folder_10k")
    for backend in backends:
        if commit and any(r["backend"] == backend and r.get("processes", 1) == nproc and r.get("commit") == commit
                          for r in rows):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            args = ["--set", "data.name=image_folder", "--set", f"data.path={folder}", "--set", "data.image_size=28",
                    "--set", "important_classes=[Shirt]", "--set", f"pruning.backend={backend}"]
            t = time.time()
            procs = ["--nproc", str(nproc)] if nproc > 1 else []
            proc = subprocess.run([sys.executable, "-m", "classaware_plugin.cli.main", "run", "--quiet", "--out",
                                   f"{tmp}/run", *procs, *args], capture_output=True, text=True,
                                  env={**os.environ, "MPLBACKEND": "Agg"})
            wall = time.time() - t
            if proc.returncode != 0:
                raise RuntimeError(f"the {backend} job failed: {proc.stderr[-2000:]}")
            report = json.loads(Path(f"{tmp}/run/report.json").read_text())
        d, p = report["dense"], report["pruned"]
        shirt = str(report["constraint"]["important_classes"][0])
        row = {"backend": backend, "processes": nproc, "commit": commit, "images": 10 * PER_CLASS, "wall_s": round(wall, 1), "args": args,
               "stop_reason": report["stop_reason"], "macs_reduction": d["macs"] / p["macs"],
               "attempts": len(report["history"]), "dense_accuracy": d["accuracy"], "pruned_accuracy": p["accuracy"],
               "dense_fn": d["fn"][shirt], "pruned_fn": p["fn"][shirt], "speed": report["speed"]}
        log.info("%s, %d process(es): %.0f s, %s, %.2fx MACs", backend, nproc, wall, row["stop_reason"], row["macs_reduction"])
        rows.append(row)
        atomic_write_text(path, json.dumps({"rows": rows}, indent=1))
    lines = ["# Wall time of `classaware-prune run` on a 10,000-image ImageFolder (28x28 PNG, 2 cores)", "",
             "`python -m benchmarks jobtime` (benchmarks/jobtime.py); default settings, Shirt important.", "",
             "`--nproc 2`: the same job in 2 processes (torch.distributed, 1 thread each). Commit: the code measured (-: rows from before it was recorded).", "",
             "| backend | processes | wall time | stop reason | attempts | MACs reduction | accuracy dense -> pruned | Shirt FN (test) "
             "dense -> pruned | onnxruntime speed-up (b64) | commit |", "|---|---:|---:|---|---:|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r.get('processes', 1)} | {r['wall_s'] / 60:.1f} min | {r['stop_reason']} | {r['attempts']} | "
                     f"{r['macs_reduction']:.2f}x | {r['dense_accuracy']:.3f} -> {r['pruned_accuracy']:.3f} | "
                     f"{r['dense_fn']} -> {r['pruned_fn']} | {r['speed']['onnxruntime']['speedup']:.2f}x | {r.get('commit') or '-'} |")
    atomic_write_text(out / "jobtime.md", "\n".join(lines) + "\n")
    return rows
