"""Can training for the important class from the start buy what issue 10's pipeline bar asks of fine-tuning?

For each seed, the dense model trained with cross-entropy and the one trained with the class-dependent loss (the
loss ablation's suite pairs: same data, seed and budget) are measured at one operating point, the cross-entropy
model's validation FPR: FN of the important class with the threshold chosen on validation and applied to test (the
protocol's metric), and read on the test ROC; beside them AUC, AP, accuracy and FN at argmax. Neither model is
pruned: the class-dependent model's FN at that FPR is what a pipeline could reach if fine-tuning with that loss
trained a model as good as a full training run with it. Written to ``dense_loss.json`` and ``dense_loss.md``; the
dense models are the harness's (cached in ``results/cache``, trained when missing).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from classaware_plugin.export import atomic_write_text

from .harness import _data, _dense, dense_id, dense_val_fpr, operating_point
from .suites import LOSS_ABLATION, SUITES
from .summarize import mean_std, paired_difference

log = logging.getLogger("benchmarks")
LOSSES = ("ce", "class_dependent")
METRICS = ("fn_at_dense_fpr", "fn_at_test_fpr", "auc", "ap", "accuracy", "fn", "fp")


def measure(suite: str, seed: int) -> dict[str, Any]:
    """Both dense models of ``suite`` (a key of :data:`LOSS_ABLATION`) and ``seed`` at the cross-entropy model's FPR."""
    pair = {"ce": SUITES[suite], "class_dependent": SUITES[LOSS_ABLATION[suite]]}
    assert pair["ce"].data == pair["class_dependent"].data, "the pair must share its data"
    bundle, loaders = _data(pair["ce"], seed)
    important = list(pair["ce"].data.important)
    models = {k: _dense(s, seed, bundle, loaders)[0].eval() for k, s in pair.items()}
    fpr = dense_val_fpr(models["ce"], loaders, important)
    row: dict[str, Any] = {"suite": suite, "seed": seed, "dense_val_fpr": fpr}
    for k, model in models.items():
        row[k] = {"dense_id": dense_id(model), **operating_point(model, loaders, important, bundle.num_classes, fpr)}
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per suite and loss, mean and std over seeds of every metric, and the paired difference class-dependent - ce."""
    out: dict[str, Any] = {}
    for suite in sorted({r["suite"] for r in rows}):
        rs = [r for r in rows if r["suite"] == suite]
        s: dict[str, Any] = {"seeds": len(rs)}
        for m in METRICS:
            for k in LOSSES:
                s[f"{k}_{m}_mean"], s[f"{k}_{m}_std"] = mean_std([r[k][m] for r in rs])
            s[f"{m}_paired"] = paired_difference({r["seed"]: r["class_dependent"][m] for r in rs},
                                                 {r["seed"]: r["ce"][m] for r in rs})
        out[suite] = s
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| suite | metric | cross-entropy dense | class-dependent dense | paired diff (95% CI) |",
             "|---|---|---:|---:|---:|"]
    for suite, s in summary.items():
        for m in METRICS:
            p = s[f"{m}_paired"]
            digits = 4 if m in ("auc", "ap", "accuracy") else 1
            cell = (f"{p['mean_diff']:+.{digits}f} ({p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f})"
                    if p else "-")
            lines.append(f"| {suite} | {m} | {s[f'ce_{m}_mean']:.{digits}f} ± {s[f'ce_{m}_std']:.{digits}f} | "
                         f"{s[f'class_dependent_{m}_mean']:.{digits}f} ± {s[f'class_dependent_{m}_std']:.{digits}f} | "
                         f"{cell} |")
    return "\n".join(lines) + "\n"


def run(out: Path, suites: tuple[str, ...] = tuple(LOSS_ABLATION)) -> dict[str, Any]:
    rows = []
    for suite in suites:
        for seed in SUITES[suite].seeds:
            rows.append(measure(suite, seed))
            r = rows[-1]
            log.info("%s seed %d: FN at the CE model's FPR %d (CE) vs %d (class-dependent)", suite, seed,
                     r["ce"]["fn_at_dense_fpr"], r["class_dependent"]["fn_at_dense_fpr"])
    result = {"rows": rows, "summary": summarize(rows)}
    atomic_write_text(out / "dense_loss.json", json.dumps(result, indent=1))
    atomic_write_text(out / "dense_loss.md", table(result["summary"]))
    return result
