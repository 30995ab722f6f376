"""Does choosing how many channels each layer keeps, by the important class's own metric, buy anything? (issue 32)

Measurements on the guarantee benchmark's dense models (the CLI job's, one per data set and seed, cached; ``digits``
and ``fashion``: ResNet-8, ``mobilenet``: MobileNetV2 0.5x on digits at 32x32):

``correlation`` (first, as the issue asks): 32 random candidates of per-layer widths at 3x fewer MACs (Torch-Pruning
units, channels by magnitude), each scored as the search scores it (BatchNorm statistics re-estimated on 50 training
batches; the important class's FN rate at the dense FPR and the accuracy, on the selection split), then fine-tuned with
the budget the iterative loop spends to reach 3x, and measured on the test split. The rank correlation (Spearman) of
the cheap score with the fine-tuned result says whether a search over it can find anything.

``repeatability``: how much of the fine-tuned result the allocation decides at all. 8 random candidates at 3x
(drawn as the search draws them), each fine-tuned 4 times from the same pruned weights with different fine-tuning
seeds; a one-way analysis of variance splits the test FN's spread into between allocations and within (fine-tuning
noise). If the allocation explains little of it, no cheap score (and no search) can find an allocation that keeps
the important class better, however good the score.

``latency``: the latency objective (the fastest candidate, in measured onnxruntime speed-up, among those whose
important-class FN is within global ranking's) against Torch-Pruning's global ranking at the same MACs level.

``compare``: (a) the class-aware search, (b) the same search judging accuracy, (c) Torch-Pruning's GroupTaylor with
global ranking, (d) NNI's L1 with the same fraction of every layer; one shot to each MACs level (2x, 3x, 5x), the same
channel criterion in (a)-(c) (GroupTaylor within layers), the same fine-tuning budget for all. Reported: the important
class's test FN at the dense FPR, the excess over the dense model's, accuracy, AUC, paired differences against the
better of (c) and (d) with 95% intervals, (a) against (b) (the class-aware objective's own effect), and the search's
share of the wall time.

    python -m benchmarks allocation correlation [--data digits fashion] [--threads 1]
    python -m benchmarks allocation repeatability [--data digits fashion] [--candidates 8 --repeats 4]
        [--finetune-scale 1] [--threads 1]
    python -m benchmarks allocation compare [--data digits fashion mobilenet] [--seeds 0 1 2 3 4] [--levels 2 3 5]
    python -m benchmarks allocation latency --data fashion --seeds 0 1 2 --levels 3 --threads 1   # alone: it times
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch_pruning as tp
from scipy import stats

from classaware_plugin.cli.job import Job
from classaware_plugin.core import evaluate, fn_at_fpr, fpr_of, predict
from classaware_plugin.core.allocation import accuracy_objective, important_class_auc_objective, important_class_objective
from classaware_plugin.core.calibration import last_linear
from classaware_plugin.core.validation import ClassAwareError
from classaware_plugin.export import atomic_write_text
from classaware_plugin.measure import count_params_macs
from classaware_plugin.torch_pruning import RoundingMetaPruner, accumulate_gradients
from classaware_plugin.torch_pruning.allocation import prune_to_allocation, width_search

from .guarantee import config, prune_to, seed_setup
from .methods import structured_steps
from .summarize import paired_difference, read_jsonl

log = logging.getLogger("benchmarks")
DATA = ("digits", "fashion", "mobilenet")  # guarantee.DATA names; mobilenet: MobileNetV2 0.5x on digits at 32x32
METHODS = ("search_classaware", "search_accuracy", "tp_taylor", "nni_l1")
CLASS_AGNOSTIC = ("tp_taylor", "nni_l1")
REPEATABILITY_KEYS = ("fn_at_dense_fpr", "auc", "accuracy")
"""The fine-tuned results whose spread ``repeatability`` splits: the important class's test FN at the dense FPR (a
threshold chosen on the selection split), its test AUC (no threshold) and the accuracy."""


def _setup(name: str, seed: int) -> dict[str, Any]:
    """The seed's data (the certified rule's splits), its dense model and what every measurement needs."""
    cfg, bundle, important, dl, job, dense = seed_setup(name, seed)
    c = important[0]
    fpr = fpr_of(evaluate(dense, dl["val"], important, bundle.num_classes), c)
    return {"name": name, "seed": seed, "cfg": cfg, "bundle": bundle, "important": important, "c": c, "dl": dl,
            "job": job, "dense": dense, "fpr": fpr, "example": torch.zeros(2, *bundle.input_shape)}


def _finetune(s: dict[str, Any], model: torch.nn.Module, level: float, key: int, scale: float = 1.0) -> None:
    """The job's fine-tuning with the budget the iterative loop spends to reach ``level`` (times ``scale``; BatchNorm
    re-estimated)."""
    epochs = structured_steps(level) * s["cfg"]["pruning"]["finetune_epochs"] * scale
    job = Job(config(s["name"], s["seed"], [f"pruning.finetune_epochs={epochs}"]), s["job"].dir, progress=False)
    job.finetuner(s["dense"], s["bundle"], s["important"], s["dl"], lambda: key)(model)


def _test_metrics(s: dict[str, Any], model: torch.nn.Module) -> dict[str, float]:
    """The important class's test FN at the dense model's selection-split FPR (threshold chosen on the selection
    split), FN rate, accuracy and AUC on the test split."""
    c, val, test = s["c"], predict(model, s["dl"]["val"]), predict(model, s["dl"]["test"])
    op = fn_at_fpr(val, test, c, s["fpr"])
    ev = evaluate(model, s["dl"]["test"], s["important"], s["bundle"].num_classes)
    return {"fn_at_dense_fpr": op.test_fn, "fn": ev.fn[c], "accuracy": ev.accuracy, "auc": ev.auc[c]}


# ----------------------------------------------------------------------------- correlation
def correlation(name: str, seed: int = 0, candidates: int = 32, level: float = 3.0) -> dict[str, Any]:
    s = _setup(name, seed)
    objective = {"important": important_class_objective(s["dl"]["val"], s["important"], {s["c"]: s["fpr"]}),
                 "important_auc": important_class_auc_objective(s["dl"]["val"], s["important"]),
                 "accuracy": accuracy_objective(s["dl"]["val"])}
    search = width_search(s["dense"], s["example"], level, objective["important"], s["dl"]["train"], 50,
                          round_to=s["cfg"]["pruning"]["round_to"], candidates=candidates, mutation=0.0, seed=seed)
    rows = []
    for k in range(candidates):
        weights, _ = search._weights()
        allocation, model, reduction = search._scaled(weights)
        search.adapt(model)  # the search's own adaptive BN: the same 50 training batches for every candidate
        cheap = {f"cheap_{o}": fn(model) for o, fn in objective.items()}
        _finetune(s, model, level, 5000 + k)
        rows.append({"candidate": k, "reduction": reduction, **cheap, **_test_metrics(s, model)})
        log.info("%s candidate %d: %.2fx, cheap %s, fine-tuned FN %d, accuracy %.3f", name, k, reduction, cheap,
                 rows[-1]["fn_at_dense_fpr"], rows[-1]["accuracy"])
    rho = {}
    for cheap_key, final_key, sign in (("cheap_important", "fn_at_dense_fpr", -1), ("cheap_accuracy", "accuracy", 1),
                                       ("cheap_important_auc", "fn_at_dense_fpr", -1), ("cheap_important", "accuracy", 1),
                                       ("cheap_accuracy", "fn_at_dense_fpr", -1)):
        r = stats.spearmanr([x[cheap_key] for x in rows], [sign * x[final_key] for x in rows])
        rho[f"{cheap_key} vs {final_key}"] = {"spearman": float(r.statistic), "p": float(r.pvalue)}
    return {"data": name, "seed": seed, "level": level, "candidates": rows, "spearman": rho}


def repeatability(name: str, seed: int = 0, candidates: int = 8, repeats: int = 4, level: float = 3.0,
                  rows: list[dict[str, Any]] | None = None,
                  on_row: Callable[[list[dict[str, Any]]], None] | None = None,
                  finetune_scale: float = 1.0) -> dict[str, Any]:
    """How much of the fine-tuned important-class FN the allocation decides: ``candidates`` random allocations at
    ``level`` (drawn as the search draws them), each fine-tuned ``repeats`` times from the same pruned weights with
    different fine-tuning seeds (data order, augmentation). A one-way analysis of variance splits the spread of the
    test FN into between allocations and within (fine-tuning noise). ICC(1) is the share of the variance that the
    allocation explains; ``sqrt(ICC)`` bounds the correlation any score of an allocation can have with one
    fine-tuned outcome. ``rows`` (earlier rows of this data set) are kept and not recomputed; ``finetune_scale``
    multiplies the fine-tuning budget (does a longer fine-tuning leave the widths more say?)."""
    s = _setup(name, seed)
    search = width_search(s["dense"], s["example"], level, lambda m: 0.0, s["dl"]["train"], 50,
                          round_to=s["cfg"]["pruning"]["round_to"], candidates=candidates, mutation=0.0, seed=seed)
    rows = list(rows or [])
    for k in range(candidates):
        weights, _ = search._weights()  # drawn for every k, so that a resumed run sees the same candidates
        if sum(r["candidate"] == k for r in rows) >= repeats:
            continue
        _, pruned, reduction = search._scaled(weights)
        for r in range(repeats):
            if any(x["candidate"] == k and x["repeat"] == r for x in rows):
                continue
            model = copy.deepcopy(pruned)
            _finetune(s, model, level, 7000 + 100 * k + r, finetune_scale)
            rows.append({"candidate": k, "repeat": r, "reduction": reduction, **_test_metrics(s, model)})
            log.info("%s candidate %d repeat %d: %.2fx, fine-tuned FN %d, accuracy %.3f", name, k, r, reduction,
                     rows[-1]["fn_at_dense_fpr"], rows[-1]["accuracy"])
            if on_row is not None:
                on_row(rows)
    return {"data": name, "seed": seed, "level": level, "finetune_scale": finetune_scale, "rows": rows,
            **{key: variance_split(rows, key) for key in REPEATABILITY_KEYS}}


def variance_split(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """One-way ANOVA of ``key`` by candidate: the between- and within-candidate standard deviations, F and its p
    value, ICC(1) (the share of the variance between candidates, floored at 0) and its 95% interval (Shrout and
    Fleiss, from the F distribution)."""
    groups = [np.array([r[key] for r in rows if r["candidate"] == k], dtype=float)
              for k in sorted({r["candidate"] for r in rows})]
    groups = [g for g in groups if len(g) >= 2]
    n = min(len(g) for g in groups)
    groups = [g[:n] for g in groups]  # balanced: the same number of repeats per candidate
    a = len(groups)
    msb = n * np.var([g.mean() for g in groups], ddof=1)
    msw = float(np.mean([np.var(g, ddof=1) for g in groups]))
    f = msb / msw if msw > 0 else float("inf")
    p = float(stats.f.sf(f, a - 1, a * (n - 1)))

    def icc(fv: float) -> float:
        return float(max(0.0, (fv - 1) / (fv + n - 1)))

    f_low = f / stats.f.ppf(0.975, a - 1, a * (n - 1))
    f_high = f * stats.f.ppf(0.975, a * (n - 1), a - 1)
    sd_between = float(np.sqrt(max(0.0, (msb - msw) / n)))
    return {"candidates": a, "repeats": n, "sd_within": float(np.sqrt(msw)), "sd_between": sd_between,
            "sd_of_means": float(np.std([g.mean() for g in groups], ddof=1)), "F": float(f), "p": p,
            "icc": icc(f), "icc_low": icc(f_low), "icc_high": icc(f_high)}


def repeatability_plot(done: dict[str, Any], path: Path) -> None:
    """Per data set, the important class's fine-tuned test FN at the dense FPR of each candidate allocation (its
    fine-tuning seeds as dots, their mean as a bar), candidates ordered by their mean: the spread within a candidate
    against the spread between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from classaware_plugin.export import atomic_write

    names = [n for n, res in done.items() if "fn_at_dense_fpr" in res]
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        res = done[name]
        by: dict[int, list[float]] = {}
        for r in res["rows"]:
            by.setdefault(r["candidate"], []).append(r["fn_at_dense_fpr"])
        reduction = {r["candidate"]: r["reduction"] for r in res["rows"]}
        order = sorted(by, key=lambda k: np.mean(by[k]))
        for x, k in enumerate(order):
            ax.scatter([x] * len(by[k]), by[k], color="tab:blue", s=18, alpha=0.7,
                       label="one fine-tuning" if x == 0 else None)
            ax.hlines(np.mean(by[k]), x - 0.3, x + 0.3, color="k", label="mean of the candidate" if x == 0 else None)
        v = res["fn_at_dense_fpr"]
        ax.set_title(f"{name}: ICC {v['icc']:.2f} (95% CI {v['icc_low']:.2f}-{v['icc_high']:.2f})")
        ax.set_xticks(range(len(order)), [f"{reduction[k]:.2f}x" for k in order], fontsize=7)
        ax.set_xlabel(f"candidate allocation at {res['level']:g}x (MACs reached)")
        ax.set_ylabel("important class's test FN at the dense FPR")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- comparison
