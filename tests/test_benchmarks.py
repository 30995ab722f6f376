"""The benchmark summary: schema of summary.json, the headline's choice of rows, plots at the compression reached."""
from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.methods import structured_steps
from benchmarks.summarize import summarize

ISSUE_KEYS = {"dataset", "model", "regime", "level", "level_kind", "method", "class_aware", "seeds", "fn_mean", "fn_std",
              "fp_mean", "accuracy_mean", "auc_mean", "params_mean", "macs_mean", "latency_ms_b1", "score_seconds"}


def _row(method, seed, fn, aware, reached=2.0, quiet=True, level=2.0):
    return {"suite": "s", "dataset": "d", "model": "m", "regime": "structured", "level": level,
            "level_kind": "macs_reduction", "method": method, "class_aware": aware, "seed": seed, "fn": fn,
            "fn_rate": fn / 100, "fp": 3, "accuracy": 0.9, "auc": 0.95 if aware else 0.94, "ap": 0.5, "params": 10,
            "macs": 100, "latency_ms_b1": 1.0, "latency_ms_b64": 5.0, "onnx_latency_ms_b1": 0.5,
            "onnx_latency_ms_b64": 2.0, "score_seconds": 0.1 if method == "ours_taylor" else None, "reached": reached,
            "stop_reason": "target_reached", **({"latency_pass": True} if quiet else {})}


def test_summary_schema_headline_and_plot(tmp_path):
    rows = [{"suite": "s", "dataset": "d", "model": "m", "regime": "structured", "method": "dense", "level": 0.0,
             "seed": 0, "class_aware": None, "fn": 20, "fn_rate": 0.2, "fp": 1, "accuracy": 0.95, "auc": 0.97,
             "ap": 0.6, "params": 20, "macs": 200}]
    for seed, (ours, nni_ours, rule, base_a, base_b) in enumerate([(10, 5, 8, 12, 30), (14, 5, 10, 16, 30)]):
        rows += [_row("ours_taylor", seed, ours, True), _row("nni_classaware", seed, nni_ours, True),
                 _row("ours_taylor_fn", seed, rule, True, reached=1.6), _row("tp_magnitude", seed, base_a, False),
                 _row("tp_taylor", seed, base_b, False, quiet=False)]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    summary = summarize(tmp_path)

    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == summary and len(saved["rows"]) == 5 and saved["dense"]["s"]["fn_mean"] == 20
    for r in saved["rows"]:
        assert ISSUE_KEYS <= set(r), ISSUE_KEYS - set(r)
    ours = next(r for r in saved["rows"] if r["method"] == "ours_taylor")
    assert (ours["fn_mean"], ours["fn_std"], ours["seeds"], ours["score_seconds"]) == (12.0, 2.0, 2, pytest.approx(0.1))
    # our default is ours_taylor even where the NNI variant has fewer FN; the baseline is the best class-agnostic one
    line = (tmp_path / "headline.md").read_text().splitlines()[2]
    assert "| 12.0 ± 2.0 | tp_magnitude, 14.0 ± 2.0 | -14% | +0.0100 |" in line
    assert line.endswith("| 9.0 at 1.60 |")  # the FN rule's FN and where it stopped
    tables = (tmp_path / "tables.md").read_text()
    tp_taylor = next(t for t in tables.splitlines() if "| tp_taylor |" in t)
    assert "0.50 *" in tp_taylor and "0.50 *" not in next(t for t in tables.splitlines() if "| tp_magnitude |" in t)
    assert (tmp_path / "s_fn.png").stat().st_size > 10_000


@pytest.mark.parametrize("reduction, steps", [(1.2, 1), (1.5, 1), (2.0, 2), (3.0, 3), (10.0, 6)])
def test_structured_steps_matches_the_channel_schedule(reduction, steps):
    assert structured_steps(reduction) == steps
    assert (0.8 ** (2 * steps)) <= 1 / reduction < (0.8 ** (2 * (steps - 1)))


