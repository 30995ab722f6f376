"""report.json, report.md (a table a clinician can read) and fn_vs_compression.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.controller import STOP_REASONS
from ..export import atomic_write, atomic_write_text



def _fmt_int(n: Any) -> str:
    return "-" if n is None else f"{int(n):,}"


def _fmt_pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def write_markdown(report: dict[str, Any]) -> str:
    names = report["class_names"]
    dense, pruned = report["dense"], report["pruned"]
    important = set(report["constraint"]["important_classes"])
    budget = report["constraint"]["budget"]
    lines = [
        "# Class-aware pruning report",
        "",
        f"Data set: **{report['dataset']}**. Important: "
        + ", ".join(f"**{names[c]}** (class {c})" for c in sorted(important))
        + ". Figures are on the held-out **test** split; decisions were taken on the validation split only.",
        "",
        "## Summary",
        "",
        "| | dense | pruned |",
        "|---|---:|---:|",
        f"| parameters | {_fmt_int(dense['params'])} | {_fmt_int(pruned['params'])} |",
        f"| non-zero parameters | {_fmt_int(dense['nonzero_params'])} | {_fmt_int(pruned['nonzero_params'])} |",
        f"| MACs | {_fmt_int(dense['macs'])} | {_fmt_int(pruned['macs'])} |",
        f"| accuracy | {_fmt_pct(dense['accuracy'])} | {_fmt_pct(pruned['accuracy'])} |",
        f"| CPU latency, batch 1 (ms) | {dense['latency_ms']:.2f} | {pruned['latency_ms']:.2f} |",
        *[f"| {rt} latency, batch {v['batch_size']} (ms) | {v['dense_ms']:.2f} | {v['pruned_ms']:.2f} "
          f"(**{v['speedup']:.2f}x** faster) |" for rt, v in report.get("speed", {}).items()],
        "",
        "## Per class (test split)",
        "",
        "Missed = false negatives (cases of the class the model did not recognise). "
        "False alarms = false positives (other cases the model called this class).",
        "",
        "| class | cases | missed, dense | missed, pruned | false alarms, dense | false alarms, pruned | recall, pruned |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c, name in enumerate(names):
        k = str(c)
        mark = " **(important)**" if c in important else ""
        lines.append(
            f"| {name}{mark} | {pruned['support'][k]} | {dense['fn'][k]} | {pruned['fn'][k]} | {dense['fp'][k]} | "
            f"{pruned['fp'][k]} | {_fmt_pct(pruned['recall'][k])} |"
        )
    lines += ["", "## The false-negative constraint", ""]
    con = report["constraint"]
    if con.get("rule") == "certified":
        lines += _guarantee_lines(report)
    for c in sorted(important):
        k = str(c)
        lines.append(
            f"- **{names[c]}**: validation{' (selection split)' if con.get('rule') == 'certified' else ''} misses "
            f"{report['dense']['validation']['fn'][k]} (dense) -> {report['pruned']['validation']['fn'][k]} (pruned), "
            f"{'most sent to certification' if con.get('rule') == 'certified' else 'budget'} {budget[k]}; test AUC-ROC "
            f"{_auc(dense['auc'].get(k))} -> {_auc(pruned['auc'].get(k))}."
        )
        d_op, p_op = dense.get("at_dense_fpr", {}).get(k), pruned.get("at_dense_fpr", {}).get(k)
        if d_op and p_op:
            lines.append(
                f"  At the dense model's false-alarm rate ({_fmt_pct(d_op['target_fpr'])} on validation; threshold "
                f"chosen on validation): test misses {d_op['test_fn']} (dense) -> {p_op['test_fn']} (pruned), false-alarm "
                f"rate {_fmt_pct(d_op['test_fpr'])} -> {_fmt_pct(p_op['test_fpr'])}; average precision "
                f"{_auc(dense['ap'].get(k))} -> {_auc(pruned['ap'].get(k))}."
            )
    sat = con["satisfied"]
    if con.get("rule") != "certified":
        lines.append(
            f"- Constraint on the validation split (count rule): **{'satisfied' if sat else 'NOT satisfied'}** "
            f"(abs_tol {con['abs_tol']}, rel_tol {con['rel_tol']}, max accuracy drop {con['max_accuracy_drop']}). "
            "A count on the data that chose every step: it is not a promise about new data.")
    lines += [
        f"- Why it stopped: {STOP_REASONS.get(report['stop_reason'], report['stop_reason'])}.",
    ]
    cal = report.get("calibration")
    if cal:
        lines.append(
            "- Decision calibration: important-class logits shifted by "
            + ", ".join(f"{names[int(c)]} +{s:.3f}" for c, s in cal["shifts"].items())
            + " (in the classifier bias); validation misses "
            + ", ".join(f"{cal['fn_before'][c]} -> {cal['fn_after'][c]}" for c in cal["fn_before"])
            + ", false alarms " + ", ".join(f"{cal['fp_before'][c]} -> {cal['fp_after'][c]}" for c in cal["fp_before"]) + "."
        )
    lines += ["", "## Steps", "", "| attempt | step | fraction | MACs | decision | important FN (val) | accuracy (val) |",
              "|---:|---:|---:|---:|---|---|---:|"]
    for r in report["history"]:
        fn = ", ".join(f"{names[c]}: {r['fn'][str(c)]}" for c in sorted(important))
        lines.append(
            f"| {r['attempt']} | {r['step']} | {r['fraction']:.3f} | {_fmt_int(r.get('macs'))} | {r['decision']} | {fn} | "
            f"{_fmt_pct(r['accuracy'])} |"
        )
    lines += ["", "![FN against compression](fn_vs_compression.png)", ""]
    ex = report.get("exports", {})
    if "onnx" in ex:
        lines.append(f"Exported: `{ex['pytorch']}` (PyTorch), `{ex['onnx']}` (ONNX; max abs difference to PyTorch "
                     f"{ex['onnx_max_abs_diff']:.2e}).")
    elif "pytorch" in ex:
        lines.append(f"Exported: `{ex['pytorch']}` (PyTorch).")
    processes = report.get("processes", 1)
    lines.append(f"Ran on {report.get('device', 'cpu')}"
                 f"{f' in {processes} processes (torch.distributed)' if processes > 1 else ''}; wall time "
                 f"{report['wall_time_s']} s.")
    return "\n".join(lines) + "\n"


def _guarantee_lines(report: dict[str, Any]) -> list[str]:
    """The certified rule's statement: the guarantee in one sentence, then per class what it rests on."""
    con, names = report["constraint"], report["class_names"]
    if not con["guarantee"]:
        return ["**No pruned model could be certified**: the first step's false-negative rate could not be shown to be "
                "within its budget on the held-out certification split, so the dense model is returned as it was.", ""]
    lines = [f"**Guarantee.** {con['sentence']}", ""]
    for k, g in con["guarantee"].items():
        lines.append(
            f"- **{names[int(k)]}**: budget {_fmt_pct(g['max_fn_rate'])} missed at most ({g['derived']}); on the "
            f"certification split ({g['positives']} cases, {_fmt_pct(con['certification_fraction'])} of validation, "
            f"used by nothing else) the pruned model missed {g['fn']}: Clopper-Pearson upper bound "
            f"{_fmt_pct(g['upper_bound'])} at level {g['delta']:g}"
            f"{' (delta split over the important classes)' if len(con['guarantee']) > 1 else ''}.")
    lines += [f"- The steps were certified in order and the run stops at the first that fails, so the guarantee holds "
              f"for the delivered model although {len(report['history'])} attempts were looked at; the budget, early "
              "stopping, the calibration shift and the accuracy guard used the selection split only.", ""]
    return lines