def _prune_search(s: dict[str, Any], level: float, objective_name: str) -> tuple[torch.nn.Module, float, dict]:
    objective = (important_class_objective(s["dl"]["val"], s["important"], {s["c"]: s["fpr"]})
                 if objective_name == "important" else accuracy_objective(s["dl"]["val"]))
    t = time.time()
    result = width_search(s["dense"], s["example"], level, objective, s["dl"]["train"], 50,
                          round_to=s["cfg"]["pruning"]["round_to"], candidates=s["cfg"]["pruning"]["search_candidates"],
                          seed=s["seed"]).run()
    seconds = time.time() - t
    model = copy.deepcopy(s["dense"])
    accumulate_gradients(model, s["dl"]["calib"], s["cfg"]["pruning"]["calib_batches"])
    prune_to_allocation(model, s["example"], result.best.allocation, importance=tp.importance.GroupTaylorImportance(),
                        round_to=s["cfg"]["pruning"]["round_to"])
    model.zero_grad(set_to_none=True)
    return model, seconds, {"allocation": result.best.allocation, "search_score": result.best.score}


def _prune_global_taylor(s: dict[str, Any], level: float) -> torch.nn.Module:
    """GroupTaylor with global ranking, at the smallest ratio (bisection) that reaches ``level``."""
    dense_macs = count_params_macs(s["dense"], s["example"])[1]
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):
        mid = (lo + hi) / 2
        model = copy.deepcopy(s["dense"])
        accumulate_gradients(model, s["dl"]["calib"], s["cfg"]["pruning"]["calib_batches"])
        RoundingMetaPruner(model, s["example"], importance=tp.importance.GroupTaylorImportance(), pruning_ratio=mid,
                           global_pruning=True, ignored_layers=[last_linear(model)],
                           round_to=s["cfg"]["pruning"]["round_to"]).step()
        model.zero_grad(set_to_none=True)
        if dense_macs / count_params_macs(model, s["example"])[1] >= level:
            hi, best = mid, model
        else:
            lo = mid
    return best if best is not None else model