def test_paired_comparison_picks_the_best_baseline_and_a_t_interval(tmp_path):
    """Issue 10's comparison: our score_only method against the class-agnostic method with the lowest mean FN at
    the dense FPR, paired by seed, 95% t interval (t_0.975 with 2 degrees of freedom = 4.3027)."""
    rows = []
    for seed, (ours, taylor, magnitude) in enumerate([(10, 14, 30), (12, 13, 31), (11, 15, 29)]):
        for method, v in (("so_fisher", ours), ("so_tp_taylor", taylor), ("so_tp_magnitude", magnitude)):
            rows.append({**_row(method, seed, 50, method == "so_fisher"), "fn_at_dense_fpr": v,
                         "comparison": "score_only"})
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(tmp_path)
    ours = next(r for r in summary["rows"] if r["method"] == "so_fisher")
    p = ours["paired"]
    diffs = [10 - 14, 12 - 13, 11 - 15]  # mean -3, sample sd sqrt(3)
    half = 4.302652729911275 * 3 ** 0.5 / 3 ** 0.5
    assert p["baseline"] == "so_tp_taylor" and p["seeds"] == 3
    assert p["mean_diff"] == pytest.approx(sum(diffs) / 3)
    assert (p["ci_low"], p["ci_high"]) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
    assert p["ratio"] == pytest.approx(11 / 14)
    assert ours["comparison"] == "score_only" and "so_tp_magnitude" in ours["paired_all"]
    assert "| s | score_only | 2.0 | 11.0 ± 0.8 | so_tp_taylor, 14.0 ± 0.8 | -3.0 (-7.3, +1.3) | 0.786 |" in \
        (tmp_path / "headline.md").read_text()