def _auc(x: Any) -> str:
    return "-" if x is None else f"{float(x):.3f}"


def write_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = report["class_names"]
    important = report["constraint"]["important_classes"]
    key = report["target"]["key"]
    dense_val = report["dense"]["validation"]
    xs_label = "MACs reduction (x)" if key == "macs_reduction" else "sparsity"
    x0 = 1.0 if key == "macs_reduction" else 0.0
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    acc = [r for r in report["history"] if r["decision"] == "accept"]
    rej = [r for r in report["history"] if r["decision"] != "accept"]
    for c in important:
        k = str(c)
        ax.plot([x0] + [r[key] for r in acc], [dense_val["fn"][k]] + [r["fn"][k] for r in acc], "o-",
                label=f"FN {names[c]} (accepted)")
        ax.plot([r[key] for r in rej], [r["fn"][k] for r in rej], "x", ms=9, label=f"FN {names[c]} (rolled back)")
        ax.plot([x0] + [r[key] for r in acc], [dense_val["fp"][k]] + [r["fp"][k] for r in acc], "s--",
                alpha=0.6, label=f"FP {names[c]}")
        what = "most sent to certification" if report["constraint"].get("rule") == "certified" else "budget"
        ax.axhline(report["constraint"]["budget"][k], color="red", ls=":",
                   label=f"{what}, {names[c]}: {report['constraint']['budget'][k]} FN")
    ax.set_xlabel(xs_label)
    ax.set_ylabel("count on validation")
    ax.set_title("Important-class errors over the pruning steps")
    ax2 = ax.twinx()
    ax2.plot([x0] + [r[key] for r in acc], [dense_val["accuracy"]] + [r["accuracy"] for r in acc], "k-.", alpha=0.5)
    ax2.set_ylabel("accuracy (dash-dot)")
    ax.legend(fontsize=7, loc="upper left")
    for ax, which, title in ((axes[1], "dense", "Dense, test"), (axes[2], "pruned", "Pruned, test")):
        cm = np.asarray(report[which]["confusion"])
        ax.imshow(cm, cmap="Blues")
        ax.set_title(f"{title}: confusion matrix")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ticks = range(len(names))
        ax.set_xticks(ticks, [n[:8] for n in names], rotation=60, fontsize=7)
        ax.set_yticks(ticks, [n[:8] for n in names], fontsize=7)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_report(report: dict[str, Any], run_dir: Path) -> None:
    atomic_write_text(run_dir / "report.json", json.dumps(report, indent=1))
    atomic_write_text(run_dir / "report.md", write_markdown(report))
    write_plot(report, run_dir / "fn_vs_compression.png")