def compare_one(s: dict[str, Any], level: float, method: str) -> dict[str, Any]:
    t = time.time()
    info: dict[str, Any] = {}
    search_seconds = 0.0
    if method.startswith("search_"):
        model, search_seconds, info = _prune_search(s, level, "important" if method == "search_classaware" else "accuracy")
    elif method == "tp_taylor":
        model = _prune_global_taylor(s, level)
    else:
        p = s["cfg"]["pruning"]
        model = prune_to("nni_l1", s["dense"], level, s["example"], s["dl"]["calib"], p["calib_batches"], p["round_to"])
    reached = count_params_macs(s["dense"], s["example"])[1] / count_params_macs(model, s["example"])[1]
    _finetune(s, model, level, 9000 + int(level * 10))
    seconds = time.time() - t
    return {"suite": s["name"], "model": s["cfg"]["model"]["name"], "level": level, "method": method, "seed": s["seed"],
            "reached": reached, **_test_metrics(s, model), "seconds": round(seconds, 1),
            "search_seconds": round(search_seconds, 1), **info}


def latency_compare(name: str, seed: int, level: float) -> list[dict[str, Any]]:
    """The latency objective against global ranking at ``level``x fewer MACs (run alone: it times). Global ranking
    (GroupTaylor) prunes to the level; its important-class FN rate at the dense FPR after adaptive BN (on the
    selection split, the search's cheap measure) is the bound. The search then keeps, among candidates at the same
    MACs level within that bound, the one with the highest measured onnxruntime speed-up (batch 64, interleaved with
    the dense model); where no candidate is within the bound it falls back to global ranking's model. Both are
    fine-tuned with the same budget; rows carry their onnxruntime speed-ups at batch 64 and 1 (re-measured, 30
    repeats) and the test metrics."""
    from classaware_plugin.core.allocation import latency_objective
    from classaware_plugin.speed import LatencyProbe, speedup

    s = _setup(name, seed)
    p = s["cfg"]["pruning"]
    probe = LatencyProbe(s["dense"], s["bundle"].input_shape, batch_size=64, runtime="onnxruntime")
    cheap_fn = important_class_objective(s["dl"]["val"], s["important"], {s["c"]: s["fpr"]})
    search = width_search(s["dense"], s["example"], level, cheap_fn, s["dl"]["train"], 50, round_to=p["round_to"],
                          candidates=p["search_candidates"], seed=seed)
    t = time.time()
    global_model = _prune_global_taylor(s, level)
    global_seconds = time.time() - t
    adapted = copy.deepcopy(global_model)
    search.adapt(adapted)
    bound = -cheap_fn(adapted)
    # the objective needs the bound, the bound needs the search's own adaptive-BN batches: set it once both exist
    search.objective = latency_objective(lambda m: 1.0 / probe(m), lambda m: -cheap_fn(m), bound)
    t = time.time()
    try:
        best = search.run().best
    except ClassAwareError:  # every candidate outside the bound
        best = None
    search_seconds = time.time() - t
    rows = []
    within = sum(c.score > float("-inf") for c in search.candidates_)
    if best is None:  # no candidate as good for the important class: the search falls back to global ranking's model
        log.info("%s seed %d %gx: no searched candidate within the FN bound %.3f", name, seed, level, bound)
        searched = copy.deepcopy(global_model)
    else:
        searched = copy.deepcopy(s["dense"])
        accumulate_gradients(searched, s["dl"]["calib"], p["calib_batches"])
        prune_to_allocation(searched, s["example"], best.allocation,
                            importance=tp.importance.GroupTaylorImportance(), round_to=p["round_to"])
        searched.zero_grad(set_to_none=True)
    for method, model, seconds in (("search_latency", searched, search_seconds), ("tp_taylor", global_model,
                                                                                 global_seconds)):
        speed = {f"speedup_b{b}": speedup(s["dense"], model, s["bundle"].input_shape, batch_size=b,
                                          runtimes=("onnxruntime",), repeats=30)["onnxruntime"]["speedup"]
                 for b in (64, 1)}
        reached = count_params_macs(s["dense"], s["example"])[1] / count_params_macs(model, s["example"])[1]
        _finetune(s, model, level, 9000 + int(level * 10))
        rows.append({"suite": name, "model": s["cfg"]["model"]["name"], "level": level, "method": method,
                     "seed": seed, "reached": reached, **speed, **_test_metrics(s, model), "fn_bound": bound,
                     "search_seconds": round(seconds, 1),
                     **({"within_bound": within, "candidates": len(search.candidates_),
                         "search_speedup": -1.0 / best.score if best else None}
                        if method == "search_latency" else {})})
        log.info("%s seed %d %gx %s: onnxruntime speed-up %.2f (batch 64), %.2f (batch 1), FN at dense FPR %d",
                 name, seed, level, method, speed["speedup_b64"], speed["speedup_b1"], rows[-1]["fn_at_dense_fpr"])
    return rows


