"""raw.jsonl -> summary.json (means and standard deviations over seeds), tables.md and one plot per suite."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

FIELDS = ("fn", "fn_rate", "fp", "accuracy", "auc", "ap", "params", "macs", "latency_ms_b1", "latency_ms_b64",
          "onnx_latency_ms_b1", "onnx_latency_ms_b64", "score_seconds", "reached", "fn_at_dense_fpr", "fpr_at_dense_fpr",
          "fn_at_test_fpr")


class DenseMismatchError(ValueError):
    """Rows of one suite and seed were measured on different dense models, so they cannot be paired."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (one JSON object per line, as the benchmarks append them); none if it is
    missing."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and (population) standard deviation of the values that are not None; (None, None) when there are none."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v))


def summarize(out: Path) -> dict[str, Any] | None:
    raw = out / "raw.jsonl"
    if not raw.exists():
        return None
    rows = read_jsonl(raw)
    # Several concurrent processes of one suite each write the dense row of a seed they share: keep one per key.
    rows = list({(r["suite"], r["method"], r["level"], r["seed"]): r for r in rows}.values())
    check_dense_ids(rows, raw)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    dense: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["method"] == "dense":
            dense[r["suite"]].append(r)
        else:
            groups[(r["suite"], r["dataset"], r["model"], r["regime"], r["level"], r["level_kind"], r["method"],
                     r["class_aware"])].append(r)
    summary_rows = []
    for (suite, dataset, model, regime, level, kind, method, aware), rs in sorted(groups.items(), key=lambda kv: kv[0][:7]):
        row: dict[str, Any] = {"suite": suite, "dataset": dataset, "model": model, "regime": regime, "level": level,
                               "level_kind": kind, "method": method, "class_aware": aware, "seeds": len(rs)}
        for f in FIELDS:
            m, s = mean_std([r.get(f) for r in rs])
            row[f"{f}_mean"], row[f"{f}_std"] = m, s
        row["latency_ms_b1"], row["score_seconds"] = row["latency_ms_b1_mean"], row["score_seconds_mean"]  # issue's keys
        row["stop_reasons"] = sorted({r.get("stop_reason") for r in rs if r.get("stop_reason")})
        row["comparison"] = rs[0].get("comparison", "ablation")
        row["latency_quiet"] = all(r.get("latency_pass") for r in rs)  # re-measured alone by `benchmarks latency`
        summary_rows.append(row)
    dense_summary = {}
    for suite, rs in dense.items():
        d = {"dataset": rs[0]["dataset"], "model": rs[0]["model"], "seeds": len(rs)}
        for f in FIELDS:
            d[f"{f}_mean"], d[f"{f}_std"] = mean_std([r.get(f) for r in rs])
        dense_summary[suite] = d
    paired(summary_rows, groups, dense)
    summary = {"rows": summary_rows, "dense": dense_summary}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "tables.md").write_text(tables(summary))
    (out / "headline.md").write_text(headline(summary) + "\n" + comparisons(summary))
    plots(summary, out)
    return summary


def check_dense_ids(rows: list[dict[str, Any]], raw: Path) -> None:
    """Raise :class:`DenseMismatchError` if a row names (``dense_id``) another dense model than its seed's dense row:
    the rows of one suite and seed are paired, so they must come from one dense model. (Rows written before
    ``dense_id`` existed cannot be checked here; the harness checks them against the cached model before it adds
    rows.)"""
    dense = {(r["suite"], r["seed"]): r.get("dense_id") for r in rows if r["method"] == "dense"}
    bad = [r for r in rows if "dense_id" in r and dense.get((r["suite"], r["seed"]), r["dense_id"]) != r["dense_id"]]
    if bad:
        which = sorted({(r["suite"], r["seed"], r["method"]) for r in bad})
        raise DenseMismatchError(f"{raw}: {len(bad)} rows were measured on another dense model than their seed's "
                                 f"dense row (suite, seed, method: {which[:5]}{' ...' if len(which) > 5 else ''}); "
                                 "they cannot be paired")


