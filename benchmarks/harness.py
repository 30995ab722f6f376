"""Runs suites: trains (and caches) the dense model per seed, runs every method at every level, measures,
appends one JSON row per (suite, method, level, seed) to results/raw.jsonl (a re-run skips rows already there)."""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, Subset

from classaware_plugin.core import ClassDependentLoss, evaluate, evaluate_predictions, fn_at_fpr, fpr_of, predict, set_quiet, train
from classaware_plugin.core.progress import progress_bar
from classaware_plugin.data import load_dataset
from classaware_plugin.export import atomic_save, atomic_write_text, export_onnx
from classaware_plugin.files import load_model, load_object
from classaware_plugin.models import build_model
from classaware_plugin.speed import latency_ms
from classaware_plugin.torch_pruning import ClassAwareImportance, accumulate_gradients, count_params_macs

from .methods import CLASS_AWARE, NNI_METHODS, STRUCTURED, UNSTRUCTURED, Context
from .suites import COMPARISONS, QUICK, SUITES, Suite
from .summarize import DenseMismatchError, read_jsonl

log = logging.getLogger("benchmarks")
RESULTS = Path(__file__).parent / "results"
CACHE = RESULTS / "cache"


def _data(suite: Suite, seed: int):
    d = suite.data
    bundle = load_dataset(d.name, important=list(d.important), keep_fraction=d.keep_fraction, seed=seed, **d.kwargs)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed + 1))
    calib = Subset(bundle.train, perm[: min(len(bundle.train), suite.calib_batches * suite.batch_size)].tolist())
    loaders = {
        "train": DataLoader(bundle.train, batch_size=suite.batch_size, shuffle=True, generator=g),
        "generator": g,
        "calib": DataLoader(calib, batch_size=suite.batch_size),
        "val": DataLoader(bundle.val, batch_size=512),
        "test": DataLoader(bundle.test, batch_size=512),
    }
    return bundle, loaders


@functools.cache
def _input_shape(suite_name: str) -> tuple[int, ...]:
    d = SUITES[suite_name].data
    return tuple(load_dataset(d.name, important=list(d.important), keep_fraction=d.keep_fraction, **d.kwargs).input_shape)


def _dense_path(suite: Suite, seed: int) -> Path:
    # Every setting that shapes the dense model is in the key.
    key = repr((suite.data, suite.model_kwargs, suite.dense_epochs, suite.lr, suite.rank_weight, suite.batch_size,
                suite.dense_loss, suite.dense_schedule, suite.weight_decay))
    return CACHE / f"{suite.data.name}_{suite.model}_{seed}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def _dense(suite: Suite, seed: int, bundle: Any, loaders: dict[str, Any]) -> tuple[nn.Module, dict, dict, float]:
    path = _dense_path(suite, seed)
    if path.exists():
        blob = load_object(path, what="cached dense model")
        return blob["model"], blob["init"], blob["early"], blob["seconds"]
    torch.manual_seed(seed)
    model = build_model(suite.model, bundle.num_classes, bundle.input_shape, **suite.model_kwargs)
    init = copy.deepcopy(model.state_dict())
    loss = (nn.CrossEntropyLoss() if suite.dense_loss == "ce" else
            ClassDependentLoss(list(suite.data.important), class_counts=bundle.train_counts, rank_weight=suite.rank_weight))
    kw = dict(lr=suite.lr, weight_decay=suite.weight_decay, progress=False)
    t = time.time()
    if suite.dense_schedule == "cosine":  # one annealed run; no late-rewinding point (the rewind point is the init)
        train(model, loaders["train"], loss, epochs=suite.dense_epochs, schedule="cosine", **kw)
        early = init
    else:
        train(model, loaders["train"], loss, epochs=1, **kw)
        early = copy.deepcopy(model.state_dict())
        if suite.dense_epochs > 1:
            train(model, loaders["train"], loss, epochs=suite.dense_epochs - 1, **kw)
    seconds = time.time() - t
    atomic_save({"model": model.eval(), "init": init, "early": early, "seconds": seconds}, path)
    return model, init, early, seconds