def test_duplicate_rows_of_concurrent_processes_count_once(tmp_path):
    dense = {"suite": "s", "dataset": "d", "model": "m", "regime": "structured", "method": "dense", "level": 0.0,
             "class_aware": None, "fn": 20, "fp": 1, "accuracy": 0.9, "auc": 0.9, "ap": 0.5, "params": 1, "macs": 1}
    rows = [{**dense, "seed": 0, "fn": 10}, {**dense, "seed": 0, "fn": 10}, {**dense, "seed": 0, "fn": 10},
            {**dense, "seed": 1, "fn": 20}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(tmp_path)
    assert summary["dense"]["s"]["seeds"] == 2 and summary["dense"]["s"]["fn_mean"] == 15.0


def test_test_roc_comparison_reports_the_dense_floor_and_excess_ratio(tmp_path):
    """The second metric (FN at the dense FPR read on the test ROC) is paired on its own: its baseline is the
    class-agnostic method with the lowest mean of *that* metric, and the dense models' own value gives the floor."""
    rows = [{"suite": "s", "dataset": "d", "model": "m", "regime": "structured", "method": "dense", "level": 0.0,
             "seed": seed, "class_aware": None, "fn": 20, "fp": 1, "accuracy": 0.9, "auc": 0.9, "ap": 0.5, "params": 1,
             "macs": 1, "fn_at_dense_fpr": 9, "fn_at_test_fpr": 8} for seed in (0, 1)]
    for seed, (ours, taylor, magnitude) in enumerate([(10, 14, 12), (12, 12, 16)]):
        for method, v in (("so_fisher", ours), ("so_tp_taylor", taylor), ("so_tp_magnitude", magnitude)):
            rows.append({**_row(method, seed, 50, method == "so_fisher"), "fn_at_dense_fpr": 30 - v,
                         "fn_at_test_fpr": v, "comparison": "score_only"})
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours = next(r for r in summarize(tmp_path)["rows"] if r["method"] == "so_fisher")
    # FN at the dense FPR: magnitude has the lowest mean (16 against 17); on the test ROC taylor does (13 < 14)
    assert ours["paired"]["baseline"] == "so_tp_magnitude"
    p = ours["paired_test_roc"]
    assert p["baseline"] == "so_tp_taylor" and p["mean_diff"] == pytest.approx(-2.0)
    assert (p["dense"], p["floor_ratio"], p["excess_ratio"]) == (8.0, pytest.approx(8 / 13), pytest.approx(3 / 5))
    assert "| s | score_only | 2.0 | 11.0 ± 1.0 | so_tp_taylor, 13.0 ± 1.0 | -2.0 (" in (tmp_path / "headline.md").read_text()


def test_variants_are_paired_with_the_method_they_differ_from(tmp_path):
    """A variant (``VARIANTS``: here the pipeline with logit-adjusted fine-tuning) is paired by seed with its
    reference (the pipeline with cross-entropy) on both metrics, and listed in headline.md's variants table."""
    rows = []
    for seed, (la, ce) in enumerate([(10, 14), (12, 13), (11, 15)]):
        for method, v in (("pl_ours_la", la), ("pl_ours_ce", ce)):
            rows.append({**_row(method, seed, 50, True), "fn_at_dense_fpr": v, "fn_at_test_fpr": v + 1})
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    la = next(r for r in summarize(tmp_path)["rows"] if r["method"] == "pl_ours_la")
    val, roc = la["paired_reference"]["fn_at_dense_fpr"], la["paired_reference"]["fn_at_test_fpr"]
    assert val["reference"] == roc["reference"] == "pl_ours_ce"
    assert val["mean_diff"] == roc["mean_diff"] == pytest.approx(-3.0) and val["seeds"] == 3
    assert "| s | 2.0 | pl_ours_la | pl_ours_ce | 11.0 / 14.0 | -3.0 (-7.3, +1.3) | 12.0 / 15.0 | -3.0 (-7.3, +1.3) |" \
        in (tmp_path / "headline.md").read_text()


def test_a_variant_of_our_pipeline_meets_the_pipeline_baselines(tmp_path):
    """pl_ours_la -> pl_ours_ce -> pl_ours: the variant is also paired with the best class-agnostic method of the
    pipeline comparison, and its row is labelled with its name in headline.md."""
    rows = []
    for seed, (la, taylor) in enumerate([(10, 14), (12, 13), (11, 15)]):
        for method, v, aware in (("pl_ours_la", la, True), ("so_tp_taylor", taylor, False)):
            rows.append({**_row(method, seed, 50, aware), "fn_at_dense_fpr": v, "fn_at_test_fpr": v})
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    la = next(r for r in summarize(tmp_path)["rows"] if r["method"] == "pl_ours_la")
    p = la["paired"]
    assert (p["comparison"], p["baseline"], p["mean_diff"]) == ("pipeline", "so_tp_taylor", pytest.approx(-3.0))
    assert "| s | pipeline: pl_ours_la | 2.0 | 11.0 ± 0.8 | so_tp_taylor, 14.0 ± 0.8 | -3.0 (" in \
        (tmp_path / "headline.md").read_text()


def test_bn_recalibration_re_estimates_the_statistics_and_touches_nothing_else():
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.methods import Context

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3) * 2 + 5
    loader = DataLoader(TensorDataset(x, torch.zeros(256, dtype=torch.long)), batch_size=32, shuffle=True, generator=g)
    ctx = Context(suite=None, seed=0, dense=nn.Identity(), init_state={}, early_state={},
                  loaders={"train": loader, "generator": g}, num_classes=2, input_shape=(3,), train_counts=[1, 1])
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=0.3), nn.Linear(3, 2)).eval()
    model[0].running_mean.fill_(-7.0)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    ctx.bn_recalibration(batches=4)(model)
    seen = torch.cat([b for (b,) in list(DataLoader(TensorDataset(x), batch_size=32, shuffle=True,
                                                    generator=torch.Generator().manual_seed(0)))[:4]])
    torch.testing.assert_close(model[0].running_mean, seen.mean(0))  # the first 4 batches, cumulative average
    assert model[0].momentum == 0.3 and not model.training
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_dense_fingerprint_tells_two_dense_models_apart():
    import copy

    import torch
    from torch import nn

    from benchmarks.harness import dense_id

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    b = copy.deepcopy(a)
    assert dense_id(a) == dense_id(b) and len(dense_id(a)) == 12
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6  # one value, one ulp-scale change: another model
    assert dense_id(a) != dense_id(b)