def paired_difference(ours: dict[int, float], base: dict[int, float]) -> dict[str, Any] | None:
    """Mean of ``ours[seed] - base[seed]`` over the seeds both have, with a 95% t confidence interval."""
    from scipy import stats

    seeds = sorted(set(ours) & set(base))
    if len(seeds) < 2:
        return None
    d = np.array([ours[k] - base[k] for k in seeds], dtype=float)
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    mean_base = float(np.mean([base[k] for k in seeds]))
    return {"seeds": len(seeds), "mean_diff": float(d.mean()), "ci_low": float(d.mean() - half),
            "ci_high": float(d.mean() + half),
            "ratio": float(np.mean([ours[k] for k in seeds]) / mean_base) if mean_base else None}


# The metrics of issue 10's comparisons -> the key of the paired statistics on our row. FN at the dense model's
# validation FPR (threshold chosen on validation, applied to test: the issue's metric) and the same FPR read on the
# test ROC (threshold chosen on test: a point of the test ROC curve like AUC, no decision uses it; without the noise
# of an extreme quantile estimated on a small validation split).
PAIRED_METRICS = {"fn_at_dense_fpr": "paired", "fn_at_test_fpr": "paired_test_roc"}


def paired(summary_rows: list[dict[str, Any]], groups: dict[tuple, list[dict[str, Any]]],
           dense: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Issue 10's two comparisons: for our method of each comparison and each of :data:`PAIRED_METRICS`, the paired
    difference to the class-agnostic method with the lowest mean of that metric (the baseline), per suite and level.
    Stored on our row under the metric's key (``paired`` for FN at the dense FPR); also the same against every other
    baseline (``paired_all``, FN at the dense FPR).

    Where the dense models' own value is known (``dense``: the suite's dense rows), the statistics also hold it over
    the same seeds (``dense``), the ratio a pruned model that kept exactly the dense FN would score
    (``floor_ratio`` = dense / baseline) and the share of the FN that pruning added which ours still adds
    (``excess_ratio`` = (ours - dense) / (baseline - dense); None when the baseline adds none).

    Every variant of :data:`~benchmarks.suites.VARIANTS` also gets, per metric, its paired difference to the method
    it differs from in one thing (``paired_reference[metric]``); a variant of our method of a comparison (directly
    or through other variants, see :func:`comparison_root`) is also compared with that comparison's baselines."""
    from .suites import COMPARISONS, VARIANTS

    for metric, key in PAIRED_METRICS.items():
        per_seed: dict[tuple, dict[int, float]] = {}
        for g, rs in groups.items():
            per_seed[(g[0], g[4], g[6])] = {r["seed"]: r[metric] for r in rs if r.get(metric) is not None}
        for row in summary_rows:
            mine = per_seed.get((row["suite"], row["level"], row["method"]), {})
            for name, (ours, baselines) in COMPARISONS.items():
                if row["method"] != ours and comparison_root(row["method"]) != ours:
                    continue
                here = {b: per_seed.get((row["suite"], row["level"], b), {}) for b in baselines}
                here = {b: v for b, v in here.items() if v}
                if not here or not mine:
                    continue
                best = min(here, key=lambda b: np.mean(list(here[b].values())))
                row[key] = {"comparison": name, "baseline": best, **(paired_difference(mine, here[best]) or {})}
                own = {r["seed"]: r[metric] for r in (dense or {}).get(row["suite"], []) if r.get(metric) is not None}
                seeds = sorted(set(own) & set(mine) & set(here[best]))
                if seeds:
                    d, o, b = (float(np.mean([v[k] for k in seeds])) for v in (own, mine, here[best]))
                    row[key].update({"dense": d, "floor_ratio": d / b if b else None,
                                     "excess_ratio": (o - d) / (b - d) if b > d else None})
                if key == "paired":
                    row["paired_all"] = {b: paired_difference(mine, v) for b, v in here.items()}
            reference = VARIANTS.get(row["method"])
            ref = per_seed.get((row["suite"], row["level"], reference), {}) if reference else {}
            if ref and mine:
                row.setdefault("paired_reference", {})[metric] = {"reference": reference,
                                                                  **(paired_difference(mine, ref) or {})}