def dense_id(model: nn.Module) -> str:
    """The fingerprint of a dense model: sha1 of its state_dict (names and values), 12 hex digits. Every row carries
    the fingerprint of the dense model it was measured on, so that rows of two different dense models of one seed (a
    cache lost and retrained by other code) are never paired."""
    h = hashlib.sha1()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# What identifies the dense model of rows written before rows carried ``dense_id``: its seed's dense row.
DENSE_IDENTITY = ("fn", "fp", "accuracy", "auc")


def foreign_rows(rows: list[dict[str, Any]], did: str, measured: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """Those of ``rows`` (one suite and seed) that were measured on another dense model than the one whose fingerprint
    is ``did``. A row names its dense model by ``dense_id``; rows without it (written before the field existed)
    belong to the model their seed's dense row measured, which is this one if ``measured()`` (this model's test
    metrics, called only then) gives the same FN, FP, accuracy and AUC."""
    foreign = [r for r in rows if r.get("dense_id", did) != did]
    legacy = [r for r in rows if "dense_id" not in r]
    if legacy:
        row = next((r for r in legacy if r["method"] == "dense"), None)
        now = measured()
        if row is None or any(abs(row[k] - now[k]) > 1e-6 for k in DENSE_IDENTITY):
            foreign += legacy
    return foreign


def class_metrics(test: tuple[Any, Any], important: list[int], num_classes: int) -> dict[str, Any]:
    """The (first) important class's FN, FN rate, FP, AUC and AP and the accuracy, from test predictions."""
    ev = evaluate_predictions(*test, important, num_classes)
    c = important[0]
    return {"fn": ev.fn[c], "fn_rate": ev.fn[c] / max(ev.support[c], 1), "fp": ev.fp[c], "accuracy": ev.accuracy,
            "auc": ev.auc[c], "ap": ev.ap[c]}


def dense_val_fpr(dense: nn.Module, loaders: dict[str, Any], important: list[int]) -> float:
    """The dense model's validation FPR of the (first) important class at argmax: the operating point at which
    every model of its seed is read (:func:`operating_point`)."""
    return fpr_of(evaluate(dense, loaders["val"], important), important[0])


def operating_point(model: nn.Module, loaders: dict[str, Any], important: list[int], num_classes: int,
                    fpr: float) -> dict[str, Any]:
    """:func:`class_metrics` on test, and FN at FPR ``fpr`` (the dense model's, :func:`dense_val_fpr`): with the
    threshold chosen on validation and applied to test (``fn_at_dense_fpr``, ``fpr_at_dense_fpr``), and read on the
    test ROC (``fn_at_test_fpr``)."""
    test = predict(model, loaders["test"])
    c = important[0]
    op = fn_at_fpr(predict(model, loaders["val"]), test, c, fpr)
    return {**class_metrics(test, important, num_classes), "fn_at_dense_fpr": op.test_fn,
            "fpr_at_dense_fpr": op.test_fpr, "fn_at_test_fpr": fn_at_test_fpr(test, c, fpr)}


def measure(model: nn.Module, ctx: Context, unstructured: bool, dense_macs: int) -> dict[str, Any]:
    params, macs = count_params_macs(model, torch.zeros(1, *ctx.input_shape))
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    row = {
        **operating_point(model, ctx.loaders, ctx.important, ctx.num_classes, ctx.dense_fpr),
        "dense_val_fpr": ctx.dense_fpr, "params": params - zeros if unstructured else params,
        "macs": macs if not unstructured else dense_macs,
    }
    return {**row, **latencies(model, ctx.input_shape)}


def fn_at_test_fpr(test: tuple[Any, Any], c: int, fpr: float) -> int:
    """FN of class ``c`` at FPR ``fpr`` read on the test ROC curve (the threshold chosen on test itself): a point of
    the curve, as AUC is its area; no decision uses it."""
    return fn_at_fpr(test, test, c, fpr).test_fn


def _kept_model(suite: Suite, row: dict[str, Any], out: Path) -> nn.Module | None:
    """The model of one raw row where it is kept (the cached dense model, or the pruned one in ``models/``), or None."""
    if row["method"] == "dense":
        path = _dense_path(suite, row["seed"])
        return load_object(path, what="cached dense model")["model"] if path.exists() else None
    path = model_path(out, row["suite"], row["method"], row["level"], row["seed"])
    return load_model(path) if path.exists() else None


def rescore(names: list[str] | None, out: Path = RESULTS) -> int:
    """Add ``fn_at_test_fpr`` to every raw row of the named suites (default: all) that lacks it and whose model is
    kept (cached dense models, pruned models in ``models/``), and rewrite raw.jsonl atomically. Do not run it while
    a suite is appending rows. Returns the number of rows completed."""
    raw = out / "raw.jsonl"
    if not raw.exists():
        raise FileNotFoundError(f"No rows to rescore: {raw} does not exist (run the suites first).")
    rows = read_jsonl(raw)
    data: dict[tuple[str, int], Any] = {}
    done = 0
    for r in progress_bar(rows, desc="rescore"):
        suite = SUITES.get(r["suite"])
        if (names and r["suite"] not in names) or suite is None or "fn_at_test_fpr" in r or "dense_val_fpr" not in r:
            continue
        model = _kept_model(suite, r, out)
        if model is None:
            continue
        if (suite.name, r["seed"]) not in data:
            data[(suite.name, r["seed"])] = _data(suite, r["seed"])
        bundle, loaders = data[(suite.name, r["seed"])]
        test = predict(model.eval(), loaders["test"])
        important = list(suite.data.important)
        if r["method"] == "dense" and foreign_rows([r], dense_id(model),
                                                   lambda: class_metrics(test, important, bundle.num_classes)):
            log.warning("rescore: the cached dense model of %s seed %d is not the one its row measured; row left as "
                        "it is", suite.name, r["seed"])
            continue
        r["fn_at_test_fpr"] = fn_at_test_fpr(test, important[0], r["dense_val_fpr"])
        done += 1
    atomic_write_text(raw, "".join(json.dumps(r) + "\n" for r in rows))
    return done


def latencies(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Median CPU latency at batch 1 and 64 in PyTorch and in onnxruntime (after an ONNX export whose outputs are
    checked against PyTorch: ``onnx_max_abs_diff``)."""
    import onnxruntime as ort

    ex, x64 = torch.zeros(1, *input_shape), torch.randn(64, *input_shape)
    row = {"latency_ms_b1": latency_ms(model, ex), "latency_ms_b64": latency_ms(model, x64, repeats=10)}
    with tempfile.TemporaryDirectory() as tmp:  # one file per call: several benchmark processes may run at once
        onnx_path = Path(tmp) / "model.onnx"
        row["onnx_max_abs_diff"] = export_onnx(model, x64[:4], onnx_path, exporter="legacy")  # as the committed rows
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for b, x in ((1, ex), (64, x64)):
        feed = {"input": x.numpy()}
        for _ in range(3):
            sess.run(None, feed)
        ts = []
        for _ in range(10 if b == 64 else 30):
            t = time.perf_counter()
            sess.run(None, feed)
            ts.append((time.perf_counter() - t) * 1000)
        row[f"onnx_latency_ms_b{b}"] = float(np.median(ts))
    return row


def remeasure_latency(names: list[str] | None, out: Path = RESULTS) -> int:
    """Re-measure the latency of every raw row of the named suites (default: all) whose model is cached, one model
    at a time, and rewrite raw.jsonl atomically. Meant to run alone on the machine: the rows measured during a
    suite shared the CPU with whatever else ran. Returns the number of rows re-measured."""
    raw = out / "raw.jsonl"
    if not raw.exists():
        raise FileNotFoundError(f"No rows to re-measure: {raw} does not exist (run the suites first).")
    rows = read_jsonl(raw)
    done = 0
    for r in progress_bar(rows, desc="latency"):
        if names and r["suite"] not in names:
            continue
        suite = SUITES.get(r["suite"])
        if suite is None:
            continue
        model = _kept_model(suite, r, out)
        if model is None:
            continue
        r.update(latencies(model.eval(), _input_shape(suite.name)), latency_pass=True)
        done += 1
    atomic_write_text(raw, "".join(json.dumps(r) + "\n" for r in rows))
    return done


def score_seconds(ctx: Context, method: str, structured: bool) -> float | None:
    """Time of one scoring pass of a data-driven score on the calibration batches (dense model)."""
    model = copy.deepcopy(ctx.dense)
    timed = {"ours_taylor": "taylor_signed", "so_fisher": "fisher", "tp_taylor": None, "so_tp_taylor": None}
    if structured and method in timed:
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *ctx.input_shape))
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        groups = list(DG.get_all_groups(ignored_layers=[last], root_module_types=[nn.Conv2d, nn.Linear]))
        t = time.perf_counter()
        if timed[method] is not None:
            imp = ClassAwareImportance(ctx.important, score=timed[method], num_classes=ctx.num_classes)
            imp.collect(model, ctx.loaders["calib"])
        else:
            imp = tp.importance.GroupTaylorImportance()
            accumulate_gradients(model, ctx.loaders["calib"])
        for g in groups:
            imp(g)
        return time.perf_counter() - t
    return None


def run_suite(suite: Suite, out: Path) -> list[dict[str, Any]]:
    raw = out / "raw.jsonl"
    done: dict[tuple, dict[str, Any]] = {}
    if raw.exists():
        for line in raw.read_text().splitlines():
            r = json.loads(line)
            done[(r["suite"], r["method"], r["level"], r["seed"])] = r
    methods = {"structured": {**STRUCTURED, **NNI_METHODS}, "unstructured": UNSTRUCTURED, "nni": NNI_METHODS}[suite.regime]
    rows = []
    for seed in suite.seeds:
        keys = [(suite.name, "dense", 0.0, seed)] + [(suite.name, m, v, seed) for m in suite.methods for v in suite.levels]
        if all(k in done for k in keys):
            continue  # nothing left to do: neither data nor a dense model (trained afresh on a cold cache) is needed
        bundle, loaders = _data(suite, seed)
        dense, init, early, dense_seconds = _dense(suite, seed, bundle, loaders)

        def previous(method: str, level: float, seed: int = seed) -> tuple[nn.Module, dict[str, Any]] | None:
            row, path = done.get((suite.name, method, level, seed)), model_path(out, suite.name, method, level, seed)
            return (load_model(path), row) if row is not None and path.exists() else None

        ctx = Context(suite, seed, dense, init, early, loaders, bundle.num_classes, bundle.input_shape, bundle.train_counts,
                      previous)
        ctx.dense_fpr = dense_val_fpr(dense, loaders, ctx.important)
        did = dense_id(dense)
        # before any work of this seed: new rows must pair with the ones there
        _check_dense(raw, suite, seed, did, [r for k, r in done.items() if k[0] == suite.name and k[3] == seed],
                     lambda: class_metrics(predict(dense, loaders["test"]), ctx.important, ctx.num_classes))
        dense_macs = count_params_macs(dense, torch.zeros(1, *bundle.input_shape))[1]
        if (suite.name, "dense", 0.0, seed) not in done:
            row = {"suite": suite.name, "dataset": suite.data.label, "model": suite.model, "regime": suite.regime,
                   "method": "dense", "level": 0.0, "seed": seed, "class_aware": None, "dense_id": did,
                   "train_seconds": dense_seconds, **measure(dense, ctx, False, dense_macs)}
            _append(raw, row)
            rows.append(row)
        for method in suite.methods:
            for level in suite.levels:
                if (suite.name, method, level, seed) in done:
                    continue
                torch.manual_seed(seed)
                t = time.time()
                log.info("%s seed %d: %s at %s", suite.name, seed, method, level)
                model, info = methods[method](ctx, level)
                row = {
                    "suite": suite.name, "dataset": suite.data.label, "model": suite.model, "regime": suite.regime,
                    "level": level,
                    "level_kind": {"structured": "macs_reduction", "unstructured": "sparsity", "nni": "sparse_ratio"}[suite.regime],
                    "method": method, "class_aware": method in CLASS_AWARE, "seed": seed, "dense_id": did,
                    "comparison": comparison_of(method),
                    "seconds": time.time() - t, **info,
                    **measure(model, ctx, suite.regime == "unstructured", dense_macs),
                    "score_seconds": score_seconds(ctx, method, suite.regime == "structured"),
                }
                if row.get("reached") is None and suite.regime == "structured":
                    row["reached"] = dense_macs / row["macs"]  # where a one-shot method actually landed
                atomic_save(model, model_path(out, suite.name, method, level, seed))  # for reuse and the latency pass
                _append(raw, row)
                done[(suite.name, method, level, seed)] = row
                rows.append(row)
    return rows


def _check_dense(raw: Path, suite: Suite, seed: int, did: str, rows: list[dict[str, Any]],
                 measured: Callable[[], dict[str, Any]]) -> None:
    foreign = foreign_rows(rows, did, measured)
    if foreign:
        raise DenseMismatchError(
            f"{raw}: {len(foreign)} rows of suite {suite.name!r} seed {seed} (methods "
            f"{', '.join(sorted({r['method'] for r in foreign}))}) were measured on another dense model than "
            f"{_dense_path(suite, seed)} (dense_id {did}), so rows added now could not be paired with them. Restore "
            "that dense model, run into a new --out folder, or delete that seed's rows of the suite to re-run them.")


def comparison_of(method: str) -> str:
    """The comparison (``score_only``, ``pipeline``, ``no_finetune``: :data:`~benchmarks.suites.COMPARISONS`) whose
    method or baseline ``method`` is, else ``ablation``."""
    for name, (ours, baselines) in COMPARISONS.items():  # score_only first: its baselines also serve the pipeline
        if method == ours or method in baselines:
            return name
    return "ablation"


def model_path(out: Path, suite: str, method: str, level: float, seed: int) -> Path:
    """Where the pruned model of one raw row is kept (next to raw.jsonl, not committed): calibrated variants reuse
    it and the latency pass re-measures it."""
    return out / "models" / f"{suite}__{method}__{level}__{seed}.pt"


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def suites_for(names: list[str] | None, quick: bool) -> list[Suite]:
    if quick:
        return [replace(SUITES[n], **QUICK[n]) for n in (names or list(QUICK))]
    from .suites import FULL

    return [SUITES[n] for n in (names or list(FULL))]


def run(names: list[str] | None, quick: bool, out: Path = RESULTS, seeds: list[int] | None = None,
        methods: list[str] | None = None, levels: list[float] | None = None) -> None:
    set_quiet(True)
    CACHE.mkdir(parents=True, exist_ok=True)
    for suite in suites_for(names, quick):
        if seeds:
            suite = replace(suite, seeds=tuple(s for s in suite.seeds if s in seeds))
        if methods:
            suite = replace(suite, methods=tuple(m for m in suite.methods if m in methods))
        if levels:
            suite = replace(suite, levels=tuple(v for v in suite.levels if v in levels))
        t = time.time()
        run_suite(suite, out)
        log.info("suite %s done in %.0f s", suite.name, time.time() - t)