def test_rows_of_another_dense_model_are_refused_before_rows_are_added(tmp_path):
    from benchmarks.harness import DenseMismatchError, _check_dense, foreign_rows
    from benchmarks.suites import SUITES

    ident = {"fn": 4, "fp": 0, "accuracy": 0.98, "auc": 0.9998}
    calls = []

    def measured():
        calls.append(1)
        return ident

    tagged = [{"method": "dense", "dense_id": "aaa"}, {"method": "so_fisher", "dense_id": "aaa"},
              {"method": "nf_fisher", "dense_id": "bbb"}]
    assert [r["method"] for r in foreign_rows(tagged, "aaa", measured)] == ["nf_fisher"] and not calls
    # Rows written before dense_id existed belong to the model their seed's dense row measured.
    legacy = [{"method": "dense", **ident}, {"method": "so_fisher"}]
    assert foreign_rows(legacy, "aaa", measured) == [] and calls == [1]
    other = [{"method": "dense", **ident, "fn": 5}, {"method": "so_fisher"}]
    assert [r["method"] for r in foreign_rows(other, "aaa", measured)] == ["dense", "so_fisher"]
    assert [r["method"] for r in foreign_rows([{"method": "so_fisher"}], "aaa", measured)] == ["so_fisher"]

    with pytest.raises(DenseMismatchError, match=r"suite 'digits_protocol' seed 3 \(methods dense, so_fisher\).*--out"):
        _check_dense(tmp_path / "raw.jsonl", SUITES["digits_protocol"], 3, "aaa", other, measured)


def test_summary_refuses_to_pair_rows_of_two_dense_models(tmp_path):
    rows = [{**_row("so_fisher", 0, 10, True), "dense_id": "bbb"}, {**_row("so_tp_taylor", 0, 12, False), "dense_id": "aaa"},
            {"suite": "s", "dataset": "d", "model": "m", "regime": "structured", "method": "dense", "level": 0.0,
             "seed": 0, "class_aware": None, "fn": 20, "fp": 1, "accuracy": 0.95, "auc": 0.97, "dense_id": "aaa"}]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"\('s', 0, 'so_fisher'\).*cannot be paired"):
        summarize(tmp_path)
    rows[0]["dense_id"] = "aaa"
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(summarize(tmp_path)["rows"]) == 2


def test_dense_loss_pairs_the_two_dense_models_of_each_seed():
    from benchmarks.dense_loss import METRICS, summarize as summarize_dense, table

    def model(fn):
        return {**{m: 0.5 for m in METRICS}, "fn_at_dense_fpr": fn}

    rows = [{"suite": "s", "seed": k, "ce": model(100 + k), "class_dependent": model(90 + 2 * k)} for k in range(3)]
    s = summarize_dense(rows)["s"]
    assert s["ce_fn_at_dense_fpr_mean"] == 101 and s["class_dependent_fn_at_dense_fpr_mean"] == 92
    p = s["fn_at_dense_fpr_paired"]  # differences -10, -9, -8
    half = 4.3027 / 3 ** 0.5  # t(0.975, 2 dof) * sd 1 / sqrt(3)
    assert p["mean_diff"] == -9 and p["ci_low"] == pytest.approx(-9 - half, abs=1e-3)
    assert p["ci_high"] == pytest.approx(-9 + half, abs=1e-3)
    assert "| s | fn_at_dense_fpr | 101.0 ± 0.8 | 92.0 ± 1.6 | -9.0 (" in table({"s": s})


def test_a_seed_with_every_row_done_loads_neither_data_nor_a_dense_model(tmp_path, monkeypatch):
    from dataclasses import replace

    import benchmarks.harness as harness
    from benchmarks.suites import SUITES

    suite = replace(SUITES["digits_protocol"], name="s", methods=("so_fisher",), levels=(2.0,), seeds=(0, 1))
    rows = [{"suite": "s", "method": m, "level": v, "seed": 0} for m, v in (("dense", 0.0), ("so_fisher", 2.0))]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = []

    def data(suite, seed):
        loaded.append(seed)
        raise RuntimeError("stop")  # seed 1 has work: it gets as far as loading its data

    monkeypatch.setattr(harness, "_data", data)
    with pytest.raises(RuntimeError, match="stop"):
        harness.run_suite(suite, tmp_path)
    assert loaded == [1]