def comparison_root(method: str) -> str | None:
    """The method that ``method`` is a variant of, following :data:`~benchmarks.suites.VARIANTS` to its end
    (``pl_ours_la`` -> ``pl_ours_ce`` -> ``pl_ours``), or None when it is no variant."""
    from .suites import VARIANTS

    seen = [method]
    while seen[-1] in VARIANTS and VARIANTS[seen[-1]] not in seen:
        seen.append(VARIANTS[seen[-1]])
    return seen[-1] if len(seen) > 1 else None


def _f(x: Any, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def tables(summary: dict[str, Any]) -> str:
    out = []
    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in summary["rows"]:
        by_suite[r["suite"]].append(r)
    for suite, rs in by_suite.items():
        d = summary["dense"].get(suite, {})
        kind = rs[0]["level_kind"]
        out += [f"### {suite}: {rs[0]['dataset']}, {rs[0]['model']}, {rs[0]['regime']}", "",
                f"Dense: important-class FN {_f(d.get('fn_mean'))} ± {_f(d.get('fn_std'))}, accuracy "
                f"{_f(100 * d['accuracy_mean'] if d.get('accuracy_mean') is not None else None)}%, AUC {_f(d.get('auc_mean'), 4)}, "
                f"params {_f(d.get('params_mean'), 0)}, MACs {_f(d.get('macs_mean'), 0)} ({d.get('seeds', 0)} seeds).", "",
                f"| {kind} | method | class-aware | seeds | FN (test) | FN at dense FPR | FP | accuracy % | AUC | AP | params | "
                "MACs | reached | latency b1 ms (torch / ORT) | score s | stop |",
                "|---:|---|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rs, key=lambda r: (r["level"], r["method"])):
            out.append(
                f"| {r['level']} | {r['method']} | {'yes' if r['class_aware'] else 'no'} | {r['seeds']} | "
                f"{_f(r['fn_mean'])} ± {_f(r['fn_std'])} | "
                f"{_f(r['fn_at_dense_fpr_mean'])}{'' if r['fn_at_dense_fpr_std'] is None else ' ± ' + _f(r['fn_at_dense_fpr_std'])} | "
                f"{_f(r['fp_mean'])} | {_f(100 * r['accuracy_mean'])} | "
                f"{_f(r['auc_mean'], 4)} | {_f(r['ap_mean'], 3)} | {_f(r['params_mean'], 0)} | {_f(r['macs_mean'], 0)} | "
                f"{_f(r['reached_mean'], 2)} | {_f(r['latency_ms_b1_mean'], 2)} / {_f(r['onnx_latency_ms_b1_mean'], 2)}"
                f"{'' if r['latency_quiet'] else ' *'} | "
                f"{_f(r['score_seconds_mean'], 3)} | {', '.join(r['stop_reasons'])} |"
            )
        out.append("")
    out.append("\\* latency measured while other work shared the CPU (no cached model to re-measure alone): do not "
               "compare it.")
    return "\n".join(out) + "\n"


OURS = ("ours_taylor", "nni_classaware")  # our default per suite, in this order of preference
WITH_RULE = "ours_taylor_fn"


def _label(row: dict[str, Any], p: dict[str, Any]) -> str:
    """The comparison's name, and the method where the row is a variant of our method rather than our method."""
    name = p.get("comparison", row["comparison"])
    return name if row["comparison"] == name else f"{name}: {row['method']}"


def _diff(p: dict[str, Any] | None) -> str:
    """A paired difference with its 95% interval, or '-'."""
    return "-" if not p or "mean_diff" not in p else f"{p['mean_diff']:+.1f} ({p['ci_low']:+.1f}, {p['ci_high']:+.1f})"


def _paired_cells(r: dict[str, Any], b: dict[str, Any], p: dict[str, Any], metric: str) -> str:
    """The cells both comparison tables share, for ``metric``: suite, comparison, level, ours and the baseline
    (mean ± std), the paired difference, the ratio, the dense floor and the excess ratio."""
    return (f"| {r['suite']} | {_label(r, p)} | {r['level']} | {_f(r[f'{metric}_mean'])} ± {_f(r[f'{metric}_std'])} | "
            f"{p['baseline']}, {_f(b[f'{metric}_mean'])} ± {_f(b[f'{metric}_std'])} | {_diff(p)} | {p['ratio']:.3f} | "
            f"{_f(p.get('dense'))} ({_f(p.get('floor_ratio'), 3)}) | {_f(p.get('excess_ratio'), 2)} |")


def comparisons(summary: dict[str, Any]) -> str:
    """Issue 10's table: our method of each comparison against the best class-agnostic method, FN at the dense
    model's FPR (test, threshold from validation), paired over seeds; beside it the dense models' own FN at their
    FPR (what a pruned model that lost nothing would score; floor ratio = dense / baseline) and the excess ratio
    (ours - dense) / (baseline - dense)."""
    out = ["| suite | comparison | level | ours: FN at dense FPR | baseline: method, FN at dense FPR | paired diff (95% CI) "
           "| ratio | dense: FN at its FPR (floor ratio) | excess ratio | FN at argmax ours / baseline | accuracy % ours / "
           "baseline | AUC ours / baseline | reached ours |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {(r["suite"], r["level"], r["method"]): r for r in summary["rows"]}
    for r in summary["rows"]:
        p = r.get("paired")
        if not p or "mean_diff" not in p:
            continue
        b = rows[(r["suite"], r["level"], p["baseline"])]
        out.append(
            _paired_cells(r, b, p, "fn_at_dense_fpr") + f" {_f(r['fn_mean'])} / {_f(b['fn_mean'])} | "
            f"{_f(100 * r['accuracy_mean'])} / "
            f"{_f(100 * b['accuracy_mean'])} | {_f(r['auc_mean'], 4)} / {_f(b['auc_mean'], 4)} | {_f(r['reached_mean'], 2)} |"
        )
    out += ["", "The same comparisons with the dense model's FPR read on the test ROC (threshold chosen on test: a point "
            "of the test ROC curve, used by no decision; it drops the noise of a threshold estimated on the small "
            "validation split):", "",
            "| suite | comparison | level | ours: FN at dense FPR (test ROC) | baseline: method, FN | paired diff (95% CI) "
            "| ratio | dense (floor ratio) | excess ratio |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        p = r.get("paired_test_roc")
        if not p or "mean_diff" not in p:
            continue
        out.append(_paired_cells(r, rows[(r["suite"], r["level"], p["baseline"])], p, "fn_at_test_fpr"))
    out += ["", "Variants against the method they differ from in one thing (`VARIANTS` in suites.py), paired over "
            "seeds; FN at the dense FPR with the threshold from validation, and read on the test ROC:", "",
            "| suite | level | variant | reference | FN at dense FPR: variant / reference | paired diff (95% CI) | "
            "test ROC: variant / reference | paired diff (95% CI) | accuracy % variant / reference | reached variant |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        pr = r.get("paired_reference")
        if not pr:
            continue
        reference = next(iter(pr.values()))["reference"]
        b = rows[(r["suite"], r["level"], reference)]
        out.append(
            f"| {r['suite']} | {r['level']} | {r['method']} | {reference} | {_f(r['fn_at_dense_fpr_mean'])} / "
            f"{_f(b['fn_at_dense_fpr_mean'])} | {_diff(pr.get('fn_at_dense_fpr'))} | {_f(r['fn_at_test_fpr_mean'])} / "
            f"{_f(b['fn_at_test_fpr_mean'])} | {_diff(pr.get('fn_at_test_fpr'))} | {_f(100 * r['accuracy_mean'])} / "
            f"{_f(100 * b['accuracy_mean'])} | {_f(r['reached_mean'], 2)} |"
        )
    return "\n".join(out) + "\n"


def headline(summary: dict[str, Any]) -> str:
    """Per suite and level: our default class-aware method against the class-agnostic method with the fewest
    important-class FN (mean over seeds); AUC difference = ours - that baseline. Where the suite has the FN
    stopping rule, its FN and the compression where it stopped (mean over seeds)."""
    out = ["| suite | level | ours: FN (test) | best class-agnostic: method, FN | FN change | AUC ours - baseline | "
           "accuracy ours / baseline | ours + FN rule: FN at reached |",
           "|---|---:|---:|---|---:|---:|---:|---:|"]
    by: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in summary["rows"]:
        by[(r["suite"], r["level"])].append(r)
    for (suite, level), rs in sorted(by.items()):
        ours = next((r for m in OURS for r in rs if r["method"] == m), None)
        base = [r for r in rs if r["class_aware"] is False and r["fn_mean"] is not None]
        if ours is None or not base:
            continue
        b = min(base, key=lambda r: r["fn_mean"])
        change = (ours["fn_mean"] - b["fn_mean"]) / b["fn_mean"] * 100 if b["fn_mean"] else float("nan")
        rule = next((r for r in rs if r["method"] == WITH_RULE), None)
        rule_txt = "-" if rule is None else f"{_f(rule['fn_mean'])} at {_f(rule['reached_mean'], 2)}"
        out.append(
            f"| {suite} | {level} | {_f(ours['fn_mean'])} ± {_f(ours['fn_std'])} | {b['method']}, {_f(b['fn_mean'])} ± "
            f"{_f(b['fn_std'])} | {change:+.0f}% | {ours['auc_mean'] - b['auc_mean']:+.4f} | "
            f"{_f(100 * ours['accuracy_mean'])} / {_f(100 * b['accuracy_mean'])} | {rule_txt} |"
        )
    return "\n".join(out) + "\n"


def plots(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_suite: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in summary["rows"]:
        by_suite[r["suite"]].append(r)
    for suite, rs in by_suite.items():
        # Where the rows have FN at the dense model's FPR, it comes first: FN at argmax can be traded for FP.
        panels = [("fn", "important-class FN at argmax (test, mean ± sd)", "false negatives at argmax")]
        if any(r.get("fn_at_dense_fpr_mean") is not None for r in rs):
            panels.insert(0, ("fn_at_dense_fpr", "important-class FN at the dense FPR (test, mean ± sd)",
                              "FN at the dense model's FPR"))
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(6.5 * (len(panels) + 1), 4.5))
        methods = sorted({r["method"] for r in rs})
        colors = plt.cm.tab20.colors  # distinct colours for up to 20 methods (the default cycle repeats after 10)
        for i, m in enumerate(methods):
            pts = sorted((r for r in rs if r["method"] == m), key=lambda r: r["level"])
            # plotted where each method actually landed: the FN rule may stop before the target level
            xs = [r["reached_mean"] if r.get("reached_mean") is not None else r["level"] for r in pts]
            style = "-o" if pts[0]["class_aware"] else "--s"
            c = colors[i % len(colors)]
            for ax, (key, _, _) in zip(axes, panels):
                if all(r.get(f"{key}_mean") is not None for r in pts):
                    ax.errorbar(xs, [r[f"{key}_mean"] for r in pts], yerr=[r[f"{key}_std"] or 0 for r in pts], fmt=style,
                                label=m, capsize=3, color=c)
            axes[-1].plot(xs, [100 * r["accuracy_mean"] for r in pts], style, label=m, color=c)
        d = summary["dense"].get(suite)
        kind = rs[0]["level_kind"].replace("_", " ")
        kind += " reached" if rs[0]["regime"] != "nni" else ""
        for ax, (key, ylabel, title) in zip(axes, panels):
            if d and d.get(f"{key}_mean") is not None:
                ax.axhline(d[f"{key}_mean"], color="k", ls=":", label="dense")
            ax.set(xlabel=kind, ylabel=ylabel, title=f"{suite}: {title}")
        if d:
            axes[-1].axhline(100 * d["accuracy_mean"], color="k", ls=":")
        axes[-1].set(xlabel=kind, ylabel="accuracy % (test)", title=f"{suite}: accuracy")
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        fig.savefig(out / f"{suite}_fn.png", dpi=100)
        plt.close(fig)