def summarize(rows: list[dict[str, Any]], dense: dict[tuple[str, int], dict[str, float]]) -> list[dict[str, Any]]:
    """One row per suite, level and method, as issue 32 asks, with the paired comparison against the better
    class-agnostic method (lower mean excess FN)."""
    out = []
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for level in sorted({r["level"] for r in rows if r["suite"] == suite}):
            group = [r for r in rows if r["suite"] == suite and r["level"] == level]
            excess = {m: {r["seed"]: r["fn_at_dense_fpr"] - dense[(suite, r["seed"])]["fn_at_dense_fpr"]
                          for r in group if r["method"] == m} for m in METHODS}
            baselines = [m for m in CLASS_AGNOSTIC if excess[m]]
            base = min(baselines, key=lambda m: np.mean(list(excess[m].values()))) if baselines else None
            for m in METHODS:
                rs = [r for r in group if r["method"] == m]
                if not rs:
                    continue
                row = {"suite": suite, "model": rs[0]["model"], "level": level, "method": m, "seeds": len(rs),
                       "reached_mean": float(np.mean([r["reached"] for r in rs])),
                       "fn_at_dense_fpr_mean": float(np.mean([r["fn_at_dense_fpr"] for r in rs])),
                       "excess_fn_mean": float(np.mean(list(excess[m].values()))),
                       "accuracy_mean": float(np.mean([r["accuracy"] for r in rs])),
                       "auc_mean": float(np.mean([r["auc"] for r in rs])),
                       "search_share": float(np.mean([r["search_seconds"] / r["seconds"] for r in rs]))}
                if base is not None and m != base:
                    d = paired_difference(excess[m], excess[base])
                    base_mean = float(np.mean(list(excess[base].values())))
                    row["paired"] = None if d is None else {
                        "baseline": base, "excess_ratio": row["excess_fn_mean"] / base_mean if base_mean else None,
                        "mean_diff": d["mean_diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}
                if m == "search_classaware" and excess["search_accuracy"]:  # the objective's own effect: (a) - (b)
                    d = paired_difference(excess[m], excess["search_accuracy"])
                    row["vs_accuracy_search"] = None if d is None else {
                        "mean_diff": d["mean_diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}
                out.append(row)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    lines = ["| suite | level | method | seeds | reached | FN at dense FPR | excess FN | vs baseline: excess ratio, "
             "diff (95% CI) | vs the accuracy search: diff (95% CI) | accuracy | AUC | search share |",
             "|---|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in summary:
        p = r.get("paired")
        vs = "-" if not p else (f"{p['baseline']}: {p['excess_ratio']:.2f}, {p['mean_diff']:+.1f} "
                                f"({p['ci_low']:+.1f}, {p['ci_high']:+.1f})" if p["excess_ratio"] is not None else p["baseline"])
        a = r.get("vs_accuracy_search")
        vs_b = f"{a['mean_diff']:+.1f} ({a['ci_low']:+.1f}, {a['ci_high']:+.1f})" if a else "-"
        lines.append(f"| {r['suite']} | {r['level']:g}x | {r['method']} | {r['seeds']} | {r['reached_mean']:.2f} | "
                     f"{r['fn_at_dense_fpr_mean']:.1f} | {r['excess_fn_mean']:+.1f} | {vs} | {vs_b} | "
                     f"{100 * r['accuracy_mean']:.1f}% | {r['auc_mean']:.3f} | {r['search_share']:.2f} |")
    return "\n".join(lines) + "\n"


def latency_table(rows: list[dict[str, Any]]) -> str:
    """Per suite and level: each method's mean onnxruntime speed-ups and test metrics, and the searched allocation's
    speed-up over global ranking's (the ratio per seed, then its mean and range)."""
    lines = ["| suite | level | method | seeds | reached | speed-up, batch 64 | speed-up, batch 1 | FN at dense FPR | "
             "accuracy | searched / global speed-up, batch 64 (range) | seeds without a candidate within the bound |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        for level in sorted({r["level"] for r in rows if r["suite"] == suite}):
            by = {m: {r["seed"]: r for r in rows if r["suite"] == suite and r["level"] == level and r["method"] == m}
                  for m in ("search_latency", "tp_taylor")}
            shared = sorted(set(by["search_latency"]) & set(by["tp_taylor"]))
            ratios = [by["search_latency"][k]["speedup_b64"] / by["tp_taylor"][k]["speedup_b64"] for k in shared]
            for m, rs in by.items():
                v = list(rs.values())
                ratio = (f"{np.mean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                         if m == "search_latency" and ratios else "-")
                lines.append(f"| {suite} | {level:g}x | {m} | {len(v)} | {np.mean([r['reached'] for r in v]):.2f} | "
                             f"{np.mean([r['speedup_b64'] for r in v]):.2f} | "
                             f"{np.mean([r['speedup_b1'] for r in v]):.2f} | {np.mean([r['fn_at_dense_fpr'] for r in v]):.1f} | "
                             f"{100 * np.mean([r['accuracy'] for r in v]):.1f}% | {ratio} | "
                             f"{sum(not r['within_bound'] for r in v) if m == 'search_latency' else '-'} |")
    return "\n".join(lines) + "\n"


def _merge_json(path: Path, entries: dict[str, Any]) -> None:
    """Add ``entries`` to the JSON object in ``path`` (written atomically), keeping the entries other processes wrote
    there since: concurrent processes each add their own, none overwrites another's."""
    saved = json.loads(path.read_text()) if path.exists() else {}
    atomic_write_text(path, json.dumps(saved | entries, indent=1))


def run(mode: str, out: Path, names: tuple[str, ...], seeds: tuple[int, ...], levels: tuple[float, ...],
        candidates: int = 8, repeats: int = 4, finetune_scale: float = 1.0) -> None:
    """One measurement (``mode``); ``candidates``, ``repeats`` and ``finetune_scale`` are ``repeatability``'s."""
    if mode == "correlation":
        path = out / "allocation_correlation.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        for name in names:
            done[name] = correlation(name)
            atomic_write_text(path, json.dumps(done, indent=1))
        lines = ["| data | cheap score | fine-tuned result | Spearman rho | p |", "|---|---|---|---:|---:|"]
        for name, res in done.items():
            for pair, v in res["spearman"].items():
                cheap, final = pair.split(" vs ")
                lines.append(f"| {name} | {cheap} | {final} | {v['spearman']:+.2f} | {v['p']:.3f} |")
        atomic_write_text(out / "allocation_correlation.md", "\n".join(lines) + "\n")
        return
    if mode == "repeatability":
        path = out / "allocation_repeatability.json"
        done = json.loads(path.read_text()) if path.exists() else {}

        for name in names:
            key = name if finetune_scale == 1 else f"{name}, fine-tuning x{finetune_scale:g}"
            res = repeatability(name, rows=done.get(key, {}).get("rows"),
                                on_row=lambda rows, k=key: _merge_json(path, {k: {"rows": rows}}),
                                finetune_scale=finetune_scale, candidates=candidates, repeats=repeats)
            _merge_json(path, {key: res})
        done = json.loads(path.read_text())
        lines = ["| data | fine-tuned result | candidates x repeats | SD within (fine-tuning) | SD between "
                 "(allocation) | F (p) | ICC (95% CI) | max correlation |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, res in done.items():
            if "fn_at_dense_fpr" not in res:
                continue
            for key in (k for k in REPEATABILITY_KEYS if k in res):
                v, scale = res[key], (100 if key == "accuracy" else 1)
                lines.append(f"| {name} | {key} | {v['candidates']} x {v['repeats']} | {scale * v['sd_within']:.3g} | "
                             f"{scale * v['sd_between']:.3g} | {v['F']:.2f} ({v['p']:.3f}) | {v['icc']:.2f} "
                             f"({v['icc_low']:.2f}-{v['icc_high']:.2f}) | {np.sqrt(v['icc']):.2f} |")
        atomic_write_text(out / "allocation_repeatability.md", "\n".join(lines) + "\n")
        repeatability_plot(done, out / "allocation_repeatability.png")
        return
    if mode == "latency":
        path = out / "allocation" / "latency.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_jsonl(path)
        for name in names:
            for seed in seeds:
                for level in levels:
                    if any(r["suite"] == name and r["seed"] == seed and r["level"] == level for r in rows):
                        continue
                    new = latency_compare(name, seed, level)
                    with path.open("a") as f:
                        f.writelines(json.dumps(r) + "\n" for r in new)
                    rows += new
        atomic_write_text(out / "allocation_latency.md", latency_table(rows))
        return
    raw = out / "allocation" / "raw.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(raw)
    dense_path = out / "allocation" / "dense.json"

    def read_dense() -> dict[tuple[str, int], dict[str, float]]:  # every process's entries (they add their own)
        saved = json.loads(dense_path.read_text()) if dense_path.exists() else {}
        return {(k.split("|")[0], int(k.split("|")[1])): v for k, v in saved.items()}

    def save_dense(key: tuple[str, int], value: dict[str, float]) -> None:
        _merge_json(dense_path, {f"{key[0]}|{key[1]}": value})

    dense = read_dense()
    for name in names:
        for seed in seeds:
            todo = [(lv, m) for lv in levels for m in METHODS
                    if not any(r["suite"] == name and r["seed"] == seed and r["level"] == lv and r["method"] == m
                               for r in rows)]
            if not todo and (name, seed) in dense:
                continue
            s = _setup(name, seed)
            dense[(name, seed)] = _test_metrics(s, s["dense"])
            save_dense((name, seed), dense[(name, seed)])
            for level, method in todo:
                row = compare_one(s, level, method)
                log.info("%s seed %d %gx %s: FN at dense FPR %d (dense %d), accuracy %.3f, %.0f s", name, seed, level,
                         method, row["fn_at_dense_fpr"], dense[(name, seed)]["fn_at_dense_fpr"], row["accuracy"],
                         row["seconds"])
                with raw.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    rows = read_jsonl(raw)
    dense = read_dense()
    for key in sorted({(r["suite"], r["seed"]) for r in rows} - set(dense)):  # lost by an older concurrent writer
        s = _setup(*key)
        save_dense(key, _test_metrics(s, s["dense"]))
    summary = summarize(rows, read_dense())
    atomic_write_text(out / "allocation.json", json.dumps({"rows": summary, "runs": rows}, indent=1))
    atomic_write_text(out / "allocation.md", table(summary))