def test_guarantee_summary_counts_violations_over_promises_and_pairs_on_shared_seeds(tmp_path):
    from benchmarks.guarantee import paired, summarize as summarize_guarantee, write

    def row(seed, rule, certified, test_rate, compression, budget=0.3, cpu=10.0, attempts=4):
        return {"data": "digits", "seed": seed, "rule": rule, "budget": budget, "certified": certified,
                "test_fn_rate": test_rate, "more_fn_than_dense": False, "compression_key": "macs_reduction",
                "compression": compression, "accuracy": 0.9, "cpu_seconds": cpu, "attempts": attempts}

    rows = [row(0, "certified", True, 0.2, 4.0), row(1, "certified", True, 0.4, 5.0),
            row(2, "certified", False, 0.9, 1.0),  # certified nothing: the dense model, no promise, above the budget
            row(0, "count", False, 0.35, 6.0, cpu=20.0), row(1, "count", True, 0.1, 2.5, cpu=20.0)]
    s = summarize_guarantee(rows)
    assert (s["digits/certified"]["runs"], s["digits/certified"]["promises"], s["digits/certified"]["violations"]) == (3, 2, 1)
    assert (s["digits/count"]["promises"], s["digits/count"]["violations"]) == (2, 1)  # the count rule always promises
    p = paired(rows)["digits: certified vs count"]
    assert p["seeds"] == 2 and p["median_compression_ratio"] == np.median([4.0 / 6.0, 5.0 / 2.5])
    assert p["median_cpu_ratio"] == 0.5
    write(tmp_path, rows)
    assert "certified vs count" in (tmp_path / "guarantee.md").read_text() and (tmp_path / "guarantee.png").exists()


def test_variance_split_tells_allocation_from_fine_tuning_noise():
    from benchmarks.allocation import variance_split

    rng = np.random.default_rng(0)
    # the allocation decides everything: candidate means 10 apart, fine-tuning noise of SD 1
    decided = [{"candidate": k, "repeat": r, "fn": 10 * k + rng.normal()} for k in range(8) for r in range(4)]
    v = variance_split(decided, "fn")
    assert (v["candidates"], v["repeats"]) == (8, 4)
    assert v["icc"] > 0.99 and v["p"] < 1e-6 and 0.5 < v["sd_within"] < 1.5 and 20 < v["sd_between"] < 30
    # the allocation decides nothing: the same distribution for every candidate
    noise = [{"candidate": k, "repeat": r, "fn": rng.normal()} for k in range(8) for r in range(4)]
    v = variance_split(noise, "fn")
    assert v["icc_low"] == 0.0 and v["icc"] < 0.5 and v["icc_low"] <= v["icc"] <= v["icc_high"] < 1
    # an unfinished candidate (one repeat) is left out; the others are cut to the same number of repeats
    v = variance_split(decided + [{"candidate": 9, "repeat": 0, "fn": 0.0}], "fn")
    assert v["candidates"] == 8


def test_allocation_summary_pairs_against_the_better_class_agnostic_method_and_the_accuracy_search():
    from benchmarks.allocation import summarize as summarize_allocation, table

    fn = {"search_classaware": [10, 12, 14], "search_accuracy": [13, 15, 20], "tp_taylor": [20, 21, 22],
          "nni_l1": [15, 16, 17]}
    rows = [{"suite": "x", "model": "m", "level": 3.0, "method": m, "seed": s, "reached": 3.1,
             "fn_at_dense_fpr": v[s], "accuracy": 0.9, "auc": 0.95, "seconds": 10.0,
             "search_seconds": 5.0 if m.startswith("search") else 0.0}
            for m, v in fn.items() for s in range(3)]
    dense = {("x", s): {"fn_at_dense_fpr": 10} for s in range(3)}
    out = {r["method"]: r for r in summarize_allocation(rows, dense)}
    a = out["search_classaware"]
    assert a["excess_fn_mean"] == 2.0 and a["search_share"] == 0.5 and out["nni_l1"]["search_share"] == 0.0
    assert a["paired"]["baseline"] == "nni_l1" and a["paired"]["mean_diff"] == -4.0  # NNI's excess 6 < TP's 11
    assert a["paired"]["excess_ratio"] == 2.0 / 6.0 and a["paired"]["ci_low"] < -4.0 < a["paired"]["ci_high"]
    assert a["vs_accuracy_search"]["mean_diff"] == -4.0 and "paired" not in out["nni_l1"]
    assert "vs_accuracy_search" not in out["search_accuracy"]
    assert "| x | 3x | search_classaware | 3 |" in table(list(out.values()))
